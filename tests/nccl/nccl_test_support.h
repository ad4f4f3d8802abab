/* What the NCCL adapter tests share: the failure check, the quadratic they
 * train on, and (for the tests against the real libraries) handle creation
 * and the expected-failure check. */
#ifndef LRA_NCCL_TEST_SUPPORT_H
#define LRA_NCCL_TEST_SUPPORT_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lra.h"

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum { N = 40 };

/* f(θ) = ½ Σ c_k (θ_k − 1)², gradient c_k (θ_k − 1). */
static inline double loss_and_grad(const float *theta, float *grad)
{
    double f = 0;
    for (int k = 0; k < N; k++) {
        double c = 0.5 + 0.05 * k, r = theta[k] - 1.0;
        f += 0.5 * c * r * r;
        if (grad)
            grad[k] = (float)(c * r);
    }
    return f;
}

/* An Adam handle (η 0.01) on `device` (LRA_DEVICE_HOST or LRA_DEVICE_CUDA,
 * ordinal 0) with `reduce` registered unless it is NULL. */
static inline lra_handle *make_handle(uint32_t device, uint32_t sharding,
                                      uint32_t loss_is_rank_local, uint32_t check_finite,
                                      lra_reduce_fn reduce, void *user)
{
    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_ADAM);
    cfg.device = device;
    cfg.lr = 0.01;
    cfg.sharding = sharding;
    cfg.loss_is_rank_local = loss_is_rank_local;
    cfg.check_finite = check_finite;
    lra_handle *h = NULL;
    CHECK(lra_create(&cfg, &h) == LRA_OK, "lra_create: %s", lra_thread_last_error());
    if (reduce)
        CHECK(lra_set_reduction(h, reduce, user) == LRA_OK, "lra_set_reduction: %s",
              lra_last_error(h));
    return h;
}

/* `st` must be LRA_REDUCTION_FAILED with the callback's `code` in the message. */
static inline void expect_reduction_failed(lra_handle *h, lra_status st, const char *call,
                                           int32_t code)
{
    char text[16];
    snprintf(text, sizeof text, "%d", (int)code);
    CHECK(st == LRA_REDUCTION_FAILED, "%s -> %u (%s), want LRA_REDUCTION_FAILED", call, st,
          lra_status_string(st));
    CHECK(strstr(lra_last_error(h), text) != NULL, "%s: the message should name %s: \"%s\"",
          call, text, lra_last_error(h));
    printf("  %s -> LRA_REDUCTION_FAILED: \"%s\"\n", call, lra_last_error(h));
}

#endif
