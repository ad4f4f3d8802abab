//! A test-only interpreter for the PTX subset lra's kernels use.
//!
//! It runs PTX text on the CPU with exact IEEE semantics and a model of
//! threads, warps and blocks strict enough to catch real kernel bugs:
//!
//! - **Fail closed**: an instruction, type, modifier, directive or state
//!   space it does not know is a load error ([`ErrorKind::Load`]). It
//!   knows what lra's kernels and this crate's tests use, no more (no
//!   generic addressing, `vote`, `cvta`, `rcp`, integer unary operations,
//!   predicate logic, shared-memory atomics, module-scope `.shared`).
//!   Approximate instructions (`.approx`, `.full`, `.ftz`) and f32/f64
//!   `add`/`sub`/`mul` without a rounding modifier (which ptxas may contract
//!   into an FMA) are rejected unless [`LoadOptions::allow_inexact`] is set,
//!   in which case they are executed with IEEE semantics and counted in
//!   [`Module::inexact_report`].
//! - **Barriers**: `bar.sync` must be reached by every thread of the block at
//!   the same instruction; a thread that exits while others wait, or threads
//!   waiting at different barrier instructions, is an error. A thread count
//!   operand (`bar.sync 1, 64`) is a load error: the hardware counts it in
//!   whole warps, and lra's kernels use only block-wide barriers.
//! - **Warp collectives** (`shfl.sync`, `bar.warp.sync`): lanes
//!   rendezvous on equal qualifiers and mask; the executing lane must be in
//!   the mask; a shuffle reading a lane outside the mask (or exited) is an
//!   error; lane selection and clamping follow the PTX ISA pseudo-code.
//! - **Memory**: global accesses are bounds- and alignment-checked against
//!   host-provided buffers (each followed by an unmapped gap); shared
//!   memory has a race detector between barriers; reading shared or global
//!   memory that nothing has written (not even the host:
//!   [`Device::alloc`] is uninitialised, [`Device::alloc_zeroed`] is not)
//!   is an error; `atom.add.f32` flushes subnormals like the hardware.
//! - **Global races**: two threads writing different values to one global
//!   byte without atomics in a launch is an error. Beyond that, a
//!   happens-before model at block granularity checks every global read
//!   and write against the last conflicting access of another thread in the
//!   same launch: within a block they must be separated by a barrier;
//!   across blocks they must be ordered by fence synchronisation as in the
//!   PTX memory model (PTX ISA 8.8, 8.9): the earlier access, then a
//!   gpu-scope fence (`membar.gl`/`.sys`, `fence.{sc,acq_rel}.{gpu,sys}`),
//!   then a global atomic (a `.release` one needs no fence); in the later
//!   block a global `atom` on the same address that reads it, then a
//!   gpu-scope fence (an `.acquire` atomic needs none), then the access.
//!   Barriers may come in between on either side: a fence before a barrier
//!   covers what its thread did and the atomic may be another thread's
//!   after the barrier, and a fence after a barrier acquires what another
//!   thread's atomic before it read, as `fence.sc` (what `membar` is on
//!   sm_70+) guarantees. A relaxed atomic without its fences orders
//!   nothing, so a missing `membar.gl` in the "last block" reduction is a
//!   race. `.cta` fences and atomics do not reach other blocks; `red` never
//!   acquires (8.11.1). `fence.acq_rel` is treated like `fence.sc`, which
//!   is more than the ISA promises when its fence and atomic are in
//!   different threads joined by a barrier (not reported). Only global
//!   atomics synchronise: `ld`/`st` take no `.volatile`, `.relaxed`,
//!   `.acquire`/`.release` or cache qualifier (load errors). The check sees the conflicts of the schedule that ran; use
//!   [`Schedule::Random`] to look for others.
//! - **Undefined values**: registers start undefined, as on the hardware.
//!   A result computed from an undefined register is undefined; moving such
//!   values around is allowed, but using one as an address, a stored value,
//!   a branch/guard condition or an operand of an atomic, barrier or warp
//!   collective is an error (the idea of Valgrind's memcheck).
//! - **Deadlock**: when no thread can make progress the error lists where
//!   every thread waits.
//! - **Schedules**: block order and thread interleaving are configurable
//!   ([`Schedule`]) so tests can show results do not depend on them.
//! - **Cost counters** ([`LaunchReport`]): instructions executed, global
//!   bytes per thread and distinct, atomics, and global round trips on the
//!   critical path in a model of in-order issue (a thread stalls only for
//!   a value it needs that has not arrived; a barrier resumes its threads
//!   at the latest of them; an atomic's value comes after every earlier
//!   atomic on its address). Counts, not timings: the same on every run,
//!   so tests can compare kernels and layouts by them.

mod exec;
pub mod fp;
mod load;

pub use exec::{Arg, Device, LaunchConfig, LaunchReport, Schedule};
pub use load::{LoadOptions, Module};

use std::fmt;

/// What went wrong, so tests can assert on the class of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The PTX text uses something outside the supported subset, or is malformed.
    Load,
    /// Launch arguments or geometry do not match the kernel.
    Launch,
    /// A memory access outside every buffer / the shared or param window.
    OutOfBounds,
    /// A memory access not aligned to its size.
    Misaligned,
    /// Conflicting accesses by different threads without synchronisation.
    Race,
    /// `bar.sync` reached at different instructions or with exited threads.
    Barrier,
    /// Warp collective misuse: lane not in mask, mask mismatch, bad source lane.
    Warp,
    /// No thread can make progress.
    Deadlock,
    /// Integer division by zero and similar undefined operations.
    Undefined,
    /// The instruction budget of the launch ran out (likely an endless loop).
    StepLimit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn err<T>(kind: ErrorKind, message: impl Into<String>) -> Result<T> {
    Err(Error {
        kind,
        message: message.into(),
    })
}

/// PTX fundamental types (plus `.pred`); of the 8-bit ones only `.b8`
/// (byte arrays: parameters, dynamic shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Ty {
    Pred,
    B8,
    B16,
    B32,
    B64,
    U16,
    U32,
    U64,
    S16,
    S32,
    S64,
    F16,
    Bf16,
    F32,
    F64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TyKind {
    Pred,
    Bit,
    Uint,
    Sint,
    Float,
}

impl Ty {
    pub(crate) fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "pred" => Ty::Pred,
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "bf16" => Ty::Bf16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            _ => return None,
        })
    }

    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B8 => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
        }
    }

    pub(crate) fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }

    pub(crate) fn kind(self) -> TyKind {
        match self {
            Ty::Pred => TyKind::Pred,
            Ty::B8 | Ty::B16 | Ty::B32 | Ty::B64 => TyKind::Bit,
            Ty::U16 | Ty::U32 | Ty::U64 => TyKind::Uint,
            Ty::S16 | Ty::S32 | Ty::S64 => TyKind::Sint,
            Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64 => TyKind::Float,
        }
    }

    /// Mask of the low `bits()` bits.
    pub(crate) fn mask(self) -> u64 {
        match self.bits() {
            64 => u64::MAX,
            b => (1u64 << b) - 1,
        }
    }
}
