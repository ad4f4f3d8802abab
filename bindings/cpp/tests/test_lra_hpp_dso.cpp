// lra.hpp across shared objects: the reduction is registered by a library
// built with hidden visibility (throwing_reduction.cpp) and the step is
// taken here. The exception it throws must reach this program's lra::Error,
// nested, as it does within one program. Exits non-zero on failure.
#include <lra.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

void register_throwing_reduction(lra::Handle& h);

int main() {
  lra_config cfg = lra::config(lra::Optimizer::SGD, 0.1);
  cfg.num_threads = 1;
  cfg.sharding = LRA_SHARDING_SHARDED;
  lra::Handle h(cfg);
  register_throwing_reduction(h);
  std::vector<float> w = {1.0f}, g = {1.0f};
  std::string nested;
  try {
    h.step({lra::tensor(w.data(), g.data(), 1)}, 1.0);
  } catch (const lra::Error& e) {
    if (e.code() != lra::Status::ReductionFailed) {
      std::fprintf(stderr, "test_lra_hpp_dso: status %u, want ReductionFailed\n", e.status());
      return 1;
    }
    try {
      std::rethrow_if_nested(e);
    } catch (const std::runtime_error& inner) {
      nested = inner.what();
    }
  }
  if (nested != "allreduce timed out" || w[0] != 1.0f) {
    std::fprintf(stderr,
                 "test_lra_hpp_dso: the reduction's exception was lost between shared objects "
                 "(nested: \"%s\")\n",
                 nested.c_str());
    return 1;
  }
  std::puts("test_lra_hpp_dso: the reduction's exception crossed the shared library, nested");
  return 0;
}
