//! The interpreter on small PTX samples of the subset lra's kernels use:
//! exact results where the answer is known independently, and a reported
//! error for every class of kernel bug it claims to catch.

use ptx_interp::{Arg, Device, ErrorKind, LaunchConfig, LoadOptions, Module, Schedule};

const HEAD: &str = ".version 7.0\n.target sm_80\n.address_size 64\n";

fn module(body: &str) -> Module {
    Module::load(&format!("{HEAD}{body}")).unwrap_or_else(|e| panic!("{e}"))
}

fn u32s(dev: &Device, a: u64, n: usize) -> Vec<u32> {
    dev.read(a, 4 * n)
        .unwrap()
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f32s(dev: &Device, a: u64, n: usize) -> Vec<f32> {
    u32s(dev, a, n).into_iter().map(f32::from_bits).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ------------------------------------------------------------ shuffles

const SHFL: &str = r#"
.visible .entry shfl_test(.param .u64 out, .param .u32 mode, .param .u32 b, .param .u32 c, .param .u32 mask)
{
    .reg .pred %p, %m0, %m1, %m2;
    .reg .b32 %lane, %v, %d, %b, %c, %mask, %mode, %pv;
    .reg .b64 %out, %o;
    ld.param.u64 %out, [out];
    ld.param.u32 %mode, [mode];
    ld.param.u32 %b, [b];
    ld.param.u32 %c, [c];
    ld.param.u32 %mask, [mask];
    mov.u32 %lane, %laneid;
    mad.lo.u32 %v, %lane, 100, 7;
    setp.eq.u32 %m0, %mode, 0;
    setp.eq.u32 %m1, %mode, 1;
    setp.eq.u32 %m2, %mode, 2;
    @%m0 bra UP;
    @%m1 bra DOWN;
    @%m2 bra BFLY;
    shfl.sync.idx.b32 %d|%p, %v, %b, %c, %mask;
    bra DONE;
UP:
    shfl.sync.up.b32 %d|%p, %v, %b, %c, %mask;
    bra DONE;
DOWN:
    shfl.sync.down.b32 %d|%p, %v, %b, %c, %mask;
    bra DONE;
BFLY:
    shfl.sync.bfly.b32 %d|%p, %v, %b, %c, %mask;
DONE:
    selp.u32 %pv, 1, 0, %p;
    mul.wide.u32 %o, %lane, 8;
    add.s64 %o, %out, %o;
    st.global.v2.u32 [%o], {%d, %pv};
    ret;
}
"#;

/// (value, predicate) per lane for one shuffle of a full warp.
fn shfl(mode: u32, b: u32, c: u32) -> Vec<(u32, bool)> {
    let m = module(SHFL);
    let mut dev = Device::new();
    let out = dev.alloc(8 * 32);
    let args = [
        Arg::U64(out),
        Arg::U32(mode),
        Arg::U32(b),
        Arg::U32(c),
        Arg::U32(u32::MAX),
    ];
    dev.launch(&m, "shfl_test", &LaunchConfig::linear(1, 32), &args)
        .unwrap();
    u32s(&dev, out, 64)
        .chunks(2)
        .map(|p| (p[0], p[1] != 0))
        .collect()
}

fn val(lane: u32) -> u32 {
    lane * 100 + 7
}

#[test]
fn shuffles_follow_cuda_lane_rules_with_widths() {
    // CUDA's __shfl_*_sync(width w) passes c = ((32 - w) << 8) | (up ? 0 : 31).
    let c = |w: u32, up: bool| ((32 - w) << 8) | if up { 0 } else { 31 };
    for (lane, (v, p)) in shfl(2, 1, c(32, false)).into_iter().enumerate() {
        assert_eq!((v, p), (val(lane as u32 ^ 1), true), "bfly 1, lane {lane}");
    }
    for (lane, (v, p)) in shfl(1, 4, c(32, false)).into_iter().enumerate() {
        let l = lane as u32;
        let exp = if l + 4 <= 31 {
            (val(l + 4), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "down 4, lane {lane}");
    }
    for (lane, (v, p)) in shfl(0, 4, c(32, true)).into_iter().enumerate() {
        let l = lane as u32;
        let exp = if l >= 4 {
            (val(l - 4), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "up 4, lane {lane}");
    }
    for (lane, (v, p)) in shfl(3, 5, c(32, false)).into_iter().enumerate() {
        assert_eq!((v, p), (val(5), true), "idx 5, lane {lane}");
    }
    // width 16: shuffles stay inside each half-warp
    for (lane, (v, p)) in shfl(1, 4, c(16, false)).into_iter().enumerate() {
        let l = lane as u32;
        let exp = if l % 16 + 4 < 16 {
            (val(l + 4), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "down 4 width 16, lane {lane}");
    }
    for (lane, (v, p)) in shfl(0, 4, c(16, true)).into_iter().enumerate() {
        let l = lane as u32;
        let exp = if l % 16 >= 4 {
            (val(l - 4), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "up 4 width 16, lane {lane}");
    }
    // width 8, idx 2: every lane reads lane 2 of its 8-lane segment
    for (lane, (v, p)) in shfl(3, 2, c(8, false)).into_iter().enumerate() {
        let l = lane as u32;
        assert_eq!(
            (v, p),
            (val(l / 8 * 8 + 2), true),
            "idx 2 width 8, lane {lane}"
        );
    }
    // bfly 8 with width 8: a lane may read an earlier segment, never a later one
    // (CUDA: "their own value of var will be returned")
    for (lane, (v, p)) in shfl(2, 8, c(8, false)).into_iter().enumerate() {
        let l = lane as u32;
        let exp = if (l / 8) % 2 == 1 {
            (val(l - 8), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "bfly 8 width 8, lane {lane}");
    }
    // bfly 24 with width 8: lane 16 (third segment) reads lane 8 (the
    // second), while lane 8 would read lane 16 (a later one) and keeps its own
    for (lane, (v, p)) in shfl(2, 24, c(8, false)).into_iter().enumerate() {
        let (l, j) = (lane as u32, lane as u32 ^ 24);
        let exp = if j / 8 <= l / 8 {
            (val(j), true)
        } else {
            (val(l), false)
        };
        assert_eq!((v, p), exp, "bfly 24 width 8, lane {lane}");
    }
}

// ------------------------------------------------------------ arithmetic

const ARITH: &str = r#"
.visible .entry arith(.param .u64 xs, .param .u64 ys, .param .u64 out, .param .u32 n)
{
    .reg .pred %p, %q;
    .reg .b16 %h;
    .reg .b32 %i, %n, %r, %pv;
    .reg .b64 %o, %xa, %ya, %oa;
    .reg .f32 %x, %y, %z;
    .reg .f64 %dx, %dy, %dz;
    mov.u32 %i, %tid.x;
    mov.u32 %r, %ntid.x;
    mov.u32 %n, %ctaid.x;
    mad.lo.u32 %i, %n, %r, %i;
    ld.param.u32 %n, [n];
    setp.ge.u32 %p, %i, %n;
    @%p bra END;
    mul.wide.u32 %o, %i, 4;
    ld.param.u64 %xa, [xs];
    add.s64 %xa, %xa, %o;
    ld.param.u64 %ya, [ys];
    add.s64 %ya, %ya, %o;
    ld.global.f32 %x, [%xa];
    ld.global.f32 %y, [%ya];
    mul.wide.u32 %o, %i, 96;
    ld.param.u64 %oa, [out];
    add.s64 %oa, %oa, %o;
    add.rn.f32 %z, %x, %y;
    st.global.f32 [%oa+0], %z;
    sub.rn.f32 %z, %x, %y;
    st.global.f32 [%oa+4], %z;
    mul.rn.f32 %z, %x, %y;
    st.global.f32 [%oa+8], %z;
    div.rn.f32 %z, %x, %y;
    st.global.f32 [%oa+12], %z;
    sqrt.rn.f32 %z, %x;
    st.global.f32 [%oa+16], %z;
    fma.rn.f32 %z, %x, %y, %x;
    st.global.f32 [%oa+20], %z;
    cvt.rn.f16.f32 %h, %x;
    cvt.f32.f16 %z, %h;
    st.global.f32 [%oa+24], %z;
    cvt.rn.bf16.f32 %h, %x;
    cvt.f32.bf16 %z, %h;
    st.global.f32 [%oa+28], %z;
    cvt.f64.f32 %dx, %x;
    cvt.f64.f32 %dy, %y;
    mul.rn.f64 %dz, %dx, %dy;
    div.rn.f64 %dz, %dz, 0d4008000000000000;
    cvt.rn.f32.f64 %z, %dz;
    st.global.f32 [%oa+32], %z;
    cvt.rzi.s32.f32 %r, %x;
    st.global.u32 [%oa+36], %r;
    cvt.rni.s32.f32 %r, %x;
    cvt.rn.f32.s32 %z, %r;
    st.global.f32 [%oa+40], %z;
    setp.lt.f32 %p, %x, %y;
    setp.gtu.f32 %q, %x, %y;
    selp.u32 %pv, 1, 0, %p;
    selp.u32 %r, 2, 0, %q;
    or.b32 %pv, %pv, %r;
    testp.finite.f32 %p, %x;
    selp.u32 %r, 4, 0, %p;
    or.b32 %pv, %pv, %r;
    testp.subnormal.f32 %p, %x;
    selp.u32 %r, 8, 0, %p;
    or.b32 %pv, %pv, %r;
    st.global.u32 [%oa+44], %pv;
    min.f32 %z, %x, %y;
    st.global.f32 [%oa+48], %z;
    max.f32 %z, %x, %y;
    st.global.f32 [%oa+52], %z;
    neg.f32 %z, %x;
    st.global.f32 [%oa+56], %z;
    abs.f32 %z, %x;
    st.global.f32 [%oa+60], %z;
    // every comparison (f32 in bits 0-13, f64 in 16-29), then testp's
    // kinds: flag words generated by flag_word
//FLAGS
    cvt.rmi.s32.f32 %r, %x;
    st.global.u32 [%oa+72], %r;
    cvt.rpi.s32.f32 %r, %x;
    st.global.u32 [%oa+76], %r;
    cvt.rzi.u32.f32 %r, %x;
    st.global.u32 [%oa+80], %r;
END:
    ret;
}
"#;

fn specials() -> Vec<f32> {
    vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        3.0,
        0.1,
        1e-40,
        -1e-45,
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65504.0,
        65520.0,
        2.5,
        -2.5,
        3.5,
        1e10,
        -7.25e-3,
    ]
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn float_arithmetic_and_conversions_are_ieee_exact() {
    let s = specials();
    let (xs, ys): (Vec<f32>, Vec<f32>) = s
        .iter()
        .flat_map(|&x| s.iter().map(move |&y| (x, y)))
        .unzip();
    let n = xs.len();
    let mut compares = Vec::new();
    for (k, cmp) in FLOAT_CMPS.iter().enumerate() {
        for (shift, (ty, a, b)) in [(0, ("f32", "%x", "%y")), (16, ("f64", "%dx", "%dy"))] {
            compares.push((k as u32 + shift, format!("setp.{cmp}.{ty} %p, {a}, {b};")));
        }
    }
    let kinds = [
        "testp.infinite.f32 %p, %x;",
        "testp.number.f32 %p, %x;",
        "testp.notanumber.f32 %p, %x;",
        "testp.normal.f32 %p, %x;",
        "testp.normal.f64 %p, %dx;",
        "testp.subnormal.f64 %p, %dx;",
    ];
    let kinds: Vec<(u32, String)> = (0..).zip(kinds.map(String::from)).collect();
    let flags =
        flag_word(&compares, "%pv", "%r", "[%oa+64]") + &flag_word(&kinds, "%pv", "%r", "[%oa+68]");
    let src = ARITH.replace("//FLAGS\n", &flags);
    let m = module(&src);
    let mut dev = Device::new();
    let xa = dev.alloc_from(&f32_bytes(&xs));
    let ya = dev.alloc_from(&f32_bytes(&ys));
    let out = dev.alloc(96 * n);
    let blocks = n.div_ceil(128) as u32;
    let args = [
        Arg::U64(xa),
        Arg::U64(ya),
        Arg::U64(out),
        Arg::U32(n as u32),
    ];
    dev.launch(&m, "arith", &LaunchConfig::linear(blocks, 128), &args)
        .unwrap();
    let o = f32s(&dev, out, 24 * n);
    for i in 0..n {
        let (x, y) = (xs[i], ys[i]);
        let r = &o[24 * i..24 * i + 24];
        let ctx = format!("x={x:e} y={y:e}");
        assert!(same(r[0], x + y), "add {ctx}");
        assert!(same(r[1], x - y), "sub {ctx}");
        assert!(same(r[2], x * y), "mul {ctx}");
        assert!(same(r[3], x / y), "div {ctx}");
        assert!(same(r[4], x.sqrt()), "sqrt {ctx}");
        assert!(same(r[5], x.mul_add(y, x)), "fma {ctx}");
        assert!(
            same(r[6], half::f16::from_f32(x).to_f32()),
            "f16 round trip {ctx}"
        );
        assert!(
            same(r[7], half::bf16::from_f32(x).to_f32()),
            "bf16 round trip {ctx}"
        );
        assert!(
            same(r[8], ((x as f64 * y as f64) / 3.0) as f32),
            "f64 {ctx}"
        );
        assert_eq!(r[9].to_bits() as i32, x as i32, "cvt.rzi {ctx}");
        assert!(
            same(r[10], (x.round_ties_even() as i32) as f32),
            "cvt.rni {ctx}"
        );
        // setp.gtu: greater than, or unordered
        let gtu = x > y || x.is_nan() || y.is_nan();
        let flags = (x < y) as u32
            | (gtu as u32) << 1
            | (x.is_finite() as u32) << 2
            | (x.is_subnormal() as u32) << 3;
        assert_eq!(r[11].to_bits(), flags, "setp/testp {ctx}");
        let (mn, mx) = if x.is_nan() {
            (y, y)
        } else if y.is_nan() {
            (x, x)
        } else if x == 0.0 && y == 0.0 {
            let neg = x.is_sign_negative() || y.is_sign_negative();
            let both = x.is_sign_negative() && y.is_sign_negative();
            (if neg { -0.0 } else { 0.0 }, if both { -0.0 } else { 0.0 })
        } else {
            (x.min(y), x.max(y))
        };
        assert!(same(r[12], mn), "min {ctx}");
        assert!(same(r[13], mx), "max {ctx}");
        assert_eq!(r[14].to_bits(), (-x).to_bits(), "neg {ctx}");
        assert_eq!(r[15].to_bits(), x.abs().to_bits(), "abs {ctx}");
        let mut cmps = 0;
        for (k, cmp) in FLOAT_CMPS.iter().enumerate() {
            cmps |= (float_cmp(cmp, x, y) as u32 * 0x1_0001) << k;
        }
        assert_eq!(r[16].to_bits(), cmps, "setp {ctx}");
        let normal = |x: f64, min: f64| x.is_finite() && x.abs() >= min;
        let dx = x as f64;
        let kinds = x.is_infinite() as u32
            | (!x.is_nan() as u32) << 1
            | (x.is_nan() as u32) << 2
            | (normal(dx, f32::MIN_POSITIVE as f64) as u32) << 3
            | (normal(dx, f64::MIN_POSITIVE) as u32) << 4
            | (dx.is_subnormal() as u32) << 5;
        assert_eq!(r[17].to_bits(), kinds, "testp {ctx}");
        // float to integer: saturating, NaN gives 0 (PTX ISA, cvt)
        assert_eq!(r[18].to_bits() as i32, x.floor() as i32, "cvt.rmi {ctx}");
        assert_eq!(r[19].to_bits() as i32, x.ceil() as i32, "cvt.rpi {ctx}");
        assert_eq!(r[20].to_bits(), x as u32, "cvt.rzi.u32 {ctx}");
    }
}

/// PTX for a word of flags stored at `at`: bit `bit` is set where `test`
/// (an instruction that sets `%p`) holds; `acc` and `tmp` are scratch.
fn flag_word(tests: &[(u32, String)], acc: &str, tmp: &str, at: &str) -> String {
    let mut ptx = format!("    mov.u32 {acc}, 0;\n");
    for (bit, test) in tests {
        ptx += &format!(
            "    {test}\n    selp.u32 {tmp}, {}, 0, %p;\n    or.b32 {acc}, {acc}, {tmp};\n",
            1u32 << bit
        );
    }
    ptx + &format!("    st.global.u32 {at}, {acc};\n")
}

const FLOAT_CMPS: [&str; 14] = [
    "eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan",
];

/// PTX ISA, "Floating Point Comparison Operators": the ordered ones are
/// false when either operand is NaN, the `u` ones true.
fn float_cmp(cmp: &str, x: f32, y: f32) -> bool {
    let unordered = x.is_nan() || y.is_nan();
    match cmp {
        "eq" => x == y,
        "ne" => x != y && !unordered,
        "lt" => x < y,
        "le" => x <= y,
        "gt" => x > y,
        "ge" => x >= y,
        "equ" => x == y || unordered,
        "neu" => x != y || unordered,
        "ltu" => x < y || unordered,
        "leu" => x <= y || unordered,
        "gtu" => x > y || unordered,
        "geu" => x >= y || unordered,
        "num" => !unordered,
        "nan" => unordered,
        other => unreachable!("{other}"),
    }
}

// ------------------------------------------------------------ integers, atomics

const INTS: &str = r#"
.visible .entry ints(.param .u64 out, .param .u64 cell)
{
    .reg .pred %p;
    .reg .b16 %h, %h2;
    .reg .b32 %a, %b, %r, %lo, %hi;
    .reg .b64 %o, %c, %w;
    ld.param.u64 %o, [out];
    ld.param.u64 %c, [cell];
    mov.u32 %a, -7;
    shr.s32 %r, %a, 1;
    st.global.u32 [%o+0], %r;
    shr.u32 %r, %a, 28;
    st.global.u32 [%o+4], %r;
    shl.b32 %r, %a, 33;
    st.global.u32 [%o+8], %r;
    // a .b shift right is logical
    shr.b32 %r, %a, 28;
    st.global.u32 [%o+152], %r;
    mul.hi.u32 %r, %a, %a;
    st.global.u32 [%o+12], %r;
    mul.wide.s32 %w, %a, 3;
    st.global.u64 [%o+16], %w;
    mov.b64 {%lo, %hi}, %w;
    st.global.u32 [%o+24], %hi;
    cvt.u16.u32 %h, %a;
    cvt.s32.s16 %r, %h;
    st.global.u32 [%o+28], %r;
    cvt.u32.u16 %r, %h;
    st.global.u32 [%o+32], %r;
    min.s32 %r, %a, 2;
    st.global.u32 [%o+36], %r;
    min.u32 %r, %a, 2;
    st.global.u32 [%o+40], %r;
    rem.s32 %r, %a, 4;
    st.global.u32 [%o+44], %r;
    atom.global.inc.u32 %r, [%c], 2;
    atom.global.inc.u32 %r, [%c], 2;
    atom.global.inc.u32 %r, [%c], 2;
    st.global.u32 [%o+48], %r;
    atom.global.cas.b32 %r, [%c+4], 0, 42;
    atom.global.cas.b32 %r, [%c+4], 0, 43;
    st.global.u32 [%o+52], %r;
    atom.global.exch.b32 %r, [%c+4], 9;
    st.global.u32 [%o+56], %r;
    ld.global.u32 %r, [%c+4];
    st.global.u32 [%o+60], %r;
    mul.hi.s32 %r, %a, 0x40000000;
    st.global.u32 [%o+64], %r;
    div.s32 %r, %a, 2;
    st.global.u32 [%o+68], %r;
    div.u32 %r, %a, 2;
    st.global.u32 [%o+72], %r;
    rem.u32 %r, %a, 4;
    st.global.u32 [%o+76], %r;
    max.s32 %r, %a, 2;
    st.global.u32 [%o+80], %r;
    max.u32 %r, %a, 2;
    st.global.u32 [%o+84], %r;
    or.b32 %r, %a, 15;
    st.global.u32 [%o+88], %r;
    xor.b32 %r, %a, 15;
    st.global.u32 [%o+92], %r;
    // a 16-bit result in a 32-bit register: extended by its type's sign
    cvt.s16.s32 %r, %a;
    st.global.u32 [%o+96], %r;
    cvt.u16.u32 %r, %a;
    st.global.u32 [%o+100], %r;
    mul.wide.u16 %r, %h, %h;
    st.global.u32 [%o+108], %r;
    mad.wide.u16 %r, %h, 2, 1;
    st.global.u32 [%o+156], %r;
    mad.lo.s32 %r, %a, 3, 5;
    st.global.u32 [%o+112], %r;
    mad.hi.u32 %r, %a, %a, 1;
    st.global.u32 [%o+116], %r;
    mad.wide.s32 %w, %a, 3, %w;
    st.global.u64 [%o+120], %w;
    // min.s32 at -1 and -2 against 2: a slip in masking the second
    // operand flips the signed order for one of them
    mov.u32 %r, -1;
    min.s32 %r, %r, 2;
    st.global.u32 [%o+128], %r;
    mov.u32 %r, -2;
    min.s32 %r, %r, 2;
    st.global.u32 [%o+132], %r;
    // vector mov: halves out of a word, then packed in the other order
    mov.b32 %r, 0x12345678;
    mov.b32 {%h, %h2}, %r;
    mov.b32 %r, {%h2, %h};
    st.global.u32 [%o+136], %r;
    mov.b64 %w, {%h, %h2, %h2, %h};
    st.global.u64 [%o+144], %w;
    mov.u32 %b, 2;
//SETP
    ret;
}
"#;

#[test]
fn integer_ops_widths_and_atomics() {
    let setps: Vec<(u32, String)> = (0..)
        .zip(INT_CMPS.map(|(cmp, ty, b)| format!("setp.{cmp}.{ty} %p, %a, {b};")))
        .collect();
    let setps = flag_word(&setps, "%r", "%lo", "[%o+104]");
    let m = module(&INTS.replace("//SETP\n", &setps));
    let mut dev = Device::new();
    let out = dev.alloc(160);
    let cell = dev.alloc_zeroed(8);
    dev.launch(
        &m,
        "ints",
        &LaunchConfig::linear(1, 1),
        &[Arg::U64(out), Arg::U64(cell)],
    )
    .unwrap();
    let o = u32s(&dev, out, 40);
    let a = -7i32;
    assert_eq!(o[0] as i32, a >> 1);
    assert_eq!(o[1], (a as u32) >> 28);
    assert_eq!(o[2], 0, "shift >= width gives 0");
    assert_eq!(o[3], ((a as u32 as u64 * a as u32 as u64) >> 32) as u32);
    assert_eq!(o[4] as u64 | (o[5] as u64) << 32, (-21i64) as u64);
    assert_eq!(o[6], ((-21i64) as u64 >> 32) as u32);
    assert_eq!(o[7] as i32, -7, "sign extension from 16 bits");
    assert_eq!(o[8], 0xfff9, "zero extension from 16 bits");
    assert_eq!(o[9] as i32, -7);
    assert_eq!(o[10], 2);
    assert_eq!(o[11] as i32, -3);
    assert_eq!(o[12], 2, "inc: 0→1→2→0 returns old 2");
    assert_eq!(u32s(&dev, cell, 1)[0], 0, "inc wraps at the limit");
    assert_eq!(o[13], 42, "second cas sees 42");
    assert_eq!(o[14], 42, "exch returns old");
    assert_eq!(o[15], 9);
    assert_eq!(
        o[16] as i32,
        ((a as i64 * 0x4000_0000) >> 32) as i32,
        "mul.hi.s32"
    );
    assert_eq!(o[17] as i32, a / 2, "div.s32 truncates");
    assert_eq!(o[18], a as u32 / 2, "div.u32");
    assert_eq!(o[19], a as u32 % 4, "rem.u32");
    assert_eq!(o[20], 2, "max.s32");
    assert_eq!(o[21], a as u32, "max.u32");
    assert_eq!(o[22], a as u32 | 15, "or");
    assert_eq!(o[23], a as u32 ^ 15, "xor");
    assert_eq!(o[24] as i32, -7, "cvt.s16 sign-extends in a wider register");
    assert_eq!(o[25], 0xfff9, "cvt.u16 zero-extends in a wider register");
    let mut flags = 0;
    for (k, &(cmp, ty, b)) in INT_CMPS.iter().enumerate() {
        let b: i32 = if b == "%b" { 2 } else { b.parse().unwrap() };
        let ord = if ty == "s32" {
            a.cmp(&b)
        } else {
            (a as u32).cmp(&(b as u32))
        };
        let holds = match cmp {
            "eq" => ord.is_eq(),
            "ne" => ord.is_ne(),
            "lt" | "lo" => ord.is_lt(),
            "le" | "ls" => ord.is_le(),
            "gt" | "hi" => ord.is_gt(),
            "ge" | "hs" => ord.is_ge(),
            other => unreachable!("{other}"),
        };
        flags |= (holds as u32) << k;
    }
    assert_eq!(o[26], flags, "setp on integers");
    assert_eq!(o[27], 0xfff9 * 0xfff9, "mul.wide.u16");
    assert_eq!(o[28] as i32, a * 3 + 5, "mad.lo.s32");
    let hi = ((a as u32 as u64 * a as u32 as u64) >> 32) as u32;
    assert_eq!(o[29], hi + 1, "mad.hi.u32");
    assert_eq!(
        o[30] as u64 | (o[31] as u64) << 32,
        (-42i64) as u64,
        "mad.wide.s32"
    );
    assert_eq!([o[32] as i32, o[33] as i32], [-1, -2], "min.s32");
    assert_eq!(
        o[34], 0x5678_1234,
        "mov.b32 unpack and pack, low half first"
    );
    assert_eq!(
        [o[36], o[37]],
        [0x1234_5678, 0x5678_1234],
        "mov.b64 of four halves"
    );
    assert_eq!(o[38], (a as u32) >> 28, "shr.b32");
    assert_eq!(o[39], 0xfff9 * 2 + 1, "mad.wide.u16");
}

/// Integer comparisons of `%a` = -7 with a register holding 2 and with the
/// literal -7 (equal operands): signed, unsigned and the unsigned names.
const INT_CMPS: [(&str, &str, &str); 20] = [
    ("eq", "s32", "%b"),
    ("ne", "s32", "%b"),
    ("lt", "s32", "%b"),
    ("le", "s32", "%b"),
    ("gt", "s32", "%b"),
    ("ge", "s32", "%b"),
    ("lt", "u32", "%b"),
    ("le", "u32", "%b"),
    ("gt", "u32", "%b"),
    ("ge", "u32", "%b"),
    ("lo", "u32", "%b"),
    ("hs", "u32", "%b"),
    ("eq", "s32", "-7"),
    ("ne", "s32", "-7"),
    ("lt", "s32", "-7"),
    ("le", "s32", "-7"),
    ("gt", "s32", "-7"),
    ("ge", "s32", "-7"),
    ("ls", "u32", "-7"),
    ("hi", "u32", "-7"),
];

const ATOM_F32: &str = r#"
.visible .entry atom_f32(.param .u64 cells, .param .u64 addends)
{
    .reg .b32 %t;
    .reg .b64 %c, %a, %o;
    .reg .f32 %x, %old;
    mov.u32 %t, %tid.x;
    mul.wide.u32 %o, %t, 4;
    ld.param.u64 %c, [cells];
    ld.param.u64 %a, [addends];
    add.s64 %c, %c, %o;
    add.s64 %a, %a, %o;
    ld.global.f32 %x, [%a];
    atom.global.add.f32 %old, [%c], %x;
    ret;
}
"#;

#[test]
fn atom_add_f32_flushes_subnormals_like_the_hardware() {
    let mn = f32::MIN_POSITIVE;
    let cells = [1e-40f32, 1.0, mn, 1.5 * mn, -1.5 * mn, 1.0];
    let adds = [0.0f32, f32::from_bits(1), -f32::from_bits(1), -mn, mn, 2.0];
    let want = [0.0f32, 1.0, mn, 0.0, -0.0, 3.0];
    let m = module(ATOM_F32);
    let mut dev = Device::new();
    let c = dev.alloc_from(&f32_bytes(&cells));
    let a = dev.alloc_from(&f32_bytes(&adds));
    dev.launch(
        &m,
        "atom_f32",
        &LaunchConfig::linear(1, 6),
        &[Arg::U64(c), Arg::U64(a)],
    )
    .unwrap();
    let got = f32s(&dev, c, 6);
    for i in 0..6 {
        assert_eq!(
            got[i].to_bits(),
            want[i].to_bits(),
            "cell {i}: {:e} + {:e}",
            cells[i],
            adds[i]
        );
    }
}

// ------------------------------------------------------------ block reduction + schedules

const REDUCE: &str = r#"
.visible .entry reduce(.param .u64 xs, .param .u32 n, .param .u64 partials, .param .u64 counter, .param .u64 out)
{
    .reg .pred %p, %t0, %last;
    .reg .b32 %t, %i, %n, %nt, %lane, %w, %off, %v, %old, %lim, %nb, %b;
    .reg .b64 %a, %o, %sa;
    .reg .f32 %acc, %x;
    .shared .align 4 .f32 red[32];
    .shared .align 4 .u32 islast;
    mov.u32 %t, %tid.x;
    mov.u32 %nt, %ntid.x;
    mov.u32 %b, %ctaid.x;
    mov.u32 %nb, %nctaid.x;
    mov.u32 %lane, %laneid;
    setp.eq.u32 %t0, %t, 0;
    ld.param.u32 %n, [n];
    mad.lo.u32 %i, %b, %nt, %t;
    mov.f32 %acc, 0f00000000;
LOOP:
    setp.ge.u32 %p, %i, %n;
    @%p bra WARP;
    ld.param.u64 %a, [xs];
    mul.wide.u32 %o, %i, 4;
    add.s64 %a, %a, %o;
    ld.global.f32 %x, [%a];
    add.rn.f32 %acc, %acc, %x;
    mad.lo.u32 %i, %nb, %nt, %i;
    bra LOOP;
WARP:
    mov.u32 %off, 16;
WSTEP:
    mov.b32 %v, %acc;
    shfl.sync.down.b32 %v, %v, %off, 31, 0xffffffff;
    mov.b32 %x, %v;
    add.rn.f32 %acc, %acc, %x;
    shr.u32 %off, %off, 1;
    setp.ne.u32 %p, %off, 0;
    @%p bra WSTEP;
    shr.u32 %w, %t, 5;
    mov.u64 %sa, red;
    mul.wide.u32 %o, %w, 4;
    add.s64 %sa, %sa, %o;
    setp.eq.u32 %p, %lane, 0;
    @%p st.shared.f32 [%sa], %acc;
    bar.sync 0;
    @!%t0 bra COUNT;
    ld.shared.f32 %acc, [red];
    shr.u32 %w, %nt, 5;
    mov.u32 %i, 1;
BSUM:
    setp.ge.u32 %p, %i, %w;
    @%p bra BDONE;
    mul.wide.u32 %o, %i, 4;
    mov.u64 %sa, red;
    add.s64 %sa, %sa, %o;
    ld.shared.f32 %x, [%sa];
    add.rn.f32 %acc, %acc, %x;
    add.u32 %i, %i, 1;
    bra BSUM;
BDONE:
    ld.param.u64 %a, [partials];
    mul.wide.u32 %o, %b, 4;
    add.s64 %a, %a, %o;
    st.global.f32 [%a], %acc;
    membar.gl;
    sub.u32 %lim, %nb, 1;
    ld.param.u64 %a, [counter];
    atom.global.inc.u32 %old, [%a], %lim;
    setp.eq.u32 %last, %old, %lim;
    @!%last bra COUNT;
    membar.gl;
    mov.f32 %acc, 0f00000000;
    mov.u32 %i, 0;
FSUM:
    setp.ge.u32 %p, %i, %nb;
    @%p bra FDONE;
    ld.param.u64 %a, [partials];
    mul.wide.u32 %o, %i, 4;
    add.s64 %a, %a, %o;
    ld.global.f32 %x, [%a];
    add.rn.f32 %acc, %acc, %x;
    add.u32 %i, %i, 1;
    bra FSUM;
FDONE:
    ld.param.u64 %a, [out];
    st.global.f32 [%a], %acc;
COUNT:
    ret;
}
"#;

fn reduce(xs: &[f32], blocks: u32, sched: Schedule) -> (f32, u32) {
    let m = module(REDUCE);
    let mut dev = Device::new();
    let x = dev.alloc_from(&f32_bytes(xs));
    let partials = dev.alloc(4 * blocks as usize);
    let counter = dev.alloc_zeroed(4);
    let out = dev.alloc(4);
    let args = [
        Arg::U64(x),
        Arg::U32(xs.len() as u32),
        Arg::U64(partials),
        Arg::U64(counter),
        Arg::U64(out),
    ];
    dev.launch(
        &m,
        "reduce",
        &LaunchConfig::linear(blocks, 128).with_schedule(sched),
        &args,
    )
    .unwrap();
    (f32s(&dev, out, 1)[0], u32s(&dev, counter, 1)[0])
}

/// The sample reduction's order, written out on the host.
fn reduce_reference(xs: &[f32], blocks: usize, bs: usize) -> f32 {
    let mut partials = vec![];
    for b in 0..blocks {
        let mut acc = vec![0f32; bs];
        for (t, a) in acc.iter_mut().enumerate() {
            let mut i = b * bs + t;
            while i < xs.len() {
                *a += xs[i];
                i += blocks * bs;
            }
        }
        let mut warps = vec![];
        for w in acc.chunks(32) {
            let mut v = w.to_vec();
            let mut off = 16;
            while off > 0 {
                let old = v.clone();
                for l in 0..32 {
                    if l + off < 32 {
                        v[l] = old[l] + old[l + off];
                    } else {
                        v[l] = old[l] + old[l];
                    }
                }
                off /= 2;
            }
            warps.push(v[0]);
        }
        let mut s = warps[0];
        for w in &warps[1..] {
            s += w;
        }
        partials.push(s);
    }
    partials.iter().fold(0.0, |a, p| a + p)
}

#[test]
fn reduction_matches_its_host_order_under_every_schedule() {
    let xs: Vec<f32> = (0..3001)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.001 - 0.37)
        .collect();
    let want = reduce_reference(&xs, 5, 128);
    let schedules = [
        Schedule::InOrder,
        Schedule::Reversed,
        Schedule::Random {
            seed: 1,
            resident: 2,
            max_quantum: 3,
        },
        Schedule::Random {
            seed: 7,
            resident: 5,
            max_quantum: 1,
        },
        Schedule::Random {
            seed: 99,
            resident: 3,
            max_quantum: 50,
        },
    ];
    for s in schedules {
        let (got, counter) = reduce(&xs, 5, s.clone());
        assert_eq!(got.to_bits(), want.to_bits(), "{s:?}: {got} vs {want}");
        assert_eq!(counter, 0, "inc counter wraps back to 0");
    }
}

const EXCH_ORDER: &str = r#"
.visible .entry order(.param .u64 cell, .param .u64 out)
{
    .reg .b32 %t, %old;
    .reg .b64 %c, %o, %a;
    mov.u32 %t, %tid.x;
    ld.param.u64 %c, [cell];
    atom.global.exch.b32 %old, [%c], %t;
    ld.param.u64 %a, [out];
    mul.wide.u32 %o, %t, 4;
    add.s64 %a, %a, %o;
    st.global.u32 [%a], %old;
    ret;
}
"#;

#[test]
fn random_schedules_really_reorder_threads() {
    // The order in which threads reach an atomic is visible in the values
    // they get back: the schedules above are not all the same interleaving.
    let m = module(EXCH_ORDER);
    let mut seen = std::collections::HashSet::new();
    for s in [
        Schedule::InOrder,
        Schedule::Reversed,
        Schedule::Random {
            seed: 3,
            resident: 1,
            max_quantum: 2,
        },
        Schedule::Random {
            seed: 4,
            resident: 1,
            max_quantum: 2,
        },
    ] {
        let mut dev = Device::new();
        let cell = dev.alloc_zeroed(4);
        let out = dev.alloc(4 * 64);
        dev.launch(
            &m,
            "order",
            &LaunchConfig::linear(1, 64).with_schedule(s),
            &[Arg::U64(cell), Arg::U64(out)],
        )
        .unwrap();
        seen.insert(u32s(&dev, out, 64));
    }
    assert_eq!(
        seen.len(),
        4,
        "four schedules, four different interleavings"
    );
}

const TWO_ADDS: &str = r#"
.visible .entry twice(.param .u64 cell, .param .u64 out)
{
    .reg .b32 %t, %first, %second;
    .reg .b64 %c, %o, %a;
    mov.u32 %t, %tid.x;
    ld.param.u64 %c, [cell];
    atom.global.add.u32 %first, [%c], 1;
    atom.global.add.u32 %second, [%c], 1;
    ld.param.u64 %a, [out];
    mul.wide.u32 %o, %t, 8;
    add.s64 %a, %a, %o;
    st.global.v2.u32 [%a], {%first, %second};
    ret;
}
"#;

#[test]
fn random_schedules_interleave_threads_between_instructions() {
    // Two atomics in a row: a thread that runs until it blocks gets two
    // consecutive counts; a random quantum lets others in between.
    let m = module(TWO_ADDS);
    let gaps = |s: Schedule| {
        let mut dev = Device::new();
        let cell = dev.alloc_zeroed(4);
        let out = dev.alloc(8 * 64);
        dev.launch(
            &m,
            "twice",
            &LaunchConfig::linear(1, 64).with_schedule(s),
            &[Arg::U64(cell), Arg::U64(out)],
        )
        .unwrap();
        assert_eq!(u32s(&dev, cell, 1), [128]);
        u32s(&dev, out, 128)
            .chunks(2)
            .filter(|p| p[1] != p[0] + 1)
            .count()
    };
    assert_eq!(gaps(Schedule::InOrder), 0);
    let random = Schedule::Random {
        seed: 5,
        resident: 1,
        max_quantum: 1,
    };
    assert!(
        gaps(random) > 0,
        "no thread was interrupted between its two atomics"
    );
}

// ------------------------------------------------------------ bugs it must report

fn launch_err(
    body: &str,
    kernel: &str,
    block: u32,
    args: &[Arg],
    dev: &mut Device,
) -> ptx_interp::Error {
    let m = module(body);
    match dev.launch(&m, kernel, &LaunchConfig::linear(1, block), args) {
        Ok(_) => panic!("{kernel}: expected an error"),
        Err(e) => e,
    }
}

/// A kernel body with `out` (u64) and `%t` = tid, `%o` = out + 4·tid.
fn k(body: &str) -> String {
    format!(
        r#".visible .entry k(.param .u64 out)
{{
    .reg .pred %p, %q;
    .reg .b32 %t, %v, %w;
    .reg .b64 %out, %o, %x;
    .shared .align 4 .u32 sh[64];
    ld.param.u64 %out, [out];
    mov.u32 %t, %tid.x;
    mul.wide.u32 %x, %t, 4;
    add.s64 %o, %out, %x;
{body}
    ret;
}}"#
    )
}

/// `k(body)` runs on `grid` blocks of `block` threads without an error.
fn expect_ok(body: &str, grid: u32, block: u32) {
    let m = module(&k(body));
    let mut dev = Device::new();
    let out = dev.alloc(4);
    dev.launch(
        &m,
        "k",
        &LaunchConfig::linear(grid, block),
        &[Arg::U64(out)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn expect(kind: ErrorKind, body: &str, block: u32, out_bytes: usize, needle: &str) {
    let mut dev = Device::new();
    let out = dev.alloc(out_bytes);
    let e = launch_err(&k(body), "k", block, &[Arg::U64(out)], &mut dev);
    assert_eq!(e.kind, kind, "{e}");
    assert!(e.message.contains(needle), "{needle:?} not in: {e}");
}

#[test]
fn out_of_bounds_and_misaligned_accesses_are_errors() {
    expect(
        ErrorKind::OutOfBounds,
        "    st.global.u32 [%o], %t;",
        33,
        32 * 4,
        "outside every buffer",
    );
    expect(
        ErrorKind::OutOfBounds,
        "    ld.global.u32 %v, [%o+-4];",
        1,
        8, // so that [%o+4] would be inside
        "outside every buffer",
    );
    expect(
        ErrorKind::Misaligned,
        "    ld.global.u32 %v, [%o+2];",
        1,
        64,
        "not aligned",
    );
    expect(
        ErrorKind::Misaligned,
        "    ld.global.v4.u32 {%v, %v, %v, %v}, [%o+4];",
        1,
        64,
        "not aligned to 16",
    );
    expect(ErrorKind::OutOfBounds, "    mul.wide.u32 %x, %t, 8;\n    mov.u64 %o, sh;\n    add.s64 %o, %o, %x;\n    st.shared.u32 [%o], %t;", 64, 4, "shared");
    // an offset used as a shared address (the variable's base forgotten):
    // no variable starts at 0, so it lies below all of them
    expect(
        ErrorKind::OutOfBounds,
        "    mul.wide.u32 %x, %t, 4;\n    st.shared.u32 [%x], %t;",
        1,
        4,
        "outside the block's",
    );
}

/// Every thread stores its id to `sh[tid]`, then a barrier.
const SHARED_INIT: &str =
    "    mov.u64 %o, sh;\n    add.s64 %o, %o, %x;\n    st.shared.u32 [%o], %t;\n    bar.sync 0;\n";

#[test]
fn shared_memory_races_are_errors() {
    // write-after-read: each thread rewrites its slot and reads its
    // neighbour's with no barrier (thread 1 writes what thread 0 read)
    // (thread 31 has no neighbour: it only writes)
    let war = format!(
        "    setp.eq.u32 %p, %t, 31;\n{SHARED_INIT}    st.shared.u32 [%o], %t;\n    @!%p ld.shared.u32 %v, [%o+4];"
    );
    expect(
        ErrorKind::Race,
        &war,
        32,
        4,
        "read it and thread 1 writes it",
    );
    // read-after-write: thread 1 (which completes the barrier and so runs
    // first) writes, thread 0 reads, no barrier
    let raw = format!(
        "{SHARED_INIT}    setp.eq.u32 %p, %t, 1;\n    @%p st.shared.u32 [sh], 7;\n    @!%p ld.shared.u32 %v, [sh];"
    );
    expect(
        ErrorKind::Race,
        &raw,
        2,
        4,
        "thread 1 wrote it and thread 0 reads",
    );
    // write-after-read where the reader is not thread 0 (a shadow word's
    // reader starts as 0): thread 1 reads first, then thread 0 writes
    let war1 = format!(
        "{SHARED_INIT}    setp.eq.u32 %p, %t, 1;\n    @%p ld.shared.u32 %v, [sh];\n    @!%p st.shared.u32 [sh], 7;"
    );
    expect(
        ErrorKind::Race,
        &war1,
        2,
        4,
        "thread 1 read it and thread 0 writes it",
    );
    // both threads read, then one of them writes: a race even though that
    // thread was the last to read (the word remembers several readers)
    let rrw = format!(
        "{SHARED_INIT}    ld.shared.u32 %v, [sh];\n    setp.eq.u32 %p, %t, 0;\n    @%p st.shared.u32 [sh], 7;"
    );
    expect(
        ErrorKind::Race,
        &rrw,
        2,
        4,
        "other threads read it and thread 0 writes it",
    );
    // with a barrier in between it is fine
    let ok = format!(
        "    setp.eq.u32 %p, %t, 31;\n    mov.u32 %v, 0;\n{SHARED_INIT}    @%p bra SKIP;\n    ld.shared.u32 %v, [%o+4];\nSKIP:\n    bar.sync 0;\n    st.shared.u32 [%o], %v;"
    );
    expect_ok(&ok, 1, 32);
}

#[test]
fn uninitialised_reads_are_errors() {
    // shared memory nobody wrote
    expect(
        ErrorKind::Undefined,
        "    ld.shared.u32 %v, [sh+8];",
        1,
        4,
        "uninitialised shared",
    );
    // a global buffer allocated but never written (cudaMalloc holds garbage)
    expect(
        ErrorKind::Undefined,
        "    ld.global.u32 %v, [%out];",
        1,
        4,
        "uninitialised global",
    );
    expect(
        ErrorKind::Undefined,
        "    atom.global.add.u32 %v, [%out], 1;",
        1,
        4,
        "uninitialised global",
    );
}

#[test]
fn undefined_register_values_may_move_but_not_escape() {
    // garbage may be copied and computed with (the kernel rotates unused
    // lanes this way)...
    expect_ok("    mov.u32 %w, %v;\n    add.u32 %w, %w, 1;", 1, 32);
    // ...but not be stored, used as an address, or decide a branch
    let msg = "holds no defined value";
    expect(
        ErrorKind::Undefined,
        "    add.u32 %w, %v, 1;\n    st.global.u32 [%o], %w;",
        1,
        4,
        msg,
    );
    expect(
        ErrorKind::Undefined,
        "    cvt.u64.u32 %x, %v;\n    ld.global.u32 %w, [%x];",
        1,
        4,
        msg,
    );
    expect(
        ErrorKind::Undefined,
        "    setp.eq.u32 %q, %v, 0;\n    @%q bra E;\nE:",
        1,
        4,
        msg,
    );
    expect(
        ErrorKind::Undefined,
        "    shfl.sync.bfly.b32 %w, %v, 1, 31, -1;",
        32,
        4,
        msg,
    );
}

#[test]
fn global_write_races_are_errors_unless_the_value_is_the_same() {
    expect(
        ErrorKind::Race,
        "    st.global.u32 [%out], %t;",
        2,
        4,
        "global write race",
    );
    expect_ok("    st.global.u32 [%out], 1;", 2, 32);
}

#[test]
fn barrier_misuse_is_an_error() {
    // divergent: two different bar.sync instructions in one phase
    let div = "    setp.lt.u32 %p, %t, 32;\n    @%p bra A;\n    bar.sync 0;\n    bra B;\nA:\n    bar.sync 0;\nB:";
    expect(ErrorKind::Barrier, div, 64, 4, "divergent barrier");
    // early exit before a block-wide barrier, in either order of arrival
    let early = "    setp.ge.u32 %p, %t, 40;\n    @%p ret;\n    bar.sync 0;";
    expect(ErrorKind::Barrier, early, 64, 4, "exited");
    let early_late = "    setp.lt.u32 %p, %t, 40;\n    @%p ret;\n    bar.sync 0;";
    expect(ErrorKind::Barrier, early_late, 64, 4, "exited");
    // sixteen named barriers, 0 to 15
    expect(
        ErrorKind::Barrier,
        "    bar.sync 16;",
        32,
        4,
        "out of range",
    );
    expect_ok("    bar.sync 15;", 1, 64);
}

#[test]
fn integer_division_by_zero_is_an_error() {
    for op in ["div.u32", "rem.u32", "div.s32"] {
        let body = format!("    mov.u32 %v, 0;\n    {op} %v, %t, %v;");
        expect(ErrorKind::Undefined, &body, 1, 4, "division by zero");
    }
}

#[test]
fn warp_collective_misuse_is_an_error() {
    // executing lane not in the mask
    expect(
        ErrorKind::Warp,
        "    shfl.sync.bfly.b32 %v, %t, 1, 31, 0x0000ffff;",
        32,
        4,
        "not in the member mask",
    );
    // source lane outside the mask: lanes 0..15 exchange with lanes 16..31
    let outside = "    setp.ge.u32 %p, %t, 16;\n    @%p bra E;\n    shfl.sync.bfly.b32 %v, %t, 16, 31, 0x0000ffff;\nE:";
    expect(ErrorKind::Warp, outside, 32, 4, "not in the member mask");
    // reading an exited lane
    let exited = "    setp.ge.u32 %p, %t, 16;\n    @%p ret;\n    shfl.sync.bfly.b32 %v, %t, 16, 31, 0xffffffff;";
    expect(ErrorKind::Warp, exited, 32, 4, "has exited");
    // the same in the second warp (lanes 48..63 exit), so the exit's lane
    // arithmetic finds the warp's own waiting lanes
    let exited_w1 = "    setp.ge.u32 %p, %t, 48;\n    @%p ret;\n    shfl.sync.bfly.b32 %v, %t, 16, 31, 0xffffffff;";
    expect(ErrorKind::Warp, exited_w1, 64, 4, "has exited");
    // lanes disagree on the collective
    let mismatch = "    setp.ge.u32 %p, %t, 16;\n    @%p bra U;\n    shfl.sync.down.b32 %v, %t, 1, 31, 0xffffffff;\n    bra E;\nU:\n    shfl.sync.up.b32 %v, %t, 1, 0, 0xffffffff;\nE:";
    expect(ErrorKind::Warp, mismatch, 32, 4, "mismatch");
}

#[test]
fn shuffles_in_partial_masks_and_a_partial_warp() {
    // Warp 0 as two half-warp groups with their own masks; warp 1 of a
    // 48-thread block has 16 lanes, the rest of its full mask absent.
    let body = "    setp.ge.u32 %p, %t, 32;\n    @%p bra W1;\n    setp.ge.u32 %q, %t, 16;\n    @%q bra HI;\n    shfl.sync.bfly.b32 %v, %t, 1, 31, 0x0000ffff;\n    bra E;\nHI:\n    shfl.sync.bfly.b32 %v, %t, 2, 31, 0xffff0000;\n    bra E;\nW1:\n    shfl.sync.bfly.b32 %v, %t, 4, 31, 0xffffffff;\nE:\n    st.global.u32 [%o], %v;";
    let m = module(&k(body));
    for schedule in [Schedule::InOrder, Schedule::Reversed] {
        let mut dev = Device::new();
        let out = dev.alloc(4 * 48);
        let cfg = LaunchConfig::linear(1, 48).with_schedule(schedule.clone());
        dev.launch(&m, "k", &cfg, &[Arg::U64(out)]).unwrap();
        let want: Vec<u32> = (0..48u32)
            .map(|t| match t {
                0..16 => t ^ 1,
                16..32 => t ^ 2,
                _ => t ^ 4,
            })
            .collect();
        assert_eq!(u32s(&dev, out, 48), want, "{schedule:?}");
    }
}

#[test]
fn deadlocks_report_where_every_thread_waits() {
    // warp 0 waits at a shuffle for warp... itself split: half at a barrier
    let body = "    setp.ge.u32 %p, %t, 16;\n    @%p bra B;\n    shfl.sync.bfly.b32 %v, %t, 1, 31, 0xffffffff;\n    bra E;\nB:\n    bar.sync 0;\nE:";
    let mut dev = Device::new();
    let out = dev.alloc(4);
    let e = launch_err(&k(body), "k", 32, &[Arg::U64(out)], &mut dev);
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert!(
        e.message.contains("threads 0..=15") && e.message.contains("Shfl"),
        "{e}"
    );
    assert!(
        e.message.contains("threads 16..=31") && e.message.contains("barrier 0"),
        "{e}"
    );
}

#[test]
fn endless_loops_hit_the_step_limit() {
    let m = module(&k("L:\n    bra L;"));
    let mut dev = Device::new();
    let out = dev.alloc(4);
    let mut cfg = LaunchConfig::linear(1, 1);
    cfg.max_steps = 10_000;
    let e = dev.launch(&m, "k", &cfg, &[Arg::U64(out)]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::StepLimit, "{e}");
}

#[test]
fn launch_arguments_are_checked() {
    let m = module(&k(""));
    let mut dev = Device::new();
    let e = dev
        .launch(&m, "k", &LaunchConfig::linear(1, 1), &[Arg::U32(0)])
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Launch);
    let e = dev
        .launch(&m, "nope", &LaunchConfig::linear(1, 1), &[])
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Launch);
}

#[test]
fn device_buffers_are_disjoint_aligned_bounded_and_freed() {
    let mut dev = Device::new();
    let big = 1 << 20;
    let a = dev.alloc(big);
    let b = dev.alloc_zeroed(big);
    let c = dev.alloc_aligned(100, 1 << 21);
    let d = dev.alloc_aligned(100, 1 << 21);
    assert!(
        c.is_multiple_of(1 << 21) && d.is_multiple_of(1 << 21) && c != d,
        "{c:#x} {d:#x}"
    );
    for (i, (&addr, len)) in [a, b, c, d].iter().zip([big, big, 100, 100]).enumerate() {
        dev.write(addr, &vec![i as u8 + 1; len]).unwrap();
    }
    for (i, (&addr, len)) in [a, b, c, d].iter().zip([big, big, 100, 100]).enumerate() {
        assert_eq!(dev.read(addr, len).unwrap(), vec![i as u8 + 1; len]);
        // the byte after a buffer is in its unmapped gap
        let e = dev.read(addr + len as u64, 1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfBounds, "{e}");
    }
    dev.free(b).unwrap();
    assert_eq!(dev.read(b, 4).unwrap_err().kind, ErrorKind::OutOfBounds);
    assert_eq!(dev.free(b).unwrap_err().kind, ErrorKind::OutOfBounds);
    assert_eq!(dev.free(a + 4).unwrap_err().kind, ErrorKind::OutOfBounds);
    // What the host writes into an uninitialised buffer is initialised,
    // and only that: a kernel may read it, not the bytes before it.
    let m = module(&k(
        "    ld.global.u32 %v, [%o];\n    add.u32 %v, %v, 1;\n    st.global.u32 [%o], %v;",
    ));
    let buf = dev.alloc(64);
    dev.write(buf + 16, &[7; 16]).unwrap();
    let cfg = LaunchConfig::linear(1, 4);
    dev.launch(&m, "k", &cfg, &[Arg::U64(buf + 16)]).unwrap();
    assert_eq!(u32s(&dev, buf + 16, 4), [0x0707_0708; 4]);
    let e = dev.launch(&m, "k", &cfg, &[Arg::U64(buf)]).unwrap_err();
    assert!(
        e.kind == ErrorKind::Undefined && e.message.contains("uninitialised"),
        "{e}"
    );
}

/// What a launch of `kernel` in `body` with `cfg` and one output buffer
/// of `out_bytes` returns.
fn launch_with(body: &str, cfg: &LaunchConfig, out_bytes: usize) -> ptx_interp::Result<()> {
    let m = module(body);
    let mut dev = Device::new();
    let out = dev.alloc_zeroed(out_bytes);
    dev.launch(&m, "k", cfg, &[Arg::U64(out)]).map(|_| ())
}

#[test]
fn launch_geometry_and_shared_memory_limits_are_checked() {
    let geometry = |grid: [u32; 3], block: [u32; 3]| LaunchConfig {
        grid,
        block,
        ..LaunchConfig::linear(1, 1)
    };
    let plain = k("");
    // At most 1024 threads a block, none of the six sizes zero.
    assert!(launch_with(&plain, &geometry([1, 1, 1], [8, 8, 16]), 4096).is_ok());
    for (grid, block) in [
        ([1, 1, 1], [8, 8, 17]),
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [0, 1, 1]),
        ([1, 1, 1], [32, 0, 1]),
        ([0, 1, 1], [32, 1, 1]),
        ([1, 1, 0], [32, 1, 1]),
    ] {
        let e = launch_with(&plain, &geometry(grid, block), 4096).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Launch, "{grid:?} {block:?}: {e}");
        assert!(e.message.contains("bad launch geometry"), "{e}");
    }
    // .reqntid: exactly that block; .maxntid: at most its product.
    let with_directive =
        |d: &str| k("").replacen("(.param .u64 out)", &format!("(.param .u64 out) {d}"), 1);
    let req = with_directive(".reqntid 32, 2");
    assert!(launch_with(&req, &geometry([1, 1, 1], [32, 2, 1]), 256).is_ok());
    let e = launch_with(&req, &geometry([1, 1, 1], [64, 1, 1]), 256).unwrap_err();
    assert!(
        e.kind == ErrorKind::Launch && e.message.contains(".reqntid"),
        "{e}"
    );
    let max = with_directive(".maxntid 64");
    assert!(launch_with(&max, &geometry([1, 1, 1], [16, 4, 1]), 256).is_ok());
    let e = launch_with(&max, &geometry([1, 1, 1], [65, 1, 1]), 512).unwrap_err();
    assert!(
        e.kind == ErrorKind::Launch && e.message.contains(".maxntid"),
        "{e}"
    );
    // Shared memory: static (256 bytes in `k`) plus dynamic, at most
    // 227 KiB (sm_80/sm_90's opt-in maximum); dynamic only with an
    // `.extern .shared` array to hold it.
    let dynamic = |bytes: usize| LaunchConfig {
        dynamic_shared: bytes,
        ..LaunchConfig::linear(1, 32)
    };
    let e = launch_with(&plain, &dynamic(4), 128).unwrap_err();
    assert!(
        e.kind == ErrorKind::Launch && e.message.contains(".extern .shared"),
        "{e}"
    );
    let ext = k("").replacen(
        ".shared .align 4 .u32 sh[64];",
        ".shared .align 4 .u32 sh[64];\n    .extern .shared .align 4 .b8 dyn[];",
        1,
    );
    assert!(launch_with(&ext, &dynamic(227 * 1024 - 256), 128).is_ok());
    let e = launch_with(&ext, &dynamic(227 * 1024 - 255), 128).unwrap_err();
    assert!(
        e.kind == ErrorKind::Launch && e.message.contains("exceed"),
        "{e}"
    );
}

/// `%tid`, `%ntid`, `%ctaid` and `%nctaid` in all three dimensions, and
/// every thread of a 3-D grid of 3-D blocks run once.
#[test]
fn three_dimensional_launches_number_threads_and_blocks_like_cuda() {
    let body = r#".visible .entry k(.param .u64 out)
{
    .reg .b32 %tx, %ty, %tz, %nx, %ny, %nz, %bx, %by, %bz, %gx, %gy, %gz, %i, %j;
    .reg .b64 %out, %o;
    ld.param.u64 %out, [out];
    mov.u32 %tx, %tid.x;
    mov.u32 %ty, %tid.y;
    mov.u32 %tz, %tid.z;
    mov.u32 %nx, %ntid.x;
    mov.u32 %ny, %ntid.y;
    mov.u32 %nz, %ntid.z;
    mov.u32 %bx, %ctaid.x;
    mov.u32 %by, %ctaid.y;
    mov.u32 %bz, %ctaid.z;
    mov.u32 %gx, %nctaid.x;
    mov.u32 %gy, %nctaid.y;
    mov.u32 %gz, %nctaid.z;
    // i = thread's index in its block, j = block's index in the grid
    mad.lo.u32 %i, %tz, %ny, %ty;
    mad.lo.u32 %i, %i, %nx, %tx;
    mad.lo.u32 %j, %bz, %gy, %by;
    mad.lo.u32 %j, %j, %gx, %bx;
    mul.lo.u32 %j, %j, %nx;
    mul.lo.u32 %j, %j, %ny;
    mul.lo.u32 %j, %j, %nz;
    add.u32 %i, %i, %j;
    mul.wide.u32 %o, %i, 48;
    add.s64 %o, %out, %o;
    st.global.v4.u32 [%o], {%tx, %ty, %tz, %bx};
    st.global.v4.u32 [%o+16], {%by, %bz, %nx, %ny};
    st.global.v4.u32 [%o+32], {%nz, %gx, %gy, %gz};
    ret;
}"#;
    // Sizes with common factors, x + y != x * y: with coprime ones a wrong
    // split of the linear index (`l * x % y` for `l / x % y`) can still be
    // a bijection, and `l / (x + y)` is `l / (x * y)` for 2 and 2.
    let (grid, block) = ([2u32, 4, 3], [4u32, 2, 3]);
    let threads = (grid.iter().product::<u32>() * block.iter().product::<u32>()) as usize;
    let m = module(body);
    for schedule in [Schedule::InOrder, Schedule::Reversed] {
        let mut dev = Device::new();
        let out = dev.alloc(48 * threads);
        let cfg = LaunchConfig {
            grid,
            block,
            ..LaunchConfig::linear(1, 1).with_schedule(schedule.clone())
        };
        let report = dev.launch(&m, "k", &cfg, &[Arg::U64(out)]).unwrap();
        // three 16-byte vector stores per thread
        assert_eq!(report.global_store_bytes, 48 * threads as u64);
        let got = u32s(&dev, out, 12 * threads);
        let mut want = Vec::new();
        for bz in 0..grid[2] {
            for by in 0..grid[1] {
                for bx in 0..grid[0] {
                    for tz in 0..block[2] {
                        for ty in 0..block[1] {
                            for tx in 0..block[0] {
                                want.extend([tx, ty, tz, bx, by, bz]);
                                want.extend(block);
                                want.extend(grid);
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(got, want, "{schedule:?}");
    }
}

// ------------------------------------------------------------ fail closed

#[test]
fn anything_outside_the_subset_is_a_load_error() {
    let cases = [
        ("    bogus.u32 %v, %t;", "unsupported instruction"),
        ("    add.ftz.f32 %f, %f, %f;", ".ftz"),
        ("    add.f32 %f, %f, %f;", "rounding modifier"),
        ("    add.rz.f32 %f, %f, %f;", "round-to-nearest"),
        ("    div.approx.f32 %f, %f, %f;", "approximate"),
        ("    div.full.f32 %f, %f, %f;", "approximate"),
        ("    sqrt.approx.f32 %f, %f;", "approximate"),
        ("    ex2.approx.f32 %f, %f;", "transcendental"),
        ("    ld.local.u32 %v, [%o];", ".local"),
        ("    ld.const.u32 %v, [%o];", ".const"),
        ("    ld.global.u32.weird %v, [%o];", "unsupported modifier"),
        ("    add.u128 %v, %v, %v;", "exactly one type"),
        ("    .local .u32 tmp;", "unsupported directive"),
        ("    shfl.bfly.b32 %v, %v, 1, 31;", "shfl.sync"),
        ("    bar.arrive 0, 64;", "bar.sync"),
        ("    bar.sync 0, 64;", "thread count"),
        ("    bar.sync;", "barrier id"),
        ("    cvt.f32.f64 %f, %d;", "needs .rn"),
        ("    cvt.rz.f16.f32 %h, %f;", "only .rn"),
        ("    add.u32 %v, %f, %v;", "does not fit"),
        ("    add.rn.f32 %f, %d, %f;", "does not fit"),
        ("    add.rn.f32 %f, %f, 1;", "integer literal"),
        ("    mul.u32 %v, %v, %v;", ".lo/.hi/.wide"),
        ("    bra NOWHERE;", "unknown label"),
        ("    atom.global.add.f16 %h, [%o], %h;", "not allowed"),
        // outside what lra's kernels use, so not modelled (fail closed)
        ("    ld.u32 %v, [%o];", "needs a state space"),
        ("    st.u32 [%o], %v;", "needs a state space"),
        ("    cvta.global.u64 %o, %o;", "unsupported instruction"),
        (
            "    vote.sync.any.pred %p, %p, -1;",
            "unsupported instruction",
        ),
        ("    mov.u32 %v, %warpid;", "unknown register %warpid"),
        (
            "    mov.u32 %v, %lanemask_lt;",
            "unknown register %lanemask_lt",
        ),
        ("    rcp.rn.f32 %f, %f;", "unsupported instruction"),
        ("    neg.s32 %v, %v;", "only f32/f64"),
        ("    not.b32 %v, %v;", "unsupported instruction"),
        ("    and.pred %p, %p, %p;", "predicate logic"),
        ("    setp.lt.and.u32 %p, %v, 1, %p;", "predicate logic"),
        ("    selp.u32 %v, 1, 0, !%p;", "negated predicate operand"),
        ("    atom.shared.add.u32 %v, [%o], 1;", "outside .global"),
        (
            "    atom.global.min.u32 %v, [%o], 1;",
            "unsupported operation",
        ),
        ("    atom.global.add.f64 %d, [%o], %d;", "not allowed"),
    ];
    for (line, needle) in cases {
        let src = format!(
            "{HEAD}.visible .entry k(.param .u64 out)\n{{\n    .reg .pred %p;\n    .reg .b16 %h;\n    .reg .b32 %v;\n    .reg .f32 %f;\n    .reg .f64 %d;\n    .reg .b64 %o;\n{line}\n    ret;\n}}\n"
        );
        match Module::load(&src) {
            Ok(_) => panic!("accepted: {line}"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Load, "{line}: {e}");
                assert!(e.message.contains(needle), "{line}: {needle:?} not in {e}");
            }
        }
    }
    for bad_module in [
        ".version 7.0\n.global .u32 g;\n",
        ".version 7.0\n.func f() { ret; }\n",
        // shared variables are declared in the kernel, as lra.ptx does
        ".version 7.0\n.shared .u32 g;\n",
        ".version 7.0\n.extern .shared .b8 dyn[];\n",
    ] {
        assert_eq!(
            Module::load(bad_module).unwrap_err().kind,
            ErrorKind::Load,
            "{bad_module}"
        );
    }
}

#[test]
fn inexact_instructions_can_be_allowed_and_are_counted() {
    let src = format!(
        "{HEAD}.visible .entry k()\n{{\n    .reg .f32 %f;\n    mov.f32 %f, 0f3F800000;\n    add.f32 %f, %f, %f;\n    div.approx.f32 %f, %f, %f;\n    ret;\n}}\n"
    );
    let m = Module::load_with(
        &src,
        &LoadOptions {
            allow_inexact: true,
        },
    )
    .unwrap();
    let r: Vec<_> = m
        .inexact_report()
        .iter()
        .map(|(op, _)| op.as_str())
        .collect();
    assert_eq!(r, ["add.f32", "div.approx.f32"]);
}

/// Thread 1 of each block writes the block's slot; thread 0 counts the
/// block out (a gpu-scope fence, then `atom`) and the last block reads
/// every slot. Where the writer's side fences (`mode`): 0, thread 0 after
/// the barrier; 1, every thread before it (lra.ptx's count-out); 2, thread
/// 0 alone before it, which covers only thread 0's own (no) writes; 3,
/// every thread before it, and then thread 1 writes its slot (and every
/// thread a word of `scratch`): those writes stay unpublished.
const COUNT_OUT: &str = r#"
.visible .entry k(.param .u64 data, .param .u64 count, .param .u32 mode, .param .u64 scratch)
{
    .reg .pred %p, %t0, %w, %late, %last;
    .reg .b32 %t, %b, %nb, %old, %v, %i, %mode;
    .reg .b64 %d, %c, %o, %s;
    ld.param.u64 %d, [data];
    ld.param.u64 %c, [count];
    ld.param.u32 %mode, [mode];
    mov.u32 %t, %tid.x;
    mov.u32 %b, %ctaid.x;
    mov.u32 %nb, %nctaid.x;
    setp.eq.u32 %t0, %t, 0;
    setp.eq.u32 %w, %t, 1;
    setp.eq.u32 %late, %mode, 3;
    mul.wide.u32 %o, %b, 4;
    add.s64 %o, %d, %o;
    @%late bra ALL_FENCE;
    @%w st.global.u32 [%o], %b;
    setp.eq.u32 %p, %mode, 1;
    @%p membar.gl;
    setp.eq.u32 %p, %mode, 2;
    @!%t0 bra FENCED;
    @%p membar.gl;
    bra FENCED;
ALL_FENCE:
    membar.gl;
    @%w st.global.u32 [%o], %b;
    // and every thread writes a word of its own after its fence
    ld.param.u64 %s, [scratch];
    mad.lo.u32 %v, %b, 64, %t;
    mul.wide.u32 %o, %v, 4;
    add.s64 %s, %s, %o;
    st.global.u32 [%s], %t;
FENCED:
    bar.sync 0;
    @!%t0 bra DONE;
    setp.eq.u32 %p, %mode, 0;
    @%p membar.gl;
    atom.global.add.u32 %old, [%c], 1;
    sub.u32 %v, %nb, 1;
    setp.eq.u32 %last, %old, %v;
    @!%last bra DONE;
    membar.gl;
    mov.u32 %i, 0;
READ:
    mul.wide.u32 %o, %i, 4;
    add.s64 %o, %d, %o;
    ld.global.u32 %v, [%o];
    add.u32 %i, %i, 1;
    setp.lt.u32 %p, %i, %nb;
    @%p bra READ;
DONE:
    ret;
}
"#;

#[test]
fn a_fence_before_a_barrier_covers_only_its_own_thread() {
    let m = module(COUNT_OUT);
    for schedule in [Schedule::InOrder, Schedule::Reversed] {
        for mode in 0..4u32 {
            let mut dev = Device::new();
            let data = dev.alloc_zeroed(4 * 3);
            let count = dev.alloc_zeroed(4);
            let scratch = dev.alloc(4 * 3 * 64);
            let cfg = LaunchConfig::linear(3, 64).with_schedule(schedule.clone());
            let args = [
                Arg::U64(data),
                Arg::U64(count),
                Arg::U32(mode),
                Arg::U64(scratch),
            ];
            let r = dev.launch(&m, "k", &cfg, &args);
            if mode >= 2 {
                let e = r.unwrap_err();
                assert_eq!(e.kind, ErrorKind::Race, "{schedule:?}: {e}");
                assert!(e.message.contains("thread 1 of block"), "{e}");
            } else {
                r.unwrap_or_else(|e| panic!("{schedule:?}, mode {mode}: {e}"));
                assert_eq!(u32s(&dev, data, 3), [0, 1, 2]);
            }
        }
    }
}

#[test]
fn cross_block_handover_needs_fence_and_atomic() {
    // each block publishes a value and reads its neighbour's with no
    // synchronisation: a race in whichever order the blocks run
    let body = r#"
.visible .entry k(.param .u64 out)
{
    .reg .b32 %b, %nb, %n, %v;
    .reg .b64 %out, %o;
    ld.param.u64 %out, [out];
    mov.u32 %b, %ctaid.x;
    mov.u32 %nb, %nctaid.x;
    mul.wide.u32 %o, %b, 4;
    add.s64 %o, %out, %o;
    st.global.u32 [%o], %b;
    add.u32 %n, %b, 1;
    rem.u32 %n, %n, %nb;
    mul.wide.u32 %o, %n, 4;
    add.s64 %o, %out, %o;
    ld.global.u32 %v, [%o];
    ret;
}
"#;
    let m = module(body);
    for s in [
        Schedule::InOrder,
        Schedule::Reversed,
        Schedule::Random {
            seed: 1,
            resident: 2,
            max_quantum: 1,
        },
    ] {
        let mut dev = Device::new();
        let out = dev.alloc_zeroed(8);
        let cfg = LaunchConfig::linear(2, 1).with_schedule(s.clone());
        let e = dev.launch(&m, "k", &cfg, &[Arg::U64(out)]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Race, "{s:?}: {e}");
        assert!(e.message.contains("global memory race"), "{e}");
    }
    // the reduction sample above hands over through membar + atom.inc and
    // passes under every schedule (reduction_matches_its_host_order_...)
}

/// Two blocks of one thread; `x` holds words a0 a1 b0 b1 c0 c1. Block b
/// reads a_b, then the half-word at b_b + 2 (`mode` 1: after its fence),
/// and (`mode` 2) writes the half-word at c_b + 2 after its fence; then
/// it counts itself out. The last block overwrites the other block's a and
/// b and reads its c. Only what a block did before its fence is published.
const FENCED_HALVES: &str = r#"
.visible .entry k(.param .u64 x, .param .u64 count, .param .u32 mode)
{
    .reg .pred %late_read, %late_write, %last;
    .reg .b16 %h;
    .reg .b32 %b, %old, %mode, %o, %v;
    .reg .b64 %x, %c, %mine, %other;
    ld.param.u64 %x, [x];
    ld.param.u64 %c, [count];
    ld.param.u32 %mode, [mode];
    setp.eq.u32 %late_read, %mode, 1;
    setp.eq.u32 %late_write, %mode, 2;
    mov.u32 %b, %ctaid.x;
    mul.wide.u32 %mine, %b, 4;
    add.s64 %mine, %x, %mine;
    ld.global.u32 %v, [%mine];
    @!%late_read ld.global.b16 %h, [%mine+10];
    membar.gl;
    @%late_read ld.global.b16 %h, [%mine+10];
    @%late_write st.global.b16 [%mine+18], 1;
    atom.global.add.u32 %old, [%c], 1;
    setp.eq.u32 %last, %old, 1;
    @!%last bra DONE;
    membar.gl;
    sub.u32 %o, 1, %b;
    mul.wide.u32 %other, %o, 4;
    add.s64 %other, %x, %other;
    st.global.u32 [%other], 1;
    st.global.u32 [%other+8], 1;
    ld.global.u32 %v, [%other+16];
DONE:
    ret;
}
"#;

#[test]
fn accesses_after_a_fence_stay_unpublished_and_races_name_their_byte() {
    let m = module(FENCED_HALVES);
    // InOrder runs block 0 to its end first, Reversed block 1: the other
    // block is the one the last block's accesses race with
    for (schedule, other) in [(Schedule::InOrder, 0u64), (Schedule::Reversed, 1)] {
        for mode in 0..3u32 {
            let mut dev = Device::new();
            let x = dev.alloc_zeroed(24);
            let count = dev.alloc_zeroed(4);
            let cfg = LaunchConfig::linear(2, 1).with_schedule(schedule.clone());
            let args = [Arg::U64(x), Arg::U64(count), Arg::U32(mode)];
            let r = dev.launch(&m, "k", &cfg, &args);
            let ctx = format!("{schedule:?}, mode {mode}");
            if mode == 0 {
                r.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                continue;
            }
            let e = r.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Race, "{ctx}: {e}");
            // the first racing byte is the half-word's, 2 bytes into the word
            let (word, access) = if mode == 1 {
                (8, "(a read), and thread 0 writes it")
            } else {
                (16, "and thread 0 reads it")
            };
            let at = format!("global memory race at {:#x}:", x + word + 4 * other + 2);
            assert!(e.message.contains(&at), "{ctx}: {at:?} not in {e}");
            assert!(e.message.contains(access), "{ctx}: {access:?} not in {e}");
        }
    }
}
