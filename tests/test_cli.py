"""The command's conventions (issue 10): `--version`, `python -m fuse_attn`, one error prefix for
every command, FUSE_ATTN_DEBUG=1 tracebacks, `--report -`, "nothing to verify", the JSON report's
fields, and compile's help for `--compiler-arg=--flag`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib import metadata

import onnx
import pytest
from onnx import TensorProto, helper

from attention_graphs import AttnSpec, build
from fuse_attn import InputError
from fuse_attn.commands import cli
from fuse_attn.commands.compile import build_parser as compile_parser

PREFIX = "fuse-attn: error: "


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(build(AttnSpec(heads=2, head_dim=24)).model, path)  # scale 1/sqrt(24): not a float32
    return path


@pytest.fixture
def no_attention(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "plain", [x], [y])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("FUSE_ATTN_DEBUG", raising=False)


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def python_m(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "fuse_attn", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("--version")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fuse-attn {metadata.version('fuse-attn')}"


def test_python_dash_m_runs_the_command(model, tmp_path):
    version = python_m("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"fuse-attn {metadata.version('fuse-attn')}"
    r = python_m(model.name, "-o", "fused.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 of 1 attention blocks fused" in r.stdout
    fused = onnx.load(tmp_path / "fused.onnx")
    assert [n.op_type for n in fused.graph.node].count("FlashFwd") == 1
    bad = python_m("missing.onnx", "-o", "fused2.onnx", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith(PREFIX), bad.stderr


def test_report_to_stdout_keeps_stdout_pure_json(model, tmp_path, capsys):
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", "-", "--verify") == cli.EXIT_OK
    out, err = capsys.readouterr()
    data = json.loads(out)  # all of stdout is the one JSON document
    assert data["generator"] == "fuse-attn" and data["fused"] == 1
    assert out.endswith("}\n")
    assert "1 of 1 attention blocks fused" in err and "verify" in err
    assert not (tmp_path / "-").exists()


def test_json_report_fields(model, tmp_path):
    out, report = tmp_path / "fused.onnx", tmp_path / "report.json"
    assert run(model, "-o", out, "--report", report) == cli.EXIT_OK
    text = report.read_text()
    assert text.endswith("}\n")
    data = json.loads(text)
    (block,) = data["blocks"]
    original = onnx.load(model)
    softmax = next(n for n in original.graph.node if n.op_type == "Softmax")
    assert (block["op_type"], block["name"]) == ("Softmax", softmax.name) and "block" not in block
    fused = onnx.load(out)
    flash = next(n for n in fused.graph.node if n.op_type == "FlashFwd")
    assert block["node"] == flash.name
    # the exact float the node carries: float32 1/sqrt(24), not the float64 one
    carried = helper.get_attribute_value(next(a for a in flash.attribute if a.name == "softmax_scale"))
    assert block["scale"] == carried and block["scale"] != 1 / math.sqrt(24)
    # the total of added transposes is the blocks' sum; the net change is counted on the graphs
    assert data["transposes_added"] == sum(b["transposes_added"] for b in data["blocks"])

    def transposes(m):
        return sum(n.op_type == "Transpose" for n in m.graph.node)

    assert data["transposes_net"] == transposes(fused) - transposes(original)


def test_verify_with_nothing_fused_says_so(no_attention, tmp_path, capsys):
    assert run(no_attention, "-o", tmp_path / "out.onnx", "--verify") == cli.EXIT_OK
    assert "nothing fused; nothing to verify" in capsys.readouterr().out


@pytest.mark.parametrize("argv, mentions", [
    (["missing.onnx", "-o", "out.onnx"], "does not exist"),
    (["compile", "{model}", "--shape", "x=banana", "--simulate"], "x=banana"),
    (["compile", "{model}"], "-o/--output is required"),
    (["compile", "{model}", "--target", "gpu"], "invalid choice"),
    (["zoo", "--only", "no-such-recipe-anywhere"], "no recipe matches"),
], ids=["fuse", "compile-shape", "compile-output", "compile-usage", "zoo"])
def test_one_error_prefix_for_every_command(model, capsys, no_debug, argv, mentions):
    assert run(*[a.replace("{model}", str(model)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(PREFIX) and mentions in last, err


@pytest.mark.parametrize("argv", [
    ["missing.onnx", "-o", "out.onnx"],  # an input error
    ["compile", "{model}"],  # a usage error of a subcommand
    ["zoo", "--only", "no-such-recipe-anywhere"],
], ids=["input", "compile-usage", "zoo"])
def test_debug_gives_a_traceback_on_every_error_path(model, capsys, monkeypatch, argv):
    monkeypatch.setenv("FUSE_ATTN_DEBUG", "1")
    assert run(*[a.replace("{model}", str(model)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InputError" in err
    assert err.strip().splitlines()[-1].startswith(PREFIX)


def test_debug_traceback_of_an_unexpected_error(model, tmp_path, capsys, monkeypatch):
    import fuse_attn.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the pass")

    monkeypatch.setattr(fuse_attn.pipeline, "fuse_graph", broken)
    monkeypatch.delenv("FUSE_ATTN_DEBUG", raising=False)
    assert run(model, "-o", tmp_path / "f.onnx") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "FUSE_ATTN_DEBUG=1" in err and "a bug in the pass" in err
    monkeypatch.setenv("FUSE_ATTN_DEBUG", "1")
    assert run(model, "-o", tmp_path / "f.onnx") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug in the pass" in err
    assert not (tmp_path / "f.onnx").exists()


def test_compile_help_shows_how_to_pass_a_flag():
    parser = compile_parser()
    assert "--compiler-arg=--" in " ".join(parser.format_help().split())
    # the form the help shows is parsed as one argument; without the '=' argparse refuses it
    args = parser.parse_args(["m.onnx", "--simulate", "--compiler-arg=--optlevel=1", "--compiler-arg", "O2"])
    assert args.compiler_arg == ["--optlevel=1", "O2"]
    with pytest.raises(InputError, match="expected one argument"):
        parser.parse_args(["m.onnx", "--compiler-arg", "--optlevel=1"])


def test_the_zoo_module_uses_the_same_error_line(capsys, no_debug):
    from fuse_attn.models.__main__ import main as models_main

    assert models_main(["build", "--only", "no-such-recipe-anywhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{PREFIX}no recipe matches ['no-such-recipe-anywhere']"]
