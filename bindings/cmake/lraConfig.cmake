# CMake package configuration of lra (installed by scripts/install.sh PREFIX
# into PREFIX/lib/cmake/lra). Relocatable: paths are relative to this file.
#
#   find_package(lra 0.1 REQUIRED)                   # lra::lra, lra::lra_static, lra::cpp
#   find_package(Torch REQUIRED)
#   find_package(lra REQUIRED COMPONENTS torch)      # + lra::torch (after Torch)
#
# Targets:
#   lra::lra         the shared library with include/lra.h (C).
#   lra::lra_static  the static library and the system libraries Rust's std needs.
#   lra::cpp         lra::lra + the header-only C++17 binding lra.hpp.
#   lra::torch       lra::cpp + LibTorch + lra_torch.hpp; defines LRA_TORCH_CUDA
#                    when the Torch found before was built with CUDA.
include(CMakeFindDependencyMacro)
find_dependency(Threads)

get_filename_component(_lra_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(lra_INCLUDE_DIRS "${_lra_prefix}/include")
set(lra_LIBRARY "${_lra_prefix}/lib/liblra.so")
set(lra_STATIC_LIBRARY "${_lra_prefix}/lib/liblra.a")

foreach(_lra_file IN ITEMS "${lra_INCLUDE_DIRS}/lra.h" "${lra_LIBRARY}" "${lra_STATIC_LIBRARY}")
  if(NOT EXISTS "${_lra_file}")
    set(lra_FOUND FALSE)
    set(lra_NOT_FOUND_MESSAGE "lra is incompletely installed: ${_lra_file} is missing")
    return()
  endif()
endforeach()

if(NOT TARGET lra::lra)
  add_library(lra::lra SHARED IMPORTED)
  # lib/liblra.so links to liblra.so.<abi> (its SONAME, which executables
  # record); CMake puts lib/ in the build-tree RPATH.
  set_target_properties(lra::lra PROPERTIES
    IMPORTED_LOCATION "${lra_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${lra_INCLUDE_DIRS}")

  add_library(lra::lra_static STATIC IMPORTED)
  set_target_properties(lra::lra_static PROPERTIES
    IMPORTED_LOCATION "${lra_STATIC_LIBRARY}"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "${lra_INCLUDE_DIRS}"
    # rustc --print native-static-libs: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
    INTERFACE_LINK_LIBRARIES "gcc_s;util;rt;Threads::Threads;m;dl")

  add_library(lra::cpp INTERFACE IMPORTED)
  set_target_properties(lra::cpp PROPERTIES
    INTERFACE_LINK_LIBRARIES lra::lra
    INTERFACE_COMPILE_FEATURES cxx_std_17)
endif()

if("torch" IN_LIST lra_FIND_COMPONENTS AND NOT TARGET lra::torch)
  if(TARGET torch)
    add_library(lra::torch INTERFACE IMPORTED)
    set_target_properties(lra::torch PROPERTIES
      INTERFACE_LINK_LIBRARIES "lra::cpp;${TORCH_LIBRARIES}")
    if(TORCH_CUDA_LIBRARIES)
      set_property(TARGET lra::torch PROPERTY INTERFACE_COMPILE_DEFINITIONS LRA_TORCH_CUDA=1)
    endif()
    set(lra_torch_FOUND TRUE)
  else()
    set(lra_torch_FOUND FALSE)
    if(lra_FIND_REQUIRED_torch)
      set(lra_FOUND FALSE)
      set(lra_NOT_FOUND_MESSAGE "lra component torch: call find_package(Torch) before find_package(lra COMPONENTS torch)")
    endif()
  endif()
endif()
# A component this package does not have (a typo such as `torhc`) is not
# found, and fails a REQUIRED find_package, instead of passing unnoticed.
foreach(_lra_component IN LISTS lra_FIND_COMPONENTS)
  if(NOT _lra_component STREQUAL "torch")
    set(lra_${_lra_component}_FOUND FALSE)
    if(lra_FIND_REQUIRED_${_lra_component})
      set(lra_FOUND FALSE)
      set(lra_NOT_FOUND_MESSAGE "lra has no component '${_lra_component}' (its only component is torch)")
    endif()
  endif()
endforeach()
unset(_lra_component)
unset(_lra_prefix)
unset(_lra_file)
