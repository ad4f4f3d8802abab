// Tests of lra_torch.hpp's checks and gathering: parameters without
// gradients, unsupported dtypes, non-contiguous tensors, gradients that
// LibTorch reallocates between steps, the closure form under no-grad,
// misuse that must end in a clear lra::Error (sparse, lazily negated,
// undefined, inference or non-dense parameters, losses that are not one element) or be handled (lazily
// negated or ZeroTensor gradients), zero_grad on gradients that are views,
// messages that name parameters by their position in the caller's list, and
// checkpoints that check shapes and memory layout. Built with LRA_TORCH_CUDA
// (a CUDA build of LibTorch), it also steps CUDA parameters against the same
// steps on the CPU, or says loudly that it could not (no device).
#include <lra_torch.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "expect.hpp"

#ifdef LRA_TORCH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// The format-2 form (no dtypes: an older lra_torch.hpp's) of a format-3
// TorchOptimizer checkpoint, laid out as lra_torch.hpp's comment says.
std::vector<unsigned char> as_format2(const std::vector<unsigned char>& v3) {
  auto le = [&](std::size_t at, std::size_t bytes) {
    std::uint64_t v = 0;
    for (std::size_t k = 0; k < bytes; ++k) v |= static_cast<std::uint64_t>(v3[at + k]) << (8 * k);
    return v;
  };
  auto copy = [&](std::vector<unsigned char>& out, std::size_t at, std::size_t n) {
    out.insert(out.end(), v3.begin() + static_cast<long>(at), v3.begin() + static_cast<long>(at + n));
  };
  std::vector<unsigned char> out;
  copy(out, 0, 8);  // magic
  lra::detail::put_le(out, 2, 4);
  copy(out, 12, 12);  // flags, parameter count
  std::size_t at = 24;
  for (std::uint64_t i = 0, n = le(16, 8); i < n; ++i) {
    const std::size_t dims = le(at, 4);
    copy(out, at, 4);
    at += 8;  // dims, then the dtype format 2 lacks
    copy(out, at, 16 * dims);
    at += 16 * dims;
  }
  copy(out, at, 8);  // the handle checkpoint's length
  lra::detail::put_le(out, lra::detail::fnv1a(out.data(), out.size()), 8);
  copy(out, at + 16, v3.size() - at - 16);
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const lra::Error& e) {
    return e.what();
  }
  return "";
}

// One handle per optimizer: copying would free it twice.
static_assert(!std::is_copy_constructible<lra::TorchOptimizer>::value,
              "TorchOptimizer is move-only");
static_assert(std::is_nothrow_move_constructible<lra::TorchOptimizer>::value,
              "TorchOptimizer moves");

// a and b hold the same bits (same dtype and shape; on any device).
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  const auto bits = [](const torch::Tensor& t) {
    const auto c = t.detach().to(torch::kCPU).contiguous();
    return c.view(c.element_size() == 4 ? torch::kInt32 : torch::kInt16);
  };
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         torch::equal(bits(a), bits(b));
}

// Steps three parameters (one channels_last with contiguous gradients, which
// both optimizers copy into its memory order) on `device` and on the host
// with the same gradients, 4 steps of every optimizer and dtype: they must
// end with the same bits, phi within 1e-6 and the same decisions, and each
// checkpoint must load into the other optimizer. On CUDA the steps run on a
// pool stream made current (it does not synchronise with the legacy
// default stream), kept busy before the gradients are written there: a step
// queued on another stream, or ahead of its turn, would read the memory
// before they land, and one that waited for the device would find the stream
// idle when it returned.
// On the host (every build) this checks the comparison itself.
void matches_the_host_on(const torch::Device device) {
#ifdef LRA_TORCH_CUDA
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<c10::cuda::CUDAStreamGuard> on_side;
  if (device.is_cuda()) {
    side = c10::cuda::getStreamFromPool(false, device.index());
    on_side.emplace(*side);
    EXPECT(c10::cuda::getCurrentCUDAStream(device.index()) == *side);
  }
#endif
  const std::vector<std::vector<std::int64_t>> shapes = {{3, 5, 7, 9}, {1000}, {33, 17}};
  int compared = 0;
  for (const auto opt : {lra::Optimizer::SGD, lra::Optimizer::Momentum, lra::Optimizer::Nesterov,
                         lra::Optimizer::Adagrad, lra::Optimizer::RMSprop, lra::Optimizer::Adam,
                         lra::Optimizer::AdamW}) {
    for (const auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
      torch::manual_seed(7);
      std::vector<torch::Tensor> host, there;
      for (const auto& shape : shapes) {
        auto p = torch::randn(shape).to(dtype);
        if (shape.size() == 4) p = p.contiguous(at::MemoryFormat::ChannelsLast);
        host.push_back(p.clone().requires_grad_());
        there.push_back(p.to(device).requires_grad_());
      }
      EXPECT(there[0].is_contiguous(at::MemoryFormat::ChannelsLast));
      auto cfg = lra::config(opt, 0.01);
      cfg.num_threads = 1;
      lra::TorchOptimizer on_host(host, cfg), on_device(there, cfg);
      for (int step = 0; step < 4; ++step) {
        std::vector<torch::Tensor> ready;  // this step's gradients, already on `device`
        for (std::size_t i = 0; i < shapes.size(); ++i) {
          const auto g = torch::randn(shapes[i]).to(dtype);
          host[i].mutable_grad() = g;
          ready.push_back(g.to(device));
        }
        if (device.is_cuda()) {
          const auto busy = torch::randn({4096, 4096}, torch::TensorOptions().device(device));
          for (int k = 0; k < 8; ++k) (void)torch::mm(busy, busy);  // about 20 ms on an H200
        }
        for (std::size_t i = 0; i < shapes.size(); ++i)
          there[i].mutable_grad() = torch::zeros_like(ready[i]).copy_(ready[i]);
        const double loss = 2.0 + step;
        on_host.step(loss);
        on_device.step(loss);
#ifdef LRA_TORCH_CUDA
        if (side && step > 0) EXPECT(!side->query());  // (the first step allocates the state)
#endif
        const double phi = on_host.handle().last_phi(), phi_there = on_device.handle().last_phi();
        EXPECT(std::abs(phi_there - phi) <= 1e-6 * std::abs(phi));
        // rho = 2, 0.5, 1, 2 (raise, lower, keep, raise): far from the thresholds.
        const double rho[] = {2.0, 0.5, 1.0, 2.0};
        const auto a = on_host.report_reeval(loss - rho[step] * phi / 2);
        const auto b = on_device.report_reeval(loss - rho[step] * phi / 2);
        EXPECT(a.decision == b.decision && a.lr == b.lr);
      }
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        if (!same_bits(there[i], host[i])) {
          std::fprintf(stderr, "test_lra_torch: %s, optimizer %d, %s: parameter %zu differs from "
                               "the host's\n",
                       device.str().c_str(), static_cast<int>(opt), c10::toString(dtype), i);
          std::exit(1);
        }
      }
      EXPECT(there[0].is_contiguous(at::MemoryFormat::ChannelsLast));
      std::vector<torch::Tensor> copies;
      for (const auto& p : there) copies.push_back(p.detach().cpu().requires_grad_());
      lra::TorchOptimizer resumed(copies, cfg);
      resumed.load_state(on_device.save_state());
      EXPECT(resumed.lr() == on_device.lr());
      on_device.load_state(on_host.save_state());
      EXPECT(on_device.handle().counters().steps == 4);
      ++compared;
    }
  }
  EXPECT(compared == 21);
}

// A found_inf flag on `device`: set, the step changes nothing; clear, it
// steps. On CUDA the flag is read there, without a host sync; a flag on the
// host is refused.
void found_inf_on(const torch::Device device) {
  const auto on = torch::TensorOptions().device(device);
  auto p = torch::ones({256}, on).requires_grad_();
  lra::TorchOptimizer o({p}, lra::config(lra::Optimizer::Adam, 0.1));
  p.mutable_grad() = torch::ones_like(p);
  const auto before = p.detach().clone();
  o.step(torch::tensor(1.0), torch::ones({1}, on));
  EXPECT(same_bits(p, before));
  const auto counters = o.handle().counters();
  EXPECT(counters.steps == 1 && counters.skipped == 1 && counters.applied == 0);
  o.step(torch::tensor(1.0), torch::zeros({1}, on));
  EXPECT(!same_bits(p, before));
  EXPECT(o.handle().counters().applied == 1);
  if (device.is_cuda())
    EXPECT(error_of([&] { o.step(torch::tensor(1.0), torch::zeros({1})); })
               .find("found_inf must be one float32 element on the parameters' device") !=
           std::string::npos);
}

#ifdef LRA_TORCH_CUDA
// CUDA parameters (LRA_TORCH_CUDA): the checks above on device 0. Without
// a device this prints a SKIPPED line, or fails when LRA_REQUIRE_GPU is set
// (scripts/gpu-check.sh sets it).
void cuda_checks() {
  if (!torch::cuda::is_available()) {
    if (std::getenv("LRA_REQUIRE_GPU") != nullptr) {
      std::fprintf(stderr, "test_lra_torch: LRA_REQUIRE_GPU is set, but LibTorch sees no CUDA "
                           "device (is libtorch_cuda linked?)\n");
      std::exit(1);
    }
    std::puts("\n!!!! SKIPPED: test_lra_torch: LibTorch sees no CUDA device: the CUDA "
              "parameter checks (LRA_TORCH_CUDA) did not run !!!!");
    return;
  }
  const torch::Device cuda(torch::kCUDA, 0);
  matches_the_host_on(cuda);
  found_inf_on(cuda);
  std::puts("test_lra_torch: CUDA parameters: 7 optimizers x 3 dtypes bit-identical to the host, "
            "on a pool stream, without waiting for the device; found_inf on the device; "
            "checkpoints across devices");
}
#endif

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
  // An empty list is that error too (it did not compile: a private
  // constructor made `{}` ambiguous).
  EXPECT(error_of([&] { lra::TorchOptimizer o({}, cfg); }).find("no parameters") !=
         std::string::npos);
  // The unsupported dtype is named by its position in the list (frozen
  // tensors count), under one "lra: " prefix; also when set_data gives a
  // parameter that dtype after construction.
  {
    const std::string msg = error_of([&] {
      lra::TorchOptimizer o({torch::zeros({3}), torch::zeros({3}).requires_grad_(),
                             torch::zeros({3}, torch::kDouble).requires_grad_()},
                            cfg);
    });
    EXPECT(msg == "lra: parameter 2 is Double: lra supports float32, float16 and bfloat16 tensors");
    auto p = torch::zeros({3}).requires_grad_();
    lra::TorchOptimizer o({torch::zeros({3}), p}, cfg);
    p.set_data(torch::zeros({3}, torch::kDouble));
    p.mutable_grad() = torch::ones({3}, torch::kDouble);
    EXPECT(error_of([&] { o.step(1.0); }).rfind("lra: parameter 1 is Double", 0) == 0);
  }
  // An undefined tensor is refused, not left out as if frozen.
  EXPECT(error_of([&] {
           lra::TorchOptimizer o({torch::ones({2}).requires_grad_(), torch::Tensor()}, cfg);
         }).find("parameter 1 is an undefined tensor") != std::string::npos);

  // The checkpoint's hash is FNV-1a 64 (its published test vectors).
  {
    const auto* a = reinterpret_cast<const unsigned char*>("a");
    const auto* foobar = reinterpret_cast<const unsigned char*>("foobar");
    EXPECT(lra::detail::fnv1a(a, 0) == 0xcbf29ce484222325ULL);
    EXPECT(lra::detail::fnv1a(a, 1) == 0xaf63dc4c8601ec8cULL);
    EXPECT(lra::detail::fnv1a(foobar, 6) == 0x85944171f73967e8ULL);
  }

  // The closure form follows the schedule: the closure of a step that is
  // not due does not run, unless forced.
  {
    auto every2 = cfg;
    every2.reeval_schedule = LRA_REEVAL_EVERY;
    every2.reeval_every = 2;
    auto v = torch::ones({2}).requires_grad_();
    lra::TorchOptimizer o({v}, every2);
    int runs = 0;
    auto closure = [&] {
      ++runs;
      return (v * v).sum();
    };
    v.mutable_grad() = torch::ones_like(v);
    o.step(1.0);  // step 0: due
    EXPECT(o.reeval(closure).has_value() && runs == 1);
    o.step(1.0);  // step 1: not due
    EXPECT(!o.reeval(closure).has_value() && runs == 1);
    EXPECT(o.reeval(closure, true).has_value() && runs == 2);
  }

  // A reduction that throws: its exception stays nested in the lra::Error
  // that the TorchOptimizer's step throws.
  {
    auto sharded = cfg;
    sharded.sharding = LRA_SHARDING_SHARDED;
    auto v = torch::ones({2}).requires_grad_();
    lra::TorchOptimizer o({v}, sharded);
    o.handle().set_reduction(
        [](double*, std::size_t, void*) -> std::int32_t { throw std::runtime_error("probe"); },
        nullptr);
    v.mutable_grad() = torch::ones_like(v);
    EXPECT(nested_what_of([&] { o.step(1.0); }) == "probe");
  }

  // A parameter on a device lra has no backend for (here: meta) is refused
  // at construction; zero_grad on parameters without a gradient does nothing.
  EXPECT(error_of([&] {
          lra::TorchOptimizer o({torch::zeros({3}, torch::kMeta).requires_grad_()}, cfg);
        }).find("unsupported device") != std::string::npos);
  {
    auto v = torch::ones({2}).requires_grad_();
    lra::TorchOptimizer o({v}, cfg);
    o.zero_grad(false);
    o.zero_grad(true);
    EXPECT(!v.grad().defined());
  }

  auto w = torch::ones({2, 3}).requires_grad_();
  lra::TorchOptimizer opt({w}, cfg);

  // A gradient whose dtype alone, or shape alone, differs from the parameter.
  for (const auto& bad : {torch::ones({2, 3}, torch::kDouble), torch::ones({3, 2})}) {
    w.mutable_grad() = bad;
    EXPECT(error_of([&] { opt.step(1.0); }).find("differs from the parameter") != std::string::npos);
  }
  w.mutable_grad() = torch::Tensor();

  // No gradient yet.
  EXPECT(error_of([&] { opt.step(1.0); }).find("no gradient") != std::string::npos);

  // Gradients of another layout than the parameter (stride 0, transposed)
  // are copied into the parameter's layout for the step.
  {
    const auto start = w.detach().clone();
    w.mutable_grad() = torch::full({1}, 2.0).expand({2, 3});
    opt.step(1.0);
    EXPECT(torch::allclose(w.detach(), start - 0.2));
    opt.report_reeval(1.0);  // no decrease: η halves to 0.05
    w.mutable_grad() = torch::arange(6.0).reshape({3, 2}).t();
    const auto before = w.detach().clone();
    opt.step(1.0);
    EXPECT(torch::allclose(w.detach(), before - 0.05 * torch::arange(6.0).reshape({3, 2}).t()));
    opt.handle().set_lr(0.1);
  }

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
  EXPECT(opt.handle().counters().steps == 5);  // 2 above + 3 here
  EXPECT(opt.handle().counters().reevals == 4);

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
    EXPECT(!error_of([&] { opt.step(torch::tensor(1.0), torch::ones({1}, torch::kDouble)); })
                .empty());
  }

  // Parameter-list mistakes fail at construction: a non-leaf tensor (its
  // grad is never filled), the same tensor twice.
  {
    // Its version counter cannot be bumped after a step: refused up front.
    torch::Tensor inference;
    {
      c10::InferenceMode guard;
      inference = torch::ones({3}).requires_grad_();
    }
    EXPECT(error_of([&] { lra::TorchOptimizer o({w, inference}, cfg); })
               .find("parameter 1 is an inference tensor") != std::string::npos);
  }
  EXPECT(error_of([&] { lra::TorchOptimizer o({w * 2}, cfg); }).find("not a leaf") !=
         std::string::npos);
  EXPECT(error_of([&] { lra::TorchOptimizer o({w, w}, cfg); }).find("parameter 1 is parameter 0") !=
         std::string::npos);

  // A leaf that views every other pair of its storage cannot be updated in
  // place: refused at construction (it was only at the first step), and at
  // the step when set_data makes a parameter such a view; memory untouched.
  {
    auto base = torch::zeros({3, 4});
    auto view = base.slice(1, 0, 2).detach().requires_grad_();
    EXPECT(error_of([&] { lra::TorchOptimizer o({w, view}, cfg); })
               .find("parameter 1 is a view with strides [4, 1] that does not cover its "
                     "memory densely") != std::string::npos);
    // A column, and every other row (the skipping dimension has size 2).
    using torch::indexing::Slice;
    auto column = torch::randn({4, 4}).index({Slice(), 0}).detach().requires_grad_();
    EXPECT(error_of([&] { lra::TorchOptimizer o({column}, cfg); }).find("densely") !=
           std::string::npos);
    auto rows = torch::zeros({4, 3}).slice(0, 0, 4, 2).detach().requires_grad_();
    EXPECT(error_of([&] { lra::TorchOptimizer o({rows}, cfg); }).find("densely") !=
           std::string::npos);
    auto p = torch::zeros({3, 2}).requires_grad_();
    lra::TorchOptimizer o({p}, cfg);
    p.set_data(base.slice(1, 0, 2));
    p.mutable_grad() = torch::ones({3, 2});
    EXPECT(error_of([&] { o.step(1.0); }).find("densely") != std::string::npos);
    EXPECT(torch::equal(base, torch::zeros({3, 4})));
  }

  // The TorchOptimizer makes its handle for the parameters' device,
  // whatever the configuration says.
  {
    auto on_cuda = cfg;
    on_cuda.device = LRA_DEVICE_CUDA;
    auto v = torch::ones({2}).requires_grad_();
    lra::TorchOptimizer o({v}, on_cuda);
    v.mutable_grad() = torch::ones_like(v);
    EXPECT(error_of([&] { o.step(1.0); }).empty());
  }

  // channels_last parameters (dense, not contiguous) train like torch::optim
  // (momentum 0.5 = lra's default); a later layout change is refused.
  {
    auto make = [] {
      torch::manual_seed(1);
      torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3));
      conv->to(torch::kCPU);
      for (auto& p : conv->parameters())
        p.set_data(p.data().contiguous(p.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                    : at::MemoryFormat::Contiguous));
      return conv;
    };
    auto a = make(), b = make();
    EXPECT(!a->weight.is_contiguous());
    const auto x = torch::randn({2, 3, 6, 6}).contiguous(at::MemoryFormat::ChannelsLast);
    auto mcfg = lra::config(lra::Optimizer::Momentum, 0.05);
    mcfg.num_threads = 1;
    lra::TorchOptimizer opt_a(a->parameters(), mcfg);
    torch::optim::SGD opt_b(b->parameters(), torch::optim::SGDOptions(0.05).momentum(0.5));
    for (int i = 0; i < 3; ++i) {
      opt_a.zero_grad();
      auto la = a->forward(x).square().mean();
      la.backward();
      opt_a.step(la);
      opt_b.zero_grad();
      b->forward(x).square().mean().backward();
      opt_b.step();
    }
    EXPECT(torch::allclose(a->weight, b->weight, 0.0, 1e-6));
    a->weight.set_data(a->weight.data().contiguous());
    opt_a.zero_grad();
    a->forward(x.contiguous()).square().mean().backward();
    EXPECT(error_of([&] { opt_a.step(1.0); }).find("memory layout") != std::string::npos);
  }

  // TorchOptimizer checkpoints record shapes and memory layout: a checkpoint
  // of a contiguous model is refused by a channels_last one (each element
  // would get another's state) and changes nothing; converted back, the run
  // resumes bit for bit; the loaded layout is then fixed.
  {
    auto make = [](at::MemoryFormat format) {
      torch::manual_seed(2);
      torch::nn::Conv2d conv(torch::nn::Conv2dOptions(3, 4, 3));
      for (auto& p : conv->parameters())
        p.set_data(p.data().contiguous(p.dim() == 4 ? format : at::MemoryFormat::Contiguous));
      return conv;
    };
    const auto x = torch::randn({2, 3, 6, 6});
    auto acfg = lra::config(lra::Optimizer::Adam, 0.01);
    acfg.num_threads = 1;
    auto train = [&](torch::nn::Conv2d& m, lra::TorchOptimizer& o, int steps) {
      for (int i = 0; i < steps; ++i) {
        o.zero_grad();
        auto loss = m->forward(x).square().mean();
        loss.backward();
        o.step(loss);
        o.reeval([&] { return m->forward(x).square().mean(); });
      }
    };
    auto status_of = [](auto&& f) {
      try {
        f();
      } catch (const lra::Error& e) {
        return e.code();
      }
      return lra::Status::Ok;
    };
    auto a = make(at::MemoryFormat::Contiguous);
    lra::TorchOptimizer opt_a(a->parameters(), acfg);
    const auto before_any_step = opt_a.save_state();
    train(a, opt_a, 2);
    // Through a const reference: saving changes nothing.
    const lra::TorchOptimizer& reader = opt_a;
    const auto saved = reader.save_state();
    const std::size_t wrapper_size = saved.size() - reader.handle().save_state().size();

    auto b = make(at::MemoryFormat::ChannelsLast);
    {
      torch::NoGradGuard no_grad;
      for (std::size_t k = 0; k < a->parameters().size(); ++k)
        b->parameters()[k].copy_(a->parameters()[k]);
    }
    lra::TorchOptimizer opt_b(b->parameters(), acfg);
    const auto fresh = opt_b.handle().save_state();
    const std::string layout = error_of([&] { opt_b.load_state(saved); });
    EXPECT(layout.find("parameter 0 was saved in another memory layout") != std::string::npos);
    EXPECT(status_of([&] { opt_b.load_state(saved); }) == lra::Status::BadCheckpoint);
    EXPECT(opt_b.handle().save_state() == fresh);
    // Malformed checkpoints: refused, nothing changed.
    EXPECT(error_of([&] { opt_b.load_state(opt_a.handle().save_state()); })
               .find("not a TorchOptimizer checkpoint") != std::string::npos);
    for (std::size_t cut = 0; cut < saved.size(); ++cut) {
      std::vector<unsigned char> part(saved.begin(), saved.begin() + static_cast<long>(cut));
      EXPECT(status_of([&] { opt_b.load_state(part); }) == lra::Status::BadCheckpoint);
      const std::string why = error_of([&] { opt_b.load_state(part); });
      EXPECT(why.find(cut < 8 ? "not a TorchOptimizer checkpoint" : "truncated") != std::string::npos);
    }
    auto longer = saved;
    longer.push_back(0);
    EXPECT(status_of([&] { opt_b.load_state(longer); }) == lra::Status::BadCheckpoint);
    EXPECT(opt_b.handle().save_state() == fresh);

    for (auto& p : b->parameters()) p.set_data(p.data().contiguous());
    // A changed byte anywhere in the wrapper (magic, version, flags, counts,
    // shapes, strides, the lengths, the hash) is refused with nothing
    // changed: none of them, not even the flag that says strides were
    // recorded, can make a checkpoint load unchecked.
    for (std::size_t at = 0; at < wrapper_size; ++at) {
      for (unsigned char flip : {0x01, 0x80}) {
        auto changed = saved;
        changed[at] ^= flip;
        lra::TorchOptimizer probe(b->parameters(), acfg);
        const auto before = probe.handle().save_state();
        EXPECT(status_of([&] { probe.load_state(changed); }) == lra::Status::BadCheckpoint);
        EXPECT(probe.handle().save_state() == before);
      }
    }
    opt_b.load_state(saved);
    train(a, opt_a, 2);
    train(b, opt_b, 2);
    for (std::size_t k = 0; k < a->parameters().size(); ++k)
      EXPECT(torch::equal(a->parameters()[k], b->parameters()[k]));

    // The loaded layout is fixed as if the saved steps had been taken here.
    auto c = make(at::MemoryFormat::Contiguous);
    lra::TorchOptimizer opt_c(c->parameters(), acfg);
    opt_c.load_state(saved);
    c->weight.set_data(c->weight.data().contiguous(at::MemoryFormat::ChannelsLast));
    opt_c.zero_grad();
    c->forward(x).square().mean().backward();
    EXPECT(error_of([&] { opt_c.step(1.0); }).find("memory layout") != std::string::npos);

    // After a bare load (handle().load_state, which cannot check layouts)
    // save_state records the layout the parameters have now, the one the
    // next step would fix: the saved state never loads unchecked.
    {
      auto e = make(at::MemoryFormat::Contiguous);
      lra::TorchOptimizer opt_e(e->parameters(), acfg);
      opt_e.handle().load_state(opt_a.handle().save_state());
      const auto resaved = opt_e.save_state();
      auto f = make(at::MemoryFormat::ChannelsLast);
      lra::TorchOptimizer opt_f(f->parameters(), acfg);
      EXPECT(error_of([&] { opt_f.load_state(resaved); }).find("another memory layout") !=
             std::string::npos);
      EXPECT(opt_f.handle().counters().steps == 0);
    }

    // Other shapes with the same element counts: refused.
    auto r = torch::ones({3, 2}).requires_grad_();
    auto q = torch::ones({2, 3}).requires_grad_();
    lra::TorchOptimizer opt_q({q}, cfg), opt_r({r}, cfg);
    q.mutable_grad() = torch::ones({2, 3});
    opt_q.step(1.0);
    EXPECT(error_of([&] { opt_r.load_state(opt_q.save_state()); })
               .find("parameter 0 was saved with shape [2, 3], it has shape [3, 2] now") !=
           std::string::npos);
    // Another dtype with the same shape: refused at the load, nothing
    // changed (it loaded, and every step failed after).
    {
      auto half = torch::ones({2, 3}, torch::kBFloat16).requires_grad_();
      lra::TorchOptimizer opt_h({half}, cfg);
      EXPECT(error_of([&] { opt_h.load_state(opt_q.save_state()); })
                 .find("parameter 0 was saved with lra_dtype 0, it is BFloat16 now") !=
             std::string::npos);
      EXPECT(opt_h.handle().counters().steps == 0);
    }

    // A tensor of many dimensions (LibTorch makes 70) saves and loads.
    {
      auto deep = torch::ones(std::vector<std::int64_t>(70, 1)).requires_grad_();
      lra::TorchOptimizer o({deep}, cfg);
      deep.mutable_grad() = torch::ones_like(deep);
      o.step(1.0);
      auto again = torch::ones(std::vector<std::int64_t>(70, 1)).requires_grad_();
      lra::TorchOptimizer o2({again}, cfg);
      o2.load_state(o.save_state());
      EXPECT(o2.handle().counters().steps == 1);
    }

    // Saved before any step: no layout recorded, loads into either.
    auto d = make(at::MemoryFormat::ChannelsLast);
    lra::TorchOptimizer opt_d(d->parameters(), acfg);
    opt_d.load_state(before_any_step);
    train(d, opt_d, 1);
  }

  // Sparse parameters are refused at construction (an lra::Error, not a
  // c10::Error from data_ptr() at the first step); the message prints the
  // layout (it printed a whole TensorOptions).
  EXPECT(error_of([&] {
          lra::TorchOptimizer o({w, torch::zeros({3}).to_sparse().requires_grad_()}, cfg);
        }) == "lra: parameter 1 has layout Sparse: lra updates dense (strided) tensors only");

  // A lazily negated parameter (memory holds -p) cannot be updated in place;
  // a lazily negated gradient (memory holds -g) is materialised, so SGD moves
  // against the gradient's value, not its memory's.
  EXPECT(error_of([&] {
          lra::TorchOptimizer o({at::_neg_view(torch::zeros({3})).detach().requires_grad_()},
                                cfg);
        }).find("negated") != std::string::npos);
  EXPECT(error_of([&] {
          lra::TorchOptimizer o({at::_efficientzerotensor({3}).requires_grad_()}, cfg);
        }).find("ZeroTensor") != std::string::npos);
  {
    auto p = torch::zeros({4}).requires_grad_();
    lra::TorchOptimizer o({p}, cfg);
    p.mutable_grad() = at::_neg_view(torch::ones({4}));  // value -1
    o.step(1.0);
    EXPECT(torch::allclose(p.detach(), torch::full({4}, 0.1)));
    // A ZeroTensor gradient (no memory) is a zero gradient.
    p.mutable_grad() = at::_efficientzerotensor({4});
    o.step(1.0);
    EXPECT(torch::allclose(p.detach(), torch::full({4}, 0.1)));
    // The same with one element, and a parameter made a negated view
    // after construction is refused at the step.
    auto one = torch::zeros({1}).requires_grad_();
    lra::TorchOptimizer o1({one}, cfg);
    one.mutable_grad() = at::_neg_view(torch::ones({1}));
    o1.step(1.0);
    EXPECT(torch::allclose(one.detach(), torch::full({1}, 0.1)));
    one.set_data(at::_neg_view(torch::ones({1})));
    EXPECT(error_of([&] { o1.step(1.0); }).find("negated") != std::string::npos);
    // Made an inference tensor after construction (set_data under
    // InferenceMode): refused at the step before anything is updated (it
    // was stepped, and its version counter could not be bumped).
    auto q = torch::ones({3}).requires_grad_();
    lra::TorchOptimizer oq({q}, cfg);
    {
      c10::InferenceMode guard;
      q.set_data(torch::ones({3}));
    }
    q.mutable_grad() = torch::ones({3});
    EXPECT(error_of([&] { oq.step(1.0); }).find("parameter 0 is an inference tensor") !=
           std::string::npos);
    EXPECT(torch::equal(q.detach(), torch::ones({3})) && oq.handle().counters().steps == 0);
  }

  // A loss that is not one element is an lra::Error that says so (not a
  // c10::Error from item()); also from a re-evaluation closure.
  {
    auto p = torch::ones({4}).requires_grad_();
    lra::TorchOptimizer o({p}, cfg);
    p.mutable_grad() = torch::ones({4});
    EXPECT(error_of([&] { o.step(torch::ones({4})); }).find("one element") != std::string::npos);
    EXPECT(error_of([&] { o.step(torch::Tensor()); }).find("undefined") != std::string::npos);
    o.step(torch::tensor(1.0));
    EXPECT(error_of([&] { o.reeval([] { return torch::ones({2}); }, true); })
               .find("one element") != std::string::npos);
    o.report_reeval(torch::tensor(0.5));
  }

  // Messages name parameters by their position in the caller's list, where
  // frozen tensors (left out) shift the positions; lra's own "tensors[k]"
  // messages get the position too.
  {
    auto frozen = torch::ones({2});
    auto base = torch::ones({4});
    auto a = base.narrow(0, 0, 3).detach().requires_grad_();
    auto b = base.narrow(0, 1, 3).detach().requires_grad_();  // overlaps a
    lra::TorchOptimizer o({frozen, a, b}, cfg);
    EXPECT(error_of([&] { o.step(1.0); }).find("parameter 1 has no gradient") !=
           std::string::npos);
    a.mutable_grad() = torch::ones({3});
    b.mutable_grad() = torch::ones({3});
    const std::string overlap = error_of([&] { o.step(1.0); });
    EXPECT(overlap.rfind("lra: invalid argument: lra_step_ex: tensors[0] (parameter 1).param overlaps "
                         "tensors[1] (parameter 2).param",
                         0) == 0);
    EXPECT(overlap.rfind("lra: ", 0) == 0 && overlap.find("lra: ", 1) == std::string::npos);
    EXPECT(torch::equal(base, torch::ones({4})));
    EXPECT(error_of([&] { lra::TorchOptimizer t({frozen, a, a}, cfg); })
               .find("parameter 2 is parameter 1 again") != std::string::npos);
    // Frozen after construction: the message says so.
    b.requires_grad_(false);
    b.mutable_grad() = torch::Tensor();
    EXPECT(error_of([&] { o.step(1.0); }).find("no longer requires grad") != std::string::npos);
  }

  // zero_grad like torch::optim.
  {
    opt.zero_grad(false);
    EXPECT(w.grad().defined() && torch::equal(w.grad(), torch::zeros_like(w)));
    opt.zero_grad();
    EXPECT(!w.grad().defined());
  }

  // zero_grad on gradients that are views of one flat buffer (what DDP's
  // gradient_as_bucket_view makes): LibTorch refuses detach_() on a view, so
  // a plain detach_() threw c10::Error. Like torch.optim in Python, the
  // buffer is zeroed through the view, or the gradient dropped. Both forms
  // run before anything is checked, so that each one's error is printed.
  {
    auto c10_error = [](auto&& f) {
      try {
        f();
      } catch (const c10::Error& e) {
        std::fprintf(stderr, "c10::Error: %.80s\n", e.what_without_backtrace());
        return true;
      }
      return false;
    };
    auto p = torch::ones({4}).requires_grad_();
    lra::TorchOptimizer o({p}, cfg);
    auto flat = torch::ones({8});
    p.mutable_grad() = flat.narrow(0, 2, 4);
    EXPECT(p.grad().is_view());
    o.step(1.0);
    EXPECT(torch::allclose(p.detach(), torch::full({4}, 0.9)));
    const bool zero_threw = c10_error([&] { o.zero_grad(false); });
    const bool zeroed = p.grad().defined() && p.grad().is_view() && !p.grad().requires_grad() &&
                        torch::equal(flat, torch::tensor({1.f, 1.f, 0.f, 0.f, 0.f, 0.f, 1.f, 1.f}));
    flat.fill_(1.0);
    p.mutable_grad() = flat.narrow(0, 2, 4);
    const bool reset_threw = c10_error([&] { o.zero_grad(true); });
    EXPECT(!zero_threw && zeroed);
    EXPECT(!reset_threw && !p.grad().defined());
    EXPECT(torch::equal(flat, torch::ones({8})));  // dropped, the buffer left alone
    // A gradient with a graph (as backward with create_graph makes) is detached.
    p.mutable_grad() = p * 2.0;
    EXPECT(p.grad().grad_fn() != nullptr);
    o.zero_grad(false);
    EXPECT(p.grad().grad_fn() == nullptr && !p.grad().requires_grad());
    EXPECT(torch::equal(p.grad(), torch::zeros({4})));
  }

  // A graph that saved a parameter refuses backward() after a step, as
  // after torch::optim's in-place update (lra writes through raw pointers).
  {
    auto p = torch::ones({4}).requires_grad_();
    lra::TorchOptimizer o({p}, cfg);
    p.mutable_grad() = torch::ones({4});
    auto saved = (p * p).sum();  // mul saves p
    o.step(1.0);
    std::string message;
    try {
      saved.backward();
    } catch (const c10::Error& e) {
      message = e.what();
    }
    EXPECT(message.find("modified by an inplace operation") != std::string::npos);
  }

  // CUDA parameters: without LRA_TORCH_CUDA (CPU-only LibTorch cannot make
  // them) lra_torch.hpp rejects them with a clear message.
  matches_the_host_on(torch::kCPU);
  found_inf_on(torch::kCPU);
#ifdef LRA_TORCH_CUDA
  cuda_checks();
#else
  std::puts("test_lra_torch: LRA_TORCH_CUDA is off (CPU-only LibTorch); CUDA path not compiled");
#endif
  // A size-1 dimension's stride is not part of the memory order: new data
  // that differs only there steps on.
  {
    auto q = torch::ones({1, 3}).requires_grad_();
    lra::TorchOptimizer o({q}, cfg);
    q.mutable_grad() = torch::ones_like(q);
    o.step(1.0);
    o.report_reeval(0.5);
    q.set_data(torch::ones({3, 1}).t());  // sizes (1, 3), strides (1, 1)
    q.mutable_grad() = torch::ones({1, 3});
    EXPECT(error_of([&] { o.step(1.0); }).empty());
    // In the checkpoint: size 1, order stride 0; size 3, order stride 1.
    const auto saved = o.save_state();
    const auto field = [&](std::size_t at) {
      std::uint64_t v = 0;
      for (std::size_t k = 0; k < 8; ++k) v |= static_cast<std::uint64_t>(saved[at + k]) << (8 * k);
      return v;
    };
    EXPECT(field(32) == 1 && field(40) == 0 && field(48) == 3 && field(56) == 1);
  }

  // A format-2 checkpoint still loads, and saves again as format 3 with
  // the same contents.
  {
    auto v = torch::ones({2, 3}).requires_grad_();
    lra::TorchOptimizer o({v}, cfg);
    // Before any step: flags 0, and both dimensions' stride fields 0.
    const auto unstepped = o.save_state();
    EXPECT(std::all_of(unstepped.begin() + 12, unstepped.begin() + 16, [](auto b) { return b == 0; }));
    for (std::size_t at : {40, 56})
      EXPECT(std::all_of(unstepped.begin() + static_cast<long>(at),
                         unstepped.begin() + static_cast<long>(at + 8), [](auto b) { return b == 0; }));
    v.mutable_grad() = torch::ones_like(v);
    o.step(1.0);
    o.report_reeval(0.5);
    const auto saved = o.save_state();
    EXPECT(saved[8] == 3 && saved[9] == 0);    // format 3
    EXPECT(saved[12] == 1 && saved[13] == 0);  // flags: memory orders recorded
    auto u = torch::ones({2, 3}).requires_grad_();
    lra::TorchOptimizer restored({u}, cfg);
    restored.load_state(as_format2(saved));
    EXPECT(restored.save_state() == saved);
  }

  std::puts("test_lra_torch: all checks passed");
  return 0;
}
