"""Export the zoo's recipes (`fuse_attn.models.build.build_all`), each in this process or in its
exporter's own environment, cached by recipe hash."""

from __future__ import annotations

from pathlib import Path

from .manifest import ZooModel, cache_dir, entries, load_manifest, recipe_hash


def build_all(
    out_dir: Path | str | None = None,
    only: str | list[str] | None = None,
    *,
    force: bool = False,
    log=None,
) -> list[ZooModel]:
    """Export every manifest model (or those in `only`) to `<cache>/<name>.onnx`, reusing an
    export whose recipe hash is unchanged. A failed export is returned with `.error` set."""
    from . import export, export_env  # torch and the exporters only when something is built
    cache = cache_dir(out_dir)
    cache.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest()
    result = []
    for entry in entries(only, manifest):
        tol = float(entry.get("tolerance") or manifest["tolerance"][entry["dtype"]])
        build = export_env.build_one if entry.get("environment") else export.build_one
        result.append(build(entry, cache, recipe_hash(entry), force=force, log=log, tolerance=tol))
    return result
