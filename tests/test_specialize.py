"""`--shape` / `--dim`: a KV-cache decoder (optimum's GPT-2 with past, opset 14) is refused as
exported, and fuses its prefill once `past_sequence_length` is fixed at 0. Unnamed input dims
and dims written as expressions are free symbols bound consistently."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from attention_graphs import AttnSpec, build, flash_nodes, mutate_flashfwd
from exporter_graphs import decoder_feeds, decoder_without_past, kv_cache_decoder, max_diff, run
from fuse_attn import fuse
from fuse_attn.modelio import InputError
from fuse_attn.specialize import ShapeError, parse_dim_args, parse_shape_args, specialize
from test_hostile_inputs import assert_bad_input, run_cli

TOL = 1e-4


@pytest.fixture(scope="module")
def decoder():
    return kv_cache_decoder()


def test_decoder_with_past_is_refused_as_exported(decoder):
    _, report = fuse(decoder, assume_no_padding=True)
    assert report.fused == 0
    assert all("seq_q" in b.reason for b in report.blocks), [b.reason for b in report.blocks]


def test_prefill_fuses_with_an_empty_past(decoder):
    fused, report = fuse(decoder, dims={"past_sequence_length": 0}, assume_no_padding=True)
    assert report.fused == 2, [b.reason for b in report.blocks]
    assert all(b.causal and b.seq == "sequence_length" and b.batch == "batch_size" for b in report.blocks)
    assert report.specialized == ["past_sequence_length = 0"]
    onnx.checker.check_model(fused, full_check=True)
    # The model still returns its present key/values, now exactly the new keys/values.
    assert [o.name for o in fused.graph.output] == [o.name for o in decoder.graph.output]
    present = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in fused.graph.output}
    assert present["present.0.key"] == ["batch_size", 4, "0 + sequence_length", 16]
    for seq in (16, 40):
        feeds = decoder_feeds(fused, seq=seq)
        assert max_diff(run(decoder, feeds), run(fused, feeds)) <= TOL
        assert max_diff(run(decoder, feeds), run(mutate_flashfwd(fused, flip_causal=True), feeds)) > 100 * TOL


def test_past_of_another_length_is_still_refused(decoder):
    _, report = fuse(decoder, dims={"past_sequence_length": 4}, assume_no_padding=True)
    assert report.fused == 0 and all("seq_q" in b.reason for b in report.blocks)


def test_shape_fixes_every_input_sharing_the_symbols(decoder):
    fused, report = fuse(decoder, shapes={"input_ids": (1, 128)}, dims={"past_sequence_length": 0},
                         assume_no_padding=True)
    assert report.fused == 2 and all(b.seq == 128 and b.batch == 1 for b in report.blocks)
    mask = next(i for i in fused.graph.input if i.name == "attention_mask")
    assert [d.dim_value for d in mask.type.tensor_type.shape.dim] == [1, 128]
    feeds = decoder_feeds(fused, batch=1, seq=128)
    assert max_diff(run(decoder, feeds), run(fused, feeds)) <= TOL


def test_cli_dim_and_verify(decoder, tmp_path):
    src, out = tmp_path / "decoder.onnx", tmp_path / "fused.onnx"
    onnx.save(decoder, src)
    proc = run_cli(src, "-o", out, "--dim", "past_sequence_length=0", "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "specialized: past_sequence_length = 0" in proc.stdout
    assert "2 of 2 attention blocks fused" in proc.stdout
    # Every output at the specialized shapes, with attention_mask all ones and then padded four ways.
    verified = [line for line in proc.stdout.splitlines() if line.startswith("verify ")]
    assert len(verified) == 5 * 5 and all(line.endswith(" ok") for line in verified), proc.stdout
    assert sum(line.startswith("verify [left] ") for line in verified) == 5


@pytest.mark.parametrize("args, mentions", [
    (["--dim", "past_length=0"], ("past_length", "past_sequence_length")),
    (["--dim", "past_sequence_length=-1"], ("--dim",)),
    (["--shape", "input_ids=1x2x3"], ("rank",)),
    (["--shape", "nope=1x2"], ("nope",)),
    (["--shape", "attention_mask=1x4", "--dim", "past_sequence_length=0", "--shape", "input_ids=1x8"],
     ("attention_mask",)),
])
def test_cli_bad_specialization(decoder, tmp_path, args, mentions):
    src, out = tmp_path / "decoder.onnx", tmp_path / "fused.onnx"
    onnx.save(decoder, src)
    assert_bad_input(run_cli(src, "-o", out, *args), out, mentions=mentions)


def test_parsers():
    assert parse_shape_args(["a=1x0x3"], allow_zero=True) == {"a": (1, 0, 3)}
    with pytest.raises(ShapeError):
        parse_shape_args(["a=1x0x3"])  # compile's shapes stay positive
    assert parse_dim_args(["s=0", "b=2"]) == {"s": 0, "b": 2}
    for bad in ("s", "s=x", "=3"):
        with pytest.raises(ShapeError):
            parse_dim_args([bad])


def test_python_api_rejects_a_bad_dim(decoder):
    with pytest.raises(InputError, match="not a symbolic dim"):
        fuse(decoder, dims={"sequence": 3})


def test_expression_dims_bind_by_their_symbols():
    model = onnx.ModelProto()
    model.CopyFrom(kv_cache_decoder(layers=1))
    spec = specialize(model, {}, {"sequence_length": 8})
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
    assert [d.dim_param or d.dim_value for d in mask.type.tensor_type.shape.dim] == \
        ["batch_size", "past_sequence_length + 8"]
    assert spec.lines() == ["sequence_length = 8"]


def _unnamed(model: onnx.ModelProto, name: str, axes=(1, 2)) -> onnx.ModelProto:
    """`model` with dims `axes` of input `name` and of the outputs declared without name or value
    (as onnxscript's BART export does); the builder's reshapes fix the batch, so it stays."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for info in [*out.graph.input, *out.graph.output]:
        if info.name == name or info in out.graph.output:
            for axis in axes:
                info.type.tensor_type.shape.dim[axis].Clear()
    del out.graph.value_info[:]
    return out


def test_unnamed_input_dims_are_free_symbols():
    built = build(AttnSpec(seq=16, symbolic_seq=True, mask_form="range"))
    model = _unnamed(built.model, "x")
    assert not any(d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    fused, report = fuse(model)
    assert report.fused == 1, [b.reason for b in report.blocks]
    (block,) = report.blocks
    # The hidden dim is tied to the weights' 32 by the projections; the seq dim stays free.
    assert block.seq == "unnamed dim 1 of 'x'" and block.causal
    onnx.checker.check_model(fused, full_check=True)
    feeds = built.inputs()
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL
    assert len(flash_nodes(fused)) == 1


def test_unnamed_dims_are_distinct_per_occurrence():
    """Two inputs whose seq dims are unnamed are not taken to be the same length: a cross-attention
    block between them is refused (seq_q != seq_k), not fused as self-attention."""
    built = build(AttnSpec(seq=16, seq_kv=32, mask="none"))
    model = _unnamed(_unnamed(built.model, "x", (1,)), "memory", (1,))
    _, report = fuse(model)
    assert report.fused == 0 and "seq_q" in report.blocks[0].reason, report.blocks[0].reason


def test_unnamed_dims_the_graph_ties_are_tied():
    """input_ids and attention_mask with unnamed seq dims: the causal mask (from input_ids' length)
    is combined with the padding mask (attention_mask's), so the graph runs only with them equal;
    they are tied, and the block fuses."""
    model = decoder_without_past()
    for info in [*model.graph.input, *model.graph.output]:
        info.type.tensor_type.shape.dim[-2 if info.name.startswith("present") else 1].Clear()
    fused, report = fuse(model, assume_no_padding=True)
    assert report.fused == 2, [b.reason for b in report.blocks]
    assert all(b.causal for b in report.blocks)
    feeds = decoder_feeds(model, seq=24)
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL
    assert max_diff(run(model, feeds), run(mutate_flashfwd(fused, flip_causal=True), feeds)) > 100 * TOL


def test_a_shape_with_an_expression_dim_binds_in_any_order():
    """`--shape` values for an input whose dim is `past + seq`, given before the inputs that bind
    past and seq, are checked once every plain symbol is bound (and refused when they disagree)."""
    def model():
        g = helper.make_graph([helper.make_node("Identity", ["m"], ["y"])], "g",
                              [helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "past + seq"]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "past"]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["b", "past + seq"])])
        return helper.make_model(g)

    m = model()
    assert specialize(m, {"m": (1, 8), "k": (1, 3), "ids": (1, 5)}, {}).symbols == {"b": 1, "past": 3, "seq": 5}
    assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == [1, 8]
    with pytest.raises(ShapeError, match="'past \\+ seq'"):
        specialize(model(), {"m": (1, 9), "k": (1, 3), "ids": (1, 5)}, {})
