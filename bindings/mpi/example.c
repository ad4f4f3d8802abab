/* lra in an MPI trainer: data parallel and sharded, on least squares
 * y = X·w* (a synthetic problem every rank generates identically).
 *
 *   mpicc -O2 -I include -I bindings/mpi bindings/mpi/example.c \
 *         -L target/release -llra -Wl,-rpath,$PWD/target/release -lm -o lra_mpi_example
 *   mpirun -np 2 ./lra_mpi_example dp        # each rank: its half of every batch
 *   mpirun -np 2 ./lra_mpi_example sharded   # each rank: its block of w
 *
 * Exits non-zero unless the loss fell at least tenfold.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lra_mpi.h"

enum { N = 512, D = 32, BATCH = 32, STEPS = 100 };

static double X[N][D], Y[N];

static void make_problem(void)
{
    unsigned long long s = 42;
    double w_star[D];
    for (int j = 0; j < D; j++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        w_star[j] = (double)(s >> 11) / 9007199254740992.0 - 0.5;
    }
    for (int i = 0; i < N; i++) {
        Y[i] = 0;
        for (int j = 0; j < D; j++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            X[i][j] = (double)(s >> 11) / 9007199254740992.0 * 2 - 1;
            Y[i] += X[i][j] * w_star[j];
        }
    }
}

#define CHECK(h, call)                                                                             \
    do {                                                                                           \
        lra_status st_ = (call);                                                                   \
        if (st_ != LRA_OK) { /* the other ranks may wait in a collective: abort them all */        \
            fprintf(stderr, "%s: %s\n", #call, lra_last_error(h));                                 \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                          \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int sharded = argc > 1 && strcmp(argv[1], "sharded") == 0;
    make_problem();

    /* Data parallel: every rank holds all of w and takes batch rows
       rank, rank + size, ...; sharded: rank r holds w[j0, j1). */
    int j0 = sharded ? D * rank / size : 0, j1 = sharded ? D * (rank + 1) / size : D;
    float w[D] = {0}, g[D] = {0};

    lra_config cfg;
    lra_config_init(&cfg, LRA_OPTIMIZER_MOMENTUM);
    cfg.lr = 1e-3; /* small on purpose: lra raises it */
    cfg.sharding = sharded ? LRA_SHARDING_SHARDED : LRA_SHARDING_REPLICATED;
    cfg.loss_is_rank_local = sharded ? 0 : 1; /* dp: each rank reports its own rows' loss */
    lra_handle *h;
    if (lra_create(&cfg, &h) != LRA_OK) {
        fprintf(stderr, "lra_create: %s\n", lra_thread_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Comm comm = MPI_COMM_WORLD; /* lives as long as the handle */
    CHECK(h, lra_mpi_set_reduction(h, &comm));

    /* One tensor: this rank's part of w (empty if it owns no column). */
    lra_tensor t = {w + j0, g + j0, (uint64_t)(j1 - j0), LRA_DTYPE_F32, 0};
    double first = NAN, last = NAN;
    for (int step = 0; step < STEPS; step++) {
        int b0 = step * BATCH % N;
        /* Loss and gradient. Residual r_i = x_i·w − y_i over the rows this
           rank sees; sharded: the partial dot products summed over ranks. */
        int lo = sharded ? 0 : rank, stride = sharded ? 1 : size;
        double pred[BATCH] = {0}, loss = 0, grad[D] = {0};
        for (int i = lo; i < BATCH; i += stride)
            for (int j = j0; j < j1; j++)
                pred[i] += X[b0 + i][j] * w[j];
        if (sharded)
            MPI_Allreduce(MPI_IN_PLACE, pred, BATCH, MPI_DOUBLE, MPI_SUM, comm);
        for (int i = lo; i < BATCH; i += stride) {
            double r = pred[i] - Y[b0 + i];
            loss += 0.5 * r * r;
            for (int j = j0; j < j1; j++)
                grad[j] += r * X[b0 + i][j];
        }
        /* Both are means over the whole batch. Data parallel: a rank's rows
           contribute 1/BATCH each, the gradients are summed over ranks, and
           the loss is reported times `size` because lra averages the
           rank-local losses (exact whatever share of the rows a rank has). */
        loss = loss / BATCH * (sharded ? 1 : size);
        for (int j = j0; j < j1; j++)
            g[j] = (float)(grad[j] / BATCH);
        if (!sharded)
            MPI_Allreduce(MPI_IN_PLACE, g, D, MPI_FLOAT, MPI_SUM, comm);

        CHECK(h, lra_step(h, &t, 1, loss, 0.0, NULL));

        /* f+: the same rows, the new w (forward pass only). */
        memset(pred, 0, sizeof pred);
        for (int i = lo; i < BATCH; i += stride)
            for (int j = j0; j < j1; j++)
                pred[i] += X[b0 + i][j] * w[j];
        if (sharded)
            MPI_Allreduce(MPI_IN_PLACE, pred, BATCH, MPI_DOUBLE, MPI_SUM, comm);
        double after = 0;
        for (int i = lo; i < BATCH; i += stride)
            after += 0.5 * (pred[i] - Y[b0 + i]) * (pred[i] - Y[b0 + i]);
        lra_reeval_info info;
        CHECK(h, lra_report_reeval(h, after / BATCH * (sharded ? 1 : size), &info));

        /* The mean loss over ranks (what lra saw when losses are rank-local). */
        double mean = loss;
        if (!sharded) {
            MPI_Allreduce(MPI_IN_PLACE, &mean, 1, MPI_DOUBLE, MPI_SUM, comm);
            mean /= size;
        }
        if (step == 0)
            first = mean;
        last = mean;
        if (rank == 0 && step % 40 == 0)
            printf("%s step %3d  loss %.3e  lr %.3e -> %.3e\n", sharded ? "sharded" : "dp", step,
                   mean, info.lr_before, info.lr);
    }
    /* Every rank must end with the same η and counters (a cheap check,
       also worth running after restoring per-rank checkpoints). */
    if (lra_mpi_check_agreement(h, comm) != 0) {
        fprintf(stderr, "rank %d: the ranks' η or counters differ\n", rank);
        MPI_Abort(comm, 1);
    }
    lra_destroy(h);
    int ok = last < first / 10;
    if (rank == 0)
        printf("%s: %d ranks, loss %.3e -> %.3e (%s)\n", sharded ? "sharded" : "dp", size, first,
               last, ok ? "ok" : "did not fall tenfold");
    MPI_Finalize();
    return ok ? 0 : 1;
}
