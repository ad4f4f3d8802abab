/* Sizes and field offsets of lra.h's structs as the C compiler lays them
 * out, one "struct.field offset" line each. layout.f90 prints the same lines
 * for the Fortran module's bind(C) types; scripts/stages/fortran.sh fails
 * when the two outputs differ. */
#include <lra.h>

#include <stddef.h>
#include <stdio.h>

#define SIZE(s) printf("sizeof %s %zu\n", #s, sizeof(s))
#define FIELD(s, f) printf("%s.%s %zu\n", #s, #f, offsetof(s, f))

int main(void) {
  SIZE(lra_config);
  FIELD(lra_config, struct_size);
  FIELD(lra_config, optimizer);
  FIELD(lra_config, device);
  FIELD(lra_config, device_ordinal);
  FIELD(lra_config, lr);
  FIELD(lra_config, momentum);
  FIELD(lra_config, alpha);
  FIELD(lra_config, beta1);
  FIELD(lra_config, beta2);
  FIELD(lra_config, eps);
  FIELD(lra_config, weight_decay);
  FIELD(lra_config, f_star);
  FIELD(lra_config, factor_up);
  FIELD(lra_config, factor_down);
  FIELD(lra_config, threshold_up);
  FIELD(lra_config, threshold_down);
  FIELD(lra_config, lr_min);
  FIELD(lra_config, lr_max);
  FIELD(lra_config, scale_max);
  FIELD(lra_config, denom_eps);
  FIELD(lra_config, check_finite);
  FIELD(lra_config, num_threads);
  FIELD(lra_config, reeval_schedule);
  FIELD(lra_config, reeval_every);
  FIELD(lra_config, reeval_growth);
  FIELD(lra_config, sharding);
  FIELD(lra_config, loss_is_rank_local);

  SIZE(lra_tensor);
  FIELD(lra_tensor, param);
  FIELD(lra_tensor, grad);
  FIELD(lra_tensor, numel);
  FIELD(lra_tensor, dtype);
  FIELD(lra_tensor, reserved);

  SIZE(lra_reeval_info);
  FIELD(lra_reeval_info, phi);
  FIELD(lra_reeval_info, rho);
  FIELD(lra_reeval_info, scale);
  FIELD(lra_reeval_info, lr_before);
  FIELD(lra_reeval_info, lr);
  FIELD(lra_reeval_info, decision);
  FIELD(lra_reeval_info, skip_reason);

  SIZE(lra_counters);
  FIELD(lra_counters, steps);
  FIELD(lra_counters, applied);
  FIELD(lra_counters, skipped);
  FIELD(lra_counters, reevals);
  FIELD(lra_counters, raised);
  FIELD(lra_counters, lowered);
  FIELD(lra_counters, kept);
  FIELD(lra_counters, reeval_skipped);
  return 0;
}
