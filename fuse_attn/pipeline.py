"""load → passes → report: the whole fusion, callable from Python as `fuse_attn.fuse`."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from fuse_attn import contract, modelio
from fuse_attn.evaluator import Evaluator
from fuse_attn.report import BlockReport, FuseReport
from passes._graph import NotFused, describe, is_op
from passes.cleanup import declare_flash_fwd, remove_dead_nodes
from passes.decomposed import plan_decomposed
from passes.onnx_attention import plan_onnx_attention
from passes.plan import FusionPlan
from passes.rewrite import emit_flash_fwd

BATCH_SAMPLE = 2
# Symbolic seq lengths are proven at these sizes (one per distinct symbol, so that two symbols
# never look equal by accident); the compile step checks again at the real, fixed shapes.
FIRST_SEQ_SAMPLE, SEQ_SAMPLE_STEP = 96, 8


def sample_binding(graph: ir.Graph) -> dict[str, int]:
    """A concrete size for every free symbolic dim: those of the graph inputs.

    Symbols that only intermediate values carry (shape inference's `unk__N`) are not free:
    the evaluator infers them from the inputs instead of inventing a size.
    """
    binding: dict[str, int] = {}
    others = 0
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            name = None if isinstance(dim, int) else getattr(dim, "value", None)
            if name is None or name in binding:
                continue
            if axis == 0:
                binding[name] = BATCH_SAMPLE
            else:
                binding[name] = FIRST_SEQ_SAMPLE + SEQ_SAMPLE_STEP * others
                others += 1
    return binding


def _ones(shape, dtype):
    return np.ones(shape, dtype=dtype)


def _block_report(anchor: ir.Node, plan: FusionPlan, node: ir.Node, transposes: int) -> BlockReport:
    attrs = plan.attrs
    return BlockReport(
        block=describe(anchor), fused=True, node=node.name,
        heads=attrs.num_heads, kv_heads=attrs.num_kv_heads, head_dim=plan.head_dim,
        batch=plan.batch, seq=plan.seq, scale=attrs.softmax_scale, causal=attrs.use_causal_mask,
        grid=[plan.batch, attrs.num_kv_heads], seq_tile_size=attrs.seq_tile_size,
        dropout_p=attrs.dropout_p, transposes_added=transposes, notes=list(plan.notes),
    )


def fuse_model(model: ir.Model, *, name: str = "model", assume_no_padding: bool = False,
               progress: bool = False) -> FuseReport:
    """Fuse every attention block of `model` in place; returns what was done and why not."""
    start = time.perf_counter()
    graph = model.graph
    opset = model.opset_imports.get("", contract.MIN_OPSET)
    declared = {v.name: _ones for v in graph.inputs} if assume_no_padding else {}
    evaluator = Evaluator(graph, sample_binding(graph), declared)
    report = FuseReport(model=name)

    existing = [n for n in graph if n.domain == contract.DOMAIN and n.op_type == contract.OP_TYPE]
    report.already_fused = len(existing)
    taken = {n.name for n in graph}
    transposes_before = sum(is_op(n, "Transpose") for n in graph)
    anchors = [n for n in graph if is_op(n, "Softmax", "Attention")]
    counter = len(existing)
    for anchor in tqdm(anchors, desc="attention blocks", disable=not progress, leave=False):
        try:
            if anchor.op_type == "Softmax":
                plan = plan_decomposed(anchor, evaluator, opset)
            else:
                plan = plan_onnx_attention(anchor, evaluator)
        except NotFused as exc:
            report.blocks.append(BlockReport(block=describe(anchor), fused=False, reason=exc.reason))
            continue
        while f"FlashFwd_{counter}" in taken:
            counter += 1
        node_name = f"FlashFwd_{counter}"
        taken.add(node_name)
        flash = emit_flash_fwd(graph, plan, node_name)
        report.blocks.append(_block_report(anchor, plan, flash, plan.q.nodes_needed + plan.k.nodes_needed
                                           + plan.v.nodes_needed))
    if report.fused:
        declare_flash_fwd(model)
        remove_dead_nodes(model)
    report.transposes_added = sum(is_op(n, "Transpose") for n in graph) - transposes_before
    report.assumptions = [f"graph input '{n}' is all ones (--assume-no-padding)"
                          for n in sorted(evaluator.declared_used)]
    report.seconds = time.perf_counter() - start
    return report


def fuse(model_or_path: str | os.PathLike | onnx.ModelProto | ir.Model, *, assume_no_padding: bool = False,
         progress: bool = False) -> tuple[ir.Model, FuseReport]:
    """Fuse every attention block into FlashFwd. A path or proto is loaded first; an
    `ir.Model` is fused in place. Returns the fused model and the report."""
    if isinstance(model_or_path, ir.Model):
        model, name = model_or_path, model_or_path.graph.name or "model"
    elif isinstance(model_or_path, onnx.ModelProto):
        modelio.validate(model_or_path, "model")
        model, name = modelio.to_ir(model_or_path, None), model_or_path.graph.name or "model"
    else:
        model, name = modelio.load(model_or_path), os.fspath(model_or_path)
    report = fuse_model(model, name=name, assume_no_padding=assume_no_padding, progress=progress)
    return model, report
