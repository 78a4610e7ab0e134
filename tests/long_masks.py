"""Attention graphs at long fixed seq lengths (up to 131,072) whose mask is computed from index
constants, for proofs that must not grow with seq². q, k, v are graph inputs: nothing of size
seq × head dim is ever built, and the graphs are a few KB.

`MaskSpec.form` says what the mask is; `MaskSpec.expected` is the oracle: the block may fuse only
when the mask is exactly top-left causal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FORMS = ("causal", "causal_trilu", "causal_additive", "window", "diagonal_masked", "one_above_kept", "shifted",
         "padding_keys", "padding_rows", "one_wrong", "none")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    seq: int
    form: str
    param: int = 0  # window, shift, padding length
    row: int = 0  # one_wrong: the entry flipped
    col: int = 0
    heads: int = 2
    head_dim: int = 64

    @property
    def expected(self) -> str:
        """What the pass must do: fuse "causal", fuse with "no mask", or leave it "alone"."""
        if self.form in ("causal", "causal_trilu", "causal_additive"):
            return "causal"
        if self.form == "shifted" and self.param >= self.seq - 1:  # j <= i + seq - 1: every key, no mask
            return "no mask"
        return "no mask" if self.form == "none" else "alone"


def build(spec: MaskSpec) -> onnx.ModelProto:
    s, h, d = spec.seq, spec.heads, spec.head_dim
    inits = []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nodes = []

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    pos = node("Range", [const("zero", np.int64(0)), const("len", np.int64(s)), const("one", np.int64(1))], "pos")
    rows = node("Unsqueeze", [pos, const("ax1", np.array([1]))], "rows")  # (s, 1): query index i
    cols = node("Unsqueeze", [pos, const("ax0", np.array([0]))], "cols")  # (1, s): key index j
    keep = None
    form = spec.form
    if form in ("causal", "causal_additive", "window", "padding_keys", "padding_rows", "one_wrong"):
        keep = node("LessOrEqual", [cols, rows], "keep")
    elif form == "causal_trilu":
        ones = node("ConstantOfShape", [const("ss", np.array([s, s]))], "ones",
                    value=numpy_helper.from_array(np.array([1], dtype=np.uint8)))
        keep = node("Cast", [node("Trilu", [ones], "lower", upper=0)], "keep", to=TensorProto.BOOL)
    elif form == "diagonal_masked":
        keep = node("Less", [cols, rows], "keep")
    elif form == "one_above_kept":
        keep = node("LessOrEqual", [cols, node("Add", [rows, const("one_b", np.int64(1))], "rows1")], "keep")
    elif form == "shifted":
        keep = node("LessOrEqual", [cols, node("Add", [rows, const("shift", np.int64(spec.param))], "rows1")],
                    "keep")
    if form == "window":  # also j > i - window
        keep = node("And", [keep, node("Greater", [cols, node("Sub", [rows, const("w", np.int64(spec.param))], "lo")],
                                       "inside")], "keep_w")
    elif form == "padding_keys":  # also j < L
        keep = node("And", [keep, node("Less", [cols, const("L", np.int64(spec.param))], "valid")], "keep_p")
    elif form == "padding_rows":  # rows i >= L see nothing but their first key
        keep = node("And", [keep, node("Or", [node("Less", [rows, const("L", np.int64(spec.param))], "valid"),
                                              node("Equal", [cols, const("z", np.int64(0))], "first")], "either")],
                    "keep_p")
    elif form == "one_wrong":  # flip entry (row, col)
        hit = node("And", [node("Equal", [rows, const("r", np.int64(spec.row))], "at_r"),
                           node("Equal", [cols, const("c", np.int64(spec.col))], "at_c")], "hit")
        keep = node("Xor", [keep, hit], "keep_x")

    scores = node("MatMul", ["q", node("Transpose", ["k"], "kt", perm=[0, 1, 3, 2])], "scores")
    scaled = node("Mul", [scores, const("scale", np.float32(0.125))], "scaled")
    if keep is None:
        masked = scaled
    elif form == "causal_additive":
        bias = node("Where", [keep, const("zero_f", np.float32(0)), const("min_f", np.float32(-3.4e38))], "bias")
        masked = node("Add", [scaled, node("Unsqueeze", [bias, const("ax01", np.array([0, 1]))], "bias4")], "masked")
    else:
        masked = node("Where", [keep, scaled, const("neg_inf", np.float32(-np.inf))], "masked")
    probs = node("Softmax", [masked], "probs", axis=-1)
    node("MatMul", [probs, "v"], "out")
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, h, s, d])  # noqa: E731
    graph = helper.make_graph(nodes, "long", [io("q"), io("k"), io("v")], [io("out")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
