! Fortran / HPC use of lra, the counterpart of examples/c/flat_buffer.c:
! every parameter of the model lives in ONE flat real(c_float) buffer (and
! every gradient in one more), and lra sees that buffer as a single tensor.
!
! The model is a linear least-squares fit y = A w + b on generated data,
! trained with minibatch Adam from two bad initial learning rates: 1e-5
! (far too small; lra must raise eta) and 1.0 (far too large; lra must lower
! it). Each run must cut the loss by a factor of 1000 and move eta the right
! way. The program also proves the binding: lra_config_init's defaults read
! back, error paths (status and message), the overflow flag of lra_step_ex,
! a Fortran reduction callback, the counters, and a checkpoint written to a
! file mid-run and loaded into a new handle, after which the run continues
! bit-identically to an uninterrupted one. Exits non-zero on any failure.
!
! Build against an installed lra (scripts/install.sh PREFIX):
!   gfortran -c PREFIX/include/lra.f90            # writes lra.mod
!   gfortran flat_buffer.f90 lra.o -LPREFIX/lib -llra -Wl,-rpath,PREFIX/lib

! The data and the model: y = A w + b, A with FEATURES columns.
module least_squares
  use, intrinsic :: iso_c_binding, only: c_float, c_double, c_int64_t
  implicit none
  private
  public :: FEATURES, SAMPLES, BATCH, NPARAMS, generate_data, batch_loss

  integer, parameter :: FEATURES = 32, SAMPLES = 1024, BATCH = 64
  ! The flat parameter buffer: w = params(1:FEATURES), b = params(NPARAMS).
  integer, parameter :: NPARAMS = FEATURES + 1
  real(c_float) :: a(FEATURES, SAMPLES), y(SAMPLES) ! sample i is a(:, i), y(i)
  integer(c_int64_t) :: rng_state = 42

contains

  ! Park-Miller "minimal standard" generator, uniform in (0, 1): deterministic
  ! and free of integer overflow in 64-bit arithmetic.
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

  ! Mean squared error over samples first .. first + count - 1 and, when grad
  ! is present, its gradient with respect to the flat parameter buffer.
  real(c_double) function batch_loss(params, first, count, grad) result(loss)
    real(c_float), intent(in) :: params(NPARAMS)
    integer, intent(in) :: first, count
    real(c_float), intent(out), optional :: grad(NPARAMS)
    real(c_double) :: r
    integer :: i

    loss = 0
    if (present(grad)) grad = 0
    do i = first, first + count - 1
      r = params(NPARAMS) + dot_product(real(params(1:FEATURES), c_double), real(a(:, i), c_double)) - y(i)
      loss = loss + r * r / count
      if (present(grad)) then
        grad(1:FEATURES) = grad(1:FEATURES) + real(2 * r * a(:, i) / count, c_float)
        grad(NPARAMS) = grad(NPARAMS) + real(2 * r / count, c_float)
      end if
    end do
  end function batch_loss

end module least_squares

! A reduction callback written in Fortran (lra_reduce_fn). With one rank every
! value already is its sum over all ranks; an MPI code would call
!   MPI_Allreduce(MPI_IN_PLACE, values, int(count), MPI_DOUBLE_PRECISION, MPI_SUM, comm, ierr)
! here. It records the first two values of each call, through the user pointer.
module one_rank
  use, intrinsic :: iso_c_binding, only: c_ptr, c_int, c_size_t, c_double, c_int32_t, c_f_pointer
  implicit none

  ! BIND(C): an interoperable type, so that c_f_pointer from the callback's
  ! `user` is portable (flang warns for a type that is not).
  type, bind(C) :: reduction_log
    integer(c_int) :: calls = 0
    integer(c_size_t) :: count = 0 ! of the latest call
    real(c_double) :: values(2, 4) = 0 ! values(:, k): the k-th call's first two
  end type reduction_log

contains

  function sum_over_one_rank(values, count, user) bind(C) result(rc)
    real(c_double), intent(inout) :: values(*)
    integer(c_size_t), value :: count
    type(c_ptr), value :: user
    integer(c_int32_t) :: rc
    type(reduction_log), pointer :: log

    call c_f_pointer(user, log)
    log%calls = log%calls + 1
    log%count = count
    if (log%calls <= size(log%values, 2)) then
      log%values(1:min(count, 2_c_size_t), log%calls) = values(1:min(count, 2_c_size_t))
    end if
    rc = 0
  end function sum_over_one_rank

end module one_rank

program flat_buffer
  use, intrinsic :: iso_c_binding
  use, intrinsic :: ieee_arithmetic, only: ieee_is_nan, ieee_is_finite
  use lra
  use least_squares
  use one_rank
  implicit none

  integer, parameter :: EPOCHS = 40, STEPS_PER_EPOCH = SAMPLES / BATCH
  ! params and grad must be TARGETs: lra_step writes params through the
  ! pointer in the tensor, and TARGET tells the compiler memory may change so.
  real(c_float), target :: params(NPARAMS), grad(NPARAMS)
  type(lra_tensor) :: flat(1)
  real(c_float) :: reference_params(NPARAMS)
  integer(c_int8_t), allocatable :: reference_state(:), resumed_state(:)
  real(c_double) :: lr
  integer :: failures = 0
  type(c_ptr) :: h

  call generate_data()
  call check_binding()

  ! Adam from eta = 1e-5 (too small) and from 1.0 (too large).
  call check_training(1.0e-5_c_double, reference_state)
  reference_params = params
  call check_training(1.0_c_double)

  ! The first run again, interrupted half-way: checkpoint + parameters to a
  ! file, handle destroyed, a new handle restored from the file.
  call check_resume()
  deallocate (reference_state, resumed_state)

  if (failures > 0) then
    print '(a, i0, a)', "FAIL: ", failures, " check(s) failed"
    stop 1
  end if
  print '(a)', "all checks passed"

contains

  ! ---- checking helpers ----------------------------------------------------

  subroutine require(condition, what)
    logical, intent(in) :: condition
    character(*), intent(in) :: what
    if (.not. condition) then
      print '(a)', "FAIL: " // what
      failures = failures + 1
    end if
  end subroutine require

  ! A call that must succeed: on failure print lra's status and message, stop.
  subroutine ok(status, handle, what)
    integer(c_int32_t), intent(in) :: status
    type(c_ptr), intent(in) :: handle
    character(*), intent(in) :: what
    if (status == LRA_OK) return
    print '(a)', "FAIL: " // what // ": " // lra_string(lra_status_string(status)) // &
      " (" // lra_string(lra_last_error(handle)) // ")"
    stop 2
  end subroutine ok

  ! A call that must fail with `want` and leave a non-empty message.
  subroutine expect(status, want, message, what)
    integer(c_int32_t), intent(in) :: status, want
    character(*), intent(in) :: message, what
    print '(a)', "  " // what // " -> " // message
    call require(status == want, what // " returned " // lra_string(lra_status_string(status)) // &
                 ", not " // lra_string(lra_status_string(want)))
    call require(len(message) > 0, what // " left no message")
  end subroutine expect

  ! Bitwise equality (exact, NaN-safe, and no -Wcompare-reals).
  elemental logical function same(x, y)
    real(c_double), intent(in) :: x, y
    same = transfer(x, 0_c_int64_t) == transfer(y, 0_c_int64_t)
  end function same

  logical function same_f32(x, y)
    real(c_float), intent(in) :: x(:), y(:)
    same_f32 = all(transfer(x, [0_c_int32_t]) == transfer(y, [0_c_int32_t]))
  end function same_f32

  type(c_ptr) function create(optimizer, initial_lr) result(handle)
    integer(c_int32_t), intent(in) :: optimizer
    real(c_double), intent(in) :: initial_lr
    type(lra_config) :: cfg
    call lra_config_init(cfg, optimizer)
    cfg%lr = initial_lr
    cfg%num_threads = 1
    call ok(lra_create(cfg, handle), c_null_ptr, "lra_create")
  end function create

  ! ---- the binding ---------------------------------------------------------

  subroutine check_binding()
    type(lra_config), target :: cfg
    type(lra_reeval_info), target :: info
    type(reduction_log), target :: log
    type(c_ptr) :: handle
    real(c_float), target :: x(4), g(4), overflow
    integer(c_int16_t), target :: xb(3), gb(3), no_h(0)
    ! the 16-bit dtypes' patterns of 1.0 and 0.5, and their names
    integer(c_int32_t), parameter :: DTYPE_16(2) = [LRA_DTYPE_BF16, LRA_DTYPE_F16]
    integer(c_int16_t), parameter :: ONE_16(2) = [int(z'3F80', c_int16_t), int(z'3C00', c_int16_t)]
    integer(c_int16_t), parameter :: HALF_16(2) = [int(z'3F00', c_int16_t), int(z'3800', c_int16_t)]
    character(len=4), parameter :: NAME_16(2) = ["BF16", "F16 "]
    integer :: k
    real(c_float), target :: one(1), no_x(0)
    type(lra_tensor) :: t
    real(c_float) :: x_before(4)
    real(c_double) :: value
    integer(c_int32_t) :: status, version, flag
    integer(c_size_t) :: need
    integer(c_int8_t), allocatable :: buf(:)

    version = lra_version()
    print '(a, i0, ".", i0, ".", i0)', "lra ", version / 65536, mod(version / 256, 256), mod(version, 256)
    call require(version > 0, "lra_version() > 0")

    ! lra_config_init: every documented default, read back field by field
    ! (a field at the wrong offset reads back as some other value).
    call lra_config_init(cfg, LRA_OPTIMIZER_ADAM)
    call require(cfg%struct_size == int(c_sizeof(cfg), c_int32_t), "struct_size = c_sizeof(lra_config)")
    call require(cfg%optimizer == LRA_OPTIMIZER_ADAM .and. cfg%device == LRA_DEVICE_HOST &
                 .and. cfg%device_ordinal == 0, "optimizer, device, device_ordinal")
    call require(same(cfg%lr, 1.0e-3_c_double) .and. same(cfg%momentum, 0.5_c_double) &
                 .and. same(cfg%alpha, 0.99_c_double) .and. same(cfg%beta1, 0.5_c_double) &
                 .and. same(cfg%beta2, 0.999_c_double) .and. same(cfg%eps, 1.0e-8_c_double) &
                 .and. same(cfg%weight_decay, 0.0_c_double), "lr and optimizer hyper-parameters")
    call require(ieee_is_nan(cfg%f_star) .and. same(cfg%factor_up, 1.2_c_double) &
                 .and. same(cfg%factor_down, 0.5_c_double) &
                 .and. same(cfg%threshold_up, 4.0_c_double / 3.0_c_double) &
                 .and. same(cfg%threshold_down, 0.75_c_double), "f_star, factors, thresholds")
    call require(same(cfg%lr_min, 0.0_c_double) .and. .not. ieee_is_finite(cfg%lr_max) .and. cfg%lr_max > 0 &
                 .and. .not. ieee_is_finite(cfg%scale_max) .and. cfg%scale_max > 0 &
                 .and. same(cfg%denom_eps, 0.0_c_double), "lr_min, lr_max, scale_max, denom_eps")
    call require(cfg%check_finite == 1 .and. cfg%num_threads == 0 .and. cfg%reeval_schedule == LRA_REEVAL_ALWAYS &
                 .and. cfg%reeval_every == 1 .and. same(cfg%reeval_growth, 1.1_c_double) &
                 .and. cfg%sharding == LRA_SHARDING_REPLICATED .and. cfg%loss_is_rank_local == 0, &
                 "check_finite, num_threads, re-evaluation schedule, sharding, loss_is_rank_local")
    call lra_config_init(cfg, LRA_OPTIMIZER_ADAMW)
    call require(same(cfg%weight_decay, 1.0e-2_c_double), "AdamW weight_decay = 1e-2")
    call lra_config_init(cfg, LRA_OPTIMIZER_ADAGRAD)
    call require(same(cfg%eps, 1.0e-10_c_double), "Adagrad eps = 1e-10")
    print '(a)', "config defaults: every lra_config field reads back as documented"

    print '(a)', "error paths:"
    call lra_config_init(cfg, LRA_OPTIMIZER_ADAM)
    cfg%beta1 = 2
    handle = c_loc(cfg) ! any non-NULL value: a failed lra_create must set it to NULL
    status = lra_create(cfg, handle)
    call expect(status, LRA_INVALID_CONFIG, lra_string(lra_thread_last_error()), "lra_create(beta1 = 2)")
    call require(.not. c_associated(handle), "a failed lra_create returns a NULL handle")
    call require(index(lra_string(lra_thread_last_error()), "beta1") > 0, "the message names beta1")

    status = lra_get_lr(c_null_ptr, value)
    call expect(status, LRA_NULL_POINTER, lra_string(lra_last_error(c_null_ptr)), "lra_get_lr(NULL handle)")

    handle = create(LRA_OPTIMIZER_ADAM, 1.0e-3_c_double)
    status = lra_set_lr(handle, -1.0_c_double)
    call expect(status, LRA_INVALID_ARGUMENT, lra_string(lra_last_error(handle)), "lra_set_lr(h, -1)")
    ! The handle's own message, not the thread's (lra_last_error falls back
    ! to the thread's message for anything that is not a live handle, e.g.
    ! a handle passed by reference by mistake): fail another call first.
    status = lra_get_lr(c_null_ptr, value)
    call require(index(lra_string(lra_last_error(handle)), "lra_set_lr") > 0, &
                 "lra_last_error(h) keeps this handle's lra_set_lr failure after another thread-level failure")
    call ok(lra_get_lr(handle, value), handle, "lra_get_lr")
    call require(same(value, 1.0e-3_c_double), "a refused lra_set_lr leaves eta unchanged")
    status = lra_report_reeval(handle, 1.0_c_double, c_null_ptr)
    call expect(status, LRA_CALL_ORDER, lra_string(lra_last_error(handle)), "lra_report_reeval before any step")
    status = lra_should_reeval(handle, flag)
    call expect(status, LRA_CALL_ORDER, lra_string(lra_last_error(handle)), "lra_should_reeval before any step")
    status = lra_get_last_reeval(handle, info)
    call expect(status, LRA_CALL_ORDER, lra_string(lra_last_error(handle)), "lra_get_last_reeval before any")
    call ok(lra_get_last_phi(handle, value), handle, "lra_get_last_phi")
    call require(ieee_is_nan(value), "phi is NaN before the first step")

    ! A step flagged by an overflow check (lra_step_ex's found_inf) writes
    ! nothing and is reported as skipped.
    x = [1, 2, 3, 4]
    g = 1
    x_before = x
    flat(1) = lra_tensor_f32(x, g)
    overflow = 1
    call ok(lra_step_ex(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_loc(overflow), c_null_ptr), &
            handle, "lra_step_ex")
    call require(same_f32(x, x_before), "a step with found_inf set leaves the parameters unchanged")
    call ok(lra_report_reeval(handle, 1.0_c_double, c_loc(info)), handle, "lra_report_reeval")
    call require(info%decision == LRA_DECISION_SKIPPED .and. info%skip_reason == LRA_SKIP_FOUND_INF, &
                 "the flagged step is reported SKIPPED / FOUND_INF")
    ! ... and a clear flag does not skip (found_inf passed by reference by
    ! mistake would read the pointer's own bits as the flag: never zero).
    overflow = 0
    call ok(lra_step_ex(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_loc(overflow), c_null_ptr), &
            handle, "lra_step_ex(found_inf = 0)")
    call require(.not. same_f32(x, x_before), "a step with found_inf = 0 moves the parameters")
    call ok(lra_report_reeval(handle, 0.5_c_double, c_loc(info)), handle, "lra_report_reeval")
    call require(info%decision /= LRA_DECISION_SKIPPED, "the unflagged step is not reported SKIPPED")
    status = lra_step(handle, flat, 1_c_size_t, 1.0_c_double, -1.0_c_double, c_null_ptr)
    call expect(status, LRA_INVALID_ARGUMENT, lra_string(lra_last_error(handle)), "lra_step(obs_var = -1)")
    flat(1) = lra_tensor_f32(x(1:3), g(1:3))
    status = lra_step(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    call expect(status, LRA_SIZE_MISMATCH, lra_string(lra_last_error(handle)), "lra_step(3 elements after 4)")
    flat(1) = lra_tensor_f32(x, g)
    flat(1)%reserved = 1
    status = lra_step(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    call expect(status, LRA_INVALID_ARGUMENT, lra_string(lra_last_error(handle)), "lra_step(reserved = 1)")
    call require(index(lra_string(lra_last_error(handle)), "tensors[0].reserved") > 0, &
                 "the message names tensors[0].reserved")
    call ok(lra_state_size(handle, need), handle, "lra_state_size")
    allocate (buf(need))
    status = lra_save_state(handle, buf, need - 1, c_null_ptr)
    call expect(status, LRA_BUFFER_TOO_SMALL, lra_string(lra_last_error(handle)), "lra_save_state(len - 1)")
    call require(lra_string(lra_status_string(99_c_int32_t)) == "unknown status", &
                 'lra_status_string(99) is "unknown status"')
    call lra_destroy(handle)

    ! Rank-local losses need the cross-rank sum: without it the step is
    ! refused; with the Fortran callback lra sums (loss, 1) in lra_step and
    ! (loss_after, 1) in lra_report_reeval.
    call lra_config_init(cfg, LRA_OPTIMIZER_ADAM)
    cfg%num_threads = 1
    cfg%loss_is_rank_local = 1
    call ok(lra_create(cfg, handle), c_null_ptr, "lra_create(loss_is_rank_local = 1)")
    flat(1) = lra_tensor_f32(x, g)
    status = lra_step(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr)
    call expect(status, LRA_CALL_ORDER, lra_string(lra_last_error(handle)), "lra_step(rank-local, no reduction)")
    call ok(lra_set_reduction_proc(handle, sum_over_one_rank, c_loc(log)), handle, "lra_set_reduction_proc")
    call ok(lra_step(handle, flat, 1_c_size_t, 0.5_c_double, 0.0_c_double, c_null_ptr), handle, "lra_step")
    call ok(lra_report_reeval(handle, 0.25_c_double, c_null_ptr), handle, "lra_report_reeval")
    call require(log%calls == 2 .and. log%count == 2 &
                 .and. all(same(log%values(:, 1), [0.5_c_double, 1.0_c_double])) &
                 .and. all(same(log%values(:, 2), [0.25_c_double, 1.0_c_double])), &
                 "the reduction callback got (loss, 1), then (loss_after, 1)")
    status = lra_set_reduction(handle, c_null_funptr, c_null_ptr)
    call expect(status, LRA_INVALID_ARGUMENT, lra_string(lra_last_error(handle)), &
                "lra_set_reduction(NULL) on a rank-local handle")
    call lra_destroy(handle)
    print '(a, i0, a)', "reduction callback (Fortran, bind(C)): called ", log%calls, &
      " times, with (loss, 1) and (loss_after, 1)"

    ! lra_tensor_16: one SGD step on BF16, then on F16, bit patterns:
    ! 1.0 - 0.5 * 1.0 = 0.5 (BF16 z'3F80' -> z'3F00', F16 z'3C00' -> z'3800').
    call lra_config_init(cfg, LRA_OPTIMIZER_SGD)
    cfg%lr = 0.5_c_double
    cfg%num_threads = 1
    do k = 1, 2
      call ok(lra_create(cfg, handle), c_null_ptr, "lra_create(SGD)")
      xb = ONE_16(k)
      gb = ONE_16(k)
      flat(1) = lra_tensor_16(xb, gb, DTYPE_16(k))
      call ok(lra_step(handle, flat, 1_c_size_t, 1.0_c_double, 0.0_c_double, c_null_ptr), handle, &
              "lra_step(" // trim(NAME_16(k)) // ")")
      call require(all(xb == HALF_16(k)), "lra_tensor_16: a " // trim(NAME_16(k)) // &
                   " SGD step gives 1.0 - 0.5 * 1.0 = 0.5")
      call lra_destroy(handle)
    end do
    print '(a)', "lra_tensor_16: BF16 and F16 SGD steps give the expected bits"

    ! What the tensor helpers store: the arrays' own addresses (one element
    ! too), the size and the dtype; NULL addresses for empty arrays.
    t = lra_tensor_f32(one, one)
    call require(c_associated(t%param, c_loc(one)) .and. c_associated(t%grad, c_loc(one)) .and. &
                 t%numel == 1 .and. t%dtype == LRA_DTYPE_F32 .and. t%reserved == 0, "lra_tensor_f32 of one element")
    t = lra_tensor_16(xb(1:1), gb(1:1), LRA_DTYPE_BF16)
    call require(c_associated(t%param, c_loc(xb)) .and. c_associated(t%grad, c_loc(gb)) .and. &
                 t%numel == 1 .and. t%dtype == LRA_DTYPE_BF16 .and. t%reserved == 0, "lra_tensor_16 of one element")
    t = lra_tensor_f32(no_x, no_x)
    call require(.not. c_associated(t%param) .and. .not. c_associated(t%grad) .and. t%numel == 0 .and. &
                 t%dtype == LRA_DTYPE_F32 .and. t%reserved == 0, "lra_tensor_f32 of empty arrays: NULL addresses")
    t = lra_tensor_16(no_h, no_h, LRA_DTYPE_F16)
    call require(.not. c_associated(t%param) .and. .not. c_associated(t%grad) .and. t%numel == 0 .and. &
                 t%dtype == LRA_DTYPE_F16 .and. t%reserved == 0, "lra_tensor_16 of empty arrays: NULL addresses")
    call require(lra_string(c_null_ptr) == "", "lra_string(c_null_ptr) is empty")
  end subroutine check_binding

  ! ---- training ------------------------------------------------------------

  ! Epochs first_epoch .. last_epoch on the handle `h` over params/grad:
  ! a step, then (when the schedule asks, here always) the loss on the SAME
  ! batch after it, reported so that lra adapts eta.
  subroutine train(first_epoch, last_epoch, verbose)
    integer, intent(in) :: first_epoch, last_epoch
    logical, intent(in) :: verbose
    type(lra_reeval_info) :: info
    real(c_double) :: loss, after, phi
    integer(c_int32_t) :: want
    integer :: epoch, start

    do epoch = first_epoch, last_epoch
      do start = 1, SAMPLES, BATCH
        loss = batch_loss(params, start, BATCH, grad)
        call ok(lra_step(h, flat, size(flat, kind=c_size_t), loss, 0.0_c_double, c_null_ptr), h, "lra_step")
        call ok(lra_should_reeval(h, want), h, "lra_should_reeval")
        if (want /= 0) then
          after = batch_loss(params, start, BATCH) ! forward only
          call ok(lra_report_reeval(h, after, c_null_ptr), h, "lra_report_reeval")
        end if
      end do
      if (verbose .and. any(epoch == [1, 2, 5, 10, 20, 30, 40])) then
        call ok(lra_get_lr(h, lr), h, "lra_get_lr")
        call ok(lra_get_last_phi(h, phi), h, "lra_get_last_phi")
        call ok(lra_get_last_reeval(h, info), h, "lra_get_last_reeval")
        print '(a, i3, a, es10.3, a, es10.3, a, es10.3, a, f6.3)', "  epoch", epoch, ": loss", &
          batch_loss(params, 1, SAMPLES), ", eta", lr, ", phi", phi, ", rho", info%rho
      end if
    end do
  end subroutine train

  ! The current checkpoint of `h`.
  subroutine save(state)
    integer(c_int8_t), allocatable, intent(out) :: state(:)
    integer(c_size_t), target :: need, written
    call ok(lra_state_size(h, need), h, "lra_state_size")
    allocate (state(need))
    call ok(lra_save_state(h, state, need, c_loc(written)), h, "lra_save_state")
    call require(written == need, "lra_save_state writes lra_state_size bytes")
  end subroutine save

  ! One uninterrupted run of EPOCHS epochs from eta = initial_lr.
  subroutine check_training(initial_lr, final_state)
    real(c_double), intent(in) :: initial_lr
    integer(c_int8_t), allocatable, intent(out), optional :: final_state(:)
    type(lra_counters) :: c
    real(c_double) :: initial_loss, final_loss
    integer(c_int64_t), parameter :: STEPS = EPOCHS * STEPS_PER_EPOCH

    params = 0
    flat(1) = lra_tensor_f32(params, grad) ! the whole model is one lra tensor
    h = create(LRA_OPTIMIZER_ADAM, initial_lr)
    initial_loss = batch_loss(params, 1, SAMPLES)
    print '(a, i0, a, es9.2, a, es10.3)', "Adam, flat buffer of ", NPARAMS, " parameters, initial eta ", &
      initial_lr, ", loss", initial_loss
    call train(1, EPOCHS, .true.)
    final_loss = batch_loss(params, 1, SAMPLES)
    call ok(lra_get_lr(h, lr), h, "lra_get_lr")
    call ok(lra_get_counters(h, c), h, "lra_get_counters")
    print '(a, es10.3, a, es9.2, a, es9.2, a, i0, a, i0, a, i0, a, i0, a)', "  final loss", final_loss, &
      " (", final_loss / initial_loss, " of the initial), eta ", lr, "; ", c%steps, " steps: ", &
      c%raised, " raised, ", c%lowered, " lowered, ", c%kept, " kept"
    call require(c%steps == STEPS .and. c%applied == STEPS .and. c%skipped == 0 .and. c%reevals == STEPS &
                 .and. c%raised + c%lowered + c%kept + c%reeval_skipped == STEPS, "counters add up")
    call require(final_loss < 1.0e-3_c_double * initial_loss, "the loss falls by a factor of 1000")
    if (initial_lr < 1.0e-3_c_double) then
      call require(lr > 100 * initial_lr, "lra raises a too small eta by more than 100x")
    else
      call require(lr < 0.1_c_double * initial_lr, "lra lowers a too large eta by more than 10x")
    end if
    if (present(final_state)) call save(final_state)
    call lra_destroy(h)
  end subroutine check_training

  ! The first run, interrupted after EPOCHS / 2 epochs: its checkpoint and
  ! the parameters go to a file, the handle is destroyed and the parameters
  ! overwritten; a new handle loads the checkpoint and finishes the run.
  ! Parameters, eta and the final checkpoint must equal the uninterrupted
  ! run's, bit for bit.
  subroutine check_resume()
    integer(c_int8_t), allocatable :: state(:)
    integer(c_size_t) :: n
    integer :: unit

    params = 0
    flat(1) = lra_tensor_f32(params, grad)
    h = create(LRA_OPTIMIZER_ADAM, 1.0e-5_c_double)
    call train(1, EPOCHS / 2, .false.)
    call save(state)
    open (newunit=unit, status="scratch", access="stream", form="unformatted", action="readwrite")
    write (unit) size(state, kind=c_size_t), state, params
    call lra_destroy(h)
    deallocate (state)
    params = huge(params)

    h = create(LRA_OPTIMIZER_ADAM, 1.0e-5_c_double)
    rewind (unit)
    read (unit) n
    allocate (state(n))
    read (unit) state, params
    close (unit)
    call ok(lra_load_state(h, state, n), h, "lra_load_state")
    call train(EPOCHS / 2 + 1, EPOCHS, .false.)
    call save(resumed_state)
    call lra_destroy(h)

    call require(same_f32(params, reference_params), "resumed parameters equal the uninterrupted run's bits")
    call require(size(resumed_state) == size(reference_state), "resumed checkpoint has the same size")
    if (size(resumed_state) == size(reference_state)) then
      call require(all(resumed_state == reference_state), "resumed checkpoint equals the uninterrupted run's bytes")
    end if
    print '(a, i0, a, i0, a)', "checkpoint: ", n, " bytes saved after epoch ", EPOCHS / 2, &
      " to a file, loaded into a new handle; parameters and final checkpoint are bit-identical to the uninterrupted run"
  end subroutine check_resume

end program flat_buffer
