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
 * Argument errors (LRA_INVALID_ARGUMENT, ...) are rank-local and may come
 * after another rank entered a collective: treat them as fatal (MPI_Abort).
 *
 * Threads: the callback runs on the thread that calls lra. If that is not
 * the thread that initialised MPI, initialise with MPI_Init_thread and at
 * least MPI_THREAD_SERIALIZED.
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
#include <string.h>

#include "lra.h"
#include "lra_agreement.h"

/* lra_mpi_allreduce_sum's answer when `user` is NULL (no communicator):
 * the collective is not entered. Distinct from MPI error codes (positive)
 * and from lra_mpi_check_agreement's answers below. */
#define LRA_MPI_ERR_NO_COMM (-3)

/* The lra_reduce_fn: `user` points at the MPI_Comm to sum over. Replaces
 * values[0..count] by their sums over all ranks of that communicator with
 * MPI_Allreduce(MPI_IN_PLACE, ..., MPI_DOUBLE, MPI_SUM) and returns 0, or
 * the (non-zero) MPI error code, which lra reports as LRA_REDUCTION_FAILED.
 * A NULL `user` (lra_set_reduction(h, lra_mpi_allreduce_sum, NULL); the
 * wrapper below refuses it) returns LRA_MPI_ERR_NO_COMM without calling MPI
 * (ranks that did register a communicator then wait in the collective
 * alone): treat it as fatal like any other failure.
 *
 * Every rank receives the same sum, bit for bit: the MPI standard requires
 * that all processes taking part in an all-reduce receive identical
 * results. The η decisions computed from it therefore agree on every rank.
 *
 * Errors: a failure code only comes back when the communicator's error
 * handler is MPI_ERRORS_RETURN; with MPI's default (MPI_ERRORS_ARE_FATAL)
 * a failing collective aborts the job instead. MPI does not promise that a
 * failing collective fails on every rank: some ranks may have completed
 * it (and their lra call with it) while others report the error. Unless
 * you know the failure was the same everywhere, treat LRA_REDUCTION_FAILED
 * as fatal (MPI_Abort). */
static inline int32_t lra_mpi_allreduce_sum(double *values, size_t count, void *user)
{
    if (user == NULL)
        return LRA_MPI_ERR_NO_COMM;
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
 * on every rank of the communicator. Returns lra_set_reduction's status,
 * or LRA_NULL_POINTER for a NULL `comm`, which is refused without calling
 * lra (whatever was registered stays, and lra_last_error does not describe
 * this refusal). To remove the reduction, call lra_set_reduction(h, NULL,
 * NULL). */
static inline lra_status lra_mpi_set_reduction(lra_handle *h, MPI_Comm *comm)
{
    if (comm == NULL)
        return LRA_NULL_POINTER;
    return lra_set_reduction(h, lra_mpi_allreduce_sum, (void *)comm);
}

/* lra_mpi_check_agreement's answers besides 0 (agreement) and MPI error
 * codes (which are positive). Every rank gets the same answer. */
/* ranks hold different η, counters or pending-step state */
#define LRA_MPI_DISAGREE LRA_AGREEMENT_DISAGREE_
/* an lra query failed on at least one rank (see lra_last_error there) */
#define LRA_MPI_QUERY_FAILED LRA_AGREEMENT_QUERY_FAILED_

/* Checks that every rank of `comm` holds the same η (bit for bit), the same
 * step and re-evaluation counters and the same pending step (none, or one
 * due or not due for re-evaluation): what must agree for the ranks to keep
 * calling the collectives in step and deciding η alike. Per-shard optimizer
 * state and the applied/skipped counters are not compared (with a rank-
 * local found-inf flag and the guard off they may differ by design).
 *
 * One collective (MPI_Allreduce of 17 doubles, MPI_MAX); call it on every
 * rank, between lra calls. Use it after every rank restored its checkpoint
 * (lra_load_state can succeed on some ranks and fail on others) and, if
 * you like, every few hundred steps. Returns 0, LRA_MPI_DISAGREE,
 * LRA_MPI_QUERY_FAILED, or the MPI error code (under MPI_ERRORS_RETURN).
 * When no step is pending, the handle's lra_last_error afterwards names the
 * LRA_CALL_ORDER of the lra_should_reeval query it made. */
static inline int32_t lra_mpi_check_agreement(lra_handle *h, MPI_Comm comm)
{
    double v[LRA_AGREEMENT_VALUES_];
    lra_agreement_values_(h, v);
    const int rc = MPI_Allreduce(MPI_IN_PLACE, v, LRA_AGREEMENT_VALUES_, MPI_DOUBLE, MPI_MAX, comm);
    if (rc != MPI_SUCCESS)
        return (int32_t)rc;
    return lra_agreement_verdict_(v);
}

#endif /* LRA_MPI_H */
