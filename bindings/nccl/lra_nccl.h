/* lra_nccl.h: the cross-rank reduction lra needs, over NCCL, on the
 * caller's communicator and stream. Header only.
 *
 * STATUS: compiled (C11 and C++17, -Wall -Wextra -Werror), linked and run
 * against the real NCCL 2.32.3 and CUDA runtime 12.9 (PyPI nvidia-nccl-cu12,
 * nvidia-cuda-runtime-cu12; scripts/stages/nccl.sh prints the version it
 * fetched) on machines WITHOUT a GPU or CUDA driver: there lra_nccl_init
 * returns LRA_NCCL_ERR_CUDA + cudaErrorInsufficientDriver (1035) and leaves
 * the struct safe to free, the callback's failing CUDA copy reaches
 * lra_step and lra_report_reeval as LRA_REDUCTION_FAILED naming the code
 * (so does a callback registered despite the failed init, with
 * LRA_NCCL_ERR_INIT), and its wait maps real NCCL and CUDA errors to the
 * documented codes (tests/nccl/lra_nccl_real_test.c). The rest of its
 * logic (staging, the device check and switch, non-blocking communicators,
 * busy stream, failed peer, unusable `user`, the deadline `timeout_s`,
 * lra_nccl_check_agreement with a disagreement injected) runs on
 * one simulated rank against stub declarations that are checked against
 * the real headers (tests/nccl/stub). The collective itself, ncclAllReduce
 * on GPUs, has NEVER been run. The MPI binding (bindings/mpi/lra_mpi.h) is
 * the tested one.
 *
 * lra sums a few doubles (at most 3 per call; one lra_step may make two
 * calls) across ranks: the rank-local parts of φ = g·v when parameters are
 * sharded, f_i and f+ when losses are rank-local. They are host values, so
 * each call stages them through a small device buffer: copy in,
 * ncclAllReduce(ncclFloat64, ncclSum), copy out, and wait for the stream
 * (one short host synchronisation per call, which the η decision needs
 * anyway). Every rank receives the same sum:
 * NCCL computes each element's sum once and sends it unchanged to all ranks
 * (NVIDIA/nccl#855), which is what keeps η identical everywhere.
 *
 *     // with the communicator's device current:
 *     lra_nccl_reduction red;                  // must outlive the handle
 *     if (lra_nccl_init(&red, comm, stream) != 0) { ... }   // do not register it then
 *     red.timeout_s = 300;                     // optional, see "Deadline" below
 *     lra_set_reduction(handle, lra_nccl_allreduce_sum, &red);
 *     ...                                      // a failing call's code:
 *                                              // lra_nccl_error_string(rc)
 *     if (lra_nccl_check_agreement(handle, &red) != 0) { ... } // after a restore
 *     lra_destroy(handle);
 *     lra_nccl_free(&red);
 *
 * `stream` orders the reduction after the work already queued on it; the
 * trainer's compute stream is the simple choice (the call then waits for
 * that work), a dedicated stream avoids the wait.
 *
 * Waiting: the callback does not block in cudaStreamSynchronize. It polls
 * the stream and, between polls, the communicator's asynchronous error
 * state (ncclCommGetAsyncError), as NCCL's documentation prescribes: when a
 * peer fails or leaves, the collective never completes, and a plain
 * synchronisation would wait forever. Non-blocking communicators (created
 * with config.blocking = 0, whose calls may return ncclInProgress) are
 * supported the same way. Between polls it yields, and after the first
 * LRA_NCCL_SPIN_POLLS_ (64) polls of a wait it sleeps, 1 µs doubling up to
 * 100 µs, so that a wait for a slow peer does not keep a core busy.
 *
 * Deadline: NCCL reports an error only for failures it detects. A peer that
 * never enters the collective (a rank that failed alone before it, or that
 * died where NCCL's transport does not notice, as can happen on intra-node
 * P2P and shared-memory paths) leaves the collective waiting forever with no error,
 * and the wait above with it, inside lra's call. NCCL leaves the timeout to
 * the application. Set `timeout_s` (after lra_nccl_init, which sets it to
 * 0: no deadline) to the most seconds one call may take, measured on
 * CLOCK_MONOTONIC from the callback's start; INFINITY is the same as 0, a
 * negative or NaN value is refused (LRA_NCCL_ERR_INIT). The call also waits
 * for the work queued on `stream` before the collective (on the compute
 * stream: this rank's own backlog), and for peers that reach the same lra
 * call later. Pick it well above the longest such wait (a slow data loader,
 * a checkpoint written by one rank, a long backward pass): a peer that is
 * merely late looks the same as one that is gone. A call that passes it
 * returns LRA_NCCL_ERR_TIMEOUT (lra: LRA_REDUCTION_FAILED) without touching
 * its values, and the reduction is unusable from then on: its collective may
 * still be running (its kernel spins on the GPU, waiting for the peer), may
 * still write the staging buffers, and is still queued on `stream` ahead of
 * anything queued later. Every later call therefore returns
 * LRA_NCCL_ERR_TIMEOUT at once, calling neither CUDA nor NCCL. Recovery is
 * the caller's, as after any error: ncclCommAbort(comm) on every rank (it
 * stops the kernel), then lra_destroy and lra_nccl_free. Not in the other
 * order: cudaFree and cudaFreeHost may wait for the device, where the
 * kernel still spins. The callback does not abort the communicator itself:
 * it does not own it (the trainer may still use it, and would then hold a
 * freed handle), and the abort has to happen on every rank anyway. The
 * deadline covers the callback's own waits: for the stream, and for a
 * non-blocking communicator's enqueue (ncclInProgress). A blocking
 * communicator's ncclAllReduce that blocks inside NCCL itself (for example
 * while it connects to a peer that never comes, the first time) cannot be
 * interrupted from here: use a non-blocking communicator where that
 * matters. With a deadline, the clock is read once at the start of a call
 * and then once every LRA_NCCL_POLLS_PER_CLOCK_READ_ (16) polls of its
 * waits (each poll is a cudaStreamQuery and an ncclCommGetAsyncError, then
 * the pause above), so a call may run up to that many polls (about 2 ms)
 * past the deadline; never less than it. With timeout_s = 0 the clock is
 * never read and the callback waits as it always did.
 *
 * Contract, as for MPI: every rank of `comm` uses the same lra_config and
 * makes the same sequence of lra_step / lra_report_reeval calls (same
 * obs_var), also a rank with an empty shard (count 0). A failing NCCL call
 * is reported by the callback (lra returns LRA_REDUCTION_FAILED and
 * lra_last_error shows the code below), but NCCL does not promise that the
 * other ranks fail too: they may wait in the collective, and copies of this
 * call may still be queued on the stream. Treat the error as fatal: call
 * ncclCommAbort on every rank (as NCCL's documentation advises), then
 * lra_destroy and lra_nccl_free. Do not call lra between ncclGroupStart and
 * ncclGroupEnd: inside a group, ncclAllReduce may return before it has
 * enqueued the collective (NCCL's "Group Calls"), so the callback would copy
 * back this rank's own values, return 0, and the ranks would decide η apart.
 *
 * Device: each call makes the communicator's device current (cudaSetDevice,
 * only if another is) and restores the caller's before it returns, as
 * ncclAllReduce itself does; a failed restore is the call's error.
 *
 * Threads: the callback runs on the thread that calls lra. One
 * lra_nccl_reduction serves one handle (its staging buffers are not shared
 * between concurrent calls), and NCCL forbids using one communicator from
 * two threads at once. In particular, a watchdog thread must not call
 * ncclCommAbort while an lra call that may reach this callback is running:
 * the callback keeps passing `comm` to ncclCommGetAsyncError (a use after
 * free once the abort has freed it), and an aborted collective can end its
 * kernel, so that the callback would copy back unsummed values and return
 * 0. Use `timeout_s` instead, and abort after the lra call has returned.
 */
#ifndef LRA_NCCL_H
#define LRA_NCCL_H

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "lra.h"
#include "lra_agreement.h"

/* The deadline's clock and the wait's pause: POSIX clock_gettime
   (CLOCK_MONOTONIC) and nanosleep. Strict ISO C (gcc -std=c11 without
   _POSIX_C_SOURCE) hides them from <time.h>, although the C library has
   them (glibc, musl); NCCL exists only for 64-bit Linux, where clockid_t
   is int and CLOCK_MONOTONIC is 1 (the kernel's ABI), so they are declared
   here then. */
#if defined(CLOCK_MONOTONIC)
#define LRA_NCCL_CLOCK_MONOTONIC_ CLOCK_MONOTONIC
#elif defined(__linux__) && defined(__LP64__) && !defined(__cplusplus)
int clock_gettime(int clock_id, struct timespec *tp);
int nanosleep(const struct timespec *req, struct timespec *rem);
#define LRA_NCCL_CLOCK_MONOTONIC_ 1
#define LRA_NCCL_CLOCK_DECLARED_HERE_ 1
#else
#error "lra_nccl.h needs POSIX clock_gettime(CLOCK_MONOTONIC): define _POSIX_C_SOURCE=200809L"
#endif

/* The wait reads the clock once every this many polls (see "Deadline"). */
#define LRA_NCCL_POLLS_PER_CLOCK_READ_ 16u
/* A wait's first polls only yield (a short collective costs no sleep);
   later ones sleep, 1 µs doubling up to LRA_NCCL_MAX_SLEEP_NS_. */
#define LRA_NCCL_SPIN_POLLS_ 64u
#define LRA_NCCL_MAX_SLEEP_NS_ 100000L

/* The most values one sum can carry (lra passes at most 3). */
#define LRA_NCCL_MAX_VALUES 8
/* lra_nccl_check_agreement's collective: LRA_AGREEMENT_VALUES_ doubles
   (lra_agreement.h). */
/* Doubles in each staging buffer: room for either call. */
#define LRA_NCCL_STAGING_VALUES_                                                                   \
    (LRA_NCCL_MAX_VALUES > LRA_AGREEMENT_VALUES_ ? LRA_NCCL_MAX_VALUES : LRA_AGREEMENT_VALUES_)

/* Callback return codes (0 = success): */
/* more than LRA_NCCL_MAX_VALUES values (the same on every rank) */
#define LRA_NCCL_ERR_COUNT 1
/* lra_nccl_init: the current device is not the communicator's */
#define LRA_NCCL_ERR_DEVICE 2
/* the callback's `user` is NULL, or its staging buffers are (lra_nccl_init
   failed, lra_nccl_free ran, or a zeroed struct was never initialised), or
   its `timeout_s` is negative or NaN. Nothing is staged and no collective
   is entered, so this rank does not join the other ranks' collective:
   treat it as fatal, like any other error. */
#define LRA_NCCL_ERR_INIT 3
/* the call ran past `timeout_s` (the collective never completed: a peer did
   not join it), or an earlier call did: the reduction is unusable. The
   values are untouched; see "Deadline" above for what the caller must do. */
#define LRA_NCCL_ERR_TIMEOUT 4
/* LRA_NCCL_ERR_CUDA + cudaError_t of a failing CUDA runtime call */
#define LRA_NCCL_ERR_CUDA 1000
/* LRA_NCCL_ERR_NCCL + ncclResult_t of a failing ncclAllReduce, or the
   communicator's asynchronous error (ncclCommGetAsyncError) while waiting */
#define LRA_NCCL_ERR_NCCL 2000

/* lra_nccl_check_agreement's answers besides 0 (agreement) and the codes
   above (positive); the values of lra_mpi.h's LRA_MPI_DISAGREE and
   LRA_MPI_QUERY_FAILED. */
/* ranks hold different η, counters or pending-step state */
#define LRA_NCCL_DISAGREE LRA_AGREEMENT_DISAGREE_
/* an lra query failed on at least one rank (see lra_last_error there) */
#define LRA_NCCL_QUERY_FAILED LRA_AGREEMENT_QUERY_FAILED_

/* Fill it with lra_nccl_init, then change `timeout_s` if you want one.
 * Later versions only append fields, never reorder or remove them, and
 * lra_nccl_init sets every field (the added ones to defaults that keep the
 * earlier behaviour), so code written for an earlier version works
 * unchanged after a rebuild. It is header-only: the struct is compiled into
 * your code, so build every part that shares one with the same header. */
typedef struct lra_nccl_reduction {
    ncclComm_t comm;
    cudaStream_t stream;
    /* LRA_NCCL_STAGING_VALUES_ (17) doubles on the communicator's device */
    double *device;
    /* as many in pinned host memory (the staging copies are asynchronous) */
    double *host;
    /* The most seconds one call may take (see "Deadline" above); 0, the
       default, or INFINITY: no limit. Negative or NaN: refused. */
    double timeout_s;
    /* Set to 1 by a call that ran past `timeout_s` (it returned
       LRA_NCCL_ERR_TIMEOUT, or the error it already had: a failed
       ncclAllReduce whose staging copy did not finish in time); from then
       on the callback returns LRA_NCCL_ERR_TIMEOUT at once. Read it, do not
       clear it: only lra_nccl_init, after ncclCommAbort and lra_nccl_free,
       does. */
    int32_t timed_out;
    /* The communicator's device (lra_nccl_init; -1 if it failed before
       learning it). Each call makes it current and restores the caller's. */
    int32_t cuda_device;
} lra_nccl_reduction;

/* Releases the buffers; safe on a zeroed struct, after a failed
 * lra_nccl_init (which leaves both pointers NULL, whatever the struct held)
 * and twice. After a timeout (LRA_NCCL_ERR_TIMEOUT) only once the
 * communicator has been aborted: cudaFree may wait for the device, where
 * the collective's kernel still spins. */
static inline void lra_nccl_free(lra_nccl_reduction *r)
{
    if (r->device)
        cudaFree(r->device);
    if (r->host)
        cudaFreeHost(r->host);
    r->device = NULL;
    r->host = NULL;
}

/* Allocates the staging buffers on the current device, which must be the
 * communicator's (checked: a buffer on another device would make every
 * collective fail or fault). Returns 0, LRA_NCCL_ERR_DEVICE,
 * LRA_NCCL_ERR_NCCL + the NCCL error or LRA_NCCL_ERR_CUDA + the CUDA
 * error; on failure nothing stays allocated. Sets every field, also on
 * failure: timeout_s = 0 (no deadline), timed_out = 0. */
static inline int32_t lra_nccl_init(lra_nccl_reduction *r, ncclComm_t comm, cudaStream_t stream)
{
    const size_t bytes = LRA_NCCL_STAGING_VALUES_ * sizeof(double);
    r->comm = comm;
    r->stream = stream;
    r->device = NULL;
    r->host = NULL;
    r->timeout_s = 0.0;
    r->timed_out = 0;
    r->cuda_device = -1;
    int current = -1, comm_device = -1;
    cudaError_t e = cudaGetDevice(&current);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    const ncclResult_t n = ncclCommCuDevice(comm, &comm_device);
    if (n != ncclSuccess)
        return LRA_NCCL_ERR_NCCL + (int32_t)n;
    r->cuda_device = comm_device;
    if (current != comm_device)
        return LRA_NCCL_ERR_DEVICE;
    e = cudaMalloc((void **)&r->device, bytes);
    if (e == cudaSuccess)
        e = cudaMallocHost((void **)&r->host, bytes);
    if (e != cudaSuccess) {
        lra_nccl_free(r);
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    }
    return 0;
}

/* The text of any code this header returns: the adapter's own, a CUDA
 * error (cudaGetErrorString) or an NCCL one (ncclGetErrorString). A static
 * string, never NULL. For an NCCL error's details, ncclGetLastError(comm). */
static inline const char *lra_nccl_error_string(int32_t rc)
{
    switch (rc) {
    case 0:
        return "success";
    case LRA_NCCL_ERR_COUNT:
        return "LRA_NCCL_ERR_COUNT: more values than LRA_NCCL_MAX_VALUES";
    case LRA_NCCL_ERR_DEVICE:
        return "LRA_NCCL_ERR_DEVICE: the current device is not the communicator's";
    case LRA_NCCL_ERR_INIT:
        return "LRA_NCCL_ERR_INIT: no initialised lra_nccl_reduction, or timeout_s negative or NaN";
    case LRA_NCCL_ERR_TIMEOUT:
        return "LRA_NCCL_ERR_TIMEOUT: a call ran past timeout_s; the reduction is unusable";
    case LRA_NCCL_DISAGREE:
        return "LRA_NCCL_DISAGREE: the ranks hold different eta, counters or pending step";
    case LRA_NCCL_QUERY_FAILED:
        return "LRA_NCCL_QUERY_FAILED: an lra query failed on some rank";
    default:
        break;
    }
    if (rc >= LRA_NCCL_ERR_CUDA && rc < LRA_NCCL_ERR_NCCL)
        return cudaGetErrorString((cudaError_t)(rc - LRA_NCCL_ERR_CUDA));
    if (rc >= LRA_NCCL_ERR_NCCL && rc < LRA_NCCL_ERR_NCCL + 1000)
        return ncclGetErrorString((ncclResult_t)(rc - LRA_NCCL_ERR_NCCL));
    return "not an lra_nccl.h code";
}

/* The communicator's state as a callback code: 0 while it is healthy or
 * still working on an operation (ncclInProgress), else the error. */
static inline int32_t lra_nccl_async_error_(const lra_nccl_reduction *r, int *in_progress)
{
    ncclResult_t state = ncclSuccess;
    const ncclResult_t n = ncclCommGetAsyncError(r->comm, &state);
    if (n != ncclSuccess)
        return LRA_NCCL_ERR_NCCL + (int32_t)n;
    *in_progress = state == ncclInProgress;
    if (state != ncclSuccess && state != ncclInProgress)
        return LRA_NCCL_ERR_NCCL + (int32_t)state;
    return 0;
}

/* Seconds on CLOCK_MONOTONIC, or -1 if it cannot be read (on Linux it
 * always can): the deadline then counts as passed, a loud failure rather
 * than a silent wait without one. */
static inline double lra_nccl_now_(void)
{
    struct timespec ts;
    if (clock_gettime(LRA_NCCL_CLOCK_MONOTONIC_, &ts) != 0)
        return -1.0;
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One call's deadline. */
typedef struct lra_nccl_deadline_ {
    int limited;    /* 0: no deadline, the clock is never read */
    unsigned polls; /* polls so far; the clock is read every
                       LRA_NCCL_POLLS_PER_CLOCK_READ_ of them */
    double at;      /* lra_nccl_now_() at which the call times out */
} lra_nccl_deadline_;

static inline lra_nccl_deadline_ lra_nccl_deadline_start_(double timeout_s)
{
    lra_nccl_deadline_ d = {0, 0, 0.0};
    if (timeout_s > 0) {
        const double now = lra_nccl_now_();
        d.limited = 1;
        d.at = now < 0 ? 0.0 : now + timeout_s; /* INFINITY: never */
    }
    return d;
}

/* Counts a poll; true once the deadline has passed (NULL: none). */
static inline int lra_nccl_expired_(lra_nccl_deadline_ *d)
{
    if (d == NULL || !d->limited || ++d->polls % LRA_NCCL_POLLS_PER_CLOCK_READ_ != 0)
        return 0;
    const double now = lra_nccl_now_();
    return now < 0 || now >= d->at;
}

/* Between two polls of one wait (`*polls` counts them): yield at first,
   then sleep, so that a long wait (a slow peer) does not burn a core. */
static inline void lra_nccl_pause_(unsigned *polls)
{
    if (*polls < LRA_NCCL_SPIN_POLLS_) {
        ++*polls;
        sched_yield(); /* leave the core to NCCL's proxy threads */
        return;
    }
    const unsigned doublings = *polls - LRA_NCCL_SPIN_POLLS_;
    long ns = LRA_NCCL_MAX_SLEEP_NS_;
    if (doublings < 20) {
        ++*polls;
        ns = 1000L << doublings;
        if (ns > LRA_NCCL_MAX_SLEEP_NS_)
            ns = LRA_NCCL_MAX_SLEEP_NS_;
    }
    const struct timespec nap = {0, ns};
    nanosleep(&nap, NULL); /* a signal may cut it short: harmless */
}

/* Waits until the work queued on r->stream has finished, returning early
 * with the communicator's asynchronous error if one appears (a collective
 * whose peer failed never finishes), or with LRA_NCCL_ERR_TIMEOUT once the
 * deadline `d` has passed (NULL: none). */
static inline int32_t lra_nccl_wait_(const lra_nccl_reduction *r, lra_nccl_deadline_ *d)
{
    unsigned polls = 0;
    for (;;) {
        const cudaError_t e = cudaStreamQuery(r->stream);
        if (e == cudaSuccess)
            return 0;
        if (e != cudaErrorNotReady)
            return LRA_NCCL_ERR_CUDA + (int32_t)e;
        int in_progress;
        const int32_t rc = lra_nccl_async_error_(r, &in_progress);
        if (rc != 0)
            return rc;
        if (lra_nccl_expired_(d))
            return LRA_NCCL_ERR_TIMEOUT;
        lra_nccl_pause_(&polls);
    }
}

/* Stages r->host[0..count] through r->device: copy in, ncclAllReduce(op),
 * copy out, wait. On success r->host holds the result. Marks the reduction
 * timed out where the deadline says so. */
static inline int32_t lra_nccl_staged_allreduce_(lra_nccl_reduction *r, size_t count,
                                                 ncclRedOp_t op)
{
    lra_nccl_deadline_ deadline = lra_nccl_deadline_start_(r->timeout_s);
    const size_t bytes = count * sizeof(double);
    cudaError_t e = cudaMemcpyAsync(r->device, r->host, bytes, cudaMemcpyHostToDevice, r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    const ncclResult_t n =
        ncclAllReduce(r->device, r->device, count, ncclFloat64, op, r->comm, r->stream);
    int32_t rc = 0;
    if (n == ncclInProgress) {
        /* A non-blocking communicator is still enqueueing the collective;
           nothing else may be queued on the stream until it has. */
        int in_progress = 1;
        unsigned polls = 0;
        while (rc == 0 && in_progress) {
            if (lra_nccl_expired_(&deadline)) {
                rc = LRA_NCCL_ERR_TIMEOUT; /* still enqueueing: queue nothing more */
                break;
            }
            lra_nccl_pause_(&polls);
            rc = lra_nccl_async_error_(r, &in_progress);
        }
    } else if (n != ncclSuccess) {
        rc = LRA_NCCL_ERR_NCCL + (int32_t)n;
    }
    if (rc == LRA_NCCL_ERR_TIMEOUT) {
        r->timed_out = 1;
        return rc;
    }
    if (rc != 0) {
        /* The copy above may still read r->host; let it finish (it does
           unless the communicator is broken, which the wait detects) so
           that the next call can reuse the buffer. If it does not before
           the deadline, the buffer may still be in use: unusable. */
        if (lra_nccl_wait_(r, &deadline) == LRA_NCCL_ERR_TIMEOUT)
            r->timed_out = 1;
        return rc;
    }
    e = cudaMemcpyAsync(r->host, r->device, bytes, cudaMemcpyDeviceToHost, r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    rc = lra_nccl_wait_(r, &deadline);
    if (rc == LRA_NCCL_ERR_TIMEOUT)
        r->timed_out = 1;
    return rc;
}

/* Both public calls: refusals first (no CUDA or NCCL call), then the
 * communicator's device made current, the staged collective, the caller's
 * device restored; `values` change only on success. */
static inline int32_t lra_nccl_allreduce_(lra_nccl_reduction *r, double *values, size_t count,
                                          size_t limit, ncclRedOp_t op)
{
    if (r == NULL || r->device == NULL || r->host == NULL || !(r->timeout_s >= 0))
        return LRA_NCCL_ERR_INIT;
    if (r->timed_out)
        return LRA_NCCL_ERR_TIMEOUT;
    if (count > limit)
        return LRA_NCCL_ERR_COUNT;
    /* Without it, copies on the legacy or per-thread default stream would
       go to the current device's, unordered with the collective. NCCL
       saves and restores the device the same way inside ncclAllReduce. */
    int caller = -1;
    cudaError_t e = cudaGetDevice(&caller);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    const int switched = caller != r->cuda_device;
    if (switched && (e = cudaSetDevice(r->cuda_device)) != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    memcpy(r->host, values, count * sizeof(double));
    int32_t rc = lra_nccl_staged_allreduce_(r, count, op);
    if (switched && (e = cudaSetDevice(caller)) != cudaSuccess && rc == 0)
        rc = LRA_NCCL_ERR_CUDA + (int32_t)e;
    if (rc == 0)
        memcpy(values, r->host, count * sizeof(double));
    return rc;
}

/* The lra_reduce_fn: `user` points at an initialised lra_nccl_reduction.
 * Replaces values[0..count] by their sums over the communicator's ranks.
 * A NULL `user`, or one whose buffers are NULL (registered after a failed
 * lra_nccl_init, or after lra_nccl_free) or whose timeout_s is negative or
 * NaN, fails with LRA_NCCL_ERR_INIT (lra: LRA_REDUCTION_FAILED) before
 * touching anything; an uninitialised struct that was not zeroed holds
 * garbage, which cannot be told apart. A call that runs past timeout_s
 * returns LRA_NCCL_ERR_TIMEOUT and marks the reduction timed out; so does
 * every later call, at once. Only a successful call changes `values`. */
static inline int32_t lra_nccl_allreduce_sum(double *values, size_t count, void *user)
{
    return lra_nccl_allreduce_((lra_nccl_reduction *)user, values, count, LRA_NCCL_MAX_VALUES,
                               ncclSum);
}

/* lra_mpi_check_agreement over NCCL, on the reduction registered for `h`
 * (its staging, stream, device handling, deadline and codes): checks that
 * every rank of the communicator holds the same η (bit for bit), the same
 * step and re-evaluation counters and the same pending step (none, or one
 * due or not due for re-evaluation). Per-shard optimizer state, the
 * applied/skipped counters and the configuration are not compared.
 *
 * One collective (ncclAllReduce of 17 doubles, ncclMax); call it on every
 * rank, between lra calls, after every rank restored its checkpoint
 * (lra_load_state can succeed on some ranks and fail on others) and, if
 * you like, every few hundred steps. Returns 0, LRA_NCCL_DISAGREE or
 * LRA_NCCL_QUERY_FAILED (the same answer on every rank), or a callback
 * code (positive; as for the sum, treat it as fatal). When no step is
 * pending, the handle's lra_last_error afterwards names the LRA_CALL_ORDER
 * of the lra_should_reeval query it made. */
static inline int32_t lra_nccl_check_agreement(lra_handle *h, lra_nccl_reduction *r)
{
    double v[LRA_AGREEMENT_VALUES_];
    lra_agreement_values_(h, v);
    const int32_t rc =
        lra_nccl_allreduce_(r, v, LRA_AGREEMENT_VALUES_, LRA_NCCL_STAGING_VALUES_, ncclMax);
    if (rc != 0)
        return rc;
    return lra_agreement_verdict_(v);
}

#endif /* LRA_NCCL_H */
