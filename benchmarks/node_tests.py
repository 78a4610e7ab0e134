"""ONNX's backend node test cases through compile's lowering: the conformance of `onnx_ops`.

The onnx package ships the node test cases every ONNX backend runs
(`onnx.backend.test.case.node.collect_testcases()`): a one-node model (or its function expanded
into a graph, the `_expanded` cases), inputs and the expected outputs. Each in-scope case is run
the way compile runs a model:
- operands that are constants in exported models (axes, pads, k, scales, shapes, repeats, ...;
  `CONSTANT_OPERANDS`, by the schema's input name) become initializers, which lowering folds;
- every other input is fixed at the case's shape (compile's `--shape`);
- `lower` turns it into a torch module, run on the case's inputs and compared with its expected
  outputs (the case's own rtol/atol for floats, exact for integers and bools, same dtype);
- the module's forward also runs on meta tensors (static_check.run_on_meta): no host reads.

Out of scope (`OUT_OF_SCOPE_OPS`, `OUT_OF_SCOPE_TYPES`): what exported inference models do not
use or what compile cannot express as one static graph; a case is out of scope when any node of
its graph or any of its declared types is.

    python benchmarks/node_tests.py [--op OP ...] [--failures-only] [--json out.json]

imports the fuse_attn of the Python that runs it (its venv), never a checkout's by path.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import warnings
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, defs, numpy_helper

# op -> why it is out of scope (the README's out-of-scope list is checked against these reasons).
_REASONS = {
    "training": "losses, used in training; an exported inference graph has none",
    "random": "nondeterministic, so a compiled graph's output cannot be compared with anything",
    "sequence": "sequence, optional, map and string values; compile lowers tensors of numbers",
    "data-dependent": "the output shape depends on input values; a traced graph has fixed shapes",
    "signal": "signal processing (DFT, STFT, windows), absent from the models compile targets",
    "int-quantized": "integer arithmetic on quantized operands; Inf2's compile path runs float and bf16 matmuls",
    "recurrent": "recurrent loops over time steps, absent from exported attention models",
    "control-flow": "control flow; compile lowers the main graph and refuses these in one line",
}
OUT_OF_SCOPE_OPS: dict[str, str] = {
    **dict.fromkeys(["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"], "training"),
    **dict.fromkeys(["RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli"], "random"),
    **dict.fromkeys(["SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
                     "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional",
                     "OptionalGetElement", "OptionalHasElement", "StringConcat", "StringNormalizer",
                     "StringSplit", "RegexFullMatch"], "sequence"),
    **dict.fromkeys(["NonZero", "Unique", "NonMaxSuppression", "Compress", "ImageDecoder"], "data-dependent"),
    **dict.fromkeys(["DFT", "STFT", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix"], "signal"),
    **dict.fromkeys(["ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"], "int-quantized"),
    **dict.fromkeys(["RNN", "LSTM", "GRU"], "recurrent"),
    **dict.fromkeys(["If", "Loop", "Scan"], "control-flow"),
}
OUT_OF_SCOPE_TYPES = {
    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,  # unsigned 16-64 bit: no torch 2.1 kernels
    TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128,
    *[getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                        "FLOAT8E8M0", "FLOAT6E2M3", "FLOAT6E3M2", "FLOAT4E2M1", "INT4",
                                        "UINT4", "INT2", "UINT2") if hasattr(TensorProto, n)],
}
TYPES_REASON = ("unsigned 16-64-bit, float8, float6, 4-bit and 2-bit, complex and string types: exported "
                "float models do not carry them, and torch 2.1 has no such tensor type or no kernels for it")

# op -> the schema's names of inputs that are constants in exported models (shape-like operands
# and attributes turned inputs by later opsets). In a test case they are graph inputs; compile
# sees them as initializers or folded Constant/Shape arithmetic.
CONSTANT_OPERANDS: dict[str, set[str]] = {
    "Reshape": {"shape"}, "Expand": {"shape"}, "Tile": {"repeats"}, "ConstantOfShape": {"input"},
    "Slice": {"starts", "ends", "axes", "steps"}, "Pad": {"pads", "constant_value", "axes"},
    "Squeeze": {"axes"}, "Unsqueeze": {"axes"}, "Split": {"split"}, "TopK": {"K"}, "Trilu": {"k"},
    "Resize": {"roi", "scales", "sizes"}, "Upsample": {"scales"}, "OneHot": {"depth", "values"},
    "Range": {"start", "limit", "delta"}, "CumSum": {"axis"}, "CumProd": {"axis"},
    "Dropout": {"ratio", "training_mode"}, "Clip": {"min", "max"}, "MaxUnpool": {"output_shape"},
    "CenterCropPad": {"shape"}, "Col2Im": {"image_shape", "block_shape"},
    "DequantizeLinear": {"x_scale", "x_zero_point"}, "QuantizeLinear": {"y_scale", "y_zero_point"},
    "AffineGrid": {"size"}, "EyeLike": set(), "Attention": set(),
    **{op: {"axes"} for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                               "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}


@dataclasses.dataclass
class Case:
    name: str
    op: str  # the op the case tests (for an _expanded case, the op its graph implements)
    model: onnx.ModelProto
    data_sets: list  # [(inputs, expected outputs)]
    rtol: float
    atol: float
    out_of_scope: str | None = None  # why, or None
    # graph inputs that are constants in exported models: for an _expanded case, those of the op it
    # expands (its graph feeds them to the function body's own ops)
    constant_inputs: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Result:
    case: str
    op: str
    ok: bool
    reason: str = ""  # why it failed, one line


def _default_ops() -> set[str]:
    return {s.name for s in defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")}


def in_scope_ops() -> list[str]:
    """Every default-domain op of the installed onnx, minus OUT_OF_SCOPE_OPS."""
    return sorted(_default_ops() - set(OUT_OF_SCOPE_OPS))


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(g)


def _type_scope(vtype: onnx.TypeProto) -> str | None:
    kind = vtype.WhichOneof("value")
    if kind != "tensor_type":
        return _REASONS["sequence"] if kind else None
    return TYPES_REASON if vtype.tensor_type.elem_type in OUT_OF_SCOPE_TYPES else None


def _scope(model: onnx.ModelProto, data_sets) -> str | None:
    """Why the case is out of scope, or None."""
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            return f"domain {node.domain}: not the default ONNX domain"
        if node.op_type in OUT_OF_SCOPE_OPS:
            return f"{node.op_type}: {_REASONS[OUT_OF_SCOPE_OPS[node.op_type]]}"
        # a type named by an attribute (Cast's `to`, EyeLike's `dtype`, ...)
        if any(a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype", "output_dtype")
               and a.i in OUT_OF_SCOPE_TYPES for a in node.attribute):
            return TYPES_REASON
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            inputs = [i.name for i in model.graph.input]
            if node.input[2] in inputs and any(bool(_array(ins[inputs.index(node.input[2])]))
                                               for ins, _ in data_sets):
                return f"Dropout in training mode: {_REASONS['training']}"
    g = model.graph
    for value in [*g.input, *g.output, *g.value_info]:
        why = _type_scope(value.type)
        if why:
            return why
    for init in g.initializer:
        if init.data_type in OUT_OF_SCOPE_TYPES:
            return TYPES_REASON
    return None


_COLLECT_ALL = """
import pickle, sys, warnings
warnings.simplefilter("ignore")
from onnx.backend.test.case.node import collect_testcases
sys.stdout.buffer.write(pickle.dumps(collect_testcases()))
"""


def _all_testcases() -> list:
    """Every node test case. onnx generates them once per process, while importing its case modules,
    and keeps only the op_type of the first `collect_testcases(op_type)` call: after a filtered call
    in this process (another test's), they are collected in a fresh Python."""
    import onnx.backend.test.case.node as node_cases

    if getattr(node_cases, "_TargetOpType", None) is None:
        return node_cases.collect_testcases()
    import pickle
    import subprocess

    done = subprocess.run([sys.executable, "-c", _COLLECT_ALL], capture_output=True, check=True)
    return pickle.loads(done.stdout)  # noqa: S301 - onnx's own test cases, from our own child process


def collect(ops: Iterable[str] | None = None, include_out_of_scope: bool = False) -> list[Case]:
    """The node test cases (in scope unless asked), each named with the op it tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own numpy overflow warnings
        raw = _all_testcases()
    single = {c.name: c.model.graph.node[0].op_type for c in raw if len(c.model.graph.node) == 1}
    single_constants = {c.name: _constant_operand_names(c.model) for c in raw if len(c.model.graph.node) == 1}
    wanted = set(ops) if ops else None
    default_ops = _default_ops()
    out = []
    for c in raw:
        # An _expanded case is its sibling's op written as a function body: `test_x_expanded[_verN]`.
        base = c.name.split("_expanded")[0]
        op = single.get(base) or single.get(c.name) or c.model.graph.node[0].op_type
        if wanted is not None and op not in wanted:
            continue
        constants = _constant_operand_names(c.model) | single_constants.get(base, set())
        case = Case(c.name, op, c.model, list(c.data_sets or []), c.rtol, c.atol, constant_inputs=constants)
        if op in OUT_OF_SCOPE_OPS:
            case.out_of_scope = f"{op}: {_REASONS[OUT_OF_SCOPE_OPS[op]]}"
        elif op not in default_ops:
            case.out_of_scope = f"{op}: not an op of the default ONNX domain"
        else:
            case.out_of_scope = _scope(c.model, case.data_sets)
        if case.out_of_scope is None or include_out_of_scope:
            out.append(case)
    return out


def _constant_operand_names(model: onnx.ModelProto) -> set[str]:
    """Graph inputs that feed a CONSTANT_OPERANDS slot of some node."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    names = set()
    for node in model.graph.node:
        slots = CONSTANT_OPERANDS.get(node.op_type)
        if not slots:
            continue
        try:
            formal = [i.name for i in defs.get_schema(node.op_type, opset, node.domain or "").inputs]
        except defs.SchemaError:
            continue
        for i, name in enumerate(node.input):
            if name and i < len(formal) and formal[i] in slots:
                names.add(name)
    return names


def _array(value) -> np.ndarray:
    """A case's input or output as numpy (some cases store TensorProtos to keep exact types)."""
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def as_compiled(model: onnx.ModelProto, inputs: list, constant: set[str]) -> tuple[onnx.ModelProto, list[str], list]:
    """`model` as compile sees it: the `constant` inputs as initializers, every other input's shape
    fixed to the case's. Returns the model, and the run-time input names and values."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    graph = model_copy.graph
    inits = {t.name for t in graph.initializer}
    values = dict(zip([i.name for i in graph.input if i.name not in inits], inputs))
    kept, names, runtime = [], [], []
    for value in graph.input:
        if value.name in inits:
            kept.append(value)
            continue
        array = _array(values[value.name])
        if value.name in constant:
            tensor = onnx.TensorProto()
            if isinstance(values[value.name], onnx.TensorProto):
                tensor.CopyFrom(values[value.name])
            else:
                tensor.CopyFrom(numpy_helper.from_array(array))
            tensor.name = value.name
            graph.initializer.append(tensor)
            continue
        dims = value.type.tensor_type.shape
        dims.Clear()
        for d in array.shape:
            dims.dim.add().dim_value = int(d)
        kept.append(value)
        names.append(value.name)
        runtime.append(array)
    del graph.input[:]
    graph.input.extend(kept)
    return model_copy, names, runtime


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# Relative size of two ULPs of a half-precision type (7 and 10 mantissa bits). The cases' default
# rtol (1e-3) is below one float16 ULP for values in [0.25, 0.5) and far below bfloat16's; onnx's
# backend runner itself widens it to 2**-6 for bfloat16 outputs.
TWO_ULPS = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}


def _compare(got, expected: np.ndarray, rtol: float, atol: float) -> str | None:
    import torch

    if not isinstance(got, torch.Tensor):
        return f"not a tensor: {type(got).__name__}"
    want_dtype = expected.dtype.name
    got_np = got.detach().float().numpy() if got.dtype == torch.bfloat16 else got.detach().numpy()
    got_dtype = "bfloat16" if got.dtype == torch.bfloat16 else got_np.dtype.name
    if got_dtype != want_dtype:
        return f"dtype {got_dtype}, expected {want_dtype}"
    if got_np.shape != expected.shape:
        return f"shape {got_np.shape}, expected {expected.shape}"
    if want_dtype in TWO_ULPS:  # onnx's own runner: rtol at least two bfloat16 ULPs; float16 alike
        rtol = max(rtol, TWO_ULPS[want_dtype])
        expected = expected.astype(np.float32)
    if np.issubdtype(got_np.dtype, np.floating):
        try:
            np.testing.assert_allclose(got_np, expected, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError:
            with np.errstate(invalid="ignore"):
                err = np.nanmax(np.abs(got_np.astype(np.float64) - expected.astype(np.float64)))
            return f"values differ (max |error| {err:.3g}, rtol {rtol:g}, atol {atol:g})"
        return None
    if not np.array_equal(got_np, expected):
        return f"values differ ({int((got_np != expected).sum())} of {expected.size} elements)"
    return None


def lower_model(model: onnx.ModelProto):
    """compile's lowering of a shape-fixed model without FlashFwd nodes."""
    from fuse_attn.compile.lower import lower

    return lower(model, [], None)


def run_case(case: Case, convert=lower_model, what: str = "lowering") -> Result:
    """Turn the case into a torch module as compile would (`convert`: the model -> a module taking
    the run-time inputs in graph order), run it, compare, and run its forward on meta tensors."""
    import torch

    from fuse_attn.compile.lower import LoweringError, to_torch
    from fuse_attn.compile.static_check import HostRead, run_on_meta

    if not case.data_sets:
        return Result(case.name, case.op, False, "the case has no data")
    for inputs, expected in case.data_sets:
        model, names, runtime = as_compiled(case.model, inputs, case.constant_inputs)
        try:
            module = convert(model)
        except LoweringError as e:
            return Result(case.name, case.op, False, f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - reported as the case's failure
            return Result(case.name, case.op, False, f"{what} raised {_first_line(e)}")
        try:
            feeds = tuple(to_torch(x) for x in runtime)
            with torch.no_grad():
                outs = module(*feeds)
        except Exception as e:  # noqa: BLE001
            return Result(case.name, case.op, False, f"forward raised {_first_line(e)}")
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        if len(outs) != len(expected):
            return Result(case.name, case.op, False, f"{len(outs)} outputs, expected {len(expected)}")
        for i, (got, want) in enumerate(zip(outs, expected)):
            why = _compare(got, _array(want), case.rtol, case.atol)
            if why:
                return Result(case.name, case.op, False, f"output {i}: {why}")
        try:
            metas = run_on_meta(module, feeds)
        except HostRead as e:
            return Result(case.name, case.op, False, f"meta run: {_first_line(e)}")
        except Exception as e:  # noqa: BLE001 - e.g. a converter's module that cannot be copied
            return Result(case.name, case.op, False, f"meta run raised {_first_line(e)}")
        metas = tuple(metas) if isinstance(metas, (tuple, list)) else (metas,)
        if [tuple(m.shape) for m in metas] != [_array(w).shape for w in expected]:
            return Result(case.name, case.op, False, "meta run: output shapes differ from the CPU run's")
    return Result(case.name, case.op, True)


def run(ops: Iterable[str] | None = None) -> list[Result]:
    return [run_case(c) for c in collect(ops)]


def per_op(results: list[Result]) -> dict[str, tuple[int, int]]:
    """op -> (passed, total)."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in results:
        counts[r.op][0] += r.ok
        counts[r.op][1] += 1
    return {op: (p, t) for op, (p, t) in sorted(counts.items())}


README_BEGIN = "<!-- node-tests: generated from tests/test_onnx_conformance.py's lists, which checks it -->"
README_END = "<!-- /node-tests -->"


def readme_block(cases: dict[str, int], not_yet_covered: dict[str, int], onnx_version: str) -> str:
    """The README's account of the conformance: ops covered, case count, what is not yet, what is
    out of scope and why."""
    covered = sorted(op for op in cases if op not in not_yet_covered)
    n_covered = sum(cases[op] for op in covered)
    partial = sum(not_yet_covered.values())
    lines = [README_BEGIN,
             f"With onnx {onnx_version}, the lowering passes {n_covered + partial} of the "
             f"{sum(cases.values())} in-scope node test cases: every case of these {len(covered)} ops "
             f"({n_covered} cases):", "",
             ", ".join(covered) + ".", ""]
    if not_yet_covered:
        lines += [f"Not yet covered ({len(not_yet_covered)} ops, {sum(cases[op] for op in not_yet_covered)} cases, "
                  f"of which {partial} pass, mostly as `_expanded` graphs of ops that have rules):", "",
                  ", ".join(sorted(not_yet_covered)) + ".", ""]
    untested = sorted(set(in_scope_ops()) - set(cases))
    if untested:
        lines += [f"In scope, but onnx has no node test case for them: {', '.join(untested)}.", ""]
    lines += ["Out of scope (a case is, when any of its nodes or declared types is):", ""]
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for op, kind in OUT_OF_SCOPE_OPS.items():
        by_reason[kind].append(op)
    for kind, why in _REASONS.items():
        lines.append(f"- {', '.join(sorted(by_reason[kind]))}: {why}.")
    lines.append(f"- types: {TYPES_REASON}.")
    lines.append("- ops outside the default domain (ai.onnx.ml, ai.onnx.preview.training, ai.onnx.preview): "
                 "not ONNX's standard op set.")
    lines.append(README_END)
    return "\n".join(lines)


def python_dict(name: str, values: dict[str, int], width: int = 110) -> str:
    """`name = {...}` wrapped at `width`, as the test file writes its lists."""
    lines, line = [f"{name} = {{"], "   "
    for op, n in values.items():
        item = f' "{op}": {n},'
        if len(line) + len(item) > width:
            lines.append(line)
            line = "   "
        line += item
    if line.strip():
        lines.append(line)
    return "\n".join(lines + ["}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", nargs="+", action="extend", help="only these ops (as the case's op)")
    parser.add_argument("--failures-only", action="store_true", help="list only ops with a failing case")
    parser.add_argument("--out-of-scope", action="store_true", help="list the out-of-scope cases and why, and exit")
    parser.add_argument("--json", help="write per-case results here")
    parser.add_argument("--lists", action="store_true",
                        help="also print CASES and NOT_YET_COVERED for tests/test_onnx_conformance.py")
    args = parser.parse_args(argv)

    import torch

    import fuse_attn

    torch.set_num_threads(1)
    if args.out_of_scope:
        for c in collect(args.op, include_out_of_scope=True):
            if c.out_of_scope:
                print(f"{c.name} ({c.op}): {c.out_of_scope}")
        return 0
    if args.op:
        unknown = sorted(set(args.op) - _default_ops())
        if unknown:
            print(f"node_tests: error: not default-domain ONNX ops: {', '.join(unknown)}", file=sys.stderr)
            return 2
    print(f"fuse_attn from {fuse_attn.__file__}; onnx {onnx.__version__}, torch {torch.__version__}")
    results = run(args.op)
    table = per_op(results)
    failures = collections.defaultdict(list)
    for r in results:
        if not r.ok:
            failures[r.op].append(r)
    for op, (passed, total) in table.items():
        if args.failures_only and passed == total:
            continue
        print(f"{op:28s} {passed:3d}/{total:<3d}")
        for r in failures[op]:
            print(f"    {r.case}: {r.reason}")
    untested = [op for op in in_scope_ops() if op not in table] if not args.op else []
    passed = sum(r.ok for r in results)
    full = sum(1 for p, t in table.values() if p == t)
    print(f"total: {passed}/{len(results)} cases pass; {full}/{len(table)} ops pass every case"
          + (f"; in scope without a node test case: {', '.join(untested)}" if untested else ""))
    if args.lists:
        print(python_dict("CASES", {op: t for op, (p, t) in table.items()}))
        print(python_dict("NOT_YET_COVERED", {op: p for op, (p, t) in table.items() if p < t}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
