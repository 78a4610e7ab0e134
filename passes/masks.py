"""Read what the score steps do to QKᵀ: one scalar scale, and a mask that is none or causal.

The steps are replayed over concrete arrays: every mask, bias and fill operand is evaluated
(at the model's shapes, symbolic dims bound to sample sizes) and folded into a per-position
description of the softmax input:
    kept position   = scale * (QKᵀ)[i, j]            (additive term exactly 0)
    masked position = something <= MASKED_AT_MOST    (exp underflows to exactly 0)
Then the masked positions must be identical for every batch and head and equal either no
position (no mask) or the strict upper triangle (top-left causal, what the kernel applies).
Anything else is named: padding from an input, sliding window, additive bias, ...

Positions are read in one of two geometries. Masks are nearly always functions of i − j
(`fuse_attn/ir/diagonal.py`): then every operand is a strip of seq_q + seq_k − 1 numbers, one
per diagonal, and the proof costs O(seq) at any length. A mask that is not (a padding row or
column, say) is evaluated whole, as a seq_q × seq_k array, up to `MAX_DENSE_POSITIONS`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto

from fuse_attn.ir.diagonal import NotDiagonal, Strip, as_strip, is_square, strip_of
from fuse_attn.ir.evaluator import DependsOnInput, Evaluator, Unprovable
from fuse_attn.ir.graph import Value
from fuse_attn.passes._graph import NotFused, describe, is_op, memoized, shape_words
from fuse_attn.passes.find_attention import ScoreStep
from fuse_attn.passes.scales import scale_value, uniform

# An additive term at or below this removes a score: exp(-1000 + any realistic score spread)
# is exactly 0 in float32 and float16, as the kernel's -9984 is.
MASKED_AT_MOST = -1000.0
# A mask that is not a function of i − j is evaluated whole; beyond this many positions
# (seq 4096², 16M) that would cost seq² memory, and the block is left alone instead.
MAX_DENSE_POSITIONS = 1 << 24


@dataclasses.dataclass(frozen=True)
class ScoreReading:
    scale: float
    causal: bool


def _operand(evaluator: Evaluator, step: ScoreStep, value, what: str, strips: bool) -> np.ndarray | Strip:
    """The operand as it is: an array, or with `strips` a Strip when it is seq × seq."""
    if isinstance(value, (np.ndarray, Strip)):  # an op's implied operand (the Attention op's causal mask)
        return value.dense() if isinstance(value, Strip) and not strips else value
    try:
        mask_evaluator = evaluator.for_masks()  # with the inputs --assume-no-padding vouched for
        if strips and is_square(mask_evaluator.shape_of(value)):
            return strip_of(mask_evaluator, value)
        return np.asarray(mask_evaluator.value_of(value))
    except DependsOnInput as exc:
        if exc.overridable:
            raise NotFused(f"the {what} of {describe(step.node)} {exc}", step.node) from None
        raise NotFused(
            f"the {what} of {describe(step.node)} depends on the contents of graph input "
            f"'{exc.input_name}' (a padding mask?); if it is always all ones, pass --assume-no-padding",
            step.node,
        ) from None
    except Unprovable as exc:
        raise NotFused(f"cannot prove what the {what} of {describe(step.node)} is: {exc}", step.node) from None


def _square(array: np.ndarray | Strip, seq_q: int, seq_k: int, what: str, strips: bool,
            source: tuple[Evaluator, object] | None = None) -> np.ndarray:
    """`array` broadcast to (..., seq_q, seq_k) and reduced to one (seq_q, seq_k) slice, or with
    `strips` to one strip of seq_q + seq_k − 1 diagonals, provided every batch and head slice is the same."""
    if strips:
        table = as_strip(array, seq_q, seq_k).table
        slices = table.reshape(-1, table.shape[-1])
        if len(slices) > 1 and not (slices == slices[:1]).all():
            raise NotFused(f"the {what} differs between batch entries or heads (a per-head position bias "
                           "such as ALiBi or T5's, or a per-example padding mask); the kernel applies one mask to all")
        return np.array(np.broadcast_to(slices[0], (seq_q + seq_k - 1,)))
    try:
        full = np.broadcast_to(array, np.broadcast_shapes(array.shape, (seq_q, seq_k)))
    except ValueError:
        raise NotFused(f"the {what} of shape {_shape_words(array, source)} does not broadcast to the scores") from None
    if full.shape[-2:] != (seq_q, seq_k):
        raise NotFused(f"the {what} of shape {_shape_words(array, source)} does not broadcast to the scores")
    slices = full.reshape(-1, seq_q, seq_k)
    if len(slices) > 1 and not (slices == slices[:1]).all():
        raise NotFused(f"the {what} differs between batch entries or heads (a per-head position bias "
                       "such as ALiBi or T5's, or a per-example padding mask); the kernel applies one mask to all")
    return np.array(slices[0])


def _shape_words(array: np.ndarray, source: tuple[Evaluator, object] | None) -> str:
    """The operand's shape for a reason: in the model's words when it is a graph value (`source`)."""
    evaluator, value = source if source is not None else (None, None)
    if not isinstance(value, Value):
        return str(array.shape)
    return shape_words(evaluator.for_masks(), value)


def _renorm_dropped(step: ScoreStep, evaluator: Evaluator, seq_q: int, seq_k: int, strips: bool) -> np.ndarray:
    """The positions a renormalised softmax drops: softmax(s)·m / rowsum(softmax(s)·m) is the
    softmax of s over the keys where m != 0, provided m is one number on every kept key (it
    cancels); other weights would be an additive bias log(m)."""
    weights = _square(_float(_operand(evaluator, step, step.operand, "mask", strips)), seq_q, seq_k, "mask", strips,
                      (evaluator, step.operand))
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise NotFused("the probabilities are multiplied by negative or non-finite weights before the "
                       "renormalisation", step.node)
    if (weights != 0).any() and uniform(weights[weights != 0]) is None:
        raise NotFused("the probabilities are reweighted before the renormalisation (an additive bias "
                       "log(weight), which the kernel cannot add)", step.node)
    return weights == 0


def _step_key(step: ScoreStep) -> tuple:
    def ident(x):
        if isinstance(x, Strip):
            return ("strip", x.table.tobytes(), x.table.shape, x.rows, x.cols)
        return ("array", x.tobytes(), x.shape) if isinstance(x, np.ndarray) else id(x)

    return (step.kind, ident(step.operand), ident(step.condition), step.factor, step.divides, step.scores_when_true)


def _multiplier(step: ScoreStep, evaluator: Evaluator, seq_q: int, seq_k: int,
                strips: bool) -> tuple[float, np.ndarray | None]:
    """What a Mul or Div of the scores by a value does: one number (a scale, computed from
    constants and shapes), or a multiplicative mask — one number where scores are kept and 0
    where they are dropped (tf2onnx: scores·Cast(mask) + (−big)·Cast(Not(mask))).
    Returns the factor and the positions multiplied by 0 (None: none)."""
    try:
        if strips and is_square(evaluator.shape_of(step.operand)):
            array, from_shapes = strip_of(evaluator, step.operand), True
        else:
            array, from_shapes = np.asarray(evaluator.value_of(step.operand)), True
    except DependsOnInput as exc:
        # A mask from an input's contents (only with --assume-no-padding) is a cast boolean; a
        # scale read from an input is never assumed.
        cast = step.operand.producer()
        if step.divides or not is_op(cast, "Cast") or evaluator.dtype_of(cast.inputs[0]) != TensorProto.BOOL:
            raise NotFused(f"the scale '{step.operand.name}' {exc}", step.node) from None
        array, from_shapes = _operand(evaluator, step, step.operand, "multiplicative mask", strips), False
    except Unprovable as exc:
        raise NotFused(f"the scale '{step.operand.name}' is neither a constant nor computed from shapes: {exc}",
                       step.node) from None
    values = array.table if isinstance(array, Strip) else array
    if uniform(values) is not None and (from_shapes or uniform(values) != 0):
        factor = scale_value(step.operand, evaluator) if from_shapes else uniform(values)
        return (1.0 / factor if factor else float("inf")) if step.divides else factor, None
    not_one = f"the scale '{step.operand.name}' is not one number (a per-head or per-position scale)"
    values = _float(values)
    # Kept scores all get the same factor (a mask read from an input may keep none: any factor does).
    factor = uniform(values[values != 0]) if (values != 0).any() else 1.0
    if step.divides or factor is None or np.isnan(values).any():
        raise NotFused(not_one, step.node)
    return factor, _square(_float(array), seq_q, seq_k, "multiplicative mask", strips,
                           (evaluator, step.operand)) == 0


def read_scores(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int) -> ScoreReading:
    """The scale and mask of the steps; blocks sharing the same mask values are read once."""
    key = ("scores", seq_q, seq_k, tuple(_step_key(s) for s in steps))
    return memoized(evaluator.memo, key, lambda: _read_scores(steps, evaluator, seq_q, seq_k))


def _float(array: np.ndarray | Strip) -> np.ndarray | Strip:
    """Mask arithmetic in float32 (seq² arrays are large), float64 only where the graph has it."""
    if isinstance(array, Strip):
        return Strip(_float(array.table), array.rows, array.cols)
    return array.astype(np.float64 if array.dtype == np.float64 else np.float32, copy=False)


def _bool(array: np.ndarray | Strip) -> np.ndarray | Strip:
    if isinstance(array, Strip):
        return Strip(array.table.astype(bool), array.rows, array.cols)
    return array.astype(bool)


def _strips_else_dense(compute, seq_q: int, seq_k: int):
    """compute(strips=True), or where the mask is not a function of i - j, compute(strips=False)
    (the whole seq_q x seq_k) when that fits."""
    try:
        return compute(strips=True)
    except NotDiagonal as exc:
        if seq_q * seq_k > MAX_DENSE_POSITIONS:
            raise NotFused(f"the mask is not a function of i - j ({exc}), and evaluating it whole at seq "
                           f"{seq_q} x {seq_k} would take seq² memory") from None
    return compute(strips=False)


def _read_scores(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int) -> ScoreReading:
    return _strips_else_dense(lambda strips: _read(steps, evaluator, seq_q, seq_k, strips=strips), seq_q, seq_k)


def all_masked(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int) -> bool:
    """Whether the steps mask every score (whatever the scores are)."""
    return _strips_else_dense(lambda strips: bool(_masked(steps, evaluator, seq_q, seq_k, strips=strips)[1].all()),
                              seq_q, seq_k)


def _read(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int, strips: bool) -> ScoreReading:
    square = (seq_q + seq_k - 1,) if strips else (seq_q, seq_k)
    scale, masked = _masked(steps, evaluator, seq_q, seq_k, strips)
    if strips:
        causal = np.arange(-(seq_k - 1), seq_q) < 0  # j > i
    else:
        causal = np.triu(np.ones(square, dtype=bool), 1)
    if not masked.any():
        return ScoreReading(scale, causal=False)
    if np.array_equal(masked, causal):
        return ScoreReading(scale, causal=True)
    raise NotFused(_describe_strip(masked, seq_q, seq_k) if strips else _describe_mask(masked, causal))


def _masked(steps: tuple[ScoreStep, ...], evaluator: Evaluator, seq_q: int, seq_k: int,
            strips: bool) -> tuple[float, np.ndarray]:
    """The scale and the masked positions (a strip of diagonals, or seq_q × seq_k)."""
    scale = 1.0
    square = (seq_q + seq_k - 1,) if strips else (seq_q, seq_k)
    bias = None  # additive term on positions the scores still reach (None: zero everywhere)
    replaced = None  # positions a Where replaced by a constant (None: none)
    fill = None  # the constant at replaced positions (meaningless elsewhere)
    zeroed = None  # positions whose scores a multiplicative mask multiplied by 0 (None: none)
    renormed = None  # positions whose probabilities a renormalised softmax drops (None: none)
    for step in steps:
        if step.kind == "cast":
            continue
        if step.kind == "scale":
            factor, dropped = (step.factor, None) if step.factor is not None else \
                _multiplier(step, evaluator, seq_q, seq_k, strips)
            if not (np.isfinite(factor) and factor > 0):
                raise NotFused(f"the scale factor {factor} is not positive and finite", step.node)
            scale *= factor
            times = factor if dropped is None else np.where(dropped, 0.0, factor).astype(np.float32)
            with np.errstate(invalid="ignore", over="ignore"):
                bias = None if bias is None else bias * times
                fill = None if fill is None else fill * times
            if dropped is not None:
                zeroed = dropped if zeroed is None else zeroed | dropped
        elif step.kind in ("add", "sub"):
            term = _square(_float(_operand(evaluator, step, step.operand, "additive term", strips)),
                           seq_q, seq_k, "additive term", strips, (evaluator, step.operand))
            if step.kind == "sub":
                term = -term
            with np.errstate(invalid="ignore", over="ignore"):
                bias = term if bias is None else bias + term
                fill = None if fill is None else fill + term
        elif step.kind == "renorm":
            dropped = _renorm_dropped(step, evaluator, seq_q, seq_k, strips)
            renormed = dropped if renormed is None else renormed | dropped
        else:  # where
            cond = _square(_bool(_operand(evaluator, step, step.condition, "condition", strips)),
                           seq_q, seq_k, "mask condition", strips, (evaluator, step.condition))
            dropped = ~cond if step.scores_when_true else cond
            value = _square(_float(_operand(evaluator, step, step.operand, "fill value", strips)),
                            seq_q, seq_k, "fill value", strips, (evaluator, step.operand))
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
        if renormed is not None:
            if bias is not None and (np.isnan(bias).any() or (bias[renormed & ~masked] > 0).any()):
                raise NotFused("scores the renormalisation drops get NaN or a positive bias before the softmax")
            masked |= renormed
        if bias is not None:
            if np.isnan(bias[~masked]).any():
                raise NotFused("the mask produces NaN scores")
            if (bias[~masked] != 0).any():
                raise NotFused("the unmasked scores get an additive bias (ALiBi, relative position or another "
                               "bias), which the kernel cannot add")
        if zeroed is not None and (zeroed & ~masked).any():
            raise NotFused("a multiplicative mask sets scores to 0 that no additive mask then removes: "
                           "they stay in the softmax as 0, which the kernel cannot compute")
    return scale, masked


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


def _describe_strip(masked: np.ndarray, seq_q: int, seq_k: int) -> str:
    """`_describe_mask` for a mask given by diagonals: masked[i − j + seq_k − 1]."""
    d = np.arange(-(seq_k - 1), seq_q)
    causal = d < 0
    counts = np.concatenate([[0], np.cumsum(masked)])  # row i covers strip positions i .. i + seq_k − 1
    if (counts[seq_k:seq_k + seq_q] - counts[:seq_q] == seq_k).any():
        return "the mask removes every key of some query rows"
    if seq_q != seq_k and np.array_equal(masked, d < seq_q - seq_k):
        return "the mask is causal aligned bottom-right, the kernel's is top-left"
    if masked[causal].all():
        below = masked[~causal]  # d = 0, 1, ...: kept up to the window, masked after
        window = int(np.argmax(below)) if below.any() else len(below)
        if below[window:].all():
            return f"the mask is a sliding window of {window} keys; the kernel's causal mask has no window"
        return "the mask is causal plus more masked positions (padding?)"
    per_diagonal = np.maximum(0, np.minimum(seq_q, seq_k + d) - np.maximum(0, d))  # positions with i − j = d
    wrong = int(per_diagonal[masked != causal].sum())
    return f"the mask is neither none nor top-left causal ({wrong} positions differ from causal)"
