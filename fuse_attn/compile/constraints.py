"""Per-FlashFwd-node kernel checks, and the launch plan (tile, padding) of each node that passes.

Runs on a model whose shapes are fixed (shapes.fix_input_shapes), before anything is built.
The checks are `contract.kernel_violations` on the launch as it will really happen (after any
seq padding), plus the few the kernel would get silently wrong rather than assert on.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import onnx

from fuse_attn.ir import contract
from fuse_attn.compile.shapes import ValueType, evaluated_types, value_types

KERNEL_DTYPES = ("float", "float16", "bfloat16")

# The fix printed beside each violation, keyed by its kind (contract.Violation.kind).
_FIXES = {
    "head_dim": "leave this block unfused: the kernel has no path for head_dim > 128",
    "heads": "leave this block unfused: flash_fwd maps q heads to kv heads in groups of h // kv",
    "seq_tile": "pass a --shape whose seq is a multiple of 512",
    "query_tile": "pass a --shape whose seq is a multiple of 512",
    "pad_no_room": "pass a --shape whose seq is a multiple of 512, or --kernel-min-seq above it to run this "
                   "launch as plain attention ops",
    "dropout": "export the model in eval mode so that dropout is 0",
    "dtypes": "cast q, k and v to one dtype before the FlashFwd node",
    "batch": "pass a --shape with a positive batch",
}

# What each way of padding says in the launch line.
_PADDING_WORDS = {
    contract.PAD_CAUSAL: "exact under the causal mask",
    contract.PAD_EXTEND_COLUMN: "padded keys masked in the node's key-bias column",
    contract.PAD_APPEND_COLUMN: "padded keys masked in an appended key-bias column, head dim {d} -> {d1}",
}


@dataclasses.dataclass(frozen=True)
class FlashPlan:
    """How one FlashFwd node is launched: flash_fwd[batch, kv_heads] at `padded_seq`, or (kernel
    False: --kernel-min-seq) as plain attention ops at `seq`."""

    node_name: str
    inputs: tuple[str, ...]  # q, k, v (and seed when the node has one)
    output: str
    attrs: contract.FlashFwdAttrs
    batch: int
    heads: int
    kv_heads: int
    head_dim: int  # the node's (its key-bias column included)
    seq: int
    padded_seq: int
    seq_tile_size: int
    dtype: str
    padding: str = contract.PAD_NONE  # how padded keys are masked (contract.PAD_*)
    kernel: bool = True

    def __post_init__(self):
        if (self.padded_seq > self.seq) != (self.padding != contract.PAD_NONE):
            raise ValueError(f"{self.node_name}: seq {self.seq} -> {self.padded_seq} with padding {self.padding!r}")

    @property
    def pad(self) -> int:
        return self.padded_seq - self.seq

    @property
    def launch_head_dim(self) -> int:
        """The head dim flash_fwd sees: d + 1 when compile appends a key-bias column."""
        appended = self.padding == contract.PAD_APPEND_COLUMN
        return self.head_dim + (contract.KERNEL.key_bias_columns if appended else 0)

    def describe(self) -> str:
        mask = "causal" if self.attrs.use_causal_mask else "non-causal"
        if self.attrs.key_bias_column:
            mask += " with a key-bias column"
        if not self.kernel:
            return (f"{self.node_name}: plain attention ops (no flash_fwd), q heads {self.heads}, kv heads "
                    f"{self.kv_heads}, d {self.head_dim}, seq {self.seq}, {mask}, {self.dtype}")
        pad = ""
        if self.pad:
            words = _PADDING_WORDS[self.padding].format(d=self.head_dim, d1=self.launch_head_dim)
            pad = f", seq padded {self.seq} -> {self.padded_seq} ({words})"
        return (
            f"{self.node_name}: flash_fwd[{self.batch}, {self.kv_heads}] q heads {self.heads}, d {self.launch_head_dim}, "
            f"seq {self.seq}, seq_tile_size {self.seq_tile_size}, {mask}, "
            f"{self.dtype}, mixed_precision={self.attrs.mixed_precision}{pad}"
        )


def _is_flash_fwd(node: onnx.NodeProto) -> bool:
    return node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE


def flash_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if _is_flash_fwd(n)]


def nested_flash_nodes(graph: onnx.GraphProto, owner: str = "") -> list[tuple[str, onnx.NodeProto]]:
    """FlashFwd nodes inside If/Loop/Scan bodies (the pass fuses there; compile lowers only the
    main graph), each with the name of the node whose body holds it."""
    found = []
    for node in graph.node:
        if owner and _is_flash_fwd(node):
            found.append((owner, node))
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else attr.graphs:
                found += nested_flash_nodes(body, f"{node.op_type} {node.name!r}")
    return found


def flash_fwd_attrs(node: onnx.NodeProto) -> contract.FlashFwdAttrs:
    """A FlashFwd node's attributes as the contract's FlashFwdAttrs."""
    return contract.FlashFwdAttrs.from_onnx_attributes({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})


def plan_node(
    node: onnx.NodeProto, types: dict[str, ValueType], mixed_precision: bool | None = None,
    kernel_min_seq: int | None = None,
) -> tuple[FlashPlan | None, list[str]]:
    """The launch plan of one node, or None and every reason (with its fix) it cannot be launched.
    A launch whose seq is below `kernel_min_seq` is planned as plain attention ops."""
    name = node.name or node.output[0]
    attrs = flash_fwd_attrs(node)
    if mixed_precision is not None:
        attrs = dataclasses.replace(attrs, mixed_precision=mixed_precision)
    problems: list[str] = []

    def fail(problem: "str | contract.Violation", fix: str | None = None) -> None:
        if isinstance(problem, contract.Violation):
            fix = fix or _FIXES[problem.kind]
        problems.append(f"{name}: {problem}; fix: {fix}")

    q_name, k_name, v_name = (list(node.input) + ["", "", ""])[:3]
    missing = [n for n in (q_name, k_name, v_name) if n not in types]
    if missing:
        fail(f"the shape of {', '.join(repr(m) for m in missing)} is unknown after shape inference",
             "pass --shape for every input the model's dims depend on, or example inputs to measure it")
        return None, problems
    q, k, v = types[q_name].shape, types[k_name].shape, types[v_name].shape
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        fail(f"q {q}, k {k}, v {v} are not 4-D", "the fusion pass must emit kernel layouts")
        return None, problems
    b, h, d, s = q
    kv = k[1]
    if k != (b, kv, d, s) or v != (b, kv, s, d):
        fail(f"k {k} / v {v} do not match q {q} in the kernel layout k (b, kv, d, s), v (b, kv, s, d)",
             "the fusion pass must emit kernel layouts (seq_q == seq_k)")
        return None, problems
    if (h, kv) != (attrs.num_heads, attrs.num_kv_heads):
        fail(f"q/k carry {h}/{kv} heads but the node says num_heads={attrs.num_heads}, num_kv_heads={attrs.num_kv_heads}",
             "re-run the fusion pass on this model")
    if attrs.softmax_scale == 0.0:
        fail("softmax_scale 0.0: the kernel reads a zero scale as its default 1/sqrt(d)", "leave this block unfused")
    dtypes = {types[n].dtype_name for n in (q_name, k_name, v_name)}
    if not dtypes <= set(KERNEL_DTYPES):
        fail(f"dtype {', '.join(sorted(dtypes))} is not one the kernel runs (float32, float16, bfloat16)",
             "cast the model to float32, float16 or bfloat16")

    plain = kernel_min_seq is not None and s < kernel_min_seq
    padding = None if plain else contract.seq_padding(
        s, causal=attrs.use_causal_mask, key_bias_column=attrs.key_bias_column, head_dim=d,
        preferred_tile=attrs.seq_tile_size)
    if isinstance(padding, contract.SeqPadding):
        violations = contract.kernel_violations(
            batch=b, heads=h, kv_heads=kv, head_dim=padding.head_dim, seq=padding.padded_seq,
            seq_tile_size=padding.seq_tile_size, dropout_p=attrs.dropout_p, dtypes=dtypes)
    else:
        # Plain attention ops (or a seq the padding cannot serve): the kernel's shape limits do not
        # apply or are already said; the grouping of heads, one dtype and no dropout still hold.
        violations = [padding] if padding is not None else []
        violations += [v for v in contract.kernel_violations(
            batch=b, heads=h, kv_heads=kv, head_dim=d, seq=s, seq_tile_size=None, dropout_p=attrs.dropout_p,
            dtypes=dtypes) if v.kind not in contract.KERNEL_SHAPE_KINDS]
    if isinstance(padding, contract.SeqPadding) and padding.how in (contract.PAD_EXTEND_COLUMN,
                                                                    contract.PAD_APPEND_COLUMN):
        dtype = onnx.TensorProto.DataType.Value(next(iter(dtypes)).upper()) if len(dtypes) == 1 else None
        if dtype is not None and contract.key_bias_masked_value(attrs.softmax_scale, dtype) is None:
            fail(contract.Violation(
                "pad_no_room", attrs.softmax_scale, None,
                f"seq {s} needs padding to {padding.padded_seq}, and no masked value for the padded keys "
                f"divided by softmax_scale {attrs.softmax_scale:g} is finite in {next(iter(dtypes))}"))
    for violation in violations:
        fail(violation)
    if problems:
        return None, problems
    if plain:
        return FlashPlan(name, tuple(node.input), node.output[0], attrs, b, h, kv, d, s, s, 0, dtypes.pop(),
                         kernel=False), []
    return FlashPlan(name, tuple(node.input), node.output[0], attrs, b, h, kv, d, s, padding.padded_seq,
                     padding.seq_tile_size, dtypes.pop(), padding.how), []


def plan_model(
    model: onnx.ModelProto, mixed_precision: bool | None = None, feeds: dict[str, np.ndarray] | None = None,
    kernel_min_seq: int | None = None,
) -> tuple[list[FlashPlan], list[str]]:
    """Plans for every FlashFwd node of a shape-fixed model, and every violation found. FlashFwd
    inputs that shape inference leaves unknown are measured by running the model on `feeds`."""
    types = value_types(model)
    nodes = flash_nodes(model)
    unknown = sorted({name for node in nodes for name in node.input[:3] if name not in types})
    if unknown and feeds is not None:
        types.update(evaluated_types(model, unknown, feeds))
    plans, problems = [], []
    for owner, node in nested_flash_nodes(model.graph):
        problems.append(f"{node.name}: inside the body of {owner}; compile lowers the main graph only "
                        "(compile a model without If/Loop/Scan around its attention, e.g. optimum's "
                        "decoder_model.onnx instead of decoder_model_merged.onnx)")
    for node in nodes:
        plan, node_problems = plan_node(node, types, mixed_precision, kernel_min_seq)
        problems += node_problems
        if plan is not None:
            plans.append(plan)
    return plans, problems
