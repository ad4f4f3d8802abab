#!/usr/bin/env bash
# Builds the release library and installs lra under PREFIX:
#   PREFIX/lib/liblra.so.VERSION, liblra.a   the C ABI (shared and static), with the
#   PREFIX/lib/liblra.so.ABI, liblra.so       links to it (ABI: the SONAME's suffix, build.rs)
#   PREFIX/include/lra.h                      the C header
#   PREFIX/include/lra.hpp, lra_torch.hpp     the header-only C++17 bindings
#   PREFIX/include/lra_*.h                    header-only helpers of bindings/*/ (MPI, NCCL, ...)
#   PREFIX/include/lra.f90                    the Fortran module source (compile it with your compiler)
#   PREFIX/include/lra_mpi.f90                its MPI reduction (module lra_mpi; compile with mpifort)
#   PREFIX/lib/cmake/lra/                     find_package(lra) (CMAKE_PREFIX_PATH=PREFIX)
#   PREFIX/lib/pkgconfig/lra.pc               pkg-config (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
# Usage: scripts/install.sh PREFIX   (honours CARGO_TARGET_DIR; LRA_SKIP_BUILD=1
# installs the library already built there).
set -euo pipefail
die() { echo "install.sh: $*" >&2; exit 1; }
if [ $# -ne 1 ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
# cargo, run in $root below, takes a relative CARGO_TARGET_DIR from there.
case "$target" in /*) ;; *) target="$root/$target" ;; esac

if [ "${LRA_SKIP_BUILD:-0}" != 1 ]; then
  (cd "$root" && cargo build --release --lib)
fi
# Everything is checked before PREFIX is touched.
for built in liblra.so liblra.a; do
  [ -f "$target/release/$built" ] ||
    die "no $target/release/$built: build it first (cargo build --release --lib, with the same CARGO_TARGET_DIR), or run without LRA_SKIP_BUILD=1"
done
version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml" | head -n 1)"
[ -n "$version" ] || die "no version in Cargo.toml"
# The SONAME rule lives in build.rs; read it back from the library.
if command -v objdump >/dev/null; then
  soname="$(objdump -p "$target/release/liblra.so" | sed -n 's/^ *SONAME *//p')" || true
elif command -v readelf >/dev/null; then
  soname="$(readelf -d "$target/release/liblra.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')" || true
else
  die "needs objdump or readelf (Debian: binutils) to read the library's SONAME"
fi
case "$soname" in
  liblra.so.?*) ;;
  *) die "$target/release/liblra.so has no SONAME liblra.so.<abi> (read: '$soname')" ;;
esac

mkdir -p "$1"
prefix="$(cd "$1" && pwd)"
case "$prefix" in
  *[[:space:]]*)
    echo "install.sh: warning: the prefix '$prefix' contains whitespace, which pkg-config's flags cannot carry: use find_package(lra) (CMake), or pass -I and -L yourself" >&2 ;;
esac
install -d "$prefix/lib" "$prefix/include" "$prefix/lib/cmake/lra" "$prefix/lib/pkgconfig"
rm -f "$prefix/lib/liblra.so" "$prefix/lib/$soname"
install -m 755 "$target/release/liblra.so" "$prefix/lib/liblra.so.$version"
ln -s "liblra.so.$version" "$prefix/lib/$soname"
ln -s "$soname" "$prefix/lib/liblra.so"
install -m 644 "$target/release/liblra.a" "$prefix/lib/liblra.a"
install -m 644 "$root/include/lra.h" "$prefix/include/lra.h"
install -m 644 "$root/bindings/cpp/lra.hpp" "$root/bindings/cpp/lra_torch.hpp" "$prefix/include/"
install -m 644 "$root/bindings/fortran/lra.f90" "$root/bindings/fortran/lra_mpi.f90" "$prefix/include/"
for helper in "$root"/bindings/*/lra_*.h; do
  if [ -e "$helper" ]; then install -m 644 "$helper" "$prefix/include/"; fi
done
install -m 644 "$root/bindings/cmake/lraConfig.cmake" "$prefix/lib/cmake/lra/lraConfig.cmake"
# Substituted as plain strings (quoted replacements: `&`, `|` or `\` in the
# prefix are characters, not sed or bash pattern syntax).
fill() {
  local text
  text="$(<"$1")"
  text="${text//@PREFIX@/"$prefix"}"
  text="${text//@VERSION@/"$version"}"
  printf '%s\n' "$text" >"$2"
}
fill "$root/bindings/cmake/lraConfigVersion.cmake.in" "$prefix/lib/cmake/lra/lraConfigVersion.cmake"
fill "$root/bindings/cmake/lra.pc.in" "$prefix/lib/pkgconfig/lra.pc"
echo "installed lra $version into $prefix"
