/* Host implementation of the stub CUDA runtime and a one-rank NCCL: "device"
 * memory is host memory, copies are memcpy, the sum or max over one rank is
 * the identity (plus pretend peers: stub_peer_share, stub_peer_max), an
 * empty collective a no-op. Checks the arguments lra_nccl.h passes and the
 * device current for each call, and can play a non-blocking communicator, a
 * busy stream, a failed peer, a peer that never joins, a failure of any one
 * call, and ncclCommAbort ending what such a peer left hanging.
 *
 * Includes the API headers with <>: scripts/stages/nccl.sh also compiles
 * this file against the real cuda_runtime.h and nccl.h (include paths
 * first), so a definition whose signature drifted from the real API fails
 * to compile. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
#include <nccl.h>

#include "stub_controls.h"

int stub_nccl_calls;
int stub_cuda_outstanding;
int stub_nccl_enqueue_polls;
int stub_stream_busy_polls;
ncclResult_t stub_nccl_async_error = ncclSuccess;
int stub_current_device, stub_comm_device;
int stub_wrong_device;
int stub_set_device_calls;
ncclComm_t stub_comm;
cudaStream_t stub_stream;
int stub_wrong_handle;
int stub_peer_missing;
int stub_api_calls;
int stub_nccl_aborts;
const char *stub_fail_function;
int stub_fail_skip;
int stub_fail_code;
double stub_peer_share;
double stub_last_sent[STUB_MAX_SENT];
size_t stub_last_count;
ncclRedOp_t stub_last_op;
const double *stub_peer_max;

/* Enqueue polls left for the collective in flight on a non-blocking
   communicator; stream polls left before the stream is idle; a collective
   in flight that never completes (stub_peer_missing). */
static int enqueue_left, busy_left, hanging;

/* The code this call of `function` must fail with (stub_fail_function),
   or 0. */
static int injected_failure(const char *function)
{
    if (stub_fail_function == NULL || strcmp(stub_fail_function, function) != 0)
        return 0;
    if (stub_fail_skip > 0) {
        stub_fail_skip--;
        return 0;
    }
    stub_fail_function = NULL;
    return stub_fail_code;
}

static cudaError_t alloc(void **p, size_t size, const char *function)
{
    stub_api_calls++;
    if (!p)
        return cudaErrorInvalidValue;
    const int fail = injected_failure(function);
    if (fail)
        return (cudaError_t)fail;
    *p = malloc(size ? size : 1);
    if (!*p)
        return cudaErrorMemoryAllocation;
    stub_cuda_outstanding++;
    return cudaSuccess;
}

static cudaError_t release(void *p)
{
    stub_api_calls++;
    if (p) {
        free(p);
        stub_cuda_outstanding--;
    }
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device)
{
    stub_api_calls++;
    if (!device)
        return cudaErrorInvalidValue;
    const int fail = injected_failure(__func__);
    if (fail)
        return (cudaError_t)fail;
    *device = stub_current_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    stub_api_calls++;
    stub_set_device_calls++;
    const int fail = injected_failure(__func__);
    if (fail)
        return (cudaError_t)fail;
    if (device < 0 || device > 7)
        return cudaErrorInvalidDevice;
    stub_current_device = device;
    return cudaSuccess;
}

const char *cudaGetErrorString(cudaError_t error)
{
    return error == cudaErrorLaunchFailure ? "stub: unspecified launch failure"
                                           : "stub: CUDA error";
}

const char *ncclGetErrorString(ncclResult_t result)
{
    return result == ncclRemoteError ? "stub: remote process exited or there was a network error"
                                     : "stub: NCCL error";
}

cudaError_t cudaMalloc(void **devPtr, size_t size) { return alloc(devPtr, size, __func__); }
cudaError_t cudaFree(void *devPtr) { return release(devPtr); }
cudaError_t cudaMallocHost(void **ptr, size_t size) { return alloc(ptr, size, __func__); }
cudaError_t cudaFreeHost(void *ptr) { return release(ptr); }

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    stub_api_calls++;
    stub_wrong_handle += stream != stub_stream;
    stub_wrong_device += stub_current_device != stub_comm_device;
    if (enqueue_left > 0) /* NCCL: nothing on the stream until the enqueue is done */
        stub_wrong_handle++;
    if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost)
        return cudaErrorInvalidValue;
    const int fail = injected_failure(__func__);
    if (fail)
        return (cudaError_t)fail;
    memcpy(dst, src, count);
    busy_left = stub_stream_busy_polls;
    return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t stream)
{
    stub_api_calls++;
    stub_wrong_handle += stream != stub_stream;
    stub_wrong_device += stub_current_device != stub_comm_device;
    if (stub_nccl_async_error != ncclSuccess)
        return cudaErrorNotReady; /* the collective waits for a dead peer */
    if (hanging)
        return cudaErrorNotReady; /* ... or for one that never comes, silently */
    if (busy_left > 0) {
        busy_left--;
        return cudaErrorNotReady;
    }
    return cudaSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream)
{
    stub_api_calls++;
    stub_wrong_handle += comm != stub_comm || stream != stub_stream;
    stub_wrong_device += stub_current_device != stub_comm_device;
    stub_nccl_calls++;
    const int fail = injected_failure(__func__);
    if (fail)
        return (ncclResult_t)fail;
    if (datatype != ncclFloat64 || (op != ncclSum && op != ncclMax))
        return ncclInvalidArgument;
    stub_last_count = count;
    stub_last_op = op;
    memcpy(stub_last_sent, sendbuff,
           (count < STUB_MAX_SENT ? count : STUB_MAX_SENT) * sizeof(double));
    if (count == 0) /* as NCCL: an empty collective is a no-op */
        return ncclSuccess;
    if (sendbuff != recvbuff)
        memmove(recvbuff, sendbuff, count * sizeof(double));
    double *out = (double *)recvbuff;
    if (op == ncclSum && stub_peer_share != 0) /* (x + 0 would turn -0 into +0) */
        for (size_t i = 0; i < count; i++)
            out[i] += stub_peer_share;
    if (op == ncclMax && stub_peer_max != NULL)
        for (size_t i = 0; i < count; i++)
            out[i] = out[i] >= stub_peer_max[i] ? out[i] : stub_peer_max[i];
    if (stub_peer_missing) {
        hanging = 1;
        for (size_t i = 0; i < count; i++) /* what a running collective leaves */
            ((double *)recvbuff)[i] = 12345.0;
    }
    busy_left = stub_stream_busy_polls;
    if (stub_nccl_enqueue_polls > 0) {
        enqueue_left = stub_nccl_enqueue_polls;
        return ncclInProgress;
    }
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError)
{
    stub_api_calls++;
    stub_wrong_handle += comm != stub_comm;
    if (!asyncError)
        return ncclInvalidArgument;
    if (stub_nccl_async_error != ncclSuccess) {
        *asyncError = stub_nccl_async_error;
    } else if (enqueue_left > 0) {
        enqueue_left--;
        *asyncError = enqueue_left > 0 ? ncclInProgress : ncclSuccess;
    } else {
        *asyncError = ncclSuccess;
    }
    return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device)
{
    stub_api_calls++;
    stub_wrong_handle += comm != stub_comm;
    if (!device)
        return ncclInvalidArgument;
    const int fail = injected_failure(__func__);
    if (fail)
        return (ncclResult_t)fail;
    *device = stub_comm_device;
    return ncclSuccess;
}

/* Ends whatever is in flight: a hanging collective, an unfinished enqueue,
   a busy stream. (Unlike NCCL's, the one-rank communicator stays usable, so
   that the test can go on with it.) */
ncclResult_t ncclCommAbort(ncclComm_t comm)
{
    stub_api_calls++;
    stub_wrong_handle += comm != stub_comm;
    stub_nccl_aborts++;
    hanging = 0;
    enqueue_left = 0;
    busy_left = 0;
    return ncclSuccess;
}
