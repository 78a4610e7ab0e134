"""Key-mask graphs for the property suite (issue 17): the padding-mask models of
`attention_graphs` (an `attention_mask` input, (1 - m)·min added to the scores as (b, 1, 1, s),
with or without the causal mask), and the near misses made from them by editing that mask's path:

- "query_side": the mask unsqueezed to (b, 1, s, 1): it masks query rows, not keys;
- "per_row": the input is (b, s, s), one mask per query row (packed sequences, block-diagonal);
- "per_head": the input is (b, h, s), one key mask per q head: heads of one GQA group differ;
- "alibi": the key mask plus ALiBi's constant per-head bias −slope_h·(i − j);
- "wide": head dim 128, no room for the key-bias column.

And one more positive form: "additive", a float input (b, s) added to the scores per key as it is
(a general per-key additive term, not two-valued).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attention_graphs import AttnSpec, Built, build

NEAR_MISSES = ("query_side", "per_row", "per_head", "alibi", "wide")
POSITIVE_FORMS = ("padding", "additive")
# Words one of which the reason for each near miss must carry (case-insensitive).
REASON_WORDS = {
    "query_side": ("query", "key", "axis", "axes"),
    "per_row": ("query", "row", "per key", "axis", "axes", "position"),
    "per_head": ("head", "group"),
    "alibi": ("bias", "head", "differ", "additive"),
    "wide": ("128", "head dim", "column"),
}


@dataclasses.dataclass
class KeyMaskModel:
    spec: AttnSpec
    form: str  # a POSITIVE_FORMS or NEAR_MISSES entry
    model: onnx.ModelProto

    @property
    def mask_shape(self) -> tuple[int, ...]:
        value = next(i for i in self.model.graph.input if i.name == "attention_mask")
        return tuple(d.dim_value for d in value.type.tensor_type.shape.dim)


def _node(model: onnx.ModelProto, output_prefix: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.output[0].startswith(output_prefix))


def _set_axes(model: onnx.ModelProto, node: onnx.NodeProto, axes: list[int], name: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
    node.input[1] = name


def _set_mask_input(model: onnx.ModelProto, elem: int, shape: list[int]) -> None:
    value = next(i for i in model.graph.input if i.name == "attention_mask")
    value.CopyFrom(helper.make_tensor_value_info("attention_mask", elem, shape))


def key_mask_model(spec: AttnSpec, form: str) -> KeyMaskModel:
    """`spec` (mask "padding" or "causal_padding") built, then edited into `form`."""
    assert spec.mask in ("padding", "causal_padding") and spec.form == "decomposed" and spec.blocks == 1
    if form == "wide":
        spec = dataclasses.replace(spec, head_dim=128)
    model = onnx.ModelProto()
    model.CopyFrom(build(spec).model)
    b, s, h = spec.batch, spec.seq, spec.heads
    unsqueeze = _node(model, "pad_bias4")
    if form == "query_side":
        _set_axes(model, unsqueeze, [1, 3], "query_side_axes")  # (b, 1, s, 1)
    elif form == "per_row":
        _set_mask_input(model, TensorProto.INT64, [b, s, s])
        _set_axes(model, unsqueeze, [1], "per_row_axes")  # (b, 1, s, s)
    elif form == "per_head":
        _set_mask_input(model, TensorProto.INT64, [b, h, s])
        _set_axes(model, unsqueeze, [2], "per_head_axes")  # (b, h, 1, s)
    elif form == "alibi":
        slopes = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
        i, j = np.arange(s)[:, None], np.arange(s)[None, :]
        bias = (-slopes[:, None, None] * np.abs(i - j)[None]).astype(np.float32)[None]  # (1, h, s, s)
        model.graph.initializer.append(numpy_helper.from_array(bias, "alibi_bias"))
        out = unsqueeze.output[0]
        unsqueeze.output[0] = out + "_key_mask"
        index = list(model.graph.node).index(unsqueeze)
        model.graph.node.insert(index + 1, helper.make_node("Add", [out + "_key_mask", "alibi_bias"], [out]))
    elif form == "additive":  # Cast(float input) -> Unsqueeze -> Add: the input itself is the term
        _set_mask_input(model, TensorProto.FLOAT, [b, s])
        cast = _node(model, "pad_f")
        unsqueeze.input[0] = cast.output[0]
    elif form not in ("padding", "wide"):
        raise ValueError(form)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return KeyMaskModel(spec, form, model)


def mask_feed(km: KeyMaskModel, real: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs for `km` with the key mask `real` ((b, s) bool, True at real tokens) put into its
    attention_mask, whatever that input's shape; an additive input gets large negative terms at
    padded keys and small random terms at real ones."""
    b, s = real.shape
    x = next(i for i in km.model.graph.input if i.name == "x")
    dims = [d.dim_value for d in x.type.tensor_type.shape.dim]
    np_dtype = helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
    feeds = {"x": rng.normal(size=dims).astype(np_dtype)}
    shape = km.mask_shape
    if km.form == "additive":
        feeds["attention_mask"] = np.where(real, rng.normal(size=(b, s)), -1e4).astype(np.float32)
    elif len(shape) == 3 and km.form == "per_row":  # row i: the key mask, and a block-diagonal cut
        rows = np.broadcast_to(real[:, None, :], shape).copy()
        rows[:, : s // 2, s // 2:] = False
        rows[:, :, 0] |= True  # every row keeps a key
        feeds["attention_mask"] = rows.astype(np.int64)
    elif len(shape) == 3:  # per head: head 0 the mask, the others all real but the last key
        heads = np.broadcast_to(real[:, None, :], shape).copy()
        heads[:, 1:, :] = True
        heads[:, 1:, -1] = False
        feeds["attention_mask"] = heads.astype(np.int64)
    else:
        feeds["attention_mask"] = real.astype(np.int64)
    return feeds
