/* The C ABI from C (issue 2, test 4): trains a least-squares model and a
 * softmax classifier through include/lra.h, then walks every error path.
 * Built with -Wall -Wextra -Werror -std=c11 and run under valgrind by
 * scripts/stages/c-abi.sh. Exits non-zero on the first failed check. */
#include "lra.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
      failures++;                                                          \
    }                                                                      \
  } while (0)

/* Expects status `want` from `call` and a non-empty message mentioning `needle`. */
#define EXPECT_ERR(h, call, want, needle)                                  \
  do {                                                                     \
    lra_status s_ = (call);                                                \
    const char *m_ = lra_last_error(h);                                    \
    CHECK(s_ == (want), "%s -> %u (%s), want %u; message: %s", #call,      \
          (unsigned)s_, lra_status_string(s_), (unsigned)(want), m_);      \
    CHECK(m_ && strstr(m_, (needle)), "%s: message '%s' lacks '%s'",       \
          #call, m_ ? m_ : "(null)", (needle));                            \
  } while (0)

#define OK(h, call)                                                        \
  do {                                                                     \
    lra_status s_ = (call);                                                \
    CHECK(s_ == LRA_OK, "%s -> %u: %s", #call, (unsigned)s_,               \
          lra_last_error(h));                                              \
  } while (0)

/* ---- a least-squares problem: minimise 0.5/N * |A x - b|^2 ---- */
enum { N = 64, D = 8 };
static float A[N][D], B[N];

static double ls_loss(const float *x, float *grad) {
  double loss = 0.0;
  if (grad) memset(grad, 0, D * sizeof(float));
  for (int i = 0; i < N; i++) {
    double r = -B[i];
    for (int j = 0; j < D; j++) r += (double)A[i][j] * x[j];
    loss += 0.5 * r * r / N;
    if (grad)
      for (int j = 0; j < D; j++) grad[j] += (float)(r * A[i][j] / N);
  }
  return loss;
}

static lra_handle *make(uint32_t optimizer, double lr) {
  lra_config cfg;
  lra_config_init(&cfg, optimizer);
  cfg.lr = lr;
  lra_handle *h = NULL;
  lra_status s = lra_create(&cfg, &h);
  CHECK(s == LRA_OK && h, "lra_create: %s", lra_thread_last_error());
  return h;
}

static void train_least_squares(uint32_t optimizer) {
  lra_handle *h = make(optimizer, 1e-4);
  float x[D] = {0}, g[D];
  lra_tensor t = {x, g, D, LRA_DTYPE_F32, 0};
  double first = ls_loss(x, NULL), loss = first;
  for (int step = 0; step < 300; step++) {
    loss = ls_loss(x, g);
    OK(h, lra_step(h, &t, 1, loss, 0.0, NULL));
    lra_reeval_info info;
    OK(h, lra_report_reeval(h, ls_loss(x, NULL), &info));
    CHECK(info.lr > 0 && isfinite(info.lr), "lr %g", info.lr);
  }
  double lr;
  OK(h, lra_get_lr(h, &lr));
  lra_counters c;
  OK(h, lra_get_counters(h, &c));
  CHECK(c.steps == 300 && c.applied == 300 && c.reevals == 300, "counters %llu %llu %llu",
        (unsigned long long)c.steps, (unsigned long long)c.applied, (unsigned long long)c.reevals);
  CHECK(c.raised > 0, "eta never raised from 1e-4");
  CHECK(loss < 1e-3 * first, "optimizer %u: loss %g from %g (final eta %g)", optimizer, loss, first, lr);
  printf("least squares, optimizer %u: loss %.3e -> %.3e, eta 1e-4 -> %.3e (raised %llu, lowered %llu)\n",
         optimizer, first, loss, lr, (unsigned long long)c.raised, (unsigned long long)c.lowered);
  lra_destroy(h);
}

static void checkpoint_roundtrip(void) {
  lra_handle *a = make(LRA_OPTIMIZER_ADAM, 1e-2), *b = make(LRA_OPTIMIZER_ADAM, 1e-2);
  float xa[D] = {0}, xb[D], g[D];
  lra_tensor ta = {xa, g, D, LRA_DTYPE_F32, 0}, tb = {xb, g, D, LRA_DTYPE_F32, 0};
  for (int k = 0; k < 5; k++) {
    OK(a, lra_step(a, &ta, 1, ls_loss(xa, g), 0.0, NULL));
    OK(a, lra_report_reeval(a, ls_loss(xa, NULL), NULL));
  }
  size_t size = 0, written = 0;
  OK(a, lra_state_size(a, &size));
  unsigned char *buf = malloc(size);
  EXPECT_ERR(a, lra_save_state(a, buf, size - 1, &written), LRA_BUFFER_TOO_SMALL, "needs");
  OK(a, lra_save_state(a, buf, size, &written));
  CHECK(written == size, "written %zu of %zu", written, size);
  OK(b, lra_load_state(b, buf, size));
  memcpy(xb, xa, sizeof xa);
  for (int k = 0; k < 5; k++) {
    OK(a, lra_step(a, &ta, 1, ls_loss(xa, g), 0.0, NULL));
    OK(a, lra_report_reeval(a, ls_loss(xa, NULL), NULL));
    OK(b, lra_step(b, &tb, 1, ls_loss(xb, g), 0.0, NULL));
    OK(b, lra_report_reeval(b, ls_loss(xb, NULL), NULL));
  }
  CHECK(memcmp(xa, xb, sizeof xa) == 0, "resumed run differs");
  /* Another optimizer's checkpoint is rejected and changes nothing. */
  lra_handle *sgd = make(LRA_OPTIMIZER_SGD, 1e-2);
  EXPECT_ERR(sgd, lra_load_state(sgd, buf, size), LRA_BAD_CHECKPOINT, "optimizer");
  buf[size / 2] ^= 0x40;
  EXPECT_ERR(b, lra_load_state(b, buf, size), LRA_BAD_CHECKPOINT, "checksum");
  EXPECT_ERR(b, lra_load_state(b, NULL, size), LRA_NULL_POINTER, "buf");
  free(buf);
  lra_destroy(a);
  lra_destroy(b);
  lra_destroy(sgd);
}

static void error_paths(void) {
  lra_config cfg;
  lra_handle *h = NULL;

  /* lra_create: null pointers, bad enums, bad values, struct_size. */
  lra_config_init(&cfg, LRA_OPTIMIZER_ADAM);
  CHECK(lra_create(NULL, &h) == LRA_NULL_POINTER && h == NULL, "create(NULL cfg)");
  CHECK(strstr(lra_thread_last_error(), "cfg"), "%s", lra_thread_last_error());
  CHECK(lra_create(&cfg, NULL) == LRA_NULL_POINTER, "create(NULL out)");
  lra_config c2;
#define REJECT(field_name, statement)                                           \
  do {                                                                          \
    lra_config_init(&c2, LRA_OPTIMIZER_ADAM);                                    \
    statement;                                                                  \
    lra_handle *hh = (lra_handle *)0x1;                                          \
    lra_status s = lra_create(&c2, &hh);                                         \
    CHECK(s == LRA_INVALID_CONFIG && hh == NULL, "%s: status %u", #statement, s); \
    CHECK(strstr(lra_thread_last_error(), field_name), "%s: message '%s'",      \
          #statement, lra_thread_last_error());                                  \
  } while (0)
  REJECT("optimizer", c2.optimizer = 7);
  REJECT("device", c2.device = 2);
  REJECT("lr", c2.lr = -1.0);
  REJECT("lr", c2.lr = NAN);
  REJECT("beta1", c2.beta1 = 1.0);
  REJECT("beta2", c2.beta2 = -0.1);
  REJECT("eps", c2.eps = 0.0);
  REJECT("momentum", c2.momentum = 2.0);
  REJECT("weight_decay", c2.weight_decay = -1.0);
  REJECT("f_star", c2.f_star = INFINITY);
  REJECT("factor_up", c2.factor_up = 0.9);
  REJECT("factor_down", c2.factor_down = 1.5);
  REJECT("threshold_up", c2.threshold_up = 0.5);
  REJECT("lr_max", c2.lr_max = 1e-6);
  REJECT("scale_max", c2.scale_max = 0.0);
  REJECT("check_finite", c2.check_finite = 3);
  REJECT("reeval_schedule", c2.reeval_schedule = 9);
  REJECT("reeval_every", (c2.reeval_schedule = LRA_REEVAL_EVERY, c2.reeval_every = 0));
  REJECT("sharding", c2.sharding = 5);
  REJECT("struct_size", c2.struct_size = 8);
  REJECT("device_ordinal", (c2.device = LRA_DEVICE_CUDA, c2.device_ordinal = -1));

  h = make(LRA_OPTIMIZER_ADAM, 1e-2);
  float x[D] = {0}, g[D] = {0}, y[3] = {0}, gy[3] = {0};
  lra_tensor t[2] = {{x, g, D, LRA_DTYPE_F32, 0}, {y, gy, 3, LRA_DTYPE_F32, 0}};
  double lr;

  /* Null handle / null outputs. */
  CHECK(lra_step(NULL, t, 2, 1.0, 0.0, NULL) == LRA_NULL_POINTER, "step(NULL)");
  CHECK(strstr(lra_last_error(NULL), "handle"), "%s", lra_last_error(NULL));
  CHECK(lra_get_lr(NULL, &lr) == LRA_NULL_POINTER, "get_lr(NULL)");
  EXPECT_ERR(h, lra_get_lr(h, NULL), LRA_NULL_POINTER, "lr");
  EXPECT_ERR(h, lra_step(h, NULL, 2, 1.0, 0.0, NULL), LRA_NULL_POINTER, "tensors");
  lra_tensor nullparam = {NULL, g, D, LRA_DTYPE_F32, 0};
  EXPECT_ERR(h, lra_step(h, &nullparam, 1, 1.0, 0.0, NULL), LRA_NULL_POINTER, "param");
  lra_tensor nullgrad = {x, NULL, D, LRA_DTYPE_F32, 0};
  EXPECT_ERR(h, lra_step(h, &nullgrad, 1, 1.0, 0.0, NULL), LRA_NULL_POINTER, "grad");

  /* Bad enum values, misalignment, aliasing, bad scalars. */
  lra_tensor baddtype = {x, g, D, 3, 0};
  EXPECT_ERR(h, lra_step(h, &baddtype, 1, 1.0, 0.0, NULL), LRA_INVALID_ARGUMENT, "dtype");
  lra_tensor reserved[2] = {{x, g, D, LRA_DTYPE_F32, 0}, {y, gy, 3, LRA_DTYPE_F32, 1}};
  EXPECT_ERR(h, lra_step(h, reserved, 2, 1.0, 0.0, NULL), LRA_INVALID_ARGUMENT, "tensors[1].reserved");
  lra_tensor misaligned = {(char *)x + 1, g, 4, LRA_DTYPE_F32, 0};
  EXPECT_ERR(h, lra_step(h, &misaligned, 1, 1.0, 0.0, NULL), LRA_INVALID_ARGUMENT, "aligned");
  lra_tensor aliased = {x, x, D, LRA_DTYPE_F32, 0};
  EXPECT_ERR(h, lra_step(h, &aliased, 1, 1.0, 0.0, NULL), LRA_INVALID_ARGUMENT, "overlaps");
  EXPECT_ERR(h, lra_step(h, t, 2, 1.0, -0.5, NULL), LRA_INVALID_ARGUMENT, "obs_var");
  EXPECT_ERR(h, lra_step(h, t, 2, 1.0, 0.0, (void *)t), LRA_INVALID_ARGUMENT, "stream");
  EXPECT_ERR(h, lra_set_lr(h, -1.0), LRA_INVALID_ARGUMENT, "lr");
  EXPECT_ERR(h, lra_set_lr(h, INFINITY), LRA_INVALID_ARGUMENT, "lr");

  /* Call order. */
  lra_reeval_info info;
  EXPECT_ERR(h, lra_report_reeval(h, 1.0, &info), LRA_CALL_ORDER, "pending");
  uint32_t due;
  EXPECT_ERR(h, lra_should_reeval(h, &due), LRA_CALL_ORDER, "step");
  EXPECT_ERR(h, lra_get_last_reeval(h, &info), LRA_CALL_ORDER, "re-evaluation");
  /* A NULL output is refused as such whatever the handle's state. */
  EXPECT_ERR(h, lra_get_last_reeval(h, NULL), LRA_NULL_POINTER, "out");
  EXPECT_ERR(h, lra_should_reeval(h, NULL), LRA_NULL_POINTER, "out");

  /* None of the failures above changed anything. */
  lra_counters c;
  OK(h, lra_get_counters(h, &c));
  CHECK(c.steps == 0, "steps %llu after failed calls", (unsigned long long)c.steps);
  OK(h, lra_get_lr(h, &lr));
  CHECK(lr == 1e-2, "lr %g", lr);
  for (int j = 0; j < D; j++) CHECK(x[j] == 0.0f, "x changed");

  /* A good step fixes the layout; then size mismatches are refused. */
  for (int j = 0; j < D; j++) g[j] = 0.5f;
  OK(h, lra_step(h, t, 2, 1.0, 0.0, NULL));
  OK(h, lra_should_reeval(h, &due));
  CHECK(due == 1, "default schedule re-evaluates every step");
  OK(h, lra_report_reeval(h, 0.9, &info));
  EXPECT_ERR(h, lra_report_reeval(h, 0.9, &info), LRA_CALL_ORDER, "pending");
  EXPECT_ERR(h, lra_step(h, t, 1, 1.0, 0.0, NULL), LRA_SIZE_MISMATCH, "first step");
  lra_tensor wrong[2] = {{x, g, D - 1, LRA_DTYPE_F32, 0}, {y, gy, 3, LRA_DTYPE_F32, 0}};
  EXPECT_ERR(h, lra_step(h, wrong, 2, 1.0, 0.0, NULL), LRA_SIZE_MISMATCH, "tensors[0]");

  /* NaN loss: skipped, nothing written, reported. */
  float before[D];
  memcpy(before, x, sizeof x);
  OK(h, lra_step(h, t, 2, NAN, 0.0, NULL));
  CHECK(memcmp(before, x, sizeof x) == 0, "NaN loss changed parameters");
  OK(h, lra_report_reeval(h, 0.5, &info));
  CHECK(info.decision == LRA_DECISION_SKIPPED && info.skip_reason == LRA_SKIP_NONFINITE_LOSS,
        "decision %u reason %u", info.decision, info.skip_reason);

  /* NaN gradient: skipped, nothing written, reported. */
  gy[1] = NAN;
  OK(h, lra_step(h, t, 2, 1.0, 0.0, NULL));
  CHECK(memcmp(before, x, sizeof x) == 0, "NaN gradient changed parameters");
  OK(h, lra_report_reeval(h, 0.5, &info));
  CHECK(info.skip_reason == LRA_SKIP_NONFINITE_GRAD, "reason %u", info.skip_reason);
  gy[1] = 0.0f;

  /* found_inf flag (GradScaler style). */
  float found_inf = 1.0f;
  OK(h, lra_step_ex(h, t, 2, 1.0, 0.0, &found_inf, NULL));
  CHECK(memcmp(before, x, sizeof x) == 0, "found_inf step changed parameters");
  OK(h, lra_report_reeval(h, 0.5, &info));
  CHECK(info.skip_reason == LRA_SKIP_FOUND_INF, "reason %u", info.skip_reason);
  OK(h, lra_get_counters(h, &c));
  CHECK(c.steps == 4 && c.applied == 1 && c.skipped == 3, "counters %llu/%llu/%llu",
        (unsigned long long)c.steps, (unsigned long long)c.applied, (unsigned long long)c.skipped);

  /* Statuses and version. */
  CHECK(strcmp(lra_status_string(LRA_OK), "ok") == 0, "status string");
  CHECK(strcmp(lra_status_string(9999), "unknown status") == 0, "unknown status string");
  CHECK(lra_version() == 0x000100, "version %x", lra_version());

  /* CUDA on a machine without it is a clean status, never a crash. */
  lra_config_init(&cfg, LRA_OPTIMIZER_SGD);
  cfg.device = LRA_DEVICE_CUDA;
  lra_handle *cuda = NULL;
  lra_status s = lra_create(&cfg, &cuda);
  if (s == LRA_OK) {
    printf("note: a CUDA device is present; CUDA handle created\n");
    lra_destroy(cuda);
  } else {
    CHECK(s == LRA_NO_CUDA || s == LRA_UNSUPPORTED, "CUDA create -> %u: %s", s, lra_thread_last_error());
    CHECK(cuda == NULL, "out not cleared");
    printf("CUDA handle refused as expected here: %s\n", lra_thread_last_error());
  }

  lra_destroy(h);
  lra_destroy(NULL); /* no-op */
}

int main(void) {
  unsigned seed = 12345;
  for (int i = 0; i < N; i++) {
    for (int j = 0; j < D; j++) {
      seed = seed * 1103515245u + 12345u;
      A[i][j] = (float)((seed >> 8) % 2000) / 1000.0f - 1.0f;
    }
  }
  /* A consistent system (minimum 0 at x_true) so progress is measurable. */
  for (int i = 0; i < N; i++) {
    B[i] = 0.0f;
    for (int j = 0; j < D; j++) B[i] += A[i][j] * (float)(j % 3 - 1);
  }
  const uint32_t optimizers[] = {LRA_OPTIMIZER_SGD, LRA_OPTIMIZER_MOMENTUM, LRA_OPTIMIZER_NESTEROV,
                                 LRA_OPTIMIZER_RMSPROP, LRA_OPTIMIZER_ADAM, LRA_OPTIMIZER_ADAMW};
  for (size_t k = 0; k < sizeof optimizers / sizeof *optimizers; k++) train_least_squares(optimizers[k]);
  checkpoint_roundtrip();
  error_paths();
  if (failures) {
    fprintf(stderr, "%d checks failed\n", failures);
    return 1;
  }
  printf("C ABI test: all checks passed\n");
  return 0;
}
