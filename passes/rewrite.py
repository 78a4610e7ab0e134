"""Replace a planned attention block with one FlashFwd node.

Only new nodes are added and the block's output is rewired; the old nodes become dead and
`passes.cleanup` removes them in one sweep at the end (rewire first, clean up once).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from fuse_attn import contract
from passes.layout import Source
from passes.plan import FusionPlan




def _kernel_input(source: Source, name: str, new_nodes: list[ir.Node]) -> ir.Value:
    value = source.value
    if source.perm != tuple(range(len(source.perm))):
        node = ir.node("Transpose", [value], {"perm": list(source.perm)}, name=f"{name}_transpose")
        new_nodes.append(node)
        value = node.outputs[0]
    if source.unsqueeze:
        axes = ir.node("Constant", [], {"value": ir.tensor(np.array([1], dtype=np.int64))}, name=f"{name}_axes")
        node = ir.node("Unsqueeze", [value, axes.outputs[0]], name=f"{name}_unsqueeze")
        new_nodes.extend([axes, node])
        value = node.outputs[0]
    value.name = name
    return value


def emit_flash_fwd(graph: ir.Graph, plan: FusionPlan, name: str) -> ir.Node:
    """Insert the FlashFwd node for `plan` and point every reader of the block's output at it."""
    new_nodes: list[ir.Node] = []
    inputs = [
        _kernel_input(plan.q, f"{name}_q", new_nodes),
        _kernel_input(plan.k, f"{name}_k", new_nodes),
        _kernel_input(plan.v, f"{name}_v", new_nodes),
    ]
    if plan.attrs.dropout_p > 0:
        seed = ir.node("Constant", [], {"value": ir.tensor(np.array([plan.seed], dtype=np.int32))},
                       name=f"{name}_seed")
        new_nodes.append(seed)
        inputs.append(seed.outputs[0])
    flash = ir.node(contract.OP_TYPE, inputs, plan.attrs.as_onnx_attributes(), domain=contract.DOMAIN, name=name)
    new_nodes.append(flash)
    result = flash.outputs[0]
    result.dtype = plan.q.value.dtype
    if plan.squeeze_heads:
        axes = ir.node("Constant", [], {"value": ir.tensor(np.array([1], dtype=np.int64))}, name=f"{name}_o_axes")
        squeeze = ir.node("Squeeze", [result, axes.outputs[0]], name=f"{name}_o_squeeze")
        new_nodes.extend([axes, squeeze])
        result.name = f"{name}_o_heads"
        result = squeeze.outputs[0]
    graph.insert_before(plan.insert_before, new_nodes)

    old = plan.output
    result.shape, result.dtype = old.shape, old.dtype
    if old.is_graph_output():
        old_name, old.name = old.name, f"{old.name}__unfused"
        result.name = old_name
    else:
        result.name = f"{name}_o"
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    return flash
