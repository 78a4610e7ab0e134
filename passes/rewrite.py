"""Replace a planned attention block with one FlashFwd node.

Only new nodes are added and the block's output is rewired; the old nodes become dead and
`fuse_attn.passes.cleanup` removes them in one sweep at the end (rewire first, clean up once).
"""

from __future__ import annotations

import numpy as np

from fuse_attn.ir import contract
from fuse_attn.ir.builder import NodeBuilder
from fuse_attn.ir.graph import Graph, Node, Value
from fuse_attn.passes.key_mask import key_bias_column, widen
from fuse_attn.passes.layout import Source
from fuse_attn.passes.plan import FusionPlan


def _kernel_input(nodes: NodeBuilder, source: Source, hint: str) -> str:
    """The name of the kernel input made from `source`: the graph's own value when it already is."""
    value = source.value.name
    if source.perm != tuple(range(len(source.perm))):
        value = nodes.transpose(value, source.perm, hint)
    if source.unsqueeze:
        value = nodes.unsqueeze(value, [1], f"{hint}_heads")
    return value


def emit_flash_fwd(graph: Graph, plan: FusionPlan, name: str) -> tuple[Node, Value, list[Node]]:
    """Insert the FlashFwd node for `plan` and point every reader of the block's output at it.
    Returns the node, the value that now stands for the block's output, and every node inserted."""
    nodes = NodeBuilder(graph, name)
    inputs = [_kernel_input(nodes, source, hint) for source, hint in ((plan.q, "q"), (plan.k, "k"), (plan.v, "v"))]
    if plan.q_head_order is not None:
        inputs[0] = nodes.gather(inputs[0], plan.q_head_order, 1, "q_grouped")
    if plan.key_mask is not None:  # q' = [q; 1], k' = [k; bias/scale], v' = [v; 0] on the head dim
        dtype = plan.key_mask.dtype
        column = key_bias_column(nodes, plan.key_mask, inputs[1], plan.attrs.softmax_scale)
        inputs = [widen(nodes, inputs[0], 1.0, 2, dtype),
                  nodes.concat([inputs[1], column], 2, "k_widened"),
                  widen(nodes, inputs[2], 0.0, 3, dtype)]
    if plan.attrs.dropout_p > 0:
        inputs.append(nodes.constant(np.array([plan.seed], dtype=np.int32), "seed"))
    result = nodes.op(contract.OP_TYPE, inputs, "o", name=name, domain=contract.DOMAIN,
                      **plan.attrs.as_onnx_attributes())
    if plan.key_mask is not None:  # o = o'[..., :d]
        result = nodes.slice(result, [0], [plan.head_dim], [3], "o_sliced")
    if plan.q_head_order is not None:  # back to the graph's head order
        result = nodes.gather(result, np.argsort(plan.q_head_order).tolist(), 1, "o_ungrouped")
    if plan.squeeze_heads:  # batched heads ran as h = 1: (b·h, 1, s, d) -> (b·h, s, d)
        result = nodes.squeeze(result, [1], "o_batched")
    if plan.output_perm is not None:  # an Einsum wrote the output's axes in another order
        result = nodes.transpose(result, plan.output_perm, "o_ordered")
    inserted = nodes.insert_before(plan.insert_before)
    new_output = graph.value(result)
    graph.set_type(new_output, plan.output)
    graph.replace_uses(plan.output, new_output)
    return next(n for n in inserted if n.op_type == contract.OP_TYPE), new_output, inserted
