# Tests of the Julia binding. NEVER RUN: Julia cannot be installed where this
# package was written (see README.md); the suite checks the ccalls statically.
#   LRA_LIBRARY=/path/to/liblra.so julia --project=bindings/julia -e 'using Pkg; Pkg.test()'
using LRA
using Random
using Serialization
using Test

Random.seed!(0)  # the least-squares problem below is the same every run

# The exception `f()` throws, or `nothing`.
function caught(f)
    try
        f()
        nothing
    catch e
        e
    end
end

@testset "LRA" begin
    @test LRA.version() >= v"0.1.0"
    # The library loaded has this binding's ABI; others are refused at dlopen.
    h = LRA.HEADER_VERSION
    @test LRA.abi_compatible(LRA.version())
    @test LRA.abi_compatible(VersionNumber(h.major, h.minor, h.patch + 1))
    @test LRA.abi_compatible(VersionNumber(h.major, h.minor + 1, 0)) == (h.major >= 1)
    @test !LRA.abi_compatible(VersionNumber(h.major + 1, 0, 0))

    # The optimizer is config's first argument, not a field to overwrite.
    @test_throws ArgumentError LRA.config(:adam; optimizer = 6)
    @test_throws ArgumentError LRA.config(:adam; struct_size = 0)

    err = try
        LRA.Optimizer(:sgd; lr = -1.0)
        nothing
    catch e
        e
    end
    @test err isa LRAError
    @test err.status == LRA.LRA_INVALID_CONFIG
    @test occursin("lr", err.message)

    w = Float32[1, -2, 3]
    g = Float32[0.5, 0.5, -1]
    opt = LRA.Optimizer(:sgd; lr = 0.1, num_threads = 1)
    step!(opt, w, g, 2.0)
    @test w ≈ Float32[0.95, -2.05, 3.1]
    @test last_phi(opt) ≈ 0.15
    info = report_reeval!(opt, 2.0 - 0.15)
    @test decision_name(info) == :raised
    @test lr(opt) ≈ 0.12
    err = caught(() -> report_reeval!(opt, 1.0))    # no pending step
    @test err isa LRAError && err.status == LRA.LRA_CALL_ORDER
    @test occursin("without a pending step", err.message)
    @test LRA.last_error(opt) == err.message         # the handle's record of the same failure
    # Same length, other shape: refused before lra is called.
    @test_throws DimensionMismatch step!(opt, zeros(Float32, 2, 3), zeros(Float32, 3, 2), 1.0)
    # Bad inputs are ArgumentErrors, not MethodErrors.
    @test_throws ArgumentError step!(opt, w, Float16[0, 0, 0], 1.0)
    @test_throws ArgumentError step!(opt, w, g, 1.0; found_inf = 0f0)
    @test_throws ArgumentError step!(opt, Union{Float32,Float16}[1, 2], Union{Float32,Float16}[0, 0], 1.0)
    @test counters(opt).steps == 1

    # Flat buffer training: least squares, from a tiny learning rate.
    a = randn(Float32, 64, 8)
    truth = randn(Float32, 8)
    y = a * truth
    θ = zeros(Float32, 8)
    ∇ = similar(θ)
    loss(θ) = sum(abs2, a * θ - y) / length(y)
    opt = LRA.Optimizer(:momentum; lr = 1e-5, num_threads = 1)
    first_loss = loss(θ)
    for _ in 1:300
        ∇ .= 2 .* (a' * (a * θ - y)) ./ length(y)
        step!(opt, θ, ∇, loss(θ))
        reeval!(() -> loss(θ), opt)
    end
    @test loss(θ) < 1e-3 * first_loss
    @test counters(opt).raised > 0

    # Sharded: a rank whose shard is empty still steps and joins every
    # reduction (one rank here, so the sum is the identity). The same calls
    # through the Python binding give φ = 0, reductions of 3 and 1 values,
    # and a skipped ratio test (φ ≤ 0).
    sizes = Int[]
    empty_rank = LRA.Optimizer(:sgd; sharding = :sharded, num_threads = 1)
    set_reduction!(empty_rank, v -> push!(sizes, length(v)))
    step!(empty_rank, Vector{Float32}[], Vector{Float32}[], 1.0)
    @test last_phi(empty_rank) == 0.0
    info = report_reeval!(empty_rank, 0.5)
    @test decision_name(info) == :skipped
    @test info.skip_reason == LRA.LRA_SKIP_NONPOSITIVE_PHI
    @test sizes == [3, 1]
    close(empty_rank)

    # Calls on a handle from inside its reduction callback are refused with
    # LRA_CALL_ORDER and the refusal's own message (the calling thread's:
    # the handle's belongs to the running step); close is refused too, and
    # the handle stays open and usable. (The same lra calls through the
    # Python binding: "lra_get_lr: the handle is in the middle of another
    # call ...", and the step succeeds.)
    inside = Any[]
    busy = LRA.Optimizer(:sgd; sharding = :sharded, num_threads = 1)
    function refusing(v)
        if isempty(inside)
            push!(inside, caught(() -> lr(busy)))
            push!(inside, caught(() -> close(busy)))
        end
        return nothing
    end
    set_reduction!(busy, refusing)
    step!(busy, Float32[1, -2, 3], Float32[0.5, 0.5, -1], 2.0)
    @test length(inside) == 2
    @test all(e -> e isa LRAError && e.status == LRA.LRA_CALL_ORDER, inside)
    @test occursin("lra_get_lr: the handle is in the middle of another call", inside[1].message)
    @test counters(busy).steps == 1
    close(busy)
    @test_throws LRAError lr(busy)

    # An exception escaping the reducer fails the call with
    # LRA_REDUCTION_FAILED (nothing changes) and is the LRAError's cause.
    failing = LRA.Optimizer(:sgd; sharding = :sharded, num_threads = 1)
    set_reduction!(failing, v -> error("collective broke"))
    err = caught(() -> step!(failing, Float32[1, 2], Float32[0.5, -0.5], 1.0))
    @test err isa LRAError && err.status == LRA.LRA_REDUCTION_FAILED
    @test err.cause isa CapturedException && err.cause.ex isa ErrorException &&
          err.cause.ex.msg == "collective broke"
    @test counters(failing).steps == 0
    close(failing)

    # A reducer that waits cannot move the task to another thread in the
    # middle of an lra call: the reducer's task is sticky (on its thread)
    # from its first call on, for good, also a `Threads.@spawn` task.
    Threads.nthreads() > 1 || @warn "only one thread: the task-migration test below " *
        "cannot fail; run the tests with `julia --threads=4`"
    sticky_inside = Bool[]
    moved = Bool[]
    waiting = LRA.Optimizer(:sgd; sharding = :sharded, num_threads = 1)
    set_reduction!(waiting, function (v)
        tid = Threads.threadid()
        push!(sticky_inside, current_task().sticky)
        sleep(0.001)  # a task switch
        push!(moved, Threads.threadid() != tid)
        return nothing
    end)
    sticky_after = fetch(Threads.@spawn begin
        step!(waiting, Float32[1, 2], Float32[0.5, -0.5], 1.0)
        current_task().sticky
    end)
    @test !isempty(sticky_inside) && all(sticky_inside)
    @test !any(moved)
    @test sticky_after == true
    @test counters(waiting).steps == 1
    close(waiting)

    # A CUDA handle refuses host arrays before lra is called (where one can
    # be created: elsewhere lra_create fails with LRA_NO_CUDA).
    gpu = try
        LRA.Optimizer(:sgd; device = :cuda, num_threads = 1)
    catch e
        (e isa LRAError && e.status == LRA.LRA_NO_CUDA) || rethrow()
        nothing
    end
    if gpu === nothing
        @info "no CUDA device (lra_create -> LRA_NO_CUDA): the device-handle test is skipped"
        @test_skip "a device handle refuses host memory"
    else
        err = caught(() -> step!(gpu, Float32[1, 2], Float32[0, 0], 1.0))
        @test err isa ArgumentError && occursin("host memory", err.msg)
        @test counters(gpu).steps == 0
        close(gpu)
    end

    # A copy would own the same handle (a double lra_destroy): refused.
    @test_throws ArgumentError deepcopy(opt)
    @test_throws ArgumentError serialize(IOBuffer(), opt)

    # Checkpoints round-trip.
    blob = save_state(opt)
    other = LRA.Optimizer(:momentum; lr = 1e-5, num_threads = 1)
    step!(other, θ, ∇, loss(θ))
    load_state!(other, blob)
    @test lr(other) == lr(opt)
    close(other)
    @test_throws LRAError lr(other)
end
