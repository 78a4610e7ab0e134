"""The simulator in each kernel version against a port of that version's kernel source.

The ports below follow the nki-samples source line by line (5d97201 for 2.20, 05c0769 for 2.21,
060228e on for 2.21-swa): one program of the [b, kv] grid at a time, one q head, one 128-query
tile, one kv tile and one 512-key sub-tile at a time, with each buffer rounded to the dtype the
source declares. They are loops in numpy (ml_dtypes for bf16), written apart from the simulator's
vectorised torch code, and slow: small shapes only.

Inputs are peaked (score std ~8), so that 2.20's bf16 scores and 2.21's fp32 scores give visibly
different outputs; q and k hold small integers (times powers of two) so that QK^T is exact in
fp32 whatever the summation order, which leaves the final bf16 rounding of o as the only
order-dependent step (one bf16 ulp).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
import torch

from fuse_attn.compile.kernel_versions import FP32_MIN, VERSIONS
from fuse_attn.compile.simulator import simulate_flash_fwd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B_P, B_F = 128, 512


def _round(x, dtype):
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def _matmul(a, b):
    """A tensor-engine matmul: products of kernel-dtype values accumulated in fp32 (PSUM)."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


def port_flash_fwd(q, k, v, version, *, scale, causal, mixed_precision, tile):
    """flash_fwd[b, kv](q, k, v, None, ...) in inference mode, as the kernel source of `version` computes it."""
    b, h, d, n = q.shape
    kv = k.shape[1]
    group = h // kv
    kernel_dtype = ml_dtypes.bfloat16 if mixed_precision else q.dtype
    acc_dtype = np.float32 if mixed_precision else q.dtype
    rk = lambda x: _round(x, kernel_dtype)  # noqa: E731
    ra = lambda x: _round(x, acc_dtype)  # noqa: E731
    reduction = min(2048, tile // 2)
    v220, swa = version == "2.20", version == "2.21-swa"
    mask_value = FP32_MIN if swa else -9984.0
    o = np.zeros((b, h, n, d), np.float32)
    for batch_id in range(b):
        for head_id in range(kv):
            for i_q_h in range(group):
                q_head = q[batch_id, head_id * group + i_q_h]
                for i in range(n // B_P):
                    q_tile = rk(rk(q_head[:, i * B_P:(i + 1) * B_P]) * scale)  # (d, 128)
                    # 2.20 and 2.21 initialise the buffers from the first kv tile; 2.21-swa fills m and l
                    # with fp32's min (nl.full) and always takes the update path.
                    m = np.full((B_P, 1), FP32_MIN, np.float32) if swa else None
                    l = np.full((B_P, 1), FP32_MIN, np.float32) if swa else None
                    acc = np.zeros((B_P, d), np.float32) if swa else None
                    for j in range(n // tile):
                        if causal and not i * B_P >= j * tile:
                            continue  # 2.20 copies the buffers over (negation_mask); later ones skip the call
                        k_tile = rk(k[batch_id, head_id, :, j * tile:(j + 1) * tile])  # (d, tile)
                        v_tile = rk(v[batch_id, head_id, j * tile:(j + 1) * tile, :])  # (tile, d)
                        qk_res = np.empty((B_P, tile), np.float32)
                        for k_i in range(tile // B_F):
                            k_start = j * tile + k_i * B_F
                            multiply = not causal or i * B_P >= k_start
                            psum = _matmul(q_tile.T, k_tile[:, k_i * B_F:(k_i + 1) * B_F]) if multiply \
                                else np.zeros((B_P, B_F), np.float32)
                            if causal:
                                pred = (i * B_P + np.arange(B_P))[:, None] >= (k_start + np.arange(B_F))[None, :]
                                psum = np.where(pred, psum, np.float32(mask_value))
                            # 2.20: affine_select / nl.copy with dtype=kernel_dtype; later: dtype=acc_type.
                            qk_res[:, k_i * B_F:(k_i + 1) * B_F] = rk(psum) if v220 else ra(psum)
                        max_ = ra(qk_res.max(axis=1, keepdims=True))
                        initialize = not swa and j == 0
                        if initialize:
                            m_cur = max_
                        else:
                            m_prev = m
                            m_cur = np.maximum(m_prev, max_)
                            alpha = ra(np.exp(m_prev.astype(np.float64) - m_cur))
                            scaled = ra(acc * alpha)
                        p = np.empty((B_P, tile), np.float32)
                        partial = []
                        for k_r in range(tile // reduction):
                            cols = slice(k_r * reduction, (k_r + 1) * reduction)
                            exact = np.exp(qk_res[:, cols].astype(np.float64) - m_cur).astype(np.float32)
                            p[:, cols] = rk(exact)
                            # 2.20: nl.sum over p_local (kernel dtype); 2.21+: activation_reduce's fp32 results.
                            partial.append(ra((p[:, cols] if v220 else exact).astype(np.float64).sum(axis=1)))
                        ps = ra(np.stack(partial, axis=1).astype(np.float64).sum(axis=1, keepdims=True))
                        pv = _matmul(p, v_tile)
                        if initialize:
                            acc = ra(pv)
                            l = ra(ra(np.log(ps)) + max_)
                        else:
                            acc = ra(scaled + pv)
                            e = ra(np.exp(ra(l.astype(np.float64) - m_cur)))
                            l = ra(m_cur + ra(np.log(ra(e + ps))))
                        m = m_cur
                    out = rk(acc * ra(np.exp(ra(m - l))))
                    o[batch_id, head_id * group + i_q_h, i * B_P:(i + 1) * B_P] = out
    return o


def peaked_qkv(b=1, h=2, kv=1, d=32, n=1024, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 9, (b, h, d, n)).astype(np.float32)
    k = rng.integers(-8, 9, (b, kv, d, n)).astype(np.float32) / 8
    v = rng.integers(-4, 5, (b, kv, n, d)).astype(np.float32) / 4
    return q, k, v


SCALE = 0.5  # scores = sum(int * int) / 16: exact in fp32, std ~8 (peaked)


def simulate(q, k, v, version, **kw):
    return simulate_flash_fwd(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), softmax_scale=SCALE,
                              kernel_version=version, **kw).numpy()


@functools.cache
def peaked_port(version, causal, tile):
    """The port on peaked_qkv() with mixed precision (cached: several tests compare with it)."""
    q, k, v = peaked_qkv()
    return port_flash_fwd(q, k, v, version, scale=SCALE, causal=causal, mixed_precision=True, tile=tile)


def within_one_bf16_ulp(a, b):
    return np.all(np.abs(a - b) <= 2.0 ** -7 * np.maximum(np.abs(a), np.abs(b)) + 1e-6)


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("causal,tile", [(True, 512), (True, 1024), (False, 512)])
def test_simulator_matches_the_port_of_its_version(version, causal, tile):
    q, k, v = peaked_qkv()
    port = peaked_port(version, causal, tile)
    got = simulate(q, k, v, version, use_causal_mask=causal, mixed_precision=True, seq_tile_size=tile)
    assert within_one_bf16_ulp(got, port), np.abs(got - port).max()
    # Every other version's port is told apart from this simulation on these inputs.
    for other in VERSIONS:
        if VERSIONS[other].scores_in_kernel_dtype != VERSIONS[version].scores_in_kernel_dtype:
            other_port = peaked_port(other, causal, tile)
            assert np.abs(got - other_port).max() > 0.05
            assert not within_one_bf16_ulp(got, other_port)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_full_precision_matches_the_port(version):
    q, k, v = peaked_qkv(h=4, kv=2, d=16, n=1024, seed=1)
    port = port_flash_fwd(q, k, v, version, scale=SCALE, causal=True, mixed_precision=False, tile=512)
    got = simulate(q, k, v, version, use_causal_mask=True, mixed_precision=False, seq_tile_size=512)
    np.testing.assert_allclose(got, port, rtol=0, atol=1e-5)


def test_220_and_221_arithmetic_differ_on_peaked_attention_by_what_the_facts_say():
    q, k, v = peaked_qkv()
    o220 = simulate(q, k, v, "2.20", seq_tile_size=512)
    o221 = simulate(q, k, v, "2.21", seq_tile_size=512)
    exact = simulate(q, k, v, "2.21", seq_tile_size=512, mixed_precision=False)
    diff = np.abs(o220 - o221).max()
    assert 0.05 < diff < 1.0, diff
    # fp32 scores are the closer ones to full precision.
    assert np.abs(o221 - exact).max() < np.abs(o220 - exact).max()


@pytest.mark.parametrize("version,row0", [("2.20", "masked mean"), ("2.21", "masked mean"), ("2.21-swa", "v0")])
def test_mask_value_per_version(version, row0):
    """Query 0's only visible score far below -9984: a finite mask value lets the masked keys of its
    tile win the softmax (the mean of their v); fp32's min never does (v[0])."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 1, 8, 1024)).astype(np.float32)
    k = rng.standard_normal((1, 1, 8, 1024)).astype(np.float32)
    v = rng.standard_normal((1, 1, 1024, 8)).astype(np.float32)
    q[..., 0] = 0
    q[0, 0, 0, 0] = 1.0
    k[0, 0, 0, 0] = -2e5
    kw = dict(use_causal_mask=True, mixed_precision=False, seq_tile_size=1024)
    got = simulate_flash_fwd(*map(torch.from_numpy, (q, k, v)), softmax_scale=0.25, kernel_version=version, **kw).numpy()
    port = port_flash_fwd(q, k, v, version, scale=0.25, causal=True, mixed_precision=False, tile=1024)
    np.testing.assert_allclose(got[0, 0, 0], port[0, 0, 0], atol=1e-5)
    expected = v[0, 0, 1:].mean(0) if row0 == "masked mean" else v[0, 0, 0]
    np.testing.assert_allclose(got[0, 0, 0], expected, atol=1e-4)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_simulator_reads_nothing_back_to_the_host(version):
    """Under FakeTensorMode any host read (bool(tensor), .item()) raises DataDependentOutputException:
    the simulated kernel keeps the lowered module one static graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(1, 4, 16, 2048), torch.empty(1, 2, 16, 2048), torch.empty(1, 2, 2048, 16)
        o = simulate_flash_fwd(q, k, v, seq_tile_size=1024, kernel_version=version)
    assert tuple(o.shape) == (1, 4, 2048, 16)


# --- the key-bias column: a key mask as data in q, k and v ---------------------------------------


def with_key_column(q, k, v, keep, scale, masked=-5000.0):
    """q' = [q; 1], k' = [k; b / scale] with b = 0 at kept keys and `masked` elsewhere, v' = [v; 0]."""
    b, h, d, n = q.shape
    kv = k.shape[1]
    bias = np.where(keep, 0.0, masked).astype(np.float32)  # (b, n)
    q1 = np.concatenate([q, np.ones((b, h, 1, n), np.float32)], axis=2)
    k1 = np.concatenate([k, np.broadcast_to(bias[:, None, None, :] / scale, (b, kv, 1, n))], axis=2).astype(np.float32)
    v1 = np.concatenate([v, np.zeros((b, kv, n, 1), np.float32)], axis=3)
    return q1, k1, v1, bias


def biased_reference(q, k, v, bias, scale, causal):
    """float64 attention with an additive per-key bias, q head i on kv head i // G."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.swapaxes(q * scale, -1, -2) @ k + bias[:, None, None, :]
    n = s.shape[-1]
    if causal:
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("causal", [False, True])
def test_key_bias_column_through_each_versions_arithmetic(version, causal):
    """Entry 0 keeps its first 300 keys (keys 512-1023: a whole kv tile of masked keys), entry 1
    its last 700 (left padding). The column is data to the kernel: the simulator follows the port
    of each version within one bf16 ulp, with no NaN; without mixed precision both equal float64
    attention with the bias on every row that has a visible key."""
    q, k, v = peaked_qkv(b=2, h=2, kv=1, d=32, n=1024, seed=3)
    keep = np.zeros((2, 1024), bool)
    keep[0, :300], keep[1, 324:] = True, True
    q1, k1, v1, bias = with_key_column(q, k, v, keep, SCALE)
    for mixed_precision in (True, False):
        port = port_flash_fwd(q1, k1, v1, version, scale=SCALE, causal=causal, mixed_precision=mixed_precision, tile=512)
        got = simulate(q1, k1, v1, version, use_causal_mask=causal, mixed_precision=mixed_precision, seq_tile_size=512)
        assert np.isfinite(got).all() and np.isfinite(port).all()
        assert within_one_bf16_ulp(got, port) if mixed_precision else np.allclose(got, port, rtol=0, atol=1e-5)
        if not mixed_precision:
            allowed = np.tril(np.ones((1024, 1024), bool)) if causal else np.ones((1024, 1024), bool)
            rows = (keep[:, None, :] & allowed).any(-1)  # (b, n): query rows with a visible key
            assert (not causal) or not rows[1].all()  # left padding under the causal mask: rows without one
            err = np.abs(got[..., :32] - biased_reference(q, k, v, bias, SCALE, causal)).max(-1)  # (b, h, n)
            assert err[np.broadcast_to(rows[:, None], err.shape)].max() < 1e-4
            assert np.abs(got[..., 32]).max() == 0  # v's column is 0: the output's column is sliced off as 0
