"""Launching NKI `flash_fwd[b, kv]` from PyTorch, in whichever call style the installed SDK has.

SDK 2.20: `flash_fwd(q, k, v, seed, o, lse=None, softmax_scale=..., ..., config=None)` is a plain
function in neuronxcc.nki.kernels.attention; PyTorch launches it through
`torch_neuronx.xla_impl.ops.nki_jit()(flash_fwd)`, the caller allocates o (b, h, s, d) and passes
`seed, o` positionally.
SDK 2.21+: `flash_fwd` is `@nki.jit` with no o/lse parameters and returns o (inference).
Which one is installed is read from the kernel's signature, never from a version string.
Everything after `seed` goes by keyword: later kernels insert parameters (`logit_bias`,
`sliding_window`) after it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import torch

from fuse_attn.ir.contract import FlashFwdAttrs

STYLE_2_20 = "2.20 (nki_jit()(flash_fwd), caller-allocated o)"
STYLE_2_21 = "2.21+ (@nki.jit flash_fwd returns o)"


@dataclasses.dataclass(frozen=True)
class KernelAPI:
    style: str  # STYLE_2_20 or STYLE_2_21
    kernel: Any  # launchable as kernel[b, kv](...)
    flash_config: Callable[..., Any]  # FlashConfig


def _parameters(fn: Any) -> list[str] | None:
    """The parameter names of the kernel function, looking through jit wrappers."""
    for candidate in (fn, getattr(fn, "func", None), getattr(fn, "__wrapped__", None), getattr(fn, "kernel", None)):
        if candidate is None:
            continue
        try:
            return list(inspect.signature(candidate).parameters)
        except (TypeError, ValueError):
            continue
    return None


def detect_kernel_api() -> KernelAPI:
    """The installed flash_fwd and how to call it. ImportError when the Neuron SDK is missing."""
    attention = importlib.import_module("neuronxcc.nki.kernels.attention")
    flash_fwd, flash_config = attention.flash_fwd, attention.FlashConfig
    params = _parameters(flash_fwd)
    launchable = callable(getattr(type(flash_fwd), "__getitem__", None))
    if params is None and not launchable:
        raise RuntimeError("cannot read the signature of neuronxcc.nki.kernels.attention.flash_fwd")
    if params is not None and "o" in params:  # 2.20's is a plain function: its signature is always readable
        nki_jit = importlib.import_module("torch_neuronx.xla_impl.ops").nki_jit
        return KernelAPI(STYLE_2_20, nki_jit()(flash_fwd), flash_config)
    if not launchable:  # the 2.21+ signature as a bare function: jit it ourselves
        flash_fwd = importlib.import_module("neuronxcc.nki").jit(flash_fwd)
    return KernelAPI(STYLE_2_21, flash_fwd, flash_config)


def launch_flash_fwd(
    api: KernelAPI, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attrs: FlashFwdAttrs, seq_tile_size: int
) -> torch.Tensor:
    """o (b, h, s, d) = flash_fwd[b, kv](q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d)), inference mode."""
    b, h, d, s = q.shape
    kv = k.shape[1]
    kwargs = dict(
        softmax_scale=float(attrs.softmax_scale),
        use_causal_mask=bool(attrs.use_causal_mask),
        mixed_precision=bool(attrs.mixed_precision),
        dropout_p=float(attrs.dropout_p),
        config=api.flash_config(seq_tile_size=seq_tile_size, training=False),
    )
    seed = None  # inference: the kernel asserts seed is None (and lse is None)
    if api.style == STYLE_2_20:
        o = torch.zeros((b, h, s, d), dtype=q.dtype, device=q.device)
        api.kernel[b, kv](q, k, v, seed, o, **kwargs)
        return o
    return api.kernel[b, kv](q, k, v, seed, **kwargs)
