"""A scale is a value: a constant, or computed from constants and shapes, evaluated.

Exporters write the softmax scale in many ways: a constant, `Sqrt(Cast(64))` (jax einsum),
`Add(ConstantOfShape(..), Pow(Cast(Shape(v)[-1]), 0.5))` (GPT-2, TorchScript), `CastLike(c, x)`
(older dynamo), torch's SDPA decomposition `Sqrt(Div(1, Sqrt(Cast(Shape(q)[-1]))))` on Q and Kᵀ.
All are one number the graph applies to every score. It is read with the evaluator (constants
and shapes only) and must be the same number with every symbolic dim bound to another size (`Evaluator.varied`),
since the kernel's softmax_scale is a constant.
"""

from __future__ import annotations

import numpy as np

from fuse_attn.ir.evaluator import DependsOnInput, Evaluator, Unprovable
from fuse_attn.ir.graph import Value
from fuse_attn.passes._graph import NotFused, scalar_constant


def evaluated(value: Value, evaluator: Evaluator) -> np.ndarray:
    """The contents of `value` from constants and shapes; NotFused saying why they are unknown."""
    try:
        return np.asarray(evaluator.value_of(value))
    except DependsOnInput as exc:
        raise NotFused(f"the scale '{value.name}' {exc}") from None
    except Unprovable as exc:
        raise NotFused(f"the scale '{value.name}' is neither a constant nor computed from shapes: {exc}") from None


def uniform(array: np.ndarray) -> float | None:
    """The one number every entry holds, or None."""
    if array.size == 0:
        return None
    first = array.reshape(-1)[0]
    return float(first) if bool((array == first).all()) else None


def scale_value(value: Value, evaluator: Evaluator) -> float:
    """The one number `value` holds at every entry and every binding of the symbolic dims."""
    constant = scalar_constant(value)
    if constant is not None:
        return constant
    factor = uniform(evaluated(value, evaluator))
    if factor is None:
        raise NotFused(f"the scale '{value.name}' is not one number (a per-head or per-position scale)")
    if evaluator.binding:
        again = uniform(evaluated(value, evaluator.varied()))  # every free symbol, batch too, moved
        if again != factor:
            raise NotFused(f"the scale '{value.name}' changes with the model's symbolic dims; "
                           "the kernel's softmax_scale is a constant")
    return factor


def positive_scale(value: Value, evaluator: Evaluator) -> float | None:
    """`scale_value` when it is a positive finite number, else None (for walks that just stop)."""
    try:
        factor = scale_value(value, evaluator)
    except NotFused:
        return None
    return factor if np.isfinite(factor) and factor > 0 else None
