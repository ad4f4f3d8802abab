/* bindings/nccl/lra_nccl.h on a GPU, with the real NCCL and CUDA runtime:
 * one-rank communicators on device 0 (one rank is all one GPU allows; the
 * sum over one rank is the value itself, so every result is exact).
 *
 * 1. A blocking communicator (ncclCommInitRank, nranks = 1); for the legacy
 *    default stream and a created stream: lra_nccl_init puts its buffers on
 *    the device and in pinned host memory; the callback returns 0..
 *    LRA_NCCL_MAX_VALUES values bit for bit (-0.0, a subnormal, 1e308
 *    among them), also queued behind 128 MiB of copies on the stream (the
 *    stream is idle when it returns: it waited for them; the device buffer,
 *    poisoned before, holds the values), and refuses
 *    LRA_NCCL_MAX_VALUES + 1 with LRA_NCCL_ERR_COUNT.
 * 2. Through lra on each stream: a host handle, sharded with rank-local
 *    losses and the guard on, reducing through the adapter, takes the same
 *    12 steps (η, decisions, φ, parameters, bit for bit) as a replicated
 *    handle without a reduction, in 3 calls a step, each returning its
 *    input unchanged; lra_nccl_check_agreement (17 doubles, ncclMax) then
 *    answers 0, also with a step pending, and LRA_NCCL_QUERY_FAILED
 *    without a handle.
 * 3. The same with CUDA handles (device = 1, parameters in device memory,
 *    lra's kernels and the reduction on one created stream): equal to a
 *    CUDA handle whose one-rank sum is done on the host (φ too) and, in
 *    η, decisions and parameters, to a replicated CUDA handle without one.
 * 4. A non-blocking communicator (config.blocking = 0; its init polled
 *    through ncclInProgress): the callback sums and the host run of 2
 *    again; then ncclCommFinalize, polled, and ncclCommDestroy.
 * 5. Failure: ncclCommAbort on the blocking communicator returns; the next
 *    lra_step on a handle that used it gets LRA_REDUCTION_FAILED naming
 *    what ncclAllReduce answers then, and changes nothing.
 * 6. Failure on a live communicator, where the libnccl found has
 *    ncclCommRevoke (recent releases only; looked up at run time): after the
 *    revoke, the next lra_step gets LRA_REDUCTION_FAILED naming what
 *    ncclAllReduce answers on the revoked communicator, and changes nothing;
 *    then ncclCommDestroy.
 * 7. The deadline (timeout_s), before part 5 on the blocking communicator:
 *    the stream held by a host function (cudaLaunchHostFunc) that waits
 *    for the test, as a collective waits for a peer that never comes; the
 *    callback must return LRA_NCCL_ERR_TIMEOUT after its deadline, not
 *    before, with its values unchanged and the stream still held, and the
 *    next call (and lra_nccl_check_agreement) at once; released, the stream drains (the one-rank
 *    collective completes) and lra_nccl_free works.
 * With two or more devices also: lra_nccl_init with device 1 current and
 * the communicator on device 0 -> LRA_NCCL_ERR_DEVICE.
 *
 * NCCL runs an in-place all-reduce over one rank without moving anything
 * (nothing to send, nothing to add), so this proves the adapter on a live
 * device and stream with the real API, not NCCL's transport between GPUs.
 *
 * Without a usable CUDA device it prints why and exits 77 (skipped), or 1
 * when LRA_REQUIRE_GPU is set (scripts/gpu-check.sh sets it).
 *
 * LRA_NCCL_GPU_TEST_HOST_ONLY (set only by the CPU dry run under
 * tests/nccl/fake_gpu_preload.c, which has no CUDA driver for lra's CUDA
 * backend) leaves out part 3, and scripts/gpu-check.sh says so loudly. */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lra_nccl.h"
#include "nccl_test_support.h"

enum { SKIPPED = 77, STEPS = 12 };

#define CUDA_OK(call)                                                                              \
    do {                                                                                           \
        const cudaError_t e_ = (call);                                                             \
        CHECK(e_ == cudaSuccess, "%s -> %d %s", #call, (int)e_, cudaGetErrorName(e_));             \
    } while (0)
#define NCCL_OK(call)                                                                              \
    do {                                                                                           \
        const ncclResult_t n_ = (call);                                                            \
        CHECK(n_ == ncclSuccess, "%s -> %d %s (\"%s\")", #call, (int)n_, ncclGetErrorString(n_),   \
              ncclGetLastError(NULL));                                                             \
    } while (0)

/* The adapter's callback, counted, and checked: over one rank every sum must
 * be its input, bit for bit. */
typedef struct counted_reduction {
    lra_nccl_reduction *red; /* NULL: the one-rank sum on the host */
    int calls;
    int changed; /* calls whose values came back different */
} counted_reduction;

static int32_t counted_sum(double *values, size_t count, void *user)
{
    counted_reduction *c = (counted_reduction *)user;
    double in[LRA_NCCL_MAX_VALUES];
    const size_t n = count < LRA_NCCL_MAX_VALUES ? count : LRA_NCCL_MAX_VALUES;
    memcpy(in, values, n * sizeof(double));
    const int32_t rc = c->red ? lra_nccl_allreduce_sum(values, count, c->red) : 0;
    c->calls++;
    if (rc == 0 && memcmp(in, values, n * sizeof(double)) != 0)
        c->changed++;
    return rc;
}

/* Values whose bits a careless copy or an added zero would change. */
static const double SAMPLES[LRA_NCCL_MAX_VALUES] = {
    1.5, -0.0, 4.9406564584124654e-324, -1.0 / 3.0, 1e308, -2.5e-300, 3.0, 0.1};

/* 128 MiB of device-to-device copies queued on `stream`, to keep it busy. */
static void occupy(cudaStream_t stream, char *a, char *b, size_t bytes)
{
    for (int i = 0; i < 4; i++)
        CUDA_OK(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice,
                                stream));
}

/* Part 1 for one initialised reduction. */
static void callback_sums(lra_nccl_reduction *red, const char *what)
{
    enum { BUSY_BYTES = 32 << 20 };
    struct cudaPointerAttributes attr;
    CUDA_OK(cudaPointerGetAttributes(&attr, red->device));
    CHECK(attr.type == cudaMemoryTypeDevice && attr.device == 0,
          "%s: the staging buffer is not device memory of device 0 (type %d, device %d)", what,
          (int)attr.type, attr.device);
    CUDA_OK(cudaPointerGetAttributes(&attr, red->host));
    CHECK(attr.type == cudaMemoryTypeHost, "%s: the host staging buffer is not pinned (type %d)",
          what, (int)attr.type);
    for (size_t count = 0; count <= LRA_NCCL_MAX_VALUES; count++) {
        double values[LRA_NCCL_MAX_VALUES];
        memcpy(values, SAMPLES, sizeof values);
        const int32_t rc = lra_nccl_allreduce_sum(values, count, red);
        CHECK(rc == 0, "%s: lra_nccl_allreduce_sum of %zu values -> %d", what, count, (int)rc);
        CHECK(memcmp(values, SAMPLES, sizeof values) == 0,
              "%s: the sum over one rank of %zu values is not the values themselves", what, count);
    }
    char *a = NULL, *b = NULL;
    CUDA_OK(cudaMalloc((void **)&a, BUSY_BYTES));
    CUDA_OK(cudaMalloc((void **)&b, BUSY_BYTES));
    /* The device buffer poisoned (NaNs) first: afterwards it must hold the
       staged values, so the copy to the device is seen to have happened. */
    CUDA_OK(cudaMemsetAsync(red->device, 0xFF, sizeof SAMPLES, red->stream));
    occupy(red->stream, a, b, BUSY_BYTES);
    double values[LRA_NCCL_MAX_VALUES], on_device[LRA_NCCL_MAX_VALUES];
    memcpy(values, SAMPLES, sizeof values);
    const int32_t rc = lra_nccl_allreduce_sum(values, LRA_NCCL_MAX_VALUES, red);
    const cudaError_t idle = cudaStreamQuery(red->stream);
    CHECK(rc == 0 && memcmp(values, SAMPLES, sizeof values) == 0,
          "%s: the call behind 128 MiB of copies -> %d or changed values", what, (int)rc);
    CHECK(idle == cudaSuccess,
          "%s: the callback returned before the work queued on its stream had finished "
          "(cudaStreamQuery -> %s)",
          what, cudaGetErrorName(idle));
    CUDA_OK(cudaMemcpyAsync(on_device, red->device, sizeof on_device, cudaMemcpyDeviceToHost,
                            red->stream));
    CUDA_OK(cudaStreamSynchronize(red->stream));
    CHECK(memcmp(on_device, SAMPLES, sizeof on_device) == 0,
          "%s: the device staging buffer does not hold the values the callback staged", what);
    CUDA_OK(cudaFree(a));
    CUDA_OK(cudaFree(b));
    double many[LRA_NCCL_MAX_VALUES + 1] = {0};
    CHECK(lra_nccl_allreduce_sum(many, LRA_NCCL_MAX_VALUES + 1, red) == LRA_NCCL_ERR_COUNT,
          "%s: %d values must give LRA_NCCL_ERR_COUNT", what, LRA_NCCL_MAX_VALUES + 1);
    printf("  %s: buffers on device 0 and pinned; 0..%d values summed bit for bit, also behind "
           "128 MiB of copies (stream idle on return, values in the device buffer); %d values "
           "-> LRA_NCCL_ERR_COUNT\n",
           what, LRA_NCCL_MAX_VALUES, LRA_NCCL_MAX_VALUES + 1);
}

/* One step and its re-evaluation on a host handle. */
static void host_step(lra_handle *h, float *theta, float *grad, lra_reeval_info *info)
{
    lra_tensor t = {theta, grad, N, LRA_DTYPE_F32, 0};
    const double f = loss_and_grad(theta, grad);
    CHECK(lra_step(h, &t, 1, f, 0.0, NULL) == LRA_OK, "lra_step: %s", lra_last_error(h));
    CHECK(lra_report_reeval(h, loss_and_grad(theta, NULL), info) == LRA_OK,
          "lra_report_reeval: %s", lra_last_error(h));
}

static void start(float *theta)
{
    for (int k = 0; k < N; k++)
        theta[k] = (float)(0.1 * k);
}

/* A sharded host handle on the adapter after two good steps (the failure
   checks then break the communicator under it). */
static lra_handle *sharded_after_two_steps(lra_nccl_reduction *red, float *theta, float *grad)
{
    lra_handle *h = make_handle(LRA_DEVICE_HOST, LRA_SHARDING_SHARDED, 1, 1,
                                lra_nccl_allreduce_sum, red);
    start(theta);
    lra_reeval_info info;
    for (int s = 0; s < 2; s++)
        host_step(h, theta, grad, &info);
    return h;
}

/* Part 2: host handles through the adapter against one without reduction. */
static void host_training(lra_nccl_reduction *red, const char *what)
{
    counted_reduction c = {red, 0, 0};
    lra_handle *with = make_handle(LRA_DEVICE_HOST, LRA_SHARDING_SHARDED, 1, 1, counted_sum, &c);
    lra_handle *without = make_handle(LRA_DEVICE_HOST, LRA_SHARDING_REPLICATED, 0, 1, NULL, NULL);
    float a[N], ga[N], b[N], gb[N];
    start(a);
    start(b);
    int changed = 0;
    for (int s = 0; s < STEPS; s++) {
        lra_reeval_info ia, ib;
        host_step(with, a, ga, &ia);
        host_step(without, b, gb, &ib);
        CHECK(ia.lr == ib.lr && ia.decision == ib.decision && ia.phi == ib.phi,
              "%s step %d: through NCCL η %.17g (decision %u, φ %.17g), without reduction "
              "η %.17g (decision %u, φ %.17g)",
              what, s, ia.lr, ia.decision, ia.phi, ib.lr, ib.decision, ib.phi);
        changed += ia.decision == LRA_DECISION_RAISED || ia.decision == LRA_DECISION_LOWERED;
    }
    CHECK(memcmp(a, b, sizeof a) == 0, "%s: parameters differ from the run without reduction",
          what);
    CHECK(changed > 0, "%s: η never changed: the comparison would prove little", what);
    /* Per step: [f_i, 1], the pre-write [non-finite, found-inf, 0], [φ, f+, 1]. */
    CHECK(c.calls == 3 * STEPS && c.changed == 0,
          "%s: %d reductions (want %d), %d of them changed their values", what, c.calls,
          3 * STEPS, c.changed);
    double lr;
    CHECK(lra_get_lr(with, &lr) == LRA_OK, "lra_get_lr");
    printf("  %s, host handles: %d steps identical to a handle without reduction (η 0.01 -> "
           "%.6g, %d changes), %d reductions through NCCL, each exact\n",
           what, STEPS, lr, changed, c.calls);
    /* One rank agrees with itself: the 17 values survive the ncclMax. */
    int32_t rc = lra_nccl_check_agreement(with, red);
    CHECK(rc == 0, "%s: lra_nccl_check_agreement after the run -> %d (%s)", what, (int)rc,
          lra_nccl_error_string(rc));
    lra_tensor t = {a, ga, N, LRA_DTYPE_F32, 0};
    CHECK(lra_step(with, &t, 1, loss_and_grad(a, ga), 0.0, NULL) == LRA_OK, "lra_step: %s",
          lra_last_error(with));
    rc = lra_nccl_check_agreement(with, red);
    CHECK(rc == 0, "%s: lra_nccl_check_agreement with a step pending -> %d (%s)", what, (int)rc,
          lra_nccl_error_string(rc));
    CHECK(lra_report_reeval(with, loss_and_grad(a, NULL), NULL) == LRA_OK,
          "lra_report_reeval: %s", lra_last_error(with));
    rc = lra_nccl_check_agreement(NULL, red);
    CHECK(rc == LRA_NCCL_QUERY_FAILED, "%s: lra_nccl_check_agreement without a handle -> %d (%s)",
          what, (int)rc, lra_nccl_error_string(rc));
    printf("  %s: lra_nccl_check_agreement -> 0 after the run and with a step pending, "
           "LRA_NCCL_QUERY_FAILED without a handle\n",
           what);
    lra_destroy(with);
    lra_destroy(without);
}

/* A CUDA handle's run: parameters and gradients in device memory, lra's
 * kernels on `stream`. */
typedef struct device_run {
    lra_handle *h;
    float *theta, *grad; /* device */
    lra_reeval_info info[STEPS];
} device_run;

static void device_start(device_run *r, lra_handle *h)
{
    float host[N];
    start(host);
    r->h = h;
    CUDA_OK(cudaMalloc((void **)&r->theta, sizeof host));
    CUDA_OK(cudaMalloc((void **)&r->grad, sizeof host));
    CUDA_OK(cudaMemcpy(r->theta, host, sizeof host, cudaMemcpyHostToDevice));
    /* A copy from pageable memory may still be in flight when cudaMemcpy
       returns, and the steps run on a stream that does not wait for the
       legacy one. */
    CUDA_OK(cudaDeviceSynchronize());
}

static void device_theta(const device_run *r, cudaStream_t stream, float *host)
{
    CUDA_OK(cudaMemcpyAsync(host, r->theta, N * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
}

static void device_step(device_run *r, cudaStream_t stream, int s)
{
    float theta[N], grad[N];
    device_theta(r, stream, theta);
    const double f = loss_and_grad(theta, grad);
    CUDA_OK(cudaMemcpyAsync(r->grad, grad, sizeof grad, cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaStreamSynchronize(stream)); /* `grad` is about to go out of scope */
    lra_tensor t = {r->theta, r->grad, N, LRA_DTYPE_F32, 0};
    CHECK(lra_step(r->h, &t, 1, f, 0.0, stream) == LRA_OK, "CUDA lra_step %d: %s", s,
          lra_last_error(r->h));
    device_theta(r, stream, theta);
    CHECK(lra_report_reeval(r->h, loss_and_grad(theta, NULL), &r->info[s]) == LRA_OK,
          "CUDA lra_report_reeval %d: %s", s, lra_last_error(r->h));
}

/* Part 3. */
static void device_training(lra_nccl_reduction *red)
{
    counted_reduction nccl = {red, 0, 0}, host_sum = {NULL, 0, 0};
    device_run runs[3];
    lra_handle *h = NULL;
    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_ADAM);
    cfg.device = LRA_DEVICE_CUDA;
    const lra_status st = lra_create(&cfg, &h);
    CHECK(st == LRA_OK, "a CUDA handle (device = 1) cannot be created here: %s (%s)",
          lra_status_string(st), lra_thread_last_error());
    lra_destroy(h);
    device_start(&runs[0],
                 make_handle(LRA_DEVICE_CUDA, LRA_SHARDING_SHARDED, 1, 1, counted_sum, &nccl));
    device_start(&runs[1],
                 make_handle(LRA_DEVICE_CUDA, LRA_SHARDING_SHARDED, 1, 1, counted_sum, &host_sum));
    device_start(&runs[2],
                 make_handle(LRA_DEVICE_CUDA, LRA_SHARDING_REPLICATED, 0, 1, NULL, NULL));
    int changed = 0;
    for (int s = 0; s < STEPS; s++) {
        for (int i = 0; i < 3; i++)
            device_step(&runs[i], red->stream, s);
        const lra_reeval_info *a = &runs[0].info[s], *b = &runs[1].info[s], *c = &runs[2].info[s];
        CHECK(a->lr == b->lr && a->decision == b->decision && a->phi == b->phi,
              "CUDA step %d: through NCCL η %.17g (decision %u, φ %.17g), one-rank sum on the "
              "host η %.17g (decision %u, φ %.17g)",
              s, a->lr, a->decision, a->phi, b->lr, b->decision, b->phi);
        CHECK(a->lr == c->lr && a->decision == c->decision,
              "CUDA step %d: through NCCL η %.17g (decision %u), replicated without reduction "
              "η %.17g (decision %u)",
              s, a->lr, a->decision, c->lr, c->decision);
        changed += a->decision == LRA_DECISION_RAISED || a->decision == LRA_DECISION_LOWERED;
    }
    float theta[3][N];
    for (int i = 0; i < 3; i++)
        device_theta(&runs[i], red->stream, theta[i]);
    CHECK(memcmp(theta[0], theta[1], sizeof theta[0]) == 0,
          "CUDA: parameters differ from the handle whose sum ran on the host");
    CHECK(memcmp(theta[0], theta[2], sizeof theta[0]) == 0,
          "CUDA: parameters differ from the replicated handle without reduction");
    CHECK(changed > 0, "CUDA: η never changed: the comparison would prove little");
    CHECK(nccl.calls == host_sum.calls && nccl.calls > 0 && nccl.changed == 0,
          "CUDA: %d reductions through NCCL (%d changed their values), %d on the host",
          nccl.calls, nccl.changed, host_sum.calls);
    double max_rel = 0;
    for (int s = 0; s < STEPS; s++) {
        const double p = runs[0].info[s].phi, q = runs[2].info[s].phi;
        double d = p == q ? 0 : (p - q) / (q != 0 ? q : 1);
        d = d < 0 ? -d : d;
        max_rel = d > max_rel ? d : max_rel;
    }
    for (int i = 0; i < 3; i++) {
        lra_destroy(runs[i].h);
        CUDA_OK(cudaFree(runs[i].theta));
        CUDA_OK(cudaFree(runs[i].grad));
    }
    printf("  CUDA handles (device = 1) on the created stream: %d steps, sharded through NCCL "
           "== sharded with the sum on the host (φ bit for bit) == replicated without reduction "
           "(η, decisions, parameters; φ max rel. diff %.3g); %d changes of η, %d reductions "
           "through NCCL, each exact\n",
           STEPS, max_rel, changed, nccl.calls);
}

/* Polls a communicator until it leaves ncclInProgress; returns its state
 * and counts the polls. Gives up after 20 s with a message (the script's
 * timeout would only say that something hung). */
static ncclResult_t settle(ncclComm_t comm, int *polls)
{
    const time_t give_up = time(NULL) + 20;
    ncclResult_t state = ncclInProgress;
    while (state == ncclInProgress) {
        NCCL_OK(ncclCommGetAsyncError(comm, &state));
        if (state == ncclInProgress) {
            CHECK(time(NULL) < give_up,
                  "the communicator is still ncclInProgress after %d polls (20 s)", *polls);
            ++*polls;
            sched_yield();
        }
    }
    return state;
}

/* Part 4. */
static void non_blocking(cudaStream_t stream)
{
    ncclUniqueId id;
    NCCL_OK(ncclGetUniqueId(&id));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = NULL;
    const ncclResult_t n = ncclCommInitRankConfig(&comm, 1, id, 0, &config);
    CHECK((n == ncclSuccess || n == ncclInProgress) && comm != NULL,
          "non-blocking ncclCommInitRankConfig -> %d %s (\"%s\")", (int)n, ncclGetErrorString(n),
          ncclGetLastError(NULL));
    int polls = 0;
    ncclResult_t state = settle(comm, &polls);
    CHECK(state == ncclSuccess, "the non-blocking communicator's init ended in %d %s", (int)state,
          ncclGetErrorString(state));
    printf("  non-blocking communicator: ncclCommInitRankConfig -> %s, ready after %d polls\n",
           ncclGetErrorString(n), polls);
    lra_nccl_reduction red;
    memset(&red, 0xA5, sizeof red);
    const int32_t rc = lra_nccl_init(&red, comm, stream);
    CHECK(rc == 0, "lra_nccl_init on the non-blocking communicator -> %d", (int)rc);
    callback_sums(&red, "non-blocking communicator, created stream");
    host_training(&red, "non-blocking communicator, created stream");
    lra_nccl_free(&red);
    const ncclResult_t f = ncclCommFinalize(comm);
    CHECK(f == ncclSuccess || f == ncclInProgress, "ncclCommFinalize -> %d %s", (int)f,
          ncclGetErrorString(f));
    polls = 0;
    state = settle(comm, &polls);
    CHECK(state == ncclSuccess, "finalizing ended in %d %s", (int)state,
          ncclGetErrorString(state));
    /* (Its own resources; it may still answer ncclInProgress for them.) */
    const ncclResult_t d = ncclCommDestroy(comm);
    CHECK(d == ncclSuccess || d == ncclInProgress, "ncclCommDestroy -> %d %s", (int)d,
          ncclGetErrorString(d));
    printf("  non-blocking communicator: ncclCommFinalize -> %s, quiet after %d polls; "
           "ncclCommDestroy -> %s\n",
           ncclGetErrorString(f), polls, ncclGetErrorString(d));
}

/* The next lra_step on `h` must fail with the reduction's `code` and leave
   η, the counters and the parameters as they were. */
static void step_fails_changing_nothing(lra_handle *h, float *theta, float *grad,
                                        const char *what, int32_t code)
{
    float before[N];
    double lr_before, lr_after;
    lra_counters c0, c1;
    CHECK(lra_get_lr(h, &lr_before) == LRA_OK && lra_get_counters(h, &c0) == LRA_OK, "queries");
    memcpy(before, theta, sizeof before);
    lra_tensor t = {theta, grad, N, LRA_DTYPE_F32, 0};
    expect_reduction_failed(h, lra_step(h, &t, 1, loss_and_grad(theta, grad), 0.0, NULL), what,
                            code);
    CHECK(lra_get_lr(h, &lr_after) == LRA_OK && lr_after == lr_before, "%s: η changed: %.17g",
          what, lr_after);
    CHECK(lra_get_counters(h, &c1) == LRA_OK && c1.steps == c0.steps,
          "%s: the failed step was counted", what);
    CHECK(memcmp(theta, before, sizeof before) == 0, "%s: parameters changed", what);
}

/* Part 7: a host function holding the stream until the test lets it go. */
static atomic_int hold_released;

static void CUDART_CB hold_stream(void *unused)
{
    (void)unused;
    while (!atomic_load(&hold_released)) {
        const struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    CHECK(clock_gettime(CLOCK_MONOTONIC, &ts) == 0, "clock_gettime");
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void deadline(ncclComm_t comm, cudaStream_t stream)
{
    const double timeout = 0.2;
    lra_nccl_reduction red;
    CHECK(lra_nccl_init(&red, comm, stream) == 0 && red.timeout_s == 0 && red.timed_out == 0,
          "lra_nccl_init for the deadline check (timeout_s %g, timed_out %d)", red.timeout_s,
          (int)red.timed_out);
    red.timeout_s = timeout;
    double values[3];
    memcpy(values, SAMPLES, sizeof values);
    CHECK(lra_nccl_allreduce_sum(values, 3, &red) == 0 &&
              memcmp(values, SAMPLES, sizeof values) == 0,
          "a call with a deadline on an idle stream failed or changed its values");
    atomic_store(&hold_released, 0);
    CUDA_OK(cudaLaunchHostFunc(stream, hold_stream, NULL));
    const double t0 = monotonic_seconds();
    int32_t rc = lra_nccl_allreduce_sum(values, 3, &red);
    const double took = monotonic_seconds() - t0;
    const cudaError_t held = cudaStreamQuery(stream);
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT && red.timed_out == 1,
          "a held stream, deadline %g s: -> %d (timed_out %d), want LRA_NCCL_ERR_TIMEOUT (%d)",
          timeout, (int)rc, (int)red.timed_out, LRA_NCCL_ERR_TIMEOUT);
    CHECK(took >= timeout && took < 30 * timeout + 1, "it took %.6f s for a deadline of %g s",
          took, timeout);
    CHECK(memcmp(values, SAMPLES, sizeof values) == 0, "a timed-out call changed its values");
    CHECK(held == cudaErrorNotReady, "the stream should still be held: cudaStreamQuery -> %s",
          cudaGetErrorName(held));
    const double t1 = monotonic_seconds();
    rc = lra_nccl_allreduce_sum(values, 3, &red);
    const double again = monotonic_seconds() - t1;
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT && memcmp(values, SAMPLES, sizeof values) == 0,
          "the call after a timeout -> %d, want LRA_NCCL_ERR_TIMEOUT, values unchanged", (int)rc);
    rc = lra_nccl_check_agreement(NULL, &red);
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT, "lra_nccl_check_agreement after a timeout -> %d (%s)",
          (int)rc, lra_nccl_error_string(rc));
    atomic_store(&hold_released, 1);
    CUDA_OK(cudaStreamSynchronize(stream)); /* as ncclCommAbort would end a real hang */
    lra_nccl_free(&red);
    printf("  deadline %g s, stream held: LRA_NCCL_ERR_TIMEOUT after %.3f s, values unchanged; "
           "next call -> LRA_NCCL_ERR_TIMEOUT in %.6f s; released, the stream drained\n",
           timeout, took, again);
}

/* Part 5: `comm` is aborted here. */
static void failure_after_abort(ncclComm_t comm, cudaStream_t stream)
{
    lra_nccl_reduction red;
    CHECK(lra_nccl_init(&red, comm, stream) == 0, "lra_nccl_init for the failure check");
    float theta[N], grad[N];
    lra_handle *h = sharded_after_two_steps(&red, theta, grad);
    NCCL_OK(ncclCommAbort(comm));
    /* ncclCommAbort frees the communicator: a trainer's reduction must not
       use it any more (passing the stale pointer would be a use after free),
       so the reduction now names none; the staging copy still runs on the
       live stream, and NCCL refuses the collective. */
    red.comm = NULL;
    const ncclResult_t refused =
        ncclAllReduce(red.device, red.device, 1, ncclFloat64, ncclSum, NULL, stream);
    CHECK(refused != ncclSuccess && refused != ncclInProgress,
          "ncclAllReduce without a communicator -> %d", (int)refused);
    CUDA_OK(cudaStreamSynchronize(stream));
    step_fails_changing_nothing(h, theta, grad, "lra_step after ncclCommAbort",
                                LRA_NCCL_ERR_NCCL + (int32_t)refused);
    CUDA_OK(cudaStreamSynchronize(stream));
    const int32_t agree = lra_nccl_check_agreement(h, &red);
    CHECK(agree > LRA_NCCL_ERR_NCCL && agree < LRA_NCCL_ERR_NCCL + 1000,
          "lra_nccl_check_agreement after ncclCommAbort -> %d (%s), want an NCCL error",
          (int)agree, lra_nccl_error_string(agree));
    printf("  lra_nccl_check_agreement after ncclCommAbort -> %d (%s)\n", (int)agree,
           lra_nccl_error_string(agree));
    /* (Without a communicator the callback's wait cannot poll one and
       returns at once; its staging copy may still be running.) */
    CUDA_OK(cudaStreamSynchronize(stream));
    lra_destroy(h);
    lra_nccl_free(&red);
    printf("  ncclCommAbort returned; the next lra_step -> LRA_REDUCTION_FAILED (%d = "
           "LRA_NCCL_ERR_NCCL + %s), η, counters and parameters unchanged\n",
           LRA_NCCL_ERR_NCCL + (int)refused, ncclGetErrorString(refused));
}

/* Part 6: a communicator of its own, revoked and destroyed here. */
static void failure_after_revoke(cudaStream_t stream)
{
    ncclResult_t (*revoke)(ncclComm_t, int);
    *(void **)&revoke = dlsym(RTLD_DEFAULT, "ncclCommRevoke");
    if (!revoke) {
        printf("  (this libnccl has no ncclCommRevoke: the revoked-communicator check is not "
               "run)\n");
        return;
    }
    ncclUniqueId id;
    NCCL_OK(ncclGetUniqueId(&id));
    ncclComm_t comm = NULL;
    NCCL_OK(ncclCommInitRank(&comm, 1, id, 0));
    lra_nccl_reduction red;
    CHECK(lra_nccl_init(&red, comm, stream) == 0, "lra_nccl_init for the revoke check");
    float theta[N], grad[N];
    lra_handle *h = sharded_after_two_steps(&red, theta, grad);
    const ncclResult_t revoked = revoke(comm, 0 /* NCCL_REVOKE_DEFAULT */);
    int polls = 0;
    const ncclResult_t state = revoked == ncclSuccess ? settle(comm, &polls) : ncclSuccess;
    const ncclResult_t refused =
        revoked == ncclSuccess
            ? ncclAllReduce(red.device, red.device, 1, ncclFloat64, ncclSum, comm, stream)
            : ncclSuccess;
    if (refused == ncclSuccess || refused == ncclInProgress) {
        /* Not the adapter's concern: say what NCCL did and leave it. */
        printf("  NOTE: ncclCommRevoke -> %s and then ncclAllReduce -> %s: this NCCL does not "
               "refuse a revoked communicator; the revoked-communicator check is not run\n",
               ncclGetErrorString(revoked), ncclGetErrorString(refused));
        if (refused == ncclInProgress)
            (void)settle(comm, &polls);
    } else {
        CUDA_OK(cudaStreamSynchronize(stream));
        step_fails_changing_nothing(h, theta, grad, "lra_step after ncclCommRevoke",
                                    LRA_NCCL_ERR_NCCL + (int32_t)refused);
        printf("  ncclCommRevoke -> state %s after %d polls; the next lra_step -> "
               "LRA_REDUCTION_FAILED (%d = LRA_NCCL_ERR_NCCL + %s), η, counters and parameters "
               "unchanged\n",
               ncclGetErrorString(state), polls, LRA_NCCL_ERR_NCCL + (int)refused,
               ncclGetErrorString(refused));
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    lra_destroy(h);
    lra_nccl_free(&red);
    NCCL_OK(ncclCommDestroy(comm));
}

int main(void)
{
    int nccl_version = 0, runtime_version = 0, driver_version = 0, devices = 0, device = -1;
    NCCL_OK(ncclGetVersion(&nccl_version));
    CUDA_OK(cudaRuntimeGetVersion(&runtime_version));
    (void)cudaDriverGetVersion(&driver_version);
    printf("NCCL library %d (built against nccl.h %d), CUDA runtime %d (built against %d), "
           "driver %d\n",
           nccl_version, NCCL_VERSION_CODE, runtime_version, CUDART_VERSION, driver_version);
    const cudaError_t none = cudaGetDeviceCount(&devices);
    if (none != cudaSuccess || devices == 0) {
        const int required = getenv("LRA_REQUIRE_GPU") != NULL;
        printf("\n!!!! %s: lra_nccl_gpu_test: no usable CUDA device (cudaGetDeviceCount -> %d "
               "%s: \"%s\") !!!!\n",
               required ? "FAILED (LRA_REQUIRE_GPU is set)" : "SKIPPED", (int)none,
               cudaGetErrorName(none), cudaGetErrorString(none));
        return required ? 1 : SKIPPED;
    }
    const int host_only = getenv("LRA_NCCL_GPU_TEST_HOST_ONLY") != NULL;
    CUDA_OK(cudaSetDevice(0));
    CUDA_OK(cudaGetDevice(&device));
    CHECK(device == 0, "cudaSetDevice(0) left device %d current", device);
    struct cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, 0));
    printf("device 0 of %d: %s\n", devices, prop.name);

    /* ---- 1, 2: a blocking one-rank communicator ---- */
    ncclUniqueId id;
    NCCL_OK(ncclGetUniqueId(&id));
    ncclComm_t comm = NULL;
    NCCL_OK(ncclCommInitRank(&comm, 1, id, 0));
    int count = -1, comm_device = -1, rank = -1;
    NCCL_OK(ncclCommCount(comm, &count));
    NCCL_OK(ncclCommCuDevice(comm, &comm_device));
    NCCL_OK(ncclCommUserRank(comm, &rank));
    CHECK(count == 1 && comm_device == 0 && rank == 0,
          "communicator: %d ranks, device %d, rank %d", count, comm_device, rank);
    printf("  blocking communicator: 1 rank on device 0\n");
    cudaStream_t created;
    CUDA_OK(cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking));
    const struct {
        cudaStream_t stream;
        const char *name;
    } streams[] = {{NULL, "legacy default stream"}, {created, "created stream"}};
    for (size_t i = 0; i < sizeof streams / sizeof streams[0]; i++) {
        lra_nccl_reduction red;
        memset(&red, 0xA5, sizeof red); /* an uninitialised struct */
        const int32_t rc = lra_nccl_init(&red, comm, streams[i].stream);
        CHECK(rc == 0 && red.device != NULL && red.host != NULL, "lra_nccl_init (%s) -> %d",
              streams[i].name, (int)rc);
        callback_sums(&red, streams[i].name);
        host_training(&red, streams[i].name);
        if (i == 1 && !host_only)
            device_training(&red); /* 3 */
        else if (i == 1)
            printf("  CUDA handles left out: LRA_NCCL_GPU_TEST_HOST_ONLY is set (a dry run)\n");
        lra_nccl_free(&red);
        lra_nccl_free(&red);
    }
    if (devices >= 2) {
        CUDA_OK(cudaSetDevice(1));
        lra_nccl_reduction red;
        const int32_t rc = lra_nccl_init(&red, comm, NULL);
        CUDA_OK(cudaSetDevice(0));
        CHECK(rc == LRA_NCCL_ERR_DEVICE && red.device == NULL && red.host == NULL,
              "lra_nccl_init with device 1 current, communicator on device 0 -> %d", (int)rc);
        printf("  device 1 current, communicator on device 0: lra_nccl_init -> "
               "LRA_NCCL_ERR_DEVICE\n");
    } else {
        printf("  (one device: the wrong-device refusal is not tried)\n");
    }

    non_blocking(created);           /* 4 */
    deadline(comm, created);            /* 7 */
    failure_after_abort(comm, created); /* 5 */
    failure_after_revoke(created);      /* 6 */
    CUDA_OK(cudaStreamDestroy(created));
    printf("nccl adapter on %s with NCCL %d and CUDA runtime %d: one-rank sums exact on the "
           "legacy and a created stream, %s identical to runs without NCCL, non-blocking "
           "communicator, ncclCommAbort (and ncclCommRevoke where there) -> LRA_REDUCTION_FAILED, "
           "deadline -> LRA_NCCL_ERR_TIMEOUT\n",
           prop.name, nccl_version, runtime_version,
           host_only ? "host handles (CUDA handles left out)" : "host and CUDA handles");
    return 0;
}
