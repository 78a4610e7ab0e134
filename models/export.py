"""Export one manifest entry to ONNX (weights inline) and check the export against torch."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from . import ZooModel, _compat


def _log(log, msg: str) -> None:
    if log is not None:
        log(msg)


def ort_session(path: Path | str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_err(a, b) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    if not a.size:
        return 0.0
    return float(np.nanmax(np.abs(a - b))) if not (np.isnan(a) ^ np.isnan(b)).any() else float("inf")


def _export(model, args: tuple, names: list[str], outputs: list[str], entry: dict[str, Any], path: Path) -> None:
    import torch

    exporter = entry["exporter"]
    opset = entry.get("opset")
    if exporter == "dynamo":
        kwargs = {} if opset is None else {"opset_version": opset}
        torch.onnx.export(
            model, args, str(path), dynamo=True, external_data=False, input_names=names,
            output_names=outputs, verbose=False, **kwargs,
        )
    elif exporter == "torchscript":
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=opset or 17, input_names=names,
            output_names=outputs, do_constant_folding=True,
        )
    else:
        raise ValueError(f"unknown exporter {exporter!r}")


def build_one(entry: dict[str, Any], cache: Path, key: str, *, force: bool = False, log=None,
              tolerance: float | None = None) -> ZooModel:
    """Export `entry` to `<cache>/<name>.onnx` unless an export with recipe hash `key` is there.
    The export must reproduce torch's outputs in onnxruntime within `tolerance`."""
    name = entry["name"]
    path = cache / f"{name}.onnx"
    meta_path = cache / f"{name}.json"
    if not force and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("hash") == key:
            _log(log, f"{name}: cached")
            return ZooModel(name, path, entry, meta)

    missing = [m for m in entry.get("requires", []) if importlib.util.find_spec(m) is None]
    if missing:
        _log(log, f"{name}: skipped, needs {', '.join(missing)}")
        return ZooModel(name, None, entry, {}, error=f"needs {', '.join(missing)} (not installed)", skipped=True)

    _log(log, f"{name}: exporting ({entry['exporter']}, opset {entry.get('opset') or 'default'}, "
              f"{entry['dtype']}, {entry.get('attn_impl')})")
    tmp = cache / f".{name}.{os.getpid()}.tmp.onnx"
    try:
        meta = _build(entry, tmp)
    except Exception as exc:  # one recipe's failure must not stop the zoo
        tmp.unlink(missing_ok=True)
        err = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
        msg = err[-1] if err else repr(exc)
        _log(log, f"{name}: FAILED: {msg}")
        return ZooModel(name, None, entry, {}, error=msg[:500])
    if tolerance is not None and not meta["ort_vs_torch"] <= tolerance:
        tmp.unlink(missing_ok=True)
        msg = f"the export disagrees with torch: max error {meta['ort_vs_torch']:.3g} > {tolerance:g}"
        _log(log, f"{name}: FAILED: {msg}")
        return ZooModel(name, None, entry, meta, error=msg)
    meta["hash"] = key
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    _log(log, f"{name}: {meta['export_seconds']:.1f}s, opset {meta['opset']}, {meta['nodes']} nodes, "
              f"onnxruntime vs torch {meta['ort_vs_torch']:.2e}")
    return ZooModel(name, path, entry, meta)


def _build(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    _compat.prepare()
    import onnx
    import torch

    from . import recipes

    dtype = recipes.DTYPES[entry["dtype"]]
    torch.manual_seed(entry.get("seed", 0))
    t0 = time.perf_counter()
    params = {**entry.get("params", {}), "inputs": list(entry["inputs"]), "outputs": entry.get("outputs", ["output"])}
    module = recipes.BUILDERS[entry["builder"]](params, entry.get("attn_impl"))
    module = module.to(dtype).eval()
    np_inputs = recipes.make_inputs(entry["inputs"], entry["dtype"])
    names = list(np_inputs)
    args = tuple(torch.from_numpy(v) for v in np_inputs.values())
    outputs = entry.get("outputs", ["output"])
    with torch.no_grad():
        ref = module(*args)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sink = io.StringIO()
    # TorchScript traces with grad enabled, as a user's export script would: under no_grad,
    # nn.MultiheadAttention / TransformerEncoderLayer take their fused fast path
    # (aten::_native_multi_head_attention), which the TorchScript exporter cannot export.
    grad = torch.enable_grad() if entry["exporter"] == "torchscript" else torch.no_grad()
    with grad, warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        _export(module, args, names, outputs, entry, path)
    export_s = time.perf_counter() - t0

    proto = onnx.load(str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = Counter(n.op_type for n in proto.graph.node)
    sess = ort_session(path)
    got = sess.run(None, np_inputs)
    err = max(max_abs_err(g, r.float().numpy()) for g, r in zip(got, ref))
    return {
        "name": entry["name"],
        "exporter": entry["exporter"],
        "opset": opset,
        "dtype": entry["dtype"],
        "nodes": len(proto.graph.node),
        "ops": {k: ops[k] for k in ("Attention", "Softmax", "MatMul", "Where", "Add") if ops.get(k)},
        "inputs": {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input},
        "bytes": path.stat().st_size,
        "build_seconds": round(build_s, 2),
        "export_seconds": round(export_s, 2),
        "ort_vs_torch": err,
    }
