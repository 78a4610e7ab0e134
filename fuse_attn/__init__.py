"""fuse-attn: fuse ONNX attention blocks into one FlashFwd op bound to NKI flash_fwd.

    from fuse_attn import fuse, save
    fused, report = fuse("model.onnx")             # fused: onnx.ModelProto
    save(fused, "fused.onnx", source_path="model.onnx")  # copies external data beside it if needed
"""

from importlib import metadata

from fuse_attn.modelio import InputError, save
from fuse_attn.pipeline import fuse
from fuse_attn.report import BlockReport, FuseReport

try:
    __version__ = metadata.version("fuse-attn")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"

__all__ = ["__version__", "fuse", "save", "FuseReport", "BlockReport", "InputError"]
