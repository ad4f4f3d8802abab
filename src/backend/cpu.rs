//! The CPU backend: host pointers, the reference and the embedded default.
//!
//! Work is cut into fixed chunks of [`CHUNK`] elements per tensor; each chunk
//! yields one f64 partial of Σ g·d: element j of the chunk (counted from the
//! chunk's start) is added to lane j % [`LANES`], each lane in element
//! order, and the lanes are folded in a fixed pairwise tree
//! ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). Chunk partials are then added in
//! chunk order (tensor by tensor). None of this depends on the number of
//! threads, so φ has the same bits whatever `threads` is.
//!
//! Speed (measured with `benches/kernel_cost.rs`): each chunk is walked in
//! sub-blocks of `SUB` elements as two loops the compiler vectorises (the
//! element math of `optim`, then the lane sums); on x86-64 both are also
//! compiled with AVX2 (f16 and bf16 widened into f32 buffers by
//! hand-vectorised conversions) and picked at run time. The
//! order of every f32 and f64 operation is the same in both builds, so are
//! the bits, NaN payloads aside (`tests::the_avx2_build_has_the_baseline_bits`),
//! in the default floating-point environment (README, "Behaviour choices":
//! under a directed rounding mode the builds may differ by an ulp).

use super::loaded_driver::first_device_pointer;
use super::{le_value, Backend, StateImport, StateMeta, StepRequest, TensorDesc, ValidatedTensors};
use crate::controller::{SkipReason, StepOutcome};
use crate::dispatch_kind;
use crate::error::Result;
use crate::fail;
use crate::optim::{self, BiasPowers, DType, Elem, Hyper, OptimizerKind, StepScalars};
use half::{bf16, f16};
use std::sync::Mutex;

/// Elements per work item.
pub const CHUNK: usize = 1 << 14;
/// Interleaved f64 accumulators per chunk.
pub const LANES: usize = 8;
/// Elements of a step per thread it may start: a step of n elements runs
/// on n / `ELEMENTS_PER_THREAD` threads (at least 1, at most `num_threads`
/// and the number of work items; threads then share the items evenly by
/// count, so a thread gets about that many elements when the step's
/// tensors are large). Starting threads costs 25–85 µs for 2 and 1–3 ms
/// for 64 on the README's 2-core VM (spawns happen one after another), and
/// 256 Ki elements are 80–300 µs of work: with less per thread, two
/// threads were slower than one in the typical (median) step there
/// (`kernel_cost --stat median`), and on a many-core machine a thread per
/// core for a small step would cost more in starting threads than the
/// step itself.
const ELEMENTS_PER_THREAD: usize = 1 << 18;

/// Threads for a step of `total` elements in `items` work items, with
/// `configured` threads allowed ([`ELEMENTS_PER_THREAD`]).
fn threads_for(total: usize, configured: usize, items: usize) -> usize {
    (total / ELEMENTS_PER_THREAD).clamp(1, configured.min(items).max(1))
}

/// What a slot of `run` holds, taken out once (by the worker, or by the
/// calling thread when the worker was refused).
fn take_share<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Starts a worker of `run`, or says that the OS refused it.
fn spawn_share<'scope, F>(s: &'scope std::thread::Scope<'scope, '_>, work: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'scope,
{
    #[cfg(test)]
    if tests::REFUSED_SPAWNS.with(|r| r.replace(r.get().saturating_sub(1))) > 0 {
        return Err(std::io::Error::other("refused by the test"));
    }
    std::thread::Builder::new().spawn_scoped(s, work).map(drop)
}

pub struct CpuBackend {
    kind: OptimizerKind,
    threads: usize,
    bias: BiasPowers,
    applied: u64,
    /// Per tensor, its optimizer state; sized at the first step.
    state: Vec<TensorState>,
    last: StepOutcome,
    validated: ValidatedTensors,
    /// The address of the last found_inf flag checked for device memory
    /// (by address alone, as the CUDA backend's check: a live host f32
    /// does not turn into device memory).
    validated_flag: usize,
}

/// One tensor's optimizer state: `slots` arrays of `numel` f32 values,
/// interleaved by sub-block: the [`SUB`] values of slot 0 for elements
/// `[k·SUB, (k+1)·SUB)`, then slot 1's for the same elements, then the next
/// sub-block's (the last sub-block padded to `SUB`). The buffer starts on a
/// cache line.
///
/// A step then reads its state as one stream. Laid out slot after slot,
/// Adam's two slots over a tensor of 2^k elements started exactly 2^(k+2)
/// bytes apart, and the step streamed two arrays that map onto the same
/// cache sets and memory banks: on a 2-core AMD EPYC VM Adam over one
/// 64 Mi-element tensor ran about 3× slower than over the same elements
/// in 200 tensors. Spacing the slots an odd number of 4 KiB pages apart
/// cured 64 Mi but not 32 Mi (memory banks hash address bits together, so
/// no fixed distance is safe everywhere); interleaved, no distance between
/// the slots remains (README, "Where the buffers lie").
struct TensorState {
    buf: Vec<f32>,
    /// Index of the first value in `buf` (cache-line alignment).
    first: usize,
    numel: usize,
    slots: usize,
}

impl TensorState {
    /// Zeroed state, or `None` when the memory cannot be had.
    fn zeroed(slots: usize, numel: usize) -> Option<TensorState> {
        const LINE: usize = 64 / std::mem::size_of::<f32>();
        let len = match slots {
            0 => 0,
            _ => numel
                .checked_next_multiple_of(SUB)?
                .checked_mul(slots)?
                .checked_add(LINE - 1)?,
        };
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).ok()?;
        buf.resize(len, 0.0);
        // The buffer never grows, so its address (and `first`) stays put.
        // (Address arithmetic: `align_offset` may give up, under Miri.)
        let first = match slots {
            0 => 0,
            _ => (64 - buf.as_ptr() as usize % 64) % 64 / std::mem::size_of::<f32>(),
        };
        Some(TensorState {
            buf,
            first,
            numel,
            slots,
        })
    }

    fn has_shape(&self, slots: usize, numel: usize) -> bool {
        self.slots == slots && self.numel == numel
    }

    /// The state of the elements from `start` (a multiple of [`SUB`]) on,
    /// as [`Item::state`] takes it. Taken without borrowing the buffer as a
    /// slice (`Vec::as_mut_ptr`), so the pointers of a step's items stay
    /// valid side by side.
    fn state_at(&mut self, start: usize) -> *mut f32 {
        let at = self.first + start * self.slots;
        assert!(
            start.is_multiple_of(SUB) && at <= self.buf.len(),
            "state of element {start}"
        );
        // SAFETY: in bounds, just checked.
        unsafe { self.buf.as_mut_ptr().add(at) }
    }

    /// Where each run of at most [`SUB`] values lies, in the order of the
    /// slots end to end (`slots × numel` values, slot-major, as checkpoints
    /// store them): (index in `buf`, slot-major index, length).
    /// (Borrows nothing of `self`, so the runs can be written.)
    fn runs(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (first, slots, numel) = (self.first, self.slots, self.numel);
        (0..slots).flat_map(move |s| {
            (0..numel).step_by(SUB).map(move |i| {
                // Slot `s` of element `i` lives at
                // first + (i / SUB) * slots * SUB + s * SUB + i % SUB.
                let at = first + (i / SUB) * slots * SUB + s * SUB;
                (at, s * numel + i, SUB.min(numel - i))
            })
        })
    }

    /// Hands the slots end to end to `sink`, a run at a time.
    fn export(&self, sink: &mut dyn FnMut(&[f32])) {
        for (at, _, len) in self.runs() {
            sink(&self.buf[at..at + len]);
        }
    }

    /// The slots end to end, in one vector (tests).
    #[cfg(test)]
    fn slot_major(&self) -> Vec<f32> {
        let mut v = Vec::new();
        self.export(&mut |run| v.extend_from_slice(run));
        v
    }

    /// State holding `value(k)` as slot-major value `k`, or `None` when the
    /// memory cannot be had.
    fn from_slot_major(
        slots: usize,
        numel: usize,
        value: impl Fn(usize) -> f32,
    ) -> Option<TensorState> {
        let mut st = TensorState::zeroed(slots, numel)?;
        for (at, k, len) in st.runs() {
            for j in 0..len {
                st.buf[at + j] = value(k + j);
            }
        }
        Some(st)
    }
}

/// A raw pointer that may cross to a worker thread. The items of one step
/// that different threads run write disjoint memory: chunks of one tensor
/// are disjoint, state slices are per chunk, and no parameter overlaps
/// another parameter or any gradient (`check_alignment_and_aliasing`, which
/// the engine runs before every step). Gradients may overlap each other:
/// they are only read.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One work item: a chunk of one tensor. Invariant (what every pass relies
/// on): `param` and `grad` are valid for `len` elements of `dtype` (`param`
/// for writes, with no other live reference to it), and `state` for the
/// `slots × len` f32 values (interleaved by sub-block, [`TensorState`]; the
/// last sub-block padded to [`SUB`]) of the slots in use, for writes.
/// `items` makes them so from the step's `TensorDesc`s, whose validity is
/// the C caller's promise (`lra_step`; extent checked at the boundary,
/// alignment and overlap by the engine).
#[derive(Clone, Copy)]
struct Item {
    param: SendPtr,
    grad: SendPtr,
    state: SendPtr,
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
            validated: ValidatedTensors::default(),
            validated_flag: 0,
        }
    }

    fn ensure_state(&mut self, tensors: &[TensorDesc]) -> Result<()> {
        let slots = self.kind.state_slots();
        // Sizes compared too, not just the count: a first step that failed
        // after sizing the state (a failed reduction) fixes no layout, and
        // the next first step may bring other sizes.
        let sized = self.state.len() == tensors.len()
            && self
                .state
                .iter()
                .zip(tensors)
                .all(|(s, t)| s.has_shape(slots, t.numel));
        if !sized {
            // An allocation failure is an error, not an abort of the
            // caller's process (sizes come from the caller).
            let mut state = Vec::with_capacity(tensors.len());
            for (i, t) in tensors.iter().enumerate() {
                let Some(st) = TensorState::zeroed(slots, t.numel) else {
                    fail!(
                        OutOfMemory,
                        "tensors[{i}]: cannot allocate the optimizer state ({slots} x {} f32 values): out of memory",
                        t.numel
                    );
                };
                state.push(st);
            }
            self.state = state;
        }
        Ok(())
    }

    /// Cuts the step into chunk items (state pointers included).
    fn items(&mut self, tensors: &[TensorDesc]) -> Vec<Item> {
        // One allocation per step whatever the tensor count (tests/alloc.rs).
        let mut items = Vec::with_capacity(tensors.iter().map(|t| t.numel.div_ceil(CHUNK)).sum());
        for (t, st) in tensors.iter().zip(self.state.iter_mut()) {
            let esz = t.dtype.size();
            let mut start = 0;
            while start < t.numel {
                let len = CHUNK.min(t.numel - start);
                let state = SendPtr(st.state_at(start) as *mut u8);
                // SAFETY: offsets stay inside the caller's tensors (numel
                // checked).
                unsafe {
                    items.push(Item {
                        param: SendPtr((t.param as *mut u8).add(start * esz)),
                        grad: SendPtr((t.grad as *mut u8).add(start * esz)),
                        state,
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
        let threads = threads_for(total, self.threads, items.len());
        let run_share = |outs: &mut [R], its: &[Item]| {
            for (o, it) in outs.iter_mut().zip(its) {
                *o = f(it);
            }
        };
        if threads == 1 {
            run_share(&mut out, items);
            return out;
        }
        let per = items.len().div_ceil(threads);
        // One slot per worker's share: a thread the OS refuses (a process
        // or memory limit) has its share run here instead (`Scope::spawn`
        // would panic with part of the step applied). On a refusal the
        // closure is dropped unrun, so the share is still in its slot.
        let slots: Vec<_> = out
            .chunks_mut(per)
            .zip(items.chunks(per))
            .map(|share| Mutex::new(Some(share)))
            .collect();
        std::thread::scope(|s| {
            for slot in &slots {
                let spawned = spawn_share(s, move || {
                    if let Some((outs, its)) = take_share(slot) {
                        run_share(outs, its);
                    }
                });
                if spawned.is_err() {
                    if let Some((outs, its)) = take_share(slot) {
                        run_share(outs, its);
                    }
                }
            }
        });
        drop(slots);
        out
    }
}

/// Σ of the lanes in a fixed pairwise tree: adjacent pairs first, then
/// pairs of pairs, … (for 8 lanes: ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7))).
#[inline(always)]
fn fold_lanes(a: &[f64; LANES]) -> f64 {
    const { assert!(LANES.is_power_of_two()) };
    let mut v = *a;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] = v[2 * i] + v[2 * i + 1];
        }
    }
    v[0]
}

/// What a chunk pass does (the `MODE` of [`chunk_pass`]).
/// Read only, on copies of the state: Σ g·d and the non-finite check (the
/// first pass of the two-pass mode).
const PASS_DOT: u8 = 0;
/// Advance the state, write θ − lr·d, and return Σ g·d (the fused pass and
/// the update pass of the two-pass mode).
const PASS_FUSED: u8 = 1;
/// Advance the state and write θ − lr·d, no dot product: the wrapped
/// optimizer alone ([`CpuBackend::step_plain`], the benchmark's baseline).
const PASS_PLAIN: u8 = 2;

/// Elements per sub-block of a chunk: the dot terms of one sub-block wait
/// in a small on-stack buffer (in L1) to be summed. Small, so that the
/// sum's dependency chain overlaps the next sub-block's memory traffic.
const SUB: usize = 64;

/// How far ahead of the sub-block being processed, in elements, the pass
/// asks for cache lines. A single core's hardware prefetchers do not keep
/// enough misses in flight for a loop that does this much work per byte;
/// without this the pass is latency-bound, and the dot product's extra
/// instructions show up in the step time (measured with
/// `benches/kernel_cost.rs` at 64 Mi elements: 256 to 1024 alike, no
/// prefetch 5–20% slower).
const PREFETCH_AHEAD: usize = 512;

/// How many parts of a work item the guard's check reads side by side.
/// The check is one read stream, which on one core is latency-bound even
/// prefetched: over 64 Mi f32 gradients, 0.33 ns per element as one
/// stream, 0.26–0.28 as 4 (2: 0.28–0.29, 8: 0.28–0.30; a C loop of the
/// same shape, chunks of 16 Ki elements, on the 2-core VM of the README).
const CHECK_STREAMS: usize = 4;

/// Asks for the cache lines of `bytes` bytes from `start`. The address
/// may lie past the caller's data, even past the tensor: a prefetch never
/// faults, and past a chunk's end it is usually the next chunk's data.
#[inline(always)]
fn prefetch_lines(start: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        for off in (0..bytes).step_by(LINE) {
            // SAFETY: a prefetch is a hint; it reads nothing the program
            // sees and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

/// Prefetches one sub-block starting at element `at` of the item
/// (parameters, gradients and the state).
#[inline(always)]
fn prefetch_ahead<P: Elem>(it: &Item, slots: usize, at: usize) {
    let esz = std::mem::size_of::<P>();
    let f32s = std::mem::size_of::<f32>();
    let streams = [
        (it.param.0, esz),
        (it.grad.0, esz),
        (it.state.0, slots * f32s),
    ];
    for &(ptr, size) in &streams[..if slots > 0 { 3 } else { 2 }] {
        prefetch_lines(ptr.wrapping_add(at * size), SUB * size);
    }
}

/// One chunk's pass (see the `PASS_*` modes). Returns Σ g·d over the chunk
/// (0 in `PASS_PLAIN`) and whether any gradient was non-finite (`PASS_DOT`
/// only).
///
/// Each sub-block of [`SUB`] elements runs as two loops the compiler
/// vectorises: an elementwise loop (state and θ written, dot terms into a
/// buffer), then the dot terms summed into the [`LANES`] accumulators,
/// element `j` of the chunk into lane `j % LANES`, in element order. `SUB`
/// is a multiple of `LANES`, so lanes and order of additions are those of
/// one plain pass over the chunk.
///
/// # Safety
///
/// The CPU has the features `L` needs ([`ElementLoop`]). (The item's
/// pointers are valid by [`Item`]'s invariant.)
#[inline(always)]
unsafe fn chunk_pass<const K: u32, P: Elem, const MODE: u8, L: ElementLoop<P>>(
    sc: &StepScalars,
    lr: f32,
    it: &Item,
) -> (f64, bool) {
    const { assert!(SUB.is_multiple_of(LANES)) };
    let n = it.len;
    let slots = OptimizerKind::from_u32(K).map_or(0, |k| k.state_slots());
    // SAFETY: the item's pointers cover `n` elements of the right type and
    // their state ([`Item`]'s invariant).
    let (theta, g, state) = unsafe {
        (
            std::slice::from_raw_parts_mut(it.param.0 as *mut P, n),
            std::slice::from_raw_parts(it.grad.0 as *const P, n),
            std::slice::from_raw_parts_mut(it.state.0 as *mut f32, slots * n.next_multiple_of(SUB)),
        )
    };
    // The loop is specialised for the common weight_decay = +0.0: a copy
    // of the scalars holding a literal 0 lets the compiler drop the
    // per-element test inside `direction`; the arithmetic is the same.
    // Only for +0.0 itself: AdamW adds wd·θ whatever wd is, and -0.0·θ
    // can give a zero of the other sign (as the kernel does).
    let no_decay = StepScalars {
        weight_decay: 0.0,
        ..*sc
    };
    let mut acc = [0.0f64; LANES];
    let mut bad = false;
    let mut terms = [0.0f32; SUB];
    let mut base = 0;
    while base < n {
        let m = SUB.min(n - base);
        let end = base + m;
        let t = &mut terms[..m];
        // This sub-block's state: slot 0's SUB values, then slot 1's.
        let (s0, s1) = state[slots * base..slots * (base + SUB)].split_at_mut(SUB.min(slots * SUB));
        let s0 = &mut s0[..if slots >= 1 { m } else { 0 }];
        let s1 = &mut s1[..if slots >= 2 { m } else { 0 }];
        let block = SubBlock {
            theta: &mut theta[base..end],
            g: &g[base..end],
            s0,
            s1,
            terms: &mut *t,
        };
        prefetch_ahead::<P>(it, slots, base + PREFETCH_AHEAD);
        // SAFETY: this function's contract.
        bad |= unsafe {
            if sc.weight_decay.to_bits() == 0 {
                L::run::<K, MODE>(&no_decay, lr, block)
            } else {
                L::run::<K, MODE>(sc, lr, block)
            }
        };
        if MODE != PASS_PLAIN {
            accumulate(&mut acc, t);
        }
        base = end;
    }
    (fold_lanes(&acc), bad)
}

/// The element loop of a sub-block as [`chunk_pass`] runs it: [`Plain`]
/// (the compiler's vectorisation of [`elementwise`]) for every dtype, or
/// [`Staged`] for f16 and bf16 where the CPU has AVX2 and F16C.
///
/// # Safety
///
/// `run` may use CPU features beyond the baseline ([`Staged`]: AVX2 and
/// F16C); the caller must have checked that the CPU has them.
trait ElementLoop<P: Elem> {
    unsafe fn run<const K: u32, const MODE: u8>(sc: &StepScalars, lr: f32, b: SubBlock<P>) -> bool;
}

/// One sub-block's slices, as [`elementwise`] takes them.
struct SubBlock<'a, P> {
    theta: &'a mut [P],
    g: &'a [P],
    s0: &'a mut [f32],
    s1: &'a mut [f32],
    terms: &'a mut [f32],
}

/// [`elementwise`] itself.
struct Plain;

impl<P: Elem> ElementLoop<P> for Plain {
    #[inline(always)]
    unsafe fn run<const K: u32, const MODE: u8>(sc: &StepScalars, lr: f32, b: SubBlock<P>) -> bool {
        elementwise::<K, P, MODE>(sc, lr, b.theta, b.g, b.s0, b.s1, b.terms)
    }
}

/// [`elementwise_staged`] with the conversions of `C`: needs AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
struct Staged<C>(std::marker::PhantomData<C>);

#[cfg(target_arch = "x86_64")]
impl<C: Conversions> ElementLoop<C::Half> for Staged<C> {
    #[inline(always)]
    unsafe fn run<const K: u32, const MODE: u8>(
        sc: &StepScalars,
        lr: f32,
        b: SubBlock<C::Half>,
    ) -> bool {
        // SAFETY: the caller checked AVX2 and F16C (the trait's contract).
        unsafe { elementwise_staged::<K, MODE, C>(sc, lr, b) }
    }
}

/// A half type's conversions for [`Staged`], vectorised by hand: the same
/// bits as its `Elem` conversions.
///
/// # Safety
///
/// Both functions may use AVX2 and F16C; the caller must have checked that
/// the CPU has them.
#[cfg(target_arch = "x86_64")]
trait Conversions {
    type Half: Elem;
    /// `dst[i] = src[i].to_f32()` for every `i` (equal lengths).
    unsafe fn widen(src: &[Self::Half], dst: &mut [f32]);
    /// `dst[i] = Half::from_f32(src[i])` for every `i` (equal lengths).
    unsafe fn narrow(src: &[f32], dst: &mut [Self::Half]);
}

/// f16 by F16C: `vcvtph2ps`, and `vcvtps2ph` rounding to nearest even.
#[cfg(target_arch = "x86_64")]
struct F16c;

#[cfg(target_arch = "x86_64")]
impl Conversions for F16c {
    type Half = f16;
    /// `vcvtph2ps`, 8 at a time.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        // SAFETY (both closures): 16- and 32-byte unaligned accesses to arrays
        // of exactly that size.
        let eight = |s: &[f16; 8], d: &mut [f32; 8]| unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h))
        };
        convert_blocks(src, dst, eight, Elem::to_f32);
    }
    /// `vcvtps2ph` to nearest even, 8 at a time.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn narrow(src: &[f32], dst: &mut [f16]) {
        use std::arch::x86_64::*;
        let eight = |s: &[f32; 8], d: &mut [f16; 8]| unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
            _mm_storeu_si128(d.as_mut_ptr() as *mut __m128i, h)
        };
        convert_blocks(src, dst, eight, Elem::from_f32);
    }
}

/// bf16 by AVX2 integer operations, for values that are not NaN: a shift
/// to widen, round to nearest even by an add and a shift to narrow. A
/// slice holding a NaN is converted again by `Elem` (which quietens NaNs),
/// so the NaN test is one compare per 8 values instead of a select.
#[cfg(target_arch = "x86_64")]
struct Bf16Avx2;

#[cfg(target_arch = "x86_64")]
impl Conversions for Bf16Avx2 {
    type Half = bf16;
    /// A shift, 8 at a time; `Elem` again if `src` holds a NaN.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn widen(src: &[bf16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        // NaNs found by an integer compare of the halves' magnitude bits,
        // not a float compare, which would raise the invalid flag for a
        // signalling NaN (`Elem` raises none).
        let mut nan = _mm_setzero_si128();
        let (magnitude, inf) = (_mm_set1_epi16(0x7fff), _mm_set1_epi16(0x7f80));
        // (`half::bf16`: the glob brings in `std::arch`'s own `bf16`.)
        // SAFETY: 16- and 32-byte unaligned accesses to arrays of exactly that
        // size.
        let eight = |s: &[half::bf16; 8], d: &mut [f32; 8]| unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            nan = _mm_or_si128(nan, _mm_cmpgt_epi16(_mm_and_si128(h, magnitude), inf));
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_castsi256_ps(w))
        };
        convert_blocks(src, dst, eight, Elem::to_f32);
        if _mm_testz_si128(nan, nan) == 0 {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
    /// An add and a shift, 16 at a time; `Elem` again if `src` holds a
    /// NaN.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn narrow(src: &[f32], dst: &mut [bf16]) {
        use std::arch::x86_64::*;
        let mut nan = _mm256_setzero_ps();
        // (A float compare finds the NaNs: the step's results are quiet
        // NaNs, for which it raises no flag.)
        // `Elem for bf16`'s rounding, x + 0x7fff + (bit 16 of x), high half.
        let high = |x: __m256| {
            let x = _mm256_castps_si256(x);
            let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
            let sum = _mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
            _mm256_srli_epi32::<16>(sum)
        };
        // 16 at a time: one pack of two vectors (every value fits 16 bits, so
        // the saturating pack is a plain one), its 64-bit quarters reordered.
        // SAFETY: 32-byte unaligned accesses to arrays of at least that size.
        let sixteen = |s: &[f32; 16], d: &mut [half::bf16; 16]| unsafe {
            let (x0, x1) = (
                _mm256_loadu_ps(s.as_ptr()),
                _mm256_loadu_ps(s.as_ptr().add(8)),
            );
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x0, x1));
            let packed = _mm256_packus_epi32(high(x0), high(x1));
            let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, ordered)
        };
        convert_blocks(src, dst, sixteen, Elem::from_f32);
        if _mm256_movemask_ps(nan) != 0 {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = Elem::from_f32(*s);
            }
        }
    }
}

/// The elementwise loop of one sub-block: every slice has `theta.len()`
/// elements (state slices of unused slots are empty). Writes each dot term
/// into `terms` (not in `PASS_PLAIN`); returns whether a gradient was
/// non-finite (`PASS_DOT` only).
#[inline(always)]
fn elementwise<const K: u32, P: Elem, const MODE: u8>(
    sc: &StepScalars,
    lr: f32,
    theta: &mut [P],
    g: &[P],
    s0: &mut [f32],
    s1: &mut [f32],
    terms: &mut [f32],
) -> bool {
    let slots = OptimizerKind::from_u32(K).map_or(0, |k| k.state_slots());
    let m = theta.len();
    // Lengths stated once, so the loop below carries no bounds checks.
    let (g, terms) = (&g[..m], &mut terms[..m]);
    let s0 = if slots >= 1 { &mut s0[..m] } else { s0 };
    let s1 = if slots >= 2 { &mut s1[..m] } else { s1 };
    let mut bad = false;
    for i in 0..m {
        let th = theta[i].to_f32();
        let gi = g[i].to_f32();
        let mut a = if slots >= 1 { s0[i] } else { 0.0 };
        let mut b = if slots >= 2 { s1[i] } else { 0.0 };
        let d = optim::direction::<K>(sc, th, gi, &mut a, &mut b);
        if MODE != PASS_PLAIN {
            // The dot term is an f32 product widened to f64: narrowing it
            // back is exact and keeps this loop in f32 (8 lanes per AVX2
            // instruction instead of 4); `accumulate` widens it again.
            terms[i] = optim::dot_term(gi, d) as f32;
        }
        if MODE == PASS_DOT {
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
    }
    bad
}

/// [`elementwise`] for a half type on x86-64 with AVX2: the sub-block's
/// θ and g are widened into f32 buffers by `C`, the f32 loop runs on them,
/// and θ is narrowed back by `C`. `C`'s conversions have the bits of
/// `Elem`'s (`tests::staged_conversions_match_elem`), which as the
/// compiler's vectorised selects take several times the instructions (f16
/// Adam steps 2.9 → 0.9 ns per parameter, `benches/kernel_cost.rs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn elementwise_staged<const K: u32, const MODE: u8, C: Conversions>(
    sc: &StepScalars,
    lr: f32,
    b: SubBlock<C::Half>,
) -> bool {
    let m = b.theta.len();
    let (mut th32, mut g32) = (LineAligned([0f32; SUB]), LineAligned([0f32; SUB]));
    let (th32, g32) = (&mut th32.0[..m], &mut g32.0[..m]);
    // SAFETY (all three): the caller checked AVX2 and F16C.
    unsafe {
        C::widen(b.theta, th32);
        C::widen(&b.g[..m], g32);
    }
    let bad = elementwise::<K, f32, MODE>(sc, lr, th32, g32, b.s0, b.s1, b.terms);
    if MODE != PASS_DOT {
        unsafe { C::narrow(th32, b.theta) };
    }
    bad
}

/// A cache-line-aligned value. The F16C loop's stack buffers need it: the
/// main thread's stack moves with the size of the environment, and
/// buffers whose 32-byte vectors straddle cache lines made f16 steps on
/// one thread up to 2.4 times slower in some environments
/// (`kernel_cost` with environment padding of 0 to 56 bytes).
#[cfg(target_arch = "x86_64")]
#[repr(align(64))]
struct LineAligned<T>(T);

/// `dst[i] = one(src[i])` for every `i`: `N` elements at a time by
/// `block`, the tail by `one`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn convert_blocks<const N: usize, S: Copy, D>(
    src: &[S],
    dst: &mut [D],
    mut block: impl FnMut(&[S; N], &mut [D; N]),
    one: impl Fn(S) -> D,
) {
    assert_eq!(src.len(), dst.len());
    let mut dst_blocks = dst.chunks_exact_mut(N);
    let mut src_blocks = src.chunks_exact(N);
    for (s, d) in (&mut src_blocks).zip(&mut dst_blocks) {
        block(s.try_into().expect("N"), d.try_into().expect("N"));
    }
    let tail = dst_blocks.into_remainder();
    for (d, s) in tail.iter_mut().zip(src_blocks.remainder()) {
        *d = one(*s);
    }
}

/// Adds one sub-block's dot terms to the lanes: term `j` into lane
/// `j % LANES`, widened to f64, in order.
#[inline(always)]
fn accumulate(acc: &mut [f64; LANES], terms: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { accumulate_avx2(acc, terms) };
    }
    accumulate_any(acc, terms)
}

/// [`accumulate`] for any CPU.
#[inline(always)]
fn accumulate_any(acc: &mut [f64; LANES], terms: &[f32]) {
    let mut blocks = terms.chunks_exact(LANES);
    for blk in &mut blocks {
        for l in 0..LANES {
            acc[l] += blk[l] as f64;
        }
    }
    for (l, t) in blocks.remainder().iter().enumerate() {
        acc[l] += *t as f64;
    }
}

/// [`accumulate`] with AVX2 intrinsics (the compiler does not find this
/// shape itself): lanes in groups of 4 per register, the same additions in
/// the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(acc: &mut [f64; LANES], terms: &[f32]) {
    use std::arch::x86_64::*;
    const { assert!(LANES.is_multiple_of(8)) };
    let mut a = [_mm256_setzero_pd(); LANES / 4];
    for (k, r) in a.iter_mut().enumerate() {
        *r = _mm256_loadu_pd(acc.as_ptr().add(4 * k));
    }
    let mut blocks = terms.chunks_exact(LANES);
    for blk in &mut blocks {
        for k in 0..LANES / 8 {
            let t = _mm256_loadu_ps(blk.as_ptr().add(8 * k));
            a[2 * k] = _mm256_add_pd(a[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(t)));
            a[2 * k + 1] =
                _mm256_add_pd(a[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(t)));
        }
    }
    for (k, r) in a.iter().enumerate() {
        _mm256_storeu_pd(acc.as_mut_ptr().add(4 * k), *r);
    }
    for (l, t) in blocks.remainder().iter().enumerate() {
        acc[l] += *t as f64;
    }
}

/// `chunk_pass` for the item's dtype, compiled for the baseline ISA.
#[inline(always)]
fn chunk_any<const K: u32, const MODE: u8>(sc: &StepScalars, lr: f32, it: &Item) -> (f64, bool) {
    // SAFETY: `Plain` needs no feature beyond the baseline.
    unsafe {
        match it.dtype {
            DType::F32 => chunk_pass::<K, f32, MODE, Plain>(sc, lr, it),
            DType::F16 => chunk_pass::<K, f16, MODE, Plain>(sc, lr, it),
            DType::Bf16 => chunk_pass::<K, bf16, MODE, Plain>(sc, lr, it),
        }
    }
}

/// `chunk_any` compiled with AVX2 and F16C enabled (8 f32 lanes per
/// instruction), f16 and bf16 through [`elementwise_staged`].
/// The same IEEE operations in the same order (Rust never contracts into
/// FMA), so the same bits as the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn chunk_avx2<const K: u32, const MODE: u8>(
    sc: &StepScalars,
    lr: f32,
    it: &Item,
) -> (f64, bool) {
    // SAFETY: this function's callers checked AVX2 and F16C.
    unsafe {
        match it.dtype {
            DType::F32 => chunk_pass::<K, f32, MODE, Plain>(sc, lr, it),
            DType::F16 => chunk_pass::<K, f16, MODE, Staged<F16c>>(sc, lr, it),
            DType::Bf16 => chunk_pass::<K, bf16, MODE, Staged<Bf16Avx2>>(sc, lr, it),
        }
    }
}

/// Whether this CPU runs the AVX2 builds: AVX2 and F16C (checked once).
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Every AVX2 CPU has F16C; asked anyway, as the f16 loop uses it.
        static AVX2: once_cell::sync::Lazy<bool> = once_cell::sync::Lazy::new(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
        });
        *AVX2
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn chunk_dispatch<const K: u32, const MODE: u8>(
    sc: &StepScalars,
    lr: f32,
    it: &Item,
) -> (f64, bool) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 and F16C (checked at run time).
        return unsafe { chunk_avx2::<K, MODE>(sc, lr, it) };
    }
    chunk_any::<K, MODE>(sc, lr, it)
}

#[inline(always)]
fn grads_finite<P: Elem>(it: &Item) -> bool {
    // SAFETY: `grad` is valid for `len` reads ([`Item`]'s invariant).
    let g = unsafe { std::slice::from_raw_parts(it.grad.0 as *const P, it.len) };
    // The largest magnitude's bits, branch-free (a u32 max vectorises; an
    // early exit would not). The item is read as `CHECK_STREAMS` parts
    // side by side, each prefetched ahead like the step's passes: one core
    // keeps more cache misses in flight over several streams than over one
    // (see `CHECK_STREAMS`).
    let part_len = g.len().div_ceil(CHECK_STREAMS).next_multiple_of(SUB);
    let parts: [&[P]; CHECK_STREAMS] =
        std::array::from_fn(|k| &g[(k * part_len).min(g.len())..((k + 1) * part_len).min(g.len())]);
    let mut max_bits = 0u32;
    for at in (0..part_len).step_by(SUB) {
        for part in parts {
            let block = &part[at.min(part.len())..(at + SUB).min(part.len())];
            prefetch_lines(
                part.as_ptr().wrapping_add(at + PREFETCH_AHEAD) as *const u8,
                SUB * std::mem::size_of::<P>(),
            );
            for &x in block {
                max_bits = max_bits.max(x.magnitude_bits());
            }
        }
    }
    max_bits < P::INF_BITS
}

#[inline(always)]
fn finite_any(it: &Item) -> bool {
    match it.dtype {
        DType::F32 => grads_finite::<f32>(it),
        DType::F16 => grads_finite::<f16>(it),
        DType::Bf16 => grads_finite::<bf16>(it),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finite_avx2(it: &Item) -> bool {
    finite_any(it)
}

fn chunk_finite(it: &Item) -> bool {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { finite_avx2(it) };
    }
    finite_any(it)
}

/// The outcome of a step that wrote nothing.
fn skipped(why: SkipReason) -> StepOutcome {
    StepOutcome {
        skip: why,
        phi: f64::NAN,
        scale: 1.0,
    }
}

/// The skip decided by the pre-write values `[non-finite gradient count,
/// found-inf flag, η·Σg·d]` (summed across ranks when sharded): the
/// found-inf flag first, then non-finite gradients when the guard is on.
fn prewrite_skip(v: &[f64; 3], check_finite: bool) -> Option<SkipReason> {
    if v[1] != 0.0 {
        Some(SkipReason::FoundInf)
    } else if check_finite && v[0] != 0.0 {
        Some(SkipReason::NonfiniteGrad)
    } else {
        None
    }
}

/// The refusal of device memory handed to a host handle, which reads and
/// writes its pointers itself: there it would crash the caller's process
/// ([`super::loaded_driver`]).
fn device_memory(what: &str, p: *const std::ffi::c_void) -> crate::error::Error {
    crate::error::Error::new(
        crate::Status::InvalidArgument,
        format!("{what} = {p:p} is CUDA device memory, which a host (device = 0) handle cannot access: create the handle with device = 1 for device tensors"),
    )
}

/// Σ of the chunk partials in chunk order.
fn ordered_sum(parts: &[(f64, bool)]) -> (f64, bool) {
    parts
        .iter()
        .fold((0.0, false), |(s, b), &(p, pb)| (s + p, b | pb))
}

impl CpuBackend {
    /// The threads a step over `tensors` runs on (`ELEMENTS_PER_THREAD`);
    /// the kernel-cost benchmark splits its copy and its CPU time the same
    /// way.
    pub fn threads_for_step(&self, tensors: &[TensorDesc]) -> usize {
        let total = tensors.iter().map(|t| t.numel).sum();
        let items = tensors.iter().map(|t| t.numel.div_ceil(CHUNK)).sum();
        threads_for(total, self.threads, items)
    }

    /// The wrapped optimizer's step alone, adaptation off: the same chunks,
    /// threads and element math as the fused pass, without the dot product
    /// and without the non-finite guard. Advances the state like a step.
    /// This is the "adaptation off" baseline of the kernel-cost benchmark
    /// (`benches/kernel_cost.rs`); the engine never calls it.
    ///
    /// # Safety
    ///
    /// Every tensor's pointers are valid host memory for its `numel`
    /// elements (parameters writable, not overlapping anything), as for
    /// [`Engine::step`](crate::engine::Engine::step).
    pub unsafe fn step_plain(&mut self, tensors: &[TensorDesc], hyper: &Hyper, lr: f64) {
        self.ensure_state(tensors)
            .expect("benchmark tensors fit in memory");
        let items = self.items(tensors);
        let total: usize = tensors.iter().map(|t| t.numel).sum();
        let bias = self.bias.advanced(hyper);
        let sc = StepScalars::new(self.kind, hyper, bias);
        let kind = self.kind;
        let lr = lr as f32;
        self.run(&items, total, &|it| {
            dispatch_kind!(kind, chunk_dispatch::<PASS_PLAIN>(&sc, lr, it))
        });
        self.bias = bias;
        self.applied += 1;
    }
}

impl Backend for CpuBackend {
    fn validate(&self, tensors: &[TensorDesc]) -> Result<()> {
        self.validated.check_once(tensors, || {
            super::check_alignment_and_aliasing(tensors)?;
            let pointers: Vec<(usize, &str, *const std::ffi::c_void)> =
                (tensors.iter().enumerate())
                    .filter(|(_, t)| t.numel > 0)
                    .flat_map(|(i, t)| [(i, "param", t.param.cast_const()), (i, "grad", t.grad)])
                    .collect();
            if let Some(k) = first_device_pointer(pointers.iter().map(|p| p.2)) {
                let (i, what, p) = pointers[k];
                return Err(device_memory(&format!("tensors[{i}].{what}"), p));
            }
            Ok(())
        })
    }

    fn check_step(
        &mut self,
        found_inf: *const std::ffi::c_void,
        _stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        if !found_inf.is_null() && found_inf as usize != self.validated_flag {
            if first_device_pointer([found_inf]).is_some() {
                return Err(device_memory("found_inf", found_inf));
            }
            self.validated_flag = found_inf as usize;
        }
        Ok(())
    }

    fn prepare(&mut self, tensors: &[TensorDesc], _stream: *mut std::ffi::c_void) -> Result<()> {
        self.ensure_state(tensors)
    }

    unsafe fn step(&mut self, req: StepRequest<'_>) -> Result<()> {
        // SAFETY: the engine checked the pointer is aligned; the caller
        // promises it points at one f32 on the host.
        let found_inf =
            !req.found_inf.is_null() && unsafe { *(req.found_inf as *const f32) } != 0.0;
        // Sharded: when there is a pre-write reduction the flag joins it, so
        // every rank calls the collective and skips alike.
        let prewrite_reduce = req.reduce.is_some() && (req.rule.is_some() || req.check_finite);
        if found_inf && !prewrite_reduce {
            self.last = skipped(SkipReason::FoundInf);
            return Ok(());
        }
        self.ensure_state(req.tensors)?;
        let items = self.items(req.tensors);
        let total: usize = req.tensors.iter().map(|t| t.numel).sum();
        let bias = self.bias.advanced(&req.hyper);
        let sc = StepScalars::new(req.kind, &req.hyper, bias);
        let kind = req.kind;

        // (scale, φ already reduced across ranks in two-pass mode)
        let (scale, phi_reduced) = match req.rule {
            None => {
                if req.check_finite {
                    // A rank whose own flag is set reads no gradient for the
                    // step it skips: it joins the sum with the flag alone
                    // (as the CUDA backend does).
                    let nonfinite = if found_inf {
                        0
                    } else {
                        let ok = self.run(&items, total, &|it| chunk_finite(it));
                        ok.iter().filter(|&&f| !f).count()
                    };
                    let mut v = [nonfinite as f64, found_inf as u32 as f64, 0.0];
                    if let Some(reduce) = req.reduce {
                        reduce(&mut v)?;
                    }
                    if let Some(why) = prewrite_skip(&v, true) {
                        self.last = skipped(why);
                        return Ok(());
                    }
                }
                (1.0, None)
            }
            Some(rule) => {
                let (sum, bad) = if found_inf {
                    (0.0, false)
                } else {
                    let parts = self.run(&items, total, &|it| {
                        dispatch_kind!(kind, chunk_dispatch::<PASS_DOT>(&sc, 0.0, it))
                    });
                    ordered_sum(&parts)
                };
                let mut v = [bad as u32 as f64, found_inf as u32 as f64, req.lr * sum];
                if let Some(reduce) = req.reduce {
                    reduce(&mut v)?;
                }
                if let Some(why) = prewrite_skip(&v, req.check_finite) {
                    self.last = skipped(why);
                    return Ok(());
                }
                (rule.scale(v[2]), Some(v[2]))
            }
        };
        let lr = crate::controller::effective_lr(scale, req.lr);
        let parts = self.run(&items, total, &|it| {
            dispatch_kind!(kind, chunk_dispatch::<PASS_FUSED>(&sc, lr, it))
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

    fn state_meta(&mut self) -> Result<StateMeta> {
        Ok(StateMeta {
            bias: self.bias,
            applied: self.applied,
            lens: self.state.iter().map(|t| t.slots * t.numel).collect(),
        })
    }

    fn export_slots(&mut self, tensor: usize, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        if let Some(t) = self.state.get(tensor) {
            t.export(sink);
        }
        Ok(())
    }

    fn import_state(&mut self, state: &StateImport<'_>) -> Result<()> {
        let slots = self.kind.state_slots();
        let mut placed = Vec::new();
        if placed.try_reserve_exact(state.slots.len()).is_err() {
            fail!(
                OutOfMemory,
                "cannot allocate the list of {} tensors' state: out of memory",
                state.slots.len()
            );
        }
        for (i, bytes) in state.slots.iter().enumerate() {
            let values = bytes.len() / 4;
            let numel = values.checked_div(slots).unwrap_or(0);
            let Some(st) = TensorState::from_slot_major(slots, numel, |k| le_value(bytes, k))
            else {
                fail!(
                    OutOfMemory,
                    "tensors[{i}]: cannot allocate the optimizer state ({values} f32 values): out of memory"
                );
            };
            placed.push(st);
        }
        self.bias = state.bias;
        self.applied = state.applied;
        self.state = placed;
        Ok(())
    }

    fn applied_steps(&mut self) -> Result<u64> {
        Ok(self.applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ScaleRule;
    use std::ffi::c_void;

    thread_local! {
        /// How many of this thread's next worker spawns `spawn_share` refuses.
        pub(super) static REFUSED_SPAWNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_worker_the_os_refuses_runs_its_share_on_the_calling_thread() {
        let n = 4 * ELEMENTS_PER_THREAD + 13;
        let grad: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.5).collect();
        let run = |refused: usize| {
            let mut param: Vec<f32> = (0..n).map(|i| (i % 31) as f32 * 0.1).collect();
            let mut b = CpuBackend::new(OptimizerKind::Adam, 4);
            let t = [TensorDesc::host_f32(&mut param, &grad)];
            assert_eq!(b.threads_for_step(&t), 4);
            REFUSED_SPAWNS.with(|r| r.set(refused));
            // SAFETY: `t` describes `param` and `grad`, alive here.
            unsafe { b.step_plain(&t, &Hyper::defaults(OptimizerKind::Adam), 1e-3) };
            assert_eq!(REFUSED_SPAWNS.with(|r| r.get()), 0, "every refusal was met");
            param.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let all_threads = run(0);
        assert_ne!(all_threads[0], (0.0f32).to_bits(), "the step moved θ");
        assert_eq!(run(3), all_threads, "3 of 4 workers refused: the same bits");
        assert_eq!(run(4), all_threads, "every worker refused: the same bits");
    }

    /// Where each share runs: on a worker of its own unless the OS refused
    /// that worker, then on the calling thread (the test above sees the
    /// same bits either way, so it cannot tell whether a refusal happened).
    #[test]
    fn each_share_runs_on_its_worker_unless_refused() {
        let b = CpuBackend::new(OptimizerKind::Sgd, 4);
        let items: Vec<Item> = (0..4)
            .map(|_| Item {
                param: SendPtr(std::ptr::null_mut()),
                grad: SendPtr(std::ptr::null_mut()),
                state: SendPtr(std::ptr::null_mut()),
                len: ELEMENTS_PER_THREAD,
                dtype: DType::F32,
            })
            .collect();
        let caller = std::thread::current().id();
        let on_caller = |refused: usize| {
            REFUSED_SPAWNS.with(|r| r.set(refused));
            let placed = b.run(&items, 4 * ELEMENTS_PER_THREAD, &|_| {
                std::thread::current().id() == caller
            });
            REFUSED_SPAWNS.with(|r| r.set(0));
            placed
        };
        assert_eq!(on_caller(0), [false; 4], "one worker per share");
        assert_eq!(on_caller(3), [true, true, true, false], "3 refused");
        assert_eq!(on_caller(4), [true; 4], "every worker refused");
    }

    /// Sharded steps with a pre-write sum: a rank whose own found-inf flag
    /// is set joins the sum with `[0, 1, 0]` whatever its gradients hold
    /// (the CUDA backend reads none for a step it skips; the other ranks
    /// must see the same from either backend), and writes nothing.
    #[test]
    fn a_rank_whose_flag_is_set_joins_the_sum_with_the_flag_alone() {
        let kind = OptimizerKind::Adam;
        let rule = ScaleRule {
            loss: 1.0,
            f_star: 0.5,
            obs_var: 0.0,
            scale_max: f64::INFINITY,
        };
        for (rule, check_finite) in [(None, true), (Some(rule), false), (Some(rule), true)] {
            let mut param = vec![0.5f32; 33];
            let mut grad = vec![0.25f32; 33];
            grad[7] = f32::NAN;
            let flag = 1.0f32;
            let mut b = CpuBackend::new(kind, 1);
            let t = [TensorDesc::host_f32(&mut param, &grad)];
            let mut seen = Vec::new();
            let mut sum = |v: &mut [f64]| -> Result<()> {
                seen.push(v.to_vec());
                Ok(())
            };
            // SAFETY: `t` describes `param` and `grad`, `flag` is one f32;
            // all alive here.
            unsafe {
                b.step(StepRequest {
                    tensors: &t,
                    kind,
                    hyper: Hyper::defaults(kind),
                    lr: 1e-2,
                    rule,
                    check_finite,
                    found_inf: &flag as *const f32 as *const c_void,
                    stream: std::ptr::null_mut(),
                    reduce: Some(&mut sum),
                })
                .unwrap();
            }
            let what = format!("rule {}, guard {check_finite}", rule.is_some());
            assert_eq!(seen, [vec![0.0, 1.0, 0.0]], "{what}");
            assert_eq!(b.outcome().unwrap().skip, SkipReason::FoundInf, "{what}");
            assert!(param.iter().all(|&x| x == 0.5), "{what}: θ written");
            assert_eq!(b.applied, 0, "{what}");
        }
    }

    #[test]
    fn state_slots_are_interleaved_by_sub_block_from_a_cache_line() {
        // (slots, numel): whole and partial last sub-blocks.
        for (slots, numel) in [
            (2, 3 * SUB + 5),
            (2, SUB),
            (2, 1),
            (1, 2 * SUB + 1),
            (0, 100),
        ] {
            let values: Vec<f32> = (0..slots * numel).map(|k| k as f32).collect();
            let mut st = TensorState::from_slot_major(slots, numel, |k| values[k]).unwrap();
            assert_eq!(st.slot_major(), values, "{slots} x {numel}: round trip");
            if slots == 0 {
                continue;
            }
            let base = st.state_at(0);
            assert_eq!(
                base as usize % 64,
                0,
                "{slots} x {numel}: starts on a cache line"
            );
            for s in 0..slots {
                for i in 0..numel {
                    let at = (i / SUB) * slots * SUB + s * SUB + i % SUB;
                    // SAFETY: inside the buffer (sized to whole sub-blocks).
                    let v = unsafe { *base.add(at) };
                    assert_eq!(
                        v,
                        (s * numel + i) as f32,
                        "{slots} x {numel}: slot {s}, element {i}"
                    );
                }
            }
            let last = (numel - 1) / SUB * SUB;
            assert_eq!(
                st.state_at(last) as usize - st.state_at(0) as usize,
                4 * slots * last,
                "{slots} x {numel}: a sub-block's state starts where the items take it"
            );
        }
    }

    #[test]
    fn exported_state_imported_into_a_new_backend_continues_the_same_steps() {
        let n = 3 * CHUNK + 5;
        let grad: Vec<f32> = (0..n).map(|i| (i % 89) as f32 * 0.01 - 0.4).collect();
        let start: Vec<f32> = (0..n).map(|i| (i % 23) as f32 * 0.1).collect();
        for kind in [
            OptimizerKind::Adam,
            OptimizerKind::Momentum,
            OptimizerKind::Sgd,
        ] {
            let hyper = Hyper::defaults(kind);
            let step = |b: &mut CpuBackend, param: &mut Vec<f32>| {
                let t = [TensorDesc::host_f32(param, &grad)];
                // SAFETY: `t` describes `param` and `grad`, alive here.
                unsafe { b.step_plain(&t, &hyper, 1e-3) };
            };
            let (mut straight, mut resumed) = (start.clone(), start.clone());
            let mut a = CpuBackend::new(kind, 1);
            for _ in 0..3 {
                step(&mut a, &mut straight);
            }
            let mut b = CpuBackend::new(kind, 1);
            step(&mut b, &mut resumed);
            let saved = b.export_state().unwrap();
            assert_eq!(saved.slots.len(), 1);
            assert_eq!(
                saved.slots[0].len(),
                kind.state_slots() * n,
                "{kind:?}: slot-major"
            );
            let mut c = CpuBackend::new(kind, 1);
            c.import_values(&saved).unwrap();
            let again = c.export_state().unwrap();
            assert_eq!(
                again.slots, saved.slots,
                "{kind:?}: import, export: the same values"
            );
            step(&mut c, &mut resumed);
            step(&mut c, &mut resumed);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(
                bits(&resumed),
                bits(&straight),
                "{kind:?}: resumed = uninterrupted"
            );
        }
    }

    /// Zeroed bytes aligned for every dtype, as the caller's tensors are
    /// (checked at the C boundary). A `Vec<u8>` promises alignment 1 only:
    /// an empty one's pointer is not a valid `*const f32`.
    #[derive(Clone)]
    struct AlignedBytes {
        words: Vec<u32>,
        len: usize,
    }

    impl AlignedBytes {
        fn zeroed(len: usize) -> AlignedBytes {
            AlignedBytes {
                words: vec![0; len.div_ceil(4)],
                len,
            }
        }
    }

    impl std::ops::Deref for AlignedBytes {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            // SAFETY: `words` holds at least `len` initialised bytes.
            unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
        }
    }

    impl std::ops::DerefMut for AlignedBytes {
        fn deref_mut(&mut self) -> &mut [u8] {
            // SAFETY: as in `deref`, borrowed uniquely.
            unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
        }
    }

    #[test]
    fn a_step_starts_at_most_one_thread_per_share_of_elements() {
        const E: usize = ELEMENTS_PER_THREAD;
        // (total elements, configured threads, items) -> threads
        let cases = [
            ((0, 8, 0), 1),
            ((E - 1, 8, 16), 1),
            ((2 * E - 1, 8, 32), 1),
            ((2 * E, 8, 32), 2),
            ((64 * E, 64, 1024), 64),
            ((64 * E - 1, 64, 1024), 63),
            ((1000 * E, 8, 16_000), 8),
            ((1000 * E, 8, 3), 3),
            ((1000 * E, 1, 16_000), 1),
        ];
        for ((total, configured, items), want) in cases {
            assert_eq!(
                threads_for(total, configured, items),
                want,
                "{total} {configured} {items}"
            );
        }
    }

    /// Whether the AVX2 build can run here; prints why `test` skips if not.
    #[cfg(target_arch = "x86_64")]
    fn avx2_or_say_why(test: &str) -> bool {
        if !use_avx2() {
            // Past libtest's capture (it intercepts only the print macros),
            // in the suite's banner form, so the skip shows in the log.
            use std::io::Write;
            let line = format!("!!!! SKIPPED: {test}: this CPU has no AVX2/F16C !!!!\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        use_avx2()
    }

    /// `C`'s conversions have the bits of `Elem`'s (which are `half`'s,
    /// `optim`'s tests) when called as the staged loop calls them: on
    /// sub-blocks of `SUB` elements (most of them free of NaNs, so that
    /// bf16's fast path runs), 8 at a time and then a tail.
    #[cfg(target_arch = "x86_64")]
    fn conversions_match_elem<C: Conversions>(
        halves: impl Iterator<Item = u16>,
        floats: impl Iterator<Item = f32>,
        from_bits: fn(u16) -> C::Half,
        to_bits: fn(C::Half) -> u16,
    ) {
        // 3 more values for a tail.
        let halves: Vec<C::Half> = halves.chain(0..3).map(from_bits).collect();
        let mut wide = vec![0f32; halves.len()];
        for (src, dst) in halves.chunks(SUB).zip(wide.chunks_mut(SUB)) {
            // SAFETY: the callers checked AVX2 and F16C.
            unsafe { C::widen(src, dst) };
        }
        for (h, w) in halves.iter().zip(&wide) {
            let ours = Elem::to_f32(*h).to_bits();
            assert_eq!(w.to_bits(), ours, "{:#06x}", to_bits(*h));
        }
        let floats: Vec<f32> = floats.chain([1.0, 2.0, 3.0]).collect();
        let mut narrow = vec![from_bits(0); floats.len()];
        for (src, dst) in floats.chunks(SUB).zip(narrow.chunks_mut(SUB)) {
            // SAFETY: as above.
            unsafe { C::narrow(src, dst) };
        }
        for (x, h) in floats.iter().zip(&narrow) {
            let ours: C::Half = Elem::from_f32(*x);
            assert_eq!(to_bits(*h), to_bits(ours), "{:#010x}", x.to_bits());
        }
        // A lone NaN (signalling or quiet, either sign, payloads that an
        // add would carry into the exponent) at every place of slices that
        // end in a whole block, a tail or both: the NaN test must see every
        // lane of every block.
        let half_nans: Vec<C::Half> = [0x7c01u16, 0x7e00, 0x7f81, 0x7fc0, 0x7fff, 0xfc01, 0xffff]
            .into_iter()
            .map(from_bits)
            .filter(|h| h.to_f32().is_nan())
            .collect();
        let float_nans = [
            0x7f80_0001u32,
            0x7fc0_0000,
            0x7fff_ffff,
            0xff80_0001,
            0xffff_ffff,
        ];
        for len in [8, 9, 15, 16, 17, 24, 31, 32, 63, 64] {
            for pos in 0..len {
                for &nan in &half_nans {
                    let mut halves = vec![from_bits(0x3c00); len];
                    halves[pos] = nan;
                    let mut wide = vec![0f32; len];
                    // SAFETY: as above.
                    unsafe { C::widen(&halves, &mut wide) };
                    for (h, w) in halves.iter().zip(&wide) {
                        let ours = Elem::to_f32(*h).to_bits();
                        assert_eq!(w.to_bits(), ours, "len {len}, NaN at {pos}");
                    }
                }
                for nan in float_nans {
                    let mut floats = vec![1.5f32; len];
                    floats[pos] = f32::from_bits(nan);
                    let mut narrow = vec![from_bits(0); len];
                    // SAFETY: as above.
                    unsafe { C::narrow(&floats, &mut narrow) };
                    for (x, h) in floats.iter().zip(&narrow) {
                        let ours: C::Half = Elem::from_f32(*x);
                        assert_eq!(to_bits(*h), to_bits(ours), "len {len}, {nan:#x} at {pos}");
                    }
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn staged_conversions_match_elem() {
        if !avx2_or_say_why("staged_conversions_match_elem") {
            return;
        }
        // Every half, and the inputs around every rounding boundary.
        conversions_match_elem::<F16c>(
            0..=u16::MAX,
            optim::f16_narrowing_cases(),
            f16::from_bits,
            f16::to_bits,
        );
        conversions_match_elem::<Bf16Avx2>(
            0..=u16::MAX,
            optim::bf16_narrowing_cases(),
            bf16::from_bits,
            bf16::to_bits,
        );
    }

    /// The guard's check finds a lone non-finite gradient at every place of
    /// items of every length up to a few sub-blocks per part, and of whole
    /// chunks (every 61st place), in both builds and every dtype; a clean
    /// item passes.
    #[test]
    fn the_check_finds_a_lone_nonfinite_gradient_anywhere() {
        // (dtype, bits of 1.0, bits of +inf)
        let formats = [
            (DType::F32, 0x3f80_0000u32, 0x7f80_0000u32),
            (DType::F16, 0x3c00, 0x7c00),
            (DType::Bf16, 0x3f80, 0x7f80),
        ];
        let lens = (0..=300).chain([511, 512, 513, 1023, 1024, 1025, CHUNK - 1, CHUNK]);
        for len in lens {
            let places: Vec<usize> = if len <= 1025 {
                (0..len).collect()
            } else {
                (0..len).step_by(61).chain([len - 1]).collect()
            };
            for (dtype, one, inf) in formats {
                let esz = dtype.size();
                let put = |g: &mut [u8], i: usize, bits: u32| {
                    g[i * esz..(i + 1) * esz].copy_from_slice(&bits.to_le_bytes()[..esz])
                };
                let mut grad = AlignedBytes::zeroed(len * esz);
                for i in 0..len {
                    put(&mut grad, i, one);
                }
                let check = |grad: &[u8]| {
                    let it = Item {
                        param: SendPtr(std::ptr::null_mut()),
                        grad: SendPtr(grad.as_ptr() as *mut u8),
                        state: SendPtr(std::ptr::null_mut()),
                        len,
                        dtype,
                    };
                    let finite = finite_any(&it);
                    assert_eq!(
                        chunk_finite(&it),
                        finite,
                        "{dtype:?} len {len}: builds differ"
                    );
                    finite
                };
                assert!(check(&grad), "{dtype:?} len {len}: clean item refused");
                for &i in &places {
                    put(&mut grad, i, inf);
                    assert!(!check(&grad), "{dtype:?} len {len}: inf at {i} missed");
                    put(&mut grad, i, one);
                }
            }
        }
    }

    /// One chunk pass of either build.
    #[cfg(target_arch = "x86_64")]
    fn build<const K: u32, const MODE: u8>(
        avx2: bool,
        sc: &StepScalars,
        lr: f32,
        it: &Item,
    ) -> (f64, bool) {
        if avx2 {
            // SAFETY: the callers checked `use_avx2`.
            unsafe { chunk_avx2::<K, MODE>(sc, lr, it) }
        } else {
            chunk_any::<K, MODE>(sc, lr, it)
        }
    }

    /// Both builds of the dot's lane sums add term `j` into lane `j %
    /// LANES` in order (the AVX2 build of a step calls only the AVX2 one, so
    /// the baseline one is compared here, on every CPU).
    #[test]
    fn both_lane_sums_add_each_term_into_its_lane_in_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut value = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Wide exponents, both signs: a reordered or dropped addition
            // changes the rounded sum.
            f32::from_bits(((seed >> 33) as u32 & 0x8fff_ffff) | 0x3000_0000)
        };
        for len in 0..=3 * LANES + 3 {
            let start: [f64; LANES] = std::array::from_fn(|_| value() as f64 * 1e-3);
            let terms: Vec<f32> = (0..len).map(|_| value()).collect();
            let mut want = start;
            for (j, t) in terms.iter().enumerate() {
                want[j % LANES] += *t as f64;
            }
            let bits = |a: &[f64; LANES]| a.map(f64::to_bits);
            let mut any = start;
            accumulate_any(&mut any, &terms);
            assert_eq!(bits(&any), bits(&want), "baseline, {len} terms");
            #[cfg(target_arch = "x86_64")]
            if avx2_or_say_why("both_lane_sums_add_each_term_into_its_lane_in_order") {
                let mut avx2 = start;
                // SAFETY: the CPU supports AVX2 (just checked).
                unsafe { accumulate_avx2(&mut avx2, &terms) };
                assert_eq!(bits(&avx2), bits(&want), "AVX2, {len} terms");
            }
        }
    }

    /// The module's promise: the AVX2 build (with staged halves) computes
    /// the baseline build's bits, for every optimizer, dtype and pass, with
    /// and without weight decay, over lengths around the vector, sub-block
    /// and conversion block boundaries, on values that include ±0, subnormals,
    /// huge values, infinities and NaNs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_build_has_the_baseline_bits() {
        if !avx2_or_say_why("the_avx2_build_has_the_baseline_bits") {
            return;
        }
        let specials = [
            0.0,
            -0.0,
            1e-40,
            -3e-39,
            6e-8,
            3e38,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut value = |i: usize, scale: f32| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            if i % 23 == 7 {
                specials[(seed >> 60) as usize % specials.len()]
            } else {
                scale * (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            }
        };
        for kind in OptimizerKind::ALL {
            for weight_decay in [0.0, 1e-2] {
                let mut hyper = Hyper::defaults(kind);
                hyper.weight_decay = weight_decay;
                let bias = BiasPowers::default().advanced(&hyper).advanced(&hyper);
                let sc = StepScalars::new(kind, &hyper, bias);
                for dtype in [DType::F32, DType::F16, DType::Bf16] {
                    for len in [1, 7, 8, 9, 63, 64, 65, 200, 1000] {
                        let esz = dtype.size();
                        let mut theta = AlignedBytes::zeroed(len * esz);
                        let mut grad = AlignedBytes::zeroed(len * esz);
                        for i in 0..len {
                            let (t, g) = (value(i, 4.0), value(i + 11, 1.0));
                            let at = i * esz..(i + 1) * esz;
                            match dtype {
                                DType::F32 => {
                                    theta[at.clone()].copy_from_slice(&t.to_le_bytes());
                                    grad[at].copy_from_slice(&g.to_le_bytes());
                                }
                                DType::F16 => {
                                    let (t, g): (f16, f16) = (Elem::from_f32(t), Elem::from_f32(g));
                                    theta[at.clone()].copy_from_slice(&t.to_le_bytes());
                                    grad[at].copy_from_slice(&g.to_le_bytes());
                                }
                                DType::Bf16 => {
                                    let (t, g): (bf16, bf16) =
                                        (Elem::from_f32(t), Elem::from_f32(g));
                                    theta[at.clone()].copy_from_slice(&t.to_le_bytes());
                                    grad[at].copy_from_slice(&g.to_le_bytes());
                                }
                            }
                        }
                        let s0: Vec<f32> = (0..len).map(|i| value(i, 0.1).abs()).collect();
                        let s1: Vec<f32> = (0..len).map(|i| value(i + 5, 0.01).abs()).collect();
                        let slots = kind.state_slots();
                        let values: Vec<f32> = s0.into_iter().chain(s1).take(slots * len).collect();
                        for mode in [PASS_DOT, PASS_FUSED, PASS_PLAIN] {
                            let run = |avx2: bool| {
                                let mut th = theta.clone();
                                let mut st =
                                    TensorState::from_slot_major(slots, len, |k| values[k])
                                        .unwrap();
                                let it = Item {
                                    param: SendPtr(th.as_mut_ptr()),
                                    grad: SendPtr(grad.as_ptr() as *mut u8),
                                    state: SendPtr(st.state_at(0) as *mut u8),
                                    len,
                                    dtype,
                                };
                                let (phi, bad) = match mode {
                                    PASS_DOT => dispatch_kind!(
                                        kind,
                                        build::<PASS_DOT>(avx2, &sc, 0.01, &it)
                                    ),
                                    PASS_FUSED => dispatch_kind!(
                                        kind,
                                        build::<PASS_FUSED>(avx2, &sc, 0.01, &it)
                                    ),
                                    _ => dispatch_kind!(
                                        kind,
                                        build::<PASS_PLAIN>(avx2, &sc, 0.01, &it)
                                    ),
                                };
                                // NaN payloads and signs are not part of
                                // the promise: which NaN an operation returns
                                // depends on its operands' order, which the
                                // two builds need not share.
                                let bits = |v: &mut dyn Iterator<Item = f32>| {
                                    v.map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                                        .collect::<Vec<_>>()
                                };
                                let theta = th.chunks(esz).map(|e| match dtype {
                                    DType::F32 => f32::from_le_bytes(e.try_into().unwrap()),
                                    DType::F16 => {
                                        Elem::to_f32(f16::from_le_bytes(e.try_into().unwrap()))
                                    }
                                    DType::Bf16 => {
                                        Elem::to_f32(bf16::from_le_bytes(e.try_into().unwrap()))
                                    }
                                });
                                let phi = if phi.is_nan() {
                                    u64::MAX
                                } else {
                                    phi.to_bits()
                                };
                                let state = st.slot_major().into_iter();
                                (bits(&mut { theta }), bits(&mut { state }), phi, bad)
                            };
                            let what = format!(
                                "{kind:?} {dtype:?} len {len} mode {mode} wd {weight_decay}"
                            );
                            assert!(run(false) == run(true), "{what}");
                        }
                    }
                }
            }
        }
    }
}
