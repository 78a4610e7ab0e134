"""The floors import one way (issues 10 and 16), bottom to top:

- `fuse_attn/ir/` (graph view, evaluator, contract) imports nothing of the project above it;
- `passes/` (installed as `fuse_attn.passes`) the ir floor and itself;
- the pipeline and I/O, the modules directly in `fuse_attn/` (pipeline, modelio, report, verify,
  specialize, usage, printable, and the package's public API), the floors below;
- `fuse_attn/compile/` those;
- on top, the commands, `fuse_attn/commands/` and `python -m fuse_attn` (`fuse_attn/__main__.py`), and
  the zoo (`models/`, installed as `fuse_attn.models`: its recipes and the `fuse-attn zoo` command,
  which `fuse-attn` dispatches to and which renders check's table) use them all.

Read from the sources' import statements, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top; a module may import from its own floor and those below.
FLOORS = ("ir", "passes", "pipeline", "compile", "commands", "models")
_PACKAGE_FLOOR = {"ir": "ir", "passes": "passes", "compile": "compile", "commands": "commands", "models": "models"}


def floor_of_module(module: str) -> str:
    """The floor of a `fuse_attn...` module name (or of a name imported from it)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "commands" if parts[1:] == ["__main__"] else "pipeline"
    return _PACKAGE_FLOOR.get(parts[1], "pipeline")  # a module directly in fuse_attn/


def floor_of_source(path: Path) -> str:
    """The floor of a source file of this repository."""
    relative = path.relative_to(ROOT).parts
    if relative[0] in ("passes", "models"):
        return relative[0]
    if relative == ("fuse_attn", "__main__.py"):
        return "commands"
    return _PACKAGE_FLOOR[relative[1]] if len(relative) > 2 else "pipeline"


def sources(floor: str) -> list[Path]:
    folders = {"ir": ["fuse_attn/ir"], "passes": ["passes"], "pipeline": ["fuse_attn"],
               "compile": ["fuse_attn/compile"], "commands": ["fuse_attn/commands", "fuse_attn"],
               "models": ["models"]}[floor]
    return sorted(p for folder in folders for p in (ROOT / folder).glob("*.py") if floor_of_source(p) == floor)


def project_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every `fuse_attn...` module `path` imports, and `package.name` for each name imported from a
    package (`from fuse_attn import commands` is the commands floor); relative imports resolved
    against the file's package."""
    parts = path.parent.relative_to(root).parts
    if parts[:1] in (("passes",), ("models",)):  # the folders install under the project's namespace
        package = ".".join(("fuse_attn", *parts))
    else:
        package = ".".join(parts)
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
            found += [f"{module}.{a.name}" for a in node.names]
    return [m for m in found if m == "fuse_attn" or m.startswith("fuse_attn.")]


def _level(floor: str) -> int:
    return min(FLOORS.index(floor), FLOORS.index("commands"))  # the zoo shares the top floor


def upward_imports(path: Path, floor: str, root: Path = ROOT) -> list[str]:
    return [m for m in project_imports(path, root) if _level(floor_of_module(m)) > _level(floor)]


@pytest.mark.parametrize("floor", FLOORS)
def test_no_module_imports_from_a_floor_above(floor):
    found = sources(floor)
    assert found
    above = {f"{p.relative_to(ROOT)}: {m}" for p in found for m in upward_imports(p, floor)}
    assert not above, sorted(above)


def test_every_source_is_on_a_floor():
    everything = {p for folder in ("fuse_attn", "passes", "models") for p in (ROOT / folder).rglob("*.py")
                  if "exporters" not in p.parts}
    assert everything == {p for floor in FLOORS for p in sources(floor)}


def test_the_check_sees_an_import_from_above(tmp_path):
    """The reader is not blind: an upward import, lazy or relative, is reported."""
    (tmp_path / "passes").mkdir()
    bad = tmp_path / "passes" / "bad.py"
    bad.write_text("from . import masks\n\ndef f():\n    from fuse_attn import modelio\n    import fuse_attn.pipeline\n")
    assert project_imports(bad, tmp_path) == ["fuse_attn.passes.masks", "fuse_attn.modelio", "fuse_attn.pipeline"]
    assert upward_imports(bad, "passes", tmp_path) == ["fuse_attn.modelio", "fuse_attn.pipeline"]


@pytest.mark.parametrize("floor, text, above", [
    ("pipeline", "def f():\n    from fuse_attn.compile import lower\n", ["fuse_attn.compile.lower"]),
    ("pipeline", "from fuse_attn import commands\n", ["fuse_attn.commands"]),
    ("compile", "from fuse_attn.commands.cli import main\n", ["fuse_attn.commands.cli.main"]),
    ("compile", "from ..commands import check\n", ["fuse_attn.commands.check"]),
    ("passes", "from fuse_attn.models.build import build_all\n", ["fuse_attn.models.build.build_all"]),
    ("commands", "from . import check\nfrom fuse_attn import compile, fuse, pipeline\n", []),
])
def test_an_import_from_a_floor_above_is_seen(tmp_path, floor, text, above):
    folder = {"passes": "passes", "pipeline": "fuse_attn", "compile": "fuse_attn/compile", "commands": "fuse_attn/commands"}[floor]
    (tmp_path / folder).mkdir(parents=True)
    source = tmp_path / folder / "probe.py"
    source.write_text(text)
    assert upward_imports(source, floor, tmp_path) == above
