"""--verify and `check` with padded masks (issue 17, items 2 and 3): the feeds pad every token
mask the report names (right, left, random real tokens, whole tiles), rows with no visible key are
left out of the comparison, and a fused model that mistreats the mask fails: one fused with
--assume-no-padding, and a correctly fused model whose key-bias column is then corrupted (its
sign flipped, its scale changed, the column dropped)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attention_graphs import BIDIR, MASKED, _r, build
from fuse_attn import check_worker, cli, fuse, verify
from fuse_attn.fuse_options import FuseOptions
from fuse_attn.report import BlockReport, FuseReport

# BERT-like: two non-causal blocks reading a (batch, seq) attention_mask, two batch entries.
ENCODER = _r(BIDIR, mask="padding", batch=2, blocks=2)
# GPT-2-like: the causal mask plus the padding mask, two blocks.
DECODER = _r(MASKED, mask="causal_padding", batch=2, blocks=2)


def _report(*, causal: bool, key_mask_inputs=(), assumed=()) -> FuseReport:
    block = BlockReport("Softmax", "s", True, causal=causal, key_mask_inputs=list(key_mask_inputs))
    return FuseReport("m", blocks=[block], assumed_all_ones=list(assumed))


def _model(inputs: dict[str, tuple[int, list]]) -> onnx.ModelProto:
    """A model with these inputs (name: (elem type, shape)) and one output per input (Identity)."""
    values = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    outs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, (t, s) in inputs.items()]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs]
    graph = helper.make_graph(nodes, "g", values, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# -- the feeds -------------------------------------------------------------------------------------

def test_the_report_names_the_token_masks():
    """Fused blocks' key_mask_inputs and the inputs --assume-no-padding took, each once; a block
    left alone names none."""
    report = _report(causal=False, key_mask_inputs=["attention_mask"], assumed=["attention_mask", "other"])
    report.blocks.append(BlockReport("Softmax", "t", False, reason="no", key_mask_inputs=["ignored"]))
    assert verify.mask_inputs(report) == ["attention_mask", "other"]


def test_padded_feeds_keep_a_real_token_per_entry_and_pad_whole_tiles():
    model = _model({"attention_mask": (TensorProto.INT64, ["batch", 2048]), "x": (TensorProto.FLOAT, ["batch", 4])})
    feeds = verify.padded_feeds(model, ["attention_mask"], causal=False)
    assert [f.name for f in feeds] == ["right", "left", "random", "tiles"]
    for feed in feeds:
        mask, real = feed.inputs["attention_mask"], feed.real["attention_mask"]
        assert mask.shape == (verify.PADDED_BATCH, 2048) and mask.dtype == np.int64  # a symbolic batch: 2
        assert set(np.unique(mask)) <= {0, 1} and (mask == real).all()
        assert (real.sum(axis=1) >= 1).all() and not real.all()  # padded, never an entry without tokens
        assert feed.inputs["x"].shape == (verify.PADDED_BATCH, 4)
        assert not feed.rows_without_key  # no causal block: every row sees its real keys
    right, left, _, tiles = (f.real["attention_mask"] for f in feeds)
    for entry in right:
        n = entry.sum()
        assert entry[:n].all() and not entry[n:].any()
    for entry in left:
        n = entry.sum()
        assert entry[2048 - n:].all() and not entry[:2048 - n].any()
    # 300 real tokens: keys 512..2047 are three whole 512-key tiles, at the end (entry 0) and at the
    # start (entry 1).
    assert list(tiles.sum(axis=1)) == [300, 300]
    assert not tiles[0, 512:].any() and not tiles[1, :2048 - 512].any()


def test_a_mask_of_higher_rank_is_padded_over_its_last_axis_in_its_own_dtype():
    model = _model({"m": (TensorProto.FLOAT, [1, 1, 1, 512]), "flag": (TensorProto.BOOL, [1])})
    right = verify.padded_feeds(model, ["m", "flag"], causal=False)[0]
    assert right.inputs["m"].dtype == np.float32 and right.inputs["m"].shape == (1, 1, 1, 512)
    assert right.real["m"].shape == (1, 512) and "flag" not in right.real  # rank 1: not a token mask
    assert verify.padded_feeds(model, ["flag"], causal=False) == []


def test_rows_without_a_visible_key_are_left_out_of_the_comparison():
    """Under a causal block, a feed that pads the start of an entry leaves its first rows with no
    visible key: outputs laid out (batch, ..., seq, ...) are compared at the real positions only,
    anything else whole; without such rows, every position is compared."""
    model = _model({"attention_mask": (TensorProto.INT64, [2, 512])})
    feeds = {f.name: f for f in verify.padded_feeds(model, ["attention_mask"], causal=True)}
    assert not feeds["right"].rows_without_key and feeds["left"].rows_without_key
    left = feeds["left"]
    real = left.real["attention_mask"]
    want = np.random.default_rng(0).normal(size=(2, 4, 512, 8))  # (b, h, s, d): seq on axis 2
    got = want.copy()
    got[:, :, ~real[0]] += 1.0  # wrong at entry 0's padded rows only
    where = verify._real_positions(want.shape, left)
    assert where is not None and where[0] == 2
    assert verify._check("o", verify._select(want, where), verify._select(got, where), "left").ok
    assert not verify._check("o", want, got, "left").ok  # compared whole, it would fail
    assert verify._real_positions((3, 7), left) is None  # not laid out like the mask: whole


# -- --assume-no-padding: wrong on padded batches, and the checks say so ----------------------------

@pytest.mark.parametrize("spec", [ENCODER, DECODER], ids=["encoder", "decoder"])
def test_a_model_fused_assuming_no_padding_fails_the_padded_feeds(spec):
    built = build(spec)
    fused, report = fuse(built.model, assume_no_padding=True)
    assert report.fused == 2 and report.assumed_all_ones == ["attention_mask"]
    results = verify.verify_fused(built.model, fused, report)
    assert [r.feed.name for r in results] == ["all-ones", "right", "left", "random", "tiles"]
    assert results[0].ok  # what the flag assumes holds
    for result in results[1:]:  # real tokens attend to the padding
        assert not result.ok and result.max_err > 0.1, result.feed.describe()
    lines = verify.result_lines(results, report)
    assert any("'attention_mask' taken as all ones (--assume-no-padding)" in line for line in lines)


def test_verify_exits_1_and_the_json_report_has_every_feed(tmp_path, capsys):
    src = tmp_path / "encoder.onnx"
    onnx.save(build(ENCODER).model, src)
    code = cli.main([str(src), "-o", str(tmp_path / "out.onnx"), "--assume-no-padding", "--verify",
                     "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == cli.EXIT_VERIFY_FAILED
    assert "verify y: " in out and "verify [right] y: " in out and "verify [tiles] y: " in out
    assert "feed left: 'attention_mask' padded at the start, real tokens per batch entry [384, 256] of 512" in out
    feeds = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert [f["feed"] for f in feeds] == ["all-ones", "right", "left", "random", "tiles"]
    assert feeds[0]["ok"] and not any(f["ok"] for f in feeds[1:])
    assert feeds[1]["real_tokens"] == {"attention_mask": [384, 256]}
    assert (tmp_path / "out.onnx").exists()  # written, as a failed verification always left it


def test_check_reports_the_padded_feeds_wrong(tmp_path):
    onnx.save(build(ENCODER).model, tmp_path / "encoder.onnx")
    result = check_worker.check_model(str(tmp_path / "encoder.onnx"), FuseOptions(assume_no_padding=True))
    assert result["status"] == "wrong" and result["fused"] == 2
    assert [f["ok"] for f in result["feeds"]] == [True, False, False, False, False]
    assert result["max_err"] == max(f["max_err"] for f in result["feeds"])
