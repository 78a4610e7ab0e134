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


def _exported(g: Nodes, name: str, inputs, outputs, opset: int) -> onnx.ModelProto:
    """The graph as the torch exporter writes it (IR 8, producer pytorch), checked."""
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(rng, rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
    return (rng.normal(size=(rows, cols)) * gain / np.sqrt(rows)).astype(np.float32)


def _decoder_body(g: Nodes, rng, *, layers: int, heads: int, head_dim: int, vocab: int, with_past: bool,
                  mask_from: str, past_dim: str, out_prefix: str = "",
                  position_table: int | None = None, sliced_positions: bool = True,
                  window: int | None = None) -> list[onnx.ValueInfoProto]:
    """The decoder's nodes in `g` (weights as initializers in `g`); returns the output infos.
    `position_table`: rows of a learned position embedding added to the token embedding, read as
    CLIP's text model does (position_ids a Slice of a fixed (1, rows) range buffer by seq), or
    with `sliced_positions=False` added whole. `window`: keys further back than this are masked."""
    hid = heads * head_dim
    total_dim = f"{past_dim} + sequence_length" if with_past else "sequence_length"
    outputs = []
    # The mask, once for all layers, from shapes (and the attention mask's contents).
    i64_0, i64_1 = g.i64(0, "zero"), g.i64(1, "one")
    if with_past:
        past_len = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.i64(2)], "past_len", axis=0)
    else:
        past_len = i64_0
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.i64(1)], "seq_len", axis=0)
    total = g.op("Add", [past_len, seq_len], "total")
    q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, i64_1], "cache_position"), g.i64([1])], "q_pos")
    k_pos = g.op("Unsqueeze", [g.op("Range", [i64_0, total, i64_1], "k_range"), g.i64([0])], "k_pos")
    allowed = g.op("LessOrEqual", [k_pos, q_pos], "causal")
    if window is not None:
        allowed = g.op("And", [allowed, g.op("Less", [g.op("Sub", [q_pos, k_pos]), g.i64(window)])], "windowed")
    if mask_from == "attention_mask":
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "pad", to=TensorProto.BOOL), g.i64([1, 2])], "pad4")
        allowed = g.op("And", [allowed, pad], "allowed")
    bias = g.op("Where", [allowed, g.init(np.float32(0.0), "zero_f"),
                          g.init(np.float32(np.finfo(np.float32).min), "min_f")], "bias")
    x = g.op("Gather", [g.init(rng.normal(size=(vocab, hid)).astype(np.float32), "wte"), "input_ids"], "x", axis=0)
    if position_table is not None:
        wpe = g.init(rng.normal(size=(position_table, hid)).astype(np.float32), "wpe")
        if sliced_positions:
            ends = g.op("Unsqueeze", [seq_len, g.i64([0])], "seq_1d")
            position_ids = g.op("Slice", [g.init(np.arange(position_table, dtype=np.int64)[None],
                                                 "position_ids_buffer"), g.i64([0]), ends, g.i64([1])], "position_ids")
            positions = g.op("Gather", [wpe, position_ids], "position_embeds", axis=0)
        else:
            positions = wpe
        x = g.op("Add", [x, positions], "embeddings")
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
        present = {kind: f"{out_prefix}present.{i}.{kind}" for kind in ("key", "value")}
        if with_past:
            k = g.op("Concat", [f"past_key_values.{i}.key", k_new], out=present["key"], axis=2)
            v = g.op("Concat", [f"past_key_values.{i}.value", v_new], out=present["value"], axis=2)
        else:
            k = g.op("Identity", [k_new], out=present["key"])
            v = g.op("Identity", [v_new], out=present["value"])
        scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        layer_bias = bias
        if position_table is not None:  # transformers' causal_mask[..., :key_states.shape[-2]]
            keys = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [k_new]), g.i64(2)], axis=0), g.i64([0])], "keys_1d")
            layer_bias = g.op("Slice", [bias, g.i64([0]), keys, g.i64([-1])], f"bias{i}")
        probs = g.op("Softmax", [g.op("Add", [scores, layer_bias])], f"probs{i}", axis=-1)
        o = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        x = g.op("Add", [x, g.op("MatMul", [o, g.init(_weights(rng, hid, hid), "w_o")])], f"h{i}")
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(present[kind], TensorProto.FLOAT,
                                                         ["batch_size", heads, total_dim, head_dim]))
    g.op("Identity", [x], out=f"{out_prefix}last_hidden_state")
    outputs.insert(0, helper.make_tensor_value_info(f"{out_prefix}last_hidden_state", TensorProto.FLOAT,
                                                    ["batch_size", "sequence_length", hid]))
    return outputs


def _decoder_inputs(layers: int, heads: int, head_dim: int, past_dim: str, mask_from: str):
    total_dim = f"{past_dim} + sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    if mask_from == "attention_mask":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", total_dim]))
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch_size", heads, past_dim, head_dim]))
    return inputs


def kv_cache_decoder(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 50, opset: int = 14,
                     seed: int = 0, past_dim: str = "past_sequence_length", mask_from: str = "attention_mask"):
    """A decoder with past key/values as optimum exports GPT-2 (transformers 4.x, TorchScript):
    inputs `input_ids (batch_size, sequence_length)`, `attention_mask (batch_size,
    past_sequence_length + sequence_length)`, `past_key_values.{i}.key/value (batch_size, heads,
    past_sequence_length, head_dim)`; outputs the hidden states and `present.{i}.key/value`
    (the Concat of past and new). The mask is transformers' 4D causal mask with padding:
    query i sits at position past + i and sees keys k <= past + i where attention_mask is 1.
    `mask_from="none"`: the mask reads no input contents (causal only)."""
    g = Nodes()
    outputs = _decoder_body(g, np.random.default_rng(seed), layers=layers, heads=heads, head_dim=head_dim,
                            vocab=vocab, with_past=True, mask_from=mask_from, past_dim=past_dim)
    inputs = _decoder_inputs(layers, heads, head_dim, past_dim, mask_from)
    return _exported(g, "decoder_with_past", inputs, outputs, opset)


def decoder_without_past(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 50, opset: int = 14,
                         seed: int = 0):
    """optimum's decoder without past (`decoder_model.onnx`): input_ids and attention_mask
    (batch_size, sequence_length), the causal and padding mask as in `kv_cache_decoder` with no
    past; `present.{i}.key/value` are the new K/V."""
    g = Nodes()
    outputs = _decoder_body(g, np.random.default_rng(seed), layers=layers, heads=heads, head_dim=head_dim,
                            vocab=vocab, with_past=False, mask_from="attention_mask", past_dim="")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch_size", "sequence_length"])
              for n in ("input_ids", "attention_mask")]
    return _exported(g, "decoder", inputs, outputs, opset)


def clip_text_encoder(positions: int = 128, layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 50,
                      opset: int = 14, seed: int = 0, sliced: bool = True, window: int | None = None):
    """CLIP's text model as optimum exports it: input_ids (batch_size, sequence_length), token
    embeddings plus a `positions`-row position table read by `position_ids = buffer[:, :seq]`
    (a Slice of a fixed (1, positions) range), causal self-attention computed from shapes. The
    graph runs only while sequence_length <= positions: past it the Slice stops at `positions`
    rows and the Add of the embeddings cannot broadcast. `sliced=False`: the whole table is
    added, so the graph runs only at sequence_length = positions. `window`: a sliding window."""
    g = Nodes()
    outputs = _decoder_body(g, np.random.default_rng(seed), layers=layers, heads=heads, head_dim=head_dim,
                            vocab=vocab, with_past=False, mask_from="none", past_dim="", position_table=positions,
                            sliced_positions=sliced, window=window)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    return _exported(g, "clip_text", inputs, outputs, opset)


def merged_decoder(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 50, opset: int = 14,
                   seed: int = 0, past_dim: str = "past_sequence_length"):
    """optimum's `decoder_model_merged`: one If on `use_cache_branch` (bool (1,)); the then branch
    is the decoder with past, the else branch the decoder without (its present is the new K/V);
    every block lives in a branch and reads the main graph's inputs and weights from the outer
    scope."""
    bodies, inits = {}, []
    for branch, with_past in (("then", True), ("else", False)):
        g = Nodes(prefix=f"{branch}_")
        outputs = _decoder_body(g, np.random.default_rng(seed), layers=layers, heads=heads, head_dim=head_dim,
                                vocab=vocab, with_past=with_past, mask_from="attention_mask", past_dim=past_dim,
                                out_prefix=f"{branch}_")
        inits += g.inits  # weights live in the main graph; the branches read them from there
        bodies[branch] = helper.make_graph(g.nodes, f"{branch}_branch", [], outputs)
    inputs = _decoder_inputs(layers, heads, head_dim, past_dim, "attention_mask")
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    names = ["last_hidden_state"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    node = helper.make_node("If", ["use_cache_branch"], names, name="optimum::if",
                            then_branch=bodies["then"], else_branch=bodies["else"])
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", heads * head_dim])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", heads, None, head_dim])
                for n in names[1:]]
    graph = helper.make_graph([node], "decoder_model_merged", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="optimum")
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
        elif value.name == "use_cache_branch":
            feeds[value.name] = np.array([past > 0])
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max(initial=0.0))
               for x, y in zip(a, b))


def vit(image: int | str = 224, patch: int = 16, heads: int = 2, head_dim: int = 16, layers: int = 1,
        opset: int = 14, seed: int = 0, cls_token: bool = True, side: int = 224):
    """A ViT encoder as optimum / TorchScript export it from transformers 4.x: `pixel_values
    (batch_size, num_channels, height, width)` (or a fixed image size), Conv patch embedding,
    flatten(2).transpose(1, 2) with Shape-computed reshape targets, the class token expanded to
    the batch and concatenated, the position embedding (1, 1 + patches, hidden) added, then
    non-causal attention. `image="symbolic"` leaves height and width symbolic (optimum's default;
    the position table is for `side` pixels). `cls_token=False`: no class token (SigLIP)."""
    rng = np.random.default_rng(seed)
    g = Nodes()
    hid = heads * head_dim
    side = side if image == "symbolic" else image
    tokens = int(cls_token) + (side // patch) ** 2
    dims = ["batch_size", "num_channels", "height", "width"] if image == "symbolic" else ["batch_size", 3, side, side]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, dims)]
    conv_w = g.init((rng.normal(size=(hid, 3, patch, patch)) / patch / 3).astype(np.float32), "patch_w")
    x = g.op("Conv", ["pixel_values", conv_w], "patches", kernel_shape=[patch, patch], strides=[patch, patch])
    shape = g.op("Shape", [x])
    b = g.op("Unsqueeze", [g.op("Gather", [shape, g.i64(0)], axis=0), g.i64([0])])
    c = g.op("Unsqueeze", [g.op("Gather", [shape, g.i64(1)], axis=0), g.i64([0])])
    x = g.op("Reshape", [x, g.op("Concat", [b, c, g.i64([-1])], axis=0)], "flat")
    x = g.op("Transpose", [x], "tokens", perm=[0, 2, 1])
    if cls_token:
        cls = g.init(rng.normal(size=(1, 1, hid)).astype(np.float32), "cls_token")
        cls = g.op("Expand", [cls, g.op("Concat", [b, g.i64([1, 1])], axis=0)], "cls")
        x = g.op("Concat", [cls, x], "embeddings", axis=1)
    x = g.op("Add", [x, g.init(rng.normal(size=(1, tokens, hid)).astype(np.float32), "position_embeddings")])
    for _ in range(layers):
        xs = g.op("Shape", [x])
        bs = g.op("Unsqueeze", [g.op("Gather", [xs, g.i64(0)], axis=0), g.i64([0])])
        ss = g.op("Unsqueeze", [g.op("Gather", [xs, g.i64(1)], axis=0), g.i64([0])])
        split = g.op("Concat", [bs, ss, g.i64([heads, head_dim])], axis=0)

        def heads_of(gain, hint):
            t = g.op("Reshape", [g.op("MatMul", [x, g.init(_weights(rng, hid, hid, gain), "w_" + hint)]), split])
            return g.op("Transpose", [t], hint, perm=[0, 2, 1, 3])

        q, k, v = heads_of(3.0, "q"), heads_of(3.0, "k"), heads_of(1.0, "v")
        scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                              g.init(np.float32(np.sqrt(head_dim)), "sqrt_d")])
        probs = g.op("Softmax", [scores], "probs", axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.op("Concat", [bs, ss, g.i64([hid])], axis=0)])
        x = g.op("Add", [x, g.op("MatMul", [o, g.init(_weights(rng, hid, hid), "w_o")])])
    g.op("Identity", [x], out="last_hidden_state")
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", hid])]
    return onnx.shape_inference.infer_shapes(_exported(g, "vit", inputs, outputs, opset))


def conformance_attention_cases() -> dict[str, onnx.ModelProto]:
    """ONNX's own conformance models for `Attention` (onnx.backend.test.case.node.attention),
    the op and its expanded function body, by test name."""
    from onnx.backend.test.case.node import collect_testcases

    # Unfiltered: onnx generates the cases once per process, for the op_type of the first call only
    # (test_onnx_conformance.py needs them all). A case and its `_expanded` forms share a name stem.
    cases = collect_testcases()
    attention = {c.name for c in cases if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type == "Attention"}
    return {c.name: c.model for c in cases if c.name.split("_expanded")[0] in attention}


def at_seq(model: onnx.ModelProto, seq: int, symbolic: bool = False) -> onnx.ModelProto:
    """A conformance model whose inputs are exactly Q, K, V, re-declared with seq_q = seq_k =
    `seq` (the kernel's case; the cases themselves use 4 queries over 6 keys) and the outputs'
    shapes left to inference. The op and its expanded body compute from Shape, so nothing
    else changes. `symbolic`: the seq dims are the symbol `seq`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        dims = value.type.tensor_type.shape.dim
        axis = 1 if len(dims) == 3 else 2  # (b, s, h·d) or (b, h, s, d)
        dims[axis].Clear()
        if symbolic:
            dims[axis].dim_param = "seq"
        else:
            dims[axis].dim_value = seq
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def peaked_qkv(model: onnx.ModelProto, seq: int, seed: int = 0, gain: float = 1.0) -> dict[str, np.ndarray]:
    """Inputs for `at_seq(model, seq)`: Q and K scaled so that scores (at the default scale)
    have a std of a few units; `gain` more for a graph whose own scale is smaller."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        tt = value.type.tensor_type
        shape = [seq if (d.dim_param == "seq") else d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        scale = 1.0 if value.name == "V" else 2.0 * gain / np.sqrt(np.sqrt(shape[-1]))
        feeds[value.name] = (rng.normal(size=shape) * scale).astype(dtype)
    return feeds
