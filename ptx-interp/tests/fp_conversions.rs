//! The interpreter's own f16/bf16 conversions (`ptx_interp::fp`, written
//! from IEEE 754) against the `half` crate.

use half::{bf16, f16};
use ptx_interp::fp;

/// Every f32 in a stride over all bit patterns plus the neighbourhoods of
/// the format boundaries, where rounding is hardest.
fn f32_samples() -> impl Iterator<Item = u32> {
    let stride = (0u64..(1u64 << 32)).step_by(997).map(|x| x as u32);
    let edges = [
        0x0000_0000u32, // 0
        0x3380_0000,    // 2^-24: smallest f16 subnormal
        0x3300_0000,    // 2^-25: halfway to zero
        0x3880_0000,    // 2^-14: smallest f16 normal
        0x477f_e000,    // 65504: f16 max
        0x477f_f000,    // halfway to f16 overflow
        0x7f7f_ffff,    // f32 max
        0x7f80_0000,    // inf
        0x0080_0000,    // f32 min normal
        0x0000_0001,    // f32 min subnormal
    ];
    let near = edges
        .into_iter()
        .flat_map(|e| (0u32..4096).flat_map(move |d| [e.wrapping_add(d), e.wrapping_sub(d)]))
        .flat_map(|b| [b, b | 0x8000_0000]);
    stride.chain(near)
}

#[test]
fn f16_to_f32_is_exact_for_all_65536_inputs() {
    for h in 0..=u16::MAX {
        let ours = fp::f16_to_f32(h);
        let theirs = f16::from_bits(h).to_f32();
        assert!(
            ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
            "{h:#06x}: {ours:e} vs {theirs:e}"
        );
    }
}

#[test]
fn bf16_to_f32_is_exact_for_all_65536_inputs() {
    for h in 0..=u16::MAX {
        let ours = fp::bf16_to_f32(h);
        let theirs = bf16::from_bits(h).to_f32();
        assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()));
    }
}

#[test]
fn f32_to_f16_and_bf16_round_to_nearest_even_like_half() {
    let mut n = 0u64;
    for b in f32_samples() {
        let x = f32::from_bits(b);
        let (o16, t16) = (fp::f32_to_f16_rn(x), f16::from_f32(x).to_bits());
        let (ob, tb) = (fp::f32_to_bf16_rn(x), bf16::from_f32(x).to_bits());
        if x.is_nan() {
            assert!(
                f16::from_bits(o16).is_nan() && bf16::from_bits(ob).is_nan(),
                "{b:#010x}"
            );
        } else {
            assert_eq!(o16, t16, "f16 of {b:#010x} ({x:e})");
            assert_eq!(ob, tb, "bf16 of {b:#010x} ({x:e})");
        }
        n += 1;
    }
    assert!(n > 4_000_000, "only {n} samples");
}

#[test]
fn atom_add_f32_flushes_subnormal_inputs_and_results() {
    let min_normal = f32::MIN_POSITIVE;
    let sub = f32::from_bits(1);
    assert_eq!(fp::atom_add_f32_ftz(1e-40, 0.0).to_bits(), 0); // subnormal input
    assert_eq!(fp::atom_add_f32_ftz(-1e-40, 0.0).to_bits(), 0); // -0 + 0 = +0
    assert_eq!(fp::atom_add_f32_ftz(min_normal, -sub), min_normal); // subnormal addend dropped
    let r = fp::atom_add_f32_ftz(1.5 * min_normal, -min_normal); // subnormal result
    assert_eq!(r.to_bits(), 0);
    let r = fp::atom_add_f32_ftz(-1.5 * min_normal, min_normal);
    assert_eq!(r.to_bits(), 0x8000_0000, "sign-preserving zero");
    assert_eq!(fp::atom_add_f32_ftz(1.0, 2.0), 3.0);
}
