"""A model file is data, never code (issue 18).

Each test prepares a file the way an attacker would — a dim_param that is Python, external data
reached through a symlink, names that carry terminal escapes, sizes that ask for huge
allocations — and checks that fuse-attn treats it as data: nothing runs, nothing outside the
model's folder is read or copied, no escape byte reaches the terminal, and bad input is one
line with exit 2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from attention_graphs import AttnSpec, build
from fuse_attn.ir import dim_expr

REPO_PACKAGES = [Path(__file__).resolve().parents[1] / d for d in ("fuse_attn", "passes", "models")]


def cli(*args, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "fuse_attn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess, *, mentions: str = "") -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("fuse-attn: error: "), proc.stderr
    assert mentions in lines[0], lines[0]
    return lines[0]


# --- dim_params are parsed as data ----------------------------------------------------------------------------


def payload(marker: Path) -> str:
    """The issue's dim: valid Python that runs a shell command when evaluated."""
    return ("batch + 0 * [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close']"
            f"[0].__init__.__globals__['system']('touch {marker}')")


def payload_model(folder: Path, marker: Path) -> Path:
    """An attention model whose input declares `batch` and whose output declares the payload."""
    model = build(AttnSpec(heads=2, head_dim=16)).model
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = payload(marker)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "payload.onnx"
    onnx.save(model, path)
    return path


def test_the_payload_is_an_opaque_symbol(tmp_path):
    expression = dim_expr.parse(payload(tmp_path / "x"))
    assert expression.is_symbol and expression.symbols == (payload(tmp_path / "x"),)
    assert expression.evaluate({"batch": 1}) is None


def test_fuse_with_dim_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    src = payload_model(tmp_path / "m", marker)
    proc = cli(src, "-o", tmp_path / "out.onnx", "--dim", "batch=1")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    # The input's symbol was fixed; the opaque output dim is left as the name it is.
    out = onnx.load(tmp_path / "out.onnx")
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == payload(marker)


def test_compile_with_shape_runs_nothing(tmp_path):
    pytest.importorskip("torch")
    marker = tmp_path / "ran"
    src = payload_model(tmp_path / "m", marker)
    proc = cli("compile", src, "--simulate", "--shape", "x=1x16x32")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_check_with_dim_runs_nothing_in_its_workers(tmp_path):
    marker = tmp_path / "ran"
    payload_model(tmp_path / "m", marker)
    proc = cli("check", tmp_path / "m", "--dim", "batch=1", "--jobs", "1", "--json", tmp_path / "r.json")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()
    assert "payload.onnx" in proc.stdout


@pytest.mark.parametrize("text", ["a" * 200_000, "(" * 100_000 + "a" + ")" * 100_000, "a+" * 100_000 + "a",
                                  "9" * 200_000 + " + a", "-" * 200_000])
def test_absurd_dims_are_opaque_symbols_at_once(text):
    start = time.perf_counter()
    expression = dim_expr.parse(text)
    assert expression.is_symbol and expression.symbols == (text,)
    assert time.perf_counter() - start < 1.0


def test_the_parser_takes_arithmetic_only():
    binding = {"a": 7, "b": 2, "past": 0, "seq": 10}
    assert dim_expr.parse("(a + b) * 3 - a // b % 2").evaluate(binding) == 26
    assert dim_expr.parse("past + seq").symbols == ("past", "seq")
    assert dim_expr.parse("past + seq").substitute({"past": 0}) == "0 + seq"
    assert dim_expr.parse("a // past").evaluate(binding) is None  # no size, no ZeroDivisionError
    assert dim_expr.parse("a" + " * a" * 40).evaluate(binding) is None  # past int64
    for text in ("a / b", "a ** b", "-a", "f(a)", "a.b", "a[0]", "a if b else 1", "3", "2 * 4", "lambda: 1"):
        assert dim_expr.parse(text).is_symbol, text


def test_an_expression_dim_with_no_size_is_one_error_line(tmp_path):
    model = build(AttnSpec(heads=2, head_dim=16)).model
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "4 // batch"
    onnx.save(model, tmp_path / "m.onnx")
    one_error_line(cli(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--dim", "batch=0"), mentions="4 // batch")
    assert not (tmp_path / "out.onnx").exists()


def test_no_eval_or_exec_in_the_package():
    """No model text can be run: the package calls no eval, exec or compile() at all."""
    called = re.compile(r"(?<![\w.])(eval|exec|compile)\s*\(|__import__\s*\(")
    found = [f"{path}:{n}: {line.strip()}" for package in REPO_PACKAGES for path in sorted(package.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if called.search(line.split("#")[0])]
    assert not found, found


# --- external data only from inside the model's folder ----------------------------------------------------------


DATA = "ext.onnx.data"


def external_model(folder: Path) -> Path:
    """An attention model with every tensor in one data file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ext.onnx"
    onnx.save(build(AttnSpec(heads=2, head_dim=16)).model, path, save_as_external_data=True,
              all_tensors_to_one_file=True, location=DATA, size_threshold=0)
    return path


def edit_external(path: Path, edit) -> None:
    """Apply `edit(tensor_info: dict, tensor)` to each external tensor's key/value pairs and save."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        edit(info, tensor)
        del tensor.external_data[:]
        for key, value in info.items():
            tensor.external_data.add(key=key, value=value)
    onnx.save(model, path)


@pytest.fixture
def symlinked_secret(tmp_path) -> tuple[Path, Path]:
    """The model's data file moved outside its folder (a private file of the same size) and a
    symlink to it left in its place: the model and the secret's path."""
    src = external_model(tmp_path / "m")
    secret = tmp_path / "private" / "id_rsa"
    secret.parent.mkdir()
    os.replace(src.parent / DATA, secret)
    os.symlink(secret, src.parent / DATA)
    return src, secret


def test_fuse_refuses_a_data_file_symlinked_outside(symlinked_secret, tmp_path):
    src, secret = symlinked_secret
    out = tmp_path / "published" / "fused.onnx"
    out.parent.mkdir()
    one_error_line(cli(src, "-o", out), mentions="resolves outside the model's folder")
    assert os.listdir(out.parent) == []
    one_error_line(cli(src, "-o", out, "--link-external-data"), mentions="outside")
    one_error_line(cli(src, "-o", src.parent / "fused.onnx", "--verify"), mentions="outside")
    assert sorted(os.listdir(out.parent)) == [] and sorted(os.listdir(src.parent)) == ["ext.onnx", DATA]


def test_fuse_refuses_a_folder_symlinked_outside(tmp_path):
    src = external_model(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    os.replace(src.parent / DATA, tmp_path / "elsewhere" / DATA)
    os.symlink(tmp_path / "elsewhere", src.parent / "weights")
    edit_external(src, lambda info, _: info.update(location=f"weights/{DATA}"))
    one_error_line(cli(src, "-o", tmp_path / "out.onnx"), mentions="outside")
    assert not (tmp_path / "out.onnx").exists()


def test_a_symlink_that_stays_inside_is_read(tmp_path):
    src = external_model(tmp_path / "m")
    os.replace(src.parent / DATA, src.parent / "real.data")
    os.symlink("real.data", src.parent / DATA)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    proc = cli(src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert not (out.parent / DATA).is_symlink()  # a copy of the bytes, as for any data file
    assert (out.parent / DATA).read_bytes() == (src.parent / "real.data").read_bytes()


def test_check_and_compile_refuse_a_data_file_symlinked_outside(symlinked_secret, tmp_path):
    src, secret = symlinked_secret
    proc = cli("check", src.parent, "--jobs", "1", "--json", tmp_path / "r.json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "resolves outside the model's folder" in proc.stdout
    pytest.importorskip("torch")
    one_error_line(cli("compile", src, "--simulate", "--shape", "x=1x16x32"), mentions="outside")


def test_a_data_location_that_is_not_a_regular_file_is_refused(tmp_path):
    src = external_model(tmp_path / "m")
    os.unlink(src.parent / DATA)
    os.mkfifo(src.parent / DATA)  # a read would block forever
    one_error_line(cli(src, "-o", tmp_path / "out.onnx"), mentions="not a regular file")
    os.unlink(src.parent / DATA)
    os.mkdir(src.parent / DATA)
    one_error_line(cli(src, "-o", tmp_path / "out.onnx"), mentions="not a regular file")
    assert not (tmp_path / "out.onnx").exists()


def _first_only(edit):
    done = []

    def apply(info, tensor):
        if not done:
            edit(info, tensor)
            done.append(tensor.name)
    return apply


@pytest.mark.parametrize("edit, mentions", [
    (lambda info, t: info.update(offset=str(10**12)), "truncated"),
    (lambda info, t: info.update(offset="-8"), "not a byte count"),
    (lambda info, t: info.update(length="12abc"), "not a byte count"),
    (lambda info, t: info.update(length="9" * 5000), "not a byte count"),
    (lambda info, t: info.update(length="4"), "declares"),
    (lambda info, t: info.update(offset="0"), "overlap"),
])
def test_byte_ranges_are_checked_against_the_file(tmp_path, edit, mentions):
    src = external_model(tmp_path / "m")
    model = onnx.load(src, load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}.get("offset", 0)) for t in model.graph.initializer]
    second = sorted(offsets)[1]  # the overlap case moves the tensor at this offset onto the first
    edit_external(src, _first_only(edit) if mentions != "overlap" else
                  lambda info, t: int(info.get("offset", 0)) == second and edit(info, t))
    one_error_line(cli(src, "-o", tmp_path / "out.onnx"), mentions=mentions)
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_inside_a_subgraph_is_checked_too(tmp_path):
    """An If branch's constant that names a file outside the folder (it was not looked at)."""
    from onnx import TensorProto, helper

    (tmp_path / "m").mkdir()
    (tmp_path / "secret").write_bytes(b"\0" * 64)
    leak = TensorProto(name="leak", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
    leak.external_data.add(key="location", value=str(tmp_path / "secret"))
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=leak)], "b", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [16])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m" / "if.onnx")
    (tmp_path / "out").mkdir()
    one_error_line(cli(tmp_path / "m" / "if.onnx", "-o", tmp_path / "out" / "if.onnx"), mentions="outside")
    assert os.listdir(tmp_path / "out") == []


# --- names printed as data ----------------------------------------------------------------------------------------


EVIL = "evil\x1b[31mRED\nfused      Softmax 'fake' -> FlashFwd_9: heads 99"


def rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for info in (*model.graph.input, *model.graph.output):
        if info.name == old:
            info.name = new


def evil_model(folder: Path, file_name: str = "evil.onnx") -> Path:
    """One attention block whose Softmax, output and batch dim carry escape sequences and newlines."""
    model = build(AttnSpec(heads=2, head_dim=16)).model
    next(n for n in model.graph.node if n.op_type == "Softmax").name = EVIL
    rename(model, model.graph.output[0].name, EVIL + " out")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = EVIL + " batch"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / file_name)
    return folder / file_name


def assert_shown_as_data(text: str) -> None:
    assert "\x1b" not in text, text
    assert not any(line.startswith("fused      Softmax 'fake'") for line in text.splitlines()), text


def test_fuse_prints_names_escaped_and_reports_them_exactly(tmp_path):
    src = evil_model(tmp_path / "m")
    proc = cli(src, "-o", tmp_path / "out.onnx", "--verify", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert_shown_as_data(proc.stdout + proc.stderr)
    assert "\\x1b[31mRED\\nfused" in proc.stdout  # shown, escaped, on the block's own line
    assert sum(line.startswith("fused ") for line in proc.stdout.splitlines()) == 1
    assert any(line.startswith("verify evil\\x1b") for line in proc.stdout.splitlines()), proc.stdout
    import json

    assert json.loads((tmp_path / "r.json").read_text())["blocks"][0]["name"] == EVIL


def test_error_lines_show_names_escaped(tmp_path):
    src = evil_model(tmp_path / "m")
    line = one_error_line(cli(src, "-o", tmp_path / "out.onnx", "--dim", "nope=1"), mentions="evil\\x1b[31mRED")
    assert_shown_as_data(line)


def test_check_table_and_markdown_show_names_escaped(tmp_path):
    evil_model(tmp_path / "m", "evil\x1b[2J|row\n.onnx")
    proc = cli("check", tmp_path / "m", "--jobs", "1", "--markdown", tmp_path / "t.md", "--json", tmp_path / "r.json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    markdown = (tmp_path / "t.md").read_text()
    for text in (proc.stdout, proc.stderr, markdown):
        assert_shown_as_data(text)
    header = next(line for line in markdown.splitlines() if line.startswith("| model"))
    row = next(line for line in markdown.splitlines() if line.startswith("| evil"))
    assert row.startswith("| evil\\x1b[2J\\|row\\n.onnx |") and row.count(" | ") == header.count(" | "), row
    import json

    (result,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert result["model"] == "evil\x1b[2J|row\n.onnx" and result["blocks"][0]["name"] == EVIL


# --- sizes from the model are data, not allocations ------------------------------------------------------------


def limited_memory():
    """For the subprocess: 3 GB of address space, so that an allocation a bound misses fails
    (and is told apart by its reason) instead of exhausting the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def cli_bounded(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_ATTN_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "fuse_attn", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, preexec_fn=limited_memory)


def with_mask(model: onnx.ModelProto, nodes: list, mask: str) -> onnx.ModelProto:
    """`model` with `mask` (computed by `nodes`) added to the scores of its first Softmax."""
    from onnx import helper

    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    at = list(model.graph.node).index(softmax)
    add = helper.make_node("Add", [softmax.input[0], mask], ["scores_masked"], name="hostile_mask")
    softmax.input[0] = "scores_masked"
    for i, node in enumerate([*nodes, add]):
        model.graph.node.insert(at + i, node)
    return model


def ints(name: str, values) -> "onnx.NodeProto":
    from onnx import helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                             [len(values)], values))


def scalar(name: str, value, dtype=onnx.TensorProto.INT64) -> "onnx.NodeProto":
    from onnx import helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


def huge_constant_of_shape(shape=(1, 1, 1, 10**12)) -> list:
    """A zero bias sliced from a ConstantOfShape of `shape` (its last two axes to 16)."""
    from onnx import helper

    zero = helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])
    return [ints("big_shape", list(shape)),
            helper.make_node("ConstantOfShape", ["big_shape"], ["big"], value=zero),
            ints("starts", [0, 0]), ints("ends", [min(shape[2], 16), 16]), ints("axes", [2, 3]),
            helper.make_node("Slice", ["big", "starts", "ends", "axes"], ["mask"])]


def huge_square_constant() -> list:
    return huge_constant_of_shape((1, 1, 10**6, 10**6))


def huge_range() -> list:
    from onnx import helper

    return [scalar("r0", 0), scalar("r1", 10**10), scalar("r2", 1),
            helper.make_node("Range", ["r0", "r1", "r2"], ["r"]),
            ints("starts", [0]), ints("ends", [16]),
            helper.make_node("Slice", ["r", "starts", "ends"], ["r16"]),
            helper.make_node("Cast", ["r16"], ["rf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", ["rf", "zero_f"], ["mask"]),
            helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("z", onnx.TensorProto.FLOAT, [], [0.0]))]


@pytest.mark.parametrize("nodes", [huge_constant_of_shape, huge_range])
def test_a_mask_computed_at_a_huge_size_is_refused_before_it_is_allocated(tmp_path, nodes):
    model = with_mask(build(AttnSpec(heads=2, head_dim=16)).model, nodes(), "mask")
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli_bounded(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("not fused")]
    assert "elements, more than" in line and "MemoryError" not in line, line


def test_a_seq_square_mask_of_a_huge_declared_size_is_read_by_its_diagonals(tmp_path):
    """A (10⁶ × 10⁶) zero mask sliced to the scores: read as one value per diagonal, never whole
    (a Slice of a strip that is the same on every diagonal used to fail the whole run)."""
    model = with_mask(build(AttnSpec(heads=2, head_dim=16)).model, huge_square_constant(), "mask")
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli_bounded(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx")  # (--verify would run the model's own 4 TB)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 attention blocks fused" in proc.stdout, proc.stdout


@pytest.mark.parametrize("nodes", [huge_square_constant, huge_range])
def test_compile_refuses_to_make_a_huge_constant(tmp_path, nodes):
    pytest.importorskip("torch")
    model = with_mask(build(AttnSpec(heads=2, head_dim=16)).model, nodes(), "mask")
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli_bounded("compile", tmp_path / "m.onnx", "--simulate", "--shape", "x=1x16x32")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "cannot lower the model" in lines[0] and "elements, more than" in lines[0], lines


def test_verify_makes_no_feed_of_a_huge_declared_size(tmp_path):
    model = build(AttnSpec(heads=2, head_dim=16)).model
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**9
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli_bounded(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--verify")
    one_error_line(proc, mentions="no feed of that size")
    assert not (tmp_path / "out.onnx").exists()


# --- names and domains the pass itself owns ---------------------------------------------------------------------


def test_a_flash_fwd_function_shipped_by_the_model_is_replaced_by_the_contracts(tmp_path):
    """A model may carry a `fuse_attn.nki::FlashFwd` function of its own (here: the output is q,
    unchanged). The fused model's FlashFwd must mean what the kernel computes."""
    from onnx import helper

    from fuse_attn.ir import contract

    built = build(AttnSpec(heads=2, head_dim=16))
    model = built.model
    fake = helper.make_function(contract.DOMAIN, contract.OP_TYPE, ["q", "k", "v"], ["o"],
                                [helper.make_node("Identity", ["q"], ["o"])], [helper.make_opsetid("", 17)])
    model.functions.append(fake)
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--verify")
    assert proc.returncode == 0 and "verify" in proc.stdout and "MISMATCH" not in proc.stdout, proc.stdout + proc.stderr
    (function,) = [f for f in onnx.load(tmp_path / "out.onnx").functions if f.domain == contract.DOMAIN]
    assert function == contract.make_function(17)


def test_a_constant_whose_bytes_are_not_its_declared_size_cannot_be_read(tmp_path):
    """A mask initializer declared (1, 1, 16, 16) holding 4 bytes: the block is left alone with
    the reason, and the other work goes on (it used to end the run)."""
    mask = onnx.TensorProto(name="short_mask", data_type=onnx.TensorProto.FLOAT, dims=[1, 1, 16, 16],
                            raw_data=b"\0\0\0\0")
    model = with_mask(build(AttnSpec(heads=2, head_dim=16)).model, [], "short_mask")
    model.graph.initializer.append(mask)
    onnx.save(model, tmp_path / "m.onnx")
    proc = cli(tmp_path / "m.onnx", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("not fused")]
    assert "'short_mask' cannot be read" in line, line


def test_compile_reads_the_hard_linked_data_of_link_external_data(tmp_path):
    """`--link-external-data`'s hard links are fuse-attn's own: compile loads them (onnx's loader
    refuses a data file with more than one link)."""
    pytest.importorskip("torch")
    src = external_model(tmp_path / "m")
    out = tmp_path / "linked" / "fused.onnx"
    out.parent.mkdir()
    assert cli(src, "-o", out, "--link-external-data").returncode == 0
    assert os.stat(out.parent / DATA).st_nlink == 2
    proc = cli("compile", out, "--simulate", "--shape", "x=1x16x32")
    assert proc.returncode == 0 and "ok" in proc.stdout.splitlines()[-1], proc.stdout + proc.stderr
