/* lra over MPI with the real engine (liblra) and the MPI binding
 * (bindings/mpi/lra_mpi.h).
 *
 *   lra_mpi_test MODE OPTIMIZER REF DIGITS_CSV [restart]
 *
 * Run with 1 rank, it trains the whole model and writes its trajectory
 * (per step: η, decision, skip reason, φ, ρ, f_i; then the final parameters)
 * to REF. Run with more ranks, the model is split (data-parallel or sharded)
 * and rank 0 compares its trajectory with REF: η and every decision must be
 * identical, φ, ρ, f_i and the parameters equal within f32 rounding. Every
 * rank checks each step that all ranks hold the same η bit for bit.
 *
 * MODE
 *   dp        replicated data parallel: each rank its slice of the batch,
 *             gradients averaged by this program (MPI_Allreduce of f32),
 *             rank-local losses averaged by lra; re-evaluation every 3rd step.
 *   sharded   multinomial logistic regression on digits, classes (one
 *             tensor each) dealt round-robin to the ranks; the logits are
 *             summed across ranks, so the loss is the same everywhere.
 *             Fused mode. Injects a NaN gradient and a found-inf flag on the
 *             rank owning the last class, and a non-finite loss.
 *   empty     as sharded, but rank 0 owns every class: the other ranks step
 *             with an empty shard (count 0) and must neither hang nor differ.
 *   polyak    least squares y = Aθ*, columns sharded round-robin, f* = 0
 *             known: the two-pass mode (step scale from the reduced φ).
 *   fail      as sharded with rank-local losses (each rank reports the loss
 *             of its slice of the batch); the reduction callback fails on
 *             every rank at chosen calls: each must surface as
 *             LRA_REDUCTION_FAILED on every rank and change nothing, and the
 *             retried run must still match REF. Also a real MPI error under
 *             MPI_ERRORS_RETURN must come back as LRA_REDUCTION_FAILED with
 *             the MPI error code, lra_mpi_set_reduction(h, NULL) must be
 *             refused, and the callback with a NULL user must fail
 *             (LRA_MPI_ERR_NO_COMM), not crash.
 *   polyakfail as polyak with rank-local losses, failing as fail does: the
 *             failed pre-write sum of the two-pass step must change nothing.
 *   poison    (2+ ranks only, REF unused) sharded fused mode with the
 *             non-finite guard off; one rank alone raises found-inf: every
 *             rank must skip the ratio test and keep the same η.
 *
 * With `restart`, every rank checkpoints its handle twice during the run
 * (once while a step awaits its re-evaluation, whose φ is still rank-local
 * in fused sharded mode; once between steps), destroys it, creates a new
 * one, restores the checkpoint and carries on: the run must still match
 * REF written by the uninterrupted 1-rank run. Every multi-rank run also
 * checks lra_mpi_check_agreement: 0 after the run (and after each
 * restart), LRA_MPI_DISAGREE on every rank once one rank alone changes η
 * or only the counters or only the pending step differ, LRA_MPI_QUERY_FAILED
 * when one rank's queries fail.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lra_mpi.h"

static int g_rank, g_size;
static const char *g_optimizer;
static int g_restart; /* checkpoint, recreate and restore the handle mid-run */
enum { RESTART_PENDING = 13, RESTART_BETWEEN = 22 };

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "FAIL [rank %d] %s:%d: ", g_rank, __FILE__, __LINE__);                     \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fprintf(stderr, "\n");                                                                     \
        MPI_Abort(MPI_COMM_WORLD, 1);                                                              \
    } while (0)

#define CHECK_LRA(h, call)                                                                         \
    do {                                                                                           \
        lra_status st_ = (call);                                                                   \
        if (st_ != LRA_OK)                                                                         \
            FAIL("%s -> %u (%s): %s", #call, st_, lra_status_string(st_), lra_last_error(h));      \
    } while (0)

/* ---- data ------------------------------------------------------------- */

enum { FEATURES = 64, CLASSES = 10, ROW = FEATURES + 1 /* W_c and b_c */ };

static float *g_x; /* n × FEATURES, scaled to [0, 1] */
static int *g_y;
static int g_n;

static void load_digits(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        FAIL("cannot open %s", path);
    int cap = 2048;
    g_x = malloc(sizeof(float) * FEATURES * cap);
    g_y = malloc(sizeof(int) * cap);
    g_n = 0;
    for (;;) {
        int v[FEATURES + 1], k;
        for (k = 0; k <= FEATURES; k++)
            if (fscanf(f, k ? ",%d" : "%d", &v[k]) != 1)
                break;
        if (k == 0)
            break;
        if (k != FEATURES + 1 || g_n == cap)
            FAIL("%s: bad row %d", path, g_n);
        for (k = 0; k < FEATURES; k++)
            g_x[g_n * FEATURES + k] = (float)v[k] / 16.0f;
        g_y[g_n++] = v[FEATURES];
    }
    fclose(f);
    if (g_n < 1000)
        FAIL("%s: only %d rows", path, g_n);
}

/* Deterministic pseudo-random numbers (the same on every rank). */
static uint64_t g_lcg = 0x2545F4914F6CDD1DULL;
static double uniform(void)
{
    g_lcg = g_lcg * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(g_lcg >> 11) / 9007199254740992.0;
}

/* ---- run description --------------------------------------------------- */

typedef struct {
    const char *mode;
    int sharded, rank_local_loss, logistic, steps, batch;
    int fail; /* inject failing reductions (modes fail, polyakfail) */
    int inject; /* NaN gradient, found-inf, non-finite loss at fixed steps */
    lra_config cfg;
} run_t;

/* Steps at which faults are injected (inject = 1). */
enum { STEP_NAN_GRAD = 7, STEP_FOUND_INF = 11, STEP_NAN_LOSS = 15 };

/* Which rank owns parameter tensor t (of `count`). */
static int owner(const run_t *r, int t)
{
    if (!r->sharded)
        return g_rank; /* replicated: every rank holds everything */
    if (strcmp(r->mode, "empty") == 0)
        return 0;
    return t % g_size;
}

/* ---- reduction callback with fault injection -------------------------- */

typedef struct {
    MPI_Comm comm;
    long calls;
    long fail_at; /* fail (on every rank, without communicating) at this call */
} reduce_ctx;

static int32_t reduce_cb(double *v, size_t count, void *user)
{
    reduce_ctx *c = user;
    long call = c->calls++;
    if (call == c->fail_at)
        return 7;
    return lra_mpi_allreduce_sum(v, count, &c->comm);
}

/* ---- models -------------------------------------------------------------
 * Parameters live in one array of `count` tensors of `len` floats; a rank
 * touches only the tensors it owns. Every function below computes, for the
 * batch rows [b0, b0 + bn), the loss (mean over the rows this rank reports)
 * and, if grad != NULL, the gradient of the owned tensors. */

typedef struct {
    int count, len;
    float *theta, *grad;
    /* least squares */
    int lsq_rows;
    double *a, *y;
} model_t;

static void model_init(model_t *m, const run_t *r)
{
    if (r->logistic) {
        m->count = CLASSES;
        m->len = ROW;
    } else {
        m->count = 6;
        m->len = 8;
        m->lsq_rows = 96;
        int d = m->count * m->len;
        m->a = malloc(sizeof(double) * m->lsq_rows * d);
        m->y = malloc(sizeof(double) * m->lsq_rows);
        double *star = malloc(sizeof(double) * d);
        for (int j = 0; j < d; j++)
            star[j] = 2.0 * uniform() - 1.0;
        for (int i = 0; i < m->lsq_rows; i++) {
            double s = 0;
            for (int j = 0; j < d; j++) {
                m->a[i * d + j] = 2.0 * uniform() - 1.0;
                s += m->a[i * d + j] * star[j];
            }
            m->y[i] = s;
        }
        free(star);
    }
    m->theta = calloc((size_t)m->count * m->len, sizeof(float));
    m->grad = calloc((size_t)m->count * m->len, sizeof(float));
    if (r->logistic) /* small deterministic start, not 0 (symmetry) */
        for (int i = 0; i < m->count * m->len; i++)
            m->theta[i] = (float)(0.02 * (uniform() - 0.5));
}

/* Rows of the batch whose loss this rank reports: its slice when losses are
 * rank-local (also the rows whose gradient it computes in dp mode). */
static void my_rows(const run_t *r, int bn, int *lo, int *hi)
{
    if (r->rank_local_loss) {
        *lo = bn * g_rank / g_size;
        *hi = bn * (g_rank + 1) / g_size;
    } else {
        *lo = 0;
        *hi = bn;
    }
}

static double logistic(const run_t *r, model_t *m, int b0, int bn, int with_grad)
{
    /* dp: this rank works on its slice only; sharded: on the whole batch,
       its own classes, and the logits are summed over ranks (each entry is
       computed by exactly one rank, the others add 0: exact). */
    int lo = 0, hi = bn;
    if (!r->sharded)
        my_rows(r, bn, &lo, &hi);
    double *z = calloc((size_t)bn * CLASSES, sizeof(double));
    for (int c = 0; c < CLASSES; c++) {
        if (owner(r, c) != g_rank)
            continue;
        const float *w = m->theta + c * ROW;
        for (int i = lo; i < hi; i++) {
            const float *x = g_x + (size_t)((b0 + i) % g_n) * FEATURES;
            double s = w[FEATURES];
            for (int k = 0; k < FEATURES; k++)
                s += (double)w[k] * x[k];
            z[i * CLASSES + c] = s;
        }
    }
    if (r->sharded)
        MPI_Allreduce(MPI_IN_PLACE, z, bn * CLASSES, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    int llo, lhi;
    my_rows(r, bn, &llo, &lhi);
    double loss = 0;
    int grad_rows = hi - lo;
    if (with_grad)
        for (int c = 0; c < CLASSES; c++)
            if (owner(r, c) == g_rank)
                memset(m->grad + c * ROW, 0, sizeof(float) * ROW);
    double *gacc = with_grad ? calloc(CLASSES * ROW, sizeof(double)) : NULL;
    for (int i = lo; i < hi; i++) {
        double mx = -INFINITY, se = 0;
        for (int c = 0; c < CLASSES; c++)
            mx = fmax(mx, z[i * CLASSES + c]);
        for (int c = 0; c < CLASSES; c++)
            se += exp(z[i * CLASSES + c] - mx);
        int label = g_y[(b0 + i) % g_n];
        if (i >= llo && i < lhi)
            loss += mx + log(se) - z[i * CLASSES + label];
        if (!with_grad)
            continue;
        const float *x = g_x + (size_t)((b0 + i) % g_n) * FEATURES;
        for (int c = 0; c < CLASSES; c++) {
            if (owner(r, c) != g_rank)
                continue;
            double dz = (exp(z[i * CLASSES + c] - mx) / se - (c == label)) / grad_rows;
            for (int k = 0; k < FEATURES; k++)
                gacc[c * ROW + k] += dz * x[k];
            gacc[c * ROW + FEATURES] += dz;
        }
    }
    if (with_grad) {
        for (int c = 0; c < CLASSES; c++)
            if (owner(r, c) == g_rank)
                for (int k = 0; k < ROW; k++)
                    m->grad[c * ROW + k] = (float)gacc[c * ROW + k];
        if (!r->sharded && g_size > 1) {
            /* What a data-parallel trainer does: average the gradients. */
            MPI_Allreduce(MPI_IN_PLACE, m->grad, CLASSES * ROW, MPI_FLOAT, MPI_SUM,
                          MPI_COMM_WORLD);
            for (int k = 0; k < CLASSES * ROW; k++)
                m->grad[k] /= (float)g_size;
        }
    }
    free(gacc);
    free(z);
    return loss / (lhi - llo);
}

static double least_squares(const run_t *r, model_t *m, int b0, int bn, int with_grad)
{
    int d = m->count * m->len;
    double *p = calloc((size_t)bn, sizeof(double));
    for (int i = 0; i < bn; i++) {
        const double *a = m->a + (size_t)((b0 + i) % m->lsq_rows) * d;
        for (int t = 0; t < m->count; t++)
            if (owner(r, t) == g_rank)
                for (int k = 0; k < m->len; k++)
                    p[i] += a[t * m->len + k] * m->theta[t * m->len + k];
    }
    MPI_Allreduce(MPI_IN_PLACE, p, bn, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    int llo, lhi; /* the rows whose loss this rank reports */
    my_rows(r, bn, &llo, &lhi);
    double loss = 0;
    for (int i = 0; i < bn; i++) {
        p[i] -= m->y[(b0 + i) % m->lsq_rows]; /* residual */
        if (i >= llo && i < lhi)
            loss += 0.5 * p[i] * p[i];
    }
    if (with_grad)
        for (int t = 0; t < m->count; t++) {
            if (owner(r, t) != g_rank)
                continue;
            for (int k = 0; k < m->len; k++) {
                double g = 0;
                for (int i = 0; i < bn; i++)
                    g += m->a[(size_t)((b0 + i) % m->lsq_rows) * d + t * m->len + k] * p[i];
                m->grad[t * m->len + k] = (float)(g / bn);
            }
        }
    free(p);
    return loss / (lhi - llo);
}

static double model_eval(const run_t *r, model_t *m, int b0, int bn, int with_grad)
{
    return r->logistic ? logistic(r, m, b0, bn, with_grad) : least_squares(r, m, b0, bn, with_grad);
}

/* ---- helpers ------------------------------------------------------------ */

/* Aborts unless every rank passed the same double (bit for bit). */
static void expect_same_everywhere(double v, const char *what, int step)
{
    double lo, hi;
    MPI_Allreduce(&v, &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&v, &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (!(lo == hi || (isnan(lo) && isnan(hi))))
        FAIL("step %d: %s differs across ranks: %.17g .. %.17g", step, what, lo, hi);
}

/* The rank's optimizer checkpoint (η, counters, pending step, state). */
static unsigned char *checkpoint(lra_handle *h, size_t *len)
{
    CHECK_LRA(h, lra_state_size(h, len));
    unsigned char *b = malloc(*len ? *len : 1);
    CHECK_LRA(h, lra_save_state(h, b, *len, NULL));
    return b;
}

/* Calls `fn` with the callback failing at its k-th reduction from now, on
 * every rank; checks the failure surfaced everywhere and changed nothing. */
#define EXPECT_REDUCTION_FAILURE(h, ctx, m, k, call, step)                                         \
    do {                                                                                           \
        size_t n0_, n1_;                                                                           \
        unsigned char *before_ = checkpoint(h, &n0_);                                              \
        size_t pbytes_ = sizeof(float) * (size_t)(m)->count * (m)->len;                            \
        float *pbefore_ = malloc(pbytes_);                                                         \
        memcpy(pbefore_, (m)->theta, pbytes_);                                                     \
        (ctx)->fail_at = (ctx)->calls + (k);                                                       \
        lra_status st_ = (call);                                                                   \
        (ctx)->fail_at = -1;                                                                       \
        expect_same_everywhere((double)st_, "status of a failing reduction", step);                \
        if (st_ != LRA_REDUCTION_FAILED)                                                           \
            FAIL("step %d: %s with a failing callback -> %u (%s), want LRA_REDUCTION_FAILED",      \
                 step, #call, st_, lra_status_string(st_));                                        \
        if (!strstr(lra_last_error(h), "returned 7"))                                              \
            FAIL("step %d: last error does not name the callback's code: %s", step,                \
                 lra_last_error(h));                                                               \
        unsigned char *after_ = checkpoint(h, &n1_);                                               \
        if (n0_ != n1_ || memcmp(before_, after_, n0_) != 0)                                       \
            FAIL("step %d: %s changed the handle's state although its reduction failed", step,     \
                 #call);                                                                           \
        if (memcmp(pbefore_, (m)->theta, pbytes_) != 0)                                            \
            FAIL("step %d: %s changed parameters although its reduction failed", step, #call);     \
        failures_seen++;                                                                           \
        free(before_);                                                                             \
        free(after_);                                                                              \
        free(pbefore_);                                                                            \
    } while (0)

/* ---- the training loop ---------------------------------------------------- */

typedef struct {
    double lr_before, lr, phi, rho, loss;
    unsigned decision, skip;
} record_t;

static int parse_optimizer(const char *s)
{
    const char *names[] = {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"};
    for (int i = 0; i < 7; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    FAIL("unknown optimizer %s", s);
    return -1;
}

static void setup(run_t *r, const char *mode, const char *opt)
{
    memset(r, 0, sizeof *r);
    r->mode = mode;
    r->logistic = 1;
    r->steps = 40;
    r->batch = 64;
    lra_config_init(&r->cfg, (uint32_t)parse_optimizer(opt));
    r->cfg.num_threads = 1;
    r->cfg.lr = r->cfg.optimizer <= LRA_OPTIMIZER_NESTEROV ? 0.05 : 1e-3;
    if (strcmp(mode, "dp") == 0) {
        r->rank_local_loss = 1;
        r->steps = 60;
        r->cfg.lr *= 20; /* start high enough that η also comes down */
        r->cfg.reeval_schedule = LRA_REEVAL_EVERY;
        r->cfg.reeval_every = 2;
    } else if (strcmp(mode, "sharded") == 0 || strcmp(mode, "empty") == 0) {
        r->sharded = 1;
        r->inject = 1;
    } else if (strcmp(mode, "polyak") == 0 || strcmp(mode, "polyakfail") == 0) {
        r->sharded = 1;
        r->logistic = 0;
        r->batch = 16;
        r->cfg.f_star = 0.0;
        r->cfg.scale_max = 1.0e3;
        r->fail = strcmp(mode, "polyakfail") == 0;
        r->inject = !r->fail;
        r->rank_local_loss = r->fail;
        if (r->fail)
            r->steps = 16;
    } else if (strcmp(mode, "fail") == 0) {
        r->sharded = 1;
        r->rank_local_loss = 1;
        r->fail = 1;
        r->steps = 16;
    } else if (strcmp(mode, "poison") == 0) {
        r->sharded = 1;
        r->steps = 8;
        r->cfg.check_finite = 0;
    } else {
        FAIL("unknown mode %s", mode);
    }
    r->cfg.sharding = r->sharded ? LRA_SHARDING_SHARDED : LRA_SHARDING_REPLICATED;
    r->cfg.loss_is_rank_local = (uint32_t)r->rank_local_loss;
}

static int failures_seen;

/* Aborts unless lra_mpi_check_agreement finds every rank in agreement. */
static void expect_agreement(lra_handle *h, const char *when)
{
    const int32_t rc = lra_mpi_check_agreement(h, MPI_COMM_WORLD);
    if (rc != 0)
        FAIL("%s: lra_mpi_check_agreement -> %d, want 0 (ranks agree)", when, rc);
}

static lra_handle *create_handle(const run_t *r, reduce_ctx *ctx)
{
    lra_handle *h = NULL;
    if (lra_create(&r->cfg, &h) != LRA_OK)
        FAIL("lra_create: %s", lra_thread_last_error());
    CHECK_LRA(h, lra_set_reduction(h, reduce_cb, ctx));
    return h;
}

/* What a trainer does on restart: each rank saves its own checkpoint, a
 * new process creates a new handle and restores it. Between steps the
 * restored handle must save the very bytes it loaded (with a step pending
 * it marks the step's outcome as recorded, a flag the original did not
 * set), and all ranks must agree. */
static void restart(const run_t *r, lra_handle **h, reduce_ctx *ctx, int step, int pending)
{
    size_t n, n2;
    unsigned char *saved = checkpoint(*h, &n);
    lra_destroy(*h);
    *h = create_handle(r, ctx);
    CHECK_LRA(*h, lra_load_state(*h, saved, n));
    unsigned char *again = checkpoint(*h, &n2);
    if (!pending && (n != n2 || memcmp(saved, again, n) != 0))
        FAIL("step %d: the restored handle saves other bytes than the checkpoint it loaded", step);
    free(saved);
    free(again);
    expect_agreement(*h, "after restoring the checkpoints");
}

/* Trains; returns the per-step records (rank 0's view) and leaves the final
 * parameters in m->theta (owned tensors only). *hp may be replaced (restart). */
static record_t *train(run_t *r, model_t *m, lra_handle **hp, reduce_ctx *ctx)
{
    lra_handle *h = *hp;
    record_t *rec = calloc((size_t)r->steps, sizeof(record_t));
    lra_tensor *mine = calloc((size_t)m->count, sizeof(lra_tensor));
    size_t n = 0;
    for (int t = 0; t < m->count; t++)
        if (owner(r, t) == g_rank)
            mine[n++] = (lra_tensor){m->theta + t * m->len, m->grad + t * m->len,
                                     (uint64_t)m->len, LRA_DTYPE_F32, 0};
    /* An empty shard passes no tensor at all (and may pass NULL). */
    const lra_tensor *list = n ? mine : NULL;
    int last_owner = owner(r, m->count - 1);
    int rows = r->logistic ? g_n : m->lsq_rows;

    for (int step = 0; step < r->steps; step++) {
        int b0 = (step * r->batch) % rows;
        double loss = model_eval(r, m, b0, r->batch, 1);
        float found_inf = 0.0f;
        if (r->inject && step == STEP_NAN_GRAD && last_owner == g_rank)
            m->grad[(m->count - 1) * m->len + 3] = NAN;
        if (r->inject && step == STEP_FOUND_INF && last_owner == g_rank)
            found_inf = 1.0f;
        if (r->inject && step == STEP_NAN_LOSS)
            loss = NAN;
        if (strcmp(r->mode, "poison") == 0 && step == 4 && g_rank == g_size - 1)
            found_inf = 1.0f; /* this rank alone, guard off */

        /* Rank-local losses: call 0 of a step sums [f_i, 1], call 1 is
           the pre-write sum (fused with the guard on, or two-pass). */
        if (r->fail && step == 3)
            EXPECT_REDUCTION_FAILURE(h, ctx, m, 0,
                                     lra_step_ex(h, list, n, loss, 0.0, &found_inf, NULL), step);
        if (r->fail && step == 5)
            EXPECT_REDUCTION_FAILURE(h, ctx, m, 1,
                                     lra_step_ex(h, list, n, loss, 0.0, &found_inf, NULL), step);
        CHECK_LRA(h, lra_step_ex(h, list, n, loss, 0.0, &found_inf, NULL));
        if (g_restart && step == RESTART_PENDING)
            restart(r, &h, ctx, step, 1);

        uint32_t due = 0;
        CHECK_LRA(h, lra_should_reeval(h, &due));
        lra_reeval_info info;
        if (due) {
            double after = model_eval(r, m, b0, r->batch, 0);
            if (r->fail && step == 8)
                EXPECT_REDUCTION_FAILURE(h, ctx, m, 0, lra_report_reeval(h, after, &info), step);
            CHECK_LRA(h, lra_report_reeval(h, after, &info));
        } else {
            double lr;
            CHECK_LRA(h, lra_get_lr(h, &lr));
            info = (lra_reeval_info){NAN, NAN, NAN, lr, lr, 99, 99};
        }
        expect_same_everywhere(info.lr, "η", step);
        expect_same_everywhere((double)info.decision, "decision", step);
        if (strcmp(r->mode, "poison") == 0) {
            if (step == 4 && info.decision != LRA_DECISION_SKIPPED)
                FAIL("poison: decision %u on the step where one rank raised found-inf, want "
                     "SKIPPED on every rank",
                     info.decision);
        } else {
            expect_same_everywhere((double)info.skip_reason, "skip reason", step);
            expect_same_everywhere(info.phi, "φ", step);
        }
        rec[step] = (record_t){info.lr_before, info.lr,       info.phi,
                               info.rho,       loss,          info.decision,
                               info.skip_reason};
        if (r->rank_local_loss) { /* record the mean loss, as lra sees it */
            double v[2] = {loss, 1.0};
            MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            rec[step].loss = v[0] / v[1];
        }
        if (g_restart && step == RESTART_BETWEEN)
            restart(r, &h, ctx, step, 0);
    }
    free(mine);
    *hp = h;
    return rec;
}

/* Final parameters of every tensor, in tensor order, on rank 0. */
static float *gather_params(const run_t *r, model_t *m)
{
    int total = m->count * m->len;
    float *own = calloc((size_t)total, sizeof(float));
    for (int t = 0; t < m->count; t++)
        if (owner(r, t) == g_rank)
            memcpy(own + t * m->len, m->theta + t * m->len, sizeof(float) * m->len);
    if (!r->sharded) /* replicas: every rank must hold the same bits */
        for (int k = 0; k < total; k++)
            expect_same_everywhere(own[k], "replicated parameter", -1);
    float *all = calloc((size_t)total, sizeof(float));
    if (r->sharded)
        MPI_Reduce(own, all, total, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD); /* x + 0: exact */
    else
        memcpy(all, own, sizeof(float) * total);
    free(own);
    return all;
}

static void write_ref(const char *path, const run_t *r, const record_t *rec, const float *p, int np)
{
    FILE *f = fopen(path, "w");
    if (!f)
        FAIL("cannot write %s", path);
    fprintf(f, "%d %d\n", r->steps, np);
    for (int s = 0; s < r->steps; s++)
        fprintf(f, "%a %a %a %a %a %u %u\n", rec[s].lr_before, rec[s].lr, rec[s].phi, rec[s].rho,
                rec[s].loss, rec[s].decision, rec[s].skip);
    for (int k = 0; k < np; k++)
        fprintf(f, "%a\n", (double)p[k]);
    fclose(f);
}

static int close_enough(double a, double b, double rel)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs(a - b) <= rel * fmax(1e-30, fmax(fabs(a), fabs(b)));
}

static void compare_ref(const char *path, const run_t *r, const record_t *rec, const float *p,
                        int np)
{
    FILE *f = fopen(path, "r");
    if (!f)
        FAIL("cannot read the 1-rank reference %s", path);
    int steps, nref;
    if (fscanf(f, "%d %d", &steps, &nref) != 2 || steps != r->steps || nref != np)
        FAIL("%s: header does not match this run", path);
    int raised = 0, lowered = 0, kept = 0, skipped = 0;
    double worst_phi = 0;
    for (int s = 0; s < steps; s++) {
        record_t q;
        if (fscanf(f, "%la %la %la %la %la %u %u", &q.lr_before, &q.lr, &q.phi, &q.rho, &q.loss,
                   &q.decision, &q.skip) != 7)
            FAIL("%s: short step line %d", path, s);
        const record_t *m = &rec[s];
        if (q.lr_before != m->lr_before || q.lr != m->lr || q.decision != m->decision ||
            q.skip != m->skip)
            FAIL("step %d: η %.17g -> %.17g (decision %u, skip %u) with %d ranks, but "
                 "%.17g -> %.17g (decision %u, skip %u) on 1 rank",
                 s, m->lr_before, m->lr, m->decision, m->skip, g_size, q.lr_before, q.lr,
                 q.decision, q.skip);
        if (!close_enough(q.phi, m->phi, 1e-4) || !close_enough(q.rho, m->rho, 1e-3) ||
            !close_enough(q.loss, m->loss, 1e-5))
            FAIL("step %d: φ %.9g ρ %.9g f %.9g with %d ranks, φ %.9g ρ %.9g f %.9g on 1 rank", s,
                 m->phi, m->rho, m->loss, g_size, q.phi, q.rho, q.loss);
        if (!isnan(q.phi))
            worst_phi = fmax(worst_phi, fabs(q.phi - m->phi) / fabs(q.phi));
        raised += q.decision == LRA_DECISION_RAISED;
        lowered += q.decision == LRA_DECISION_LOWERED;
        kept += q.decision == LRA_DECISION_KEPT;
        skipped += q.decision == LRA_DECISION_SKIPPED;
    }
    double worst = 0, scale = 0;
    int differ = 0;
    for (int k = 0; k < np; k++) {
        double q;
        if (fscanf(f, "%la", &q) != 1)
            FAIL("%s: short parameter list", path);
        worst = fmax(worst, fabs(q - p[k]));
        scale = fmax(scale, fabs(q));
        differ += q != (double)p[k];
    }
    fclose(f);
    /* f32 rounding: differing summation orders (φ, gradient averages,
       predictions) may move a parameter by a few ulp per step. */
    if (worst > 1e-5 * (1.0 + scale))
        FAIL("parameters differ from the 1-rank run by %.3g (max |θ| %.3g)", worst, scale);
    if (raised + lowered == 0)
        FAIL("η never changed in %d steps: the comparison would prove little", steps);
    printf("%-8s %-8s np=%d%s: %d steps, η decisions identical to 1 rank (raised %d, lowered "
           "%d, kept %d, skipped %d); max rel. φ diff %.2g; params: %d/%d differ, max |Δθ| %.3g "
           "(max |θ| %.3g)\n",
           r->mode, g_optimizer, g_size, g_restart ? " restarted twice" : "", steps, raised,
           lowered, kept, skipped, worst_phi, differ, np, worst, scale);
}

/* A real MPI failure under MPI_ERRORS_RETURN (a collective on
 * MPI_COMM_NULL, refused on every rank by MPI's argument check, which Open
 * MPI and MPICH run by default) must come
 * back from lra as LRA_REDUCTION_FAILED naming the MPI error code, and
 * change nothing; lra_mpi_check_agreement passes such codes on too. */
static void check_mpi_error_path(const run_t *r)
{
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm broken = MPI_COMM_NULL;
    lra_handle *h = NULL;
    if (lra_create(&r->cfg, &h) != LRA_OK)
        FAIL("lra_create: %s", lra_thread_last_error());
    CHECK_LRA(h, lra_mpi_set_reduction(h, &broken));
    float theta[4] = {1, 2, 3, 4}, grad[4] = {0.5f, -0.5f, 0.25f, 1};
    lra_tensor t = {theta, grad, 4, LRA_DTYPE_F32, 0};
    const lra_status st = lra_step(h, &t, 1, 1.0, 0.0, NULL);
    if (st != LRA_REDUCTION_FAILED)
        FAIL("lra_step with an MPI error -> %u (%s), want LRA_REDUCTION_FAILED", st,
             lra_status_string(st));
    const char *at = strstr(lra_last_error(h), "returned ");
    int code = at ? atoi(at + strlen("returned ")) : 0, cls = -1;
    if (code <= 0 || MPI_Error_class(code, &cls) != MPI_SUCCESS || cls != MPI_ERR_COMM)
        FAIL("the last error should name MPI_ERR_COMM's code: %s", lra_last_error(h));
    if (theta[0] != 1 || theta[3] != 4)
        FAIL("parameters changed although the reduction failed");
    const int32_t rc = lra_mpi_check_agreement(h, MPI_COMM_NULL);
    if (rc <= 0 || MPI_Error_class(rc, &cls) != MPI_SUCCESS || cls != MPI_ERR_COMM)
        FAIL("lra_mpi_check_agreement on MPI_COMM_NULL -> %d, want MPI_ERR_COMM's code", rc);
    lra_destroy(h);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
}

/* No communicator: lra_mpi_set_reduction(h, NULL) is refused with
 * LRA_NULL_POINTER and registers nothing, and the callback registered by
 * hand with a NULL user answers LRA_MPI_ERR_NO_COMM without calling MPI
 * (it dereferenced NULL before): lra_step returns LRA_REDUCTION_FAILED
 * naming it and changes nothing. Every rank does the same, so no rank is
 * left in a collective. */
static void check_null_comm(const run_t *r)
{
    lra_handle *h = NULL;
    if (lra_create(&r->cfg, &h) != LRA_OK)
        FAIL("lra_create: %s", lra_thread_last_error());
    lra_status st = lra_mpi_set_reduction(h, NULL);
    if (st != LRA_NULL_POINTER)
        FAIL("lra_mpi_set_reduction(h, NULL) -> %u (%s), want LRA_NULL_POINTER", st,
             lra_status_string(st));
    float theta[4] = {1, 2, 3, 4}, grad[4] = {0.5f, -0.5f, 0.25f, 1};
    lra_tensor t = {theta, grad, 4, LRA_DTYPE_F32, 0};
    /* Nothing registered: this sharded handle refuses to step. */
    st = lra_step(h, &t, 1, 1.0, 0.0, NULL);
    if (st != LRA_CALL_ORDER)
        FAIL("lra_step after lra_mpi_set_reduction(h, NULL) was refused -> %u (%s), want "
             "LRA_CALL_ORDER (no reduction registered)",
             st, lra_status_string(st));
    CHECK_LRA(h, lra_set_reduction(h, lra_mpi_allreduce_sum, NULL));
    st = lra_step(h, &t, 1, 1.0, 0.0, NULL);
    char want[48];
    snprintf(want, sizeof want, "callback returned %d", LRA_MPI_ERR_NO_COMM);
    if (st != LRA_REDUCTION_FAILED || !strstr(lra_last_error(h), want))
        FAIL("lra_step with lra_mpi_allreduce_sum and a NULL user -> %u (%s): \"%s\", want "
             "LRA_REDUCTION_FAILED naming LRA_MPI_ERR_NO_COMM",
             st, lra_status_string(st), lra_last_error(h));
    struct lra_counters c;
    CHECK_LRA(h, lra_get_counters(h, &c));
    if (c.steps != 0 || theta[0] != 1 || theta[3] != 4)
        FAIL("the step whose reduction was refused changed the counters or the parameters");
    lra_destroy(h);
}

/* lra_mpi_check_agreement must notice one rank alone changing η. */
static void check_disagreement_is_seen(lra_handle *h)
{
    expect_agreement(h, "after the run");
    double lr;
    CHECK_LRA(h, lra_get_lr(h, &lr));
    if (g_rank == g_size - 1)
        CHECK_LRA(h, lra_set_lr(h, lr * 0.5));
    const int32_t rc = lra_mpi_check_agreement(h, MPI_COMM_WORLD);
    if (rc != LRA_MPI_DISAGREE)
        FAIL("one rank alone halved η: lra_mpi_check_agreement -> %d, want LRA_MPI_DISAGREE",
             rc);
    CHECK_LRA(h, lra_set_lr(h, lr));
}

/* lra_mpi_check_agreement's other answers, on handles without a reduction
 * (so that one rank may step alone): LRA_MPI_DISAGREE on every rank when
 * only the counters differ (rank 0 alone took a step and re-evaluated it,
 * then set η back) and when only the pending step does, LRA_MPI_QUERY_FAILED
 * on every rank when one rank's queries fail (it passes no handle). */
static void check_agreement_answers(void)
{
    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_SGD);
    cfg.num_threads = 1;
    lra_handle *h = NULL;
    if (lra_create(&cfg, &h) != LRA_OK)
        FAIL("lra_create: %s", lra_thread_last_error());
    expect_agreement(h, "fresh handles");
    if (g_rank == 0) {
        float theta[4] = {1, 2, 3, 4}, grad[4] = {0.5f, -0.5f, 0.25f, 1};
        lra_tensor t = {theta, grad, 4, LRA_DTYPE_F32, 0};
        double lr;
        CHECK_LRA(h, lra_get_lr(h, &lr));
        CHECK_LRA(h, lra_step(h, &t, 1, 1.0, 0.0, NULL));
        CHECK_LRA(h, lra_report_reeval(h, 0.5, NULL));
        CHECK_LRA(h, lra_set_lr(h, lr));
    }
    int32_t rc = lra_mpi_check_agreement(h, MPI_COMM_WORLD);
    if (rc != LRA_MPI_DISAGREE)
        FAIL("only the counters differ: lra_mpi_check_agreement -> %d, want LRA_MPI_DISAGREE",
             rc);
    rc = lra_mpi_check_agreement(g_rank == g_size - 1 ? NULL : h, MPI_COMM_WORLD);
    if (rc != LRA_MPI_QUERY_FAILED)
        FAIL("the last rank passed no handle: lra_mpi_check_agreement -> %d, want "
             "LRA_MPI_QUERY_FAILED",
             rc);
    lra_destroy(h);

    /* Only the pending step differs: rank 0 steps, reports, steps again (a
     * step due for re-evaluation pending); the others step twice, then
     * report. Same counters, decisions and η everywhere (each report
     * judges the same gradient at the first η). */
    if (lra_create(&cfg, &h) != LRA_OK)
        FAIL("lra_create: %s", lra_thread_last_error());
    float theta[4] = {1, 2, 3, 4}, grad[4] = {0.5f, -0.5f, 0.25f, 1};
    lra_tensor t = {theta, grad, 4, LRA_DTYPE_F32, 0};
    CHECK_LRA(h, lra_step(h, &t, 1, 1.0, 0.0, NULL));
    if (g_rank == 0)
        CHECK_LRA(h, lra_report_reeval(h, 0.5, NULL));
    CHECK_LRA(h, lra_step(h, &t, 1, 1.0, 0.0, NULL));
    if (g_rank != 0)
        CHECK_LRA(h, lra_report_reeval(h, 0.5, NULL));
    rc = lra_mpi_check_agreement(h, MPI_COMM_WORLD);
    if (rc != LRA_MPI_DISAGREE)
        FAIL("only rank 0 has a step pending: lra_mpi_check_agreement -> %d, want "
             "LRA_MPI_DISAGREE",
             rc);
    lra_destroy(h);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    if (argc != 5 && !(argc == 6 && strcmp(argv[5], "restart") == 0))
        FAIL("usage: %s MODE OPTIMIZER REF DIGITS_CSV [restart]", argv[0]);
    g_restart = argc == 6;
    g_optimizer = argv[2];
    run_t r;
    setup(&r, argv[1], argv[2]);
    if (r.logistic)
        load_digits(argv[4]);
    model_t m;
    model_init(&m, &r);

    if (r.fail) {
        check_mpi_error_path(&r);
        check_null_comm(&r);
    }
    reduce_ctx ctx = {MPI_COMM_WORLD, 0, -1};
    lra_handle *h = create_handle(&r, &ctx);

    record_t *rec = train(&r, &m, &h, &ctx);
    if (r.fail && failures_seen != 3)
        FAIL("%s: %d injected failures checked, want 3", r.mode, failures_seen);

    /* Every rank called the collective equally often. */
    expect_same_everywhere((double)ctx.calls, "number of reduction calls", -1);
    struct lra_counters c;
    CHECK_LRA(h, lra_get_counters(h, &c));
    if (strcmp(r.mode, "poison") != 0) /* there one rank alone skipped a step */
        expect_same_everywhere((double)c.applied, "applied steps", -1);
    if (g_size > 1) {
        check_disagreement_is_seen(h);
        check_agreement_answers();
    }

    int np = m.count * m.len;
    float *p = gather_params(&r, &m);
    if (g_rank == 0) {
        if (strcmp(r.mode, "poison") == 0)
            printf("poison   %-8s np=%d: a rank-local found-inf with the guard off: the step "
                   "skipped (LRA_DECISION_SKIPPED) and the same η on every rank\n",
                   argv[2], g_size);
        else if (g_size == 1 && !g_restart)
            write_ref(argv[3], &r, rec, p, np);
        else
            compare_ref(argv[3], &r, rec, p, np);
    }
    lra_destroy(h);
    free(p);
    free(rec);
    MPI_Finalize();
    return 0;
}
