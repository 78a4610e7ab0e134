"""ONNX -> torch.nn.Module with onnx2pytorch, each FlashFwd node a call of the kernel binding.

onnx2pytorch converts the default-domain graph. FlashFwd nodes are first swapped for
placeholder nodes (same inputs and outputs), and after conversion each placeholder's module is
replaced by a FlashFwdModule: pad seq when the plan says so, call `attention` (the NKI binding
on Inf2, the CPU simulator with --simulate), slice the output. Gemm nodes whose weights are
activations, which onnx2pytorch 0.6.0 cannot convert, go the same way with a Gemm module.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Callable

import onnx
import torch
import torch.nn.functional as F

from fuse_attn.ir import contract
from fuse_attn.compile.constraints import FlashPlan
from fuse_attn.compile.shapes import copy_model

# attention(q, k, v, attrs, seq_tile_size) -> o (b, h, s, d), all in kernel layouts.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, contract.FlashFwdAttrs, int], torch.Tensor]


def _torchvision_stub() -> types.ModuleType:
    """What onnx2pytorch imports from torchvision, failing only if a model really uses it."""

    def unavailable(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"torchvision.{name} is needed by this model but torchvision does not load here")

        return op

    root = types.ModuleType("torchvision")
    root.ops = types.ModuleType("torchvision.ops")
    root.io = types.ModuleType("torchvision.io")
    for name in ("deform_conv2d", "roi_pool", "roi_align", "nms", "box_convert"):
        setattr(root.ops, name, unavailable(f"ops.{name}"))
    root.io.decode_image = unavailable("io.decode_image")
    root.io.ImageReadMode = types.SimpleNamespace(UNCHANGED=0, GRAY=1, GRAY_ALPHA=2, RGB=3, RGB_ALPHA=4)
    return root


def import_onnx2pytorch():
    """onnx2pytorch.ConvertModel. onnx2pytorch imports torchvision at import time for five image
    ops; a torchvision built for another torch (e.g. a CUDA wheel beside a CPU torch) fails to
    load, so then it gets a stub whose ops raise when called."""
    if "onnx2pytorch" in sys.modules:
        return sys.modules["onnx2pytorch"].ConvertModel
    try:
        importlib.import_module("torchvision.ops")
        importlib.import_module("torchvision.io")
    except Exception:  # noqa: BLE001 - any failure to load torchvision, OSError and RuntimeError included
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub = _torchvision_stub()
        sys.modules.update({"torchvision": stub, "torchvision.ops": stub.ops, "torchvision.io": stub.io})
        try:
            return importlib.import_module("onnx2pytorch").ConvertModel
        finally:
            for name in ("torchvision", "torchvision.ops", "torchvision.io"):
                sys.modules.pop(name, None)
    return importlib.import_module("onnx2pytorch").ConvertModel


class FlashFwdModule(torch.nn.Module):
    """One FlashFwd node: q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d) -> o (b, h, s, d)."""

    def __init__(self, plan: FlashPlan, attention: Attention):
        super().__init__()
        self.plan = plan
        self.attention = attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan
        if plan.pad:
            # Keys past the real seq sit right of every real query: the causal mask hides them.
            q = F.pad(q, (0, plan.pad))
            k = F.pad(k, (0, plan.pad))
            v = F.pad(v, (0, 0, 0, plan.pad))
        o = self.attention(q, k, v, plan.attrs, plan.seq_tile_size)
        return o[:, :, : plan.seq, :] if plan.pad else o


class Gemm(torch.nn.Module):
    """ONNX Gemm on activations: onnx2pytorch 0.6.0 converts Gemm only when B and C are
    initializers, and TorchScript exports feed deduplicated weights through Identity nodes."""

    def __init__(self, alpha: float, beta: float, trans_a: int, trans_b: int):
        super().__init__()
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        y = (a.t() if self.trans_a else a) @ (b.t() if self.trans_b else b)
        y = y * self.alpha if self.alpha != 1.0 else y
        if c is not None:
            y = y + (c * self.beta if self.beta != 1.0 else c)
        return y


def _gemm_on_activations(node: onnx.NodeProto, initializers: set[str]) -> torch.nn.Module | None:
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return None
    if all(name in initializers for name in node.input[1:] if name):
        return None  # onnx2pytorch's own conversion (an nn.Linear) applies
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return Gemm(float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0)), attrs.get("transA", 0), attrs.get("transB", 0))


def _with_placeholders(model: onnx.ModelProto, modules: dict[str, torch.nn.Module]) -> onnx.ModelProto:
    """A copy in which every node whose first output is a key of `modules` is an Identity
    placeholder of the same inputs and outputs (its module is swapped in after conversion), and
    without the fuse_attn domain (onnx2pytorch knows only the default one)."""
    model = copy_model(model)
    for node in model.graph.node:
        if node.output[0] in modules:
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
        elif node.domain == contract.DOMAIN:
            raise ValueError(f"{node.op_type} node {node.name or node.output[0]} has no launch plan")
    del model.functions[:]
    kept = [o for o in model.opset_import if o.domain != contract.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def lower(model: onnx.ModelProto, plans: list[FlashPlan], attention: Attention) -> torch.nn.Module:
    """The shape-fixed fused `model` as a torch module, FlashFwd nodes launched through `attention`."""
    convert_model = import_onnx2pytorch()
    initializers = {t.name for t in model.graph.initializer}
    modules: dict[str, torch.nn.Module] = {p.output: FlashFwdModule(p, attention) for p in plans}
    for node in model.graph.node:
        gemm = _gemm_on_activations(node, initializers)
        if gemm is not None:
            modules[node.output[0]] = gemm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = convert_model(_with_placeholders(model, modules))
    for output, replacement in modules.items():
        setattr(module, module.mapping[output], replacement)
    return module.eval()
