"""Lowering rules for ONNX's stateful sequence ops (opset 27): CausalConvWithState and
LinearAttention, the building blocks of Mamba- and Gated-DeltaNet-style layers.

Same contract as onnx_ops: heads, lengths and kernel sizes are read at lowering into Python
constants, and forward calls tensor ops only. LinearAttention's recurrence is unrolled over the
sequence length fixed at lowering (ONNX defines it as the sequential update; chunk_size is only
a tuning hint): a prefill of T tokens is T small steps in the traced graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fuse_attn.compile.onnx_ops import LoweringError, _present, rule


def _activation(name: str):
    if name in ("silu", "swish"):  # in float32, as ONNX's reference does for float16 inputs
        return lambda y: (y.float() * torch.sigmoid(y.float())).to(y.dtype)
    if name == "none":
        return lambda y: y
    raise LoweringError(f"activation {name!r}")


@rule("CausalConvWithState")
def causal_conv_with_state(node, args):
    x, weight, bias, past = args[0], args[1], _present(args, 2), _present(args, 3)
    if len(x.shape) != 3 or len(weight.shape) != 3:
        raise LoweringError(f"input {x.shape} and weight {weight.shape} must be rank 3")
    batch, channels, _ = x.shape
    carry = weight.shape[2] - 1  # the past positions the kernel reaches back
    activate = _activation(node.attrs.get("activation", "none"))
    present = [a is not None for a in (bias, past)]

    def fn(x, weight, *optional):
        given = iter(optional)
        bias, past = (next(given) if p else None for p in present)
        if past is None:
            past = x.new_zeros((batch, channels, carry))
        padded = torch.cat([past, x], 2)
        # depthwise, in float32: torch 2.1 has no float16 convolution on CPU (--simulate)
        y = F.conv1d(padded.float(), weight.float(), bias.float() if bias is not None else None, groups=channels)
        return activate(y.to(x.dtype)), padded.narrow(2, padded.shape[2] - carry, carry)

    return fn, [x, weight] + [a for a in (bias, past) if a is not None]


_RULES = {"linear": (False, False), "gated": (True, False), "delta": (False, True), "gated_delta": (True, True)}


@rule("LinearAttention")
def linear_attention(node, args):
    query, key, value = args[:3]
    past, decay, beta = (_present(args, i) for i in (3, 4, 5))
    update_rule = node.attrs.get("update_rule", "gated_delta")
    if update_rule not in _RULES:
        raise LoweringError(f"update_rule {update_rule!r}")
    gating, delta = _RULES[update_rule]
    if gating != (decay is not None) or delta != (beta is not None):
        raise LoweringError(f"update_rule {update_rule!r} takes {'a' if gating else 'no'} decay and "
                            f"{'a' if delta else 'no'} beta input")
    q_heads, kv_heads = node.attrs.get("q_num_heads", 0), node.attrs.get("kv_num_heads", 0)
    if kv_heads <= 0 or q_heads <= 0 or q_heads % kv_heads:
        raise LoweringError(f"q_num_heads {q_heads} is not a positive multiple of kv_num_heads {kv_heads}")
    if any(len(a.shape) != 3 for a in (query, key, value)):
        raise LoweringError("query, key and value must be rank 3 (batch, seq, heads * head dim)")
    batch, seq, _ = query.shape
    d_k, d_v = query.shape[2] // q_heads, value.shape[2] // kv_heads
    group = q_heads // kv_heads
    scale = float(node.attrs.get("scale", 0.0)) or 1 / math.sqrt(d_k)
    state_shape = (batch, kv_heads, d_k, d_v)
    if past is not None and past.shape != state_shape:
        raise LoweringError(f"past_state of shape {past.shape}, not {state_shape}")
    if decay is not None and decay.shape[2] not in (kv_heads, kv_heads * d_k):
        raise LoweringError(f"decay's last dim {decay.shape[2]} is neither kv_num_heads nor kv_num_heads * d_k")
    if beta is not None and beta.shape[2] not in (kv_heads, 1):
        raise LoweringError(f"beta's last dim {beta.shape[2]} is neither kv_num_heads nor 1")
    out_dtype = query.dtype
    state_dtype = past.dtype if past is not None else out_dtype
    optional = [a for a in (past, decay, beta) if a is not None]
    present = [a is not None for a in (past, decay, beta)]

    def heads(x, n):  # (batch, seq, n * d) -> (batch, n, seq, d), in float32 as ONNX's reference computes
        return x.float().reshape(batch, seq, n, x.shape[2] // n).transpose(1, 2)

    def fn(query, key, value, *given):
        it = iter(given)
        past, decay, beta = (next(it) if p else None for p in present)
        q, k, v = heads(query, q_heads), heads(key, kv_heads), heads(value, kv_heads)
        g = heads(decay, kv_heads) if decay is not None else None  # (b, kv, seq, 1 or d_k)
        rate = beta.float().reshape(batch, seq, beta.shape[2], 1).transpose(1, 2) if beta is not None else None
        state = past.float() if past is not None else query.new_zeros(state_shape, dtype=torch.float32)
        outputs = []
        for t in range(seq):  # S_t from S_{t-1}, in ONNX's order of operations
            k_t, v_t = k[:, :, t], v[:, :, t]
            if g is not None:
                state = state * torch.exp(g[:, :, t]).unsqueeze(-1)
            if rate is not None:
                v_t = rate[:, :, t] * (v_t - torch.einsum("bhdm,bhd->bhm", state, k_t))
            state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
            read = state.repeat_interleave(group, dim=1) if group > 1 else state  # q head j reads kv head j // group
            outputs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, t], read))
        out = torch.stack(outputs, 2) if outputs else q.new_zeros((batch, q_heads, 0, d_v))
        return out.transpose(1, 2).reshape(batch, seq, q_heads * d_v).to(out_dtype), state.to(state_dtype)

    return fn, [query, key, value] + optional
