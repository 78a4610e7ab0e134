"""`fuse-attn compile`: lower a fused ONNX model to PyTorch, bind FlashFwd to NKI flash_fwd, trace for Inf2.

Heavy imports (torch, torch-neuronx) happen inside the commands that need them.
"""

from fuse_attn.compile.cli import compile_main

__all__ = ["compile_main"]
