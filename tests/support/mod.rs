//! Helpers shared by the integration tests (`mod support;`); not every
//! test binary uses every helper.
#![allow(dead_code)]

/// Prints the skip reason past libtest's output capture (which only
/// intercepts the print macros), so it shows in the suite's log.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    // One write, so the line does not interleave with libtest's output
    // (scripts/stages/fake-cuda.sh parses both).
    let line = format!("!!!! SKIPPED: {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Prints, past the capture as [`skipped`] does, that a test ran but left
/// out part of what its name claims here (`what`: the part and why), so
/// the suite's log and the skip tally show it.
pub fn partial(test: &str, what: &str) {
    use std::io::Write;
    let line = format!("!!!! PARTIAL: {test}: {what}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The tests' deterministic generator: splitmix64, whose every seed (0
/// included) gives a full-period stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.index(xs.len())]
    }
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.unit() * (hi.ln() - lo.ln())).exp()
    }
    /// Uniform in [-1, 1) times 2^e with e in -40..=11: a wide dynamic
    /// range, so that f64 sums of the φ terms round and their order shows
    /// in the bits (with a narrow range every order gives the exact sum).
    pub fn value(&mut self) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        u * 2f32.powi((self.next() % 52) as i32 - 40)
    }
}

/// The cases of a seeded random test: `<prefix>_SEED` (the first seed)
/// and `<prefix>_CASES` (how many) from the environment, else the defaults
/// CI runs.
pub struct FuzzSeeds {
    pub first: u64,
    pub cases: u64,
    /// Neither was set: the defaults, for which [`FuzzSeeds::assert_covered`]
    /// holds.
    pub default: bool,
}

impl FuzzSeeds {
    pub fn from_env(prefix: &str, first: u64, cases: u64) -> FuzzSeeds {
        let env = |name: String| {
            std::env::var(&name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
            })
        };
        let (seed, count) = (
            env(format!("{prefix}_SEED")),
            env(format!("{prefix}_CASES")),
        );
        FuzzSeeds {
            first: seed.unwrap_or(first),
            cases: count.unwrap_or(cases),
            default: seed.is_none() && count.is_none(),
        }
    }

    /// Each case's seed (any first seed: they wrap around).
    pub fn seeds(&self) -> impl Iterator<Item = u64> {
        let first = self.first;
        (0..self.cases).map(move |i| first.wrapping_add(i))
    }

    /// The default cases must have drawn each of `kinds` (what the test
    /// counted in `seen`): a test whose draws stopped reaching a kind of
    /// call or outcome would otherwise pass without checking it.
    pub fn assert_covered(
        &self,
        test: &str,
        seen: &std::collections::BTreeMap<String, usize>,
        kinds: &[&str],
    ) {
        println!(
            "{test}: {} cases from seed {}: {seen:?}",
            self.cases, self.first
        );
        if self.default {
            for kind in kinds {
                assert!(
                    seen.get(*kind).is_some_and(|&n| n > 0),
                    "{test}: the default cases never drew {kind:?}: {seen:?}"
                );
            }
        }
    }
}

/// Hyper-parameters in which no two of the scalars the kernels read
/// coincide and β1 is not dyadic. The defaults hide slips: there Adam's
/// β1 = 1 − β1 = 0.5, momentum = β1, and β1^t is exact in f32 and f64.
pub fn distinct_hyper(kind: lra::optim::OptimizerKind) -> lra::optim::Hyper {
    lra::optim::Hyper {
        momentum: 0.9,
        alpha: 0.9,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-3,
        weight_decay: if kind == lra::optim::OptimizerKind::AdamW {
            0.05
        } else {
            0.02
        },
    }
}

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

/// The calling thread's last lra error message.
pub fn thread_error() -> String {
    // SAFETY: a static or thread-local NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(lra::ffi::lra_thread_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Counters as [steps, applied, skipped, reevals, raised, lowered, kept,
/// reeval_skipped], for comparing them whole.
pub fn counter_array(c: &lra::ffi::lra_counters) -> [u64; 8] {
    [
        c.steps,
        c.applied,
        c.skipped,
        c.reevals,
        c.raised,
        c.lowered,
        c.kept,
        c.reeval_skipped,
    ]
}

/// One lra handle driven through the C ABI as a C caller would, destroyed
/// on drop. Test files add the calls they need in `impl support::Handle`.
pub struct Handle(pub *mut lra::ffi::lra_handle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by lra_create, destroyed once.
        unsafe { lra::ffi::lra_destroy(self.0) }
    }
}

impl Handle {
    /// `lra_create`, which must succeed.
    pub fn create(cfg: &lra::ffi::lra_config) -> Handle {
        let mut h = std::ptr::null_mut();
        // SAFETY: valid config and out pointer.
        let st = unsafe { lra::ffi::lra_create(cfg, &mut h) };
        assert_eq!(st, lra::ffi::LRA_OK, "lra_create: {}", thread_error());
        Handle(h)
    }

    /// The handle's last error message.
    pub fn error(&self) -> String {
        // SAFETY: live handle; the message is a NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(lra::ffi::lra_last_error(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// `lra_save_state` into a buffer one byte larger than `lra_state_size`
    /// says: it must write exactly that size and nothing past `written`.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut size = 0usize;
        // SAFETY: valid handle and out pointer.
        let st = unsafe { lra::ffi::lra_state_size(self.0, &mut size) };
        assert_eq!(st, lra::ffi::LRA_OK, "lra_state_size: {}", self.error());
        let mut buf = vec![0xa5u8; size + 1];
        let mut written = 0usize;
        // SAFETY: the buffer holds size + 1 bytes; `written` is outside it.
        let st = unsafe {
            lra::ffi::lra_save_state(self.0, buf.as_mut_ptr().cast(), size + 1, &mut written)
        };
        assert_eq!(st, lra::ffi::LRA_OK, "lra_save_state: {}", self.error());
        assert_eq!(
            written, size,
            "lra_save_state wrote other than lra_state_size"
        );
        assert_eq!(buf[size], 0xa5, "lra_save_state wrote past `written`");
        buf.truncate(size);
        buf
    }

    pub fn load(&self, ckpt: &[u8]) -> lra::ffi::lra_status {
        // SAFETY: the slice is valid for its length.
        unsafe { lra::ffi::lra_load_state(self.0, ckpt.as_ptr().cast(), ckpt.len()) }
    }

    pub fn lr(&self) -> f64 {
        let mut v = f64::NAN;
        // SAFETY: valid handle and out pointer.
        assert_eq!(
            unsafe { lra::ffi::lra_get_lr(self.0, &mut v) },
            lra::ffi::LRA_OK
        );
        v
    }

    pub fn phi(&self) -> f64 {
        let mut v = f64::NAN;
        // SAFETY: valid handle and out pointer.
        let st = unsafe { lra::ffi::lra_get_last_phi(self.0, &mut v) };
        assert_eq!(st, lra::ffi::LRA_OK);
        v
    }

    pub fn counters(&self) -> lra::ffi::lra_counters {
        let mut c = lra::ffi::lra_counters::default();
        // SAFETY: valid handle and out pointer.
        let st = unsafe { lra::ffi::lra_get_counters(self.0, &mut c) };
        assert_eq!(st, lra::ffi::LRA_OK);
        c
    }
}

/// Recomputes a checkpoint's trailing checksum (FNV-1a over everything
/// before it), so that a forged field reaches the structure checks.
pub fn reseal(ckpt: &mut [u8]) {
    let n = ckpt.len() - 8;
    let sum = ckpt[..n].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    });
    ckpt[n..].copy_from_slice(&sum.to_le_bytes());
}
