"""The model zoo: every recipe exports (cached in .zoo-cache/), the pass fuses exactly what the
manifest expects, reports every must-not with its reason, and the fused model matches the
original in onnxruntime. Marker `zoo`; deselect with `-m "not zoo"`.

The coverage table lands in <cache>/coverage.md after the run.
"""

from __future__ import annotations

import importlib.util

import pytest

from fuse_attn import models
from fuse_attn.models.build import build_all

MANIFEST = models.load_manifest()
NAMES = [e["name"] for e in MANIFEST["models"]]
EXPORTERS = {"dynamo", "torchscript", "optimum", "tf2onnx", "jax2onnx"}


def test_manifest_is_well_formed():
    """Cheap and torch-free: the hand-written manifest stays consistent."""
    assert len(NAMES) == len(set(NAMES))
    families = {e["family"] for e in MANIFEST["models"]}
    assert len(families) >= 12, families
    from fuse_attn.models import environments

    for e in MANIFEST["models"]:
        assert e["exporter"] in EXPORTERS, e["name"]
        if e.get("environment"):  # an exporter whose pins clash with the zoo's: its own venv and script
            env = environments.ENVIRONMENTS[e["environment"]]
            assert (environments.EXPORTER_SCRIPTS / env["script"]).is_file(), e["name"]
        else:
            assert e["exporter"] in ("dynamo", "torchscript") and e["builder"], e["name"]
        assert set(e.get("fuse", {})) <= {"assume_no_padding", "shapes", "dims"}, e["name"]
        assert isinstance(e.get("compile_known_issue", ""), str), e["name"]
        assert e["dtype"] in MANIFEST["tolerance"], e["name"]
        assert e["inputs"], e["name"]
        exp = e["expected"]
        assert exp["fused"] >= 0
        for group in exp["not_fused"]:
            assert group["count"] > 0 and group["reason"] and group["keywords"], e["name"]
            # a block the kernel could run but the pass leaves alone is a gap: it says which
            assert isinstance(group.get("kernel_can_run", False), bool), e["name"]
            assert not group.get("kernel_can_run") or group.get("gap"), e["name"]
        for group in exp.get("missed", []):  # blocks the pass does not find (yet): a gap, named
            assert group["count"] > 0 and group["reason"] and group["gap"], e["name"]
            assert isinstance(group["kernel_can_run"], bool), e["name"]
        blocks = exp["fused"] + sum(g["count"] for g in exp["not_fused"] + exp.get("missed", []))
        assert blocks > 0, f"{e['name']} has no attention"


_zoo_deps = [m for m in ("torch", "transformers", "onnxscript") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def built(zoo_log):
    return {m.name: m for m in build_all(log=zoo_log)}


@pytest.fixture(scope="module")
def rows(built):
    collected = {}
    yield collected
    if collected:
        from fuse_attn.models.check import coverage_document

        doc = coverage_document([collected[n] for n in NAMES if n in collected])
        (models.cache_dir() / "coverage.md").write_text(doc)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.zoo
def test_zoo_model(name, built, rows):
    assert not _zoo_deps, f"the zoo extra is not installed ({', '.join(_zoo_deps)})"
    from fuse_attn.models.check import check_model

    zm = built[name]
    assert zm.ok, f"export failed: {zm.error}"
    row = check_model(zm, manifest=MANIFEST)
    rows[name] = row
    detail = "\n".join(row.problems + [f"pass reasons: {row.not_fused}"])
    assert row.ok and not row.known_issue, detail


def test_zoo_exports_are_announced_before_they_start():
    """Exports before the first zoo test take minutes on a fresh clone: the terminal says so once,
    then names each export; a cached zoo prints nothing."""
    from conftest import ZooExportNotice

    lines: list[str] = []
    notice = ZooExportNotice(lines.append)
    notice("bert: cached")
    assert lines == []
    notice("gpt2: exporting (dynamo, opset default, float32, sdpa)")
    notice("gpt2: 8.0s, opset 20, 80 nodes, onnxruntime vs torch 1e-06")
    notice("t5: cached")
    assert len(lines) == 3, lines
    assert "exporting the model zoo" in lines[0] and "minutes" in lines[0]
    assert lines[1].endswith("gpt2: exporting (dynamo, opset default, float32, sdpa)")


# The forms of issue 11 that real exporters emit, each held by a zoo recipe: the export must still
# have that form, or the recipe would silently stop testing it (an exporter upgrade can drop it).
def _constants(model) -> dict:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _ops(model) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _producer(model, name: str):
    return next((n for n in model.graph.node if name in n.output), None)


def _slice_to_end(model) -> bool:
    consts = _constants(model)
    return any(n.op_type == "Slice" and len(n.input) > 2 and n.input[2] in consts
               and (consts[n.input[2]] == 2**63 - 1).any() for n in model.graph.node)


def _expand_shape_from_where(model) -> bool:
    return any(n.op_type == "Expand" and getattr(_producer(model, n.input[1]), "op_type", None) == "Where"
               for n in model.graph.node)


def _softmax_then_mul(model) -> bool:
    softmax = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
    return "ReduceSum" in _ops(model) and any(n.op_type == "Mul" and softmax & set(n.input) for n in model.graph.node)


def _dims(model, name: str) -> list:
    value = next(i for i in model.graph.input if i.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _attention_in_if(model) -> bool:
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    return bool(ifs) and all(any(m.op_type == "Softmax" for a in n.attribute for m in a.g.node) for n in ifs)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


EXPORTER_FORMS = {
    "gpt2-tf444-torchscript17-sdpa": ("1: a mask sliced 'to the end' (INT64_MAX)", _slice_to_end),
    "gpt2-tf444-torchscript17-eager": ("2: the scale computed from Shape and Pow", lambda m: {"Pow", "Shape", "Div"} <= _ops(m)),
    "jax-einsum-jax2onnx-causal": ("2: the scale Sqrt of a constant", lambda m: {"Sqrt", "Einsum"} <= _ops(m)),
    "llama-tf444-torchscript17-sdpa": ("3: repeat_kv through an Expand shape from Where(Equal(...))", _expand_shape_from_where),
    "keras-mha-tf2onnx-causal": ("4: multiplicative mask (And, Not) and Squeeze before the softmax",
                                 lambda m: {"And", "Not", "Squeeze"} <= _ops(m)),
    "jax-nnx-mha-jax2onnx-causal": ("5: softmax, Mul by the mask, renormalised", _softmax_then_mul),
    "llama-tf444-torchscript14-eager": ("6: opset 14", lambda m: _opset(m) == 14),
    "gpt2-optimum-textgen-past": ("7, 10: past key/values and a dim given as an expression",
                                  lambda m: _dims(m, "attention_mask")[1] == "past_sequence_length + sequence_length"),
    "vit-optimum": ("8: image height and width symbolic", lambda m: all(isinstance(d, str) for d in _dims(m, "pixel_values")[2:])),
    "bart-optimum-decoder-merged": ("9: attention inside If branches", _attention_in_if),
}


@pytest.mark.parametrize("name", sorted(EXPORTER_FORMS))
@pytest.mark.zoo
def test_recipe_still_has_its_exporter_form(name, built):
    import onnx

    zm = built[name]
    assert zm.ok, f"export failed: {zm.error}"
    what, has_form = EXPORTER_FORMS[name]
    assert has_form(onnx.load(str(zm.path), load_external_data=False)), f"{name} no longer has issue 11 form {what}"
