"""Is a lowered module's forward one static graph? Checked without torch-xla.

torch_neuronx.trace runs forward on XLA tensors; any read of a tensor's contents on the host
(`.item()`, `.tolist()`, `bool(t)`, `int(t)`, numpy, an op whose output shape depends on values)
executes the pending graph mid-trace. On meta tensors every one of those raises, so forward
run on a meta copy of the module proves there is none. The NKI kernel is a custom call in the
real trace; here FlashFwd runs as `sdpa_attention`, plain tensor ops with the kernel's meaning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fuse_attn.ir.contract import FlashFwdAttrs


class HostRead(AssertionError):
    """forward reads tensor contents on the host (or computes a shape from them)."""


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attrs: FlashFwdAttrs,
                   seq_tile_size: int) -> torch.Tensor:
    """FlashFwd's result with torch's attention, for q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d)."""
    b, h, d, s = q.shape
    kv = k.shape[1]
    group = h // kv
    # kv head j serves q heads j*G .. j*G+G-1: repeat each kv head G times, in place.
    k = k.transpose(2, 3)[:, :, None].expand(b, kv, group, s, d).reshape(b, h, s, d)
    v = v[:, :, None].expand(b, kv, group, s, d).reshape(b, h, s, d)
    scores = torch.matmul(q.transpose(2, 3), k.transpose(2, 3)) * attrs.softmax_scale
    if attrs.use_causal_mask:
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.matmul(F.softmax(scores.float(), dim=-1).to(q.dtype), v)


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
