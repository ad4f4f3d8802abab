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
 * NULL, must fail (LRA_NCCL_ERR_INIT), not crash. The deadline
 * (`timeout_s`): lra_nccl_init sets no deadline; without one, or with a
 * long one, a long wait still succeeds; a negative or NaN one is refused; a
 * collective a peer never joins (no error from NCCL: the stream just never
 * finishes) and a non-blocking enqueue that never finishes end the call
 * with LRA_NCCL_ERR_TIMEOUT once the deadline has passed, not before,
 * leaving the values (and through lra, η, counters and parameters) as they
 * were; every later call fails at once without calling CUDA or NCCL; then
 * ncclCommAbort, lra_destroy and lra_nccl_free clean up. With pretend peers
 * (the sum is no longer the identity) the callback returns the sums. Each
 * CUDA and NCCL call of lra_nccl_init, and the callback's two copies and
 * its ncclAllReduce, fail in turn: the code comes back as documented,
 * nothing stays allocated, the values are untouched, and a failed
 * collective whose staging copy outlasts the deadline marks the reduction
 * timed out. A long wait sleeps between polls (its duration is at least
 * the sleeps'). A count of 0 is a no-op. lra_nccl_check_agreement sends
 * one ncclMax of 17 values and answers 0 on one rank, and each of its
 * answers with pretend peers (values captured from other handles), with
 * the sum's failure codes. A call made with another device current runs
 * on the communicator's and restores the caller's; a failing cudaGetDevice
 * or cudaSetDevice (either way) returns its code. lra_nccl_error_string
 * names every code. lra_nccl_now_ reads CLOCK_MONOTONIC in seconds. Real
 * NCCL and CUDA are exercised, without a GPU, by lra_nccl_real_test.c.
 *
 * Compiled as strict C11 (no _POSIX_C_SOURCE), where lra_nccl.h declares
 * clock_gettime itself. The test measures on the same monotonic clock as
 * the deadline (the realtime clock may be stepped mid-wait); it asserts only
 * that a call does not return before its deadline: how soon after is
 * printed, not asserted (timings are no pass/fail test; the stage's
 * `timeout` catches a hang). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lra_nccl.h"
#include "nccl_test_support.h"
#include "stub_controls.h"

enum { STEPS = 12 };

/* The deadline's clock, read directly (not through the header's helper). */
static double seconds(void)
{
    struct timespec ts;
    CHECK(clock_gettime(LRA_NCCL_CLOCK_MONOTONIC_, &ts) == 0, "clock_gettime failed");
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Each CUDA or NCCL call of one collective failing in turn (the `skip`-th
   call of `function` fails with `code`), and the code the adapter must
   return; the sum and the agreement check share them. */
static const struct {
    const char *function;
    int skip, code;
    int32_t want;
} CALL_FAILURES[] = {
    {"cudaMemcpyAsync", 0, cudaErrorInvalidValue, LRA_NCCL_ERR_CUDA + cudaErrorInvalidValue},
    {"ncclAllReduce", 0, ncclRemoteError, LRA_NCCL_ERR_NCCL + ncclRemoteError},
    {"cudaMemcpyAsync", 1, cudaErrorLaunchFailure, LRA_NCCL_ERR_CUDA + cudaErrorLaunchFailure},
};

/* A handle re-evaluating every `every`-th step (0: every step). */
static lra_handle *make_every(int sharded, uint32_t every)
{
    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_ADAM);
    cfg.lr = 0.01;
    if (every) {
        cfg.reeval_schedule = LRA_REEVAL_EVERY;
        cfg.reeval_every = every;
    }
    if (sharded) {
        cfg.sharding = LRA_SHARDING_SHARDED;
        cfg.loss_is_rank_local = 1;
    }
    lra_handle *h = NULL;
    CHECK(lra_create(&cfg, &h) == LRA_OK, "lra_create: %s", lra_thread_last_error());
    return h;
}

static lra_handle *make(int sharded) { return make_every(sharded, 0); }

static void step(lra_handle *h, float *theta, float *grad, lra_reeval_info *info)
{
    lra_tensor t = {theta, grad, N, LRA_DTYPE_F32, 0};
    double f = loss_and_grad(theta, grad);
    CHECK(lra_step(h, &t, 1, f, 0.0, NULL) == LRA_OK, "lra_step: %s", lra_last_error(h));
    CHECK(lra_report_reeval(h, loss_and_grad(theta, NULL), info) == LRA_OK,
          "lra_report_reeval: %s", lra_last_error(h));
}

/* A step through `h` must fail with `code` in the message and change
   nothing; returns how long it took. */
static double step_fails(lra_handle *h, const float *a, const char *what, int32_t code)
{
    float c[N], gc[N];
    memcpy(c, a, sizeof c);
    lra_tensor tc = {c, gc, N, LRA_DTYPE_F32, 0};
    double lr_before, lr_after;
    lra_counters c0, c1;
    CHECK(lra_get_lr(h, &lr_before) == LRA_OK && lra_get_counters(h, &c0) == LRA_OK, "queries");
    const double t0 = seconds();
    const lra_status st = lra_step(h, &tc, 1, loss_and_grad(c, gc), 0.0, NULL);
    const double took = seconds() - t0;
    char want[48];
    snprintf(want, sizeof want, "callback returned %d", (int)code);
    CHECK(st == LRA_REDUCTION_FAILED && strstr(lra_last_error(h), want) != NULL,
          "%s: lra_step -> %u (%s): \"%s\", want LRA_REDUCTION_FAILED naming %d", what, st,
          lra_status_string(st), lra_last_error(h), (int)code);
    CHECK(lra_get_lr(h, &lr_after) == LRA_OK && lr_after == lr_before &&
              lra_get_counters(h, &c1) == LRA_OK && c1.steps == c0.steps &&
              memcmp(c, a, sizeof c) == 0,
          "%s: the failed step changed η, the counters or the parameters", what);
    return took;
}

/* The deadline (`timeout_s`); `a`: parameters to start the steps from. */
static void deadline(const float *a)
{
    const double SAMPLES[3] = {1.5, -2.0, 0.25};
    double v[3];
    lra_nccl_reduction r;
    memset(&r, 0xA5, sizeof r); /* an uninitialised struct */
    CHECK(lra_nccl_init(&r, stub_comm, stub_stream) == 0, "lra_nccl_init failed");
    CHECK(r.timeout_s == 0 && r.timed_out == 0,
          "lra_nccl_init must set timeout_s = 0 (no deadline) and timed_out = 0, whatever the "
          "struct held (got %g, %d)",
          r.timeout_s, (int)r.timed_out);

    /* No deadline (0, INFINITY) or a long one: a long wait still succeeds.
       It sleeps after its first polls: at least the 100 µs pauses. */
    const double fine[3] = {0.0, INFINITY, 60.0};
    stub_stream_busy_polls = 3000;
    const double slept =
        (stub_stream_busy_polls - LRA_NCCL_SPIN_POLLS_ - 8) * 1e-9 * LRA_NCCL_MAX_SLEEP_NS_;
    for (int i = 0; i < 3; i++) {
        r.timeout_s = fine[i];
        memcpy(v, SAMPLES, sizeof v);
        const int before = stub_api_calls;
        const double t0 = seconds();
        const int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        const double waited = seconds() - t0;
        CHECK(rc == 0 && memcmp(v, SAMPLES, sizeof v) == 0 && !r.timed_out,
              "timeout_s = %g, a stream busy for %d polls: -> %d (want 0, values unchanged)",
              fine[i], stub_stream_busy_polls, (int)rc);
        CHECK(stub_api_calls - before >= stub_stream_busy_polls,
              "timeout_s = %g: the callback returned without waiting (%d calls)", fine[i],
              stub_api_calls - before);
        CHECK(waited >= slept, "timeout_s = %g: %d polls took %.6f s: it did not sleep between "
              "them (at least %.3f s)", fine[i], stub_stream_busy_polls, waited, slept);
        if (i == 0)
            printf("  a wait of %d polls: %.3f s (at least %.3f s asleep)\n",
                   stub_stream_busy_polls, waited, slept);
    }
    stub_stream_busy_polls = 0;

    /* A negative or NaN deadline: refused before any CUDA or NCCL call. */
    const double bad[2] = {-1.0, NAN};
    for (int i = 0; i < 2; i++) {
        r.timeout_s = bad[i];
        memcpy(v, SAMPLES, sizeof v);
        const int before = stub_api_calls;
        const int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        CHECK(rc == LRA_NCCL_ERR_INIT && stub_api_calls == before &&
                  memcmp(v, SAMPLES, sizeof v) == 0 && !r.timed_out,
              "timeout_s = %g -> %d, %d CUDA/NCCL calls: want LRA_NCCL_ERR_INIT and none",
              bad[i], (int)rc, stub_api_calls - before);
    }

    /* A peer never joins: the collective never completes and NCCL reports
       nothing. The call must end once the deadline has passed, not before,
       and leave its values alone (the running collective scribbled over the
       staging buffers). */
    const double timeout = 0.2;
    r.timeout_s = timeout;
    stub_peer_missing = 1;
    memcpy(v, SAMPLES, sizeof v);
    double t0 = seconds();
    int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
    const double took = seconds() - t0;
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT, "a collective that never completes -> %d, want "
          "LRA_NCCL_ERR_TIMEOUT (%d)", (int)rc, LRA_NCCL_ERR_TIMEOUT);
    CHECK(took >= timeout, "it timed out after %.6f s, before its deadline of %g s", took,
          timeout);
    CHECK(memcmp(v, SAMPLES, sizeof v) == 0, "a timed-out call changed its values");
    CHECK(r.timed_out == 1, "a timed-out call must mark the reduction (timed_out = 1)");
#ifdef LRA_NCCL_CLOCK_DECLARED_HERE_
    const char *clock = "clock_gettime declared by lra_nccl.h (strict ISO C)";
#else
    const char *clock = "clock_gettime from <time.h>";
#endif
    printf("  deadline %g s, a peer that never joins: LRA_NCCL_ERR_TIMEOUT after %.3f s, values "
           "unchanged (%s)\n",
           timeout, took, clock);

    /* Unusable from then on, even with the stream healthy again: at once,
       without calling CUDA or NCCL, directly and through lra. */
    stub_peer_missing = 0;
    const int before = stub_api_calls;
    t0 = seconds();
    rc = lra_nccl_allreduce_sum(v, 3, &r);
    const double again = seconds() - t0;
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT && stub_api_calls == before &&
              memcmp(v, SAMPLES, sizeof v) == 0,
          "the call after a timeout -> %d with %d CUDA/NCCL calls: want LRA_NCCL_ERR_TIMEOUT "
          "at once, none, values unchanged",
          (int)rc, stub_api_calls - before);
    lra_handle *h = make(1);
    CHECK(lra_set_reduction(h, lra_nccl_allreduce_sum, &r) == LRA_OK, "%s", lra_last_error(h));
    step_fails(h, a, "a handle on the timed-out reduction", LRA_NCCL_ERR_TIMEOUT);
    CHECK(stub_api_calls == before, "lra_step on the timed-out reduction called CUDA or NCCL");
    printf("  then: LRA_NCCL_ERR_TIMEOUT at once (%.6f s), no CUDA or NCCL call; lra_step -> "
           "LRA_REDUCTION_FAILED, nothing changed\n",
           again);
    /* The documented recovery: abort (it stops the collective), destroy,
       free. */
    const int aborts = stub_nccl_aborts;
    CHECK(ncclCommAbort(stub_comm) == ncclSuccess && stub_nccl_aborts == aborts + 1, "abort");
    lra_destroy(h);
    lra_nccl_free(&r);
    CHECK(r.device == NULL && r.host == NULL, "lra_nccl_free after a timeout");

    /* Through lra, as a trainer meets it: a fresh reduction, a deadline, and
       (1) a blocking communicator whose collective a peer never joins,
       (2) a non-blocking one whose enqueue never finishes (nothing may be
       queued behind it: the stub counts that as a wrong call). */
    for (int mode = 0; mode < 2; mode++) {
        const char *what = mode == 0 ? "lra_step, blocking communicator, peer missing"
                                     : "lra_step, non-blocking communicator, endless enqueue";
        const double limit = 0.1;
        CHECK(lra_nccl_init(&r, stub_comm, stub_stream) == 0 && !r.timed_out, "init again");
        r.timeout_s = limit;
        lra_handle *g = make(1);
        CHECK(lra_set_reduction(g, lra_nccl_allreduce_sum, &r) == LRA_OK, "%s",
              lra_last_error(g));
        stub_peer_missing = mode == 0;
        stub_nccl_enqueue_polls = mode == 1 ? 1 << 30 : 0;
        const int wrong = stub_wrong_handle;
        const double t = step_fails(g, a, what, LRA_NCCL_ERR_TIMEOUT);
        CHECK(t >= limit, "%s: returned after %.6f s, before its deadline of %g s", what, t,
              limit);
        CHECK(r.timed_out == 1 && stub_wrong_handle == wrong,
              "%s: timed_out %d, %d wrong calls (queued behind the unfinished enqueue?)", what,
              (int)r.timed_out, stub_wrong_handle - wrong);
        stub_peer_missing = 0;
        stub_nccl_enqueue_polls = 0;
        const int calls = stub_api_calls;
        step_fails(g, a, what, LRA_NCCL_ERR_TIMEOUT); /* again: at once */
        CHECK(stub_api_calls == calls, "%s: the next lra_step called CUDA or NCCL", what);
        CHECK(ncclCommAbort(stub_comm) == ncclSuccess, "abort");
        lra_destroy(g);
        lra_nccl_free(&r);
        printf("  %s: deadline %g s -> LRA_REDUCTION_FAILED (LRA_NCCL_ERR_TIMEOUT) after %.3f s, "
               "nothing changed; the next lra_step fails at once\n",
               what, limit, t);
    }
}

/* The deadline's clock: seconds of CLOCK_MONOTONIC, between two reads of
   it (a mistake in the conversion moves it by up to a second). */
static void clock_reads_seconds(void)
{
    for (int i = 0; i < 3; i++) {
        struct timespec t1, t2;
        CHECK(clock_gettime(LRA_NCCL_CLOCK_MONOTONIC_, &t1) == 0, "clock_gettime failed");
        const double now = lra_nccl_now_();
        CHECK(clock_gettime(LRA_NCCL_CLOCK_MONOTONIC_, &t2) == 0, "clock_gettime failed");
        const double lo = (double)t1.tv_sec + (double)t1.tv_nsec / 1e9;
        const double hi = (double)t2.tv_sec + (double)t2.tv_nsec / 1e9;
        CHECK(now >= lo - 1e-6 && now <= hi + 1e-6,
              "lra_nccl_now_() = %.9f s, outside the clock's reads %.9f and %.9f around it", now,
              lo, hi);
    }
}

/* Pretend peers, then each CUDA and NCCL call failing in turn (the stub's
   injected failures). */
static void sums_and_failures(void)
{
    const double SAMPLES[3] = {1.5, -2.0, 0.25};
    double v[3];
    lra_nccl_reduction r;
    const int outstanding = stub_cuda_outstanding;

    /* lra_nccl_init: the code of the call that failed; nothing allocated. */
    const struct {
        const char *function;
        int code;
        int32_t want;
    } init_failures[] = {
        {"cudaGetDevice", cudaErrorNoDevice, LRA_NCCL_ERR_CUDA + cudaErrorNoDevice},
        {"ncclCommCuDevice", ncclInvalidUsage, LRA_NCCL_ERR_NCCL + ncclInvalidUsage},
        {"cudaMalloc", cudaErrorMemoryAllocation, LRA_NCCL_ERR_CUDA + cudaErrorMemoryAllocation},
        {"cudaMallocHost", cudaErrorMemoryAllocation,
         LRA_NCCL_ERR_CUDA + cudaErrorMemoryAllocation},
    };
    for (size_t i = 0; i < sizeof init_failures / sizeof init_failures[0]; i++) {
        stub_fail_function = init_failures[i].function;
        stub_fail_skip = 0;
        stub_fail_code = init_failures[i].code;
        memset(&r, 0xA5, sizeof r);
        const int32_t rc = lra_nccl_init(&r, stub_comm, stub_stream);
        CHECK(stub_fail_function == NULL, "lra_nccl_init never called %s",
              init_failures[i].function);
        CHECK(rc == init_failures[i].want && r.device == NULL && r.host == NULL &&
                  stub_cuda_outstanding == outstanding,
              "lra_nccl_init with %s failing (%d) -> %d, want %d, both buffers NULL and none "
              "left allocated (%d)",
              init_failures[i].function, init_failures[i].code, (int)rc, (int)init_failures[i].want,
              stub_cuda_outstanding - outstanding);
        lra_nccl_free(&r);
    }
    printf("  lra_nccl_init: a failing cudaGetDevice, ncclCommCuDevice, cudaMalloc or "
           "cudaMallocHost -> its code, nothing left allocated\n");

    CHECK(lra_nccl_init(&r, stub_comm, stub_stream) == 0, "lra_nccl_init failed");
    /* Pretend peers (the sum is no longer the identity), on a blocking and a
       non-blocking communicator: the values become the sums. */
    stub_peer_share = 0.5;
    for (int mode = 0; mode < 2; mode++) {
        stub_nccl_enqueue_polls = mode == 0 ? 0 : 3;
        stub_stream_busy_polls = mode == 0 ? 0 : 2;
        memcpy(v, SAMPLES, sizeof v);
        const int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        CHECK(rc == 0 && v[0] == 2.0 && v[1] == -1.5 && v[2] == 0.75,
              "%s communicator, peers adding 0.5: -> %d, values %g %g %g, want 0 and 2 -1.5 0.75",
              mode == 0 ? "blocking" : "non-blocking", (int)rc, v[0], v[1], v[2]);
    }
    stub_nccl_enqueue_polls = 0;
    stub_stream_busy_polls = 0;
    /* No values: an empty collective (a no-op, in NCCL as in the stub). */
    memcpy(v, SAMPLES, sizeof v);
    CHECK(lra_nccl_allreduce_sum(v, 0, &r) == 0 && stub_last_count == 0 &&
              memcmp(v, SAMPLES, sizeof v) == 0,
          "a call with count 0 must succeed and change nothing");

    /* The callback: the code of the call that failed, values untouched, and
       the reduction still usable. */
    for (size_t i = 0; i < sizeof CALL_FAILURES / sizeof CALL_FAILURES[0]; i++) {
        stub_fail_function = CALL_FAILURES[i].function;
        stub_fail_skip = CALL_FAILURES[i].skip;
        stub_fail_code = CALL_FAILURES[i].code;
        memcpy(v, SAMPLES, sizeof v);
        int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        CHECK(stub_fail_function == NULL, "the callback never reached the failing call");
        CHECK(rc == CALL_FAILURES[i].want && memcmp(v, SAMPLES, sizeof v) == 0 && !r.timed_out,
              "%s (call %d of the callback's) failing with %d -> %d, want %d, values unchanged "
              "and not timed out",
              CALL_FAILURES[i].function, CALL_FAILURES[i].skip + 1, CALL_FAILURES[i].code,
              (int)rc, (int)CALL_FAILURES[i].want);
        rc = lra_nccl_allreduce_sum(v, 3, &r);
        CHECK(rc == 0 && v[0] == 2.0 && v[1] == -1.5 && v[2] == 0.75,
              "the call after a failed %s -> %d, values %g %g %g", CALL_FAILURES[i].function,
              (int)rc, v[0], v[1], v[2]);
    }
    stub_peer_share = 0;
    printf("  pretend peers: the sums come back; a failing cudaMemcpyAsync (either way) or "
           "ncclAllReduce -> its code, values unchanged, the next call succeeds\n");

    /* A failed collective whose staging copy does not finish before the
       deadline: the error it had, and the reduction is unusable. */
    r.timeout_s = 0.05;
    stub_stream_busy_polls = 1 << 30;
    stub_fail_function = "ncclAllReduce";
    stub_fail_skip = 0;
    stub_fail_code = ncclRemoteError;
    memcpy(v, SAMPLES, sizeof v);
    int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
    CHECK(rc == LRA_NCCL_ERR_NCCL + ncclRemoteError && r.timed_out == 1 &&
              memcmp(v, SAMPLES, sizeof v) == 0,
          "a failed ncclAllReduce whose copy outlasts the deadline -> %d, timed_out %d: want %d, "
          "timed_out = 1, values unchanged",
          (int)rc, (int)r.timed_out, LRA_NCCL_ERR_NCCL + ncclRemoteError);
    const int calls = stub_api_calls;
    rc = lra_nccl_allreduce_sum(v, 3, &r);
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT && stub_api_calls == calls,
          "the call after it -> %d with %d CUDA/NCCL calls, want LRA_NCCL_ERR_TIMEOUT at once",
          (int)rc, stub_api_calls - calls);
    stub_stream_busy_polls = 0;
    CHECK(ncclCommAbort(stub_comm) == ncclSuccess, "abort");
    lra_nccl_free(&r);
    CHECK(stub_cuda_outstanding == outstanding, "lra_nccl_free left buffers");
    printf("  a failed ncclAllReduce whose copy outlasts the deadline: its code, timed_out = 1, "
           "then LRA_NCCL_ERR_TIMEOUT at once\n");
}

/* One rank's agreement vector as the stub saw it: lra_nccl_check_agreement
   on `h` alone (0 on one rank), its input captured. */
static void agreement_values(lra_handle *h, lra_nccl_reduction *r, double *out)
{
    const int32_t rc = lra_nccl_check_agreement(h, r);
    CHECK(rc == (h ? 0 : LRA_NCCL_QUERY_FAILED) && stub_last_op == ncclMax &&
              stub_last_count == LRA_AGREEMENT_VALUES_,
          "lra_nccl_check_agreement on one rank -> %d (op %d, %zu values)", (int)rc,
          (int)stub_last_op, stub_last_count);
    memcpy(out, stub_last_sent, LRA_AGREEMENT_VALUES_ * sizeof(double));
}

/* lra_nccl_check_agreement: 0 on one rank (blocking and non-blocking, busy
   stream), its 17-value ncclMax on the reduction's comm and stream; each
   answer with pretend peers whose values (captured from other handles) the
   stub's ncclMax folds in; then its failure paths, which are the sum's. */
static void agreement(void)
{
    lra_nccl_reduction r;
    memset(&r, 0xA5, sizeof r);
    CHECK(lra_nccl_init(&r, stub_comm, stub_stream) == 0, "lra_nccl_init failed");
    lra_handle *h = make(1);
    CHECK(lra_set_reduction(h, lra_nccl_allreduce_sum, &r) == LRA_OK, "%s", lra_last_error(h));
    float a[N], ga[N];
    for (int k = 0; k < N; k++)
        a[k] = (float)(0.1 * k);
    lra_reeval_info info;
    for (int s = 0; s < 3; s++)
        step(h, a, ga, &info);
    double lr;
    CHECK(lra_get_lr(h, &lr) == LRA_OK, "lra_get_lr");
    for (int mode = 0; mode < 2; mode++) {
        stub_nccl_enqueue_polls = mode == 0 ? 0 : 3;
        stub_stream_busy_polls = mode == 0 ? 0 : 2;
        const int calls = stub_nccl_calls;
        const int32_t rc = lra_nccl_check_agreement(h, &r);
        CHECK(rc == 0 && stub_nccl_calls == calls + 1 && stub_last_op == ncclMax &&
                  stub_last_count == 17 && stub_last_sent[0] == lr && stub_last_sent[8] == -lr &&
                  stub_last_sent[1] == 3 && stub_last_sent[16] == 0,
              "%s communicator: lra_nccl_check_agreement -> %d, want 0 from one ncclMax of 17 "
              "values [η, steps, ..., −η, ..., failed]",
              mode == 0 ? "blocking" : "non-blocking", (int)rc);
    }
    stub_nccl_enqueue_polls = 0;
    stub_stream_busy_polls = 0;

    /* Pretend peers: a handle like h (agree), one whose η was halved, one a
       step behind, one with a step pending, and one whose queries failed. */
    double peer[5][LRA_AGREEMENT_VALUES_];
    agreement_values(h, &r, peer[0]);
    CHECK(lra_set_lr(h, lr * 0.5) == LRA_OK, "lra_set_lr");
    agreement_values(h, &r, peer[1]);
    CHECK(lra_set_lr(h, lr) == LRA_OK, "lra_set_lr");
    lra_handle *g = make(1);
    CHECK(lra_set_reduction(g, lra_nccl_allreduce_sum, &r) == LRA_OK, "%s", lra_last_error(g));
    float b[N], gb[N];
    for (int k = 0; k < N; k++)
        b[k] = (float)(0.1 * k);
    for (int s = 0; s < 2; s++)
        step(g, b, gb, &info);
    CHECK(lra_set_lr(g, lr) == LRA_OK, "lra_set_lr");
    agreement_values(g, &r, peer[2]);
    lra_tensor tb = {b, gb, N, LRA_DTYPE_F32, 0};
    CHECK(lra_step(g, &tb, 1, loss_and_grad(b, gb), 0.0, NULL) == LRA_OK, "%s", lra_last_error(g));
    lra_counters ch, cg;
    CHECK(lra_get_counters(h, &ch) == LRA_OK && lra_get_counters(g, &cg) == LRA_OK, "counters");
    CHECK(lra_set_lr(g, lr) == LRA_OK, "lra_set_lr");
    agreement_values(g, &r, peer[3]);
    agreement_values(NULL, &r, peer[4]);
    const struct {
        const char *peer;
        int32_t want;
    } answers[5] = {
        {"the same state", 0},
        {"η halved", LRA_NCCL_DISAGREE},
        {"a step behind", LRA_NCCL_DISAGREE},
        {"a step pending (a re-evaluation behind)", LRA_NCCL_DISAGREE},
        {"no handle (queries failed)", LRA_NCCL_QUERY_FAILED},
    };
    for (int i = 0; i < 5; i++) {
        stub_peer_max = peer[i];
        const int32_t rc = lra_nccl_check_agreement(h, &r);
        stub_peer_max = NULL;
        CHECK(rc == answers[i].want, "a pretend peer with %s: lra_nccl_check_agreement -> %d, "
              "want %d", answers[i].peer, (int)rc, (int)answers[i].want);
    }
    lra_destroy(g);

    /* Both with a step pending and the same counters and η, the step due
       for re-evaluation on this rank and not on the peer's (every 2nd
       step): the pending step's due flag alone tells them apart. */
    lra_handle *due = make(1), *not_due = make_every(1, 2);
    double peer_not_due[LRA_AGREEMENT_VALUES_];
    for (int i = 0; i < 2; i++) {
        lra_handle *x = i == 0 ? due : not_due;
        CHECK(lra_set_reduction(x, lra_nccl_allreduce_sum, &r) == LRA_OK, "%s", lra_last_error(x));
        float c[N], gc[N];
        for (int k = 0; k < N; k++)
            c[k] = (float)(0.1 * k);
        step(x, c, gc, &info); /* step 0: due on both */
        lra_tensor tc = {c, gc, N, LRA_DTYPE_F32, 0};
        CHECK(lra_step(x, &tc, 1, loss_and_grad(c, gc), 0.0, NULL) == LRA_OK, "%s",
              lra_last_error(x));
        CHECK(lra_set_lr(x, lr) == LRA_OK, "lra_set_lr");
    }
    uint32_t due_flag[2];
    CHECK(lra_should_reeval(due, &due_flag[0]) == LRA_OK &&
              lra_should_reeval(not_due, &due_flag[1]) == LRA_OK && due_flag[0] == 1 &&
              due_flag[1] == 0,
          "step 1 pending: due %u on an every-step handle, %u on an every-2nd one",
          due_flag[0], due_flag[1]);
    agreement_values(not_due, &r, peer_not_due);
    stub_peer_max = peer_not_due;
    const int32_t rc_due = lra_nccl_check_agreement(due, &r);
    stub_peer_max = NULL;
    CHECK(rc_due == LRA_NCCL_DISAGREE,
          "a pretend peer whose pending step is not due, this rank's due: -> %d, want %d",
          (int)rc_due, LRA_NCCL_DISAGREE);
    lra_destroy(due);
    lra_destroy(not_due);
    printf("  lra_nccl_check_agreement: one ncclMax of 17 values -> 0; pretend peers: the same "
           "state 0, η halved, a step behind or pending, a pending step not due -> "
           "LRA_NCCL_DISAGREE, failed queries -> LRA_NCCL_QUERY_FAILED\n");

    /* Failures: the sum's codes, values and counters of h untouched. */
    const double SAMPLES[3] = {1.5, -2.0, 0.25};
    lra_nccl_reduction failed;
    memset(&failed, 0, sizeof failed);
    const int before = stub_api_calls;
    CHECK(lra_nccl_check_agreement(h, NULL) == LRA_NCCL_ERR_INIT &&
              lra_nccl_check_agreement(h, &failed) == LRA_NCCL_ERR_INIT &&
              stub_api_calls == before,
          "lra_nccl_check_agreement without an initialised reduction must return "
          "LRA_NCCL_ERR_INIT without calling CUDA or NCCL");
    for (size_t i = 0; i < sizeof CALL_FAILURES / sizeof CALL_FAILURES[0]; i++) {
        stub_fail_function = CALL_FAILURES[i].function;
        stub_fail_skip = CALL_FAILURES[i].skip;
        stub_fail_code = CALL_FAILURES[i].code;
        const int32_t rc = lra_nccl_check_agreement(h, &r);
        CHECK(stub_fail_function == NULL && rc == CALL_FAILURES[i].want && !r.timed_out,
              "lra_nccl_check_agreement with %s failing -> %d, want %d",
              CALL_FAILURES[i].function, (int)rc, (int)CALL_FAILURES[i].want);
    }
    stub_nccl_async_error = ncclSystemError;
    int32_t rc = lra_nccl_check_agreement(h, &r);
    stub_nccl_async_error = ncclSuccess;
    CHECK(rc == LRA_NCCL_ERR_NCCL + ncclSystemError,
          "lra_nccl_check_agreement with a failed peer -> %d, want %d", (int)rc,
          LRA_NCCL_ERR_NCCL + ncclSystemError);
    CHECK(lra_nccl_check_agreement(h, &r) == 0, "the call after the failures");
    /* A peer that never joins: the deadline, then unusable for both calls. */
    r.timeout_s = 0.05;
    stub_peer_missing = 1;
    rc = lra_nccl_check_agreement(h, &r);
    stub_peer_missing = 0;
    CHECK(rc == LRA_NCCL_ERR_TIMEOUT && r.timed_out == 1,
          "lra_nccl_check_agreement, a peer missing, deadline 0.05 s -> %d (timed_out %d)",
          (int)rc, (int)r.timed_out);
    const int calls = stub_api_calls;
    double v[3];
    memcpy(v, SAMPLES, sizeof v);
    CHECK(lra_nccl_check_agreement(h, &r) == LRA_NCCL_ERR_TIMEOUT &&
              lra_nccl_allreduce_sum(v, 3, &r) == LRA_NCCL_ERR_TIMEOUT && stub_api_calls == calls,
          "after the timeout both calls must return LRA_NCCL_ERR_TIMEOUT at once");
    lra_counters after;
    CHECK(lra_get_counters(h, &after) == LRA_OK && after.steps == ch.steps &&
              lra_get_lr(h, &lr) == LRA_OK,
          "lra_nccl_check_agreement changed the handle");
    CHECK(ncclCommAbort(stub_comm) == ncclSuccess, "abort");
    lra_destroy(h);
    lra_nccl_free(&r);
    printf("  lra_nccl_check_agreement: no reduction -> LRA_NCCL_ERR_INIT; a failing copy, "
           "collective or peer -> its code; a missing peer -> LRA_NCCL_ERR_TIMEOUT, then both "
           "calls fail at once\n");
}

/* The device: a call made with another device current runs its CUDA and
   NCCL calls on the communicator's and restores the caller's; a failing
   cudaGetDevice, cudaSetDevice or restore -> its code, values unchanged. */
static void device_switch(void)
{
    const double SAMPLES[3] = {1.5, -2.0, 0.25};
    double v[3];
    lra_nccl_reduction r;
    CHECK(lra_nccl_init(&r, stub_comm, stub_stream) == 0 && r.cuda_device == stub_comm_device,
          "lra_nccl_init: cuda_device %d, want the communicator's %d", (int)r.cuda_device,
          stub_comm_device);
    int sets = stub_set_device_calls;
    memcpy(v, SAMPLES, sizeof v);
    CHECK(lra_nccl_allreduce_sum(v, 3, &r) == 0 && stub_set_device_calls == sets,
          "with the communicator's device current the call must not set the device");
    const int caller = stub_comm_device == 0 ? 1 : 0;
    stub_current_device = caller;
    const int wrong = stub_wrong_device;
    for (int mode = 0; mode < 2; mode++) {
        stub_nccl_enqueue_polls = mode == 0 ? 0 : 3;
        stub_stream_busy_polls = mode == 0 ? 0 : 2;
        sets = stub_set_device_calls;
        memcpy(v, SAMPLES, sizeof v);
        const int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        CHECK(rc == 0 && memcmp(v, SAMPLES, sizeof v) == 0 && stub_wrong_device == wrong &&
                  stub_current_device == caller && stub_set_device_calls == sets + 2,
              "device %d current, communicator on %d: -> %d, %d calls on the wrong device, "
              "device %d after (want %d), %d cudaSetDevice calls (want 2)",
              caller, stub_comm_device, (int)rc, stub_wrong_device - wrong, stub_current_device,
              caller, stub_set_device_calls - sets);
    }
    stub_nccl_enqueue_polls = 0;
    stub_stream_busy_polls = 0;
    lra_handle *h = make(0);
    CHECK(lra_nccl_check_agreement(h, &r) == 0 && stub_wrong_device == wrong &&
              stub_current_device == caller,
          "lra_nccl_check_agreement with another device current");
    lra_destroy(h);

    const struct {
        const char *function;
        int skip, code, collectives, device_after;
    } failures[] = {
        {"cudaGetDevice", 0, cudaErrorNoDevice, 0, caller},
        {"cudaSetDevice", 0, cudaErrorInvalidDevice, 0, caller},
        {"cudaSetDevice", 1, cudaErrorInvalidDevice, 1, stub_comm_device}, /* the restore */
    };
    for (size_t i = 0; i < sizeof failures / sizeof failures[0]; i++) {
        stub_current_device = caller;
        stub_fail_function = failures[i].function;
        stub_fail_skip = failures[i].skip;
        stub_fail_code = failures[i].code;
        const int calls = stub_nccl_calls;
        stub_peer_share = 0.5; /* a success would change the values */
        memcpy(v, SAMPLES, sizeof v);
        const int32_t rc = lra_nccl_allreduce_sum(v, 3, &r);
        stub_peer_share = 0;
        CHECK(stub_fail_function == NULL && rc == LRA_NCCL_ERR_CUDA + failures[i].code &&
                  memcmp(v, SAMPLES, sizeof v) == 0 &&
                  stub_nccl_calls == calls + failures[i].collectives &&
                  stub_current_device == failures[i].device_after && !r.timed_out,
              "%s (call %d) failing with %d -> %d (want %d), values %s, %d collectives (want "
              "%d), device %d after (want %d)",
              failures[i].function, failures[i].skip + 1, failures[i].code, (int)rc,
              LRA_NCCL_ERR_CUDA + failures[i].code,
              memcmp(v, SAMPLES, sizeof v) ? "changed" : "unchanged", stub_nccl_calls - calls,
              failures[i].collectives, stub_current_device, failures[i].device_after);
    }
    stub_current_device = stub_comm_device;
    lra_nccl_free(&r);
    printf("  device %d current, communicator on %d: the calls ran on %d, device %d restored; "
           "a failing cudaGetDevice, cudaSetDevice or restore -> its code, values unchanged\n",
           caller, stub_comm_device, stub_comm_device, caller);
}

/* lra_nccl_error_string: every code this header returns has a text. */
static void error_strings(void)
{
    const struct {
        int32_t rc;
        const char *contains;
    } own[] = {
        {0, "success"},
        {LRA_NCCL_ERR_COUNT, "LRA_NCCL_ERR_COUNT"},
        {LRA_NCCL_ERR_DEVICE, "LRA_NCCL_ERR_DEVICE"},
        {LRA_NCCL_ERR_INIT, "LRA_NCCL_ERR_INIT"},
        {LRA_NCCL_ERR_TIMEOUT, "LRA_NCCL_ERR_TIMEOUT"},
        {LRA_NCCL_DISAGREE, "LRA_NCCL_DISAGREE"},
        {LRA_NCCL_QUERY_FAILED, "LRA_NCCL_QUERY_FAILED"},
        {5, "not an lra_nccl.h code"},
        {999, "not an lra_nccl.h code"},
        {-3, "not an lra_nccl.h code"},
        {3000, "not an lra_nccl.h code"},
        {INT32_MIN, "not an lra_nccl.h code"},
    };
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++) {
        const char *text = lra_nccl_error_string(own[i].rc);
        CHECK(text != NULL && strstr(text, own[i].contains) != NULL,
              "lra_nccl_error_string(%d) = \"%s\", want it to contain \"%s\"", (int)own[i].rc,
              text ? text : "(null)", own[i].contains);
    }
    CHECK(lra_nccl_error_string(LRA_NCCL_ERR_CUDA + cudaErrorLaunchFailure) ==
                  cudaGetErrorString(cudaErrorLaunchFailure) &&
              lra_nccl_error_string(LRA_NCCL_ERR_CUDA) == cudaGetErrorString(cudaSuccess) &&
              lra_nccl_error_string(LRA_NCCL_ERR_NCCL + ncclRemoteError) ==
                  ncclGetErrorString(ncclRemoteError) &&
              lra_nccl_error_string(LRA_NCCL_ERR_NCCL + 999) ==
                  ncclGetErrorString((ncclResult_t)999),
          "lra_nccl_error_string must pass 1000+e to cudaGetErrorString and 2000+r to "
          "ncclGetErrorString");
    printf("  lra_nccl_error_string: the adapter's codes by name, 1000+e and 2000+r through "
           "cudaGetErrorString and ncclGetErrorString (\"%s\")\n",
           lra_nccl_error_string(LRA_NCCL_ERR_NCCL + ncclRemoteError));
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
    stub_fail_function = "ncclAllReduce";
    stub_fail_skip = 0;
    stub_fail_code = ncclRemoteError;
    lra_tensor t = {a, ga, N, LRA_DTYPE_F32, 0};
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
    memset(&failed, 0xA5, sizeof failed); /* an uninitialised struct */
    stub_current_device = 0; /* the communicator is on device 1 */
    CHECK(lra_nccl_init(&failed, stub_comm, stub_stream) == LRA_NCCL_ERR_DEVICE &&
              failed.device == NULL && failed.host == NULL && failed.timeout_s == 0 &&
              failed.timed_out == 0,
          "lra_nccl_init on the wrong device must fail, leave the buffers NULL and set "
          "timeout_s = 0, timed_out = 0");
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
        lra_tensor tc = {c, gc, N, LRA_DTYPE_F32, 0};
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

    deadline(a);
    sums_and_failures();
    agreement();
    device_switch();
    error_strings();
    clock_reads_seconds();

    lra_destroy(with);
    lra_destroy(without);
    lra_nccl_free(&red);
    CHECK(stub_cuda_outstanding == 0, "lra_nccl_free left %d buffers", stub_cuda_outstanding);
    CHECK(stub_wrong_handle == 0,
          "%d CUDA/NCCL calls used another communicator or stream, or queued work before a "
          "non-blocking enqueue finished",
          stub_wrong_handle);
    CHECK(stub_wrong_device == 0, "%d copies, stream queries or collectives ran with another "
          "device current than the communicator's", stub_wrong_device);
    printf("nccl callback (stub CUDA/NCCL, one rank): %d steps identical to a handle without "
           "reduction (half on a non-blocking communicator and a busy stream), %d ncclAllReduce "
           "calls, failed call and failed peer -> LRA_REDUCTION_FAILED, wrong device refused, "
           "callback after a failed init or with NULL -> LRA_NCCL_ERR_INIT, "
           "LRA_REDUCTION_FAILED; deadline: a missing peer -> LRA_NCCL_ERR_TIMEOUT, then "
           "unusable\n",
           STEPS, 3 * STEPS);
    return 0;
}
