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
from onnx import TensorProto

from fuse_attn.ir.diagonal import Strip
from fuse_attn.ir.evaluator import Evaluator
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


def _check_supported(node: Node) -> None:
    for index, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if _input(node, index) is not None:
            raise NotFused(f"{describe(node)} has a {what} input (KV cache); the kernel needs seq_q == seq_k", node)
    for index, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        out = node.outputs[index] if len(node.outputs) > index else None
        if out is not None and (out.consumers() or out.is_graph_output()):
            raise NotFused(f"{describe(node)}'s {what} output is used", node)
    if node.attr("softcap", 0.0):
        raise NotFused(f"{describe(node)} has softcap, which the kernel does not apply", node)
    for attr in ("left_window_size", "right_window_size"):
        if node.attr(attr, -1) >= 0:
            raise NotFused(f"{describe(node)} has a sliding window ({attr})", node)
    for value in node.inputs[:3]:
        if value is not None and value.shape is not None and len(value.shape) != 4:
            raise NotFused(f"{describe(node)} has {len(value.shape)}D inputs; only 4D (b, heads, s, d) is fused", node)


def plan_onnx_attention(node: Node, evaluator: Evaluator) -> FusionPlan:
    _check_supported(node)
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

    return plan_block(
        Operand(walk_chain(query, allow_scale=True), _to_kernel_qk),
        Operand(walk_chain(key, allow_scale=True), _to_kernel_qk),
        Operand(walk_chain(value, allow_scale=False), _to_kernel_v),
        evaluator=evaluator,
        score_steps=score_steps,
        output=node.outputs[0],
        insert_before=node,
    )
