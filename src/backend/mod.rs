//! Backends do the bulk work (ALGORITHM.md, "Cost structure"): the fused
//! direction + dot + update pass, the read-only dot pass followed by the
//! scaled update, and optimizer-state export/import. They never decide
//! anything: the scalars they need come in the [`StepRequest`].

pub mod cpu;
pub mod cuda;

use crate::controller::{ScaleRule, StepOutcome};
use crate::error::Result;
use crate::optim::{BiasPowers, DType, Hyper, OptimizerKind};
use std::ffi::c_void;

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
    /// the other ranks wait in the same collective.
    pub reduce: Option<Reducer<'a>>,
}

/// Optimizer state in host memory (checkpoints).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendState {
    pub bias: BiasPowers,
    /// Steps actually applied (t of the bias corrections).
    pub applied: u64,
    /// Per tensor, `slots × numel` f32 values, slot-major.
    pub slots: Vec<Vec<f32>>,
}

/// What the backend returns from a step when it knows the outcome without
/// waiting (always on the host); the CUDA backend answers at `outcome`.
pub trait Backend: Send {
    /// Checks the pointers of a step (memory kind, alignment, overlap).
    fn validate(&self, tensors: &[TensorDesc]) -> Result<()>;
    /// Runs one step. Never waits for a device.
    fn step(&mut self, req: StepRequest<'_>) -> Result<()>;
    /// Outcome of the last step: skip reason, the LOCAL partial Σg·d times
    /// η (the engine reduces it across ranks), the scale used. May wait.
    fn outcome(&mut self) -> Result<StepOutcome>;
    /// Copies the optimizer state to the host.
    fn export_state(&mut self) -> Result<BackendState>;
    /// Replaces the optimizer state (layout already checked by the engine).
    fn import_state(&mut self, state: &BackendState) -> Result<()>;
    /// Number of applied steps so far (may wait on a device).
    fn applied_steps(&mut self) -> Result<u64>;
}
