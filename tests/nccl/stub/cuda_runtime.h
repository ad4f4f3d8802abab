/* Test stand-in for the CUDA runtime header: only the declarations
 * bindings/nccl/lra_nccl.h uses, with the signatures and enum values of the
 * real cuda_runtime_api.h / driver_types.h (CUDA 12; scripts/stages/nccl.sh
 * checks both against the real header where it can fetch one). Implemented
 * on the host by stub_impl.c. Not a CUDA runtime. */
#ifndef LRA_STUB_CUDA_RUNTIME_H
#define LRA_STUB_CUDA_RUNTIME_H
#include <stddef.h>

enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorNotReady = 600,
    cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

typedef struct CUstream_st *cudaStream_t;

cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaMalloc(void **devPtr, size_t size);
cudaError_t cudaFree(void *devPtr);
cudaError_t cudaMallocHost(void **ptr, size_t size);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
const char *cudaGetErrorString(cudaError_t error);

#endif
