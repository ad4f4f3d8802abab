//! The kernel ABI of `kernels/lra.ptx` on the host side (kernels/README.md
//! is the reference): the embedded PTX text, the table and control-block
//! layouts, the mode bits and which launches make up a step. Pure Rust with
//! no driver calls, so the PTX interpreter's tests drive the kernel through
//! exactly the tables and launch plan the CUDA backend uses.

use crate::controller::ScaleRule;
use crate::optim::{DType, OptimizerKind, StepScalars};

/// The kernels, as embedded in the library.
pub const PTX: &str = include_str!("../../../kernels/lra.ptx");
/// The one entry point.
pub const ENTRY: &str = "lra_pass";
/// Elements per chunk (one φ partial per chunk) when the step has fewer
/// than [`LARGE_FROM`] elements: enough chunks to fill a GPU at 1M.
pub const CHUNK: usize = 4096;
/// Elements per chunk from [`LARGE_FROM`] elements on: fewer per-chunk
/// pauses (descriptor loads, the block reduction) and fewer partials.
pub const CHUNK_LARGE: usize = 16384;
pub const LARGE_FROM: usize = 1 << 26;

/// The chunk length of a layout: it depends only on the total element
/// count, never on the GPU, so φ's summation order (and bits) is the same
/// on every device.
pub fn chunk_len(total: usize) -> usize {
    if total >= LARGE_FROM {
        CHUNK_LARGE
    } else {
        CHUNK
    }
}
/// Threads per block.
pub const BLOCK: u32 = 256;

/// `mode` bits of `lra_pass` (kernels/README.md, "mode bits").
pub mod mode {
    pub const THETA: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const DOT: u32 = 4;
    pub const CHECK: u32 = 8;
    pub const GUARD: u32 = 16;
    pub const LR_DEVICE: u32 = 32;
    pub const F_SUM: u32 = 64;
    pub const F_DECIDE: u32 = 128;
    pub const F_SCALE: u32 = 256;
    pub const F_END: u32 = 512;
}

/// One row of the tensor table (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TensorEntry {
    pub param: u64,
    pub grad: u64,
    pub state0: u64,
    pub state1: u64,
    pub dtype: u32,
    /// 1 when parameter and gradient are aligned to 4 elements.
    pub vec: u32,
}

/// One row of the chunk table (8 bytes): the chunk is rows `first..end`
/// of the segment table, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChunkEntry {
    pub first: u32,
    pub end: u32,
}

/// One row of the segment table (16 bytes): `len` elements of tensor
/// `tensor` from element `start` (a multiple of 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegmentEntry {
    pub start: u64,
    pub tensor: u32,
    pub len: u32,
}

/// The device control block (64 bytes), one per handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Control {
    pub pow1: f64,
    pub pow2: f64,
    pub applied: u64,
    pub nonfinite: u32,
    pub skip: u32,
    pub phi: f64,
    pub scale: f64,
    pub lr_eff: f32,
    pub done: u32,
    pub reserved: [u32; 2],
}

const _: () = assert!(std::mem::size_of::<TensorEntry>() == 40);
const _: () = assert!(std::mem::size_of::<ChunkEntry>() == 8);
const _: () = assert!(std::mem::size_of::<SegmentEntry>() == 16);
const _: () = assert!(std::mem::size_of::<Control>() == 64);

/// Byte offsets inside [`Control`] the host writes between launches.
pub const CONTROL_NONFINITE: u64 = 24;
pub const CONTROL_PHI: u64 = 32;
/// Bit of `Control::nonfinite` the host sets after a cross-rank sum that
/// found some rank's found_inf flag set: the step skips as `FoundInf`.
pub const NONFINITE_FOUND_INF: u32 = 1 << 31;

impl Control {
    /// The control block of a fresh handle (no step applied yet).
    pub fn initial() -> Control {
        Control {
            pow1: 1.0,
            pow2: 1.0,
            ..Control::default()
        }
    }
}

/// Rows of the device tables, as the kernel reads them (little-endian
/// `repr(C)`; every target of lra is little-endian).
///
/// # Safety
///
/// Implementors are `repr(C)` plain data without padding bytes (every byte
/// of a value is initialised): [`rows_bytes`] hands their bytes out as
/// `u8`s. An unsafe trait, because this module is public: a safe one would
/// let safe code implement it for a type with padding.
pub unsafe trait Row: Copy {}
// SAFETY (all four): integer and float fields only, no padding (the sizes
// are asserted above: 40 = 4×8 + 2×4, 8 = 2×4, 16 = 8 + 2×4, 64 = the sum
// of Control's fields).
unsafe impl Row for TensorEntry {}
unsafe impl Row for ChunkEntry {}
unsafe impl Row for SegmentEntry {}
unsafe impl Row for Control {}

pub fn rows_bytes<T: Row>(rows: &[T]) -> &[u8] {
    // SAFETY: `Row` types are repr(C) plain data without padding bytes
    // (the trait's contract).
    unsafe { std::slice::from_raw_parts(rows.as_ptr() as *const u8, std::mem::size_of_val(rows)) }
}

impl Control {
    /// The control block read back from the device.
    pub fn from_bytes(b: &[u8]) -> Control {
        assert_eq!(
            b.len(),
            std::mem::size_of::<Control>(),
            "control block size"
        );
        let mut c = Control::default();
        // SAFETY: Control is plain data; every bit pattern is a value.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), &mut c as *mut Control as *mut u8, b.len())
        };
        c
    }
}

/// The parameters of one `lra_pass` launch (kernels/README.md, table
/// "Parameters of lra_pass").
#[derive(Clone, Copy, Debug)]
pub struct KernelArgs {
    pub tensors: u64,
    pub chunks: u64,
    pub segments: u64,
    pub nchunks: u32,
    pub control: u64,
    pub partials: u64,
    pub found_inf: u64,
    pub kind: OptimizerKind,
    pub mode: u32,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// The scale rule (fused steps pass [`ScaleRule`] values it ignores).
    pub rule: ScaleRule,
    /// `inv_bc1`/`inv_bc2_sqrt` are ignored: the kernel derives them.
    pub sc: StepScalars,
}

impl KernelArgs {
    /// Each parameter's bytes, in declaration order.
    pub fn params(&self) -> Vec<Vec<u8>> {
        // Without M_THETA the chunk work is the guard's gradient check (or
        // there is none): the kernel runs that check for any chunk work and
        // writes no partials (kernels/README.md, "mode bits").
        debug_assert!(
            self.mode & mode::THETA != 0 || self.mode & mode::CHECK != 0 || self.nchunks == 0,
            "lra_pass mode {:#x}: chunk work without M_THETA must be M_CHECK",
            self.mode
        );
        debug_assert!(
            self.mode & mode::THETA != 0 || self.mode & mode::DOT == 0 || self.nchunks == 0,
            "lra_pass mode {:#x}: M_DOT needs M_THETA",
            self.mode
        );
        let sc = self.sc;
        let sc_bytes = [
            sc.b1,
            sc.omb1,
            sc.b2,
            sc.omb2,
            sc.eps,
            sc.weight_decay,
            sc.inv_bc1,
            sc.inv_bc2_sqrt,
        ]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
        vec![
            self.tensors.to_le_bytes().to_vec(),
            self.chunks.to_le_bytes().to_vec(),
            self.segments.to_le_bytes().to_vec(),
            self.nchunks.to_le_bytes().to_vec(),
            self.control.to_le_bytes().to_vec(),
            self.partials.to_le_bytes().to_vec(),
            self.found_inf.to_le_bytes().to_vec(),
            (self.kind as u32).to_le_bytes().to_vec(),
            self.mode.to_le_bytes().to_vec(),
            self.lr.to_le_bytes().to_vec(),
            self.beta1.to_le_bytes().to_vec(),
            self.beta2.to_le_bytes().to_vec(),
            self.rule.loss.to_le_bytes().to_vec(),
            self.rule.f_star.to_le_bytes().to_vec(),
            self.rule.obs_var.to_le_bytes().to_vec(),
            self.rule.scale_max.to_le_bytes().to_vec(),
            sc_bytes,
        ]
    }
}

/// The rule a fused step passes (never read by the kernel).
pub const NO_RULE: ScaleRule = ScaleRule {
    loss: 0.0,
    f_star: f64::NAN,
    obs_var: 0.0,
    scale_max: f64::INFINITY,
};

/// Launch grid: one block per chunk up to what keeps every SM busy, at
/// least one (the final stage runs even without chunks).
pub fn grid(nchunks: u32, max_grid: u32) -> u32 {
    nchunks.min(max_grid).max(1)
}

/// Whether the 4-element vector path may read/write this tensor.
pub fn vector_ok(param: u64, grad: u64, dtype: DType) -> bool {
    let align = 4 * dtype.size() as u64;
    param.is_multiple_of(align) && grad.is_multiple_of(align)
}

/// The chunk and segment tables of a tensor layout (kernels/README.md,
/// "Chunks and segments").
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ChunkPlan {
    pub chunks: Vec<ChunkEntry>,
    pub segments: Vec<SegmentEntry>,
}

/// Cuts a tensor layout into chunks of [`chunk_len`] elements of one flat
/// index space: the tensors in order, each starting at a multiple of 4
/// (the element counts before it rounded up to 4), so a segment's
/// start inside its tensor is a multiple of 4 and inherits the tensor's
/// alignment. A chunk holds the pieces (segments) of every tensor it
/// overlaps, so N tensors make as many chunks, of the same sizes, as one
/// tensor of their total size: the same work per block whatever the
/// split. Empty tensors have no segments.
pub fn chunk_table(numels: &[usize]) -> ChunkPlan {
    let chunk = chunk_len(numels.iter().sum());
    let mut plan = ChunkPlan::default();
    // flat index of the current tensor's element 0, and the flat chunk
    // number of the last row pushed
    let mut base = 0usize;
    let mut last_chunk = usize::MAX;
    for (t, &n) in numels.iter().enumerate() {
        let mut start = 0;
        while start < n {
            let flat = base + start;
            let k = flat / chunk;
            let len = ((k + 1) * chunk - flat).min(n - start);
            if k != last_chunk {
                let at = plan.segments.len() as u32;
                plan.chunks.push(ChunkEntry { first: at, end: at });
                last_chunk = k;
            }
            plan.segments.push(SegmentEntry {
                start: start as u64,
                tensor: t as u32,
                len: len as u32,
            });
            plan.chunks.last_mut().expect("pushed above").end += 1;
            start += len;
        }
        base += slot_stride(n);
    }
    plan
}

/// Where each tensor's optimizer state lives inside one f32 buffer:
/// per tensor the element offset of slot 0 (slot 1 follows after the
/// element count rounded up to 4, so every slot is 16-byte aligned), and
/// the buffer's total length in f32 elements.
pub fn state_layout(numels: &[usize], kind: OptimizerKind) -> (Vec<usize>, usize) {
    let slots = kind.state_slots();
    let mut offsets = Vec::with_capacity(numels.len());
    let mut at = 0;
    for &n in numels {
        offsets.push(at);
        at += slots * slot_stride(n);
    }
    (offsets, at)
}

/// The tensor-table row of one tensor whose optimizer state starts
/// `offset` f32 elements into the state buffer at `state_base` (offsets
/// from [`state_layout`]).
pub fn tensor_entry(
    kind: OptimizerKind,
    (param, grad): (u64, u64),
    numel: usize,
    dtype: DType,
    state_base: u64,
    offset: usize,
) -> TensorEntry {
    let slots = kind.state_slots();
    let s0 = state_base + 4 * offset as u64;
    let s1 = s0 + 4 * slot_stride(numel) as u64;
    TensorEntry {
        param,
        grad,
        state0: if slots >= 1 { s0 } else { 0 },
        state1: if slots >= 2 { s1 } else { 0 },
        dtype: dtype as u32,
        vec: vector_ok(param, grad, dtype) as u32,
    }
}

/// Whether `rows` (built by [`tensor_entry`] for this layout) are still
/// the rows of `tensors`, given as (param, grad, dtype): a row is a function
/// of those and of what the layout fixes (size, state offset), so equal
/// ones mean an equal table, decided with no allocation on every step.
pub fn table_is_current(
    rows: &[TensorEntry],
    tensors: impl ExactSizeIterator<Item = (u64, u64, DType)>,
) -> bool {
    rows.len() == tensors.len()
        && rows
            .iter()
            .zip(tensors)
            .all(|(r, (p, g, dt))| r.param == p && r.grad == g && r.dtype == dt as u32)
}

/// Elements between slot 0 and slot 1 of a tensor of `numel` elements.
pub fn slot_stride(numel: usize) -> usize {
    numel.div_ceil(4) * 4
}

/// Mode bits of each launch of a step, in order (kernels/README.md, "Passes
/// the host launches per step"). `sharded`: a cross-rank sum runs on the
/// host between the first launch and the rest (see [`sharded_split`]).
pub fn step_launches(two_pass: bool, guard: bool) -> Vec<u32> {
    use mode::*;
    let g = if guard { GUARD } else { 0 };
    if two_pass {
        vec![
            THETA | DOT | CHECK | F_SUM | F_DECIDE | F_SCALE | g,
            THETA | WRITE | LR_DEVICE | F_END,
        ]
    } else {
        let fused = THETA | WRITE | DOT | F_SUM | F_DECIDE | F_END | g;
        if guard {
            vec![CHECK, fused]
        } else {
            vec![fused]
        }
    }
}

/// Sharded steps with a registered reduction: the launches before the host
/// reads `[nonfinite, phi]` and runs the sum, and those after. A launch with
/// no chunk work (`nchunks = 0`) is marked by `true`.
pub fn sharded_split(two_pass: bool, guard: bool) -> (Vec<u32>, Vec<(u32, bool)>) {
    use mode::*;
    let g = if guard { GUARD } else { 0 };
    if two_pass {
        (
            vec![THETA | DOT | CHECK | F_SUM | g],
            vec![
                (F_DECIDE | F_SCALE | g, true),
                (THETA | WRITE | LR_DEVICE | F_END, false),
            ],
        )
    } else {
        (
            vec![CHECK],
            vec![(THETA | WRITE | DOT | F_SUM | F_DECIDE | F_END | g, false)],
        )
    }
}

/// The rounding lint: every floating-point (f16/bf16 and their x2
/// vectors, f32, f64) `add`, `sub`, `mul`, `div`, `sqrt`, `rcp`, `fma`
/// and `mad` carries `.rn` (so ptxas may not contract or approximate it);
/// nothing uses `.ftz`, `.approx`, `.full` or a directed rounding (`.rz`,
/// `.rm`, `.rp`: the CPU backend rounds to nearest), and no float
/// operation saturates (`.sat`). Returns the offending lines (1-based
/// number, text).
pub fn rounding_lint(ptx: &str) -> Vec<(usize, String)> {
    let mut bad = Vec::new();
    for (no, line) in ptx.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("").trim();
        let Some(op) = code.split_whitespace().find(|t| !t.starts_with('@')) else {
            continue;
        };
        let parts: Vec<&str> = op.trim_end_matches(';').split('.').collect();
        let float = parts
            .iter()
            .any(|p| matches!(*p, "f16" | "f16x2" | "bf16" | "bf16x2" | "f32" | "f64"));
        let arith = matches!(
            parts[0],
            "add" | "sub" | "mul" | "div" | "sqrt" | "fma" | "rcp" | "mad"
        );
        let loose = parts
            .iter()
            .any(|p| matches!(*p, "ftz" | "approx" | "full" | "rz" | "rm" | "rp"));
        let saturated = float && parts.contains(&"sat");
        if (float && arith && !parts.contains(&"rn")) || loose || saturated {
            bad.push((no + 1, line.trim().to_string()));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_float_operation_rounds_to_nearest() {
        let bad = rounding_lint(PTX);
        assert!(bad.is_empty(), "kernels/lra.ptx: {bad:?}");
        // The lint can fail.
        for line in [
            "\tadd.f32 %f1, %f2, %f3;",
            "@%p mul.f64 %fd1, %fd2, %fd3;",
            "\tsub.ftz.rn.f32 %f1, %f2, %f3;",
            "\tdiv.approx.f32 %f1, %f2, %f3;",
            "\tfma.f32 %f1, %f2, %f3, %f4;",
            "\tmad.f32 %f1, %f2, %f3, %f4;",
            "\tadd.f16 %h1, %h2, %h3;",
            "\tmul.bf16x2 %r1, %r2, %r3;",
            "\tcvt.rz.f32.f64 %f1, %fd1;",
            "\tadd.rn.sat.f32 %f1, %f2, %f3;",
            "\trsqrt.approx.f64 %fd1, %fd2;",
        ] {
            assert_eq!(rounding_lint(line).len(), 1, "{line}");
        }
        for line in [
            "\tadd.u32 %r1, %r2, 1; // add.f32 in a comment",
            "\tcvt.rn.f16.f32 %h1, %f1;",
            "\tcvt.f32.bf16 %f1, %h1;",
            "\tfma.rn.f32 %f1, %f2, %f3, %f4;",
            "\tmul.wide.u32 %rd1, %r1, 8;",
            "\tmax.f64 %fd1, %fd1, 0d0000000000000000;",
        ] {
            assert!(rounding_lint(line).is_empty(), "{line}");
        }
        // An offence is named by its 1-based line and its trimmed text.
        let text = "\tadd.rn.f32 %f1, %f2, %f3;\n\tmul.f32 %f4, %f5, %f6;\n\tret;";
        assert_eq!(
            rounding_lint(text),
            [(2, "mul.f32 %f4, %f5, %f6;".to_string())]
        );
    }

    /// The per-step shortcut agrees with rebuilding the table: over many
    /// moves of pointers (by an element, a vector, far), dtype changes and
    /// no change at all, "current" exactly when the rebuilt rows are equal.
    #[test]
    fn table_is_current_exactly_when_rebuilding_gives_the_same_rows() {
        let numels = [1usize, 33, 4096, 5];
        let kind = OptimizerKind::Adam;
        let (offsets, _) = state_layout(&numels, kind);
        let rows_of = |t: &[(u64, u64, DType)]| -> Vec<TensorEntry> {
            t.iter()
                .zip(&numels)
                .zip(&offsets)
                .map(|((&(p, g, dt), &n), &off)| tensor_entry(kind, (p, g), n, dt, 1 << 40, off))
                .collect()
        };
        let first: Vec<(u64, u64, DType)> = (0..numels.len() as u64)
            .map(|i| {
                (
                    0x1000_0000 * (i + 1),
                    0x8000_0000 + 0x1000_0000 * i,
                    DType::F32,
                )
            })
            .collect();
        let uploaded = rows_of(&first);
        let mut seed = 12345u64;
        let (mut same, mut changed) = (0, 0);
        for _ in 0..2000 {
            let mut t = first.clone();
            for e in t.iter_mut() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let moves = [0u64, 2, 4, 16, 1 << 20];
                let mv = moves[(seed >> 33) as usize % moves.len()];
                match (seed >> 40) % 5 {
                    0 => e.0 += mv,
                    1 => e.1 += mv,
                    2 => e.2 = [DType::F32, DType::F16, DType::Bf16][(seed >> 50) as usize % 3],
                    _ => {}
                }
            }
            let current = table_is_current(&uploaded, t.iter().copied());
            assert_eq!(current, rows_of(&t) == uploaded, "{t:?}");
            if current {
                same += 1;
            } else {
                changed += 1;
            }
        }
        assert!(
            same > 100 && changed > 100,
            "both outcomes seen: {same} {changed}"
        );
        assert!(!table_is_current(&uploaded, first[..3].iter().copied()));
    }

    /// Every element in exactly one segment, segments in tensor order,
    /// starts at multiples of 4, chunks of at most `C` elements.
    fn check_plan(numels: &[usize]) -> ChunkPlan {
        let c = chunk_len(numels.iter().sum());
        let plan = chunk_table(numels);
        let mut next = vec![0usize; numels.len()];
        let mut seen = 0;
        for (k, ch) in plan.chunks.iter().enumerate() {
            assert_eq!(
                ch.first as usize, seen,
                "chunk {k} starts where the last ended"
            );
            assert!(ch.end > ch.first, "chunk {k} is empty");
            seen = ch.end as usize;
            let segs = &plan.segments[ch.first as usize..ch.end as usize];
            let total: usize = segs.iter().map(|s| s.len as usize).sum();
            assert!(total <= c, "chunk {k}: {total} elements");
            for s in segs {
                let t = s.tensor as usize;
                assert_eq!(s.start as usize, next[t], "tensor {t} covered in order");
                assert!(s.start % 4 == 0 && s.len >= 1);
                next[t] += s.len as usize;
            }
        }
        assert_eq!(seen, plan.segments.len());
        assert_eq!(next, numels);
        plan
    }

    #[test]
    fn chunks_cover_every_element_once() {
        check_plan(&[0, 1, CHUNK, CHUNK + 1, 3 * CHUNK - 5]);
        check_plan(&[5; 1000]);
        check_plan(&[]);
        check_plan(&[0, 0]);
        let plan = check_plan(&[CHUNK - 3, 7, 2 * CHUNK]);
        // tensor 1 starts at flat CHUNK (CHUNK - 3 rounded up to 4)
        assert_eq!(plan.segments[1].tensor, 1);
        assert_eq!(plan.chunks[1].first, 1);
    }

    #[test]
    fn many_tensors_make_the_chunks_of_one() {
        // what the GPU benchmark compares: 1 tensor against 200 of the same
        // total, at 1M, 16M and 256M elements
        // (scripts/gpu_check.py's split: total / 200 each, the rest in the
        // last); rounding each tensor up to 4 adds at most 3 · 200 elements,
        // so at most one more chunk
        for total in [1 << 20, 1 << 24, 1 << 28] {
            let one = chunk_table(&[total]).chunks.len();
            let mut split = vec![total / 200; 200];
            split[199] += total % 200;
            let many = chunk_table(&split);
            assert!(many.chunks.len() <= one + 1, "{total}");
            assert!(many.segments.len() <= many.chunks.len() + 199);
            // cut at multiples of 4 (contiguous_views): exactly the chunks of one
            let mut aligned = vec![(total / 200) & !3; 200];
            aligned[199] = total - 199 * aligned[0];
            assert_eq!(chunk_table(&aligned).chunks.len(), one, "{total}");
        }
        // many small tensors share chunks: 10 000 biases of 100 elements
        let plan = check_plan(&[100; 10_000]);
        assert_eq!(plan.chunks.len(), (10_000 * 100usize).div_ceil(CHUNK));
    }

    #[test]
    fn large_layouts_use_large_chunks() {
        let plan = check_plan(&[LARGE_FROM - 7, CHUNK_LARGE + 1]);
        assert_eq!(plan.segments[0].len as usize, CHUNK_LARGE);
        // the first tensor ends 7 elements short of a chunk boundary, 4
        // after rounding: the first 4 elements of the second fill that chunk
        let shared = plan.chunks[LARGE_FROM / CHUNK_LARGE - 1];
        assert_eq!(shared.end - shared.first, 2);
        assert_eq!(plan.segments[shared.first as usize + 1].len, 4);
        assert_eq!(plan.segments.last().unwrap().len as usize, CHUNK_LARGE - 3);
        assert_eq!(chunk_len(LARGE_FROM - 1), CHUNK);
    }

    /// Past 2^32 elements (users pass billions): starts and state offsets
    /// in 64 bits, chunk and segment counts far from the u32 limit.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn layouts_past_two_to_the_32_elements() {
        let big = [(1usize << 32) + 6, 5000, 33];
        let plan = check_plan(&big);
        let flat = (1usize << 32) + 8 + 5000 + 36;
        assert_eq!(plan.chunks.len(), flat.div_ceil(CHUNK_LARGE));
        assert!(plan.segments.iter().any(|s| s.start > u32::MAX as u64));
        let (off, total) = state_layout(&big, OptimizerKind::Adam);
        assert_eq!(off[1], 2 * ((1 << 32) + 8));
        assert_eq!(total, flat * 2);
        let row = tensor_entry(
            OptimizerKind::Adam,
            (0, 0),
            big[0],
            DType::F16,
            1 << 40,
            off[1],
        );
        assert_eq!(row.state0, (1 << 40) + 4 * off[1] as u64);
        assert_eq!(row.state1 - row.state0, 4 * ((1 << 32) + 8));
    }

    #[test]
    fn state_slots_are_16_byte_aligned_and_disjoint() {
        let (off, total) = state_layout(&[3, 5, 8], OptimizerKind::Adam);
        assert_eq!(off, vec![0, 8, 24]);
        assert_eq!(total, 40);
        assert!(off.iter().all(|o| o % 4 == 0));
        let (off, total) = state_layout(&[3, 5], OptimizerKind::Sgd);
        assert_eq!((off, total), (vec![0, 0], 0));
    }

    #[test]
    fn vector_path_needs_four_element_alignment() {
        assert!(vector_ok(0x1000, 0x2010, DType::F32));
        assert!(!vector_ok(0x1004, 0x2010, DType::F32));
        assert!(vector_ok(0x1008, 0x2000, DType::F16));
        assert!(!vector_ok(0x1008, 0x2002, DType::Bf16));
    }

    #[test]
    fn every_step_ends_by_advancing_and_decides_once() {
        for two_pass in [false, true] {
            for guard in [false, true] {
                let plain = step_launches(two_pass, guard);
                let (before, after) = sharded_split(two_pass, guard);
                for seq in [
                    plain.clone(),
                    before
                        .iter()
                        .copied()
                        .chain(after.iter().map(|a| a.0))
                        .collect(),
                ] {
                    let count = |bit| seq.iter().filter(|&&m| m & bit != 0).count();
                    assert_eq!(count(mode::F_END), 1);
                    assert_eq!(count(mode::F_DECIDE), 1);
                    assert_eq!(count(mode::WRITE), 1);
                    assert_eq!(seq.last().unwrap() & mode::F_END, mode::F_END);
                }
            }
        }
    }

    #[test]
    fn embedded_ptx_declares_the_entry() {
        assert!(PTX.contains(".visible .entry lra_pass("));
        assert!(PTX.is_ascii(), "ptxas rejects non-ASCII text");
    }
}
