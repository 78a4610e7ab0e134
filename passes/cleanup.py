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
    model's own opset (`dtype`: the FlashFwd nodes' one dtype, needed below opset 15).

    A FlashFwd function the input already carries is replaced: its body is data from the model
    file, and the op's meaning is the kernel's, written here (an earlier fuse-attn's is the same)."""
    if not any(o.domain == contract.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(contract.DOMAIN, contract.VERSION))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    others = [f for f in model.functions if not (f.domain == contract.DOMAIN and f.name == contract.OP_TYPE)]
    del model.functions[:]
    model.functions.extend([*others, contract.make_function(opset, dtype)])
