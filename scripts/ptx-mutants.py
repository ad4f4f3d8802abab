#!/usr/bin/env python3
"""Mutation testing of kernels/lra.ptx against the PTX-interpreter tests.

Makes small edits to the kernel, one at a time (an instruction deleted, an
opcode or comparison swapped, a predicate negated, an immediate moved by
one, the operands of a subtraction swapped), and runs a prebuilt test
binary on each edited copy through LRA_PTX_KERNEL (tests/ptx_common:
`kernel_module`). An edit the tests pass is a survivor: either it changes
nothing the kernel's contract covers (an equivalent edit) or the tests miss
what it breaks. Survivors are printed with their line for a person to judge.

    cargo test --profile checked --test ptx_fuzz --test ptx_kernels --no-run
    python3 scripts/ptx-mutants.py --sample 300 --seed 1 | tee ptx-mutants.log
    python3 scripts/ptx-mutants.py --recheck ptx-mutants.log   # after fixing tests
    python3 scripts/ptx-mutants.py --sample 300 --seed 1 --skip 300   # the next 300

`--operands` draws from other edits instead: a source register of an
arithmetic instruction taken for another source of it of the same width
(`mul.rn.f32 %xf, %wd, %th` -> `%wd, %wd`), and a lane register (th0-3,
g0-3, a0-3, b0/bb1-3, ht0-3, hg0-3, v0-15) taken for its neighbour, in any
operand: a wrong register is the commonest slip in hand-written PTX. Their
draws are apart from the others' (the same --seed gives another order), so
--skip and --recheck continue an --operands run only with --operands.

`--destinations` draws from the third kind: the result of an arithmetic
instruction written over one of its sources of the same width
(`add.s64 %pa, %pp, %o` -> `add.s64 %pp, %pp, %o`): the intended register
keeps its old value and an input is lost. Its draws, too, are its own.

The first test binary named by --tests (default: ptx_fuzz's 40 random cases,
a few seconds a run) screens every edit; an edit it passes is run again under
the others (default: ptx_kernels), and survives only if all of them pass it.
"""
import argparse
import functools
import glob
import os
import re
import subprocess
import sys
import tempfile
import threading

import mutation_draw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "kernels", "lra.ptx")

SWAPS = [
    ("add", "sub"), ("sub", "add"), ("min", "max"), ("max", "min"),
    ("and", "or"), ("or", "and"), ("shl", "shr"), ("shr", "shl"),
]
COMPARISONS = {".lt": ".le", ".le": ".lt", ".gt": ".ge", ".ge": ".gt",
               ".eq": ".ne", ".ne": ".eq", ".ltu": ".leu", ".geu": ".gtu"}


def instruction_lines(lines):
    """Indices of the lines that hold one instruction of the kernel body."""
    out = []
    in_body = False
    for i, line in enumerate(lines):
        s = line.strip()
        if s == "{":
            in_body = True
            continue
        if not in_body or not s or s.startswith("//") or s.endswith(":"):
            continue
        if s.startswith(".") or s == "}" or s.startswith("{") or s.startswith("}"):
            continue
        out.append(i)
    return out


def split_instruction(line):
    """(indent, guard or "", opcode, the rest of the code, "//" or "",
    comment) of one instruction line, or None."""
    code, sep, comment = line.partition("//")
    m = re.match(r"^(\s*)(@!?%\w+\s+)?([\w.]+)(.*)$", code)
    if not m:
        return None
    indent, guard, opcode, rest = m.groups()
    return indent, guard or "", opcode, rest, sep, comment


def mutations(line):
    """(what, new line) for each edit of one instruction line."""
    parts = split_instruction(line)
    if parts is None:
        return []
    indent, guard, opcode, rest, sep, comment = parts
    head = opcode.split(".")[0]
    out = [("delete", None)]
    for a, b in SWAPS:
        if head == a:
            out.append((f"{a}->{b}", indent + guard + b + opcode[len(a):] + rest + sep + comment))
    if head in ("setp", "set", "slct"):
        for part in opcode.split(".")[1:]:
            key = "." + part
            if key in COMPARISONS:
                new = opcode.replace(key, COMPARISONS[key], 1)
                out.append((f"{key}->{COMPARISONS[key]}", indent + guard + new + rest + sep + comment))
                break
    if guard:
        flipped = guard.replace("@!", "@", 1) if guard.startswith("@!") else guard.replace("@", "@!", 1)
        out.append(("negate guard", indent + flipped + opcode + rest + sep + comment))
    if head == "sub" and not opcode.endswith(".cc"):
        ops = [o.strip() for o in rest.rstrip().rstrip(";").split(",")]
        if len(ops) == 3 and ops[1] != ops[2]:
            out.append(("swap operands", f"{indent}{guard}{opcode} {ops[0]}, {ops[2]}, {ops[1]};{sep}{comment}"))
    # integer immediates (not hex floats, not register names, not addresses' offsets only)
    for im in re.finditer(r"(?<![\w%.+])(-?\d+)(?![\w.])", rest):
        n = int(im.group(1))
        new_rest = rest[:im.start()] + str(n + 1) + rest[im.end():]
        out.append((f"immediate {n}->{n + 1}", indent + guard + opcode + new_rest + sep + comment))
    return out


# --operands (see the docstring): the instructions whose sources may be
# taken for one another, and each lane register's neighbour.
ARITHMETIC = {"add", "sub", "mul", "mad", "fma", "div", "rem", "min", "max", "and", "or", "xor",
              "shl", "shr", "selp", "setp", "slct"}
LANE_FAMILIES = [[f"%{f}{k}" for k in range(4)] for f in ("th", "g", "a", "ht", "hg")]
LANE_FAMILIES += [["%b0", "%bb1", "%bb2", "%bb3"], [f"%v{k}" for k in range(16)]]
LANE_NEXT = {f[k]: f[(k + 1) % len(f)] for f in LANE_FAMILIES for k in range(len(f))}


def register_widths(lines):
    """Register name -> bits (1 for a predicate), from the `.reg` lines."""
    bits = {"pred": 1, "b16": 16, "b32": 32, "f32": 32, "u32": 32, "s32": 32, "b64": 64,
            "f64": 64, "u64": 64, "s64": 64}
    out = {}
    for line in lines:
        m = re.match(r"\s*\.reg\s+\.(\w+)\s+(.*);", line)
        if not m:
            continue
        for name in (n.strip() for n in m.group(2).split(",")):
            r = re.match(r"(%\w+)<(\d+)>$", name)
            names = [f"{r.group(1)}{k}" for k in range(int(r.group(2)))] if r else [name]
            for n in names:
                out[n] = bits[m.group(1)]
    return out


def split_operands(text):
    """Top-level comma-separated operands (braces and brackets kept whole)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "{["
        depth -= ch in "}]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def operand_mutations(line, widths, destinations=False):
    """(what, new line) for each operand edit of one instruction line: a
    source register of an arithmetic instruction replaced by another of its
    sources of the same width, and a lane register (th0-3, g0-3, a0-3,
    b0/bb1-3, ht0-3, hg0-3, v0-15) taken for its family's next, anywhere.
    With `destinations`, instead: its destination replaced by each distinct
    source of the same width."""
    parts = split_instruction(line)
    if parts is None or not parts[3].strip().endswith(";") or not parts[3][:1].isspace():
        return []
    indent, guard, opcode, rest, sep, comment = parts
    rest = rest.strip()[:-1]  # the operands
    tail = f"; {sep}{comment}" if sep else ";"
    out = []
    ops = split_operands(rest)
    if opcode.split(".")[0] not in ARITHMETIC or len(ops) < 3:
        ops = []
    if destinations:
        for b in dict.fromkeys(ops[1:]):
            if b != ops[0] and ops[0] in widths and b in widths and widths[b] == widths[ops[0]]:
                out.append((f"destination {ops[0]}->{b}",
                            f"{indent}{guard}{opcode} {', '.join([b] + ops[1:])}{tail}"))
        return out
    if ops:
        for i in range(1, len(ops)):
            for j in range(1, len(ops)):
                a, b = ops[i], ops[j]
                if a == b or a not in widths or b not in widths or widths[a] != widths[b]:
                    continue
                new = ops[:i] + [b] + ops[i + 1:]
                out.append((f"operand {i + 1} {a}->{b}",
                            f"{indent}{guard}{opcode} {', '.join(new)}{tail}"))
    for r in re.finditer(r"%\w+", rest):
        if r.group(0) in LANE_NEXT and r.group(0) in widths:
            new_rest = rest[:r.start()] + LANE_NEXT[r.group(0)] + rest[r.end():]
            out.append((f"lane {r.group(0)}->{LANE_NEXT[r.group(0)]} at {r.start() + 1}",
                        f"{indent}{guard}{opcode} {new_rest}{tail}"))
    return out


def find_binary(name):
    hits = sorted(glob.glob(os.path.join(ROOT, "target", "checked", "deps", f"{name}-*")),
                  key=os.path.getmtime)
    hits = [h for h in hits if os.access(h, os.X_OK) and not h.endswith(".d")]
    if not hits:
        sys.exit(f"no prebuilt {name} test binary: run `cargo test --profile checked --test {name} --no-run`")
    return hits[-1]


def run(binary, path, timeout):
    """How one test binary takes one edited kernel; stops it at its first
    failure (the tests run with --nocapture, so a failure shows at once)."""
    env = dict(os.environ, LRA_PTX_KERNEL=path)
    p = subprocess.Popen([binary, "--nocapture", "--test-threads", "2"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    outcome = None
    try:
        for line in p.stdout:
            if "does not load" in line:
                outcome = "load refused"
            elif "panicked at" in line or line.startswith("FAILED "):
                outcome = outcome or "failed"
            if outcome:
                p.kill()
                break
        p.wait()
    finally:
        hung = not timer.is_alive() and outcome is None and p.returncode != 0
        timer.cancel()
    if outcome:
        return outcome
    if hung:
        return "hang"
    return "passed" if p.returncode == 0 else "failed"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mutation_draw.add_arguments(ap, timeout=300)
    ap.add_argument("--tests", default="ptx_fuzz,ptx_kernels",
                    help="test binaries: the first screens, the rest confirm survivors")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--operands", action="store_true",
                      help="the operand edits instead (a source register replaced by another "
                           "source of its instruction, a lane register by its neighbour)")
    kind.add_argument("--destinations", action="store_true",
                      help="the destination edits instead (an arithmetic result written over "
                           "one of its sources of the same width)")
    ap.add_argument("--list", action="store_true", help="print the edits and stop")
    args = ap.parse_args()

    lines = open(KERNEL).read().split("\n")

    def label(site):
        i, what, _ = site
        return f"line {i + 1} ({what}): {lines[i].strip()}"

    if args.operands or args.destinations:
        edit = functools.partial(operand_mutations, widths=register_widths(lines),
                                 destinations=args.destinations)
    else:
        edit = mutations
    sites = [(i, what, new) for i in instruction_lines(lines) for what, new in edit(lines[i])]
    sites = mutation_draw.draw(sites, label, args, "kernels/lra.ptx")
    if args.list:
        for site in sites:
            print(label(site), "=>", site[2].strip() if site[2] else "(deleted)")
        return
    binaries = [find_binary(t) for t in args.tests.split(",")]
    print(f"{len(sites)} edits of kernels/lra.ptx, screened by {args.tests}", flush=True)

    tally = mutation_draw.Tally(len(sites))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mutant.ptx")
        for i, what, new in sites:
            edited = lines[:i] + ([] if new is None else [new]) + lines[i + 1:]
            with open(path, "w") as f:
                f.write("\n".join(edited))
            outcome = "passed"
            for b in binaries:
                outcome = run(b, path, args.timeout)
                if outcome != "passed":
                    break
            tally.add(outcome, label((i, what, new)), outcome == "passed")
    caught = sum(v for k, v in tally.counts.items() if k != "passed")
    print(f"\n{len(sites)} edits: {tally.counts}; caught {caught} ({100.0 * caught / max(1, len(sites)):.1f}%)")
    tally.print_survivors()

if __name__ == "__main__":
    main()
