! A strided array given to lra_tensor_f32 / lra_tensor_16 stops the program
! with a message before anything is stepped (flang accepted a strided
! pointer for the former CONTIGUOUS dummies and lra updated a(1:4)).
program strided_tensor
  use, intrinsic :: iso_c_binding
  use lra
  implicit none
  real(c_float), target :: a(8), g(8)
  integer(c_int16_t), target :: h(8), gh(8)
  real(c_float), pointer :: p(:), gp(:)
  integer(c_int16_t), pointer :: q(:), gq(:)
  type(lra_tensor) :: t
  character(len=16) :: which
  a = 1
  g = 1
  h = 1
  gh = 1
  call get_command_argument(1, which)
  select case (trim(which))
  case ("dense")
    p => a(2:7)
    gp => g(2:7)
    t = lra_tensor_f32(p, gp)
    if (t%numel /= 6) error stop "dense: numel"
    q => h(3:3)
    gq => gh(3:3)
    t = lra_tensor_16(q, gq, LRA_DTYPE_BF16)
    if (t%numel /= 1) error stop "dense: numel of one element"
    print '(a)', "dense arrays accepted"
  case ("f32")
    p => a(1:8:2)
    gp => g(1:8:2)
    t = lra_tensor_f32(p, gp)
  case ("f32-grad")
    p => a(1:4)
    gp => g(8:5:-1)
    t = lra_tensor_f32(p, gp)
  case ("16")
    q => h(1:8:3)
    gq => gh(1:3)
    t = lra_tensor_16(q, gq, LRA_DTYPE_F16)
  end select
end program strided_tensor
