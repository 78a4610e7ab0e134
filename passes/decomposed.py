"""Plan the fusion of decomposed attention found around a Softmax (see `find_attention`)."""

from __future__ import annotations

from fuse_attn.ir.evaluator import Evaluator, Unprovable
from fuse_attn.passes.find_attention import match_attention
from fuse_attn.passes.layout import check_moves_nothing, walk_chain
from fuse_attn.passes.plan import FusionPlan, Operand, plan_block
from fuse_attn.passes.products import pv_layout, q_and_k_layouts


def plan_decomposed(softmax, evaluator: Evaluator, opset: int) -> FusionPlan:
    try:
        rank = len(evaluator.shape_of(softmax.inputs[0]))
    except Unprovable:
        rank = None
    match = match_attention(softmax, opset, rank)
    if match.score_moves or match.prob_moves:
        check_moves_nothing(match.qk.node, match.score_moves, softmax, match.prob_moves, evaluator)
    q_layout, k_layout = q_and_k_layouts(match.qk)

    def v_layout(labels):
        return pv_layout(match.qk, match.pv, labels.ndim).v_layout(labels)

    output_perm = None  # a MatMul writes (.., q, d) as the kernel does; an Einsum may not
    if match.pv.equation is not None:
        output_perm = pv_layout(match.qk, match.pv, len(match.pv.equation[0])).output_perm
    return plan_block(
        Operand(walk_chain(match.query, allow_scale=True, evaluator=evaluator), q_layout),
        Operand(walk_chain(match.key_t, allow_scale=True, evaluator=evaluator), k_layout),
        Operand(walk_chain(match.value, allow_scale=False), v_layout),
        evaluator=evaluator,
        score_steps=lambda seq_q, seq_k: match.score_steps,
        output=match.output,
        insert_before=match.pv.node,
        output_perm=output_perm,
        dropout_p=match.dropout_p,
        seed=match.dropout_seed,
    )
