"""The standard ONNX `Attention` op (opset 23+), as torch emits it for scaled_dot_product_attention.

Accepted: 4D Q (b, h, s, d), K and V (b, kv, s, d); no past key/value, no nonpad_kv_seqlen,
no softcap or sliding window, only the first output used. GQA in the op is
`np.repeat(K, h // kv, axis=1)` — repeat_kv's order, the kernel's. The mask (is_causal, and a
boolean or additive attn_mask, which torch computes in the graph) is read like decomposed
attention's: evaluated and proven none or top-left causal.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from fuse_attn.ir.builder import NodeBuilder
from fuse_attn.ir.diagonal import Strip
from fuse_attn.ir.evaluator import Evaluator, Unprovable
from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import NotFused, describe
from fuse_attn.passes.find_attention import ScoreStep
from fuse_attn.passes.layout import walk_chain
from fuse_attn.passes.plan import FusionPlan, Operand, plan_block


def _input(node: Node, index: int) -> Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _to_kernel_qk(labels: np.ndarray) -> np.ndarray:
    """Q or K (b, heads, s, d) -> (b, heads, d, s)."""
    if labels.ndim != 4:
        raise NotFused(f"Attention inputs of rank {labels.ndim}; only 4D (b, heads, s, d) is fused")
    return labels.transpose(0, 1, 3, 2)


def _to_kernel_v(labels: np.ndarray) -> np.ndarray:
    """V (b, kv, s, d) is already the kernel's v."""
    if labels.ndim != 4:
        raise NotFused(f"Attention inputs of rank {labels.ndim}; only 4D (b, heads, s, d) is fused")
    return labels


def _is_empty_past(value: Value, evaluator: Evaluator) -> bool:
    """A past key/value (b, kv, past, d) whose past length is 0 at every binding of the free dims."""
    try:
        return all(at.shape_of(value)[-2] == 0 for at in (evaluator, evaluator.varied()))
    except (Unprovable, IndexError):
        return False


def _check_supported(node: Node, evaluator: Evaluator) -> None:
    if _input(node, 6) is not None:
        raise NotFused(f"{describe(node)} has a nonpad_kv_seqlen input (KV cache); the kernel needs seq_q == seq_k", node)
    for index, what in ((4, "past_key"), (5, "past_value")):
        past = _input(node, index)
        if past is not None and not _is_empty_past(past, evaluator):
            raise NotFused(f"{describe(node)} has a {what} input (KV cache); the kernel needs seq_q == seq_k "
                           "(fix its length at 0 with --dim for the prefill)", node)
    for index, what in ((3, "qk_matmul_output"),) + (() if _input(node, 4) is not None else
                                                      ((1, "present_key"), (2, "present_value"))):
        out = node.outputs[index] if len(node.outputs) > index else None
        if out is not None and (out.consumers() or out.is_graph_output()):
            raise NotFused(f"{describe(node)}'s {what} output is used", node)
    if node.attr("softcap", 0.0):
        raise NotFused(f"{describe(node)} has softcap, which the kernel does not apply", node)
    for attr in ("left_window_size", "right_window_size"):
        if node.attr(attr, -1) >= 0:
            raise NotFused(f"{describe(node)} has a sliding window ({attr})", node)
    for value in node.inputs[:3]:
        rank = None if value is None or value.shape is None else len(value.shape)
        if rank == 3 and not (node.attr("q_num_heads") and node.attr("kv_num_heads")):
            raise NotFused(f"{describe(node)} has 3D inputs without q_num_heads/kv_num_heads", node)
        if rank not in (None, 3, 4):
            raise NotFused(f"{describe(node)} has {rank}D inputs; only 3D (b, s, heads·d) or 4D (b, heads, s, d) "
                           "is fused", node)


def _fixed_last_dim(value: Value, evaluator: Evaluator) -> int:
    try:
        sizes = {at.shape_of(value)[-1] for at in (evaluator, evaluator.varied())}
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention layout: {exc}") from None
    if len(sizes) != 1:
        raise NotFused(f"the hidden size of '{value.name}' is symbolic: its heads cannot be split at a fixed size")
    return sizes.pop()


def _canonical(node: Node, evaluator: Evaluator) -> tuple[Node, list[tuple[Value, Value]]]:
    """`node` as a 4D Attention without past: the same op where the inputs are 3D (b, s, h·d) —
    an exact Reshape (b, s, h, d) and Transpose away — or the past is empty (present = the new
    K/V). The 4D node and its reshapes are added to the graph view ahead of `node`; they become
    part of the model only if the block fuses (their outputs have readers only then), and the
    original node's outputs are pointed at them then (the plan's `rewire_after`)."""
    query, key, value = node.inputs[:3]
    three_d = query.shape is not None and len(query.shape) == 3
    has_past = _input(node, 4) is not None or _input(node, 5) is not None
    if not three_d and not has_past:
        return node, []
    graph, nodes = node.graph, NodeBuilder(node.graph, node.name or "Attention")

    def heads_first(x: Value, heads: int, hint: str) -> str:
        if not three_d:
            return x.name
        if _fixed_last_dim(x, evaluator) % heads:
            raise NotFused(f"'{x.name}' has {_fixed_last_dim(x, evaluator)} features, not a multiple of {heads} heads")
        split = nodes.reshape(x.name, [0, 0, heads, _fixed_last_dim(x, evaluator) // heads], f"{hint}_split")
        return nodes.transpose(split, [0, 2, 1, 3], f"{hint}_heads")

    heads, kv_heads = node.attr("q_num_heads", 0), node.attr("kv_num_heads", 0)
    inputs = [heads_first(query, heads, "q"), heads_first(key, kv_heads, "k"), heads_first(value, kv_heads, "v")]
    mask = _input(node, 3)
    if mask is not None:
        inputs.append(mask.name)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.proto.attribute
             if a.name not in ("q_num_heads", "kv_num_heads")}
    out4 = nodes.op("Attention", inputs, "4d", **attrs)
    if three_d:  # back to (b, s, h·dv)
        merged = nodes.reshape(nodes.transpose(out4, [0, 2, 1, 3], "y_moved"), [0, 0, -1], "y_merged")
    else:  # a reader of the 4D output, which the kernel's output then replaces
        merged = nodes.identity(out4, "y")
    # present K/V of an empty past: the new K/V
    presents = [nodes.identity(source, f"present_{index}") for index, source in ((1, inputs[1]), (2, inputs[2]))]
    added = nodes.insert_before(node)
    canonical = next(n for n in added if n.op_type == "Attention")
    canonical_output = graph.value(merged)
    # What the original node's outputs become once the block fuses: Y, and the present K/V
    # (with an empty past, the new K/V in (b, kv, s, d)).
    adopt = [(old, new) for old, new in zip(node.outputs, (canonical_output, graph.value(presents[0]),
                                                            graph.value(presents[1])))
             if old is not None and (old.consumers() or old.is_graph_output())]
    return canonical, adopt


def plan_onnx_attention(node: Node, evaluator: Evaluator) -> FusionPlan:
    _check_supported(node, evaluator)
    node, adopt = _canonical(node, evaluator)
    query, key, value = node.inputs[:3]
    mask = _input(node, 3)

    def score_steps(seq_q: int, seq_k: int) -> tuple[ScoreStep, ...]:
        head_dim = evaluator.shape_of(query)[-1]
        scale = node.attr("scale", None) or 1.0 / math.sqrt(head_dim)
        steps = [ScoreStep("scale", node, factor=scale)]
        if mask is not None:
            if evaluator.dtype_of(mask) == TensorProto.BOOL:
                steps.append(ScoreStep("where", node, operand=np.array(-np.inf), condition=mask))
            else:
                steps.append(ScoreStep("add", node, operand=mask))
        if node.attr("is_causal", 0):
            below = Strip(np.arange(-(seq_k - 1), seq_q) >= 0, seq_q, seq_k)  # j <= i, one entry per diagonal
            steps.append(ScoreStep("where", node, operand=np.array(-np.inf), condition=below))
        return tuple(steps)

    plan = plan_block(
        Operand(walk_chain(query, allow_scale=True), _to_kernel_qk),
        Operand(walk_chain(key, allow_scale=True), _to_kernel_qk),
        Operand(walk_chain(value, allow_scale=False), _to_kernel_v),
        evaluator=evaluator,
        score_steps=score_steps,
        output=node.outputs[0],
        insert_before=node,
        scores_follow_q=True,  # the canonical op's scores are (b, h, s_q, s_k)
    )
    plan.rewire_after = adopt
    return plan
