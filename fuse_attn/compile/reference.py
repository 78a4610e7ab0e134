"""The onnxruntime run `compile --simulate` compares the lowered module with.

onnxruntime's CPU provider has almost no bfloat16 kernels (no MatMul, Add, Softmax...), so a
bfloat16 model runs as its float32 copy: every bfloat16 initializer, type, Cast target and
constant widened (exactly: bf16 is a truncated fp32), inputs widened the same way. That
reference computes the model's graph without the bf16 roundings between ops, which the lowered
module does keep: the difference is the model's own bf16 error plus the kernel's, so it is
judged at bf16 precision.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fuse_attn.compile.shapes import copy_model

_WIDENED = TensorProto.BFLOAT16


def has_bfloat16(model: onnx.ModelProto) -> bool:
    g = model.graph
    return any(v.type.tensor_type.elem_type == _WIDENED for v in [*g.input, *g.output, *g.value_info]) or \
        any(t.data_type == _WIDENED for t in g.initializer) or \
        any(a.name == "to" and a.i == _WIDENED for n in g.node for a in n.attribute)


def as_float32(model: onnx.ModelProto, widened: tuple[int, ...] = (_WIDENED,)) -> onnx.ModelProto:
    """A copy of `model` with every tensor, type, Cast target and constant of a `widened` dtype
    (bfloat16 by default) made float32."""
    model = copy_model(model)

    def widen_tensor(t: onnx.TensorProto):
        if t.data_type in widened:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def widen_type(tp: onnx.TypeProto):
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type in widened:
            tp.tensor_type.elem_type = TensorProto.FLOAT

    def widen_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i in widened:
                    a.i = TensorProto.FLOAT
                if a.type == onnx.AttributeProto.TENSOR:
                    widen_tensor(a.t)
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    widen_graph(sub)

    def widen_graph(g: onnx.GraphProto):
        for t in g.initializer:
            widen_tensor(t)
        for v in [*g.input, *g.output, *g.value_info]:
            widen_type(v.type)
        widen_nodes(g.node)

    widen_graph(model.graph)
    for f in model.functions:
        widen_nodes(f.node)
        for v in f.value_info:
            widen_type(v.type)
    return model


def feeds_as_float32(feeds: dict[str, np.ndarray], widened: tuple[int, ...] = (_WIDENED,)) -> dict[str, np.ndarray]:
    names = {helper.tensor_dtype_to_np_dtype(t).name for t in widened}
    return {k: v.astype(np.float32) if v.dtype.name in names else v for k, v in feeds.items()}


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU); a bfloat16 model runs as its float32 copy."""
    import onnxruntime as ort

    if has_bfloat16(model):
        model, feeds = as_float32(model), feeds_as_float32(feeds)
    from fuse_attn.verify import session_options  # its log silenced (fp16 warnings, raw node names)

    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
