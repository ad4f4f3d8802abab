//! Bit-exact floating-point conversions that `cvt` performs, written from
//! the IEEE 754 definitions (not delegated to the `half` crate, so the tests
//! that compare them against `half` are an independent check).

/// f32 → f16, round to nearest, ties to even (`cvt.rn.f16.f32`).
/// NaN stays NaN (quiet bit set, top payload bits kept).
pub fn f32_to_f16_rn(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return if man == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | (man >> 13) as u16
        };
    }
    // Unbiased exponent; f32 subnormals are far below f16's range.
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7c00;
    }
    if exp == 0 || e < -25 {
        // |x| < 2^-25 rounds to zero (2^-25 itself is a tie to even → 0).
        return sign;
    }
    // The 24-bit significand, and the number of its bits to drop: 13 for
    // normals, more for subnormals.
    let full = man | 0x80_0000;
    let shift = if e >= -14 { 13 } else { 13 + (-14 - e) } as u32;
    let kept = full >> shift;
    let rem = full & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    let mut q = kept;
    if rem > half || (rem == half && (kept & 1) == 1) {
        q += 1;
    }
    if e >= -14 {
        // normal: q holds implicit bit at bit 10; carry may bump the exponent
        let bits = (((e + 15) as u32) << 10) + (q - 0x400);
        sign | bits as u16 // bits == 0x7c00 on overflow to inf: correct
    } else {
        sign | q as u16 // subnormal (q may reach 0x400 = smallest normal: correct)
    }
}

/// f16 → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal: value = man · 2^-24, exact in f32
            let v = (man as f32) * f32::from_bits(0x3380_0000);
            return f32::from_bits(v.to_bits() | sign);
        }
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 → bf16, round to nearest, ties to even (`cvt.rn.bf16.f32`).
pub fn f32_to_bf16_rn(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let lsb = (b >> 16) & 1;
    let rounded = b.wrapping_add(0x7fff + lsb);
    (rounded >> 16) as u16
}

/// bf16 → f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `atom.add.f32` / `red.add.f32`: round to nearest even, subnormal inputs
/// and results flushed to sign-preserving zero (PTX ISA, atom).
pub fn atom_add_f32_ftz(a: f32, b: f32) -> f32 {
    ftz(ftz(a) + ftz(b))
}

fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}
