#!/usr/bin/env python3
"""Name-resolution lint of the Julia binding, with tree-sitter-julia.

Julia cannot be installed where the binding is developed, so a misspelled
name would first fail in a user's hands. In src/LRA.jl, ext/LRACUDAExt.jl
and test/runtests.jl, every name *used* (called or read as a value, a type
in an annotation, a `where` bound or a struct field's type, a macro such as
`@preserve` or the `@v_str` of `v"..."`, the names in `$x` / `$(...)`
interpolations, the module `M` of a qualified `M.x`) must be
  - bound in the same file: a function, macro, struct, abstract type, module
    or const; an assignment target (tuples destructured); a parameter
    (positional, keyword, typed, `where`); a for, comprehension, do, let,
    arrow-function or catch variable; a `local` / `global`;
  - imported by the file: `using M: a` / `import M: a`, `import M`, or `M`
    and the names `M` exports after `using M` (LRA's: its `export`
    statements, each of which must name a top-level definition of LRA.jl);
  - or in JULIA_NAMES, the Base/Core, stdlib and CUDA.jl names the files use.
[name] reports the rest. [member]: a qualified `M.x` (or `using M: x`) with
`M` LRA or a module of JULIA_NAMES must name one of its names (LRA's: the
top-level definitions of LRA.jl, exported or not). [export]: an exported
name LRA.jl does not define. [import]: `using`/`import` of a module this
script has no names for. [allowlist]: a JULIA_NAMES entry no file uses.
Not uses: the field of `x.f`, keyword names in calls, named-tuple keys,
symbols (`:x`; a `$` inside a quote is), struct field names, string text.

Not checked: scopes (a name bound anywhere in a file counts as bound in all
of it: a local read outside its scope or before its assignment passes); the
fields and properties of values (`o.ptr`: only modules' members are
checked); methods (argument counts and types) and keyword names.

    python3 bindings/julia/check_names.py [--self-test]

Exit 0: every name resolves; 1: a problem (or a missed self-test mutation);
2: tree_sitter / tree_sitter_julia not installed (the caller skips loudly).
"""
import os
import sys

from check_ccalls import HERE, OTHER_FILES, SOURCE, Source, ancestors, parser_or_say_why, walk

FILES = [SOURCE] + OTHER_FILES

# The Julia names the three files use, by module: (exported: usable
# unqualified after `using M`, Base's in every module; reachable only as
# `M.x`). Macros are spelled with their `@`, a non-standard string literal
# as its macro (`v"..."`: `@v_str`). Base's names include Core's exports,
# which Base re-exports. Each entry was checked in JuliaLang/julia:
# base/exports.jl (Base's exports), base/boot.jl (Core's), the manual's
# doc/src/base pages (`GC.@preserve` in base.md; `Threads.*` in multi-threading.md), the
# `deepcopy_internal` hook in base/deepcopy.jl's `deepcopy` docstring, the
# `export` lines of stdlib Libdl, Serialization and Test, Random's manual
# page (`Random.seed!`); CUDA.jl's `export` lines (src/state.jl: device,
# device!, deviceid, stream, stream!; CuArray; CuStream). Keep it to the
# names used: an entry no file uses is reported ([allowlist]). A name a file
# binds itself (LRA.jl's local `size`) resolves to that binding, not here.
JULIA_NAMES = {
    "Base": ({
        # types (Core's: AbstractArray, AbstractFloat, AbstractString, Any,
        # Array, Bool, Cvoid, DataType, Exception, Float16/32/64, IO, Int,
        # Int32, Integer, Nothing, Ptr, Real, Ref, String, Symbol, Type,
        # UInt8/32/64, Union, ArgumentError, ErrorException, InterruptException)
        "AbstractArray", "AbstractFloat", "AbstractString", "AbstractVector", "Any", "Array",
        "Bool", "Cstring", "Csize_t", "Cvoid", "DataType", "Dict", "Exception", "Float16",
        "Float32", "Float64", "IO", "IOBuffer", "IdDict", "Int", "Int32", "Integer", "Nothing",
        "Ptr", "Real", "Ref", "ReentrantLock", "String", "Symbol", "Type", "UInt32", "UInt64",
        "UInt8", "Union", "Vector", "VersionNumber",
        "ArgumentError", "CapturedException", "DimensionMismatch", "ErrorException",
        "InterruptException",
        # constants (Core's: nothing, undef) and submodules
        "C_NULL", "ENV", "nothing", "undef", "GC", "Threads",
        # functions (Core's: fieldtype, getfield, throw, typeof)
        "abs2", "all", "any", "catch_backtrace", "close", "convert", "current_task",
        "deepcopy", "eltype", "enumerate", "error", "fetch", "fieldnames", "fieldtype",
        "finalizer", "first", "get", "get!", "getfield", "haskey", "isempty", "join", "length",
        "lock", "map", "max", "nameof", "occursin", "pointer", "pointer_from_objref", "pop!",
        "print", "push!", "randn", "reinterpret", "repr", "resize!", "rethrow", "showerror",
        "similar", "sizeof", "sleep", "string", "sum", "task_local_storage", "throw",
        "trylock", "typeof", "unlock", "unsafe_pointer_to_objref", "unsafe_string",
        "unsafe_wrap", "zeros", "zip",
        # macros
        "@cfunction", "@info", "@warn", "@v_str",
    }, {"deepcopy_internal"}),
    "GC": (set(), {"@preserve"}),
    "Threads": (set(), {"@spawn", "SpinLock", "nthreads", "threadid"}),
    "Libdl": ({"dlclose", "dlopen", "dlsym"}, set()),
    "Serialization": ({"AbstractSerializer", "serialize"}, set()),
    "Random": (set(), {"seed!"}),
    "Test": ({"@test", "@test_skip", "@test_throws", "@testset"}, set()),
    "CUDA": ({"CuArray", "CuStream", "device", "device!", "deviceid", "stream", "stream!"}, set()),
}
# Names every module sees: Base and Core themselves, and `ccall`, a form
# lowering handles (no binding; the manual's C Interface page, c.md).
ALWAYS = {"Base", "Core", "ccall"}
LRA_MODULE = "LRA"
# Words that are syntax, not names, inside these nodes: `a[end]`, and an
# inner constructor's `new(...)`.
SYNTAX = {"end": "index_expression", "new": "struct_definition"}


class Scan(Source):
    """What one file binds, imports, exports and uses."""

    def __init__(self, ts, source):
        super().__init__(ts, source)
        self.bound = set()
        self.toplevel = set()  # bound by a module's (or the file's) own statements
        self.uses = []  # (name, node)
        self.members = []  # (module, name, node) of `module.name`
        self.imports = []  # (keyword, module, [(name, node)] or None, node)
        self.exports = []  # (name, node)
        self.unparsed = [n for n in walk(self.tree.root_node) if n.type == "ERROR" or n.is_missing]
        self.expr(self.tree.root_node, top=True)

    def bind(self, node, top=False, name=None):
        name = name or self.text(node)
        self.bound.add(name)
        if top:
            self.toplevel.add(name)

    def use(self, node, name=None):
        self.uses.append((name or self.text(node), node))

    # --- expressions: everything not a binding position ---------------------

    def expr(self, n, top=False):
        handler = getattr(self, "_" + n.type, None)
        if handler:
            handler(n, top)
        else:
            for c in n.named_children:
                self.expr(c)

    def _source_file(self, n, top):
        for c in n.named_children:
            self.expr(c, top=True)

    def _module_definition(self, n, top):
        name = n.child_by_field_name("name")
        self.bind(name, top)
        for c in n.named_children:
            if c != name:
                self.expr(c, top=True)

    def _identifier(self, n, top):
        self.use(n)

    def _field_expression(self, n, top):
        value = n.child_by_field_name("value")
        self.expr(value)
        member = n.named_children[-1]
        if value.type == "identifier" and member.type == "identifier":
            self.members.append((self.text(value), self.text(member), member))

    def _quote_expression(self, n, top):
        # `:name` and `:(code)` are data; only `$` interpolations are evaluated.
        for d in n.named_children:
            self._quoted(d)

    _quote_statement = _quote_expression

    def _quoted(self, n):
        if n.type == "interpolation_expression":
            self.expr(n)
        else:
            for c in n.named_children:
                self._quoted(c)

    def _prefixed_string_literal(self, n, top):
        # v"1.0" is @v_str("1.0"): no interpolation inside.
        prefix = n.child_by_field_name("prefix")
        self.use(prefix, f"@{self.text(prefix)}_str")

    def _macrocall_expression(self, n, top):
        kids = n.named_children
        ident = next(i for i, c in enumerate(kids) if c.type == "macro_identifier")
        macro = kids[ident]
        name = "@" + self.text(macro.named_children[-1])
        if ident:  # Module.@macro
            module = kids[0]
            self.expr(module)
            if module.type == "identifier":
                self.members.append((self.text(module), name, macro))
        else:
            self.use(macro, name)
        for c in kids[ident + 1 :]:
            self.expr(c)

    def _named_argument(self, n, top):
        self.expr(n.children[-1])  # f(; key = value): the key is no use

    _named_field = _named_argument  # (key = value,)

    def _assignment(self, n, top):
        lhs, rhs = n.children[0], n.children[-1]
        if is_signature(lhs):
            self.signature(lhs, top)
        else:
            self.pattern(lhs, top)
        self.expr(rhs)

    def _function_definition(self, n, top):
        for c in n.named_children:
            if c.type == "signature":
                self.signature(c.named_children[0], top)
            else:
                self.expr(c)

    def _macro_definition(self, n, top):
        for c in n.named_children:
            if c.type == "signature":
                call = c.named_children[0]
                self.bind(call.children[0], top, "@" + self.text(call.children[0]))
                for arglist in call.named_children[1:]:
                    self.param(arglist)
            else:
                self.expr(c)

    def _struct_definition(self, n, top):
        for c in n.named_children:
            if c.type == "type_head":
                self.type_head(c, top)
            elif c.type == "typed_expression":  # field::Type: the field name is no use
                self.expr(c.children[-1])
            elif c.type != "identifier":  # a bare identifier is an untyped field
                self.expr(c)

    def _abstract_definition(self, n, top):
        for c in n.named_children:
            if c.type == "type_head":
                self.type_head(c, top)

    _primitive_definition = _abstract_definition

    def _const_statement(self, n, top):
        for c in n.named_children:
            if c.type == "assignment":
                self._assignment(c, top)
            else:
                self.pattern(c, top)

    _global_statement = _const_statement
    _local_statement = _const_statement

    def _for_binding(self, n, top):  # for x in xs / [... for x in xs]
        self.pattern(n.children[0])
        self.expr(n.children[-1])

    _let_binding = _for_binding

    def _let_statement(self, n, top):
        row = n.children[0].start_point[0]
        for c in n.named_children:
            if c.type == "identifier" and c.start_point[0] == row:
                self.bind(c)  # let x, y = 1
            else:
                self.expr(c)

    def _catch_clause(self, n, top):
        row = n.children[0].start_point[0]
        for i, c in enumerate(n.named_children):
            if i == 0 and c.type == "identifier" and c.start_point[0] == row:
                self.bind(c)  # catch e (on the `catch` line; below it, a statement)
            else:
                self.expr(c)

    def _do_clause(self, n, top):
        for c in n.named_children:
            if c.type == "argument_list":
                self.param(c)
            else:
                self.expr(c)

    def _arrow_function_expression(self, n, top):
        self.param(n.children[0])
        self.expr(n.children[-1])

    def _where_expression(self, n, top):
        self.expr(n.children[0])
        self.where_params(n.children[-1])

    def _using_statement(self, n, top):
        keyword = self.text(n.children[0])
        for c in n.named_children:
            if c.type == "selected_import":
                parts = c.named_children
                picked = []
                for p in parts[1:]:
                    if p.type == "import_alias":  # import M: a as b
                        picked.append((self.text(p.named_children[0]), p.named_children[-1]))
                    else:
                        picked.append((self.text(p), p))
                self.imports.append((keyword, module_name(self.text(parts[0])), picked, c))
            else:
                self.imports.append((keyword, module_name(self.text(c)), None, c))

    _import_statement = _using_statement

    def _export_statement(self, n, top):
        for c in n.named_children:
            self.exports.append((self.text(c), c))

    def _public_statement(self, n, top):
        pass  # marks names public; binds and uses nothing

    # --- binding positions --------------------------------------------------

    def signature(self, n, top):
        """`f(params) where {T}` :: R, of a long or short function definition."""
        t = n.type
        if t == "where_expression":
            self.signature(n.children[0], top)
            self.where_params(n.children[-1])
        elif t == "typed_expression":  # f(x)::ReturnType
            self.signature(n.children[0], top)
            self.expr(n.children[-1])
        elif t == "call_expression":
            callee = n.children[0]
            if callee.type == "identifier":
                self.bind(callee, top)
            elif callee.type == "field_expression":  # a method of Base.close: binds nothing
                self.expr(callee)
            else:  # (o::T)(x) = ...
                self.param(callee)
            for arglist in n.named_children[1:]:
                self.param(arglist)
        elif t == "argument_list":  # function (x) ... end
            self.param(n)
        elif t == "identifier":  # function f end
            self.bind(n, top)
        else:
            self.expr(n)

    def param(self, n):
        """A parameter (or the parameter list) of a function, do block or `->`."""
        t = n.type
        if t == "identifier":
            self.bind(n)
        elif t == "typed_expression":  # x::T
            self.param(n.children[0])
            self.expr(n.children[-1])
        elif t == "unary_typed_expression":  # ::T
            self.expr(n.children[-1])
        elif t == "named_argument":  # x = default, k::T = default
            self.param(n.children[0])
            self.expr(n.children[-1])
        elif t == "splat_expression":  # xs...
            self.param(n.children[0])
        elif t in ("argument_list", "tuple_expression", "parenthesized_expression"):
            for c in n.named_children:
                self.param(c)
        else:
            self.expr(n)

    def where_params(self, n):
        for c in (n.named_children if n.type == "curly_expression" else [n]):
            if c.type == "identifier":
                self.bind(c)
            elif c.type == "binary_expression":  # T <: Bound
                self.bind(c.children[0])
                self.expr(c.children[-1])
            else:
                self.expr(c)

    def pattern(self, n, top=False):
        """An assignment's (for's, let's) target."""
        t = n.type
        if t == "identifier":
            self.bind(n, top)
        elif t == "typed_expression":  # x::T = ...
            self.pattern(n.children[0], top)
            self.expr(n.children[-1])
        elif t in ("tuple_expression", "open_tuple", "parenthesized_expression"):
            for c in n.named_children:
                self.pattern(c, top)
        elif t == "splat_expression":
            self.pattern(n.children[0], top)
        else:  # a.f = ..., a[i] = ...: uses of `a`
            self.expr(n)

    def type_head(self, n, top):
        head = n.named_children[0]
        if head.type == "binary_expression":  # S{T} <: Super
            self.expr(head.children[-1])
            head = head.children[0]
        if head.type == "parametrized_type_expression":  # S{T}
            self.where_params(head.children[-1])
            head = head.children[0]
        self.bind(head, top)


def is_signature(lhs):
    """Whether an assignment's left side is a function's: `f(x) = ...`."""
    if lhs.type == "call_expression":
        return True
    if lhs.type in ("where_expression", "typed_expression"):
        return is_signature(lhs.children[0])
    return False


def module_name(path):
    """`LRA` of `LRA`, `.LRA`, `Base.LRA`: the name a using/import binds."""
    return path.lstrip(".").split(".")[-1]


def names_of(module, lra):
    """Every name `module.x` may name, or None for a module unknown here."""
    if module == LRA_MODULE:
        return lra.toplevel
    if module in JULIA_NAMES:
        exported, qualified = JULIA_NAMES[module]
        return exported | qualified
    return None


def exports_of(module, lra):
    """The names `using module` brings in."""
    if module == LRA_MODULE:
        return {name for name, _ in lra.exports}
    return JULIA_NAMES[module][0]


def resolve(path, scan, lra, used):
    """Problems of the file `path`'s `scan` (`used` collects the JULIA_NAMES entries it uses)."""
    def where(node):
        return f"{path}:{scan.line(node)}"

    errors = [f"[syntax] {where(n)}: does not parse" for n in scan.unparsed]
    scope = dict.fromkeys(JULIA_NAMES["Base"][0], "Base")  # name -> the module it comes from
    for keyword, module, picked, node in scan.imports:
        known = names_of(module, lra)
        if known is None:
            errors.append(f"[import] {where(node)}: `{module}`: no names known for this module "
                          "(add those used to JULIA_NAMES)")
        elif picked is None:  # using M / import M
            scope[module] = module
            if keyword == "using":
                scope.update(dict.fromkeys(exports_of(module, lra), module))
        else:  # using M: a, b
            for member, at in picked:
                if member not in known:
                    errors.append(f"[member] {where(at)}: `{module}.{member}`: {module} has no `{member}`")
                scope[member] = module
    for name, node in scan.uses:
        if name in scan.bound or name in ALWAYS:
            continue
        if name in SYNTAX and any(a.type == SYNTAX[name] for a in ancestors(node)):
            continue
        if name not in scope:
            errors.append(f"[name] {where(node)}: `{name}` is not bound in {path}, imported, "
                          "or a known Julia name (JULIA_NAMES)")
        else:
            used.add((scope[name], name))
    for module, member, node in scan.members:
        known = names_of(module, lra)
        if known is None:
            continue  # a value's field (or a module the [import] check reports)
        if member not in known:
            top = " top-level" if module == LRA_MODULE else ""
            errors.append(f"[member] {where(node)}: `{module}.{member}`: {module} has no{top} `{member}`")
        used.add((module, member))
    return errors


def check(ts, texts, unused=True):
    """Problems of the three files, `texts` {relative path: source}."""
    lra = Scan(ts, texts[SOURCE])
    errors = [f"[export] {SOURCE}:{lra.line(node)}: exports `{name}`, which LRA.jl "
              "does not define at its top level" for name, node in lra.exports if name not in lra.toplevel]
    used = set()
    for name in FILES:
        scan = lra if name == SOURCE else Scan(ts, texts[name])
        errors += resolve(name, scan, lra, used)
    if unused:
        for module, (exported, qualified) in JULIA_NAMES.items():
            for entry in sorted((exported | qualified) - {m for mod, m in used if mod == module}):
                errors.append(f"[allowlist] JULIA_NAMES[{module!r}]: `{entry}` is used by no file: remove it")
    return errors


# What --self-test injects (file, old, new), and the problem that must name it.
MUTATIONS = {
    "misspelled function call (LRA.jl)": (
        SOURCE, "throw(LRAError(st, thread_last_error()))", "throw(LRAError(st, thread_last_eror()))",
        "[name]", "thread_last_eror"),
    "misspelled local variable read (LRA.jl)": (
        SOURCE, "resize!(buf, written[])", "resize!(buf, writen[])", "[name]", "writen"),
    "misspelled type in an annotation (LRA.jl)": (
        SOURCE, "function check(o::Optimizer, st::lra_status)", "function check(o::Optimizer, st::lra_stauts)",
        "[name]", "lra_stauts"),
    "misspelled struct field type (LRA.jl)": (
        SOURCE, "    lock::ReentrantLock ", "    lock::ReentrantLok ", "[name]", "ReentrantLok"),
    "where parameter renamed, its use not (LRA.jl)": (
        SOURCE, "dtype_code(::Type{T}) where {T} =", "dtype_code(::Type{T}) where {U} =", "[name]", "T"),
    "misspelled macro (LRA.jl)": (
        SOURCE, "@cfunction(reduce_trampoline", "@cfuncton(reduce_trampoline", "[name]", "@cfuncton"),
    "misspelled qualified macro (LRA.jl)": (
        SOURCE, "GC.@preserve box begin", "GC.@preserv box begin", "[member]", "GC.@preserv"),
    "misspelled module prefix (LRA.jl)": (
        SOURCE, "Libdl.dlclose(lib)", "Libld.dlclose(lib)", "[name]", "Libld"),
    "misspelled module member (LRA.jl)": (
        SOURCE, "Base.showerror(io::IO", "Base.showeror(io::IO", "[member]", "Base.showeror"),
    "misspelled name in $(...) (LRA.jl)": (
        SOURCE, "gradient $(eltype(grad))", "gradient $(eltype(grd))", "[name]", "grd"),
    "misspelled name in $x (LRA.jl)": (
        SOURCE, 'error("$path is $what', 'error("$pth is $what', "[name]", "pth"),
    "export of an undefined name (LRA.jl)": (
        SOURCE, "       decision_name\n", "       decision_nme\n", "[export]", "decision_nme"),
    "misspelled type (LRACUDAExt.jl)": (
        OTHER_FILES[0], "LRA.stream_handle(s::CuStream)", "LRA.stream_handle(s::CuStrem)", "[name]", "CuStrem"),
    "misspelled local variable read (LRACUDAExt.jl)": (
        OTHER_FILES[0], "device_ordinal = ordinal)", "device_ordinal = ordnal)", "[name]", "ordnal"),
    "misspelled module prefix (LRACUDAExt.jl)": (
        OTHER_FILES[0], "LRA.stream_handle(CUDA.stream())", "LRA.stream_handle(CUD.stream())", "[name]", "CUD"),
    "misspelled CUDA.jl function (LRACUDAExt.jl)": (
        OTHER_FILES[0], "ordinal = CUDA.deviceid(dev)", "ordinal = CUDA.devicid(dev)", "[member]", "CUDA.devicid"),
    "misspelled LRA function (LRACUDAExt.jl)": (
        OTHER_FILES[0], "LRA.stream_of(::CuArray)", "LRA.stream_off(::CuArray)", "[member]", "LRA.stream_off"),
    "misspelled name in $(...) (LRACUDAExt.jl)": (
        OTHER_FILES[0], "$(repr(fields[key]))", "$(repr(field[key]))", "[name]", "field"),
    "misspelled macro (runtests.jl)": (
        OTHER_FILES[1], "@test_throws ArgumentError deepcopy(opt)", "@test_throw ArgumentError deepcopy(opt)",
        "[name]", "@test_throw"),
    "misspelled exported function (runtests.jl)": (
        OTHER_FILES[1], "set_reduction!(busy, refusing)", "set_reducton!(busy, refusing)", "[name]", "set_reducton!"),
    "misspelled local variable read (runtests.jl)": (
        OTHER_FILES[1], "caught(() -> lr(busy))", "caught(() -> lr(bussy))", "[name]", "bussy"),
    "unexported LRA name used unqualified (runtests.jl)": (
        OTHER_FILES[1], "@test LRA.last_error(opt)", "@test last_error(opt)", "[name]", "last_error"),
    "misspelled module prefix (runtests.jl)": (
        OTHER_FILES[1], "Random.seed!(0)", "Randon.seed!(0)", "[name]", "Randon"),
    "misspelled module in using (runtests.jl)": (
        OTHER_FILES[1], "using Random\n", "using Randon\n", "[import]", "Randon"),
    "misspelled type parameter (runtests.jl)": (
        OTHER_FILES[1], "Vector{Float32}[], Vector{Float32}[]", "Vector{Float23}[], Vector{Float32}[]",
        "[name]", "Float23"),
    "misspelled string macro (runtests.jl)": (
        OTHER_FILES[1], 'v"0.1.0"', 'w"0.1.0"', "[name]", "@w_str"),
}


def self_test(ts, texts):
    failures = []
    for what, (name, old, new, code, wanted) in MUTATIONS.items():
        if old not in texts[name]:
            failures.append(f"self-test: cannot apply '{what}': {old!r} not in {name}")
            continue
        found = check(ts, dict(texts, **{name: texts[name].replace(old, new, 1)}), unused=False)
        if not any(e.startswith(code) and f"`{wanted}`" in e for e in found):
            failures.append(f"self-test: missed '{what}' (wanted a {code} problem naming `{wanted}`; got {found})")
    return failures


def main(argv):
    ts = parser_or_say_why("check_names")
    if ts is None:
        return 2
    texts = {}
    for name in FILES:
        with open(os.path.join(HERE, name)) as f:
            texts[name] = f.read()
    errors = check(ts, texts)
    if "--self-test" in argv:
        errors += self_test(ts, texts)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    uses = sum(len(Scan(ts, texts[n]).uses) for n in FILES)
    print(f"check_names: {uses} uses of names in {len(FILES)} Julia files resolve "
          f"({sum(len(a) + len(b) for a, b in JULIA_NAMES.values())} known Julia names)"
          + (f" (self-test: {len(MUTATIONS)} injected misspellings caught)" if "--self-test" in argv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
