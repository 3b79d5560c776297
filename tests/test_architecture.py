"""The layering the repository promises, checked on the source (AST, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("topology", "kernels", "connector", "proto")


def _modules(folder: str) -> list[Path]:
    return [p for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name]


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """``(line, module, level)`` of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, 0) for alias in node.names)
    return out


def _offenders(folders, bad) -> list[str]:
    return [
        f"{p.relative_to(ROOT)}:{line}: {mod or '.' * level}"
        for folder in folders
        for p in _modules(folder)
        for line, mod, level in _imports(p)
        if bad(mod, level)
    ]


def test_one_import_style_absolute():
    assert _offenders(PACKAGES, lambda mod, level: level > 0) == []


@pytest.mark.parametrize(
    ("folders", "forbidden"),
    [
        (("connector/transfer",), "kvbridge.connector.serving"),  # the library
        (("topology", "kernels"), "kvbridge.connector"),  # below the connector
        (("kernels",), "kvbridge.topology"),  # kernels take views, not layouts
    ],
)
def test_layering(folders, forbidden):
    bad = _offenders(
        folders, lambda mod, level: mod == forbidden or mod.startswith(forbidden + ".")
    )
    assert bad == []


def test_packages_never_import_benchmarks():
    names = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert _offenders(PACKAGES, lambda mod, level: mod.split(".")[0] in names | {"bench"}) == []
