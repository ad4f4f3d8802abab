/* lra_mpi.h: the cross-rank reduction lra needs, over MPI. Header only.
 *
 * lra sums a few doubles across ranks per step (the rank-local parts of
 * φ = g·v when parameters are sharded; f_i and f+ when losses are
 * rank-local) so that every rank takes the same η decision. This header
 * provides that sum as an MPI_Allreduce on a communicator you choose:
 *
 *     MPI_Comm comm = MPI_COMM_WORLD;        // must outlive the handle
 *     lra_mpi_set_reduction(handle, &comm);
 *
 * Contract (what makes every rank call the collective in the same order):
 * every rank of `comm` creates its handle with the same lra_config
 * (sharding, loss_is_rank_local, f_star, check_finite, ...) and makes the
 * same sequence of lra_step / lra_report_reeval calls with the same obs_var,
 * also a rank whose shard holds no tensor (call lra_step with count 0).
 * Argument errors (LRA_INVALID_ARGUMENT, ...) are found before any
 * collective and are rank-local: treat them as fatal (MPI_Abort), since the
 * other ranks are then waiting in the collective.
 *
 * This header includes <mpi.h> and "lra.h"; compile with mpicc and
 * -I<lra>/include -I<lra>/bindings/mpi, link with -llra.
 */
#ifndef LRA_MPI_H
#define LRA_MPI_H

#include <limits.h>
#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "lra.h"

/* The lra_reduce_fn: `user` points at the MPI_Comm to sum over. Replaces
 * values[0..count] by their sums over all ranks of that communicator with
 * MPI_Allreduce(MPI_IN_PLACE, ..., MPI_DOUBLE, MPI_SUM) and returns 0, or
 * the (non-zero) MPI error code, which lra reports as LRA_REDUCTION_FAILED.
 * A failure code only comes back when the communicator's error handler is
 * MPI_ERRORS_RETURN; with MPI's default (MPI_ERRORS_ARE_FATAL) a failing
 * collective aborts the job instead.
 *
 * Every rank receives the same sum: MPI's reduction algorithms combine each
 * element once and hand the result to all ranks (or combine pairwise, which
 * is commutative in IEEE arithmetic), so the η decisions computed from it
 * agree bit for bit. */
static inline int32_t lra_mpi_allreduce_sum(double *values, size_t count, void *user)
{
    const MPI_Comm comm = *(const MPI_Comm *)user;
    /* lra passes at most a handful of values, the same count on every rank,
       so this refusal (which skips the collective) would happen on all. */
    if (count > (size_t)INT_MAX)
        return -1;
    const int rc = MPI_Allreduce(MPI_IN_PLACE, values, (int)count, MPI_DOUBLE, MPI_SUM, comm);
    return rc == MPI_SUCCESS ? 0 : (int32_t)rc;
}

/* Registers lra_mpi_allreduce_sum for `comm` on handle `h`. `comm` must
 * stay valid as long as the handle (a variable, not a temporary). Call it
 * on every rank of the communicator. Returns lra_set_reduction's status. */
static inline lra_status lra_mpi_set_reduction(lra_handle *h, MPI_Comm *comm)
{
    return lra_set_reduction(h, lra_mpi_allreduce_sum, (void *)comm);
}

#endif /* LRA_MPI_H */
