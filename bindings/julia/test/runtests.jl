# Tests of the Julia binding. NEVER RUN: Julia cannot be installed where this
# package was written (see README.md); the suite checks the ccalls statically.
#   LRA_LIBRARY=/path/to/liblra.so julia --project=bindings/julia -e 'using Pkg; Pkg.test()'
using LRA
using Test

@testset "LRA" begin
    @test LRA.version() >= v"0.1.0"

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
    @test_throws LRAError report_reeval!(opt, 1.0)   # no pending step

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

    # Checkpoints round-trip.
    blob = save_state(opt)
    other = LRA.Optimizer(:momentum; lr = 1e-5, num_threads = 1)
    step!(other, θ, ∇, loss(θ))
    load_state!(other, blob)
    @test lr(other) == lr(opt)
    close(other)
    @test_throws LRAError lr(other)
end
