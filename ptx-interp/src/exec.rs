//! Execution: device memory, launches, the thread/warp/block model.

use crate::fp;
use crate::load::{
    Addr, AtomOp, Cmp, FOp, FUnOp, IRnd, Inst, IntOp, Kernel, Op, ShflMode, Space, Src, Sreg,
    SyncScope, TestKind, SHARED_BASE,
};
use crate::{err, Error, ErrorKind, Module, Result, Ty, TyKind};
use std::collections::{BTreeMap, VecDeque};

/// First device address handed out for global buffers.
const GLOBAL_BASE: u64 = 0x7000_0000_0000;
/// Unmapped gap after every buffer, so a small overrun never lands in the next one.
const GUARD: u64 = 0x1_0000;
const MAX_SHARED: usize = 227 * 1024;

struct Buffer {
    data: Vec<u8>,
    /// Per byte: written by the host or a kernel (reading a byte that is
    /// not is an error: cudaMalloc'ed memory holds garbage).
    init: Vec<bool>,
    /// Per byte: the last write (plain or atomic), for the global race checks.
    tags: Vec<Tag>,
    /// Per byte: the last plain read.
    rtags: Vec<Tag>,
}

/// Who wrote a global byte, and when in the writer's block.
#[derive(Clone, Copy, Default)]
struct Tag {
    /// Launch number (0: never written by a kernel; host writes do not count).
    launch: u64,
    block: u32,
    tid: u32,
    /// The block's barrier phase at the write.
    phase: u32,
    /// The accessing thread's own count of global memory accesses.
    seq: u64,
}

/// What one thread knows to have happened in block `b` (happens-before,
/// at block granularity): every write of `b` made before its barrier phase
/// `phase`, and, within phase `phase`, the writes of the listed threads up
/// to their store numbers. Knowledge travels through barriers (joined
/// across the participants) and, between blocks, through a gpu-scope fence
/// before a global atomic on the writer's side and a global atomic before a
/// gpu-scope fence on the reader's (see `Thread::released`/`acquired`).
#[derive(Clone, Debug, PartialEq, Default)]
struct Know {
    phase: u32,
    /// (thread, store number) in phase `phase`, sorted by thread.
    partial: Vec<(u32, u64)>,
}

impl Know {
    fn one(phase: u32, tid: u32, seq: u64) -> Know {
        Know {
            phase,
            partial: vec![(tid, seq)],
        }
    }
    fn covers(&self, t: &Tag) -> bool {
        self.phase > t.phase
            || (self.phase == t.phase
                && self
                    .partial
                    .binary_search_by_key(&t.tid, |e| e.0)
                    .is_ok_and(|i| self.partial[i].1 >= t.seq))
    }
    fn join(&mut self, o: &Know) {
        if o.phase > self.phase {
            *self = o.clone();
        } else if o.phase == self.phase {
            for &(tid, seq) in &o.partial {
                match self.partial.binary_search_by_key(&tid, |e| e.0) {
                    Ok(i) => self.partial[i].1 = self.partial[i].1.max(seq),
                    Err(i) => self.partial.insert(i, (tid, seq)),
                }
            }
        }
    }
}

/// Joins per-block knowledge `from` into `into`; an empty vector stands for
/// knowing nothing (most threads never fence, so theirs stay unallocated).
fn join_all(into: &mut Vec<Know>, from: &[Know]) {
    if into.len() < from.len() {
        into.resize(from.len(), Know::default());
    }
    for (a, b) in into.iter_mut().zip(from) {
        a.join(b);
    }
}

/// What thread `ti` of block `linear` knows, including its own accesses so
/// far (and so, through `Know`, every earlier barrier phase of its block).
fn snapshot(th: &Thread, linear: u32, epoch: u32, ti: usize) -> Vec<Know> {
    let mut mine = th.know.clone();
    mine[linear as usize].join(&Know::one(epoch, ti as u32, th.seq));
    mine
}

/// A gpu-scope fence (`membar.gl`/`.sys`, `fence.{sc,acq_rel}.{gpu,sys}`):
/// acquire, then release. Knowledge read by earlier atomics becomes known;
/// everything known now is what later atomics publish.
///
/// PTX ISA 8.8/8.9.4: a release pattern (fence, then a strong write) of one
/// thread synchronises with an acquire pattern (a strong read of that
/// write, then a fence) of another. `membar` is `fence.sc` on sm_70+
/// (9.7.13.4), and two gpu-scope `fence.sc` are ordered one way or the
/// other (8.9.3) without contradicting causality (8.10.2); so with a
/// writer's fence F1 causally before its atomic W, a reader's atomic R
/// reading W and R causally before the reader's fence F2, F2 before F1
/// would put R causally before the W it reads (8.10.6 forbids that), hence
/// F1 synchronises with F2. The causal paths may pass through barriers:
/// "every thread fences, bar.sync, thread 0's atomic" releases every
/// thread's writes, and "thread 0's atomic, bar.sync, every thread fences"
/// acquires for every thread (kernels/lra.ptx, the last-block pattern, does
/// both), which is why barriers join `released` and `acquired` too.
/// `fence.acq_rel` is treated the same; the ISA promises that for it only
/// when the fence and the atomic are in one thread (its patterns are
/// per-thread), so a kernel that relies on an acq_rel fence across a
/// barrier is not reported.
fn fence(th: &mut Thread, linear: u32, epoch: u32, ti: usize) {
    let acquired = std::mem::take(&mut th.acquired);
    join_all(&mut th.know, &acquired);
    // `released` so far (own and met at barriers) is within `know`
    th.released = snapshot(th, linear, epoch, ti);
}

/// Joins the per-block knowledge `part` of every thread for which `here`
/// holds (the participants of a completing barrier) and gives each the join.
fn join_across(
    threads: &mut [Thread],
    here: impl Fn(&Thread) -> bool,
    part: impl Fn(&mut Thread) -> &mut Vec<Know>,
) {
    let parts: Vec<&mut Vec<Know>> = threads.iter_mut().filter(|t| here(t)).map(part).collect();
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    // the common case: nothing new since the last barrier
    if rest.iter().all(|p| p == first) {
        return;
    }
    let mut joined = Vec::new();
    for p in &parts {
        join_all(&mut joined, p);
    }
    for p in parts {
        p.clone_from(&joined);
    }
}

/// At a completing barrier: where the participants' joined `released`
/// lists every thread of the block at its current access number in this
/// phase (every thread fenced and then touched no global memory before the
/// barrier, as lra.ptx does), it is the same knowledge as "every phase
/// before the next one" (no access of the next phase exists yet). One
/// entry instead of one per thread keeps what travels to other blocks, and
/// is joined again at every later barrier, small.
fn compress_whole_phase(blk: &mut Block, here: impl Fn(&Thread) -> bool) {
    let (own, epoch) = (blk.linear as usize, blk.epoch);
    let whole = |k: &Know| {
        k.phase == epoch
            && k.partial.len() == blk.threads.len()
            && k.partial
                .iter()
                .zip(0u32..)
                .zip(&blk.threads)
                .all(|((&(tid, seq), t), th)| tid == t && seq == th.seq)
    };
    // after the join every participant holds the same `released`
    let Some(k) = blk
        .threads
        .iter()
        .find(|t| here(t))
        .and_then(|t| t.released.get(own))
    else {
        return;
    };
    if !whole(k) {
        return;
    }
    let next = Know {
        phase: epoch + 1,
        partial: Vec::new(),
    };
    for th in blk.threads.iter_mut().filter(|t| here(t)) {
        th.released[own] = next.clone();
    }
}

/// Device memory: host-provided buffers at device addresses assigned here.
pub struct Device {
    bufs: BTreeMap<u64, Buffer>,
    next: u64,
    launches: u64,
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

/// A kernel argument (must match the declared `.param` size exactly).
#[derive(Clone, Debug)]
pub enum Arg {
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
    Bytes(Vec<u8>),
}

impl Arg {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::U32(v) => v.to_le_bytes().to_vec(),
            Arg::U64(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
            Arg::F64(v) => v.to_le_bytes().to_vec(),
            Arg::Bytes(b) => b.clone(),
        }
    }
}

/// How threads and blocks are ordered. Every schedule is one the hardware
/// could produce; a correct kernel gives the same results under all.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// Blocks one at a time in linear order; threads in `tid` order, each
    /// running until it blocks (barrier, warp collective, exit).
    InOrder,
    /// Blocks in reverse order; threads in reverse `tid` order.
    Reversed,
    /// Blocks in a seeded random order, `resident` blocks at a time with
    /// their threads interleaved; a random ready thread runs
    /// 1..=`max_quantum` instructions before the next pick.
    Random {
        seed: u64,
        resident: usize,
        max_quantum: u32,
    },
}

#[derive(Clone, Debug)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared: usize,
    pub schedule: Schedule,
    /// Instruction budget of the launch (catches endless loops).
    pub max_steps: u64,
}

impl LaunchConfig {
    pub fn linear(grid: u32, block: u32) -> LaunchConfig {
        LaunchConfig {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            dynamic_shared: 0,
            schedule: Schedule::InOrder,
            max_steps: 500_000_000,
        }
    }
    pub fn with_schedule(mut self, s: Schedule) -> LaunchConfig {
        self.schedule = s;
        self
    }
}

/// What a launch did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaunchReport {
    /// Instructions executed (guarded-off ones included).
    pub instructions: u64,
    /// Bytes the threads' global `ld`s asked for, each thread counted (a
    /// warp loading one address counts it 32 times): traffic into L1.
    pub global_load_bytes: u64,
    /// Bytes the threads' global `st`s wrote, each thread counted.
    pub global_store_bytes: u64,
    /// Distinct global bytes the launch read with `ld`: what DRAM must
    /// deliver if every repeated read hits a cache.
    pub global_bytes_read: u64,
    /// Distinct global bytes the launch wrote (`st` or atomics).
    pub global_bytes_written: u64,
    /// Global atomics (`atom`, `red`) executed.
    pub global_atomics: u64,
    /// Global memory round trips on the launch's critical path, in a model
    /// of in-order issue: a thread stalls only when an instruction (or its
    /// guard) needs a value that has not arrived. A global `ld` or `atom`
    /// delivers its value one round after the round it issues in; a
    /// gpu-scope fence waits one round (for the thread's writes to be
    /// acknowledged); shared memory, parameters and arithmetic take none.
    /// A barrier or warp collective resumes its threads at the latest
    /// round among them; a global atomic's value arrives a round after the
    /// latest atomic on its address so far (so a "last block" that counts
    /// the others out waits for the slowest of them). This is the most rounds any thread reached: with
    /// every block resident at once, the round trips the launch waits for
    /// one after another. Bandwidth and issue cost are not in it (the byte
    /// and instruction counts are).
    pub latency_rounds: u32,
}

impl Device {
    pub fn new() -> Device {
        Device {
            bufs: BTreeMap::new(),
            next: GLOBAL_BASE,
            launches: 0,
        }
    }

    /// An uninitialised buffer of `bytes` bytes (a kernel reading a byte
    /// before anything wrote it is an error); returns its device address
    /// (aligned to 256 bytes, like cudaMalloc).
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        self.alloc_init(bytes, false)
    }

    /// A buffer of `bytes` zero bytes (cudaMalloc + cudaMemset).
    pub fn alloc_zeroed(&mut self, bytes: usize) -> u64 {
        self.alloc_init(bytes, true)
    }

    /// An uninitialised buffer at an address that is a multiple of
    /// `align` (a power of two; an address range reserved for the virtual
    /// memory management API is aligned to its granularity).
    pub fn alloc_aligned(&mut self, bytes: usize, align: u64) -> u64 {
        assert!(align.is_power_of_two(), "alignment {align}");
        self.next = self.next.div_ceil(align) * align;
        self.alloc_init(bytes, false)
    }

    fn alloc_init(&mut self, bytes: usize, init: bool) -> u64 {
        let addr = self.next;
        self.next = (addr + bytes as u64 + GUARD).div_ceil(256) * 256;
        self.bufs.insert(
            addr,
            Buffer {
                data: vec![0; bytes],
                init: vec![init; bytes],
                tags: Vec::new(),
                rtags: Vec::new(),
            },
        );
        addr
    }

    /// A buffer holding a copy of `data`.
    pub fn alloc_from(&mut self, data: &[u8]) -> u64 {
        let a = self.alloc_zeroed(data.len());
        self.bufs.get_mut(&a).unwrap().data.copy_from_slice(data);
        a
    }

    pub fn free(&mut self, addr: u64) -> Result<()> {
        match self.bufs.remove(&addr) {
            Some(_) => Ok(()),
            None => err(
                ErrorKind::OutOfBounds,
                format!("free of {addr:#x}: not a buffer"),
            ),
        }
    }

    fn find(&self, addr: u64, len: usize) -> Result<(u64, usize)> {
        if let Some((&base, b)) = self.bufs.range(..=addr).next_back() {
            let off = (addr - base) as usize;
            if off.checked_add(len).is_some_and(|e| e <= b.data.len()) {
                return Ok((base, off));
            }
            return err(
                ErrorKind::OutOfBounds,
                format!(
                    "global access of {len} bytes at {addr:#x} is outside every buffer (nearest: {base:#x}, {} bytes; offset {off})",
                    b.data.len()
                ),
            );
        }
        err(
            ErrorKind::OutOfBounds,
            format!("global access of {len} bytes at {addr:#x} is outside every buffer"),
        )
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let (base, off) = self.find(addr, len)?;
        Ok(self.bufs[&base].data[off..off + len].to_vec())
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let (base, off) = self.find(addr, data.len())?;
        let b = self.bufs.get_mut(&base).unwrap();
        b.data[off..off + data.len()].copy_from_slice(data);
        b.init[off..off + data.len()].fill(true);
        Ok(())
    }

    /// Runs `kernel` of `module` over the grid. On error, memory holds
    /// whatever was written before the failing instruction.
    pub fn launch(
        &mut self,
        module: &Module,
        kernel: &str,
        cfg: &LaunchConfig,
        args: &[Arg],
    ) -> Result<LaunchReport> {
        let k = module.kernel(kernel).ok_or_else(|| Error {
            kind: ErrorKind::Launch,
            message: format!("no kernel named {kernel}"),
        })?;
        if args.len() != k.params.len() {
            return err(
                ErrorKind::Launch,
                format!(
                    "{kernel} takes {} parameters, {} given",
                    k.params.len(),
                    args.len()
                ),
            );
        }
        let mut params = vec![0u8; k.param_bytes];
        for (a, p) in args.iter().zip(&k.params) {
            let b = a.bytes();
            if b.len() != p.size {
                return err(
                    ErrorKind::Launch,
                    format!(
                        "parameter {} is {} bytes, argument has {}",
                        p.name,
                        p.size,
                        b.len()
                    ),
                );
            }
            params[p.offset..p.offset + p.size].copy_from_slice(&b);
        }
        let nthreads = cfg.block.iter().map(|&x| x as u64).product::<u64>();
        if nthreads == 0 || nthreads > 1024 || cfg.grid.contains(&0) {
            return err(
                ErrorKind::Launch,
                format!(
                    "bad launch geometry grid {:?} block {:?}",
                    cfg.grid, cfg.block
                ),
            );
        }
        if let Some(r) = k.reqntid {
            if r != cfg.block {
                return err(
                    ErrorKind::Launch,
                    format!(
                        "{kernel} requires block {r:?} (.reqntid), launched with {:?}",
                        cfg.block
                    ),
                );
            }
        }
        if let Some(m) = k.maxntid {
            if nthreads > m.iter().map(|&x| x as u64).product::<u64>() {
                return err(
                    ErrorKind::Launch,
                    format!("{kernel} allows at most {m:?} threads (.maxntid)"),
                );
            }
        }
        let shared_bytes = k.shared_static + cfg.dynamic_shared;
        if cfg.dynamic_shared > 0 && k.dyn_shared_align.is_none() {
            return err(
                ErrorKind::Launch,
                "dynamic shared memory given but no .extern .shared array declared",
            );
        }
        if shared_bytes > MAX_SHARED {
            return err(
                ErrorKind::Launch,
                format!("{shared_bytes} bytes of shared memory exceed {MAX_SHARED}"),
            );
        }
        self.launches += 1;
        let mut run = Run {
            k,
            dev: self,
            params,
            grid: cfg.grid,
            block: cfg.block,
            nthreads: nthreads as u32,
            shared_bytes,
            steps: 0,
            max_steps: cfg.max_steps,
            launch: 0,
            nblocks: cfg.grid.iter().map(|&g| g as usize).product(),
            result_defined: true,
            result_ready: 0,
            atom_rounds: Default::default(),
            report: LaunchReport::default(),
            atom_clocks: Default::default(),
        };
        run.launch = run.dev.launches;
        run.go(&cfg.schedule)?;
        let report = LaunchReport {
            instructions: run.steps,
            ..run.report
        };
        let launch = self.launches;
        let this_launch = |tags: &[Tag]| tags.iter().filter(|t| t.launch == launch).count() as u64;
        Ok(LaunchReport {
            global_bytes_read: self.bufs.values().map(|b| this_launch(&b.rtags)).sum(),
            global_bytes_written: self.bufs.values().map(|b| this_launch(&b.tags)).sum(),
            ..report
        })
    }
}

// ---------------------------------------------------------------- model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CollKind {
    Shfl(ShflMode),
    BarWarp,
}

#[derive(Clone, Copy, Debug)]
enum TState {
    Ready,
    /// Waiting at `bar.sync` (barrier id; every thread of the block takes part).
    Bar {
        id: u32,
    },
    /// Waiting at a warp collective with its operand values.
    Coll {
        kind: CollKind,
        mask: u32,
        vals: [u32; 3],
    },
    Exited,
}

struct Thread {
    regs: Vec<u64>,
    pc: usize,
    state: TState,
    tid: [u32; 3],
    /// Global memory accesses so far.
    seq: u64,
    /// Per register: holds a defined value (registers start undefined on
    /// the hardware; see `Inst::reads`).
    defined: Vec<bool>,
    /// Latency model (`LaunchReport::latency_rounds`): the memory round the
    /// thread issues in, and per register the round its value arrives.
    round: u32,
    ready: Vec<u32>,
    /// Per block of the grid: what this thread knows to have happened there.
    know: Vec<Know>,
    /// Per block: what this thread's global atomics publish (release side
    /// of fence synchronisation): its `know` and own position at its last
    /// gpu-scope fence, joined with the same of every thread it has met at
    /// a barrier since. Empty: nothing.
    released: Vec<Know>,
    /// Per block: what the global atomics this thread (or a thread it has
    /// met at a barrier since) read had published, not yet in `know`: a
    /// relaxed atomic orders nothing until a gpu-scope fence follows it
    /// (acquire side). Empty: nothing.
    acquired: Vec<Know>,
}

#[derive(Clone, Copy, Default)]
struct Shadow {
    /// Written at all (plain or atomic) in this block.
    init: bool,
    w_epoch: u32,
    w_tid: u32,
    r_epoch: u32,
    /// u32::MAX: several readers
    r_tid: u32,
}

struct Block {
    ctaid: [u32; 3],
    linear: u32,
    threads: Vec<Thread>,
    shared: Vec<u8>,
    shadow: Vec<Shadow>,
    epoch: u32,
    /// Threads waiting at each barrier id.
    bar_waiting: BTreeMap<u32, (usize, u32)>, // id → (pc, arrived)
}

struct Run<'a> {
    k: &'a Kernel,
    dev: &'a mut Device,
    params: Vec<u8>,
    grid: [u32; 3],
    block: [u32; 3],
    nthreads: u32,
    shared_bytes: usize,
    steps: u64,
    max_steps: u64,
    launch: u64,
    nblocks: usize,
    /// Whether the results of the instruction being executed are defined.
    result_defined: bool,
    /// The round the results of the instruction being executed arrive in.
    result_ready: u32,
    /// Per global address used by atomics: the latest round one issued in
    /// (an atomic reads what every earlier one there wrote, so its value
    /// arrives after the latest of them: how a "last block" waits for all).
    atom_rounds: std::collections::HashMap<u64, u32>,
    report: LaunchReport,
    /// Per global address used by atomics: the knowledge released there.
    atom_clocks: std::collections::HashMap<u64, Vec<Know>>,
}

enum Flow {
    Next,
    Jump(usize),
    Block,
    Exit,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        ((v << (64 - bits)) as i64) >> (64 - bits)
    }
}

fn mask_bits(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

fn f32b(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
fn f64b(v: u64) -> f64 {
    f64::from_bits(v)
}

/// PTX `min`/`max` on floats: a NaN operand yields the other; -0 < +0.
fn fminmax(a: f64, b: f64, max: bool) -> Option<f64> {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => None,
        (true, false) => Some(b),
        (false, true) => Some(a),
        _ => {
            if a == 0.0 && b == 0.0 {
                let neg = if max {
                    a.is_sign_negative() && b.is_sign_negative()
                } else {
                    a.is_sign_negative() || b.is_sign_negative()
                };
                Some(if neg { -0.0 } else { 0.0 })
            } else if (a < b) != max {
                Some(a)
            } else {
                Some(b)
            }
        }
    }
}

impl Block {
    fn waiting_summary(&self, k: &Kernel) -> String {
        // group consecutive threads with the same state and pc
        let mut out = Vec::new();
        let mut i = 0;
        let n = self.threads.len();
        let desc = |t: &Thread| -> String {
            let line = k.insts.get(t.pc).map_or(0, |x| x.line);
            let text = k
                .lines
                .get(line.saturating_sub(1) as usize)
                .cloned()
                .unwrap_or_default();
            match t.state {
                TState::Ready => format!("ready at line {line} `{text}`"),
                TState::Bar { id } => format!("waiting at barrier {id}, line {line} `{text}`"),
                TState::Coll { kind, mask, .. } => {
                    format!("waiting at {kind:?} mask {mask:#010x}, line {line} `{text}`")
                }
                TState::Exited => format!("exited at line {line} `{text}`"),
            }
        };
        while i < n {
            let d = desc(&self.threads[i]);
            let mut j = i + 1;
            while j < n && desc(&self.threads[j]) == d {
                j += 1;
            }
            out.push(format!(
                "    threads {}..={} of block {:?}: {d}",
                i,
                j - 1,
                self.ctaid
            ));
            i = j;
        }
        out.join("\n")
    }
}

impl<'a> Run<'a> {
    fn go(&mut self, sched: &Schedule) -> Result<()> {
        let nblocks = self.grid.iter().map(|&g| g as usize).product::<usize>();
        let mut order: Vec<usize> = (0..nblocks).collect();
        let mut rng = Rng(match sched {
            Schedule::Random { seed, .. } => *seed,
            _ => 0,
        });
        let resident = match sched {
            Schedule::InOrder => 1,
            Schedule::Reversed => {
                order.reverse();
                1
            }
            Schedule::Random { resident, .. } => {
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                (*resident).max(1)
            }
        };
        for wave in order.chunks(resident) {
            let mut blocks: Vec<Block> = wave.iter().map(|&b| self.new_block(b)).collect();
            self.run_wave(&mut blocks, sched, &mut rng)?;
        }
        Ok(())
    }

    fn new_block(&self, linear: usize) -> Block {
        let g = self.grid;
        let ctaid = [
            (linear % g[0] as usize) as u32,
            ((linear / g[0] as usize) % g[1] as usize) as u32,
            (linear / (g[0] as usize * g[1] as usize)) as u32,
        ];
        let b = self.block;
        let threads = (0..self.nthreads)
            .map(|i| Thread {
                regs: vec![0; self.k.reg_bits.len()],
                pc: 0,
                state: TState::Ready,
                tid: [i % b[0], (i / b[0]) % b[1], i / (b[0] * b[1])],
                seq: 0,
                know: vec![Know::default(); self.nblocks],
                released: Vec::new(),
                acquired: Vec::new(),
                defined: vec![false; self.k.reg_bits.len()],
                round: 0,
                ready: vec![0; self.k.reg_bits.len()],
            })
            .collect();
        Block {
            ctaid,
            linear: linear as u32,
            threads,
            shared: vec![0; SHARED_BASE + self.shared_bytes],
            shadow: vec![Shadow::default(); SHARED_BASE + self.shared_bytes],
            epoch: 1,
            bar_waiting: BTreeMap::new(),
        }
    }

    fn run_wave(&mut self, blocks: &mut [Block], sched: &Schedule, rng: &mut Rng) -> Result<()> {
        // ready queue of (block index, thread index)
        let mut ready: VecDeque<(usize, usize)> = VecDeque::new();
        for (bi, b) in blocks.iter().enumerate() {
            let n = b.threads.len();
            for t in 0..n {
                ready.push_back((
                    bi,
                    if *sched == Schedule::Reversed {
                        n - 1 - t
                    } else {
                        t
                    },
                ));
            }
        }
        let (random, max_q) = match sched {
            Schedule::Random { max_quantum, .. } => (true, (*max_quantum).max(1) as u64),
            _ => (false, u64::MAX),
        };
        loop {
            let pick = if random {
                if ready.is_empty() {
                    None
                } else {
                    let i = rng.below(ready.len());
                    ready.swap_remove_back(i)
                }
            } else {
                ready.pop_front()
            };
            let Some((bi, ti)) = pick else { break };
            let quantum = if random {
                1 + rng.next() % max_q
            } else {
                u64::MAX
            };
            let mut released = Vec::new();
            let still_ready = self.run_thread(&mut blocks[bi], ti, quantum, &mut released)?;
            if still_ready {
                ready.push_back((bi, ti));
            }
            for t in released {
                ready.push_back((bi, t));
            }
        }
        for b in blocks.iter() {
            if b.threads.iter().any(|t| !matches!(t.state, TState::Exited)) {
                let all: Vec<String> = blocks.iter().map(|b| b.waiting_summary(self.k)).collect();
                return err(
                    ErrorKind::Deadlock,
                    format!(
                        "{}: no thread can make progress; where each thread is:\n{}",
                        self.k.name,
                        all.join("\n")
                    ),
                );
            }
        }
        Ok(())
    }

    fn context(&self, blk: &Block, ti: usize, e: Error) -> Error {
        let t = &blk.threads[ti];
        let line = self.k.insts.get(t.pc).map_or(0, |x| x.line);
        let text = self
            .k
            .lines
            .get(line.saturating_sub(1) as usize)
            .cloned()
            .unwrap_or_default();
        Error {
            kind: e.kind,
            message: format!(
                "{}\n  in {} at line {line}: `{text}`\n  block {:?} thread {:?}",
                e.message, self.k.name, blk.ctaid, t.tid
            ),
        }
    }

    /// Runs one thread for up to `quantum` instructions. Returns whether it
    /// is still ready; threads released by a barrier or collective it
    /// completed are pushed to `released`.
    fn run_thread(
        &mut self,
        blk: &mut Block,
        ti: usize,
        quantum: u64,
        released: &mut Vec<usize>,
    ) -> Result<bool> {
        let mut n = 0;
        while n < quantum {
            if self.steps >= self.max_steps {
                let e = Error {
                    kind: ErrorKind::StepLimit,
                    message: format!("instruction budget of {} exhausted", self.max_steps),
                };
                return Err(self.context(blk, ti, e));
            }
            self.steps += 1;
            n += 1;
            let pc = blk.threads[ti].pc;
            let Some(inst) = self.k.insts.get(pc) else {
                let e = Error {
                    kind: ErrorKind::Undefined,
                    message: "fell off the end of the kernel without ret/exit".into(),
                };
                return Err(self.context(blk, ti, e));
            };
            let flow = match self.exec(blk, ti, inst) {
                Ok(f) => f,
                Err(e) => return Err(self.context(blk, ti, e)),
            };
            match flow {
                Flow::Next => blk.threads[ti].pc += 1,
                Flow::Jump(t) => blk.threads[ti].pc = t,
                Flow::Exit => {
                    blk.threads[ti].state = TState::Exited;
                    let round = blk.threads[ti].round;
                    self.report.latency_rounds = self.report.latency_rounds.max(round);
                    if let Err(e) = self.on_exit(blk, ti, released) {
                        return Err(self.context(blk, ti, e));
                    }
                    return Ok(false);
                }
                Flow::Block => {
                    if let Err(e) = self.on_block(blk, ti, released) {
                        return Err(self.context(blk, ti, e));
                    }
                    // a completed rendezvous releases this thread too
                    if let Some(p) = released.iter().position(|&t| t == ti) {
                        released.swap_remove(p);
                        return Ok(true);
                    }
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn on_exit(&mut self, blk: &mut Block, ti: usize, released: &mut Vec<usize>) -> Result<()> {
        if let Some((&id, &(pc, _))) = blk.bar_waiting.iter().next() {
            return err(
                ErrorKind::Barrier,
                format!(
                    "thread exited while other threads of its block wait at block-wide barrier {id} (line {}); they can never be released",
                    self.k.insts[pc].line
                ),
            );
        }
        // an exit can complete a collective of its warp
        let warp = ti / 32;
        let lane0 = warp * 32;
        let end = (lane0 + 32).min(blk.threads.len());
        if let Some(w) = (lane0..end).find(|&t| matches!(blk.threads[t].state, TState::Coll { .. }))
        {
            self.try_collective(blk, w, released)?;
        }
        Ok(())
    }

    fn on_block(&mut self, blk: &mut Block, ti: usize, released: &mut Vec<usize>) -> Result<()> {
        match blk.threads[ti].state {
            TState::Bar { id } => {
                let pc = blk.threads[ti].pc;
                let nthreads = blk.threads.len() as u32;
                if let Some(x) = blk
                    .threads
                    .iter()
                    .position(|t| matches!(t.state, TState::Exited))
                {
                    return err(
                        ErrorKind::Barrier,
                        format!(
                            "block-wide barrier {id} reached, but thread {:?} of the block has already exited (line {}); the barrier can never complete",
                            blk.threads[x].tid, self.k.insts[blk.threads[x].pc].line
                        ),
                    );
                }
                let e = blk.bar_waiting.entry(id).or_insert((pc, 0));
                if e.0 != pc {
                    return err(
                        ErrorKind::Barrier,
                        format!(
                            "divergent barrier: barrier {id} waited on at line {} and at line {} in the same phase",
                            self.k.insts[e.0].line, self.k.insts[pc].line
                        ),
                    );
                }
                e.1 += 1;
                if e.1 == nthreads {
                    blk.bar_waiting.remove(&id);
                    // A barrier synchronises its participants (PTX ISA 8.9.4):
                    // it joins what they know, what their fences released and
                    // what their atomics read. Carrying the last two across
                    // is what fence.sc allows; see `fence`.
                    let at_this =
                        |th: &Thread| matches!(th.state, TState::Bar { id: i } if i == id);
                    join_across(&mut blk.threads, at_this, |th| &mut th.know);
                    join_across(&mut blk.threads, at_this, |th| &mut th.released);
                    join_across(&mut blk.threads, at_this, |th| &mut th.acquired);
                    compress_whole_phase(blk, at_this);
                    let round = blk
                        .threads
                        .iter()
                        .filter(|th| at_this(th))
                        .map(|th| th.round)
                        .max()
                        .unwrap_or(0);
                    for (t, th) in blk.threads.iter_mut().enumerate() {
                        if matches!(th.state, TState::Bar { id: i } if i == id) {
                            th.round = round;
                            th.state = TState::Ready;
                            th.pc += 1;
                            released.push(t);
                        }
                    }
                    blk.epoch += 1;
                }
                Ok(())
            }
            TState::Coll { .. } => self.try_collective(blk, ti, released),
            _ => Ok(()),
        }
    }

    /// Checks the warp collective thread `ti` waits at; completes it when
    /// every live lane of its mask has arrived.
    fn try_collective(
        &mut self,
        blk: &mut Block,
        ti: usize,
        released: &mut Vec<usize>,
    ) -> Result<()> {
        let TState::Coll { kind, mask, .. } = blk.threads[ti].state else {
            return Ok(());
        };
        let lane0 = ti / 32 * 32;
        let nlanes = (blk.threads.len() - lane0).min(32);
        let mut complete = true;
        for lane in 0..32usize {
            if mask & (1 << lane) == 0 {
                continue;
            }
            if lane >= nlanes {
                continue; // lane does not exist: treated as exited
            }
            match blk.threads[lane0 + lane].state {
                TState::Exited => {}
                TState::Coll {
                    kind: k2, mask: m2, ..
                } => {
                    if k2 != kind || m2 != mask {
                        return err(
                            ErrorKind::Warp,
                            format!(
                                "warp collective mismatch: lane {} waits at {kind:?} with mask {mask:#010x}, lane {lane} at {k2:?} with mask {m2:#010x}",
                                ti - lane0
                            ),
                        );
                    }
                }
                _ => complete = false,
            }
        }
        if !complete {
            return Ok(());
        }
        let live = |blk: &Block, lane: usize| {
            lane < nlanes && !matches!(blk.threads[lane0 + lane].state, TState::Exited)
        };
        let parts: Vec<usize> = (0..32)
            .filter(|&l| mask & (1 << l) != 0 && live(blk, l))
            .collect();
        let vals = |blk: &Block, lane: usize| match blk.threads[lane0 + lane].state {
            TState::Coll { vals, .. } => vals,
            _ => [0; 3],
        };
        let mut results: Vec<(usize, u64, Option<bool>)> = Vec::with_capacity(parts.len());
        match kind {
            CollKind::Shfl(mode) => {
                for &lane in &parts {
                    let [_, b, c] = vals(blk, lane);
                    let l = lane as i32;
                    let bval = (b & 31) as i32;
                    let cval = (c & 31) as i32;
                    let seg = ((c >> 8) & 31) as i32;
                    let max_lane = (l & seg) | (cval & !seg);
                    let min_lane = l & seg;
                    let (j, pval) = match mode {
                        ShflMode::Up => (l - bval, l - bval >= max_lane),
                        ShflMode::Down => (l + bval, l + bval <= max_lane),
                        ShflMode::Bfly => (l ^ bval, (l ^ bval) <= max_lane),
                        ShflMode::Idx => {
                            let j = min_lane | (bval & !seg);
                            (j, j <= max_lane)
                        }
                    };
                    let src = if pval { j as usize } else { lane };
                    if pval && (mask & (1 << src) == 0 || !live(blk, src)) {
                        let why = if src >= nlanes {
                            "does not exist"
                        } else if mask & (1 << src) == 0 {
                            "is not in the member mask"
                        } else {
                            "has exited"
                        };
                        return err(
                            ErrorKind::Warp,
                            format!("shfl.sync: lane {lane} reads lane {src}, which {why} (mask {mask:#010x}); the value is undefined"),
                        );
                    }
                    results.push((lane, vals(blk, src)[0] as u64, Some(pval)));
                }
            }
            CollKind::BarWarp => {
                for &lane in &parts {
                    results.push((lane, 0, None));
                }
            }
        }
        // the lanes resume together, at the latest round among them
        let round = parts
            .iter()
            .map(|&l| blk.threads[lane0 + l].round)
            .max()
            .unwrap_or(0);
        for (lane, v, p) in results {
            let t = lane0 + lane;
            blk.threads[t].round = round;
            let inst = &self.k.insts[blk.threads[t].pc];
            // a shuffle's lanes get their values (`bar.warp.sync` writes none)
            if let Op::Shfl { d, p: pd, .. } = &inst.op {
                write(self.k, &mut blk.threads[t], *d, v, true, round);
                if let (Some(pr), Some(pv)) = (pd, p) {
                    write(self.k, &mut blk.threads[t], *pr, pv as u64, true, round);
                }
            }
            blk.threads[t].state = TState::Ready;
            blk.threads[t].pc += 1;
            released.push(t);
        }
        Ok(())
    }

    fn sreg(&self, blk: &Block, th: &Thread, s: Sreg, ti: usize) -> u64 {
        let lane = (ti % 32) as u32;
        (match s {
            Sreg::Tid(d) => th.tid[d as usize],
            Sreg::Ntid(d) => self.block[d as usize],
            Sreg::Ctaid(d) => blk.ctaid[d as usize],
            Sreg::Nctaid(d) => self.grid[d as usize],
            Sreg::Laneid => lane,
        }) as u64
    }

    // ------------------------------------------------------------ memory

    /// Whether an access to `space` goes to shared memory (else global).
    fn is_shared(space: Space) -> bool {
        match space {
            Space::Global => false,
            Space::Shared => true,
            Space::Param => unreachable!("param handled separately"),
        }
    }

    fn check_align(a: u64, size: usize, what: &str) -> Result<()> {
        if !a.is_multiple_of(size as u64) {
            return err(
                ErrorKind::Misaligned,
                format!("{what} access of {size} bytes at {a:#x} is not aligned to {size}"),
            );
        }
        Ok(())
    }

    fn shared_range(blk: &Block, a: u64, size: usize) -> Result<usize> {
        let end = a.checked_add(size as u64);
        if a < SHARED_BASE as u64 || end.is_none_or(|e| e > blk.shared.len() as u64) {
            return err(
                ErrorKind::OutOfBounds,
                format!(
                    "shared access of {size} bytes at offset {a:#x} is outside the block's {} bytes of shared memory (at {SHARED_BASE:#x}..{:#x})",
                    blk.shared.len() - SHARED_BASE,
                    blk.shared.len()
                ),
            );
        }
        Ok(a as usize)
    }

    /// Race detection on shared memory: conflicting accesses by different
    /// threads between two barriers.
    fn shared_track(
        blk: &mut Block,
        off: usize,
        size: usize,
        ti: usize,
        write: bool,
    ) -> Result<()> {
        let (ep, me) = (blk.epoch, ti as u32);
        for i in off..off + size {
            let s = &mut blk.shadow[i];
            if !write && !s.init {
                return err(
                    ErrorKind::Undefined,
                    format!("read of uninitialised shared memory at offset {i:#x} by thread {ti}"),
                );
            }
            s.init |= write;
            if s.w_epoch == ep && s.w_tid != me {
                return err(
                    ErrorKind::Race,
                    format!(
                        "shared memory race at offset {i:#x}: thread {} wrote it and thread {ti} {} it with no barrier in between",
                        s.w_tid,
                        if write { "writes" } else { "reads" }
                    ),
                );
            }
            if write {
                if s.r_epoch == ep && s.r_tid != me {
                    let who = if s.r_tid == u32::MAX {
                        "other threads".to_string()
                    } else {
                        format!("thread {}", s.r_tid)
                    };
                    return err(
                        ErrorKind::Race,
                        format!("shared memory race at offset {i:#x}: {who} read it and thread {ti} writes it with no barrier in between"),
                    );
                }
                s.w_epoch = ep;
                s.w_tid = me;
            } else if s.r_epoch == ep && s.r_tid != me {
                s.r_tid = u32::MAX;
            } else {
                s.r_epoch = ep;
                s.r_tid = me;
            }
        }
        Ok(())
    }

    fn load(
        &mut self,
        blk: &mut Block,
        ti: usize,
        space: Space,
        a: u64,
        size: usize,
    ) -> Result<u64> {
        if space == Space::Param {
            Self::check_align(a, size, "param")?;
            if a.checked_add(size as u64)
                .is_none_or(|e| e > self.params.len() as u64)
            {
                return err(
                    ErrorKind::OutOfBounds,
                    format!(
                        "param access of {size} bytes at {a} is outside the {} parameter bytes",
                        self.params.len()
                    ),
                );
            }
            return Ok(le(&self.params[a as usize..a as usize + size]));
        }
        let sh = Self::is_shared(space);
        Self::check_align(a, size, if sh { "shared" } else { "global" })?;
        if sh {
            let off = Self::shared_range(blk, a, size)?;
            Self::shared_track(blk, off, size, ti, false)?;
            Ok(le(&blk.shared[off..off + size]))
        } else {
            let (base, off) = self.dev.find(a, size)?;
            let buf = &self.dev.bufs[&base];
            if !buf.tags.is_empty() {
                for i in off..off + size {
                    if let Some(why) = self.unordered(blk, ti, &buf.tags[i]) {
                        let at = a + (i - off) as u64;
                        return err(
                            ErrorKind::Race,
                            format!(
                                "global memory race at {at:#x}: {why}, and thread {ti} reads it"
                            ),
                        );
                    }
                }
            }
            Self::check_init(buf, off, size, a)?;
            let th = &mut blk.threads[ti];
            th.seq += 1;
            let me = Tag {
                launch: self.launch,
                block: blk.linear,
                tid: ti as u32,
                phase: blk.epoch,
                seq: th.seq,
            };
            let buf = self.dev.bufs.get_mut(&base).unwrap();
            if buf.rtags.is_empty() {
                buf.rtags = vec![Tag::default(); buf.data.len()];
            }
            buf.rtags[off..off + size].fill(me);
            Ok(le(&buf.data[off..off + size]))
        }
    }

    /// Writes `data` at `a`; an `atomic` store (global memory only) skips the
    /// write-race check: two atomics never race with each other.
    fn store(
        &mut self,
        blk: &mut Block,
        ti: usize,
        space: Space,
        a: u64,
        data: &[u8],
        atomic: bool,
    ) -> Result<()> {
        let sh = Self::is_shared(space);
        let (size, bytes) = (data.len(), data);
        Self::check_align(a, size, if sh { "shared" } else { "global" })?;
        if sh {
            // atomics are global-only (the loader refuses shared ones)
            let off = Self::shared_range(blk, a, size)?;
            Self::shared_track(blk, off, size, ti, true)?;
            for s in &mut blk.shadow[off..off + size] {
                s.init = true;
            }
            blk.shared[off..off + size].copy_from_slice(&bytes[..size]);
        } else {
            let (base, off) = self.dev.find(a, size)?;
            let buf = &self.dev.bufs[&base];
            if !buf.rtags.is_empty() {
                for i in off..off + size {
                    if let Some(why) = self.unordered(blk, ti, &buf.rtags[i]) {
                        let at = a + (i - off) as u64;
                        return err(ErrorKind::Race, format!("global memory race at {at:#x}: {why} (a read), and thread {ti} writes it"));
                    }
                }
            }
            let launch = self.launch;
            let th = &mut blk.threads[ti];
            let buf = self.dev.bufs.get_mut(&base).unwrap();
            // atomics are tagged too (a plain read elsewhere must be ordered
            // after them), but two atomics never race with each other
            th.seq += 1;
            let me = Tag {
                launch,
                block: blk.linear,
                tid: ti as u32,
                phase: blk.epoch,
                seq: th.seq,
            };
            if buf.tags.is_empty() {
                buf.tags = vec![Tag::default(); buf.data.len()];
            }
            for i in off..off + size {
                let w = buf.tags[i];
                // Two threads storing the same byte value is order-independent
                // (e.g. several threads raising one flag); different values are a race.
                if !atomic
                    && w.launch == launch
                    && (w.block, w.tid) != (me.block, me.tid)
                    && buf.data[i] != bytes[i - off]
                {
                    return err(
                        ErrorKind::Race,
                        format!(
                            "global write race at {:#x}: thread {} of block {} and thread {ti} of block {} write different values in one launch without atomics",
                            a + (i - off) as u64,
                            w.tid,
                            w.block,
                            me.block
                        ),
                    );
                }
                buf.tags[i] = me;
            }
            buf.data[off..off + size].copy_from_slice(&bytes[..size]);
            buf.init[off..off + size].fill(true);
        }
        Ok(())
    }

    /// Why the earlier global access `t` by another thread is not ordered
    /// before the current access of thread `ti` (None: it is, or it is this
    /// thread's own, or it belongs to an earlier launch).
    fn unordered(&self, blk: &Block, ti: usize, t: &Tag) -> Option<String> {
        if t.launch != self.launch || (t.block == blk.linear && t.tid == ti as u32) {
            return None;
        }
        if t.block == blk.linear {
            return (t.phase == blk.epoch).then(|| {
                format!(
                    "thread {} of this block accessed it with no barrier in between",
                    t.tid
                )
            });
        }
        let th = &blk.threads[ti];
        let k = &th.know[t.block as usize];
        if k.covers(t) {
            return None;
        }
        let missing = if th
            .acquired
            .get(t.block as usize)
            .is_some_and(|a| a.covers(t))
        {
            "a global atomic (of this thread, or of one it met at a barrier since) read that block's release of it, but this thread has run no gpu-scope fence (membar.gl) after that atomic"
        } else {
            "that block needs a gpu-scope fence (membar.gl) after the access and before a global atomic (a barrier may come in between), and this block a global atomic that reads that one's, then a gpu-scope fence in this thread (again a barrier may come in between); a `.cta` fence does not reach other blocks"
        };
        Some(format!(
            "thread {} of block {} accessed it in this launch (its barrier phase {}, access {}) and nothing orders that before this access (this thread knows {k:?} of that block): {missing}",
            t.tid, t.block, t.phase, t.seq
        ))
    }

    fn check_init(buf: &Buffer, off: usize, size: usize, a: u64) -> Result<()> {
        if let Some(i) = buf.init[off..off + size].iter().position(|&x| !x) {
            return err(
                ErrorKind::Undefined,
                format!(
                    "read of uninitialised global memory at {:#x} (nothing wrote it)",
                    a + i as u64
                ),
            );
        }
        Ok(())
    }

    fn addr(&self, th: &Thread, a: &Addr) -> u64 {
        let base = a.base.map_or(0, |r| th.regs[r as usize]);
        base.wrapping_add(a.off as u64)
    }

    // ------------------------------------------------------------ execute

    fn exec(&mut self, blk: &mut Block, ti: usize, inst: &Inst) -> Result<Flow> {
        let k = self.k;
        // latency model: issue once the guard and every operand have arrived
        {
            let th = &mut blk.threads[ti];
            let waits = inst
                .guard
                .iter()
                .map(|g| g.0)
                .chain(inst.reads.iter().copied());
            th.round = waits.fold(th.round, |r, x| r.max(th.ready[x as usize]));
            self.result_ready = th.round;
        }
        let th = &blk.threads[ti];
        let undefined = |r: u16| -> Result<Flow> {
            err(
                ErrorKind::Undefined,
                format!(
                    "register {} holds no defined value (never written, or computed from such a register) and is used as an address, a stored value, a branch condition or an operand of an atomic, barrier or warp collective",
                    k.reg_names[r as usize]
                ),
            )
        };
        if let Some((p, neg)) = inst.guard {
            if !th.defined[p as usize] {
                return undefined(p);
            }
            if (th.regs[p as usize] != 0) == neg {
                return Ok(Flow::Next);
            }
        }
        if let Some(&r) = inst.strict.iter().find(|&&r| !th.defined[r as usize]) {
            return undefined(r);
        }
        // results of this instruction are defined iff everything it read is
        self.result_defined = inst.reads.iter().all(|&r| th.defined[r as usize]);
        let rd = |s: Src| -> u64 {
            match s {
                Src::Reg(r) => th.regs[r as usize],
                Src::Imm(v) => v,
                Src::Sreg(s) => self.sreg(blk, th, s, ti),
            }
        };
        match &inst.op {
            Op::Mov { d, a } => {
                let v = rd(*a);
                self.set(blk, ti, *d, v);
            }
            Op::Pack {
                d,
                parts,
                part_bits,
            } => {
                let mut v = 0u64;
                for (i, p) in parts.iter().enumerate() {
                    v |= (rd(*p) & mask_bits(*part_bits)) << (i as u32 * part_bits);
                }
                self.set(blk, ti, *d, v);
            }
            Op::Unpack { ds, a, part_bits } => {
                let v = rd(*a);
                for (i, d) in ds.iter().enumerate() {
                    self.set(
                        blk,
                        ti,
                        *d,
                        (v >> (i as u32 * part_bits)) & mask_bits(*part_bits),
                    );
                }
            }
            Op::Int { op, ty, d, a, b } => {
                let v = int_op(*op, *ty, rd(*a), rd(*b))?;
                self.set(blk, ti, *d, v);
            }
            Op::Wide { ty, d, a, b, c } => {
                let w = ty.bits();
                let (x, y) = (rd(*a), rd(*b));
                let p = if ty.kind() == TyKind::Sint {
                    (sext(x, w).wrapping_mul(sext(y, w))) as u64
                } else {
                    (x & mask_bits(w)).wrapping_mul(y & mask_bits(w))
                };
                let v = p.wrapping_add(c.map_or(0, &rd)) & mask_bits(2 * w);
                self.set(blk, ti, *d, v);
            }
            Op::Mad { hi, ty, d, a, b, c } => {
                let op = if *hi { IntOp::MulHi } else { IntOp::MulLo };
                let p = int_op(op, *ty, rd(*a), rd(*b))?;
                let v = p.wrapping_add(rd(*c)) & ty.mask();
                self.set(blk, ti, *d, v);
            }
            Op::Float { op, ty, d, a, b } => {
                let (x, y) = (rd(*a), rd(*b));
                let v = if *ty == Ty::F32 {
                    let (x, y) = (f32b(x), f32b(y));
                    f32_result(match op {
                        FOp::Add => x + y,
                        FOp::Sub => x - y,
                        FOp::Mul => x * y,
                        FOp::Div => x / y,
                        FOp::Min | FOp::Max => fminmax(x as f64, y as f64, *op == FOp::Max)
                            .map_or(f32::NAN, |v| v as f32),
                    })
                } else {
                    let (x, y) = (f64b(x), f64b(y));
                    (match op {
                        FOp::Add => x + y,
                        FOp::Sub => x - y,
                        FOp::Mul => x * y,
                        FOp::Div => x / y,
                        FOp::Min | FOp::Max => fminmax(x, y, *op == FOp::Max)
                            .unwrap_or(f64::from_bits(0x7fff_ffff_ffff_ffff)),
                    })
                    .to_bits()
                };
                self.set(blk, ti, *d, v);
            }
            Op::Fma { ty, d, a, b, c } => {
                let v = if *ty == Ty::F32 {
                    f32_result(f32b(rd(*a)).mul_add(f32b(rd(*b)), f32b(rd(*c))))
                } else {
                    f64b(rd(*a)).mul_add(f64b(rd(*b)), f64b(rd(*c))).to_bits()
                };
                self.set(blk, ti, *d, v);
            }
            Op::FUn { op, ty, d, a } => {
                let x = rd(*a);
                let sign = 1u64 << (ty.bits() - 1);
                let v = match op {
                    FUnOp::Neg => x ^ sign,
                    FUnOp::Abs => x & !sign,
                    FUnOp::Sqrt if *ty == Ty::F32 => f32_result(f32b(x).sqrt()),
                    FUnOp::Sqrt => f64b(x).sqrt().to_bits(),
                };
                self.set(blk, ti, *d, v);
            }
            Op::Cvt {
                dty,
                sty,
                irnd,
                d,
                a,
            } => {
                let v = cvt(*dty, *sty, *irnd, rd(*a) & sty.mask());
                // a wider destination register receives the value extended by dty's signedness
                let rb = k.reg_bits[*d as usize];
                let v = if dty.kind() == TyKind::Sint {
                    sext(v, dty.bits()) as u64 & mask_bits(rb)
                } else {
                    v
                };
                self.set(blk, ti, *d, v);
            }
            Op::Setp { cmp, ty, p, a, b } => {
                let r = compare(*cmp, *ty, rd(*a), rd(*b));
                self.set(blk, ti, *p, r as u64);
            }
            Op::Selp { d, a, b, c } => {
                let v = if th.regs[*c as usize] != 0 {
                    rd(*a)
                } else {
                    rd(*b)
                };
                self.set(blk, ti, *d, v);
            }
            Op::Testp { kind, ty, p, a } => {
                let x = if *ty == Ty::F32 {
                    f32b(rd(*a)) as f64
                } else {
                    f64b(rd(*a))
                };
                let sub = if *ty == Ty::F32 {
                    f32b(rd(*a)).is_subnormal()
                } else {
                    x.is_subnormal()
                };
                let v = match kind {
                    TestKind::Finite => x.is_finite(),
                    TestKind::Infinite => x.is_infinite(),
                    TestKind::Number => !x.is_nan(),
                    TestKind::NotANumber => x.is_nan(),
                    TestKind::Normal => x.is_finite() && x != 0.0 && !sub,
                    TestKind::Subnormal => sub,
                };
                self.set(blk, ti, *p, v as u64);
            }
            Op::Ld {
                space,
                ty,
                ds,
                addr,
            } => {
                let a = self.addr(th, addr);
                let es = ty.bytes() as usize;
                let total = es * ds.len();
                // the whole vector must be aligned to its size
                if *space != Space::Param {
                    let sh = Self::is_shared(*space);
                    Self::check_align(a, total, if sh { "shared" } else { "global" })?;
                }
                if *space == Space::Global {
                    self.result_ready += 1;
                    self.report.global_load_bytes += total as u64;
                }
                let ds = ds.clone();
                for (i, d) in ds.iter().enumerate() {
                    let v = self.load(blk, ti, *space, a + (i * es) as u64, es)?;
                    let v = if ty.kind() == TyKind::Sint {
                        sext(v, ty.bits()) as u64
                    } else {
                        v
                    };
                    self.set(blk, ti, *d, v);
                }
            }
            Op::St {
                space,
                ty,
                srcs,
                addr,
            } => {
                let a = self.addr(th, addr);
                let es = ty.bytes() as usize;
                let sh = Self::is_shared(*space);
                Self::check_align(a, es * srcs.len(), if sh { "shared" } else { "global" })?;
                let vals: Vec<u64> = srcs.iter().map(|s| rd(*s)).collect();
                if !sh {
                    self.report.global_store_bytes += (es * vals.len()) as u64;
                }
                for (i, v) in vals.into_iter().enumerate() {
                    self.store(
                        blk,
                        ti,
                        *space,
                        a + (i * es) as u64,
                        &v.to_le_bytes()[..es],
                        false,
                    )?;
                }
            }
            Op::Atom {
                op,
                ty,
                d,
                addr,
                b,
                c,
                acquire,
                release,
                scope,
            } => {
                let a = self.addr(th, addr);
                let (bv, cv) = (rd(*b), c.map_or(0, &rd));
                let size = ty.bytes() as usize;
                Self::check_align(a, size, "atomic")?;
                let old = {
                    let (base, off) = self.dev.find(a, size)?;
                    let buf = &self.dev.bufs[&base];
                    Self::check_init(buf, off, size, a)?;
                    le(&buf.data[off..off + size])
                };
                let new = atom_op(*op, *ty, old, bv, cv);
                self.store(blk, ti, Space::Global, a, &new.to_le_bytes()[..size], true)?;
                self.report.global_atomics += 1;
                let latest = self.atom_rounds.entry(a).or_default();
                *latest = (*latest).max(self.result_ready);
                self.result_ready = *latest + 1;
                if *scope == SyncScope::Gpu {
                    // PTX ISA 8.8/8.9.4: an atomic publishes what the thread's
                    // fences released (a `.release` one also what it knows
                    // now); what it reads takes effect at the next fence (for
                    // an `.acquire` one at once). A `red` reads nothing: it
                    // never forms an acquire pattern (8.11.1). `.cta` atomics
                    // do not reach other blocks.
                    let th = &mut blk.threads[ti];
                    let clock = self.atom_clocks.entry(a).or_default();
                    join_all(clock, &th.released);
                    if *release {
                        join_all(clock, &snapshot(th, blk.linear, blk.epoch, ti));
                    }
                    if d.is_some() {
                        join_all(
                            if *acquire {
                                &mut th.know
                            } else {
                                &mut th.acquired
                            },
                            clock,
                        );
                    }
                }
                if let Some(d) = d {
                    self.set(blk, ti, *d, old);
                }
            }
            Op::Bra { target } => return Ok(Flow::Jump(*target)),
            Op::Bar { id } => {
                let id = rd(*id) as u32;
                if id > 15 {
                    return err(
                        ErrorKind::Barrier,
                        format!("barrier id {id} out of range 0..16"),
                    );
                }
                blk.threads[ti].state = TState::Bar { id };
                return Ok(Flow::Block);
            }
            Op::BarWarp { mask } => {
                let mask = rd(*mask) as u32;
                return self.arrive(blk, ti, CollKind::BarWarp, mask, [0; 3]);
            }
            Op::Shfl {
                mode,
                a,
                b,
                c,
                mask,
                ..
            } => {
                let vals = [rd(*a) as u32, rd(*b) as u32, rd(*c) as u32];
                let mask = rd(*mask) as u32;
                return self.arrive(blk, ti, CollKind::Shfl(*mode), mask, vals);
            }
            // a `.cta` fence orders nothing for other blocks, and within a
            // block barriers already order global accesses (the model has
            // no other intra-block synchronisation)
            Op::Fence { scope } => {
                if *scope == SyncScope::Gpu {
                    fence(&mut blk.threads[ti], blk.linear, blk.epoch, ti);
                    blk.threads[ti].round += 1;
                }
            }
            Op::Exit => return Ok(Flow::Exit),
        }
        Ok(Flow::Next)
    }

    fn arrive(
        &mut self,
        blk: &mut Block,
        ti: usize,
        kind: CollKind,
        mask: u32,
        vals: [u32; 3],
    ) -> Result<Flow> {
        let lane = ti % 32;
        if mask & (1 << lane) == 0 {
            return err(
                ErrorKind::Warp,
                format!("{kind:?}: executing lane {lane} is not in the member mask {mask:#010x} (undefined behaviour)"),
            );
        }
        blk.threads[ti].state = TState::Coll { kind, mask, vals };
        Ok(Flow::Block)
    }

    fn set(&self, blk: &mut Block, ti: usize, d: u16, v: u64) {
        let ready = self.result_ready;
        write(
            self.k,
            &mut blk.threads[ti],
            d,
            v,
            self.result_defined,
            ready,
        );
    }
}

fn write(k: &Kernel, th: &mut Thread, d: u16, v: u64, defined: bool, ready: u32) {
    th.regs[d as usize] = v & mask_bits(k.reg_bits[d as usize]);
    th.defined[d as usize] = defined;
    th.ready[d as usize] = ready;
}

fn le(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

fn int_op(op: IntOp, ty: Ty, a: u64, b: u64) -> Result<u64> {
    let w = ty.bits();
    let m = ty.mask();
    let signed = ty.kind() == TyKind::Sint;
    let (a, b) = (a & m, b);
    let v = match op {
        IntOp::Add => a.wrapping_add(b),
        IntOp::Sub => a.wrapping_sub(b),
        IntOp::MulLo => a.wrapping_mul(b),
        IntOp::MulHi => {
            if signed {
                ((sext(a, w) as i128 * sext(b & m, w) as i128) >> w) as u64
            } else {
                ((a as u128 * (b & m) as u128) >> w) as u64
            }
        }
        IntOp::Div | IntOp::Rem => {
            if b & m == 0 {
                return err(ErrorKind::Undefined, "integer division by zero");
            }
            if signed {
                let (x, y) = (sext(a, w), sext(b & m, w));
                (if op == IntOp::Div {
                    x.wrapping_div(y)
                } else {
                    x.wrapping_rem(y)
                }) as u64
            } else if op == IntOp::Div {
                a / (b & m)
            } else {
                a % (b & m)
            }
        }
        IntOp::Min | IntOp::Max => {
            let lt = if signed {
                sext(a, w) < sext(b & m, w)
            } else {
                a < (b & m)
            };
            if lt == (op == IntOp::Min) {
                a
            } else {
                b
            }
        }
        IntOp::And => a & b,
        IntOp::Or => a | b,
        IntOp::Xor => a ^ b,
        IntOp::Shl => {
            let s = b as u32;
            if s >= w {
                0
            } else {
                a << s
            }
        }
        IntOp::Shr => {
            let s = (b as u32).min(w);
            if signed {
                (sext(a, w) >> s.min(63)) as u64
            } else if s >= w {
                0
            } else {
                a >> s
            }
        }
    };
    Ok(v & m)
}

fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64) -> bool {
    if ty.kind() == TyKind::Float {
        let (x, y) = if ty == Ty::F32 {
            (f32b(a) as f64, f32b(b) as f64)
        } else {
            (f64b(a), f64b(b))
        };
        let un = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => x == y,
            Cmp::Ne => !un && x != y,
            Cmp::Lt => x < y,
            Cmp::Le => x <= y,
            Cmp::Gt => x > y,
            Cmp::Ge => x >= y,
            Cmp::Equ => un || x == y,
            Cmp::Neu => x != y,
            Cmp::Ltu => un || x < y,
            Cmp::Leu => un || x <= y,
            Cmp::Gtu => un || x > y,
            Cmp::Geu => un || x >= y,
            Cmp::Num => !un,
            Cmp::Nan => un,
        };
    }
    let w = ty.bits();
    let (a, b) = (a & ty.mask(), b & ty.mask());
    let ord = if ty.kind() == TyKind::Sint {
        sext(a, w).cmp(&sext(b, w))
    } else {
        a.cmp(&b)
    };
    use std::cmp::Ordering::*;
    match cmp {
        Cmp::Eq => ord == Equal,
        Cmp::Ne => ord != Equal,
        Cmp::Lt => ord == Less,
        Cmp::Le => ord != Greater,
        Cmp::Gt => ord == Greater,
        Cmp::Ge => ord != Less,
        _ => false, // rejected at load time
    }
}

/// The bits an f32 arithmetic instruction writes: NVIDIA GPUs return the
/// quiet NaN 0x7fffffff for every NaN result (CUDA C++ Programming Guide,
/// "Floating-Point Standard"), whatever the inputs' payloads; the host's
/// own NaN bits (0xffc00000 for 0/0 on x86-64) would make the interpreter's
/// stores depend on the machine it runs on.
fn f32_result(v: f32) -> u64 {
    if v.is_nan() {
        0x7fff_ffff
    } else {
        v.to_bits() as u64
    }
}

fn cvt(dty: Ty, sty: Ty, irnd: Option<IRnd>, a: u64) -> u64 {
    let (df, sf) = (dty.kind() == TyKind::Float, sty.kind() == TyKind::Float);
    let src_f = || -> f64 {
        match sty {
            Ty::F16 => fp::f16_to_f32(a as u16) as f64,
            Ty::Bf16 => fp::bf16_to_f32(a as u16) as f64,
            Ty::F32 => f32b(a) as f64,
            _ => f64b(a),
        }
    };
    if df && sf {
        return match (dty, sty) {
            // f64 → f32 rounds to nearest even; f16/bf16 → f32 is exact
            (Ty::F32, _) => (src_f() as f32).to_bits() as u64,
            (Ty::F64, _) => src_f().to_bits(),
            (Ty::F16, _) => fp::f32_to_f16_rn(f32b(a)) as u64,
            (Ty::Bf16, _) => fp::f32_to_bf16_rn(f32b(a)) as u64,
            _ => unreachable!("rejected at load time"),
        };
    }
    if df {
        // integer → float, round to nearest even (Rust `as`)
        let signed = sty.kind() == TyKind::Sint;
        let s = sext(a, sty.bits());
        return match (dty, signed) {
            (Ty::F32, true) => (s as f32).to_bits() as u64,
            (Ty::F32, false) => (a as f32).to_bits() as u64,
            (_, true) => (s as f64).to_bits(),
            (_, false) => (a as f64).to_bits(),
        };
    }
    if sf {
        let x = src_f();
        let r = match irnd {
            Some(IRnd::Rni) => x.round_ties_even(),
            Some(IRnd::Rmi) => x.floor(),
            Some(IRnd::Rpi) => x.ceil(),
            _ => x.trunc(),
        };
        let w = dty.bits();
        if x.is_nan() {
            // PTX ISA, cvt, Integer Notes: 0, except from .f64 or into a
            // 64-bit integer, where NaN gives 1 << (width − 1).
            return if sty == Ty::F64 || w == 64 {
                1 << (w - 1)
            } else {
                0
            };
        }
        return if dty.kind() == TyKind::Sint {
            let (lo, hi) = (-(2f64.powi(w as i32 - 1)), 2f64.powi(w as i32 - 1) - 1.0);
            (r.clamp(lo, hi) as i64 as u64) & dty.mask()
        } else {
            r.clamp(0.0, 2f64.powi(w as i32) - 1.0) as u64 & dty.mask()
        };
    }
    // integer → integer: extend by the source's signedness, truncate to the destination
    let v = if sty.kind() == TyKind::Sint {
        sext(a, sty.bits()) as u64
    } else {
        a
    };
    v & dty.mask()
}

fn atom_op(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    match op {
        AtomOp::Add => match ty {
            Ty::F32 => fp::atom_add_f32_ftz(f32b(old), f32b(b)).to_bits() as u64,
            _ => old.wrapping_add(b),
        },
        AtomOp::Inc => {
            if old >= b {
                0
            } else {
                old + 1
            }
        }
        AtomOp::Cas => {
            if old == b {
                c
            } else {
                old
            }
        }
        AtomOp::Exch => b,
    }
}
