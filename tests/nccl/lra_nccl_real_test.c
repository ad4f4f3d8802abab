/* bindings/nccl/lra_nccl.h linked against the real NCCL (libnccl.so.2) and
 * CUDA runtime (libcudart.so.12) and run on a machine without a GPU or CUDA
 * driver: every path of the adapter that needs no device, with the
 * libraries' own error codes.
 *
 * - lra_nccl_init returns LRA_NCCL_ERR_CUDA + the cudaError_t that
 *   cudaGetDevice answers (cudaErrorInsufficientDriver, 35, when there is no
 *   driver at all) and leaves the struct safe to lra_nccl_free, also when it
 *   held garbage before; the callback registered on it anyway makes
 *   lra_step fail with LRA_REDUCTION_FAILED (LRA_NCCL_ERR_INIT), no crash;
 * - ncclGetUniqueId works (its bootstrap needs a network interface, no GPU;
 *   without one that part is skipped, loudly), and blocking and non-blocking
 *   ncclCommInitRank fail with ncclUnhandledCudaError, naming the CUDA
 *   error, and hand out no communicator;
 * - the callback's CUDA and NCCL calls fail with the codes documented in
 *   lra_nccl.h (lra_nccl_check_agreement with the same one), which
 *   lra_nccl_error_string decodes with the libraries' own texts, and
 *   through a real lra handle lra_step and lra_report_reeval return
 *   LRA_REDUCTION_FAILED naming the code and change nothing (η, counters,
 *   parameters, the pending step).
 *
 * The collective itself needs GPUs and is not run. On a machine where a CUDA
 * device is usable the test exits with 77 (skipped): its expectations are
 * those of a machine without one. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lra_nccl.h"
#include "nccl_test_support.h"

enum { SKIPPED = 77 };

/* What every CUDA runtime call answers on this machine (cudaGetDevice's). */
static cudaError_t no_device;

static int32_t cuda_code(void) { return LRA_NCCL_ERR_CUDA + (int32_t)no_device; }

static lra_handle *make(uint32_t sharding, uint32_t loss_is_rank_local, uint32_t check_finite,
                        lra_nccl_reduction *red)
{
    return make_handle(LRA_DEVICE_HOST, sharding, loss_is_rank_local, check_finite,
                       lra_nccl_allreduce_sum, red);
}

int main(void)
{
    /* ---- the libraries found are the headers' ---- */
    int nccl_version = 0, runtime_version = 0, driver_version = -1, device = -1;
    CHECK(ncclGetVersion(&nccl_version) == ncclSuccess && nccl_version == NCCL_VERSION_CODE,
          "libnccl reports version %d, nccl.h is %d", nccl_version, NCCL_VERSION_CODE);
    CHECK(cudaRuntimeGetVersion(&runtime_version) == cudaSuccess &&
              runtime_version == CUDART_VERSION,
          "libcudart reports version %d, cuda_runtime_api.h is %d", runtime_version,
          CUDART_VERSION);
    CHECK(cudaDriverGetVersion(&driver_version) == cudaSuccess, "cudaDriverGetVersion failed");
    no_device = cudaGetDevice(&device);
    printf("NCCL %d.%d.%d (code %d), CUDA runtime %d, driver %d: cudaGetDevice -> %d %s (\"%s\")\n",
           NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH, nccl_version, runtime_version, driver_version,
           (int)no_device, cudaGetErrorName(no_device), cudaGetErrorString(no_device));
    if (no_device == cudaSuccess) {
        printf("\n!!!! SKIPPED: CUDA device %d is usable here: lra_nccl_real_test checks the paths "
               "of a machine without one !!!!\n",
               device);
        return SKIPPED;
    }
    /* No libcuda.so at all: the runtime's documented answer. (With a driver
       but no device it would be cudaErrorNoDevice; the codes below follow
       whatever cudaGetDevice answered.) */
    if (driver_version == 0)
        CHECK(no_device == cudaErrorInsufficientDriver,
              "no driver: cudaGetDevice -> %d, want cudaErrorInsufficientDriver (%d)",
              (int)no_device, (int)cudaErrorInsufficientDriver);

    /* ---- lra_nccl_init without a device ---- */
    lra_nccl_reduction red;
    memset(&red, 0xA5, sizeof red); /* an uninitialised struct */
    int32_t rc = lra_nccl_init(&red, NULL, NULL);
    CHECK(rc == cuda_code(), "lra_nccl_init -> %d, want LRA_NCCL_ERR_CUDA + %d = %d", (int)rc,
          (int)no_device, (int)cuda_code());
    CHECK(red.device == NULL && red.host == NULL,
          "a failed lra_nccl_init must leave no buffer behind (device %p, host %p)",
          (void *)red.device, (void *)red.host);
    CHECK(red.timeout_s == 0 && red.timed_out == 0,
          "a failed lra_nccl_init must still set timeout_s = 0 and timed_out = 0 (got %g, %d)",
          red.timeout_s, (int)red.timed_out);
    lra_nccl_free(&red);
    lra_nccl_free(&red); /* twice: still safe */
    CHECK(red.device == NULL && red.host == NULL, "lra_nccl_free changed the struct");
    printf("  lra_nccl_init -> %d (LRA_NCCL_ERR_CUDA + %s), buffers NULL, lra_nccl_free safe\n",
           (int)rc, cudaGetErrorName(no_device));

    /* The callback registered anyway, on the struct the failed init left:
       it must refuse (LRA_NCCL_ERR_INIT) instead of writing through the NULL
       staging pointer, and lra_step must fail with it and change nothing. */
    {
        float theta[N], grad[N], before[N];
        for (int k = 0; k < N; k++)
            theta[k] = before[k] = (float)(0.1 * k);
        lra_tensor t = {theta, grad, N, LRA_DTYPE_F32, 0};
        lra_handle *h = make_handle(LRA_DEVICE_HOST, LRA_SHARDING_SHARDED, 1, 1,
                                    lra_nccl_allreduce_sum, &red);
        const lra_status st = lra_step(h, &t, 1, loss_and_grad(theta, grad), 0.0, NULL);
        expect_reduction_failed(h, st, "lra_step after a failed lra_nccl_init",
                                LRA_NCCL_ERR_INIT);
        char want[48];
        snprintf(want, sizeof want, "callback returned %d", LRA_NCCL_ERR_INIT);
        CHECK(strstr(lra_last_error(h), want) != NULL,
              "the message should name LRA_NCCL_ERR_INIT: \"%s\"", lra_last_error(h));
        lra_counters c;
        CHECK(lra_get_counters(h, &c) == LRA_OK && c.steps == 0 &&
                  memcmp(theta, before, sizeof theta) == 0,
              "the refused step changed the counters or the parameters");
        lra_destroy(h);
    }

    /* ---- creating a communicator without a device ---- */
    ncclUniqueId id;
    ncclResult_t n = ncclGetUniqueId(&id);
    /* Its bootstrap needs a network interface (loopback will do), no GPU:
       without one (an isolated network namespace) it answers
       ncclInvalidUsage, "no socket interface found". That alone skips;
       any other failure (a wheel of another ABI, a system error) fails. */
    CHECK(n == ncclSuccess ||
              (n == ncclInvalidUsage && strstr(ncclGetLastError(NULL), "interface") != NULL),
          "ncclGetUniqueId -> %d (%s): \"%s\"", (int)n, ncclGetErrorString(n),
          ncclGetLastError(NULL));
    if (n != ncclSuccess) {
        printf("\n!!!! SKIPPED: ncclGetUniqueId -> %d (%s): \"%s\": no network interface, "
               "ncclCommInitRank not tried !!!!\n",
               (int)n, ncclGetErrorString(n), ncclGetLastError(NULL));
    } else {
        ncclComm_t comm = NULL;
        n = ncclCommInitRank(&comm, 1, id, 0);
        const char *why = ncclGetLastError(NULL);
        CHECK(n == ncclUnhandledCudaError,
              "ncclCommInitRank -> %d (%s), want ncclUnhandledCudaError", (int)n,
              ncclGetErrorString(n));
        CHECK(strstr(why, cudaGetErrorString(no_device)) != NULL,
              "ncclGetLastError should name the CUDA error \"%s\": \"%s\"",
              cudaGetErrorString(no_device), why);
        CHECK(comm == NULL, "a failed ncclCommInitRank handed out a communicator");
        printf("  ncclGetUniqueId -> 0; ncclCommInitRank -> %d (\"%s\"; last error \"%s\")\n",
               (int)n, ncclGetErrorString(n), why);
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0; /* a non-blocking communicator fails the same way, at once */
        n = ncclCommInitRankConfig(&comm, 1, id, 0, &config);
        CHECK(n == ncclUnhandledCudaError && comm == NULL,
              "non-blocking ncclCommInitRankConfig -> %d (%s), comm %p", (int)n,
              ncclGetErrorString(n), (void *)comm);
        printf("  non-blocking ncclCommInitRankConfig -> %d\n", (int)n);
    }

    /* ---- the callback's calls ----
       No pinned memory without a driver: plain host memory stands in for the
       staging buffer, so that the callback gets as far as CUDA. There is no
       communicator (NULL) and the stream is the legacy default one. */
    double *staging = malloc(LRA_NCCL_STAGING_VALUES_ * sizeof(double));
    CHECK(staging != NULL, "out of memory");
    red.host = staging;
    /* A non-NULL stand-in for the device buffer (the callback refuses NULL
       ones); never dereferenced: the first CUDA call fails. */
    static double device_stand_in[LRA_NCCL_STAGING_VALUES_];
    red.device = device_stand_in;
    /* Waiting on the stream, and the communicator's state polled meanwhile. */
    const int32_t wait_rc = lra_nccl_wait_(&red, NULL);
    CHECK(wait_rc == cuda_code(), "waiting on the stream (cudaStreamQuery) -> %d, want %d",
          (int)wait_rc, (int)cuda_code());
    int in_progress = -1;
    rc = lra_nccl_async_error_(&red, &in_progress);
    CHECK(rc == LRA_NCCL_ERR_NCCL + ncclInvalidArgument,
          "ncclCommGetAsyncError(NULL) -> callback code %d, want LRA_NCCL_ERR_NCCL + "
          "ncclInvalidArgument = %d",
          (int)rc, LRA_NCCL_ERR_NCCL + ncclInvalidArgument);
    printf("  stream wait -> %d, communicator state of no communicator -> %d (%s)\n",
           (int)wait_rc, (int)rc, ncclGetErrorString(ncclInvalidArgument));
    /* The callback: the first copy to the device fails, the values stay. */
    double values[3] = {1.5, -2.0, 0.25};
    rc = lra_nccl_allreduce_sum(values, 3, &red);
    CHECK(rc == cuda_code(), "lra_nccl_allreduce_sum -> %d, want %d", (int)rc, (int)cuda_code());
    CHECK(values[0] == 1.5 && values[1] == -2.0 && values[2] == 0.25,
          "a failed callback changed its values");
    /* With a deadline: the same error at once, not a timeout. */
    red.timeout_s = 30;
    rc = lra_nccl_allreduce_sum(values, 3, &red);
    CHECK(rc == cuda_code() && red.timed_out == 0 && values[0] == 1.5 && values[1] == -2.0 &&
              values[2] == 0.25,
          "with timeout_s = 30: lra_nccl_allreduce_sum -> %d (timed_out %d), want %d", (int)rc,
          (int)red.timed_out, (int)cuda_code());
    red.timeout_s = 0;
    double many[LRA_NCCL_MAX_VALUES + 1] = {0};
    CHECK(lra_nccl_allreduce_sum(many, LRA_NCCL_MAX_VALUES + 1, &red) == LRA_NCCL_ERR_COUNT,
          "more than LRA_NCCL_MAX_VALUES values must fail with LRA_NCCL_ERR_COUNT");
    printf("  lra_nccl_allreduce_sum -> %d; %d values -> %d (LRA_NCCL_ERR_COUNT)\n", (int)rc,
           LRA_NCCL_MAX_VALUES + 1, LRA_NCCL_ERR_COUNT);
    /* The agreement check shares the callback's path: the same code. */
    lra_handle *plain = make_handle(LRA_DEVICE_HOST, LRA_SHARDING_REPLICATED, 0, 0, NULL, NULL);
    rc = lra_nccl_check_agreement(plain, &red);
    CHECK(rc == cuda_code() && red.timed_out == 0, "lra_nccl_check_agreement -> %d, want %d",
          (int)rc, (int)cuda_code());
    lra_destroy(plain);
    /* The codes decoded by the real libraries' own texts. */
    CHECK(strcmp(lra_nccl_error_string(cuda_code()), cudaGetErrorString(no_device)) == 0 &&
              strcmp(lra_nccl_error_string(LRA_NCCL_ERR_NCCL + ncclInvalidArgument),
                     ncclGetErrorString(ncclInvalidArgument)) == 0,
          "lra_nccl_error_string(%d) = \"%s\", want cudaGetErrorString's \"%s\"",
          (int)cuda_code(), lra_nccl_error_string(cuda_code()), cudaGetErrorString(no_device));
    printf("  lra_nccl_check_agreement -> %d; lra_nccl_error_string(%d) = \"%s\", (%d) = \"%s\"\n",
           (int)rc, (int)cuda_code(), lra_nccl_error_string(cuda_code()),
           LRA_NCCL_ERR_NCCL + ncclInvalidArgument,
           lra_nccl_error_string(LRA_NCCL_ERR_NCCL + ncclInvalidArgument));

    /* ---- through lra ---- */
    float theta[N], grad[N], before[N];
    for (int k = 0; k < N; k++)
        theta[k] = before[k] = (float)(0.1 * k);
    lra_tensor t = {theta, grad, N, LRA_DTYPE_F32, 0};
    double lr;
    lra_counters c;

    /* Rank-local losses: lra_step reduces [f_i, 1] first. */
    lra_handle *local = make(LRA_SHARDING_SHARDED, 1, 1, &red);
    expect_reduction_failed(local, lra_step(local, &t, 1, loss_and_grad(theta, grad), 0.0, NULL),
                            "lra_step (rank-local loss)", cuda_code());
    CHECK(lra_get_lr(local, &lr) == LRA_OK && lr == 0.01, "η changed: %.17g", lr);
    CHECK(lra_get_counters(local, &c) == LRA_OK && c.steps == 0, "the failed step was counted");
    CHECK(memcmp(theta, before, sizeof theta) == 0, "parameters changed");
    lra_destroy(local);

    /* Sharded, fused, guard off: lra_step makes no collective, the
       re-evaluation sums φ. */
    lra_handle *sharded = make(LRA_SHARDING_SHARDED, 0, 0, &red);
    CHECK(lra_step(sharded, &t, 1, loss_and_grad(theta, grad), 0.0, NULL) == LRA_OK,
          "lra_step (sharded, fused, no collective): %s", lra_last_error(sharded));
    const double f_plus = loss_and_grad(theta, NULL);
    for (int attempt = 0; attempt < 2; attempt++) /* the pending step stays */
        expect_reduction_failed(sharded, lra_report_reeval(sharded, f_plus, NULL),
                                "lra_report_reeval (sharded φ)", cuda_code());
    CHECK(lra_get_lr(sharded, &lr) == LRA_OK && lr == 0.01, "η changed: %.17g", lr);
    CHECK(lra_get_counters(sharded, &c) == LRA_OK && c.steps == 1 && c.reevals == 0,
          "counters after the failed re-evaluations: %llu steps, %llu re-evaluations",
          (unsigned long long)c.steps, (unsigned long long)c.reevals);
    lra_destroy(sharded);

    free(staging);
    red.host = NULL;
    red.device = NULL;
    lra_nccl_free(&red);
    printf("nccl adapter against real NCCL %d.%d.%d and CUDA runtime %d without a device: "
           "init -> %d, callback -> %d, lra_step and lra_report_reeval -> "
           "LRA_REDUCTION_FAILED; the collective itself not run (no GPU)\n",
           NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH, runtime_version, (int)cuda_code(), (int)cuda_code());
    return 0;
}
