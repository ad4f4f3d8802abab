//! The CPU backend touches only its tensors' bytes: every pass (the guard's
//! check, the dot pass, the fused and scaled updates; AVX2 where the
//! machine has it) over tensors that end right before an unmapped page, or
//! start right after one. A read one byte past either end (a vector load
//! over a tail, a misplaced prefetch that is not a prefetch) is a fault
//! that fails this test; a wrong result against the same step on ordinary
//! heap memory fails it too. The other tests' tensors are `Vec`s, never
//! next to unmapped memory. (First run as a scratch test by the review of
//! the CPU backend's unsafe code, notes/review-cpu-unsafe.md.)
#![cfg(unix)]

use half::{bf16, f16};
use lra::ffi::*;
use std::ptr::null_mut;

const PAGE: usize = 4096;

/// `bytes` of read-write memory between two unmapped (PROT_NONE) pages.
struct Fenced {
    base: *mut u8,
    pages: usize,
}

impl Fenced {
    fn new(bytes: usize) -> Fenced {
        let pages = bytes.div_ceil(PAGE).max(1);
        // SAFETY: a fresh anonymous mapping, then protection changes on
        // its own first and last pages.
        unsafe {
            let p = libc::mmap(
                null_mut(),
                (pages + 2) * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(p != libc::MAP_FAILED, "mmap");
            let p = p as *mut u8;
            assert_eq!(libc::mprotect(p.cast(), PAGE, libc::PROT_NONE), 0);
            let back = p.add((pages + 1) * PAGE);
            assert_eq!(libc::mprotect(back.cast(), PAGE, libc::PROT_NONE), 0);
            Fenced { base: p, pages }
        }
    }

    /// Where `bytes` start so that they end at the back fence, or start at
    /// the front one.
    fn place(&self, bytes: usize, at_end: bool) -> *mut u8 {
        let offset = if at_end {
            (self.pages + 1) * PAGE - bytes
        } else {
            PAGE
        };
        // SAFETY: inside the mapping.
        unsafe { self.base.add(offset) }
    }
}

impl Drop for Fenced {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), (self.pages + 2) * PAGE) };
    }
}

/// `n` values of `dtype` as bytes: a deterministic mix of signs and scales.
fn values(n: usize, seed: u64, scale: f32, dtype: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(4 * n);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        let v = scale * u * 2f32.powi(((x >> 8) % 7) as i32 - 3);
        match dtype {
            LRA_DTYPE_F32 => out.extend_from_slice(&v.to_le_bytes()),
            LRA_DTYPE_F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Guarded,
    Unguarded,
    TwoPass,
}

/// Three steps with reports over one tensor whose parameter and gradient
/// bytes lie at `param` and `grad` (`start` and `grads[k]` copied in);
/// the parameters' bytes after them.
///
/// # Safety
///
/// `param` and `grad` are valid for `start.len()` bytes each.
unsafe fn three_steps(
    optimizer: u32,
    dtype: u32,
    mode: Mode,
    param: *mut u8,
    grad: *mut u8,
    start: &[u8],
    grads: &[Vec<u8>],
) -> Vec<u8> {
    let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
    lra_config_init(cfg.as_mut_ptr(), optimizer);
    let mut cfg = cfg.assume_init();
    cfg.lr = 0.01;
    cfg.num_threads = 1;
    cfg.check_finite = !matches!(mode, Mode::Unguarded) as u32;
    if matches!(mode, Mode::TwoPass) {
        cfg.f_star = 0.0;
        cfg.scale_max = 4.0;
    }
    let mut h = null_mut();
    assert_eq!(lra_create(&cfg, &mut h), LRA_OK);
    let bytes = start.len();
    std::ptr::copy_nonoverlapping(start.as_ptr(), param, bytes);
    let size = if dtype == LRA_DTYPE_F32 { 4 } else { 2 };
    let t = lra_tensor {
        param: param.cast(),
        grad: grad.cast(),
        numel: (bytes / size) as u64,
        dtype,
        reserved: 0,
    };
    for g in grads {
        std::ptr::copy_nonoverlapping(g.as_ptr(), grad, bytes);
        assert_eq!(lra_step(h, &t, 1, 1.0, 0.0, null_mut()), LRA_OK);
        assert_eq!(lra_report_reeval(h, 0.9, null_mut()), LRA_OK);
    }
    lra_destroy(h);
    std::slice::from_raw_parts(param, bytes).to_vec()
}

#[test]
fn every_pass_stays_inside_its_tensors() {
    let lengths = (1..=70).chain([127, 128, 129, 255, 256, 257, 1023, 1025, 16385]);
    let mut cases = 0;
    for n in lengths {
        for dtype in [LRA_DTYPE_F32, LRA_DTYPE_F16, LRA_DTYPE_BF16] {
            let bytes = n * if dtype == LRA_DTYPE_F32 { 4 } else { 2 };
            let start = values(n, n as u64, 1.0, dtype);
            let grads: Vec<Vec<u8>> = (0..3)
                .map(|k| values(n, 7 + k + n as u64, 0.1, dtype))
                .collect();
            let (fp, fg) = (Fenced::new(bytes), Fenced::new(bytes));
            for optimizer in 0..=LRA_OPTIMIZER_ADAMW {
                for mode in [Mode::Guarded, Mode::Unguarded, Mode::TwoPass] {
                    // Heap buffers one element past an 8-byte boundary: the
                    // reference, and a misaligned (but valid) placement.
                    let mut hp = vec![0u64; bytes / 8 + 2];
                    let mut hg = vec![0u64; bytes / 8 + 2];
                    let skew = bytes / n;
                    // SAFETY: each placement holds `bytes` bytes.
                    let reference = unsafe {
                        let p = (hp.as_mut_ptr() as *mut u8).add(skew);
                        let g = (hg.as_mut_ptr() as *mut u8).add(skew);
                        three_steps(optimizer, dtype, mode, p, g, &start, &grads)
                    };
                    for at_end in [true, false] {
                        let (p, g) = (fp.place(bytes, at_end), fg.place(bytes, at_end));
                        // SAFETY: as above.
                        let fenced =
                            unsafe { three_steps(optimizer, dtype, mode, p, g, &start, &grads) };
                        assert!(
                            fenced == reference,
                            "optimizer {optimizer}, dtype {dtype}, {n} elements, {mode:?}, fenced at the {}: other results than on the heap",
                            if at_end { "end" } else { "start" }
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    println!("{cases} fenced steps of three, every optimizer, dtype and pass");
}
