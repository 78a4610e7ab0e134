"""Where `fuse-attn IN -o OUT --report R` writes (issue 10): every path is checked before anything
is written, then all files are written as one step.

The report is checked like the output: never the input, the output or a weights file, and an
existing file is replaced only when it is an earlier fuse-attn report (or empty). Runs the CLI
in-process (`fuse_attn.commands.cli.main`): the same code path as the command, without an interpreter start.
"""

from __future__ import annotations

import json
import os

import onnx
import pytest

from attention_graphs import AttnSpec, build
from fuse_attn import modelio
from fuse_attn.commands import cli


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(build(AttnSpec(heads=2, head_dim=8)).model, path)
    return path


def run(*args) -> int:
    return cli.main([str(a) for a in args])


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("fuse-attn: error: "), err
    return err[0]


def test_report_equal_to_the_input_is_refused(model, tmp_path, capsys):
    before = model.read_bytes()
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", model) == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "report" in line and "is the input model" in line
    assert model.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_report_equal_to_the_input_is_refused_with_in_place_too(model, tmp_path, capsys):
    before = model.read_bytes()
    assert run(model, "-o", model, "--in-place", "--report", model) == cli.EXIT_BAD_INPUT
    assert "is the input model" in one_error_line(capsys)
    assert model.read_bytes() == before


def test_report_equal_to_the_output_is_refused(model, tmp_path, capsys):
    out = tmp_path / "fused.onnx"
    # through another spelling of the same path
    assert run(model, "-o", out, "--report", tmp_path / "." / "fused.onnx") == cli.EXIT_BAD_INPUT
    assert "is the output model" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_report_through_a_symlink_to_the_input_is_refused(model, tmp_path, capsys):
    (tmp_path / "alias.json").symlink_to(model)
    before = model.read_bytes()
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", tmp_path / "alias.json") == cli.EXIT_BAD_INPUT
    one_error_line(capsys)
    assert model.read_bytes() == before
    assert not (tmp_path / "fused.onnx").exists()


def test_report_that_is_a_folder_leaves_nothing_written(model, tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", tmp_path / "reports") == cli.EXIT_BAD_INPUT
    assert "folder" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "reports"]
    assert os.listdir(tmp_path / "reports") == []


def test_report_over_a_file_that_is_not_a_report_is_refused(model, tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "own data"}\n')
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", notes) == cli.EXIT_BAD_INPUT
    assert "not a fuse-attn report" in one_error_line(capsys)
    assert notes.read_text() == '{"my": "own data"}\n'
    assert not (tmp_path / "fused.onnx").exists()


@pytest.mark.parametrize("earlier", ["a report", "an empty file", "a report of the unmarked format"])
def test_an_earlier_report_is_replaced(model, tmp_path, capsys, earlier):
    report = tmp_path / "report.json"
    if earlier == "a report":
        assert run(model, "-o", tmp_path / "fused.onnx", "--report", report) == cli.EXIT_OK
        report.write_text(report.read_text().replace('"seconds"', '"was_here": 1, "seconds"'))
    elif earlier == "an empty file":
        report.touch()
    else:  # what versions before the "generator" key wrote
        report.write_text(json.dumps({"model": "m", "blocks": [], "already_fused": 0, "transposes_added": 0,
                                      "assumptions": [], "seconds": 0.1, "fused": 0}, indent=2))
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", report) == cli.EXIT_OK
    data = json.loads(report.read_text())
    assert data["generator"] == "fuse-attn" and data["fused"] == 1 and "was_here" not in data


def test_a_failed_write_leaves_nothing_behind(model, tmp_path, capsys, monkeypatch):
    """All outputs are staged, then renamed together: a failure while staging the report (the
    last file) leaves neither the model nor a temp file."""
    real = modelio._temp_beside

    def failing(target):
        if target.endswith(".json"):
            raise OSError(28, "No space left on device")
        return real(target)

    monkeypatch.setattr(modelio, "_temp_beside", failing)
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", tmp_path / "r.json") == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "r.json" in line and "No space left" in line
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_paths_are_checked_before_the_pass_runs(model, tmp_path, capsys):
    """A bad report path is reported before any block line: nothing to undo, nothing misleading."""
    assert run(model, "-o", tmp_path / "fused.onnx", "--report", tmp_path / "nope" / "r.json") == cli.EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "report" in captured.err and "does not exist" in captured.err
