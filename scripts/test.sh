#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run calls exactly this).
# Installs what the suite needs when it is missing (Debian packages, the PyPI
# wheel carrying ptxas), or skips that part with a loud printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

say() { printf '\n==== %s ====\n' "$*"; }
skip() { printf '\n!!!! SKIPPED: %s !!!!\n' "$*"; }

# The whole run also goes to a log, so that its end can list every part
# that skipped (a run with half its stages skipped must not end like a
# full one).
log="${CARGO_TARGET_DIR:-target}/test-suite.log"
mkdir -p "$(dirname "$log")"
# Skips of single tests ("!!!! SKIPPED: <test>: <why>") are grouped by
# reason; tests that ran with a part left out ("!!!! PARTIAL: <test>:
# <what>") are listed after them.
tally() {
  local n
  n=$(grep -c '!!!! SKIPPED' "$log" || true)
  printf '\n==== %s skip lines%s ====\n' "$n" "$([ "$n" = 0 ] || echo ', by reason:')"
  grep -o '!!!! SKIPPED.*' "$log" | sed -E 's/^!!!! SKIPPED: [a-z0-9_]+: /!!!! SKIPPED: (test) /' \
    | sort | uniq -c | sort -rn || true
  n=$(grep -c '!!!! PARTIAL' "$log" || true)
  [ "$n" = 0 ] || { printf '==== %s partial lines (the test ran, this part did not) ====\n' "$n"
    grep -o '!!!! PARTIAL.*' "$log" | sort | uniq -c | sort -rn || true; }
}
if [ -z "${LRA_TEST_LOGGED:-}" ]; then
  rc=0
  LRA_TEST_LOGGED=1 bash scripts/test.sh "$@" 2>&1 | tee "$log" || rc=$?
  tally
  if [ "$rc" = 0 ]; then echo "all stages passed (log: $log)"; else echo "FAILED (exit $rc; log: $log)"; fi
  exit "$rc"
fi

say "dependencies"
scripts/deps.sh || skip "some dependencies could not be installed (see above); their stages print why they skip"

say "documentation: paths, test names, variables and cargo targets the Markdown names exist"
if command -v python3 >/dev/null 2>&1; then
  python3 scripts/check_docs.py --self-test
else
  skip "python3 not found: scripts/check_docs.py (stale references in the docs) did not run"
fi

say "format, lints and API documentation"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The API documentation builds without a warning (broken or private links).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

say "cargo tests (unit, integration, header drift, PTX interpreter)"
cargo build --release --lib
# The `checked` profile (Cargo.toml): optimised, with debug assertions and
# overflow checks, so the standard library's checks of unsafe preconditions
# and lra's own debug assertions run; the stages below test the release
# library as it ships.
cargo test --workspace --profile checked

# Stage scripts: each proves one layer and prints why it skips a part.
for stage in scripts/stages/*.sh; do
  [ -e "$stage" ] || continue
  say "stage $(basename "$stage" .sh)"
  bash "$stage"
done

