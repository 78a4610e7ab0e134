"""Lower every zoo model with whatever torch is installed, and check it as the tests do.

For running the lowering on another torch than the project's (e.g. torch 2.1, the oldest a
torch-neuronx for Inf2 pins) in a venv of its own:

    python -m venv v && v/bin/pip install torch==2.1.2 "numpy<2" onnx onnxruntime tqdm && v/bin/pip install --no-deps -e .
    v/bin/python benchmarks/lower_check.py --zoo-cache .zoo-cache [--only NAME] [--json out.json]

Per model: fuse, lower (FlashFwd as the CPU simulator, mixed precision off), forward on meta
tensors with FlashFwd as static_check.sdpa_attention (any host read raises there), and max
|lowered - onnxruntime| on the fused model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from fuse_attn import fuse, models
from fuse_attn.models.check import fuse_options
from fuse_attn.compile import constraints, shapes
from fuse_attn.compile.run import attention_fn, compare_with_onnxruntime
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention, with_attention


def fused_at_manifest_shapes(entry: dict, path: Path) -> onnx.ModelProto:
    """Fused with the manifest's options, inputs fixed at its shapes (what `compile --shape` gets),
    as tests/test_compile_zoo.py does."""
    fused, _ = fuse(str(path), **fuse_options(entry))
    given = {name: tuple(spec["shape"]) for name, spec in entry["inputs"].items()}
    return shapes.fix_input_shapes(fused, given)


def check_one(entry: dict, path: Path) -> dict:
    model = fused_at_manifest_shapes(entry, path)
    feeds = shapes.example_feeds(model, seed=0)
    plans, problems = constraints.plan_model(model, False, feeds)
    if problems:
        return {"error": "; ".join(problems)}
    module = lower(model, plans, attention_fn(simulate=True)[0])
    row: dict = {"steps": len(module.steps)}
    inputs = tuple(to_torch(feeds[n]) for n in module.input_names)
    run_on_meta(with_attention(module, sdpa_attention), inputs)  # raises HostRead
    row["meta_run"] = "ok"
    try:
        rows = compare_with_onnxruntime(model, module, feeds, run_onnxruntime(model, feeds))
        row["max_abs_vs_onnxruntime"] = max(r[1] for r in rows)
        row["max_rel_vs_onnxruntime"] = max(r[2] for r in rows)
    except RuntimeError as e:  # a CPU kernel this torch lacks (e.g. float16 matmul): not the lowering's
        row["cpu_run"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo-cache", default=os.environ.get(models.CACHE_ENV, str(models.DEFAULT_CACHE)))
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    env = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "numpy": np.__version__}
    print(json.dumps(env))
    rows = []
    for entry in models.load_manifest()["models"]:
        path = Path(args.zoo_cache) / f"{entry['name']}.onnx"
        if (args.only and entry["name"] not in args.only) or not path.exists():
            continue
        if entry.get("compile_known_issue"):  # the manifest's known failure, before lowering
            rows.append({"model": entry["name"], "known_issue": entry["compile_known_issue"]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        start = time.perf_counter()
        try:
            row = {"model": entry["name"], "dtype": entry["dtype"], **check_one(entry, path)}
        except Exception as e:  # noqa: BLE001 - a row, not the end of the run
            row = {"model": entry["name"], "error": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp32 = [r for r in rows if r.get("dtype") == "float32" and "max_abs_vs_onnxruntime" in r]
    summary = {"models": len(rows), "lowered_and_meta_run": sum(r.get("meta_run") == "ok" for r in rows),
               "errors": [r["model"] for r in rows if "error" in r],
               "known_issues": [r["model"] for r in rows if "known_issue" in r],
               "cpu_run_unavailable": [r["model"] for r in rows if "cpu_run" in r],
               "max_abs_vs_onnxruntime_fp32": max((r["max_abs_vs_onnxruntime"] for r in fp32), default=None)}
    print(json.dumps({"summary": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
