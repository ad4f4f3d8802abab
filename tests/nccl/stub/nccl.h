/* Test stand-in for nccl.h: only what bindings/nccl/lra_nccl.h uses, with
 * the signatures and enum values of NCCL 2.x's nccl.h. Implemented by
 * stub_impl.c as a one-rank communicator (the sum over one rank is the
 * value itself). Not NCCL. */
#ifndef LRA_STUB_NCCL_H
#define LRA_STUB_NCCL_H
#include <cuda_runtime.h>
#include <stddef.h>

typedef struct ncclComm *ncclComm_t;

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclNumResults = 8
} ncclResult_t;

typedef enum {
    ncclInt8 = 0, ncclChar = 0,
    ncclUint8 = 1,
    ncclInt32 = 2, ncclInt = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6, ncclHalf = 6,
    ncclFloat32 = 7, ncclFloat = 7,
    ncclFloat64 = 8, ncclDouble = 8
} ncclDataType_t;

typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream);

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device);

/* Test controls (not NCCL API). */
extern int stub_nccl_calls;          /* ncclAllReduce calls so far */
extern ncclResult_t stub_nccl_fail;  /* returned by the next ncclAllReduce, then reset */
extern int stub_cuda_outstanding;    /* live cudaMalloc + cudaMallocHost buffers */
/* A non-blocking communicator: ncclAllReduce returns ncclInProgress and the
   enqueue finishes after this many ncclCommGetAsyncError polls. */
extern int stub_nccl_enqueue_polls;
/* cudaStreamQuery answers cudaErrorNotReady this many times per wait. */
extern int stub_stream_busy_polls;
/* A peer failed: the stream never finishes the collective and
   ncclCommGetAsyncError reports this error (ncclSuccess: off). */
extern ncclResult_t stub_nccl_async_error;
/* The current device (cudaGetDevice) and the communicator's. */
extern int stub_current_device, stub_comm_device;
/* The comm and stream every call must pass, and the calls that did not. */
extern ncclComm_t stub_comm;
extern cudaStream_t stub_stream;
extern int stub_wrong_handle;

#endif
