"""Is a lowered module's forward one static graph? Checked without torch-xla.

torch_neuronx.trace runs forward on XLA tensors; any read of a tensor's contents on the host
(`.item()`, `.tolist()`, `bool(t)`, `int(t)`, numpy, an op whose output shape depends on values)
executes the pending graph mid-trace. On meta tensors every one of those raises, so forward
run on a meta copy of the module proves there is none. The NKI kernel is a custom call in the
real trace; here FlashFwd runs as `sdpa_attention` (plain_attention.py), plain tensor ops with the
kernel's meaning.
"""

from __future__ import annotations

import copy

import torch

from fuse_attn.compile.plain_attention import sdpa_attention  # noqa: F401 (the stand-in, re-exported)


class HostRead(AssertionError):
    """forward reads tensor contents on the host (or computes a shape from them)."""


def with_attention(module: torch.nn.Module, attention) -> torch.nn.Module:
    """A deep copy of a lowered module whose FlashFwd nodes call `attention`."""
    from fuse_attn.compile.lower import FlashFwdModule

    module = copy.deepcopy(module)
    for sub in module.modules():
        if isinstance(sub, FlashFwdModule):
            sub.attention = attention
    return module


def run_on_meta(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    """forward on a meta copy of `module` (buffers, parameters and inputs hold no data): its
    outputs as meta tensors, or HostRead naming what read data."""
    meta_module = copy.deepcopy(module).to("meta")
    meta_inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device="meta") for x in inputs)
    try:
        with torch.no_grad():
            return meta_module(*meta_inputs)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise HostRead(f"forward depends on tensor contents: {type(e).__name__}: {e}") from e
