"""`fuse-attn check DIR_OR_FILES...` (issue 10): a regression run over the user's own models.

The command runs for real in a subprocess over folders of small models built with
`attention_graphs`. One model is truncated; one kills its worker with SIGSEGV and one hangs: those
two come from a `sitecustomize` put on the workers' PYTHONPATH by the test (an audit hook that
fires when the worker opens that file — a native crash or a hang inside onnx/onnxruntime, as
seen from the parent). Nothing in fuse_attn knows about it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from attention_graphs import AttnSpec, build, mutate_flashfwd
from exporter_graphs import kv_cache_decoder
from fuse_attn import pipeline
from fuse_attn.commands import check, check_worker, cli
from fuse_attn.commands.check import to_row
from fuse_attn.commands.coverage import MODEL_COLUMNS, ZOO_COLUMNS, render_markdown
from fuse_attn.commands.fuse_options import as_argv, fuse_options
from fuse_attn.pipeline import FuseOptions

CAUSAL_2 = AttnSpec(blocks=2, heads=2, head_dim=8)  # two blocks, both fuse
GQA = AttnSpec(heads=4, kv_heads=2, head_dim=8, mask="none", seq=512)  # one block, fuses
WINDOW = AttnSpec(heads=2, head_dim=8, mask="sliding_window")  # one block, left alone

HOSTILE_SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys, time

    def _hostile(event, args):
        if event != "open" or not isinstance(args[0], str):
            return
        name = os.path.basename(args[0])
        if name == "crash.onnx":
            os.kill(os.getpid(), signal.SIGSEGV)
        if name == "hang.onnx":
            time.sleep(3600)

    sys.addaudithook(_hostile)
""")


def save(spec: AttnSpec, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(spec).model, path, **kwargs)
    return path


def run_check(*args, hostile: Path | None = None, cwd: Path | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    if hostile is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(hostile), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "fuse_attn", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{model: its cells} from the Markdown table on stdout."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| model "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "sitecustomize.py").write_text(HOSTILE_SITECUSTOMIZE)
    return folder


@pytest.fixture(scope="module")
def user_zoo(tmp_path_factory) -> Path:
    """A user's zoo: nested folders, external data, a model left alone, a broken and a crashing one."""
    zoo = tmp_path_factory.mktemp("zoo")
    save(CAUSAL_2, zoo / "decoders" / "causal.onnx")
    save(GQA, zoo / "encoders" / "gqa.onnx")
    save(WINDOW, zoo / "window.onnx")
    save(AttnSpec(heads=2, head_dim=16), zoo / "external" / "model.onnx", save_as_external_data=True,
         all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    good = (zoo / "window.onnx").read_bytes()
    (zoo / "broken.onnx").write_bytes(good[: len(good) // 2])
    (zoo / "crash.onnx").write_bytes(good)
    (zoo / "notes.txt").write_text("not a model")
    return zoo


@pytest.fixture(scope="module")
def zoo_run(user_zoo, hostile, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    before = listing(user_zoo)
    proc = run_check(user_zoo, "--jobs", "2", "--json", out / "results.json", "--markdown", out / "table.md",
                     hostile=hostile)
    return proc, out, before


def test_check_reports_every_model_and_fails_for_the_broken_ones(zoo_run, user_zoo):
    proc, _, _ = zoo_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr  # not a terminal: no progress bar, no chatter
    rows = table_rows(proc.stdout)
    assert set(rows) == {"decoders/causal.onnx", "encoders/gqa.onnx", "window.onnx", "external/model.onnx",
                         "broken.onnx", "crash.onnx"}
    header = [c.header for c in MODEL_COLUMNS]
    cell = {name: dict(zip(header, cells)) for name, cells in rows.items()}
    assert (cell["decoders/causal.onnx"]["blocks found"], cell["decoders/causal.onnx"]["fused"]) == ("2", "2")
    assert (cell["encoders/gqa.onnx"]["fused"], cell["external/model.onnx"]["fused"]) == ("1", "1")
    assert (cell["window.onnx"]["blocks found"], cell["window.onnx"]["fused"]) == ("1", "0")
    for name in ("decoders/causal.onnx", "encoders/gqa.onnx", "window.onnx", "external/model.onnx"):
        assert cell[name]["ok"] == "✅", (name, cell[name])
    assert cell["broken.onnx"]["ok"] == "❌ error"
    assert cell["crash.onnx"]["ok"] == "❌ crashed"
    assert "4/6 models ok; 4 of 5 blocks found fused." in proc.stdout
    assert "**crash.onnx**: the worker process killed by SIGSEGV" in proc.stdout
    assert "**broken.onnx**:" in proc.stdout and "not a readable ONNX model" in proc.stdout
    assert "sliding window" in proc.stdout  # the not-fused reason, listed below the table


def test_check_writes_nothing_next_to_the_models(zoo_run, user_zoo):
    _, _, before = zoo_run
    assert listing(user_zoo) == before


def test_check_json_and_markdown(zoo_run):
    proc, out, _ = zoo_run
    text = (out / "results.json").read_text()
    assert text.endswith("}\n")
    data = json.loads(text)
    assert data["format"] == "fuse-attn check results" and data["ok"] is False
    models = {m["model"]: m for m in data["models"]}
    assert list(models) == sorted(models)  # in the table's order: folder walk, sorted
    causal = models["decoders/causal.onnx"]
    assert (causal["status"], causal["ok"], causal["found"], causal["fused"]) == ("ok", True, 2, 2)
    assert causal["max_err"] <= min(o["tolerance"] for o in causal["outputs"])
    assert [b["fused"] for b in causal["blocks"]] == [True, True]
    assert models["window.onnx"]["not_fused"] and "window" in models["window.onnx"]["not_fused"][0]
    assert models["window.onnx"]["max_err"] is None  # nothing fused, nothing to compare
    assert models["external/model.onnx"]["outputs"][0]["ok"] is True
    assert (models["crash.onnx"]["status"], models["crash.onnx"]["ok"]) == ("crashed", False)
    assert models["broken.onnx"]["status"] == "error" and models["broken.onnx"]["fused"] is None
    assert (out / "table.md").read_text() == proc.stdout


def test_progress_bar_only_on_a_terminal(tmp_path):
    """stderr a terminal (a pty here): a tqdm bar counts the models; not a terminal: silence
    (test_check_reports_every_model_and_fails_for_the_broken_ones)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import select
    import struct
    import termios

    save(WINDOW, tmp_path / "zoo" / "one.onnx")
    save(CAUSAL_2, tmp_path / "zoo" / "two.onnx")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fuse_attn", "check", str(tmp_path / "zoo")],
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    terminal = b""
    while True:  # read until the pty's other end closes (EIO): what is written before exit is never lost
        ready, _, _ = select.select([master], [], [], 0.2)
        if not ready:
            if proc.poll() is not None and not select.select([master], [], [], 1.0)[0]:
                break  # exited, and nothing more arrives
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the pty's other end closed: the process is done
            break
        if not chunk:
            break
        terminal += chunk
    stdout = proc.communicate(timeout=600)[0].decode()
    os.close(master)
    assert proc.returncode == 0, stdout
    # the bar counts over the 2 models (which counts it draws depends on timing: tqdm redraws at most every 0.1 s)
    assert b"checking models" in terminal and b"/2 [" in terminal, terminal
    assert "checking models" not in stdout and set(table_rows(stdout)) == {"one.onnx", "two.onnx"}


def test_a_hanging_model_times_out_alone(tmp_path, hostile):
    save(CAUSAL_2, tmp_path / "zoo" / "hang.onnx")
    save(WINDOW, tmp_path / "zoo" / "fine.onnx")
    start = time.monotonic()
    proc = run_check(tmp_path / "zoo", "--timeout", "20", "--json", tmp_path / "r.json", hostile=hostile)
    assert time.monotonic() - start < 120
    assert proc.returncode == 1, proc.stdout + proc.stderr
    models = {m["model"]: m for m in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert models["hang.onnx"]["status"] == "timeout"
    assert models["hang.onnx"]["problems"] == ["timed out after 20 s (--timeout)"]
    assert models["fine.onnx"]["status"] == "ok"
    assert table_rows(proc.stdout)["hang.onnx"][-1] == "❌ timeout"


def test_baseline_catches_exporter_drift(tmp_path):
    zoo = tmp_path / "zoo"
    save(CAUSAL_2, zoo / "a.onnx")
    save(CAUSAL_2, zoo / "b.onnx")
    save(GQA, zoo / "c.onnx")
    save(WINDOW, zoo / "d.onnx")
    base = tmp_path / "base.json"

    first = run_check(zoo, "--json", base)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4/4 models ok; 5 of 6 blocks found fused." in first.stdout

    same = run_check(zoo, "--baseline", base, "--json", tmp_path / "same.json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"Nothing worse than the baseline '{base}'." in same.stdout
    assert table_rows(same.stdout)["a.onnx"][5] == "2 of 2"  # the baseline column, beside fused
    assert json.loads((tmp_path / "same.json").read_text())["regressions"] == []

    # The exporter changed: b now comes out with a window mask (not fused), a is unreadable, c is gone.
    save(WINDOW, zoo / "b.onnx")
    data = (zoo / "a.onnx").read_bytes()
    (zoo / "a.onnx").write_bytes(data[: len(data) // 3])
    (zoo / "c.onnx").unlink()
    save(GQA, zoo / "e.onnx")  # new: not a regression
    drift = run_check(zoo, "--baseline", base, "--json", tmp_path / "same.json")  # replaces its own file
    assert drift.returncode == 1, drift.stdout + drift.stderr
    found = json.loads((tmp_path / "same.json").read_text())["regressions"]
    assert found == ["a.onnx: failing now (error), ok in the baseline", "b.onnx: 0 blocks fused, the baseline 2",
                     "c.onnx: in the baseline, missing from this run"]
    for line in found:
        assert f"- {line}" in drift.stdout
    assert table_rows(drift.stdout)["e.onnx"][5] == "new"


def test_baseline_fewer_fused_alone_fails(tmp_path):
    """Every model ok, yet one fuses fewer blocks than the baseline: exit 1."""
    save(CAUSAL_2, tmp_path / "m.onnx")
    baseline = {"format": "fuse-attn check results", "version": 1,
                "models": [{"model": "m.onnx", "status": "ok", "ok": True, "found": 3, "fused": 3}]}
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    proc = run_check("m.onnx", "--baseline", "base.json", cwd=tmp_path)  # a file is named as given
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "- m.onnx: 2 blocks fused, the baseline 3" in proc.stdout
    assert "1/1 models ok" in proc.stdout


# -- bad usage: one line, exit 2, nothing run or written --------------------------------------------

def test_missing_path_is_one_line(tmp_path):
    proc = run_check(tmp_path / "nowhere")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"fuse-attn: error: '{tmp_path / 'nowhere'}' does not exist"]


def _main_error(capsys, *argv) -> str:
    assert cli.main(["check", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuse-attn: error: "), captured.err
    return lines[0]


def test_bad_usage(tmp_path, capsys):
    model = save(WINDOW, tmp_path / "m.onnx")
    original = model.read_bytes()
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.json").write_text("{}")
    (tmp_path / "junk.json").write_text("not json")
    assert "no .onnx models found" in _main_error(capsys, tmp_path / "empty")
    assert "is the model being checked" in _main_error(capsys, tmp_path, "--json", model)
    assert "is the model being checked" in _main_error(capsys, model, "--markdown", model)
    assert "does not exist" in _main_error(capsys, model, "--json", tmp_path / "no" / "r.json")
    (tmp_path / "notes.md").write_text("# my notes\n")
    assert "exists and is not a table" in _main_error(capsys, model, "--markdown", tmp_path / "notes.md")
    assert "exists and is not a 'fuse-attn check --json' file" in _main_error(capsys, model, "--json",
                                                                             tmp_path / "text.json")
    assert "is a folder" in _main_error(capsys, model, "--markdown", tmp_path / "empty")
    assert "same file" in _main_error(capsys, model, "--json", tmp_path / "r", "--markdown", tmp_path / "r")
    assert "not JSON" in _main_error(capsys, model, "--baseline", tmp_path / "junk.json")
    assert "not written by 'fuse-attn check --json'" in _main_error(capsys, model, "--baseline", tmp_path / "text.json")
    assert "cannot read the baseline" in _main_error(capsys, model, "--baseline", tmp_path / "none.json")
    assert "--jobs" in _main_error(capsys, model, "--jobs", "0")
    assert model.read_bytes() == original
    assert (tmp_path / "notes.md").read_text() == "# my notes\n" and (tmp_path / "text.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["empty", "junk.json", "m.onnx", "notes.md", "text.json"]


# -- the fuse command's options, passed to every worker ---------------------------------------------

def test_dim_fuses_a_kv_cache_decoder_and_leaves_other_models_alone(tmp_path):
    """--dim past_sequence_length=0 makes the KV-cache decoder's prefill fuse (refused as exported);
    a model without that symbol is checked as it is; a --shape no model has is a note."""
    onnx.save(kv_cache_decoder(), tmp_path / "decoder.onnx")
    save(CAUSAL_2, tmp_path / "causal.onnx")
    as_exported = check_worker.check_model(str(tmp_path / "decoder.onnx"), FuseOptions(assume_no_padding=True))
    assert as_exported["status"] == "ok" and as_exported["fused"] == 0 and as_exported["specialized"] == []

    proc = run_check(tmp_path, "--jobs", "2", "--dim", "past_sequence_length=0", "--assume-no-padding",
                     "--shape", "past_key_values.9.key=1x4x0x16", "--json", tmp_path / "r.json")
    assert proc.stderr.splitlines() == ["fuse-attn check: note: --shape past_key_values.9.key=1x4x0x16 fixed no model"]
    results = {m["model"]: m for m in json.loads((tmp_path / "r.json").read_text())["models"]}
    decoder, causal = results["decoder.onnx"], results["causal.onnx"]
    assert (decoder["found"], decoder["fused"]) == (2, 2), decoder
    assert decoder["specialized"] == ["past_sequence_length = 0"]
    # Verified against the original at the specialized shapes: every output, past and present,
    # with attention_mask all ones and padded (the mask rides in the key-bias column).
    assert decoder["ok"] and len(decoder["outputs"]) == 5 and all(o["ok"] for o in decoder["outputs"])
    assert [f["feed"] for f in decoder["feeds"]] == ["all-ones", "right", "left", "random", "tiles"]
    assert all(f["ok"] and len(f["outputs"]) == 5 for f in decoder["feeds"]), decoder["feeds"]
    assert decoder["max_err"] <= decoder["outputs"][0]["tolerance"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert causal["ok"] and causal["fused"] == 2 and causal["specialized"] == []


def test_a_shape_a_model_cannot_take_is_that_models_error(tmp_path):
    """--shape input_ids=1x8x3 has the wrong rank for the decoder: its row is an error, the run goes
    on for the others (which have no input_ids), and the exit code is 1."""
    onnx.save(kv_cache_decoder(layers=1), tmp_path / "decoder.onnx")
    save(WINDOW, tmp_path / "window.onnx")
    proc = run_check(tmp_path, "--jobs", "2", "--shape", "input_ids=1x8x3", "--json", tmp_path / "r.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = {m["model"]: m for m in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert results["decoder.onnx"]["status"] == "error"
    assert results["decoder.onnx"]["problems"] == ["--shape input_ids: the input has rank 2, got 3 dims (1, 8, 3)"]
    assert results["window.onnx"]["ok"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, mentions", [
    (["--dim", "past_sequence_length=-1"], "--dim 'past_sequence_length=-1': expected SYMBOL=N with N >= 0"),
    (["--dim", "past_sequence_length"], "--dim 'past_sequence_length'"),
    (["--shape", "input_ids=1xa"], "--shape 'input_ids=1xa': expected NAME=DxDx..."),
])
def test_a_bad_shape_or_dim_is_one_line_before_any_worker(tmp_path, capsys, monkeypatch, argv, mentions):
    model = save(WINDOW, tmp_path / "m.onnx")

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(check, "run_one", no_worker)
    assert mentions in _main_error(capsys, model, *argv, "--json", tmp_path / "r.json")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_check_and_fuse_define_the_fuse_options_once():
    """`check` accepts the fuse command's options, with the same parsing, and hands them to the
    worker as the same command-line arguments."""
    from fuse_attn.commands.check import _parser as check_parser
    from fuse_attn.commands.cli import _parser as fuse_parser

    argv = ["--shape", "input_ids=1x0", "--dim", "s=3", "--assume-no-padding", "--freeze-initializer-inputs"]
    fused = fuse_options(fuse_parser().parse_args(["m.onnx", "-o", "f.onnx", *argv]))
    checked = fuse_options(check_parser().parse_args(["m.onnx", *argv]))
    assert fused == checked == FuseOptions(True, {"input_ids": (1, 0)}, {"s": 3}, True)
    assert fuse_options(check_parser().parse_args(["m.onnx", *as_argv(checked)])) == checked


# -- one model, in process ---------------------------------------------------------------------------

def test_a_wrong_rewrite_is_reported_wrong(tmp_path, monkeypatch):
    """The worker holds the fused model to the original: a FlashFwd with a wrong scale fails."""
    path = save(CAUSAL_2, tmp_path / "m.onnx")
    real_fuse_graph = pipeline.fuse_graph

    def fuse_with_wrong_scale(graph, **kwargs):
        report = real_fuse_graph(graph, **kwargs)
        graph.model.CopyFrom(mutate_flashfwd(graph.model, scale_factor=0.5))
        return report

    monkeypatch.setattr(pipeline, "fuse_graph", fuse_with_wrong_scale)
    result = check_worker.check_model(str(path))
    assert result["status"] == "wrong" and result["fused"] == 2
    assert result["max_err"] > result["outputs"][0]["tolerance"]
    assert "MISMATCH" in result["problems"][0]
    row = to_row({"model": "m.onnx", "path": str(path), "ok": False, **result})
    assert "| m.onnx |" in render_markdown([row], columns=MODEL_COLUMNS) and "❌ wrong" in render_markdown([row], columns=MODEL_COLUMNS)


def test_a_wrong_rewrite_of_a_specialized_model_is_reported_wrong(tmp_path, monkeypatch):
    """Verification of a --dim model feeds both models at the specialized shapes (an empty past):
    a FlashFwd that drops the causal mask fails there."""
    onnx.save(kv_cache_decoder(layers=1), tmp_path / "decoder.onnx")
    options = FuseOptions(assume_no_padding=True, dims={"past_sequence_length": 0})
    assert check_worker.check_model(str(tmp_path / "decoder.onnx"), options)["status"] == "ok"
    real_fuse_graph = pipeline.fuse_graph

    def fuse_without_causal(graph, **kwargs):
        report = real_fuse_graph(graph, **kwargs)
        graph.model.CopyFrom(mutate_flashfwd(graph.model, flip_causal=True))
        return report

    monkeypatch.setattr(pipeline, "fuse_graph", fuse_without_causal)
    result = check_worker.check_model(str(tmp_path / "decoder.onnx"), options)
    assert result["status"] == "wrong" and result["fused"] == 1, result
    assert not result["feeds"][0]["ok"]
    assert result["specialized"] == ["past_sequence_length = 0"]


def test_a_pass_that_raises_is_this_models_error_with_what_was_specialized(tmp_path, monkeypatch):
    """The pass's own exception is one problem line of this model; the dims fixed before it ran
    are still reported."""
    onnx.save(kv_cache_decoder(layers=1), tmp_path / "decoder.onnx")

    def broken_pass(graph, **kwargs):
        raise RuntimeError("pass broke\nsecond line")

    monkeypatch.setattr(pipeline, "fuse_graph", broken_pass)
    result = check_worker.check_model(str(tmp_path / "decoder.onnx"),
                                      FuseOptions(assume_no_padding=True, dims={"past_sequence_length": 0}))
    assert result["status"] == "error" and result["problems"] == ["fuse raised RuntimeError: pass broke"]
    assert result["specialized"] == ["past_sequence_length = 0"] and result["fused"] is None


def test_the_zoo_table_is_the_one_in_coverage_md():
    """The zoo's table and check's come from one renderer; the zoo's columns are unchanged."""
    import fuse_attn.models

    coverage = Path(fuse_attn.models.__file__).with_name("COVERAGE.md").read_text().splitlines()
    header = render_markdown([], columns=ZOO_COLUMNS).splitlines()[:2]
    start = coverage.index(header[0])
    assert coverage[start + 1] == header[1]
    assert [c.header for c in MODEL_COLUMNS] == [c.header for c in ZOO_COLUMNS
                                                  if c.header not in ("family", "attn", "expected fused", "kernel can run")]


def test_verify_reads_external_data_without_writing_beside_it(tmp_path, monkeypatch):
    """`--verify` and check run onnxruntime from memory, with external data resolved against the
    model's folder: no file is created there (it may be read-only, or watched by a build)."""
    from fuse_attn import fuse, verify

    path = save(AttnSpec(heads=2, head_dim=16), tmp_path / "model.onnx", save_as_external_data=True,
                all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    original = onnx.load(path, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in original.graph.initializer)
    fused, report = fuse(path)
    assert report.fused == 1
    created = []
    real_open = os.open

    def recording_open(file, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            created.append(file)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    checks = verify.compare(original, fused, verify.random_inputs(original), str(tmp_path))
    assert [c.ok for c in checks] == [True]
    assert created == []
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
