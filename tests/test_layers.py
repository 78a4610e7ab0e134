"""The floors import one way (issue 10): `fuse_attn.ir` (graph view, evaluator, contract) imports
nothing of the project above it; `passes/` (installed as `fuse_attn.passes`) imports only the ir
floor and itself. Read from the sources' import statements, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {  # folder -> the project modules it may import (prefixes)
    "fuse_attn/ir": ("fuse_attn.ir",),
    "passes": ("fuse_attn.ir", "fuse_attn.passes"),
}


def project_imports(path: Path) -> list[str]:
    """Every `fuse_attn...` module `path` imports; relative imports resolved against its package."""
    if path.parent.name == "passes":  # the folder installs under the project's namespace
        package = "fuse_attn.passes"
    else:
        package = ".".join(path.parent.relative_to(ROOT).parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found += [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
    return [m for m in found if m == "fuse_attn" or m.startswith("fuse_attn.")]


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_no_module_imports_from_a_floor_above(floor):
    allowed = FLOORS[floor]
    sources = sorted((ROOT / floor).glob("*.py"))
    assert sources
    above = {f"{p.relative_to(ROOT)}: {m}" for p in sources for m in project_imports(p)
             if not m.startswith(allowed)}
    assert not above, sorted(above)


def test_the_check_sees_an_import_from_above(tmp_path):
    """The reader is not blind: an upward import, lazy or relative, is reported."""
    (tmp_path / "passes").mkdir()
    bad = tmp_path / "passes" / "bad.py"
    bad.write_text("from . import masks\n\ndef f():\n    from fuse_attn import modelio\n    import fuse_attn.pipeline\n")
    assert project_imports(bad) == ["fuse_attn.passes.masks", "fuse_attn", "fuse_attn.pipeline"]
