"""After rewiring: drop the dead attention nodes and make the fused model self-describing."""

from __future__ import annotations

import onnx
from onnx import helper

from fuse_attn.ir import contract
from fuse_attn.ir.graph import Graph


def remove_dead_nodes(graph: Graph) -> int:
    return graph.remove_dead()


def declare_flash_fwd(model: onnx.ModelProto, dtype: int | None = None) -> None:
    """Import the FlashFwd domain and ship its meaning as a model-local function, once, at the
    model's own opset (`dtype`: the FlashFwd nodes' one dtype, needed below opset 15)."""
    if not any(o.domain == contract.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(contract.DOMAIN, contract.VERSION))
    if not any(f.domain == contract.DOMAIN and f.name == contract.OP_TYPE for f in model.functions):
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model.functions.append(contract.make_function(opset, dtype))
