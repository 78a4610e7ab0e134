"""External data, read only from inside the model's folder.

A tensor stored as external data names a file (`location`) and a byte range (`offset`,
`length`). Those are strings from the model file, so every location is resolved — symlinks
included — before anything is read or copied, and refused when it resolves outside the model's
folder or is not a regular file; a range past the end of its file, negative, or overlapping
another tensor's is refused too. This is the rule onnx's checker and onnxruntime apply.

Hard links are not refused: they are not a way out of the folder, and `--link-external-data`
makes them (the pass reads the bytes itself, where onnx's loader would refuse such a file).
"""

from __future__ import annotations

import math
import os
import stat

import onnx
from onnx import helper


class ExternalDataError(ValueError):
    """An external data reference that is not read; the message says why, on one line."""


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield from (sparse.values, sparse.indices)
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_tensors(body)


def external_tensors(model: onnx.ModelProto):
    """Every tensor of the model stored as external data: initializers and attribute tensors of
    the main graph, of every If/Loop/Scan body, and of the model's functions."""
    tensors = [*_graph_tensors(model.graph)]
    for function in model.functions:
        for node in function.node:
            tensors += _node_tensors(node)
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _shown(text: str) -> str:
    return repr(text)[1:-1] if len(text) <= 200 else repr(text[:200])[1:-1] + "..."


def resolve(base_dir: str | None, location: str) -> str:
    """The real path of the data file `location` names, inside `base_dir` (the model's folder)."""
    if base_dir is None:
        raise ExternalDataError(f"external data '{_shown(location)}' has no model folder to be read from")
    if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/") or "\0" in location:
        raise ExternalDataError(f"external data location '{_shown(location)}' points outside the model's folder")
    folder = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([folder, path]) != folder:
        raise ExternalDataError(f"external data location '{_shown(location)}' resolves outside the model's folder "
                                f"(a symbolic link to '{_shown(path)}')")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise ExternalDataError(f"external data file '{_shown(os.path.join(base_dir, location))}' is missing") from None
    if not stat.S_ISREG(mode):
        raise ExternalDataError(f"external data location '{_shown(location)}' is not a regular file")
    return path


def _number(tensor: onnx.TensorProto, info: dict[str, str], key: str) -> int | None:
    if key not in info or info[key] == "":
        return None
    try:
        value = int(info[key])
    except ValueError:
        value = -1
    if value < 0:
        raise ExternalDataError(f"tensor '{_shown(tensor.name)}' has external data {key} "
                                f"'{_shown(info[key])}', not a byte count")
    return value


def _stored_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes the tensor's dims and dtype take, when its elements have one fixed width."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}
    if dtype.kind in "OSUV" or tensor.data_type in packed or any(d < 0 for d in tensor.dims):
        return None
    return math.prod(tensor.dims) * dtype.itemsize


def extent(base_dir: str | None, tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(real path, offset, length) of the tensor's bytes, every part checked against its file."""
    info = {e.key: e.value for e in tensor.external_data}
    path = resolve(base_dir, info.get("location", ""))
    offset = _number(tensor, info, "offset") or 0
    length = _number(tensor, info, "length")
    size = os.path.getsize(path)
    needed = _stored_bytes(tensor)
    if length is None:  # no length: the tensor's own size, else the rest of the file (as onnx reads it)
        length = needed if needed is not None else max(size - offset, 0)
    if offset + length > size:
        raise ExternalDataError(f"external data file '{_shown(info.get('location', ''))}' is truncated "
                                f"({size} bytes, tensor '{_shown(tensor.name)}' needs {offset + length})")
    if needed is not None and needed != length:
        raise ExternalDataError(f"tensor '{_shown(tensor.name)}' declares {needed} bytes of external data, "
                                f"its range holds {length}")
    return path, offset, length


def check(model: onnx.ModelProto, base_dir: str | None) -> dict[str, str]:
    """Check every external data reference of `model`; returns each location's real path.
    Two tensors whose byte ranges in one file overlap are refused."""
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    paths: dict[str, str] = {}
    for tensor in external_tensors(model):
        path, offset, length = extent(base_dir, tensor)
        location = next(e.value for e in tensor.external_data if e.key == "location")
        paths[location] = path
        if length:
            ranges.setdefault(path, []).append((offset, offset + length, tensor.name))
    for path, spans in ranges.items():
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise ExternalDataError(f"tensors '{_shown(first)}' and '{_shown(second)}' overlap in external "
                                        f"data file '{_shown(os.path.basename(path))}'")
    return paths


def read(base_dir: str | None, tensor: onnx.TensorProto) -> bytes:
    """The tensor's bytes, from inside the model's folder."""
    path, offset, length = extent(base_dir, tensor)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ExternalDataError(f"the external data of '{_shown(tensor.name)}' is truncated")
    return data


def load_all(model: onnx.ModelProto, base_dir: str | None) -> None:
    """Read every external tensor's bytes into `model` (in place), each checked as `read` does."""
    for tensor in external_tensors(model):
        data = read(base_dir, tensor)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        tensor.raw_data = data
