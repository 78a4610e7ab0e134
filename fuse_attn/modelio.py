"""Loading and saving models: bad input becomes one `InputError` line; weights are never read.

External data stays where it is: saved next to the input, the fused model references the same
data files and nothing is copied. Saved elsewhere, each data file is copied beside the output
(or hard-linked on request) so its relative location still resolves. Copying is the default
because onnx's own loader refuses data files that are links (symlinks, or files with more than
one hard link: "potential hardlink attack") — a link would make both models unloadable there.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
from google.protobuf.message import DecodeError

from fuse_attn.ir import contract


class InputError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""


def _external_locations(proto: onnx.ModelProto) -> dict[str, int]:
    """Every external data file the model's tensors name, with the bytes they need from it."""
    needed: dict[str, int] = {}
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[location] = max(needed.get(location, 0), end)
    return needed


def _check_external_data(proto: onnx.ModelProto, base_dir: str) -> None:
    for location, end in _external_locations(proto).items():
        if os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
            raise InputError(f"external data location '{location}' points outside the model's folder")
        path = os.path.join(base_dir, location)
        if not os.path.isfile(path):
            raise InputError(f"external data file '{path}' is missing")
        if os.path.getsize(path) < end:
            raise InputError(f"external data file '{path}' is truncated ({os.path.getsize(path)} bytes, "
                             f"tensors need {end})")


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
    _check_external_data(proto, os.path.dirname(os.path.abspath(path)))
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


def _place_external_data(proto: onnx.ModelProto, source_dir: str, target_dir: str, link: bool) -> None:
    for location in _external_locations(proto):
        source = os.path.join(source_dir, location)
        target = os.path.join(target_dir, location)
        if os.path.exists(target):
            if os.path.samefile(source, target):
                continue
            raise InputError(f"'{target}' exists and is not the model's data file; choose another output folder")
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if link:
            os.link(source, target)
        else:
            shutil.copyfile(source, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model: onnx.ModelProto, out_path: str | os.PathLike, *, source_path: str | os.PathLike | None = None,
         link_external_data: bool = False) -> None:
    """Write `model` atomically: a temp file in the output folder, renamed into place.

    `source_path` is the model file its external data locations are relative to; when the
    output goes to another folder the data files are copied (or hard-linked) beside it."""
    out_path = os.path.abspath(os.fspath(out_path))
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise InputError(f"output folder '{out_dir}' does not exist")
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"output folder '{out_dir}' is not writable")
    proto = model
    if source_path is not None:
        source_dir = os.path.dirname(os.path.abspath(os.fspath(source_path)))
        if not os.path.samefile(source_dir, out_dir):
            _place_external_data(proto, source_dir, out_dir, link_external_data)
    fd, tmp = tempfile.mkstemp(prefix=".fuse-attn-", suffix=".onnx", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode of a new file
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
