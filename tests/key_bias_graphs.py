"""An attention layer with a key mask, as exporters write it (the original), and the same layer
fused by hand into a FlashFwd node that carries the mask in a key-bias column (contract.py):
q' = [q; 1], k' = [k; b / scale], v' = [v; 0], o = o'[..., :d]. Both share their weights, so
the fused model can be checked against onnxruntime running the original.

`key` says what the original adds to each key's scores:
- "mask": an int64 attention_mask (batch, seq) input, (1 - mask) * -10000 as BERT does;
- "bias": a float key_bias (batch, seq) input added as it is (a general per-key term);
- None: nothing (the fused node then has no column: compile appends one when it pads).
`column` tampers with the fused graph's column: "sign" flips it, "unscaled" forgets the
division by the scale.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fuse_attn.ir import contract

MASK_CONSTANT = -10000.0  # BERT's additive mask value in the original


def build(*, batch=2, seq=197, hidden=64, heads=4, causal=False, key="mask", fused=False, column="right",
          peak=3.0, seed=0) -> onnx.ModelProto:
    d = hidden // heads
    scale = 1.0 / np.sqrt(d)
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def weight(name, factor=1.0):
        return init(name, (rng.standard_normal((hidden, hidden)) * factor / np.sqrt(hidden)).astype(np.float32))

    # q and k scaled up: scores with a std of a few (peaked attention), so a wrong mask or scale shows.
    wq, wk, wv, wo = weight("Wq", np.sqrt(peak)), weight("Wk", np.sqrt(peak)), weight("Wv"), weight("Wo")
    init("shape_bshd", np.array([0, 0, heads, d], np.int64))
    init("shape_bsh", np.array([0, 0, hidden], np.int64))
    bshd = {t: node("Reshape", [node("MatMul", ["x", w], t + "_lin"), "shape_bshd"], t + "_bshd")
            for t, w in (("q", wq), ("k", wk), ("v", wv))}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])]
    if key == "mask":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, seq]))
        mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
        key_term = node("Mul", [node("Sub", [init("one_f", np.float32(1.0)), mask_f], "unmasked"),
                                init("mask_constant", np.float32(MASK_CONSTANT))], "key_term")
    elif key == "bias":
        inputs.append(helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, [batch, seq]))
        key_term = "key_bias"
    if not fused:
        q = node("Transpose", [bshd["q"]], "q", perm=[0, 2, 1, 3])
        kt = node("Transpose", [bshd["k"]], "kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [bshd["v"]], "v", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, kt], "qk"), init("scale", np.float32(scale))], "scores")
        if key is not None:
            scores = node("Add", [scores, node("Unsqueeze", [key_term, init("axes12", np.array([1, 2]))],
                                                 "key_term_b11s")], "scores_keyed")
        if causal:
            tril = np.where(np.tril(np.ones((seq, seq), bool)), 0.0, MASK_CONSTANT).astype(np.float32)
            scores = node("Add", [scores, init("causal", tril)], "scores_causal")
        probs = node("Softmax", [scores], "probs", axis=-1)
        o = node("MatMul", [probs, v], "o")
    else:
        q = node("Transpose", [bshd["q"]], "q", perm=[0, 2, 3, 1])  # (b, h, d, s)
        k = node("Transpose", [bshd["k"]], "k", perm=[0, 2, 3, 1])
        v = node("Transpose", [bshd["v"]], "v", perm=[0, 2, 1, 3])  # (b, h, s, d)
        attrs = contract.FlashFwdAttrs(softmax_scale=float(np.float32(scale)), use_causal_mask=causal,
                                       num_heads=heads, num_kv_heads=heads, key_bias_column=key is not None)
        if key is not None:
            if key == "mask":  # the column holds b / scale: 0 for a kept key, the masked value for a padded one
                masked = contract.key_bias_masked_value(scale, TensorProto.FLOAT)
                per_key = node("Mul", [node("Sub", [init("one_c", np.float32(1.0)), mask_f], "unmasked_c"),
                                       init("masked_value", np.float32(masked))], "b")
            else:
                per_key = key_term
            divisor = {"right": scale, "sign": -scale, "unscaled": 1.0}[column]
            col = node("Div", [per_key, init("divisor", np.float32(divisor))], "b_over_scale")
            col = node("Expand", [node("Unsqueeze", [col, init("axes12c", np.array([1, 2]))], "col_b11s"),
                                  init("col_shape", np.array([batch, heads, 1, seq], np.int64))], "col")
            q = node("Concat", [q, init("q_ones", np.ones((batch, heads, 1, seq), np.float32))], "q_col", axis=2)
            k = node("Concat", [k, col], "k_col", axis=2)
            v = node("Concat", [v, init("v_zeros", np.zeros((batch, heads, seq, 1), np.float32))], "v_col", axis=3)
        o = node(contract.OP_TYPE, [q, k, v], "o_kernel")
        nodes[-1].domain, nodes[-1].name = contract.DOMAIN, "flash"
        nodes[-1].attribute.extend(helper.make_attribute(n, a) for n, a in attrs.as_onnx_attributes().items())
        if key is not None:  # the column's output dim is sliced off
            o = node("Slice", [o, init("s0", np.array([0])), init("s1", np.array([d])), init("s3", np.array([3]))],
                     "o_sliced")
    out = node("Reshape", [node("Transpose", [o], "o_bshd", perm=[0, 2, 1, 3]), "shape_bsh"], "o_flat")
    node("Add", [node("MatMul", [out, wo], "proj"), "x"], "y")
    graph = helper.make_graph(nodes, "fused" if fused else "original", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, hidden])], inits)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(contract.DOMAIN, contract.VERSION)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets)
    if fused:
        model.functions.append(contract.make_function(18))
    onnx.checker.check_model(model)
    return model


def score_std(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """The std of the original's unmasked scaled scores (q k^T * scale): peaked attention has a few."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="scores"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.std(session.run(["scores"], feeds)[0]))
