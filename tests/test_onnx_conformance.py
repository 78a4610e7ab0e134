"""compile's lowering passes ONNX's own backend node test cases for every op in scope.

benchmarks/node_tests.py runs the cases (constant operands as initializers, shapes fixed, the
lowered module's output against the case's, and forward on meta tensors: no host reads). Scope:
every default-domain op of onnx minus node_tests.OUT_OF_SCOPE_OPS, and no case with an
out-of-scope type. `CASES` is the one list of what is in scope and how many cases each op has,
so an op cannot lose a case (or leave the scope) without this test failing.
"""

from __future__ import annotations

import os
import sys

import onnx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import node_tests  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The counts are onnx 1.23's node test cases. `python benchmarks/node_tests.py --lists` prints both
# lists from a run (for another onnx, or when a rule lands and an op leaves NOT_YET_COVERED).
ONNX_VERSION = "1.23"

# op -> its in-scope node test cases (an _expanded case counts for the op it expands).
CASES = {
    "Abs": 1, "Acos": 2, "Acosh": 2, "Add": 5, "AffineGrid": 4, "And": 8, "ArgMax": 16, "ArgMin": 16,
    "Asin": 2, "Asinh": 2, "Atan": 2, "Atanh": 2, "Attention": 186, "AveragePool": 20,
    "BatchNormalization": 4, "BitCast": 8, "BitShift": 22, "BitwiseAnd": 3, "BitwiseNot": 2, "BitwiseOr": 3,
    "BitwiseXor": 3, "Cast": 8, "CastLike": 16, "CausalConvWithState": 26, "Ceil": 2, "Celu": 6,
    "CenterCropPad": 12, "Clip": 24, "Col2Im": 5, "Concat": 12, "Constant": 1, "ConstantOfShape": 3,
    "Conv": 6, "ConvTranspose": 11, "Cos": 2, "Cosh": 2, "CumProd": 9, "CumSum": 9, "DeformConv": 4,
    "DepthToSpace": 4, "DequantizeLinear": 4, "Det": 2, "Div": 7, "Dropout": 6, "DynamicQuantizeLinear": 6,
    "Einsum": 9, "Elu": 6, "Equal": 5, "Erf": 1, "Exp": 2, "Expand": 2, "EyeLike": 3, "Flatten": 9,
    "Floor": 2, "Gather": 4, "GatherElements": 3, "GatherND": 3, "Gelu": 8, "Gemm": 11,
    "GlobalAveragePool": 2, "GlobalMaxPool": 2, "Greater": 5, "GreaterOrEqual": 10, "GridSample": 18,
    "GroupNormalization": 4, "HardSigmoid": 6, "HardSwish": 2, "Hardmax": 7, "Identity": 1,
    "InstanceNormalization": 2, "IsInf": 4, "IsNaN": 2, "LRN": 2, "LayerNormalization": 57, "LeakyRelu": 6,
    "Less": 5, "LessOrEqual": 10, "LinearAttention": 14, "Log": 2, "LogSoftmax": 21, "LpNormalization": 6,
    "LpPool": 8, "MatMul": 7, "Max": 11, "MaxPool": 19, "MaxUnpool": 2, "Mean": 3,
    "MeanVarianceNormalization": 3, "Min": 11, "Mish": 2, "Mod": 16, "Mul": 6, "Neg": 2, "Not": 3,
    "OneHot": 6, "Or": 8, "PRelu": 4, "Pad": 6, "Pow": 10, "QuantizeLinear": 5, "RMSNormalization": 38,
    "Range": 4, "Reciprocal": 2, "ReduceL1": 18, "ReduceL2": 18, "ReduceLogSum": 10, "ReduceLogSumExp": 18,
    "ReduceMax": 11, "ReduceMean": 8, "ReduceMin": 10, "ReduceProd": 9, "ReduceSum": 12,
    "ReduceSumSquare": 18, "Relu": 2, "Reshape": 10, "Resize": 39, "ReverseSequence": 3, "RoiAlign": 3,
    "RotaryEmbedding": 16, "Round": 1, "Scatter": 2, "ScatterElements": 7, "ScatterND": 7, "Selu": 6,
    "Shape": 11, "Shrink": 4, "Sigmoid": 2, "Sign": 1, "Sin": 2, "Sinh": 2, "Size": 2, "Slice": 8,
    "Softmax": 21, "Softplus": 4, "Softsign": 4, "SpaceToDepth": 8, "Split": 16, "Sqrt": 2, "Squeeze": 2,
    "Sub": 6, "Sum": 3, "SwiGLU": 6, "Swish": 2, "Tan": 2, "Tanh": 2, "TensorScatter": 3,
    "TfIdfVectorizer": 7, "ThresholdedRelu": 6, "Tile": 2, "TopK": 6, "Transpose": 7, "Trilu": 18,
    "Unsqueeze": 7, "Upsample": 1, "Where": 2, "Xor": 8,
}

# Ops whose rules have not landed yet -> how many of their cases pass today (the _expanded ones,
# built from ops that have rules). Exact, both ways: a case that starts or stops passing fails the
# test, and an op leaves this list when its rule lands. The list only shrinks.
NOT_YET_COVERED = {
    # No rule: both need torchvision's ops (and the detection models using them NonMaxSuppression, out of scope).
    "DeformConv": 0, "RoiAlign": 0,
    # Rules that follow onnxruntime where ONNX's Python reference (which made the expected outputs)
    # differs: MaxUnpool's indices index the output_shape given; Resize's align_corners uses the
    # integer output length (onnxruntime fails the same two cases).
    "MaxUnpool": 1, "Resize": 37,
}


@pytest.fixture(scope="module")
def cases():
    return node_tests.collect()


@pytest.fixture(scope="module")
def results(cases):
    by_op: dict[str, list] = {}
    for case in cases:
        by_op.setdefault(case.op, []).append(node_tests.run_case(case))
    return by_op


def test_the_counts_are_of_this_onnx():
    assert ".".join(onnx.__version__.split(".")[:2]) == ONNX_VERSION, (
        f"CASES counts onnx {ONNX_VERSION}'s cases; with onnx {onnx.__version__} regenerate them "
        f"(python benchmarks/node_tests.py --lists)")


def test_scope_is_every_default_op_but_the_out_of_scope_list(cases):
    """CASES holds every in-scope op with node test cases, with their number of cases: an op
    that loses a case, or a case that leaves the scope, fails here."""
    found: dict[str, int] = {}
    for case in cases:
        found[case.op] = found.get(case.op, 0) + 1
    assert found == CASES
    assert set(CASES) <= set(node_tests.in_scope_ops())
    assert set(NOT_YET_COVERED) <= set(CASES)


def test_out_of_scope_cases_say_why(cases):
    everything = node_tests.collect(include_out_of_scope=True)
    out = [c for c in everything if c.out_of_scope]
    assert len(everything) == len(cases) + len(out)
    assert all(c.out_of_scope for c in out)
    # each excluded op is excluded as a whole, each with one of the README's reasons
    assert {c.op for c in out if c.op in node_tests.OUT_OF_SCOPE_OPS} <= set(node_tests.OUT_OF_SCOPE_OPS)
    assert not {c.op for c in cases} & set(node_tests.OUT_OF_SCOPE_OPS)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_passes_its_node_tests(op, results):
    rows = results.get(op, [])
    failures = [f"{r.case}: {r.reason}" for r in rows if not r.ok]
    passed = len(rows) - len(failures)
    if op in NOT_YET_COVERED:
        assert passed < len(rows), f"{op} passes all {len(rows)} cases: remove it from NOT_YET_COVERED"
        assert passed == NOT_YET_COVERED[op], (f"{op}: {passed} cases pass, NOT_YET_COVERED says "
                                               f"{NOT_YET_COVERED[op]}\n" + "\n".join(failures))
    else:
        assert not failures, f"{op}: {passed}/{len(rows)} pass\n" + "\n".join(failures)


def test_a_wrong_rule_fails_its_cases(monkeypatch):
    """The harness can fail: Relu lowered as identity fails the Relu case on values."""
    from fuse_attn.compile import onnx_ops

    monkeypatch.setitem(onnx_ops.RULES, "Relu", lambda node, args: ((lambda x: x), [args[0]]))
    rows = [node_tests.run_case(c) for c in node_tests.collect(["Relu"]) if "expanded" not in c.name]
    assert rows and not any(r.ok for r in rows)
    assert all("values differ" in r.reason for r in rows), [r.reason for r in rows]


def test_a_host_read_fails_its_cases(monkeypatch):
    """A rule whose forward reads a tensor on the host fails (lowering already runs each rule on
    meta tensors; run_case then runs the whole module's forward on them)."""
    from fuse_attn.compile import onnx_ops

    monkeypatch.setitem(onnx_ops.RULES, "Relu", lambda node, args: ((lambda x: x.clamp(min=float(x.min().item() * 0))), [args[0]]))
    rows = [node_tests.run_case(c) for c in node_tests.collect(["Relu"]) if "expanded" not in c.name]
    assert rows and all(not r.ok and "item() cannot be called on meta tensors" in r.reason for r in rows), rows


def test_readme_states_the_coverage():
    """The README's list of covered ops, case count and out-of-scope reasons is generated from the
    lists above: on a mismatch, paste the block this prints."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = node_tests.readme_block(CASES, NOT_YET_COVERED, ONNX_VERSION)
    assert block in readme, "README.md's node-test block is out of date; it should read:\n" + block


def test_cli_prints_per_op_counts_and_failures(capsys, monkeypatch):
    from fuse_attn.compile import onnx_ops

    monkeypatch.delitem(onnx_ops.RULES, "Tanh")  # a failing op, whatever rules have landed
    assert node_tests.main(["--op", "Relu", "Tanh"]) == 1
    out = capsys.readouterr().out
    assert "Relu                           2/2" in out and "Tanh                           0/2" in out
    assert "test_tanh: lowering: Tanh node 'y': the lowering has no rule for ai.onnx.Tanh" in out
    assert out.strip().splitlines()[-1].startswith("total: 2/4 cases pass; 1/2 ops pass every case")
    assert node_tests.main(["--op", "NoSuchOp"]) == 2
    assert "not default-domain ONNX ops: NoSuchOp" in capsys.readouterr().err
