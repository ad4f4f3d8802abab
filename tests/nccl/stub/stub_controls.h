/* Test controls of the stub CUDA runtime and one-rank NCCL in stub_impl.c
 * (not CUDA or NCCL API). Kept out of the stub nccl.h so that stub_impl.c
 * also compiles against the real headers, which checks its definitions
 * against the real prototypes. */
#ifndef LRA_STUB_CONTROLS_H
#define LRA_STUB_CONTROLS_H
#include <cuda_runtime.h>
#include <nccl.h>

extern int stub_nccl_calls;          /* ncclAllReduce calls so far */
extern int stub_cuda_outstanding;    /* live cudaMalloc + cudaMallocHost buffers */
/* A non-blocking communicator: ncclAllReduce returns ncclInProgress and the
   enqueue finishes after this many ncclCommGetAsyncError polls. */
extern int stub_nccl_enqueue_polls;
/* cudaStreamQuery answers cudaErrorNotReady this many times per wait. */
extern int stub_stream_busy_polls;
/* A peer failed: the stream never finishes the collective and
   ncclCommGetAsyncError reports this error (ncclSuccess: off). */
extern ncclResult_t stub_nccl_async_error;
/* The current device (cudaGetDevice, cudaSetDevice) and the
   communicator's; copies, stream queries and collectives made while
   another device is current, and cudaSetDevice calls. */
extern int stub_current_device, stub_comm_device;
extern int stub_wrong_device;
extern int stub_set_device_calls;
/* A peer never joins: every ncclAllReduce from now on leaves a collective
   that never completes (cudaStreamQuery answers cudaErrorNotReady, no
   asynchronous error) and scribbles over its buffer, as a collective still
   running may; ncclCommAbort ends it. */
extern int stub_peer_missing;
/* Calls of every stubbed CUDA and NCCL function so far. */
extern int stub_api_calls;
/* ncclCommAbort calls so far. */
extern int stub_nccl_aborts;
/* The comm and stream every call must pass, and the calls that did not. */
extern ncclComm_t stub_comm;
extern cudaStream_t stub_stream;
extern int stub_wrong_handle;
/* An injected failure: the call of the stubbed function named
   stub_fail_function ("cudaMallocHost", "ncclAllReduce", ...) that comes
   after stub_fail_skip more calls of it returns stub_fail_code (a
   cudaError_t or ncclResult_t) and does nothing else; then
   stub_fail_function is reset to NULL. */
extern const char *stub_fail_function;
extern int stub_fail_skip;
extern int stub_fail_code;
/* The other ranks' share of every sum: ncclAllReduce adds it to each
   element (0, the default: one rank, the sum is the identity). */
extern double stub_peer_share;
/* What the last ncclAllReduce was given: its input (up to
   STUB_MAX_SENT values), count and operation. */
enum { STUB_MAX_SENT = 32 };
extern double stub_last_sent[STUB_MAX_SENT];
extern size_t stub_last_count;
extern ncclRedOp_t stub_last_op;
/* The other ranks' values for ncclMax (NULL, the default: none): each
   element becomes the larger of this rank's and theirs. */
extern const double *stub_peer_max;

#endif
