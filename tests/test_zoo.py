"""The model zoo: every recipe exports (cached in .zoo-cache/), the pass fuses exactly what the
manifest expects, reports every must-not with its reason, and the fused model matches the
original in onnxruntime. Marker `zoo`; deselect with `-m "not zoo"`.

The coverage table lands in <cache>/coverage.md after the run.
"""

from __future__ import annotations

import importlib.util

import pytest

from fuse_attn import models

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
    return {m.name: m for m in models.build_all(log=zoo_log)}


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
    if _zoo_deps:
        pytest.skip(f"the zoo extra is not installed ({', '.join(_zoo_deps)})")
    from fuse_attn.models.check import check_model

    zm = built[name]
    if zm.skipped:
        pytest.skip(zm.error)
    assert zm.ok, f"export failed: {zm.error}"
    if importlib.util.find_spec("fuse_attn") is None or not hasattr(__import__("fuse_attn"), "fuse"):
        pytest.skip("fuse_attn.fuse is not available yet")
    row = check_model(zm, manifest=MANIFEST)
    rows[name] = row
    detail = "\n".join(row.problems + [f"pass reasons: {row.not_fused}"])
    if row.known_issue:
        if row.ok:
            pytest.fail(f"known issue looks fixed, remove 'known_issue' from the manifest: {row.known_issue}")
        pytest.xfail(f"known issue: {row.known_issue}\n{detail}")
    assert row.ok, detail


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
