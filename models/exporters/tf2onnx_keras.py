"""tf2onnx on a Keras 3 `MultiHeadAttention` self-attention (TensorFlow backend), converted as
Keras 3 users convert: a `tf.function` over the model with an input signature, through
`tf2onnx.convert.from_function`.

params: seq (null: symbolic), d_model, num_heads, key_dim, layers, causal, opset, seed.
"""

from __future__ import annotations

import os

import _protocol


def main() -> None:
    spec, out = _protocol.args()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(spec.get("seed", 0))
    x = keras.Input((spec["seq"], spec["d_model"]), name="x")
    h = x
    for _ in range(spec.get("layers", 1)):
        mha = keras.layers.MultiHeadAttention(num_heads=spec["num_heads"], key_dim=spec["key_dim"])
        h = h + mha(h, h, use_causal_mask=spec.get("causal", False))
    model = keras.Model(x, h)

    signature = (tf.TensorSpec((None, spec["seq"], spec["d_model"]), tf.float32, name="x"),)
    fn = tf.function(lambda t: model(t, training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=signature, opset=spec.get("opset", 17),
                                             output_path=str(out / "model.onnx"))
    inputs = _protocol.load_inputs(out)
    if inputs:
        _protocol.save_reference(out, [model(inputs["x"], training=False).numpy()])
    _protocol.finish(out, ["model.onnx"], ["tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx"],
                     reference=bool(inputs))


if __name__ == "__main__":
    main()
