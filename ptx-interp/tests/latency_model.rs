//! `LaunchReport`'s cost counters on kernels whose answer is known by hand:
//! global bytes (per thread and distinct), atomics, and the latency model
//! (global round trips a thread waits for one after another, with in-order
//! issue).

use ptx_interp::{Arg, Device, LaunchConfig, LaunchReport, Module};

const KERNEL: &str = r#"
.version 7.0
.target sm_80
.address_size 64
.visible .entry cost(.param .u64 buf, .param .u32 mode)
{
    .reg .pred %p, %first;
    .reg .b32 %mode, %tx, %x, %y, %z;
    .reg .b64 %buf, %a, %b, %c, %o;
    .shared .u32 s_word;
    ld.param.u64 %buf, [buf];
    ld.param.u32 %mode, [mode];
    mov.u32 %tx, %tid.x;
    setp.eq.u32 %first, %tx, 0;
    // every thread writes its own word at buf + 64 + 4·tid
    mul.wide.u32 %o, %tx, 4;
    add.s64 %o, %buf, %o;
    setp.eq.u32 %p, %mode, 1;
    @%p bra INDEPENDENT;
    setp.eq.u32 %p, %mode, 2;
    @%p bra BRANCH;
    setp.eq.u32 %p, %mode, 3;
    @%p bra BARRIER;
    setp.eq.u32 %p, %mode, 4;
    @%p bra FENCED;
    setp.eq.u32 %p, %mode, 5;
    @%p bra SHARED;

    // mode 0: three loads, each address from the one before: 3 rounds
    ld.global.u64 %a, [%buf];
    ld.global.u64 %b, [%a];
    ld.global.u64 %c, [%b];
    cvt.u32.u64 %x, %c;
    bra STORE;

INDEPENDENT:
    // three loads with addresses known up front, then their sum: 1 round
    ld.global.u32 %x, [%buf+24];
    ld.global.u32 %y, [%buf+28];
    ld.global.v2.u32 {%z, %x}, [%buf+32];
    add.u32 %x, %x, %y;
    add.u32 %x, %x, %z;
    bra STORE;

BRANCH:
    // a branch on a loaded value, then an independent load: 2 rounds (a
    // GPU does not speculate past the branch)
    ld.global.u32 %x, [%buf+24];
    setp.eq.u32 %p, %x, 12345;
    @%p bra STORE;
    ld.global.u32 %x, [%buf+28];
    bra STORE;

BARRIER:
    // thread 0 chases two pointers before a barrier; after it, every
    // thread loads once: 3 rounds for all
    @%first ld.global.u64 %a, [%buf];
    @%first ld.global.u64 %b, [%a];
    @%first cvt.u32.u64 %y, %b;
    @%first st.shared.u32 [s_word], %y;
    bar.sync 0;
    ld.global.u32 %x, [%buf+28];
    bra STORE;

FENCED:
    // a gpu-scope fence waits a round; the atomic's result one more;
    // a .cta fence none: 2 rounds
    membar.cta;
    membar.gl;
    atom.global.add.u32 %x, [%buf+40], 1;
    bra STORE;

SHARED:
    // shared memory takes no round: 0
    @%first st.shared.u32 [s_word], %tx;
    bar.sync 0;
    ld.shared.u32 %x, [s_word];

STORE:
    st.global.u32 [%o+64], %x;
    ret;
}
"#;

/// Launches `cost` with 64 threads in one block; the buffer holds a chain
/// of pointers (word 0 → word 1 → word 2) and a few plain words.
fn cost(mode: u32) -> LaunchReport {
    let m = Module::load(KERNEL).unwrap_or_else(|e| panic!("{e}"));
    let mut dev = Device::new();
    let buf = dev.alloc_zeroed(64 + 4 * 64);
    let mut init = Vec::new();
    for w in [buf + 8, buf + 16, 7u64, 5, 9] {
        init.extend_from_slice(&w.to_le_bytes());
    }
    dev.write(buf, &init).unwrap();
    let args = [Arg::U64(buf), Arg::U32(mode)];
    dev.launch(&m, "cost", &LaunchConfig::linear(1, 64), &args)
        .unwrap_or_else(|e| panic!("mode {mode}: {e}"))
}

#[test]
fn dependent_loads_wait_one_round_each() {
    let r = cost(0);
    assert_eq!(r.latency_rounds, 3);
    assert_eq!(r.global_load_bytes, 64 * 3 * 8);
    // every thread read the same three words
    assert_eq!(r.global_bytes_read, 3 * 8);
    assert_eq!(r.global_store_bytes, 64 * 4);
    assert_eq!(r.global_bytes_written, 64 * 4);
    assert_eq!(r.global_atomics, 0);
}

#[test]
fn independent_loads_share_one_round() {
    let r = cost(1);
    assert_eq!(r.latency_rounds, 1);
    assert_eq!(r.global_load_bytes, 64 * (4 + 4 + 8));
    assert_eq!(r.global_bytes_read, 16);
}

#[test]
fn a_branch_on_a_loaded_value_waits_for_it() {
    let r = cost(2);
    assert_eq!(r.latency_rounds, 2);
    assert_eq!(r.global_load_bytes, 64 * 8);
}

#[test]
fn a_barrier_resumes_every_thread_at_the_latest_round() {
    let r = cost(3);
    assert_eq!(r.latency_rounds, 3);
    assert_eq!(r.global_load_bytes, 2 * 8 + 64 * 4);
}

#[test]
fn gpu_fences_and_atomic_results_take_a_round_each() {
    let r = cost(4);
    assert_eq!(r.latency_rounds, 2);
    assert_eq!(r.global_atomics, 64);
    assert_eq!(r.global_load_bytes, 0);
    assert_eq!(r.global_bytes_read, 0);
    assert_eq!(r.global_store_bytes, 64 * 4);
    // the stores and the atomics' one word
    assert_eq!(r.global_bytes_written, 64 * 4 + 4);
}

#[test]
fn shared_memory_takes_no_round() {
    let r = cost(5);
    assert_eq!(r.latency_rounds, 0);
    assert_eq!(r.global_load_bytes, 0);
}
