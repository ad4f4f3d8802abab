"""What scripts/ptx-mutants.py, py-mutants.py and binding-mutants.py share:
the command-line options that choose the edits to run, the draw itself, and
the tally a run prints.

An edit is named by its label, `line L (kind): source`, the text a run
prints after `SURVIVED`; --recheck finds a log's survivors again by it.
"""
import random
import re
import sys
import time


def add_arguments(ap, timeout):
    """--sample, --seed, --skip, --timeout (default `timeout` s), --recheck."""
    ap.add_argument("--sample", type=int, default=200, help="edits to try (0: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first SKIP edits of the seed's draw (those an earlier "
                         "run with the same seed took), so runs continue one another")
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per test run")
    ap.add_argument("--recheck", metavar="LOG",
                    help="run again only the edits a previous run's output LOG lists as survivors")


def draw(sites, label, args, what):
    """The edits to run, of `sites` (every edit of `what`, in a fixed order):
    with --recheck the survivors its log names (`label(site)`), in that
    order; else the seed's shuffle, less the first --skip, --sample long."""
    if args.recheck:
        wanted = set()
        for line in open(args.recheck):
            m = re.match(r"\s*SURVIVED (line .*)$", line.rstrip("\n"))
            if m:
                wanted.add(m.group(1))
        todo = [s for s in sites if label(s) in wanted]
        if len(todo) != len(wanted):
            sys.exit(f"{len(wanted) - len(todo)} survivors of {args.recheck} no longer match {what}")
        return todo
    todo = list(sites)
    random.Random(args.seed).shuffle(todo)
    todo = todo[args.skip:]
    return todo[:args.sample] if args.sample else todo


class Tally:
    """Counts a run's outcomes and prints what every sweep prints: a
    `SURVIVED <label>` line per survivor, the counts every `every` edits,
    and the survivors again at the end."""

    def __init__(self, total, every=20):
        self.total, self.every = total, every
        self.counts = {}
        self.survivors = []
        self.start = time.time()

    def add(self, outcome, where, survived):
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if survived:
            self.survivors.append(where)
            print(f"SURVIVED {where}", flush=True)
        done = sum(self.counts.values())
        if done % self.every == 0:
            print(f"  {done}/{self.total} in {time.time() - self.start:.0f} s: {self.counts}", flush=True)

    def print_survivors(self):
        print(f"{len(self.survivors)} survivors:")
        for s in self.survivors:
            print(f"  {s}")
