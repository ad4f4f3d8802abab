// lra.hpp: header-only C++17 binding of lra (automatic learning-rate
// adaptation) over its C ABI, include/lra.h.
//
//   lra::Handle opt(lra::config(lra::Optimizer::Adam, /*lr=*/1e-4));
//   std::vector<lra_tensor> tensors = {lra::tensor(w, dw, n)};
//   opt.step(tensors, loss);              // optimizer step with the current η
//   auto info = opt.report_reeval(loss_after_on_the_same_batch);  // adapts η
//
// Every failing call throws lra::Error carrying the lra_status and the
// library's message. lra::Handle owns one lra_handle (move-only, RAII).
#ifndef LRA_HPP
#define LRA_HPP

#include <lra.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lra {

// Status codes: lra.h's LRA_* values (never reused; src/error.rs).
enum class Status : lra_status {
  Ok = LRA_OK,
  NullPointer = LRA_NULL_POINTER,
  InvalidArgument = LRA_INVALID_ARGUMENT,
  InvalidConfig = LRA_INVALID_CONFIG,
  CallOrder = LRA_CALL_ORDER,
  SizeMismatch = LRA_SIZE_MISMATCH,
  NoCuda = LRA_NO_CUDA,
  CudaError = LRA_CUDA_ERROR,
  BadCheckpoint = LRA_BAD_CHECKPOINT,
  BufferTooSmall = LRA_BUFFER_TOO_SMALL,
  Panic = LRA_PANIC,
  Unsupported = LRA_UNSUPPORTED,
  ReductionFailed = LRA_REDUCTION_FAILED,
  OutOfMemory = LRA_OUT_OF_MEMORY,
};

enum class Optimizer : lra_optimizer {
  SGD = LRA_OPTIMIZER_SGD,
  Momentum = LRA_OPTIMIZER_MOMENTUM,
  Nesterov = LRA_OPTIMIZER_NESTEROV,
  Adagrad = LRA_OPTIMIZER_ADAGRAD,
  RMSprop = LRA_OPTIMIZER_RMSPROP,
  Adam = LRA_OPTIMIZER_ADAM,
  AdamW = LRA_OPTIMIZER_ADAMW,
};

enum class DType : lra_dtype { F32 = LRA_DTYPE_F32, F16 = LRA_DTYPE_F16, BF16 = LRA_DTYPE_BF16 };

enum class Decision : lra_decision {
  Kept = LRA_DECISION_KEPT,
  Raised = LRA_DECISION_RAISED,
  Lowered = LRA_DECISION_LOWERED,
  Skipped = LRA_DECISION_SKIPPED,
};

inline Decision decision(const lra_reeval_info& info) { return static_cast<Decision>(info.decision); }

inline const char* decision_name(const lra_reeval_info& info) {
  switch (info.decision) {
    case LRA_DECISION_KEPT: return "kept";
    case LRA_DECISION_RAISED: return "raised";
    case LRA_DECISION_LOWERED: return "lowered";
    case LRA_DECISION_SKIPPED: return "skipped";
    default: return "unknown";
  }
}

// A failed lra call: its status and the library's message.
class Error : public std::runtime_error {
 public:
  Error(lra_status status, const std::string& message)
      : std::runtime_error(std::string("lra: ") + message), status_(status) {}
  lra_status status() const noexcept { return status_; }
  Status code() const noexcept { return static_cast<Status>(status_); }

 private:
  lra_status status_;
};

// A read-only view of contiguous elements (std::span is C++20): built from
// a vector, a std::array, a C array or pointer + count. (Handle::step also
// takes a braced list directly.)
template <class T>
class Span {
 public:
  constexpr Span() noexcept = default;
  constexpr Span(const T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <class A>
  Span(const std::vector<T, A>& v) noexcept : data_(v.data()), size_(v.size()) {}  // NOLINT
  template <std::size_t N>
  constexpr Span(const std::array<T, N>& a) noexcept : data_(a.data()), size_(N) {}  // NOLINT
  template <std::size_t N>
  constexpr Span(const T (&a)[N]) noexcept : data_(a), size_(N) {}  // NOLINT
  constexpr const T* data() const noexcept { return data_; }
  constexpr std::size_t size() const noexcept { return size_; }
  constexpr const T* begin() const noexcept { return data_; }
  constexpr const T* end() const noexcept { return data_ + size_; }

 private:
  const T* data_ = nullptr;
  std::size_t size_ = 0;
};

using TensorList = Span<lra_tensor>;

// lra_config with every default for `opt` (lra_config_init), then η.
inline lra_config config(Optimizer opt, double lr = 1e-3) {
  lra_config c;
  lra_config_init(&c, static_cast<lra_optimizer>(opt));
  c.lr = lr;
  return c;
}

namespace detail {
template <class T>
constexpr DType dtype_of() {
  static_assert(std::is_same<T, float>::value,
                "lra::tensor(T*) deduces f32 only; pass a DType for f16/bf16 buffers");
  return DType::F32;
}
}  // namespace detail

// One parameter buffer and its gradient (f32 by default); `reserved` 0.
inline lra_tensor tensor(void* param, const void* grad, std::uint64_t numel, DType dtype) {
  return lra_tensor{param, grad, numel, static_cast<lra_dtype>(dtype), 0};
}
template <class T>
lra_tensor tensor(T* param, const T* grad, std::uint64_t numel) {
  return tensor(static_cast<void*>(param), static_cast<const void*>(grad), numel,
                detail::dtype_of<T>());
}

inline std::uint32_t version() { return lra_version(); }

namespace detail {
// A reduction registered through Handle::set_reduction. lra calls it through
// reduce_trampoline, which catches every C++ exception: one unwinding through
// lra's frames would abort the process ("Rust cannot catch foreign
// exceptions"). The exception waits in reduction_error() (the reduction runs
// on the thread of the call on the handle) until Handle rethrows it, nested
// in the lra::Error of the failed call. Handle takes it through the
// take_reduction_error registered with the trampoline: a shared library
// built with hidden visibility has its own copy of these inline functions
// and of their thread_local, and the program calling Handle::step may not be
// the library that called Handle::set_reduction.
struct Reduction {
  lra_reduce_fn fn;
  void* user;
};

inline std::exception_ptr& reduction_error() noexcept {
  static thread_local std::exception_ptr error;
  return error;
}

inline std::exception_ptr take_reduction_error() noexcept {
  return std::exchange(reduction_error(), nullptr);
}

inline std::int32_t reduce_trampoline(double* values, std::size_t count, void* user) noexcept {
  // A copy: the callback may destroy the Handle that owns *user (which then
  // leaks *user, since lra keeps the running handle and may call it again).
  const Reduction r = *static_cast<const Reduction*>(user);
  reduction_error() = nullptr;
  try {
    return r.fn(values, count, r.user);
  } catch (...) {
    reduction_error() = std::current_exception();
    return -1;
  }
}
}  // namespace detail

// One lra handle: the wrapped optimizer and its η adaptation. Move-only.
class Handle {
 public:
  explicit Handle(const lra_config& cfg) {
    lra_status s = lra_create(&cfg, &h_);
    if (s != LRA_OK) throw Error(s, lra_thread_last_error());
  }
  explicit Handle(Optimizer opt, double lr = 1e-3) : Handle(config(opt, lr)) {}
  ~Handle() { destroy(); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& o) noexcept
      : h_(std::exchange(o.h_, nullptr)),
        reduction_(std::move(o.reduction_)),
        take_thrown_(std::exchange(o.take_thrown_, nullptr)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      destroy();
      h_ = std::exchange(o.h_, nullptr);
      reduction_ = std::move(o.reduction_);
      take_thrown_ = std::exchange(o.take_thrown_, nullptr);
    }
    return *this;
  }

  // The raw handle (NULL after a move).
  lra_handle* get() const noexcept { return h_; }
  explicit operator bool() const noexcept { return h_ != nullptr; }

  // The wrapped optimizer's step with the current η. `loss` = f_i on this
  // batch; `stream` a CUstream for CUDA handles (nullptr = legacy default).
  void step(TensorList tensors, double loss, double obs_var = 0.0, void* stream = nullptr) {
    const TakeThrown take = take_thrown_;  // before the call, which may destroy *this
    check(lra_step(h_, tensors.data(), tensors.size(), loss, obs_var, stream), take);
  }
  void step(std::initializer_list<lra_tensor> tensors, double loss, double obs_var = 0.0,
            void* stream = nullptr) {
    step(TensorList(tensors.begin(), tensors.size()), loss, obs_var, stream);
  }
  // `step` with a found-inf flag (one f32 in host or device memory, like the
  // tensors): non-zero makes the step a no-op.
  void step_ex(TensorList tensors, double loss, double obs_var, const float* found_inf,
               void* stream = nullptr) {
    const TakeThrown take = take_thrown_;  // before the call, which may destroy *this
    check(lra_step_ex(h_, tensors.data(), tensors.size(), loss, obs_var, found_inf, stream), take);
  }
  // f+ = the loss on the SAME batch after the step; adapts η.
  lra_reeval_info report_reeval(double loss_after) {
    lra_reeval_info info{};
    const TakeThrown take = take_thrown_;  // before the call, which may destroy *this
    check(lra_report_reeval(h_, loss_after, &info), take);
    return info;
  }
  lra_reeval_info last_reeval() const {
    lra_reeval_info info{};
    check(lra_get_last_reeval(h_, &info));
    return info;
  }
  bool should_reeval() const {
    std::uint32_t due = 0;
    check(lra_should_reeval(h_, &due));
    return due != 0;
  }
  double lr() const {
    double v = 0;
    check(lra_get_lr(h_, &v));
    return v;
  }
  void set_lr(double lr) { check(lra_set_lr(h_, lr)); }
  double last_phi() const {
    double v = 0;
    check(lra_get_last_phi(h_, &v));
    return v;
  }
  lra_counters counters() const {
    lra_counters c{};
    check(lra_get_counters(h_, &c));
    return c;
  }

  // Checkpoints: a versioned byte string (η, counters, optimizer state).
  std::vector<unsigned char> save_state() const {
    std::size_t size = 0;
    check(lra_state_size(h_, &size));
    std::vector<unsigned char> buf(size == 0 ? 1 : size);
    std::size_t written = 0;
    check(lra_save_state(h_, buf.data(), buf.size(), &written));
    buf.resize(written);
    return buf;
  }
  void load_state(const void* data, std::size_t len) { check(lra_load_state(h_, data, len)); }
  void load_state(const std::vector<unsigned char>& buf) { load_state(buf.data(), buf.size()); }

  // Cross-rank sum for sharded parameters / rank-local losses (nullptr removes it).
  // `reduce` returns 0 on success. It may throw: the exception is caught
  // before it reaches lra, the call fails with ReductionFailed, and the
  // lra::Error thrown carries it nested (std::rethrow_if_nested(e) rethrows
  // it). The handle stays usable.
  void set_reduction(lra_reduce_fn reduce, void* user) {
    if (reduce == nullptr) {
      check(lra_set_reduction(h_, nullptr, nullptr));
      reduction_.reset();
      take_thrown_ = nullptr;
      return;
    }
    auto r = std::make_unique<detail::Reduction>(detail::Reduction{reduce, user});
    check(lra_set_reduction(h_, &detail::reduce_trampoline, r.get()));
    reduction_ = std::move(r);  // lra no longer calls the previous one
    take_thrown_ = &detail::take_reduction_error;  // this trampoline's copy
  }

 private:
  using TakeThrown = std::exception_ptr (*)() noexcept;
  // The calling thread's message, not lra_last_error(h_): a call refused
  // because another one runs on the handle (another thread, or this
  // handle's reduction callback) leaves its reason only there, and the
  // handle's message belongs to the running call.
  // `take_thrown`: for the calls that reduce, what the registered
  // reduction threw.
  static void check(lra_status s, TakeThrown take_thrown = nullptr) {
    if (s == LRA_OK) return;
    std::string message = lra_thread_last_error();
    if (s == static_cast<lra_status>(Status::ReductionFailed) && take_thrown != nullptr) {
      if (std::exception_ptr thrown = take_thrown()) {
        try {
          std::rethrow_exception(thrown);
        } catch (const std::exception& e) {
          std::throw_with_nested(Error(s, message + " (it threw: " + e.what() + ")"));
        } catch (...) {
          std::throw_with_nested(Error(s, message + " (it threw an exception)"));
        }
      }
    }
    throw Error(s, message);
  }
  // lra_destroy, and the reduction freed with the handle. lra refuses to
  // destroy a handle while a call runs on it (from inside its reduction
  // callback, or on another thread): that handle lives on, and the running
  // call may call the reduction again (lra_step does twice when losses are
  // rank-local and parameters sharded), so its detail::Reduction must live
  // on with it (leaked, as the handle is). A call that runs makes lra_get_lr
  // fail with LRA_CALL_ORDER; one that starts while lra_destroy runs is
  // undefined behaviour in lra.h already.
  void destroy() noexcept {
    double lr = 0;
    if (reduction_ && lra_get_lr(h_, &lr) == LRA_CALL_ORDER) (void)reduction_.release();
    lra_destroy(h_);
    h_ = nullptr;
    reduction_.reset();
  }
  lra_handle* h_ = nullptr;
  // What lra calls for the reduction (heap: its address survives moves).
  std::unique_ptr<detail::Reduction> reduction_;
  // detail::take_reduction_error of the trampoline registered with lra.
  TakeThrown take_thrown_ = nullptr;
};

}  // namespace lra

#endif  // LRA_HPP
