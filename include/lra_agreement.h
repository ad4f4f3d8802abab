/* lra_agreement.h: what the ranks of one run must agree on, as one vector
 * for a max all-reduce. Shared by the header-only cross-rank adapters
 * (bindings/mpi/lra_mpi.h, bindings/nccl/lra_nccl.h), so that their
 * agreement checks compare the same things; not part of the library's
 * ABI (nothing here is exported by liblra).
 *
 * Compared: η (bit for bit), the step and re-evaluation counters and the
 * pending step (none, or one due or not due for re-evaluation), what must
 * agree for the ranks to keep calling the collectives in step and deciding
 * η alike. Not compared: per-shard optimizer state, the applied/skipped
 * counters (with a rank-local found-inf flag and the guard off they may
 * differ by design), the configuration. */
#ifndef LRA_AGREEMENT_H
#define LRA_AGREEMENT_H

#include <stdint.h>
#include <string.h>

#include "lra.h"

/* η, six counters, the pending step. */
#define LRA_AGREEMENT_FIELDS_ 8
/* Each field and its negation (one max gives the max and −min), and a
   slot that is non-zero where a rank's lra query failed. */
#define LRA_AGREEMENT_VALUES_ (2 * LRA_AGREEMENT_FIELDS_ + 1)

/* The answers besides 0 (agreement); adapters name them as their own. */
#define LRA_AGREEMENT_DISAGREE_ (-1)
#define LRA_AGREEMENT_QUERY_FAILED_ (-2)

/* This rank's vector. When no step is pending, the handle's lra_last_error
   afterwards names the LRA_CALL_ORDER of the lra_should_reeval query. */
static inline void lra_agreement_values_(lra_handle *h, double v[LRA_AGREEMENT_VALUES_])
{
    enum { FIELDS = LRA_AGREEMENT_FIELDS_ };
    double lr = 0.0;
    struct lra_counters c;
    memset(&c, 0, sizeof c);
    int failed = lra_get_lr(h, &lr) != LRA_OK || lra_get_counters(h, &c) != LRA_OK;
    uint32_t due = 0;
    const lra_status pending = lra_should_reeval(h, &due);
    failed |= pending != LRA_OK && pending != LRA_CALL_ORDER;
    const double mine[FIELDS] = {
        lr,
        (double)c.steps,
        (double)c.reevals,
        (double)c.raised,
        (double)c.lowered,
        (double)c.kept,
        (double)c.reeval_skipped,
        pending == LRA_OK ? 1.0 + due : 0.0,
    };
    for (int i = 0; i < FIELDS; i++) {
        v[i] = mine[i];
        v[FIELDS + i] = -mine[i];
    }
    v[2 * FIELDS] = failed;
}

/* The verdict on the max-reduced vector: 0, LRA_AGREEMENT_DISAGREE_ or
   LRA_AGREEMENT_QUERY_FAILED_, the same on every rank. */
static inline int32_t lra_agreement_verdict_(const double v[LRA_AGREEMENT_VALUES_])
{
    enum { FIELDS = LRA_AGREEMENT_FIELDS_ };
    if (v[2 * FIELDS] != 0.0)
        return LRA_AGREEMENT_QUERY_FAILED_;
    for (int i = 0; i < FIELDS; i++)
        if (v[i] != -v[FIELDS + i])
            return LRA_AGREEMENT_DISAGREE_;
    return 0;
}

#endif /* LRA_AGREEMENT_H */
