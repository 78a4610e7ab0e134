"""Plan the fusion of decomposed attention found around a Softmax (see `find_attention`)."""

from __future__ import annotations

from fuse_attn.evaluator import Evaluator, Unprovable
from passes.find_attention import match_attention
from passes.layout import walk_chain
from passes.plan import FusionPlan, Operand, plan_block, q_layout, same_layout


def plan_decomposed(softmax, evaluator: Evaluator, opset: int) -> FusionPlan:
    try:
        rank = len(evaluator.shape_of(softmax.inputs[0]))
    except Unprovable:
        rank = None
    match = match_attention(softmax, opset, rank)
    return plan_block(
        Operand(walk_chain(match.query, allow_scale=True), q_layout),
        Operand(walk_chain(match.key_t, allow_scale=True), same_layout),
        Operand(walk_chain(match.value, allow_scale=False), same_layout),
        evaluator=evaluator,
        score_steps=lambda seq_q, seq_k: match.score_steps,
        output=match.output,
        insert_before=match.pv,
        dropout_p=match.dropout_p,
        seed=match.dropout_seed,
    )
