"""Non-causal blocks at any seq: compile pads them to the tile, masks the padded keys in a
key-bias column (the node's own, or one it appends), and slices the padded rows off.

Checked against onnxruntime running the original (unfused) layer, on peaked attention, with the
key mask all ones and on --verify's padded feeds (compared at real positions where a causal row
sees no key).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import key_bias_graphs as kb
from fuse_attn import verify
from fuse_attn.compile import constraints, shapes
from fuse_attn.compile.run import attention_fn
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention, with_attention
from fuse_attn.ir import contract

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32_ATOL = 1e-4  # mixed precision off: the simulated kernel against the original, float32
BF16_RTOL = 2e-2  # mixed precision on: bf16 matmul inputs, relative to max |output|


def feeds_for(model, seed=0, key="mask"):
    rng = np.random.default_rng(seed)
    (x, *rest) = model.graph.input
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if key == "mask":
        feeds["attention_mask"] = np.ones(shape[:2], np.int64)
    elif key == "bias":
        feeds["key_bias"] = (3.0 * rng.standard_normal(shape[:2])).astype(np.float32)
    return feeds


def variants(fused, feeds):
    """All ones, then --verify's padded feeds of the mask inputs the fused model's column reads."""
    yield verify.Feed(verify.ALL_ONES, feeds)
    masks, causal = verify.fused_mask_inputs(fused)
    yield from verify.padded_feeds(fused, masks, causal=causal, template=feeds)


def original_output(original, feeds):
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def lowered(fused, mixed_precision, version="2.21-swa", kernel_min_seq=None):
    fused = shapes.fix_input_shapes(fused, {})  # static dims: shape inference reaches the FlashFwd inputs
    plans, problems = constraints.plan_model(fused, mixed_precision, kernel_min_seq=kernel_min_seq)
    assert problems == [], problems
    return plans, lower(fused, plans, attention_fn(simulate=True, kernel_version=version)[0])


def errors_against_original(original, module, feeds_list):
    """max |lowered - original| / max |original| per feed, at the positions --verify compares."""
    out = {}
    for feed in feeds_list:
        expected = verify.compared_part(original_output(original, feed.inputs), feed)
        with torch.no_grad():
            got = module(*[to_torch(feed.inputs[n]) for n in module.input_names]).numpy()
        got = verify.compared_part(got, feed)
        assert np.isfinite(got).all(), feed.name
        out[feed.name] = (float(np.abs(got - expected).max()), float(np.abs(expected).max()))
    return out


@pytest.mark.parametrize("seq,key,causal,padding", [
    (197, "mask", False, contract.PAD_EXTEND_COLUMN),  # ViT's length: 197 -> 512
    (640, "mask", False, contract.PAD_EXTEND_COLUMN),  # 640 -> 1024: a whole 512-key sub-tile of padding
    (197, None, False, contract.PAD_APPEND_COLUMN),  # no mask: compile appends the column (d 16 -> 17)
    (300, "mask", True, contract.PAD_CAUSAL),  # causal with a key mask: the causal padding, unchanged
])
@pytest.mark.parametrize("version", ["2.20", "2.21-swa"])
def test_padded_block_matches_the_original(seq, key, causal, padding, version):
    original = kb.build(seq=seq, key=key, causal=causal)
    fused = kb.build(seq=seq, key=key, causal=causal, fused=True)
    feeds = feeds_for(original, key=key)
    assert kb.score_std(original, feeds) > 2.0  # peaked
    cases = list(variants(fused, feeds))
    assert [c.name for c in cases] == [verify.ALL_ONES] + (list(verify.PADDED_FEEDS) if key else [])
    for mixed_precision in (False, True):
        plans, module = lowered(fused, mixed_precision, version)
        (plan,) = plans
        assert (plan.padding, plan.padded_seq % 512, plan.seq) == (padding, 0, seq)
        for label, (err, scale) in errors_against_original(original, module, cases).items():
            if mixed_precision:
                assert err <= BF16_RTOL * scale, (label, err, scale)
            else:
                assert err <= FP32_ATOL, (label, err)


def test_the_padded_mask_is_seen():
    """The padded variants change the original's output at real positions: the masks are live."""
    original = kb.build(seq=197)
    feeds = feeds_for(original)
    base = original_output(original, feeds)
    for feed in verify.padded_feeds(original, ["attention_mask"], causal=False, template=feeds):
        real = feed.real["attention_mask"]
        changed = np.abs(original_output(original, feed.inputs)[real] - base[real]).max()
        assert changed > 0.5, feed.name


@pytest.mark.parametrize("column", ["sign", "unscaled"])
def test_a_wrong_column_fails_against_the_original(column):
    """A column with the wrong sign, or without the division by the scale, is far off the original:
    a general per-key bias (key_bias, std 3) shows both; a 0/masked key mask shows the sign."""
    original = kb.build(seq=197, key="bias")
    feeds = feeds_for(original, key="bias")
    _, good = lowered(kb.build(seq=197, key="bias", fused=True), False)
    _, wrong = lowered(kb.build(seq=197, key="bias", fused=True, column=column), False)
    (err, scale), = errors_against_original(original, good, [verify.Feed("bias", feeds)]).values()
    assert err <= FP32_ATOL
    (err, scale), = errors_against_original(original, wrong, [verify.Feed("bias", feeds)]).values()
    assert err > 0.1 * scale, err
    if column == "sign":
        original = kb.build(seq=197)
        _, wrong = lowered(kb.build(seq=197, fused=True, column="sign"), False)
        fused = kb.build(seq=197, fused=True)
        errors = errors_against_original(original, wrong, list(variants(fused, feeds_for(original)))[1:])
        assert all(err > 0.1 * scale for err, scale in errors.values()), errors


def test_general_key_bias_under_mixed_precision_keeps_bf16_precision():
    """Under mixed precision the kernel rounds q' = 1 * scale and k' = b / scale to bf16 before it
    multiplies them: the bias arrives with bf16's relative precision (2^-8), which the comparison
    with the original shows as an error within bf16's tolerance."""
    original = kb.build(seq=512, key="bias")
    feeds = feeds_for(original, key="bias")
    _, module = lowered(kb.build(seq=512, key="bias", fused=True), True)
    (err, scale), = errors_against_original(original, module, [verify.Feed("bias", feeds)]).values()
    assert 1e-4 < err <= BF16_RTOL * scale


def test_padded_launch_has_no_host_reads():
    """The padding and its column are constants of the plan: forward stays one static graph."""
    for key in ("mask", None):
        fused = kb.build(seq=197, key=key, fused=True)
        plans, module = lowered(fused, False)
        feeds = feeds_for(fused, key=key)
        inputs = tuple(to_torch(feeds[n]) for n in module.input_names)
        out = run_on_meta(with_attention(module, sdpa_attention), inputs)
        assert tuple(out.shape) == (2, 197, 64)
        with torch.no_grad():  # the stand-in computes the same padded launch
            torch.testing.assert_close(with_attention(module, sdpa_attention)(*inputs), module(*inputs),
                                       rtol=0, atol=1e-4)


def test_column_extension_puts_the_masked_value_at_padded_keys_only():
    fused = kb.build(seq=197, fused=True)
    (plan,), module = lowered(fused, False)
    seen = {}

    def attention(q, k, v, attrs, tile):
        seen.update(q=q, k=k, v=v)
        return sdpa_attention(q, k, v, attrs, tile)

    module = with_attention(module, attention)
    feeds = feeds_for(fused)
    with torch.no_grad():
        module(*[to_torch(feeds[n]) for n in module.input_names])
    k = seen["k"]
    assert tuple(k.shape) == (2, 4, 17, 512)
    masked = contract.key_bias_masked_value(plan.attrs.softmax_scale, TensorProto.FLOAT) / plan.attrs.softmax_scale
    assert torch.all(k[:, :, -1, 197:] == np.float32(masked)) and torch.all(k[:, :, :-1, 197:] == 0)
    assert torch.all(k[:, :, -1, :197] == 0)  # all-ones mask: every real key kept


def test_masked_value_stays_finite_in_the_dtype():
    for dtype, np_dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
        for scale in (0.125, 0.05, 1e-4, 8.0):
            b = contract.key_bias_masked_value(scale, dtype)
            if b is None:  # nothing masked enough fits: only float16 at a tiny scale
                assert dtype == TensorProto.FLOAT16 and scale < 0.01
                continue
            assert b <= contract.KEY_BIAS_MASKED_AT_MOST
            assert np.isfinite(np.asarray(b / scale, dtype=np_dtype))
    assert contract.key_bias_masked_value(0.125, TensorProto.FLOAT) == contract.KEY_BIAS_MASKED == -5000.0
    assert contract.key_bias_masked_value(0.125, TensorProto.BFLOAT16) == -5000.0
    # fp16 keeps the column within half its range (65504 / 2 at scale 0.125: -4094).
    assert contract.key_bias_masked_value(0.125, TensorProto.FLOAT16) == pytest.approx(-4094.0)
    # fp16 at scale 0.05: -5000 / 0.05 would be -100000, past 65504; clamped to half the range.
    assert contract.key_bias_masked_value(0.05, TensorProto.FLOAT16) == pytest.approx(-1637.6)


def test_no_room_for_a_column_is_refused_with_the_reason():
    model = shapes.fix_input_shapes(kb.build(seq=197, key=None, hidden=128, heads=1, fused=True), {})
    plans, problems = constraints.plan_model(model)
    assert plans == []
    (problem,) = problems
    assert "head dim 128 + 1 > 128" in problem and "--kernel-min-seq" in problem
    # As plain attention ops it runs (no kernel limit applies).
    (plan,), problems = constraints.plan_model(model, kernel_min_seq=512)
    assert problems == [] and not plan.kernel


def test_simulate_compares_padded_masks(tmp_path, capsys):
    from fuse_attn.commands.cli import main as cli_main

    path = tmp_path / "fused.onnx"
    onnx.save(kb.build(seq=197, fused=True), path)
    assert cli_main(["compile", str(path), "--simulate"]) == 0
    out = capsys.readouterr().out
    assert "seq padded 197 -> 512 (padded keys masked in the node's key-bias column)" in out
    assert "197 -> 512: 6.8x the attention FLOPs of the unpadded block" in out
    for kind in ["simulate y:"] + [f"simulate [{feed}] y:" for feed in verify.PADDED_FEEDS]:
        assert kind in out and out.split(kind)[1].splitlines()[0].endswith(" ok"), out


@pytest.mark.parametrize("bias", [5000.0, 0.0])  # the sign flipped; padded keys left unmasked (measured 0.2-1.4 off)
def test_a_wrong_padding_column_fails_simulate(bias, tmp_path, capsys, monkeypatch):
    """compile's own column entries at the padded keys, wrong: the padded keys take weight in
    every real row's softmax, and --simulate says MISMATCH (exit 1)."""
    from fuse_attn.commands.cli import main as cli_main

    for key in ("mask", None):
        path = tmp_path / f"fused_{key}.onnx"
        onnx.save(kb.build(seq=197, key=key, fused=True), path)
        with monkeypatch.context() as m:
            m.setattr(contract, "key_bias_masked_value", lambda scale, dtype: bias)
            assert cli_main(["compile", str(path), "--simulate"]) == 1
        out = capsys.readouterr().out
        assert "): MISMATCH." in out


@pytest.mark.parametrize("key,causal", [("mask", False), ("mask", True), ("bias", False), (None, False)])
def test_mask_inputs_are_read_from_the_fused_column(key, causal):
    """compile has no fuse report: the inputs it pads are those the key-bias column is computed
    from (x reaches k too, but not the column); none without a column."""
    fused = kb.build(seq=197, key=key, causal=causal, fused=True)
    expected = {"mask": ["attention_mask"], "bias": ["key_bias"], None: []}[key]
    assert verify.fused_mask_inputs(fused) == (expected, causal and key is not None)


def test_token_ids_behind_a_reshape_are_not_a_mask():
    """TorchScript exports Reshape input_ids before the embedding's Gather: still token ids (fed
    within the vocabulary), not filled with ones."""
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("Reshape", ["input_ids", "flat"], ["ids_2d"]),
             helper.make_node("Gather", ["table", "ids_2d"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask_3d"]),
             helper.make_node("Mul", ["emb", "mask_3d"], ["y"])]
    inits = [numpy_helper.from_array(np.array([1, 8], np.int64), "flat"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.ones((50, 4), np.float32), "table")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 8]),
                                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = verify.random_inputs(model, seed=0)
    assert feeds["input_ids"].max() < 50 and not np.all(feeds["input_ids"] == 1)
    assert np.all(feeds["attention_mask"] == 1)
