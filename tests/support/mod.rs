//! Helpers shared by the integration tests (`mod support;`); not every
//! test binary uses every helper.
#![allow(dead_code)]

/// Deterministic pseudo-random values in [lo, hi) (xorshift64).
pub fn uniform(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// The bits of a report, so that two reports compare equal exactly when
/// they are the same (NaN included).
pub fn info_bits(i: &lra::ffi::lra_reeval_info) -> [u64; 7] {
    [
        i.phi.to_bits(),
        i.rho.to_bits(),
        i.scale.to_bits(),
        i.lr_before.to_bits(),
        i.lr.to_bits(),
        i.decision as u64,
        i.skip_reason as u64,
    ]
}
