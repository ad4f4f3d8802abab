/* bindings/nccl/lra_nccl.h against the stub CUDA runtime and one-rank NCCL
 * in tests/nccl/stub: the header compiles against the real APIs' signatures,
 * lra_nccl_init refuses a current device other than the communicator's,
 * the callback stages values on the communicator and stream it was given
 * and reports errors as documented, and a sharded handle with rank-local
 * losses driven through it on one rank takes exactly the steps of a handle
 * without any reduction, also on a non-blocking communicator and a busy
 * stream. A failed peer (an asynchronous NCCL error while the collective
 * can never finish) must end the call with an error, not hang it. The
 * callback registered on the struct a failed lra_nccl_init left, or with
 * NULL, must fail (LRA_NCCL_ERR_INIT), not crash. Real NCCL
 * and CUDA are exercised, without a GPU, by lra_nccl_real_test.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lra_nccl.h"
#include "nccl_test_support.h"
#include "stub_controls.h"

enum { STEPS = 12 };

static lra_handle *make(int sharded)
{
    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_ADAM);
    cfg.lr = 0.01;
    if (sharded) {
        cfg.sharding = LRA_SHARDING_SHARDED;
        cfg.loss_is_rank_local = 1;
    }
    lra_handle *h = NULL;
    CHECK(lra_create(&cfg, &h) == LRA_OK, "lra_create: %s", lra_thread_last_error());
    return h;
}

static void step(lra_handle *h, float *theta, float *grad, lra_reeval_info *info)
{
    lra_tensor t = {theta, grad, N, LRA_DTYPE_F32};
    double f = loss_and_grad(theta, grad);
    CHECK(lra_step(h, &t, 1, f, 0.0, NULL) == LRA_OK, "lra_step: %s", lra_last_error(h));
    CHECK(lra_report_reeval(h, loss_and_grad(theta, NULL), info) == LRA_OK,
          "lra_report_reeval: %s", lra_last_error(h));
}

int main(void)
{
    /* Distinct non-null handles: the stub counts calls that pass others. */
    static int comm_object, stream_object;
    stub_comm = (ncclComm_t)(void *)&comm_object;
    stub_stream = (cudaStream_t)(void *)&stream_object;
    lra_nccl_reduction red;
    /* The communicator lives on device 1, device 0 is current: refused,
       nothing allocated. */
    stub_comm_device = 1;
    CHECK(lra_nccl_init(&red, stub_comm, stub_stream) == LRA_NCCL_ERR_DEVICE &&
              stub_cuda_outstanding == 0 && red.device == NULL && red.host == NULL,
          "lra_nccl_init on another device than the communicator's must fail and allocate "
          "nothing");
    stub_current_device = 1;
    CHECK(lra_nccl_init(&red, stub_comm, stub_stream) == 0, "lra_nccl_init failed");
    CHECK(stub_cuda_outstanding == 2, "init should allocate a device and a pinned buffer");

    lra_handle *with = make(1), *without = make(0);
    CHECK(lra_set_reduction(with, lra_nccl_allreduce_sum, &red) == LRA_OK, "%s",
          lra_last_error(with));
    float a[N], ga[N], b[N], gb[N];
    for (int k = 0; k < N; k++)
        a[k] = b[k] = (float)(0.1 * k);
    int changed = 0;
    for (int s = 0; s < STEPS; s++) {
        /* Second half: a non-blocking communicator (ncclAllReduce answers
           ncclInProgress) and a stream still busy when first asked. */
        stub_nccl_enqueue_polls = s < STEPS / 2 ? 0 : 3;
        stub_stream_busy_polls = s < STEPS / 2 ? 0 : 2;
        lra_reeval_info ia, ib;
        step(with, a, ga, &ia);
        step(without, b, gb, &ib);
        CHECK(ia.lr == ib.lr && ia.decision == ib.decision && ia.phi == ib.phi,
              "step %d: through the NCCL callback η %.17g (decision %u, φ %.17g), without "
              "reduction η %.17g (decision %u, φ %.17g)",
              s, ia.lr, ia.decision, ia.phi, ib.lr, ib.decision, ib.phi);
        changed += ia.decision == LRA_DECISION_RAISED || ia.decision == LRA_DECISION_LOWERED;
    }
    CHECK(memcmp(a, b, sizeof a) == 0, "parameters differ from the run without reduction");
    CHECK(changed > 0, "η never changed: the comparison would prove little");
    /* Per step: [f_i, 1], the pre-write [non-finite, found-inf, 0] (guard on),
       and [φ, f+, 1] at the re-evaluation. */
    CHECK(stub_nccl_calls == 3 * STEPS, "%d ncclAllReduce calls, want %d", stub_nccl_calls,
          3 * STEPS);

    stub_nccl_enqueue_polls = 0;

    /* A failing NCCL call surfaces as LRA_REDUCTION_FAILED with the code. */
    double lr_before, lr_after;
    CHECK(lra_get_lr(with, &lr_before) == LRA_OK, "lra_get_lr");
    stub_nccl_fail = ncclRemoteError;
    lra_tensor t = {a, ga, N, LRA_DTYPE_F32};
    lra_status st = lra_step(with, &t, 1, loss_and_grad(a, ga), 0.0, NULL);
    CHECK(st == LRA_REDUCTION_FAILED, "lra_step with a failing ncclAllReduce -> %u (%s)", st,
          lra_status_string(st));
    CHECK(strstr(lra_last_error(with), "2006") != NULL,
          "last error should carry LRA_NCCL_ERR_NCCL + ncclRemoteError: %s",
          lra_last_error(with));
    CHECK(lra_get_lr(with, &lr_after) == LRA_OK && lr_after == lr_before, "η changed");
    CHECK(memcmp(a, b, sizeof a) == 0, "parameters changed although the reduction failed");

    /* A peer failed: the collective never finishes. The wait must end with
       the communicator's asynchronous error (cudaStreamSynchronize would
       block forever), and nothing may change. */
    stub_nccl_async_error = ncclSystemError;
    st = lra_step(with, &t, 1, loss_and_grad(a, ga), 0.0, NULL);
    stub_nccl_async_error = ncclSuccess;
    CHECK(st == LRA_REDUCTION_FAILED, "lra_step with a failed peer -> %u (%s)", st,
          lra_status_string(st));
    CHECK(strstr(lra_last_error(with), "2002") != NULL,
          "last error should carry LRA_NCCL_ERR_NCCL + ncclSystemError: %s",
          lra_last_error(with));
    CHECK(lra_get_lr(with, &lr_after) == LRA_OK && lr_after == lr_before, "η changed");
    CHECK(memcmp(a, b, sizeof a) == 0, "parameters changed although the reduction failed");
    CHECK(stub_wrong_handle == 0,
          "%d CUDA/NCCL calls used another communicator or stream than the one given to "
          "lra_nccl_init, or queued work before a non-blocking enqueue finished",
          stub_wrong_handle);

    /* Too many values: refused before any CUDA call. */
    double many[LRA_NCCL_MAX_VALUES + 1] = {0};
    int calls = stub_nccl_calls;
    CHECK(lra_nccl_allreduce_sum(many, LRA_NCCL_MAX_VALUES + 1, &red) == LRA_NCCL_ERR_COUNT &&
              stub_nccl_calls == calls,
          "an oversized call must fail with LRA_NCCL_ERR_COUNT without calling NCCL");

    /* An unusable `user`: the struct a failed lra_nccl_init left (buffers
       NULL), and NULL itself. The callback must refuse with
       LRA_NCCL_ERR_INIT before any CUDA or NCCL call (it wrote through the
       NULL staging pointer before), and lra_step must return
       LRA_REDUCTION_FAILED naming it and change nothing. */
    lra_nccl_reduction failed;
    stub_current_device = 0; /* the communicator is on device 1 */
    CHECK(lra_nccl_init(&failed, stub_comm, stub_stream) == LRA_NCCL_ERR_DEVICE &&
              failed.device == NULL && failed.host == NULL,
          "lra_nccl_init on the wrong device must fail and leave the buffers NULL");
    stub_current_device = 1;
    double two[2] = {1.5, -2.0};
    calls = stub_nccl_calls;
    const int outstanding = stub_cuda_outstanding;
    CHECK(lra_nccl_allreduce_sum(two, 2, &failed) == LRA_NCCL_ERR_INIT &&
              lra_nccl_allreduce_sum(two, 2, NULL) == LRA_NCCL_ERR_INIT &&
              lra_nccl_allreduce_sum(many, LRA_NCCL_MAX_VALUES + 1, NULL) == LRA_NCCL_ERR_INIT,
          "the callback on a failed init's struct or NULL must return LRA_NCCL_ERR_INIT");
    CHECK(two[0] == 1.5 && two[1] == -2.0 && stub_nccl_calls == calls &&
              stub_cuda_outstanding == outstanding,
          "a refused callback changed its values or called CUDA/NCCL");
    void *const unusable[2] = {&failed, NULL};
    for (int u = 0; u < 2; u++) {
        lra_handle *orphan = make(1);
        CHECK(lra_set_reduction(orphan, lra_nccl_allreduce_sum, unusable[u]) == LRA_OK, "%s",
              lra_last_error(orphan));
        float c[N], gc[N];
        memcpy(c, a, sizeof c);
        lra_tensor tc = {c, gc, N, LRA_DTYPE_F32};
        st = lra_step(orphan, &tc, 1, loss_and_grad(c, gc), 0.0, NULL);
        char want[48];
        snprintf(want, sizeof want, "callback returned %d", LRA_NCCL_ERR_INIT);
        CHECK(st == LRA_REDUCTION_FAILED && strstr(lra_last_error(orphan), want) != NULL,
              "lra_step with the callback's user = %s -> %u (%s): \"%s\", want "
              "LRA_REDUCTION_FAILED naming LRA_NCCL_ERR_INIT (%d)",
              u == 0 ? "a failed init's struct" : "NULL", st, lra_status_string(st),
              lra_last_error(orphan), LRA_NCCL_ERR_INIT);
        lra_counters oc;
        CHECK(lra_get_counters(orphan, &oc) == LRA_OK && oc.steps == 0 &&
                  memcmp(c, a, sizeof c) == 0,
              "a step whose reduction was refused changed the parameters or the counters");
        lra_destroy(orphan);
    }
    lra_nccl_free(&failed);

    lra_destroy(with);
    lra_destroy(without);
    lra_nccl_free(&red);
    CHECK(stub_cuda_outstanding == 0, "lra_nccl_free left %d buffers", stub_cuda_outstanding);
    printf("nccl callback (stub CUDA/NCCL, one rank): %d steps identical to a handle without "
           "reduction (half on a non-blocking communicator and a busy stream), %d ncclAllReduce "
           "calls, failed call and failed peer -> LRA_REDUCTION_FAILED, wrong device refused, "
           "callback after a failed init or with NULL -> LRA_NCCL_ERR_INIT, "
           "LRA_REDUCTION_FAILED\n",
           STEPS, 3 * STEPS);
    return 0;
}
