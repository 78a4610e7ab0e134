"""The model zoo: recipes that export small, realistically shaped transformer models to ONNX.

`manifest.json` is the hand-reviewed source of truth: each entry names a builder in
`fuse_attn.models.recipes`, its parameters, the exporter, opset, dtype and attention implementation, and
the attention blocks the pass is expected to fuse or to leave (with a reason keyword).

    from fuse_attn.models.build import build_all
    for zm in build_all():          # cached under .zoo-cache/ by recipe hash
        print(zm.name, zm.path, zm.entry["expected"])

The manifest and its types live in `manifest` (re-exported here); the builders in `export` and
`export_env` import them, and `build` imports the builders: nothing imports back.
"""

from .manifest import (CACHE_ENV, DEFAULT_CACHE, MANIFEST_PATH, REPO_ROOT, ZooModel, cache_dir, entries,
                       load_manifest, names_matching, recipe_hash, recipe_hash_of)

__all__ = ["CACHE_ENV", "DEFAULT_CACHE", "MANIFEST_PATH", "REPO_ROOT", "ZooModel", "cache_dir", "entries",
           "load_manifest", "names_matching", "recipe_hash", "recipe_hash_of"]
