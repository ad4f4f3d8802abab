#!/usr/bin/env python3
"""Value-level check of the Julia binding's ccalls, with tree-sitter-julia.

bindings/check_abi.py compares each ccall's declared types with
include/lra.h; this checks what the calls pass:
  [symbol]   every ccall names its C function literally, `sym(:lra_x)` or
             `Libdl.dlsym(lib, :lra_x)`, and passes as many values as C
             takes; `@ccall` is refused (check_abi.py reads `ccall` only);
             ccalls outside src/LRA.jl are refused;
  [order]    each value matches its C parameter by name: it mentions the
             parameter's name as a word, or is one of the spellings in
             ALIASES (catches swapped arguments of the same type);
  [out]      a non-const `T *` (an out-parameter) gets a variable that the
             enclosing function binds only to `Ref{T}(...)`: a value would
             be copied and the result lost;
  [preserve] a ccall passing raw pointers into Julia arrays (`lra_tensor *`,
             `float *`) sits inside `GC.@preserve`. Which arrays it
             preserves is not checked.
Not checked here: names resolving (a misspelled function or variable
parses; check_names.py resolves them).

    python3 bindings/julia/check_ccalls.py [--self-test]

Exit 0: no problem; 1: a problem (or a missed self-test mutation);
2: tree_sitter / tree_sitter_julia not installed (the caller skips loudly).
"""
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("check_abi", os.path.join(os.path.dirname(HERE), "check_abi.py"))
check_abi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_abi)

SOURCE = "src/LRA.jl"
# Files that must not call C themselves (their calls would go unchecked).
OTHER_FILES = ["ext/LRACUDAExt.jl", "test/runtests.jl"]

# C parameter name -> the other Julia spellings it may be passed as.
ALIASES = {
    "h": {"live(o)", "o.ptr"},  # live(o) refuses a closed handle; lra_destroy gets o.ptr
    "count": {"length(tensors)"},
    "len": {"length(buf)"},
    "lr": {"value"},  # set_lr!: `lr` is the getter's name
    "reduce": {"REDUCE_TRAMPOLINE[]", "C_NULL"},
    "user": {"pointer_from_objref(box)", "C_NULL"},
}
# An out-parameter may also be a variable called `out`.
OUT_NAME = "out"
# Pointers into Julia-owned memory that a collection could move or free.
RAW_ARRAY_POINTERS = {"ptr(lra_tensor)", "ptr(f32)"}


def parser():
    import tree_sitter
    import tree_sitter_julia

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_julia.language()))


def parser_or_say_why(tool):
    """The parser, or None after printing why not (tree_sitter or
    tree_sitter_julia missing: the caller exits 2, and the suite skips
    loudly)."""
    try:
        return parser()
    except ImportError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return None


def walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children))


def ancestors(node):
    n = node.parent
    while n is not None:
        yield n
        n = n.parent


def items(node):
    """The element nodes of an argument list or tuple (no punctuation, no comments)."""
    return [c for c in node.children if c.type not in ("(", ")", ",") and not c.type.endswith("comment")]


class Source:
    def __init__(self, ts, text):
        self.bytes = text.encode()
        self.tree = ts.parse(self.bytes)

    def text(self, node):
        return self.bytes[node.start_byte : node.end_byte].decode()

    def line(self, node):
        return node.start_point[0] + 1

    def callee(self, node):
        return self.text(node.children[0]) if node.type == "call_expression" else None

    def macro(self, node):
        ident = [c for c in node.children if c.type == "macro_identifier"]
        return self.text(ident[0]).lstrip("@") if ident else None

    def ccalls(self):
        return [n for n in walk(self.tree.root_node) if self.callee(n) == "ccall"]

    def at_ccalls(self):
        return [n for n in walk(self.tree.root_node) if n.type == "macrocall_expression" and self.macro(n) == "ccall"]

    def scope(self, node):
        """The function around `node`: long form, or short form `f(x) = ...`."""
        for a in ancestors(node):
            if a.type == "function_definition":
                return a
            if a.type == "assignment" and a.children[0].type == "call_expression":
                return a
        return self.tree.root_node

    def bindings(self, scope, name):
        """Right-hand sides of every `name = ...` in `scope`."""
        return [a.children[-1] for a in walk(scope)
                if a.type == "assignment" and a.children[0].type == "identifier"
                and self.text(a.children[0]) == name]


def c_function(src, fn_node):
    """`lra_x` of `sym(:lra_x)` / `Libdl.dlsym(lib, :lra_x)`, else None."""
    if fn_node.type != "call_expression" or src.callee(fn_node) not in ("sym", "Libdl.dlsym"):
        return None
    args = items([c for c in fn_node.children if c.type == "argument_list"][0])
    if not args or args[-1].type != "quote_expression":
        return None
    return src.text(args[-1]).lstrip(":")


def ref_type(src, rhs):
    """T of an expression `Ref{T}(...)`, else None."""
    if rhs.type != "call_expression" or rhs.children[0].type != "parametrized_type_expression":
        return None
    m = re.fullmatch(r"Ref\{(.+)\}", src.text(rhs.children[0]), flags=re.S)
    return m.group(1) if m else None


def check_value(src, jl, call, fn, index, param, value):
    cname, const, ctype = param
    where = f"LRA.jl:{src.line(value)}: {fn}"
    vt = src.text(value)
    errors = []
    is_out = ctype.startswith("ptr(") and not const and ctype not in ("ptr(void)", "ptr(lra_handle)")
    named = re.search(rf"\b{re.escape(cname)}\b", vt) or vt in ALIASES.get(cname, ())
    if not (named or (is_out and vt == OUT_NAME)):
        errors.append(f"[order] {where}: argument {index + 1}, C parameter `{cname}`, gets `{vt}`")
    if is_out:
        want = ctype[len("ptr(") : -1]
        rhs = src.bindings(src.scope(call), vt) if value.type == "identifier" else []
        types = [ref_type(src, r) for r in rhs]
        if not rhs or any(t is None or jl.canon(t) != want for t in types):
            errors.append(f"[out] {where}: out-parameter `{cname}` ({ctype}) must be a variable bound "
                          f"to Ref{{...}} of {want} in the same function; gets `{vt}`"
                          + (f" (bound to {', '.join(src.text(r) for r in rhs)})" if rhs else ""))
    if ctype in RAW_ARRAY_POINTERS and not any(
            a.type == "macrocall_expression" and src.macro(a) == "preserve" for a in ancestors(call)):
        errors.append(f"[preserve] {where}: `{cname}` ({ctype}) carries raw pointers into Julia "
                      "arrays: the ccall must be inside GC.@preserve of those arrays")
    return errors


def check(ts, header, text, others=()):
    """Problems in LRA.jl's `text` and in the `others` (name, text) files."""
    src = Source(ts, text)
    jl = check_abi.Julia(text)
    errors = []
    for n in walk(src.tree.root_node):
        if n.type == "ERROR" or n.is_missing:
            errors.append(f"[syntax] LRA.jl:{src.line(n)}: does not parse")
    for n in src.at_ccalls():
        errors.append(f"[symbol] LRA.jl:{src.line(n)}: @ccall: write ccall(sym(:name), ...), "
                      "whose types check_abi.py checks")
    for call in src.ccalls():
        args = items([c for c in call.children if c.type == "argument_list"][0])
        fn = c_function(src, args[0])
        if fn is None or fn not in header.parameters:
            errors.append(f"[symbol] LRA.jl:{src.line(call)}: ccall of `{src.text(args[0])}`: name an "
                          "include/lra.h function as sym(:lra_x) or Libdl.dlsym(lib, :lra_x)")
            continue
        params = header.parameters[fn]
        values = args[3:]
        if len(values) != len(params):
            errors.append(f"[symbol] LRA.jl:{src.line(call)}: {fn} takes {len(params)} arguments, "
                          f"the ccall passes {len(values)}")
            continue
        for i, (param, value) in enumerate(zip(params, values)):
            errors += check_value(src, jl, call, fn, i, param, value)
    for name, other in others:
        osrc = Source(ts, other)
        for n in osrc.ccalls() + osrc.at_ccalls():
            errors.append(f"[symbol] {name}:{osrc.line(n)}: a C call outside {SOURCE} (unchecked): "
                          "wrap it in LRA.jl")
    return errors


# What --self-test injects into LRA.jl, and the check that must catch it.
MUTATIONS = {
    "swapped same-typed arguments (loss, obs_var)": (
        "[order]", "live(o), tensors, length(tensors), loss, obs_var, stream)",
        "live(o), tensors, length(tensors), obs_var, loss, stream)"),
    "out-parameter passed by value": (
        "[out]", "(Ptr{OpaqueHandle}, Ref{Float64}), live(o), out))",
        "(Ptr{OpaqueHandle}, Ref{Float64}), live(o), out[]))"),
    "out Ref of the wrong type": ("[out]", "out = Ref{UInt32}(0)", "out = Ref{UInt64}(0)"),
    "@ccall form": (
        "[symbol]", "ccall(sym(:lra_set_lr), lra_status, (Ptr{OpaqueHandle}, Float64), live(o), value)",
        "@ccall $(sym(:lra_set_lr))(live(o)::Ptr{OpaqueHandle}, value::Float32)::lra_status"),
    "symbol not literal": ("[symbol]", "sym(:lra_set_lr)", "sym(Symbol(:lra_set_, :lr))"),
    "missing GC.@preserve": ("[preserve]", "GC.@preserve params grads found_inf begin", "begin"),
}


def self_test(ts, header, text):
    failures = []
    for what, (code, old, new) in MUTATIONS.items():
        if old not in text:
            failures.append(f"self-test: cannot apply '{what}': {old!r} not in LRA.jl")
            continue
        found = check(ts, header, text.replace(old, new, 1))
        if not any(e.startswith(code) for e in found):
            failures.append(f"self-test: missed '{what}' (wanted a {code} problem; got {found})")
    ext_call = "\nf() = ccall(:lra_version, UInt32, ())\n"
    if not check(ts, header, text, [(OTHER_FILES[0], ext_call)]):
        failures.append(f"self-test: missed a ccall in {OTHER_FILES[0]}")
    return failures


def main(argv):
    ts = parser_or_say_why("check_ccalls")
    if ts is None:
        return 2
    with open(check_abi.HEADER) as f:
        header = check_abi.Header(f.read())
    with open(os.path.join(HERE, SOURCE)) as f:
        text = f.read()
    others = []
    for name in OTHER_FILES:
        with open(os.path.join(HERE, name)) as f:
            others.append((name, f.read()))
    errors = check(ts, header, text, others)
    if "--self-test" in argv:
        errors += self_test(ts, header, text)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    print(f"check_ccalls: {len(Source(ts, text).ccalls())} ccalls pass their arguments by C parameter, "
          "out-parameters as Ref variables, array pointers under GC.@preserve"
          + (" (self-test: every injected mistake caught)" if "--self-test" in argv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
