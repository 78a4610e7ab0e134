"""Export one manifest entry in its exporter's own environment (`environments.py`) and check
the export: against the framework's own outputs in onnxruntime, or (optimum-cli) by the
exporter's own validation, which fails the run when onnxruntime and torch disagree.

One script run may write several files (optimum's encoder / decoder / decoder_with_past /
merged): recipes that differ only in the `file` they take share the run, cached under
`<cache>/runs/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from . import ZooModel, environments, recipe_hash_of
from .export import max_abs_err, ort_session

# what each environment's reference outputs come from
_FRAMEWORK = {"transformers4": "torch", "tf2onnx": "tensorflow", "jax2onnx": "jax", "optimum": "torch"}


def build_one(entry: dict[str, Any], cache: Path, key: str, *, force: bool = False, log=None,
              tolerance: float | None = None) -> ZooModel:
    """Export `entry` to `<cache>/<name>.onnx` unless an export with recipe hash `key` is there."""
    name = entry["name"]
    path = cache / f"{name}.onnx"
    meta_path = cache / f"{name}.json"
    if not force and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("hash") == key:
            if log is not None:
                log(f"{name}: cached")
            return ZooModel(name, path, entry, meta)
    if log is not None:
        log(f"{name}: exporting ({entry['exporter']} in environment {entry['environment']})")
    tmp = cache / f".{name}.{os.getpid()}.tmp.onnx"
    try:
        meta = _build(entry, cache, tmp, force=force, log=log)
    except Exception as exc:  # one recipe's failure must not stop the zoo
        tmp.unlink(missing_ok=True)
        err = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
        msg = err[-1] if err else repr(exc)
        if log is not None:
            log(f"{name}: FAILED: {msg}")
        return ZooModel(name, None, entry, {}, error=msg[:500])
    err = meta["ort_vs_framework"]
    if tolerance is not None and err is not None and not err <= tolerance:
        tmp.unlink(missing_ok=True)
        msg = f"the export disagrees with {meta['framework']}: max error {err:.3g} > {tolerance:g}"
        if log is not None:
            log(f"{name}: FAILED: {msg}")
        return ZooModel(name, None, entry, meta, error=msg)
    meta["hash"] = key
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    if log is not None:
        checked = (f"onnxruntime vs {meta['framework']} {err:.2e}" if err is not None
                   else f"validated by {meta['validated_by']}")
        log(f"{name}: {meta['export_seconds']:.1f}s, opset {meta['opset']}, {meta['nodes']} nodes, {checked}")
    return ZooModel(name, path, entry, meta)


def _build(entry: dict[str, Any], cache: Path, path: Path, *, force: bool, log) -> dict[str, Any]:
    import numpy as np
    import onnx

    from .recipes import make_inputs

    env_name = entry["environment"]
    env = environments.ENVIRONMENTS[env_name]
    python = environments.ensure(env_name, cache, log=log)
    params = {k: v for k, v in entry.get("params", {}).items() if k != "file"}
    params["seed"] = entry.get("seed", 0)
    inputs = make_inputs(entry["inputs"], entry["dtype"]) if env["reference"] else {}
    run = {"params": params, "inputs": entry["inputs"] if inputs else None}
    # the run depends on the script and its environment only: a change here re-reads cached runs
    work = cache / "runs" / f"{entry['exporter']}-{recipe_hash_of(run, environment=env_name, sources=())}"
    t0 = time.perf_counter()
    if force or not (work / "result.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if inputs:
            np.savez(work / "inputs.npz", **inputs)
        try:
            environments.run_script(env_name, python, params, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    result = json.loads((work / "result.json").read_text())
    export_s = time.perf_counter() - t0
    files = result["files"]
    wanted = entry.get("params", {}).get("file") or (files[0] if len(files) == 1 else None)
    if wanted not in files:
        raise ValueError(f"the export wrote {files}; the recipe's params.file must name one of them")
    # the zoo keeps weights inline (jax2onnx writes large constants to a .data file beside it)
    onnx.save(onnx.load(str(work / wanted)), str(path))
    meta = {**describe(entry, path), "export_seconds": round(export_s, 2), "environment": env_name,
            "versions": result["versions"], "framework": _FRAMEWORK.get(env_name, env_name),
            "ort_vs_framework": None, "validated_by": result.get("validated_by"), "command": result.get("command")}
    if result.get("reference"):
        with np.load(work / "reference.npz") as ref:
            want = [ref[f"out{i}"] for i in range(len(ref.files))]
        got = ort_session(path).run(None, inputs)
        if len(got) != len(want):
            raise ValueError(f"the export has {len(got)} outputs, {meta['framework']} returned {len(want)}")
        meta["ort_vs_framework"] = max(max_abs_err(g, w) for g, w in zip(got, want))
    return meta


def describe(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """What the exported file looks like."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = Counter(n.op_type for n in proto.graph.node)
    return {
        "name": entry["name"],
        "exporter": entry["exporter"],
        "opset": opset,
        "dtype": entry["dtype"],
        "nodes": len(proto.graph.node),
        "ops": {k: ops[k] for k in ("Attention", "Softmax", "MatMul", "Where", "Add", "If") if ops.get(k)},
        "inputs": {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                   for i in proto.graph.input},
        "bytes": path.stat().st_size,
    }
