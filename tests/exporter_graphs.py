"""Graphs in the form real exporters write them, built with onnx.helper: the forms of issue 11
that `attention_graphs.AttnSpec` does not cover (KV-cache decoders, subgraphs, image models,
the ONNX Attention op's 3D and expanded forms). Each builder follows the exporter's node
pattern; the weights make attention peaked (scores with std of a few units), so that a wrong
scale or mask shows in a comparison with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Nodes:
    """A node and initializer list with unique names."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix, self.n = prefix, 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, out: str | None = None, **attrs) -> str:
        result = out or self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [result], name=self.name("n_" + op_type), **attrs))
        return result

    def init(self, array, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def i64(self, values, hint: str = "c") -> str:
        return self.init(np.array(values, dtype=np.int64), hint)


def _weights(rng, rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
    return (rng.normal(size=(rows, cols)) * gain / np.sqrt(rows)).astype(np.float32)


def kv_cache_decoder(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 50, opset: int = 14,
                     seed: int = 0, past_dim: str = "past_sequence_length", mask_from: str = "attention_mask"):
    """A decoder with past key/values as optimum exports GPT-2 (transformers 4.x, TorchScript):
    inputs `input_ids (batch_size, sequence_length)`, `attention_mask (batch_size,
    past_sequence_length + sequence_length)`, `past_key_values.{i}.key/value (batch_size, heads,
    past_sequence_length, head_dim)`; outputs the hidden states and `present.{i}.key/value`
    (the Concat of past and new). The mask is transformers' 4D causal mask with padding:
    query i sits at position past + i and sees keys k <= past + i where attention_mask is 1.
    `mask_from="none"`: the mask reads no input contents (causal only)."""
    rng = np.random.default_rng(seed)
    g = Nodes()
    hid = heads * head_dim
    total_dim = f"{past_dim} + sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    if mask_from == "attention_mask":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", total_dim]))
    outputs = []
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch_size", heads, past_dim, head_dim]))
    # The mask, once for all layers, from shapes (and the attention mask's contents).
    i64_0, i64_1 = g.i64(0, "zero"), g.i64(1, "one")
    past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.i64(2)], "past_len", axis=0)
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.i64(1)], "seq_len", axis=0)
    total = g.op("Add", [past_len, seq_len], "total")
    q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, i64_1], "cache_position"), g.i64([1])], "q_pos")
    k_pos = g.op("Unsqueeze", [g.op("Range", [i64_0, total, i64_1], "k_range"), g.i64([0])], "k_pos")
    allowed = g.op("LessOrEqual", [k_pos, q_pos], "causal")
    if mask_from == "attention_mask":
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "pad", to=TensorProto.BOOL), g.i64([1, 2])], "pad4")
        allowed = g.op("And", [allowed, pad], "allowed")
    bias = g.op("Where", [allowed, g.init(np.float32(0.0), "zero_f"),
                          g.init(np.float32(np.finfo(np.float32).min), "min_f")], "bias")
    x = g.op("Gather", [g.init(rng.normal(size=(vocab, hid)).astype(np.float32), "wte"), "input_ids"], "x", axis=0)
    split = g.i64([0, 0, heads, head_dim], "split_shape")
    merge = g.i64([0, 0, hid], "merge_shape")
    scale = g.init(np.float32(np.sqrt(head_dim)), "sqrt_d")
    for i in range(layers):
        def heads_of(w, hint):
            t = g.op("Reshape", [g.op("MatMul", [x, g.init(w, "w_" + hint)]), split])
            return g.op("Transpose", [t], hint, perm=[0, 2, 1, 3])

        q = heads_of(_weights(rng, hid, hid, 3.0), f"q{i}")
        k_new = heads_of(_weights(rng, hid, hid, 3.0), f"k{i}")
        v_new = heads_of(_weights(rng, hid, hid), f"v{i}")
        k = g.op("Concat", [f"past_key_values.{i}.key", k_new], out=f"present.{i}.key", axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v_new], out=f"present.{i}.value", axis=2)
        scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], f"probs{i}", axis=-1)
        o = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = g.op("Add", [x, g.op("MatMul", [o, g.init(_weights(rng, hid, hid), "w_o")])], f"h{i}")
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch_size", heads, total_dim, head_dim]))
    g.op("Identity", [x], out="last_hidden_state")
    outputs.insert(0, helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                    ["batch_size", "sequence_length", hid]))
    graph = helper.make_graph(g.nodes, "decoder_with_past", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def decoder_feeds(model: onnx.ModelProto, batch: int = 2, seq: int = 16, past: int = 0, vocab: int = 50,
                  seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "input_ids":
            feeds[value.name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, past + seq), dtype=np.int64)
        elif value.name.startswith("past_key_values"):
            feeds[value.name] = rng.normal(size=(batch, dims[1].dim_value, past, dims[3].dim_value)).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max(initial=0.0))
               for x, y in zip(a, b))
