// lra_torch.hpp: LibTorch adapter for lra (header-only, C++17).
//
//   lra::TorchOptimizer opt(model->parameters(), lra::config(lra::Optimizer::Adam, 1e-4));
//   for (each batch x, y) {
//     model->zero_grad();
//     auto loss = loss_fn(model->forward(x), y);
//     loss.backward();
//     opt.step(loss);                                     // optimizer step, current η
//     opt.reeval([&] { return loss_fn(model->forward(x), y); });  // f+, adapts η
//   }
//
// What the caller must guarantee so that the re-evaluation compares like with
// like (ρ = (f_i − f+)/(φ/2) is meaningless otherwise):
//  * the SAME batch (same inputs, targets and loss reduction) for f_i and f+;
//  * the same deterministic function: no dropout mask drawn afresh for f+
//    (run both passes in eval mode, or re-seed the generator so the mask
//    repeats), and BatchNorm must not normalise f+ with different statistics
//    than f_i (eval mode for both passes, or batch statistics in both and no
//    running-statistics update from the f+ pass that later steps depend on);
//  * nothing else moves the parameters between step() and the re-evaluation.
// reeval() runs the closure under torch::NoGradGuard (f+ needs no graph);
// mode switches (model->eval()/train()) are the caller's, inside the closure.
//
// CUDA: parameters on a CUDA device get a CUDA handle on that device, and every
// step runs on LibTorch's current CUDA stream. That needs the CUDA parts of
// LibTorch, so it is compiled only with LRA_TORCH_CUDA defined (the CMake
// target lra::torch defines it when Torch was built with CUDA); without it
// CUDA parameters are rejected with a message, and the header builds against
// CPU-only LibTorch.
#ifndef LRA_TORCH_HPP
#define LRA_TORCH_HPP

#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lra.hpp"

#ifdef LRA_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace lra {

inline DType dtype_of(const ::torch::Tensor& t) {
  switch (t.scalar_type()) {
    case ::torch::kFloat: return DType::F32;
    case ::torch::kHalf: return DType::F16;
    case ::torch::kBFloat16: return DType::BF16;
    default:
      throw Error(static_cast<lra_status>(Status::InvalidArgument),
                  std::string("lra supports float32, float16 and bfloat16 tensors, not ") +
                      std::string(c10::toString(t.scalar_type())));
  }
}

// lra over a fixed list of LibTorch parameters (all on one device).
class TorchOptimizer {
 public:
  // Parameters without requires_grad are left out. `cfg.device` and
  // `cfg.device_ordinal` are set from the parameters' device.
  TorchOptimizer(std::vector<::torch::Tensor> params, lra_config cfg)
      : params_(select(std::move(params))), handle_(prepare(params_, cfg)) {
    list_.resize(params_.size());
  }

  // The optimizer step with the current η: `loss` is f_i on this batch.
  // Gathers the data pointers of the parameters and of their CURRENT
  // gradients (LibTorch may reallocate .grad between steps).
  void step(double loss, double obs_var = 0.0) { handle_.step(gather(), loss, obs_var, stream()); }
  void step(const ::torch::Tensor& loss, double obs_var = 0.0) { step(value(loss), obs_var); }

  // `step` with a one-element float32 found-inf flag on the parameters'
  // device (e.g. from mixed precision): non-zero makes the step a no-op.
  void step(const ::torch::Tensor& loss, const ::torch::Tensor& found_inf, double obs_var = 0.0) {
    if (found_inf.scalar_type() != ::torch::kFloat || found_inf.device() != device_ ||
        found_inf.numel() != 1)
      throw invalid("found_inf must be one float32 element on the parameters' device");
    handle_.step_ex(gather(), value(loss), obs_var, found_inf.data_ptr<float>(), stream());
  }

  // f+ = the loss on the SAME batch after step(); adapts η.
  lra_reeval_info report_reeval(double loss_after) { return handle_.report_reeval(loss_after); }
  lra_reeval_info report_reeval(const ::torch::Tensor& loss_after) {
    return report_reeval(value(loss_after));
  }

  // Closure form: when the re-evaluation schedule wants this step
  // re-evaluated (or `force`), runs `closure()` (returning the loss on the
  // same batch as a tensor or a double) under NoGradGuard and reports it.
  template <class Closure>
  std::optional<lra_reeval_info> reeval(Closure&& closure, bool force = false) {
    if (!force && !handle_.should_reeval()) return std::nullopt;
    ::torch::NoGradGuard no_grad;
    return report_reeval(std::forward<Closure>(closure)());
  }

  double lr() const { return handle_.lr(); }
  void set_lr(double lr) { handle_.set_lr(lr); }
  Handle& handle() noexcept { return handle_; }
  const std::vector<::torch::Tensor>& parameters() const noexcept { return params_; }

 private:
  static Error invalid(const std::string& what) {
    return Error(static_cast<lra_status>(Status::InvalidArgument), what);
  }

  static std::vector<::torch::Tensor> select(std::vector<::torch::Tensor> params) {
    std::vector<::torch::Tensor> out;
    for (auto& p : params)
      if (p.requires_grad()) out.push_back(std::move(p));
    if (out.empty()) throw invalid("no parameters that require gradients");
    return out;
  }

  lra_config prepare(const std::vector<::torch::Tensor>& params, lra_config cfg) {
    device_ = params.front().device();
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (params[i].device() != device_)
        throw invalid("parameter " + std::to_string(i) + " is on " + params[i].device().str() +
                      ", parameter 0 on " + device_.str() + ": one TorchOptimizer per device");
      dtype_of(params[i]);
    }
    if (device_.is_cuda()) {
#ifdef LRA_TORCH_CUDA
      cfg.device = LRA_DEVICE_CUDA;
      cfg.device_ordinal = device_.index() < 0 ? 0 : device_.index();
#else
      throw Error(static_cast<lra_status>(Status::Unsupported),
                  "CUDA parameters need lra_torch.hpp compiled with LRA_TORCH_CUDA "
                  "(link lra::torch, or define it with a CUDA build of LibTorch)");
#endif
    } else if (device_.is_cpu()) {
      cfg.device = LRA_DEVICE_HOST;
    } else {
      throw invalid("unsupported device " + device_.str());
    }
    return cfg;
  }

  TensorList gather() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      const auto& g = p.grad();
      const std::string name = "parameter " + std::to_string(i);
      if (!g.defined()) throw invalid(name + " has no gradient (was backward() called?)");
      if (g.is_sparse()) throw invalid(name + " has a sparse gradient");
      if (g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
          g.sizes() != p.sizes())
        throw invalid(name + ": the gradient's dtype, device or shape differs from the parameter");
      if (!p.is_contiguous() || !g.is_contiguous())
        throw invalid(name + " or its gradient is not contiguous");
      list_[i] = tensor(p.data_ptr(), g.data_ptr(), static_cast<std::uint64_t>(p.numel()),
                        dtype_of(p));
    }
    return list_;
  }

  void* stream() const {
#ifdef LRA_TORCH_CUDA
    if (device_.is_cuda())
      return static_cast<void*>(c10::cuda::getCurrentCUDAStream(device_.index()).stream());
#endif
    return nullptr;
  }

  static double value(const ::torch::Tensor& loss) { return loss.detach().item<double>(); }

  std::vector<::torch::Tensor> params_;
  ::torch::Device device_{::torch::kCPU};
  Handle handle_;
  std::vector<lra_tensor> list_;
};

}  // namespace lra

#endif  // LRA_TORCH_HPP
