"""Long fixed seq lengths: masks proven per diagonal, never as seq × seq arrays.

tracemalloc sees numpy's allocations, so a proof that built one seq² array at 131,072 (17 GB as
bool) could not stay under these bounds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fuse_attn import fuse
from fuse_attn.ir.diagonal import NotDiagonal, strip_of
from fuse_attn.ir.evaluator import Evaluator
from fuse_attn.ir.graph import Graph

from long_masks import MaskSpec, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fuse_traced(model_or_path):
    tracemalloc.start()
    try:
        fused, report = fuse(model_or_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return fused, report, peak / 2**20


def _llama_graph():
    spec = importlib.util.spec_from_file_location("llama_graph", os.path.join(ROOT, "benchmarks", "llama_graph.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("llama_graph", module)  # its dataclasses resolve annotations through it
    spec.loader.exec_module(sys.modules["llama_graph"])
    module = sys.modules["llama_graph"]
    return module


def test_llama_shaped_graph_at_131072_fuses_in_bounded_memory(tmp_path):
    llama = _llama_graph()
    path = str(tmp_path / "llama.onnx")
    llama.build_llama(path, llama.dataclasses.replace(llama.SMALL, layers=2, seq=131_072))
    _, report, peak_mb = _fuse_traced(path)
    assert [(b.fused, b.causal, b.seq) for b in report.blocks] == [(True, True, 131_072)] * 2, report.blocks
    assert peak_mb < 64, f"{peak_mb:.0f} MB traced while fusing"


@pytest.mark.parametrize("form, fused", [("causal", True), ("window", False), ("diagonal_masked", False),
                                         ("padding_rows", False), ("one_wrong", False)])
def test_mask_near_misses_at_131072(form, fused):
    """One entry wrong in the last row is enough to leave the block alone."""
    spec = MaskSpec(131_072, form, param=4096, row=131_071, col=7)
    _, report, peak_mb = _fuse_traced(build(spec))
    (block,) = report.blocks
    assert block.fused == fused, block.reason
    assert peak_mb < 64, f"{peak_mb:.0f} MB traced while proving the mask"
    if form == "window":
        assert "sliding window of 4096 keys" in block.reason


def _stored_buffer_model(tmp_path, buffer: np.ndarray, seq: int) -> str:
    """Old TorchScript exports: a registered (1, 1, N, N) tril buffer, sliced to seq, in external data."""
    s, h, d = seq, 1, 64
    bias = numpy_helper.from_array(buffer[None, None], "bias")
    inits = [bias] + [numpy_helper.from_array(np.array(v), n) for n, v in
                      (("zeros", [0, 0]), ("ends", [s, s]), ("axes", [2, 3]), ("neg", np.float32(-1e4)))]
    nodes = [
        helper.make_node("Slice", ["bias", "zeros", "ends", "axes"], ["causal"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Where", ["causal", "scores", "neg"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]
    io = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, h, s, d])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "ts", [io("q"), io("k"), io("v")], [io("out")], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = str(tmp_path / "ts.onnx")
    onnx.save(model, path, save_as_external_data=True, location="ts.onnx.data", size_threshold=1024)
    return path


def test_stored_tril_buffer_is_read_in_row_blocks(tmp_path):
    n, seq = 6144, 5120  # past the whole-evaluation limit of 4096²: only the row-block reading can prove it
    path = _stored_buffer_model(tmp_path, np.tril(np.ones((n, n), dtype=bool)), seq)
    _, report, peak_mb = _fuse_traced(path)
    (block,) = report.blocks
    assert block.fused and block.causal, block.reason
    assert peak_mb < n * n / 2**20 / 2, f"{peak_mb:.0f} MB traced: the {n}² buffer was loaded"


def test_stored_buffer_with_one_wrong_entry_in_the_last_row(tmp_path):
    n, seq = 6144, 5120
    buffer = np.tril(np.ones((n, n), dtype=bool))
    buffer[seq - 1, 11] = False
    _, report, _ = _fuse_traced(_stored_buffer_model(tmp_path, buffer, seq))
    (block,) = report.blocks
    assert not block.fused and "not a function of i - j" in block.reason, block.reason


# --- the strip rules against whole evaluation, at a small size ------------------------------------

def _mask_graph(nodes, inits, output, shape) -> Graph:
    graph = helper.make_graph(nodes, "m", [], [helper.make_tensor_value_info(output, TensorProto.UNDEFINED, None)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return Graph(onnx.shape_inference.infer_shapes(model))


S = 12
_POS = [helper.make_node("Range", ["zero", "len", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["rows"]),
        helper.make_node("Unsqueeze", ["pos", "ax0"], ["cols"])]
_INITS = {"zero": np.int64(0), "len": np.int64(S), "one": np.int64(1), "ax0": np.array([0]), "ax1": np.array([1]),
          "k2": np.int64(2), "r0": np.array([3, 1]), "r1": np.array([10, 12]), "ax23": np.array([2, 3]),
          "shape4": np.array([2, 3, S, S]), "half": np.float32(0.5), "ax01": np.array([0, 1])}
CASES = {
    "compare": [helper.make_node("LessOrEqual", ["cols", "rows"], ["m"])],
    "float_index": [helper.make_node("Cast", ["pos"], ["pf"], to=TensorProto.FLOAT),
                    helper.make_node("Unsqueeze", ["pf", "ax1"], ["rf"]),
                    helper.make_node("Unsqueeze", ["pf", "ax0"], ["cf"]),
                    helper.make_node("Sub", ["cf", "rf"], ["m"])],
    "transposed": [helper.make_node("Greater", ["rows", "cols"], ["g"]),
                   helper.make_node("Transpose", ["g"], ["m"], perm=[1, 0])],
    "sliced_offsets": [helper.make_node("LessOrEqual", ["cols", "rows"], ["g"]),
                       helper.make_node("Unsqueeze", ["g", "ax01"], ["g4"]),
                       helper.make_node("Slice", ["g4", "r0", "r1", "ax23"], ["m"])],
    "trilu_upper_k": [helper.make_node("Sub", ["rows", "cols"], ["g"]),
                      helper.make_node("Trilu", ["g", "k2"], ["m"], upper=1)],
    "bool_vectors": [helper.make_node("Less", ["rows", "len"], ["row_ok"]),  # (S, 1) all true
                     helper.make_node("Less", ["cols", "len"], ["col_ok"]),  # (1, S) all true
                     helper.make_node("Equal", ["row_ok", "col_ok"], ["both"]),
                     helper.make_node("LessOrEqual", ["cols", "rows"], ["g"]),
                     helper.make_node("And", ["g", "both"], ["m"])],
    "expanded": [helper.make_node("Less", ["cols", "rows"], ["g"]),
                 helper.make_node("Expand", ["g", "shape4"], ["g4"]),
                 helper.make_node("Where", ["g4", "half", "zero"], ["m"])],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strip_equals_whole_evaluation(case):
    inits = dict(_INITS, zero=np.float32(0)) if case == "expanded" else _INITS
    nodes = _POS if case != "expanded" else [helper.make_node("Range", ["z", "len", "one"], ["pos"])] + _POS[1:]
    inits = dict(inits, z=np.int64(0))
    graph = _mask_graph(nodes + CASES[case], inits, "m", None)
    evaluator = Evaluator(graph, {})
    value = graph.value("m")
    whole = np.asarray(evaluator.value_of(value))
    strip = strip_of(Evaluator(graph, {}), value)
    np.testing.assert_array_equal(np.broadcast_to(strip.dense(), whole.shape), whole)


def test_row_dependent_values_are_not_diagonal():
    graph = _mask_graph(_POS + [helper.make_node("Add", ["rows", "cols"], ["m"])], _INITS, "m", None)
    with pytest.raises(NotDiagonal):
        strip_of(Evaluator(graph, {}), graph.value("m"))


@pytest.mark.parametrize("window", [None, 4096])
def test_symbolic_seq_llama_with_a_real_window(tmp_path, window):
    """Mistral's window of 4096 is causal at every length up to 4096: caught only past it."""
    llama = _llama_graph()
    path = str(tmp_path / "sym.onnx")
    llama.build_llama(path, llama.dataclasses.replace(llama.SMALL, layers=2, symbolic=True, window=window))
    _, report, peak_mb = _fuse_traced(path)
    if window is None:
        assert [(b.fused, b.causal, b.seq) for b in report.blocks] == [(True, True, "seq")] * 2, report.blocks
    else:
        assert [b.fused for b in report.blocks] == [False, False]
        assert all(f"with seq 'seq' at {window + 2}: the mask is a sliding window of {window} keys" in b.reason
                   for b in report.blocks), report.blocks
    assert peak_mb < 64


def test_identical_layers_share_one_layout_proof(tmp_path, monkeypatch):
    import fuse_attn.passes.plan as plan

    calls = []
    prove = plan._prove_layout
    monkeypatch.setattr(plan, "_prove_layout", lambda *a, **k: calls.append(1) or prove(*a, **k))
    llama = _llama_graph()
    path = str(tmp_path / "gqa.onnx")
    llama.build_llama(path, llama.dataclasses.replace(llama.SMALL, layers=4, hidden=512, heads=8, kv_heads=2,
                                                      seq=2048))
    _, report = fuse(path)
    assert [(b.fused, b.heads, b.kv_heads) for b in report.blocks] == [(True, 8, 2)] * 4, report.blocks
    assert len(calls) == 1


def test_masks_are_described_alike_by_diagonals_and_whole():
    """Near misses read as strips are named as the whole-array reading names them (seq_q = seq_k,
    the only shape that reaches the mask proof)."""
    from fuse_attn.ir.diagonal import Strip
    from fuse_attn.passes.masks import _describe_mask, _describe_strip

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(1500):
        s = int(rng.integers(1, 12))
        d = np.arange(-(s - 1), s)
        masked = [rng.random(2 * s - 1) < 0.5, (d < 0) | (d >= rng.integers(1, 12)), d < rng.integers(-11, 11),
                  (d < 0) ^ (d == rng.integers(-s + 1, s))][rng.integers(0, 4)]
        dense = Strip(masked, s, s).dense()
        causal = np.triu(np.ones((s, s), dtype=bool), 1)
        if dense.any() and not np.array_equal(dense, causal):
            assert _describe_strip(masked, s, s) == _describe_mask(dense, causal), masked
            checked += 1
    assert checked > 500
