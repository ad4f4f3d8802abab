"""
    LRA

Julia binding of lra (automatic learning-rate adaptation) over its C ABI
(`include/lra.h`). Every exported C function is wrapped with `ccall` below;
`bindings/check_abi.py` (run by the test suite) checks each `ccall`'s
declared symbol, return type and argument types, the structs, the constants
and the reduction `@cfunction` against `include/lra.h`;
`bindings/julia/check_ccalls.py` checks the values each `ccall` passes.

The shared library is `ENV["LRA_LIBRARY"]` when set (a path to `liblra.so`),
else `liblra` on the system's library path (after `scripts/install.sh PREFIX`,
add `PREFIX/lib` to `LD_LIBRARY_PATH`). It is loaded at the first call, and
refused (an error) unless it has this binding's ABI.

    opt = LRA.Optimizer(:adam; lr = 1e-4)
    LRA.step!(opt, params, grads, loss)      # vectors of Arrays (or CuArrays with CUDA.jl)
    info = LRA.report_reeval!(opt, loss_after_on_the_same_batch)
"""
module LRA

using Libdl
using Serialization

# Not exported (too generic; `Tensor` clashes with Tensors.jl and ITensors):
# LRA.Config, LRA.Tensor, LRA.config, LRA.version.
export Optimizer, LRAError, ReevalInfo, Counters,
       step!, report_reeval!, reeval!, should_reeval, lr, set_lr!,
       last_phi, last_reeval, counters, save_state, load_state!, set_reduction!,
       decision_name

# ---------------------------------------------------------------------------
# C types (field order and types mirror include/lra.h exactly)

const lra_status = UInt32

"Opaque `lra_handle`."
struct OpaqueHandle end

"`lra_config`: fill it with [`config`](@ref) (which calls `lra_config_init`)."
struct Config
    struct_size::UInt32
    optimizer::UInt32
    device::UInt32
    device_ordinal::Int32
    lr::Float64
    momentum::Float64
    alpha::Float64
    beta1::Float64
    beta2::Float64
    eps::Float64
    weight_decay::Float64
    f_star::Float64
    factor_up::Float64
    factor_down::Float64
    threshold_up::Float64
    threshold_down::Float64
    lr_min::Float64
    lr_max::Float64
    scale_max::Float64
    denom_eps::Float64
    check_finite::UInt32
    num_threads::UInt32
    reeval_schedule::UInt32
    reeval_every::UInt32
    reeval_growth::Float64
    sharding::UInt32
    loss_is_rank_local::UInt32
end

"""`lra_tensor`: one parameter buffer and its gradient (host or device pointers).
`reserved` must be 0 (lra refuses the step otherwise); the constructors leave it 0."""
struct Tensor
    param::Ptr{Cvoid}
    grad::Ptr{Cvoid}
    numel::UInt64
    dtype::UInt32
    reserved::UInt32
end

"`lra_reeval_info`: what a re-evaluation found and decided."
struct ReevalInfo
    phi::Float64
    rho::Float64
    scale::Float64
    lr_before::Float64
    lr::Float64
    decision::UInt32
    skip_reason::UInt32
end

"`lra_counters`."
struct Counters
    steps::UInt64
    applied::UInt64
    skipped::UInt64
    reevals::UInt64
    raised::UInt64
    lowered::UInt64
    kept::UInt64
    reeval_skipped::UInt64
end

# Constants of include/lra.h (checked against it by the test suite).
const LRA_OPTIMIZER_SGD = UInt32(0)
const LRA_OPTIMIZER_MOMENTUM = UInt32(1)
const LRA_OPTIMIZER_NESTEROV = UInt32(2)
const LRA_OPTIMIZER_ADAGRAD = UInt32(3)
const LRA_OPTIMIZER_RMSPROP = UInt32(4)
const LRA_OPTIMIZER_ADAM = UInt32(5)
const LRA_OPTIMIZER_ADAMW = UInt32(6)
const LRA_DTYPE_F32 = UInt32(0)
const LRA_DTYPE_F16 = UInt32(1)
const LRA_DTYPE_BF16 = UInt32(2)
const LRA_DEVICE_HOST = UInt32(0)
const LRA_DEVICE_CUDA = UInt32(1)
const LRA_DECISION_KEPT = UInt32(0)
const LRA_DECISION_RAISED = UInt32(1)
const LRA_DECISION_LOWERED = UInt32(2)
const LRA_DECISION_SKIPPED = UInt32(3)
const LRA_SKIP_NONE = UInt32(0)
const LRA_SKIP_NONFINITE_LOSS = UInt32(1)
const LRA_SKIP_NONFINITE_GRAD = UInt32(2)
const LRA_SKIP_FOUND_INF = UInt32(3)
const LRA_SKIP_NONPOSITIVE_PHI = UInt32(4)
const LRA_SKIP_NONFINITE_PHI = UInt32(5)
const LRA_SKIP_ZERO_SCALE = UInt32(6)
const LRA_REEVAL_ALWAYS = UInt32(0)
const LRA_REEVAL_EVERY = UInt32(1)
const LRA_REEVAL_GEOMETRIC = UInt32(2)
const LRA_SHARDING_REPLICATED = UInt32(0)
const LRA_SHARDING_SHARDED = UInt32(1)
# The lra.h this binding mirrors (lra_version()'s encoding).
const LRA_HEADER_VERSION = UInt32(256)  # 0.1.0
# lra_status values.
const LRA_OK = UInt32(0)
const LRA_NULL_POINTER = UInt32(1)
const LRA_INVALID_ARGUMENT = UInt32(2)
const LRA_INVALID_CONFIG = UInt32(3)
const LRA_CALL_ORDER = UInt32(4)
const LRA_SIZE_MISMATCH = UInt32(5)
const LRA_NO_CUDA = UInt32(6)
const LRA_CUDA_ERROR = UInt32(7)
const LRA_BAD_CHECKPOINT = UInt32(8)
const LRA_BUFFER_TOO_SMALL = UInt32(9)
const LRA_PANIC = UInt32(10)
const LRA_UNSUPPORTED = UInt32(11)
const LRA_REDUCTION_FAILED = UInt32(12)
const LRA_OUT_OF_MEMORY = UInt32(13)

const OPTIMIZERS = Dict(:sgd => LRA_OPTIMIZER_SGD, :momentum => LRA_OPTIMIZER_MOMENTUM,
                        :nesterov => LRA_OPTIMIZER_NESTEROV, :adagrad => LRA_OPTIMIZER_ADAGRAD,
                        :rmsprop => LRA_OPTIMIZER_RMSPROP, :adam => LRA_OPTIMIZER_ADAM,
                        :adamw => LRA_OPTIMIZER_ADAMW)
const DECISION_NAMES = Dict(LRA_DECISION_KEPT => :kept, LRA_DECISION_RAISED => :raised,
                            LRA_DECISION_LOWERED => :lowered, LRA_DECISION_SKIPPED => :skipped)

# ---------------------------------------------------------------------------
# Library loading: dlopen at the first call (so the path is chosen at run
# time, not frozen at precompile time); every ccall goes through `sym(:name)`.

const LIBRARY = Ref{Ptr{Cvoid}}(C_NULL)
const SYMBOLS = Dict{Symbol,Ptr{Cvoid}}()
# A spin lock, not a ReentrantLock: waiting for it never switches tasks. So
# `check` reads `lra_thread_last_error` on the thread that made the failing
# call (a task switch could resume the task on another thread), and the
# finalizer, where task switches are not allowed, can look symbols up.
const SYMBOLS_LOCK = Threads.SpinLock()
const REDUCE_TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)

library_path() = get(ENV, "LRA_LIBRARY", "liblra")

decode_version(v::Integer) = VersionNumber(v >> 16, (v >> 8) & 0xff, v & 0xff)
const HEADER_VERSION = decode_version(LRA_HEADER_VERSION)

# The part of a release that names its ABI (the SONAME's rule, as
# bindings/python/lra.py's `_abi`): major from 1.0 on, major.minor before.
abi(v::VersionNumber) = v.major >= 1 ? (v.major,) : (v.major, v.minor)
abi_compatible(v::VersionNumber) = abi(v) == abi(HEADER_VERSION)

# Another ABI's structs may be larger than these mirrors (lra_config_init
# would write past a Ref{Config}): refuse it before any other call.
function open_library(path::AbstractString = library_path())
    lib = Libdl.dlopen(path)
    Libdl.dlsym(lib, :lra_version; throw_error = false) === nothing &&
        refuse_library(lib, path, "not lra (it has no lra_version)")
    found = decode_version(ccall(Libdl.dlsym(lib, :lra_version), UInt32, ()))
    abi_compatible(found) || refuse_library(lib, path, "lra $found")
    return lib
end

function refuse_library(lib, path, what)
    Libdl.dlclose(lib)
    error("$path is $what, but this LRA.jl mirrors lra.h $HEADER_VERSION and needs a ",
          "library of that ABI (", join(abi(HEADER_VERSION), "."), ".x): point LRA_LIBRARY ",
          "at a matching liblra.so")
end

# dlopen is file I/O, kept out of the spin lock. Two tasks racing here both
# open the library (the same handle, counted twice); the first one stored wins.
function library()
    lib = lock(() -> LIBRARY[], SYMBOLS_LOCK)
    lib == C_NULL || return lib
    opened = open_library()
    lock(SYMBOLS_LOCK) do
        LIBRARY[] == C_NULL && (LIBRARY[] = opened)
        LIBRARY[]
    end
end

function sym(name::Symbol)
    found = lock(() -> get(SYMBOLS, name, C_NULL), SYMBOLS_LOCK)
    found == C_NULL || return found
    lib = library()
    lock(() -> get!(() -> Libdl.dlsym(lib, name), SYMBOLS, name), SYMBOLS_LOCK)
end

function __init__()
    REDUCE_TRAMPOLINE[] = @cfunction(reduce_trampoline, Int32, (Ptr{Float64}, Csize_t, Ptr{Cvoid}))
    return nothing
end

"""
A failed lra call: its `lra_status`, the library's message and, for
`LRA_REDUCTION_FAILED`, what the reducer threw (`cause`, a
`CapturedException`; `nothing` otherwise).
"""
struct LRAError <: Exception
    status::UInt32
    message::String
    cause::Any
end
LRAError(status::Integer, message::AbstractString) = LRAError(status, message, nothing)
function Base.showerror(io::IO, e::LRAError)
    print(io, "LRAError(status ", e.status, ", ", status_string(e.status), "): ", e.message)
    if e.cause !== nothing
        print(io, "\ncaused by: ")
        showerror(io, e.cause)
    end
end

"lra's static description of a status value."
status_string(status::Integer) = unsafe_string(ccall(sym(:lra_status_string), Cstring, (UInt32,), status))
"The calling thread's last lra failure message (from any call)."
thread_last_error() = unsafe_string(ccall(sym(:lra_thread_last_error), Cstring, ()))

"Library version as a `VersionNumber`."
version() = decode_version(ccall(sym(:lra_version), UInt32, ()))

# ---------------------------------------------------------------------------
# Configuration

"""
    config(optimizer = :adam; fields...) -> Config

`lra_config_init` for `optimizer` (`:sgd`, `:momentum`, `:nesterov`,
`:adagrad`, `:rmsprop`, `:adam`, `:adamw`), then every keyword replaces the
field of that name (`lr = 1e-4`, `device = :cuda`, `beta1 = 0.9`, ...).
"""
function config(optimizer::Symbol = :adam; fields...)
    haskey(OPTIMIZERS, optimizer) || throw(ArgumentError("unknown optimizer $optimizer"))
    cfg = Ref{Config}()
    ccall(sym(:lra_config_init), Cvoid, (Ref{Config}, UInt32), cfg, OPTIMIZERS[optimizer])
    c = cfg[]
    names = fieldnames(Config)
    for (k, _) in fields
        k == :optimizer && throw(ArgumentError(
            "the optimizer is config's first argument (it also picks the defaults), not a keyword"))
        (k in names && k != :struct_size) || throw(ArgumentError("unknown lra_config field $k"))
    end
    values = map(names) do name
        haskey(fields, name) || return getfield(c, name)
        v = fields[name]
        if name == :device
            v = device_code(v)
        elseif name == :reeval_schedule && v isa Symbol
            v = Dict(:always => LRA_REEVAL_ALWAYS, :every => LRA_REEVAL_EVERY,
                     :geometric => LRA_REEVAL_GEOMETRIC)[v]
        elseif name == :sharding && v isa Symbol
            v = Dict(:replicated => LRA_SHARDING_REPLICATED, :sharded => LRA_SHARDING_SHARDED)[v]
        elseif v isa Bool
            v = UInt32(v)
        end
        convert(fieldtype(Config, name), v)
    end
    Config(values...)
end

"The `lra_device` of a `device` keyword: `:host` (or `:cpu`), `:cuda`, or the number."
device_code(v::Symbol) = v == :cuda ? LRA_DEVICE_CUDA : v in (:host, :cpu) ? LRA_DEVICE_HOST :
    throw(ArgumentError("device must be :host or :cuda"))
device_code(v) = convert(UInt32, v)

# ---------------------------------------------------------------------------
# The handle

# The registered reducer. lra gets this box as the callback's `user`
# pointer, so a callback always finds the reducer it was registered with.
mutable struct Reduction
    f::Any
end

# Where the reducer's exception waits for `check`: the calling task's local
# storage. lra runs the callback inside the failing ccall, on the task that
# made it, so the task that reads it is the one whose call failed, whatever
# other tasks or threads register meanwhile.
const REDUCER_ERROR = :lra_reducer_error

"""
    Optimizer(optimizer = :adam; fields...)
    Optimizer(cfg::Config)

One lra handle (the wrapped optimizer and its η adaptation), destroyed by a
finalizer or by `close`. Failing calls throw [`LRAError`](@ref).

One handle serves one call at a time: a call made while another runs on it
(from another task, or from inside the reduction callback) throws
`LRAError` with status `LRA_CALL_ORDER`, and so does `close` (the handle
then stays open and usable).
"""
mutable struct Optimizer
    ptr::Ptr{OpaqueHandle}
    reducer::Union{Nothing,Reduction}  # roots the box lra holds a pointer to
    device::UInt32          # the handle's lra_device and CUDA ordinal, which step!
    device_ordinal::Int32   # checks the arrays against
    lock::ReentrantLock     # guards ptr and calls
    calls::Int              # calls of this binding running on the handle (see `guarded`)
    function Optimizer(cfg::Config)
        out = Ref{Ptr{OpaqueHandle}}(C_NULL)
        st = ccall(sym(:lra_create), lra_status, (Ref{Config}, Ref{Ptr{OpaqueHandle}}), cfg, out)
        st == LRA_OK || throw(LRAError(st, thread_last_error()))
        o = new(out[], nothing, cfg.device, cfg.device_ordinal, ReentrantLock(), 0)
        finalizer(finalize_handle, o)
    end
end
Optimizer(optimizer::Symbol = :adam; fields...) = Optimizer(config(optimizer; fields...))

# Frees the handle. The caller holds o.lock and saw no call counted, so no
# call of this binding runs on the handle or can start before it is gone:
# lra_destroy is not refused.
function destroy_locked!(o::Optimizer)
    o.ptr == C_NULL && return nothing
    ccall(sym(:lra_destroy), Cvoid, (Ptr{OpaqueHandle},), o.ptr)
    o.ptr = Ptr{OpaqueHandle}(C_NULL)
    o.reducer = nothing  # lra no longer calls it
    return nothing
end

function destroy!(o::Optimizer)
    lock(o.lock) do
        o.calls == 0 || throw(LRAError(LRA_CALL_ORDER,
            "close: the handle is in the middle of another call (from inside its reduction " *
            "callback, or another task's); it stays open"))
        destroy_locked!(o)
    end
end

# The finalizer must not wait for o.lock (a task switch inside a finalizer
# is an error): the last call's task can still be inside `unlock` after `o`
# became unreachable. Then try again at a later collection (the pattern of
# the Julia manual, "Safe use of Finalizers").
function finalize_handle(o::Optimizer)
    if !trylock(o.lock)
        finalizer(finalize_handle, o)
        return nothing
    end
    try
        o.calls == 0 && destroy_locked!(o)
    finally
        unlock(o.lock)
    end
    return nothing
end

"""
    close(opt::LRA.Optimizer)

Destroys the handle (again: a no-op; the finalizer does it too). Throws
`LRAError` with `LRA_CALL_ORDER` while another call runs on the handle
(e.g. from inside its reduction callback), which lra would refuse: the
handle then stays open and usable.
"""
Base.close(o::Optimizer) = destroy!(o)

# A copy would own the same lra handle: the second lra_destroy is undefined
# behaviour, and a pointer means nothing in another process.
Base.deepcopy_internal(::Optimizer, ::IdDict) =
    throw(ArgumentError("an LRA.Optimizer cannot be copied: checkpoint it with save_state/load_state!"))
Serialization.serialize(::Serialization.AbstractSerializer, ::Optimizer) =
    throw(ArgumentError("an LRA.Optimizer cannot be serialized: send save_state(opt) and load_state! it"))

function live(o::Optimizer)
    o.ptr == C_NULL && throw(LRAError(LRA_NULL_POINTER, "the lra handle was closed"))
    o.ptr
end

# Runs `f()` (lra calls on `o`'s handle, through `live(o)`) counted as in
# progress: `destroy!` refuses meanwhile instead of freeing the handle under
# them. Throws as `live` does when the handle is closed.
function guarded(f, o::Optimizer)
    lock(o.lock) do
        live(o)
        o.calls += 1
    end
    try
        return f()
    finally
        lock(o.lock) do
            o.calls -= 1
        end
    end
end

function check(o::Optimizer, st::lra_status)
    st == LRA_OK && return nothing
    # The calling thread's message, not lra_last_error(h): a call refused at
    # entry (another call runs on the handle: another task's, or this
    # handle's reduction callback) leaves its reason only there, and the
    # handle's message belongs to the running call. Nothing between the
    # failing ccall and this one can switch tasks (see SYMBOLS_LOCK).
    message = thread_last_error()
    cause = pop!(task_local_storage(), REDUCER_ERROR, nothing)
    st == LRA_REDUCTION_FAILED || (cause = nothing)
    # Ctrl-C inside the reducer stops the program, now that lra refused the call.
    cause isa CapturedException && cause.ex isa InterruptException && throw(cause.ex)
    throw(LRAError(st, message, cause))
end

"""
    LRA.last_error(opt) -> String

The message of the handle's last failed call (`""` if none). The `LRAError`
of a failing call already carries its message; this is the handle's own
record (`lra_last_error`).
"""
last_error(o::Optimizer) = lock(o.lock) do
    # lra_last_error returns a placeholder while a call runs, and a call
    # starting during the read would be refused: under o.lock with no call
    # counted, none runs or can start, so the message read is the handle's.
    o.calls == 0 || throw(LRAError(LRA_CALL_ORDER,
        "last_error: another call runs on the handle (its message is not settled yet)"))
    unsafe_string(ccall(sym(:lra_last_error), Cstring, (Ptr{OpaqueHandle},), live(o)))
end

# ---------------------------------------------------------------------------
# Tensors. The CUDA extension adds methods of `device_pointer`, `stream_of`
# and `placement` for CuArrays; everything else is shared.

dtype_code(::Type{Float32}) = LRA_DTYPE_F32
dtype_code(::Type{Float16}) = LRA_DTYPE_F16
dtype_code(::Type{T}) where {T} =
    T isa DataType && nameof(T) === :BFloat16 && sizeof(T) == 2 ? LRA_DTYPE_BF16 :
    throw(ArgumentError("lra supports Float32, Float16 and BFloat16 buffers, not $T"))

"Address of a dense buffer as lra sees it (host arrays; CuArrays via the extension)."
device_pointer(a::Array) = Ptr{Cvoid}(pointer(a))
device_pointer(a::AbstractArray) =
    throw(ArgumentError("lra needs dense contiguous buffers (Array or CuArray), not $(typeof(a))"))

"The CUstream to run on for these buffers (`C_NULL` for host arrays and `nothing`)."
stream_of(::Union{AbstractArray,Nothing}) = C_NULL

"Where a buffer lives: `(lra_device, CUDA device ordinal)`; host arrays `(LRA_DEVICE_HOST, 0)`."
placement(::AbstractArray) = (LRA_DEVICE_HOST, 0)

"The `stream` keyword as a `CUstream` (a `Ptr`; the extension adds `CuStream`)."
stream_handle(s) = Ptr{Cvoid}(s)

"Runs `f()` with `stream` as the task's stream where CUDA.jl tracks one (`CuStream`: the extension)."
with_stream(f, stream) = f()

"Runs `f()` with the device of `a` current (CuArrays: the extension); others: `f()`."
with_device_of(f, a) = f()

placement_name(device, ordinal) = device == LRA_DEVICE_CUDA ? "CUDA device $ordinal" : "host memory"

# A buffer elsewhere than the handle works would make lra dereference
# foreign memory (a host handle given device pointers, or the reverse).
function check_placement(o::Optimizer, a, what, i = 0)
    device, ordinal = placement(a)
    device == o.device && (device != LRA_DEVICE_CUDA || ordinal == o.device_ordinal) &&
        return nothing
    throw(ArgumentError(string(what, i > 0 ? " $i" : "", " is in ", placement_name(device, ordinal),
        ", but this Optimizer's handle works on ", placement_name(o.device, o.device_ordinal),
        " (host Arrays need a host handle; CuArrays a CUDA handle on their device: ",
        "LRA.Optimizer(optimizer, params; ...) with `using CUDA`)")))
end

"`lra_tensor` of one parameter buffer and its gradient (same element type and shape)."
function Tensor(param::AbstractArray, grad::AbstractArray)
    eltype(param) == eltype(grad) || throw(ArgumentError(
        "parameter has element type $(eltype(param)), gradient $(eltype(grad))"))
    # Same shape, not only length: a transposed copy of the gradient would
    # pair elements wrongly without any error (pass `vec(g)` to mean it).
    size(param) == size(grad) ||
        throw(DimensionMismatch("parameter has size $(size(param)), gradient $(size(grad))"))
    dtype = dtype_code(eltype(param))  # before any pointer is taken
    Tensor(device_pointer(param), device_pointer(grad), UInt64(length(param)), dtype, UInt32(0))
end

"""
    step!(opt, params, grads, loss; obs_var = 0.0, found_inf = nothing, stream = nothing)

The wrapped optimizer's step with the current η. `params` and `grads` are
equally long vectors of arrays (or one array each, e.g. a flat buffer);
`loss` is f_i on this batch. `found_inf`: an optional one-element Float32
array (host or device, like the buffers); non-zero skips the step. The
stream defaults to CUDA.jl's current stream for CuArrays; a `CuStream`
becomes the task's stream for the call (so CUDA.jl orders the arrays' other
uses after it), a raw `CUstream` is used as is: order it yourself (see the
README). Empty typed
vectors (`Vector{Float32}[]`) are allowed: with sharded parameters a rank
whose shard is empty still takes every step (the collectives must match).
Every array must be where the handle works (host Arrays for a host handle,
CuArrays on its device for a CUDA handle): others throw `ArgumentError`
before lra is called.
"""
function step!(o::Optimizer, params::AbstractVector{<:AbstractArray},
               grads::AbstractVector{<:AbstractArray}, loss::Real;
               obs_var::Real = 0.0, found_inf = nothing, stream = nothing)
    length(params) == length(grads) ||
        throw(DimensionMismatch("$(length(params)) parameters, $(length(grads)) gradients"))
    # Before any pointer is taken: CUDA.jl's `pointer` of a CuArray on
    # another device enables peer access or throws its own error.
    for (i, (p, g)) in enumerate(zip(params, grads))
        check_placement(o, p, "parameter", i)
        check_placement(o, g, "gradient", i)
    end
    if found_inf !== nothing
        found_inf isa AbstractArray && length(found_inf) == 1 && eltype(found_inf) == Float32 ||
            throw(ArgumentError("found_inf must be an array holding one Float32"))
        check_placement(o, found_inf, "found_inf")
    end
    # CUDA.jl's `pointer` and `stream()` belong to the task's current device:
    # make it the arrays' (a handle on device 1 refuses device 0's stream).
    # An empty shard takes both from found_inf, which may still be written on
    # the task's stream (the legacy NULL stream would not wait for it).
    anchor = isempty(params) ? found_inf : first(params)
    with_device_of(anchor) do
        with_stream(stream) do
            tensors = Tensor[Tensor(p, g) for (p, g) in zip(params, grads)]
            handle = stream === nothing ? stream_of(anchor) : stream_handle(stream)
            run_step(o, tensors, params, grads, loss, obs_var, found_inf, handle)
        end
    end
end

# The tensors hold raw pointers into params/grads: keep those alive.
function run_step(o::Optimizer, tensors, params, grads, loss, obs_var, found_inf, stream::Ptr{Cvoid})
    guarded(o) do
        st = GC.@preserve params grads found_inf begin
            if found_inf === nothing
                ccall(sym(:lra_step), lra_status,
                      (Ptr{OpaqueHandle}, Ptr{Tensor}, Csize_t, Float64, Float64, Ptr{Cvoid}),
                      live(o), tensors, length(tensors), loss, obs_var, stream)
            else
                ccall(sym(:lra_step_ex), lra_status,
                      (Ptr{OpaqueHandle}, Ptr{Tensor}, Csize_t, Float64, Float64, Ptr{Float32}, Ptr{Cvoid}),
                      live(o), tensors, length(tensors), loss, obs_var,
                      Ptr{Float32}(device_pointer(found_inf)), stream)
            end
        end
        check(o, st)
    end
end
step!(o::Optimizer, param::AbstractArray{<:AbstractFloat}, grad::AbstractArray{<:AbstractFloat},
      loss::Real; kw...) = step!(o, [param], [grad], loss; kw...)

"""
    report_reeval!(opt, loss_after) -> ReevalInfo

f+ = the loss on the SAME batch after the step (same data, same deterministic
model: no fresh dropout mask, no BatchNorm statistics update); adapts η.
"""
function report_reeval!(o::Optimizer, loss_after::Real)
    out = Ref{ReevalInfo}()
    guarded(o) do
        check(o, ccall(sym(:lra_report_reeval), lra_status, (Ptr{OpaqueHandle}, Float64, Ref{ReevalInfo}),
                       live(o), loss_after, out))
    end
    out[]
end

"""
    reeval!(f, opt; force = false) -> Union{ReevalInfo,Nothing}

Closure form: when the schedule wants this step re-evaluated (or `force`),
calls `f()` for the loss on the same batch and reports it.
"""
function reeval!(f, o::Optimizer; force::Bool = false)
    (force || should_reeval(o)) || return nothing
    report_reeval!(o, f())
end

function should_reeval(o::Optimizer)
    out = Ref{UInt32}(0)
    guarded(o) do
        check(o, ccall(sym(:lra_should_reeval), lra_status, (Ptr{OpaqueHandle}, Ref{UInt32}), live(o), out))
    end
    out[] != 0
end

function last_reeval(o::Optimizer)
    out = Ref{ReevalInfo}()
    guarded(o) do
        check(o, ccall(sym(:lra_get_last_reeval), lra_status, (Ptr{OpaqueHandle}, Ref{ReevalInfo}),
                       live(o), out))
    end
    out[]
end

decision_name(info::ReevalInfo) = get(DECISION_NAMES, info.decision, :unknown)

"Current η."
function lr(o::Optimizer)
    out = Ref{Float64}(0)
    guarded(o) do
        check(o, ccall(sym(:lra_get_lr), lra_status, (Ptr{OpaqueHandle}, Ref{Float64}), live(o), out))
    end
    out[]
end

"Sets η (applies from the next step)."
set_lr!(o::Optimizer, value::Real) = guarded(o) do
    check(o, ccall(sym(:lra_set_lr), lra_status, (Ptr{OpaqueHandle}, Float64), live(o), value))
end

"φ of the most recent step (NaN before the first or when it was skipped)."
function last_phi(o::Optimizer)
    out = Ref{Float64}(0)
    guarded(o) do
        check(o, ccall(sym(:lra_get_last_phi), lra_status, (Ptr{OpaqueHandle}, Ref{Float64}), live(o), out))
    end
    out[]
end

function counters(o::Optimizer)
    out = Ref{Counters}()
    guarded(o) do
        check(o, ccall(sym(:lra_get_counters), lra_status, (Ptr{OpaqueHandle}, Ref{Counters}), live(o), out))
    end
    out[]
end

"A versioned checkpoint (η, counters, optimizer state) as bytes."
function save_state(o::Optimizer)
    guarded(o) do
        size = Ref{Csize_t}(0)
        check(o, ccall(sym(:lra_state_size), lra_status, (Ptr{OpaqueHandle}, Ref{Csize_t}), live(o), size))
        buf = Vector{UInt8}(undef, max(size[], 1))
        written = Ref{Csize_t}(0)
        check(o, ccall(sym(:lra_save_state), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Csize_t, Ref{Csize_t}),
                       live(o), buf, length(buf), written))
        resize!(buf, written[])
    end
end

"Restores a checkpoint from [`save_state`](@ref) (same configuration and tensor layout)."
function load_state!(o::Optimizer, buf::Vector{UInt8})
    guarded(o) do
        check(o, ccall(sym(:lra_load_state), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Csize_t),
                       live(o), buf, length(buf)))
    end
end

# Cross-rank reduction: the C callback receives the Optimizer as `user`.
# It first keeps the task on its thread for good: lra's frames below it hold
# thread-bound state for the length of the call (the calling thread's error
# message), and a reducer that waits (a Julia-level collective,
# `CUDA.synchronize()`) would let the scheduler resume a non-sticky task
# (`Threads.@spawn`) on another thread. A sticky task stays on its thread;
# like Base, which makes a task sticky when it `@async`s (and relies on that
# afterwards), this never unsets the flag.
# Nothing may unwind through lra's frames: what the reducer throws is kept
# in the task's local storage (`REDUCER_ERROR`) and thrown by `check` (as
# the `cause` of the LRAError, or itself for an InterruptException) once
# lra has returned.
function reduce_trampoline(values::Ptr{Float64}, count::Csize_t, user::Ptr{Cvoid})::Int32
    current_task().sticky = true
    try
        r = unsafe_pointer_to_objref(user)::Reduction
        r.f(unsafe_wrap(Array, values, count))
        return Int32(0)
    catch e
        try
            task_local_storage(REDUCER_ERROR, CapturedException(e, catch_backtrace()))
        catch
        end
        return Int32(1)
    end
end

"""
    set_reduction!(opt, f)

Registers `f(values::Vector{Float64})`, which must replace `values` in place
by their sums over all ranks (e.g. `v -> MPI.Allreduce!(v, +, comm)`);
`nothing` removes it. `values` wraps lra's own memory and is valid only
during that call: keep a `copy`, never `values` itself or a view of it.
`f` runs inside `step!` and `report_reeval!`: calls on the same `opt` from
inside it (and `close(opt)`) throw `LRAError` with `LRA_CALL_ORDER`, and an
exception escaping `f` fails the outer call with `LRA_REDUCTION_FAILED`.
"""
function set_reduction!(o::Optimizer, f)
    guarded(o) do
        if f === nothing
            check(o, ccall(sym(:lra_set_reduction), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Ptr{Cvoid}),
                           live(o), C_NULL, C_NULL))
            o.reducer = nothing
        else
            # A new box per registration: a refused registration leaves the
            # running call's reducer untouched, and a call that starts right
            # after this one finds the box it was registered with.
            box = Reduction(f)
            GC.@preserve box begin
                check(o, ccall(sym(:lra_set_reduction), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Ptr{Cvoid}),
                               live(o), REDUCE_TRAMPOLINE[], pointer_from_objref(box)))
            end
            o.reducer = box  # roots it as long as lra may call it
        end
    end
    return nothing
end

end # module
