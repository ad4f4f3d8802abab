// A shared library built with hidden visibility (CMake's
// CXX_VISIBILITY_PRESET hidden, as plugins and Python extensions are): it
// holds its own copy of lra.hpp's inline functions and of their
// thread_local. It registers a reduction that throws; test_lra_hpp_dso steps.
#include <lra.hpp>

#include <stdexcept>

__attribute__((visibility("default"))) void register_throwing_reduction(lra::Handle& h) {
  h.set_reduction(
      [](double*, std::size_t, void*) -> std::int32_t {
        throw std::runtime_error("allreduce timed out");
      },
      nullptr);
}
