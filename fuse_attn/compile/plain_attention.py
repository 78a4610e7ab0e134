"""FlashFwd's meaning as plain tensor ops (matmul, mask, softmax, matmul), for q (b, h, d, s),
k (b, kv, d, s), v (b, kv, s, d) -> o (b, h, s, d).

Two uses: the launches `--kernel-min-seq` keeps off the kernel run as these ops (neuronx-cc
compiles them like the rest of the graph), and the lowered module's static checks run it in
place of the kernel (static_check.py, benchmarks/xla_trace.py). A key-bias column is data in
q, k and v: the product below adds it as the kernel's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuse_attn.ir.contract import FlashFwdAttrs


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attrs: FlashFwdAttrs,
                   seq_tile_size: int) -> torch.Tensor:
    """FlashFwd's result with torch's attention ops (`seq_tile_size` is not used)."""
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
