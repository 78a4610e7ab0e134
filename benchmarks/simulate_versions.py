"""`compile --simulate`'s error on every zoo model, per flash_fwd kernel version (2.20, 2.21, 2.21-swa):
max |simulated - onnxruntime| / max |onnxruntime| with mixed precision, and max |error| without.

    FUSE_ATTN_ZOO_CACHE=... python benchmarks/simulate_versions.py [--only NAME] [--json out.json]

Same inputs as `compile --simulate` (seed 0); the figures go to the README's compile section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from fuse_attn import fuse, save
from fuse_attn.models.build import build_all
from fuse_attn.compile import constraints, kernel_versions, shapes
from fuse_attn.compile.run import compare_with_onnxruntime
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.lower import lower
from fuse_attn.compile.simulator import simulator_for


def measure(zm) -> dict:
    fused, report = fuse(zm.path)
    with tempfile.TemporaryDirectory() as tmp:
        save(fused, Path(tmp) / "fused.onnx", source_path=zm.path)
        model = shapes.fix_input_shapes(onnx.load(Path(tmp) / "fused.onnx"), {})
    feeds = shapes.example_feeds(model, seed=0)
    reference = run_onnxruntime(model, feeds)
    row = {"model": zm.name, "dtype": zm.entry.get("dtype", "float32"), "blocks": sum(b.fused for b in report.blocks)}
    for mixed in (True, False):
        plans, problems = constraints.plan_model(model, mixed, feeds)
        assert not problems, problems
        for version in kernel_versions.VERSIONS:
            module = lower(model, plans, simulator_for(version))
            rows = compare_with_onnxruntime(model, module, feeds, reference)
            key = f"{version} {'mixed rel' if mixed else 'full abs'}"
            row[key] = max(rel if mixed else err for _, err, rel in rows)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for zm in build_all(only=args.only):
        if zm.skipped or not zm.ok:
            continue
        row = measure(zm)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    for key in [k for k in rows[0] if " " in k]:
        worst = max(rows, key=lambda r: r[key])
        print(f"{key}: max {worst[key]:.2g} ({worst['model']})", file=sys.stderr)


if __name__ == "__main__":
    main()
