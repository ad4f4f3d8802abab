/* A pretend GPU for a CPU dry run of lra_nccl_gpu_test: preloaded
 * (LD_PRELOAD) in front of the real libcudart.so.12 and libnccl.so.2, it
 * replaces the CUDA runtime and NCCL calls the test makes with host
 * versions for one device and one-rank communicators, so that the test's
 * own logic (its expectations, call counts, the order of its checks) runs
 * here before a lent GPU's few minutes are spent on it. scripts/stages/
 * nccl.sh builds it against the real headers (every definition is checked
 * against the real prototype) and runs the test under it.
 *
 * What it pretends, after what the real libraries do:
 * - device memory is host memory, remembered so that
 *   cudaPointerGetAttributes can tell device from pinned host buffers;
 * - copies happen at once, but leave their stream busy for a few
 *   cudaStreamQuery polls (cudaStreamSynchronize clears it), so that waits
 *   really wait;
 * - cudaLaunchHostFunc runs its function on a thread of its own, and the
 *   stream is busy until it has returned (cudaStreamSynchronize waits for
 *   it); work queued behind it is not held back, unlike on a GPU;
 * - an in-place ncclAllReduce (ncclSum or ncclMax) over one rank changes
 *   nothing (NCCL's one-rank path has nothing to move); with no communicator it answers
 *   ncclInvalidArgument, as NCCL's argument check does;
 * - a non-blocking communicator answers ncclInProgress for its init, each
 *   collective and its finalize, and ncclCommGetAsyncError reports
 *   ncclInProgress for a few polls after each (and after ncclCommRevoke);
 * - a revoked communicator's collectives answer ncclInvalidUsage, as
 *   NCCL's enqueue check does.
 * It knows no CUDA driver: lra's CUDA backend cannot run on it, so the dry
 * run sets LRA_NCCL_GPU_TEST_HOST_ONLY and the test leaves out its CUDA
 * handles. This is a model of the libraries, not the libraries: the GPU
 * run is the proof. */
#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

enum { BUSY_POLLS = 3, MAX_BUFFERS = 256 };

static struct {
    void *p;
    enum cudaMemoryType type;
} buffers[MAX_BUFFERS];

static cudaError_t remember(void **p, size_t size, enum cudaMemoryType type)
{
    for (int i = 0; i < MAX_BUFFERS; i++)
        if (!buffers[i].p) {
            *p = malloc(size ? size : 1);
            if (!*p)
                return cudaErrorMemoryAllocation;
            buffers[i].p = *p;
            buffers[i].type = type;
            return cudaSuccess;
        }
    return cudaErrorMemoryAllocation;
}

static cudaError_t forget(void *p)
{
    if (!p)
        return cudaSuccess;
    for (int i = 0; i < MAX_BUFFERS; i++)
        if (buffers[i].p == p) {
            buffers[i].p = NULL;
            free(p);
            return cudaSuccess;
        }
    return cudaErrorInvalidValue;
}

/* Streams: the legacy default one (NULL) and created ones. */
struct fake_stream {
    int busy; /* cudaStreamQuery polls left that answer cudaErrorNotReady */
    /* A cudaLaunchHostFunc in flight: its thread, and whether it returned. */
    int host_func;
    pthread_t thread;
    atomic_int host_func_done;
};
static struct fake_stream legacy;

static struct fake_stream *stream_of(cudaStream_t s)
{
    return s ? (struct fake_stream *)(void *)s : &legacy;
}

cudaError_t cudaGetDeviceCount(int *count)
{
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDevice(int *device)
{
    *device = 0;
    return cudaSuccess;
}

/* cuda_runtime_api.h maps cudaGetDeviceProperties to this name. */
cudaError_t cudaGetDeviceProperties_v2(struct cudaDeviceProp *prop, int device)
{
    if (device != 0)
        return cudaErrorInvalidDevice;
    memset(prop, 0, sizeof *prop);
    strcpy(prop->name, "fake GPU (CPU dry run)");
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t size) { return remember(p, size, cudaMemoryTypeDevice); }
cudaError_t cudaFree(void *p) { return forget(p); }
cudaError_t cudaMallocHost(void **p, size_t size) { return remember(p, size, cudaMemoryTypeHost); }
cudaError_t cudaFreeHost(void *p) { return forget(p); }

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attr, const void *p)
{
    memset(attr, 0, sizeof *attr);
    attr->type = cudaMemoryTypeUnregistered;
    for (int i = 0; i < MAX_BUFFERS; i++)
        if (buffers[i].p == p) {
            attr->type = buffers[i].type;
            attr->device = 0;
        }
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags)
{
    (void)flags;
    struct fake_stream *f = calloc(1, sizeof *f);
    *s = (cudaStream_t)(void *)f;
    return f ? cudaSuccess : cudaErrorMemoryAllocation;
}

/* Waits for the stream's host function, if any. */
static void join_host_func(struct fake_stream *f)
{
    if (f->host_func) {
        pthread_join(f->thread, NULL);
        f->host_func = 0;
    }
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    join_host_func(stream_of(s));
    free(s);
    return cudaSuccess;
}

struct host_call {
    cudaHostFn_t fn;
    void *data;
    struct fake_stream *stream;
};

static void *run_host_func(void *p)
{
    struct host_call call = *(struct host_call *)p;
    free(p);
    call.fn(call.data);
    atomic_store(&call.stream->host_func_done, 1);
    return NULL;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t s, cudaHostFn_t fn, void *userData)
{
    struct fake_stream *f = stream_of(s);
    join_host_func(f); /* one at a time: an earlier one is waited for */
    struct host_call *call = malloc(sizeof *call);
    if (!call)
        return cudaErrorMemoryAllocation;
    call->fn = fn;
    call->data = userData;
    call->stream = f;
    atomic_store(&f->host_func_done, 0);
    if (pthread_create(&f->thread, NULL, run_host_func, call) != 0) {
        free(call);
        return cudaErrorMemoryAllocation;
    }
    f->host_func = 1;
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t s)
{
    (void)kind;
    memmove(dst, src, count);
    stream_of(s)->busy = BUSY_POLLS;
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t count, cudaStream_t s)
{
    memset(p, value, count);
    stream_of(s)->busy = BUSY_POLLS;
    return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t s)
{
    struct fake_stream *f = stream_of(s);
    if (f->host_func && !atomic_load(&f->host_func_done))
        return cudaErrorNotReady;
    if (f->busy > 0) {
        f->busy--;
        return cudaErrorNotReady;
    }
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    join_host_func(stream_of(s));
    stream_of(s)->busy = 0;
    return cudaSuccess;
}

/* One-rank communicators. */
struct ncclComm {
    int blocking, revoked;
    int pending; /* ncclCommGetAsyncError polls left that answer ncclInProgress */
};

ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    memset(id, 0, sizeof *id);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config)
{
    (void)id;
    *comm = NULL;
    if (nranks != 1 || rank != 0)
        return ncclInvalidArgument;
    struct ncclComm *c = calloc(1, sizeof *c);
    if (!c)
        return ncclSystemError;
    c->blocking = config ? config->blocking != 0 : 1;
    c->pending = c->blocking ? 0 : BUSY_POLLS;
    *comm = c;
    return c->blocking ? ncclSuccess : ncclInProgress;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank)
{
    return ncclCommInitRankConfig(comm, nranks, id, rank, NULL);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *state)
{
    if (!comm)
        return ncclInvalidArgument;
    *state = ncclSuccess;
    if (comm->pending > 0) {
        comm->pending--;
        *state = ncclInProgress;
    }
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count)
{
    *count = 1;
    return comm ? ncclSuccess : ncclInvalidArgument;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device)
{
    *device = 0;
    return comm ? ncclSuccess : ncclInvalidArgument;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank)
{
    *rank = 0;
    return comm ? ncclSuccess : ncclInvalidArgument;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream)
{
    if (!comm || datatype != ncclFloat64 || (op != ncclSum && op != ncclMax))
        return ncclInvalidArgument;
    if (comm->revoked)
        return ncclInvalidUsage;
    if (sendbuff != recvbuff)
        memmove(recvbuff, sendbuff, count * sizeof(double));
    stream_of(stream)->busy = BUSY_POLLS;
    if (comm->blocking)
        return ncclSuccess;
    comm->pending = BUSY_POLLS;
    return ncclInProgress;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm)
{
    if (!comm)
        return ncclInvalidArgument;
    if (comm->blocking)
        return ncclSuccess;
    comm->pending = BUSY_POLLS;
    return ncclInProgress;
}

ncclResult_t ncclCommRevoke(ncclComm_t comm, int flags)
{
    if (!comm || flags != 0)
        return ncclInvalidArgument;
    comm->revoked = 1;
    comm->pending = BUSY_POLLS;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
    free(comm);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm)
{
    free(comm);
    return ncclSuccess;
}
