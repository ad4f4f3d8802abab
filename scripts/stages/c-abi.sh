#!/usr/bin/env bash
# Issue 2, test 4: a C program compiled with cc against include/lra.h trains
# models and walks every error path; against the shared and the static
# library; the shared build runs clean under valgrind (no leaks, no invalid access).
set -euo pipefail
cd "$(dirname "$0")/../.."
lib="${CARGO_TARGET_DIR:-target}/release"
[ -f "$lib/liblra.so" ] || cargo build --release --lib
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -O1 -g -Iinclude)
cc "${cflags[@]}" tests/c/abi_test.c -o "$out/abi_shared" -L"$lib" -llra -Wl,-rpath,"$(cd "$lib" && pwd)" -lm
cc "${cflags[@]}" tests/c/abi_test.c -o "$out/abi_static" "$lib/liblra.a" -lpthread -ldl -lm
echo "-- static library"
"$out/abi_static"
echo "-- shared library"
"$out/abi_shared"
if command -v valgrind >/dev/null; then
  echo "-- shared library under valgrind"
  valgrind --quiet --error-exitcode=3 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect "$out/abi_shared" >/dev/null
  echo "valgrind: no invalid accesses, no definite or indirect leaks"
else
  echo "!!!! SKIPPED: valgrind is not installed (apt-get install valgrind; scripts/deps.sh does) !!!!"
fi
