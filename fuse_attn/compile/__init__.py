"""Lower a fused ONNX model to PyTorch, bind FlashFwd to NKI flash_fwd, trace for Inf2; the
command, `fuse-attn compile`, is `fuse_attn.commands.compile`.

Heavy imports (torch, torch-neuronx) happen inside the functions that need them.
"""
