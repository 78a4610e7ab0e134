"""The CPU simulator of flash_fwd against a float64 numpy reference, and the seq padding proof.
(Each kernel version against a port of its source, the mask values included: test_compile_kernel_versions.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuse_attn.compile.constraints import FlashPlan
from fuse_attn.compile.lower import FlashFwdModule
from fuse_attn.compile.simulator import simulate_flash_fwd, simulate_node, simulator_for
from fuse_attn.ir.contract import PAD_CAUSAL, PAD_NONE, FlashFwdAttrs

# Measured bf16 error (mixed_precision=True) against float64 for unit-normal q, k, v and the
# default scale: max |error| 0.012-0.021 over the cases below. The bound asserted:
BF16_ATOL = 3e-2
FP32_ATOL = 1e-4


# The simulator's tensor ops run on one thread: on a shared 2-core machine two are slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(q, k, v, scale=None, causal=True, mask_value=-np.inf):
    """float64 attention in kernel layouts, q head i on kv head i // G (repeat_kv order)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, h, d, n = q.shape
    g = h // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.swapaxes(q * (scale or 1 / np.sqrt(d)), -1, -2) @ k
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, mask_value)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


def qkv(b, h, kv, d, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, d, n, generator=g).to(dtype), torch.randn(b, kv, d, n, generator=g).to(dtype),
            torch.randn(b, kv, n, d, generator=g).to(dtype))


CASES = [  # b, h, kv, d, n, tile, causal, scale
    (2, 2, 2, 64, 1024, 512, True, None),  # MHA, two kv tiles
    (1, 8, 2, 32, 1024, 1024, True, None),  # GQA, G = 4
    (1, 2, 1, 16, 1536, 512, False, 0.3),  # non-causal, explicit scale, three kv tiles
    (1, 2, 1, 128, 2048, 2048, True, 0.05),  # MQA, d 128, one 2048 tile of four sub-tiles
]


@pytest.mark.parametrize("b,h,kv,d,n,tile,causal,scale", CASES)
def test_fp32_mode_matches_reference_within_1e_4(b, h, kv, d, n, tile, causal, scale):
    q, k, v = qkv(b, h, kv, d, n)
    o = simulate_flash_fwd(q, k, v, softmax_scale=scale, use_causal_mask=causal, mixed_precision=False, seq_tile_size=tile)
    assert o.dtype == torch.float32 and o.shape == (b, h, n, d)
    np.testing.assert_allclose(o.numpy(), reference(q, k, v, scale, causal), rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("b,h,kv,d,n,tile,causal,scale", CASES)
def test_mixed_precision_within_bf16_tolerance_and_rounds_output_to_bf16(b, h, kv, d, n, tile, causal, scale):
    q, k, v = qkv(b, h, kv, d, n)
    o = simulate_flash_fwd(q, k, v, softmax_scale=scale, use_causal_mask=causal, mixed_precision=True, seq_tile_size=tile)
    err = np.abs(o.numpy() - reference(q, k, v, scale, causal)).max()
    assert err < BF16_ATOL
    assert err > 1e-4  # it really is computing in bf16, not fp32
    # The kernel writes o * exp(m - l) as the kernel dtype (bf16) into the fp32 output.
    assert torch.equal(o, o.to(torch.bfloat16).float())


def test_bf16_io():
    q, k, v = qkv(1, 4, 2, 64, 512, dtype=torch.bfloat16)
    o = simulate_flash_fwd(q, k, v, seq_tile_size=512)
    assert o.dtype == torch.bfloat16
    assert np.abs(o.float().numpy() - reference(q.float(), k.float(), v.float())).max() < BF16_ATOL


def test_gqa_uses_repeat_kv_order_not_tile_order():
    q, k, v = qkv(1, 4, 2, 16, 512)
    o = simulate_flash_fwd(q, k, v, use_causal_mask=False, mixed_precision=False, seq_tile_size=512).numpy()
    np.testing.assert_allclose(o, reference(q, k, v, causal=False), atol=FP32_ATOL)
    # Tile order (q head i on kv head i % kv) is a different mapping, and the simulator is not it.
    tiled = reference(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), causal=False)
    assert np.abs(o - tiled).max() > 0.1


def test_kernel_asserts():
    q, k, v = qkv(1, 2, 2, 16, 640)
    with pytest.raises(ValueError, match="not divisible"):
        simulate_flash_fwd(q, k, v, seq_tile_size=512)
    q, k, v = qkv(1, 2, 2, 16, 512)
    with pytest.raises(ValueError, match="dropout"):
        simulate_flash_fwd(q, k, v, seq_tile_size=512, dropout_p=0.1)


# --- padding -------------------------------------------------------------------------------------
# Claim: for a causal block, padding q, k, v on seq from s to s' and keeping the first s output
# rows is exact. Proof: real query i < s sees keys j <= i < s; a padded key j >= s is right of
# every real query, so its score is replaced by the mask value (-9984, or fp32's min from 2.21-swa)
# whatever q and k hold there, and its weight exp(mask - m_i) is exactly 0 in float32 (m_i >= the
# row's own score, far above -9880),
# so it adds exactly 0 to the row sum and to P @ V. Padded query rows are sliced off. Hence the
# real rows do not depend on the padding's content at all, and equal unpadded attention.


def _plan(seq, padded, tile, mixed_precision=False):
    attrs = FlashFwdAttrs(softmax_scale=0.25, use_causal_mask=True, num_heads=4, num_kv_heads=2,
                          mixed_precision=mixed_precision)
    how = PAD_CAUSAL if padded > seq else PAD_NONE
    return FlashPlan("n", ("q", "k", "v"), "o", attrs, 1, 4, 2, 16, seq, padded, tile, "float", how)


@pytest.mark.parametrize("seq,version", [(1, "2.20"), (300, "2.21"), (640, "2.21-swa"), (1000, "2.20"), (1000, "2.21-swa")])
def test_causal_padding_is_exact(seq, version):
    padded = -(-seq // 512) * 512
    q, k, v = qkv(1, 4, 2, 16, seq, seed=seq)
    simulate = simulator_for(version)
    o = FlashFwdModule(_plan(seq, padded, 512), simulate)(q, k, v)
    assert o.shape == (1, 4, seq, 16)
    np.testing.assert_allclose(o.numpy(), reference(q, k, v, 0.25), atol=FP32_ATOL)
    # The padding's content does not matter, bit for bit: pad with large garbage instead of zeros.
    g = torch.Generator().manual_seed(1)
    junk = lambda x, dim: torch.cat([x, 1e3 * torch.randn(*x.shape[:dim], padded - seq, *x.shape[dim + 1:], generator=g)], dim)
    o_junk = simulate(junk(q, 3), junk(k, 3), junk(v, 2), _plan(seq, padded, 512).attrs, 512)[:, :, :seq]
    assert torch.equal(o, o_junk)


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_padding_a_runnable_seq_changes_nothing_bit_for_bit(mixed_precision):
    """s = 512 runs unpadded with tile 512; padded to 1024 with the same tile, the extra kv tile is
    above the diagonal of every real q tile and is skipped: identical bits."""
    q, k, v = qkv(1, 4, 2, 16, 512)
    plan = _plan(512, 512, 512, mixed_precision)
    unpadded = FlashFwdModule(plan, simulate_node)(q, k, v)
    padded = FlashFwdModule(_plan(512, 1024, 512, mixed_precision), simulate_node)(q, k, v)
    assert torch.equal(unpadded, padded)
