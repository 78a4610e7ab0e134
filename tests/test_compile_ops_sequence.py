"""The rules of fuse_attn.compile.ops_sequence (CausalConvWithState, LinearAttention), each lowered
from a one-node opset-27 graph and compared with onnxruntime running that graph, and each forward
run on meta tensors (no host reads)."""

from __future__ import annotations

import numpy as np
import pytest

from fuse_attn.compile.lower import LoweringError, to_torch
from fuse_attn.compile.static_check import run_on_meta
from test_compile_ops_math import Case, lowered, normal, run_lowered, run_reference, uniform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def conv_case(id, length=6, k=4, bias=True, past=True, activation="none", dtype=np.float32):
    inputs = {"x": normal(2, 3, length).astype(dtype), "w": normal(3, 1, k, scale=0.5).astype(dtype)}
    if bias:
        inputs["b"] = normal(3).astype(dtype)
    if past:
        inputs["past"] = normal(2, 3, k - 1).astype(dtype)
    order = ["x", "w", "b" if bias else "", "past" if past else ""]
    return pytest.param(Case("CausalConvWithState", inputs, attrs={"activation": activation}, order=order,
                             outputs=2, opset=27), id=id)


def unit_keys(b, t, heads, d):  # l2-normalised per head, as delta-rule layers feed them
    k = normal(b, t, heads, d)
    return (k / np.linalg.norm(k, axis=-1, keepdims=True)).reshape(b, t, heads * d).astype(np.float32)


def attention_case(id, rule, seq=5, q_heads=4, kv_heads=2, d=8, past=False, decay_per_dim=False, beta_shared=False):
    b = 2
    inputs = {"q": normal(b, seq, q_heads * d, scale=1.0), "k": unit_keys(b, seq, kv_heads, d),
              "v": normal(b, seq, kv_heads * d, scale=1.0)}
    order = ["q", "k", "v", "past" if past else "", "", ""]
    if past:
        inputs["past"] = normal(b, kv_heads, d, d, scale=0.5)
    if rule in ("gated", "gated_delta"):
        inputs["decay"] = -uniform(b, seq, kv_heads * d if decay_per_dim else kv_heads, low=0.01, high=0.5)
        order[4] = "decay"
    if rule in ("delta", "gated_delta"):
        inputs["beta"] = uniform(b, seq, 1 if beta_shared else kv_heads, low=0.1, high=0.9)
        order[5] = "beta"
    while order and not order[-1]:
        order.pop()
    return pytest.param(Case("LinearAttention", inputs, attrs={"update_rule": rule, "q_num_heads": q_heads,
                                                               "kv_num_heads": kv_heads},
                             order=order, outputs=2, opset=27), id=id)


CASES = [
    conv_case("conv"),
    conv_case("conv-silu-no-past", past=False, activation="silu"),
    conv_case("conv-no-bias-kernel-1", bias=False, k=1),
    conv_case("conv-decode", length=1, activation="swish"),
    attention_case("linear", "linear"),
    attention_case("gated", "gated", past=True),
    attention_case("gated-per-dim", "gated", decay_per_dim=True),
    attention_case("delta", "delta", beta_shared=True),
    attention_case("gated-delta", "gated_delta", past=True),
    attention_case("gated-delta-decode", "gated_delta", seq=1, past=True, q_heads=2, kv_heads=2),
]


@pytest.mark.parametrize("c", CASES)
def test_rule_matches_onnxruntime(c):
    expected, got = run_reference(c), run_lowered(c)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c", CASES)
def test_forward_runs_on_meta_tensors(c):
    out = run_on_meta(lowered(c), tuple(to_torch(a) for a in c.inputs.values()))
    assert [tuple(t.shape) for t in out] == [g.shape for g in run_lowered(c)]


@pytest.mark.parametrize("c, message", [
    (Case("LinearAttention", {"q": normal(1, 2, 8), "k": normal(1, 2, 8), "v": normal(1, 2, 8)},
          attrs={"update_rule": "delta", "q_num_heads": 2, "kv_num_heads": 2}, outputs=2, opset=27),
     "takes no decay and a beta input"),
    (Case("LinearAttention", {"q": normal(1, 2, 12), "k": normal(1, 2, 8), "v": normal(1, 2, 8)},
          attrs={"update_rule": "linear", "q_num_heads": 3, "kv_num_heads": 2}, outputs=2, opset=27),
     "not a positive multiple"),
])
def test_refused_nodes_say_why(c, message):
    with pytest.raises(LoweringError, match=message):
        lowered(c)
