"""Sample sizes the graph admits: a symbolic seq that slices a fixed table (CLIP's text model reads
`position_ids = buffer[:, :seq]` of a 128-row buffer, optimum's export) runs only up to the
table's length, so it is proven at sizes at or below it — the first and second sample and the
mask's proof at a longer length — instead of being refused at a sample past it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from attention_graphs import FUSED_TOL, mutate_flashfwd
from exporter_graphs import clip_text_encoder
from fuse_attn import fuse
from fuse_attn.ir.evaluator import FIRST_SEQ_SAMPLE, Evaluator
from fuse_attn.ir.graph import Graph


def _outputs(model: onnx.ModelProto, seq: int, batch: int = 2) -> list[np.ndarray]:
    feeds = {"input_ids": np.random.default_rng(seq).integers(0, 50, (batch, seq))}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _diff(a: onnx.ModelProto, b: onnx.ModelProto, seq: int) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(_outputs(a, seq), _outputs(b, seq)))


# 170: past the second sample (96 + 64), found only when the mask's proof at 2 · 96 fails.
@pytest.mark.parametrize("positions", [170, 128, 100, 64, 16])
def test_a_seq_that_slices_a_fixed_table_is_proven_below_it(positions):
    model = clip_text_encoder(positions=positions)
    fused, report = fuse(model)
    assert report.fused == 2, [b.reason for b in report.blocks]
    # Still symbolic, not tied to the table's length: the model runs at any seq up to it.
    assert {(b.seq, b.batch, b.causal) for b in report.blocks} == {("sequence_length", "batch_size", True)}
    for seq in (positions, positions // 2 + 1, 1):
        assert _diff(model, fused, seq) <= FUSED_TOL
    assert _diff(model, mutate_flashfwd(fused, flip_causal=True), positions) > 100 * FUSED_TOL


def test_the_samples_stay_at_or_below_the_table():
    graph = Graph(clip_text_encoder(positions=128))
    probes = [n.outputs[0] for n in graph.nodes if n.op_type == "Softmax"]
    evaluator = Evaluator.tied_for_graph(graph, {}, probes)
    assert evaluator.caps == {"sequence_length": 128}
    first, second = evaluator.binding["sequence_length"], evaluator.varied().binding["sequence_length"]
    assert first == FIRST_SEQ_SAMPLE and second == 128  # 96 + 64 would be past the table
    assert evaluator.at_seq(2 * first).binding["sequence_length"] == 128
    for at in (evaluator, evaluator.varied(), evaluator.at_seq(2 * first)):
        assert at.shape_of(probes[0])[-1] == at.binding["sequence_length"]


def test_a_limit_past_the_second_sample_is_found_when_the_longer_proof_fails():
    graph = Graph(clip_text_encoder(positions=170))
    evaluator = Evaluator.tied_for_graph(graph, {}, [n.outputs[0] for n in graph.nodes if n.op_type == "Softmax"])
    assert evaluator.caps == {} and evaluator.varied().binding["sequence_length"] == 160
    assert evaluator.at_seq(192).binding["sequence_length"] == 192
    assert evaluator.admitted_at_seq(192).binding["sequence_length"] == 170
    assert evaluator.caps == {"sequence_length": 170} and evaluator.at_seq(192).binding["sequence_length"] == 170
    assert evaluator.admitted_at_seq(192) is None  # nothing further to find


def test_a_table_shorter_than_the_first_sample_moves_both_samples_below_it():
    graph = Graph(clip_text_encoder(positions=16))
    evaluator = Evaluator.tied_for_graph(graph, {}, [n.outputs[0] for n in graph.nodes if n.op_type == "Softmax"])
    first, second = evaluator.binding["sequence_length"], evaluator.varied().binding["sequence_length"]
    assert first < second <= 16 and evaluator.ties == {}


def test_the_mask_is_proven_again_at_the_longest_seq_the_graph_runs():
    """A window of 100 keys hides at the first sample (96) and shows at the table's 128 rows,
    where the longer proof now runs (2 · 96 would be past the table)."""
    fused, report = fuse(clip_text_encoder(positions=128, window=100))
    assert report.fused == 0
    for block in report.blocks:
        assert "at 128" in block.reason and "sliding window of 100" in block.reason, block.reason


def test_a_window_longer_than_every_seq_the_graph_runs_is_causal():
    """With 64 positions the graph runs only up to seq 64, where a 100-key window masks nothing
    beyond the causal triangle: fused, and equal to the original at every length it runs."""
    model = clip_text_encoder(positions=64, window=100)
    fused, report = fuse(model)
    assert report.fused == 2, [b.reason for b in report.blocks]
    assert {b.seq for b in report.blocks} == {"sequence_length"}
    for seq in (64, 33):
        assert _diff(model, fused, seq) <= FUSED_TOL


def test_a_seq_past_the_table_still_fails_in_the_original():
    """The limit is the graph's own: the original model cannot run past its table."""
    with pytest.raises(Exception, match="Add"):
        _outputs(clip_text_encoder(positions=16), 17)
