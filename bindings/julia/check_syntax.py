#!/usr/bin/env python3
"""Syntax check of the never-run Julia binding with tree-sitter-julia.

Julia cannot be installed where the binding is developed; this catches what
check_abi.py cannot: a file that does not parse (an unbalanced `end`, a
stray token). Exit 0: every file parses; 1: an ERROR or MISSING node;
2: tree_sitter / tree_sitter_julia not installed (the caller skips loudly).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["src/LRA.jl", "ext/LRACUDAExt.jl", "test/runtests.jl"]


def main():
    try:
        import tree_sitter
        import tree_sitter_julia
    except ImportError as e:
        print(f"check_syntax: {e}", file=sys.stderr)
        return 2
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_julia.language()))
    bad = 0
    for rel in FILES:
        src = open(os.path.join(HERE, rel), "rb").read()
        stack = [parser.parse(src).root_node]
        while stack:
            n = stack.pop()
            if n.type == "ERROR" or n.is_missing:
                bad += 1
                line, col = n.start_point
                print(f"bindings/julia/{rel}:{line + 1}:{col + 1}: syntax error near "
                      f"{src[n.start_byte:n.end_byte][:60]!r}", file=sys.stderr)
            stack.extend(n.children)
    if bad == 0:
        print(f"check_syntax: {len(FILES)} Julia files parse")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
