"""Padding masks fused exactly (issue 17): the key mask rides in one extra head-dim column.

Every fused model is compared against onnxruntime running the ORIGINAL model with padded masks —
right, left and random lengths per batch entry, under causal and not — on every query row that
sees a key (a row with no visible key is an artefact of the original's mask constant, and no real
position reads it). Scores are peaked (std of a few), so a wrong column, sign or scale shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attention_graphs import POSITIVE_VARIANTS, build, flash_nodes, fuse_model, node_attrs, run_comparable
from exporter_graphs import decoder_feeds, decoder_without_past, run
from fuse_attn.ir import contract

TOL = 1e-4


def padded_masks(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """0/1 masks (batch, seq): right- and left-padded at several lengths, and random lengths."""
    rng = np.random.default_rng(seed)
    lengths = [max(1, seq // 2), seq, 1, max(1, seq - 3)][:batch] + list(rng.integers(1, seq + 1, max(0, batch - 4)))
    out = {}
    for side in ("right", "left"):
        m = np.zeros((batch, seq), np.int64)
        for b, n in enumerate(lengths):
            if side == "right":
                m[b, :n] = 1
            else:
                m[b, seq - n:] = 1
        out[side] = m
    out["random"] = (rng.random((batch, seq)) < 0.6).astype(np.int64)
    out["random"][:, 0] = 1  # every row of a non-causal block sees a key
    return out


def visible_rows(mask: np.ndarray, causal: bool) -> np.ndarray:
    """(batch, seq) bool: the query rows that see at least one key."""
    keep = mask.astype(bool)
    if not causal:
        return np.broadcast_to(keep.any(axis=1, keepdims=True), keep.shape)
    return np.cumsum(keep, axis=1) > 0


def _diff_on_visible(a: np.ndarray, b: np.ndarray, rows: np.ndarray, seq_axis: int) -> float:
    """Max |a - b| over batch entries and query rows in `rows` (the output's axes 0 and `seq_axis`)."""
    a, b = np.moveaxis(a, seq_axis, 1), np.moveaxis(b, seq_axis, 1)
    return float(np.abs(a - b)[rows].max())


# --- hand-built blocks: q, k, v inputs and a mask computed from an input --------------------------

B, H, S, D = 3, 4, 16, 8


def _block(mask_nodes, mask_inputs, *, causal: bool = False, heads: int = H, kv: int | None = None,
           head_dim: int = D, seq: int = S, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """Softmax(QKᵀ/√d + mask) V, the mask `bias` written by `mask_nodes` from `mask_inputs`; with
    `causal` a constant causal Where before the mask. kv < heads: repeat_kv by Expand+Reshape."""
    kv = kv or heads
    nodes = [helper.make_node("Transpose", ["K"], ["kt"], perm=[0, 1, 3, 2])]
    k_for = "kt"
    if kv != heads:
        g = heads // kv
        nodes += [helper.make_node("Unsqueeze", ["kt", "ax2"], ["kt5"]),
                  helper.make_node("Expand", ["kt5", "kexp"], ["kte"]),
                  helper.make_node("Reshape", ["kte", "kshape"], ["ktr"]),
                  helper.make_node("Unsqueeze", ["V", "ax2"], ["v5"]),
                  helper.make_node("Expand", ["v5", "vexp"], ["ve"]),
                  helper.make_node("Reshape", ["ve", "vshape"], ["vr"])]
        k_for = "ktr"
    nodes += [helper.make_node("MatMul", ["Q", k_for], ["qk"]),
              helper.make_node("Div", ["qk", "sqrt_d"], ["scores"])]
    scores = "scores"
    if causal:
        nodes.append(helper.make_node("Where", ["causal", scores, "neg_inf"], ["causal_scores"]))
        scores = "causal_scores"
    nodes += list(mask_nodes)
    nodes += [helper.make_node("Add", [scores, "bias"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vr" if kv != heads else "V"], ["Y"])]
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(np.array(np.sqrt(head_dim), np_dtype), "sqrt_d"),
             numpy_helper.from_array(np.tril(np.ones((seq, seq), bool)), "causal"),
             numpy_helper.from_array(np.array(-np.inf, np_dtype), "neg_inf"),
             numpy_helper.from_array(np.array(1.0, np_dtype), "one_f"),
             numpy_helper.from_array(np.array(0.0, np_dtype), "zero_f"),
             numpy_helper.from_array(np.array(np.finfo(np_dtype).min, np_dtype), "min_f"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2"),
             numpy_helper.from_array(np.array([1, 3], np.int64), "ax13")]
    if kv != heads:
        g = heads // kv
        inits += [numpy_helper.from_array(np.array([1, 1, g, 1, 1], np.int64), "kexp"),
                  numpy_helper.from_array(np.array([0, heads, head_dim, seq], np.int64), "kshape"),
                  numpy_helper.from_array(np.array([1, 1, g, 1, 1], np.int64), "vexp"),
                  numpy_helper.from_array(np.array([0, heads, seq, head_dim], np.int64), "vshape")]
    inputs = [helper.make_tensor_value_info("Q", dtype, [B, heads, seq, head_dim]),
              helper.make_tensor_value_info("K", dtype, [B, kv, seq, head_dim]),
              helper.make_tensor_value_info("V", dtype, [B, kv, seq, head_dim])] + list(mask_inputs)
    graph = helper.make_graph(nodes, "block", inputs, [helper.make_tensor_value_info("Y", dtype, [B, heads, seq, head_dim])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _hf_additive(mask_dtype=TensorProto.INT64, seq: int = S):
    """transformers' extended mask: (1 - m[:, None, None, :]) * min."""
    nodes = [helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
             helper.make_node("Cast", ["m4"], ["m4f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one_f", "m4f"], ["inv"]),
             helper.make_node("Mul", ["inv", "min_f"], ["bias"])]
    return nodes, [helper.make_tensor_value_info("attention_mask", mask_dtype, [B, seq])]


def _bool_where():
    """A bool key mask: Where(m, 0, -inf)."""
    nodes = [helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
             helper.make_node("Where", ["m4", "zero_f", "neg_inf"], ["bias"])]
    return nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, [B, S])]


def _feeds(model: onnx.ModelProto, mask: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Peaked q, k (score std of a few after 1/√d) and the mask in the input's dtype."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        tt = value.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if value.name in ("Q", "K"):
            feeds[value.name] = (rng.normal(size=shape) * 2.0 / np.sqrt(np.sqrt(shape[-1])) * 1.5).astype(dtype)
        elif value.name == "V":
            feeds[value.name] = rng.normal(size=shape).astype(dtype)
        else:
            feeds[value.name] = mask.astype(dtype)
    return feeds


def _block_diff(model, fused, mask, causal, seed=0) -> float:
    feeds = _feeds(model, mask, seed)
    (a,), (b,) = run(model, feeds), run(fused, feeds)
    return _diff_on_visible(a, b, visible_rows(mask, causal), 2)  # Y (b, h, s, d)


def _fused_one(model, **kw):
    fused, report = fuse_model(model, **kw)
    (block,) = report.blocks
    return fused, block


@pytest.mark.parametrize("form", ["hf_int64", "hf_float", "bool_where"])
@pytest.mark.parametrize("causal", [False, True])
def test_hand_built_key_masks_fuse_exactly(form, causal):
    nodes, inputs = {"hf_int64": _hf_additive, "hf_float": lambda: _hf_additive(TensorProto.FLOAT),
                     "bool_where": _bool_where}[form]()
    model = _block(nodes, inputs, causal=causal)
    fused, block = _fused_one(model)
    assert block.fused and block.causal == causal, block.reason
    assert block.key_mask_inputs == ["attention_mask"], block
    assert (block.key_mask_assumption is None) == (form == "bool_where"), block.key_mask_assumption
    if form != "bool_where":
        assert block.key_mask_assumption == "assumes 'attention_mask' holds only 0 and 1"
    (node,) = flash_nodes(fused)
    assert node_attrs(node)["key_bias_column"] == 1
    onnx.checker.check_model(fused, full_check=True)
    for name, mask in padded_masks(B, S).items():
        assert _block_diff(model, fused, mask, causal) <= TOL, name


def test_gqa_key_mask_fuses_exactly():
    nodes, inputs = _hf_additive()
    model = _block(nodes, inputs, causal=True, heads=8, kv=2)
    fused, block = _fused_one(model)
    assert block.fused and block.kv_heads == 2 and block.key_mask_inputs == ["attention_mask"], block.reason
    for name, mask in padded_masks(B, S).items():
        assert _block_diff(model, fused, mask, True) <= TOL, name


def test_fp16_column_stays_finite():
    """fp16 tops out at 65504: the masked value over the scale must fit (contract.key_bias_masked_value)."""
    nodes, inputs = _hf_additive()
    for n in nodes:
        if n.op_type == "Cast":
            n.attribute[0].i = TensorProto.FLOAT16
    model = _block(nodes, inputs, dtype=TensorProto.FLOAT16)
    fused, block = _fused_one(model)
    assert block.fused, block.reason
    for name, mask in padded_masks(B, S).items():
        feeds = _feeds(model, mask)
        (a,), (b,) = run(model, feeds), run(fused, feeds)
        assert np.isfinite(b).all()
        assert _diff_on_visible(a.astype(np.float32), b.astype(np.float32), visible_rows(mask, False), 2) <= 4e-3, name


def test_masked_value_fits_the_dtype():
    assert contract.key_bias_masked_value(0.125, TensorProto.FLOAT) == contract.KEY_BIAS_MASKED
    fp16 = contract.key_bias_masked_value(0.05, TensorProto.FLOAT16)
    assert fp16 is not None and fp16 <= contract.KEY_BIAS_MASKED_AT_MOST and abs(fp16 / 0.05) <= 65504
    assert contract.key_bias_masked_value(1e-3, TensorProto.FLOAT16) is None  # nothing masked enough fits


def _mutated_column(fused: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The fused model with the column's masked entry multiplied by `factor`."""
    out = onnx.ModelProto()
    out.CopyFrom(fused)
    consts = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant"}
    wheres = [n for n in out.graph.node if n.op_type == "Where" and n.output[0].endswith("_key_bias")]
    assert wheres
    for n in wheres:
        c = consts[n.input[2]]
        v = numpy_helper.to_array(c.attribute[0].t)
        c.attribute[0].t.CopyFrom(numpy_helper.from_array(np.asarray(v * factor, v.dtype), c.output[0]))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_a_wrong_column_is_caught(causal):
    """A column with the wrong sign, or a scale too small to mask, changes real rows far past the tolerance."""
    nodes, inputs = _hf_additive()
    model = _block(nodes, inputs, causal=causal)
    fused, _ = _fused_one(model)
    mask = padded_masks(B, S)["left"]
    assert _block_diff(model, fused, mask, causal) <= TOL
    for factor in (-1.0, 1e-4):
        assert _block_diff(model, _mutated_column(fused, factor), mask, causal) > 100 * TOL, factor


# --- the builders' padding variants and an exporter's decoder ---------------------------------------

@pytest.mark.parametrize("name", ["padding_batch3_seq16", "causal_padding_gqa_batch2", "padding_symbolic",
                                  "padding_input", "causal_plus_padding", "causal_padding_fp16",
                                  "causal_padding_bf16"])
def test_builder_padding_variants_match_under_padded_masks(name):
    spec = POSITIVE_VARIANTS[name]
    built = build(spec)
    fused, report = fuse_model(built.model)
    assert all(b.fused and b.key_mask_inputs == ["attention_mask"] for b in report.blocks), report.blocks
    for seq in ((16, 40) if spec.symbolic_seq else (spec.seq,)):
        base = built.inputs(seq=seq if spec.symbolic_seq else None)
        for side, mask in padded_masks(spec.batch, seq).items():
            feeds = dict(base, attention_mask=mask)
            (a, *_), (b, *_) = run_comparable(built.model, feeds), run_comparable(fused, feeds)
            rows = visible_rows(mask, spec.kernel_causal)
            assert _diff_on_visible(a, b, rows, 1) <= TOL, (name, seq, side)


def test_decoder_with_attention_mask_fuses_exactly():
    """The exporters' decoder form: And(causal, Cast(attention_mask, bool)) -> Where(0, min) -> Add."""
    model = decoder_without_past()
    fused, report = fuse_model(model)
    assert [(b.fused, b.causal, b.key_mask_inputs) for b in report.blocks] == [(True, True, ["attention_mask"])] * 2, \
        report.blocks
    for seq in (16, 24):
        feeds = decoder_feeds(model, batch=3, seq=seq)
        for side, mask in padded_masks(3, seq).items():
            feeds["attention_mask"] = mask
            a, b = run(model, feeds)[0], run(fused, feeds)[0]
            assert _diff_on_visible(a, b, visible_rows(mask, True), 1) <= TOL, (seq, side)


# --- near misses, each with its reason ------------------------------------------------------------

def _reason(model, **kw) -> str:
    _, block = _fused_one(model, **kw)
    assert not block.fused
    return block.reason


def test_query_side_mask_refused():
    nodes = [helper.make_node("Unsqueeze", ["attention_mask", "ax13"], ["m4"]),  # (b, 1, s, 1)
             helper.make_node("Cast", ["m4"], ["m4f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one_f", "m4f"], ["inv"]),
             helper.make_node("Mul", ["inv", "min_f"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])])
    assert "query axis" in _reason(model)


def test_mask_differing_between_heads_refused():
    nodes = [helper.make_node("Unsqueeze", ["head_mask", "ax2"], ["m4"]),  # (b, h, 1, s)
             helper.make_node("Cast", ["m4"], ["m4f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one_f", "m4f"], ["inv"]),
             helper.make_node("Mul", ["inv", "min_f"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("head_mask", TensorProto.INT64, [B, H, S])])
    assert "differs between q heads" in _reason(model)


def test_gqa_group_heads_with_different_masks_refused():
    nodes = [helper.make_node("Unsqueeze", ["head_mask", "ax2"], ["m4"]),
             helper.make_node("Cast", ["m4"], ["m4f"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one_f", "m4f"], ["inv"]),
             helper.make_node("Mul", ["inv", "min_f"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("head_mask", TensorProto.INT64, [B, 8, S])],
                   heads=8, kv=2, causal=True)
    assert "differs between q heads" in _reason(model)


def test_packed_sequences_refused():
    """segment ids: query i sees key j when seg[i] == seg[j] (a block-diagonal mask)."""
    nodes = [helper.make_node("Unsqueeze", ["segment_ids", "ax13"], ["seg_q"]),
             helper.make_node("Unsqueeze", ["segment_ids", "ax12"], ["seg_k"]),
             helper.make_node("Equal", ["seg_q", "seg_k"], ["same"]),
             helper.make_node("Where", ["same", "zero_f", "neg_inf"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("segment_ids", TensorProto.INT64, [B, S])])
    assert "two different positions" in _reason(model)


def test_cumulative_positions_refused():
    nodes = [helper.make_node("Constant", [], ["axis1"], value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("CumSum", ["attention_mask", "axis1"], ["pos"]),
             helper.make_node("Unsqueeze", ["pos", "ax12"], ["m4"]),
             helper.make_node("Cast", ["m4"], ["bias"], to=TensorProto.FLOAT)]
    model = _block(nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])])
    assert "combines its positions" in _reason(model)


def test_no_room_for_the_column_at_head_dim_128():
    nodes, inputs = _hf_additive()
    model = _block(nodes, inputs, heads=1, head_dim=128)
    reason = _reason(model)
    assert "no room for the column" in reason and "--assume-no-padding" in reason, reason


def test_mask_that_is_not_a_key_mask_refused():
    """A float input added as is (an arbitrary bias): all ones does not read as no mask."""
    nodes = [helper.make_node("Unsqueeze", ["bias_in", "ax12"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("bias_in", TensorProto.FLOAT, [B, S])], causal=True)
    assert "is not a key mask" in _reason(model)


def test_two_mask_inputs_refused():
    nodes = [helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
             helper.make_node("Unsqueeze", ["other_mask", "ax12"], ["o4"]),
             helper.make_node("And", ["m4", "o4"], ["both"]),
             helper.make_node("Where", ["both", "zero_f", "neg_inf"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, [B, S]),
                           helper.make_tensor_value_info("other_mask", TensorProto.BOOL, [B, S])])
    assert "one input" in _reason(model)


# --- the zoo's exports that take attention_mask -----------------------------------------------------

ZOO_MASKED = ["bert-padmask-dynamo-sdpa", "gpt2-tf444-torchscript17-eager", "gpt2-tf444-torchscript14-eager",
              "gpt2-tf444-torchscript17-sdpa", "gpt2-optimum-textgen", "llama-tf444-torchscript17-eager",
              "llama-tf444-torchscript14-sdpa", "llama-tf444-torchscript17-sdpa", "llama-optimum-textgen",
              "bart-optimum-encoder"]
ZOO_CAUSAL = {"gpt2", "llama"}


def _zoo_feeds(session, batch: int, seq: int, mask: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        if value.name == "attention_mask":
            feeds[value.name] = mask
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif value.name == "token_type_ids":
            feeds[value.name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[value.name] = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
    return feeds


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO_MASKED)
def test_zoo_masked_exports_fuse_exactly_under_padding(name, zoo_log, tmp_path):
    """BERT/RoBERTa/BART encoders and GPT-2/LLaMA decoders as the exporters write them, fused with the
    default flags, against the original under right, left and random padding."""
    import onnxruntime as ort

    from fuse_attn import fuse
    from fuse_attn.models.build import build_all
    from fuse_attn.modelio import save

    (zm,) = build_all(only=name, log=zoo_log)
    assert zm.ok, zm.error
    fused, report = fuse(str(zm.path))
    assert report.blocks and all(b.fused and b.key_mask_inputs == ["attention_mask"] for b in report.blocks), \
        report.lines()
    out = tmp_path / "fused.onnx"
    save(fused, out)
    original = ort.InferenceSession(str(zm.path), providers=["CPUExecutionProvider"])
    rewritten = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    causal = name.split("-")[0] in ZOO_CAUSAL
    dims = [d for d in original.get_inputs()[0].shape]
    seqs = [dims[1]] if isinstance(dims[1], int) else [16, 40]
    batch = 3 if not isinstance(dims[0], int) else dims[0]
    for seq in seqs:
        for side, mask in padded_masks(batch, seq).items():
            feeds = _zoo_feeds(original, batch, seq, mask)
            a, b = original.run(None, feeds)[0], rewritten.run(None, feeds)[0]
            rows = visible_rows(mask, causal)
            assert _diff_on_visible(a, b, rows, 1) <= 2e-4 * max(1.0, float(np.abs(a).max())), (seq, side)


# --- a general additive term per key, and the ONNX Attention op's attn_mask --------------------------

def test_general_additive_term_per_key_is_carried_as_it_is():
    """A float (b, s) input added to unmasked scores: no 0/1 assumption, the term rides in the column
    as it is (a -inf or huge negative term at the finite masked value), and the report says what
    precision it gets under mixed precision."""
    nodes = [helper.make_node("Unsqueeze", ["key_bias", "ax12"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, [B, S])])
    fused, block = _fused_one(model)
    assert block.fused and not block.causal and block.key_mask_inputs == ["key_bias"], block.reason
    assert block.key_mask_assumption is None
    assert any("as it is" in n and "2^-8" in n for n in block.notes), block.notes
    rng = np.random.default_rng(3)
    terms = rng.normal(size=(B, S)) * 3.0
    terms[0, -4:] = -np.inf
    terms[1, :5] = -1e30
    feeds = _feeds(model, terms.astype(np.float32))
    (a,), (b,) = run(model, feeds), run(fused, feeds)
    assert np.isfinite(b).all() and float(np.abs(a - b).max()) <= TOL
    # a wrong column (the term's sign) is caught
    wrong = onnx.ModelProto()
    wrong.CopyFrom(fused)
    for n in wrong.graph.node:
        if n.op_type == "Div" and n.output[0].endswith("_key_bias"):
            n.op_type = "Sub"
    assert float(np.abs(a - run(wrong, feeds)[0]).max()) > 100 * TOL


def _general_term_block(form: str) -> onnx.ModelProto:
    """A float key_bias (b, s) input made into the scores' term `bias` with constants beside it:
    - "per_key": plus a constant per key, and Expand to (b, h, s, s): one term per (batch entry, key);
    - "per_head_factor": times a slope per head (ALiBi's factors): the heads' terms differ;
    - "causal_in_operand": plus a 0/-inf causal triangle in the same operand, on a block without a mask;
    - "rows_of_two_terms": the first half of the query rows read the term, the rest twice the term
      (a Concat of two computations of the same input element)."""
    rng = np.random.default_rng(5)
    x4 = helper.make_node("Unsqueeze", ["key_bias", "ax12"], ["x4"])  # (b, 1, 1, s)
    consts = {}
    if form == "per_key":
        consts["per_key"] = rng.normal(size=(1, 1, 1, S)).astype(np.float32)
        consts["full"] = np.array([B, H, S, S], np.int64)
        nodes = [x4, helper.make_node("Add", ["x4", "per_key"], ["x4c"]),
                 helper.make_node("Expand", ["x4c", "full"], ["bias"])]
    elif form == "per_head_factor":
        consts["slopes"] = (2.0 ** (-np.arange(1, H + 1, dtype=np.float32))).reshape(1, H, 1, 1)
        nodes = [x4, helper.make_node("Mul", ["x4", "slopes"], ["bias"])]
    elif form == "causal_in_operand":
        consts["triangle"] = np.where(np.tril(np.ones((S, S), bool)), 0.0, -np.inf).astype(np.float32)[None, None]
        nodes = [x4, helper.make_node("Add", ["triangle", "x4"], ["bias"])]
    else:
        consts["two"] = np.array(2.0, np.float32)
        consts["half_rows"] = np.array([B, 1, S // 2, S], np.int64)
        nodes = [x4, helper.make_node("Mul", ["x4", "two"], ["x4x2"]),
                 helper.make_node("Expand", ["x4", "half_rows"], ["top"]),
                 helper.make_node("Expand", ["x4x2", "half_rows"], ["bottom"]),
                 helper.make_node("Concat", ["top", "bottom"], ["bias"], axis=2)]
    constants = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in consts.items()]
    return _block(constants + nodes, [helper.make_tensor_value_info("key_bias", TensorProto.FLOAT, [B, S])])


def _general_terms() -> np.ndarray:
    rng = np.random.default_rng(4)
    terms = rng.normal(size=(B, S)) * 3.0
    terms[0, -4:] = -1e4
    return terms


def test_general_term_with_a_constant_per_key_carries_the_constant():
    """A constant per key added to the input's term is part of the term: the column carries both."""
    model = _general_term_block("per_key")
    fused, block = _fused_one(model)
    assert block.fused and not block.causal and block.key_mask_inputs == ["key_bias"], block.reason
    feeds = _feeds(model, _general_terms())
    (a,), (b,) = run(model, feeds), run(fused, feeds)
    assert float(np.abs(a - b).max()) <= TOL


@pytest.mark.parametrize("form", ["per_head_factor", "causal_in_operand", "rows_of_two_terms"])
def test_general_term_beside_a_constant_that_is_not_per_key_refused(form):
    """Every additive term is accounted for: the input's term combined with a constant that differs
    between heads or query rows (ALiBi's slopes, a causal triangle in the same operand) or computed
    two ways for one key is not one term per key, whatever the input holds; it is left alone, never
    fused with the constant dropped. (Before the element-function proof the first two fused so.)"""
    model = _general_term_block(form)
    reason = _reason(model)
    assert "differs between query rows or heads" in reason and "'key_bias'" in reason, reason


def _attention_op(mask_nodes, mask_inputs, *, causal: bool) -> onnx.ModelProto:
    nodes = list(mask_nodes) + [helper.make_node("Attention", ["Q", "K", "V", "attn_mask"], ["Y"],
                                                 is_causal=int(causal))]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, S, D]) for n in "QKV"] + list(mask_inputs)
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
             numpy_helper.from_array(np.array([1, 1, S, 1], np.int64), "rows"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
             numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf")]
    graph = helper.make_graph(nodes, "attention_op", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [B, H, S, D])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_op_attn_mask_from_an_input(form, causal):
    """The ONNX Attention op's attn_mask computed from attention_mask goes through the same proof."""
    nodes = [helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
             helper.make_node("Expand", ["m4", "rows"], ["m4s"]),  # onnxruntime wants the query axis whole
             helper.make_node("Cast", ["m4s"], ["keep"], to=TensorProto.BOOL)]
    if form == "float":
        nodes.append(helper.make_node("Where", ["keep", "zero_f", "neg_inf"], ["attn_mask"]))
    else:
        nodes[-1].output[0] = "attn_mask"
    model = _attention_op(nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])],
                          causal=causal)
    fused, block = _fused_one(model)
    assert block.fused and block.causal == causal and block.key_mask_inputs == ["attention_mask"], block.reason
    for name, mask in padded_masks(B, S).items():
        assert _block_diff(model, fused, mask, causal) <= TOL, name


def test_report_names_the_key_mask_inputs_and_assumption():
    """The interface `--verify`/`check` read: each fused block's key_mask_inputs and key_mask_assumption,
    in the JSON report and on the block's line."""
    import json

    nodes, inputs = _hf_additive()
    _, report = fuse_model(_block(nodes, inputs, causal=True))
    (block,) = json.loads(report.to_json())["blocks"]
    assert block["key_mask_inputs"] == ["attention_mask"]
    assert block["key_mask_assumption"] == "assumes 'attention_mask' holds only 0 and 1"
    line = report.blocks[0].line()
    assert "key mask from 'attention_mask' (assumes 'attention_mask' holds only 0 and 1)" in line, line
    assert "no visible key" in line, line
    _, plain = fuse_model(build(POSITIVE_VARIANTS["kt_perm0132"]).model)
    assert json.loads(plain.to_json())["blocks"][0]["key_mask_inputs"] == []


def _column_ops(fused: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in fused.graph.node if "mask_" in n.output[0] or "key_bias" in n.output[0]}


def test_a_mask_not_read_in_place_is_replayed_from_the_models_operands():
    """A (b, 1, 1, s) float mask input: the column replays the score steps at the last query row."""
    nodes = [helper.make_node("Sub", ["one_f", "attention_mask"], ["inv"]),
             helper.make_node("Mul", ["inv", "min_f"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, [B, 1, 1, S])],
                   causal=True)
    fused, block = _fused_one(model)
    assert block.fused and block.key_mask_inputs == ["attention_mask"], block.reason
    assert "Slice" in _column_ops(fused)  # the operands read at the last row
    for name, mask in padded_masks(B, S).items():
        feeds = _feeds(model, mask.reshape(B, 1, 1, S))
        (a,), (b,) = run(model, feeds), run(fused, feeds)
        assert _diff_on_visible(a, b, visible_rows(mask, True), 2) <= TOL, name


def test_key_padding_mask_true_means_padded():
    """nn.MultiheadAttention's key_padding_mask: True marks a padded key (the kept value is 0)."""
    nodes = [helper.make_node("Unsqueeze", ["key_padding_mask", "ax12"], ["m4"]),
             helper.make_node("Where", ["m4", "neg_inf", "zero_f"], ["bias"])]
    model = _block(nodes, [helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, [B, S])])
    fused, block = _fused_one(model)
    assert block.fused and block.key_mask_inputs == ["key_padding_mask"] and block.key_mask_assumption is None
    assert "Slice" not in _column_ops(fused)  # read in place: computed from the input itself
    for name, mask in padded_masks(B, S).items():
        feeds = _feeds(model, mask == 0)
        (a,), (b,) = run(model, feeds), run(fused, feeds)
        assert _diff_on_visible(a, b, visible_rows(mask, False), 2) <= TOL, name
