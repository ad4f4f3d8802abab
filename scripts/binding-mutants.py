#!/usr/bin/env python3
"""Mutation testing of the C++, Fortran, MPI and NCCL bindings against their tests.

Makes small edits to one binding file, one at a time, and runs that
binding's tests on each edited copy. An edit the tests pass survives:
either it changes nothing the binding promises (an equivalent edit) or the
tests miss what it breaks. Survivors are printed for a person to judge.

    cargo build --release --lib
    python3 scripts/binding-mutants.py bindings/cpp/lra.hpp --sample 0 | tee hpp.log
    python3 scripts/binding-mutants.py bindings/cpp/lra.hpp --recheck hpp.log   # after adding tests

Edits, on code outside comments and string literals: a comparison, `&&`/`||`
(`.and.`/`.or.`), `+`/`-` or `true`/`false` swapped; a `!` (`.not.`)
dropped; an integer literal plus one; a one-line statement deleted.

Each file's tests are the ones its CI stage runs (scripts/stages/bindings.sh,
fortran.sh, mpi.sh, nccl.sh), cut to one compiler and one MPI (Open MPI),
the NCCL GPU test run directly over the pretend GPU rather than through
gpu-check.sh. They are built once unedited (which must pass) and then again
per edit in a scratch copy of the checkout, fastest first; an edit stops at
the first step it fails. A step that compiles failing is "did not build";
one that runs, "caught". LibTorch programs are built at -O0 with
<torch/torch.h> precompiled (about 10 s an edit instead of 35).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import mutation_draw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
LIB = os.path.join(os.path.abspath(TARGET), "release")
TORCH_DIRS = ["/usr/lib/x86_64-linux-gnu/cmake/Torch", "/usr/share/cmake/Torch"]
FFLAGS = ["-std=f2008", "-Wall", "-Wextra", "-Werror", "-fcheck=all", "-finit-derived",
          "-finit-integer=-77777", "-O1"]
LINK = [f"-L{LIB}", "-llra", f"-Wl,-rpath,{LIB}"]
VALGRIND = ["valgrind", "--quiet", "--error-exitcode=3", "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect", "--show-leak-kinds=definite,indirect"]
MPIRUN_OPTS = ["--allow-run-as-root", "--oversubscribe"]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_btl": "self,vader"}
# Precompiles <torch/torch.h> for the LibTorch targets of a CMake project,
# once they exist (CMAKE_PROJECT_INCLUDE runs before the project defines them).
PCH_CMAKE = """
function(lra_mutants_pch)
  foreach(t test_lra_torch digits_mlp)
    if(TARGET ${t})
      target_precompile_headers(${t} PRIVATE <torch/torch.h>)
    endif()
  endforeach()
endfunction()
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL lra_mutants_pch)
"""


# ---- edits ------------------------------------------------------------------

C_SWAPS = [(" == ", " != "), (" != ", " == "), (" < ", " <= "), (" <= ", " < "),
           (" > ", " >= "), (" >= ", " > "), (" && ", " || "), (" || ", " && "),
           (" + ", " - "), (" - ", " + "), ("true", "false"), ("false", "true")]
F_SWAPS = [(" == ", " /= "), (" /= ", " == "), (" < ", " <= "), (" <= ", " < "),
           (" > ", " >= "), (" >= ", " > "), (".and.", ".or."), (".or.", ".and."),
           (" + ", " - "), (" - ", " + "), (".true.", ".false."), (".false.", ".true.")]


def code_mask(line, fortran):
    """The line's code: comments and string literals blanked to spaces (a
    trailing comment cut off)."""
    out = []
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            out.append(" ")
            if ch == "\\" and not fortran and i + 1 < len(line):
                out.append(" ")
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'" and (fortran or ch == '"' or re.match(r"'\\?.'", line[i:i + 4])):
            quote = ch
            out.append(" ")
        elif (fortran and ch == "!") or (not fortran and line.startswith("//", i)):
            return "".join(out)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def blank_block_comments(lines):
    """The lines with C's /* ... */ comments (which may span lines) blanked
    to spaces, so that columns stay where they were."""
    text = "\n".join(lines)
    text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    return text.split("\n")


def statement_lines(lines, fortran):
    """Indices of lines that hold one whole statement a deletion may remove."""
    out = []
    prev_open = True  # the previous code line ended a statement or opened a block
    in_contains = False
    for i, line in enumerate(lines):
        code = code_mask(line, fortran).strip()
        if not code:
            continue
        if fortran:
            low = code.lower()
            if low == "contains":
                in_contains = True
            simple = re.match(r"(call |error stop|return$|exit$|cycle$|[\w%()]+\s*=[^=])", low)
            if in_contains and prev_open and simple and not code.endswith("&"):
                out.append(i)
            prev_open = not code.endswith("&")
        else:
            if code.startswith("#"):
                continue
            one_line = prev_open and code.endswith(";") and "{" not in code and "}" not in code
            declaration = re.match(r"(static_assert|using |template|typedef|struct |class )", code)
            if one_line and not declaration and not code.startswith(("case ", "default:")):
                out.append(i)
            prev_open = code.endswith((";", "{", "}", ":"))
    return out


def edits(lines, fortran):
    """(line index, kind, new line or None for a deletion) for every edit."""
    out = []
    scanned = lines if fortran else blank_block_comments(lines)
    deletable = set(statement_lines(scanned, fortran))
    swaps = F_SWAPS if fortran else C_SWAPS
    for i, line in enumerate(lines):
        code = code_mask(scanned[i], fortran)
        stripped = code.strip()
        if not stripped or (not fortran and stripped.startswith("#")):
            continue
        if i in deletable:
            out.append((i, "delete", None))
        for old, new in swaps:
            pattern = re.escape(old)
            if old.strip().isalpha():  # true/false: whole words only
                pattern = r"\b" + pattern + r"\b"
            for m in re.finditer(pattern, code, flags=re.I if fortran else 0):
                out.append((i, f"{old.strip()}->{new.strip()} at {m.start() + 1}",
                            line[:m.start()] + new + line[m.end():]))
        nots = r"\.not\.\s*" if fortran else r"!(?!=)\s*"
        for m in re.finditer(nots, code, flags=re.I if fortran else 0):
            out.append((i, f"drop not at {m.start() + 1}", line[:m.start()] + line[m.end():]))
        # integer literals: not part of a name, a kind suffix or a float
        for m in re.finditer(r"(?<![\w.])(\d+)(?![\w.])", code):
            n = int(m.group(1))
            out.append((i, f"literal {n}->{n + 1} at {m.start() + 1}",
                        line[:m.start()] + str(n + 1) + line[m.end():]))
    return out


# ---- tests of each file -----------------------------------------------------

def sh(argv, cwd, timeout, env=None):
    """(ok, tail of its output) for one command."""
    try:
        p = subprocess.run(argv, cwd=cwd, env=dict(os.environ, **(env or {})), timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        return p.returncode == 0, p.stdout[-2000:]
    except subprocess.TimeoutExpired:
        return False, "timed out"


def mpi_tools(wrapper):
    p = subprocess.run(["bash", "scripts/find-mpi.sh", "openmpi", wrapper], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"Open MPI's {wrapper}/mpirun not found (Debian: openmpi-bin libopenmpi-dev)")
    return p.stdout.split()


def torch_dir():
    for d in [os.environ.get("Torch_DIR", "")] + TORCH_DIRS:
        if d and os.path.isfile(os.path.join(d, "TorchConfig.cmake")):
            return d
    sys.exit("LibTorch (TorchConfig.cmake) not found: install libtorch-dev")


def cpp_recipe(work, edited_file):
    """Steps for lra.hpp or lra_torch.hpp: the C++ binding tests of
    bindings/cpp/tests (and, for lra_torch.hpp, the LibTorch digits trainer)
    against an install of the scratch copy, the edited header copied into it."""
    prefix = os.path.join(work, "prefix")
    pch = os.path.join(work, "pch.cmake")
    with open(pch, "w") as f:
        f.write(PCH_CMAKE)
    configure = ["-DCMAKE_BUILD_TYPE=", "-DCMAKE_CXX_FLAGS=-O0", f"-DCMAKE_PROJECT_INCLUDE={pch}",
                 f"-DCMAKE_PREFIX_PATH={prefix};{torch_dir()}"]
    setup = [("install", ["scripts/install.sh", prefix], {"LRA_SKIP_BUILD": "1"}),
             ("configure tests", ["cmake", "-S", "bindings/cpp/tests", "-B", "b-tests"] + configure, {})]
    def build(d, *targets):
        return ("build", ["cmake", "--build", d, "-j", "2", "--target", *targets], {})
    steps = [("copy into prefix", ["cp", edited_file, os.path.join(prefix, "include")], {})]
    if edited_file.endswith("lra.hpp"):
        tests = ("test_lra_hpp", "test_lra_hpp_dso", "test_lra_hpp_static", "test_lra_hpp_lifetime")
        steps += [build("b-tests", *tests)]
        steps += [("run", [f"b-tests/{t}"], {}) for t in tests[:-1]]
        steps += [("run", VALGRIND + ["b-tests/test_lra_hpp_lifetime"], {})]
    steps += [build("b-tests", "test_lra_torch"), ("run", ["b-tests/test_lra_torch"], {})]
    if edited_file.endswith("lra_torch.hpp"):
        setup.append(("configure digits", ["cmake", "-S", "examples/libtorch", "-B", "b-digits"] + configure, {}))
        steps.append(build("b-digits", "digits_mlp"))
        for lr in ("1e-4", "1.0"):
            steps.append(("run", ["b-digits/digits_mlp", "--data", "data/digits.csv.gz", "--optimizer",
                                  "adam", "--lr", lr, "--epochs", "20", "--min-accuracy", "0.9"], {}))
    return setup, steps


def mpi_c_recipe(work, edited_file):
    """Steps for lra_mpi.h: tests/mpi/lra_mpi_test.c's cases (scripts/stages/mpi.sh)
    under Open MPI, 1 rank writing each reference and 2 (or 3) reproducing it."""
    cc, mpirun = mpi_tools("mpicc")
    cflags = ["-O1", "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", "include", "-I", "bindings/mpi"]
    steps = [("build", [cc] + cflags + [source] + LINK + ["-lm", "-o", out], {})
             for source, out in (("tests/mpi/lra_mpi_test.c", "t"), ("bindings/mpi/example.c", "ex"))]
    digits = os.path.join(work, "digits.csv")
    setup = [("unpack digits", ["sh", "-c", f"zcat data/digits.csv.gz > {digits}"], {})]
    cases = [(1, "dp adam"), (2, "dp adam"), (1, "sharded adam"), (2, "sharded adam"),
             (3, "sharded adam"), (1, "empty adam"), (3, "empty adam"), (1, "polyak sgd"),
             (2, "polyak sgd"), (1, "fail adam"), (2, "fail adam"), (1, "polyakfail momentum"),
             (2, "polyakfail momentum"), (1, "poison adam"), (2, "poison adam")]
    for np_, case in cases:
        mode, opt = case.split()
        steps.append(("run", [mpirun] + MPIRUN_OPTS + ["-np", str(np_), "./t", mode, opt,
                                                       f"ref-{mode}-{opt}.txt", digits], MPI_ENV))
    for mode in ("dp", "sharded"):
        steps.append(("run", [mpirun] + MPIRUN_OPTS + ["-np", "2", "./ex", mode], MPI_ENV))
    return setup, steps


def fortran_recipe(work, edited_file):
    """Steps for lra.f90 or lra_mpi.f90 (scripts/stages/fortran.sh with gfortran
    and Open MPI): the static check against lra.h, the struct layouts, the
    flat-buffer example, and the MPI example on 1, 2 and 3 ranks."""
    fort, mpirun = mpi_tools("mpifort")
    m = os.path.join(work, "modules")  # absolute: check_interfaces.py compiles elsewhere
    os.makedirs(m)
    mod = ["-J", m, "-I", m]
    steps = [("build", [fort] + FFLAGS + mod + ["-c", "bindings/fortran/lra.f90", "-o", f"{m}/lra.o"], {})]
    if os.path.basename(edited_file) == "lra.f90":
        steps += [("run", ["python3", "bindings/fortran/check_interfaces.py"], {}),
                  ("build", ["cc", "-std=c11", "-Iinclude", "bindings/fortran/layout.c", "-o", "layout_c"], {}),
                  ("build", ["gfortran"] + FFLAGS + mod + ["bindings/fortran/layout.f90", f"{m}/lra.o"] + LINK
                   + ["-o", "layout_f"], {}),
                  ("run", ["sh", "-c", "./layout_c > c.txt && ./layout_f > f.txt && diff c.txt f.txt"], {}),
                  ("build", ["gfortran"] + FFLAGS + mod + ["examples/fortran/flat_buffer.f90", f"{m}/lra.o"] + LINK
                   + ["-o", "flat"], {}),
                  ("run", ["./flat"], {})]
        # Once more without -finit-*, as the stage's installed-prefix build runs
        # it: there a forgotten NULL address shows (-finit-derived makes it NULL).
        plain = os.path.join(work, "plain")
        os.makedirs(plain)
        steps += [("build", ["gfortran", "-O1", "-J", plain, "-c", "bindings/fortran/lra.f90", "-o",
                             f"{plain}/lra.o"], {}),
                  ("build", ["gfortran", "-O1", "-I", plain, "examples/fortran/flat_buffer.f90", f"{plain}/lra.o"]
                   + LINK + ["-o", "flat_plain"], {}),
                  ("run", ["./flat_plain"], {})]
    steps += [("build", [fort] + FFLAGS + mod + ["-c", "bindings/fortran/lra_mpi.f90", "-o", f"{m}/lra_mpi.o"], {}),
              ("run", ["python3", "bindings/fortran/check_interfaces.py", "--mpi", m], {"FC_MPI": fort}),
              ("build", [fort] + FFLAGS + mod + ["examples/fortran/mpi_data_parallel.f90", f"{m}/lra_mpi.o",
                                                 f"{m}/lra.o"] + LINK + ["-o", "mpi_dp"], {}),
              ("build", ["mkdir", "-p", "ref"], {})]
    steps += [("run", [mpirun] + MPIRUN_OPTS + ["-np", str(n), "./mpi_dp", "ref"], MPI_ENV) for n in (1, 2, 3)]
    return [], steps


def nccl_dirs():
    p = subprocess.run(["bash", "scripts/find-nccl.sh"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit("the real NCCL and CUDA runtime headers were not found (scripts/find-nccl.sh; "
                 "pip install nvidia-nccl-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 "
                 "nvidia-cuda-nvcc-cu12)")
    return p.stdout.split()


def nccl_recipe(work, edited_file):
    """Steps for lra_nccl.h (scripts/stages/nccl.sh, without a GPU): the
    one-rank logic against the stubs, the header as C++, the real-library
    paths that need no device (then under valgrind), and the GPU test's own
    checks over the pretend GPU (tests/nccl/fake_gpu_preload.c)."""
    nccl, cudart, cccl, nvcc = nccl_dirs()
    cflags = ["-O1", "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", "include", "-I", "bindings/nccl",
              "-I", "tests/nccl"]
    real = ["-I", f"{nccl}/include", "-I", f"{cudart}/include", "-I", f"{cccl}/include",
            "-I", f"{nvcc}/include"]
    real_libs = [f"{nccl}/lib/libnccl.so.2", f"{cudart}/lib/libcudart.so.12",
                 f"-Wl,-rpath,{nccl}/lib:{cudart}/lib"]
    use = os.path.join(work, "use.cpp")
    with open(use, "w") as f:
        f.write('#include "lra_nccl.h"\nlra_reduce_fn f = lra_nccl_allreduce_sum;\n')
    preload = os.path.join(work, "fake_gpu_preload.so")
    setup = [("build", ["cc", "-std=c11", "-shared", "-fPIC", "-pthread"] + real
              + ["tests/nccl/fake_gpu_preload.c", "-o", preload], {})]
    steps = [("build", ["cc"] + cflags + ["-I", "tests/nccl/stub", "tests/nccl/lra_nccl_stub_test.c",
                                          "tests/nccl/stub/stub_impl.c"] + LINK + ["-o", "stub_test"], {}),
             ("run", ["./stub_test"], {}),
             ("build", ["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", "include", "-I",
                        "bindings/nccl", "-fsyntax-only"] + real + [use], {}),
             ("build", ["cc"] + cflags + real + ["tests/nccl/lra_nccl_real_test.c"] + real_libs + LINK
              + ["-o", "real_test"], {}),
             ("run", ["./real_test"], {}),
             ("run", VALGRIND + ["./real_test"], {}),
             ("build", ["cc"] + cflags + real + ["tests/nccl/lra_nccl_gpu_test.c"] + real_libs + LINK
              + ["-o", "gpu_test"], {}),
             ("run", ["./gpu_test"], {"LD_PRELOAD": preload, "LRA_NCCL_GPU_TEST_HOST_ONLY": "1"})]
    return setup, steps


def agreement_recipe(work, edited_file):
    """Steps for lra_agreement.h, which both adapters' agreement checks use:
    the MPI steps, then the NCCL ones."""
    mpi_setup, mpi_steps = mpi_c_recipe(work, edited_file)
    nccl_setup, nccl_steps = nccl_recipe(work, edited_file)
    return mpi_setup + nccl_setup, mpi_steps + nccl_steps


RECIPES = {
    "include/lra_agreement.h": agreement_recipe,
    "bindings/cpp/lra.hpp": cpp_recipe,
    "bindings/cpp/lra_torch.hpp": cpp_recipe,
    "bindings/mpi/lra_mpi.h": mpi_c_recipe,
    "bindings/nccl/lra_nccl.h": nccl_recipe,
    "bindings/fortran/lra.f90": fortran_recipe,
    "bindings/fortran/lra_mpi.f90": fortran_recipe,
}


def scratch_copy(work):
    """The checkout's files (tracked, and new ones git does not ignore) under work/src."""
    src = os.path.join(work, "src")
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, stdout=subprocess.PIPE, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        dst = os.path.join(src, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(os.path.join(ROOT, rel)):
            shutil.copy2(os.path.join(ROOT, rel), dst, follow_symlinks=False)
    return src


def run_steps(steps, cwd, timeout):
    """'passed', 'did not build', 'caught' or 'timed out', and the failing step's output."""
    for kind, argv, env in steps:
        ok, tail = sh(argv, cwd, timeout, dict(env, CARGO_TARGET_DIR=os.path.abspath(TARGET)))
        if not ok:
            if tail == "timed out":
                return "timed out", tail
            return ("did not build" if kind == "build" else "caught"), f"{' '.join(argv)}\n{tail}"
    return "passed", ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", choices=sorted(RECIPES), help="the binding file to edit")
    mutation_draw.add_arguments(ap, timeout=240)
    ap.add_argument("--list", action="store_true", help="print the edits and stop")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(LIB, "liblra.so")):
        sys.exit(f"no {LIB}/liblra.so: run `cargo build --release --lib`")

    fortran = args.file.endswith(".f90")
    lines = open(os.path.join(ROOT, args.file)).read().split("\n")

    def label(site):
        i, what, _ = site
        return f"line {i + 1} ({what}): {lines[i].strip()}"

    sites = mutation_draw.draw(edits(lines, fortran), label, args, args.file)
    if args.list:
        for s in sites:
            print(label(s))
        return
    with tempfile.TemporaryDirectory(prefix="lra-binding-mutants.") as work:
        src = scratch_copy(work)
        edited_path = os.path.join(src, args.file)
        setup, steps = RECIPES[args.file](work, edited_path)
        outcome, detail = run_steps(setup + steps, src, args.timeout * 3)
        if outcome != "passed":
            sys.exit(f"the unedited {args.file} fails its own tests ({outcome}):\n{detail}")
        print(f"{len(sites)} edits of {args.file}; the unedited file passes its {len(steps)} steps",
              flush=True)
        tally = mutation_draw.Tally(len(sites), every=10)
        for i, what, new in sites:
            edited = lines[:i] + ([] if new is None else [new]) + lines[i + 1:]
            with open(edited_path, "w") as f:
                f.write("\n".join(edited))
            outcome, _ = run_steps(steps, src, args.timeout)
            tally.add(outcome, label((i, what, new)), outcome == "passed")
    counts = tally.counts
    caught = counts.get("caught", 0) + counts.get("timed out", 0)
    viable = len(sites) - counts.get("did not build", 0)
    print(f"\n{len(sites)} edits: {counts}; caught {caught} of {viable} that build"
          f" ({100.0 * caught / max(1, viable):.1f}%)")
    tally.print_survivors()


if __name__ == "__main__":
    main()
