"""After rewiring: drop the dead attention nodes and make the fused model self-describing."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from fuse_attn import contract


def remove_dead_nodes(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)


def declare_flash_fwd(model: ir.Model) -> None:
    """Import the FlashFwd domain and ship its meaning as a model-local function, once."""
    model.opset_imports[contract.DOMAIN] = contract.VERSION
    key = (contract.DOMAIN, contract.OP_TYPE, "")
    if key not in model.functions:
        proto = contract.make_function(model.opset_imports.get("", contract.MIN_OPSET))
        model.functions[key] = ir.serde.deserialize_function(proto)
