"""The package layering, checked on the source: every import (function-level ones too) is parsed.

* no import cycle between modules;
* `model/` imports nothing of dsv4cli but model, kernels, formats and errors (pure torch, no I/O);
* nothing below `ui/` and `cli/` imports rich, prompt_toolkit or typer, and nothing there prints;
* library messages name no CLI flag and no REPL command (a server reuses them; the CLI adds hints).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dsv4cli"
FRONT_ENDS = ("dsv4cli.cli", "dsv4cli.ui")
MODEL_MAY_IMPORT = ("dsv4cli.model", "dsv4cli.kernels", "dsv4cli.formats", "dsv4cli.errors")
UI_LIBRARIES = ("rich", "prompt_toolkit", "typer", "click")
#: a CLI flag (--ctx) or a REPL command (/clear) inside a message
FRONT_END_WORDS = re.compile(r"(?:^|[\s(`'\"])(?:--[a-z][a-z-]+|/(?:clear|save|load|set|think|nothink|mode|read)\b)")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"))


def imported(name: str) -> set[str]:
    """The dsv4cli modules and the outside top-level packages `name` imports, anywhere in its body."""
    known = modules()
    found: set[str] = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return {m if m.startswith("dsv4cli") else m.split(".")[0] for m in found}


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(name) if m in known and m != name} for name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_package(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


LIBRARY = sorted(m for m in modules() if not in_package(m, FRONT_ENDS))


def test_no_import_cycles():
    assert cycles(internal_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(m for m in modules() if in_package(m, ("dsv4cli.model",))))
def test_the_model_imports_only_model_kernels_formats_and_errors(name):
    outside = {m for m in imported(name) if m.startswith("dsv4cli") and not in_package(m, MODEL_MAY_IMPORT)}
    assert outside == set()


@pytest.mark.parametrize("name", LIBRARY)
def test_the_library_has_no_terminal_ui_and_never_prints(name):
    assert {m for m in imported(name) if m in UI_LIBRARIES} == set()
    prints = [node.lineno for node in ast.walk(tree(name))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert prints == []


def messages(name: str) -> list[str]:
    """The string constants of a module (f-string parts included), docstrings left out."""
    module = tree(name)
    docstrings = {id(node.body[0].value) for node in ast.walk(module)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(module)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("name", LIBRARY)
def test_library_messages_name_no_flags_or_repl_commands(name):
    """Settings appear as `{opt:ctx}` (errors.option), which each front end renders. A constant without
    a space is an argument, not a message (a compiler's --version)."""
    assert [text for text in messages(name) if " " in text and FRONT_END_WORDS.search(text)] == []


def test_the_cli_renders_settings_as_its_flags():
    from dsv4cli.cli.options import FLAG_NAMES
    from dsv4cli.errors import UsageError, option

    err = UsageError(f"raise {option('ctx')}", "or lower {opt:gpu_memory}; keep {x}")
    assert err.one_line(FLAG_NAMES) == "raise --ctx (or lower --gpu-memory; keep {x})"
    assert err.one_line() == "raise ctx (or lower gpu_memory; keep {x})"


def test_the_message_check_sees_flags_and_commands():
    assert FRONT_END_WORDS.search("raise --ctx") and FRONT_END_WORDS.search("start over with /clear")
    assert not FRONT_END_WORDS.search("a 4-bit format") and not FRONT_END_WORDS.search("models/flash")
