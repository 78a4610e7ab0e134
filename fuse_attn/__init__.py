"""fuse-attn: fuse ONNX attention blocks into one FlashFwd op bound to NKI flash_fwd.

    from fuse_attn import fuse, save
    fused, report = fuse("model.onnx")             # fused: onnx.ModelProto
    save(fused, "fused.onnx", source_path="model.onnx")  # links external data if any
"""

from fuse_attn.modelio import InputError, save
from fuse_attn.pipeline import fuse
from fuse_attn.report import BlockReport, FuseReport

__all__ = ["fuse", "save", "FuseReport", "BlockReport", "InputError"]
