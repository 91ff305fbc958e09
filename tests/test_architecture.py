"""The core names no pass: what it does for a particular pass is a hook that pass registered.

Checked from the source of the core modules (`api.py`, `graph.py`, `lowering.py`,
`runtime/`): no import of a pass module or of a pass's own ops, and no identifier or string
that is a pass's name, its policy field, or its option type.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import lordo_compile as lc
from lordo_compile.passes import registered_passes

PACKAGE = pathlib.Path(lc.__file__).parent
CORE = [PACKAGE / "api.py", PACKAGE / "graph.py", PACKAGE / "lowering.py", *sorted((PACKAGE / "runtime").glob("*.py"))]
# What the core may import from the passes and ops packages: the registry, nothing a pass defines.
ALLOWED = {"lordo_compile.passes", "lordo_compile.passes.manager", "lordo_compile.ops", "lordo_compile.ops.registry"}


def _names() -> set[str]:
    names = set()
    for registered in registered_passes().values():
        names.add(registered.name)
        if registered.option:
            names.add(registered.option)
        if registered.option_type is not None:
            names.add(registered.option_type.__name__)
    return names - {"identity"}


def _module_of(node: ast.ImportFrom, path: pathlib.Path) -> str:
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    base = list(package)[: len(package) - node.level + 1] if node.level else []
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imported_modules(path: pathlib.Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = _module_of(node, path)
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                modules.append(candidate if _is_module(candidate) else module)
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_no_pass(path):
    for module in _imported_modules(path):
        if module.startswith(("lordo_compile.passes", "lordo_compile.ops")):
            assert module in ALLOWED, f"{path.name} imports {module}"


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_mentions_no_pass_by_name(path):
    names = _names()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in names:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [name for name in names if node.value == name or node.value.startswith(f"{name}.")]
    assert not found, f"{path.name} names passes {sorted(set(found))}"


def test_the_check_sees_a_pass_name():
    source = "x = policy.eco\ny = 'fake_quant'\nfrom .passes.sync import Sync\n"
    tree = ast.parse(source)
    assert any(isinstance(n, ast.Attribute) and n.attr in _names() for n in ast.walk(tree))
    assert any(isinstance(n, ast.Constant) and n.value in _names() for n in ast.walk(tree))
