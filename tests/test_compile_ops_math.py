"""The rules of fuse_attn.compile.ops_math (and the onnx_ops rules it extends), each lowered from a
one-node graph and compared with onnxruntime running that graph (onnx's reference evaluator for
an op onnxruntime lacks); and each forward run on meta tensors, which raises on any host read
(static_check.run_on_meta)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from fuse_attn.compile.lower import LoweringError, lower, to_torch
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RNG = np.random.default_rng(0)


def normal(*shape, scale=2.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def uniform(*shape, low=-0.9, high=0.9):
    return RNG.uniform(low, high, shape).astype(np.float32)


@dataclasses.dataclass
class Case:
    op: str
    inputs: dict  # runtime inputs, name -> array
    constants: dict = dataclasses.field(default_factory=dict)  # initializers, name -> array (or None: an omitted input)
    attrs: dict = dataclasses.field(default_factory=dict)
    order: list | None = None  # the node's input names, when not inputs then constants
    outputs: int = 1
    opset: int = 18
    reference: str = "onnxruntime"  # or "onnx": onnx's reference evaluator, for ops onnxruntime lacks

    def model(self) -> onnx.ModelProto:
        names = self.order or [*self.inputs, *self.constants]
        node = helper.make_node(self.op, [n if n in self.inputs or self.constants.get(n) is not None else ""
                                          for n in names],
                                [f"y{i}" for i in range(self.outputs)], **self.attrs)
        graph = helper.make_graph(
            [node], "g",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for n, a in self.inputs.items()],
            [helper.make_empty_tensor_value_info(f"y{i}") for i in range(self.outputs)],
            [numpy_helper.from_array(np.asarray(a), n) for n, a in self.constants.items() if a is not None])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])


def case(op, inputs, id=None, **kw):
    return pytest.param(Case(op, inputs, **kw), id=id or op)


i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

ACTIVATIONS = [
    case("HardSigmoid", {"x": normal(3, 4)}, attrs={"alpha": 0.3, "beta": 0.4}),
    case("HardSwish", {"x": normal(3, 4, scale=4)}, opset=22),
    case("LeakyRelu", {"x": normal(3, 4)}, attrs={"alpha": 0.2}),
    case("Elu", {"x": normal(3, 4)}, attrs={"alpha": 0.7}),
    case("PRelu", {"x": normal(2, 3, 4)}, constants={"slope": uniform(3, 1, low=0.1, high=0.5)}),
    case("PRelu", {"x": normal(2, 3, 4), "slope": uniform(4)}, id="PRelu-runtime-slope"),
    case("Selu", {"x": normal(3, 4)}),
    case("Celu", {"x": normal(3, 4)}, attrs={"alpha": 0.5}),
    case("ThresholdedRelu", {"x": normal(3, 4)}, attrs={"alpha": 0.3}),
    case("Shrink", {"x": normal(3, 4)}, attrs={"lambd": 0.7, "bias": 0.2}),
    case("Shrink", {"x": np.arange(-5, 6, dtype=np.int32)}, attrs={"lambd": 1.5, "bias": 1.0}, id="Shrink-int32"),
    case("Softsign", {"x": normal(3, 4)}),
    case("Mish", {"x": normal(3, 4)}),
    case("Swish", {"x": normal(3, 4)}, attrs={"alpha": 1.5}, opset=24),
]

UNARY = [
    *[case(op, {"x": uniform(3, 4)}) for op in ("Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Atanh")],
    case("Acosh", {"x": uniform(3, 4, low=1.0, high=4.0)}),
    case("IsInf", {"x": np.array([1.0, np.inf, -np.inf, np.nan, 0.0], np.float32)}),
    case("IsInf", {"x": np.array([1.0, np.inf, -np.inf, np.nan], np.float32)}, attrs={"detect_negative": 0},
         id="IsInf-positive"),
    case("IsInf", {"x": np.array([1.0, np.inf, -np.inf], np.float32)}, attrs={"detect_positive": 0},
         id="IsInf-negative"),
]

BITWISE = [
    *[case(op, {"a": RNG.integers(-100, 100, (2, 3), dtype=np.int32), "b": RNG.integers(-100, 100, (3,), dtype=np.int32)})
      for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")],
    case("BitwiseNot", {"x": RNG.integers(-128, 127, (2, 3), dtype=np.int8)}),
    case("BitShift", {"x": np.array([16, 4, 1, 255], np.uint8), "y": np.array([1, 2, 3, 7], np.uint8)},
         attrs={"direction": "LEFT"}, id="BitShift-left"),
    case("BitShift", {"x": np.array([16, 4, 1, 255], np.uint8), "y": np.array([1, 2, 3, 7], np.uint8)},
         attrs={"direction": "RIGHT"}, id="BitShift-right"),
]

axes_18 = {"axes": i64(-1, 0)}
REDUCTIONS = [
    *[case(op, {"x": uniform(3, 4, 5, low=0.1, high=2.0)}, constants=axes_18, attrs={"keepdims": 0}, id=f"{op}-18")
      for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")],
    *[case(op, {"x": normal(3, 4, 5)}, attrs={"axes": [1]}, opset=13, id=f"{op}-13")
      for op in ("ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")],
    *[case(op, {"x": uniform(3, 4, low=0.1, high=2.0)}, constants={"axes": np.zeros(0, np.int64)},
           attrs={"noop_with_empty_axes": 1}, id=f"{op}-noop")
      for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")],
    case("ReduceL1", {"x": RNG.integers(-9, 9, (3, 4), dtype=np.int32)}, constants={"axes": i64(1)}, id="ReduceL1-int32"),
    case("ReduceLogSumExp", {"x": normal(3, 4, scale=60)}, constants={"axes": i64(1)}, id="ReduceLogSumExp-large"),
    case("ReduceMax", {"x": np.zeros((2, 0, 3), np.float32)}, constants={"axes": i64(1)}, attrs={"keepdims": 0},
         id="ReduceMax-empty"),
    case("ReduceMin", {"x": np.zeros((2, 0, 3), np.int32)}, constants={"axes": i64(1)}, id="ReduceMin-empty-int32"),
    case("ReduceSumSquare", {"x": np.zeros((2, 0), np.float32)}, constants={"axes": i64(1)}, id="ReduceSumSquare-empty"),
    case("ReduceLogSumExp", {"x": np.zeros((2, 0), np.float32)}, constants={"axes": i64(1)}, id="ReduceLogSumExp-empty"),
]

ties = np.array([[3, 1, 3, 0], [2, 2, 1, 2], [0, 5, 5, 5]], np.float32)
SELECTION = [
    case("ArgMax", {"x": ties}, attrs={"axis": 1, "select_last_index": 1}, id="ArgMax-last"),
    case("ArgMin", {"x": ties}, attrs={"axis": 1, "keepdims": 0, "select_last_index": 1}, id="ArgMin-last"),
    case("ArgMax", {"x": ties}, attrs={"axis": -2, "select_last_index": 1}, id="ArgMax-last-negative-axis"),
    case("ArgMin", {"x": ties}, attrs={"axis": 0}, id="ArgMin-first"),
    case("TopK", {"x": ties}, constants={"k": i64(3)}, attrs={"axis": 1}, outputs=2, id="TopK-ties"),
    case("TopK", {"x": ties}, constants={"k": i64(2)}, attrs={"axis": 0, "largest": 0}, outputs=2, id="TopK-smallest"),
    case("TopK", {"x": normal(4, 6)}, constants={"k": i64(4)}, outputs=2, id="TopK-random"),
    case("TopK", {"x": RNG.integers(0, 4, (3, 8), dtype=np.int32)}, constants={"k": i64(5)}, outputs=2, id="TopK-int32"),
    case("TopK", {"x": normal(2, 5)}, attrs={"k": 2}, opset=9, outputs=2, id="TopK-opset9"),
]

SCANS = [
    case("CumProd", {"x": uniform(3, 4, low=0.5, high=1.5)}, constants={"axis": i64(1)}, opset=26),
    case("CumProd", {"x": np.array([[1, 2, 0, 3], [2, 3, 4, 5]], np.float32)}, constants={"axis": i64(-1)},
         attrs={"exclusive": 1, "reverse": 1}, opset=26, id="CumProd-exclusive-reverse-zero"),
    case("CumSum", {"x": RNG.integers(-5, 5, (3, 4), dtype=np.int32)}, constants={"axis": i64(0)},
         attrs={"exclusive": 1, "reverse": 1}, id="CumSum-int32-exclusive-reverse"),
    case("CumSum", {"x": normal(3, 4)}, constants={"axis": i64(1)}, attrs={"exclusive": 1}, id="CumSum-exclusive"),
]

data = normal(4, 3, 5)
INDEXING = [
    case("OneHot", {"indices": np.array([[0, -1, 3], [7, -5, 2]], np.int64), "values": np.array([-1.0, 2.0], np.float32)},
         constants={"depth": np.array(5.0, np.float32)}, attrs={"axis": 1}, order=["indices", "depth", "values"]),
    case("OneHot", {"indices": np.array([1.0, 2.0, 3.0, -1.0], np.float32)},
         constants={"depth": np.array(3.0, np.float32), "values": np.array([0.0, 7.0], np.float32)},
         id="OneHot-float-indices"),
    case("ScatterND", {"data": data, "indices": np.array([[1], [-1]], np.int64), "updates": normal(2, 3, 5)}),
    case("ScatterND", {"data": data, "indices": np.array([[0, 1], [-1, 2], [0, 1]], np.int64), "updates": normal(3, 5)},
         attrs={"reduction": "add"}, id="ScatterND-add-duplicates"),
    *[case("ScatterND", {"data": data, "indices": np.array([[[2, 0, 4]], [[2, 0, 4]]], np.int64),
                         "updates": normal(2, 1)}, attrs={"reduction": r}, id=f"ScatterND-{r}")
      for r in ("mul", "max", "min")],
    case("ScatterND", {"data": data, "updates": normal(2, 3, 5)}, constants={"indices": np.array([[3], [0]], np.int64)},
         order=["data", "indices", "updates"], id="ScatterND-constant-indices"),
    case("ScatterElements", {"data": data, "indices": np.array([[[0, -1, 2, 1, 0]]], np.int64), "updates": normal(1, 1, 5)},
         attrs={"axis": 1}),
    *[case("ScatterElements", {"data": data, "indices": np.array([[[0], [0], [-3]]], np.int64), "updates": normal(1, 3, 1)},
           attrs={"axis": -1, "reduction": r}, id=f"ScatterElements-{r}") for r in ("add", "mul", "max", "min")],
    case("Scatter", {"data": data[0], "indices": np.array([[1, 0, 2, 2, 1]], np.int64), "updates": normal(1, 5)},
         attrs={"axis": 0}, opset=10),
]

QUANT = [
    case("DequantizeLinear", {"x": RNG.integers(-128, 127, (2, 3, 4), dtype=np.int8)},
         constants={"scale": uniform(3, low=0.01, high=0.1), "zp": np.array([-3, 0, 5], np.int8)}, id="Dequantize-axis-int8"),
    case("DequantizeLinear", {"x": RNG.integers(0, 255, (2, 3), dtype=np.uint8), "scale": np.array(0.05, np.float32),
                              "zp": np.array(128, np.uint8)}, id="Dequantize-runtime-scale"),
    case("DequantizeLinear", {"x": RNG.integers(-10**6, 10**6, (4, 3), dtype=np.int32)},
         constants={"scale": np.array([1e-3, 2e-3, 5e-4], np.float32)}, id="Dequantize-int32"),
    case("DequantizeLinear", {"x": RNG.integers(0, 255, (5, 4), dtype=np.uint8)},
         constants={"scale": uniform(2, 4, low=0.01, high=0.1), "zp": RNG.integers(0, 255, (2, 4), dtype=np.uint8)},
         attrs={"axis": 0, "block_size": 3}, opset=21, id="Dequantize-blocked"),
    case("QuantizeLinear", {"x": np.array([[0.25, 0.75, 1.25, -0.25], [-1.75, 300.0, -300.0, 2.5]], np.float32)},
         constants={"scale": np.array(0.5, np.float32), "zp": np.array(10, np.uint8)}, id="Quantize-half-to-even-saturate"),
    case("QuantizeLinear", {"x": normal(2, 3, 4, scale=50)},
         constants={"scale": uniform(3, low=0.1, high=1.0), "zp": np.array([-3, 0, 5], np.int8)}, id="Quantize-axis-int8"),
    case("QuantizeLinear", {"x": normal(3, 4)}, constants={"scale": np.array(0.02, np.float32)}, id="Quantize-no-zero-point"),
    case("QuantizeLinear", {"x": normal(3, 5, scale=1000)},
         constants={"scale": uniform(3, 2, low=0.01, high=0.1), "zp": np.array([[1, -2]] * 3, np.int16)},
         attrs={"axis": 1, "block_size": 4}, opset=21, id="Quantize-blocked-int16"),
    case("QuantizeLinear", {"x": normal(3, 4).astype(np.float16)},
         constants={"scale": np.array(0.03, np.float16), "zp": np.array(-1, np.int8)}, opset=21, id="Quantize-float16"),
]

OTHERS = [
    case("SwiGLU", {"a": normal(3, 4), "b": normal(3, 4)}, attrs={"alpha": 1.7}, opset=28, reference="onnx"),
    case("BitCast", {"x": normal(3, 4)}, attrs={"to": onnx.TensorProto.INT32}, opset=26),
    case("BitCast", {"x": RNG.integers(-128, 127, (5,), dtype=np.int8)}, attrs={"to": onnx.TensorProto.UINT8}, opset=26,
         id="BitCast-int8-uint8"),
    case("Det", {"x": normal(2, 3, 3)}),
    case("Hardmax", {"x": ties}, attrs={"axis": 1}, opset=13),
    case("Hardmax", {"x": np.stack([ties, ties[::-1]])}, attrs={"axis": 1}, opset=11, id="Hardmax-opset11-2d"),
    case("EyeLike", {"x": normal(3, 4)}, attrs={"k": -1, "dtype": onnx.TensorProto.INT32}),
    case("ReverseSequence", {"x": normal(4, 3, 2), "lens": i64(4, 1, 2)}, attrs={"batch_axis": 1, "time_axis": 0}),
    case("ReverseSequence", {"x": normal(3, 5), "lens": i64(5, 0, 3)}, attrs={"batch_axis": 0, "time_axis": 1},
         id="ReverseSequence-batch-first"),
    case("TensorScatter", {"cache": normal(2, 3, 6, 4), "update": normal(2, 3, 2, 4), "write": i64(1, 4)}, opset=24),
    case("TensorScatter", {"cache": normal(2, 6, 4), "update": normal(2, 3, 4), "write": i64(5, 2)},
         attrs={"axis": 1, "mode": "circular"}, opset=24, id="TensorScatter-circular"),
    case("TensorScatter", {"cache": normal(2, 6, 4), "update": normal(2, 3, 4)}, attrs={"axis": -2}, opset=24,
         id="TensorScatter-prefill"),
    *[case("TfIdfVectorizer", {"x": x}, attrs=dict(
        min_gram_length=low, max_gram_length=2, max_skip_count=skip, mode=mode, ngram_counts=[0, 4],
        ngram_indexes=[0, 1, 2, 3, 4, 5, 6], pool_int64s=[2, 3, 5, 4, 5, 6, 7, 8, 6, 7],
        **({"weights": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]} if weighted else {})), opset=9, id=f"TfIdf-{id}")
      for id, x, low, skip, mode, weighted in [
          ("tf", np.array([1, 1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8], np.int32), 2, 0, "TF", False),
          ("tf-skips-2d", np.array([[1, 1, 3, 3, 3, 7], [8, 6, 7, 5, 6, 8]], np.int64), 1, 3, "TF", False),
          ("idf-weighted", np.array([[5, 6, 7, 4], [3, 2, 5, 5]], np.int64), 1, 1, "IDF", True),
          ("tfidf-weighted", np.array([5, 5, 6, 7, 8, 6, 7], np.int64), 1, 2, "TFIDF", True),
          ("tfidf-no-weights", np.array([5, 5, 6, 7, 8, 6, 7], np.int64), 1, 2, "TFIDF", False),
      ]],
    case("DynamicQuantizeLinear", {"x": normal(3, 4)}, outputs=3, opset=11),
    case("DynamicQuantizeLinear", {"x": uniform(3, 4, low=1.0, high=3.0)}, outputs=3, opset=11,
         id="DynamicQuantizeLinear-positive"),
    case("DynamicQuantizeLinear", {"x": np.zeros((2, 2), np.float32)}, outputs=3, opset=11,
         id="DynamicQuantizeLinear-zeros"),
]

ALL = ACTIVATIONS + UNARY + BITWISE + REDUCTIONS + SELECTION + SCANS + INDEXING + QUANT + OTHERS


def lowered(c: Case):
    return lower(c.model(), [], sdpa_attention)


def run_lowered(c: Case) -> list[np.ndarray]:
    with torch.no_grad():
        out = lowered(c)(*[to_torch(a) for a in c.inputs.values()])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def run_reference(c: Case) -> list[np.ndarray]:
    if c.reference == "onnx":
        return [np.asarray(a) for a in ReferenceEvaluator(c.model()).run(None, c.inputs)]
    session = ort.InferenceSession(c.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, c.inputs)


@pytest.mark.parametrize("c", ALL)
def test_rule_matches_onnxruntime(c):
    expected, got = run_reference(c), run_lowered(c)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6 if e.dtype == np.float32 else 1e-3)
        else:
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("c", ALL)
def test_forward_runs_on_meta_tensors(c):
    """No host read in forward, and the meta run's shapes are the real ones."""
    inputs = tuple(to_torch(a) for a in c.inputs.values())
    out = run_on_meta(lowered(c), inputs)
    shapes = [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]
    assert shapes == [g.shape for g in run_lowered(c)]


def test_scatter_indices_stay_runtime_inputs():
    """Runtime indices are read by forward as tensors, not folded or read at lowering."""
    c = Case("ScatterND", {"data": data, "indices": np.array([[0, 1]], np.int64), "updates": normal(1, 5)})
    module = lowered(c)
    assert [s.node.split()[0] for s in module.steps] == ["ScatterND"]
    assert module.input_names == ["data", "indices", "updates"]


def test_topk_puts_the_lower_index_first_among_equal_values():
    c = Case("TopK", {"x": np.zeros((1, 700), np.float32)}, constants={"k": i64(600)}, attrs={"axis": 1}, outputs=2)
    values, indices = run_lowered(c)
    np.testing.assert_array_equal(indices[0], np.arange(600))


@pytest.mark.parametrize("direction, expected", [("LEFT", [-128, -128, 0, 0, 0]), ("RIGHT", [32, -1, -1, 0, -1])])
def test_bitshift_of_signed_values_and_counts_past_the_width(direction, expected):
    """ONNX's BitShift (opset 28) on signed types: an arithmetic right shift, bits past the sign
    dropped, and a count < 0 or >= the width giving only the sign fill (onnxruntime has no signed BitShift)."""
    c = Case("BitShift", {"x": np.array([64, -1, -8, 4, -1], np.int8), "y": np.array([1, 7, 8, -1, 127], np.int8)},
             attrs={"direction": direction}, opset=28)
    np.testing.assert_array_equal(run_lowered(c)[0], np.array(expected, np.int8))


@pytest.mark.parametrize("c, message", [
    (Case("TopK", {"x": normal(2, 3)}, constants={"k": i64(4)}, outputs=2), "k=4 for an axis of 3"),
    (Case("TopK", {"x": normal(2, 3), "k": i64(1)}, outputs=2), "depends on the contents of an input"),
    (Case("OneHot", {"indices": i64(1, 2), "depth": i64(3), "values": np.array([0, 1], np.float32)}),
     "depends on the contents of an input"),
    (Case("QuantizeLinear", {"x": normal(2, 3)}, constants={"scale": uniform(2), "zp": np.zeros(2, np.uint8)}),
     "a scale of shape (2,) for an input of shape (2, 3) on axis 1"),
    (Case("DequantizeLinear", {"x": np.zeros((5, 4), np.int8)}, constants={"scale": uniform(1, 4)},
          attrs={"axis": 0, "block_size": 3}, opset=21), "in blocks of 3"),
    (Case("ScatterElements", {"data": normal(2, 3), "indices": i64(0), "updates": normal(1)}, attrs={"reduction": "mean"}),
     "reduction 'mean'"),
])
def test_refused_nodes_say_why(c, message):
    with pytest.raises(LoweringError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lowered(c)


def test_initializer_of_a_type_torch_lacks_is_refused_in_one_line():
    x = helper.make_tensor("x8", onnx.TensorProto.FLOAT8E4M3FN, [2], [1.0, 2.0])
    graph = helper.make_graph([helper.make_node("Identity", ["x8"], ["y"])], "g", [],
                              [helper.make_empty_tensor_value_info("y")], [x])
    with pytest.raises(LoweringError, match="float8e4m3fn are not supported"):
        lower(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), [], sdpa_attention)


def test_onehot_depth_from_the_model_file_allocates_nothing_at_lowering():
    """depth is data in the (untrusted) model: lowering keeps no table of that size."""
    c = Case("OneHot", {"indices": i64(1, 2)}, constants={"depth": i64(2 ** 40), "values": np.array([0, 1], np.float32)})
    module = lowered(c)
    assert sum(b.numel() for b in module.buffers()) < 100
