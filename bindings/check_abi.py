#!/usr/bin/env python3
"""Static ABI check of the Julia and Python bindings against include/lra.h.

Julia cannot be installed where these bindings are developed, so
bindings/julia/src/LRA.jl is checked by parsing: every `ccall`'s symbol,
return type and argument types, every `struct` mirroring a C struct (field
names, order, types: with C's alignment rules, which Julia and ctypes both
follow, that fixes every offset and the size) and every `LRA_*` constant
must match the header; every function the header exports must be called
somewhere; every `@cfunction` must have the signature of a callback typedef
(`lra_reduce_fn`) and each typedef must have one. The ctypes module
bindings/python/lra.py is checked the same way through its prototype table
(callback arguments: the CFUNCTYPE's signature), Structure classes and
constant tables, which must hold every value C defines (imported, not
loaded: no library needed). The bindings' package versions must equal
Cargo.toml's. The values the Julia ccalls pass are checked by
bindings/julia/check_ccalls.py. `--self-test`
injects each kind of drift into both bindings and fails unless each is caught.

Status values (LRA_OK, ...) are taken from the header when it defines them,
else from src/ffi.rs + src/error.rs.

    python3 bindings/check_abi.py            # check; exit 1 on any mismatch
    python3 bindings/check_abi.py --self-test  # also prove it catches drift

bindings/fortran/check_interfaces.py reuses this file's header parser: it
imports Header, strip_comments_c, status_values and HEADER (keep those
names).
"""

import ctypes
import importlib.util
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "include", "lra.h")
JULIA = os.path.join(ROOT, "bindings", "julia", "src", "LRA.jl")
PYTHON = os.path.join(ROOT, "bindings", "python", "lra.py")

# --- canonical types --------------------------------------------------------
# A type is a string: a scalar ('u32', 'i32', 'u64', 'f32', 'f64', 'usize',
# 'void', 'char'), a struct name ('lra_config', ...), 'ptr(T)', or
# 'fn(NAME)' for a function-pointer typedef (its signature is checked apart).

C_SCALARS = {
    "uint32_t": "u32",
    "int32_t": "i32",
    "uint64_t": "u64",
    "int64_t": "i64",
    "double": "f64",
    "float": "f32",
    "size_t": "usize",
    "void": "void",
    "char": "char",
}


def strip_comments_c(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


class Header:
    """What include/lra.h declares."""

    def __init__(self, text):
        code = strip_comments_c(text)
        self.typedefs = {}  # alias -> canonical
        for m in re.finditer(r"typedef\s+([\w\s]+?)\s+(\w+)\s*;", code):
            base, alias = m.group(1).strip(), m.group(2)
            if base.startswith("struct"):
                self.typedefs[alias] = base.split()[-1]
            else:
                self.typedefs[alias] = self.canon(base)
        self.callbacks = {}  # function-pointer typedef -> (ret, [args])
        for m in re.finditer(r"typedef\s+([\w\s*]+?)\(\s*\*\s*(\w+)\s*\)\s*\(([^)]*)\)\s*;", code):
            self.typedefs[m.group(2)] = f"fn({m.group(2)})"
            self.callbacks[m.group(2)] = (self.canon(m.group(1)), self.params(m.group(3)))
        self.structs = {}  # name -> [(field, canonical type)]
        for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*\w+\s*;", code, flags=re.S):
            fields = []
            for decl in m.group(2).split(";"):
                decl = decl.strip()
                if not decl:
                    continue
                dm = re.match(r"(.+?)([\s*]+)(\w+)$", decl)
                typ = self.canon(dm.group(1) + dm.group(2).replace(" ", ""))
                fields.append((dm.group(3), typ))
            self.structs[m.group(1)] = fields
        self.defines = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"#define\s+(LRA_\w+)\s+(-?\d+)\s*$", code, flags=re.M)
        }
        self.functions = {}  # name -> (ret, [args])
        self.parameters = {}  # name -> [(parameter name, points to const, canonical type)]
        for m in re.finditer(r"^([\w\s*]+?)\b(lra_\w+)\s*\(([^)]*)\)\s*;", code, flags=re.M):
            self.functions[m.group(2)] = (self.canon(m.group(1)), self.params(m.group(3)))
            self.parameters[m.group(2)] = self.named_params(m.group(3))

    def named_params(self, text):
        """(name, const?, canonical type) of each C parameter ("void" or empty: none)."""
        out = []
        text = text.strip()
        if text and text != "void":
            for p in text.split(","):
                pm = re.match(r"(.+?)([\s*]+)(\w+)$", p.strip())
                typ = self.canon(pm.group(1) + pm.group(2).replace(" ", ""))
                out.append((pm.group(3), re.search(r"\bconst\b", pm.group(1)) is not None, typ))
        return out

    def params(self, text):
        """Canonical types of a C parameter list."""
        return [typ for _, _, typ in self.named_params(text)]

    def canon(self, ctype):
        t = ctype.replace("const", " ").replace("struct", " ")
        depth = t.count("*")
        base = t.replace("*", " ").strip()
        if base in C_SCALARS:
            c = C_SCALARS[base]
        elif base in getattr(self, "typedefs", {}):
            c = self.typedefs[base]
        else:
            c = base  # a struct or opaque type name
        for _ in range(depth):
            c = f"ptr({c})"
        return c


def status_values():
    """lra_status constants from src/ffi.rs (`= Status::X as u32`) and src/error.rs."""
    with open(os.path.join(ROOT, "src", "error.rs")) as f:
        enum = re.search(r"pub enum Status\s*\{(.*?)\}", f.read(), flags=re.S).group(1)
    values = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", enum)}
    with open(os.path.join(ROOT, "src", "ffi.rs")) as f:
        ffi = f.read()
    out = {}
    for m in re.finditer(r"pub const (LRA_\w+): lra_status = (?:Status::(\w+) as u32|(\d+));", ffi):
        out[m.group(1)] = values[m.group(2)] if m.group(2) else int(m.group(3))
    return out


# --- Julia ------------------------------------------------------------------

JULIA_SCALARS = {
    "UInt32": "u32",
    "Cuint": "u32",
    "Int32": "i32",
    "Cint": "i32",
    "UInt64": "u64",
    "Culonglong": "u64",
    "Int64": "i64",
    "Float64": "f64",
    "Cdouble": "f64",
    "Float32": "f32",
    "Cfloat": "f32",
    "Csize_t": "usize",
    "Cvoid": "void",
    "Nothing": "void",
    "UInt8": "char",
    "Cchar": "char",
}
# Julia struct name -> C struct name.
JULIA_STRUCTS = {
    "Config": "lra_config",
    "Tensor": "lra_tensor",
    "ReevalInfo": "lra_reeval_info",
    "Counters": "lra_counters",
    "OpaqueHandle": "lra_handle",
}


def strip_comments_julia(text):
    text = re.sub(r"#=.*?=#", "", text, flags=re.S)
    text = re.sub(r'"""(.*?)"""', '""', text, flags=re.S)
    return re.sub(r"#[^\n]*", "", text)


def split_top(s, sep=","):
    """Splits at `sep` outside (), {}, []."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def balanced_call(text, start):
    """The argument text of the call whose '(' is at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    raise ValueError("unbalanced parentheses")


class Julia:
    def __init__(self, text):
        code = strip_comments_julia(text)
        self.aliases = {
            m.group(1): m.group(2)
            for m in re.finditer(r"^const\s+(\w+)\s*=\s*([A-Z]\w*(?:\{[\w{}, ]*\})?)\s*$", code, flags=re.M)
        }
        self.constants = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"^const\s+(LRA_\w+)\s*=\s*(?:U?Int\d+\()?(-?\d+)\)?\s*$", code, flags=re.M)
        }
        self.structs = {}
        self.mutable = set()  # structs declared `mutable struct`
        for m in re.finditer(r"^(mutable\s+)?struct\s+(\w+)\s*\n(.*?)^end", code, flags=re.S | re.M):
            if m.group(1):
                self.mutable.add(m.group(2))
            fields = []
            for line in m.group(3).splitlines():
                fm = re.match(r"\s*(\w+)::(\S+)\s*$", line)
                if fm:
                    fields.append((fm.group(1), fm.group(2)))
            self.structs[m.group(2)] = fields
        self.ccalls = []  # (symbol, ret, [args], line number)
        for m in re.finditer(r"\bccall\(", code):
            args = split_top(balanced_call(code, m.end() - 1))
            line = code.count("\n", 0, m.start()) + 1
            sm = re.search(r":(\w+)", args[0])
            types = args[2].strip()
            if not (types.startswith("(") and types.endswith(")")):
                raise ValueError(f"LRA.jl:{line}: argument types must be a literal tuple")
            self.ccalls.append((sm.group(1) if sm else args[0], args[1], split_top(types[1:-1]), line))
        self.cfunctions = []  # (Julia function, ret, [args], line number)
        for m in re.finditer(r"@cfunction\(", code):
            args = split_top(balanced_call(code, m.end() - 1))
            line = code.count("\n", 0, m.start()) + 1
            types = args[2].strip()
            if not (types.startswith("(") and types.endswith(")")):
                raise ValueError(f"LRA.jl:{line}: @cfunction argument types must be a literal tuple")
            self.cfunctions.append((args[0], args[1], split_top(types[1:-1]), line))

    def canon(self, jtype):
        t = jtype.strip()
        seen = set()
        while t in self.aliases and t not in seen:
            seen.add(t)
            t = self.aliases[t]
        m = re.fullmatch(r"(Ptr|Ref)\{(.+)\}", t)
        if m:
            return f"ptr({self.canon(m.group(2))})"
        if t == "Cstring":
            return "ptr(char)"
        if t in JULIA_SCALARS:
            return JULIA_SCALARS[t]
        if t in JULIA_STRUCTS:
            return JULIA_STRUCTS[t]
        return f"?{t}"


def c_arg_matches(c, j):
    # A C function pointer is passed from Julia as Ptr{Cvoid} (@cfunction);
    # the @cfunction's own signature is checked against the typedef apart.
    return c == j or (c.startswith("fn(") and j == "ptr(void)")


def check_julia(header, text, statuses):
    errors = []
    jl = Julia(text)
    called = set()
    for name, ret, args, line in jl.ccalls:
        called.add(name)
        if name not in header.functions:
            errors.append(f"LRA.jl:{line}: ccall of {name}, which include/lra.h does not declare")
            continue
        cret, cargs = header.functions[name]
        if jl.canon(ret) != cret:
            errors.append(f"LRA.jl:{line}: {name} returns {cret} in C, ccall says {ret} ({jl.canon(ret)})")
        if len(args) != len(cargs):
            errors.append(f"LRA.jl:{line}: {name} takes {len(cargs)} arguments in C, ccall passes {len(args)}")
            continue
        for i, (c, j) in enumerate(zip(cargs, args)):
            if not c_arg_matches(c, jl.canon(j)):
                errors.append(f"LRA.jl:{line}: {name} argument {i + 1} is {c} in C, ccall says {j} ({jl.canon(j)})")
    for name in sorted(set(header.functions) - called):
        errors.append(f"LRA.jl: exported function {name} is not wrapped by any ccall")
    # Callbacks: every @cfunction must have the signature of a C callback
    # typedef, and every typedef must be implemented by one.
    implemented = set()
    for fname, ret, args, line in jl.cfunctions:
        sig = (jl.canon(ret), [jl.canon(a) for a in args])
        names = [n for n, csig in header.callbacks.items() if csig == sig]
        if not names:
            errors.append(f"LRA.jl:{line}: @cfunction({fname}) has signature {sig}, which matches no "
                          f"callback typedef of include/lra.h {header.callbacks}")
        implemented.update(names)
    for name in sorted(set(header.callbacks) - implemented):
        errors.append(f"LRA.jl: no @cfunction implements the callback {name} {header.callbacks[name]}")
    for jname, cname in JULIA_STRUCTS.items():
        if cname not in header.structs:
            continue  # opaque
        if jname not in jl.structs:
            errors.append(f"LRA.jl: struct {jname} (C {cname}) is missing")
            continue
        if jname in jl.mutable:
            # A mutable struct is stored by reference: Vector{Tensor} would
            # hand lra an array of object pointers instead of lra_tensors.
            errors.append(f"LRA.jl: struct {jname} (C {cname}) must be an immutable `struct`, not `mutable struct`")
        cf = header.structs[cname]
        jf = [(n, jl.canon(t)) for n, t in jl.structs[jname]]
        if cf != jf:
            errors.append(f"LRA.jl: struct {jname} fields {jf} differ from C {cname} {cf}")
    expected = dict(statuses)
    expected.update(header.defines)
    for name, value in sorted(expected.items()):
        if jl.constants.get(name) != value:
            errors.append(f"LRA.jl: constant {name} is {jl.constants.get(name)}, C says {value}")
    for name in sorted(set(jl.constants) - set(expected)):
        errors.append(f"LRA.jl: constant {name} does not exist in C")
    return errors


# --- Python (ctypes) --------------------------------------------------------


def ctypes_canon(t):
    if t is None:
        return "void"
    simple = {
        ctypes.c_uint32: "u32",
        ctypes.c_int32: "i32",
        ctypes.c_uint64: "u64",
        ctypes.c_int64: "i64",
        ctypes.c_double: "f64",
        ctypes.c_float: "f32",
        ctypes.c_void_p: "ptr(void)",
        ctypes.c_char_p: "ptr(char)",
    }
    if t in simple:
        return simple[t]
    if hasattr(t, "_type_") and issubclass(t, ctypes._Pointer):
        return f"ptr({ctypes_canon(t._type_)})"
    if isinstance(t, type) and issubclass(t, ctypes._CFuncPtr):
        args = ",".join(ctypes_canon(a) for a in t._argtypes_)
        return f"fnsig({ctypes_canon(t._restype_)};{args})"
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return {"Config": "lra_config", "Tensor": "lra_tensor", "ReevalInfo": "lra_reeval_info",
                "Counters": "lra_counters"}.get(t.__name__, "?" + t.__name__)
    return "?" + repr(t)


def check_python(header, statuses, path=PYTHON):
    spec = importlib.util.spec_from_file_location("lra_binding_under_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    errors = []

    def lp64(c):
        # ctypes.c_size_t IS ctypes.c_uint64 on LP64 Linux: compare them as one.
        return c.replace("usize", "u64")

    def python_arg_matches(c, p):
        if c.startswith("fn("):
            # A CFUNCTYPE whose signature is the typedef's.
            ret, args = header.callbacks[c[3:-1]]
            return p == lp64(f"fnsig({ret};{','.join(args)})")
        c = lp64(c)
        # The opaque handle travels as void*; NULL-able pointers to a single
        # f32 and to structs as their declared pointer types.
        return c == p or (c in ("ptr(lra_handle)",) and p == "ptr(void)") or (
            c == "ptr(ptr(lra_handle))" and p == "ptr(ptr(void))") or (
            c.startswith("ptr(") and p == "ptr(void)" and c in ("ptr(f32)",))

    for name, (restype, argtypes) in mod._PROTOTYPES.items():
        if name not in header.functions:
            errors.append(f"lra.py: prototype of {name}, which include/lra.h does not declare")
            continue
        cret, cargs = header.functions[name]
        pret = ctypes_canon(restype)
        if pret != lp64(cret):
            errors.append(f"lra.py: {name} returns {cret} in C, prototype says {pret}")
        pargs = [ctypes_canon(a) for a in argtypes]
        if len(pargs) != len(cargs) or not all(python_arg_matches(c, p) for c, p in zip(cargs, pargs)):
            errors.append(f"lra.py: {name} arguments {pargs} differ from C {cargs}")
    for name in sorted(set(header.functions) - set(mod._PROTOTYPES)):
        errors.append(f"lra.py: exported function {name} has no prototype")
    for cls, cname in ((mod.Config, "lra_config"), (mod.Tensor, "lra_tensor"),
                       (mod.ReevalInfo, "lra_reeval_info"), (mod.Counters, "lra_counters")):
        pf = [(n, ctypes_canon(t)) for n, t in cls._fields_]
        if pf != [(n, lp64(t)) for n, t in header.structs[cname]]:
            errors.append(f"lra.py: {cls.__name__} fields {pf} differ from C {cname} {header.structs[cname]}")
    checks = {"DTYPE_F32": "LRA_DTYPE_F32", "DTYPE_F16": "LRA_DTYPE_F16", "DTYPE_BF16": "LRA_DTYPE_BF16",
              "DEVICE_HOST": "LRA_DEVICE_HOST", "DEVICE_CUDA": "LRA_DEVICE_CUDA"}
    for py, c in checks.items():
        if getattr(mod, py) != header.defines.get(c):
            errors.append(f"lra.py: {py} = {getattr(mod, py)}, C {c} = {header.defines.get(c)}")
    for key, value in mod.OPTIMIZERS.items():
        if header.defines.get("LRA_OPTIMIZER_" + key.upper()) != value:
            errors.append(f"lra.py: optimizer {key} = {value} differs from C")
    for code, name in mod.DECISIONS.items():
        if header.defines.get("LRA_DECISION_" + name.upper()) != code:
            errors.append(f"lra.py: decision {name} = {code} differs from C")
    for code, name in mod.SKIP_REASONS.items():
        if header.defines.get("LRA_SKIP_" + name.upper()) != code:
            errors.append(f"lra.py: skip reason {name} = {code} differs from C")
    for key, value in mod.REEVAL_SCHEDULES.items():
        if header.defines.get("LRA_REEVAL_" + key.upper()) != value:
            errors.append(f"lra.py: reeval schedule {key} = {value} differs from C")
    for key, value in mod.SHARDINGS.items():
        if header.defines.get("LRA_SHARDING_" + key.upper()) != value:
            errors.append(f"lra.py: sharding {key} = {value} differs from C")
    # Every status, both ways: STATUSES and the module's constants.
    for code, py in mod.STATUSES.items():
        c = "LRA_" + py
        if not (code == getattr(mod, py, None) == statuses.get(c, header.defines.get(c))):
            errors.append(f"lra.py: status {py} = {code} differs from C {c}")
    for c in sorted(statuses):
        if c[len("LRA_"):] not in mod.STATUSES.values():
            errors.append(f"lra.py: C status {c} has no entry in STATUSES")
    # Completeness: a value C adds must reach the Python tables too.
    tables = {
        "LRA_OPTIMIZER_": {k.upper() for k in mod.OPTIMIZERS},
        "LRA_DECISION_": {v.upper() for v in mod.DECISIONS.values()},
        "LRA_SKIP_": {v.upper() for v in mod.SKIP_REASONS.values()},
        "LRA_REEVAL_": {k.upper() for k in mod.REEVAL_SCHEDULES},
        "LRA_SHARDING_": {k.upper() for k in mod.SHARDINGS},
        "LRA_DTYPE_": {n[len("DTYPE_"):] for n in dir(mod) if n.startswith("DTYPE_")},
        "LRA_DEVICE_": {n[len("DEVICE_"):] for n in dir(mod) if n.startswith("DEVICE_")},
    }
    for name in sorted(header.defines):
        for prefix, known in tables.items():
            if name.startswith(prefix) and name[len(prefix):] not in known:
                errors.append(f"lra.py: C constant {name} has no entry in the binding's table")
    return errors


def self_test(header, julia_text, python_text, statuses):
    """The checker must catch each kind of drift, in both bindings; returns failures."""
    failures = []
    mutations = {
        "wrong argument type": ("(Ptr{OpaqueHandle}, Float64), live(o), value))",
                                "(Ptr{OpaqueHandle}, Float32), live(o), value))"),
        "wrong return type": ("ccall(sym(:lra_version), UInt32, ())", "ccall(sym(:lra_version), Int32, ())"),
        "unwrapped function": ("ccall(sym(:lra_thread_last_error), Cstring, ())", "Cstring(C_NULL)"),
        "wrong symbol": ("sym(:lra_set_lr)", "sym(:lra_set_learning_rate)"),
        "struct drift": ("    denom_eps::Float64\n", ""),
        "mutable mirror struct": ("\nstruct Tensor\n", "\nmutable struct Tensor\n"),
        "constant drift": ("const LRA_DTYPE_BF16 = UInt32(2)", "const LRA_DTYPE_BF16 = UInt32(3)"),
        "argument count": ("(Ptr{OpaqueHandle}, Float64), live(o), value))",
                           "(Ptr{OpaqueHandle}, Float64, Float64), live(o), value, 0.0))"),
        "callback signature": ("Int32, (Ptr{Float64}, Csize_t, Ptr{Cvoid}))",
                               "Int32, (Ptr{Float32}, Csize_t, Ptr{Cvoid}))"),
    }
    for what, (old, new) in mutations.items():
        if old not in julia_text:
            failures.append(f"self-test: cannot apply '{what}': {old!r} not in LRA.jl")
            continue
        if not check_julia(header, julia_text.replace(old, new, 1), statuses):
            failures.append(f"self-test: the checker missed '{what}' in LRA.jl")
    python_mutations = {
        "wrong argument type": ('"lra_set_lr": (_STATUS, [_HANDLE, ctypes.c_double]),',
                                '"lra_set_lr": (_STATUS, [_HANDLE, ctypes.c_float]),'),
        "wrong return type": ('"lra_version": (ctypes.c_uint32, []),',
                              '"lra_version": (ctypes.c_int32, []),'),
        "missing prototype": ('"lra_version": (ctypes.c_uint32, []),', ""),
        "struct drift": ('        ("denom_eps", ctypes.c_double),\n', ""),
        "constant drift": ("DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2",
                           "DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 3"),
        "skip reason drift": ('6: "zero_scale",', '7: "zero_scale",'),
        "status drift": ("BAD_CHECKPOINT = 8\n", "BAD_CHECKPOINT = 9\n"),
        "missing status": ('    OUT_OF_MEMORY: "OUT_OF_MEMORY",\n', ""),
        "missing skip reason": ('    6: "zero_scale",\n', ""),
        "callback signature": ("ctypes.c_int32, ctypes.POINTER(ctypes.c_double), ctypes.c_size_t",
                               "ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for what, (old, new) in python_mutations.items():
            if old not in python_text:
                failures.append(f"self-test: cannot apply '{what}': {old!r} not in lra.py")
                continue
            path = os.path.join(tmp, "lra_mutated.py")
            with open(path, "w") as f:
                f.write(python_text.replace(old, new, 1))
            if not check_python(header, statuses, path):
                failures.append(f"self-test: the checker missed '{what}' in lra.py")
    return failures


def check_versions():
    """The bindings' package versions (Julia's Project.toml, the Python
    module's __version__) must be Cargo.toml's: one release, one number."""

    def first(path, pattern):
        with open(os.path.join(ROOT, path)) as f:
            m = re.search(pattern, f.read(), re.M)
        return m.group(1) if m else None

    cargo = first("Cargo.toml", r'^version\s*=\s*"([^"]+)"')
    found = {
        "bindings/julia/Project.toml": first("bindings/julia/Project.toml", r'^version\s*=\s*"([^"]+)"'),
        "bindings/python/lra.py (__version__)": first("bindings/python/lra.py", r'^__version__\s*=\s*"([^"]+)"'),
    }
    return [f"{path}: version {v}, Cargo.toml has {cargo}" for path, v in found.items() if v != cargo]


def main(argv):
    with open(HEADER) as f:
        header = Header(f.read())
    with open(JULIA) as f:
        julia_text = f.read()
    statuses = status_values()
    with open(os.path.join(ROOT, "src", "ffi.rs")) as f:
        exported = set(re.findall(r'#\[no_mangle\]\s*pub (?:unsafe )?extern "C" fn (\w+)', f.read()))
    if exported != set(header.functions):
        print(f"check_abi: src/ffi.rs exports {sorted(exported)}, but lra.h parses as "
              f"{sorted(header.functions)} (stale header or a parser gap)", file=sys.stderr)
        return 1
    errors = check_julia(header, julia_text, statuses) + check_python(header, statuses) + check_versions()
    if "--self-test" in argv:
        with open(PYTHON) as f:
            errors += self_test(header, julia_text, f.read(), statuses)
    for e in errors:
        print("ABI MISMATCH:", e, file=sys.stderr)
    if errors:
        return 1
    jl = Julia(julia_text)
    print(
        f"check_abi: {len(header.functions)} C functions, {len(jl.ccalls)} Julia ccalls, "
        f"{len(header.structs)} structs, {len(header.callbacks)} callback type(s), "
        f"{len(header.defines) + len(statuses)} constants: "
        "Julia and Python bindings match include/lra.h"
        + (" (self-test: every injected drift caught)" if "--self-test" in argv else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
