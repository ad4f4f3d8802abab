//! The CPU backend: host pointers, the reference and the embedded default.
//!
//! Work is cut into fixed chunks of [`CHUNK`] elements per tensor; each chunk
//! yields one f64 partial of Σ g·d, accumulated in [`LANES`] interleaved
//! lanes (so the loop vectorises) and folded in a fixed tree. Chunk partials
//! are then added in chunk order. None of this depends on the number of
//! threads, so φ has the same bits whatever `threads` is.

use super::{Backend, BackendState, StepRequest, TensorDesc};
use crate::controller::{SkipReason, StepOutcome};
use crate::dispatch_kind;
use crate::error::Result;
use crate::fail;
use crate::optim::{self, BiasPowers, DType, Elem, OptimizerKind, StepScalars};
use half::{bf16, f16};

/// Elements per work item.
pub const CHUNK: usize = 1 << 14;
/// Interleaved f64 accumulators per chunk.
pub const LANES: usize = 8;
/// Below this many elements in a step, one thread does everything.
const PARALLEL_MIN: usize = 1 << 16;

pub struct CpuBackend {
    kind: OptimizerKind,
    threads: usize,
    bias: BiasPowers,
    applied: u64,
    /// Per tensor, slot-major f32 state; sized at the first step.
    state: Vec<Vec<f32>>,
    last: StepOutcome,
}

/// A raw pointer that may cross to a worker thread: the engine has checked
/// that no two tensors overlap, so threads touch disjoint memory.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One work item: a chunk of one tensor.
#[derive(Clone, Copy)]
struct Item {
    param: SendPtr,
    grad: SendPtr,
    s0: SendPtr,
    s1: SendPtr,
    len: usize,
    dtype: DType,
}

impl CpuBackend {
    pub fn new(kind: OptimizerKind, threads: usize) -> CpuBackend {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        CpuBackend {
            kind,
            threads,
            bias: BiasPowers::default(),
            applied: 0,
            state: Vec::new(),
            last: StepOutcome {
                skip: SkipReason::None,
                phi: f64::NAN,
                scale: 1.0,
            },
        }
    }

    fn ensure_state(&mut self, tensors: &[TensorDesc]) {
        let slots = self.kind.state_slots();
        if self.state.len() != tensors.len() {
            self.state = tensors.iter().map(|t| vec![0.0; slots * t.numel]).collect();
        }
    }

    /// Cuts the step into chunk items (state pointers included).
    fn items(&mut self, tensors: &[TensorDesc]) -> Vec<Item> {
        let slots = self.kind.state_slots();
        let mut items = Vec::new();
        for (t, st) in tensors.iter().zip(self.state.iter_mut()) {
            let esz = t.dtype.size();
            let base = st.as_mut_ptr();
            let mut start = 0;
            while start < t.numel {
                let len = CHUNK.min(t.numel - start);
                // SAFETY: offsets stay inside the caller's tensors (numel
                // checked) and inside our state vectors (sized slots×numel).
                unsafe {
                    items.push(Item {
                        param: SendPtr((t.param as *mut u8).add(start * esz)),
                        grad: SendPtr((t.grad as *mut u8).add(start * esz)),
                        s0: SendPtr(if slots >= 1 {
                            base.add(start) as *mut u8
                        } else {
                            base as *mut u8
                        }),
                        s1: SendPtr(if slots >= 2 {
                            base.add(t.numel + start) as *mut u8
                        } else {
                            base as *mut u8
                        }),
                        len,
                        dtype: t.dtype,
                    });
                }
                start += len;
            }
        }
        items
    }

    /// Runs `f` on every item, on up to `threads` threads, and returns the
    /// per-item results in item order.
    fn run<R: Send + Copy + Default>(
        &self,
        items: &[Item],
        total: usize,
        f: &(dyn Fn(&Item) -> R + Sync),
    ) -> Vec<R> {
        let mut out = vec![R::default(); items.len()];
        let threads = if total < PARALLEL_MIN {
            1
        } else {
            self.threads.min(items.len()).max(1)
        };
        if threads == 1 {
            for (o, it) in out.iter_mut().zip(items) {
                *o = f(it);
            }
            return out;
        }
        let per = items.len().div_ceil(threads);
        std::thread::scope(|s| {
            for (outs, its) in out.chunks_mut(per).zip(items.chunks(per)) {
                s.spawn(move || {
                    for (o, it) in outs.iter_mut().zip(its) {
                        *o = f(it);
                    }
                });
            }
        });
        out
    }
}

/// Σ of the lanes in a fixed tree.
#[inline(always)]
fn fold_lanes(a: &[f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// One chunk's pass. `WRITE`: advance the state and write θ − lr·d (the
/// fused pass and the update pass); otherwise read only (the dot pass, on
/// copies of the state). Returns Σ g·d over the chunk and whether any
/// gradient was non-finite.
#[inline(always)]
fn chunk_pass<const K: u32, P: Elem, const WRITE: bool>(
    sc: &StepScalars,
    lr: f32,
    it: &Item,
) -> (f64, bool) {
    let n = it.len;
    let slots = OptimizerKind::from_u32(K).map_or(0, |k| k.state_slots());
    // SAFETY: the item's pointers cover `n` elements of the right type
    // (validated by the engine); slices of unused slots are empty.
    let (theta, g, s0, s1) = unsafe {
        (
            std::slice::from_raw_parts_mut(it.param.0 as *mut P, n),
            std::slice::from_raw_parts(it.grad.0 as *const P, n),
            std::slice::from_raw_parts_mut(it.s0.0 as *mut f32, if slots >= 1 { n } else { 0 }),
            std::slice::from_raw_parts_mut(it.s1.0 as *mut f32, if slots >= 2 { n } else { 0 }),
        )
    };
    let mut acc = [0.0f64; LANES];
    let mut bad = false;
    let mut one = |i: usize, lane: usize| {
        let th = theta[i].to_f32();
        let gi = g[i].to_f32();
        let mut a = if slots >= 1 { s0[i] } else { 0.0 };
        let mut b = if slots >= 2 { s1[i] } else { 0.0 };
        let d = optim::direction::<K>(sc, th, gi, &mut a, &mut b);
        acc[lane] += optim::dot_term(gi, d);
        if !WRITE {
            bad |= !gi.is_finite();
        } else {
            if slots >= 1 {
                s0[i] = a;
            }
            if slots >= 2 {
                s1[i] = b;
            }
            theta[i] = P::from_f32(optim::apply(th, lr, d));
        }
    };
    let full = n / LANES * LANES;
    let mut base = 0;
    while base < full {
        for lane in 0..LANES {
            one(base + lane, lane);
        }
        base += LANES;
    }
    for i in full..n {
        one(i, i - full);
    }
    (fold_lanes(&acc), bad)
}

fn chunk_dispatch<const K: u32, const WRITE: bool>(
    sc: &StepScalars,
    lr: f32,
    it: &Item,
) -> (f64, bool) {
    match it.dtype {
        DType::F32 => chunk_pass::<K, f32, WRITE>(sc, lr, it),
        DType::F16 => chunk_pass::<K, f16, WRITE>(sc, lr, it),
        DType::Bf16 => chunk_pass::<K, bf16, WRITE>(sc, lr, it),
    }
}

fn grads_finite<P: Elem>(it: &Item) -> bool {
    // SAFETY: as in `chunk_pass`.
    let g = unsafe { std::slice::from_raw_parts(it.grad.0 as *const P, it.len) };
    g.iter().all(|x| x.to_f32().is_finite())
}

fn chunk_finite(it: &Item) -> bool {
    match it.dtype {
        DType::F32 => grads_finite::<f32>(it),
        DType::F16 => grads_finite::<f16>(it),
        DType::Bf16 => grads_finite::<bf16>(it),
    }
}

/// Σ of the chunk partials in chunk order.
fn ordered_sum(parts: &[(f64, bool)]) -> (f64, bool) {
    parts
        .iter()
        .fold((0.0, false), |(s, b), &(p, pb)| (s + p, b | pb))
}

impl Backend for CpuBackend {
    fn validate(&self, tensors: &[TensorDesc]) -> Result<()> {
        let mut ranges = Vec::with_capacity(2 * tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let align = t.dtype.size();
            for (what, p) in [("param", t.param as usize), ("grad", t.grad as usize)] {
                if p % align != 0 {
                    fail!(
                        InvalidArgument,
                        "tensors[{i}].{what} = {p:#x} is not aligned to {align} bytes for {}",
                        t.dtype.name()
                    );
                }
            }
            let bytes = t.numel * t.dtype.size();
            if bytes > 0 {
                ranges.push((t.param as usize, bytes, i, "param"));
                ranges.push((t.grad as usize, bytes, i, "grad"));
            }
        }
        ranges.sort_unstable_by_key(|r| r.0);
        for w in ranges.windows(2) {
            let (a, b) = (w[0], w[1]);
            // Two gradients may share memory (read only); anything written may not.
            if a.0 + a.1 > b.0 && !(a.3 == "grad" && b.3 == "grad") {
                fail!(
                    InvalidArgument,
                    "tensors[{}].{} overlaps tensors[{}].{}: parameters must not alias each other or any gradient",
                    a.2,
                    a.3,
                    b.2,
                    b.3
                );
            }
        }
        Ok(())
    }

    fn step(&mut self, req: StepRequest<'_>) -> Result<()> {
        if !req.found_inf.is_null() {
            // SAFETY: the engine checked the pointer is non-null and aligned;
            // the caller promises it points at one f32 on the host.
            let flag = unsafe { *(req.found_inf as *const f32) };
            if flag != 0.0 {
                self.last = StepOutcome {
                    skip: SkipReason::FoundInf,
                    phi: f64::NAN,
                    scale: 1.0,
                };
                return Ok(());
            }
        }
        self.ensure_state(req.tensors);
        let items = self.items(req.tensors);
        let total: usize = req.tensors.iter().map(|t| t.numel).sum();
        let bias = self.bias.advanced(&req.hyper);
        let sc = StepScalars::new(req.kind, &req.hyper, bias);
        let nonfinite = StepOutcome {
            skip: SkipReason::NonfiniteGrad,
            phi: f64::NAN,
            scale: 1.0,
        };
        let kind = req.kind;

        // (scale, φ already reduced across ranks in two-pass mode)
        let (scale, phi_reduced) = match req.rule {
            None => {
                if req.check_finite {
                    let ok = self.run(&items, total, &|it| chunk_finite(it));
                    let mut v = [ok.iter().filter(|&&f| !f).count() as f64, 0.0];
                    if let Some(reduce) = req.reduce {
                        reduce(&mut v)?;
                    }
                    if v[0] != 0.0 {
                        self.last = nonfinite;
                        return Ok(());
                    }
                }
                (1.0, None)
            }
            Some(rule) => {
                let parts = self.run(&items, total, &|it| {
                    dispatch_kind!(kind, chunk_dispatch::<false>(&sc, 0.0, it))
                });
                let (sum, bad) = ordered_sum(&parts);
                let mut v = [bad as u32 as f64, req.lr * sum];
                if let Some(reduce) = req.reduce {
                    reduce(&mut v)?;
                }
                if req.check_finite && v[0] != 0.0 {
                    self.last = nonfinite;
                    return Ok(());
                }
                (rule.scale(v[1]), Some(v[1]))
            }
        };
        let lr = (scale * req.lr) as f32;
        let parts = self.run(&items, total, &|it| {
            dispatch_kind!(kind, chunk_dispatch::<true>(&sc, lr, it))
        });
        let (sum, _) = ordered_sum(&parts);
        self.bias = bias;
        self.applied += 1;
        self.last = StepOutcome {
            skip: SkipReason::None,
            phi: phi_reduced.unwrap_or(req.lr * sum),
            scale,
        };
        Ok(())
    }

    fn outcome(&mut self) -> Result<StepOutcome> {
        Ok(self.last)
    }

    fn export_state(&mut self) -> Result<BackendState> {
        Ok(BackendState {
            bias: self.bias,
            applied: self.applied,
            slots: self.state.clone(),
        })
    }

    fn import_state(&mut self, state: &BackendState) -> Result<()> {
        self.bias = state.bias;
        self.applied = state.applied;
        self.state = state.slots.clone();
        Ok(())
    }

    fn applied_steps(&mut self) -> Result<u64> {
        Ok(self.applied)
    }
}
