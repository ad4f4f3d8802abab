"""
    LRA

Julia binding of lra (automatic learning-rate adaptation) over its C ABI
(`include/lra.h`). Every exported C function is wrapped with `ccall` below;
`bindings/check_abi.py` (run by the test suite) checks each `ccall`'s
symbol, return type and argument types, the structs, the constants and the
reduction `@cfunction` against `include/lra.h`.

The shared library is `ENV["LRA_LIBRARY"]` when set (a path to `liblra.so`),
else `liblra` on the system's library path (after `scripts/install.sh PREFIX`,
add `PREFIX/lib` to `LD_LIBRARY_PATH`).

    opt = LRA.Optimizer(:adam; lr = 1e-4)
    LRA.step!(opt, params, grads, loss)      # vectors of Arrays (or CuArrays with CUDA.jl)
    info = LRA.report_reeval!(opt, loss_after_on_the_same_batch)
"""
module LRA

using Libdl

export Optimizer, LRAError, Config, Tensor, ReevalInfo, Counters,
       config, step!, report_reeval!, reeval!, should_reeval, lr, set_lr!,
       last_phi, last_reeval, counters, save_state, load_state!, set_reduction!,
       decision_name, version

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

"`lra_tensor`: one parameter buffer and its gradient (host or device pointers)."
struct Tensor
    param::Ptr{Cvoid}
    grad::Ptr{Cvoid}
    numel::UInt64
    dtype::UInt32
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
# Library loading: dlopen once in __init__ (so the path is chosen at run time,
# not frozen at precompile time); every ccall goes through `sym(:name)`.

const LIBRARY = Ref{Ptr{Cvoid}}(C_NULL)
const SYMBOLS = Dict{Symbol,Ptr{Cvoid}}()
const SYMBOLS_LOCK = ReentrantLock()
const REDUCE_TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)

library_path() = get(ENV, "LRA_LIBRARY", "liblra")

function sym(name::Symbol)
    lock(SYMBOLS_LOCK) do
        get!(SYMBOLS, name) do
            if LIBRARY[] == C_NULL
                LIBRARY[] = Libdl.dlopen(library_path())
            end
            Libdl.dlsym(LIBRARY[], name)
        end
    end
end

function __init__()
    REDUCE_TRAMPOLINE[] = @cfunction(reduce_trampoline, Int32, (Ptr{Float64}, Csize_t, Ptr{Cvoid}))
    return nothing
end

"A failed lra call: its `lra_status` and the library's message."
struct LRAError <: Exception
    status::UInt32
    message::String
end
Base.showerror(io::IO, e::LRAError) = print(io, "LRAError(status ", e.status, "): ", e.message)

status_string(s::Integer) = unsafe_string(ccall(sym(:lra_status_string), Cstring, (UInt32,), s))
thread_last_error() = unsafe_string(ccall(sym(:lra_thread_last_error), Cstring, ()))

"Library version as a `VersionNumber`."
function version()
    v = ccall(sym(:lra_version), UInt32, ())
    VersionNumber(v >> 16, (v >> 8) & 0xff, v & 0xff)
end

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
    ref = Ref{Config}()
    ccall(sym(:lra_config_init), Cvoid, (Ref{Config}, UInt32), ref, OPTIMIZERS[optimizer])
    c = ref[]
    names = fieldnames(Config)
    for (k, _) in fields
        (k in names && k != :struct_size) || throw(ArgumentError("unknown lra_config field $k"))
    end
    values = map(names) do name
        haskey(fields, name) || return getfield(c, name)
        v = fields[name]
        if name == :device && v isa Symbol
            v = v == :cuda ? LRA_DEVICE_CUDA : v in (:host, :cpu) ? LRA_DEVICE_HOST :
                throw(ArgumentError("device must be :host or :cuda"))
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

# ---------------------------------------------------------------------------
# The handle

"""
    Optimizer(optimizer = :adam; fields...)
    Optimizer(cfg::Config)

One lra handle (the wrapped optimizer and its η adaptation), destroyed by a
finalizer or by `close`. Failing calls throw [`LRAError`](@ref).
"""
mutable struct Optimizer
    ptr::Ptr{OpaqueHandle}
    reducer::Any
    function Optimizer(cfg::Config)
        out = Ref{Ptr{OpaqueHandle}}(C_NULL)
        st = ccall(sym(:lra_create), lra_status, (Ref{Config}, Ref{Ptr{OpaqueHandle}}), cfg, out)
        st == LRA_OK || throw(LRAError(st, thread_last_error()))
        finalizer(destroy!, new(out[], nothing))
    end
end
Optimizer(optimizer::Symbol = :adam; fields...) = Optimizer(config(optimizer; fields...))

function destroy!(o::Optimizer)
    p, o.ptr = o.ptr, Ptr{OpaqueHandle}(C_NULL)
    p == C_NULL || ccall(sym(:lra_destroy), Cvoid, (Ptr{OpaqueHandle},), p)
    return nothing
end
Base.close(o::Optimizer) = destroy!(o)

function live(o::Optimizer)
    o.ptr == C_NULL && throw(LRAError(LRA_NULL_POINTER, "the lra handle was closed"))
    o.ptr
end

function check(o::Optimizer, st::lra_status)
    st == LRA_OK && return nothing
    msg = unsafe_string(ccall(sym(:lra_last_error), Cstring, (Ptr{OpaqueHandle},), o.ptr))
    throw(LRAError(st, msg))
end

# ---------------------------------------------------------------------------
# Tensors. The CUDA extension adds methods of `device_pointer` and `stream_of`
# for CuArrays; everything else is shared.

dtype_code(::Type{Float32}) = LRA_DTYPE_F32
dtype_code(::Type{Float16}) = LRA_DTYPE_F16
dtype_code(::Type{T}) where {T} =
    nameof(T) === :BFloat16 && sizeof(T) == 2 ? LRA_DTYPE_BF16 :
    throw(ArgumentError("lra supports Float32, Float16 and BFloat16 buffers, not $T"))

"Address of a dense buffer as lra sees it (host arrays; CuArrays via the extension)."
device_pointer(a::Array) = Ptr{Cvoid}(pointer(a))
device_pointer(a::AbstractArray) =
    throw(ArgumentError("lra needs dense contiguous buffers (Array or CuArray), not $(typeof(a))"))

"The CUstream to run on for these buffers (`C_NULL` for host arrays)."
stream_of(::AbstractArray) = C_NULL

"`lra_tensor` of one parameter buffer and its gradient (same element type and length)."
function Tensor(param::AbstractArray{T}, grad::AbstractArray{T}) where {T}
    length(param) == length(grad) ||
        throw(DimensionMismatch("parameter has $(length(param)) elements, gradient $(length(grad))"))
    Tensor(device_pointer(param), device_pointer(grad), UInt64(length(param)), dtype_code(T))
end

"""
    step!(opt, params, grads, loss; obs_var = 0.0, found_inf = nothing, stream = nothing)

The wrapped optimizer's step with the current η. `params` and `grads` are
equally long vectors of arrays (or one array each, e.g. a flat buffer);
`loss` is f_i on this batch. `found_inf`: an optional one-element Float32
array (host or device, like the buffers); non-zero skips the step. The
stream defaults to CUDA.jl's current stream for CuArrays. Empty typed
vectors (`Vector{Float32}[]`) are allowed: with sharded parameters a rank
whose shard is empty still takes every step (the collectives must match).
"""
function step!(o::Optimizer, params::AbstractVector{<:AbstractArray},
               grads::AbstractVector{<:AbstractArray}, loss::Real;
               obs_var::Real = 0.0, found_inf = nothing, stream = nothing)
    length(params) == length(grads) ||
        throw(DimensionMismatch("$(length(params)) parameters, $(length(grads)) gradients"))
    tensors = Tensor[Tensor(p, g) for (p, g) in zip(params, grads)]
    # An empty shard has no arrays to take a stream from: NULL (the legacy
    # default stream) unless the caller passes one.
    s = if stream !== nothing
        Ptr{Cvoid}(stream)
    elseif isempty(params)
        C_NULL
    else
        stream_of(first(params))
    end
    # The tensors hold raw pointers into params/grads: keep those alive.
    st = GC.@preserve params grads found_inf begin
        if found_inf === nothing
            ccall(sym(:lra_step), lra_status,
                  (Ptr{OpaqueHandle}, Ptr{Tensor}, Csize_t, Float64, Float64, Ptr{Cvoid}),
                  live(o), tensors, length(tensors), loss, obs_var, s)
        else
            length(found_inf) == 1 && eltype(found_inf) == Float32 ||
                throw(ArgumentError("found_inf must hold one Float32"))
            ccall(sym(:lra_step_ex), lra_status,
                  (Ptr{OpaqueHandle}, Ptr{Tensor}, Csize_t, Float64, Float64, Ptr{Float32}, Ptr{Cvoid}),
                  live(o), tensors, length(tensors), loss, obs_var,
                  Ptr{Float32}(device_pointer(found_inf)), s)
        end
    end
    check(o, st)
end
step!(o::Optimizer, param::AbstractArray{<:AbstractFloat}, grad::AbstractArray{<:AbstractFloat},
      loss::Real; kw...) = step!(o, [param], [grad], loss; kw...)

"""
    report_reeval!(opt, loss_after) -> ReevalInfo

f+ = the loss on the SAME batch after the step (same data, same deterministic
model: no fresh dropout mask, no BatchNorm statistics update); adapts η.
"""
function report_reeval!(o::Optimizer, loss_after::Real)
    info = Ref{ReevalInfo}()
    check(o, ccall(sym(:lra_report_reeval), lra_status, (Ptr{OpaqueHandle}, Float64, Ref{ReevalInfo}),
                   live(o), loss_after, info))
    info[]
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
    check(o, ccall(sym(:lra_should_reeval), lra_status, (Ptr{OpaqueHandle}, Ref{UInt32}), live(o), out))
    out[] != 0
end

function last_reeval(o::Optimizer)
    info = Ref{ReevalInfo}()
    check(o, ccall(sym(:lra_get_last_reeval), lra_status, (Ptr{OpaqueHandle}, Ref{ReevalInfo}),
                   live(o), info))
    info[]
end

decision_name(info::ReevalInfo) = get(DECISION_NAMES, info.decision, :unknown)

"Current η."
function lr(o::Optimizer)
    out = Ref{Float64}(0)
    check(o, ccall(sym(:lra_get_lr), lra_status, (Ptr{OpaqueHandle}, Ref{Float64}), live(o), out))
    out[]
end

"Sets η (applies from the next step)."
set_lr!(o::Optimizer, value::Real) =
    check(o, ccall(sym(:lra_set_lr), lra_status, (Ptr{OpaqueHandle}, Float64), live(o), value))

"φ of the most recent step (NaN before the first or when it was skipped)."
function last_phi(o::Optimizer)
    out = Ref{Float64}(0)
    check(o, ccall(sym(:lra_get_last_phi), lra_status, (Ptr{OpaqueHandle}, Ref{Float64}), live(o), out))
    out[]
end

function counters(o::Optimizer)
    out = Ref{Counters}()
    check(o, ccall(sym(:lra_get_counters), lra_status, (Ptr{OpaqueHandle}, Ref{Counters}), live(o), out))
    out[]
end

"A versioned checkpoint (η, counters, optimizer state) as bytes."
function save_state(o::Optimizer)
    size = Ref{Csize_t}(0)
    check(o, ccall(sym(:lra_state_size), lra_status, (Ptr{OpaqueHandle}, Ref{Csize_t}), live(o), size))
    buf = Vector{UInt8}(undef, max(size[], 1))
    written = Ref{Csize_t}(0)
    check(o, ccall(sym(:lra_save_state), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Csize_t, Ref{Csize_t}),
                   live(o), buf, length(buf), written))
    resize!(buf, written[])
end

"Restores a checkpoint from [`save_state`](@ref) (same configuration and tensor layout)."
function load_state!(o::Optimizer, buf::Vector{UInt8})
    check(o, ccall(sym(:lra_load_state), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Csize_t),
                   live(o), buf, length(buf)))
end

# Cross-rank reduction: the C callback receives the Optimizer as `user`.
function reduce_trampoline(values::Ptr{Float64}, count::Csize_t, user::Ptr{Cvoid})::Int32
    try
        o = unsafe_pointer_to_objref(user)::Optimizer
        o.reducer(unsafe_wrap(Array, values, count))
        return Int32(0)
    catch
        return Int32(1)
    end
end

"""
    set_reduction!(opt, f)

Registers `f(values::Vector{Float64})`, which must replace `values` in place
by their sums over all ranks (e.g. `v -> MPI.Allreduce!(v, +, comm)`);
`nothing` removes it.
"""
function set_reduction!(o::Optimizer, f)
    if f === nothing
        check(o, ccall(sym(:lra_set_reduction), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Ptr{Cvoid}),
                       live(o), C_NULL, C_NULL))
        o.reducer = nothing
    else
        o.reducer = f
        # `o` is mutable and owns the handle, so it outlives every callback.
        check(o, ccall(sym(:lra_set_reduction), lra_status, (Ptr{OpaqueHandle}, Ptr{Cvoid}, Ptr{Cvoid}),
                       live(o), REDUCE_TRAMPOLINE[], pointer_from_objref(o)))
    end
    return nothing
end

end # module
