/* Test stand-in for nccl.h: only what bindings/nccl/lra_nccl.h uses (and
 * ncclCommAbort, which its documentation prescribes after an error), with
 * the signatures and enum values of NCCL 2.x's nccl.h (scripts/stages/nccl.sh
 * checks both against the real header where it can fetch one). Implemented
 * by stub_impl.c as a one-rank communicator (the sum over one rank is the
 * value itself), driven through stub_controls.h. Not NCCL. */
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
    ncclTimeout = 8
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
const char *ncclGetErrorString(ncclResult_t result);
/* Not used by lra_nccl.h: the recovery its documentation prescribes. */
ncclResult_t ncclCommAbort(ncclComm_t comm);

#endif
