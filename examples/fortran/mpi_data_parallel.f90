! lra in a Fortran MPI trainer (mpi_f08 + module lra_mpi): data parallel and
! sharded parameters, the Fortran counterpart of tests/mpi/lra_mpi_test.c.
!
!   mpirun -np 1 mpi_data_parallel REFDIR   ! the reference: one rank, whole model
!   mpirun -np 2 mpi_data_parallel REFDIR   ! must reproduce it (any rank count
!                                           ! that divides BATCH = 48)
!
! The model is a linear least-squares fit y = A w + b (33 parameters in one
! flat real(c_float) buffer) on generated data. Four runs, from initial eta
! too large (Adam 0.5, SGD 2.0: lra must lower it) or too small (1e-3):
!
!   dp adam, dp momentum    replicated parameters; each rank computes the
!                           loss and gradient of its own share of every batch
!                           (rows rank*48/P+1 .. (rank+1)*48/P); the gradient
!                           sums are all-reduced by this program (in double,
!                           then rounded to f32), the rank-local losses
!                           averaged by lra (loss_is_rank_local = 1);
!                           re-evaluation every 2nd step.
!   sharded adam, sgd       sharding = LRA_SHARDING_SHARDED: each rank owns a
!                           contiguous slice of the parameter buffer and hands
!                           lra only that slice; the slices are all-gathered
!                           (exact copies) for the forward pass, so every rank
!                           has the whole model's loss, and lra sums the
!                           slices' parts of phi across ranks.
!
! With one rank every run writes its trajectory (per step: eta before and
! after, decision, skip reason, phi, rho, loss; then the parameters) to
! REFDIR/<run>.ref. With more ranks rank 0 compares: eta and every decision
! must be identical, phi, rho and the loss equal within 1e-4, 1e-3 and 1e-5
! (relative), the parameters within f32 rounding. (They come out with the
! same bits: the dp gradient sums are rounded to f32 only after the
! all-reduce, and a sharded rank computes each of its parameters' gradient
! as one rank does; only phi is summed in another order, ~2e-16 apart.)
! Every rank checks at each step that all ranks hold the same eta, decision,
! skip reason and phi, bit for bit, and at the end that replicated
! parameters have the same bits.
!
! Failing reductions: in every run, the reduction of one lra_step and of one
! lra_report_reeval is made to fail on every rank (a callback returning 7):
! each must return LRA_REDUCTION_FAILED on every rank, with a message naming
! the code, and change nothing (checkpoint bytes, parameters); the retried
! call succeeds and the run still matches the reference. Before the runs, a
! real MPI error (MPI_Allreduce on MPI_COMM_NULL under MPI_ERRORS_RETURN)
! must come back through lra_mpi_allreduce_sum as LRA_REDUCTION_FAILED
! naming an MPI_ERR_COMM code. With more than one rank, each run ends with
! lra_mpi_check_agreement: 0, then LRA_MPI_DISAGREE once one rank alone
! changed eta; afterwards LRA_MPI_DISAGREE when only the counters or only
! the pending step differ, and LRA_MPI_QUERY_FAILED when one rank's query
! fails.
!
! Restarts: with more than one rank, every run restarts at step 12, with
! the step pending: each rank saves its own checkpoint, destroys its handle,
! creates a fresh one with the same configuration, registers lra_mpi's
! reduction and loads the checkpoint. The restored handle must save the same
! bytes and want the pending re-evaluation, and the run must still match the
! 1-rank reference, which does not restart.
!
! Any failure calls MPI_Abort (the other ranks may be waiting in a
! collective), so mpirun exits non-zero.
!
! Build (the stage scripts/stages/fortran.sh does this):
!   mpifort -c bindings/fortran/lra.f90 bindings/fortran/lra_mpi.f90
!   mpifort examples/fortran/mpi_data_parallel.f90 lra_mpi.o lra.o \
!     -L target/release -llra -Wl,-rpath,$PWD/target/release

! The data and the model, split over ranks.
module shards
  use, intrinsic :: iso_c_binding, only: c_float, c_double, c_int64_t
  use mpi_f08, only: MPI_Comm, MPI_Allreduce, MPI_Allgatherv, MPI_IN_PLACE, MPI_DATATYPE_NULL, &
                     MPI_DOUBLE_PRECISION, MPI_REAL, MPI_SUM
  implicit none
  private
  public :: FEATURES, NPARAMS, SAMPLES, BATCH, generate_data, block_bounds, dp_loss, sharded_loss, gather

  integer, parameter :: FEATURES = 32, SAMPLES = 768, BATCH = 48
  ! The flat parameter buffer: w = params(1:FEATURES), b = params(NPARAMS).
  integer, parameter :: NPARAMS = FEATURES + 1
  real(c_float) :: a(FEATURES, SAMPLES), y(SAMPLES) ! sample i is a(:, i), y(i)
  integer(c_int64_t) :: rng_state = 42

contains

  ! Park-Miller "minimal standard" generator, uniform in (0, 1): the same
  ! numbers on every rank.
  real(c_double) function uniform()
    rng_state = mod(16807_c_int64_t * rng_state, 2147483647_c_int64_t)
    uniform = real(rng_state, c_double) / 2147483647.0_c_double
  end function uniform

  subroutine generate_data()
    real(c_double) :: truth(NPARAMS), t
    integer :: i, j
    do j = 1, NPARAMS
      truth(j) = 2 * uniform() - 1
    end do
    do i = 1, SAMPLES
      t = truth(NPARAMS)
      do j = 1, FEATURES
        a(j, i) = real(2 * uniform() - 1, c_float)
        t = t + truth(j) * a(j, i)
      end do
      y(i) = real(t + 0.01_c_double * (uniform() - 0.5_c_double), c_float) ! a little noise
    end do
  end subroutine generate_data

  ! Items first .. last of n items dealt out in contiguous blocks: block
  ! `rank` (0-based) of `ranks` (empty when last < first).
  subroutine block_bounds(n, rank, ranks, first, last)
    integer, intent(in) :: n, rank, ranks
    integer, intent(out) :: first, last
    first = n * rank / ranks + 1
    last = n * (rank + 1) / ranks
  end subroutine block_bounds

  ! Sum of squared residuals over samples rows(1) .. rows(2) and, per
  ! parameter j in cols(1) .. cols(2), the sum of the squared residuals'
  ! derivatives, into gsum(j). The same expressions for every split, so a
  ! parameter's sum over the same rows has the same bits on any rank.
  real(c_double) function squares(params, rows, cols, gsum) result(s)
    real(c_float), intent(in) :: params(NPARAMS)
    integer, intent(in) :: rows(2), cols(2)
    real(c_double), intent(inout) :: gsum(NPARAMS)
    real(c_double) :: r
    integer :: i, j

    s = 0
    do i = rows(1), rows(2)
      r = params(NPARAMS) + dot_product(real(params(1:FEATURES), c_double), real(a(:, i), c_double)) - y(i)
      s = s + r * r
      do j = cols(1), min(cols(2), FEATURES)
        gsum(j) = gsum(j) + 2 * r * real(a(j, i), c_double)
      end do
      if (cols(2) == NPARAMS) gsum(NPARAMS) = gsum(NPARAMS) + 2 * r
    end do
  end function squares

  ! Data parallel: the mean squared error of this rank's rows of the batch
  ! starting at sample `start` (what it reports to lra as its rank-local
  ! loss) and, when grad is present, the gradient of the mean over the WHOLE
  ! batch: the per-rank sums all-reduced in double, then rounded to f32, the
  ! same on every rank.
  real(c_double) function dp_loss(params, start, comm, rank, ranks, grad) result(loss)
    real(c_float), intent(in) :: params(NPARAMS)
    integer, intent(in) :: start, rank, ranks
    type(MPI_Comm), intent(in) :: comm
    real(c_float), intent(out), optional :: grad(NPARAMS)
    real(c_double) :: gsum(NPARAMS)
    integer :: first, last

    call block_bounds(BATCH, rank, ranks, first, last)
    gsum = 0
    loss = squares(params, [start + first - 1, start + last - 1], [1, NPARAMS], gsum) / (last - first + 1)
    if (present(grad)) then
      call MPI_Allreduce(MPI_IN_PLACE, gsum, NPARAMS, MPI_DOUBLE_PRECISION, MPI_SUM, comm)
      grad = real(gsum / BATCH, c_float)
    end if
  end function dp_loss

  ! Sharded: params must hold every rank's slice (gather); returns the mean
  ! squared error of the whole batch starting at `start` (the same bits on
  ! every rank and as with one rank) and, when grad is present, the gradient
  ! of this rank's slice only.
  real(c_double) function sharded_loss(params, start, rank, ranks, grad) result(loss)
    real(c_float), intent(in) :: params(NPARAMS)
    integer, intent(in) :: start, rank, ranks
    real(c_float), intent(inout), optional :: grad(NPARAMS)
    real(c_double) :: gsum(NPARAMS)
    integer :: first, last

    call block_bounds(NPARAMS, rank, ranks, first, last)
    gsum = 0
    loss = squares(params, [start, start + BATCH - 1], [first, last], gsum) / BATCH
    if (present(grad)) grad(first:last) = real(gsum(first:last) / BATCH, c_float)
  end function sharded_loss

  ! Every rank's slice of params to every rank (FSDP's all-gather): plain
  ! copies, exact.
  subroutine gather(params, comm, ranks)
    real(c_float), intent(inout) :: params(NPARAMS)
    type(MPI_Comm), intent(in) :: comm
    integer, intent(in) :: ranks
    integer :: counts(ranks), displs(ranks), r, first, last

    do r = 1, ranks
      call block_bounds(NPARAMS, r - 1, ranks, first, last)
      counts(r) = last - first + 1
      displs(r) = first - 1
    end do
    call MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, params, counts, displs, MPI_REAL, comm)
  end subroutine gather

end module shards

! A reduction that fails on purpose: lra_mpi_allreduce_sum, except that the
! armed call (counted from arming) returns INJECTED_ERROR on every rank
! without communicating, as a collective refused everywhere would.
module failing_reduction
  use, intrinsic :: iso_c_binding, only: c_ptr, c_size_t, c_double, c_int32_t, c_f_pointer, c_loc
  use mpi_f08, only: MPI_Comm
  use lra_mpi, only: lra_mpi_allreduce_sum
  implicit none
  private
  public :: fault_injector, sum_or_fail, INJECTED_ERROR

  integer(c_int32_t), parameter :: INJECTED_ERROR = 7

  type :: fault_injector
    type(MPI_Comm) :: comm
    integer :: calls = 0 ! since arming
    integer :: fail_at = -1 ! 0-based call number that fails
  end type fault_injector

contains

  function sum_or_fail(values, count, user) bind(C) result(rc)
    real(c_double), intent(inout) :: values(*)
    integer(c_size_t), value :: count
    type(c_ptr), value :: user
    integer(c_int32_t) :: rc
    type(fault_injector), pointer :: f

    call c_f_pointer(user, f)
    f%calls = f%calls + 1
    if (f%calls - 1 == f%fail_at) then
      rc = INJECTED_ERROR
    else
      rc = lra_mpi_allreduce_sum(values, count, c_loc(f%comm))
    end if
  end function sum_or_fail

end module failing_reduction

program mpi_data_parallel
  use, intrinsic :: iso_c_binding
  use, intrinsic :: iso_fortran_env, only: error_unit, int32, int64, real64
  use, intrinsic :: ieee_arithmetic, only: ieee_value, ieee_quiet_nan, ieee_is_nan
  use mpi_f08
  use lra
  use lra_mpi
  use shards
  use failing_reduction
  implicit none

  ! One training run.
  type :: run_spec
    character(len=16) :: name
    logical :: sharded
    integer(c_int32_t) :: optimizer
    real(c_double) :: lr
    integer :: steps
  end type run_spec

  ! What one step decided (rank 0's view); decision = skip = 99: not
  ! re-evaluated (the schedule did not ask).
  type :: step_record
    real(c_double) :: lr_before, lr, phi, rho, loss
    integer(c_int32_t) :: decision, skip
  end type step_record

  integer, parameter :: STEP_FAILURE = 3, REEVAL_FAILURE = 8 ! the first due re-evaluation from here
  ! With more than one rank, every rank restarts from its own checkpoint
  ! with this step pending (a re-evaluation is due then in every run).
  integer, parameter :: STEP_RESTART = 12
  type(run_spec), parameter :: RUNS(4) = [ &
    run_spec("dp-adam", .false., LRA_OPTIMIZER_ADAM, 0.5_c_double, 60), &
    run_spec("dp-momentum", .false., LRA_OPTIMIZER_MOMENTUM, 1.0e-3_c_double, 60), &
    run_spec("sharded-adam", .true., LRA_OPTIMIZER_ADAM, 1.0e-3_c_double, 40), &
    run_spec("sharded-sgd", .true., LRA_OPTIMIZER_SGD, 2.0_c_double, 40)]

  ! The parameters and their gradient: TARGETs, lra writes params through
  ! the pointer in the tensor. Each rank's lra tensor covers its slice only.
  real(c_float), target :: params(NPARAMS), grad(NPARAMS)
  ! The communicator lra_mpi sums over: a TARGET that outlives every handle.
  type(MPI_Comm), target :: world
  type(fault_injector), target :: faults
  integer(c_int8_t), allocatable :: state_before(:)
  real(c_float) :: params_before(NPARAMS)
  integer :: rank, ranks, k, failures_checked, restarts = 0
  logical :: shown(2) = .false. ! the message of each injected failure, printed
  character(len=4096) :: refdir

  call MPI_Init()
  world = MPI_COMM_WORLD
  call MPI_Comm_rank(world, rank)
  call MPI_Comm_size(world, ranks)
  if (command_argument_count() /= 1) call fail("usage: mpi_data_parallel REFDIR")
  call get_command_argument(1, refdir)
  if (mod(BATCH, ranks) /= 0) call fail("the rank count must divide the batch size (48)")
  call generate_data()

  call check_mpi_error()
  call check_no_communicator()
  do k = 1, size(RUNS)
    call run(RUNS(k))
  end do
  if (rank == 0 .and. ranks > 1) print '(a)', "lra_mpi_check_agreement: 0 after every run, " // &
    "LRA_MPI_DISAGREE on every rank once one rank alone halved eta"
  if (ranks > 1) call check_agreement_answers()
  if (ranks > 1 .and. restarts /= size(RUNS)) call fail("not every run restarted from its checkpoints")
  if (rank == 0) print '(a, i0, a)', "all checks passed (", ranks, " rank(s))"
  call MPI_Finalize()

contains

  ! ---- checking helpers ----------------------------------------------------

  ! Prints the failure and aborts every rank: the others may be waiting in a
  ! collective this one will never enter.
  subroutine fail(what)
    character(*), intent(in) :: what
    write (error_unit, '(a, i0, a)') "FAIL [rank ", rank, "]: " // what
    call MPI_Abort(MPI_COMM_WORLD, 1)
  end subroutine fail

  ! A call that must succeed.
  subroutine ok(status, h, what)
    integer(c_int32_t), intent(in) :: status
    type(c_ptr), intent(in) :: h
    character(*), intent(in) :: what
    if (status /= LRA_OK) call fail(what // ": " // lra_string(lra_status_string(status)) // " (" // &
                                    lra_string(lra_last_error(h)) // ")")
  end subroutine ok

  character(len=32) function str(x)
    real(c_double), intent(in) :: x
    write (str, '(es24.17)') x
  end function str

  ! Fails unless every rank passed the same bits in x.
  subroutine expect_same_everywhere(x, what, step)
    real(c_double), intent(in) :: x
    character(*), intent(in) :: what
    integer, intent(in) :: step
    integer(int64) :: lo, hi
    call MPI_Allreduce(transfer(x, 0_int64), lo, 1, MPI_INTEGER8, MPI_MIN, MPI_COMM_WORLD)
    call MPI_Allreduce(transfer(x, 0_int64), hi, 1, MPI_INTEGER8, MPI_MAX, MPI_COMM_WORLD)
    if (lo /= hi) then
      block
        character(len=16) :: s
        write (s, '(i0)') step
        call fail("step " // trim(s) // ": " // what // " differs across ranks: " // &
                  trim(str(transfer(lo, x))) // " .. " // trim(str(transfer(hi, x))))
      end block
    end if
  end subroutine expect_same_everywhere

  ! The handle's checkpoint (eta, counters, pending step, optimizer state).
  subroutine checkpoint(h, state)
    type(c_ptr), intent(in) :: h
    integer(c_int8_t), allocatable, intent(out) :: state(:)
    integer(c_size_t) :: need
    call ok(lra_state_size(h, need), h, "lra_state_size")
    allocate (state(need))
    call ok(lra_save_state(h, state, need, c_null_ptr), h, "lra_save_state")
  end subroutine checkpoint

  ! Makes the reduction's k-th call from now (0-based) fail on every rank,
  ! and remembers the handle's state and the parameters.
  subroutine arm_failure(h, k)
    type(c_ptr), intent(in) :: h
    integer, intent(in) :: k
    call checkpoint(h, state_before)
    params_before = params
    faults%comm = world
    faults%calls = 0
    faults%fail_at = k
    call ok(lra_set_reduction(h, c_funloc(sum_or_fail), c_loc(faults)), h, "lra_set_reduction(failing)")
  end subroutine arm_failure

  ! The armed call returned `status`: it must be LRA_REDUCTION_FAILED on
  ! every rank, name the callback's code, and have changed nothing. Puts
  ! lra_mpi's reduction back.
  subroutine expect_failure(h, status, what, step)
    type(c_ptr), intent(in) :: h
    integer(c_int32_t), intent(in) :: status
    character(*), intent(in) :: what
    integer, intent(in) :: step
    integer(c_int8_t), allocatable :: state_after(:)
    character(len=16) :: s

    write (s, '(i0)') step
    call expect_same_everywhere(real(status, c_double), "status of a failing reduction", step)
    if (status /= LRA_REDUCTION_FAILED) call fail("step " // trim(s) // ": " // what // &
      " with a failing reduction returned " // lra_string(lra_status_string(status)) // &
      ", not LRA_REDUCTION_FAILED")
    if (index(lra_string(lra_last_error(h)), "returned 7") == 0) call fail("step " // trim(s) // &
      ": the last error does not name the callback's code: " // lra_string(lra_last_error(h)))
    call checkpoint(h, state_after)
    if (size(state_after) /= size(state_before)) then
      call fail("step " // trim(s) // ": " // what // " changed the checkpoint's size although its reduction failed")
    else if (any(state_after /= state_before)) then
      call fail("step " // trim(s) // ": " // what // " changed the handle's state although its reduction failed")
    end if
    if (any(transfer(params, [0_int32]) /= transfer(params_before, [0_int32]))) &
      call fail("step " // trim(s) // ": " // what // " changed parameters although its reduction failed")
    call ok(lra_mpi_set_reduction(h, world), h, "lra_mpi_set_reduction")
    failures_checked = failures_checked + 1
    if (rank == 0 .and. .not. shown(failures_checked)) then ! once per kind: every run checks the same
      print '(a)', "failing reduction in " // what // " (step " // trim(s) // &
        "): LRA_REDUCTION_FAILED on every rank, nothing changed: " // lra_string(lra_last_error(h))
      shown(failures_checked) = .true.
    end if
  end subroutine expect_failure

  ! Every rank restarts from its own checkpoint, taken with a step pending:
  ! a fresh handle of the same configuration, lra_mpi's reduction
  ! registered, the checkpoint loaded. The restored handle must save the
  ! same bytes and want the same re-evaluation, and the run goes on to
  ! match the 1-rank reference, which never restarts: a restart that
  ! changed anything (eta, the schedule, the pending step's phi, the
  ! optimizer state) would show as another trajectory.
  subroutine restart(spec, cfg, h)
    type(run_spec), intent(in) :: spec
    type(lra_config), intent(in) :: cfg
    type(c_ptr), intent(inout) :: h
    integer(c_int8_t), allocatable :: saved(:), restored(:)
    integer(c_int32_t) :: due, due_restored

    call ok(lra_should_reeval(h, due), h, "lra_should_reeval")
    if (due == 0) call fail(trim(spec%name) // ": no step is due for re-evaluation at the restart")
    call checkpoint(h, saved)
    call lra_destroy(h)
    call ok(lra_create(cfg, h), c_null_ptr, "lra_create (restart)")
    call ok(lra_mpi_set_reduction(h, world), h, "lra_mpi_set_reduction (restart)")
    call ok(lra_load_state(h, saved, size(saved, kind=c_size_t)), h, "lra_load_state")
    call checkpoint(h, restored)
    if (size(restored) /= size(saved)) then
      call fail(trim(spec%name) // ": the restored handle's checkpoint has another size")
    else if (any(restored /= saved)) then
      call fail(trim(spec%name) // ": the restored handle's checkpoint differs from the one it loaded")
    end if
    call ok(lra_should_reeval(h, due_restored), h, "lra_should_reeval (restored)")
    if (due_restored /= due) call fail(trim(spec%name) // ": the restored pending step is not due")
    restarts = restarts + 1
    if (rank == 0 .and. restarts == 1) print '(a, i0, a)', "restart at step ", STEP_RESTART, &
      " (a step pending): every rank from its own checkpoint into a fresh handle; saves the same bytes"
  end subroutine restart

  ! lra_mpi_check_agreement: 0 after a run, LRA_MPI_DISAGREE on every rank
  ! once one rank alone changes eta.
  subroutine check_agreement(h)
    type(c_ptr), intent(in) :: h
    real(c_double) :: lr
    integer(c_int32_t) :: rc
    character(len=16) :: s

    rc = lra_mpi_check_agreement(h, world)
    write (s, '(i0)') rc
    if (rc /= 0) call fail("lra_mpi_check_agreement after the run returned " // trim(s) // ", not 0")
    call ok(lra_get_lr(h, lr), h, "lra_get_lr")
    if (rank == ranks - 1) call ok(lra_set_lr(h, lr / 2), h, "lra_set_lr")
    rc = lra_mpi_check_agreement(h, world)
    write (s, '(i0)') rc
    if (rc /= LRA_MPI_DISAGREE) call fail("one rank alone halved eta: lra_mpi_check_agreement returned " // &
                                          trim(s) // ", not LRA_MPI_DISAGREE")
    call ok(lra_set_lr(h, lr), h, "lra_set_lr")
  end subroutine check_agreement

  ! lra_mpi_check_agreement's other answers, on handles without a reduction
  ! (so that one rank may step alone): LRA_MPI_DISAGREE on every rank when
  ! only the counters differ (one rank alone took a step and re-evaluated
  ! it, then set eta back) and when only the pending step does, and
  ! LRA_MPI_QUERY_FAILED on every rank when one rank's queries fail (it
  ! passes no handle).
  subroutine check_agreement_answers()
    type(c_ptr) :: h, queried
    type(lra_config) :: cfg
    type(lra_tensor) :: t(1)
    real(c_float), target :: x(4), g(4)
    real(c_double) :: lr

    call lra_config_init(cfg, LRA_OPTIMIZER_SGD)
    cfg%num_threads = 1
    call ok(lra_create(cfg, h), c_null_ptr, "lra_create")
    call expect_agreement(h, 0, "fresh handles")
    if (rank == 0) then
      x = [1, 2, 3, 4]
      g = [0.5, -0.5, 0.25, 1.0]
      t(1) = lra_tensor_f32(x, g)
      call ok(lra_get_lr(h, lr), h, "lra_get_lr")
      call ok(lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr), h, "lra_step")
      call ok(lra_report_reeval(h, 0.5_c_double, c_null_ptr), h, "lra_report_reeval")
      call ok(lra_set_lr(h, lr), h, "lra_set_lr")
    end if
    call expect_agreement(h, LRA_MPI_DISAGREE, "rank 0 alone stepped and re-evaluated (eta set back)")
    queried = h
    if (rank == ranks - 1) queried = c_null_ptr
    call expect_agreement(queried, LRA_MPI_QUERY_FAILED, "the last rank passed no handle")
    call lra_destroy(h)
    ! Only the pending step differs: rank 0 steps, reports, steps again (a
    ! step due for re-evaluation pending); the others step twice, then
    ! report. Same counters, decisions and eta everywhere (each report
    ! judges the same gradient at the first eta).
    call ok(lra_create(cfg, h), c_null_ptr, "lra_create")
    x = [1, 2, 3, 4]
    g = [0.5, -0.5, 0.25, 1.0]
    t(1) = lra_tensor_f32(x, g)
    call ok(lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr), h, "lra_step")
    if (rank == 0) call ok(lra_report_reeval(h, 0.5_c_double, c_null_ptr), h, "lra_report_reeval")
    call ok(lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr), h, "lra_step")
    if (rank /= 0) call ok(lra_report_reeval(h, 0.5_c_double, c_null_ptr), h, "lra_report_reeval")
    call expect_agreement(h, LRA_MPI_DISAGREE, "only rank 0 has a step pending")
    call lra_destroy(h)
    if (rank == 0) print '(a)', "lra_mpi_check_agreement: LRA_MPI_DISAGREE on every rank when only the " // &
      "counters or only the pending step differ; LRA_MPI_QUERY_FAILED on every rank when one rank's query fails"
  end subroutine check_agreement_answers

  subroutine expect_agreement(h, want, what)
    type(c_ptr), intent(in) :: h
    integer(c_int32_t), intent(in) :: want
    character(*), intent(in) :: what
    integer(c_int32_t) :: rc
    character(len=16) :: got, expected

    rc = lra_mpi_check_agreement(h, world)
    write (got, '(i0)') rc
    write (expected, '(i0)') want
    if (rc /= want) call fail(what // ": lra_mpi_check_agreement returned " // trim(got) // ", not " // trim(expected))
  end subroutine expect_agreement

  ! ---- a real MPI error ----------------------------------------------------

  ! MPI_Allreduce on MPI_COMM_NULL, refused on every rank by MPI's argument
  ! check under MPI_ERRORS_RETURN, must come back as LRA_REDUCTION_FAILED
  ! naming the MPI_ERR_COMM code, and change nothing.
  subroutine check_mpi_error()
    type(MPI_Comm), target :: broken
    type(c_ptr) :: h
    type(lra_tensor) :: t(1)
    real(c_float), target :: x(4), g(4)
    integer(c_int32_t) :: status
    character(len=:), allocatable :: message
    integer :: at, code, class, ierr

    call MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN)
    broken = MPI_COMM_NULL
    call reducing_handle(h, x, g, t)
    call ok(lra_mpi_set_reduction(h, broken), h, "lra_mpi_set_reduction(MPI_COMM_NULL)")
    status = lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    if (status /= LRA_REDUCTION_FAILED) call fail("lra_step with an MPI error returned " // &
      lra_string(lra_status_string(status)) // ", not LRA_REDUCTION_FAILED")
    message = lra_string(lra_last_error(h))
    at = index(message, "returned ")
    code = 0
    if (at > 0) read (message(at + len("returned "):), *, iostat=ierr) code
    class = -1
    if (code > 0) call MPI_Error_class(code, class, ierr)
    if (code <= 0 .or. class /= MPI_ERR_COMM) call fail("the last error should name an MPI_ERR_COMM code: " // message)
    if (.not. unchanged(x)) call fail("parameters changed although the reduction failed")
    status = lra_mpi_check_agreement(h, broken) ! lra_mpi_check_agreement passes MPI's code on
    class = -1
    if (status > 0) call MPI_Error_class(status, class, ierr)
    if (class /= MPI_ERR_COMM) call fail("lra_mpi_check_agreement on MPI_COMM_NULL did not return an MPI_ERR_COMM code")
    call lra_destroy(h)
    call MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL)
    if (rank == 0) print '(a)', "MPI error (MPI_Allreduce on MPI_COMM_NULL, MPI_ERRORS_RETURN): " // &
      "LRA_REDUCTION_FAILED, parameters unchanged: " // message
  end subroutine check_mpi_error

  ! No communicator: lra_mpi_set_reduction refuses a disassociated one with
  ! LRA_NULL_POINTER (registering nothing: the step is then LRA_CALL_ORDER),
  ! and lra_mpi_allreduce_sum registered with a null `user` returns
  ! LRA_MPI_ERR_NO_COMM without calling MPI: LRA_REDUCTION_FAILED naming
  ! it, parameters unchanged. The same on every rank, so no rank is left
  ! alone in a collective.
  subroutine check_no_communicator()
    type(MPI_Comm), pointer :: none => null()
    procedure(lra_reduce_fn), pointer :: reduce
    type(c_ptr) :: h
    type(lra_tensor) :: t(1)
    real(c_float), target :: x(4), g(4)
    integer(c_int32_t) :: status
    character(len=:), allocatable :: message
    character(len=16) :: code

    call reducing_handle(h, x, g, t)
    status = lra_mpi_set_reduction(h, none)
    if (status /= LRA_NULL_POINTER) call fail("lra_mpi_set_reduction(no communicator) returned " // &
      lra_string(lra_status_string(status)) // ", not LRA_NULL_POINTER")
    status = lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    if (status /= LRA_CALL_ORDER) call fail("lra_step after a refused lra_mpi_set_reduction returned " // &
      lra_string(lra_status_string(status)) // ", not LRA_CALL_ORDER (nothing registered)")
    reduce => lra_mpi_allreduce_sum
    call ok(lra_set_reduction(h, c_funloc(reduce), c_null_ptr), h, "lra_set_reduction(user = null)")
    status = lra_step(h, t, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    if (status /= LRA_REDUCTION_FAILED) call fail("lra_step with a null communicator returned " // &
      lra_string(lra_status_string(status)) // ", not LRA_REDUCTION_FAILED")
    message = lra_string(lra_last_error(h))
    write (code, '(i0)') LRA_MPI_ERR_NO_COMM
    if (index(message, "returned " // trim(code)) == 0) &
      call fail("the last error should name LRA_MPI_ERR_NO_COMM (" // trim(code) // "): " // message)
    if (.not. unchanged(x)) call fail("parameters changed although there was no communicator")
    call lra_destroy(h)
    if (rank == 0) print '(a)', "no communicator: lra_mpi_set_reduction -> LRA_NULL_POINTER; " // &
      "null user -> LRA_REDUCTION_FAILED, parameters unchanged: " // message
  end subroutine check_no_communicator

  ! What the failure checks step: a one-tensor Adam handle whose losses are
  ! rank-local (so every step reduces), over x = [1, 2, 3, 4] and
  ! g = [0.5, -0.5, 0.25, 1] (the caller's TARGETs: t points into them).
  subroutine reducing_handle(h, x, g, t)
    type(c_ptr), intent(out) :: h
    real(c_float), target, intent(inout) :: x(4), g(4)
    type(lra_tensor), intent(out) :: t(1)
    type(lra_config) :: cfg

    call lra_config_init(cfg, LRA_OPTIMIZER_ADAM)
    cfg%num_threads = 1
    cfg%loss_is_rank_local = 1
    call ok(lra_create(cfg, h), c_null_ptr, "lra_create")
    x = [1, 2, 3, 4]
    g = [0.5, -0.5, 0.25, 1.0]
    t(1) = lra_tensor_f32(x, g)
  end subroutine reducing_handle

  ! Whether x still holds reducing_handle's values, bit for bit.
  logical function unchanged(x)
    real(c_float), intent(in) :: x(4)
    unchanged = all(transfer(x, [0_int32]) == &
                    transfer([1.0_c_float, 2.0_c_float, 3.0_c_float, 4.0_c_float], [0_int32]))
  end function unchanged

  ! ---- training ------------------------------------------------------------

  subroutine run(spec)
    type(run_spec), intent(in) :: spec
    type(step_record) :: rec(spec%steps)
    real(c_float) :: all_params(NPARAMS)
    type(lra_config) :: cfg
    type(lra_counters) :: counters
    type(c_ptr) :: h
    integer :: first, last

    call lra_config_init(cfg, spec%optimizer)
    cfg%lr = spec%lr
    cfg%num_threads = 1
    if (spec%sharded) then
      cfg%sharding = LRA_SHARDING_SHARDED ! the loss stays the whole model's: not rank-local
      call block_bounds(NPARAMS, rank, ranks, first, last)
    else
      cfg%loss_is_rank_local = 1 ! replicated: sharding stays LRA_SHARDING_REPLICATED
      cfg%reeval_schedule = LRA_REEVAL_EVERY
      cfg%reeval_every = 2
      first = 1
      last = NPARAMS
    end if
    call ok(lra_create(cfg, h), c_null_ptr, "lra_create")
    call ok(lra_mpi_set_reduction(h, world), h, "lra_mpi_set_reduction")

    params = 0
    grad = 0
    failures_checked = 0
    call train(spec, cfg, h, first, last, rec)
    if (failures_checked /= 2) call fail(trim(spec%name) // ": not both injected failures were checked")

    call ok(lra_get_counters(h, counters), h, "lra_get_counters")
    call expect_same_everywhere(real(counters%applied, c_double), "applied steps", -1)
    if (ranks > 1) call check_agreement(h)
    call lra_destroy(h)

    all_params = params
    if (spec%sharded) then
      call gather(all_params, world, ranks)
    else ! replicas: every rank must hold the same bits
      block
        integer(int32) :: lo(NPARAMS), hi(NPARAMS)
        call MPI_Allreduce(transfer(params, [0_int32]), lo, NPARAMS, MPI_INTEGER4, MPI_MIN, MPI_COMM_WORLD)
        call MPI_Allreduce(transfer(params, [0_int32]), hi, NPARAMS, MPI_INTEGER4, MPI_MAX, MPI_COMM_WORLD)
        if (any(lo /= hi)) call fail(trim(spec%name) // ": replicated parameters differ across ranks")
      end block
    end if
    if (rank == 0) then
      if (ranks == 1) then
        call write_reference(spec, rec, all_params)
      else
        call compare_reference(spec, rec, all_params)
      end if
    end if
  end subroutine run

  ! spec%steps steps on params(first:last) (this rank's tensor), batches in
  ! order through the data; a re-evaluation on the same batch when lra asks.
  subroutine train(spec, cfg, h, first, last, rec)
    type(run_spec), intent(in) :: spec
    type(lra_config), intent(in) :: cfg
    type(c_ptr), intent(inout) :: h
    integer, intent(in) :: first, last
    type(step_record), intent(out) :: rec(:)
    type(lra_tensor) :: mine(1)
    type(lra_reeval_info), target :: info
    real(c_double) :: loss, after, v(2)
    integer(c_int32_t) :: due, status
    integer :: step, start
    logical :: reeval_failure_done

    mine(1) = lra_tensor_f32(params(first:last), grad(first:last))
    reeval_failure_done = .false.
    do step = 0, spec%steps - 1
      start = mod(step * BATCH, SAMPLES) + 1
      loss = evaluate(spec, start, with_grad=.true.)
      if (step == STEP_FAILURE) then
        call arm_failure(h, 0)
        status = lra_step(h, mine, 1_c_size_t, loss, 0.0_c_double, c_null_ptr)
        call expect_failure(h, status, "lra_step", step)
      end if
      call ok(lra_step(h, mine, 1_c_size_t, loss, 0.0_c_double, c_null_ptr), h, "lra_step")
      if (step == STEP_RESTART .and. ranks > 1) call restart(spec, cfg, h)

      call ok(lra_should_reeval(h, due), h, "lra_should_reeval")
      if (due /= 0) then
        after = evaluate(spec, start, with_grad=.false.) ! the same batch, new parameters
        if (step >= REEVAL_FAILURE .and. .not. reeval_failure_done) then
          call arm_failure(h, 0)
          status = lra_report_reeval(h, after, c_loc(info))
          call expect_failure(h, status, "lra_report_reeval", step)
          reeval_failure_done = .true.
        end if
        call ok(lra_report_reeval(h, after, c_loc(info)), h, "lra_report_reeval")
      else
        call ok(lra_get_lr(h, info%lr), h, "lra_get_lr")
        info = lra_reeval_info(ieee_value(0.0_c_double, ieee_quiet_nan), ieee_value(0.0_c_double, ieee_quiet_nan), &
                               ieee_value(0.0_c_double, ieee_quiet_nan), info%lr, info%lr, 99, 99)
      end if
      call expect_same_everywhere(info%lr, "eta", step)
      call expect_same_everywhere(real(info%decision, c_double), "decision", step)
      call expect_same_everywhere(real(info%skip_reason, c_double), "skip reason", step)
      call expect_same_everywhere(info%phi, "phi", step)

      rec(step + 1) = step_record(info%lr_before, info%lr, info%phi, info%rho, loss, info%decision, &
                                  info%skip_reason)
      if (.not. spec%sharded) then ! record the mean loss over ranks, as lra sees it
        v = [loss, 1.0_c_double]
        call MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_DOUBLE_PRECISION, MPI_SUM, MPI_COMM_WORLD)
        rec(step + 1)%loss = v(1) / v(2)
      end if
    end do
  end subroutine train

  ! The loss lra gets from this rank at the batch starting at `start` (and
  ! the gradient of this rank's tensor).
  real(c_double) function evaluate(spec, start, with_grad) result(loss)
    type(run_spec), intent(in) :: spec
    integer, intent(in) :: start
    logical, intent(in) :: with_grad
    if (spec%sharded) then
      call gather(params, world, ranks)
      if (with_grad) then
        loss = sharded_loss(params, start, rank, ranks, grad)
      else
        loss = sharded_loss(params, start, rank, ranks)
      end if
    else
      if (with_grad) then
        loss = dp_loss(params, start, world, rank, ranks, grad)
      else
        loss = dp_loss(params, start, world, rank, ranks)
      end if
    end if
  end function evaluate

  ! ---- the 1-rank reference ------------------------------------------------

  character(len=4096) function reference_path(spec)
    type(run_spec), intent(in) :: spec
    reference_path = trim(refdir) // "/" // trim(spec%name) // ".ref"
  end function reference_path

  subroutine write_reference(spec, rec, p)
    type(run_spec), intent(in) :: spec
    type(step_record), intent(in) :: rec(:)
    real(c_float), intent(in) :: p(NPARAMS)
    integer :: unit, ios
    open (newunit=unit, file=trim(reference_path(spec)), access="stream", form="unformatted", &
          status="replace", action="write", iostat=ios)
    if (ios /= 0) call fail("cannot write " // trim(reference_path(spec)))
    write (unit) size(rec), NPARAMS, rec, p
    close (unit)
    print '(a)', trim(spec%name) // ": 1-rank reference written: " // trim(summary(rec))
  end subroutine write_reference

  character(len=96) function summary(rec)
    type(step_record), intent(in) :: rec(:)
    write (summary, '(i0, a, i0, a, i0, a, i0, a, i0, a)') size(rec), " steps (raised ", &
      count(rec%decision == LRA_DECISION_RAISED), ", lowered ", count(rec%decision == LRA_DECISION_LOWERED), &
      ", kept ", count(rec%decision == LRA_DECISION_KEPT), ", skipped ", &
      count(rec%decision == LRA_DECISION_SKIPPED), ")"
  end function summary

  logical function close_enough(x, y, rel)
    real(c_double), intent(in) :: x, y, rel
    if (ieee_is_nan(x) .or. ieee_is_nan(y)) then
      close_enough = ieee_is_nan(x) .and. ieee_is_nan(y)
    else
      close_enough = abs(x - y) <= rel * max(1.0e-30_c_double, abs(x), abs(y))
    end if
  end function close_enough

  subroutine compare_reference(spec, rec, p)
    type(run_spec), intent(in) :: spec
    type(step_record), intent(in) :: rec(:)
    real(c_float), intent(in) :: p(NPARAMS)
    type(step_record), allocatable :: ref(:)
    real(c_float) :: ref_p(NPARAMS)
    real(real64) :: worst_phi, worst, scale
    integer :: unit, ios, steps, n, s
    character(len=16) :: step_text

    open (newunit=unit, file=trim(reference_path(spec)), access="stream", form="unformatted", &
          status="old", action="read", iostat=ios)
    if (ios /= 0) call fail("cannot read the 1-rank reference " // trim(reference_path(spec)) // &
                            " (run with -np 1 first)")
    read (unit) steps, n
    if (steps /= size(rec) .or. n /= NPARAMS) call fail(trim(reference_path(spec)) // " does not match this run")
    allocate (ref(steps))
    read (unit) ref, ref_p
    close (unit)

    worst_phi = 0
    do s = 1, steps
      write (step_text, '(i0)') s - 1
      if (any(transfer([rec(s)%lr_before, rec(s)%lr], [0_int64]) /= transfer([ref(s)%lr_before, ref(s)%lr], [0_int64])) &
          .or. rec(s)%decision /= ref(s)%decision .or. rec(s)%skip /= ref(s)%skip) &
        call fail(trim(spec%name) // " step " // trim(step_text) // ": eta " // trim(str(rec(s)%lr_before)) // &
                  " -> " // trim(str(rec(s)%lr)) // " here, " // trim(str(ref(s)%lr_before)) // " -> " // &
                  trim(str(ref(s)%lr)) // " on 1 rank (or another decision)")
      if (.not. (close_enough(rec(s)%phi, ref(s)%phi, 1.0e-4_c_double) .and. &
                 close_enough(rec(s)%rho, ref(s)%rho, 1.0e-3_c_double) .and. &
                 close_enough(rec(s)%loss, ref(s)%loss, 1.0e-5_c_double))) &
        call fail(trim(spec%name) // " step " // trim(step_text) // ": phi " // trim(str(rec(s)%phi)) // &
                  ", rho " // trim(str(rec(s)%rho)) // ", loss " // trim(str(rec(s)%loss)) // " here; " // &
                  trim(str(ref(s)%phi)) // ", " // trim(str(ref(s)%rho)) // ", " // trim(str(ref(s)%loss)) // &
                  " on 1 rank")
      if (.not. ieee_is_nan(ref(s)%phi)) worst_phi = max(worst_phi, abs(rec(s)%phi - ref(s)%phi) / abs(ref(s)%phi))
    end do
    worst = maxval(abs(real(p, real64) - real(ref_p, real64)))
    scale = maxval(abs(real(ref_p, real64)))
    ! f32 rounding: a gradient summed in another order may move a parameter
    ! by a few ulp per step.
    if (worst > 1.0e-5_real64 * (1 + scale)) call fail(trim(spec%name) // ": parameters differ from the 1-rank run by " // &
                                                      trim(str(worst)))
    if (count(rec%decision == LRA_DECISION_RAISED) + count(rec%decision == LRA_DECISION_LOWERED) == 0) &
      call fail(trim(spec%name) // ": eta never changed: the comparison would prove little")
    print '(a, i0, a, es8.2, a, i0, a, i0, a, es8.2, a, es8.2, a)', trim(spec%name) // " np=", ranks, ": " // &
      trim(summary(rec)) // ", eta decisions identical to 1 rank; max rel. phi diff ", worst_phi, "; params: ", &
      count(transfer(p, [0_int32]) /= transfer(ref_p, [0_int32])), "/", NPARAMS, " differ, max |dtheta| ", worst, &
      " (max |theta| ", scale, ")"
  end subroutine compare_reference

end program mpi_data_parallel
