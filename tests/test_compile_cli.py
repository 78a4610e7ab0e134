"""`fuse-attn compile`: bad input as the fuse command takes it (tests/test_hostile_inputs.py's rules:
exit 2, one line with the prefix `fuse-attn: error:`, no traceback, nothing written), the
--simulate verdict, the kernel version it follows, and the SBUF check."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fuse_attn.commands.cli import main as cli_main
from fuse_attn.compile import sbuf
from test_compile_lower import fused_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fused_path(tmp_path):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_model(layers=2), path)
    return str(path)


def run(args, capsys) -> tuple[int, str, str]:
    code = cli_main(["compile", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(code, err, folder, *, mentions: str, before: set[str]):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fuse-attn: error: "), err
    assert "Traceback" not in err
    assert mentions in lines[0], lines[0]
    assert set(os.listdir(folder)) == before, "something was written"


# --- bad input, as the fuse command reports it -----------------------------------------------------------


def test_missing_file(tmp_path, capsys):
    code, _, err = run([tmp_path / "nope.onnx", "--simulate", "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="does not exist or is not a file", before=set())


def test_text_file(tmp_path, capsys):
    src = tmp_path / "notes.onnx"
    src.write_text("this is not a protobuf, it is a shopping list\n" * 20)
    code, _, err = run([src, "-o", tmp_path / "m.pt", "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="is not a readable ONNX model", before={"notes.onnx"})


def test_output_into_a_missing_folder(fused_path, tmp_path, capsys):
    code, _, err = run([fused_path, "-o", tmp_path / "missing" / "m.pt", "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="folder", before={"fused.onnx"})
    assert "does not exist" in err


def test_output_equal_to_the_input(fused_path, tmp_path, capsys):
    data = open(fused_path, "rb").read()
    code, _, err = run([fused_path, "-o", fused_path, "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="is the input model", before={"fused.onnx"})
    assert open(fused_path, "rb").read() == data


def test_output_is_a_folder(fused_path, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run([fused_path, "-o", tmp_path / "out", "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="is a folder", before={"fused.onnx", "out"})


def test_output_required_without_simulate(fused_path, tmp_path, capsys):
    code, _, err = run([fused_path, "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="-o/--output is required", before={"fused.onnx"})


def test_shape_errors(fused_path, tmp_path, capsys):
    code, _, err = run([fused_path, "--simulate"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="input 'x' has unknown dims ['batch', 'seq']", before={"fused.onnx"})
    code, _, err = run([fused_path, "--simulate", "--shape", "x=1x0x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="expected NAME=DxDx...", before={"fused.onnx"})


def test_without_the_sdk(fused_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "neuronxcc", None)  # import fails even where the SDK is installed
    monkeypatch.setitem(sys.modules, "nki", None)
    code, _, err = run([fused_path, "--shape", "x=1x512x64", "-o", tmp_path / "m.pt"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="the Neuron SDK is not installed", before={"fused.onnx"})
    assert "pip install torch-neuronx neuronx-cc --extra-index-url=https://pip.repos.neuron.amazonaws.com" in err
    assert "--simulate" in err


def test_without_torch_names_the_install(fused_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    code, _, err = run([fused_path, "--simulate", "--shape", "x=1x512x64"], capsys)
    assert_bad_input(code, err, tmp_path, mentions="compile needs PyTorch", before={"fused.onnx"})
    assert "/opt/aws_neuronx_venv_pytorch_2_9" in err and "pip install torch" in err


def test_bad_input_in_a_real_process(tmp_path):
    """The same through the installed command's module, in its own interpreter."""
    src = tmp_path / "notes.onnx"
    src.write_text("not a model")
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "fuse_attn", "compile", str(src), "--simulate"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("fuse-attn: error: ") and "Traceback" not in proc.stderr


# --- the --simulate verdict -----------------------------------------------------------------------------


def peaked(model: onnx.ModelProto, factor: float = 2.0) -> onnx.ModelProto:
    """q and k projections scaled up by `factor`: scores with std ~factor**2 (about 1 before)."""
    for init in model.graph.initializer:
        if init.name.endswith(("Wq", "Wk")):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    return model


def verdict(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("simulated flash_fwd")]
    return line


def test_simulate_ok(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(peaked(fused_model(layers=2)), path)
    code, out, _ = run([path, "--simulate", "--shape", "x=1x300x64"], capsys)
    assert code == 0
    assert "flash_fwd 2.21-swa (the default: no Neuron SDK with flash_fwd here" in out
    assert "simulate y: max abs" in out and out.count(") ok") == 1
    assert verdict(out).startswith("simulated flash_fwd 2.21-swa against onnxruntime, tolerance bf16")
    assert "): ok." in verdict(out)


def test_simulate_full_precision_uses_the_fp32_tolerance(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(peaked(fused_model(layers=2)), path)
    code, out, _ = run([path, "--simulate", "--shape", "x=1x300x64", "--no-mixed-precision"], capsys)
    assert code == 0
    assert "tolerance float32: flash_fwd without mixed precision (0.0001 + 0.0001 x max|output|): ok" in out
    assert float(out.split("simulate y: max abs ")[1].split(",")[0]) < 1e-4


def test_tampered_model_is_a_mismatch(tmp_path, capsys):
    """The model's own FlashFwd function (what onnxruntime runs) scales q by q instead of the scale:
    the simulated kernel does what the attributes say, so the two disagree."""
    model = fused_model(layers=1)
    (function,) = model.functions
    (mul,) = [n for n in function.node if n.op_type == "Mul" and list(n.input) == ["q_bhsd", "scale"]]
    mul.input[1] = "q_bhsd"
    path = tmp_path / "fused.onnx"
    onnx.save(model, path)
    code, out, _ = run([path, "--simulate", "--shape", "x=1x512x64"], capsys)
    assert code == 1
    assert ") MISMATCH" in out and "): MISMATCH." in verdict(out)


def test_tampered_kernel_is_a_mismatch(fused_path, capsys, monkeypatch):
    """A kernel that ignores the causal flag: each row sees every key."""
    from fuse_attn.compile import simulator

    real = simulator.simulator_for

    def tampered(version):
        attention = real(version)
        return lambda q, k, v, attrs, tile: attention(q, k, v, attrs.__class__(**{**attrs.__dict__,
                                                                              "use_causal_mask": False}), tile)

    monkeypatch.setattr(simulator, "simulator_for", tampered)
    code, out, _ = run([fused_path, "--simulate", "--shape", "x=1x512x64"], capsys)
    assert code == 1 and "): MISMATCH." in verdict(out)


def test_the_error_stated_is_the_simulated_versions(tmp_path, capsys):
    """On peaked attention (score std ~9) 2.20's bf16 scores add more error than 2.21's fp32 ones:
    each run states its own figure and verdict (measured: 0.25 MISMATCH, 0.063 ok)."""
    path = tmp_path / "fused.onnx"
    onnx.save(peaked(fused_model(layers=1, heads=2, kv_heads=2), factor=3.0), path)
    errors, codes = {}, {}
    for version in ("2.20", "2.21"):
        codes[version], out, _ = run([path, "--simulate", "--shape", "x=1x512x64", "--kernel-version", version], capsys)
        assert f"flash_fwd {version} (--kernel-version)" in out
        assert f"CPU simulator of flash_fwd {version} arithmetic" in out
        errors[version] = float(out.split("simulate y: max abs ")[1].split(",")[0])
    assert errors["2.20"] > 3 * errors["2.21"], errors
    assert codes == {"2.20": 1, "2.21": 0}


# --- SBUF -------------------------------------------------------------------------------------------------


def test_sbuf_figures_follow_the_kernel_source():
    # 2.20: o_buffer (seq/128) x (seq/tile) x d fp32 per partition: 16384/128 * 16384/2048 * 128 * 4 B = 512 KiB.
    use = sbuf.sbuf_use("2.20", 16384, 2048, 128, "float", True)
    assert use.o_buffer == 512 * 1024 and not use.fits
    # 2.21+: o_buffer for at most attn_core_tile_size (256) q tiles: 256 * 128 * 4 B = 128 KiB.
    assert sbuf.sbuf_use("2.21", 65536, 2048, 128, "float", True).o_buffer == 128 * 1024
    assert sbuf.sbuf_use("2.21-swa", 32768, 2048, 128, "float", True).fits
    assert sbuf.sbuf_use("2.20", 2048, 2048, 128, "float", True).fits
    # The 2.20 buffer shrinks with a larger tile and grows with seq squared.
    assert sbuf.longest_seq_that_fits("2.20", 2048, 128, "float", True) == 8192
    assert sbuf.longest_seq_that_fits("2.20", 512, 128, "float", True) < 8192
    assert sbuf.PARTITION_BYTES * sbuf.PARTITIONS == 24 * 2**20


def test_launch_that_overflows_sbuf_is_refused_with_the_figure_and_fix(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_model(hidden=128, heads=1, kv_heads=1), path)  # head dim 128
    code, _, err = run([path, "--simulate", "--shape", "x=1x16384x128", "--kernel-version", "2.20"], capsys)
    assert code == 1
    assert ("l0_flash: flash_fwd 2.20 needs SBUF 545 KiB of 192 KiB per partition (68.1 of 24 MiB) at seq 16384, "
            "seq_tile_size 2048, d 128 (o_buffer alone 512 KiB); fix: a --shape with seq <= 8192, or an SDK "
            "2.21-2.27, whose kernel tiles o_buffer (attn_core_tile_size)") in err


def test_each_launch_states_its_sbuf_use(fused_path, capsys):
    # 2.20, seq 512, tile 512, d 16, fp32 with mixed precision: o/l/m 288 B, k/v/q tiles 1408 B,
    # core (scores 2048, p and its transpose 2048, sums 12, out 32) 4140 B: 5836 B per partition.
    code, out, _ = run([fused_path, "--simulate", "--shape", "x=1x512x64", "--kernel-version", "2.20"], capsys)
    assert code == 0
    assert "l0_flash: flash_fwd[1, 2]" in out and "SBUF 6 KiB of 192 KiB per partition (0.7 of 24 MiB) per program" in out


def test_simulated_module_matches_a_direct_call():
    """The lowering runs the simulator of the version chosen (not the default) for every node."""
    from fuse_attn.compile.run import attention_fn
    from fuse_attn.ir.contract import FlashFwdAttrs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 512, generator=g) * 4, torch.randn(1, 2, 16, 512, generator=g) * 4,
               torch.randn(1, 2, 512, 16, generator=g))
    attrs = FlashFwdAttrs(0.25, True, 2, 2)
    outs = {ver: attention_fn(True, ver)[0](q, k, v, attrs, 512) for ver in ("2.20", "2.21")}
    assert not torch.equal(outs["2.20"], outs["2.21"])
    assert np.isfinite(outs["2.20"].numpy()).all()
