"""External data: the fused model points at the original weights, which the pass never reads.

A small LLaMA-shaped model (benchmarks/llama_graph.py: the dynamo export's structure, 2 layers)
with every initializer over 256 bytes in `model.onnx.data`, fused through the CLI as a user would.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from llama_graph import LlamaShape, build_llama  # noqa: E402

SHAPE = LlamaShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=100, seq=512)
LAYERS = SHAPE.layers


def _cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "fuse-attn")
    if os.path.isfile(exe):
        return [exe]
    exe = shutil.which("fuse-attn")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from fuse_attn.commands.cli import main; sys.exit(main())"]


def run_cli(*args: str, cwd: str | os.PathLike) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FUSE_ATTN_DEBUG", None)
    return subprocess.run(_cli() + list(args), cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def run_ort(path: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def external_locations(path) -> set[str]:
    m = onnx.load(os.fspath(path), load_external_data=False)
    locs = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locs.add({e.key: e.value for e in t.external_data}["location"])
    return locs


def flash_count(path) -> int:
    m = onnx.load(os.fspath(path), load_external_data=False)
    return sum(n.op_type == "FlashFwd" for n in m.graph.node)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The source model, its reference output, and a pristine copy to clone per test."""
    d = tmp_path_factory.mktemp("src")
    info = build_llama(d / "model.onnx", SHAPE, weights="random", seed=3)
    ids = np.random.default_rng(0).integers(0, SHAPE.vocab, (1, SHAPE.seq)).astype(np.int64)
    return {"dir": d, "info": info, "ids": ids, "ref": run_ort(d / "model.onnx", ids),
            "data_sha": sha(d / "model.onnx.data")}


@pytest.fixture
def model(built, tmp_path):
    """A fresh copy of the model and its data file in tmp_path/'in'."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(built["dir"] / name, src / name)
    return src / "model.onnx"


def test_source_model_really_uses_external_data(built):
    info = built["info"]
    assert info["data_bytes"] > 20 * info["graph_bytes"]
    assert external_locations(built["dir"] / "model.onnx") == {"model.onnx.data"}


def test_fused_next_to_input_references_the_same_weights(built, model):
    out = model.parent / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), cwd=model.parent)
    assert r.returncode == 0, r.stderr
    assert flash_count(out) == LAYERS
    # The weights stay in the one data file: nothing inlined, nothing rewritten, nothing new.
    assert external_locations(out) == {"model.onnx.data"}
    assert os.path.getsize(out) < built["info"]["graph_bytes"] * 2
    assert sha(model.parent / "model.onnx.data") == built["data_sha"]
    assert sorted(os.listdir(model.parent)) == ["fused.onnx", "model.onnx", "model.onnx.data"]
    np.testing.assert_allclose(run_ort(out, built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)


def test_output_file_is_readable_like_any_other_new_file(model, tmp_path):
    out = model.parent / "fused.onnx"
    umask = os.umask(0o022)
    try:
        r = run_cli(str(model), "-o", str(out), cwd=model.parent)
    finally:
        os.umask(umask)
    assert r.returncode == 0, r.stderr
    # written atomically through a temp file, but with the usual mode, not mkstemp's 0600
    assert os.stat(out).st_mode & 0o777 == 0o644


def test_missing_data_file_is_one_line_and_exit_2(model):
    os.unlink(model.parent / "model.onnx.data")
    out = model.parent / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), cwd=model.parent)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "model.onnx.data" in lines[0] and "missing" in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert sorted(os.listdir(model.parent)) == ["model.onnx"]  # no temp file left behind


def test_truncated_data_file_is_one_line_and_exit_2(model):
    data = model.parent / "model.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    out = model.parent / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), cwd=model.parent)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "truncated" in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-paths", "relative-paths"])
def test_output_in_another_folder_still_finds_the_weights(built, model, tmp_path, relative):
    out_dir = tmp_path / "elsewhere" / "deeper"
    out_dir.mkdir(parents=True)
    out = out_dir / "fused.onnx"
    if relative:  # `cd in && fuse-attn model.onnx -o ../elsewhere/deeper/fused.onnx`
        r = run_cli("model.onnx", "-o", os.path.relpath(out, model.parent), cwd=model.parent)
    else:
        r = run_cli(str(model), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert flash_count(out) == LAYERS
    (location,) = external_locations(out)
    assert not os.path.isabs(location)
    copied = out_dir / location
    assert not copied.is_symlink() and not os.path.samefile(copied, model.parent / "model.onnx.data")
    assert sha(copied) == built["data_sha"]
    np.testing.assert_allclose(run_ort(out, built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)
    # onnx's own loader refuses linked data files: both models must still load with their weights.
    onnx.load(model, load_external_data=True)
    onnx.load(out, load_external_data=True)
    # The output folder is self-contained: moving it elsewhere keeps it loadable.
    moved = tmp_path / "moved"
    shutil.move(str(out_dir), moved)
    np.testing.assert_allclose(run_ort(moved / "fused.onnx", built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)


def test_link_flag_hard_links_the_data_file(built, model, tmp_path):
    out_dir = tmp_path / "linked"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), "--link-external-data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (location,) = external_locations(out)
    linked = out_dir / location
    assert not linked.is_symlink() and os.path.samefile(linked, model.parent / "model.onnx.data")
    np.testing.assert_allclose(run_ort(out, built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)


def test_foreign_file_in_the_way_is_refused(model, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "model.onnx.data").write_bytes(b"somebody else's weights")
    out = out_dir / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.onnx.data" in lines[0], r.stderr
    assert not out.exists()
    assert (out_dir / "model.onnx.data").read_bytes() == b"somebody else's weights"


# Runs the CLI, then prints the process's peak resident memory. VmHWM belongs to the address
# space exec created, unlike ru_maxrss, which Linux carries over from the forking (pytest) process.
_PEAK_OF_CLI = """
import sys
from fuse_attn.commands.cli import main
code = main(sys.argv[1:])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(int(peak.split()[1]) // 1024, file=sys.stderr)
sys.exit(code)
"""


def test_weights_are_never_read(tmp_path):
    """1 GB of weights (a sparse file: holes read back as zeros, no disk used) fuse in a process
    whose peak memory is that of a small model: the pass reads the graph, not the weights."""
    huge = LlamaShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=2_200_000, seq=512)
    info = build_llama(tmp_path / "huge.onnx", huge, weights="zeros")
    assert info["data_bytes"] > 2**30
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _PEAK_OF_CLI, "huge.onnx", "-o", "fused.onnx", "-q"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert flash_count(tmp_path / "fused.onnx") == huge.layers
    peak_mb = int(r.stderr.strip().splitlines()[-1])
    assert peak_mb < 400, f"fusing peaked at {peak_mb} MB for a {info['data_bytes'] / 2**20:.0f} MB data file"


def _weights_not_external(fused) -> list[str]:
    """Learned weights the returned model holds in memory instead of as data-file references."""
    if isinstance(fused, onnx.ModelProto):
        return [t.name for t in fused.graph.initializer
                if t.name.startswith(("model.", "lm_head")) and t.data_location != onnx.TensorProto.EXTERNAL]
    return [v.name for v in fused.graph.initializers.values()  # onnx_ir.Model
            if v.name.startswith(("model.", "lm_head")) and type(v.const_value).__name__ != "ExternalTensor"]


def test_python_api_keeps_weights_external_and_saves_elsewhere(built, model, tmp_path):
    import fuse_attn

    fused, report = fuse_attn.fuse(str(model))
    assert report.fused == LAYERS
    assert _weights_not_external(fused) == []
    out_dir = tmp_path / "api-out"
    out_dir.mkdir()
    fuse_attn.save(fused, out_dir / "fused.onnx", source_path=model)
    assert flash_count(out_dir / "fused.onnx") == LAYERS
    np.testing.assert_allclose(run_ort(out_dir / "fused.onnx", built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)


def test_rerun_into_the_same_folder_reuses_its_own_copy(built, model, tmp_path):
    """`fuse-attn model.onnx -o out/fused.onnx` twice (a Makefile, a CI rerun): the second run
    recognises the first run's copy of the data file (same bytes) and succeeds, leaving it alone."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    first = run_cli(str(model), "-o", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    copy = out_dir / "model.onnx.data"
    before = os.stat(copy)
    second = run_cli(str(model), "-o", str(out), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    after = os.stat(copy)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert sorted(os.listdir(out_dir)) == ["fused.onnx", "model.onnx.data"]
    np.testing.assert_allclose(run_ort(out, built["ids"]), built["ref"], rtol=1e-4, atol=1e-4)


def test_rerun_after_linking_works_and_keeps_the_link(tmp_path):
    """--link-external-data gives the input's data file a second hard link, which onnx's own
    reader refuses ("potential hardlink attack"): the pass reads the constants it needs (here
    every one, the scale included, is in the data file) itself, so the same command, and any
    later run over that input, still works."""
    from attention_graphs import AttnSpec, build

    src = tmp_path / "in"
    src.mkdir()
    onnx.save(build(AttnSpec(heads=2, head_dim=16)).model, src / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    for _ in range(2):
        r = run_cli(str(src / "model.onnx"), "-o", str(out), "--link-external-data", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert flash_count(out) == 1
    assert os.path.samefile(out_dir / "model.onnx.data", src / "model.onnx.data")
    again = src / "fused-again.onnx"
    r = run_cli(str(src / "model.onnx"), "-o", str(again), cwd=src)
    assert r.returncode == 0, r.stderr
    assert flash_count(again) == 1


def test_same_size_different_bytes_is_foreign(built, model, tmp_path):
    """Same size is not enough: a data file whose bytes differ is somebody else's, left untouched,
    and the refusal comes before anything is written."""
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    size = os.path.getsize(model.parent / "model.onnx.data")
    foreign = bytearray((model.parent / "model.onnx.data").read_bytes())
    foreign[size // 2] ^= 0xFF
    (out_dir / "model.onnx.data").write_bytes(bytes(foreign))
    out = out_dir / "fused.onnx"
    r = run_cli(str(model), "-o", str(out), "--report", str(out_dir / "report.json"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""  # refused before the pass ran: no summary printed first
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.onnx.data" in lines[0], r.stderr
    assert sorted(os.listdir(out_dir)) == ["model.onnx.data"]
    assert (out_dir / "model.onnx.data").read_bytes() == bytes(foreign)


def test_output_named_like_its_own_weights_file_is_refused(model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli(str(model), "-o", str(out_dir / "model.onnx.data"), cwd=tmp_path)
    assert r.returncode == 2 and "weights" in r.stderr, r.stderr
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("what", ["-o", "--report"])
def test_the_inputs_weights_file_is_never_written(built, model, what):
    data = model.parent / "model.onnx.data"
    args = ["-o", str(data)] if what == "-o" else ["-o", str(model.parent / "f.onnx"), "--report", str(data)]
    r = run_cli(str(model), *args, cwd=model.parent)
    assert r.returncode == 2 and "weights file" in r.stderr, r.stderr
    assert sha(data) == built["data_sha"]
    assert sorted(os.listdir(model.parent)) == ["model.onnx", "model.onnx.data"]
