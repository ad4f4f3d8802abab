// lra.hpp's ownership of a registered reduction, run under valgrind by the
// bindings stage (no leak, no access to freed memory; test_lra_hpp leaks
// handles on purpose, so it cannot be): the reduction follows its handle
// through a move assignment whose source is then destroyed (and so does
// the exception one throws), a replaced reduction is never called again, a
// refused removal keeps it, and destroying a handle frees its reduction.
// Exits non-zero on the first failed check.
#include <lra.hpp>

#include <cstdint>
#include <stdexcept>
#include <utility>

#include "expect.hpp"

namespace {

// A one-rank reduction that counts its calls.
std::int32_t counting(double*, std::size_t, void* user) {
  ++*static_cast<int*>(user);
  return 0;
}

// One that throws once asked to.
std::int32_t throwing(double*, std::size_t, void* user) {
  if (*static_cast<bool*>(user)) throw std::runtime_error("probe");
  return 0;
}

// Sharded parameters: every step calls the reduction (and fails without one).
lra::Handle sharded_handle() {
  lra_config cfg = lra::config(lra::Optimizer::SGD, 0.1);
  cfg.num_threads = 1;
  cfg.sharding = LRA_SHARDING_SHARDED;
  return lra::Handle(cfg);
}

lra::Status step_status(lra::Handle& h) {
  float w = 1.0f, g = 1.0f;
  try {
    h.step({lra::tensor(&w, &g, 1)}, 1.0);
    h.report_reeval(0.5);
  } catch (const lra::Error& e) {
    return e.code();
  }
  return lra::Status::Ok;
}

}  // namespace

int main() {
  // Move assignment: the source's reduction goes with its handle, and the
  // source is destroyed before the target steps.
  int first = 0;
  lra::Handle target = sharded_handle();
  {
    lra::Handle source = sharded_handle();
    source.set_reduction(counting, &first);
    target = std::move(source);
  }
  EXPECT(step_status(target) == lra::Status::Ok);
  EXPECT(first > 0);

  // A reduction that throws, moved the same way: its exception still comes
  // back nested in the lra::Error.
  {
    bool fail = false;
    lra::Handle to = sharded_handle();
    {
      lra::Handle from = sharded_handle();
      from.set_reduction(throwing, &fail);
      to = std::move(from);
    }
    fail = true;
    float w = 1.0f, g = 1.0f;
    EXPECT(nested_what_of([&] { to.step({lra::tensor(&w, &g, 1)}, 1.0); }) == "probe");
  }

  // Replaced: only the new reduction is called.
  int second = 0;
  const int first_calls = first;
  target.set_reduction(counting, &second);
  EXPECT(step_status(target) == lra::Status::Ok);
  EXPECT(first == first_calls && second > 0);

  // Removal is refused where the configuration needs a reduction (sharded):
  // the registered one stays, alive, and is still called.
  const int second_calls = second;
  try {
    target.set_reduction(nullptr, nullptr);
    EXPECT(false);
  } catch (const lra::Error& e) {
    EXPECT(e.code() == lra::Status::InvalidArgument);
  }
  EXPECT(step_status(target) == lra::Status::Ok);
  EXPECT(second > second_calls);

  // Where none is needed, a registered reduction is never called, and
  // removing it is allowed.
  {
    int unused = 0;
    lra_config cfg = lra::config(lra::Optimizer::SGD, 0.1);
    cfg.num_threads = 1;
    lra::Handle h(cfg);
    h.set_reduction(counting, &unused);
    EXPECT(step_status(h) == lra::Status::Ok);
    h.set_reduction(nullptr, nullptr);
    EXPECT(step_status(h) == lra::Status::Ok);
    EXPECT(unused == 0);
  }

  // Move construction, then the handle and its reduction end with the scope.
  {
    int third = 0;
    lra::Handle h = sharded_handle();
    h.set_reduction(counting, &third);
    lra::Handle moved = std::move(h);
    EXPECT(step_status(moved) == lra::Status::Ok && third > 0);
  }
  std::puts("test_lra_hpp_lifetime: reductions follow moves, replacement and removal");
  return 0;
}
