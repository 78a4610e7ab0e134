"""jax2onnx on JAX attention, written three ways: `jax.nn.dot_product_attention`, attention with
`jnp.einsum` products and an explicit softmax, and a flax nnx `MultiHeadAttention` layer.

params: form ("dot_product_attention" | "einsum" | "nnx_mha"), batch (null: symbolic "B"),
seq, heads, head_dim, causal, opset, seed. The first two take q, k, v as (b, s, h, d) inputs
(JAX's layout); nnx_mha takes x (b, s, h*d).
"""

from __future__ import annotations

import os

import _protocol


def main() -> None:
    spec, out = _protocol.args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnx
    from flax import nnx
    from jax2onnx import to_onnx

    b = spec.get("batch") or "B"
    s, h, d = spec["seq"], spec["heads"], spec["head_dim"]
    causal = spec.get("causal", False)
    form = spec["form"]
    if form == "dot_product_attention":
        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        shapes, names = [(b, s, h, d)] * 3, ["q", "k", "v"]
    elif form == "einsum":
        def fn(q, k, v):
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(d))
            if causal:
                keep = jnp.tril(jnp.ones((s, s), dtype=bool))
                scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        shapes, names = [(b, s, h, d)] * 3, ["q", "k", "v"]
    elif form == "nnx_mha":
        layer = nnx.MultiHeadAttention(num_heads=h, in_features=h * d, qkv_features=h * d, decode=False,
                                       rngs=nnx.Rngs(spec.get("seed", 0)))
        if causal:
            def fn(x):
                return layer(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
        else:
            def fn(x):
                return layer(x)
        shapes, names = [(b, s, h * d)], ["x"]
    else:
        raise ValueError(f"unknown form {form!r}")

    kwargs = {"opset": spec["opset"]} if spec.get("opset") else {}
    # the ModelProto, saved here with its constants inline: to_onnx's own file mode spills
    # constants over 1 MB to a .data file it refuses to overwrite
    onnx.save(to_onnx(fn, shapes, **kwargs), str(out / "model.onnx"))
    inputs = _protocol.load_inputs(out)
    if inputs:
        # to_onnx names the inputs itself: the zoo's inputs come in the function's argument order
        result = fn(*(jnp.asarray(v) for v in inputs.values()))
        _protocol.save_reference(out, [np.asarray(result)])
    _protocol.finish(out, ["model.onnx"], ["jax", "jaxlib", "flax", "jax2onnx", "onnx"], reference=bool(inputs),
                     input_order=names)


if __name__ == "__main__":
    main()
