"""Docs that cannot lie: the manual builds strictly, every ``mnist-jax …`` command written in
README.md and docs/ parses with the CLI's own parser, every Python snippet of the README (and
of the manual's getting-started and own-model pages) runs, the README's links resolve, and
no comment or docstring of the package cites this project's issues.

The snippets run as written, on a small synthetic dataset: ``mnist_jax.load_dataset`` is
replaced by one returning the ``digits`` fixture (1,024 training and 256 test digits), so
the tutorial's 100 epochs take seconds. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mnist_jax
from mnist_jax import data as data_lib
from mnist_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Pages written to be read as code (fenced blocks) and in prose (inline `mnist-jax …`).
PAGES = [README] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
# Pages whose Python snippets are run (the README's, and the manual's tutorial pages).
SNIPPET_PAGES = [README, DOCS / "getting-started.md", DOCS / "own-model.md"]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
README_MAX_LINES = 250


# ---------------------------------------------------------------------------------------
# Reading the pages
# ---------------------------------------------------------------------------------------
def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, first line number, text)`` of each fenced code block of ``path``."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*(```+|~~~+)\s*\{?([\w-]*)\}?", line)
        if lang is None and fence:
            lang, start, body = fence.group(2).lower(), number + 1, []
        elif lang is not None and re.match(r"^\s*(```+|~~~+)\s*$", line):
            blocks.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def _program_args(words: list[str]) -> tuple[str, list[str]] | None:
    """("mnist-jax" | "bench.py", its arguments) for a command that runs one, else None."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "mnist-jax":
        return "mnist-jax", words[1:]
    if (Path(words[0]).name.startswith("python") and len(words) > 1
            and words[1].endswith("benchmarks/bench.py")):
        return "bench.py", words[2:]
    return None


def _is_synopsis(text: str) -> bool:
    """A usage line, not a command: placeholders (``[--json]``, ``A|B``, ``…``, ``NAME``),
    or prose naming a subcommand (```mnist-jax predict```), which must exist."""
    return bool(re.search(r"[\[\]…|]|\.\.\.|(^|\s)[A-Z][A-Z_]{2,}(\s|$)", text)
                or re.fullmatch(r"mnist-jax [a-z][\w-]*", text.strip()))


def synopses() -> list[tuple[str, int, str]]:
    """Every usage line of the pages (``mnist-jax train --recipe NAME``, the README's
    synopsis block): ``(page, line, text)``; their subcommands and flags must exist."""
    found = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for lang, start, text in fenced_blocks(page):
            if lang == "text":
                found += [(name, start + i, line.strip()) for i, line in
                          enumerate(text.splitlines()) if line.startswith("mnist-jax ")]
        for number, line in enumerate(page.read_text().splitlines(), 1):
            found += [(name, number, span) for span in re.findall(r"`(mnist-jax [^`]+)`", line)
                      if _is_synopsis(span)]
    return found


def commands() -> list[tuple[str, int, str, list[str]]]:
    """Every ``mnist-jax …`` (and ``python benchmarks/bench.py …``) command of the pages:
    ``(page, line, text, argv)``."""
    found = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for lang, start, text in fenced_blocks(page):
            if lang not in SHELL_LANGS:
                continue
            lines = text.replace("\\\n", " ").splitlines()  # continuation lines joined
            for offset, line in enumerate(lines):
                if line.lstrip().startswith("#") or "mnist-jax" not in line and "bench.py" not in line:
                    continue
                for words in _simple_commands(line.lstrip("$ ")):
                    hit = _program_args(words)
                    if hit:
                        found.append((name, start + offset, line.strip(), [hit[0], *hit[1]]))
        in_fence = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if re.match(r"^\s*(```|~~~)", line):
                in_fence = not in_fence
            if in_fence or line.startswith("#"):  # a heading names a command, runs none
                continue
            for span in re.findall(r"`([^`]+)`", line):
                if not re.match(r"^(\S+=\S+ )*(\S*/)?mnist-jax ", span) or _is_synopsis(span):
                    continue
                for words in _simple_commands(span):
                    hit = _program_args(words)
                    if hit:
                        found.append((name, number, span, [hit[0], *hit[1]]))
    return found


def python_snippets() -> list[tuple[str, int, str]]:
    """``(page, first line, code)`` of each distinct Python block of :data:`SNIPPET_PAGES`."""
    seen, found = set(), []
    for page in SNIPPET_PAGES:
        for lang, start, text in fenced_blocks(page):
            if lang in ("python", "py") and text not in seen:
                seen.add(text)
                found.append((str(page.relative_to(ROOT)), start, text))
    return found


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
def _bench_parser():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench.build_parser()


def _parse(parser, argv: list[str], capsys) -> str | None:
    """None when ``argv`` parses (``--help`` included), else argparse's message."""
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return capsys.readouterr().err.strip() or f"exit {e.code}"
    return None


COMMANDS = commands()


def test_the_pages_hold_commands_to_check():
    """The extraction itself can fail: the README's quick start must be among them."""
    readme = [c for c in COMMANDS if c[0] == "README.md"]
    assert any(argv == ["mnist-jax", "train"] for _, _, _, argv in readme), readme
    assert len({c[0] for c in COMMANDS}) >= 4, sorted({c[0] for c in COMMANDS})


@pytest.mark.parametrize("page,line,text,argv", COMMANDS,
                         ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_every_written_command_parses(page, line, text, argv, capsys):
    program, args = argv[0], argv[1:]
    if program == "bench.py":
        problem = _parse(_bench_parser(), args, capsys)
    else:
        problem = _parse(build_parser(), args, capsys)
        if problem is None and args[:1] == ["bench"]:  # bench hands its arguments on
            problem = _parse(_bench_parser(), args[1:], capsys)
    assert problem is None, f"{page}:{line}: `{text}` does not parse: {problem}"


def test_a_wrong_flag_in_a_page_would_be_caught(capsys):
    """The check above fails for a command the parser refuses (so it is able to fail)."""
    assert _parse(build_parser(), ["train", "--no-such-flag", "3"], capsys) is not None
    assert _parse(build_parser(), ["train", "--epochs", "3"], capsys) is None
    assert _unknown_flags("mnist-jax train [--no-such-flag N]") == ["--no-such-flag"]


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _unknown_flags(text: str) -> list[str]:
    """The subcommand and ``--flags`` of a usage line that the parser does not know."""
    words = text.split()
    subs = dict(_subparsers(build_parser()))
    if len(words) < 2 or words[1] not in subs:
        return [" ".join(words[:2])]
    known = _options(_bench_parser()) if words[1] == "bench" else _options(subs[words[1]])
    flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", text)
    return [f for f in flags if f not in known]


SYNOPSES = synopses()


@pytest.mark.parametrize("page,line,text", SYNOPSES, ids=[f"{s[0]}:{s[1]}" for s in SYNOPSES])
def test_every_usage_line_names_real_flags(page, line, text):
    unknown = _unknown_flags(text)
    assert not unknown, f"{page}:{line}: `{text}` names what the CLI lacks: {unknown}"


# ---------------------------------------------------------------------------------------
# Python snippets
# ---------------------------------------------------------------------------------------
SNIPPETS = python_snippets()


@pytest.mark.parametrize("page,line,code", SNIPPETS, ids=[f"{s[0]}:{s[1]}" for s in SNIPPETS])
def test_every_python_snippet_runs(page, line, code, digits, monkeypatch, tmp_path):
    def load_dataset(name="mnist", data_dir=None, *args, **kwargs):
        assert name == "mnist", f"{page}:{line} loads {name!r}"
        return digits

    monkeypatch.setattr(mnist_jax, "load_dataset", load_dataset)
    monkeypatch.setattr(data_lib, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)  # a snippet that writes a run folder writes it here
    try:
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": f"snippet_{line}"})
    except Exception as e:  # the failing page and line, with the error
        pytest.fail(f"{page}:{line}: the snippet fails: {type(e).__name__}: {e}")


def test_the_readme_has_snippets_to_run():
    assert sum(1 for s in SNIPPETS if s[0] == "README.md") >= 3


# ---------------------------------------------------------------------------------------
# The README itself
# ---------------------------------------------------------------------------------------
def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_the_readme_links_resolve():
    text = README.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            ok = anchor in anchors
        else:
            ok = (ROOT / path).exists()
        if not ok:
            broken.append(target)
    assert not broken, f"README.md links to what does not exist: {broken}"


# ---------------------------------------------------------------------------------------
# The package's comments
# ---------------------------------------------------------------------------------------
# This project's issues ("#13", "issue 3"); an upstream reference such as jax-ml/jax#12868
# names a library's bug, which is a reason the code keeps.
ISSUE_REFERENCE = re.compile(r"(?<![\w/.-])#\d+\b|\bissues? #?\d+", re.IGNORECASE)


def issue_references(folder: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in sorted(folder.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if ISSUE_REFERENCE.search(line)]


def test_the_issue_pattern_finds_what_it_should():
    for cited in ("# planned for #13's target", "see issue 3", "(Issue #31)"):
        assert ISSUE_REFERENCE.search(cited), cited
    for fine in ("jax-ml/jax#12868", "color='#1f77b4'", "tissue 3"):
        assert not ISSUE_REFERENCE.search(fine), fine


def test_the_package_cites_no_issues():
    found = issue_references(ROOT / "mnist_jax")
    assert not found, ("comments and docstrings keep the why, not the diary; issue references "
                       "in mnist_jax/:\n" + "\n".join(found))


# ---------------------------------------------------------------------------------------
# The manual
# ---------------------------------------------------------------------------------------
DOCS_MODULES = ("sphinx", "myst_parser", "furo")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in DOCS_MODULES),
                    reason="the manual's build needs the docs extra: pip install -e '.[docs]'")
def test_the_manual_builds_strictly_offline(tmp_path):
    """The exact build of the README (``-W --keep-going``: any warning fails it), into a
    temporary folder; the generated pages hold every subcommand and every public name."""
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    cli = (out / "cli.html").read_text()
    for name in _subcommands():
        assert f'id="mnist-jax-{name}"' in cli, f"the command-line page lacks {name}"
    api = (out / "api.html").read_text()
    missing = [n for n in mnist_jax.__all__ if f'id="mnist_jax.{n}"' not in api
               and not re.search(rf'id="mnist_jax\.\w+\.{n}"', api)]
    assert not missing, f"the API page lacks {missing}"


def _subparsers(parser) -> dict:
    return {name: sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, sub in a.choices.items()}


def _subcommands() -> list[str]:
    return list(_subparsers(build_parser()))
