"""What the proof may take from graph inputs (issue 11): initializers also listed as inputs are
inputs unless frozen; --assume-no-padding vouches only for inputs that reach a mask; reasons
name the model's dims, not the pass's sample lengths."""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from attention_graphs import (BIDIR, CAUSAL, FUSED_TOL, NEAR_MISSES, build, flash_nodes, fuse_model,
                              fused_vs_original, run_comparable)


def _as_graph_input(model: onnx.ModelProto, name: str, drop_initializer: bool = False) -> onnx.ModelProto:
    """A copy of `model` with initializer `name` also listed among the graph inputs (or only there)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    tensor = next(t for t in m.graph.initializer if t.name == name)
    m.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    if drop_initializer:
        kept = [t for t in m.graph.initializer if t.name != name]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept)
    return m


def _operand(model: onnx.ModelProto, op_type: str, index: int) -> str:
    return next(n.input[index] for n in model.graph.node if n.op_type == op_type)


def test_causal_mask_initializer_listed_as_input_is_an_input_unless_frozen():
    built = build(dataclasses.replace(CAUSAL, mask_form="add"))
    mask = _operand(built.model, "Add", 1)
    model = _as_graph_input(built.model, mask)
    _, report = fuse_model(model)
    (block,) = report.blocks
    assert not block.fused and f"'{mask}'" in block.reason and "--freeze-initializer-inputs" in block.reason, block
    # what the refusal protects: a caller replacing the default mask changes the original's output
    feeds = built.inputs()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zero_mask = {**feeds, mask: np.zeros((1, 1, CAUSAL.seq, CAUSAL.seq), np.float32)}
    assert np.abs(session.run(None, zero_mask)[0] - session.run(None, feeds)[0]).max() > 0.1

    fused, report = fuse_model(model, freeze_initializer_inputs=True)
    (block,) = report.blocks
    assert block.fused and block.causal, block
    assert report.assumptions == [f"initializer '{mask}', also a graph input, holds its stored value "
                                  "(--freeze-initializer-inputs)"]
    assert fused_vs_original(built, fused, feeds) <= FUSED_TOL


def test_scale_initializer_listed_as_input_is_refused_naming_it():
    built = build(CAUSAL)
    scale = _operand(built.model, "Div", 1)
    _, report = fuse_model(_as_graph_input(built.model, scale))
    (block,) = report.blocks
    assert not block.fused and f"'{scale}'" in block.reason and "scale" in block.reason, block


def test_assume_no_padding_vouches_only_for_inputs_that_reach_a_mask():
    built = build(NEAR_MISSES["padding_head_dim_128"])  # no room for the key-bias column: the flag is the route
    fused, report = fuse_model(built.model, assume_no_padding=True)
    assert [b.fused for b in report.blocks] == [True]
    assert report.assumptions == ["graph input 'attention_mask' is all ones (--assume-no-padding): it reaches a mask"]
    assert fused_vs_original(built, fused) <= FUSED_TOL

    # the scale made a graph input: its contents reach the scale, not a mask, so they are never assumed
    scale = _operand(built.model, "Div", 1)
    model = _as_graph_input(built.model, scale, drop_initializer=True)
    _, report = fuse_model(model, assume_no_padding=True)
    (block,) = report.blocks
    assert not block.fused and f"graph input '{scale}'" in block.reason, block
    assert all(scale not in a for a in report.assumptions), report.assumptions


def test_seq_mismatch_names_the_models_dims_not_sample_lengths():
    model = build(dataclasses.replace(BIDIR, seq_kv=1024)).model
    _, report = fuse_model(model)
    assert "seq_q 512 != seq_k 1024" in report.blocks[0].reason, report.blocks[0].reason

    symbolic = onnx.ModelProto()
    symbolic.CopyFrom(model)  # the seq dims named as optimum names them; nothing else declares a shape
    del symbolic.graph.value_info[:]
    for value, name in ((symbolic.graph.input[0], "sequence_length"), (symbolic.graph.input[1], "encoder_sequence_length"),
                        (symbolic.graph.output[0], "sequence_length")):
        value.type.tensor_type.shape.dim[1].dim_param = name
    _, report = fuse_model(symbolic)
    (block,) = report.blocks
    assert not block.fused and "seq_q 'sequence_length' != seq_k 'encoder_sequence_length'" in block.reason, block


def test_freeze_initializer_inputs_on_the_command_line(tmp_path):
    from fuse_attn.commands.cli import main

    built = build(dataclasses.replace(CAUSAL, mask_form="add"))
    mask = _operand(built.model, "Add", 1)
    path = tmp_path / "model.onnx"
    onnx.save(_as_graph_input(built.model, mask), path)
    assert main([str(path), "-o", str(tmp_path / "a.onnx"), "-q"]) == 0
    assert not flash_nodes(onnx.load(tmp_path / "a.onnx"))
    assert main([str(path), "-o", str(tmp_path / "b.onnx"), "--freeze-initializer-inputs", "--verify"]) == 0
    assert len(flash_nodes(onnx.load(tmp_path / "b.onnx"))) == 1
