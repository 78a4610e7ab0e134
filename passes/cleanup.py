"""After rewiring: drop the dead attention nodes and make the fused model self-describing."""

from __future__ import annotations

import onnx
from onnx import helper

from fuse_attn.ir import contract
from fuse_attn.ir.graph import Graph


def remove_dead_nodes(graph: Graph) -> int:
    return graph.remove_dead()


def _flash_fwd_nodes(graph: onnx.GraphProto):
    """Every FlashFwd node of `graph` and of the If/Loop/Scan bodies inside it."""
    for node in graph.node:
        if node.domain == contract.DOMAIN and node.op_type == contract.OP_TYPE:
            yield node
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _flash_fwd_nodes(body)


def declare_flash_fwd(model: onnx.ModelProto, dtype: int | None = None) -> None:
    """Import the FlashFwd domain and ship its meaning as model-local functions at the model's
    own opset (`dtype`: the FlashFwd nodes' one dtype, needed below opset 15). Call it on the
    written model (`Graph.to_model`): below opset 12 each node is pointed at the body written
    for its attributes (`contract.overload_for`), one function per distinct set.

    FlashFwd functions the input already carries are replaced: their bodies are data from the
    model file, and the op's meaning is the kernel's, written here (an earlier fuse-attn's is the same)."""
    if not any(o.domain == contract.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(contract.DOMAIN, contract.VERSION))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    others = [f for f in model.functions if not (f.domain == contract.DOMAIN and f.name == contract.OP_TYPE)]
    del model.functions[:]
    model.functions.extend(others)
    if opset >= contract.ATTRIBUTE_REF_OPSET:
        model.functions.append(contract.make_function(opset, dtype))
        return
    declared = set()
    for node in _flash_fwd_nodes(model.graph):
        try:
            attrs = contract.FlashFwdAttrs.from_onnx_attributes(
                {a.name: helper.get_attribute_value(a) for a in node.attribute})
        except (KeyError, TypeError, ValueError):
            continue  # a node the input brought and this pass cannot read: left without a body
        node.overload = contract.overload_for(attrs, dtype)
        if node.overload not in declared:
            model.functions.append(contract.make_function(opset, dtype, attrs))
            declared.add(node.overload)
    model.ir_version = max(model.ir_version, contract.OVERLOAD_IR_VERSION)
