#!/usr/bin/env bash
# The CUDA backend's host code end to end without a GPU: tests/cuda.rs, at
# its full sizes, against a fake CUDA driver (fake-cuda/: a libcuda.so whose
# kernels, the real kernels/lra.ptx, run in the ptx-interp interpreter with
# its race, bounds, alignment and undefined-value checks; streams are
# asynchronous, each run in order by a thread of its own, ordered by events
# and the legacy stream's rules). See fake-cuda/src/lib.rs.
#
# The interpreter runs the blocks of a launch in a seeded random order with
# their threads interleaved (FAKE_CUDA_SCHEDULE, default here random:1; also
# in-order, reversed): every one a schedule a GPU could run, and the race
# checks see the cross-block hand-overs of the last-block reduction.
#
# The run must not pass by skipping: exactly the tests listed below may
# skip (the no-driver test, and the one too large for the interpreter), and
# every other test of tests/cuda.rs must have run and passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=never

# Skipped because a driver is present (it asserts the no-driver path).
expect_skipped="no_gpu_handle_reports_no_cuda"
# Skipped by LRA_FAKE_CUDA, each with its reason printed by the test.
expect_fake_skipped=$'phi_is_bit_identical_across_runs\nthe_kernel_jit_spills_nothing'
# Run, but with a part left out on the fake driver ("!!!! PARTIAL:").
expect_partial="a_host_handle_refuses_device_memory"

target=${CARGO_TARGET_DIR:-target}
cargo build --release -p fake-cuda
# A directory of its own: a libcuda.so in the target directory would be on
# the library path of every `cargo test` (see fake-cuda/Cargo.toml).
driver_dir=$(mktemp -d)
trap 'rm -rf "$driver_dir"' EXIT
cp "$target/release/libfake_cuda.so" "$driver_dir/libcuda.so"
log="$driver_dir/cuda-tests.log"

export FAKE_CUDA_SCHEDULE=${FAKE_CUDA_SCHEDULE:-random:1}
echo "fake driver: $driver_dir/libcuda.so, schedule $FAKE_CUDA_SCHEDULE"
start=$SECONDS
LD_LIBRARY_PATH="$driver_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LRA_FAKE_CUDA=1 \
  cargo test --profile checked --test cuda 2>&1 | tee "$log"
# One test alone again with the environment settings $2; it must pass.
again() {
  echo "---- $1 with $2"
  env $2 LD_LIBRARY_PATH="$driver_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LRA_FAKE_CUDA=1 \
    cargo test --profile checked --test cuda -- --exact "$1" 2>&1 | tee "$driver_dir/again.log"
  grep -qx "test $1 ... ok" "$driver_dir/again.log" \
    || { echo "FAIL: $1 did not pass with $2"; exit 1; }
  cat "$driver_dir/again.log" >> "$log"
}
# Memory of the virtual memory management API: public reports disagree on
# what the driver's range attributes give for it (one mapping, the default
# above, or the whole reservation), and older drivers lack the newer
# attributes (11.0: access and mappings; 11.4: mappings). The VMM test
# again under each combination (it must pass under all).
vmm_test=memory_mapped_through_the_vmm_api_is_checked_by_its_mapped_extent
for variant in "FAKE_CUDA_VMM_RANGE=reservation" \
  "FAKE_CUDA_VMM_RANGE=mapping FAKE_CUDA_POINTER_ATTRIBUTES=11.0" \
  "FAKE_CUDA_VMM_RANGE=reservation FAKE_CUDA_POINTER_ATTRIBUTES=11.0" \
  "FAKE_CUDA_VMM_RANGE=mapping FAKE_CUDA_POINTER_ATTRIBUTES=11.4" \
  "FAKE_CUDA_VMM_RANGE=reservation FAKE_CUDA_POINTER_ATTRIBUTES=11.4"; do
  again "$vmm_test" "$variant"
done
# Pool memory: nothing documents what ACCESS_FLAGS does for it (the fake
# answers 0 by default). The pool test again with the driver refusing it,
# with and without the mapping attributes (11.4).
for variant in "FAKE_CUDA_POOL_ACCESS_FLAGS=refused" \
  "FAKE_CUDA_POOL_ACCESS_FLAGS=refused FAKE_CUDA_POINTER_ATTRIBUTES=11.4"; do
  again stream_ordered_pool_memory_is_accepted "$variant"
done
# The driver layer's unit tests (src/backend/cuda/driver.rs, private
# types such as the pinned staging buffers) on the fake driver too; a skip
# there (no driver loaded) fails the skip check below.
LD_LIBRARY_PATH="$driver_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LRA_FAKE_CUDA=1 \
  cargo test --profile checked --lib backend::cuda::driver 2>&1 | tee -a "$log"
# A filter that matches nothing passes with "0 passed": require the tests.
driver_unit_tests="an_upload_larger_than_every_slot_adds_one_slot"
for t in $driver_unit_tests; do
  grep -qx "test backend::cuda::driver::tests::$t ... ok" "$log" || {
    echo "FAIL: the driver unit test $t did not run (renamed? update $0)"; exit 1; }
done
elapsed=$((SECONDS - start))

# Test names after a prefix, wherever the prefix is on a line.
names() { grep -o "$1[a-z0-9_]*" "$log" | sed "s/^$1//" | sort -u || true; }
passed=$(sed -n 's/^test \([a-z0-9_]*\) \.\.\. ok$/\1/p' "$log" | sort -u)
skipped=$(names '!!!! SKIPPED: ')
fake_skipped=$(names '!!!! SKIPPED (fake driver): ')
partial=$(names '!!!! PARTIAL: ')
status=0
if [ "$skipped" != "$expect_skipped" ]; then
  echo "FAIL: skipped for lack of a driver: [$skipped], expected [$expect_skipped] (did the fake driver load?)"
  status=1
fi
if [ "$fake_skipped" != "$expect_fake_skipped" ]; then
  echo "FAIL: skipped on the fake driver: [$(echo $fake_skipped)], expected [$(echo $expect_fake_skipped)]"
  status=1
fi
if [ "$partial" != "$expect_partial" ]; then
  echo "FAIL: run in part on the fake driver: [$(echo $partial)], expected [$(echo $expect_partial)]"
  status=1
fi
ran=$(comm -23 <(echo "$passed") <(printf '%s\n' $expect_skipped $expect_fake_skipped | sort))
for t in $expect_skipped $expect_fake_skipped; do
  grep -qx "$t" <<< "$passed" || { echo "FAIL: $t is not a passing test of tests/cuda.rs"; status=1; }
done
if grep -q '^fake-cuda: ' "$log"; then
  echo "FAIL: the fake driver refused calls (the 'fake-cuda:' lines above; lra saw those errors, or ignored them)"
  status=1
fi
if [ -z "$ran" ]; then
  echo "FAIL: no test ran on the fake driver"
  status=1
fi
[ $status -eq 0 ] || exit $status
echo "ok: $(wc -l <<< "$ran") tests of tests/cuda.rs ran and passed on the fake CUDA driver ($FAKE_CUDA_SCHEDULE) in ${elapsed}s:" $ran
echo "    (skipped as expected: $(echo $expect_skipped $expect_fake_skipped); run in part as expected: $expect_partial)"
