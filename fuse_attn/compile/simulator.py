"""A CPU simulator of NKI `flash_fwd` (inference) that follows the kernel's arithmetic, in the
version the SDK ships (kernel_versions.py: 2.20, 2.21, 2.21-swa).

What it reproduces of the kernel source (../shared/docs/flash_fwd-facts.md):
- the [b, kv] launch grid: program (batch_id, head_id) serves q heads head_id*G .. head_id*G+G-1;
  the grid and the G heads of a program are vectorised as batch dims, the tiles are looped as
  the kernel loops them;
- q tiles of 128 queries x kv tiles of seq_tile_size keys, the kv tile split into 512-key
  sub-tiles; with the causal mask a kv tile that starts after the q tile is skipped, and a
  sub-tile right of the diagonal is not multiplied (its scores are all the mask value);
- q rounded to the kernel dtype, then scaled and rounded again (scale applied before QK^T);
- scores accumulated in float32 (PSUM), masked; 2.20 copies them out as the kernel dtype with
  the finite -9984.0, 2.21 keeps the accumulation dtype (-9984.0), 2.21-swa masks with fp32's min;
- online softmax: running max m, running log-sum-exp l, o rescaled by exp(m_prev - m);
  p = exp(s - m) rounded to the kernel dtype; its row sums over reduction chunks of
  min(2048, seq_tile_size // 2) add the rounded p (2.20, `nl.sum`) or ScalarE's fp32 results
  (2.21+, `activation_reduce`);
- the output o * exp(m - l), rounded to the kernel dtype, stored in the IO dtype.
With mixed_precision the kernel dtype is bfloat16 and the accumulation dtype float32 (matmuls
take bf16 inputs, accumulate in fp32); without it both are the IO dtype.
Arithmetic runs in float32 with explicit rounding to the dtype each kernel buffer holds. No value
is read back to the host: the module's forward stays one static graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuse_attn.compile.kernel_versions import DEFAULT, VERSIONS
from fuse_attn.ir.contract import MAX_HEAD_DIM, QUERY_TILE, FlashFwdAttrs

SUB_TILE = 512  # B_F_SIZE: keys per QK^T matmul


def _rounder(dtype: torch.dtype):
    if dtype == torch.float32:
        return lambda x: x
    return lambda x: x.to(dtype).to(torch.float32)


def simulate_flash_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    use_causal_mask: bool = True,
    mixed_precision: bool = True,
    dropout_p: float = 0.0,
    seq_tile_size: int = 2048,
    kernel_version: str = DEFAULT,
) -> torch.Tensor:
    """o (b, h, s, d) for q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d), as flash_fwd[b, kv] of
    `kernel_version` computes it."""
    version = VERSIONS[kernel_version]
    b, h, d, n = q.shape
    kv = k.shape[1]
    if tuple(k.shape) != (b, kv, d, n) or tuple(v.shape) != (b, kv, n, d):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} in the kernel layout")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"we do not support head_dim > 128, got head dim {d}")
    if seq_tile_size < 512 or n % seq_tile_size:
        raise ValueError(f"seqlen {n} is not divisible by seq_tile_size {seq_tile_size} (>= 512)")
    if n % QUERY_TILE:
        raise ValueError(f"seqlen {n} is not a multiple of {QUERY_TILE}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout should be 0.0 for inference but got {dropout_p}")

    kernel_dtype = torch.bfloat16 if mixed_precision else q.dtype
    acc_dtype = torch.float32 if mixed_precision else q.dtype
    rk, ra = _rounder(kernel_dtype), _rounder(acc_dtype)
    scale = softmax_scale or 1.0 / math.sqrt(d)
    group = h // kv  # q heads per kv head; h % kv heads are never written, as in the kernel
    tile = seq_tile_size
    reduction = min(2048, tile // 2)
    # 2.20 selects into the kernel dtype, later versions into the accumulation dtype.
    mask_value = (rk if version.scores_in_kernel_dtype else ra)(torch.tensor(version.mask_value))
    scores_out = (lambda x: ra(rk(x))) if version.scores_in_kernel_dtype else ra

    # Program (batch_id, head_id) of the grid reads k[batch_id, head_id], v[batch_id, head_id]
    # and q heads head_id*group + g: the grid and g are the leading dims below.
    k_all = rk(k.float())  # (b, kv, d, n), loaded as the kernel dtype
    v_all = rk(v.float())  # (b, kv, n, d)
    q_grid = q[:, : kv * group].float().reshape(b, kv, group, d, n)
    o = torch.zeros((b, h, n, d), dtype=q.dtype)
    o_grid = o[:, : kv * group].view(b, kv, group, n, d)
    pos = torch.arange(n)

    for i in range(n // QUERY_TILE):
        q0 = i * QUERY_TILE
        q_tile = rk(rk(q_grid[..., q0 : q0 + QUERY_TILE]) * scale)  # (b, kv, G, d, 128)
        q_rows = q_tile.transpose(-1, -2).reshape(b, kv, group * QUERY_TILE, d)
        q_pos = pos[q0 : q0 + QUERY_TILE].repeat(group)[:, None]  # row r of q_rows is query q0 + r % 128
        m = l = acc = None
        for j in range(n // tile):
            k0 = j * tile
            if use_causal_mask and q0 < k0:
                continue  # the whole kv tile is above the diagonal: buffers carry over unchanged
            # Sub-tiles the kernel multiplies: all of them, or with the mask those starting at or left of q0.
            n_mul = tile // SUB_TILE if not use_causal_mask else min(tile // SUB_TILE, (q0 - k0) // SUB_TILE + 1)
            width = n_mul * SUB_TILE
            scores = q_rows @ k_all[..., k0 : k0 + width]  # fp32 accumulation of kernel-dtype products
            if use_causal_mask:
                scores = torch.where(q_pos >= pos[k0 : k0 + width][None, :], scores, mask_value)
            scores = scores_out(scores)  # copied out of PSUM into the scores buffer
            tile_max = scores.amax(dim=-1, keepdim=True)
            if width < tile:  # the sub-tiles not multiplied hold the mask value
                tile_max = torch.maximum(tile_max, mask_value)
            if m is None:
                m_cur = tile_max
            else:
                m_cur = torch.maximum(m, tile_max)
                alpha = ra(torch.exp(m - m_cur))
                acc_scaled = ra(acc * alpha)
            p_exact = torch.exp(scores - m_cur)  # ScalarE computes in fp32
            p = rk(p_exact)
            summed = p if version.row_sums_of_rounded_p else p_exact
            chunks = -(-width // reduction)
            p_chunks = F.pad(summed, (0, chunks * reduction - width)).view(*p.shape[:-1], chunks, reduction)
            ps = ra(p_chunks.sum(-1))  # per-reduction-chunk sums
            if width < tile:
                # The masked keys not multiplied weigh exp(mask - m) each: 0 in fp32 unless a row's max
                # is within ~100 of a finite mask value. Added without asking which (no host read).
                p_mask_exact = torch.exp(mask_value - m_cur)
                p_mask = rk(p_mask_exact)
                weight = p_mask if version.row_sums_of_rounded_p else p_mask_exact
                ps = torch.cat([ps, ra(weight * (tile - width))], dim=-1)
            ps = ra(ps.sum(-1, keepdim=True))
            pv = p @ v_all[:, :, k0 : k0 + width]
            if width < tile:
                pv = pv + p_mask * v_all[:, :, k0 + width : k0 + tile].sum(-2, keepdim=True)
            if m is None:
                acc = ra(pv)
                l = ra(ra(torch.log(ps)) + tile_max)
            else:
                acc = ra(acc_scaled + pv)
                l = ra(m_cur + ra(torch.log(ra(ra(torch.exp(ra(l - m_cur))) + ps))))
            m = m_cur
        out = rk(acc * ra(torch.exp(ra(m - l))))  # (b, kv, G*128, d)
        o_grid[:, :, :, q0 : q0 + QUERY_TILE] = out.view(b, kv, group, QUERY_TILE, d).to(q.dtype)
    return o


def simulate_node(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attrs: FlashFwdAttrs, seq_tile_size: int,
                  kernel_version: str = DEFAULT) -> torch.Tensor:
    """One FlashFwd node's launch, simulated: the lowering's attention callable for --simulate."""
    return simulate_flash_fwd(q, k, v, softmax_scale=attrs.softmax_scale, use_causal_mask=attrs.use_causal_mask,
                              mixed_precision=attrs.mixed_precision, dropout_p=attrs.dropout_p,
                              seq_tile_size=seq_tile_size, kernel_version=kernel_version)


def simulator_for(kernel_version: str):
    """The lowering's attention callable simulating `kernel_version`'s arithmetic."""
    VERSIONS[kernel_version]  # KeyError for a version that does not exist, before anything runs

    def attention(q, k, v, attrs, seq_tile_size):
        return simulate_node(q, k, v, attrs, seq_tile_size, kernel_version)

    return attention
