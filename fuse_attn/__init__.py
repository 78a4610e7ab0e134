"""fuse-attn: fuse ONNX attention blocks into one FlashFwd op bound to NKI flash_fwd.

    from fuse_attn import fuse
    fused_model, report = fuse("model.onnx")      # fused_model: onnx_ir.Model
"""

from fuse_attn.pipeline import fuse
from fuse_attn.report import BlockReport, FuseReport

__all__ = ["fuse", "FuseReport", "BlockReport"]
