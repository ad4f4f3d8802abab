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
// Tensors: float32/float16/bfloat16 (mixed per parameter), one device, each
// parameter a strided (not sparse) leaf that covers its memory densely
// (contiguous or a permuted dense layout such as channels_last; the layout of
// the first step is kept: the optimizer state follows memory order), without
// a lazy negation bit (_neg_view), not an inference tensor (checked at
// construction and at every step). Gradients must be strided and of the
// parameter's dtype, device and shape; one of another layout (transposed,
// expanded), a lazily negated one or a ZeroTensor is copied into the
// parameter's layout for the step. Parameters are never copied (an update of
// a copy would be lost). Messages name parameters by their position in the
// list given to the constructor (tensors[k] of lra's own messages: the k-th
// parameter kept).
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

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lra.hpp"

#ifdef LRA_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace lra {

// lra's dtype of t; `what` names t in the error of an unsupported dtype
// (TorchOptimizer passes "parameter k").
inline DType dtype_of(const ::torch::Tensor& t, const std::string& what = "the tensor") {
  switch (t.scalar_type()) {
    case ::torch::kFloat: return DType::F32;
    case ::torch::kHalf: return DType::F16;
    case ::torch::kBFloat16: return DType::BF16;
    default:
      throw Error(static_cast<lra_status>(Status::InvalidArgument),
                  what + " is " + std::string(c10::toString(t.scalar_type())) +
                      ": lra supports float32, float16 and bfloat16 tensors");
  }
}

namespace detail {
// The strides of t's dimensions longer than 1 (0 for the others): two
// tensors of one shape with the same memory order put every element at the
// same offset from their data pointers.
inline std::vector<std::int64_t> memory_order(const ::torch::Tensor& t) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(t.dim()), 0);
  for (std::int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) order[static_cast<std::size_t>(d)] = t.stride(d);
  return order;
}

// Whether t's elements fill t.numel() consecutive slots, each once:
// contiguous tensors and permuted dense layouts (channels_last), whose memory
// an elementwise update may walk in order; not views that skip or repeat
// memory (slices, expand).
inline bool covers_memory_densely(const ::torch::Tensor& t) {
  std::vector<std::pair<std::int64_t, std::int64_t>> dims;  // (stride, size)
  for (std::int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  std::int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// TorchOptimizer checkpoints wrap the handle's: "LRATORCH", then (every
// integer little-endian) u32 format version, u32 flags (bit 0: memory orders
// recorded, i.e. the handle held optimizer state), u64 parameter count, per
// parameter u32 dimensions, u32 lra_dtype (from format 3 on) and that many
// (i64 size, i64 memory-order stride) pairs (strides 0 when not recorded),
// u64 length of the handle's checkpoint, u64 FNV-1a hash of every byte
// before it, then the handle's checkpoint (which carries its own checksum).
constexpr unsigned char kTorchStateMagic[8] = {'L', 'R', 'A', 'T', 'O', 'R', 'C', 'H'};
// 1 (unreleased) had no hash; 2 no dtypes (still read: its dtypes are
// then not checked, as before).
constexpr std::uint32_t kTorchStateVersion = 3;
constexpr std::uint32_t kTorchStateNoDtypes = 2;
constexpr std::uint32_t kTorchStateHasOrders = 1;

inline std::uint64_t fnv1a(const unsigned char* data, std::size_t len) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t k = 0; k < len; ++k) h = (h ^ data[k]) * 0x100000001b3ULL;
  return h;
}

inline void put_le(std::vector<unsigned char>& out, std::uint64_t v, std::size_t bytes) {
  for (std::size_t k = 0; k < bytes; ++k) out.push_back(static_cast<unsigned char>(v >> (8 * k)));
}

// Reads a TorchOptimizer checkpoint; every read is bounds-checked, and a
// short buffer throws BadCheckpoint.
class StateReader {
 public:
  StateReader(const unsigned char* data, std::size_t len) : data_(data), len_(len) {}
  std::uint64_t le(std::size_t bytes) {
    need(bytes);
    std::uint64_t v = 0;
    for (std::size_t k = 0; k < bytes; ++k)
      v |= static_cast<std::uint64_t>(data_[pos_ + k]) << (8 * k);
    pos_ += bytes;
    return v;
  }
  std::int64_t i64() { return static_cast<std::int64_t>(le(8)); }
  bool magic() {
    if (len_ - pos_ < sizeof kTorchStateMagic) return false;
    if (!std::equal(std::begin(kTorchStateMagic), std::end(kTorchStateMagic), data_ + pos_))
      return false;
    pos_ += sizeof kTorchStateMagic;
    return true;
  }
  void need(std::uint64_t bytes) const {
    if (bytes > len_ - pos_)
      throw Error(static_cast<lra_status>(Status::BadCheckpoint),
                  "the TorchOptimizer checkpoint is truncated");
  }
  const unsigned char* here() const { return data_ + pos_; }
  std::size_t left() const { return len_ - pos_; }
  std::size_t read() const { return pos_; }
  void skip(std::uint64_t bytes) {
    need(bytes);
    pos_ += static_cast<std::size_t>(bytes);
  }
  void seek(std::size_t pos) { pos_ = pos; }  // back to a position read before

 private:
  const unsigned char* data_;
  std::size_t len_;
  std::size_t pos_ = 0;
};

inline std::string dims_str(const std::vector<std::int64_t>& v) {
  return c10::str(c10::IntArrayRef(v));
}
}  // namespace detail

// lra over a fixed list of LibTorch parameters (all on one device).
class TorchOptimizer {
 public:
  // Parameters without requires_grad are left out (for good: the first step
  // fixes the tensor layout). `cfg.device` and `cfg.device_ordinal` are set
  // from the parameters' device.
  TorchOptimizer(std::vector<::torch::Tensor> params, lra_config cfg)
      : TorchOptimizer(FromSelected{}, select(std::move(params)), cfg) {}

  // The optimizer step with the current η: `loss` is f_i on this batch.
  // Gathers the data pointers of the parameters and of their CURRENT
  // gradients (LibTorch may reallocate .grad between steps). A gradient
  // whose layout differs from its parameter's (transposed, expanded) is
  // copied into the parameter's layout for the step.
  void step(double loss, double obs_var = 0.0) { step_with(loss, obs_var, nullptr); }
  void step(const ::torch::Tensor& loss, double obs_var = 0.0) { step(value(loss), obs_var); }

  // `step` with a one-element float32 found-inf flag on the parameters'
  // device (e.g. from mixed precision): non-zero makes the step a no-op.
  void step(const ::torch::Tensor& loss, const ::torch::Tensor& found_inf, double obs_var = 0.0) {
    if (found_inf.scalar_type() != ::torch::kFloat || found_inf.device() != device_ ||
        found_inf.numel() != 1 || found_inf.layout() != ::torch::kStrided)
      throw invalid("found_inf must be one float32 element on the parameters' device");
    step_with(value(loss), obs_var, found_inf.data_ptr<float>());
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

  // Clears the gradients like torch.optim.Optimizer.zero_grad in Python.
  // LibTorch refuses detach_() on a view (a gradient that is a slice of one
  // flat buffer, as DDP's gradient_as_bucket_view makes), so, as Python does,
  // only a gradient with a graph is detached; dropping one needs neither.
  void zero_grad(bool set_to_none = true) {
    for (auto& p : params_) {
      auto& g = p.mutable_grad();
      if (!g.defined()) continue;
      if (set_to_none) {
        g.reset();
        continue;
      }
      if (g.grad_fn())
        g.detach_();
      else
        g.requires_grad_(false);
      g.zero_();
    }
  }

  double lr() const { return handle_.lr(); }
  void set_lr(double lr) { handle_.set_lr(lr); }
  Handle& handle() noexcept { return handle_; }
  const Handle& handle() const noexcept { return handle_; }
  const std::vector<::torch::Tensor>& parameters() const noexcept { return params_; }

  // Checkpoints that know the parameters: the handle's checkpoint with each
  // parameter's shape and, when the handle holds optimizer state, its memory
  // order (the state follows memory order). load_state refuses, with
  // BadCheckpoint and nothing changed, a checkpoint of other shapes or of
  // another memory layout (one saved contiguous and loaded into a
  // channels_last model would give each element another element's state),
  // and then keeps the saved layout as if the saved steps had been taken
  // here. A checkpoint saved before any step records no layout and loads
  // into any. handle().save_state()/load_state() are the bare checkpoint,
  // which checks element counts and dtypes only; after a bare load, this
  // save_state records the layout the parameters have now (the one the next
  // step would fix).
  std::vector<unsigned char> save_state() const {
    std::vector<std::vector<std::int64_t>> orders = memory_orders_;
    if (orders.empty() && handle_.counters().steps > 0)
      for (const auto& p : params_) orders.push_back(detail::memory_order(p));
    const bool has_orders = !orders.empty();
    std::vector<unsigned char> out(std::begin(detail::kTorchStateMagic),
                                   std::end(detail::kTorchStateMagic));
    detail::put_le(out, detail::kTorchStateVersion, 4);
    detail::put_le(out, has_orders ? detail::kTorchStateHasOrders : 0, 4);
    detail::put_le(out, params_.size(), 8);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      const auto dims = static_cast<std::size_t>(p.dim());
      if (has_orders && orders[i].size() != dims)
        throw invalid(name(i) + " changed its number of dimensions since the last step");
      detail::put_le(out, dims, 4);
      detail::put_le(out, static_cast<std::uint64_t>(dtype_of(p, name(i))), 4);
      for (std::size_t d = 0; d < dims; ++d) {
        detail::put_le(out, static_cast<std::uint64_t>(p.size(static_cast<std::int64_t>(d))), 8);
        detail::put_le(out, has_orders ? static_cast<std::uint64_t>(orders[i][d]) : 0, 8);
      }
    }
    const std::vector<unsigned char> inner = handle_.save_state();
    detail::put_le(out, inner.size(), 8);
    detail::put_le(out, detail::fnv1a(out.data(), out.size()), 8);
    out.insert(out.end(), inner.begin(), inner.end());
    return out;
  }
  void load_state(const void* data, std::size_t len) {
    if (data == nullptr && len != 0)
      throw Error(static_cast<lra_status>(Status::NullPointer), "data is NULL");
    detail::StateReader in(static_cast<const unsigned char*>(data), len);
    if (!in.magic())
      throw bad_checkpoint("not a TorchOptimizer checkpoint (a bare Handle checkpoint loads "
                           "through handle().load_state(), which cannot check shapes or "
                           "memory layout)");
    const auto version = in.le(4);
    if (version != detail::kTorchStateVersion && version != detail::kTorchStateNoDtypes)
      throw bad_checkpoint("TorchOptimizer checkpoint format " + std::to_string(version) +
                           ", this lra_torch.hpp reads formats " +
                           std::to_string(detail::kTorchStateNoDtypes) + " and " +
                           std::to_string(detail::kTorchStateVersion));
    const bool has_dtypes = version == detail::kTorchStateVersion;
    const auto flags = in.le(4);
    const bool has_orders = (flags & detail::kTorchStateHasOrders) != 0;
    const auto count = in.le(8);
    // The parameter records are walked once to find the hash, which is
    // checked before anything is compared (a corrupted file gets "corrupt",
    // not a misleading mismatch) and before anything is allocated.
    const std::size_t records = in.read();
    for (std::uint64_t i = 0; i < count; ++i) {
      const auto dims = in.le(4);
      if (has_dtypes) in.skip(4);
      in.skip(dims * 16);  // dims is at most 2^32 - 1: no overflow
    }
    const auto inner = in.le(8);
    const auto header_hash = detail::fnv1a(static_cast<const unsigned char*>(data), in.read());
    if (in.le(8) != header_hash)
      throw bad_checkpoint("the TorchOptimizer checkpoint is corrupt (its header hash differs)");
    if (flags != (flags & detail::kTorchStateHasOrders))
      throw bad_checkpoint("the TorchOptimizer checkpoint has flags this lra_torch.hpp does not "
                           "know (" + std::to_string(flags) + ")");
    if (inner != in.left())
      throw bad_checkpoint("the TorchOptimizer checkpoint is truncated or has trailing bytes");
    if (count != params_.size())
      throw bad_checkpoint("the checkpoint was saved for " + std::to_string(count) +
                           " parameters, this optimizer has " + std::to_string(params_.size()));
    const std::size_t inner_at = in.read();
    in.seek(records);
    std::vector<std::vector<std::int64_t>> orders(params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      const auto dims = in.le(4);
      // Refused here, not at the next step: a fresh handle takes any layout
      // from a checkpoint, and every step would then fail against it.
      if (has_dtypes) {
        const auto dtype = in.le(4);
        if (dtype != static_cast<std::uint64_t>(dtype_of(p, name(i))))
          throw bad_checkpoint(name(i) + " was saved with lra_dtype " + std::to_string(dtype) +
                               ", it is " + std::string(c10::toString(p.scalar_type())) +
                               " now");
      }
      std::vector<std::int64_t> sizes(dims);
      orders[i].resize(dims);
      for (std::size_t d = 0; d < dims; ++d) {
        sizes[d] = in.i64();
        orders[i][d] = in.i64();
      }
      if (sizes != p.sizes().vec())
        throw bad_checkpoint(name(i) + " was saved with shape " + detail::dims_str(sizes) +
                             ", it has shape " + c10::str(p.sizes()) + " now");
      if (has_orders && p.numel() > 0 && orders[i] != detail::memory_order(p))
        throw bad_checkpoint(
            name(i) + " was saved in another memory layout (strides " +
            detail::dims_str(orders[i]) + ", 0 for dimensions of size 1) than it has now " +
            "(strides " + c10::str(p.strides()) +
            "): lra's optimizer state follows memory order; give the model its saved layout "
            "(e.g. contiguous() or channels_last) before loading");
    }
    in.seek(inner_at);
    handle_.load_state(in.here(), in.left());
    if (has_orders) memory_orders_ = std::move(orders);
  }
  void load_state(const std::vector<unsigned char>& buf) { load_state(buf.data(), buf.size()); }

 private:
  static Error invalid(const std::string& what) {
    return Error(static_cast<lra_status>(Status::InvalidArgument), what);
  }
  static Error bad_checkpoint(const std::string& what) {
    return Error(static_cast<lra_status>(Status::BadCheckpoint), what);
  }
  static std::string name_at(std::size_t position) {
    return "parameter " + std::to_string(position);
  }
  // Parameter i of params_, named by its position in the constructor's list.
  std::string name(std::size_t i) const { return name_at(index_[i]); }

  struct Selected {
    std::vector<::torch::Tensor> params;
    std::vector<std::size_t> index;  // positions in the caller's list
  };

  // The tag keeps this constructor out of overload resolution for the
  // public one's arguments: `TorchOptimizer({}, cfg)` was ambiguous.
  struct FromSelected {};
  TorchOptimizer(FromSelected, Selected s, lra_config cfg)
      : params_(std::move(s.params)), index_(std::move(s.index)), handle_(prepare(params_, cfg)) {
    list_.resize(params_.size());
  }

  static Selected select(std::vector<::torch::Tensor> params) {
    Selected out;
    for (std::size_t k = 0; k < params.size(); ++k) {
      // requires_grad() of an undefined tensor is false: it would be left
      // out silently, as if frozen.
      if (!params[k].defined())
        throw invalid(name_at(k) + " is an undefined tensor (a default-constructed "
                                   "torch::Tensor): pass defined parameters only");
      if (!params[k].requires_grad()) continue;
      out.params.push_back(std::move(params[k]));
      out.index.push_back(k);
    }
    if (out.params.empty()) throw invalid("no parameters that require gradients");
    for (std::size_t i = 0; i < out.params.size(); ++i) {
      const std::string name = name_at(out.index[i]);
      if (!out.params[i].is_leaf())
        throw invalid(name +
                      " is not a leaf tensor (it is the result of an operation): autograd "
                      "never fills its grad; pass the leaf it was computed from");
      for (std::size_t j = 0; j < i; ++j)
        if (out.params[i].is_same(out.params[j]))
          throw invalid(name + " is " + name_at(out.index[j]) +
                        " again (a tied weight? pass each tensor once)");
    }
    return out;
  }

  // What makes a parameter impossible to update in place through its data
  // pointer, or "" if nothing.
  static std::string unsupported(const ::torch::Tensor& p) {
    if (p.layout() != ::torch::kStrided)
      // c10::str, not c10::toString: that converts the Layout to a whole
      // TensorOptions and prints it.
      return " has layout " + c10::str(p.layout()) +
             ": lra updates dense (strided) tensors only";
    if (p.is_neg() || p.is_conj())
      return " is a lazily negated or conjugated view (_neg_view): its memory holds other "
             "values than the tensor; resolve it (resolve_neg()) before making the optimizer";
    if (p._is_zerotensor()) return " is a ZeroTensor, which has no memory to update";
    // After a step lra bumps the version counter, which an inference tensor
    // has not: refused before anything is updated (also one made so after
    // construction, by set_data under InferenceMode).
    if (p.is_inference())
      return " is an inference tensor (made under InferenceMode): it cannot be updated in "
             "place outside InferenceMode; create the model outside it";
    return "";
  }

  Error not_dense(std::size_t i) const {
    return invalid(name(i) + " is a view with strides " + c10::str(params_[i].strides()) +
                   " that does not cover its memory densely; lra updates parameters in place, "
                   "so it cannot work on a contiguous copy");
  }

  lra_config prepare(const std::vector<::torch::Tensor>& params, lra_config cfg) {
    device_ = params.front().device();
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (params[i].device() != device_)
        throw invalid(name(i) + " is on " + params[i].device().str() + ", " + name(0) + " on " +
                      device_.str() + ": one TorchOptimizer per device");
      dtype_of(params[i], name(i));
      const std::string why = unsupported(params[i]);
      if (!why.empty()) throw invalid(name(i) + why);
      // Refused here too, not only at the first step (after set_data).
      if (params[i].numel() > 0 && !detail::covers_memory_densely(params[i]))
        throw not_dense(i);
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

  // Fills list_ (and grad_copies_, which must outlive the lra call) and
  // returns the parameters' memory orders.
  std::vector<std::vector<std::int64_t>> gather() {
    std::vector<std::vector<std::int64_t>> orders(params_.size());
    grad_copies_.clear();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      // The handle lives on device_: another device's pointers would be
      // dereferenced as foreign memory (model->to() moves parameters in place).
      if (p.device() != device_)
        throw invalid(name(i) + " is now on " + p.device().str() + ", this optimizer's handle on " +
                      device_.str() + ": make the TorchOptimizer after moving the model");
      const std::string why = unsupported(p);
      if (!why.empty()) throw invalid(name(i) + why);
      const auto& g = p.grad();
      if (!g.defined())
        throw invalid(name(i) + (p.requires_grad()
                                     ? " has no gradient (was backward() called?)"
                                     : " has no gradient: it no longer requires grad (frozen "
                                       "after the optimizer was made; the parameter list is "
                                       "fixed: make a new TorchOptimizer without it)"));
      if (g.layout() != ::torch::kStrided)
        throw invalid(name(i) + " has a non-dense (e.g. sparse) gradient");
      if (g.scalar_type() != p.scalar_type() || g.device() != p.device() ||
          g.sizes() != p.sizes())
        throw invalid(name(i) +
                      ": the gradient's dtype, device or shape differs from the parameter");
      orders[i] = detail::memory_order(p);
      const void* grad_data = g.data_ptr();
      if (p.numel() > 0) {
        if (!detail::covers_memory_densely(p)) throw not_dense(i);
        if (!memory_orders_.empty() && memory_orders_[i] != orders[i])
          throw invalid(name(i) +
                        " changed its memory layout (strides) since the first step; lra's "
                        "optimizer state follows the memory order");
        // A lazily negated gradient's memory holds -g, a ZeroTensor has none:
        // both are materialised by the copy.
        if (detail::memory_order(g) != orders[i] || g.is_neg() || g.is_conj() ||
            g._is_zerotensor()) {
          ::torch::NoGradGuard no_grad;  // a create_graph gradient needs no graph here
          grad_copies_.push_back(
              ::torch::empty_strided(p.sizes(), p.strides(), p.options()).copy_(g));
          grad_data = grad_copies_.back().data_ptr();
        }
      }
      list_[i] = tensor(p.data_ptr(), grad_data, static_cast<std::uint64_t>(p.numel()),
                        dtype_of(p, name(i)));
    }
    return orders;
  }

  void step_with(double loss, double obs_var, const float* found_inf) {
    auto orders = gather();
    // On CUDA the step is queued on LibTorch's current stream, where the
    // copies were made: freeing them once the call returns is stream-ordered.
    try {
      handle_.step_ex(list_, loss, obs_var, found_inf, stream());
    } catch (const Error& e) {
      grad_copies_.clear();
      const auto s = e.code();
      if (s != Status::InvalidArgument && s != Status::SizeMismatch && s != Status::NullPointer)
        throw;
      throw Error(e.status(), with_positions(e.what()));
    } catch (...) {
      grad_copies_.clear();
      throw;
    }
    grad_copies_.clear();
    memory_orders_ = std::move(orders);
    // lra wrote the parameters through raw pointers: tell autograd, as an
    // in-place update does, so that a graph that saved a parameter refuses
    // backward() instead of using the new values (as after torch::optim).
    for (const auto& p : params_) ::torch::autograd::impl::bump_version(p);
  }

  void* stream() const {
#ifdef LRA_TORCH_CUDA
    if (device_.is_cuda())
      return static_cast<void*>(c10::cuda::getCurrentCUDAStream(device_.index()).stream());
#endif
    return nullptr;
  }

  // lra's message with "tensors[k]" followed by the position of that
  // parameter in the constructor's list (frozen ones were left out).
  std::string with_positions(const std::string& what) const {
    static const std::string prefix = "lra: ", key = "tensors[";
    std::string in = what.compare(0, prefix.size(), prefix) == 0 ? what.substr(prefix.size()) : what;
    std::string out;
    std::size_t pos = 0;
    for (std::size_t at; (at = in.find(key, pos)) != std::string::npos;) {
      const std::size_t close = in.find(']', at);
      if (close == std::string::npos) break;
      out.append(in, pos, close + 1 - pos);
      pos = close + 1;
      const std::string digits = in.substr(at + key.size(), close - at - key.size());
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const std::size_t k = std::stoul(digits);
      if (k < index_.size()) out += " (" + name(k) + ")";
    }
    out.append(in, pos, std::string::npos);
    return out;
  }

  static double value(const ::torch::Tensor& loss) {
    if (!loss.defined()) throw invalid("the loss tensor is undefined");
    if (loss.numel() != 1)
      throw invalid("the loss must be one element (reduce it, e.g. with .mean()), not a tensor "
                    "of shape " + c10::str(loss.sizes()));
    return loss.detach().item<double>();
  }

  std::vector<::torch::Tensor> params_;
  std::vector<std::size_t> index_;  // params_[i] is parameter index_[i] of the caller's list
  ::torch::Device device_{::torch::kCPU};
  Handle handle_;
  std::vector<lra_tensor> list_;
  std::vector<::torch::Tensor> grad_copies_;
  std::vector<std::vector<std::int64_t>> memory_orders_;  // fixed by the first step
};

}  // namespace lra

#endif  // LRA_TORCH_HPP
