"""Replace a planned attention block with one FlashFwd node.

Only new nodes are added and the block's output is rewired; the old nodes become dead and
`fuse_attn.passes.cleanup` removes them in one sweep at the end (rewire first, clean up once).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from fuse_attn.ir import contract
from fuse_attn.ir.graph import Graph, Node, Value
from fuse_attn.passes.layout import Source
from fuse_attn.passes.plan import FusionPlan


def _on_axis_one(graph: Graph, op_type: str, value: str, out: str, name: str, protos: list) -> None:
    """Unsqueeze or Squeeze of axis 1: the axes are an input from opset 13, an attribute before."""
    if graph.opset < 13:
        protos.append(helper.make_node(op_type, [value], [out], name=graph.unique_name(name), axes=[1]))
        return
    axes = graph.unique_name(f"{name}_axes")
    protos.append(helper.make_node("Constant", [], [axes], name=axes,
                                   value=numpy_helper.from_array(np.array([1], dtype=np.int64), axes)))
    protos.append(helper.make_node(op_type, [value, axes], [out], name=graph.unique_name(name)))


def _gather_heads(graph: Graph, value: str, order, name: str, protos: list) -> str:
    """Heads (axis 1) of `value` taken in `order`."""
    indices, out = graph.unique_name(f"{name}_order"), graph.unique_name(name)
    protos.append(helper.make_node("Constant", [], [indices], name=indices,
                                   value=numpy_helper.from_array(np.array(order, dtype=np.int64), indices)))
    protos.append(helper.make_node("Gather", [value, indices], [out], name=graph.unique_name(f"{name}_gather"),
                                   axis=1))
    return out


def _kernel_input(graph: Graph, source: Source, name: str, protos: list) -> str:
    """The name of the kernel input made from `source`: the graph's own value when it already is."""
    value = source.value.name
    if source.perm != tuple(range(len(source.perm))):
        out = graph.unique_name(name)
        protos.append(helper.make_node("Transpose", [value], [out], name=graph.unique_name(f"{name}_transpose"),
                                       perm=list(source.perm)))
        value = out
    if source.unsqueeze:
        out = graph.unique_name(f"{name}_heads")
        _on_axis_one(graph, "Unsqueeze", value, out, f"{name}_unsqueeze", protos)
        value = out
    return value


def emit_flash_fwd(graph: Graph, plan: FusionPlan, name: str) -> tuple[Node, Value, list[Node]]:
    """Insert the FlashFwd node for `plan` and point every reader of the block's output at it.
    Returns the node, the value that now stands for the block's output, and every node inserted."""
    protos: list = []
    inputs = [
        _kernel_input(graph, plan.q, f"{name}_q", protos),
        _kernel_input(graph, plan.k, f"{name}_k", protos),
        _kernel_input(graph, plan.v, f"{name}_v", protos),
    ]
    if plan.q_head_order is not None:
        inputs[0] = _gather_heads(graph, inputs[0], plan.q_head_order, f"{name}_q_grouped", protos)
    if plan.attrs.dropout_p > 0:
        seed = graph.unique_name(f"{name}_seed")
        protos.append(helper.make_node("Constant", [], [seed], name=seed,
                                       value=numpy_helper.from_array(np.array([plan.seed], dtype=np.int32), seed)))
        inputs.append(seed)
    result = graph.unique_name(f"{name}_o")
    protos.append(helper.make_node(contract.OP_TYPE, inputs, [result], name=name, domain=contract.DOMAIN,
                                   **plan.attrs.as_onnx_attributes()))
    if plan.q_head_order is not None:  # back to the graph's head order
        inverse = np.argsort(plan.q_head_order).tolist()
        result = _gather_heads(graph, result, inverse, f"{name}_o_ungrouped", protos)
    if plan.squeeze_heads:  # batched heads ran as h = 1: (b·h, 1, s, d) -> (b·h, s, d)
        squeezed = graph.unique_name(f"{name}_o_batched")
        _on_axis_one(graph, "Squeeze", result, squeezed, f"{name}_o_squeeze", protos)
        result = squeezed
    if plan.output_perm is not None:  # an Einsum wrote the output's axes in another order
        ordered = graph.unique_name(f"{name}_o_ordered")
        protos.append(helper.make_node("Transpose", [result], [ordered], name=graph.unique_name(f"{name}_o_transpose"),
                                       perm=list(plan.output_perm)))
        result = ordered
    nodes = graph.insert_before(plan.insert_before, protos)
    new_output = graph.value(result)
    graph.set_type(new_output, plan.output)
    graph.replace_uses(plan.output, new_output)
    return next(n for n in nodes if n.op_type == contract.OP_TYPE), new_output, nodes
