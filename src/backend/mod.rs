//! Backends do the bulk work (ALGORITHM.md, "Cost structure"): the fused
//! direction + dot + update pass, the read-only dot pass followed by the
//! scaled update, and optimizer-state export/import. They never decide
//! anything: the scalars they need come in the [`StepRequest`].

pub mod cpu;
pub mod cuda;
mod loaded_driver;

use crate::controller::{ScaleRule, StepOutcome};
use crate::error::Result;
use crate::fail;
use crate::optim::{BiasPowers, DType, Hyper, OptimizerKind};
use std::ffi::c_void;
use std::sync::Mutex;

/// One parameter tensor and its gradient, as the caller handed them over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorDesc {
    pub param: *mut c_void,
    pub grad: *const c_void,
    pub numel: usize,
    pub dtype: DType,
}

impl TensorDesc {
    /// An f32 tensor over host slices (Rust callers, tests, benchmarks).
    /// The slices must outlive every step that uses the descriptor.
    pub fn host_f32(param: &mut [f32], grad: &[f32]) -> TensorDesc {
        assert_eq!(
            param.len(),
            grad.len(),
            "parameter and gradient lengths differ"
        );
        TensorDesc {
            param: param.as_mut_ptr().cast(),
            grad: grad.as_ptr().cast(),
            numel: param.len(),
            dtype: DType::F32,
        }
    }
}

/// The tensor list a backend's `validate` last accepted. Trainers hand the
/// same buffers every step, and a list equal to the last accepted one needs
/// no new check (the checks cost more than a small step). The key is the
/// whole descriptor: the same pointers with a larger size or a wider dtype
/// are checked again (range, alignment, aliasing), also before the engine
/// has fixed a layout (a first step that fails after `validate` fixes none).
#[derive(Default)]
pub struct ValidatedTensors(Mutex<Vec<(usize, usize, usize, DType)>>);

impl ValidatedTensors {
    /// Runs `check` unless `tensors` equals the last list it accepted.
    pub fn check_once(
        &self,
        tensors: &[TensorDesc],
        check: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let key = |t: &TensorDesc| (t.param as usize, t.grad as usize, t.numel, t.dtype);
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() == tensors.len() && last.iter().zip(tensors).all(|(k, t)| *k == key(t)) {
            return Ok(());
        }
        last.clear();
        check()?;
        last.extend(tensors.iter().map(key));
        Ok(())
    }
}

/// Whether the byte ranges `[a, a + alen)` and `[b, b + blen)` share a byte.
pub fn overlaps(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// The pointer rules of every backend: each pointer aligned for its dtype;
/// no parameter overlaps another parameter or any gradient (two gradients
/// may share memory: they are only read).
pub fn check_alignment_and_aliasing(tensors: &[TensorDesc]) -> Result<()> {
    let mut ranges = Vec::with_capacity(2 * tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if t.numel == 0 {
            // Never dereferenced: any pointer, NULL included.
            continue;
        }
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
        ranges.push((t.param as usize, bytes, i, "param"));
        ranges.push((t.grad as usize, bytes, i, "grad"));
    }
    ranges.sort_unstable_by_key(|r| r.0);
    // Sweep in address order, remembering the range that reaches furthest
    // so far, and the parameter range that does: a parameter may overlap
    // nothing before it, a gradient no parameter.
    let mut reach_any: Option<(usize, usize, &str)> = None;
    let mut reach_param: Option<(usize, usize, &str)> = None;
    for &(start, bytes, i, what) in &ranges {
        let earlier = if what == "param" {
            reach_any
        } else {
            reach_param
        };
        if let Some((_, j, jwhat)) = earlier.filter(|r| r.0 > start) {
            fail!(
                InvalidArgument,
                "tensors[{j}].{jwhat} overlaps tensors[{i}].{what}: parameters must not alias each other or any gradient"
            );
        }
        let r = Some((start + bytes, i, what));
        if reach_any.is_none_or(|x| x.0 < start + bytes) {
            reach_any = r;
        }
        if what == "param" && reach_param.is_none_or(|x| x.0 < start + bytes) {
            reach_param = r;
        }
    }
    Ok(())
}

/// Sums `values` across ranks in place (the registered reduction); identity
/// on a single rank.
pub type Reducer<'a> = &'a mut dyn FnMut(&mut [f64]) -> Result<()>;

/// Everything a backend needs for one step.
pub struct StepRequest<'a> {
    pub tensors: &'a [TensorDesc],
    pub kind: OptimizerKind,
    pub hyper: Hyper,
    /// η for this step.
    pub lr: f64,
    /// `None`: fused mode (s = 1). `Some`: read-only dot pass, then s from
    /// φ, then the update with s·η.
    pub rule: Option<ScaleRule>,
    /// Check gradients for NaN/inf before writing anything.
    pub check_finite: bool,
    /// Caller's found-inf flag (one f32, non-zero = skip), or null.
    pub found_inf: *const c_void,
    /// CUDA stream (null = legacy default stream); ignored on the host.
    pub stream: *mut c_void,
    /// Sharded parameters only (`None` otherwise): sums, across ranks,
    /// `[non-finite gradient count, found-inf flag (0/1), η·Σg·d]` after the
    /// read-only pass and before anything is written, so every rank skips
    /// or scales alike. Called in two-pass mode, and in fused mode when
    /// `check_finite` is on (then the last value is 0); never skipped on a
    /// rank whose own found-inf flag is set or whose shard is empty, since
    /// the other ranks wait in the same collective. A rank whose own flag
    /// is set reads no gradient and contributes `[0, 1, 0]`.
    pub reduce: Option<Reducer<'a>>,
}

/// Optimizer state in host memory (tests and tools; checkpoints stream it
/// instead, see [`Backend::export_slots`] and [`StateImport`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendState {
    pub bias: BiasPowers,
    /// Steps actually applied (t of the bias corrections).
    pub applied: u64,
    /// Per tensor, `slots × numel` f32 values, slot-major.
    pub slots: Vec<Vec<f32>>,
}

/// What a checkpoint records of the backend before the slot values.
#[derive(Clone, Debug, PartialEq)]
pub struct StateMeta {
    pub bias: BiasPowers,
    /// Steps actually applied (t of the bias corrections).
    pub applied: u64,
    /// Per tensor, the values [`Backend::export_slots`] gives (0 where no
    /// state is allocated yet, e.g. after skipped first steps).
    pub lens: Vec<usize>,
}

/// A state to import, as a checkpoint holds it: per tensor, `slots × numel`
/// f32 values slot-major as little-endian bytes, read in place (a copy
/// would double the host memory a load needs).
pub struct StateImport<'a> {
    pub bias: BiasPowers,
    pub applied: u64,
    pub slots: Vec<&'a [u8]>,
}

/// The f32 of slot-major value `k` in a checkpoint's little-endian bytes.
pub fn le_value(bytes: &[u8], k: usize) -> f32 {
    f32::from_le_bytes([
        bytes[4 * k],
        bytes[4 * k + 1],
        bytes[4 * k + 2],
        bytes[4 * k + 3],
    ])
}

/// Where the optimizer runs (host or CUDA device): validates the caller's
/// pointers, steps over them and holds the optimizer state; the engine
/// above it owns the adaptation and the order of calls.
pub trait Backend: Send {
    /// Checks the pointers of a step (memory kind, alignment, overlap).
    fn validate(&self, tensors: &[TensorDesc]) -> Result<()>;
    /// Checks a step's found_inf flag and stream (memory kind, the stream's
    /// context, ...) before the engine starts any cross-rank sum, so that
    /// a refused step never leaves other ranks waiting in one. The host
    /// backend has nothing to ask.
    fn check_step(&mut self, _found_inf: *const c_void, _stream: *mut c_void) -> Result<()> {
        Ok(())
    }
    /// Allocates what a step over `tensors` needs (the optimizer state of
    /// a new layout), as `step` does too. The engine calls it before a
    /// cross-rank sum that precedes `step`, so that memory one rank cannot
    /// have fails its step before it joins any collective (a retry then
    /// meets the other ranks in the same one).
    fn prepare(&mut self, tensors: &[TensorDesc], stream: *mut c_void) -> Result<()>;
    /// Runs one step. Never waits for a device.
    ///
    /// # Safety
    ///
    /// As [`Engine::step`](crate::engine::Engine::step): the request's
    /// tensors, found_inf and stream are valid for this backend, and
    /// `validate` and `check_step` accepted them.
    unsafe fn step(&mut self, req: StepRequest<'_>) -> Result<()>;
    /// Outcome of the last step: skip reason, φ = η·Σg·d, the scale used.
    /// May wait. φ is this rank's partial after a fused step (the engine
    /// reduces it across ranks) and already the cross-rank sum after a
    /// two-pass one (which needed it for its scale).
    fn outcome(&mut self) -> Result<StepOutcome>;
    /// Bias powers, applied steps and the state's size per tensor.
    fn state_meta(&mut self) -> Result<StateMeta>;
    /// Hands tensor `tensor`'s state (its `state_meta` length, slot-major)
    /// to `sink` in order, piece by piece, without a copy of the whole.
    fn export_slots(&mut self, tensor: usize, sink: &mut dyn FnMut(&[f32])) -> Result<()>;
    /// Replaces the optimizer state (layout already checked by the engine).
    /// Memory it cannot have is `OutOfMemory`, with nothing changed.
    fn import_state(&mut self, state: &StateImport<'_>) -> Result<()>;
    /// A host copy of the optimizer state.
    fn export_state(&mut self) -> Result<BackendState> {
        let meta = self.state_meta()?;
        let mut slots = Vec::with_capacity(meta.lens.len());
        for (i, &len) in meta.lens.iter().enumerate() {
            let mut v = Vec::with_capacity(len);
            self.export_slots(i, &mut |piece| v.extend_from_slice(piece))?;
            slots.push(v);
        }
        Ok(BackendState {
            bias: meta.bias,
            applied: meta.applied,
            slots,
        })
    }
    /// [`import_state`](Backend::import_state) from host f32 values.
    fn import_values(&mut self, state: &BackendState) -> Result<()> {
        let bytes: Vec<Vec<u8>> = state
            .slots
            .iter()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        self.import_state(&StateImport {
            bias: state.bias,
            applied: state.applied,
            slots: bytes.iter().map(Vec::as_slice).collect(),
        })
    }
    /// Number of applied steps so far (may wait on a device).
    fn applied_steps(&mut self) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Status};

    fn desc(param: usize, grad: usize, numel: usize, dtype: DType) -> TensorDesc {
        TensorDesc {
            param: param as *mut c_void,
            grad: grad as *const c_void,
            numel,
            dtype,
        }
    }

    /// Runs `check_once` with a check that counts its calls and fails when
    /// told to; returns whether the check ran.
    fn checked(v: &ValidatedTensors, tensors: &[TensorDesc], fail: bool) -> bool {
        let mut ran = false;
        let r = v.check_once(tensors, || {
            ran = true;
            if fail {
                Err(Error::new(Status::InvalidArgument, "test"))
            } else {
                Ok(())
            }
        });
        assert_eq!(r.is_err(), fail && ran);
        ran
    }

    #[test]
    fn a_list_is_checked_again_unless_every_field_matches_the_last_accepted_one() {
        let v = ValidatedTensors::default();
        let base = [
            desc(0x1000, 0x2000, 4, DType::F16),
            desc(0x3000, 0x4000, 8, DType::F32),
        ];
        assert!(checked(&v, &base, false));
        assert!(!checked(&v, &base, false), "same list: no new check");
        // Each field of each descriptor, changed alone, must bring the check
        // back: same pointers with more elements or a wider dtype could run
        // past the allocation or be misaligned.
        for i in 0..2 {
            for change in 0..4 {
                let mut t = base;
                match change {
                    0 => t[i].param = (t[i].param as usize + 2) as *mut c_void,
                    1 => t[i].grad = (t[i].grad as usize + 2) as *const c_void,
                    2 => t[i].numel += 1,
                    _ => t[i].dtype = DType::Bf16,
                }
                assert!(checked(&v, &t, false), "tensor {i}, change {change}");
                assert!(checked(&v, &base, false));
            }
        }
        assert!(checked(&v, &base[..1], false), "a shorter list");
        // A failed check remembers nothing: the next call checks again.
        assert!(checked(&v, &base, true));
        assert!(checked(&v, &base, false));
        assert!(!checked(&v, &base, false));
    }

    #[test]
    fn alignment_and_aliasing_rules() {
        let ok = |t: &[TensorDesc]| check_alignment_and_aliasing(t).is_ok();
        assert!(ok(&[desc(0x1000, 0x2000, 4, DType::F32)]));
        assert!(
            !ok(&[desc(0x1002, 0x2000, 4, DType::F32)]),
            "misaligned f32"
        );
        assert!(ok(&[desc(0x1002, 0x2002, 4, DType::F16)]));
        assert!(
            !ok(&[desc(0x1000, 0x1008, 4, DType::F32)]),
            "param overlaps its grad"
        );
        assert!(
            ok(&[
                desc(0x1000, 0x3000, 4, DType::F32),
                desc(0x2000, 0x3000, 4, DType::F32)
            ]),
            "two gradients may share memory"
        );
        assert!(!ok(&[
            desc(0x1000, 0x3000, 4, DType::F32),
            desc(0x100c, 0x4000, 4, DType::F32)
        ]));
        assert!(
            ok(&[desc(0x1000, 0x1000, 0, DType::F32)]),
            "empty tensors overlap nothing"
        );
    }

    /// f32 tensors at element offsets from one base: (param, grad, numel).
    type Offsets<'a> = &'a [(usize, usize, usize)];

    /// The descriptors of `list`. Only addresses are compared: nothing is
    /// dereferenced.
    fn layout(list: Offsets) -> Vec<TensorDesc> {
        const BASE: usize = 0x1000_0000;
        list.iter()
            .map(|&(p, g, numel)| TensorDesc {
                param: (BASE + 4 * p) as *mut c_void,
                grad: (BASE + 4 * g) as *const c_void,
                numel,
                dtype: DType::F32,
            })
            .collect()
    }

    /// Layouts at the sweep's edges: what is accepted, and for each refused
    /// one the exact pair the message names (the range that reaches
    /// furthest among those that may not overlap it).
    #[test]
    fn the_aliasing_sweep_finds_each_overlap_and_only_those() {
        let accepted: &[Offsets] = &[
            // parameters end to end, their gradients elsewhere
            &[(0, 1000, 100), (100, 1100, 100)],
            // two gradients in the same memory, or partly overlapping
            &[(0, 1000, 100), (100, 1000, 100), (200, 1050, 100)],
            // an empty tensor's pointers inside another tensor are not
            // memory it touches
            &[(0, 1000, 100), (50, 50, 0), (200, 1100, 100)],
        ];
        for (n, list) in accepted.iter().enumerate() {
            if let Err(e) = check_alignment_and_aliasing(&layout(list)) {
                panic!("layout {n} refused: {e}");
            }
        }
        let refused: &[(Offsets, &str)] = &[
            // a parameter inside a gradient that starts earlier
            (
                &[(0, 1000, 100), (1050, 2000, 10)],
                "tensors[0].grad overlaps tensors[1].param",
            ),
            // a gradient that starts inside a parameter
            (
                &[(1000, 0, 100), (2000, 1099, 10)],
                "tensors[0].param overlaps tensors[1].grad",
            ),
            // the overlap is with a later, longer parameter, not the first
            // one in address order
            (
                &[(0, 5000, 4), (1000, 6000, 1000), (1500, 7000, 100)],
                "tensors[1].param overlaps tensors[2].param",
            ),
            // a gradient inside a later, longer parameter
            (
                &[(0, 5000, 4), (1000, 6000, 1000), (3000, 1500, 100)],
                "tensors[1].param overlaps tensors[2].grad",
            ),
            // two gradients reach equally far: the first one is named
            (
                &[(3000, 0, 100), (4000, 40, 60), (60, 5000, 10)],
                "tensors[0].grad overlaps tensors[2].param",
            ),
        ];
        for (list, want) in refused {
            match check_alignment_and_aliasing(&layout(list)) {
                Ok(()) => panic!("{list:?} accepted; wanted \"{want}\""),
                Err(e) => {
                    assert_eq!(e.status, crate::Status::InvalidArgument, "{e}");
                    assert!(e.message.starts_with(want), "{list:?}: {e}");
                }
            }
        }
    }
}
