"""The layout's rules, checked on the source: dependencies flow cli -> analyses -> core.

- ``core`` imports no other part of mechprobe; ``tasks`` (data) imports only ``core``; the private
  solver ``_fit`` imports nothing of mechprobe.
- No analysis imports ``cli``; ``lens``, ``patching``, ``probing`` and ``erasure`` import nothing
  from ``relational`` (which composes them).
- Across subpackages, imports go through the subpackage's public namespace (``mechprobe.core``,
  never ``mechprobe.core._sites``) and never take a name that starts with an underscore.
- The top level holds only ``__init__`` and ``__main__``: every concept lives in a subpackage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mechprobe as mp

PACKAGE = Path(mp.__file__).parent
ANALYSES = ("lens", "patching", "relational", "probing", "erasure")
ALLOWED = {
    "core": set(),
    "tasks": {"core"},
    "_fit": set(),
    "lens": {"core"},
    "patching": {"core", "lens"},
    "probing": {"core", "tasks", "_fit"},
    "erasure": {"core", "tasks", "_fit", "probing"},
    "relational": {"core", "tasks", "lens", "patching", "probing", "erasure"},
    "cli": {"core", "tasks", "lens", "patching", "relational", "probing", "erasure", "_fit"},
}


def _isort_order(names: list[str]) -> list[str]:
    """ruff's order for ``__all__``: CONSTANTS, then Classes, then functions, each alphabetical."""
    return sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[:1].isupper() else 2, n))


def _imports() -> list[tuple[Path, str, int, ast.ImportFrom]]:
    """Every ``from mechprobe.X... import ...`` in the package: (file, its subpackage, line, node)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        home = parts[0] if len(parts) > 1 else "(top)"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mechprobe."):
                found.append((path, home, node.lineno, node))
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                found.append((path, home, node.lineno, node))
    return found


def test_every_subpackage_is_known() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(ALLOWED)


def test_top_level_holds_no_modules() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__.py", "__main__.py"}


def test_dependencies_flow_one_way() -> None:
    wrong = []
    for path, home, line, node in _imports():
        if home == "(top)" or node.level > 0:
            continue
        target = (node.module or "").split(".")[1]
        if target != home and target not in ALLOWED[home]:
            wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({home}) imports {node.module}")
    assert not wrong, "\n".join(wrong)


def test_analyses_never_import_cli_and_lower_ones_never_import_relational() -> None:
    for analysis in ANALYSES:
        assert "cli" not in ALLOWED[analysis]
    for lower in ("lens", "patching", "probing", "erasure", "core", "tasks"):
        assert "relational" not in ALLOWED[lower]
    assert ALLOWED["core"] == set()


def test_cross_subpackage_imports_use_public_namespaces_and_names() -> None:
    wrong = []
    for path, home, line, node in _imports():
        where = f"{path.relative_to(PACKAGE)}:{line}"
        if node.level > 0:
            wrong.append(f"{where}: relative import (write mechprobe.<subpackage>...)")
            continue
        parts = (node.module or "").split(".")
        if home == "(top)" or parts[1] == home:
            continue
        if len(parts) > 2:
            wrong.append(f"{where}: imports {node.module}; import from mechprobe.{parts[1]}")
        private = [a.name for a in node.names if a.name.startswith("_")]
        if private:
            wrong.append(f"{where}: takes private {private} from {node.module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", ["core", "tasks", "_fit", *ANALYSES])
def test_subpackage_all_is_sorted_and_importable(name: str) -> None:
    module = __import__(f"mechprobe.{name}", fromlist=["__all__"])
    assert list(module.__all__) == _isort_order(list(module.__all__))
    for public in module.__all__:
        assert hasattr(module, public), f"mechprobe.{name}.{public}"


def test_top_level_all_is_sorted_and_re_exports_the_analyses() -> None:
    assert list(mp.__all__) == _isort_order(list(mp.__all__))
    for public in mp.__all__:
        assert hasattr(mp, public)
    for name in ANALYSES:
        module = __import__(f"mechprobe.{name}", fromlist=["__all__"])
        missing = [n for n in module.__all__ if n not in mp.__all__]
        assert not missing, f"mechprobe.{name} exports {missing}, which mechprobe does not"
