//! The engine: one handle's state. Checks call order and tensor layout,
//! asks the controller for the scalars, has the backend run the passes,
//! and runs the cross-rank reductions. No `extern "C"` here.

use crate::backend::{
    cpu::CpuBackend, overlaps, Backend, BackendState, StateImport, StateMeta, TensorDesc,
};
use crate::config::{Config, Device, ReevalSchedule};
use crate::controller::{self, Decision, ReevalResult, ScaleRule, SkipReason, StepOutcome};
use crate::error::{Error, Result, Status};
use crate::fail;
use crate::optim::{BiasPowers, DType};
use std::ffi::c_void;

/// The registered cross-rank sum.
pub type BoxedReducer = Box<dyn FnMut(&mut [f64]) -> Result<()> + Send>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Accepted `step` calls (skipped ones included).
    pub steps: u64,
    /// Steps whose update ran: the state and t advanced, the parameters
    /// moved by s·v (not at all when s = 0).
    pub applied: u64,
    /// Steps skipped (non-finite loss or gradient, found-inf flag).
    pub skipped: u64,
    pub reevals: u64,
    pub raised: u64,
    pub lowered: u64,
    pub kept: u64,
    /// Re-evaluations whose ratio test did not run (see the skip reason).
    pub reeval_skipped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Pending {
    /// f_i (already averaged across ranks when losses are rank-local).
    loss: f64,
    /// Known without asking the backend (non-finite loss).
    known: Option<StepOutcome>,
    /// The step ran in fused mode (φ still rank-local when sharded).
    fused: bool,
    reeval_due: bool,
}

/// Schedule position: the next step index due for re-evaluation and the
/// current gap (geometric schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ScheduleState {
    next: u64,
    gap: f64,
}

/// More steps than any run takes (292 years at one step per ns): a
/// checkpoint claiming as many is forged.
const STEPS_LIMIT: u64 = 1 << 63;

/// The call-order error of asking about a step that is not pending (the
/// C boundary prefixes the function's name).
fn no_pending_step() -> Error {
    Error::new(
        Status::CallOrder,
        "called without a pending step (call lra_step first; each step is re-evaluated at most once)",
    )
}

/// A sharded or rank-local-loss handle asked to reduce without a
/// registered reduction.
fn no_reduction() -> Error {
    Error::new(
        Status::CallOrder,
        "the configuration is sharded or has rank-local losses, but no reduction is registered (call lra_set_reduction on every rank before the first step)",
    )
}

pub struct Engine {
    cfg: Config,
    lr: f64,
    backend: Box<dyn Backend>,
    layout: Option<Vec<(usize, DType)>>,
    pending: Option<Pending>,
    counters: Counters,
    loss_skips: u64,
    last: Option<ReevalResult>,
    schedule: ScheduleState,
    reducer: Option<BoxedReducer>,
}

const CKPT_MAGIC: &[u8; 8] = b"LRACKPT\0";
/// 2: hyper-parameters the optimizer does not read are written as +0.
const CKPT_VERSION: u32 = 2;

impl Engine {
    pub fn new(cfg: Config) -> Result<Engine> {
        cfg.validate()?;
        let backend: Box<dyn Backend> = match cfg.device {
            Device::Host => Box::new(CpuBackend::new(cfg.kind, cfg.threads)),
            Device::Cuda { ordinal } => crate::backend::cuda::create(cfg.kind, ordinal)?,
        };
        Ok(Engine {
            lr: cfg.lr,
            cfg,
            backend,
            layout: None,
            pending: None,
            counters: Counters::default(),
            loss_skips: 0,
            last: None,
            schedule: ScheduleState { next: 0, gap: 1.0 },
            reducer: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if let Some(why) = controller::lr_problem(lr, &self.cfg.settings) {
            fail!(InvalidArgument, "{why}");
        }
        self.lr = lr;
        Ok(())
    }

    pub fn set_reducer(&mut self, r: Option<BoxedReducer>) {
        self.reducer = r;
    }

    /// The cross-rank sum. Only sharded and rank-local-loss handles reduce,
    /// and they need the registered one: `step` refuses to run without it,
    /// and so does the re-evaluation of a step restored from a checkpoint
    /// (deciding η from this rank's values alone lets η drift apart, and
    /// leaves the ranks that did register waiting in the collective).
    fn reduce(&mut self, v: &mut [f64]) -> Result<()> {
        match self.reducer.as_mut() {
            Some(r) => r(v),
            None => Err(no_reduction()),
        }
    }

    fn check_layout(&self, tensors: &[TensorDesc]) -> Result<()> {
        let Some(layout) = &self.layout else {
            // A first step fixes the layout, even one that allocates no
            // state (a skipped step): its checkpoint must be possible.
            let layout: Vec<_> = tensors.iter().map(|t| (t.numel, t.dtype)).collect();
            let slots = self.cfg.kind.state_slots();
            if checkpoint_size(self.header_fields().len(), &layout, slots).is_none() {
                // Not LRA_OUT_OF_MEMORY: no freed memory makes it fit.
                fail!(
                    InvalidArgument,
                    "the optimizer state of these tensors ({} f32 values per element) would need more than isize::MAX bytes",
                    slots
                );
            }
            return Ok(());
        };
        if layout.len() != tensors.len() {
            fail!(
                SizeMismatch,
                "{} tensors given, but the first step had {}",
                tensors.len(),
                layout.len()
            );
        }
        for (i, (t, &(n, dt))) in tensors.iter().zip(layout).enumerate() {
            if t.numel != n || t.dtype != dt {
                fail!(
                    SizeMismatch,
                    "tensors[{i}] is {} {}, but the first step had {} {}",
                    t.numel,
                    t.dtype.name(),
                    n,
                    dt.name()
                );
            }
        }
        Ok(())
    }

    /// Whether step `index` is due for re-evaluation; advances the schedule.
    fn schedule_due(&mut self, index: u64) -> bool {
        match self.cfg.schedule {
            ReevalSchedule::Always => true,
            ReevalSchedule::Every(k) => index.is_multiple_of(k),
            ReevalSchedule::Geometric(r) => {
                if index < self.schedule.next {
                    return false;
                }
                // Saturating: a huge growth factor makes the gap +inf (as
                // u64: u64::MAX), and the schedule must not wrap to "due".
                let gap = self.schedule.gap.floor().max(1.0) as u64;
                self.schedule.next = index.saturating_add(gap);
                self.schedule.gap *= r;
                true
            }
        }
    }

    /// One iteration: the optimizer step with the current η (scaled by s_i
    /// when f* is known or R > 0). Validates everything before any write.
    ///
    /// # Safety
    ///
    /// What `lra_step_ex` asks of a C caller, which lra cannot check: each
    /// tensor's `param` is valid for reads and writes and its `grad` for
    /// reads of `numel` elements of its dtype, in the memory this handle
    /// works on (host memory for a host handle; device memory of the
    /// handle's device for a CUDA handle), for the whole call (on a CUDA
    /// handle: until the step's work on `stream` is done); `found_inf` is
    /// null or valid for one f32 there; `stream` is null or a live
    /// `CUstream` (null on a host handle); no tensor's extent wraps the
    /// address space (the C boundary checks that). What lra can check here
    /// (alignment, overlap, memory kind) it does, before any write.
    pub unsafe fn step(
        &mut self,
        tensors: &[TensorDesc],
        loss: f64,
        obs_var: f64,
        found_inf: *const c_void,
        stream: *mut c_void,
    ) -> Result<()> {
        if !(obs_var.is_finite() && obs_var >= 0.0) {
            fail!(
                InvalidArgument,
                "obs_var = {obs_var:?} must be finite and >= 0"
            );
        }
        if (self.cfg.sharded || self.cfg.loss_rank_local) && self.reducer.is_none() {
            // Without the sum each rank would decide η from its own part
            // (η drifts apart) or, if only some ranks registered it, the
            // others would wait in a collective this rank never joins.
            return Err(no_reduction());
        }
        self.check_layout(tensors)?;
        self.backend.validate(tensors)?;
        if !(found_inf as usize).is_multiple_of(4) {
            fail!(
                InvalidArgument,
                "found_inf = {found_inf:p} is not aligned to 4 bytes (it points at one f32)"
            );
        }
        // The step writes the parameters while it reads the flag (each CUDA
        // block reads it on its own): a flag inside one could skip part of
        // the step and not the rest.
        if !found_inf.is_null() {
            // Any shared byte: an f16 parameter may start inside the flag.
            let flag = found_inf as usize;
            if let Some(i) = tensors
                .iter()
                .position(|t| overlaps(t.param as usize, t.numel * t.dtype.size(), flag, 4))
            {
                fail!(
                    InvalidArgument,
                    "found_inf = {found_inf:p} shares memory with tensors[{i}].param, which the step writes"
                );
            }
        }
        // Before the loss sum below: a refused step joins no collective.
        self.backend.check_step(found_inf, stream)?;
        let mut loss = loss;
        if self.cfg.loss_rank_local {
            // Memory this rank cannot have fails here too (it differs
            // between ranks): after the sum, the retry the status invites
            // would meet the other ranks in their next collective.
            self.backend.prepare(tensors, stream)?;
            let mut v = [loss, 1.0];
            self.reduce(&mut v)?;
            loss = v[0] / v[1];
        }
        let s = self.cfg.settings;
        // The fused pass applies s = 1 without looking at φ: only when no
        // rule could make s anything else (a cap below 1 would).
        let rule = if s.f_star.is_nan() && obs_var == 0.0 && s.scale_max >= 1.0 {
            None
        } else {
            Some(ScaleRule {
                loss,
                f_star: s.f_star,
                obs_var,
                scale_max: s.scale_max,
            })
        };
        let known = if loss.is_finite() {
            let sharded = self.cfg.sharded;
            let mut reducer = self.reducer.take();
            let req = crate::backend::StepRequest {
                tensors,
                kind: self.cfg.kind,
                hyper: self.cfg.hyper,
                lr: self.lr,
                rule,
                check_finite: self.cfg.check_finite,
                found_inf,
                stream,
                reduce: match (&mut reducer, sharded) {
                    (Some(r), true) => Some(r.as_mut()),
                    _ => None,
                },
            };
            // SAFETY: the pointers are valid (this function's contract),
            // and validate and check_step accepted them above.
            let res = unsafe { self.backend.step(req) };
            self.reducer = reducer;
            res?;
            None
        } else {
            self.loss_skips += 1;
            Some(StepOutcome {
                skip: SkipReason::NonfiniteLoss,
                phi: f64::NAN,
                scale: 1.0,
            })
        };
        // The first successful step fixes the layout (a failed one changes nothing).
        if self.layout.is_none() {
            self.layout = Some(tensors.iter().map(|t| (t.numel, t.dtype)).collect());
        }
        let index = self.counters.steps;
        self.counters.steps += 1;
        let reeval_due = self.schedule_due(index);
        self.pending = Some(Pending {
            loss,
            known,
            fused: rule.is_none(),
            reeval_due,
        });
        Ok(())
    }

    /// Whether the caller should re-evaluate the step just taken.
    pub fn should_reeval(&self) -> Result<bool> {
        match &self.pending {
            Some(p) => Ok(p.reeval_due),
            None => Err(no_pending_step()),
        }
    }

    fn outcome_of(&mut self, p: &Pending) -> Result<StepOutcome> {
        match p.known {
            Some(o) => Ok(o),
            None => self.backend.outcome(),
        }
    }

    /// The ratio test for the pending step, given f+ on the same batch.
    pub fn report_reeval(&mut self, loss_after: f64) -> Result<ReevalResult> {
        let Some(p) = self.pending else {
            return Err(no_pending_step());
        };
        let mut o = self.outcome_of(&p)?;
        let mut loss_after = loss_after;
        // Same shape on every rank: which values are reduced depends only on
        // the configuration and the (rank-uniform) kind of step.
        let phi_local = self.cfg.sharded && p.fused;
        let mut v = Vec::with_capacity(3);
        if phi_local {
            // A rank that skipped (only a rank-local found-inf flag with the
            // guard off can make ranks differ) poisons the sum: φ is NaN on
            // every rank and η stays unchanged everywhere.
            v.push(if o.skip == SkipReason::None {
                o.phi
            } else {
                f64::NAN
            });
        }
        if self.cfg.loss_rank_local {
            v.extend([loss_after, 1.0]);
        }
        if !v.is_empty() {
            self.reduce(&mut v)?;
            if phi_local && o.skip == SkipReason::None {
                o.phi = v[0];
            }
            if self.cfg.loss_rank_local {
                let k = v.len();
                loss_after = v[k - 2] / v[k - 1];
            }
        }
        let r = controller::decide(&self.cfg.settings, self.lr, p.loss, loss_after, &o);
        self.pending = None;
        self.lr = r.lr;
        self.counters.reevals += 1;
        match r.decision {
            Decision::Raised => self.counters.raised += 1,
            Decision::Lowered => self.counters.lowered += 1,
            Decision::Kept => self.counters.kept += 1,
            Decision::Skipped => self.counters.reeval_skipped += 1,
        }
        self.last = Some(r);
        Ok(r)
    }

    pub fn last_reeval(&self) -> Option<ReevalResult> {
        self.last
    }

    /// φ of the most recent step (NaN before the first, or when skipped).
    /// Rank-local in fused sharded mode until reduced by `report_reeval`.
    pub fn last_phi(&mut self) -> Result<f64> {
        match self.pending {
            Some(p) => Ok(self.outcome_of(&p)?.phi),
            None => Ok(self.last.map_or(f64::NAN, |r| r.phi)),
        }
    }

    /// A host copy of the optimizer state (tests, tools). May wait on a device.
    pub fn optimizer_state(&mut self) -> Result<BackendState> {
        self.backend.export_state()
    }

    pub fn counters(&mut self) -> Result<Counters> {
        let mut c = self.counters;
        c.applied = self.backend.applied_steps()?;
        c.skipped = c.steps - c.applied;
        Ok(c)
    }

    // ---- checkpoints -------------------------------------------------

    fn header_fields(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(CKPT_MAGIC);
        put_u32(&mut w, CKPT_VERSION);
        put_u32(&mut w, self.cfg.kind as u32);
        for x in self.cfg.hyper.checkpoint_array(self.cfg.kind) {
            put_f64(&mut w, x);
        }
        w
    }

    /// Bytes `save_state` writes.
    pub fn state_size(&self) -> Result<usize> {
        let layout = self.layout.as_deref().unwrap_or(&[]);
        checkpoint_size(
            self.header_fields().len(),
            layout,
            self.cfg.kind.state_slots(),
        )
        .ok_or_else(|| {
            // Not reached: a step refuses a layout whose checkpoint
            // would not fit, and a load's layout fits its buffer.
            Error::new(
                Status::InvalidArgument,
                "the checkpoint would need more than isize::MAX bytes",
            )
        })
    }

    /// Serialises η, counters, schedule, the pending step and the optimizer
    /// state into `out` (which must hold `state_size()` bytes).
    pub fn save_state(&mut self, out: &mut [u8]) -> Result<usize> {
        let mut at = 0;
        self.write_checkpoint(out.len(), &mut |piece| {
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        })
    }

    /// Hands the checkpoint that `save_state` writes (`state_size()`
    /// bytes) to `out` in order, piece by piece: it is never held whole in
    /// lra's memory, so a save needs little memory beyond the caller's
    /// buffer. `BufferTooSmall`, before any work, when a buffer of
    /// `capacity` bytes cannot hold it. Everything that can fail on the
    /// host runs before the first piece; a device read that fails on the
    /// way leaves `out` with part of a checkpoint (and no checksum over
    /// it). (The C ABI writes the pieces into the caller's buffer without
    /// forming a `&mut [u8]` over it: that memory may be uninitialised,
    /// e.g. fresh from `malloc`.)
    pub fn write_checkpoint(
        &mut self,
        capacity: usize,
        out: &mut dyn FnMut(&[u8]),
    ) -> Result<usize> {
        let need = self.state_size()?;
        if capacity < need {
            fail!(
                BufferTooSmall,
                "buffer holds {capacity} bytes, the checkpoint needs {need}"
            );
        }
        let pending_outcome = match self.pending {
            Some(p) => Some(self.outcome_of(&p)?),
            None => None,
        };
        let layout = self.layout.clone().unwrap_or_default();
        let slots = self.cfg.kind.state_slots();
        let meta = if self.layout.is_some() {
            self.backend.state_meta()?
        } else {
            StateMeta {
                bias: BiasPowers::default(),
                applied: 0,
                lens: Vec::new(),
            }
        };
        // Skipped first steps leave the state unallocated (or sized by a
        // first step that failed, for other sizes): it is zero.
        let sized = meta.lens.len() == layout.len()
            && meta
                .lens
                .iter()
                .zip(&layout)
                .all(|(&l, &(n, _))| l == n * slots);
        let mut w = self.header_fields();
        put_u64(&mut w, layout.len() as u64);
        for &(n, dt) in &layout {
            put_u64(&mut w, n as u64);
            put_u32(&mut w, dt as u32);
        }
        let c = &self.counters;
        for x in [
            c.steps,
            c.reevals,
            c.raised,
            c.lowered,
            c.kept,
            c.reeval_skipped,
            self.loss_skips,
        ] {
            put_u64(&mut w, x);
        }
        put_f64(&mut w, self.lr);
        put_u64(&mut w, self.schedule.next);
        put_f64(&mut w, self.schedule.gap);
        let last = self.last;
        put_u32(&mut w, last.is_some() as u32);
        let l = last.unwrap_or(ReevalResult {
            phi: 0.0,
            rho: 0.0,
            scale: 0.0,
            lr_before: 0.0,
            lr: 0.0,
            decision: Decision::Kept,
            skip: SkipReason::None,
        });
        for x in [l.phi, l.rho, l.scale, l.lr_before, l.lr] {
            put_f64(&mut w, x);
        }
        put_u32(&mut w, (l.decision as u32) | ((l.skip as u32) << 8));
        let p = self.pending;
        put_u32(
            &mut w,
            p.map_or(0, |p| {
                // Bit 3: the outcome below is recorded. Always true, since
                // it is read from the backend when not known: a restored
                // handle (which keeps it as known) saves the same bytes.
                1 | (p.fused as u32) << 1 | (p.reeval_due as u32) << 2 | 1 << 3
            }),
        );
        let o = pending_outcome.unwrap_or(StepOutcome {
            skip: SkipReason::None,
            phi: 0.0,
            scale: 0.0,
        });
        put_f64(&mut w, p.map_or(0.0, |p| p.loss));
        put_f64(&mut w, o.phi);
        put_f64(&mut w, o.scale);
        put_u32(&mut w, o.skip as u32);
        put_f64(&mut w, meta.bias.pow1);
        put_f64(&mut w, meta.bias.pow2);
        put_u64(&mut w, meta.applied);
        let mut sink = Checksummed::new(out);
        sink.put(&w);
        for (i, &(n, _)) in layout.iter().enumerate() {
            if sized {
                self.backend
                    .export_slots(i, &mut |values| sink.put_values(values))?;
            } else {
                sink.put_zeros(n * slots * 4);
            }
        }
        let (written, sum) = sink.finish();
        assert_eq!(written + 8, need, "checkpoint size accounting");
        out(&sum.to_le_bytes());
        Ok(need)
    }

    /// Restores a checkpoint written by `save_state` with the same optimizer,
    /// hyper-parameters and tensor layout. All-or-nothing.
    pub fn load_state(&mut self, buf: &[u8]) -> Result<()> {
        let bad = |m: String| Error::new(Status::BadCheckpoint, m);
        if buf.len() < 8 + 8 || &buf[..8] != CKPT_MAGIC {
            return Err(bad("not an lra checkpoint (bad magic)".into()));
        }
        let (body, tail) = buf.split_at(buf.len() - 8);
        if fnv1a(body) != u64::from_le_bytes(tail.try_into().unwrap()) {
            return Err(bad(format!(
                "checksum mismatch over the {} bytes given: truncated or corrupted, or not the size lra_save_state wrote (a buffer's capacity?)",
                buf.len()
            )));
        }
        let mut r = Reader { b: body, at: 8 };
        let version = r.u32()?;
        if version != CKPT_VERSION {
            return Err(bad(format!(
                "checkpoint version {version}, this library reads {CKPT_VERSION}"
            )));
        }
        let kind = r.u32()?;
        if kind != self.cfg.kind as u32 {
            return Err(bad(format!(
                "checkpoint is for optimizer {kind}, this handle runs {} ({})",
                self.cfg.kind as u32,
                self.cfg.kind.name()
            )));
        }
        let mut saved = [0.0; 6];
        for v in &mut saved {
            *v = r.f64()?;
        }
        if let Some(why) = self.cfg.hyper.checkpoint_mismatch(self.cfg.kind, saved) {
            return Err(bad(why));
        }
        let n = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
        if n > body.len() / 12 {
            return Err(bad(format!("implausible tensor count {n}")));
        }
        let mut layout = Vec::with_capacity(n);
        for i in 0..n {
            // Saturated: too large for this machine is refused below.
            let numel = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
            let dt = r.u32()?;
            let dt = DType::from_u32(dt)
                .ok_or_else(|| bad(format!("tensor {i}: unknown dtype {dt}")))?;
            // What lra_step refuses, a checkpoint cannot bring (SGD's carry
            // no state bytes that would bound the size).
            if numel
                .checked_mul(dt.size())
                .is_none_or(|b| b > isize::MAX as usize)
            {
                return Err(bad(format!(
                    "tensor {i}: {numel} {} elements are more than any tensor can hold",
                    dt.name()
                )));
            }
            layout.push((numel, dt));
        }
        if let Some(mine) = &self.layout {
            if *mine != layout {
                return Err(bad(format!(
                    "checkpoint tensor layout ({n} tensors) differs from this handle's ({} tensors, or sizes/dtypes differ)",
                    mine.len()
                )));
            }
        }
        let mut counters = Counters::default();
        for x in [
            &mut counters.steps,
            &mut counters.reevals,
            &mut counters.raised,
            &mut counters.lowered,
            &mut counters.kept,
            &mut counters.reeval_skipped,
        ] {
            *x = r.u64()?;
        }
        if self.layout.is_some() && n == 0 && counters.steps == 0 {
            return Err(bad(
                "checkpoint was saved before any step, but this handle's tensor layout is already fixed".into(),
            ));
        }
        let loss_skips = r.u64()?;
        let lr = r.f64()?;
        if let Some(why) = controller::lr_problem(lr, &self.cfg.settings) {
            return Err(bad(format!("checkpoint {why}")));
        }
        let schedule = ScheduleState {
            next: r.u64()?,
            gap: r.f64()?,
        };
        let has_last = match r.u32()? {
            0 => false,
            1 => true,
            flag => return Err(bad(format!("bad last-report flag {flag:#x}"))),
        };
        let (phi, rho, scale, lr_before, lr_after) =
            (r.f64()?, r.f64()?, r.f64()?, r.f64()?, r.f64()?);
        let dec = r.u32()?;
        // An empty slot holds the zeros `save_state` writes there, so that
        // every checkpoint lra accepts saves back to the same bytes.
        let is_zero = |x: &[f64]| x.iter().all(|v| v.to_bits() == 0);
        if !has_last && (dec != 0 || !is_zero(&[phi, rho, scale, lr_before, lr_after])) {
            return Err(bad("the empty last-report slot is not zero".into()));
        }
        let decision = Decision::from_u32(dec & 0xff).ok_or_else(|| bad("bad decision".into()))?;
        let skip = SkipReason::from_u32(dec >> 8).ok_or_else(|| bad("bad skip reason".into()))?;
        let last = has_last.then_some(ReevalResult {
            phi,
            rho,
            scale,
            lr_before,
            lr: lr_after,
            decision,
            skip,
        });
        let pf = r.u32()?;
        // What `save_state` writes: 0 (nothing pending), or bit 0 (pending)
        // with bit 3 (its outcome recorded below) and bits 1-2. Anything
        // else did not come from lra.
        if pf & !0b1111 != 0 || (pf != 0 && pf & 0b1001 != 0b1001) {
            return Err(bad(format!("bad pending-step flags {pf:#x}")));
        }
        let (ploss, ophi, oscale, oskip) = (r.f64()?, r.f64()?, r.f64()?, r.u32()?);
        if pf == 0 && (oskip != 0 || !is_zero(&[ploss, ophi, oscale])) {
            return Err(bad("the empty pending-step slot is not zero".into()));
        }
        let oskip =
            SkipReason::from_u32(oskip).ok_or_else(|| bad("bad pending skip reason".into()))?;
        let outcome = StepOutcome {
            skip: oskip,
            phi: ophi,
            scale: oscale,
        };
        // A pending step whose outcome was only on the device is restored
        // with the outcome read at save time.
        let pending = (pf & 1 != 0).then_some(Pending {
            loss: ploss,
            known: Some(outcome),
            fused: pf & 2 != 0,
            reeval_due: pf & 4 != 0,
        });
        let bias = BiasPowers {
            pow1: r.f64()?,
            pow2: r.f64()?,
        };
        let applied = r.u64()?;
        if applied > counters.steps {
            return Err(bad(format!(
                "checkpoint has {applied} applied steps but only {} steps",
                counters.steps
            )));
        }
        // Counters no run can reach: every re-evaluation consumed a step
        // (another one than the step still pending) and made one decision,
        // and no run takes 2^63 steps (the counters only grow by one a
        // step, so they cannot overflow after such a load).
        let c = &counters;
        let decided = [c.raised, c.lowered, c.kept, c.reeval_skipped]
            .iter()
            .try_fold(0u64, |a, &x| a.checked_add(x));
        if c.steps >= STEPS_LIMIT
            || c.reevals.saturating_add(pending.is_some() as u64) > c.steps
            || loss_skips > c.steps
            || decided != Some(c.reevals)
        {
            return Err(bad(format!(
                "checkpoint counters are inconsistent: {} steps, {} re-evaluations ({:?} decided), {loss_skips} loss skips",
                c.steps, c.reevals, decided
            )));
        }
        // Values no run can produce: a gap starts at 1 and only grows (by
        // r >= 1, to +inf at most); bias powers are β^t with β in [0, 1).
        // A NaN or negative gap would re-evaluate every step, a power
        // outside [0, 1] would give Adam a negative or NaN bias correction.
        if schedule.gap.is_nan() || schedule.gap < 1.0 {
            return Err(bad(format!(
                "checkpoint schedule gap {:?} is not a number >= 1",
                schedule.gap
            )));
        }
        for (name, pow) in [("beta1^t", bias.pow1), ("beta2^t", bias.pow2)] {
            if !(0.0..=1.0).contains(&pow) {
                return Err(bad(format!(
                    "checkpoint bias power {name} = {pow:?} is outside [0, 1]"
                )));
            }
        }
        let slots_per = self.cfg.kind.state_slots();
        let mut slots = Vec::with_capacity(n);
        for &(numel, _) in &layout {
            let count = numel
                .checked_mul(slots_per)
                .ok_or_else(|| bad("size overflow".into()))?;
            slots.push(
                r.take(
                    count
                        .checked_mul(4)
                        .ok_or_else(|| bad("size overflow".into()))?,
                )?,
            );
        }
        if r.at != body.len() {
            return Err(bad(format!("{} trailing bytes", body.len() - r.at)));
        }
        // No tensors means either "no step yet" (no layout) or steps on the
        // empty tensor list (the empty layout): the step count tells.
        let has_layout = n > 0 || counters.steps > 0;
        // Also without a layout: the backend then starts afresh (it may
        // hold what a failed first step left, or be marked broken).
        self.backend.import_state(&StateImport {
            bias,
            applied,
            slots,
        })?;
        self.layout = has_layout.then_some(layout);
        self.counters = counters;
        self.loss_skips = loss_skips;
        self.lr = lr;
        self.schedule = schedule;
        self.last = last;
        self.pending = pending;
        Ok(())
    }
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_f64(w: &mut Vec<u8>, v: f64) {
    w.extend_from_slice(&v.to_bits().to_le_bytes());
}

const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a_update(h: u64, b: &[u8]) -> u64 {
    b.iter()
        .fold(h, |h, &x| (h ^ x as u64).wrapping_mul(0x0100_0000_01b3))
}

fn fnv1a(b: &[u8]) -> u64 {
    fnv1a_update(FNV_BASIS, b)
}

/// Bytes of a checkpoint: header (`header` bytes), tensor count, layout,
/// 22 u64/f64 and 4 u32 fields, each tensor's `slots` f32 values per
/// element, and the checksum; `None` when that does not fit in a buffer
/// (more than `isize::MAX` bytes).
fn checkpoint_size(header: usize, layout: &[(usize, DType)], slots: usize) -> Option<usize> {
    let fixed = header + 8 + 8 * 22 + 4 * 4;
    let size = layout.iter().try_fold(fixed, |acc, &(n, _)| {
        n.checked_mul(slots)?
            .checked_mul(4)?
            .checked_add(12)?
            .checked_add(acc)
    })?;
    (size <= isize::MAX as usize).then_some(size)
}

/// The checkpoint's bytes on their way out: counted and checksummed,
/// passed on in pieces.
struct Checksummed<'a> {
    out: &'a mut dyn FnMut(&[u8]),
    written: usize,
    sum: u64,
}

impl<'a> Checksummed<'a> {
    fn new(out: &'a mut dyn FnMut(&[u8])) -> Self {
        Checksummed {
            out,
            written: 0,
            sum: FNV_BASIS,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.sum = fnv1a_update(self.sum, bytes);
        self.written += bytes.len();
        (self.out)(bytes);
    }

    /// f32 values as little-endian bytes, through a small buffer.
    fn put_values(&mut self, values: &[f32]) {
        let mut buf = [0u8; 4096];
        for run in values.chunks(buf.len() / 4) {
            for (b, v) in buf.chunks_exact_mut(4).zip(run) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            self.put(&buf[..4 * run.len()]);
        }
    }

    fn put_zeros(&mut self, mut count: usize) {
        let zeros = [0u8; 4096];
        while count > 0 {
            let k = count.min(zeros.len());
            self.put(&zeros[..k]);
            count -= k;
        }
    }

    /// Bytes written and their checksum.
    fn finish(self) -> (usize, u64) {
        (self.written, self.sum)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            fail!(BadCheckpoint, "checkpoint is truncated");
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
}
