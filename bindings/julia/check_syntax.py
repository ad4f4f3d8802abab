#!/usr/bin/env python3
"""Syntax check of the never-run Julia binding with tree-sitter-julia.

Julia cannot be installed where the binding is developed; this catches what
check_abi.py cannot: a file that does not parse (an unbalanced `end`, a
stray token). Exit 0: every file parses; 1: an ERROR or MISSING node;
2: tree_sitter / tree_sitter_julia not installed (the caller skips loudly).
"""
import os
import sys

from check_ccalls import HERE, OTHER_FILES, SOURCE, parser_or_say_why, walk

FILES = [SOURCE] + OTHER_FILES


def main():
    parser = parser_or_say_why("check_syntax")
    if parser is None:
        return 2
    bad = 0
    for rel in FILES:
        src = open(os.path.join(HERE, rel), "rb").read()
        for n in walk(parser.parse(src).root_node):
            if n.type == "ERROR" or n.is_missing:
                bad += 1
                line, col = n.start_point
                print(f"bindings/julia/{rel}:{line + 1}:{col + 1}: syntax error near "
                      f"{src[n.start_byte:n.end_byte][:60]!r}", file=sys.stderr)
    if bad == 0:
        print(f"check_syntax: {len(FILES)} Julia files parse")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
