#!/usr/bin/env bash
# Undefined behaviour at the C boundary: the C ABI's adversarial tests, the
# fuzzer's directed cases, threads as ranks and the schedules under Miri (the
# Rust interpreter that checks every pointer use, alignment, aliasing rule,
# uninitialised read and data race). Miri runs the portable CPU build (it
# reports no AVX2) on these small tests only: the larger ones, and one
# iteration of the randomized fuzzer (over half an hour), take minutes each
# in it.
#
# Needs a nightly toolchain with the miri and rust-src components: installed
# with rustup when the nightly toolchain is there, otherwise this stage
# prints why it skips.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TERM_COLOR=never
skip() { printf '\n!!!! SKIPPED: miri: %s !!!!\n' "$*"; }

if ! cargo +nightly --version >/dev/null 2>&1; then
  skip "no nightly Rust toolchain (rustup toolchain install nightly --component miri,rust-src)"
  exit 0
fi
if ! cargo +nightly miri --version >/dev/null 2>&1 \
  || ! [ -d "$(rustc +nightly --print sysroot)/lib/rustlib/src/rust/library" ]; then
  timeout 600 rustup component add --toolchain nightly miri rust-src \
    || { skip "could not install the nightly miri and rust-src components"; exit 0; }
fi
# `cargo miri setup` builds Miri's standard library in a temporary
# directory; a stray Cargo.toml above that directory would be taken for its
# workspace, so it gets a directory of its own.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export TMPDIR="$tmp"
cargo +nightly miri setup || { skip "cargo miri setup could not build Miri's standard library (see above)"; exit 0; }

start=$SECONDS
cargo +nightly miri test --test ffi_adversarial
# Also what references point at (experimental in Miri, so for this one test
# only): lra_save_state must not form a `&mut [u8]` over a C caller's
# uninitialised (malloc'd) buffer.
MIRIFLAGS=-Zmiri-recursive-validation cargo +nightly miri test --test ffi_adversarial \
  -- --exact a_checkpoint_goes_into_an_uninitialised_buffer
cargo +nightly miri test --test ffi_fuzz -- --skip the_c_abi_survives_random_call_sequences
cargo +nightly miri test --test ranks_adversarial
cargo +nightly miri test --test schedules
echo "miri: ffi_adversarial, ffi_fuzz (directed cases), ranks_adversarial and schedules" \
  "ran without undefined behaviour in $((SECONDS - start)) s"
