! Fortran binding of lra (include/lra.h), Fortran 2008 + ISO_C_BINDING.
!
! Everything below mirrors include/lra.h one to one: the four structs as
! bind(C) derived types (same fields, same order, same layout), every
! constant as a named parameter, every function as a bind(C) interface with
! the C name. A few small helpers are added: lra_string (a C string from
! lra_last_error & co. as a Fortran string), lra_tensor_f32 and
! lra_tensor_16 (an lra_tensor over two contiguous real(c_float), or
! integer(c_int16_t) F16/BF16 bit-pattern, arrays) and
! lra_set_reduction_proc (lra_set_reduction with the callback's interface
! checked by the compiler). Nothing hides a status: every function that
! returns one in C returns it here.
!
! Type mapping (Fortran has no unsigned integers):
!   uint32_t, int32_t, lra_status, the enums  -> integer(c_int32_t)
!   uint64_t                                  -> integer(c_int64_t)
!   size_t -> integer(c_size_t); double -> real(c_double)
!   lra_handle *, const char *, stream, any NULL-able pointer -> type(c_ptr), value
!   required struct/scalar out-parameters     -> typed reference, intent(inout):
!     lra leaves them unchanged when a call fails, so they are not intent(out)
!   checkpoint buffers (void *)               -> integer(c_int8_t) arrays
! Values above 2**31 - 1 (uint32) or 2**63 - 1 (uint64) read back negative;
! lra's counters and enums stay far below.
!
! bindings/fortran/check_interfaces.py proves this file against lra.h
! (gfortran -fc-prototypes), bindings/fortran/layout.{c,f90} compare the
! struct layouts, and examples/fortran/flat_buffer.f90 calls every function.
module lra
  use, intrinsic :: iso_c_binding, only: c_ptr, c_funptr, c_null_ptr, c_char, c_int8_t, c_int16_t, &
                                         c_int32_t, c_int64_t, c_size_t, c_double, c_float, &
                                         c_associated, c_f_pointer, c_loc, c_funloc, &
                                         c_intptr_t, c_sizeof
  implicit none
  ! The ISO_C_BINDING names are not re-exported: `use, intrinsic ::
  ! iso_c_binding` next to `use lra` (gfortran 12 mistypes c_loc reached
  ! through another module: c_associated(c_loc(x)) is refused).
  private :: c_ptr, c_funptr, c_null_ptr, c_char, c_int8_t, c_int16_t, c_int32_t, c_int64_t, c_size_t, &
             c_double, c_float, c_associated, c_f_pointer, c_loc, c_funloc, c_strlen, &
             c_intptr_t, c_sizeof, dense_f32, dense_16

  ! Configuration. Fill it with lra_config_init first, then change fields.
  type, bind(C) :: lra_config
    integer(c_int32_t) :: struct_size
    integer(c_int32_t) :: optimizer
    integer(c_int32_t) :: device
    integer(c_int32_t) :: device_ordinal
    real(c_double) :: lr
    real(c_double) :: momentum
    real(c_double) :: alpha
    real(c_double) :: beta1
    real(c_double) :: beta2
    real(c_double) :: eps
    real(c_double) :: weight_decay
    real(c_double) :: f_star
    real(c_double) :: factor_up
    real(c_double) :: factor_down
    real(c_double) :: threshold_up
    real(c_double) :: threshold_down
    real(c_double) :: lr_min
    real(c_double) :: lr_max
    real(c_double) :: scale_max
    real(c_double) :: denom_eps
    integer(c_int32_t) :: check_finite
    integer(c_int32_t) :: num_threads
    integer(c_int32_t) :: reeval_schedule
    integer(c_int32_t) :: reeval_every
    real(c_double) :: reeval_growth
    integer(c_int32_t) :: sharding
    integer(c_int32_t) :: loss_is_rank_local
  end type lra_config

  ! One parameter tensor and its gradient (same dtype, numel elements).
  ! reserved must be 0 (reserved for later use; lra refuses the step
  ! otherwise): default-initialized, and set by lra_tensor_f32/_16.
  type, bind(C) :: lra_tensor
    type(c_ptr) :: param
    type(c_ptr) :: grad
    integer(c_int64_t) :: numel
    integer(c_int32_t) :: dtype
    integer(c_int32_t) :: reserved = 0
  end type lra_tensor

  ! What a re-evaluation found and decided.
  type, bind(C) :: lra_reeval_info
    real(c_double) :: phi
    real(c_double) :: rho
    real(c_double) :: scale
    real(c_double) :: lr_before
    real(c_double) :: lr
    integer(c_int32_t) :: decision
    integer(c_int32_t) :: skip_reason
  end type lra_reeval_info

  ! Step and decision counters.
  type, bind(C) :: lra_counters
    integer(c_int64_t) :: steps
    integer(c_int64_t) :: applied
    integer(c_int64_t) :: skipped
    integer(c_int64_t) :: reevals
    integer(c_int64_t) :: raised
    integer(c_int64_t) :: lowered
    integer(c_int64_t) :: kept
    integer(c_int64_t) :: reeval_skipped
  end type lra_counters

  ! The lra.h this module mirrors, in lra_version()'s encoding (0.1.0).
  integer(c_int32_t), parameter :: LRA_HEADER_VERSION = 256

  ! Statuses (lra_status).
  integer(c_int32_t), parameter :: LRA_OK = 0
  integer(c_int32_t), parameter :: LRA_NULL_POINTER = 1
  integer(c_int32_t), parameter :: LRA_INVALID_ARGUMENT = 2
  integer(c_int32_t), parameter :: LRA_INVALID_CONFIG = 3
  integer(c_int32_t), parameter :: LRA_CALL_ORDER = 4
  integer(c_int32_t), parameter :: LRA_SIZE_MISMATCH = 5
  integer(c_int32_t), parameter :: LRA_NO_CUDA = 6
  integer(c_int32_t), parameter :: LRA_CUDA_ERROR = 7
  integer(c_int32_t), parameter :: LRA_BAD_CHECKPOINT = 8
  integer(c_int32_t), parameter :: LRA_BUFFER_TOO_SMALL = 9
  integer(c_int32_t), parameter :: LRA_PANIC = 10
  integer(c_int32_t), parameter :: LRA_UNSUPPORTED = 11
  integer(c_int32_t), parameter :: LRA_REDUCTION_FAILED = 12
  integer(c_int32_t), parameter :: LRA_OUT_OF_MEMORY = 13
  ! lra_optimizer
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_SGD = 0
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_MOMENTUM = 1
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_NESTEROV = 2
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_ADAGRAD = 3
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_RMSPROP = 4
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_ADAM = 5
  integer(c_int32_t), parameter :: LRA_OPTIMIZER_ADAMW = 6
  ! lra_dtype (there is no f64: real(c_double) parameters cannot be stepped;
  ! F16/BF16 tensors: lra_tensor_16 over integer(c_int16_t) bit patterns)
  integer(c_int32_t), parameter :: LRA_DTYPE_F32 = 0
  integer(c_int32_t), parameter :: LRA_DTYPE_F16 = 1
  integer(c_int32_t), parameter :: LRA_DTYPE_BF16 = 2
  ! lra_device
  integer(c_int32_t), parameter :: LRA_DEVICE_HOST = 0
  integer(c_int32_t), parameter :: LRA_DEVICE_CUDA = 1
  ! lra_decision
  integer(c_int32_t), parameter :: LRA_DECISION_KEPT = 0
  integer(c_int32_t), parameter :: LRA_DECISION_RAISED = 1
  integer(c_int32_t), parameter :: LRA_DECISION_LOWERED = 2
  integer(c_int32_t), parameter :: LRA_DECISION_SKIPPED = 3
  ! lra_skip_reason
  integer(c_int32_t), parameter :: LRA_SKIP_NONE = 0
  integer(c_int32_t), parameter :: LRA_SKIP_NONFINITE_LOSS = 1
  integer(c_int32_t), parameter :: LRA_SKIP_NONFINITE_GRAD = 2
  integer(c_int32_t), parameter :: LRA_SKIP_FOUND_INF = 3
  integer(c_int32_t), parameter :: LRA_SKIP_NONPOSITIVE_PHI = 4
  integer(c_int32_t), parameter :: LRA_SKIP_NONFINITE_PHI = 5
  integer(c_int32_t), parameter :: LRA_SKIP_ZERO_SCALE = 6
  ! lra_reeval_schedule
  integer(c_int32_t), parameter :: LRA_REEVAL_ALWAYS = 0
  integer(c_int32_t), parameter :: LRA_REEVAL_EVERY = 1
  integer(c_int32_t), parameter :: LRA_REEVAL_GEOMETRIC = 2
  ! lra_sharding
  integer(c_int32_t), parameter :: LRA_SHARDING_REPLICATED = 0
  integer(c_int32_t), parameter :: LRA_SHARDING_SHARDED = 1

  ! lra_reduce_fn: a cross-rank sum of values(1:count) in place; 0 = success.
  ! Declare a callback as `procedure(lra_reduce_fn)` (or assign it to such a
  ! procedure pointer) to have its signature checked, and pass c_funloc(it).
  abstract interface
    function lra_reduce_fn(values, count, user) bind(C) result(rc)
      import :: c_double, c_size_t, c_ptr, c_int32_t
      real(c_double), intent(inout) :: values(*)
      integer(c_size_t), value :: count
      type(c_ptr), value :: user
      integer(c_int32_t) :: rc
    end function lra_reduce_fn
  end interface

  interface
    subroutine lra_config_init(cfg, optimizer) bind(C, name="lra_config_init")
      import :: lra_config, c_int32_t
      type(lra_config), intent(out) :: cfg
      integer(c_int32_t), value :: optimizer
    end subroutine lra_config_init

    function lra_create(cfg, out) bind(C, name="lra_create") result(status)
      import :: lra_config, c_ptr, c_int32_t
      type(lra_config), intent(in) :: cfg
      type(c_ptr), intent(out) :: out
      integer(c_int32_t) :: status
    end function lra_create

    subroutine lra_destroy(h) bind(C, name="lra_destroy")
      import :: c_ptr
      type(c_ptr), value :: h
    end subroutine lra_destroy

    ! stream: a CUstream for CUDA handles (c_null_ptr = legacy default stream),
    ! c_null_ptr for host handles.
    function lra_step(h, tensors, count, loss, obs_var, stream) bind(C, name="lra_step") result(status)
      import :: lra_tensor, c_ptr, c_size_t, c_double, c_int32_t
      type(c_ptr), value :: h
      type(lra_tensor), intent(in) :: tensors(*)
      integer(c_size_t), value :: count
      real(c_double), value :: loss
      real(c_double), value :: obs_var
      type(c_ptr), value :: stream
      integer(c_int32_t) :: status
    end function lra_step

    ! found_inf: c_loc of one real(c_float) (device memory on CUDA), or c_null_ptr.
    ! It must be real(c_float): lra reads 4 bytes as an f32 (a real(c_double) 1.0
    ! reads as 0.0, and the flagged step is taken).
    function lra_step_ex(h, tensors, count, loss, obs_var, found_inf, stream) &
        bind(C, name="lra_step_ex") result(status)
      import :: lra_tensor, c_ptr, c_size_t, c_double, c_int32_t
      type(c_ptr), value :: h
      type(lra_tensor), intent(in) :: tensors(*)
      integer(c_size_t), value :: count
      real(c_double), value :: loss
      real(c_double), value :: obs_var
      type(c_ptr), value :: found_inf
      type(c_ptr), value :: stream
      integer(c_int32_t) :: status
    end function lra_step_ex

    ! out: c_loc of a type(lra_reeval_info), target, or c_null_ptr.
    function lra_report_reeval(h, loss_after, out) bind(C, name="lra_report_reeval") result(status)
      import :: c_ptr, c_double, c_int32_t
      type(c_ptr), value :: h
      real(c_double), value :: loss_after
      type(c_ptr), value :: out
      integer(c_int32_t) :: status
    end function lra_report_reeval

    function lra_get_last_reeval(h, out) bind(C, name="lra_get_last_reeval") result(status)
      import :: lra_reeval_info, c_ptr, c_int32_t
      type(c_ptr), value :: h
      type(lra_reeval_info), intent(inout) :: out
      integer(c_int32_t) :: status
    end function lra_get_last_reeval

    function lra_get_lr(h, lr) bind(C, name="lra_get_lr") result(status)
      import :: c_ptr, c_double, c_int32_t
      type(c_ptr), value :: h
      real(c_double), intent(inout) :: lr
      integer(c_int32_t) :: status
    end function lra_get_lr

    function lra_set_lr(h, lr) bind(C, name="lra_set_lr") result(status)
      import :: c_ptr, c_double, c_int32_t
      type(c_ptr), value :: h
      real(c_double), value :: lr
      integer(c_int32_t) :: status
    end function lra_set_lr

    function lra_get_last_phi(h, phi) bind(C, name="lra_get_last_phi") result(status)
      import :: c_ptr, c_double, c_int32_t
      type(c_ptr), value :: h
      real(c_double), intent(inout) :: phi
      integer(c_int32_t) :: status
    end function lra_get_last_phi

    function lra_get_counters(h, out) bind(C, name="lra_get_counters") result(status)
      import :: lra_counters, c_ptr, c_int32_t
      type(c_ptr), value :: h
      type(lra_counters), intent(inout) :: out
      integer(c_int32_t) :: status
    end function lra_get_counters

    function lra_should_reeval(h, out) bind(C, name="lra_should_reeval") result(status)
      import :: c_ptr, c_int32_t
      type(c_ptr), value :: h
      integer(c_int32_t), intent(inout) :: out
      integer(c_int32_t) :: status
    end function lra_should_reeval

    function lra_state_size(h, size) bind(C, name="lra_state_size") result(status)
      import :: c_ptr, c_size_t, c_int32_t
      type(c_ptr), value :: h
      integer(c_size_t), intent(inout) :: size
      integer(c_int32_t) :: status
    end function lra_state_size

    ! written: c_loc of an integer(c_size_t), target, or c_null_ptr.
    function lra_save_state(h, buf, len, written) bind(C, name="lra_save_state") result(status)
      import :: c_ptr, c_int8_t, c_size_t, c_int32_t
      type(c_ptr), value :: h
      integer(c_int8_t), intent(inout) :: buf(*)
      integer(c_size_t), value :: len
      type(c_ptr), value :: written
      integer(c_int32_t) :: status
    end function lra_save_state

    function lra_load_state(h, buf, len) bind(C, name="lra_load_state") result(status)
      import :: c_ptr, c_int8_t, c_size_t, c_int32_t
      type(c_ptr), value :: h
      integer(c_int8_t), intent(in) :: buf(*)
      integer(c_size_t), value :: len
      integer(c_int32_t) :: status
    end function lra_load_state

    ! reduce: c_funloc of a bind(C) procedure(lra_reduce_fn), or c_null_funptr.
    function lra_set_reduction(h, reduce, user) bind(C, name="lra_set_reduction") result(status)
      import :: c_ptr, c_funptr, c_int32_t
      type(c_ptr), value :: h
      type(c_funptr), value :: reduce
      type(c_ptr), value :: user
      integer(c_int32_t) :: status
    end function lra_set_reduction

    ! The three message functions return C strings: read them with lra_string.
    function lra_status_string(status) bind(C, name="lra_status_string") result(message)
      import :: c_ptr, c_int32_t
      integer(c_int32_t), value :: status
      type(c_ptr) :: message
    end function lra_status_string

    function lra_last_error(h) bind(C, name="lra_last_error") result(message)
      import :: c_ptr
      type(c_ptr), value :: h
      type(c_ptr) :: message
    end function lra_last_error

    function lra_thread_last_error() bind(C, name="lra_thread_last_error") result(message)
      import :: c_ptr
      type(c_ptr) :: message
    end function lra_thread_last_error

    ! (major << 16) | (minor << 8) | patch
    function lra_version() bind(C, name="lra_version") result(version)
      import :: c_int32_t
      integer(c_int32_t) :: version
    end function lra_version

    ! The C library's strlen, for lra_string.
    function c_strlen(s) bind(C, name="strlen") result(n)
      import :: c_ptr, c_size_t
      type(c_ptr), value :: s
      integer(c_size_t) :: n
    end function c_strlen
  end interface

contains

  ! A copy of the NUL-terminated C string at p ("" for c_null_ptr), e.g.
  ! lra_string(lra_last_error(h)). The copy stays valid after later calls.
  function lra_string(p) result(s)
    type(c_ptr), intent(in) :: p
    character(len=:), allocatable :: s
    character(kind=c_char), pointer :: chars(:)
    integer(c_size_t) :: n, i

    if (.not. c_associated(p)) then
      s = ""
      return
    end if
    n = c_strlen(p)
    call c_f_pointer(p, chars, [n])
    allocate (character(len=n) :: s)
    do i = 1, n
      s(i:i) = chars(i)
    end do
  end function lra_string

  ! An LRA_DTYPE_F32 tensor over param and grad. Both dummies are pointers,
  ! so the actual arguments must have the TARGET (or POINTER) attribute and
  ! are never copied: the addresses stored are those of the caller's
  ! arrays. They must stay where they are (not deallocated or reallocated)
  ! while the tensor is used. A strided one (a(1:n:2), a row of a matrix, a
  ! pointer to either) is a programming error: error stop, checked at run
  ! time from the addresses of the first and last elements. (The dummies
  ! were CONTIGUOUS, for a compile-time refusal: gfortran gives one, but
  ! flang accepted a strided pointer without a word and lra then updated
  ! the wrong elements.) Multi-dimensional arrays: pass a rank-1 pointer
  ! remapped onto them, p(1:size(a, kind=c_int64_t)) => a (a plain size(a)
  ! is a default integer: it wraps above 2**31 - 1 elements and leaves p
  ! empty). A dummy argument of yours declared CONTIGUOUS, TARGET may itself
  ! be a copy-in temporary of a strided actual argument (the tensor then
  ! points at freed memory); declare such dummies POINTER, INTENT(IN) like
  ! these. An empty tensor gets NULL addresses (lra accepts them for
  ! numel = 0). Differing sizes are a programming error too: error stop
  ! (lra could not detect a short gradient itself).
  function lra_tensor_f32(param, grad) result(t)
    real(c_float), pointer, intent(in) :: param(:)
    real(c_float), pointer, intent(in) :: grad(:)
    type(lra_tensor) :: t

    if (size(grad, kind=c_int64_t) /= size(param, kind=c_int64_t)) &
      error stop "lra_tensor_f32: param and grad differ in size"
    if (.not. (dense_f32(param) .and. dense_f32(grad))) &
      error stop "lra_tensor_f32: param or grad is strided (not contiguous); pass a contiguous array"
    t%numel = size(param, kind=c_int64_t)
    t%dtype = LRA_DTYPE_F32
    t%reserved = 0
    if (t%numel == 0) then
      t%param = c_null_ptr ! c_loc may not take a zero-sized array
      t%grad = c_null_ptr
    else
      t%param = c_loc(param)
      t%grad = c_loc(grad)
    end if
  end function lra_tensor_f32

  ! An LRA_DTYPE_F16 or LRA_DTYPE_BF16 tensor over param and grad, which hold
  ! the 16-bit patterns (standard Fortran has no 16-bit real). Same rules
  ! and the same contiguity check as lra_tensor_f32; building the tensor by
  ! hand with c_loc instead loses a strided actual argument's stride without
  ! a diagnostic (lra then updates the wrong elements). Another dtype,
  ! differing sizes or a strided array: error stop.
  function lra_tensor_16(param, grad, dtype) result(t)
    integer(c_int16_t), pointer, intent(in) :: param(:)
    integer(c_int16_t), pointer, intent(in) :: grad(:)
    integer(c_int32_t), intent(in) :: dtype
    type(lra_tensor) :: t

    if (dtype /= LRA_DTYPE_F16 .and. dtype /= LRA_DTYPE_BF16) &
      error stop "lra_tensor_16: dtype must be LRA_DTYPE_F16 or LRA_DTYPE_BF16"
    if (size(grad, kind=c_int64_t) /= size(param, kind=c_int64_t)) &
      error stop "lra_tensor_16: param and grad differ in size"
    if (.not. (dense_16(param) .and. dense_16(grad))) &
      error stop "lra_tensor_16: param or grad is strided (not contiguous); pass a contiguous array"
    t%numel = size(param, kind=c_int64_t)
    t%dtype = dtype
    t%reserved = 0
    if (t%numel == 0) then
      t%param = c_null_ptr
      t%grad = c_null_ptr
    else
      t%param = c_loc(param)
      t%grad = c_loc(grad)
    end if
  end function lra_tensor_16

  ! Whether the elements of a (a rank-1 pointer: one stride) lie next to
  ! each other: the last one (n - 1) elements after the first.
  logical function dense_f32(a)
    real(c_float), pointer, intent(in) :: a(:)
    integer(c_int64_t) :: n
    n = size(a, kind=c_int64_t)
    dense_f32 = .true.
    if (n > 1) dense_f32 = transfer(c_loc(a(n)), 0_c_intptr_t) - &
                           transfer(c_loc(a(1)), 0_c_intptr_t) == (n - 1) * c_sizeof(a(1))
  end function dense_f32

  logical function dense_16(a)
    integer(c_int16_t), pointer, intent(in) :: a(:)
    integer(c_int64_t) :: n
    n = size(a, kind=c_int64_t)
    dense_16 = .true.
    if (n > 1) dense_16 = transfer(c_loc(a(n)), 0_c_intptr_t) - &
                          transfer(c_loc(a(1)), 0_c_intptr_t) == (n - 1) * c_sizeof(a(1))
  end function dense_16

  ! lra_set_reduction(h, c_funloc(reduce), user), with reduce's interface
  ! checked against lra_reduce_fn by the compiler (kinds, VALUE, an
  ! assumed-size values(*)): c_funloc alone accepts any procedure outside
  ! -std=f2008. (The compiler does not check that reduce has BIND(C):
  ! declare it so, as a module or external procedure. gfortran also
  ! accepts an internal procedure (contained in another), whose c_funloc
  ! is a trampoline on its host's stack: once the host returns, the next
  ! step calls freed stack and crashes.) To remove the reduction, call lra_set_reduction(h,
  ! c_null_funptr, c_null_ptr).
  function lra_set_reduction_proc(h, reduce, user) result(status)
    type(c_ptr), intent(in) :: h
    procedure(lra_reduce_fn) :: reduce
    type(c_ptr), intent(in) :: user
    integer(c_int32_t) :: status
    status = lra_set_reduction(h, c_funloc(reduce), user)
  end function lra_set_reduction_proc

end module lra
