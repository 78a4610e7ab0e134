"""A thin view over an ONNX ModelProto's main graph: what the passes read, and the edits they make.

Why not a full IR: the pass touches a few dozen nodes per attention block, yet must handle
graphs of 100k nodes and weights of tens of GB in about the time protobuf takes to parse them.
So nothing is copied or deserialized up front: values are names with producer/consumer links,
shapes are read from the model's own value_info on demand, constants are loaded only when a
proof asks for one, and weights in external data are never touched. Edits are kept aside
(new nodes before an anchor, rewired inputs) and written back in one pass by `to_model`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fuse_attn.ir import declared_sizes, external_data

DEFAULT_DOMAINS = ("", "ai.onnx")


class Value:
    """A tensor of the main graph, by name."""

    __slots__ = ("graph", "name", "_producer", "_consumers")

    def __init__(self, graph: "Graph", name: str):
        self.graph, self.name = graph, name
        self._producer: Node | None = None
        self._consumers: list[Node] = []

    def __repr__(self) -> str:
        return f"Value({self.name!r})"

    def producer(self) -> "Node | None":
        return self._producer

    def consumers(self) -> list["Node"]:
        return list(dict.fromkeys(self._consumers))

    def is_graph_input(self) -> bool:
        """A runtime input. An initializer also listed among the inputs is a default the caller
        may replace, so it is an input too, unless the graph's overridable initializers are frozen."""
        return self.name in self.graph._input_names and (
            self.name not in self.graph._initializers or not self.graph.freeze_initializer_inputs)

    def is_overridable(self) -> bool:
        """An initializer also listed among the graph inputs (keep_initializers_as_inputs, IR < 4)."""
        return self.name in self.graph._overridable

    def is_graph_output(self) -> bool:
        return self.name in self.graph._output_names

    @property
    def type(self) -> onnx.TypeProto | None:
        return self.graph._types().get(self.name)

    @property
    def dtype(self) -> int | None:
        """The element type (onnx.TensorProto.FLOAT, ...) if the model declares it."""
        if self.name in self.graph._initializers:
            return self.graph._initializers[self.name].data_type
        const = self._constant_tensor()
        if const is not None:
            return const.data_type
        t = self.type
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
            return None
        return t.tensor_type.elem_type

    @property
    def shape(self) -> tuple[int | str | None, ...] | None:
        """Declared dims: an int, a symbol's name, or None where unknown; None if no shape."""
        if self.name in self.graph._initializers:
            return tuple(self.graph._initializers[self.name].dims)
        const = self._constant_tensor()
        if const is not None:
            return tuple(const.dims)
        t = self.type
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            elif self.is_graph_input():
                # Neither name nor value on an input: a free size of its own.
                dims.append(f"unnamed dim {len(dims)} of '{self.name}'")
            else:
                dims.append(None)
        return tuple(dims)

    # --- constants ------------------------------------------------------------------------
    def _constant_tensor(self) -> onnx.TensorProto | None:
        """The TensorProto of a Constant node's `value` (not loaded if external)."""
        node = self._producer
        if node is None or node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            return None
        for attr in node.proto.attribute:
            if attr.name == "value":
                return attr.t
        return None

    def is_constant(self) -> bool:
        if self.name in self.graph._initializers:
            return self.name not in self.graph._overridable or self.graph.freeze_initializer_inputs
        node = self._producer
        return node is not None and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS

    def constant_size(self) -> int | None:
        """How many elements the constant holds, read from its dims (nothing is loaded)."""
        if not self.is_constant():
            return None
        tensor = self.graph._initializers.get(self.name) or self._constant_tensor()
        if tensor is not None:
            return math.prod(tensor.dims)
        array = self.constant()
        return None if array is None else array.size

    def constant(self) -> np.ndarray | None:
        """The constant's value, loaded now (from external data if it lives there)."""
        if not self.is_constant():
            return None
        if self.name in self.graph._overridable:
            self.graph.frozen_used.add(self.name)
        tensor = self.graph._initializers.get(self.name) or self._constant_tensor()
        if tensor is not None:
            try:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    return numpy_helper.to_array(self._with_external_bytes(tensor))
                return numpy_helper.to_array(tensor)
            # Outside the model's folder, or bytes that are not what its dims and dtype declare.
            except (external_data.ExternalDataError, ValueError, TypeError):
                return None
        attr = self._producer.proto.attribute[0]
        value = helper.get_attribute_value(attr)
        if attr.name in ("value_float", "value_floats"):
            return np.asarray(value, dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.asarray(value, dtype=np.int64)
        return None  # sparse or string constants: nothing a proof here uses

    def _with_external_bytes(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of `tensor` holding its bytes, read from the data file directly (as
        `constant_row_blocks` reads): onnx's own reader refuses a data file with more than one
        hard link, which is what `--link-external-data` makes of the input's data file."""
        data = external_data.read(self.graph.base_dir, tensor)
        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)
        loaded.data_location = onnx.TensorProto.DEFAULT
        del loaded.external_data[:]
        loaded.raw_data = data
        return loaded

    def constant_row_blocks(self, rows_at_once: int):
        """The constant seen as (all but the last axis, last axis), as (first row, block of rows)
        pairs in order, read from the external data file a block at a time, or from raw bytes
        (one view of them: each `raw_data` access copies the whole); None if not stored so."""
        if not self.is_constant():
            return None
        if self.name in self.graph._overridable:
            self.graph.frozen_used.add(self.name)
        tensor = self.graph._initializers.get(self.name) or self._constant_tensor()
        if tensor is None or not tensor.dims:
            return None
        width = tensor.dims[-1]
        rows = math.prod(tensor.dims[:-1])
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if dtype.kind in "OSU":  # strings: not numbers a proof reads
            return None
        dtype = dtype.newbyteorder("<")
        row_bytes = width * dtype.itemsize
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            try:
                path, offset, _ = external_data.extent(self.graph.base_dir, tensor)
            except external_data.ExternalDataError:
                return None

            def from_file():
                with open(path, "rb") as f:
                    f.seek(offset)
                    for start in range(0, rows, rows_at_once):
                        count = min(rows_at_once, rows - start)
                        data = f.read(count * row_bytes)
                        if len(data) != count * row_bytes:
                            raise ValueError(f"the external data of '{self.name}' is truncated")
                        yield start, np.frombuffer(data, dtype=dtype).reshape(count, width)
            return from_file()
        if tensor.HasField("raw_data"):
            data = memoryview(tensor.raw_data)
            if len(data) != rows * row_bytes:  # not what its dims declare: nothing to read by rows
                return None
            return ((start, np.frombuffer(data[start * row_bytes:min(start + rows_at_once, rows) * row_bytes],
                                          dtype=dtype).reshape(-1, width))
                    for start in range(0, rows, rows_at_once))
        try:  # typed fields: parsed with the model already
            array = numpy_helper.to_array(tensor).reshape(-1, width)
        except (ValueError, TypeError):  # not what its dims declare
            return None
        return ((start, array[start:start + rows_at_once]) for start in range(0, rows, rows_at_once))


class Node:
    """A node of the main graph; `inputs`/`outputs` are Values (None for an omitted optional)."""

    __slots__ = ("graph", "proto", "inputs", "outputs")

    def __init__(self, graph: "Graph", proto: onnx.NodeProto):
        self.graph, self.proto = graph, proto
        self.inputs = [graph.value(n) if n else None for n in proto.input]
        self.outputs = [graph.value(n) if n else None for n in proto.output]

    def __repr__(self) -> str:
        return f"Node({self.op_type}, {self.name!r})"

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def domain(self) -> str:
        return self.proto.domain

    @property
    def name(self) -> str:
        return self.proto.name

    def attr(self, name: str, default=None):
        for attr in self.proto.attribute:
            if attr.name == name:
                if attr.ref_attr_name:
                    return default
                value = helper.get_attribute_value(attr)
                return value.decode() if isinstance(value, bytes) else value
        return default


class Graph:
    """The main graph of `model`, read lazily; `base_dir` resolves external data.

    The bodies of If/Loop/Scan nodes are graphs of their own (`subgraphs`), each with this
    graph as `parent`: a name a body reads but does not define is the outer scope's Value (its
    body readers count among that value's consumers), so proofs and rewrites work the same in
    a body. Names are unique across all scopes, as ONNX requires."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None, *,
                 body: onnx.GraphProto | None = None, parent: "Graph | None" = None):
        self.model = model
        self.base_dir = base_dir
        self.parent = parent
        self.root: Graph = self if parent is None else parent.root
        graph = self.proto = model.graph if body is None else body
        self._values: dict[str, Value] = {}
        self._initializers = {t.name: t for t in graph.initializer}
        self._input_names = {i.name for i in graph.input}
        self._overridable = self._input_names & set(self._initializers)
        # Read overridable initializers as the constants they hold (--freeze-initializer-inputs);
        # `frozen_used` collects the ones a proof read.
        self.freeze_initializer_inputs = False
        self.frozen_used: set[str] = set()
        self._output_names = {o.name for o in graph.output}
        # Names this scope defines; any other name is read from the enclosing scope.
        self._local = (None if parent is None else
                       self._input_names | set(self._initializers) | {o for n in graph.node for o in n.output if o})
        self._type_index: dict[str, onnx.TypeProto] | None = None
        self._onnx_inferred: dict | None = None
        self.nodes = [Node(self, proto) for proto in graph.node]
        for node in self.nodes:
            self._link(node)
        self._before: dict[Node, list[Node]] = {}
        self._names = None
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self.subgraphs = [Graph(model, base_dir, body=g, parent=self)
                          for node in self.nodes if _has_subgraphs(node.proto) for g in _bodies(node.proto)]

    def all_nodes(self):
        """The nodes of this graph and of every subgraph in it."""
        yield from self.nodes
        for sub in self.subgraphs:
            yield from sub.all_nodes()

    def _link(self, node: Node) -> None:
        for v in node.inputs:
            if v is not None:
                v._consumers.append(node)
        for v in node.outputs:
            if v is not None:
                v._producer = node

    def _types(self) -> dict[str, onnx.TypeProto]:
        if self._type_index is None:
            g = self.proto
            self._type_index = {vi.name: vi.type for vi in (*g.value_info, *g.input, *g.output)}
        return self._type_index

    def __iter__(self):
        return iter(self.nodes)

    def inferred_by_onnx(self, name: str) -> tuple[int, tuple[int | str | None, ...]] | None:
        """(dtype, dims) of `name` from ONNX's whole-model symbolic shape inference, run once on
        a types-only copy (weights are never loaded): where it gives a number, the graph fixes
        that dim for every input it runs with (an image model's token count behind symbolic
        height and width). None when inference says nothing about `name`."""
        root = self.root
        if root._onnx_inferred is None:
            root._onnx_inferred = _infer_types_only(root.model)
        return root._onnx_inferred.get(name)

    def value(self, name: str) -> Value:
        value = self._values.get(name)
        if value is None:
            if self._local is not None and name not in self._local:
                return self.parent.value(name)  # an outer-scope value read in this body
            value = self._values[name] = Value(self, name)
        return value

    @property
    def inputs(self) -> list[Value]:
        return [self.value(i.name) for i in self.proto.input if i.name not in self._initializers]

    @property
    def outputs(self) -> list[Value]:
        return [self.value(o.name) for o in self.proto.output]

    # --- edits ----------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """A name no scope of the model uses yet."""
        if self is not self.root:
            return self.root.unique_name(base)
        if self._names is None:
            self._names = set()
            for scope in self._scopes():
                self._names |= set(scope._values) | {n.name for n in scope.nodes} | set(scope._initializers)
                self._names |= {o for n in scope.nodes for o in n.proto.output}
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def insert_before(self, anchor: Node, protos: list[onnx.NodeProto]) -> list[Node]:
        """Add nodes that will stand just before `anchor` in the written graph."""
        if self._local is not None:
            self._local.update(o for p in protos for o in p.output if o)
        nodes = [Node(self, p) for p in protos]
        for node in nodes:
            self._link(node)
        self._before.setdefault(anchor, []).extend(nodes)
        return nodes

    def set_type(self, value: Value, like: Value) -> None:
        """Declare `value` to have the type `like` has (written out as value_info)."""
        if like.type is not None:
            self._types()[value.name] = like.type

    def replace_uses(self, old: Value, new: Value) -> None:
        """Every reader of `old` reads `new`; a graph output named `old` now comes from `new`."""
        self.redirect_readers(old, new)
        if old.is_graph_output():
            # The output keeps its name: the new producer writes it, the old one an unused name.
            out_name, spare = old.name, self.unique_name(f"{old.name}__unfused")
            self._rename(old, spare)
            self._rename(new, out_name)

    def redirect_readers(self, old: Value, new: Value) -> None:
        """Every node reading `old` reads `new` instead; a graph output `old` stays as it is."""
        for node in old.consumers():
            for i, v in enumerate(node.inputs):
                if v is old:
                    node.inputs[i] = new
                    node.proto.input[i] = new.name
            new._consumers.append(node)
        old._consumers = []

    def _rename(self, value: Value, name: str) -> None:
        node = value.producer()
        if node is not None:
            for i, v in enumerate(node.outputs):
                if v is value:
                    node.proto.output[i] = name
        for reader in value.consumers():
            for i, v in enumerate(reader.inputs):
                if v is value:
                    reader.proto.input[i] = name
        del self._values[value.name]
        value.name = name
        self._values[name] = value
        if self._local is not None:
            self._local.add(name)

    def _scopes(self):
        yield self
        for sub in self.subgraphs:
            yield from sub._scopes()

    def ordered_nodes(self) -> list[Node]:
        order: list[Node] = []

        def place(node: Node) -> None:  # nodes inserted before an inserted node come first
            for earlier in self._before.get(node, ()):
                place(earlier)
            order.append(node)

        for node in self.nodes:
            place(node)
        return order

    def remove_dead(self) -> int:
        """Drop nodes no graph output depends on, and initializers nothing reads, in every body
        first (what a body still reads keeps its outer producer alive). Returns how many nodes."""
        removed_inside = 0
        for sub in self.subgraphs:  # written back now: the liveness below reads the bodies' protos
            removed_inside += sub.remove_dead()
            sub.to_model()
        live = set(self._output_names)
        kept = []
        for node in reversed(self.ordered_nodes()):
            if any(o is not None and o.name in live for o in node.outputs) or not node.outputs:
                kept.append(node)
                live.update(v.name for v in node.inputs if v is not None)
                live.update(_names_used_by_subgraphs(node.proto))
        removed = len(self.nodes) + sum(map(len, self._before.values())) - len(kept)
        self.nodes = list(reversed(kept))
        self._before = {}
        live.update(self._input_names)
        unused = [name for name in self._initializers if name not in live]
        for name in unused:
            del self._initializers[name]
        if unused:
            keep = [t for t in self.proto.initializer if t.name not in set(unused)]
            del self.proto.initializer[:]
            self.proto.initializer.extend(keep)
        return removed + removed_inside

    def to_model(self) -> onnx.ModelProto:
        """The model with every edit written back (the view's own proto, updated in place)."""
        for sub in self.subgraphs:
            sub.to_model()
        order = self.ordered_nodes()
        graph = self.proto
        del graph.node[:]
        graph.node.extend(n.proto for n in order)
        declared = {vi.name for vi in graph.value_info}
        inputs_outputs = self._input_names | self._output_names
        live = {v.name for n in order for v in n.outputs if v is not None}
        stale = [vi for vi in graph.value_info if vi.name not in live]
        if stale:
            keep = [vi for vi in graph.value_info if vi.name in live]
            del graph.value_info[:]
            graph.value_info.extend(keep)
        if self._type_index is not None:
            graph.value_info.extend(
                helper.make_value_info(name, t) for name, t in self._type_index.items()
                if name in live and name not in declared and name not in inputs_outputs
            )
        return self.model


def _has_subgraphs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        out += [attr.g] if attr.HasField("g") else list(attr.graphs)
    return out


def _names_used_by_subgraphs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside If/Loop/Scan bodies (they keep their producers alive):
    node inputs, and body outputs that name an outer value directly."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in graphs:
            names.update(o.name for o in g.output)
            for inner in g.node:
                names.update(inner.input)
                names |= _names_used_by_subgraphs(inner)
    return names


# Initializers up to this many elements keep their values for shape inference (reshape targets).
_SMALL_INITIALIZER = 64


def _infer_types_only(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | str | None, ...]]]:
    from onnx import shape_inference

    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) <= _SMALL_INITIALIZER and tensor.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:  # a weight: its type is all inference needs
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        # Data propagation computes a constant-bounded Range's values: not one of 10¹⁰.
        data_prop = declared_sizes.oversized_range(skeleton) is None
        inferred = shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=data_prop)
    except Exception:  # inference is a hint here; without it nothing is fixed
        return {}
    out = {}
    infos, pending = [], [inferred.graph]
    while pending:  # every scope: names are unique across them
        g = pending.pop()
        infos += [*g.value_info, *g.output]
        pending += [body for node in g.node for body in _bodies(node)]
    for vi in infos:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[vi.name] = (tt.elem_type, dims)
    return out
