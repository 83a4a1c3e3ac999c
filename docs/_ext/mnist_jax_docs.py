"""Pages of the manual generated from the code while Sphinx builds it, so they cannot drift:

- ``cli.md``: every subcommand of ``mnist_jax.cli.build_parser()`` (and of the benchmark's
  own parser behind ``mnist-jax bench``) with every flag and its help;
- ``api.md``: every name in ``mnist_jax.__all__``, read at build time, documented by
  autodoc from its docstring and grouped by the module that defines it.

Each page holds a marker line (``<!-- generated: cli -->`` / ``<!-- generated: api -->``)
that the ``source-read`` event replaces with the generated Markdown.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

MARKERS = {"cli": "<!-- generated: cli -->", "api": "<!-- generated: api -->"}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as ``--help`` prints it (``%(default)s`` expanded)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split())


def _flag(action: argparse.Action) -> str:
    """``--epochs N`` / ``RUN_DIR``: how the flag is written on the command line."""
    if not action.option_strings:
        return action.metavar or action.dest
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices is not None and action.metavar is None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return f"{names} {metavar}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _parser_markdown(parser: argparse.ArgumentParser, title: str, level: int) -> list[str]:
    """A section for one parser: its usage, then a table of flags per argument group."""
    out = [f"{'#' * level} {title}", ""]
    if parser.description:
        out += [_md_escape(" ".join(parser.description.split())), ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
                   and a.help != argparse.SUPPRESS]
        if not actions:
            continue
        out += [f"**{_md_escape(group.title or 'options')}**", "",
                "| flag | what it does |", "| --- | --- |"]
        for a in actions:
            out.append(f"| `{_flag(a)}` | {_md_escape(_help_text(parser, a))} |")
        out.append("")
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _bench_parser() -> argparse.ArgumentParser | None:
    """The benchmark's own parser (``mnist-jax bench`` hands every argument to it)."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "bench.py").is_file():
        return None
    sys.path.insert(0, str(folder))
    try:
        import bench
    finally:
        sys.path.remove(str(folder))
    return bench.build_parser(prog="mnist-jax bench")


def cli_markdown() -> str:
    """The command-line reference: ``mnist-jax`` and each subcommand, every flag with its help."""
    from mnist_jax.cli import build_parser
    parser = build_parser()
    out = ["```text", parser.format_usage().strip(), "```", ""]
    subs = _subparsers(parser)
    helps = {a.dest: a.help for a in parser._actions
             if isinstance(a, argparse._SubParsersAction) for a in a._choices_actions}
    out += ["| command | what it does |", "| --- | --- |"]
    out += [f"| [`{name}`](#mnist-jax-{name}) | {_md_escape(helps.get(name) or '')} |"
            for name in subs]
    out.append("")
    for name, sub in subs.items():
        if name == "bench":
            bench = _bench_parser()
            if bench is not None:
                out += _parser_markdown(bench, f"mnist-jax {name}", 2)
                continue
        out += _parser_markdown(sub, f"mnist-jax {name}", 2)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# API reference
# ---------------------------------------------------------------------------------------
def _directive(obj: object) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def api_markdown() -> str:
    """One autodoc entry per name of ``mnist_jax.__all__``, grouped by defining module."""
    package = importlib.import_module("mnist_jax")
    groups: dict[str, list[str]] = {}
    for name in package.__all__:
        obj = getattr(package, name)
        module = getattr(obj, "__module__", None) if _directive(obj) != "autodata" else None
        if not module or not module.startswith("mnist_jax"):
            module = _data_module(package, name)
        groups.setdefault(module, []).append(name)
    out: list[str] = []
    for module in sorted(groups):
        doc = inspect.getdoc(importlib.import_module(module)) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        out += [f"## `{module}`", ""]
        if summary:
            out += ["```{eval-rst}", summary, "```", ""]
        for name in groups[module]:
            obj = getattr(package, name)
            # autodoc writes reST, so it runs inside an eval-rst block, not as a MyST directive
            out += ["```{eval-rst}"] + _autodoc(obj, module, name) + ["```", ""]
    return "\n".join(out) + "\n"


def _autodoc(obj: object, module: str, name: str) -> list[str]:
    """The autodoc directive for ``mnist_jax.<name>``. A constant is documented where it is
    assigned (its docstring follows the assignment there), without its value."""
    kind = _directive(obj)
    if kind == "autodata":
        return [f".. autodata:: {module}.{name}", "   :no-value:"]
    return [f".. {kind}:: mnist_jax.{name}"]


def _data_module(package, name: str) -> str:
    """The mnist_jax module whose source assigns the constant ``name`` at top level."""
    pattern = re.compile(rf"^{re.escape(name)}\s*[:=]", re.M)
    for mod_name in sorted(m for m in sys.modules if m.startswith("mnist_jax.")):
        mod = sys.modules[mod_name]
        if getattr(mod, name, None) is getattr(package, name) and pattern.search(
                inspect.getsource(mod)):
            return mod_name
    return "mnist_jax"


# ---------------------------------------------------------------------------------------
# Sphinx hooks
# ---------------------------------------------------------------------------------------
GENERATORS = {"cli": cli_markdown, "api": api_markdown}


def _source_read(app, docname: str, source: list[str]) -> None:
    if docname in MARKERS and MARKERS[docname] in source[0]:
        source[0] = source[0].replace(MARKERS[docname], GENERATORS[docname]())


def _always_outdated(app, env, added, changed, removed) -> list[str]:
    """The generated pages follow the code, which Sphinx does not watch: read them anew."""
    return [name for name in MARKERS if name in env.found_docs]


def setup(app):
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _always_outdated)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
