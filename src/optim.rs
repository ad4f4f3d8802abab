//! Optimizer definitions: kinds, hyper-parameters, state slots and the math
//! of ONE element. This file is the single source of truth for elementwise
//! results: the CPU backend calls these functions, and the PTX kernels in
//! `kernels/` mirror them operation for operation (every f32 operation is
//! rounded separately, no contraction into FMA), so both produce the same
//! bits.

use half::{bf16, f16};

/// The wrapped optimizer. Numeric values are part of the C ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    Sgd = 0,
    Momentum = 1,
    Nesterov = 2,
    Adagrad = 3,
    Rmsprop = 4,
    Adam = 5,
    AdamW = 6,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 7] = [
        OptimizerKind::Sgd,
        OptimizerKind::Momentum,
        OptimizerKind::Nesterov,
        OptimizerKind::Adagrad,
        OptimizerKind::Rmsprop,
        OptimizerKind::Adam,
        OptimizerKind::AdamW,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Momentum => "momentum",
            OptimizerKind::Nesterov => "nesterov",
            OptimizerKind::Adagrad => "adagrad",
            OptimizerKind::Rmsprop => "rmsprop",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        }
    }

    /// Number of f32 state values per parameter element.
    pub fn state_slots(self) -> usize {
        match self {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Momentum | OptimizerKind::Nesterov => 1,
            OptimizerKind::Adagrad | OptimizerKind::Rmsprop => 1,
            OptimizerKind::Adam | OptimizerKind::AdamW => 2,
        }
    }
}

/// Element type of parameters and gradients. Numeric values are ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl DType {
    /// Every dtype, in value order (`ALL[v]` has value `v`).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// A storage element: f32, f16 or bf16, converted to and from f32 with
/// round-to-nearest-even (what `cvt.rn` does in PTX).
pub trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The bits of +∞ in this format.
    const INF_BITS: u32;
    /// The storage bits without the sign: the value is finite iff they are
    /// below [`Elem::INF_BITS`]. Cheaper than a conversion, so the guard's
    /// read-only check runs at memory speed for every dtype.
    fn magnitude_bits(self) -> u32;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    const INF_BITS: u32 = 0x7f80_0000;
    #[inline(always)]
    fn magnitude_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
}

/// The conversions of `half` (same bits: NaN payloads kept and quietened,
/// round to nearest even, subnormals), written as selects that vectorise:
/// `half` converts one element per call behind a run-time F16C check,
/// which never vectorises (f16 steps took 5 ns per parameter, 5-13 times
/// the copy bound; these made them 2-3 times faster). The CPU backend's
/// AVX2 build converts f16 with F16C instead, which is faster still; these
/// serve the baseline build and tails. Their one float operation (an
/// exact int-to-float product) has normal operands and results, so
/// neither a caller's FTZ/DAZ nor its rounding mode can change the bits,
/// as with F16C's conversions (whose rounding is fixed by the instruction).
/// The unit tests below check them against `half` (and all 2^32 f32 inputs
/// were checked once).
impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let b = self.to_bits() as u32;
        let mag = b & 0x7fff;
        // exponent 1..=30: rebias by 127 - 15
        let normal = (mag << 13) + ((127 - 15) << 23);
        // exponent 0: mag × 2^-24, exact (both factors and the product are
        // normal f32s; zero stays zero)
        let subnormal = (mag as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
        let quiet = if mag > 0x7c00 { 0x0040_0000 } else { 0 };
        let inf_nan = 0x7f80_0000 | quiet | (mag & 0x3ff) << 13;
        let bits = if mag < 0x0400 {
            subnormal
        } else if mag < 0x7c00 {
            normal
        } else {
            inf_nan
        };
        f32::from_bits((b & 0x8000) << 16 | bits)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let x = v.to_bits();
        let mag = x & 0x7fff_ffff;
        // f16 exponent 1..=30: rebias, then round to nearest even by adding
        // just under half an ulp plus the kept last bit (a carry may reach
        // +inf, as it should)
        let normal =
            mag.wrapping_add(((15u32.wrapping_sub(127)) << 23) + 0xfff + ((mag >> 13) & 1)) >> 13;
        // f16 exponent ≤ 0 (|v| < 2^-14): the significand with its hidden
        // bit shifted right by 126 - exponent (14 to 24 bits; 25 leaves
        // nothing, as for every smaller exponent), rounded to nearest even:
        // up when the first dropped bit is set and another dropped bit or
        // the kept last bit is too. Integer-only, like the rest: the
        // caller's rounding mode and FTZ/DAZ cannot change the bits.
        let full = mag & 0x007f_ffff | 0x0080_0000;
        let drop = 126u32.saturating_sub(mag >> 23).clamp(14, 25);
        let half_ulp = 1u32 << (drop - 1);
        let round_up = (full & half_ulp != 0) & (full & (3 * half_ulp - 1) != 0);
        let subnormal = (full >> drop) + round_up as u32;
        // NaN: quietened, the payload's high bits kept; else ±inf
        let inf_nan = if mag > 0x7f80_0000 {
            0x7e00 | (mag & 0x007f_ffff) >> 13
        } else {
            0x7c00
        };
        let bits = if mag >= 0x4780_0000 {
            inf_nan
        } else if mag >= 0x3880_0000 {
            normal
        } else {
            subnormal
        };
        f16::from_bits(((x >> 16) & 0x8000 | bits) as u16)
    }
    const INF_BITS: u32 = 0x7c00;
    #[inline(always)]
    fn magnitude_bits(self) -> u32 {
        self.to_bits() as u32 & 0x7fff
    }
}

/// The conversions of `half` (same bits, NaN payloads kept and quietened,
/// round to nearest even), written without branches: `half`'s early
/// returns vectorise into longer code than these selects (bf16 steps
/// 10–25% faster with these, `benches/kernel_cost.rs`). The unit test
/// below checks them against `half`. The CPU backend's AVX2 build
/// converts NaN-free sub-blocks without the selects (a shift; an add and a
/// shift) and uses these for the baseline build, tails and sub-blocks
/// holding a NaN.
impl Elem for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let b = self.to_bits() as u32;
        let quiet = if b & 0x7fff > 0x7f80 { 0x40 } else { 0 };
        f32::from_bits((b | quiet) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
        let nan = (x >> 16) | 0x40;
        bf16::from_bits(if x & 0x7fff_ffff > 0x7f80_0000 {
            nan
        } else {
            rounded
        } as u16)
    }
    const INF_BITS: u32 = 0x7f80;
    #[inline(always)]
    fn magnitude_bits(self) -> u32 {
        self.to_bits() as u32 & 0x7fff
    }
}

/// Hyper-parameters in f64 as configured (validated by the config layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// β for Momentum / Nesterov.
    pub momentum: f64,
    /// α for RMSprop.
    pub alpha: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Coupled L2 decay (added to the gradient) for every optimizer except
    /// AdamW, where it is decoupled (λθ added to the direction).
    pub weight_decay: f64,
}

impl Hyper {
    /// All six by their `lra_config` names in checkpoint order, each with
    /// whether `kind`'s math (`StepScalars::new`, `direction`) reads it.
    fn fields(&self, kind: OptimizerKind) -> [(&'static str, f64, bool); 6] {
        use OptimizerKind::*;
        let momentum = matches!(kind, Momentum | Nesterov);
        let adam = matches!(kind, Adam | AdamW);
        [
            ("momentum", self.momentum, momentum),
            ("alpha", self.alpha, kind == Rmsprop),
            ("beta1", self.beta1, adam),
            ("beta2", self.beta2, adam),
            ("eps", self.eps, matches!(kind, Adagrad | Rmsprop) || adam),
            ("weight_decay", self.weight_decay, true),
        ]
    }

    /// The hyper-parameters `kind`'s math reads. Checkpoints match these
    /// and only these: the others cannot change a step.
    pub fn read_by(&self, kind: OptimizerKind) -> impl Iterator<Item = (&'static str, f64)> {
        self.fields(kind)
            .into_iter()
            .filter(|&(_, _, read)| read)
            .map(|(name, value, _)| (name, value))
    }

    /// The six values in checkpoint order, those `kind` does not read as
    /// +0: handles that differ only there write the same checkpoint, and a
    /// checkpoint loaded into either saves back to its own bytes.
    pub fn checkpoint_array(&self, kind: OptimizerKind) -> [f64; 6] {
        self.fields(kind)
            .map(|(_, value, read)| if read { value } else { 0.0 })
    }

    /// Compares a checkpoint's six values (checkpoint order) with these:
    /// those `kind` reads bit for bit (−0 and 0 can give different bits),
    /// the others must be the +0 lra writes. Says what differs.
    pub fn checkpoint_mismatch(&self, kind: OptimizerKind, saved: [f64; 6]) -> Option<String> {
        self.fields(kind)
            .into_iter()
            .zip(saved)
            .find_map(|((name, mine, read), theirs)| {
                if read && theirs.to_bits() != mine.to_bits() {
                    Some(format!(
                        "checkpoint has {name} = {theirs:?}, this handle {mine:?} ({} reads {name})",
                        kind.name()
                    ))
                } else if !read && theirs.to_bits() != 0 {
                    Some(format!(
                        "checkpoint has {name} = {theirs:?}, which {} does not read (lra writes 0 there)",
                        kind.name()
                    ))
                } else {
                    None
                }
            })
    }

    /// PyTorch's defaults, except β = 0.5 for Momentum/Nesterov and
    /// β1 = 0.5 for Adam/AdamW (the paper's choice, ALGORITHM.md).
    pub fn defaults(kind: OptimizerKind) -> Hyper {
        Hyper {
            momentum: 0.5,
            alpha: 0.99,
            beta1: 0.5,
            beta2: 0.999,
            eps: match kind {
                OptimizerKind::Adagrad => 1e-10,
                _ => 1e-8,
            },
            weight_decay: match kind {
                OptimizerKind::AdamW => 1e-2,
                _ => 0.0,
            },
        }
    }
}

/// The f32 scalars one step's elementwise math reads. Every backend derives
/// them with [`StepScalars::new`] from the same f64 inputs, so they are the
/// same bits everywhere. `#[repr(C)]` because the CUDA backend hands this
/// exact layout to its kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// Momentum β, RMSprop α or Adam β1.
    pub b1: f32,
    /// 1 − b1 (RMSprop, Adam, AdamW; unused by Momentum/Nesterov).
    pub omb1: f32,
    /// Adam β2.
    pub b2: f32,
    /// 1 − β2.
    pub omb2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Adam: 1 / (1 − β1^t).
    pub inv_bc1: f32,
    /// Adam: 1 / sqrt(1 − β2^t).
    pub inv_bc2_sqrt: f32,
}

/// Running products β1^t and β2^t over the APPLIED steps, kept in f64.
/// Multiplying (rather than calling `powi`) is exact IEEE arithmetic, so
/// the host and the device derive identical bias corrections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasPowers {
    pub pow1: f64,
    pub pow2: f64,
}

impl Default for BiasPowers {
    fn default() -> Self {
        BiasPowers {
            pow1: 1.0,
            pow2: 1.0,
        }
    }
}

impl BiasPowers {
    /// The powers after one more applied step.
    pub fn advanced(self, h: &Hyper) -> BiasPowers {
        BiasPowers {
            pow1: self.pow1 * h.beta1,
            pow2: self.pow2 * h.beta2,
        }
    }
}

impl StepScalars {
    /// Scalars for the step whose bias powers (already advanced for this
    /// step) are `p`.
    pub fn new(kind: OptimizerKind, h: &Hyper, p: BiasPowers) -> StepScalars {
        let (b1, omb1) = match kind {
            OptimizerKind::Momentum | OptimizerKind::Nesterov => (h.momentum, 0.0),
            OptimizerKind::Rmsprop => (h.alpha, 1.0 - h.alpha),
            OptimizerKind::Adam | OptimizerKind::AdamW => (h.beta1, 1.0 - h.beta1),
            OptimizerKind::Sgd | OptimizerKind::Adagrad => (0.0, 0.0),
        };
        let adam = matches!(kind, OptimizerKind::Adam | OptimizerKind::AdamW);
        StepScalars {
            b1: b1 as f32,
            omb1: omb1 as f32,
            b2: if adam { h.beta2 as f32 } else { 0.0 },
            omb2: if adam { (1.0 - h.beta2) as f32 } else { 0.0 },
            eps: h.eps as f32,
            weight_decay: h.weight_decay as f32,
            inv_bc1: if adam {
                (1.0 / (1.0 - p.pow1)) as f32
            } else {
                1.0
            },
            inv_bc2_sqrt: if adam {
                (1.0 / (1.0 - p.pow2).sqrt()) as f32
            } else {
                1.0
            },
        }
    }
}

/// The direction `d = W g` (learning rate 1) of one element, advancing the
/// element's state `s0`/`s1` in place. `K` is the `OptimizerKind` as u32 so
/// each optimizer gets its own monomorphised, vectorisable loop.
///
/// Operation order (mirrored exactly by the PTX; `*`, `+`, `/`, `sqrt` are
/// each one IEEE f32 operation rounded to nearest even):
///
/// ```text
/// gw = wd != 0 (and not AdamW) ? g + wd*θ : g
/// SGD       d = gw
/// Momentum  m = b1*m + gw;                      d = m
/// Nesterov  m = b1*m + gw;                      d = gw + b1*m
/// Adagrad   G = G + gw*gw;                      d = gw / (sqrt(G) + eps)
/// RMSprop   s = b1*s + omb1*(gw*gw);            d = gw / (sqrt(s) + eps)
/// Adam      m = b1*m + omb1*gw;
///           s = b2*s + omb2*(gw*gw);            d = (m*inv_bc1) / (sqrt(s)*inv_bc2_sqrt + eps)
/// AdamW     as Adam, then                       d = d + wd*θ
/// ```
#[inline(always)]
pub fn direction<const K: u32>(
    sc: &StepScalars,
    theta: f32,
    g: f32,
    s0: &mut f32,
    s1: &mut f32,
) -> f32 {
    const SGD: u32 = OptimizerKind::Sgd as u32;
    const MOMENTUM: u32 = OptimizerKind::Momentum as u32;
    const NESTEROV: u32 = OptimizerKind::Nesterov as u32;
    const ADAGRAD: u32 = OptimizerKind::Adagrad as u32;
    const RMSPROP: u32 = OptimizerKind::Rmsprop as u32;
    const ADAM: u32 = OptimizerKind::Adam as u32;
    const ADAMW: u32 = OptimizerKind::AdamW as u32;

    let gw = if K != ADAMW && sc.weight_decay != 0.0 {
        g + sc.weight_decay * theta
    } else {
        g
    };
    match K {
        SGD => gw,
        MOMENTUM => {
            *s0 = sc.b1 * *s0 + gw;
            *s0
        }
        NESTEROV => {
            *s0 = sc.b1 * *s0 + gw;
            gw + sc.b1 * *s0
        }
        ADAGRAD => {
            *s0 += gw * gw;
            gw / (s0.sqrt() + sc.eps)
        }
        RMSPROP => {
            *s0 = sc.b1 * *s0 + sc.omb1 * (gw * gw);
            gw / (s0.sqrt() + sc.eps)
        }
        ADAM | ADAMW => {
            *s0 = sc.b1 * *s0 + sc.omb1 * gw;
            *s1 = sc.b2 * *s1 + sc.omb2 * (gw * gw);
            let d = (*s0 * sc.inv_bc1) / (s1.sqrt() * sc.inv_bc2_sqrt + sc.eps);
            if K == ADAMW {
                d + sc.weight_decay * theta
            } else {
                d
            }
        }
        _ => unreachable!("unknown optimizer kind {K}"),
    }
}

/// The update of one element: `θ' = θ − lr·d` (two rounded f32 operations).
#[inline(always)]
pub fn apply(theta: f32, lr: f32, d: f32) -> f32 {
    theta - lr * d
}

/// One element's contribution to `Σ g·d` (φ = η·Σ g·d): the f32 product,
/// widened to f64 for accumulation.
#[inline(always)]
pub fn dot_term(g: f32, d: f32) -> f64 {
    (g * d) as f64
}

/// Calls `f::<K>()` for the runtime `kind`: the one place that turns the
/// runtime optimizer into a compile-time one.
#[macro_export]
macro_rules! dispatch_kind {
    ($kind:expr, $f:ident :: < $($rest:tt),* > ( $($arg:expr),* $(,)? )) => {
        match $kind {
            $crate::optim::OptimizerKind::Sgd => $f::<{ $crate::optim::OptimizerKind::Sgd as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::Momentum => $f::<{ $crate::optim::OptimizerKind::Momentum as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::Nesterov => $f::<{ $crate::optim::OptimizerKind::Nesterov as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::Adagrad => $f::<{ $crate::optim::OptimizerKind::Adagrad as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::Rmsprop => $f::<{ $crate::optim::OptimizerKind::Rmsprop as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::Adam => $f::<{ $crate::optim::OptimizerKind::Adam as u32 }, $($rest),*>($($arg),*),
            $crate::optim::OptimizerKind::AdamW => $f::<{ $crate::optim::OptimizerKind::AdamW as u32 }, $($rest),*>($($arg),*),
        }
    };
}

/// f32 inputs on and around every f16 rounding boundary: every sign and
/// exponent, with mantissas on and around the boundary of every number of
/// dropped bits (13 for normal results, more for subnormal ones), kept
/// bits odd and even. (All 2^32 inputs were compared once when the f16
/// conversions were written.)
#[cfg(test)]
pub(crate) fn f16_narrowing_cases() -> impl Iterator<Item = f32> {
    (0..=0x1ffu32).flat_map(|sign_exp| {
        (1..=23u32).flat_map(move |drop| {
            let h = 1u32 << (drop - 1);
            [0, 1, h - 1, h, h + 1, 2 * h - 1, 3 * h]
                .into_iter()
                .flat_map(move |low| {
                    [0u32, 1, 2, 3, 0x155, u32::MAX]
                        .into_iter()
                        .map(move |kept| {
                            let man = ((kept << drop) | low) & 0x007f_ffff;
                            f32::from_bits(sign_exp << 23 | man)
                        })
                })
        })
    })
}

/// f32 inputs with every bf16 value as the high half, and low halves on
/// and around each rounding boundary (and a spread of others).
#[cfg(test)]
pub(crate) fn bf16_narrowing_cases() -> impl Iterator<Item = f32> {
    const LOWS: [u32; 16] = [
        0, 1, 0x3fff, 0x4000, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0x8002, 0xbfff, 0xc000, 0xfffe,
        0xffff, 0x1234, 0x9abc, 0xedcb,
    ];
    (0..=u16::MAX as u32).flat_map(|hi| LOWS.map(|lo| f32::from_bits(hi << 16 | lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_half_widens_like_half() {
        for b in 0..=u16::MAX {
            let (h, bh) = (f16::from_bits(b), bf16::from_bits(b));
            let ours = (Elem::to_f32(h).to_bits(), Elem::to_f32(bh).to_bits());
            let theirs = (f16::to_f32_const(h).to_bits(), bf16::to_f32(bh).to_bits());
            assert_eq!(ours, theirs, "{b:#06x}");
        }
    }

    /// Our narrowing of `x` has the bits of `half`'s.
    fn narrows_like_half<P: Elem>(x: f32, reference: fn(f32) -> P, bits: fn(P) -> u16) {
        let ours: P = Elem::from_f32(x);
        assert_eq!(bits(ours), bits(reference(x)), "{:#010x}", x.to_bits());
    }

    #[test]
    fn bf16_narrowing_matches_half() {
        for x in bf16_narrowing_cases() {
            narrows_like_half(x, bf16::from_f32, bf16::to_bits);
        }
    }

    #[test]
    fn f16_narrowing_matches_half() {
        // half's software conversion: the same reference on every machine
        // (its `from_f32` uses F16C where the CPU has it).
        for x in f16_narrowing_cases() {
            narrows_like_half(x, f16::from_f32_const, f16::to_bits);
        }
    }

    #[test]
    fn magnitude_bits_tell_finite_from_not() {
        fn agrees<P: Elem>(x: P) {
            let bits = x.magnitude_bits();
            assert_eq!(bits < P::INF_BITS, x.to_f32().is_finite(), "{bits:#x}");
        }
        for b in 0..=u16::MAX {
            agrees(f16::from_bits(b));
            agrees(bf16::from_bits(b));
        }
        // f32: both signs of every exponent with low, middle and high
        // mantissas, which covers ±0, ±max, ±inf and NaNs of each kind.
        for hi in 0..=0x1ffu32 {
            for m in [0, 1, 0x40_0000, 0x3f_ffff, 0x7f_ffff] {
                agrees(f32::from_bits(hi << 23 | m));
            }
        }
    }

    #[test]
    fn momentum_first_step_equals_gradient() {
        let sc = StepScalars::new(
            OptimizerKind::Momentum,
            &Hyper::defaults(OptimizerKind::Momentum),
            BiasPowers::default(),
        );
        let (mut m, mut unused) = (0.0f32, 0.0f32);
        let d =
            direction::<{ OptimizerKind::Momentum as u32 }>(&sc, 1.0, 0.75, &mut m, &mut unused);
        assert_eq!(d, 0.75);
        let d =
            direction::<{ OptimizerKind::Momentum as u32 }>(&sc, 1.0, 0.25, &mut m, &mut unused);
        assert_eq!(d, 0.5 * 0.75 + 0.25);
    }

    #[test]
    fn adam_first_step_is_sign_like() {
        let h = Hyper::defaults(OptimizerKind::Adam);
        let p = BiasPowers::default().advanced(&h);
        let sc = StepScalars::new(OptimizerKind::Adam, &h, p);
        let (mut m, mut s) = (0.0f32, 0.0f32);
        let d = direction::<{ OptimizerKind::Adam as u32 }>(&sc, 0.0, -3.0, &mut m, &mut s);
        assert!((d + 1.0).abs() < 1e-6, "{d}");
    }

    #[test]
    fn kinds_and_dtypes_round_trip() {
        for k in OptimizerKind::ALL {
            assert_eq!(OptimizerKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(OptimizerKind::from_u32(7), None);
        assert_eq!(DType::from_u32(2), Some(DType::Bf16));
        assert_eq!(DType::from_u32(3), None);
    }
}
