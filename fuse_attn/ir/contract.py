"""The FlashFwd op: the one contract between the fusion pass, the ONNX function that gives
the fused model its meaning on any runtime, and the binding to NKI `flash_fwd`.

Layouts follow the kernel (../shared/seed/flash_fwd.txt):
  q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d), optional seed (1,) int32 -> o (b, h, s, d).
Launch grid [b, kv]; kv head j serves q heads j*G .. j*G+G-1 with G = h // kv (HF repeat_kv order).

A key mask rides in the head dim (`key_bias_column`): q' = [q; 1], k' = [k; bias/scale],
v' = [v; 0], so the kernel's own product scale·q'ᵀk' = scale·qᵀk + bias adds one term per
(batch entry, key), and o = o'[..., :d]. The op itself is unchanged (the column is data); the
attribute tells compile which column to extend when it pads keys.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "fuse_attn.nki"
OP_TYPE = "FlashFwd"
VERSION = 1

# The oldest default-domain opset the pass reads and the function body is written for
# (ConstantOfShape, NonZero, Where, and Less on int64 positions, all from opset 9).
MIN_OPSET = 9
# From this opset the body reads the node's attributes (Constant value_int/value_float). Below
# it, a body is written per distinct set of the attributes it reads, with literal constants,
# and told apart by the function's `overload` (`overload_for`), which the node names too.
ATTRIBUTE_REF_OPSET = 12
# Functions told apart by `overload` are an IR version 10 feature.
OVERLOAD_IR_VERSION = 10
# From this opset the body is dtype-generic (CastLike, Shape start/end); below it, the body is
# written for the one dtype the model's FlashFwd nodes have.
GENERIC_FUNCTION_OPSET = 15

# What the kernel writes into masked score positions (after scaling), instead of -inf.
KERNEL_MASK_VALUE = -9984.0


@dataclasses.dataclass(frozen=True)
class KernelLimits:
    """What flash_fwd (the 2.20 source and its successors, inference mode) can launch; the pass
    and compile both read these values (../shared/docs/flash_fwd-facts.md, asserts section)."""

    max_head_dim: int = 128  # "we do not support head_dim > 128": d is QK^T's partition axis
    query_tile: int = 128  # B_P_SIZE: queries are processed 128 at a time, so seq % 128 == 0
    tile_unit: int = 512  # B_F_SIZE: seq_tile_size >= 512 and a multiple of it
    tile_candidates: tuple[int, ...] = (2048, 1024, 512)  # the seq_tile_size values tried, largest first
    key_bias_columns: int = 1  # head-dim columns a key mask takes (q 1, k bias/scale, v 0)

    @property
    def pad_multiple(self) -> int:
        """A seq no tile divides is padded to a multiple of this: the smallest tile, which is
        also a multiple of the query tile."""
        return min(self.tile_candidates)


KERNEL = KernelLimits()
MAX_HEAD_DIM = KERNEL.max_head_dim
QUERY_TILE = KERNEL.query_tile
TILE_CANDIDATES = KERNEL.tile_candidates


def seq_tile_size_for(seq: int) -> int | None:
    """The largest supported kv tile that divides `seq`, or None when the kernel cannot run it."""
    for tile in KERNEL.tile_candidates:
        if seq % tile == 0:
            return tile
    return None


# The score a masked key gets through the key-bias column (after scaling). Finite: with -inf a kv
# tile whose keys are all masked computes exp(-inf - (-inf)) = NaN in the kernel. Any value at or
# below the pass's MASKED_AT_MOST (-1000) underflows exp to exactly 0 next to a real score.
KEY_BIAS_MASKED = -5000.0
KEY_BIAS_MASKED_AT_MOST = -1000.0
# The largest finite value of each float dtype the column may be stored in (TensorProto enums).
_DTYPE_MAX = {TensorProto.FLOAT: 3.4028235e38, TensorProto.DOUBLE: 1.7976931348623157e308,
              TensorProto.FLOAT16: 65504.0, TensorProto.BFLOAT16: 3.3895314e38}


def key_bias_masked_value(scale: float, dtype: int) -> float | None:
    """The bias b a masked key gets, such that the column's entry b/scale is finite in `dtype`
    (fp16 tops out at 65504: with scale 0.125, b = -5000 would store -40000, which fits, but at
    scale 0.05 it would not). None when no b <= KEY_BIAS_MASKED_AT_MOST fits."""
    largest = _DTYPE_MAX.get(dtype)
    if largest is None or not scale > 0:
        return None
    # Half the dtype's range: the kernel's own rounding (bf16 under mixed precision) stays finite.
    bias = -min(-KEY_BIAS_MASKED, 0.5 * largest * scale)
    return bias if bias <= KEY_BIAS_MASKED_AT_MOST else None


# How the keys a seq padding adds are kept out of every real row's softmax.
PAD_NONE = "none"  # seq is launched as it is
PAD_CAUSAL = "causal"  # padded keys sit right of every real query: the causal mask hides them
PAD_EXTEND_COLUMN = "extend column"  # the node's key-bias column gets the masked value at padded keys
PAD_APPEND_COLUMN = "append column"  # a key-bias column is appended (head dim d + 1) for the padded keys


@dataclasses.dataclass(frozen=True)
class SeqPadding:
    """How a launch at `seq` runs: at `padded_seq` with `seq_tile_size`, padded keys hidden by `how`
    (one of the PAD_* values); `head_dim` is the launch's (d + 1 when a column is appended)."""

    seq: int
    padded_seq: int
    seq_tile_size: int
    how: str
    head_dim: int

    @property
    def pad(self) -> int:
        return self.padded_seq - self.seq


def seq_padding(seq: int, *, causal: bool, key_bias_column: bool, head_dim: int,
                preferred_tile: int | None = None) -> "SeqPadding | Violation":
    """The padding rule: a seq no tile divides is padded to the next multiple of
    KERNEL.pad_multiple, and the padded keys are masked (the causal mask, the node's own key-bias
    column, or an appended one when d + 1 fits); padded query rows are sliced off. A Violation
    when the padded keys cannot be masked (non-causal, no column, and no room for one)."""

    def tile_for(n: int) -> int | None:
        if preferred_tile and n % preferred_tile == 0:
            return preferred_tile
        return seq_tile_size_for(n)

    tile = tile_for(seq)
    if tile is not None and seq % KERNEL.query_tile == 0:
        return SeqPadding(seq, seq, tile, PAD_NONE, head_dim)
    padded = -(-seq // KERNEL.pad_multiple) * KERNEL.pad_multiple
    tile = tile_for(padded)
    if causal:
        return SeqPadding(seq, padded, tile, PAD_CAUSAL, head_dim)
    if key_bias_column:
        return SeqPadding(seq, padded, tile, PAD_EXTEND_COLUMN, head_dim)
    widened = head_dim + KERNEL.key_bias_columns
    if widened > KERNEL.max_head_dim:
        return Violation(
            "pad_no_room", widened, KERNEL.max_head_dim,
            f"seq {seq} needs padding to {padded}, and a non-causal block without a key-bias column needs one "
            f"appended to mask the padded keys: head dim {head_dim} + 1 > {KERNEL.max_head_dim}")
    return SeqPadding(seq, padded, tile, PAD_APPEND_COLUMN, widened)


# The kinds of violation that only the kernel has: plain attention ops run any head dim and seq.
KERNEL_SHAPE_KINDS = frozenset({"head_dim", "seq_tile", "query_tile", "pad_no_room"})


@dataclasses.dataclass(frozen=True)
class Violation:
    """One reason flash_fwd cannot run a launch: `kind` (what advice keys on), the launch's
    `value` and the kernel's `limit`, and the sentence that says it."""

    kind: str  # head_dim, heads, seq_tile, query_tile, pad_no_room, dropout, dtypes, batch
    value: object
    limit: object
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class FlashFwdAttrs:
    """The node's attributes, exactly as written on a FlashFwd node."""

    softmax_scale: float
    use_causal_mask: bool
    num_heads: int
    num_kv_heads: int
    dropout_p: float = 0.0
    mixed_precision: bool = True
    seq_tile_size: int | None = None  # None: the seq length is symbolic until compile time
    # 1: the last head-dim index of q, k, v is the key-bias column (q 1, v 0, k bias/scale per key).
    key_bias_column: bool = False

    def as_onnx_attributes(self) -> dict[str, object]:
        attrs: dict[str, object] = {
            "softmax_scale": float(self.softmax_scale),
            "use_causal_mask": int(self.use_causal_mask),
            "mixed_precision": int(self.mixed_precision),
            "dropout_p": float(self.dropout_p),
            "num_heads": int(self.num_heads),
            "num_kv_heads": int(self.num_kv_heads),
        }
        if self.seq_tile_size is not None:
            attrs["seq_tile_size"] = int(self.seq_tile_size)
        if self.key_bias_column:
            attrs["key_bias_column"] = 1
        return attrs

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, object]) -> "FlashFwdAttrs":
        tile = attrs.get("seq_tile_size")
        return cls(
            softmax_scale=float(attrs["softmax_scale"]),
            use_causal_mask=bool(attrs["use_causal_mask"]),
            num_heads=int(attrs["num_heads"]),
            num_kv_heads=int(attrs["num_kv_heads"]),
            dropout_p=float(attrs.get("dropout_p", 0.0)),
            mixed_precision=bool(attrs.get("mixed_precision", 1)),
            seq_tile_size=None if tile is None else int(tile),
            key_bias_column=bool(attrs.get("key_bias_column", 0)),
        )


def kernel_violations(
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seq: int,
    seq_tile_size: int | None,
    dropout_p: float,
    dtypes: set[str],
) -> list[Violation]:
    """Every reason flash_fwd (inference mode) cannot run this launch as given (after any seq
    padding, see `seq_padding`); empty when it can."""
    limits = KERNEL
    problems = []
    if head_dim > limits.max_head_dim:
        problems.append(Violation("head_dim", head_dim, limits.max_head_dim,
                                  f"head dim {head_dim} > {limits.max_head_dim} (the kernel asserts d <= 128)"))
    if kv_heads <= 0 or heads % kv_heads:
        problems.append(Violation("heads", (heads, kv_heads), "h % kv == 0",
                                  f"{heads} q heads are not a multiple of {kv_heads} kv heads"))
    if seq_tile_size is None:
        problems.append(Violation("seq_tile", seq, limits.tile_candidates,
                                  f"no supported tile ({', '.join(map(str, limits.tile_candidates))}) divides seq {seq}"))
    elif seq_tile_size < limits.tile_unit or seq_tile_size % limits.tile_unit:
        problems.append(Violation("seq_tile", seq_tile_size, limits.tile_unit,
                                  f"seq_tile_size {seq_tile_size} is not a multiple of {limits.tile_unit}"))
    elif seq % seq_tile_size:
        problems.append(Violation("seq_tile", seq, seq_tile_size,
                                  f"seq {seq} is not divisible by seq_tile_size {seq_tile_size}"))
    if seq % limits.query_tile:
        problems.append(Violation("query_tile", seq, limits.query_tile,
                                  f"seq {seq} is not a multiple of the {limits.query_tile}-query tile"))
    if dropout_p != 0.0:
        problems.append(Violation("dropout", dropout_p, 0.0,
                                  f"dropout_p {dropout_p:g} != 0: inference mode (training=False) asserts no dropout"))
    if len(dtypes) != 1:
        problems.append(Violation("dtypes", tuple(sorted(dtypes)), 1,
                                  f"q, k, v dtypes differ ({', '.join(sorted(dtypes))}); the kernel assumes one dtype"))
    if batch <= 0:
        problems.append(Violation("batch", batch, 1, f"batch {batch} is not positive"))
    return problems


# --- the op's meaning as an ONNX function -------------------------------------------------------

_ATTR_TYPES = {
    "softmax_scale": onnx.AttributeProto.FLOAT,
    "use_causal_mask": onnx.AttributeProto.INT,
    "mixed_precision": onnx.AttributeProto.INT,
    "dropout_p": onnx.AttributeProto.FLOAT,
    "seq_tile_size": onnx.AttributeProto.INT,
    "num_heads": onnx.AttributeProto.INT,
    "num_kv_heads": onnx.AttributeProto.INT,
    "key_bias_column": onnx.AttributeProto.INT,  # data layout only: the body computes the same product
}


def _const(out: str, **value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], **value)


def _attr_const(out: str, attr: str, kind: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref(kind, _ATTR_TYPES[attr]))
    node.attribute[0].ref_attr_name = attr
    return node


class _Body:
    """Builds the function body at one opset: the few ops whose form changed across opsets
    (Shape start/end at 15, Unsqueeze/Squeeze axes as inputs at 13, Constant value_int/value_float
    at 12, Range at 11, Slice bounds as inputs at 10, CastLike at 15). `attrs`: the node
    attributes written as literals, below ATTRIBUTE_REF_OPSET."""

    def __init__(self, opset: int, dtype: int | None, attrs: "FlashFwdAttrs | None" = None):
        self.opset, self.dtype, self.attrs = opset, dtype, attrs

    def attr_const(self, out: str, attr: str) -> onnx.NodeProto:
        """A scalar Constant holding the node's attribute `attr` (int64 or float32)."""
        kind = "value_float" if _ATTR_TYPES[attr] == onnx.AttributeProto.FLOAT else "value_int"
        if self.attrs is None:
            return _attr_const(out, attr, kind)
        value = self.attrs.as_onnx_attributes()[attr]
        if kind == "value_float":
            return _const(out, value=helper.make_tensor(out, TensorProto.FLOAT, [], [value]))
        return _const(out, value=helper.make_tensor(out, TensorProto.INT64, [], [value]))

    def shape_slice(self, x: str, out: str, start: int, end: int | None = None) -> list[onnx.NodeProto]:
        """Shape(x)[start:end]."""
        if self.opset >= 15:
            kw = {"start": start} if end is None else {"start": start, "end": end}
            return [helper.make_node("Shape", [x], [out], **kw)]
        end = end if end is not None else 2**62
        if self.opset < 10:
            return [helper.make_node("Shape", [x], [out + "_all"]),
                    helper.make_node("Slice", [out + "_all"], [out], starts=[start], ends=[end], axes=[0])]
        return [
            helper.make_node("Shape", [x], [out + "_all"]),
            _const(out + "_s", value=helper.make_tensor(out + "_s", TensorProto.INT64, [1], [start])),
            _const(out + "_e", value=helper.make_tensor(out + "_e", TensorProto.INT64, [1], [end])),
            helper.make_node("Slice", [out + "_all", out + "_s", out + "_e"], [out]),
        ]

    def unsqueeze(self, x: str, axis_name: str, axis: int, out: str) -> onnx.NodeProto:
        if self.opset >= 13:
            return helper.make_node("Unsqueeze", [x, axis_name], [out])
        return helper.make_node("Unsqueeze", [x], [out], axes=[axis])

    def positions(self, seq_1d: str, q_pos: str, k_pos: str) -> list[onnx.NodeProto]:
        """Query positions (s, 1) and key positions (1, s), int64, for a seq given as a 1-D shape."""
        if self.opset >= 11:
            return [helper.make_node("Squeeze", [seq_1d], ["seq"]),
                    helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
                    self.unsqueeze("pos", "axis1", 1, q_pos),
                    self.unsqueeze("pos", "axis0", 0, k_pos)]
        # No Range before opset 11: the indices of s ones, NonZero's (1, s).
        ones = helper.make_tensor("ones_i", TensorProto.INT64, [1], [1])
        return [helper.make_node("ConstantOfShape", [seq_1d], ["ones_s"], value=ones),
                helper.make_node("NonZero", ["ones_s"], [k_pos]),
                helper.make_node("Transpose", [k_pos], [q_pos], perm=[1, 0])]

    def softmax(self, x: str, out: str) -> onnx.NodeProto:
        # Before opset 13 Softmax flattens the axes from `axis` on: axis 3 of the (b, h, s, s)
        # scores is a row softmax, and written as 3 it is valid before opset 11 (no negative axes).
        return helper.make_node("Softmax", [x], [out], axis=-1 if self.opset >= 13 else 3)

    def cast_like_data(self, x: str, out: str) -> onnx.NodeProto:
        """x in the dtype of the data inputs (q, the scores)."""
        if self.opset >= 15:
            return helper.make_node("CastLike", [x, "q"], [out])
        return helper.make_node("Cast", [x], [out], to=self.dtype)

    def dropout(self, probs: str, out: str) -> list[onnx.NodeProto]:
        if self.opset < 12:
            # No training mode before opset 12: Dropout is the identity, and the pass only
            # fuses a training-mode dropout (dropout_p > 0) from opset 12's training input.
            return [helper.make_node("Identity", [probs], [out])]
        return [
            self.attr_const("dropout_f", "dropout_p"),
            _const("zero_f", value=helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Greater", ["dropout_f", "zero_f"], ["training"]),
            # ratio is its own type (T1: no bfloat16): it stays float32 whatever the inputs are.
            helper.make_node("Dropout", [probs, "dropout_f", "training"], [out]),
        ]

    def repeat_kv(self, x: str, out: str) -> list[onnx.NodeProto]:
        """x (b, kv, ., .) -> out (b, h, ., .): each kv head repeated G times in place (repeat_kv order)."""
        p = f"{out}__"
        return [
            self.unsqueeze(x, "axis2", 2, p + "u"),  # (b, kv, 1, ., .)
            helper.make_node("Concat", ["ones2", "group_1d", "ones2"], [p + "es"], axis=0),
            helper.make_node("Expand", [p + "u", p + "es"], [p + "e"]),  # (b, kv, G, ., .)
            *self.shape_slice(x, p + "b", 0, 1),
            *self.shape_slice(x, p + "tail", 2),
            helper.make_node("Concat", [p + "b", "heads_1d", p + "tail"], [p + "rs"], axis=0),
            helper.make_node("Reshape", [p + "e", p + "rs"], [out]),  # (b, h, ., .)
        ]


_SCALE_F = "scale_f"  # the float attribute the body casts to the data dtype (read by function_dtype)


def function_dtype(function: onnx.FunctionProto) -> int | None:
    """The data dtype a body written by `make_function` below GENERIC_FUNCTION_OPSET serves
    (the Cast of its scale); None for the generic body (CastLike)."""
    return next((a.i for n in function.node if n.op_type == "Cast" and n.input[0] == _SCALE_F
                 for a in n.attribute if a.name == "to"), None)


# The attributes the body reads; the others (seq_tile_size, mixed_precision, key_bias_column)
# change only how the kernel runs or where the data sits.
_BODY_ATTRS = ("num_heads", "num_kv_heads", "softmax_scale", "use_causal_mask", "dropout_p")


def overload_for(attrs: FlashFwdAttrs, dtype: int) -> str:
    """The function overload that serves a node with `attrs` and data `dtype` below
    ATTRIBUTE_REF_OPSET: one per distinct set of the attributes the body reads."""
    values = attrs.as_onnx_attributes()
    words = [f"{name}={np.float32(values[name])}" if isinstance(values[name], float) else f"{name}={values[name]}"
             for name in _BODY_ATTRS]
    return ",".join(words + [f"dtype={TensorProto.DataType.Name(dtype).lower()}"])


def make_function(opset: int, dtype: int | None = None, attrs: FlashFwdAttrs | None = None) -> onnx.FunctionProto:
    """The reference semantics of FlashFwd, in the default domain at `opset` (>= MIN_OPSET),
    so that the model keeps its own opset. Below GENERIC_FUNCTION_OPSET there is no CastLike:
    the body is written for `dtype` (a TensorProto enum), the one its FlashFwd nodes have.
    Below ATTRIBUTE_REF_OPSET a body cannot read the node's attributes: it is written for
    `attrs`, as the overload `overload_for(attrs, dtype)`.

    Full-precision and unfused: it exists so that a fused model runs, and can be diffed against
    the original, on any ONNX runtime. `mixed_precision` only changes the kernel's rounding.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"FlashFwd's function needs opset >= {MIN_OPSET}, got {opset}")
    if opset < GENERIC_FUNCTION_OPSET and dtype is None:
        raise ValueError(f"FlashFwd's function at opset {opset} (no CastLike) needs the data dtype")
    if opset < ATTRIBUTE_REF_OPSET and attrs is None:
        raise ValueError(f"FlashFwd's function at opset {opset} (no Constant value_int/value_float) "
                         "is written for one set of node attributes: pass them")
    body = _Body(opset, dtype, attrs if opset < ATTRIBUTE_REF_OPSET else None)
    i64 = TensorProto.INT64
    nodes = [
        _const("axis2", value=helper.make_tensor("axis2", i64, [1], [2])),
        _const("ones2", value=helper.make_tensor("ones2", i64, [2], [1, 1])),
        _const("zero", value=helper.make_tensor("zero", i64, [], [0])),
        _const("one", value=helper.make_tensor("one", i64, [], [1])),
        _const("axis0", value=helper.make_tensor("axis0", i64, [1], [0])),
        _const("axis1", value=helper.make_tensor("axis1", i64, [1], [1])),
        body.attr_const("heads", "num_heads"),
        body.attr_const("kv_heads", "num_kv_heads"),
        helper.make_node("Div", ["heads", "kv_heads"], ["group"]),
        helper.make_node("Reshape", ["group", "axis1"], ["group_1d"]),
        helper.make_node("Reshape", ["heads", "axis1"], ["heads_1d"]),
        # q (b, h, d, s) -> (b, h, s, d), scaled before QK^T as the kernel does.
        helper.make_node("Transpose", ["q"], ["q_bhsd"], perm=[0, 1, 3, 2]),
        body.attr_const(_SCALE_F, "softmax_scale"),
        body.cast_like_data(_SCALE_F, "scale"),
        helper.make_node("Mul", ["q_bhsd", "scale"], ["q_scaled"]),
        *body.repeat_kv("k", "k_rep"),
        helper.make_node("MatMul", ["q_scaled", "k_rep"], ["scores"]),  # (b, h, s, s)
        # Top-left causal mask: query i sees keys j <= i; masked scores get the kernel's value.
        *body.shape_slice("q", "seq_1d", 3, 4),
        *body.positions("seq_1d", "q_pos", "k_pos"),
        helper.make_node("Less", ["q_pos", "k_pos"], ["above_diag"]),
        helper.make_node("Not", ["above_diag"], ["below_diag"]),
        body.attr_const("causal_i", "use_causal_mask"),
        helper.make_node("Cast", ["causal_i"], ["causal"], to=TensorProto.BOOL),
        helper.make_node("Not", ["causal"], ["not_causal"]),
        helper.make_node("Or", ["below_diag", "not_causal"], ["keep"]),
        _const("mask_f", value=helper.make_tensor("mask_f", TensorProto.FLOAT, [], [KERNEL_MASK_VALUE])),
        body.cast_like_data("mask_f", "mask_value"),
        helper.make_node("Where", ["keep", "scores", "mask_value"], ["masked"]),
        body.softmax("masked", "probs"),
        *body.dropout("probs", "dropped"),
        *body.repeat_kv("v", "v_rep"),
        helper.make_node("MatMul", ["dropped", "v_rep"], ["o"]),
    ]
    function = helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["q", "k", "v", "seed"],
        outputs=["o"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(_ATTR_TYPES),
    )
    if body.attrs is not None:
        function.overload = overload_for(attrs, dtype)
    return function
