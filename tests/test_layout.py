"""The shape of the package: short functions and files, and the family names in one table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from difftrain_dist.models.families import FAMILY_NAMES, TINY_VARIANTS

PACKAGE = Path(__file__).resolve().parent.parent / "difftrain_dist"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450
TABLE = PACKAGE / "models" / "families.py"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions, fields)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for statement in body:
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                found.add(id(statement.value))
    return found


def test_the_package_is_found():
    assert len(SOURCES) > 40 and TABLE in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_short(path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.name}: {lines} lines; split it by what its parts do"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_family_names_are_spelled_only_in_the_table():
    names = set(FAMILY_NAMES) | set(TINY_VARIANTS)
    spelled = []
    for path in SOURCES:
        if path == TABLE:
            continue
        tree = _tree(path)
        docs = _docstrings(tree)
        spelled += [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs]
    assert not spelled, "family names outside models/families.py (read them from the table): " + ", ".join(spelled)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The walkers above find a long function and a spelled name when there is one."""
    source = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + f"\nARCH = {FAMILY_NAMES[0]!r}\n"
    tree = ast.parse(source)
    lengths = [n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert lengths == [MAX_FUNCTION_LINES + 1]
    docs = _docstrings(tree)
    assert [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == FAMILY_NAMES[0]
            and id(n) not in docs] == [FAMILY_NAMES[0]]
