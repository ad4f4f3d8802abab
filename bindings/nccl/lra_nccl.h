/* lra_nccl.h: the cross-rank reduction lra needs, over NCCL, on the
 * caller's communicator and stream. Header only.
 *
 * STATUS: compile-checked against stub declarations of the CUDA runtime and
 * NCCL APIs, and its logic run on one simulated rank (tests/nccl); it has
 * NOT been run with real NCCL or on a GPU. The MPI binding
 * (bindings/mpi/lra_mpi.h) is the tested one.
 *
 * lra sums a few doubles (at most 3) per step across ranks: the rank-local
 * parts of φ = g·v when parameters are sharded, f_i and f+ when losses are
 * rank-local. They are host values, so each call stages them through a
 * small device buffer: copy in, ncclAllReduce(ncclFloat64, ncclSum), copy
 * out, and wait for the stream (one short host synchronisation per call,
 * which the η decision needs anyway).
 *
 *     // with the communicator's device current:
 *     lra_nccl_reduction red;                  // must outlive the handle
 *     if (lra_nccl_init(&red, comm, stream) != 0) { ... }
 *     lra_set_reduction(handle, lra_nccl_allreduce_sum, &red);
 *     ...
 *     lra_destroy(handle);
 *     lra_nccl_free(&red);
 *
 * `stream` orders the reduction after the work already queued on it; the
 * trainer's compute stream is the simple choice (the call then waits for
 * that work), a dedicated stream avoids the wait.
 *
 * Contract, as for MPI: every rank of `comm` uses the same lra_config and
 * makes the same sequence of lra_step / lra_report_reeval calls (same
 * obs_var), also a rank with an empty shard (count 0). A failing NCCL call
 * is reported by the callback (lra returns LRA_REDUCTION_FAILED and
 * lra_last_error shows the code below), but NCCL does not promise that the
 * other ranks fail too: they may wait in the collective, so treat the error
 * as fatal (ncclCommAbort on every rank, as NCCL's documentation advises).
 */
#ifndef LRA_NCCL_H
#define LRA_NCCL_H

#include <cuda_runtime.h>
#include <nccl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "lra.h"

/* The most values one call can carry (lra passes at most 3). */
#define LRA_NCCL_MAX_VALUES 8

/* Callback return codes (0 = success): */
/* more than LRA_NCCL_MAX_VALUES values (the same on every rank) */
#define LRA_NCCL_ERR_COUNT 1
/* LRA_NCCL_ERR_CUDA + cudaError_t of a failing CUDA runtime call */
#define LRA_NCCL_ERR_CUDA 1000
/* LRA_NCCL_ERR_NCCL + ncclResult_t of a failing ncclAllReduce */
#define LRA_NCCL_ERR_NCCL 2000

typedef struct lra_nccl_reduction {
    ncclComm_t comm;
    cudaStream_t stream;
    /* LRA_NCCL_MAX_VALUES doubles on the communicator's device */
    double *device;
    /* as many in pinned host memory (the staging copies are asynchronous) */
    double *host;
} lra_nccl_reduction;

/* Releases the buffers; safe on a zeroed or partly initialised struct. */
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
 * communicator's. Returns 0 or LRA_NCCL_ERR_CUDA + the CUDA error. */
static inline int32_t lra_nccl_init(lra_nccl_reduction *r, ncclComm_t comm, cudaStream_t stream)
{
    const size_t bytes = LRA_NCCL_MAX_VALUES * sizeof(double);
    r->comm = comm;
    r->stream = stream;
    r->device = NULL;
    r->host = NULL;
    cudaError_t e = cudaMalloc((void **)&r->device, bytes);
    if (e == cudaSuccess)
        e = cudaMallocHost((void **)&r->host, bytes);
    if (e != cudaSuccess) {
        lra_nccl_free(r);
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    }
    return 0;
}

/* The lra_reduce_fn: `user` points at an initialised lra_nccl_reduction.
 * Replaces values[0..count] by their sums over the communicator's ranks. */
static inline int32_t lra_nccl_allreduce_sum(double *values, size_t count, void *user)
{
    lra_nccl_reduction *r = (lra_nccl_reduction *)user;
    if (count > LRA_NCCL_MAX_VALUES)
        return LRA_NCCL_ERR_COUNT;
    const size_t bytes = count * sizeof(double);
    memcpy(r->host, values, bytes);
    cudaError_t e = cudaMemcpyAsync(r->device, r->host, bytes, cudaMemcpyHostToDevice, r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    const ncclResult_t n =
        ncclAllReduce(r->device, r->device, count, ncclFloat64, ncclSum, r->comm, r->stream);
    if (n != ncclSuccess)
        return LRA_NCCL_ERR_NCCL + (int32_t)n;
    e = cudaMemcpyAsync(r->host, r->device, bytes, cudaMemcpyDeviceToHost, r->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(r->stream);
    if (e != cudaSuccess)
        return LRA_NCCL_ERR_CUDA + (int32_t)e;
    memcpy(values, r->host, bytes);
    return 0;
}

#endif /* LRA_NCCL_H */
