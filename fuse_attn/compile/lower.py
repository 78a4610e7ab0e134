"""A shape-fixed ONNX model -> a torch.nn.Module whose forward is a fixed list of tensor ops.

Lowering walks the graph once with every input shape known (compile's `--shape`). Each node's
rule (onnx_ops) reads its shape-like inputs into Python constants; a node whose runtime inputs
are all known before run time (initializers, Constant, Shape of anything, and whatever is
computed from those) is folded: evaluated here, its result a constant. Only the rest becomes a
step of forward. So forward holds no shape arithmetic and no data-dependent Python: what
torch_neuronx.trace records with torch-xla is one static graph, without host reads.

Each FlashFwd node is a FlashFwdModule: pad seq when the plan says so (masking the padded keys),
call `attention` (the NKI binding on Inf2, the CPU simulator with --simulate), slice the output.
A launch the plan keeps off the kernel (--kernel-min-seq) runs plain_attention's tensor ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import onnx
import torch
import torch.nn.functional as F

from fuse_attn.compile import onnx_ops
from fuse_attn.compile import ops_math, ops_sequence, ops_spatial  # noqa: F401 - they register their rules in onnx_ops.RULES
from fuse_attn.compile.constraints import FlashPlan
from fuse_attn.compile.onnx_ops import Arg, LoweringError, array_to_torch, tensor_proto_to_torch, torch_dtype
from fuse_attn.compile.plain_attention import sdpa_attention
from fuse_attn.ir import contract

# attention(q, k, v, attrs, seq_tile_size) -> o (b, h, s, d), all in kernel layouts.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, contract.FlashFwdAttrs, int], torch.Tensor]

# Folded results larger than this stay steps of forward: an Expand of a constant mask to
# (batch, heads, seq, seq) is cheaper computed on the device than stored in the module.
FOLD_AT_MOST = 1 << 20  # elements

__all__ = ["Attention", "FlashFwdModule", "LoweredModule", "LoweringError", "lower", "to_torch"]

to_torch = array_to_torch  # a feed (numpy, bfloat16 included) as a torch tensor


class FlashFwdModule(torch.nn.Module):
    """One FlashFwd node: q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d) -> o (b, h, s, d).

    A plan with padding runs the launch at plan.padded_seq and keeps the first plan.seq rows.
    The padded keys are kept out of every real row's softmax by the causal mask, or by the
    key-bias column (contract.py): the node's own, whose k entries at padded keys get the masked
    value b / scale, or one appended here (q 1, k 0 at real keys and b / scale at padded ones,
    v 0), sliced off the output with the padded rows. The column entries are constants of the
    plan (buffers), so forward stays shape-only."""

    def __init__(self, plan: FlashPlan, attention: Attention):
        super().__init__()
        self.plan = plan
        self.attention = attention
        if plan.padding in (contract.PAD_EXTEND_COLUMN, contract.PAD_APPEND_COLUMN):
            elem = onnx.TensorProto.DataType.Value(plan.dtype.upper())
            dtype = torch_dtype(elem)
            column = contract.key_bias_masked_value(plan.attrs.softmax_scale, elem) / plan.attrs.softmax_scale
            if plan.padding == contract.PAD_EXTEND_COLUMN:
                # The k entries of the padded keys: 0 in the head dims, the masked value in the column.
                k_pad = torch.zeros(1, 1, plan.head_dim, plan.pad, dtype=dtype)
                k_pad[:, :, -1] = column
                self.register_buffer("k_pad", k_pad)
            else:
                k_column = torch.zeros(1, 1, 1, plan.padded_seq, dtype=dtype)
                k_column[..., plan.seq:] = column
                self.register_buffer("k_column", k_column)
                self.register_buffer("q_column", torch.ones(1, 1, 1, plan.padded_seq, dtype=dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan
        if not plan.pad:
            return self.attention(q, k, v, plan.attrs, plan.seq_tile_size)
        b, h, kv, n = plan.batch, plan.heads, plan.kv_heads, plan.padded_seq
        q = F.pad(q, (0, plan.pad))
        v = F.pad(v, (0, 0, 0, plan.pad))
        if plan.padding == contract.PAD_EXTEND_COLUMN:
            k = torch.cat([k, self.k_pad.expand(b, kv, plan.head_dim, plan.pad)], dim=3)
        else:
            k = F.pad(k, (0, plan.pad))  # causal: keys right of every real query, hidden by the mask
        if plan.padding == contract.PAD_APPEND_COLUMN:
            q = torch.cat([q, self.q_column.expand(b, h, 1, n)], dim=2)
            k = torch.cat([k, self.k_column.expand(b, kv, 1, n)], dim=2)
            v = F.pad(v, (0, 1))
        o = self.attention(q, k, v, plan.attrs, plan.seq_tile_size)
        return o[:, :, : plan.seq, : plan.head_dim]


@dataclasses.dataclass
class Step:
    fn: Callable[..., Any]
    inputs: list[str]  # keys of the forward's environment
    outputs: list[str]
    release: list[str] = dataclasses.field(default_factory=list)  # keys no later step reads
    node: str = ""  # the ONNX node, for error messages and debugging


class LoweredModule(torch.nn.Module):
    """forward(*inputs in graph order) -> the graph output, or a tuple of them."""

    def __init__(self, input_names: list[str], output_keys: list[str], steps: list[Step],
                 constants: dict[str, torch.Tensor], flash: list[FlashFwdModule]):
        super().__init__()
        self.input_names = list(input_names)
        self.output_keys = list(output_keys)
        self.steps = steps
        self.flash = torch.nn.ModuleList(flash)
        self.constant_keys = []
        for i, (key, value) in enumerate(constants.items()):
            self.register_buffer(f"constant_{i}", value)
            self.constant_keys.append((key, f"constant_{i}"))

    def forward(self, *inputs: torch.Tensor):
        env: dict[str, Any] = dict(zip(self.input_names, inputs))
        for key, attr in self.constant_keys:
            env[key] = getattr(self, attr)
        for step in self.steps:
            out = step.fn(*[env[k] for k in step.inputs])
            if len(step.outputs) == 1:
                env[step.outputs[0]] = out[0] if isinstance(out, tuple) else out
            else:
                env.update(zip(step.outputs, out))
            for key in step.release:
                del env[key]
        outs = tuple(env[k] for k in self.output_keys)
        return outs[0] if len(outs) == 1 else outs


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def lower(model: onnx.ModelProto, plans: list[FlashPlan], attention: Attention) -> LoweredModule:
    """The shape-fixed fused `model` as a torch module, FlashFwd nodes launched through `attention`.
    LoweringError (one line naming the node) for what it cannot lower."""
    graph = model.graph
    opset = _default_opset(model)
    by_output = {p.output: p for p in plans}
    env: dict[str, Arg] = {}
    for init in graph.initializer:
        env[init.name] = Arg.constant(tensor_proto_to_torch(init), init.name)
    input_names = [i.name for i in graph.input if i.name not in env]
    for value in graph.input:
        if value.name in env:
            continue
        tt = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if None in dims:
            raise LoweringError(f"input {value.name!r} has a symbolic dim: fix it with --shape")
        env[value.name] = Arg(value.name, torch.empty(dims, dtype=torch_dtype(tt.elem_type), device="meta"))

    steps: list[Step] = []
    constants: dict[str, torch.Tensor] = {}  # key -> tensor, the constants forward reads
    flash: list[FlashFwdModule] = []

    def key_of(arg: Arg) -> str:
        if arg.value is None:
            return arg.name
        key = f"const:{arg.name}" if arg.name is not None else f"const:#{len(constants)}"
        if arg.name is None or key not in constants:
            constants[key] = arg.value
        return key

    for proto in graph.node:
        label = f"{proto.op_type} node {proto.name or proto.output[0]!r}"
        args = [env[n] if n else None for n in proto.input]
        if any(a is None and n for a, n in zip(args, proto.input)):
            raise LoweringError(f"{label}: an input is not produced before it")
        outputs = list(proto.output)
        if proto.domain == contract.DOMAIN:
            plan = by_output.get(proto.output[0])
            if plan is None:
                raise LoweringError(f"{label}: no launch plan (was the model planned with constraints.plan_model?)")
            module = FlashFwdModule(plan, attention if plan.kernel else sdpa_attention)
            flash.append(module)
            runtime = [a for a in args if a is not None]
            q = runtime[0]
            s = q.shape
            metas = (torch.empty((s[0], s[1], s[3], s[2]), dtype=q.dtype, device="meta"),)
            steps.append(Step(module, [key_of(a) for a in runtime], outputs[:1], node=label))
            env[outputs[0]] = Arg(outputs[0], metas[0])
            continue
        if proto.domain not in ("", "ai.onnx") or proto.op_type not in onnx_ops.RULES:
            raise LoweringError(f"{label}: the lowering has no rule for {proto.domain or 'ai.onnx'}.{proto.op_type}")
        node = onnx_ops.Node(proto.op_type, proto.name, onnx_ops.attribute_values(proto), opset,
                             sum(1 for o in proto.output if o))
        try:
            fn, runtime = onnx_ops.RULES[proto.op_type](node, args)
            if any(a is None for a in runtime):
                raise LoweringError("a required input is missing")
            metas = _as_tuple(fn(*[a.meta for a in runtime])) if runtime else ()
        except LoweringError as e:
            raise LoweringError(f"{label}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a torch error on these shapes: say which node
            raise LoweringError(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        values = None
        if not runtime:  # a constant whatever its size (Constant, Shape, ConstantOfShape, Range)
            values = _as_tuple(fn())
        elif all(a.value is not None for a in runtime) and sum(m.numel() for m in metas) <= FOLD_AT_MOST:
            try:
                values = _as_tuple(fn(*[a.value for a in runtime]))
            except Exception:  # noqa: BLE001 - a CPU kernel missing for this dtype: left to run time
                values = None
        if values is not None:
            for name, value in zip(outputs, values):
                if name:  # cloned: a view of an initializer would keep all of it in the module
                    env[name] = Arg.constant(value.clone(), name)
            continue
        steps.append(Step(fn, [key_of(a) for a in runtime], outputs[: len(metas)], node=label))
        for name, meta in zip(outputs, metas):
            if name:
                env[name] = Arg(name, meta)

    output_keys = []
    for out in graph.output:
        arg = env.get(out.name)
        if arg is None:
            raise LoweringError(f"graph output {out.name!r} is not computed by any node")
        output_keys.append(key_of(arg))
    _mark_releases(steps, set(output_keys))
    return LoweredModule(input_names, output_keys, steps, constants, flash).eval()


def _mark_releases(steps: list[Step], keep: set[str]) -> None:
    """After each step, drop the values no later step reads (constants and outputs stay)."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for key in step.inputs:
            last[key] = i
    for key, i in last.items():
        if key not in keep and not key.startswith("const:"):
            steps[i].release.append(key)
