"""fuse-attn: fuse ONNX attention blocks into one FlashFwd op bound to NKI flash_fwd."""
