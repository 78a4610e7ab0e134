"""The ONNX `Attention` op (opsets 23 to 25) as plain tensor ops, for a block the pass leaves alone.

What it computes is the op's reference (onnx/reference/ops/op_attention.py), step for step:
- 3D inputs (batch, seq, heads * head_size) are split into heads with q_num_heads/kv_num_heads;
- Q and K are each scaled by sqrt(scale) (scale defaults to 1/sqrt(head_size));
- past_key/past_value are concatenated in front of K/V: present_key/present_value;
- the additive bias is built from attn_mask (bool: True attends; float: added; its last dim
  padded to the total length with False / -inf), is_causal (bottom-right aligned: query i attends
  key j <= i + offset, offset = past length, or nonpad_kv_seqlen - q_len per batch), the
  left/right windows (opset 25) and nonpad_kv_seqlen's padding mask;
- GQA: each kv head repeated q_num_heads / kv_num_heads times in place (h0, h0, h1, h1, ...);
- scores = QK^T, softcap * tanh(scores / softcap), + bias, softmax (in softmax_precision when
  given), a query row whose bias is all -inf gives zeros (not NaN), then @ V;
- the optional 4th output is the scores at the step qk_matmul_output_mode names. Mode 0 is the
  raw QK product, as the spec and onnxruntime say (onnx's Python reference returns it soft-capped;
  no node case has mode 0 with a softcap).
Every shape is fixed at lowering; nonpad_kv_seqlen, the one value-dependent input, only feeds
tensor comparisons, so forward has no host reads.
"""

from __future__ import annotations

import math

import torch

from fuse_attn.compile.onnx_ops import LoweringError, _present, rule, torch_dtype

_RANK_3D, _RANK_4D = 3, 4
_AFTER_SOFTCAP, _AFTER_SOFTCAP_AND_BIAS, _AFTER_SOFTMAX = 1, 2, 3  # qk_matmul_output_mode (0: raw QK)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, s, heads * d) -> (b, heads, s, d)."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(1, 2)


def _frontier(q_len: int, kv_len: int, offset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i + offset) - j for query i and key j: (q, kv), or (b, 1, q, kv) for a per-batch offset tensor."""
    i = torch.arange(q_len, device=device).reshape(q_len, 1)
    j = torch.arange(kv_len, device=device).reshape(1, kv_len)
    if isinstance(offset, torch.Tensor):
        return (i + offset.to(torch.int64).reshape(-1, 1, 1, 1)) - j
    return (i + offset) - j


def _as_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


@rule("Attention")
def attention(node, args):
    q, k, v = args[0], args[1], args[2]
    mask, past_key, past_value, nonpad = (_present(args, i) for i in (3, 4, 5, 6))
    rank = len(q.shape)
    if rank not in (_RANK_3D, _RANK_4D) or len(k.shape) != rank or len(v.shape) != rank:
        raise LoweringError(f"Q, K and V must all be 3D or all 4D (got ranks {len(q.shape)}, {len(k.shape)}, {len(v.shape)})")
    if (past_key is None) != (past_value is None):
        raise LoweringError("past_key and past_value must be given together")
    attrs = node.attrs
    q_heads, kv_heads = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    if rank == _RANK_3D and (not q_heads or not kv_heads):
        raise LoweringError("3D Q, K and V need the q_num_heads and kv_num_heads attributes")
    if rank == _RANK_3D:
        for name, x, heads in (("Q", q, q_heads), ("K", k, kv_heads), ("V", v, kv_heads)):
            if x.shape[2] % heads:
                raise LoweringError(f"{name}'s hidden size {x.shape[2]} is not a multiple of its {heads} heads")
    q_heads = q_heads or q.shape[1]
    kv_heads = kv_heads or k.shape[1]
    head_size = q.shape[2] // q_heads if rank == _RANK_3D else q.shape[3]
    scale = attrs.get("scale")
    scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)
    sqrt_scale = math.sqrt(scale)
    softcap = float(attrs.get("softcap", 0.0))
    is_causal = bool(attrs.get("is_causal", 0))
    left, right = int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1))
    windowed = left >= 0 or right >= 0
    mode = int(attrs.get("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise LoweringError(f"qk_matmul_output_mode {mode} is not 0 to 3")
    precision = attrs.get("softmax_precision")
    softmax_dtype = torch_dtype(precision) if precision else None
    group = q_heads // kv_heads if q_heads != kv_heads and q_heads % kv_heads == 0 else 1
    past_len = past_key.shape[2] if past_key is not None else 0
    q_len = q.shape[1] if rank == _RANK_3D else q.shape[2]
    kv_len = past_len + (k.shape[1] if rank == _RANK_3D else k.shape[2])
    mask_pad = kv_len - mask.shape[-1] if mask is not None else 0
    if mask_pad < 0:
        raise LoweringError(f"attn_mask's last dim {mask.shape[-1]} is longer than the {kv_len} keys")
    has_bias = mask is not None or is_causal or windowed or nonpad is not None
    present = [a for a in (mask, past_key, past_value, nonpad) if a is not None]

    def fn(Q, K, V, *optional):
        given = dict(zip([n for n, a in (("mask", mask), ("past_key", past_key), ("past_value", past_value),
                                        ("nonpad", nonpad)) if a is not None], optional))
        if rank == _RANK_3D:
            Q, K, V = _split_heads(Q, q_heads), _split_heads(K, kv_heads), _split_heads(V, kv_heads)
        dtype, device = Q.dtype, Q.device
        if "past_key" in given:
            K = torch.cat([given["past_key"], K], dim=2)
            V = torch.cat([given["past_value"], V], dim=2)
        present_key, present_value = K, V
        bias = None
        if has_bias:
            m = given.get("mask")
            if m is not None and mask_pad:
                fill = False if m.dtype == torch.bool else float("-inf")
                m = torch.cat([m, torch.full((*m.shape[:-1], mask_pad), fill, dtype=m.dtype, device=device)], -1)
            if m is not None and m.dtype == torch.bool:
                m = _as_bias(m, dtype)
            bias = m if m is not None else torch.zeros((q_len, kv_len), dtype=dtype, device=device)
            # the causal and window offset: past length, or each batch's valid keys past the queries
            offset = past_len if "past_key" in given else (given["nonpad"] - q_len if "nonpad" in given else 0)
            if is_causal:
                bias = bias + _as_bias(_frontier(q_len, kv_len, offset, device) >= 0, dtype)
            if windowed:
                diff = _frontier(q_len, kv_len, offset, device)
                allowed = torch.ones_like(diff, dtype=torch.bool)
                if left >= 0:
                    allowed = allowed & (diff <= left)
                if right >= 0:
                    allowed = allowed & (-diff <= right)
                bias = bias + _as_bias(allowed, dtype)
            if "nonpad" in given:
                valid = torch.arange(kv_len, device=device).reshape(1, kv_len) < given["nonpad"].to(torch.int64).reshape(-1, 1)
                bias = bias + _as_bias(valid, dtype).reshape(-1, 1, 1, kv_len)
        if group > 1:
            K = torch.repeat_interleave(K, group, dim=1)
            V = torch.repeat_interleave(V, group, dim=1)
        scores = torch.matmul(Q * sqrt_scale, (K * sqrt_scale).transpose(-1, -2))
        qk_out = scores
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        if mode == _AFTER_SOFTCAP:
            qk_out = scores
        if bias is not None:
            scores = scores + bias
        if mode == _AFTER_SOFTCAP_AND_BIAS:
            qk_out = scores
        if softmax_dtype is not None:
            scores = scores.to(softmax_dtype)
        probs = torch.softmax(scores, dim=-1)
        if bias is not None:  # a row with no attended key: zeros, not NaN
            masked_row = torch.isneginf(torch.amax(bias, dim=-1, keepdim=True))
            probs = torch.where(masked_row, torch.zeros((), dtype=probs.dtype, device=device), probs)
        if mode == _AFTER_SOFTMAX:
            qk_out = probs
        y = torch.matmul(probs.to(dtype), V)
        if rank == _RANK_3D:
            y = y.transpose(1, 2).reshape(y.shape[0], q_len, -1)
        return y, present_key, present_value, qk_out.to(dtype)

    return fn, [q, k, v, *present]
