#!/usr/bin/env bash
# Builds the release library and installs lra under PREFIX:
#   PREFIX/lib/liblra.so.VERSION, liblra.a   the C ABI (shared and static), with the
#   PREFIX/lib/liblra.so.ABI, liblra.so       links to it (ABI: the SONAME's suffix, build.rs)
#   PREFIX/include/lra.h                      the C header
#   PREFIX/include/lra_agreement.h            shared by the MPI and NCCL helpers below
#   PREFIX/include/lra.hpp, lra_torch.hpp     the header-only C++17 bindings
#   PREFIX/include/lra_*.h                    header-only helpers of bindings/*/ (MPI, NCCL, ...)
#   PREFIX/include/lra.f90                    the Fortran module source (compile it with your compiler)
#   PREFIX/include/lra_mpi.f90                its MPI reduction (module lra_mpi; compile with mpifort)
#   PREFIX/lib/cmake/lra/                     find_package(lra) (CMAKE_PREFIX_PATH=PREFIX)
#   PREFIX/lib/pkgconfig/lra.pc               pkg-config (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig)
#   PREFIX/share/lra/install_manifest.txt     every file and link above, relative to PREFIX
# The installed libraries are stripped of their debug info (strip --strip-debug;
# the build in target/ keeps it: the release profile has debug = 1).
# Usage: scripts/install.sh PREFIX   (honours CARGO_TARGET_DIR; LRA_SKIP_BUILD=1
# installs the library already built there; LRA_INSTALL_DEBUG=1 keeps the debug info).
#        scripts/install.sh --uninstall PREFIX   removes what the manifest lists, then
# the directories the install makes, where left empty (needs no build and no cargo).
set -euo pipefail
die() { echo "install.sh: $*" >&2; exit 1; }
usage() { echo "usage: install.sh PREFIX | install.sh --uninstall PREFIX" >&2; exit 2; }
manifest_rel=share/lra/install_manifest.txt

# Removes the files and links listed in PREFIX's manifest, then the
# directories it lists (lines ending in `/`: those the install created),
# where left empty; every line is checked (relative, no `..`, a directory
# only where it ends in `/`) before anything is removed.
uninstall() {
  local prefix="$1" manifest line d entries=() made=() removed=0 gone=0 dirs=0
  manifest="$prefix/$manifest_rel"
  [ -f "$manifest" ] || die "no $manifest: nothing to uninstall (install.sh writes it; without it nothing is removed)"
  prefix="$(cd "$prefix" && pwd)"
  manifest="$prefix/$manifest_rel"
  while IFS= read -r line || [ -n "$line" ]; do
    [ -n "$line" ] || continue
    case "/$line/" in
      //*) die "$manifest lists the absolute path '$line': refused, nothing removed" ;;
      */../*) die "$manifest lists '$line', a path with a '..' component (it could lead out of $prefix): refused, nothing removed" ;;
    esac
    case "$line" in
      */) made+=("${line%/}"); continue ;;
    esac
    if [ -d "$prefix/$line" ] && [ ! -L "$prefix/$line" ]; then
      die "$manifest lists '$line', a directory: refused, nothing removed"
    fi
    entries+=("$line")
  done <"$manifest"
  for line in ${entries[@]+"${entries[@]}"}; do
    if [ -e "$prefix/$line" ] || [ -L "$prefix/$line" ]; then
      rm -f -- "$prefix/$line"
      removed=$((removed + 1))
    else
      gone=$((gone + 1))
    fi
  done
  # The manifest itself goes last, listed or not.
  if [ -e "$manifest" ]; then rm -f -- "$manifest"; removed=$((removed + 1)); fi
  # Deepest first: the install lists them parents first.
  for ((i = ${#made[@]} - 1; i >= 0; i--)); do
    d=${made[i]}
    if [ -d "$prefix/$d" ] && [ ! -L "$prefix/$d" ] && [ -z "$(ls -A "$prefix/$d")" ]; then
      rmdir -- "$prefix/$d"
      dirs=$((dirs + 1))
    fi
  done
  if [ "$gone" = 0 ]; then gone=""; else gone=" ($gone listed not found)"; fi
  echo "uninstalled lra from $prefix: removed $removed files and links, $dirs empty directories$gone"
}

case "${1-}" in
  --uninstall)
    if [ $# -ne 2 ] || [ -z "$2" ]; then usage; fi
    uninstall "$2"
    exit 0 ;;
  -*) usage ;;
esac
if [ $# -ne 1 ] || [ -z "$1" ]; then usage; fi
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
strip_debug=0
if [ "${LRA_INSTALL_DEBUG:-0}" != 1 ]; then
  if command -v strip >/dev/null; then
    strip_debug=1
  else
    echo "install.sh: warning: strip not found (Debian: binutils): the installed liblra.so.$version and liblra.a keep their debug info" >&2
  fi
fi

mkdir -p "$1"
prefix="$(cd "$1" && pwd)"
case "$prefix" in
  *[[:space:]]*)
    echo "install.sh: warning: the prefix '$prefix' contains whitespace, which pkg-config's flags cannot carry: use find_package(lra) (CMake), or pass -I and -L yourself" >&2 ;;
esac
# Every file and link installed, relative to PREFIX, for the manifest.
installed=()
# The directories this install creates (an earlier install's stay listed
# below), so that --uninstall removes those and no directory it found.
for d in lib lib/cmake lib/cmake/lra lib/pkgconfig include share share/lra; do
  [ -d "$prefix/$d" ] || installed+=("$d/")
done
put() { # put MODE SOURCE DEST (relative to PREFIX)
  install -m "$1" "$2" "$prefix/$3"
  installed+=("$3")
}
install -d "$prefix/lib" "$prefix/include" "$prefix/lib/cmake/lra" "$prefix/lib/pkgconfig" "$prefix/share/lra"
rm -f "$prefix/lib/liblra.so" "$prefix/lib/$soname"
put 755 "$target/release/liblra.so" "lib/liblra.so.$version"
ln -s "liblra.so.$version" "$prefix/lib/$soname"
ln -s "$soname" "$prefix/lib/liblra.so"
installed+=("lib/$soname" lib/liblra.so)
put 644 "$target/release/liblra.a" lib/liblra.a
if [ "$strip_debug" = 1 ]; then
  strip --strip-debug "$prefix/lib/liblra.so.$version" "$prefix/lib/liblra.a" ||
    echo "install.sh: warning: strip --strip-debug failed: the installed libraries may keep their debug info" >&2
fi
put 644 "$root/include/lra.h" include/lra.h
put 644 "$root/include/lra_agreement.h" include/lra_agreement.h
put 644 "$root/bindings/cpp/lra.hpp" include/lra.hpp
put 644 "$root/bindings/cpp/lra_torch.hpp" include/lra_torch.hpp
put 644 "$root/bindings/fortran/lra.f90" include/lra.f90
put 644 "$root/bindings/fortran/lra_mpi.f90" include/lra_mpi.f90
for helper in "$root"/bindings/*/lra_*.h; do
  if [ -e "$helper" ]; then put 644 "$helper" "include/${helper##*/}"; fi
done
put 644 "$root/bindings/cmake/lraConfig.cmake" lib/cmake/lra/lraConfig.cmake
# Substituted as plain strings (quoted replacements: `&`, `|` or `\` in the
# prefix are characters, not sed or bash pattern syntax).
fill() {
  local text
  text="$(<"$1")"
  text="${text//@PREFIX@/"$prefix"}"
  text="${text//@VERSION@/"$version"}"
  printf '%s\n' "$text" >"$prefix/$2"
  installed+=("$2")
}
fill "$root/bindings/cmake/lraConfigVersion.cmake.in" lib/cmake/lra/lraConfigVersion.cmake
fill "$root/bindings/cmake/lra.pc.in" lib/pkgconfig/lra.pc
# An earlier install's files that are still there and not installed anew
# (an older liblra.so.VERSION, which programs linked to it may still load)
# stay listed, so that --uninstall removes them too.
if [ -f "$prefix/$manifest_rel" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in "" | "$manifest_rel") continue ;; esac
    [ -e "$prefix/$line" ] || [ -L "$prefix/$line" ] || continue
    printf '%s\n' "${installed[@]}" | grep -qxF -- "$line" || installed+=("$line")
  done <"$prefix/$manifest_rel"
fi
# Listed last, itself included.
installed+=("$manifest_rel")
printf '%s\n' "${installed[@]}" >"$prefix/$manifest_rel"
echo "installed lra $version into $prefix"
