"""Read what the score steps do to QKᵀ: one scalar scale, and a mask that is none or causal.

The steps are replayed over concrete arrays: every mask, bias and fill operand is evaluated
(at the model's shapes, symbolic dims bound to sample sizes) and folded into a per-position
description of the softmax input:
    kept position   = scale * (QKᵀ)[i, j]            (additive term exactly 0)
    masked position = something <= MASKED_AT_MOST    (exp underflows to exactly 0)
Then the masked positions must be identical for every batch and head and equal either no
position (no mask) or the strict upper triangle (top-left causal, what the kernel applies).
Anything else is named: padding from an input, sliding window, additive bias, ...
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fuse_attn.ir.evaluator import DependsOnInput, Evaluator, Unprovable
from fuse_attn.passes._graph import NotFused, describe, memoized
from fuse_attn.passes.find_attention import ScoreStep

# An additive term at or below this removes a score: exp(-1000 + any realistic score spread)
# is exactly 0 in float32 and float16, as the kernel's -9984 is.
MASKED_AT_MOST = -1000.0


@dataclasses.dataclass(frozen=True)
class ScoreReading:
    scale: float
    causal: bool


def _operand(evaluator: Evaluator, step: ScoreStep, value, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):  # an op's implied operand (the Attention op's causal mask)
        return value
    try:
        return np.asarray(evaluator.value_of(value))
    except DependsOnInput as exc:
        raise NotFused(
            f"the {what} of {describe(step.node)} depends on the contents of graph input "
            f"'{exc.input_name}' (a padding mask?); if it is always all ones, pass --assume-no-padding",
            step.node,
        ) from None
    except Unprovable as exc:
        raise NotFused(f"cannot prove what the {what} of {describe(step.node)} is: {exc}", step.node) from None


def _square(array: np.ndarray, seq_q: int, seq_k: int, what: str) -> np.ndarray:
    """`array` broadcast to (..., seq_q, seq_k) and reduced to one (seq_q, seq_k) slice,
    provided every batch and head slice is the same."""
    try:
        full = np.broadcast_to(array, np.broadcast_shapes(array.shape, (seq_q, seq_k)))
    except ValueError:
        raise NotFused(f"the {what} of shape {array.shape} does not broadcast to the scores") from None
    if full.shape[-2:] != (seq_q, seq_k):
        raise NotFused(f"the {what} of shape {array.shape} does not broadcast to the scores")
    slices = full.reshape(-1, seq_q, seq_k)
    if len(slices) > 1 and not (slices == slices[:1]).all():
        raise NotFused(f"the {what} differs between batch entries or heads (a per-head position bias "
                       "such as ALiBi or T5's, or a per-example padding mask); the kernel applies one mask to all")
    return np.array(slices[0])


def _step_key(step: ScoreStep) -> tuple:
    def ident(x):
        return ("array", x.tobytes(), x.shape) if isinstance(x, np.ndarray) else id(x)

    return (step.kind, ident(step.operand), ident(step.condition), step.factor, step.scores_when_true)


def read_scores(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int) -> ScoreReading:
    """The scale and mask of the steps; blocks sharing the same mask values are read once."""
    key = ("scores", seq_q, seq_k, tuple(_step_key(s) for s in steps))
    return memoized(evaluator.memo, key, lambda: _read_scores(steps, evaluator, seq_q, seq_k))


def _float(array: np.ndarray) -> np.ndarray:
    """Mask arithmetic in float32 (seq² arrays are large), float64 only where the graph has it."""
    return array.astype(np.float64 if array.dtype == np.float64 else np.float32, copy=False)


def _read_scores(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int) -> ScoreReading:
    scale = 1.0
    square = (seq_q, seq_k)
    bias = None  # additive term on positions the scores still reach (None: zero everywhere)
    replaced = None  # positions a Where replaced by a constant (None: none)
    fill = None  # the constant at replaced positions (meaningless elsewhere)
    for step in steps:
        if step.kind == "cast":
            continue
        if step.kind == "scale":
            if not (np.isfinite(step.factor) and step.factor > 0):
                raise NotFused(f"the scale factor {step.factor} is not positive and finite", step.node)
            scale *= step.factor
            with np.errstate(invalid="ignore", over="ignore"):
                bias = None if bias is None else bias * step.factor
                fill = None if fill is None else fill * step.factor
        elif step.kind in ("add", "sub"):
            term = _square(_float(_operand(evaluator, step, step.operand, "additive term")),
                           seq_q, seq_k, "additive term")
            if step.kind == "sub":
                term = -term
            with np.errstate(invalid="ignore", over="ignore"):
                bias = term if bias is None else bias + term
                fill = None if fill is None else fill + term
        else:  # where
            cond = _square(_operand(evaluator, step, step.condition, "condition").astype(bool),
                           seq_q, seq_k, "mask condition")
            dropped = ~cond if step.scores_when_true else cond
            value = _square(_float(_operand(evaluator, step, step.operand, "fill value")),
                            seq_q, seq_k, "fill value")
            fill = value if fill is None else np.where(dropped, value, fill)
            replaced = dropped if replaced is None else replaced | dropped
    with np.errstate(invalid="ignore"):
        masked = np.zeros(square, dtype=bool) if bias is None else bias <= MASKED_AT_MOST
        if replaced is not None:
            if np.isnan(fill[replaced]).any():
                raise NotFused("the mask produces NaN scores")
            if (fill[replaced] > MASKED_AT_MOST).any():
                raise NotFused("scores are replaced by a constant that is not a mask value")
            masked |= replaced
        if bias is not None:
            if np.isnan(bias[~masked]).any():
                raise NotFused("the mask produces NaN scores")
            if (bias[~masked] != 0).any():
                raise NotFused("the unmasked scores get an additive bias (ALiBi, relative position or another "
                               "bias), which the kernel cannot add")
    causal = np.triu(np.ones(square, dtype=bool), 1)
    if not masked.any():
        return ScoreReading(scale, causal=False)
    if np.array_equal(masked, causal):
        return ScoreReading(scale, causal=True)
    raise NotFused(_describe_mask(masked, causal))


def _describe_mask(masked: np.ndarray, causal: np.ndarray) -> str:
    seq_q, seq_k = masked.shape
    if masked.all(axis=1).any():
        return "the mask removes every key of some query rows"
    if seq_q != seq_k and np.array_equal(masked, np.triu(np.ones_like(masked), seq_k - seq_q + 1)):
        return "the mask is causal aligned bottom-right, the kernel's is top-left"
    if (masked >= causal).all():
        kept_per_row = (~masked).sum(axis=1)
        window = int(kept_per_row.max())
        band = np.tril(np.ones_like(masked), -window) | causal
        if np.array_equal(masked, band):
            return f"the mask is a sliding window of {window} keys; the kernel's causal mask has no window"
        return "the mask is causal plus more masked positions (padding?)"
    wrong = int((masked != causal).sum())
    return f"the mask is neither none nor top-left causal ({wrong} positions differ from causal)"
