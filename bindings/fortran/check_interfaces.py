#!/usr/bin/env python3
"""Static check of the Fortran binding (bindings/fortran/lra.f90) against include/lra.h.

gfortran itself says what the module means in C: `gfortran -fc-prototypes`
prints a C prototype for every bind(C) interface and a C struct for every
bind(C) derived type. Those are compared with the header (parsed by
bindings/check_abi.py's Header, the parser that checks Julia and Python):

* every function of lra.h has an interface with its C name, and no
  interface names a function lra.h lacks;
* return and argument types: scalars of the same width passed the same way
  (Fortran has no unsigned: uint32_t is `int`, uint64_t and size_t `long`),
  pointers to the same struct or scalar, or `void *` (type(c_ptr));
  a C `void *` buffer may also be an integer(c_int8_t) array;
* const: an argument Fortran declares intent(in) by reference (`const T *`)
  must be const in C, else Fortran would assume memory lra writes is
  unchanged;
* the abstract interface lra_reduce_fn has the callback typedef's signature;
* the four structs: the same field names, order and types (with C's
  alignment rules, which bind(C) follows, that fixes every offset; the
  layout stage also measures them);
* every LRA_* constant of lra.h is a parameter with the same value, and no
  other LRA_* parameter exists.

* type(c_ptr) by value versus by reference: gfortran prints a type(c_ptr)
  argument as `void *` with or without VALUE, so this is read from the
  Fortran source instead (c_ptr_dummies): a type(c_ptr) standing for a C
  pointer must have VALUE; only one standing for a pointer to a pointer
  (lra_create's `lra_handle **out`) must not. examples/fortran/flat_buffer.f90
  calls every function as well; this check fails when it stops calling one.

    python3 bindings/fortran/check_interfaces.py [--self-test]   (FC= picks the compiler)
    python3 bindings/fortran/check_interfaces.py --mpi MODDIR [--self-test]
        checks bindings/fortran/lra_mpi.f90's callback instead (MODDIR holds lra.mod;
        FC_MPI= picks the MPI compiler wrapper, default mpifort)
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODULE = os.path.join(HERE, "lra.f90")
EXAMPLE = os.path.join(ROOT, "examples", "fortran", "flat_buffer.f90")

_spec = importlib.util.spec_from_file_location("check_abi", os.path.join(ROOT, "bindings", "check_abi.py"))
check_abi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_abi)

# Header scalar -> what gfortran prints for its ISO_C_BINDING counterpart.
SCALARS = {"u32": "int", "i32": "int", "u64": "long", "i64": "long", "usize": "long",
           "f64": "double", "f32": "float", "void": "void"}


def prototypes(fortran_source, fc=None, module_dirs=()):
    """gfortran -fc-prototypes output for the given module source text
    (module_dirs: where the .mod files it uses are)."""
    fc = fc or os.environ.get("FC", "gfortran")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "lra.f90")
        with open(src, "w") as f:
            f.write(fortran_source)
        run = subprocess.run([fc, "-std=f2008", "-fsyntax-only", "-fc-prototypes",
                              *(f"-I{d}" for d in module_dirs), src],
                             cwd=tmp, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{fc} -fc-prototypes failed:\n{run.stderr}")
    return run.stdout


def c_type(text):
    """(type, const) of a gfortran-printed C type such as 'const lra_config *'."""
    words = text.replace("*", " * ").split()
    const = "const" in words
    words = [w for w in words if w != "const"]
    return " ".join(words), const


def parse_prototypes(text):
    """structs: name -> [(field, type)]; functions: name -> (ret, [(type, const)])."""
    structs = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", text, flags=re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if decl:
                fm = re.fullmatch(r"(.+?)\s*\b(\w+)", decl)
                fields.append((fm.group(2), c_type(fm.group(1))[0]))
        structs[m.group(1)] = fields
    functions = {}
    for m in re.finditer(r"^(.+?)\s*\b(\w+) \((.*)\);$", text, flags=re.M):
        args = []
        for a in filter(None, (s.strip() for s in m.group(3).split(","))):
            if re.fullmatch(r"\w+ \(\*\w+\)\(\)", a):  # a type(c_funptr)
                args.append(("funptr", False))
            else:
                args.append(c_type(re.fullmatch(r"(.+?)\s*\b\w+", a).group(1)))
        functions[m.group(2)] = (c_type(m.group(1))[0], args)
    return structs, functions


def accepted(header, c):
    """The gfortran-printed types that may stand for the canonical header type c."""
    if c in SCALARS:
        return {SCALARS[c]}
    if c.startswith("fn("):
        return {"funptr"}
    if not c.startswith("ptr("):
        return {c}  # a struct passed by value
    inner = c[len("ptr("):-1]
    ok = {"void *"}  # type(c_ptr), by value (or by reference: see the docstring)
    if inner in header.structs:
        ok.add(f"{inner} *")
    elif inner in SCALARS and inner != "void":
        ok.add(f"{SCALARS[inner]} *")
    elif inner == "void":
        ok.add("signed char *")  # an integer(c_int8_t) buffer
    return ok


def argument_names(params):
    """The names in a C parameter list ('int (*reduce)()' names reduce)."""
    names = []
    for p in filter(None, (s.strip() for s in params.split(","))):
        if p != "void":
            names.append((re.search(r"\(\*(\w+)\)", p) or re.search(r"(\w+)\s*$", p)).group(1))
    return names


def fortran_argument_names(prototype_text):
    """name -> its dummy arguments' names, from gfortran's C prototypes."""
    return {m.group(2): argument_names(m.group(3))
            for m in re.finditer(r"^(.+?)\s*\b(\w+) \((.*)\);$", prototype_text, flags=re.M)}


def header_const_flags(header_text, name):
    """Which parameters of C function `name` are pointers to const."""
    code = check_abi.strip_comments_c(header_text)
    params = re.search(rf"\b{name}\s*\(([^)]*)\)", code).group(1).strip()
    if params in ("", "void"):
        return []
    return [bool(re.search(r"\bconst\b[^*]*\*", p)) for p in params.split(",")]


def compare_signature(header, errors, what, c_ret, c_args, f_ret, f_args, const_flags):
    """Appends to errors where the Fortran signature (gfortran's C view) is not the C one."""
    if f_ret not in accepted(header, c_ret):
        errors.append(f"{what} returns {c_ret} in C, Fortran gives {f_ret}")
    if len(f_args) != len(c_args):
        errors.append(f"{what} takes {len(c_args)} arguments in C, Fortran {len(f_args)}")
        return
    for i, (c, (f, const)) in enumerate(zip(c_args, f_args)):
        if f not in accepted(header, c):
            errors.append(f"{what} argument {i + 1} is {c} in C, Fortran gives {f} "
                          f"(accepted: {sorted(accepted(header, c))})")
        if const and not const_flags[i]:
            errors.append(f"{what} argument {i + 1}: Fortran says intent(in) (const {f}), "
                          "but C may write through it")


def c_ptr_dummies(fortran_source):
    """For each bind(C) procedure or interface (by its C name; an abstract
    interface by its Fortran name): [(dummy, is type(c_ptr), has VALUE)]
    in argument order, read from the source (-fc-prototypes cannot tell)."""
    code = re.sub(r"!.*", "", fortran_source)
    code = re.sub(r"&[ \t]*\n[ \t]*", " ", code)  # join continued lines
    found = {}
    for m in re.finditer(r"^[ \t]*(?:function|subroutine)[ \t]+(\w+)[ \t]*\(([^)]*)\)([^\n]*)\n(.*?)"
                         r"^[ \t]*end[ \t]+(?:function|subroutine)[ \t]+\1\b", code, flags=re.M | re.S | re.I):
        if not re.search(r"\bbind[ \t]*\(", m.group(3), flags=re.I):
            continue
        label = re.search(r'name[ \t]*=[ \t]*"(\w+)"', m.group(3))
        by_value = {}
        for decl in re.finditer(r"^[ \t]*type[ \t]*\([ \t]*c_ptr[ \t]*\)([^:\n]*)::([^\n]+)$", m.group(4),
                                flags=re.M | re.I):
            for name in decl.group(2).split(","):
                by_value[name.strip().lower()] = bool(re.search(r"\bvalue\b", decl.group(1), flags=re.I))
        dummies = [d.strip().lower() for d in m.group(2).split(",") if d.strip()]
        found[label.group(1) if label else m.group(1).lower()] = [
            (d, d in by_value, by_value.get(d, False)) for d in dummies]
    return found


def check_c_ptr_passing(errors, what, c_args, dummies):
    """A type(c_ptr) dummy for C pointer `T *` needs VALUE; for `T **` it must not have it.
    dummies is None when c_ptr_dummies did not find the procedure in the source."""
    if dummies is None or len(dummies) != len(c_args):
        errors.append(f"{what}: its dummy arguments could not be read from the source "
                      "(c_ptr_dummies expects `function|subroutine NAME(args) bind(C...)` ... `end function|subroutine NAME`)")
        return
    for i, (c, (dummy, is_c_ptr, has_value)) in enumerate(zip(c_args, dummies)):
        if not is_c_ptr:
            continue
        want_value = not c.startswith("ptr(ptr(")
        if has_value != want_value:
            errors.append(f"{what} argument {i + 1} ({dummy}) is {c} in C: its type(c_ptr) "
                          + ("needs VALUE" if want_value else "must not have VALUE (C writes the pointer)"))


def check(header, header_text, fortran_source):
    errors = []
    text = prototypes(fortran_source)
    structs, functions = parse_prototypes(text)
    f_names = fortran_argument_names(text)
    code_c = check_abi.strip_comments_c(header_text)
    passing = c_ptr_dummies(fortran_source)
    callbacks = {n: functions.pop(n) for n in list(functions) if n in header.callbacks}
    lra_functions = {n: f for n, f in functions.items() if n.startswith("lra_")}

    def compare(*args):
        compare_signature(header, errors, *args)

    for name, (c_ret, c_args) in sorted(header.functions.items()):
        if name not in lra_functions:
            errors.append(f"lra.f90: no bind(C) interface for {name}")
            continue
        f_ret, f_args = lra_functions[name]
        compare(f"lra.f90: {name}", c_ret, c_args, f_ret, f_args, header_const_flags(header_text, name))
        check_c_ptr_passing(errors, f"lra.f90: {name}", c_args, passing.get(name))
        # Keyword calls (loss=..., obs_var=...) go by these names: two
        # same-typed arguments swapped would pass each as the other.
        c_names = argument_names(re.search(rf"\b{name}\s*\(([^)]*)\)", code_c).group(1))
        if f_names.get(name) != c_names:
            errors.append(f"lra.f90: {name} names its arguments {f_names.get(name)}, C {c_names}")
    for name in sorted(set(lra_functions) - set(header.functions)):
        errors.append(f"lra.f90: interface {name} binds a function lra.h does not declare")
    for name, (c_ret, c_args) in sorted(header.callbacks.items()):
        if name not in callbacks:
            errors.append(f"lra.f90: no abstract interface {name} for the C callback type")
            continue
        f_ret, f_args = callbacks[name]
        compare(f"lra.f90: callback {name}", c_ret, c_args, f_ret, f_args, [True] * len(c_args))
        check_c_ptr_passing(errors, f"lra.f90: callback {name}", c_args, passing.get(name))
    for cname, cfields in sorted(header.structs.items()):
        ffields = structs.get(cname)
        if ffields is None:
            errors.append(f"lra.f90: no bind(C) type {cname}")
            continue
        wrong = len(ffields) != len(cfields) or any(
            fn != cn or ft not in accepted(header, ct) for (fn, ft), (cn, ct) in zip(ffields, cfields))
        if wrong:
            errors.append(f"lra.f90: type {cname} fields {ffields} differ from C {cfields}")

    code = re.sub(r"!.*", "", fortran_source)
    constants = {m.group(1): int(m.group(2))
                 for m in re.finditer(r"parameter\s*::\s*(LRA_\w+)\s*=\s*(-?\d+)", code)}
    expected = dict(check_abi.status_values())
    expected.update(header.defines)
    for name, value in sorted(expected.items()):
        if constants.get(name) != value:
            errors.append(f"lra.f90: parameter {name} is {constants.get(name)}, C says {value}")
    for name in sorted(set(constants) - set(expected)):
        errors.append(f"lra.f90: parameter {name} does not exist in C")
    return errors


# Each kind of drift the check must catch: (old text in lra.f90, new text).
MUTATIONS = {
    "argument kind": ("import :: c_ptr, c_double, c_int32_t\n      type(c_ptr), value :: h\n      real(c_double), value :: lr\n",
                      "import :: c_ptr, c_float, c_int32_t\n      type(c_ptr), value :: h\n      real(c_float), value :: lr\n"),
    "missing VALUE on a size_t": ("integer(c_size_t), value :: len\n      type(c_ptr), value :: written",
                                  "integer(c_size_t) :: len\n      type(c_ptr), value :: written"),
    "intent(in) where C writes": ("real(c_double), intent(inout) :: lr\n", "real(c_double), intent(in) :: lr\n"),
    "return kind": ("import :: c_int32_t\n      integer(c_int32_t) :: version\n",
                    "import :: c_int64_t\n      integer(c_int64_t) :: version\n"),
    "wrong C name": ('name="lra_version"', 'name="lra_versions"'),
    "same-typed arguments swapped": ("function lra_step(h, tensors, count, loss, obs_var, stream)",
                                     "function lra_step(h, tensors, count, obs_var, loss, stream)"),
    "argument count": ("function lra_set_lr(h, lr) bind(C, name=\"lra_set_lr\") result(status)\n"
                       "      import :: c_ptr, c_double, c_int32_t\n      type(c_ptr), value :: h\n",
                       "function lra_set_lr(h, lr, x) bind(C, name=\"lra_set_lr\") result(status)\n"
                       "      import :: c_ptr, c_double, c_int32_t\n      type(c_ptr), value :: h, x\n"),
    "struct field missing": ("    real(c_double) :: denom_eps\n", ""),
    "struct field kind": ("    integer(c_int64_t) :: numel\n", "    integer(c_int32_t) :: numel\n"),
    "constant value": ("LRA_DTYPE_BF16 = 2", "LRA_DTYPE_BF16 = 3"),
    "constant missing": ("  integer(c_int32_t), parameter :: LRA_SKIP_ZERO_SCALE = 6\n", ""),
    "handle by reference (const in C)": ("function lra_last_error(h) bind(C, name=\"lra_last_error\") result(message)\n"
                                         "      import :: c_ptr\n      type(c_ptr), value :: h\n",
                                         "function lra_last_error(h) bind(C, name=\"lra_last_error\") result(message)\n"
                                         "      import :: c_ptr\n      type(c_ptr) :: h\n"),
    "nullable pointer by reference": ("type(c_ptr), value :: found_inf\n", "type(c_ptr) :: found_inf\n"),
    "out-pointer by value": ("type(c_ptr), intent(out) :: out\n", "type(c_ptr), value :: out\n"),
    "callback user by reference": ("real(c_double), intent(inout) :: values(*)\n      integer(c_size_t), value :: count\n"
                                   "      type(c_ptr), value :: user\n",
                                   "real(c_double), intent(inout) :: values(*)\n      integer(c_size_t), value :: count\n"
                                   "      type(c_ptr) :: user\n"),
    "callback signature": ("import :: c_double, c_size_t, c_ptr, c_int32_t\n      real(c_double), intent(inout) :: values(*)",
                           "import :: c_float, c_size_t, c_ptr, c_int32_t\n      real(c_float), intent(inout) :: values(*)"),
}


# bindings/fortran/lra_mpi.f90 (module lra_mpi, needs mpi_f08): its bind(C)
# callbacks and the lra.h callback type each one is passed as.
MPI_MODULE = os.path.join(HERE, "lra_mpi.f90")
MPI_CALLBACKS = {"lra_mpi_allreduce_sum": "lra_reduce_fn"}
# lra_mpi.h, whose LRA_MPI_* answers lra_mpi.f90's parameters repeat, and
# lra_agreement.h, where those answers' values are defined.
MPI_HEADER = os.path.join(ROOT, "bindings", "mpi", "lra_mpi.h")
AGREEMENT_HEADER = os.path.join(ROOT, "include", "lra_agreement.h")


def integer_defines(*paths):
    """The #defines of the headers at `paths` whose value is an integer in
    parentheses, or (in turn) another such #define's name."""
    text = ""
    for path in paths:
        with open(path) as f:
            text += f.read()
    values = dict(re.findall(r"^#define (LRA_\w+) \((-?\d+)\)$", text, flags=re.M))
    aliases = dict(re.findall(r"^#define (LRA_\w+) (LRA_\w+)$", text, flags=re.M))
    for name, target in aliases.items():
        seen = {name}
        while target in aliases and target not in seen:
            seen.add(target)
            target = aliases[target]
        if target in values:
            values[name] = values[target]
    return values


def mpi_constants(mpi_source):
    """[errors] unless lra_mpi.f90's LRA_MPI_* parameters are lra_mpi.h's
    #defines, name for name and value for value."""
    c = {name: value for name, value in integer_defines(MPI_HEADER, AGREEMENT_HEADER).items()
         if name.startswith("LRA_MPI_")}
    fortran = dict(re.findall(r"^\s*integer\(c_int32_t\), parameter, public :: (LRA_MPI_\w+) = (-?\d+)\s*$",
                              mpi_source, flags=re.M))
    if not c:
        return [f"no LRA_MPI_* #define found in {os.path.relpath(MPI_HEADER, ROOT)}"]
    return [f"lra_mpi.f90: parameter {name} is {fortran.get(name)}, lra_mpi.h says {c.get(name)}"
            for name in sorted(set(c) | set(fortran)) if c.get(name) != fortran.get(name)]


def check_mpi(header, mpi_source, fc, module_dirs):
    """lra_mpi.f90's callbacks against lra.h's callback types, as gfortran sees them in C.
    (lra_mpi.f90 also assigns each to a procedure(lra_reduce_fn) pointer, so
    the compiler itself refuses most drift; what it lets through, such as a
    callback that lost bind(C), is caught here.)"""
    errors = []
    # Types read from .mod files come with /* WARNING ... */ notes: drop them
    # and the blanks they leave.
    text = re.sub(r"/\*.*?\*/", "", prototypes(mpi_source, fc, module_dirs), flags=re.S)
    text = re.sub(r"[ \t]+", " ", text).replace(" ,", ",")
    _, functions = parse_prototypes(text)
    for name, c_name in sorted(MPI_CALLBACKS.items()):
        if name not in functions:
            errors.append(f"lra_mpi.f90: {name} is not a bind(C) procedure (gfortran gives it no C prototype)")
            continue
        c_ret, c_args = header.callbacks[c_name]
        f_ret, f_args = functions[name]
        compare_signature(header, errors, f"lra_mpi.f90: {name} as {c_name}", c_ret, c_args, f_ret, f_args,
                          [False] * len(c_args))  # lra_reduce_fn has no const argument
        check_c_ptr_passing(errors, f"lra_mpi.f90: {name} as {c_name}", c_args,
                            c_ptr_dummies(mpi_source).get(name))
    return errors + mpi_constants(mpi_source)


# Drift in lra_mpi.f90 that the compiler or check_mpi must catch.
MPI_MUTATIONS = {
    "callback without bind(C)": ("function lra_mpi_allreduce_sum(values, count, user) bind(C) result(rc)",
                                 "function lra_mpi_allreduce_sum(values, count, user) result(rc)"),
    "callback argument kind": ("integer(c_size_t), value :: count", "integer(c_int32_t), value :: count"),
    "callback count by reference": ("integer(c_size_t), value :: count", "integer(c_size_t) :: count"),
    "answer's value": ("LRA_MPI_ERR_NO_COMM = -3", "LRA_MPI_ERR_NO_COMM = -4"),
}


def main_mpi(argv, header):
    """--mpi MODDIR: check lra_mpi.f90 (lra.mod in MODDIR; FC_MPI, default mpifort, compiles)."""
    fc = os.environ.get("FC_MPI", "mpifort")
    module_dirs = [argv[argv.index("--mpi") + 1]]
    with open(MPI_MODULE) as f:
        source = f.read()
    errors = check_mpi(header, source, fc, module_dirs)
    if "--self-test" in argv:
        for what, (old, new) in MPI_MUTATIONS.items():
            if source.count(old) != 1:
                errors.append(f"self-test: cannot apply '{what}': {old!r} is not in lra_mpi.f90 exactly once")
                continue
            try:
                if not check_mpi(header, source.replace(old, new), fc, module_dirs):
                    errors.append(f"self-test: the check missed '{what}' in lra_mpi.f90")
            except RuntimeError as e:  # refused by the compiler: caught, if for the interface
                if "Interface mismatch" not in str(e):
                    errors.append(f"self-test: the '{what}' mutation of lra_mpi.f90 does not compile: {e}")
    for e in errors:
        print("FORTRAN ABI MISMATCH:", e, file=sys.stderr)
    if errors:
        return 1
    print(f"check_interfaces: lra_mpi.f90's {', '.join(sorted(MPI_CALLBACKS))} matches include/lra.h's "
          f"{', '.join(sorted(set(MPI_CALLBACKS.values())))}, its LRA_MPI_* answers lra_mpi.h's"
          + (f" (self-test: all {len(MPI_MUTATIONS)} injected drifts caught)" if "--self-test" in argv else ""))
    return 0


def main(argv):
    with open(check_abi.HEADER) as f:
        header_text = f.read()
    header = check_abi.Header(header_text)
    if "--mpi" in argv:
        return main_mpi(argv, header)
    with open(MODULE) as f:
        source = f.read()
    errors = check(header, header_text, source)
    with open(EXAMPLE) as f:
        example = re.sub(r"!.*", "", f.read())
    for name in sorted(header.functions):
        if not re.search(rf"\b{name}\(", example):
            errors.append(f"{os.path.relpath(EXAMPLE, ROOT)} never calls {name}: the blind spot above is uncovered")
    if "--self-test" in argv:
        for what, (old, new) in MUTATIONS.items():
            if source.count(old) != 1:
                errors.append(f"self-test: cannot apply '{what}': {old!r} is not in lra.f90 exactly once")
                continue
            try:
                if not check(header, header_text, source.replace(old, new)):
                    errors.append(f"self-test: the check missed '{what}'")
            except RuntimeError as e:
                errors.append(f"self-test: the '{what}' mutation does not compile: {e}")
    for e in errors:
        print("FORTRAN ABI MISMATCH:", e, file=sys.stderr)
    if errors:
        return 1
    print(f"check_interfaces: {len(header.functions)} functions, {len(header.callbacks)} callback type(s), "
          f"{len(header.structs)} structs, {len(header.defines)} constants: lra.f90 matches include/lra.h"
          + (f" (self-test: all {len(MUTATIONS)} injected drifts caught)" if "--self-test" in argv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
