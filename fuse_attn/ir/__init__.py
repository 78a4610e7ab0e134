"""The foundation floor: the protobuf graph view, the constant/shape evaluator and the FlashFwd contract.

Nothing here imports from `fuse_attn.passes` or the pipeline above it.
"""
