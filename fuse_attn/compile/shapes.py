"""Fix a model's symbolic input dims from `--shape name=1x2048` and read back every value's shape.

A dim a user names through one input (`input_ids=1x2048` binds `batch`=1, `seq`=2048) also fixes
the same symbolic dim on every other input, so one `--shape` usually suffices for an export.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from fuse_attn.ir import declared_sizes
from fuse_attn.specialize import ShapeError, parse_shape_args, specialize  # noqa: F401 (compile's --shape)


@dataclasses.dataclass(frozen=True)
class ValueType:
    shape: tuple[int, ...]
    elem_type: int  # TensorProto enum

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (not initializers)."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` whose run-time inputs all have static dims; raises ShapeError naming the input."""
    model = copy_model(model)
    specialize(model, shapes, {})  # the fuse command's --shape: names, ranks, symbols shared by inputs
    for inp in real_inputs(model.graph):
        dims = inp.type.tensor_type.shape.dim
        missing = [dim.dim_param or f"dim {i}" for i, dim in enumerate(dims) if not dim.HasField("dim_value")]
        if missing:
            raise ShapeError(
                f"input {inp.name!r} has unknown dims {missing}: pass --shape {inp.name}="
                + "x".join(str(d.dim_value) if d.HasField("dim_value") else "N" for d in dims)
            )
    # Shapes recorded for intermediate values may still be symbolic: drop them and infer anew.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    # Data propagation computes a constant-bounded Range's values: not one of 10¹⁰ (the lowering refuses it).
    data_prop = declared_sizes.oversized_range(model) is None
    return shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)


def value_types(model: onnx.ModelProto) -> dict[str, ValueType]:
    """Every value of the (shape-inferred) main graph whose dims are all static."""
    out: dict[str, ValueType] = {}
    for t in model.graph.initializer:
        out[t.name] = ValueType(tuple(t.dims), t.data_type)
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
            continue
        out[vi.name] = ValueType(tuple(d.dim_value for d in tt.shape.dim), tt.elem_type)
    return out


def evaluated_types(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, ValueType]:
    """The shapes of `names`, found by running the model in onnxruntime on `feeds`: for values
    whose shape static inference cannot reach (e.g. an Expand whose target shape is computed)."""
    import onnxruntime as ort

    probe = copy_model(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    from fuse_attn.verify import session_options

    session = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    arrays = session.run(list(names), feeds)
    return {n: ValueType(a.shape, helper.np_dtype_to_tensor_dtype(a.dtype)) for n, a in zip(names, arrays)}


def example_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a shape-fixed model, as `fuse-attn --verify` makes them: normal floats, token
    ids within the vocabulary, all-ones integer masks."""
    from fuse_attn.verify import random_inputs

    return random_inputs(model, seed)
