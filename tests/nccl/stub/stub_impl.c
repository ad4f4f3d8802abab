/* Host implementation of the stub CUDA runtime and a one-rank NCCL: "device"
 * memory is host memory, copies are memcpy, the sum over one rank is the
 * identity. Checks the arguments lra_nccl.h passes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nccl.h"

int stub_nccl_calls;
ncclResult_t stub_nccl_fail = ncclSuccess;
int stub_cuda_outstanding;

static cudaError_t alloc(void **p, size_t size)
{
    if (!p)
        return cudaErrorInvalidValue;
    *p = malloc(size ? size : 1);
    if (!*p)
        return cudaErrorMemoryAllocation;
    stub_cuda_outstanding++;
    return cudaSuccess;
}

static cudaError_t release(void *p)
{
    if (p) {
        free(p);
        stub_cuda_outstanding--;
    }
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **devPtr, size_t size) { return alloc(devPtr, size); }
cudaError_t cudaFree(void *devPtr) { return release(devPtr); }
cudaError_t cudaMallocHost(void **ptr, size_t size) { return alloc(ptr, size); }
cudaError_t cudaFreeHost(void *ptr) { return release(ptr); }

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    (void)stream;
    if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost)
        return cudaErrorInvalidValue;
    memcpy(dst, src, count);
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    (void)stream;
    return cudaSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream)
{
    (void)comm;
    (void)stream;
    stub_nccl_calls++;
    if (stub_nccl_fail != ncclSuccess) {
        ncclResult_t r = stub_nccl_fail;
        stub_nccl_fail = ncclSuccess;
        return r;
    }
    if (datatype != ncclFloat64 || op != ncclSum || count == 0)
        return ncclInvalidArgument;
    if (sendbuff != recvbuff)
        memmove(recvbuff, sendbuff, count * sizeof(double));
    return ncclSuccess;
}
