"""Plan the fusion of decomposed attention found around a Softmax (see `find_attention`)."""

from __future__ import annotations

from fuse_attn.ir.evaluator import DependsOnInput, Evaluator, Unprovable
from fuse_attn.passes._graph import NotFused
from fuse_attn.passes.find_attention import match_attention
from fuse_attn.passes.layout import check_moves_nothing, walk_chain
from fuse_attn.passes.plan import FusionPlan, Operand, plan_block
from fuse_attn.passes.products import pv_layout, q_and_k_layouts


def _check_never_true(condition, evaluator: Evaluator) -> None:
    """Where(cond, 0, p) after the softmax is the identity when cond is all false (the expanded
    ONNX Attention's RowAllMasked: no row of the mask removes every key). Proven at the sample
    binding and with every free dim moved."""
    for at in (evaluator, evaluator.varied()) if evaluator.binding else (evaluator,):
        try:
            value = at.for_masks().value_of(condition)
        except DependsOnInput as exc:
            raise NotFused(f"the probabilities are zeroed where '{condition.name}' holds, which depends on the "
                           f"contents of graph input '{exc.input_name}'") from None
        except Unprovable as exc:
            raise NotFused(f"cannot prove that '{condition.name}' never zeroes the probabilities: {exc}") from None
        if value.astype(bool).any():
            raise NotFused(f"the probabilities are zeroed where '{condition.name}' holds (fully masked rows), "
                           "which the kernel does not do")


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
    plan = plan_block(
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
        scores_follow_q=match.qk.equation is None and not match.score_moves,
    )
    for condition in match.prob_guards:  # after the mask: a mask read from an input says so first
        _check_never_true(condition, evaluator)
    return plan
