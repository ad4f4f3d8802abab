/* What both NCCL adapter tests share: the failure check and the quadratic
 * they train on. */
#ifndef LRA_NCCL_TEST_SUPPORT_H
#define LRA_NCCL_TEST_SUPPORT_H
#include <stdio.h>
#include <stdlib.h>

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

#endif
