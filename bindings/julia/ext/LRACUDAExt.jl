# CuArray support for LRA: device pointers, the current stream, where an array
# lives, and Optimizer(params::Vector{<:CuArray}) (or one flat CuArray)
# creating a CUDA handle on their device.
module LRACUDAExt

using CUDA
using LRA

LRA.device_pointer(a::CuArray) = reinterpret(Ptr{Cvoid}, pointer(a))
LRA.stream_of(::CuArray) = LRA.stream_handle(CUDA.stream())
LRA.stream_handle(s::CuStream) = reinterpret(Ptr{Cvoid}, s.handle)
# CUDA.jl records which stream last used each array when its pointer is
# taken, and syncs on a change: with `s` as the task's stream, lra's work on
# `s` waits for the arrays' producers, and later uses wait for lra.
LRA.with_stream(f, s::CuStream) = CUDA.stream!(f, s)
LRA.placement(a::CuArray) = (LRA.LRA_DEVICE_CUDA, CUDA.deviceid(CUDA.device(a)))
# `pointer` and `stream()` use the task's current device; the array's, here.
LRA.with_device_of(f, a::CuArray) = CUDA.device!(f, CUDA.device(a))

"""
    LRA.Optimizer(optimizer, params::AbstractVector{<:CuArray}; fields...)
    LRA.Optimizer(optimizer, param::CuArray; fields...)

A CUDA handle on the device holding `params` (CUDA.jl's primary context,
which lra shares). The handle's `device` and `device_ordinal` follow the
parameters: a `device` or `device_ordinal` keyword that contradicts them
throws `ArgumentError` (a host handle given device pointers, or a handle on
another device, would dereference foreign memory).
"""
function LRA.Optimizer(optimizer::Symbol, params::AbstractVector{<:CuArray}; fields...)
    isempty(params) && throw(ArgumentError("no parameters"))
    dev = CUDA.device(first(params))
    ordinal = CUDA.deviceid(dev)
    for (key, want) in ((:device, LRA.LRA_DEVICE_CUDA), (:device_ordinal, ordinal))
        haskey(fields, key) || continue
        given = key == :device ? LRA.device_code(fields[key]) : fields[key]
        given == want || throw(ArgumentError(
            "$key = $(repr(fields[key])) contradicts the parameters' device (CUDA device " *
            "$ordinal): the handle's device follows the parameters; leave it out"))
    end
    LRA.Optimizer(optimizer; fields..., device = LRA.LRA_DEVICE_CUDA, device_ordinal = ordinal)
end
LRA.Optimizer(optimizer::Symbol, param::CuArray; fields...) = LRA.Optimizer(optimizer, [param]; fields...)

end # module
