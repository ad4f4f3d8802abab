/* Plain C / HPC use of lra: every parameter of the model lives in ONE flat
 * float buffer (and every gradient in one more), as many HPC codes keep them,
 * and lra sees that buffer as a single tensor.
 *
 * The model is a linear least-squares fit y ≈ A w + b on synthetic data,
 * trained with minibatch SGD + momentum from a deliberately tiny initial
 * learning rate; lra raises it. Exits non-zero unless the loss falls by
 * a factor of 1000.
 *
 * Build against an installed lra (scripts/install.sh PREFIX):
 *   cc -std=c99 -O2 flat_buffer.c $(pkg-config --cflags --libs lra) -Wl,-rpath,PREFIX/lib -lm
 */
#include <lra.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { FEATURES = 32, SAMPLES = 1024, BATCH = 64, EPOCHS = 40 };
/* Layout of the flat buffer: w[0..FEATURES) then the bias b. */
enum { NPARAMS = FEATURES + 1, BIAS = FEATURES };

static unsigned long long rng_state = 42;
static double uniform(void) { /* deterministic 64-bit LCG, [0, 1) */
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

/* Mean squared error over rows [first, first + count) and, when grad is not
 * NULL, its gradient with respect to the flat parameter buffer. */
static double loss_and_grad(const float *a, const float *y, int first, int count,
                            const float *params, float *grad) {
  double loss = 0.0;
  if (grad)
    for (int j = 0; j < NPARAMS; ++j) grad[j] = 0.0f;
  for (int i = first; i < first + count; ++i) {
    double pred = params[BIAS];
    for (int j = 0; j < FEATURES; ++j) pred += (double)params[j] * a[i * FEATURES + j];
    const double r = pred - y[i];
    loss += r * r / count;
    if (grad) {
      for (int j = 0; j < FEATURES; ++j) grad[j] += (float)(2.0 * r * a[i * FEATURES + j] / count);
      grad[BIAS] += (float)(2.0 * r / count);
    }
  }
  return loss;
}

static int check(lra_status s, const lra_handle *h, const char *what) {
  if (s == 0) return 0;
  fprintf(stderr, "%s failed: %s (%s)\n", what, lra_status_string(s), lra_last_error(h));
  return 1;
}

int main(void) {
  static float a[SAMPLES * FEATURES], y[SAMPLES];
  float params[NPARAMS] = {0}, grad[NPARAMS];
  float truth[NPARAMS];
  for (int j = 0; j < NPARAMS; ++j) truth[j] = (float)(2.0 * uniform() - 1.0);
  for (int i = 0; i < SAMPLES; ++i) {
    double t = truth[BIAS];
    for (int j = 0; j < FEATURES; ++j) {
      a[i * FEATURES + j] = (float)(2.0 * uniform() - 1.0);
      t += truth[j] * a[i * FEATURES + j];
    }
    y[i] = (float)(t + 0.01 * (uniform() - 0.5)); /* a little noise */
  }

  lra_config cfg;
  lra_config_init(&cfg, LRA_OPTIMIZER_MOMENTUM);
  cfg.lr = 1e-5;
  cfg.num_threads = 1;
  lra_handle *h = NULL;
  if (check(lra_create(&cfg, &h), NULL, "lra_create")) return 2;

  /* The whole model is one lra tensor; state is keyed by its position. */
  const lra_tensor flat = {params, grad, NPARAMS, LRA_DTYPE_F32, 0};
  const double first = loss_and_grad(a, y, 0, SAMPLES, params, NULL);
  printf("flat buffer of %d parameters, loss %.6g, lr %.3g\n", NPARAMS, first, cfg.lr);
  for (int epoch = 1; epoch <= EPOCHS; ++epoch) {
    for (int start = 0; start < SAMPLES; start += BATCH) {
      const double loss = loss_and_grad(a, y, start, BATCH, params, grad);
      if (check(lra_step(h, &flat, 1, loss, 0.0, NULL), h, "lra_step")) return 2;
      /* Re-evaluate on the same batch (forward only), then let lra adapt η. */
      const double after = loss_and_grad(a, y, start, BATCH, params, NULL);
      if (check(lra_report_reeval(h, after, NULL), h, "lra_report_reeval")) return 2;
    }
    if (epoch % 10 == 0) {
      double lr = 0.0;
      lra_get_lr(h, &lr);
      printf("epoch %d: loss %.6g, lr %.3g\n", epoch,
             loss_and_grad(a, y, 0, SAMPLES, params, NULL), lr);
    }
  }
  lra_counters c;
  if (check(lra_get_counters(h, &c), h, "lra_get_counters")) return 2;
  const double last = loss_and_grad(a, y, 0, SAMPLES, params, NULL);
  printf("final loss %.6g (%.3g of the initial), %llu steps: %llu raised, %llu lowered\n", last,
         last / first, (unsigned long long)c.steps, (unsigned long long)c.raised,
         (unsigned long long)c.lowered);
  lra_destroy(h);
  if (!(last < 1e-3 * first)) {
    fprintf(stderr, "FAIL: the loss fell only to %.3g of its initial value\n", last / first);
    return 1;
  }
  return 0;
}
