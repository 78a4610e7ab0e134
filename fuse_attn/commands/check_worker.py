"""One model of `fuse-attn check`, in its own process: fuse it in memory, verify it against the
original in onnxruntime (as `fuse-attn --verify` does), and write the result as JSON.

    python -m fuse_attn.commands.check_worker MODEL RESULT_JSON [FUSE OPTIONS]

The fuse options are `fuse-attn`'s own (`fuse_attn.commands.fuse_options`); --shape and --dim apply only
where this model has the input or symbol they name (`specialize.applicable`).

`fuse_attn.commands.check` starts one of these per model, so a crash or a hang costs only that model.
Nothing is written next to the model: the fused model stays in memory, and onnxruntime resolves
external data against the model's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import onnx

from fuse_attn import modelio, verify
from fuse_attn.commands.fuse_options import add_fuse_options, fuse_options
from fuse_attn.pipeline import FuseOptions, fuse_model, specialize_proto
from fuse_attn.specialize import applicable


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _exporter(proto: onnx.ModelProto) -> str:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
    return f"{proto.producer_name or '?'}/{opset}"


def _dtype(proto: onnx.ModelProto) -> str:
    """The dtype of the first floating-point graph output (what verification compares)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    types = [o.type.tensor_type.elem_type for o in proto.graph.output]
    elem = next((t for t in types if t in floats), types[0] if types else 0)
    return {"FLOAT": "float32", "DOUBLE": "float64"}.get(onnx.TensorProto.DataType.Name(elem),
                                                          onnx.TensorProto.DataType.Name(elem).lower())


def check_model(path: str, options: FuseOptions = FuseOptions()) -> dict:
    """What `fuse-attn check` reports for one model: status "ok", "wrong" (the fused model's
    outputs differ beyond tolerance) or "error" (it could not be read, specialized, fused or run),
    with the block counts, the not-fused reasons, the largest error over every feed (all-ones
    masks, then the padded ones: `feeds`) and what --shape/--dim fixed."""
    result: dict = {"status": "error", "exporter": "", "dtype": "", "found": None, "fused": None,
                    "not_fused": [], "blocks": [], "assumptions": [], "specialized": [], "max_err": None,
                    "outputs": [], "feeds": [], "seconds": None, "problems": []}
    try:
        original = modelio.load_proto(path)
        modelio.validate(original, path)
    except modelio.InputError as exc:
        result["problems"].append(str(exc))
        return result
    result["exporter"], result["dtype"] = _exporter(original), _dtype(original)
    start = time.perf_counter()
    proto = onnx.ModelProto()
    proto.CopyFrom(original)  # the pass edits its copy; the original is compared against
    shapes, dims = applicable(proto, options.shapes, options.dims)
    try:
        fused_model = fuse_model(proto, os.path.dirname(os.path.abspath(path)),
                                 dataclasses.replace(options, shapes=shapes, dims=dims), name=path)
    except modelio.InputError as exc:  # e.g. a --shape of the wrong rank for this model's input
        result["problems"].append(str(exc))
        return result
    except Exception as exc:  # the pass's own failure, reported for this model only
        result["problems"].append(f"fuse raised {_one_line(exc)}")
        # What was fixed before the pass ran (it succeeded, so again on a fresh copy it does).
        specialized = specialize_proto(onnx.ModelProto.FromString(original.SerializeToString()), shapes, dims)
        result["specialized"] = specialized.lines() if specialized is not None else []
        return result
    fused, report, specialized = fused_model.model, fused_model.report, fused_model.specialized
    if specialized is not None:
        result["specialized"] = specialized.lines()
    result["seconds"] = time.perf_counter() - start
    result["found"], result["fused"] = len(report.blocks), report.fused
    result["not_fused"] = [b.reason or "(no reason given)" for b in report.blocks if not b.fused]
    result["blocks"] = json.loads(report.to_json())["blocks"]
    result["assumptions"] = list(report.assumptions)
    if not report.fused:  # the model goes through unchanged: nothing to compare
        result["status"] = "ok"
        return result
    try:
        # Inputs at the specialized shapes (the fused model declares them), fed to both models:
        # all-ones masks, then every token mask the report names padded (verify.verify_fused).
        results = verify.verify_fused(original, fused, report, base_dir=os.path.dirname(os.path.abspath(path)),
                                      shapes_from=fused if specialized is not None else None)
    except Exception as exc:
        result["problems"].append(f"running the original or the fused model in onnxruntime: {_one_line(exc)}")
        return result
    feeds = [r.to_json() for r in results]
    result["feeds"] = feeds
    result["outputs"] = feeds[0]["outputs"]  # the all-ones feed, as before the padded feeds
    checks = [c for r in results for c in r.checks]
    result["max_err"] = max((c.max_abs for c in checks), default=None)
    wrong = [c for c in checks if not c.ok]
    result["problems"] += [c.line() for c in wrong]
    if wrong and report.assumed_all_ones:
        result["problems"] += [line for line in verify.result_lines(results, report) if line.startswith("padded feeds fail")]
    result["status"] = "wrong" if wrong else "ok"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuse_attn.commands.check_worker")
    parser.add_argument("model")
    parser.add_argument("result_path")
    add_fuse_options(parser, many_models=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = check_model(args.model, fuse_options(args))
    with open(args.result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
