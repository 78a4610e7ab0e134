"""load → passes → report: the whole fusion. `fuse_model` runs it on a loaded model; the Python API
(`fuse_attn.fuse`), `fuse-attn MODEL` and each model of `fuse-attn check` all call it."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import onnx

from fuse_attn import modelio
from fuse_attn.ir import contract
from fuse_attn.ir.evaluator import Evaluator
from fuse_attn.ir.graph import Graph, Node
from fuse_attn.report import BlockReport, FuseReport
from fuse_attn.specialize import ShapeError, Specialization, specialize
from fuse_attn.passes._graph import NotFused, dtype_name, is_op
from fuse_attn.passes.cleanup import declare_flash_fwd, remove_dead_nodes
from fuse_attn.passes.decomposed import plan_decomposed
from fuse_attn.passes.empty_operands import drop_empty_concat_operands
from fuse_attn.passes.onnx_attention import plan_onnx_attention
from fuse_attn.passes.plan import FusionPlan
from fuse_attn.passes.rewrite import emit_flash_fwd

def _ones(shape, dtype):
    return np.ones(shape, dtype=dtype)


def _existing_function_dtype(model: onnx.ModelProto) -> int | None:
    """The dtype an already shipped FlashFwd function body (opset < 15) is written for."""
    for function in model.functions:
        if function.domain == contract.DOMAIN and function.name == contract.OP_TYPE:
            return contract.function_dtype(function)
    return None


class _FunctionDtype:
    """Below opset 15 FlashFwd's function has no CastLike and serves one dtype per model: the
    first fused block's, and a block of another dtype is left alone."""

    def __init__(self, model: onnx.ModelProto, opset: int):
        self.needed = opset < contract.GENERIC_FUNCTION_OPSET
        self.opset = opset
        self.dtype = _existing_function_dtype(model) if self.needed else None

    def admit(self, dtype: int) -> None:
        if not self.needed:
            return
        if self.dtype is None:
            self.dtype = dtype
        elif dtype != self.dtype:
            raise NotFused(f"the block is {dtype_name(dtype)}, but at opset {self.opset} (no CastLike) FlashFwd's "
                           f"function serves one dtype per model, here {dtype_name(self.dtype)}; "
                           "upgrade the model to opset 15+ to fuse both")


def _block_report(anchor: Node, plan: FusionPlan, node: Node, inserted: list[Node]) -> BlockReport:
    attrs = plan.attrs
    return BlockReport(
        op_type=anchor.op_type, name=anchor.name, fused=True, node=node.name,
        heads=attrs.num_heads, kv_heads=attrs.num_kv_heads, head_dim=plan.head_dim,
        batch=plan.batch, seq=plan.seq, scale=node.attr("softmax_scale"), causal=attrs.use_causal_mask,
        grid=[plan.batch, attrs.num_kv_heads], seq_tile_size=attrs.seq_tile_size,
        dropout_p=attrs.dropout_p, notes=list(plan.notes),
        transposes_added=sum(is_op(n, "Transpose") for n in inserted),
        key_mask_inputs=list(plan.key_mask.inputs) if plan.key_mask is not None else [],
        key_mask_assumption=plan.key_mask.assumption if plan.key_mask is not None else None,
    )


def fuse_graph(graph: Graph, *, name: str = "model", assume_no_padding: bool = False,
               progress: bool = False, specialized: Specialization | None = None,
               freeze_initializer_inputs: bool = False) -> FuseReport:
    """Fuse every attention block of `graph` (edits kept in the view); returns what was done
    and, for every block left alone, why. `specialized`: the dims fixed in the model before
    (`fuse_attn.specialize`), for the report; operands they make empty drop out.

    assume_no_padding: graph inputs whose contents reach a mask or bias operand are all ones.
    freeze_initializer_inputs: initializers also listed as graph inputs hold their stored value."""
    start = time.perf_counter()
    graph.freeze_initializer_inputs = freeze_initializer_inputs
    # Only mask and bias operands may read these (Evaluator.for_masks).
    declared = {v.name: _ones for v in graph.inputs if not v.is_overridable()} if assume_no_padding else {}
    # Blocks inside If/Loop/Scan bodies too (optimum's merged decoder keeps every block in If branches).
    anchors = [n for n in graph.all_nodes() if is_op(n, "Softmax", "Attention")]
    evaluator = Evaluator.tied_for_graph(graph, {}, [n.outputs[0] for n in anchors if n.outputs[0] is not None],
                                         mask_inputs=declared)
    report = FuseReport(model=name)
    if specialized is not None:
        report.specialized = specialized.lines()
        drop_empty_concat_operands(list(graph.all_nodes()), evaluator)
    report.already_fused = sum(n.domain == contract.DOMAIN and n.op_type == contract.OP_TYPE for n in graph.all_nodes())
    transposes_before = sum(is_op(n, "Transpose") for n in graph.all_nodes())
    function_dtype = _FunctionDtype(graph.model, graph.opset)
    if progress:  # a bar only for a person watching a terminal
        from tqdm import tqdm

        anchors = tqdm(anchors, desc="attention blocks", leave=False)
    for anchor in anchors:
        try:
            if anchor.op_type == "Softmax":
                plan = plan_decomposed(anchor, evaluator, graph.opset)
            else:
                plan = plan_onnx_attention(anchor, evaluator)
            function_dtype.admit(evaluator.dtype_of(plan.output))
        except NotFused as exc:
            report.blocks.append(BlockReport(op_type=anchor.op_type, name=anchor.name, fused=False,
                                             reason=exc.reason))
            continue
        if anchor.graph is not graph:
            plan.notes.append(f"inside subgraph '{anchor.graph.proto.name}'")
        flash, _, inserted = emit_flash_fwd(anchor.graph, plan, graph.unique_name(f"FlashFwd_{report.fused}"))
        for old, new in plan.rewire_after:
            anchor.graph.replace_uses(old, new)
        report.blocks.append(_block_report(anchor, plan, flash, inserted))
    if report.fused:
        remove_dead_nodes(graph)
        graph.to_model()
        declare_flash_fwd(graph.model, function_dtype.dtype)
    report.transposes_added = sum(b.transposes_added for b in report.blocks)
    report.transposes_net = sum(is_op(n, "Transpose") for n in graph.all_nodes()) - transposes_before
    report.assumed_all_ones = sorted(evaluator.declared_used)
    report.assumptions = [f"graph input '{n}' is all ones (--assume-no-padding): it reaches a mask"
                          for n in report.assumed_all_ones]
    report.assumptions += [f"initializer '{n}', also a graph input, holds its stored value (--freeze-initializer-inputs)"
                           for n in sorted(graph.frozen_used)]
    report.seconds = time.perf_counter() - start
    return report


def specialize_proto(proto: onnx.ModelProto, shapes: dict | None, dims: dict | None) -> Specialization | None:
    """Fix `shapes` ({input: dims}) and `dims` ({symbol: size}) in `proto`; None when none given."""
    if not shapes and not dims:
        return None
    try:
        return specialize(proto, shapes or {}, dims or {})
    except ShapeError as exc:
        raise modelio.InputError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How a model is fused: the options of `fuse()` and `fuse-attn` (`fuse_attn.commands.fuse_options`
    reads them from the command line)."""

    assume_no_padding: bool = False
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    freeze_initializer_inputs: bool = False


@dataclasses.dataclass(frozen=True)
class FusedModel:
    model: onnx.ModelProto  # the fused model (the proto `fuse_model` was given, edited)
    report: FuseReport
    specialized: Specialization | None  # the dims options.shapes and options.dims fixed, if any


def fuse_model(proto: onnx.ModelProto, base_dir: str | None, options: FuseOptions = FuseOptions(), *,
               name: str = "model", progress: bool = False) -> FusedModel:
    """Fix the shapes and dims `options` names in `proto`, then fuse every attention block; the
    proto is edited in place (pass a copy to keep the original). `base_dir`: the model's folder,
    where its external data is read from (None: a model in memory). A --shape or --dim this model
    cannot take is an InputError."""
    specialized = specialize_proto(proto, options.shapes, options.dims)
    graph = Graph(proto, base_dir)
    report = fuse_graph(graph, name=name, assume_no_padding=options.assume_no_padding, progress=progress,
                        specialized=specialized, freeze_initializer_inputs=options.freeze_initializer_inputs)
    return FusedModel(graph.model, report, specialized)


def fuse(model_or_path: str | os.PathLike | onnx.ModelProto, *, assume_no_padding: bool = False,
         progress: bool = False, shapes: dict[str, tuple[int, ...]] | None = None,
         dims: dict[str, int] | None = None, freeze_initializer_inputs: bool = False) -> tuple[onnx.ModelProto, FuseReport]:
    """Fuse every attention block into FlashFwd. Returns the fused model (a new ModelProto;
    the input is not modified) and the report. Save it with `fuse_attn.save`.

    `shapes` ({input name: dims}) and `dims` ({symbol: size}) fix input shapes before proving
    (`--shape`, `--dim`); the fused model declares them."""
    if isinstance(model_or_path, onnx.ModelProto):
        modelio.validate(model_or_path, "model")
        proto, base_dir, name = onnx.ModelProto(), None, model_or_path.graph.name or "model"
        proto.CopyFrom(model_or_path)
    else:
        proto = modelio.load_proto(model_or_path)
        modelio.validate(proto, os.fspath(model_or_path))
        base_dir, name = os.path.dirname(os.path.abspath(model_or_path)), os.fspath(model_or_path)
    options = FuseOptions(assume_no_padding=assume_no_padding, shapes=shapes or {}, dims=dims or {},
                          freeze_initializer_inputs=freeze_initializer_inputs)
    fused = fuse_model(proto, base_dir, options, name=name, progress=progress)
    return fused.model, fused.report
