"""Loading and saving models: bad input becomes one `InputError` line; weights are never read.

External data stays where it is: saved next to the input, the fused model references the same
data files and nothing is copied. Saved elsewhere, each data file is copied beside the output
(or hard-linked on request) so its relative location still resolves. Copying is the default
because onnx's own loader refuses data files that are links (symlinks, or files with more than
one hard link: "potential hardlink attack") — a link would make both models unloadable there.
A data file already at the output's side is kept when it is the same file or a byte-identical
copy (a rerun); any other file there is refused, never replaced.

Every path is checked before anything is written (`plan_outputs`), then all files are written
as one step (`write_outputs`): each to a temp file beside its target, then all renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable

import onnx
from google.protobuf.message import DecodeError

from fuse_attn.ir import contract, external_data
from fuse_attn.report import is_fuse_attn_report


class InputError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    """Every external data file the model's tensors name (in every graph and function)."""
    return list(dict.fromkeys(e.value for t in external_data.external_tensors(proto)
                              for e in t.external_data if e.key == "location"))


def check_external_data(proto: onnx.ModelProto, base_dir: str | None) -> dict[str, str]:
    """Every external data location of `proto` resolved inside `base_dir` (symlinks followed),
    a regular file holding each tensor's byte range; location -> real path. Else one InputError."""
    try:
        return external_data.check(proto, base_dir)
    except external_data.ExternalDataError as exc:
        raise InputError(str(exc)) from None


def load_external_data(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Read the weights of the model at `path` into `proto`, from inside its folder only (and
    from hard-linked data files too, which onnx's own loader refuses)."""
    try:
        external_data.load_all(proto, os.path.dirname(os.path.abspath(path)))
    except external_data.ExternalDataError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot read the external data of '{path}': {exc.strerror or exc}") from None


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"'{path}' does not exist or is not a file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise InputError(f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror or exc}") from None
    check_external_data(proto, os.path.dirname(os.path.abspath(path)))
    return proto


def validate(proto: onnx.ModelProto, where: str) -> None:
    if not proto.HasField("graph") or not proto.graph.node:
        raise InputError(f"'{where}' has an empty graph (no nodes): not an ONNX model to fuse")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise InputError(f"'{where}' imports no default ONNX opset")
    if opset < contract.MIN_OPSET:
        raise InputError(f"'{where}' uses opset {opset}, older than this pass supports "
                         f"({contract.MIN_OPSET}+); upgrade it with onnx.version_converter")


def _same_path(a: str, b: str) -> bool:
    """The same file, also through links or different spellings of the path."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _same_content(a: str, b: str, chunk: int = 1 << 20) -> bool:
    """Byte-identical files: sizes first (free), then the contents streamed side by side."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(chunk)
            if block != fb.read(chunk):
                return False
            if not block:
                return True


def check_writable_file(path: str | os.PathLike, what: str, *, not_over: dict[str, str] | None = None) -> str:
    """`path` (absolute, returned) can take a new file: it is not a folder, its folder exists and is
    writable, and it is none of the files in `not_over` (description -> path) that must survive."""
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    if os.path.isdir(path):
        raise InputError(f"{what} '{shown}' is a folder; give a file name")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"{what}'s folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{what}'s folder '{folder}' is not writable")
    for description, other in (not_over or {}).items():
        if _same_path(path, other):
            raise InputError(f"{what} '{shown}' is {description}; choose another path")
    return path


def input_files(proto: onnx.ModelProto, source_path: str | os.PathLike) -> dict[str, str]:
    """The files a run reads and must never write over (description -> path): the model and its
    external weights; for `check_writable_file(..., not_over=...)`."""
    source = os.path.abspath(os.fspath(source_path))
    files = {"the input model": source}
    for location in _external_locations(proto):
        files[f"the input's weights file '{location}'"] = os.path.join(os.path.dirname(source), location)
    return files


@dataclasses.dataclass
class OutputPlan:
    """Where one run writes, every path already checked: the model, the report (None, "-" for
    stdout, or a file) and the data files to place beside the model (source, target)."""
    model: str
    report: str | None = None
    data: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    link_external_data: bool = False


def plan_outputs(proto: onnx.ModelProto, source_path: str | os.PathLike | None, output: str | os.PathLike, *,
                 report: str | os.PathLike | None = None, in_place: bool = False,
                 link_external_data: bool = False) -> OutputPlan:
    """Check every path a run writes before anything is written.

    The model may replace the input only with `in_place`; it never replaces a weights file. The
    report is never the input, the model or a weights file, and replaces an existing file only when
    that file is an earlier fuse-attn report (or empty). A weights file the output needs beside it
    may already be there only as the same file or a byte-identical copy (an earlier run's)."""
    source = os.path.abspath(os.fspath(source_path)) if source_path is not None else None
    source_dir = os.path.dirname(source) if source else None
    # Copied from where each location really is, once checked to be inside the model's folder.
    real = check_external_data(proto, source_dir) if source_dir else {}
    locations = list(real)
    weights = {f"the input's weights file '{loc}'": os.path.join(source_dir, loc) for loc in locations}
    keep = dict(weights)
    if source and not in_place:
        keep["the input model (pass --in-place to replace it)"] = source
    target = check_writable_file(output, "output", not_over=keep)
    plan = OutputPlan(model=target, link_external_data=link_external_data)

    if source_dir and not _same_path(source_dir, os.path.dirname(target)):
        for location in locations:
            src, dst = real[location], os.path.join(os.path.dirname(target), location)
            if _same_path(dst, target):
                raise InputError(f"the output '{output}' is where its weights file '{location}' goes; "
                                 "choose another name")
            weights[f"the output's weights file '{location}'"] = dst
            if os.path.lexists(dst):
                if os.path.isfile(dst) and (_same_path(src, dst) or _same_content(src, dst)):
                    continue  # an earlier run's copy or link: reused as it is
                raise InputError(f"'{dst}' exists and is not a copy of the model's data file '{src}'; "
                                 "remove it or choose another output folder")
            plan.data.append((src, dst))

    if report is not None and os.fspath(report) != "-":
        shown = os.fspath(report)
        models = {"the input model": source} if source else {}
        models["the output model"] = target
        plan.report = check_writable_file(report, "report", not_over={**models, **weights})
        if os.path.exists(plan.report) and not is_fuse_attn_report(plan.report):
            raise InputError(f"report '{shown}' exists and is not a fuse-attn report; remove it or choose "
                             "another path")
    elif report is not None:
        plan.report = "-"
    return plan


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(target: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".fuse-attn-", suffix=".tmp", dir=os.path.dirname(target))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode of a new file
    return tmp


def write_together(writes: list[tuple[str, Callable[[str], None]]]) -> None:
    """Each (target, write) fills a temp file beside its target; then all are renamed into place
    as one step. On an error nothing staged is left behind."""
    staged: list[tuple[str, str]] = []  # (temp, target)
    target = ""
    try:
        for target, write in writes:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)  # a location like 'weights/x.bin'
            tmp = _temp_beside(target)
            staged.append((tmp, target))
            write(tmp)
        while staged:
            tmp, target = staged[0]
            os.replace(tmp, target)
            staged.pop(0)
    except OSError as exc:
        raise InputError(f"cannot write '{target}': {exc.strerror or exc}") from exc
    finally:
        for tmp, _ in staged:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def write_outputs(plan: OutputPlan, model: onnx.ModelProto, report_json: str | None = None) -> None:
    """Write everything `plan` names as one step (`write_together`). A report of "-" is not a
    file (the caller prints it)."""
    def data_file(src: str) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            if plan.link_external_data:
                os.unlink(tmp)
                os.link(src, tmp)
            else:
                shutil.copyfile(src, tmp)
        return write

    def model_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())

    writes = [(target, data_file(src)) for src, target in plan.data] + [(plan.model, model_file)]
    if plan.report not in (None, "-"):
        writes.append((plan.report, write_text(report_json or "")))
    write_together(writes)


def save(model: onnx.ModelProto, out_path: str | os.PathLike, *, source_path: str | os.PathLike | None = None,
         link_external_data: bool = False) -> None:
    """Write `model` atomically: a temp file in the output folder, renamed into place.

    `source_path` is the model file its external data locations are relative to; when the
    output goes to another folder the data files are copied (or hard-linked) beside it."""
    plan = plan_outputs(model, source_path, out_path, in_place=True, link_external_data=link_external_data)
    write_outputs(plan, model)
