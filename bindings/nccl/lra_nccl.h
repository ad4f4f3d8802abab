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
 * logic (staging, the device check, non-blocking communicators, busy
 * stream, failed peer, unusable `user`) runs on one simulated rank against
 * stub declarations that are checked against the real headers
 * (tests/nccl/stub). The collective itself, ncclAllReduce on GPUs, has
 * NEVER been run. The MPI binding (bindings/mpi/lra_mpi.h) is
 * the tested one.
 *
 * lra sums a few doubles (at most 3) per step across ranks: the rank-local
 * parts of φ = g·v when parameters are sharded, f_i and f+ when losses are
 * rank-local. They are host values, so each call stages them through a
 * small device buffer: copy in, ncclAllReduce(ncclFloat64, ncclSum), copy
 * out, and wait for the stream (one short host synchronisation per call,
 * which the η decision needs anyway). Every rank receives the same sum:
 * NCCL computes each element's sum once and sends it unchanged to all ranks
 * (NVIDIA/nccl#855), which is what keeps η identical everywhere.
 *
 *     // with the communicator's device current:
 *     lra_nccl_reduction red;                  // must outlive the handle
 *     if (lra_nccl_init(&red, comm, stream) != 0) { ... }   // do not register it then
 *     lra_set_reduction(handle, lra_nccl_allreduce_sum, &red);
 *     ...
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
 * supported the same way.
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
 * Threads: the callback runs on the thread that calls lra. One
 * lra_nccl_reduction serves one handle (its staging buffers are not shared
 * between concurrent calls), and NCCL forbids using one communicator from
 * two threads at once.
 */
#ifndef LRA_NCCL_H
#define LRA_NCCL_H

#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lra.h"

/* The most values one call can carry (lra passes at most 3). */
#define LRA_NCCL_MAX_VALUES 8

/* Callback return codes (0 = success): */
/* more than LRA_NCCL_MAX_VALUES values (the same on every rank) */
#define LRA_NCCL_ERR_COUNT 1
/* lra_nccl_init: the current device is not the communicator's */
#define LRA_NCCL_ERR_DEVICE 2
/* the callback's `user` is NULL, or its staging buffers are (lra_nccl_init
   failed, lra_nccl_free ran, or a zeroed struct was never initialised).
   Nothing is staged and no collective is entered, so this rank does not
   join the other ranks' collective: treat it as fatal, like any other
   error. */
#define LRA_NCCL_ERR_INIT 3
/* LRA_NCCL_ERR_CUDA + cudaError_t of a failing CUDA runtime call */
#define LRA_NCCL_ERR_CUDA 1000
/* LRA_NCCL_ERR_NCCL + ncclResult_t of a failing ncclAllReduce, or the
   communicator's asynchronous error (ncclCommGetAsyncError) while waiting */
#define LRA_NCCL_ERR_NCCL 2000

typedef struct lra_nccl_reduction {
    ncclComm_t comm;
    cudaStream_t stream;
    /* LRA_NCCL_MAX_VALUES doubles on the communicator's device */
    double *device;
    /* as many in pinned host memory (the staging copies are asynchronous) */
    double *host;
} lra_nccl_reduction;

/* Releases the buffers; safe on a zeroed struct, after a failed
 * lra_nccl_init (which leaves both pointers NULL, whatever the struct held)
 * and twice. */
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
 * error; on failure nothing stays allocated. */
static inline int32_t lra_nccl_init(lra_nccl_reduction *r, ncclComm_t comm, cudaStream_t stream)
{
    const size_t bytes = LRA_NCCL_MAX_VALUES * sizeof(double);
    r->comm = comm;
    r->stream = stream;
    r->device = NULL;
    r->host = NULL;
    int current = -1, comm_device = -1;
    cudaError_t e = cudaGetDevice(&current);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    const ncclResult_t n = ncclCommCuDevice(comm, &comm_device);
    if (n != ncclSuccess)
        return LRA_NCCL_ERR_NCCL + (int32_t)n;
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

/* Waits until the work queued on r->stream has finished, returning early
 * with the communicator's asynchronous error if one appears: a collective
 * whose peer failed never finishes. */
static inline int32_t lra_nccl_wait_(const lra_nccl_reduction *r)
{
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
        sched_yield(); /* leave the core to NCCL's proxy threads */
    }
}

/* The lra_reduce_fn: `user` points at an initialised lra_nccl_reduction.
 * Replaces values[0..count] by their sums over the communicator's ranks.
 * A NULL `user`, or one whose buffers are NULL (registered after a failed
 * lra_nccl_init, or after lra_nccl_free), fails with LRA_NCCL_ERR_INIT
 * (lra: LRA_REDUCTION_FAILED) before touching anything; an uninitialised
 * struct that was not zeroed holds garbage, which cannot be told apart. */
static inline int32_t lra_nccl_allreduce_sum(double *values, size_t count, void *user)
{
    lra_nccl_reduction *r = (lra_nccl_reduction *)user;
    if (r == NULL || r->device == NULL || r->host == NULL)
        return LRA_NCCL_ERR_INIT;
    if (count > LRA_NCCL_MAX_VALUES)
        return LRA_NCCL_ERR_COUNT;
    const size_t bytes = count * sizeof(double);
    memcpy(r->host, values, bytes);
    cudaError_t e = cudaMemcpyAsync(r->device, r->host, bytes, cudaMemcpyHostToDevice, r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    ncclResult_t n =
        ncclAllReduce(r->device, r->device, count, ncclFloat64, ncclSum, r->comm, r->stream);
    int32_t rc = 0;
    if (n == ncclInProgress) {
        /* A non-blocking communicator is still enqueueing the collective;
           nothing else may be queued on the stream until it has. */
        int in_progress = 1;
        while (rc == 0 && in_progress) {
            sched_yield();
            rc = lra_nccl_async_error_(r, &in_progress);
        }
    } else if (n != ncclSuccess) {
        rc = LRA_NCCL_ERR_NCCL + (int32_t)n;
    }
    if (rc != 0) {
        /* The copy above may still read r->host; let it finish (it does
           unless the communicator is broken, which the wait detects) so
           that the next call can reuse the buffer. */
        (void)lra_nccl_wait_(r);
        return rc;
    }
    e = cudaMemcpyAsync(r->host, r->device, bytes, cudaMemcpyDeviceToHost, r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    rc = lra_nccl_wait_(r);
    if (rc != 0)
        return rc;
    memcpy(values, r->host, bytes);
    return 0;
}

#endif /* LRA_NCCL_H */
