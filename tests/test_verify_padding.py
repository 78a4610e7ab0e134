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
from fuse_attn import fuse, verify
from fuse_attn.commands import check_worker, cli
from fuse_attn.pipeline import FuseOptions
from fuse_attn.report import BlockReport, FuseReport

# BERT-like: two non-causal blocks reading a (batch, seq) attention_mask, two batch entries.
ENCODER = _r(BIDIR, mask="padding", batch=2, blocks=2)
# GPT-2-like: the causal mask plus the padding mask, two blocks.
DECODER = _r(MASKED, mask="causal_padding", batch=2, blocks=2)
# At head dim 128 the column has no room (d + 1 > 128): --assume-no-padding is the only route.
WIDE_ENCODER, WIDE_DECODER = _r(ENCODER, head_dim=128), _r(DECODER, head_dim=128)


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

@pytest.mark.parametrize("spec", [WIDE_ENCODER, WIDE_DECODER], ids=["encoder", "decoder"])
def test_a_model_fused_assuming_no_padding_fails_the_padded_feeds(spec):
    built = build(spec)
    assert fuse(built.model)[1].fused == 0  # no room for the column
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
    onnx.save(build(WIDE_ENCODER).model, src)
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
    onnx.save(build(WIDE_ENCODER).model, tmp_path / "encoder.onnx")
    result = check_worker.check_model(str(tmp_path / "encoder.onnx"), FuseOptions(assume_no_padding=True))
    assert result["status"] == "wrong" and result["fused"] == 2
    assert [f["ok"] for f in result["feeds"]] == [True, False, False, False, False]
    assert result["max_err"] == max(f["max_err"] for f in result["feeds"])


# -- a correctly fused key mask, then its column corrupted -----------------------------------------

def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(n for n in graph.node if name in n.output)


def _flash_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "FlashFwd"
            and any(a.name == "key_bias_column" and a.i == 1 for a in n.attribute)]


def corrupt_column(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """A copy of a fused model with every key-bias column made wrong. The column is k's last
    head-dim index, (b, kv, 1, s), the second operand of the Concat feeding FlashFwd's k:
    sign: negated (masked keys get +5000); scale: times 1e-3 (a masked key gets -5: it leaks);
    batch: batch entries swapped (each gets another entry's mask); shift: moved by one key;
    drop: the column gone (q, k, v read unwidened, key_bias_column 0: the mask is ignored)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph = m.graph
    flashes = _flash_nodes(graph)
    assert flashes, "no FlashFwd with a key-bias column"
    for i, flash in enumerate(flashes):
        concats = [_producer(graph, name) for name in flash.input[:3]]
        assert all(c.op_type == "Concat" for c in concats)
        k_concat = concats[1]
        column, out = k_concat.input[1], f"corrupt_{how}_{i}"
        if how == "drop":
            for position, concat in enumerate(concats):
                flash.input[position] = concat.input[0]
            next(a for a in flash.attribute if a.name == "key_bias_column").i = 0
            continue
        if how == "sign":
            nodes = [helper.make_node("Neg", [column], [out])]
        elif how == "scale":
            graph.initializer.append(onnx.numpy_helper.from_array(np.array(1e-3, np.float32), out + "_f"))
            nodes = [helper.make_node("Mul", [column, out + "_f"], [out])]
        elif how == "batch":  # the batch axis reversed: Slice with step -1
            graph.initializer.extend([onnx.numpy_helper.from_array(np.array([v], np.int64), f"{out}_{n}")
                                      for n, v in (("start", -1), ("end", -2**62), ("axis", 0), ("step", -1))])
            nodes = [helper.make_node("Slice", [column] + [f"{out}_{n}" for n in ("start", "end", "axis", "step")],
                                      [out])]
        elif how == "shift":
            # keys 1..s-1 then key 0: each key gets its neighbour's bias
            graph.initializer.extend([onnx.numpy_helper.from_array(np.array([1], np.int64), out + "_one"),
                                      onnx.numpy_helper.from_array(np.array([0], np.int64), out + "_zero"),
                                      onnx.numpy_helper.from_array(np.array([3], np.int64), out + "_axis"),
                                      onnx.numpy_helper.from_array(np.array([2**62], np.int64), out + "_end")])
            nodes = [helper.make_node("Slice", [column, out + "_one", out + "_end", out + "_axis"], [out + "_tail"]),
                     helper.make_node("Slice", [column, out + "_zero", out + "_one", out + "_axis"], [out + "_head"]),
                     helper.make_node("Concat", [out + "_tail", out + "_head"], [out], axis=3)]
        else:
            raise ValueError(how)
        k_concat.input[1] = out
        index = list(graph.node).index(k_concat)
        for offset, node in enumerate(nodes):
            graph.node.insert(index + offset, node)
    return m


CORRUPTIONS = ("sign", "scale", "batch", "shift", "drop")


@pytest.fixture(scope="module", params=[ENCODER, DECODER], ids=["encoder", "decoder"])
def fused_key_mask(request):
    """A padding-mask model fused with the default flags: the mask rides in the column, and every
    feed, padded or not, matches the original."""
    built = build(request.param)
    fused, report = fuse(built.model)
    assert report.fused == 2 and report.assumed_all_ones == []
    assert all(b.key_mask_inputs == ["attention_mask"] for b in report.blocks)
    results = verify.verify_fused(built.model, fused, report)
    assert [r.feed.name for r in results] == ["all-ones", "right", "left", "random", "tiles"]
    assert all(r.ok for r in results), verify.result_lines(results, report)
    return built.model, fused, report


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupted_column_passes_all_ones_and_fails_every_padded_feed(fused_key_mask, how):
    """With every mask all ones the column is all zeros, so no corruption of it shows there: only
    the padded feeds catch it, each of them."""
    original, fused, report = fused_key_mask
    wrong = corrupt_column(fused, how)
    onnx.checker.check_model(wrong)
    results = verify.verify_fused(original, wrong, report)
    assert results[0].ok, verify.result_lines(results)
    failed = [r.feed.name for r in results[1:] if not r.ok]
    assert failed == list(verify.PADDED_FEEDS), verify.result_lines(results)


def test_a_column_scaled_but_still_masking_changes_nothing(fused_key_mask):
    """Halving the column leaves a masked key's score at -2500: exp still gives exactly 0, so the
    model is unchanged and the checks pass; the checks catch a column that stops masking (1e-3
    above), not a different way of masking."""
    original, fused, report = fused_key_mask
    halved = onnx.ModelProto()
    halved.CopyFrom(fused)
    for i, flash in enumerate(_flash_nodes(halved.graph)):
        k_concat = _producer(halved.graph, flash.input[1])
        halved.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), f"half_{i}"))
        halved.graph.node.insert(list(halved.graph.node).index(k_concat),
                                 helper.make_node("Mul", [k_concat.input[1], f"half_{i}"], [f"halved_{i}"]))
        k_concat.input[1] = f"halved_{i}"
    assert all(r.ok for r in verify.verify_fused(original, halved, report))


def test_verify_and_check_fail_a_flipped_column(tmp_path, monkeypatch, capsys):
    """End to end: the fuse command's --verify and `check`, with the pass made to emit a column of
    the wrong sign."""
    from fuse_attn import pipeline

    src = tmp_path / "encoder.onnx"
    onnx.save(build(ENCODER).model, src)
    real_fuse_graph = pipeline.fuse_graph

    def fuse_with_flipped_column(graph, **kwargs):
        report = real_fuse_graph(graph, **kwargs)
        graph.model.CopyFrom(corrupt_column(graph.model, "sign"))
        return report

    monkeypatch.setattr(pipeline, "fuse_graph", fuse_with_flipped_column)  # the one fuse flow both call
    result = check_worker.check_model(str(src))
    assert result["status"] == "wrong" and [f["ok"] for f in result["feeds"]] == [True, False, False, False, False]
    assert cli.main([str(src), "-o", str(tmp_path / "out.onnx"), "--verify"]) == cli.EXIT_VERIFY_FAILED
    out = capsys.readouterr().out
    assert "verify y: " in out and " ok" in out.splitlines()[out.splitlines().index(next(
        line for line in out.splitlines() if line.startswith("verify y: ")))]
    assert "verify [right] y: " in out and "MISMATCH" in out


def test_the_tables_count_the_padded_feeds(tmp_path):
    """check's table and the zoo's share the 'padded feeds ok' column; the zoo pads at the
    manifest's lengths, a symbolic batch grown to two entries."""
    from fuse_attn.commands import check
    from fuse_attn.models.check import _padded_template

    onnx.save(build(WIDE_ENCODER).model, tmp_path / "encoder.onnx")
    result = check_worker.check_model(str(tmp_path / "encoder.onnx"), FuseOptions(assume_no_padding=True))
    row = check.to_row({"model": "encoder.onnx", "ok": False, **result})
    assert row.padded == "0 of 4"
    assert "| 0 of 4 |" in check.render_markdown([row], columns=check.MODEL_COLUMNS)
    model = _model({"ids": (TensorProto.INT64, ["batch", 1024]), "fixed": (TensorProto.INT64, [1, 1024])})
    template = _padded_template(model, {"ids": np.zeros((1, 1024), np.int64), "fixed": np.zeros((1, 1024), np.int64)})
    assert template["ids"].shape == (verify.PADDED_BATCH, 1024) and template["fixed"].shape == (1, 1024)
