# CuArray support for LRA: device pointers, the current stream, and
# Optimizer(params::Vector{<:CuArray}) creating a CUDA handle on their device.
module LRACUDAExt

using CUDA
using LRA

LRA.device_pointer(a::CuArray) = reinterpret(Ptr{Cvoid}, pointer(a))
LRA.stream_of(::CuArray) = reinterpret(Ptr{Cvoid}, CUDA.stream().handle)

"""
    LRA.Optimizer(optimizer, params::AbstractVector{<:CuArray}; fields...)

A CUDA handle on the device holding `params` (CUDA.jl's primary context,
which lra shares).
"""
function LRA.Optimizer(optimizer::Symbol, params::AbstractVector{<:CuArray}; fields...)
    isempty(params) && throw(ArgumentError("no parameters"))
    dev = CUDA.device(first(params))
    LRA.Optimizer(optimizer; device = :cuda, device_ordinal = CUDA.deviceid(dev), fields...)
end

end # module
