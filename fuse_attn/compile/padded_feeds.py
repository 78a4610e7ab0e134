"""The padded masks `compile --simulate` feeds besides all-ones.

A mask input is what `fuse-attn --verify` fills with ones (verify.random_inputs): an integer or
bool input of rank 2, (batch, seq), that no Gather reads as indices (those are token ids). Each
variant zeroes the tail of every batch entry (right padding), its head (left padding), or all but
a short head (whole 512-key tiles padded), each entry at its own length. The outputs are then
compared at the real positions only: a row with no visible key (left padding under a causal
mask, before a sequence's first real token) holds an artefact of the model's mask constant in
the original and of the kernel's in the fused model, and no real position reads it.
"""

from __future__ import annotations

import numpy as np
import onnx

from fuse_attn import verify


def mask_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[str]:
    """The inputs that carry a (batch, seq) token mask, by what verify.random_inputs fills with ones."""
    token_ids = verify._gather_rows(model)
    return [name for name, value in feeds.items()
            if value.ndim == 2 and (value.dtype.kind in "iub") and name not in token_ids]


def _lengths(kind: str, batch: int, seq: int) -> list[int]:
    """Real tokens per batch entry, each entry its own."""
    if kind == "whole tiles padded":
        return [max(1, seq // 8 - i) for i in range(batch)]
    return [max(1, seq - (i + 1) * seq // (3 * batch)) for i in range(batch)]


VARIANTS = ("right-padded", "left-padded", "whole tiles padded")


def padded_variants(feeds: dict[str, np.ndarray], masks: list[str]):
    """(label, feeds, real) per variant: `real` the (batch, seq) positions that hold tokens."""
    if not masks:
        return
    shape = feeds[masks[0]].shape
    for kind in VARIANTS:
        batch, seq = shape
        real = np.zeros(shape, dtype=bool)
        for i, length in enumerate(_lengths(kind, batch, seq)):
            if kind == "left-padded":
                real[i, seq - length:] = True
            else:
                real[i, :length] = True
        variant = dict(feeds)
        for name in masks:
            if feeds[name].shape == shape:
                variant[name] = real.astype(feeds[name].dtype)
        yield kind, variant, real


def at_real_positions(value: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """The output's entries at real positions when its leading dims are the mask's (batch, seq);
    otherwise the whole output."""
    if real is None or value.shape[:2] != real.shape:
        return value
    return value[real]
