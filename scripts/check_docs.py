#!/usr/bin/env python3
"""Stale references in the Markdown documentation (README.md, docs/*.md,
kernels/README.md, bindings/*/README.md, data/README.md).

Each problem is printed as FILE:LINE: [kind] message. Checked:
  [path]   repository paths in code spans, links and the commands of ```sh
           and indented blocks (their shell comments left out) must exist.
           A path is a token with a '/' whose first part is an entry of the
           repository's top level or of the Markdown file's directory
           (`src/LRA.jl` in bindings/julia/README.md); links are resolved
           from the file's directory, other paths from either. `:LINE`,
           `::item` and `#anchor` are cut off; a glob (`*`, `{a,b}`) must
           match. In code spans, a bare file name with a source extension
           (`fake-cuda.sh`, `lra.hpp`) must exist somewhere in the tree.
           `../shared/...` is checked in the sibling directory ../shared
           (--shared DIR), or skipped with a note when it is not there (as
           are bare names of files the docs place there: `ALGORITHM.md`).
           Not the repository's, so not checked: paths under a top-level
           name that .gitignore ignores (target/, build/: made at run
           time), absolute, `$VAR/`, `~/`, `./` and `PREFIX/` paths, the
           install layout (the literal destinations of scripts/install.sh's
           `put` lines: `include/lra.f90`), and ALLOWED_MISSING below;
  [anchor] a link's `#anchor` must be a heading of its Markdown file
           (GitHub's slugs; -1, -2 for repeated headings);
  [name]   a code span's snake_case identifier of 4 or more words (a test
           or function name; also in ```sh commands) and every `lra_*` name
           must occur in the code of the sources (.rs .py .sh .c .cpp .hpp
           .h .f90 .jl .ptx, shell scripts without extension, CMake files);
           `name*` is a prefix; `**name` (a keyword-argument placeholder)
           and file names (`lra_nccl_stub_test.c`) are not names;
  [env]    every upper-case name anywhere in the text whose prefix is one
           the code reads environment variables with (env::var, a function
           with `env` in its name given a string, os.environ, getenv, $VAR
           in shell: today LRA_, FAKE_, FC_, LD_, NCCL_, OMP_, PKG_) must
           occur in the code: a variable read or set there, or a constant
           defined there (LRA_OK). EXTERNAL_PREFIXES (other tools') are not
           checked;
  [cargo]  `--example X`, `--bench X`, `--test X`, `-p X`/`--package X` of a
           `cargo` command (in a code span or a ```sh/indented line,
           backslash continuations joined) must be a target of the package
           named by -p, else of the root package (any member with
           --workspace); a span holding only options (`--test loader`) may
           name any member's;
  [count]  in a paragraph about tests/cuda.rs or the fake driver, "N of its
           M tests", "N of the M (GPU) tests", "N of its M on the fake
           driver": M must be tests/cuda.rs's number of #[test] and N that
           less the tests scripts/stages/fake-cuda.sh expects to skip; and
           "`... --test X` (N tests" needs N = the #[test]s of X.
"Occurs in the code" is a whole-word match on a line that is not a comment
(//, /* */, #, Fortran's !) nor in a Python docstring; a trailing comment
or a string literal counts, so a name left only in a message still passes.

Not checked: paths in prose without backticks, in comments of ```sh blocks
(the install layout is written there) and in other fenced blocks (C, output);
whether a sentence about a file, test or variable is still true; shorter
or CamelCase identifiers (`chunk_table`, `FuzzSeeds`); other numbers.

    python3 scripts/check_docs.py [--self-test] [--shared DIR]

--self-test also injects stale references of each kind into an in-memory
copy of README.md and requires each to be reported at its line.
Exit 0: no problem; 1: a problem (or a missed self-test mutation).
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT)
DOC_GLOBS = ["README.md", "docs/*.md", "kernels/README.md", "bindings/*/README.md", "data/README.md"]

# Paths that are not in the tree although the docs are right to name them.
# path -> (file that creates it, a string of that file that shows it does).
ALLOWED_MISSING = {
    # `cargo run --example sweep -- --data mnist` writes it (needs the MNIST
    # files of ../shared/data); only the digits figure is committed.
    "docs/sweep-mnist.svg": ("examples/sweep.rs", 'format!("sweep-{}.svg", o.data)'),
}
# Prefixes of environment variables the code reads that belong to other
# tools, which document them: names with them in the docs are theirs.
EXTERNAL_PREFIXES = {
    "CARGO_",  # Cargo's (CARGO_TARGET_DIR read here; CARGO_PROFILE_* set for cargo-mutants)
    "PYTORCH_",  # PyTorch's allocator settings, read by scripts/gpu_check.py
    "OUT_",  # OUT_DIR, set by Cargo for build.rs
}

SOURCE_EXTS = {".rs", ".py", ".sh", ".c", ".cpp", ".hpp", ".h", ".f90", ".jl", ".ptx"}
# Bare file names (no '/') with these extensions must exist in the tree.
# (.c and .h are left out: `cuda.h`, `mpi.h`, a reader's `trainer.c`.)
BARE_EXTS = {".rs", ".py", ".sh", ".jl", ".f90", ".ptx", ".hpp", ".md"}

SNAKE = re.compile(r"(?<![\w./*-])(?:\*\*)?([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(\*)?(?![\w/-])(?!\.\w)")
UPPER = re.compile(r"(?<!\w)([A-Z][A-Z0-9]*_[A-Z0-9_]*)(\*)?(?!\w)")
CARGO_OPT = re.compile(r"^(--example|--bench|--test|-p|--package)(?:=(.*))?$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
SHELLISH = {"sh", "bash", "shell", "console", "zsh"}


def rel(path):
    return os.path.relpath(path, ROOT)


# ---- the repository ----------------------------------------------------------


def comment_free_lines(path, text):
    """The lines of a source file that are code (not comment or docstring)."""
    ext = os.path.splitext(path)[1]
    out = []
    if ext in (".rs", ".c", ".cpp", ".hpp", ".h", ".ptx"):
        in_block = False
        for line in text.splitlines():
            s = line.strip()
            if in_block:
                if "*/" in s:
                    in_block = False
                    out.append(s.split("*/", 1)[1])
                continue
            if s.startswith("//"):
                continue
            if s.startswith("/*"):
                if "*/" in s:
                    out.append(s.split("*/", 1)[1])
                else:
                    in_block = True
                continue
            out.append(line)
    elif ext == ".f90":
        out = [l for l in text.splitlines() if not l.strip().startswith("!")]
    elif ext == ".py":
        mode = None  # inside a triple-quoted string: "doc" (skipped) or "data" (code)
        for line in text.splitlines():
            s = line.strip()
            odd = (s.count('"""') + s.count("'''")) % 2
            if mode:
                if mode == "data":
                    out.append(line)
                if odd:
                    mode = None
                continue
            if re.match(r"^[rRbBuU]?(\"\"\"|''')", s):  # a docstring
                mode = "doc" if odd else None
                continue
            if odd:
                mode = "data"
            if not s.startswith("#"):
                out.append(line)
    else:  # shell, Julia, CMake
        out = [l for l in text.splitlines() if not l.strip().startswith("#")]
    return out


class Repo:
    def __init__(self, root, shared):
        self.root = root
        self.shared = shared if shared and os.path.isdir(shared) else None
        self.ignored_top = self._ignored_top()
        self.shared_basenames = set()
        if self.shared:
            for _, _, names in os.walk(self.shared):
                self.shared_basenames.update(names)
        self.files = self._files()
        self.basenames = {os.path.basename(f) for f in self.files}
        self.top = {e for e in os.listdir(root) if e != ".git" and e not in self.ignored_top}
        self.tokens = set()
        self.env_prefixes = set()
        for f in self.files:
            base = os.path.basename(f)
            ext = os.path.splitext(f)[1]
            cmake = base == "CMakeLists.txt" or base.endswith((".cmake", ".cmake.in"))
            if f == SELF or not (ext in SOURCE_EXTS or cmake or self._is_script(f)):
                continue
            try:
                with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
            except OSError:
                continue
            code = comment_free_lines(f if ext or cmake else f + ".sh", text)
            joined = "\n".join(code)
            self.tokens.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", joined))
            for name in self._env_reads(joined, shell=ext == ".sh" or (not ext and not cmake)):
                if "_" in name:
                    self.env_prefixes.add(name.split("_", 1)[0] + "_")
        self.env_prefixes -= EXTERNAL_PREFIXES
        self.installed = self._installed()
        self.packages = self._packages()
        self.cuda_tests = self.count_tests("tests/cuda.rs")
        self.fake_skips = self._fake_skips()

    def _line_matches(self, path, pattern):
        """Group 1 of `pattern` on each line of the repository's `path`
        that it matches (none when the file cannot be read)."""
        found = set()
        try:
            with open(os.path.join(self.root, path)) as f:
                for line in f:
                    m = re.match(pattern, line)
                    if m:
                        found.add(m.group(1))
        except OSError:
            pass
        return found

    def _ignored_top(self):
        return self._line_matches(".gitignore", r"^/([^/*\s]+)/?\s*$")

    def _files(self):
        try:
            out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=self.root,
                                 capture_output=True, text=True, check=True).stdout
            return [f for f in out.splitlines() if os.path.isfile(os.path.join(self.root, f))]
        except (OSError, subprocess.CalledProcessError):
            found = []
            for d, dirs, names in os.walk(self.root):
                dirs[:] = [x for x in dirs if x != ".git" and not (d == self.root and x in self.ignored_top)]
                found += [rel(os.path.join(d, n)) for n in names]
            return found

    def _is_script(self, f):
        if os.path.splitext(f)[1]:
            return False
        try:
            with open(os.path.join(self.root, f), "rb") as fh:
                first = fh.readline()
        except OSError:
            return False
        return first.startswith(b"#!") and b"sh" in first

    @staticmethod
    def _env_reads(code, shell):
        names = set(re.findall(r'env::var(?:_os)?\(\s*"([A-Z][A-Z0-9_]*)"', code))
        names |= set(re.findall(r'\w*env\w*\(\s*"([A-Z][A-Z0-9_]*)"', code, re.I))
        names |= set(re.findall(r'environ(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]*)"', code))
        names |= set(re.findall(r'environ,\s*([A-Z][A-Z0-9_]*)=', code))
        names |= set(re.findall(r'getenv\(\s*"([A-Z][A-Z0-9_]*)"', code))
        if shell:
            names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", code))
        return names

    def _installed(self):
        return self._line_matches("scripts/install.sh", r"^\s*put\s+\d+\s+\S+\s+([^\s$\"']+)\s*$")

    def _packages(self):
        """{package name: {"dir", "test", "example", "bench"}} of the workspace."""
        def read(p):
            with open(os.path.join(self.root, p)) as f:
                return f.read()

        root_toml = read("Cargo.toml")
        m = re.search(r"^\[workspace\].*?^members\s*=\s*\[(.*?)\]", root_toml, re.S | re.M)
        dirs = re.findall(r'"([^"]+)"', m.group(1)) if m else ["."]
        if "." not in dirs and re.search(r"^\[package\]", root_toml, re.M):
            dirs.insert(0, ".")
        packages = {}
        for d in dirs:
            toml = read(os.path.join(d, "Cargo.toml"))
            pkg = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', toml, re.S | re.M)
            if not pkg:
                continue
            targets = {"dir": d, "root": d == "."}
            for kind, folder in (("test", "tests"), ("example", "examples"), ("bench", "benches")):
                names = set(re.findall(r'^\[\[' + kind + r'\]\][^\[]*?^name\s*=\s*"([^"]+)"', toml, re.S | re.M))
                base = os.path.join(self.root, d, folder)
                if os.path.isdir(base):
                    for e in os.listdir(base):
                        if e.endswith(".rs"):
                            names.add(e[:-3])
                        elif os.path.isfile(os.path.join(base, e, "main.rs")):
                            names.add(e)
                targets[kind] = names
            packages[pkg.group(1)] = targets
        return packages

    def count_tests(self, path):
        try:
            with open(os.path.join(self.root, path)) as f:
                return sum(1 for l in f if l.strip() == "#[test]")
        except OSError:
            return None

    def _fake_skips(self):
        """The tests scripts/stages/fake-cuda.sh expects to skip, or None."""
        try:
            with open(os.path.join(self.root, "scripts/stages/fake-cuda.sh")) as f:
                text = f.read()
        except OSError:
            return None
        a = re.search(r'^expect_skipped="([^"]*)"', text, re.M)
        b = re.search(r"^expect_fake_skipped=\$'([^']*)'", text, re.M)
        if not (a and b):
            return None
        return a.group(1).split() + b.group(1).replace("\\n", " ").split()

    def has_name(self, name, prefix=False):
        if prefix:
            return any(t.startswith(name) for t in self.tokens)
        return name in self.tokens


# ---- Markdown ----------------------------------------------------------------


def slug(heading):
    s = re.sub(r"`", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


class Doc:
    """A Markdown file split into fenced blocks, indented blocks and paragraphs."""

    def __init__(self, name, text):
        self.name = name
        self.dir = os.path.dirname(name)
        self.lines = text.splitlines()
        self.code_blocks = []  # (language, [(line number, text)])
        self.paragraphs = []  # [(line number, text)]
        fence = None
        para = []
        for i, line in enumerate(self.lines, 1):
            m = FENCE.match(line)
            if fence is not None:
                if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2):
                    fence = None
                else:
                    self.code_blocks[-1][1].append((i, line))
                continue
            if m:
                self._end(para)
                para = []
                fence = m.group(1)
                self.code_blocks.append((m.group(2).lower(), []))
                continue
            if not line.strip():
                self._end(para)
                para = []
            else:
                para.append((i, line))
        self._end(para)
        self.anchors = set()
        seen = {}
        for para in self.paragraphs:
            for _, l in para:
                h = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", l)
                if h:
                    base = slug(h.group(2))
                    n = seen.get(base, 0)
                    self.anchors.add(base if n == 0 else f"{base}-{n}")
                    seen[base] = n + 1

    def _end(self, para):
        if not para:
            return
        if all(re.match(r"^( {4,}|\t)", l) for _, l in para) and not re.match(r"^\s*([-*+]|\d+\.)\s", para[0][1]):
            self.code_blocks.append(("indented", para))
        else:
            self.paragraphs.append(para)

    @staticmethod
    def joined(para):
        """The paragraph as one string, and the line of each character offset."""
        text, starts = "", []
        for i, l in para:
            starts.append((len(text), i))
            text += l + "\n"
        return text, starts

    @staticmethod
    def line_at(starts, offset):
        line = starts[0][1]
        for off, i in starts:
            if off > offset:
                break
            line = i
        return line

    def spans(self):
        """(line, content, text after it) of every code span; a span over
        several lines is given once per line it covers, with its whole
        content and the line each part of it is on ([(offset, line)])."""
        for para in self.paragraphs:
            text, starts = self.joined(para)
            for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.S):
                after = text[m.end():m.end() + 40]
                at = self.line_at(starts, m.start(2))
                raw = m.group(2)
                lines, flat, pos = [], "", 0
                for k, part in enumerate(raw.split("\n")):
                    lines.append((len(flat), at + k))
                    flat += part + " "
                yield flat[:-1], lines, after

    def prose(self):
        """(paragraph text, the same with code spans blanked, line starts)."""
        for para in self.paragraphs:
            text, starts = self.joined(para)
            blank = re.sub(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", lambda m: " " * len(m.group(0)), text,
                           flags=re.S)
            yield text, blank, starts

    def commands(self):
        """(line, command) of every logical line of shell-like code blocks."""
        for lang, lines in self.code_blocks:
            if lang not in SHELLISH and lang != "indented":
                continue
            cur, start = "", None
            for i, l in lines:
                if start is None:
                    start = i
                s = l.rstrip()
                if s.endswith("\\"):
                    cur += s[:-1] + " "
                    continue
                yield start, cur + s
                cur, start = "", None
            if cur:
                yield start, cur


# ---- the checks ----------------------------------------------------------------


class Checker:
    def __init__(self, repo):
        self.repo = repo
        self.notes = set()
        self.docs = {}
        # Names of the files the docs name as `../shared/...` (bare, they
        # are skipped with a note when ../shared is not there).
        self.shared_mentions = set()
        for name in doc_names(repo.root):
            for m in re.finditer(r"\.\./shared/([\w./-]+)", "\n".join(self.doc(name).lines)):
                self.shared_mentions.add(os.path.basename(m.group(1).rstrip(".")))

    def doc(self, name, text=None):
        if text is None:
            if name not in self.docs:
                with open(os.path.join(self.repo.root, name), encoding="utf-8") as f:
                    self.docs[name] = Doc(name, f.read())
            return self.docs[name]
        return Doc(name, text)

    # -- paths
    def path_problem(self, doc, raw, link=False):
        """None if `raw` is fine or not a repository path, else the problem."""
        p = raw.strip("\"'").lstrip("(<").rstrip("),;:>.")
        if p.startswith("./"):
            return None  # a program of the current directory (`./mpi_data_parallel`)
        if link:
            p = p.split("#", 1)[0]
            if not p or re.match(r"^[a-z][a-z0-9+.-]*:", p):
                return None
        p = re.sub(r"::.*$", "", p)
        p = re.sub(r"#.*$", "", p)
        p = re.sub(r":\d+(?::\d+)?(?:-\d+)?$", "", p)
        if not p or p.startswith(("/", "$", "~", "<", "-")) or "=" in p:
            return None
        if "/" not in p:
            if link:
                return self._exists(doc, p, link)
            ext = os.path.splitext(p)[1]
            if ext in BARE_EXTS and re.match(r"^[\w.-]+$", p):
                if p in self.repo.basenames or os.path.exists(os.path.join(self.repo.root, doc.dir, p)):
                    return None
                if p in self.repo.shared_basenames:
                    return None
                if not self.repo.shared and p in self.shared_mentions:
                    self.notes.add(f"../shared is not here: `{p}` (a file of it) was not looked for")
                    return None
                return f"no file named `{p}` in the repository" + (" or ../shared" if self.repo.shared else "")
            return None
        first = p.split("/", 1)[0]
        if first == "..":
            return self._shared(doc, p, link)
        if not link and first not in self.repo.top and not os.path.exists(
                os.path.join(self.repo.root, doc.dir, first)):
            return None
        if first in self.repo.ignored_top:
            return None
        return self._exists(doc, p, link)

    def _exists(self, doc, p, link):
        here = os.path.normpath(os.path.join(doc.dir, p))
        bases = [here] if link else [os.path.normpath(p), here]
        for b in bases:
            if b in self.repo.installed and not link:
                return None
            if b in ALLOWED_MISSING:
                return None
            if self._matches(os.path.join(self.repo.root, b)):
                return None
        if link or not doc.dir:
            return f"`{p}` does not exist"
        return f"`{p}` does not exist (from the top nor from {doc.dir}/)"

    @staticmethod
    def _matches(full):
        alts = [full]
        m = re.search(r"\{([^{}]*)\}", full)
        if m:
            alts = [full[:m.start()] + a + full[m.end():] for a in m.group(1).split(",")]
            return all(Checker._matches(a) for a in alts)
        if any(c in full for c in "*?["):
            return bool(glob.glob(full))
        return os.path.exists(full)

    def _shared(self, doc, p, link):
        target = os.path.normpath(os.path.join(self.repo.root, doc.dir if link else "", p))
        shared_root = os.path.normpath(os.path.join(self.repo.root, "..", "shared"))
        if target == shared_root or target.startswith(shared_root + os.sep):
            if not self.repo.shared:
                self.notes.add(f"../shared is not here ({shared_root}): its paths were not checked")
                return None
            sub = os.path.relpath(target, shared_root)
            return None if self._matches(os.path.join(self.repo.shared, sub)) else \
                f"`{p}` does not exist (../shared is {self.repo.shared})"
        if not target.startswith(os.path.normpath(self.repo.root) + os.sep):
            return f"`{p}` leads out of the repository"
        return None if self._matches(target) else f"`{p}` does not exist"

    # -- one document
    def check(self, doc):
        problems = []
        add = lambda line, kind, msg: problems.append(f"{doc.name}:{line}: [{kind}] {msg}")
        for content, lines, after in doc.spans():
            line_of = lambda offset: Doc.line_at(lines, offset)
            for m in re.finditer(r"\S+", content):
                tok = m.group(0)
                if "=" in tok:
                    tok = tok.split("=", 1)[1]  # VAR=path, --option=path
                why = self.path_problem(doc, tok)
                if why:
                    add(line_of(m.start()), "path", why)
            for m in SNAKE.finditer(content):
                name, star = m.group(1), m.group(2)
                if m.group(0).startswith("**"):
                    continue
                if (name.startswith("lra_") or name.count("_") >= 3) and not self.repo.has_name(name, bool(star)):
                    add(line_of(m.start(1)), "name", f"`{name}{star or ''}` occurs in no source file's code")
            self.cargo(content, line_of, add, fragment=content.startswith("-"))
            m = re.match(r"^\s*\((\d+) tests\b", after)
            targets = re.findall(r"--test\s+(\w+)", content)
            if m and len(targets) == 1:
                self.count_of_target(content, targets[0], int(m.group(1)), lines[-1][1], add)
        for line, cmd in doc.commands():
            self.cargo(cmd, lambda offset: line, add, fragment=False)
            for tok in re.sub(r"(^|\s)#.*$", "", cmd).split():  # without its shell comment
                tok = tok.split("=", 1)[1] if "=" in tok else tok
                why = "/" in tok and self.path_problem(doc, tok)  # bare names: a reader's `app.f90`
                if why:
                    add(line, "path", why)
            for m in SNAKE.finditer(cmd):
                name = m.group(1)
                if name.count("_") >= 3 and not self.repo.has_name(name):
                    add(line, "name", f"`{name}` occurs in no source file's code")
        for text, blank, starts in doc.prose():
            for m in LINK.finditer(blank):
                line = Doc.line_at(starts, m.start())
                target = m.group(1)
                why = self.path_problem(doc, target, link=True)
                if why:
                    add(line, "path", "link " + why)
                elif "#" in target:
                    self.anchor(doc, target, line, add)
            self.counts(text, starts, add)
        for i, l in enumerate(doc.lines, 1):
            for m in UPPER.finditer(l):
                name, star = m.group(1), m.group(2)
                prefix = next((p for p in self.repo.env_prefixes if name.startswith(p)), None)
                if prefix and not self.repo.has_name(name, bool(star) or name.endswith("_")):
                    add(i, "env", f"`{name}{star or ''}` ({prefix}*) is read, set or defined nowhere in the code")
        return problems

    def anchor(self, doc, target, line, add):
        path, frag = target.split("#", 1)
        name = os.path.normpath(os.path.join(doc.dir, path)) if path else doc.name
        if not name.endswith(".md"):
            return
        try:
            anchors = doc.anchors if name == doc.name else self.doc(name).anchors
        except OSError:
            return
        if frag not in anchors:
            add(line, "anchor", f"`#{frag}` is no heading of {name}")

    def cargo(self, cmd, line_of, add, fragment):
        """Cargo's target options in each `cargo` command of `cmd` (or in
        `cmd` itself, a fragment of one)."""
        toks = [(m.group(0), m.start()) for m in re.finditer(r"[^\s;|&]+|&&|\|\||[;|]", cmd)]
        segment = []
        for tok in toks + [(";", len(cmd))]:
            if tok[0] in ("&&", "||", ";", "|"):
                words = [t for t, _ in segment]
                if "cargo" in words:
                    self.cargo_command(segment[words.index("cargo") + 1:], line_of, add, False)
                elif fragment:
                    self.cargo_command(segment, line_of, add, True)
                segment = []
            else:
                segment.append(tok)

    def cargo_command(self, toks, line_of, add, fragment):
        opts = []
        for k, (t, at) in enumerate(toks):
            m = CARGO_OPT.match(t)
            if m:
                val = m.group(2) if m.group(2) is not None else (toks[k + 1][0] if k + 1 < len(toks) else "")
                opts.append((m.group(1), val.strip("\"'`,;)"), line_of(at)))
        pkgs = self.repo.packages
        chosen = [(v, line) for o, v, line in opts if o in ("-p", "--package")]
        for p, line in chosen:
            if p not in pkgs:
                add(line, "cargo", f"`-p {p}`: no such workspace package ({', '.join(sorted(pkgs))})")
        if fragment or "--workspace" in [t for t, _ in toks]:
            scope = list(pkgs.values())
        elif chosen:
            scope = [pkgs[p] for p, _ in chosen if p in pkgs]
            if not scope:
                return
        else:
            scope = [t for t in pkgs.values() if t["root"]]
        for o, v, line in opts:
            if o in ("-p", "--package"):
                continue
            kind = o[2:]
            if not any(v in t[kind] for t in scope):
                where = "the workspace" if len(scope) > 1 else f"package {scope[0]['dir']}"
                add(line, "cargo", f"`{o} {v}`: no such {kind} target in {where}")

    def count_of_target(self, content, target, n, line, add):
        pkgs = self.repo.packages
        chosen = re.findall(r"(?:-p|--package)[ =]([\w-]+)", content)
        dirs = [pkgs[p]["dir"] for p in chosen if p in pkgs] or [t["dir"] for t in pkgs.values() if t["root"]]
        for d in dirs:
            path = os.path.normpath(os.path.join(d, "tests", target + ".rs"))
            have = self.repo.count_tests(path)
            if have is not None and have != n:
                add(line, "count", f"{n} tests, but {path} has {have} #[test] functions")

    COUNT = re.compile(r"\b(\d+) of (?:its|the) (\d+)\s+(?:GPU\s+)?(?:tests\b|on the fake driver\b)")

    def counts(self, text, starts, add):
        if not re.search(r"tests/cuda\.rs|fake-cuda|fake\s+driver", text):
            return
        for m in self.COUNT.finditer(text.replace("\n", " ")):
            line = Doc.line_at(starts, m.start())
            n, total = int(m.group(1)), int(m.group(2))
            want_total = self.repo.cuda_tests
            skips = self.repo.fake_skips
            if want_total is None or skips is None:
                add(line, "count", "cannot read tests/cuda.rs or the skip lists of scripts/stages/fake-cuda.sh")
                continue
            if (n, total) != (want_total - len(skips), want_total):
                add(line, "count", f"\"{m.group(0)}\": tests/cuda.rs has {want_total} tests and "
                                   f"scripts/stages/fake-cuda.sh runs {want_total - len(skips)} of them "
                                   f"(skips {len(skips)})")


def doc_names(root):
    names = []
    for g in DOC_GLOBS:
        names += sorted(rel(p) for p in glob.glob(os.path.join(root, g)))
    return names


def check_allowlist(repo, checker):
    problems = []
    texts = "\n".join("\n".join(checker.doc(n).lines) for n in doc_names(repo.root))
    for path, (maker, evidence) in ALLOWED_MISSING.items():
        if os.path.exists(os.path.join(repo.root, path)):
            problems.append(f"{SELF}: [allowlist] {path} exists now: drop it from ALLOWED_MISSING")
        if path not in texts:
            problems.append(f"{SELF}: [allowlist] {path} is no longer in the docs: drop it")
        try:
            with open(os.path.join(repo.root, maker)) as f:
                if evidence not in f.read():
                    problems.append(f"{SELF}: [allowlist] {maker} no longer has {evidence!r} ({path})")
        except OSError:
            problems.append(f"{SELF}: [allowlist] {maker} (which writes {path}) is gone")
    return problems


# ---- self-test -----------------------------------------------------------------

# What --self-test changes in README.md (old -> new, the first occurrence, or
# new text appended when old is None), and the kind that must be reported.
MUTATIONS = [
    ("missing path in a code span", "path", "`scripts/stages/fake-cuda.sh`", "`scripts/stages/fake_cuda.sh`"),
    ("missing link target", "path", "(docs/testing-without-a-gpu.md)", "(docs/testing-without-gpu.md)"),
    ("missing bare file name", "path", "`fake-cuda.sh`", "`fake_cuda.sh`"),
    ("missing path in a command", "path", "bindings/python/test_lra.py`", "bindings/python/tests.py`"),
    ("glob matching nothing", "path", None, "See `tests/nccl/stub/*.hpp`."),
    ("missing anchor", "anchor", "(#known-limits)", "(#known-limitations)"),
    ("renamed test", "name", "`the_kernel_jit_spills_nothing`", "`the_kernel_jit_spills_no_registers`"),
    ("renamed C function", "name", "`lra_should_reeval`", "`lra_should_reevaluate`"),
    ("unknown LRA_ variable", "env", "LRA_FUZZ_SEED=1", "LRA_FUZZ_SEEDS=1"),
    ("unknown FAKE_CUDA_ variable", "env", None, "Set `FAKE_CUDA_SLOW_MEMCPY=1`."),
    ("missing example", "cargo", "--example sweep", "--example sweeps"),
    ("missing bench", "cargo", "--bench kernel_cost", "--bench kernel_costs"),
    ("missing test target", "cargo", "--test ffi_fuzz", "--test ffi_fuzzer"),
    ("missing package", "cargo", "-p ptx-interp", "-p ptx_interp"),
    ("test target of another package", "cargo", None, "Run `cargo test --release --test spec_audit`."),
    ("stale fake-driver count", "count", "34 of its 37 tests", "25 of its 28 tests"),
    ("stale fake-driver count, other form", "count", "34 of its 37 on the fake driver", "34 of its 38 on the fake driver"),
    ("stale GPU test count", "count", "34 of the 37 GPU tests", "30 of the 33 GPU tests"),
    ("stale count of a test file", "count", None,
     "Run: `cargo test --release -p ptx-interp --test spec_audit` (33 tests, well under a second)."),
]


def self_test(checker, text):
    failures = []
    for what, kind, old, new in MUTATIONS:
        if old is None:
            mutated = text + "\n\n" + new + "\n"
            at = mutated.count("\n", 0, len(text) + 2) + 1
        elif old not in text:
            failures.append(f"self-test: cannot apply '{what}': {old!r} not in README.md")
            continue
        else:
            mutated = text.replace(old, new, 1)
            at = text.count("\n", 0, text.index(old)) + 1
        found = checker.check(checker.doc("README.md", mutated))
        if not any(p.startswith(f"README.md:{at}: [{kind}]") for p in found):
            failures.append(f"self-test: missed '{what}' (wanted README.md:{at}: [{kind}]; got {found})")
    if checker.repo.shared:
        old = "`../shared/ALGORITHM.md`"
        if old in text:
            found = checker.check(checker.doc("README.md", text.replace(old, "`../shared/ALGORITHMS.md`", 1)))
            if not any("[path]" in p and "ALGORITHMS" in p for p in found):
                failures.append(f"self-test: missed a missing ../shared path (got {found})")
        else:
            failures.append(f"self-test: {old} not in README.md")
    return failures


def main(argv):
    shared = os.path.join(os.path.dirname(ROOT), "shared")
    if "--shared" in argv:
        shared = os.path.abspath(argv[argv.index("--shared") + 1])
    repo = Repo(ROOT, shared)
    checker = Checker(repo)
    names = doc_names(ROOT)
    problems = []
    for name in names:
        problems += checker.check(checker.doc(name))
    problems += check_allowlist(repo, checker)
    notes = sorted(checker.notes)
    if "--self-test" in argv:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            problems += self_test(checker, f.read())
    for note in notes:
        print(f"check_docs: note: {note}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"check_docs: {len(names)} Markdown files: paths, anchors, test and C names, environment "
          f"variables ({', '.join(sorted(repo.env_prefixes))}), cargo targets and the fake-driver "
          "test counts match the tree"
          + (" (self-test: every injected stale reference caught)" if "--self-test" in argv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
