"""Installing fuse-attn for compile never touches the torch that torch-neuronx pins.

torch-neuronx pins torch 2.1, 2.5, 2.7, 2.8 or 2.9 (by SDK release) and torch-xla is built against
exactly that torch; the Neuron venvs ship Python 3.10 and up. So the base requirements plus the
`compile` extra must admit every one of those torch versions (best: not name torch at all) and
Python 3.10, and no dependency may shut out Python 3.10 (onnx2pytorch 0.6.0, the old lowering,
declared Requires-Python >=3.11).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import fuse_attn
from fuse_attn.compile.torch_required import TorchUnavailable, require_torch

NEURON_TORCHES = ["2.1.0", "2.1.2", "2.5.1", "2.7.0", "2.8.0", "2.9.0", "2.9.1"]
PYTHON_310 = "3.10.12"
# Packages the Neuron SDK owns: fuse-attn must not name them (pip would resolve them anew).
NEURON_OWNED = {"torch", "torch-xla", "torch-neuronx", "neuronx-cc", "torchvision"}
PYPROJECT = pathlib.Path(fuse_attn.__file__).resolve().parent.parent / "pyproject.toml"


def project_table() -> dict:
    """pyproject's [project] (the source of truth); the installed metadata where tomllib is missing (3.10)."""
    try:
        import tomllib
    except ImportError:
        meta = importlib.metadata.metadata("fuse-attn")
        extras: dict[str, list[str]] = {e: [] for e in meta.get_all("Provides-Extra") or []}
        base = []
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            extra = next((e for e in meta.get_all("Provides-Extra") or [] if req.marker and req.marker.evaluate({"extra": e})), None)
            (extras[extra] if extra else base).append(str(req).split(";")[0])
        return {"dependencies": base, "optional-dependencies": extras, "requires-python": meta["Requires-Python"]}
    return tomllib.loads(PYPROJECT.read_text())["project"]


def compile_requirements(project: dict) -> list[Requirement]:
    """What `pip install "fuse-attn[compile]"` asks for directly."""
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["compile"]]


def installed(name: str) -> tuple[str, str | None] | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, dist.metadata["Requires-Python"]


def dependencies(name: str) -> list[Requirement]:
    reqs = []
    for line in importlib.metadata.distribution(name).metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.10", "python_full_version": PYTHON_310}):
            reqs.append(req)
    return reqs


def torch_problems(reqs: list[Requirement]) -> list[str]:
    problems = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "torch":
            problems += [f"{req} excludes torch {v}" for v in NEURON_TORCHES if not req.specifier.contains(v, prereleases=True)]
        elif name in NEURON_OWNED:
            problems.append(f"{req}: the Neuron SDK owns {name}")
    return problems


def python_310_problems(reqs: list[Requirement], metadata=installed, deps=dependencies) -> list[str]:
    """Requirements (followed through the installed distributions' own) that leave no release for
    Python 3.10: an exact pin whose release requires a newer Python. A range is fine when the
    installed release needs a newer Python but the range admits older ones, which pip picks on 3.10."""
    problems, seen, todo = [], set(), list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        found = metadata(name)
        if found is None:
            continue
        version, requires_python = found
        if requires_python and not SpecifierSet(requires_python).contains(PYTHON_310):
            exact = any(s.operator in ("==", "===") and "*" not in s.version for s in req.specifier)
            older_admitted = not exact and all(s.operator not in (">", ">=", "~=", "==") or Version(s.version) < Version(version)
                                               for s in req.specifier)
            if not older_admitted:
                problems.append(f"{req}: {name} {version} requires Python {requires_python}")
        todo.extend(deps(name))
    return problems


def test_compile_extra_leaves_neuron_torch_alone():
    project = project_table()
    assert torch_problems(compile_requirements(project)) == []
    assert not any(canonicalize_name(r.name) == "torch" for r in compile_requirements(project))  # best: not named at all


def test_compile_admits_python_310():
    project = project_table()
    assert SpecifierSet(project["requires-python"]).contains(PYTHON_310)
    assert python_310_problems(compile_requirements(project)) == []


def test_the_checks_catch_the_old_compile_extra():
    """torch==2.13.0 and onnx2pytorch==0.6.0 (Requires-Python >=3.11), what compile asked for before."""
    old = [Requirement("torch==2.13.0"), Requirement("onnx2pytorch==0.6.0"), Requirement("torch>=2.0,<2.9")]
    assert len(torch_problems(old)) == 7 + 2  # every Neuron torch by the pin, 2.9.0/2.9.1 by the range
    fake = {"onnx2pytorch": ("0.6.0", ">=3.11"), "numpy": ("2.4.6", ">=3.11"), "torch": ("2.13.0", ">=3.10")}
    reqs = [Requirement("onnx2pytorch==0.6.0"), Requirement("numpy>=1.26"), Requirement("torch==2.13.0")]
    problems = python_310_problems(reqs, metadata=fake.get, deps=lambda name: [])
    assert problems == ["onnx2pytorch==0.6.0: onnx2pytorch 0.6.0 requires Python >=3.11"]  # numpy: 1.26 runs on 3.10
    assert python_310_problems([Requirement("numpy>=2.4.6")], metadata=fake.get, deps=lambda name: []) != []


def test_missing_or_old_torch_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchUnavailable, match=r"compile needs PyTorch, which is not installed here: .*Neuron venv"):
        require_torch()
    import types

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.0.1+cpu"))
    with pytest.raises(TorchUnavailable, match=r"compile needs PyTorch 2.1 or later .*found torch 2.0.1\+cpu: .*Neuron venv"):
        require_torch()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.1.2+cu121"))
    assert require_torch().__version__ == "2.1.2+cu121"


def test_sources_parse_as_python_310():
    """requires-python >=3.10: no 3.11-only syntax (except*, PEP 695/701...) anywhere in the package.
    benchmarks/xla_trace.sh runs the lowering under Python 3.10 itself."""
    import ast

    root = pathlib.Path(fuse_attn.__file__).resolve().parent.parent
    files = [p for folder in ("fuse_attn", "passes", "models") for p in (root / folder).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
