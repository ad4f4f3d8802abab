#!/usr/bin/env python3
"""Mutation testing of bindings/python/lra.py against bindings/python/test_lra.py.

Makes small edits to the binding, one at a time, with the `ast` module (a
comparison swapped: == and !=, < and <=, > and >=, is and is not, in and
not in; `and` and `or` swapped; + and - swapped, * made //, / made *;
an augmented += or -= turned round; an integer constant moved by one; True
and False swapped; `not x` made `x`; an if test negated; a statement
replaced by `pass` (docstrings left alone), a `raise` deleted, a `return X`
made `return None`), and runs the unittest file on each edited copy. An
edit the tests pass is a survivor: either it changes nothing the binding
promises (an equivalent edit) or the tests miss what it breaks. Survivors
are printed with their line for a person to judge.

    python3 scripts/py-mutants.py --sample 0 | tee py-mutants.log
    python3 scripts/py-mutants.py --recheck py-mutants.log   # after adding tests
    python3 scripts/py-mutants.py --sample 200 --seed 1 --skip 200   # the next 200
    python3 scripts/py-mutants.py --list --sample 10 --seed 1       # the draw only

Each edited module is written (`ast.unparse`) into a fresh temporary copy
of the checkout layout that the tests read relative to their own directory:
bindings/python/{lra.py,test_lra.py} (the test puts its directory first on
sys.path, and its subprocesses import lra from there), Cargo.toml and
include/lra.h (read as ../../Cargo.toml and ../../include/lra.h), and
target/release/liblra.so (a link to the library, where lra.py looks in a
checkout). The tests run there with `-m unittest -b --failfast`,
LRA_LIBRARY naming the real library (absolute), and no bytecode written.
Exit status 0: survived; nonzero: caught; past --timeout: caught, counted
as timed out. The unedited module, unparsed the same way, must pass first,
or the script refuses to start.
"""
import argparse
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import mutation_draw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "bindings", "python", "lra.py")
TESTS = os.path.join(ROOT, "bindings", "python", "test_lra.py")

COMPARE_SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
                 ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                 ast.In: ast.NotIn, ast.NotIn: ast.In}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult,
               ast.FloorDiv: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
               ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SYMBOLS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
           ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+",
           ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.LShift: "<<",
           ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.And: "and", ast.Or: "or"}


def is_docstring(stmt, body):
    return (body and stmt is body[0] and isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))


def edits_of(node):
    """(kind, apply) for each edit of one node; apply(node) edits a fresh copy of it in place."""
    out = []
    if isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            new = COMPARE_SWAPS.get(type(op))
            if new:
                which = f" (op {k + 1})" if len(node.ops) > 1 else ""  # a < b <= c
                out.append((f"{SYMBOLS[type(op)]} -> {SYMBOLS[new]}{which}",
                            lambda n, k=k, new=new: n.ops.__setitem__(k, new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{SYMBOLS[type(node.op)]} -> {SYMBOLS[new]}", lambda n: setattr(n, "op", new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP_SWAPS:
        new = BINOP_SWAPS[type(node.op)]
        eq = "=" if isinstance(node, ast.AugAssign) else ""
        out.append((f"{SYMBOLS[type(node.op)]}{eq} -> {SYMBOLS[new]}{eq}",
                    lambda n: setattr(n, "op", new())))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, int):
        out.append((f"{node.value} -> {node.value + 1}", lambda n: setattr(n, "value", n.value + 1)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("not x -> x", None))  # replaces the node: see apply_edit
    if isinstance(node, (ast.If, ast.IfExp)):
        out.append(("negate if", lambda n: setattr(n, "test", ast.UnaryOp(ast.Not(), n.test))))
    if isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return None", lambda n: setattr(n, "value", ast.Constant(None))))
    return out


def statement_edits(tree):
    """(node, field, index) of every statement that may be replaced by `pass`."""
    out = []
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.stmt) and not isinstance(stmt, ast.Pass) \
                        and not is_docstring(stmt, body):
                    out.append((node, field, i))
    return out


def sites(source):
    """Every edit as (node number in ast.walk order, kind, line, extra), deterministically."""
    tree = ast.parse(source)
    nodes = list(ast.walk(tree))
    number = {id(n): k for k, n in enumerate(nodes)}
    out = []
    for k, node in enumerate(nodes):
        for kind, _ in edits_of(node):
            out.append((k, f"{kind} @{node.col_offset}", node.lineno, None))
    for parent, field, i in statement_edits(tree):
        stmt = getattr(parent, field)[i]
        kind = "delete raise" if isinstance(stmt, ast.Raise) else "delete statement"
        out.append((number[id(parent)], f"{kind} @{stmt.col_offset}", stmt.lineno, (field, i)))
    out.sort(key=lambda s: (s[2], s[0], s[1], s[3] or ("", 0)))
    # Nested nodes can start at one column (a + b + c): number the repeats.
    seen = {}
    for j, (k, kind, line, extra) in enumerate(out):
        seen[line, kind] = seen.get((line, kind), 0) + 1
        if seen[line, kind] > 1:
            out[j] = (k, f"{kind} #{seen[line, kind]}", line, extra)
    return out


def apply_edit(source, site):
    """The edited module's text (ast.unparse of the edited tree)."""
    k, kind, _, extra = site
    kind = kind.split(" @")[0]
    tree = ast.parse(source)
    nodes = list(ast.walk(tree))
    node = nodes[k]
    if extra is not None:  # a statement replaced by pass
        field, i = extra
        getattr(node, field)[i] = ast.Pass()
    elif kind == "not x -> x":
        for parent in nodes:  # the node's parent takes the operand in its place
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list) and any(v is node for v in value):
                    value[[id(v) for v in value].index(id(node))] = node.operand
    else:
        dict(edits_of(node))[kind](node)
    return ast.unparse(ast.fix_missing_locations(tree))


def label(site, lines):
    """How a site is printed (and found again by --recheck): line L (kind @column): source."""
    _, kind, line, _ = site
    return f"line {line} ({kind}): {lines[line - 1].strip()}"


def run_tests(module_text, args, library):
    """'survived', 'caught' or 'timed out' for one module text, in a fresh copy of the layout."""
    with tempfile.TemporaryDirectory(prefix="py-mutant-") as tmp:
        here = os.path.join(tmp, "bindings", "python")
        os.makedirs(here)
        shutil.copy(os.path.join(ROOT, "Cargo.toml"), tmp)
        os.makedirs(os.path.join(tmp, "include"))
        shutil.copy(os.path.join(ROOT, "include", "lra.h"), os.path.join(tmp, "include"))
        # A checkout's build, where lra.py looks when LRA_LIBRARY is unset
        # (or, wrongly, when it names a missing file).
        os.makedirs(os.path.join(tmp, "target", "release"))
        os.symlink(library, os.path.join(tmp, "target", "release", "liblra.so"))
        shutil.copy(TESTS, here)
        with open(os.path.join(here, "lra.py"), "w") as f:
            f.write(module_text)
        env = dict(os.environ, LRA_LIBRARY=library, PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        p = subprocess.Popen([args.python, "-B", "-m", "unittest", "-b", "--failfast", "-q",
                              "bindings/python/test_lra.py"], cwd=tmp, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the tests' own subprocesses too
            p.communicate()
            return "timed out", ""
        return ("survived" if p.returncode == 0 else "caught"), out.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mutation_draw.add_arguments(ap, timeout=120)
    ap.add_argument("--python", default="/usr/bin/python3", help="the interpreter of the tests")
    ap.add_argument("--library", default=os.environ.get("LRA_LIBRARY") or
                    os.path.join(ROOT, "target", "release", "liblra.so"), help="liblra.so")
    ap.add_argument("--list", action="store_true", help="print the drawn edits, run nothing")
    args = ap.parse_args()
    library = os.path.abspath(args.library)
    if not os.path.exists(library):
        sys.exit(f"no library at {library}: build it or pass --library")

    source = open(MODULE).read()
    lines = source.split("\n")
    todo = mutation_draw.draw(sites(source), lambda s: label(s, lines), args, "lra.py")
    if args.list:
        for s in todo:
            print(label(s, lines))
        return

    start = time.time()
    outcome, out = run_tests(ast.unparse(ast.parse(source)), args, library)
    if outcome != "survived":
        sys.exit(f"the UNEDITED module (unparsed) does not pass its tests ({outcome}):\n{out[-3000:]}")
    print(f"{len(todo)} edits of bindings/python/lra.py (unedited run: {time.time() - start:.1f} s)",
          flush=True)

    tally = mutation_draw.Tally(len(todo))
    for site in todo:
        outcome, out = run_tests(apply_edit(source, site), args, library)
        if args.recheck and outcome == "caught":  # which test catches it now
            failed = re.search(r"^(?:FAIL|ERROR): (\w+)", out, re.M)
            print(f"CAUGHT {label(site, lines)}\n    by {failed.group(1) if failed else '?'}", flush=True)
        elif outcome == "timed out":
            print(f"TIMED OUT {label(site, lines)}", flush=True)
        tally.add(outcome, label(site, lines), outcome == "survived")
    timed_out = tally.counts.get("timed out", 0)
    caught = tally.counts.get("caught", 0) + timed_out
    print(f"\n{len(todo)} edits in {time.time() - tally.start:.0f} s: {tally.counts}")
    print(f"{len(todo)} edits: caught {caught} ({100.0 * caught / max(1, len(todo)):.1f}%), "
          f"{timed_out} of them by timing out")
    tally.print_survivors()

if __name__ == "__main__":
    main()
