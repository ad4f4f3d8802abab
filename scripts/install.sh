#!/usr/bin/env bash
# Builds the release library and installs lra under PREFIX:
#   PREFIX/lib/liblra.so.VERSION, liblra.a   the C ABI (shared and static), with the
#   PREFIX/lib/liblra.so.ABI, liblra.so       links to it (ABI: the SONAME's suffix, build.rs)
#   PREFIX/include/lra.h                      the C header
#   PREFIX/include/lra.hpp, lra_torch.hpp     the header-only C++17 bindings
#   PREFIX/include/lra_*.h                    header-only helpers of bindings/*/ (MPI, NCCL, ...)
#   PREFIX/include/lra.f90                    the Fortran module source (compile it with your compiler)
#   PREFIX/include/lra_mpi.f90                its MPI reduction (module lra_mpi; compile with mpifort)
#   PREFIX/lib/cmake/lra/                     find_package(lra) (CMAKE_PREFIX_PATH=PREFIX)
#   PREFIX/lib/pkgconfig/lra.pc               pkg-config (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
# Usage: scripts/install.sh PREFIX   (honours CARGO_TARGET_DIR; LRA_SKIP_BUILD=1
# installs the library already built there).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
prefix="$(cd "$1" && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
# cargo, run in $root below, takes a relative CARGO_TARGET_DIR from there.
case "$target" in /*) ;; *) target="$root/$target" ;; esac

if [ "${LRA_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && cargo build --release --lib)
fi
version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml" | head -n 1)"
[ -n "$version" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }

install -d "$prefix/lib" "$prefix/include" "$prefix/lib/cmake/lra" "$prefix/lib/pkgconfig"
# The SONAME rule lives in build.rs; read it back from the library.
soname="$(objdump -p "$target/release/liblra.so" 2>/dev/null | sed -n 's/^ *SONAME *//p')"
case "$soname" in
  liblra.so.?*) ;;
  *) echo "install.sh: $target/release/liblra.so has no SONAME liblra.so.<abi> (objdump -p: '$soname')" >&2; exit 1 ;;
esac
rm -f "$prefix/lib/liblra.so" "$prefix/lib/$soname"
install -m 755 "$target/release/liblra.so" "$prefix/lib/liblra.so.$version"
ln -s "liblra.so.$version" "$prefix/lib/$soname"
ln -s "$soname" "$prefix/lib/liblra.so"
install -m 644 "$target/release/liblra.a" "$prefix/lib/liblra.a"
install -m 644 "$root/include/lra.h" "$prefix/include/lra.h"
install -m 644 "$root/bindings/cpp/lra.hpp" "$root/bindings/cpp/lra_torch.hpp" "$prefix/include/"
install -m 644 "$root/bindings/fortran/lra.f90" "$root/bindings/fortran/lra_mpi.f90" "$prefix/include/"
for helper in "$root"/bindings/*/lra_*.h; do
  if [ -e "$helper" ]; then install -m 644 "$helper" "$prefix/include/"; fi
done
install -m 644 "$root/bindings/cmake/lraConfig.cmake" "$prefix/lib/cmake/lra/lraConfig.cmake"
sed "s/@VERSION@/$version/g" "$root/bindings/cmake/lraConfigVersion.cmake.in" \
  >"$prefix/lib/cmake/lra/lraConfigVersion.cmake"
sed -e "s|@PREFIX@|$prefix|g" -e "s/@VERSION@/$version/g" "$root/bindings/cmake/lra.pc.in" \
  >"$prefix/lib/pkgconfig/lra.pc"
echo "installed lra $version into $prefix"
