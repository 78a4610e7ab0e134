"""Trace every zoo model's lowered module with torch-xla on CPU, as torch_neuronx.trace records it.

torch_neuronx.trace moves the module and its inputs to the XLA device, runs forward, and builds
one HLO module from the outputs. This does the same on PJRT_DEVICE=CPU and reports, per model:
- host transfers during forward (TransferFromDeviceTime samples, `aten::_local_scalar_dense`),
  and graphs executed during forward (each host read executes the pending graph first);
- graphs executed for the whole forward once synced (target: 1) and its HLO instruction count;
- dynamic dims (bounded `<=` dims in the HLO) and custom calls;
- ops torch-xla could not lower (CPU fallbacks, `aten::*` counters);
- max |xla - onnxruntime| on the fused model (FlashFwd via its reference function there).
FlashFwd runs as `sdpa_attention` (plain tensor ops with the kernel's meaning): the NKI kernel
is a custom call that only the Neuron SDK provides.

Needs torch 2.9 + torch-xla 2.9 (torch-neuronx's last XLA line): run it through
benchmarks/xla_trace.sh, which builds that venv. Not part of the test run.

    PJRT_DEVICE=CPU python benchmarks/xla_trace.py --zoo-cache .zoo-cache [--only NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met

from fuse_attn import fuse, models
from fuse_attn.models.check import fuse_options
from fuse_attn.compile import constraints, shapes
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.static_check import sdpa_attention


def transfers_from_device() -> int:
    data = met.metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0


def graphs_executed() -> int:
    """Graphs run on the device (a compiled graph may come from torch-xla's cache: same HLO, no CompileTime)."""
    data = met.metric_data("ExecuteTime")
    return int(data[0]) if data else 0


def fallback_ops() -> dict[str, int]:
    return {name: met.counter_value(name) for name in met.counter_names() if name.startswith("aten::")}


def hlo_figures(outputs: list[torch.Tensor]) -> dict:
    text = torch_xla._XLAC._get_xla_tensors_hlo(outputs)
    instructions = [line for line in text.splitlines() if re.match(r"\s*(ROOT\s+)?%?[\w.\-]+ = ", line)]
    return {
        "hlo_instructions": len(instructions),
        "dynamic_dims": len(re.findall(r"<=\d+", text)),
        "custom_calls": len(re.findall(r"custom-call\(", text)),
    }


def fused_at_manifest_shapes(entry: dict, path: Path) -> onnx.ModelProto:
    """Fused with the manifest's options, inputs fixed at its shapes (what `compile --shape` gets),
    as tests/test_compile_zoo.py does."""
    fused, _ = fuse(str(path), **fuse_options(entry))
    given = {name: tuple(spec["shape"]) for name, spec in entry["inputs"].items()}
    return shapes.fix_input_shapes(fused, given)


def instrument_check(device) -> dict:
    """The counters on a forward with one `.item()`: they must see it, or their zeros mean nothing."""

    class ReadsOnce(torch.nn.Module):
        def forward(self, x):
            return x * 2 if (x.sum() > 0).item() else x * 3

    x = torch.ones(4, 4).to(device)
    met.clear_all()
    out = ReadsOnce()(x)
    seen = {"host_transfers_in_forward": transfers_from_device(),
            "local_scalar_dense_in_forward": met.counter_value("aten::_local_scalar_dense") or 0,
            "graphs_executed_in_forward": graphs_executed()}
    torch_xla.sync()
    out.cpu()
    if not (seen["host_transfers_in_forward"] and seen["graphs_executed_in_forward"]):
        raise SystemExit(f"the counters do not see a host read: {seen}")
    return seen


def trace_one(entry: dict, path: Path, device, attention) -> dict:
    name = entry["name"]
    model = fused_at_manifest_shapes(entry, path)
    feeds = shapes.example_feeds(model, seed=0)
    plans, problems = constraints.plan_model(model, False, feeds)
    if problems:
        return {"model": name, "error": "; ".join(problems)}
    module = lower(model, plans, attention)
    module = module.to(device)
    inputs = [to_torch(feeds[n]).to(device) for n in module.input_names]

    met.clear_all()
    with torch.no_grad():
        outs = module(*inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    row = {
        "model": name,
        "flash_fwd": len(plans),
        "steps": len(module.steps),
        # Everything below "during forward" must be 0: forward only records the graph.
        "host_transfers_in_forward": transfers_from_device(),
        "local_scalar_dense_in_forward": met.counter_value("aten::_local_scalar_dense") or 0,
        "graphs_executed_in_forward": graphs_executed(),
        "cpu_fallback_ops": fallback_ops(),
    }
    row.update(hlo_figures(outs))
    torch_xla.sync()  # what the trace hands to the compiler: one graph
    xm.wait_device_ops()  # execution is asynchronous: its metrics land when it is done
    row["graphs"] = graphs_executed()
    got = [o.cpu() for o in outs]
    reference = run_onnxruntime(model, feeds)
    diffs = [np.abs(g.float().numpy().astype(np.float64) - r.astype(np.float64)) for g, r in zip(got, reference)]
    row["max_abs_vs_onnxruntime"] = max(float(d.max()) for d in diffs)
    row["max_rel_vs_onnxruntime"] = max(float(d.max()) / (float(np.abs(r).max()) or 1.0) for d, r in zip(diffs, reference))
    row["dtype"] = str(got[0].dtype).replace("torch.", "")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo-cache", default=os.environ.get(models.CACHE_ENV, str(models.DEFAULT_CACHE)))
    p.add_argument("--only", action="append", default=[])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if os.environ.get("PJRT_DEVICE") != "CPU":
        print("set PJRT_DEVICE=CPU (benchmarks/xla_trace.sh does)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    device = torch_xla.device()
    attention = sdpa_attention
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_xla": torch_xla.__version__,
           "onnx": onnx.__version__}
    print(json.dumps(env))
    print(json.dumps({"instrument_check (a forward with one .item())": instrument_check(device)}))
    rows = []
    for entry in models.load_manifest()["models"]:
        name = entry["name"]
        path = Path(args.zoo_cache) / f"{name}.onnx"
        if (args.only and name not in args.only) or not path.exists():
            continue
        if entry.get("compile_known_issue"):  # the manifest's known failure, before lowering
            rows.append({"model": entry["name"], "known_issue": entry["compile_known_issue"]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        start = time.perf_counter()
        try:
            row = trace_one(entry, path, device, attention)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the run
            row = {"model": name, "error": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "hlo_instructions" in r]
    summary = {
        "models": len(rows), "traced": len(ok), "errors": [r["model"] for r in rows if "error" in r],
        "known_issues": [r["model"] for r in rows if "known_issue" in r],
        "host_transfers_in_forward": sum(r["host_transfers_in_forward"] for r in ok),
        "local_scalar_dense_in_forward": sum(r["local_scalar_dense_in_forward"] for r in ok),
        "graphs_executed_in_forward": sum(r["graphs_executed_in_forward"] for r in ok),
        "models_with_one_graph": sum(r["graphs"] == 1 for r in ok),
        "dynamic_dims": sum(r["dynamic_dims"] for r in ok),
        "custom_calls": sum(r["custom_calls"] for r in ok),
        "cpu_fallback_ops": sorted({op for r in ok for op in r["cpu_fallback_ops"]}),
        "hlo_instructions_range": [min((r["hlo_instructions"] for r in ok), default=0),
                                   max((r["hlo_instructions"] for r in ok), default=0)],
        "max_abs_vs_onnxruntime_fp32": max((r["max_abs_vs_onnxruntime"] for r in ok if r["dtype"] == "float32"), default=None),
        "max_rel_vs_onnxruntime_fp16": max((r["max_rel_vs_onnxruntime"] for r in ok if r["dtype"] == "float16"), default=None),
    }
    print(json.dumps({"summary": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "instrument_check": instrument_check(device), "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
