#!/usr/bin/env bash
# Issue 2, test 4: a C program compiled with cc (and clang) against include/lra.h trains
# models and walks every error path; against the shared and the static
# library; the shared build runs clean under valgrind (no leaks, no invalid access).
set -euo pipefail
cd "$(dirname "$0")/../.."
lib="${CARGO_TARGET_DIR:-target}/release"
cargo build --release --lib # a no-op after scripts/test.sh's build; current when run alone
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

# A second compiler, clang (what macOS and many HPC sites use): the same test
# built and run, the C++ binding's tests too, and the headers alone under
# further warnings (documentation comments, implicit conversions).
clang=""
for cand in clang-19 clang; do
  if command -v "$cand" >/dev/null && command -v "${cand/clang/clang++}" >/dev/null; then
    clang=$cand
    break
  fi
done
if [ -n "$clang" ]; then
  clangxx=${clang/clang/clang++}
  echo "-- clang: $("$clang" --version | head -n 1)"
  "$clang" "${cflags[@]}" tests/c/abi_test.c -o "$out/abi_clang" -L"$lib" -llra -Wl,-rpath,"$(cd "$lib" && pwd)" -lm
  "$out/abi_clang" | tail -n 1
  "$clangxx" -std=c++17 -Wall -Wextra -Werror -pedantic -O1 -Iinclude -Ibindings/cpp \
    bindings/cpp/tests/test_lra_hpp.cpp -o "$out/hpp_clang" -L"$lib" -llra -Wl,-rpath,"$(cd "$lib" && pwd)"
  "$out/hpp_clang" | tail -n 1
  strict=(-Wall -Wextra -Werror -pedantic -Wdocumentation -Wconversion -Wsign-conversion -Iinclude -fsyntax-only)
  printf '#include "lra.h"\n' > "$out/header.c"
  printf '#include "lra.hpp"\n' > "$out/header.cpp"
  "$clang" -std=c99 -Wstrict-prototypes "${strict[@]}" "$out/header.c"
  "$clangxx" -std=c++17 -Ibindings/cpp "${strict[@]}" "$out/header.cpp"
  echo "clang: lra.h (C99) and lra.hpp (C++17) compile without a warning under ${strict[*]:0:7}"
else
  echo "!!!! SKIPPED: clang not found (Debian: clang-19; scripts/deps.sh installs it): the C ABI test ran with cc only !!!!"
fi
