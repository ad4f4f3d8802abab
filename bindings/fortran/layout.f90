! Sizes and field offsets of the module's bind(C) types as gfortran lays
! them out, in layout.c's format ("sizeof T n", "T.field offset");
! scripts/stages/fortran.sh fails when the two outputs differ.
program layout
  use, intrinsic :: iso_c_binding, only: c_ptr, c_loc, c_sizeof, c_intptr_t, c_size_t
  use lra, only: lra_config, lra_tensor, lra_reeval_info, lra_counters
  implicit none
  type(lra_config), target :: cfg
  type(lra_tensor), target :: t
  type(lra_reeval_info), target :: info
  type(lra_counters), target :: c

  call size_line("lra_config", c_sizeof(cfg))
  call field("lra_config.struct_size", c_loc(cfg), c_loc(cfg%struct_size))
  call field("lra_config.optimizer", c_loc(cfg), c_loc(cfg%optimizer))
  call field("lra_config.device", c_loc(cfg), c_loc(cfg%device))
  call field("lra_config.device_ordinal", c_loc(cfg), c_loc(cfg%device_ordinal))
  call field("lra_config.lr", c_loc(cfg), c_loc(cfg%lr))
  call field("lra_config.momentum", c_loc(cfg), c_loc(cfg%momentum))
  call field("lra_config.alpha", c_loc(cfg), c_loc(cfg%alpha))
  call field("lra_config.beta1", c_loc(cfg), c_loc(cfg%beta1))
  call field("lra_config.beta2", c_loc(cfg), c_loc(cfg%beta2))
  call field("lra_config.eps", c_loc(cfg), c_loc(cfg%eps))
  call field("lra_config.weight_decay", c_loc(cfg), c_loc(cfg%weight_decay))
  call field("lra_config.f_star", c_loc(cfg), c_loc(cfg%f_star))
  call field("lra_config.factor_up", c_loc(cfg), c_loc(cfg%factor_up))
  call field("lra_config.factor_down", c_loc(cfg), c_loc(cfg%factor_down))
  call field("lra_config.threshold_up", c_loc(cfg), c_loc(cfg%threshold_up))
  call field("lra_config.threshold_down", c_loc(cfg), c_loc(cfg%threshold_down))
  call field("lra_config.lr_min", c_loc(cfg), c_loc(cfg%lr_min))
  call field("lra_config.lr_max", c_loc(cfg), c_loc(cfg%lr_max))
  call field("lra_config.scale_max", c_loc(cfg), c_loc(cfg%scale_max))
  call field("lra_config.denom_eps", c_loc(cfg), c_loc(cfg%denom_eps))
  call field("lra_config.check_finite", c_loc(cfg), c_loc(cfg%check_finite))
  call field("lra_config.num_threads", c_loc(cfg), c_loc(cfg%num_threads))
  call field("lra_config.reeval_schedule", c_loc(cfg), c_loc(cfg%reeval_schedule))
  call field("lra_config.reeval_every", c_loc(cfg), c_loc(cfg%reeval_every))
  call field("lra_config.reeval_growth", c_loc(cfg), c_loc(cfg%reeval_growth))
  call field("lra_config.sharding", c_loc(cfg), c_loc(cfg%sharding))
  call field("lra_config.loss_is_rank_local", c_loc(cfg), c_loc(cfg%loss_is_rank_local))

  call size_line("lra_tensor", c_sizeof(t))
  call field("lra_tensor.param", c_loc(t), c_loc(t%param))
  call field("lra_tensor.grad", c_loc(t), c_loc(t%grad))
  call field("lra_tensor.numel", c_loc(t), c_loc(t%numel))
  call field("lra_tensor.dtype", c_loc(t), c_loc(t%dtype))
  call field("lra_tensor.reserved", c_loc(t), c_loc(t%reserved))

  call size_line("lra_reeval_info", c_sizeof(info))
  call field("lra_reeval_info.phi", c_loc(info), c_loc(info%phi))
  call field("lra_reeval_info.rho", c_loc(info), c_loc(info%rho))
  call field("lra_reeval_info.scale", c_loc(info), c_loc(info%scale))
  call field("lra_reeval_info.lr_before", c_loc(info), c_loc(info%lr_before))
  call field("lra_reeval_info.lr", c_loc(info), c_loc(info%lr))
  call field("lra_reeval_info.decision", c_loc(info), c_loc(info%decision))
  call field("lra_reeval_info.skip_reason", c_loc(info), c_loc(info%skip_reason))

  call size_line("lra_counters", c_sizeof(c))
  call field("lra_counters.steps", c_loc(c), c_loc(c%steps))
  call field("lra_counters.applied", c_loc(c), c_loc(c%applied))
  call field("lra_counters.skipped", c_loc(c), c_loc(c%skipped))
  call field("lra_counters.reevals", c_loc(c), c_loc(c%reevals))
  call field("lra_counters.raised", c_loc(c), c_loc(c%raised))
  call field("lra_counters.lowered", c_loc(c), c_loc(c%lowered))
  call field("lra_counters.kept", c_loc(c), c_loc(c%kept))
  call field("lra_counters.reeval_skipped", c_loc(c), c_loc(c%reeval_skipped))

contains

  subroutine size_line(name, bytes)
    character(*), intent(in) :: name
    integer(c_size_t), intent(in) :: bytes
    print '(a, 1x, a, 1x, i0)', "sizeof", name, bytes
  end subroutine size_line

  subroutine field(name, base, member)
    character(*), intent(in) :: name
    type(c_ptr), intent(in) :: base, member
    print '(a, 1x, i0)', name, transfer(member, 0_c_intptr_t) - transfer(base, 0_c_intptr_t)
  end subroutine field

end program layout
