"""`fuse-attn compile --simulate` on every zoo model: fuse with the pass, lower to torch,
run each FlashFwd through the flash_fwd simulator, compare with onnxruntime on the fused model.
Marker `zoo`; no Neuron SDK involved (the simulator stands in for the kernel).

Each model's forward is also checked to be one static graph: no Shape/Size/Range/Constant op is
left in it (all folded at lowering), and it runs on meta tensors with FlashFwd as
static_check.sdpa_attention (any host read raises there).

Tolerances, measured on the zoo's models (the default seed-0 inputs): fp32 models at most
6.1e-6 max |error| with mixed_precision off; with it on, and fp16 models either way, under 1e-2
of max |output| (README). Asserted:
"""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

from fuse_attn import models
from fuse_attn.models.build import build_all
from fuse_attn.compile import constraints, shapes
from fuse_attn.compile.run import attention_fn, compare_with_onnxruntime
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.lower import lower, to_torch
from fuse_attn.compile.static_check import run_on_meta, sdpa_attention, with_attention

FP32_OFF_ATOL = 1e-5  # mixed_precision off, fp32 model: max |error|
SHAPE_OPS = {"Shape", "Size", "Range", "ConstantOfShape", "Constant"}  # all folded at lowering
MIXED_RTOL = 1e-2  # mixed_precision on (bf16 matmuls), or an fp16 model: max |error| / max |output|

_deps = [m for m in ("transformers", "onnxscript") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def built(zoo_log):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {m.name: m for m in build_all(log=zoo_log)}
    torch.set_num_threads(torch_threads)


@pytest.mark.zoo
@pytest.mark.parametrize("name", [e["name"] for e in models.load_manifest()["models"]])
def test_compile_simulate_zoo_model(name, built, tmp_path):
    assert not _deps, f"the zoo extra is not installed ({', '.join(_deps)})"
    from fuse_attn import fuse, save

    zm = built[name]
    assert zm.ok, f"not built: {zm.error}"
    from fuse_attn.models.check import fuse_options

    fused, report = fuse(zm.path, **fuse_options(zm.entry))
    save(fused, tmp_path / "fused.onnx", source_path=zm.path)
    # the manifest's input shapes: what `compile --shape` would be given (other exporters' symbolic dims)
    given = {name: tuple(spec["shape"]) for name, spec in zm.entry["inputs"].items()}
    model = shapes.fix_input_shapes(onnx.load(tmp_path / "fused.onnx"), given)
    if zm.entry.get("compile_known_issue"):  # attention fused inside If bodies: refused, one problem per node
        plans, problems = constraints.plan_model(model)
        assert len(problems) == sum(1 for b in report.blocks if b.fused) > 0
        assert all("inside the body of If" in p for p in problems), problems
        return
    feeds = shapes.example_feeds(model, seed=0)  # what `compile --simulate` uses by default
    reference = run_onnxruntime(model, feeds)
    for mixed_precision in (False, True):
        plans, problems = constraints.plan_model(model, mixed_precision, feeds)
        assert problems == []
        assert len(plans) == sum(1 for b in report.blocks if b.fused)
        module = lower(model, plans, attention_fn(simulate=True)[0])
        assert not [s.node for s in module.steps if s.node.split()[0] in SHAPE_OPS]
        if not mixed_precision:  # forward is one static graph: it runs on meta tensors (no host reads)
            outs = run_on_meta(with_attention(module, sdpa_attention), tuple(to_torch(feeds[n]) for n in module.input_names))
            outs = outs if isinstance(outs, tuple) else (outs,)
            assert [tuple(o.shape) for o in outs] == [r.shape for r in reference]
        for output, abs_err, rel_err in compare_with_onnxruntime(model, module, feeds, reference):
            if mixed_precision or zm.entry["dtype"] != "float32":
                assert rel_err <= MIXED_RTOL, (output, abs_err, rel_err)
            else:
                assert abs_err <= FP32_OFF_ATOL, (output, abs_err, rel_err)


def _has_attention_op(entry: dict) -> bool:
    """torch's dynamo exporter at opset 23 writes scaled_dot_product_attention as the Attention op."""
    return entry["exporter"] == "dynamo" and (entry.get("opset") or 0) >= 23 and entry.get("attn_impl") == "sdpa"


@pytest.mark.zoo
@pytest.mark.parametrize("name", [e["name"] for e in models.load_manifest()["models"] if _has_attention_op(e)])
def test_unfused_attention_op_model_compiles(name, built):
    """Every Attention block left alone (here: the model as exported, nothing fused) lowers as plain
    attention (compile/attention_op.py): one static graph that matches onnxruntime."""
    zm = built[name]
    assert zm.ok, f"not built: {zm.error}"
    given = {n: tuple(spec["shape"]) for n, spec in zm.entry["inputs"].items()}
    model = shapes.fix_input_shapes(onnx.load(zm.path), given)
    assert any(n.op_type == "Attention" for n in model.graph.node)
    feeds = shapes.example_feeds(model, seed=0)
    reference = run_onnxruntime(model, feeds)
    module = lower(model, [], None)
    outs = run_on_meta(module, tuple(to_torch(feeds[n]) for n in module.input_names))
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert [tuple(o.shape) for o in outs] == [r.shape for r in reference]
    for output, abs_err, rel_err in compare_with_onnxruntime(model, module, feeds, reference):
        if zm.entry["dtype"] != "float32":
            assert rel_err <= MIXED_RTOL, (output, abs_err, rel_err)
        else:
            assert abs_err <= FP32_OFF_ATOL, (output, abs_err, rel_err)
