"""Hostile and broken inputs to `fuse-attn IN -o OUT` (issue 6).

Each bad input gets exit code 2, exactly one line on stderr, no traceback, and no output file left
behind. A model without attention goes through unchanged with exit 0 and says so. A 100k-node graph
stays bounded in time and memory.

Representative cases run the real command in a subprocess; the byte-flip/truncation fuzz calls
`fuse_attn.commands.cli.main` in-process (same code path, no interpreter start per case). More fuzz cases:
FUSE_ATTN_FUZZ_CASES=500 pytest tests/test_hostile_inputs.py
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attention_graphs import AttnSpec, build

FUZZ_CASES = int(os.environ.get("FUSE_ATTN_FUZZ_CASES", "24"))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "fuse_attn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_bad_input(proc: subprocess.CompletedProcess, out_path=None, *, mentions: tuple[str, ...] = ()):
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err_lines) == 1, f"expected one line on stderr, got {len(err_lines)}: {proc.stderr!r}"
    if mentions:
        assert any(m.lower() in err_lines[0].lower() for m in mentions), (mentions, err_lines[0])
    if out_path is not None:
        assert not os.path.exists(out_path), f"output {out_path} left behind"
        leftovers = [f for f in os.listdir(os.path.dirname(out_path)) if f.startswith(".fuse-attn")]
        assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> str:
    """A small model with two attention blocks, saved to disk (the fuzz seed)."""
    path = tmp_path_factory.mktemp("real") / "model.onnx"
    onnx.save(build(AttnSpec(blocks=2, heads=2, head_dim=8)).model, path)
    return str(path)


def _external_data_model(folder) -> str:
    spec = AttnSpec(heads=2, head_dim=16)
    model = build(spec).model
    path = os.path.join(folder, "ext.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    return path


# --- not a model ---------------------------------------------------------------------------------------


def test_not_an_onnx_file(tmp_path):
    src = tmp_path / "notes.onnx"
    src.write_text("this is not a protobuf, it is a shopping list\n" * 20)
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(src, "-o", out), out)


def test_missing_input_file(tmp_path):
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(tmp_path / "nope.onnx", "-o", out), out)


def test_empty_file(tmp_path):
    src = tmp_path / "empty.onnx"
    src.write_bytes(b"")
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(src, "-o", out), out)


def test_empty_graph(tmp_path):
    src = tmp_path / "empty_graph.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], []),
                                opset_imports=[helper.make_opsetid("", 17)]), src)
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(src, "-o", out), out, mentions=("empty",))


def test_opset_older_than_supported(tmp_path):
    src = tmp_path / "old.onnx"
    model = build(AttnSpec()).model
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))  # before Where, NonZero, ConstantOfShape
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(src, "-o", out), out, mentions=("opset",))


# --- broken bytes: truncations and flips of a real model ------------------------------------------------


def _cli_in_process(args, capsys) -> tuple[int, str]:
    from fuse_attn.commands.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def test_truncations_and_byte_flips(real_model, tmp_path, capsys):
    """Every damaged copy either fuses cleanly (the damage hit only weights or parsed as a valid
    prefix) or fails with exit 2 and one line; never a traceback, never a half-written output."""
    data = open(real_model, "rb").read()
    rng = random.Random(6)
    outcomes = {0: 0, 2: 0}
    for case in range(FUZZ_CASES):
        buf = bytearray(data)
        if case % 2 == 0:
            cut = rng.randrange(1, len(buf))
            buf = buf[:cut]
            what = f"truncated to {cut} of {len(data)} bytes"
        else:
            flips = [rng.randrange(len(buf)) for _ in range(rng.choice([1, 2, 8]))]
            for i in flips:
                buf[i] ^= 1 << rng.randrange(8)
            what = f"bits flipped at {flips}"
        src = tmp_path / f"damaged_{case}.onnx"
        src.write_bytes(bytes(buf))
        out = tmp_path / f"out_{case}.onnx"
        try:
            code, err = _cli_in_process([src, "-o", out], capsys)
        except SystemExit as e:  # argparse or a sys.exit inside: count it as its code
            code, err = e.code, capsys.readouterr().err
        except Exception as e:  # pragma: no cover - this is the failure being tested for
            pytest.fail(f"{what}: exception escaped the CLI: {type(e).__name__}: {e}")
        assert code in (0, 2), (what, code, err)
        outcomes[code] += 1
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in err, (what, err)
            assert not out.exists(), (what, "output left behind")
        else:
            onnx.load(out)  # what was written is a whole model
    assert outcomes[2] > 0, outcomes  # the fuzz did reach the error path


def test_truncated_model_in_a_subprocess(real_model, tmp_path):
    data = open(real_model, "rb").read()
    src = tmp_path / "half.onnx"
    src.write_bytes(data[: len(data) // 2 + 3])
    out = tmp_path / "out.onnx"
    proc = run_cli(src, "-o", out)
    if proc.returncode != 0:  # a prefix at a field boundary may parse; anything else is exit 2
        assert_bad_input(proc, out)


# --- external data --------------------------------------------------------------------------------------


def test_missing_external_data(tmp_path):
    src = _external_data_model(tmp_path)
    os.remove(tmp_path / "ext.onnx.data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    assert_bad_input(run_cli(src, "-o", out), out, mentions=("external", "data", "missing"))


def test_truncated_external_data(tmp_path):
    src = _external_data_model(tmp_path)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    assert_bad_input(run_cli(src, "-o", out), out, mentions=("external", "data", "truncated"))


# --- where the output goes ------------------------------------------------------------------------------


def test_output_in_missing_directory(real_model, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    assert_bad_input(run_cli(real_model, "-o", out))
    assert not (tmp_path / "no").exists()


def test_output_in_read_only_directory(real_model, tmp_path):
    if os.geteuid() == 0:  # root writes through mode bits: use a directory no one can create files in
        out = "/proc/fuse-attn-test-out.onnx"
        assert_bad_input(run_cli(real_model, "-o", out))
        assert not os.path.exists(out)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "out.onnx"
        assert_bad_input(run_cli(real_model, "-o", out), out)
    finally:
        ro.chmod(0o755)


def test_report_in_a_missing_folder(real_model, tmp_path):
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli(real_model, "-o", out, "--report", tmp_path / "nope" / "r.json"), out,
                     mentions=("report",))


def test_output_that_is_a_folder(real_model, tmp_path):
    before = sorted(os.listdir(tmp_path))
    assert_bad_input(run_cli(real_model, "-o", tmp_path), mentions=("folder",))
    assert sorted(os.listdir(tmp_path)) == before


def test_output_equal_to_input_needs_in_place(real_model, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(open(real_model, "rb").read())
    before = src.read_bytes()
    assert_bad_input(run_cli(src, "-o", src), mentions=("in-place", "in_place", "overwrite"))
    assert src.read_bytes() == before
    proc = run_cli(src, "-o", src, "--in-place")  # asked for: allowed
    assert proc.returncode == 0, proc.stderr
    assert any(n.op_type == "FlashFwd" for n in onnx.load(src).graph.node)


# --- --shape (compile) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_model(real_model, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fused") / "fused.onnx"
    proc = run_cli(real_model, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return str(out)


@pytest.mark.parametrize("shape", ["nosuch=1x16", "x=0x16x16", "x=1xfoo", "x=1x16", "x", "x=-1x16x16"])
def test_bad_shape_arguments(fused_model, tmp_path, shape):
    """Unknown --shape names and impossible dims ("x=1x16": wrong rank) fail cleanly."""
    out = tmp_path / "model.neuron.pt"
    proc = subprocess.run([sys.executable, "-m", "fuse_attn", "compile", fused_model, "--shape", shape,
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert_bad_input(proc, out)


# --- no attention, and a big graph ----------------------------------------------------------------------


def test_model_without_attention_is_copied_unchanged(tmp_path):
    """'the model is unchanged' holds to the byte for the graph (no added value_info either)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "plain", [x], [y], initializer=[w])
    src = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    out = tmp_path / "out.onnx"
    proc = run_cli(src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "no attention" in proc.stdout.lower(), proc.stdout
    original, copied = onnx.load(src), onnx.load(out)
    assert copied.graph == original.graph
    assert list(copied.opset_import) == list(original.opset_import)


def _big_model(n_nodes: int) -> onnx.ModelProto:
    """Two attention blocks, then a chain of ~n_nodes cheap elementwise nodes."""
    base = build(AttnSpec(blocks=2, heads=2, head_dim=8)).model
    g = base.graph
    last = g.output[0].name
    # rename the graph output's producer to feed the chain
    for node in g.node:
        for i, o in enumerate(node.output):
            if o == last:
                node.output[i] = "chain_0"
    one = numpy_helper.from_array(np.array(1e-6, np.float32), "chain_eps")
    g.initializer.append(one)
    nodes = []
    for i in range(n_nodes):
        op = "Add" if i % 2 == 0 else "Relu"
        ins = [f"chain_{i}", "chain_eps"] if op == "Add" else [f"chain_{i}"]
        nodes.append(helper.make_node(op, ins, [f"chain_{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"chain_{n_nodes}"], [last]))
    g.node.extend(nodes)
    return base


def test_100k_node_graph_stays_bounded(tmp_path):
    src = tmp_path / "big.onnx"
    onnx.save(_big_model(100_000), src)
    out = tmp_path / "out.onnx"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = run_cli(src, "-o", out, "-q", timeout=600)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert proc.returncode == 0, proc.stderr
    fused = onnx.load(out)
    assert sum(n.op_type == "FlashFwd" for n in fused.graph.node) == 2
    assert seconds < 120, f"100k nodes took {seconds:.1f}s"
    assert peak_mb < 2048 or before / 1024 >= 2048, f"peak RSS {peak_mb:.0f} MB"
