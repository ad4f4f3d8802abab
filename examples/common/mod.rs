//! Shared by the examples: data loading, two small models with hand-written
//! forward/backward on flat f32 buffers, a thin safe wrapper over the C ABI
//! and the training loop that drives lra exactly as a C trainer would.
#![allow(dead_code)]

use flate2::read::GzDecoder;
use lra::ffi::*;
use std::io::Read;
use std::path::Path;

// ---------------------------------------------------------------- data ----

/// A classification data set: `n` rows of `d` features in [0, 1].
pub struct Dataset {
    pub x: Vec<f32>,
    pub y: Vec<u8>,
    pub n: usize,
    pub d: usize,
    pub classes: usize,
}

fn gunzip(path: &Path) -> Vec<u8> {
    let f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut out = Vec::new();
    GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("cannot gunzip {}: {e}", path.display()));
    out
}

/// The digits set: gzip CSV, 64 pixel columns (0..16) then the label.
pub fn load_digits(path: &Path) -> Dataset {
    let text = String::from_utf8(gunzip(path)).expect("digits csv is not UTF-8");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<f32> = line
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<f32>()
                    .unwrap_or_else(|_| panic!("bad value {c:?}"))
            })
            .collect();
        assert_eq!(cols.len(), 65, "digits rows have 64 pixels and a label");
        x.extend(cols[..64].iter().map(|v| v / 16.0));
        y.push(cols[64] as u8);
    }
    Dataset {
        n: y.len(),
        x,
        y,
        d: 64,
        classes: 10,
    }
}

/// The MNIST idx files (images scaled to [0, 1]); `limit` keeps the first rows.
pub fn load_mnist(images: &Path, labels: &Path, limit: usize) -> Dataset {
    let img = gunzip(images);
    let lab = gunzip(labels);
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    assert_eq!(be(&img[0..4]), 2051, "bad MNIST image magic");
    assert_eq!(be(&lab[0..4]), 2049, "bad MNIST label magic");
    let n = be(&img[4..8]).min(limit);
    let d = be(&img[8..12]) * be(&img[12..16]);
    Dataset {
        x: img[16..16 + n * d]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect(),
        y: lab[8..8 + n].to_vec(),
        n,
        d,
        classes: 10,
    }
}

/// Where the repository's copy of the digits set lives.
pub fn digits_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits.csv.gz")
}

// ----------------------------------------------------------------- rng ----

/// SplitMix64: small, seedable, good enough for initialisation and shuffles.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

// -------------------------------------------------------------- models ----

/// A classifier with its parameters in flat tensors. A model gives its
/// per-example forward and backward pass; the mean softmax cross-entropy,
/// its gradient and the accuracy are written once, here.
pub trait Model {
    /// Element counts of the parameter tensors, in order.
    fn shapes(&self) -> Vec<usize>;
    fn init(&self, rng: &mut Rng) -> Vec<Vec<f32>>;
    fn classes(&self) -> usize;
    fn features(&self) -> usize;
    /// Length of the activation buffer `forward` fills (0: none).
    fn hidden_len(&self) -> usize;
    /// Logits `z` of one example `x`; `act` keeps what `backward` needs.
    fn forward(&self, p: &[Vec<f32>], x: &[f32], act: &mut [f32], z: &mut [f32]);
    /// Adds the gradient of one example to `g`, given ∂loss/∂z = `dz`.
    fn backward(&self, p: &[Vec<f32>], x: &[f32], act: &[f32], dz: &[f32], g: &mut [Vec<f32>]);

    /// Mean cross-entropy over `rows`; when `grads` is given, also its
    /// gradient (overwritten).
    fn loss(
        &self,
        p: &[Vec<f32>],
        data: &Dataset,
        rows: &[usize],
        mut grads: Option<&mut [Vec<f32>]>,
    ) -> f64 {
        if let Some(g) = grads.as_deref_mut() {
            g.iter_mut().for_each(|t| t.fill(0.0));
        }
        let (d, inv) = (self.features(), 1.0 / rows.len() as f32);
        let mut act = vec![0.0f32; self.hidden_len()];
        let mut z = vec![0.0f32; self.classes()];
        let mut total = 0.0f64;
        for &r in rows {
            let x = &data.x[r * d..(r + 1) * d];
            let y = data.y[r] as usize;
            self.forward(p, x, &mut act, &mut z);
            let zy = z[y] as f64;
            total += softmax(&mut z) - zy;
            if let Some(g) = grads.as_deref_mut() {
                // z now holds the softmax: ∂/∂z of the mean loss.
                for (c, zc) in z.iter_mut().enumerate() {
                    *zc = (*zc - (c == y) as u8 as f32) * inv;
                }
                self.backward(p, x, &act, &z, g);
            }
        }
        total / rows.len() as f64
    }

    /// Fraction of `rows` classified correctly.
    fn accuracy(&self, p: &[Vec<f32>], data: &Dataset, rows: &[usize]) -> f64 {
        let d = self.features();
        let mut act = vec![0.0f32; self.hidden_len()];
        let mut z = vec![0.0f32; self.classes()];
        let ok = rows
            .iter()
            .filter(|&&r| {
                self.forward(p, &data.x[r * d..(r + 1) * d], &mut act, &mut z);
                argmax(&z) == data.y[r] as usize
            })
            .count();
        ok as f64 / rows.len() as f64
    }
}

/// Softmax in place; returns log-sum-exp.
fn softmax(z: &mut [f32]) -> f64 {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0f64;
    for v in z.iter_mut() {
        let e = ((*v - m) as f64).exp();
        s += e;
        *v = e as f32;
    }
    for v in z.iter_mut() {
        *v = (*v as f64 / s) as f32;
    }
    m as f64 + s.ln()
}

fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = i;
        }
    }
    best
}

/// `out[i] = b[i] + W[i]·x` for W stored row-major with `x.len()` columns.
fn affine(w: &[f32], b: &[f32], x: &[f32], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * x.len()..(i + 1) * x.len()];
        *o = b[i] + row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// Gradient of `affine` with respect to W and b, added: gw += dout ⊗ x, gb += dout.
fn affine_grad(dout: &[f32], x: &[f32], gw: &mut [f32], gb: &mut [f32]) {
    for (i, &di) in dout.iter().enumerate() {
        gb[i] += di;
        for (g, xv) in gw[i * x.len()..(i + 1) * x.len()].iter_mut().zip(x) {
            *g += di * xv;
        }
    }
}

/// Multinomial logistic regression: W (classes×d), b (classes).
pub struct Logistic {
    pub d: usize,
    pub classes: usize,
}

impl Model for Logistic {
    fn shapes(&self) -> Vec<usize> {
        vec![self.classes * self.d, self.classes]
    }
    fn init(&self, _rng: &mut Rng) -> Vec<Vec<f32>> {
        self.shapes().iter().map(|&n| vec![0.0; n]).collect()
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn features(&self) -> usize {
        self.d
    }
    fn hidden_len(&self) -> usize {
        0
    }
    fn forward(&self, p: &[Vec<f32>], x: &[f32], _act: &mut [f32], z: &mut [f32]) {
        affine(&p[0], &p[1], x, z);
    }
    fn backward(&self, _p: &[Vec<f32>], x: &[f32], _act: &[f32], dz: &[f32], g: &mut [Vec<f32>]) {
        let (gw, gb) = g.split_at_mut(1);
        affine_grad(dz, x, &mut gw[0], &mut gb[0]);
    }
}

/// One-hidden-layer perceptron with tanh: W1 (h×d), b1, W2 (classes×h), b2.
pub struct Mlp {
    pub d: usize,
    pub hidden: usize,
    pub classes: usize,
}

impl Model for Mlp {
    fn shapes(&self) -> Vec<usize> {
        vec![
            self.hidden * self.d,
            self.hidden,
            self.classes * self.hidden,
            self.classes,
        ]
    }
    fn init(&self, rng: &mut Rng) -> Vec<Vec<f32>> {
        let s1 = (1.0 / self.d as f64).sqrt();
        let s2 = (1.0 / self.hidden as f64).sqrt();
        vec![
            (0..self.hidden * self.d)
                .map(|_| (rng.normal() * s1) as f32)
                .collect(),
            vec![0.0; self.hidden],
            (0..self.classes * self.hidden)
                .map(|_| (rng.normal() * s2) as f32)
                .collect(),
            vec![0.0; self.classes],
        ]
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn features(&self) -> usize {
        self.d
    }
    fn hidden_len(&self) -> usize {
        self.hidden
    }
    fn forward(&self, p: &[Vec<f32>], x: &[f32], h: &mut [f32], z: &mut [f32]) {
        affine(&p[0], &p[1], x, h);
        h.iter_mut().for_each(|v| *v = v.tanh());
        affine(&p[2], &p[3], h, z);
    }
    fn backward(&self, p: &[Vec<f32>], x: &[f32], h: &[f32], dz: &[f32], g: &mut [Vec<f32>]) {
        let (g01, g23) = g.split_at_mut(2);
        let (gw2, gb2) = g23.split_at_mut(1);
        affine_grad(dz, h, &mut gw2[0], &mut gb2[0]);
        // Back through W2 and tanh.
        let da: Vec<f32> = (0..self.hidden)
            .map(|j| {
                let dh: f32 = dz
                    .iter()
                    .enumerate()
                    .map(|(c, &dc)| dc * p[2][c * self.hidden + j])
                    .sum();
                dh * (1.0 - h[j] * h[j])
            })
            .collect();
        let (gw1, gb1) = g01.split_at_mut(1);
        affine_grad(&da, x, &mut gw1[0], &mut gb1[0]);
    }
}

// ------------------------------------------------------ C ABI wrapper ----

/// Panics with lra's message when a call fails (examples only).
fn check(status: lra_status, h: *const lra_handle) {
    if status != LRA_OK {
        let msg = unsafe { std::ffi::CStr::from_ptr(lra_last_error(h)) };
        panic!("lra call failed ({status}): {}", msg.to_string_lossy());
    }
}

/// An owned lra handle, driven through the C ABI.
pub struct Lra(*mut lra_handle);

impl Lra {
    pub fn new(cfg: &lra_config) -> Lra {
        let mut h = std::ptr::null_mut();
        check(unsafe { lra_create(cfg, &mut h) }, std::ptr::null());
        Lra(h)
    }
    pub fn config(optimizer: lra_optimizer, lr: f64) -> lra_config {
        let mut cfg = std::mem::MaybeUninit::<lra_config>::uninit();
        unsafe {
            lra_config_init(cfg.as_mut_ptr(), optimizer);
            let mut cfg = cfg.assume_init();
            cfg.lr = lr;
            cfg
        }
    }
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], loss: f64) {
        let tensors: Vec<lra_tensor> = params
            .iter_mut()
            .zip(grads)
            .map(|(p, g)| lra_tensor {
                param: p.as_mut_ptr().cast(),
                grad: g.as_ptr().cast(),
                numel: p.len() as u64,
                dtype: LRA_DTYPE_F32,
                reserved: 0,
            })
            .collect();
        check(
            unsafe {
                lra_step(
                    self.0,
                    tensors.as_ptr(),
                    tensors.len(),
                    loss,
                    0.0,
                    std::ptr::null_mut(),
                )
            },
            self.0,
        );
    }
    pub fn should_reeval(&self) -> bool {
        let mut due = 0u32;
        check(unsafe { lra_should_reeval(self.0, &mut due) }, self.0);
        due != 0
    }
    pub fn report(&mut self, loss_after: f64) -> lra_reeval_info {
        let mut info = std::mem::MaybeUninit::<lra_reeval_info>::uninit();
        check(
            unsafe { lra_report_reeval(self.0, loss_after, info.as_mut_ptr()) },
            self.0,
        );
        unsafe { info.assume_init() }
    }
    pub fn lr(&self) -> f64 {
        let mut lr = 0.0;
        check(unsafe { lra_get_lr(self.0, &mut lr) }, self.0);
        lr
    }
}

impl Drop for Lra {
    fn drop(&mut self) {
        unsafe { lra_destroy(self.0) }
    }
}

// ------------------------------------------------------------ training ----

pub struct RunResult {
    /// Mean loss over the whole training set after the last epoch.
    pub final_loss: f64,
    pub accuracy: f64,
    pub final_lr: f64,
    /// η after each epoch.
    pub lr_trace: Vec<f64>,
    /// Forward passes on batches (gradient evaluations + re-evaluations).
    pub forward_passes: u64,
}

/// Mini-batch training through the C ABI. With `adapt`, each step is
/// re-evaluated on the same batch whenever lra's schedule says so and η
/// adapts; without it η stays fixed (the plain optimizer).
pub fn train(
    model: &dyn Model,
    data: &Dataset,
    cfg: &lra_config,
    adapt: bool,
    epochs: usize,
    batch: usize,
    seed: u64,
) -> RunResult {
    train_observed(model, data, cfg, adapt, epochs, batch, seed, &mut |_, _| {})
}

/// [`train`], calling `on_epoch(epoch, params)` after each epoch (added
/// for the sweep example, which records per-epoch training accuracy).
#[allow(clippy::too_many_arguments)]
pub fn train_observed(
    model: &dyn Model,
    data: &Dataset,
    cfg: &lra_config,
    adapt: bool,
    epochs: usize,
    batch: usize,
    seed: u64,
    on_epoch: &mut dyn FnMut(usize, &[Vec<f32>]),
) -> RunResult {
    let mut rng = Rng::new(seed);
    let mut params = model.init(&mut rng);
    let mut grads: Vec<Vec<f32>> = model.shapes().iter().map(|&n| vec![0.0; n]).collect();
    let mut opt = Lra::new(cfg);
    let mut order: Vec<usize> = (0..data.n).collect();
    let mut lr_trace = Vec::with_capacity(epochs);
    let mut forward_passes = 0;
    for epoch in 0..epochs {
        rng.shuffle(&mut order);
        for rows in order.chunks(batch) {
            let loss = model.loss(&params, data, rows, Some(&mut grads));
            forward_passes += 1;
            opt.step(&mut params, &grads, loss);
            if adapt && opt.should_reeval() {
                let after = model.loss(&params, data, rows, None);
                forward_passes += 1;
                opt.report(after);
            }
        }
        lr_trace.push(opt.lr());
        on_epoch(epoch, &params);
    }
    let all: Vec<usize> = (0..data.n).collect();
    RunResult {
        final_loss: model.loss(&params, data, &all, None),
        accuracy: model.accuracy(&params, data, &all),
        final_lr: opt.lr(),
        lr_trace,
        forward_passes,
    }
}
