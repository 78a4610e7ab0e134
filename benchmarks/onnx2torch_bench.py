"""onnx2torch (fx-based ONNX -> torch converter) against compile's own lowering, measured the same way.

- ONNX's node test cases in scope (benchmarks/node_tests.py): each converter gets the same model
  (constant operands as initializers, shapes fixed); a case passes when its outputs match and
  forward runs on meta tensors (no host reads: what torch_neuronx.trace needs).
- The zoo: each model as exported (unfused: onnx2torch has no FlashFwd), inputs fixed at the
  manifest's shapes; converted, max |error| against onnxruntime, and the meta run.

Run in its own venv (benchmarks/onnx2torch_bench.sh builds it); --json writes the numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node_tests  # noqa: E402


def onnx2torch_convert(model: onnx.ModelProto):
    from onnx2torch import convert

    return convert(model)


CONVERTERS = {"fuse_attn.lower": node_tests.lower_model, "onnx2torch": onnx2torch_convert}


def node_test_numbers(ops=None) -> dict:
    cases = node_tests.collect(ops)
    out = {}
    passed_by: dict[str, set[str]] = {}
    for name, convert in CONVERTERS.items():
        results = [node_tests.run_case(c, convert, what=name) for c in cases]
        passed_by[name] = {r.case for r in results if r.ok}
        table = node_tests.per_op(results)
        values_ok = sum(1 for r in results if r.ok or r.reason.startswith("meta run"))
        reasons = collections.Counter(r.reason.split(":")[0] if not r.reason.startswith("output")
                                      else "wrong output" for r in results if not r.ok)
        out[name] = {
            "cases": len(results), "pass": sum(r.ok for r in results),
            "outputs_match_but_host_reads": values_ok - sum(r.ok for r in results),
            "ops_in_scope": len(table), "ops_passing_every_case": sum(1 for p, t in table.values() if p == t),
            "failure_kinds": dict(reasons.most_common(8)),
            "per_op": {op: f"{p}/{t}" for op, (p, t) in table.items()},
        }
        print(name, {k: v for k, v in out[name].items() if k != "per_op"}, flush=True)
    # what onnx2torch would add: cases it passes that the lowering does not, by op
    extra = collections.Counter(c.op for c in cases
                                if c.name in passed_by["onnx2torch"] - passed_by["fuse_attn.lower"])
    out["onnx2torch_passes_where_lowering_fails"] = dict(sorted(extra.items()))
    print("onnx2torch passes where the lowering fails:", dict(extra), flush=True)
    return out


def zoo_row(entry: dict, path: Path) -> dict:
    from fuse_attn.compile import shapes
    from fuse_attn.compile.lower import to_torch
    from fuse_attn.compile.reference import run_onnxruntime
    from fuse_attn.compile.static_check import run_on_meta

    given = {name: tuple(spec["shape"]) for name, spec in entry["inputs"].items()}
    model = shapes.fix_input_shapes(onnx.load(path), given)
    feeds = shapes.example_feeds(model, seed=0)
    reference = run_onnxruntime(model, feeds)
    names = [i.name for i in shapes.real_inputs(model.graph)]
    inputs = tuple(to_torch(feeds[n]) for n in names)
    row = {"model": entry["name"], "dtype": entry["dtype"], "nodes": len(model.graph.node)}
    for name, convert in CONVERTERS.items():
        r: dict = {}
        start = time.perf_counter()
        try:
            module = convert(model)
        except Exception as e:  # noqa: BLE001 - a row, not the end of the run
            r["error"] = node_tests._first_line(e)
            row[name] = r
            continue
        r["convert_s"] = round(time.perf_counter() - start, 2)
        try:
            with torch.no_grad():
                outs = module(*inputs)
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            errs = [float(np.abs(o.float().numpy() - np.asarray(ref, np.float32)).max(initial=0.0)) /
                    max(float(np.abs(np.asarray(ref, np.float32)).max(initial=0.0)), 1e-30)
                    for o, ref in zip(outs, reference)]
            r["max_rel_vs_onnxruntime"] = max(errs)
            r["matches"] = len(outs) == len(reference) and max(errs) <= (1e-4 if entry["dtype"] == "float32" else 1e-2)
        except Exception as e:  # noqa: BLE001
            r["run_error"] = node_tests._first_line(e)
        try:
            run_on_meta(module, inputs)
            r["meta_run"] = "ok"
        except Exception as e:  # noqa: BLE001
            r["meta_run"] = node_tests._first_line(e)
        row[name] = r
    return row


def zoo_numbers(cache: str, only: list[str]) -> dict:
    from fuse_attn import models

    rows = []
    for entry in models.load_manifest()["models"]:
        path = Path(cache) / f"{entry['name']}.onnx"
        if (only and entry["name"] not in only) or not path.exists():
            continue
        try:
            rows.append(zoo_row(entry, path))
        except Exception as e:  # noqa: BLE001 - e.g. onnxruntime cannot run it
            rows.append({"model": entry["name"], "error": node_tests._first_line(e)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for name in CONVERTERS:
        rs = [r.get(name, {}) for r in rows]
        summary[name] = {"models": len(rows), "converted": sum(1 for r in rs if r and "error" not in r),
                         "outputs_match": sum(1 for r in rs if r.get("matches")),
                         "match_and_meta_run": sum(1 for r in rs if r.get("matches") and r.get("meta_run") == "ok")}
    print(json.dumps(summary))
    return {"summary": summary, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo-cache", default=os.environ.get("FUSE_ATTN_ZOO_CACHE"))
    p.add_argument("--only", action="append", default=[], help="zoo models")
    p.add_argument("--op", nargs="+", action="extend", help="node tests of these ops only")
    p.add_argument("--skip-zoo", action="store_true")
    p.add_argument("--install-report", help="pip's --dry-run --report of `pip install onnx2torch` in this venv")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    import onnx2torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnx2torch": getattr(onnx2torch, "__version__", None) or _version("onnx2torch")}
    print(json.dumps(env), flush=True)
    result = {"environment": env}
    if args.install_report and os.path.exists(args.install_report):
        report = json.loads(Path(args.install_report).read_text())
        result["pip_install_onnx2torch_would_install"] = sorted(
            f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report.get("install", []))
        print(json.dumps(result["pip_install_onnx2torch_would_install"]), flush=True)
    result["node_tests"] = node_test_numbers(args.op)
    if not args.skip_zoo and args.zoo_cache:
        result["zoo"] = zoo_numbers(args.zoo_cache, args.only)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
