! lra_mpi: the cross-rank reduction lra needs, over MPI, for Fortran callers
! (Fortran 2008 + the mpi_f08 module). The counterpart of the C header
! bindings/mpi/lra_mpi.h, with the same semantics:
!
!   type(MPI_Comm), target :: comm    ! must outlive the handle (not a local
!   comm = MPI_COMM_WORLD             ! of a routine that returns before it)
!   status = lra_mpi_set_reduction(h, comm)
!
! lra sums a few doubles across ranks per step (the rank-local parts of
! phi = g.v when parameters are sharded; f_i and f+ when losses are
! rank-local) so that every rank takes the same eta decision. This module
! provides that sum as an MPI_Allreduce on a communicator you choose.
!
! Contract (what makes every rank call the collective in the same order):
! every rank of `comm` creates its handle with the same lra_config
! (sharding, loss_is_rank_local, f_star, check_finite, ...) and makes the
! same sequence of lra_step / lra_report_reeval calls with the same obs_var,
! also a rank whose shard holds no tensor (lra_step with count 0). Argument
! errors (LRA_INVALID_ARGUMENT, ...) are rank-local and may come after
! another rank entered a collective: treat them as fatal (MPI_Abort).
!
! Errors: as in lra_mpi.h, the communicator is used as you pass it, with
! its own error handler. A failing MPI_Allreduce comes back as a non-zero
! return (the MPI error code; lra reports LRA_REDUCTION_FAILED and names the
! code in lra_last_error) only when that handler is MPI_ERRORS_RETURN; with
! MPI's default, MPI_ERRORS_ARE_FATAL, it aborts the job instead. To get
! codes back, call MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN) on the
! communicator you pass (or on a duplicate, MPI_Comm_dup, if the rest of the
! program relies on the default). MPI does not promise that a failing
! collective fails on every rank: unless you know the failure was the same
! everywhere, treat LRA_REDUCTION_FAILED as fatal (MPI_Abort).
!
! Threads: the callback runs on the thread that calls lra. If that is not
! the thread that initialised MPI, initialise with MPI_Init_thread and at
! least MPI_THREAD_SERIALIZED.
!
! Build: compile lra.f90 first (module lra), then this file with the MPI
! compiler wrapper that provides mpi_f08 for your Fortran compiler:
!   mpifort -c lra.f90 && mpifort -c lra_mpi.f90
!   mpifort app.f90 lra_mpi.o lra.o -L<prefix>/lib -llra
! examples/fortran/mpi_data_parallel.f90 uses it (data parallel and sharded).
module lra_mpi
  use, intrinsic :: iso_c_binding, only: c_ptr, c_size_t, c_double, c_int, c_int32_t, c_int64_t, &
                                         c_f_pointer, c_loc, c_funloc, c_associated
  use mpi_f08, only: MPI_Comm, MPI_Allreduce, MPI_IN_PLACE, MPI_DOUBLE_PRECISION, MPI_SUM, MPI_MAX, &
                     MPI_SUCCESS
  use lra, only: lra_reduce_fn, lra_set_reduction, lra_counters, lra_get_lr, lra_get_counters, &
                 lra_should_reeval, LRA_OK, LRA_CALL_ORDER, LRA_NULL_POINTER
  implicit none
  private
  public :: lra_mpi_allreduce_sum, lra_mpi_set_reduction, lra_mpi_check_agreement

  ! lra_mpi_check_agreement's answers besides 0 (agreement) and MPI error
  ! codes (which are positive); the values of lra_mpi.h's. Every rank gets
  ! the same answer.
  ! ranks hold different eta, counters or pending-step state
  integer(c_int32_t), parameter, public :: LRA_MPI_DISAGREE = -1
  ! an lra query failed on at least one rank (see lra_last_error there)
  integer(c_int32_t), parameter, public :: LRA_MPI_QUERY_FAILED = -2
  ! lra_mpi_allreduce_sum's answer for a null `user` (no communicator): the
  ! collective is not entered
  integer(c_int32_t), parameter, public :: LRA_MPI_ERR_NO_COMM = -3

contains

  ! The lra_reduce_fn: `user` is c_loc of the type(MPI_Comm) to sum over.
  ! Replaces values(1:count) by their sums over all ranks of that
  ! communicator, MPI_Allreduce(MPI_IN_PLACE, ..., MPI_DOUBLE_PRECISION,
  ! MPI_SUM), and returns 0, or the (non-zero) MPI error code, which lra
  ! reports as LRA_REDUCTION_FAILED; a null `user` (registered through
  ! lra_set_reduction directly: lra_mpi_set_reduction refuses it) returns
  ! LRA_MPI_ERR_NO_COMM without calling MPI (ranks that did register a
  ! communicator then wait in the collective alone: treat it as fatal).
  ! (MPI_DOUBLE_PRECISION is Fortran's name
  ! for the IEEE binary64 that real(c_double) is with every compiler that
  ! has mpi_f08: the sums are those of lra_mpi.h's MPI_DOUBLE.)
  !
  ! Every rank receives the same sum, bit for bit: the MPI standard requires
  ! that all processes taking part in an all-reduce receive identical
  ! results. The eta decisions computed from it therefore agree on every rank.
  function lra_mpi_allreduce_sum(values, count, user) bind(C) result(rc)
    real(c_double), intent(inout) :: values(*)
    integer(c_size_t), value :: count
    type(c_ptr), value :: user
    integer(c_int32_t) :: rc
    type(MPI_Comm), pointer :: comm
    integer :: ierr

    ! lra passes at most a handful of values, the same count on every rank,
    ! so this refusal (which skips the collective) would happen on all.
    if (count > int(huge(0_c_int), c_size_t)) then
      rc = -1
      return
    end if
    if (.not. c_associated(user)) then
      rc = LRA_MPI_ERR_NO_COMM
      return
    end if
    call c_f_pointer(user, comm)
    ! values(1:count), not values: a contiguous section (no copy) that also
    ! binds to an assumed-rank choice buffer.
    call MPI_Allreduce(MPI_IN_PLACE, values(1:count), int(count), MPI_DOUBLE_PRECISION, MPI_SUM, comm, ierr)
    if (ierr == MPI_SUCCESS) then
      rc = 0
    else
      rc = int(ierr, c_int32_t)
    end if
  end function lra_mpi_allreduce_sum

  ! Registers lra_mpi_allreduce_sum for `comm` on handle `h`; returns
  ! lra_set_reduction's status. Call it on every rank of the communicator.
  ! `comm` is a pointer dummy, so the compiler accepts only a TARGET (or
  ! POINTER) variable: lra keeps its address, never that of a temporary
  ! copy. It must stay valid (not go out of scope, not be freed) as long as
  ! the handle. A disassociated `comm` is refused with LRA_NULL_POINTER
  ! without calling lra (whatever was registered stays).
  function lra_mpi_set_reduction(h, comm) result(status)
    type(c_ptr), intent(in) :: h
    type(MPI_Comm), pointer, intent(in) :: comm
    integer(c_int32_t) :: status
    ! Through a pointer of lra's abstract interface: the compiler checks
    ! that the callback's characteristics are those of lra_reduce_fn, which
    ! bindings/fortran/check_interfaces.py proves against include/lra.h.
    procedure(lra_reduce_fn), pointer :: reduce

    if (.not. associated(comm)) then
      status = LRA_NULL_POINTER
      return
    end if
    reduce => lra_mpi_allreduce_sum
    status = lra_set_reduction(h, c_funloc(reduce), c_loc(comm))
  end function lra_mpi_set_reduction

  ! lra_mpi.h's lra_mpi_check_agreement: checks that every rank of `comm`
  ! holds the same eta (bit for bit), the same step and re-evaluation
  ! counters and the same pending step (none, or one due or not due for
  ! re-evaluation): what must agree for the ranks to keep calling the
  ! collectives in step and deciding eta alike. Per-shard optimizer state
  ! and the applied/skipped counters are not compared.
  !
  ! One collective (MPI_Allreduce of 17 doubles, MPI_MAX); call it on every
  ! rank, between lra calls: after every rank restored its checkpoint
  ! (lra_load_state can succeed on some ranks and fail on others) and, if
  ! you like, every few hundred steps. Returns 0, LRA_MPI_DISAGREE,
  ! LRA_MPI_QUERY_FAILED, or the MPI error code (under MPI_ERRORS_RETURN).
  ! When no step is pending, the handle's lra_last_error afterwards names
  ! the LRA_CALL_ORDER of the lra_should_reeval query it made.
  function lra_mpi_check_agreement(h, comm) result(rc)
    type(c_ptr), intent(in) :: h
    type(MPI_Comm), intent(in) :: comm
    integer(c_int32_t) :: rc
    integer, parameter :: FIELDS = 8
    type(lra_counters) :: c
    real(c_double) :: lr, mine(FIELDS), v(2 * FIELDS + 1)
    integer(c_int32_t) :: due, pending
    logical :: failed
    integer :: ierr

    lr = 0
    c = lra_counters(0, 0, 0, 0, 0, 0, 0, 0)
    due = 0
    failed = lra_get_lr(h, lr) /= LRA_OK
    if (.not. failed) failed = lra_get_counters(h, c) /= LRA_OK
    pending = lra_should_reeval(h, due)
    failed = failed .or. (pending /= LRA_OK .and. pending /= LRA_CALL_ORDER)
    mine = [lr, real(c%steps, c_double), real(c%reevals, c_double), real(c%raised, c_double), &
            real(c%lowered, c_double), real(c%kept, c_double), real(c%reeval_skipped, c_double), &
            merge(1.0_c_double + due, 0.0_c_double, pending == LRA_OK)]
    ! max of v and max of -v (= -min) in one collective; the last slot
    ! carries "some query failed".
    v(1:FIELDS) = mine
    v(FIELDS + 1:2 * FIELDS) = -mine
    v(2 * FIELDS + 1) = merge(1.0_c_double, 0.0_c_double, failed)
    call MPI_Allreduce(MPI_IN_PLACE, v, 2 * FIELDS + 1, MPI_DOUBLE_PRECISION, MPI_MAX, comm, ierr)
    if (ierr /= MPI_SUCCESS) then
      rc = int(ierr, c_int32_t)
    else if (v(2 * FIELDS + 1) > 0) then
      rc = LRA_MPI_QUERY_FAILED
    else if (any(transfer(v(1:FIELDS), [0_c_int64_t]) /= transfer(-v(FIELDS + 1:2 * FIELDS), [0_c_int64_t]))) then
      rc = LRA_MPI_DISAGREE ! max /= min somewhere (compared as bits: exact, no -Wcompare-reals)
    else
      rc = 0
    end if
  end function lra_mpi_check_agreement

end module lra_mpi
