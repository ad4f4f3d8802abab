// Tests of lra_torch.hpp's checks and gathering: parameters without
// gradients, unsupported dtypes, non-contiguous tensors, gradients that
// LibTorch reallocates between steps, the closure form under no-grad.
#include <lra_torch.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#define EXPECT(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const lra::Error& e) {
    return e.what();
  }
  return "";
}

int main() {
  torch::manual_seed(0);
  auto cfg = lra::config(lra::Optimizer::SGD, 0.1);
  cfg.num_threads = 1;

  // Unsupported dtype, no trainable parameters.
  EXPECT(error_of([&] {
          lra::TorchOptimizer o({torch::zeros({3}, torch::kDouble).requires_grad_()}, cfg);
        }).find("float32") != std::string::npos);
  EXPECT(error_of([&] { lra::TorchOptimizer o({torch::zeros({3})}, cfg); })
            .find("no parameters") != std::string::npos);

  auto w = torch::ones({2, 3}).requires_grad_();
  lra::TorchOptimizer opt({w}, cfg);

  // No gradient yet.
  EXPECT(error_of([&] { opt.step(1.0); }).find("no gradient") != std::string::npos);

  // Non-contiguous gradient.
  w.mutable_grad() = torch::ones({3, 2}).t();
  EXPECT(error_of([&] { opt.step(1.0); }).find("contiguous") != std::string::npos);

  // A fresh gradient tensor each step (set_to_none semantics): the adapter
  // must follow the current .grad, not the first one.
  auto loss_of = [&] { return (w * w).sum() * 0.5; };  // gradient = w
  for (int i = 0; i < 3; ++i) {
    w.mutable_grad() = torch::Tensor();
    auto loss = loss_of();
    loss.backward();
    const auto before = w.detach().clone();
    opt.step(loss);
    const double lr_used = opt.handle().last_phi() / before.pow(2).sum().item<double>();
    EXPECT(torch::allclose(w.detach(), before * (1.0 - lr_used)));
    bool grad_mode_inside = true;
    auto info = opt.reeval([&] {
      grad_mode_inside = torch::GradMode::is_enabled();
      return loss_of();
    });
    EXPECT(info.has_value());
    EXPECT(!grad_mode_inside);
    EXPECT(torch::GradMode::is_enabled());
  }
  EXPECT(opt.handle().counters().steps == 3);
  EXPECT(opt.handle().counters().reevals == 3);

  // A found-inf flag makes the step a no-op, reported as skipped.
  {
    w.mutable_grad() = torch::ones_like(w);
    const auto before = w.detach().clone();
    opt.step(torch::tensor(1.0), torch::ones({1}));
    EXPECT(torch::equal(w.detach(), before));
    const auto info = opt.report_reeval(1.0);
    EXPECT(lra::decision(info) == lra::Decision::Skipped);
    EXPECT(info.skip_reason == LRA_SKIP_FOUND_INF);
    EXPECT(!error_of([&] { opt.step(torch::tensor(1.0), torch::ones({2})); }).empty());
  }

  // CUDA parameters: rejected with a clear message when this build has no
  // CUDA support in lra_torch.hpp (CPU-only LibTorch cannot make them).
#ifndef LRA_TORCH_CUDA
  std::puts("test_lra_torch: LRA_TORCH_CUDA is off (CPU-only LibTorch); CUDA path not compiled");
#endif
  std::puts("test_lra_torch: all checks passed");
  return 0;
}
