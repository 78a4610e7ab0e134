"""What the pass did, block by block: a plain dataclass the CLI prints and writes as JSON."""

from __future__ import annotations

import dataclasses
import json
import os

# Marks a JSON file as a fuse-attn report, so a rerun may replace it and nothing else.
GENERATOR = "fuse-attn"
# Reports written before the marker existed: recognised by these top-level keys.
_UNMARKED_REPORT_KEYS = {"model", "blocks", "already_fused", "transposes_added", "fused"}
_LARGEST_REPORT = 64 << 20  # bytes; a bigger file is not one of ours, whatever it holds


@dataclasses.dataclass
class BlockReport:
    op_type: str  # the block's anchor: its Softmax, or the ONNX Attention op
    name: str  # that node's name ("" when the graph left it unnamed)
    fused: bool
    reason: str | None = None  # why not, when not fused
    node: str | None = None  # the FlashFwd node that replaced it
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    batch: int | str | None = None
    seq: int | str | None = None
    scale: float | None = None  # the FlashFwd node's softmax_scale, exactly (a float32 value)
    causal: bool | None = None
    grid: list | None = None  # [b, kv]: the kernel launch grid
    seq_tile_size: int | None = None
    dropout_p: float | None = None
    transposes_added: int = 0  # Transpose nodes this block's rewrite added for q, k and v
    notes: list[str] = dataclasses.field(default_factory=list)
    # The key mask carried in the key-bias column: the graph inputs whose contents it is computed
    # from (empty: no column), and what the proof assumes about them (None: nothing).
    key_mask_inputs: list[str] = dataclasses.field(default_factory=list)
    key_mask_assumption: str | None = None

    @property
    def block(self) -> str:
        """Where the block is, as the lines print it: `Softmax 'name'`."""
        return f"{self.op_type} '{self.name}'" if self.name else self.op_type

    def line(self) -> str:
        if not self.fused:
            return f"not fused  {self.block}: {self.reason}"
        text = (f"fused      {self.block} -> {self.node}: heads {self.heads}, kv heads {self.kv_heads}, "
                f"head dim {self.head_dim}, seq {self.seq}, scale {self.scale:.6g}, "
                f"{'causal' if self.causal else 'no mask'}, grid {self.grid}")
        if self.dropout_p:
            text += f", dropout {self.dropout_p}"
        if self.key_mask_inputs:
            text += f", key mask from {', '.join(repr(n) for n in self.key_mask_inputs)}"
            if self.key_mask_assumption:
                text += f" ({self.key_mask_assumption})"
        return text + "".join(f"; {note}" for note in self.notes)


@dataclasses.dataclass
class FuseReport:
    model: str
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    already_fused: int = 0  # FlashFwd nodes the input had
    # Transpose nodes: the blocks' own additions summed, and the graph's net change (additions
    # minus the Transposes the rewrite made dead, e.g. a Kᵀ or q transpose only the block read).
    transposes_added: int = 0
    transposes_net: int = 0
    assumptions: list[str] = dataclasses.field(default_factory=list)
    # The graph inputs --assume-no-padding took as all ones (named in `assumptions` too): --verify
    # feeds them padded, to show what the flag costs on a padded batch.
    assumed_all_ones: list[str] = dataclasses.field(default_factory=list)
    specialized: list[str] = dataclasses.field(default_factory=list)  # dims fixed by --shape/--dim
    # --verify's per-feed results (`verify.FeedResult.to_json`): all-ones, then the padded feeds.
    verification: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def fused(self) -> int:
        return sum(b.fused for b in self.blocks)

    def summary(self) -> str:
        if not self.blocks:
            extra = f" ({self.already_fused} FlashFwd already present)" if self.already_fused else ""
            return f"no attention blocks found in {self.model}{extra}; the model is unchanged"
        text = (f"{self.fused} of {len(self.blocks)} attention blocks fused, "
                f"{self.transposes_net:+d} Transpose nodes, {self.seconds:.2f} s")
        if self.already_fused:
            text += f"; {self.already_fused} FlashFwd already present"
        return text

    def lines(self) -> list[str]:
        out = [b.line() for b in self.blocks]
        out += [f"specialized: {s}" for s in self.specialized]
        out += [f"assumed: {a}" for a in self.assumptions]
        return out + [self.summary()]

    def to_json(self) -> str:
        """The report as JSON text, ending with a newline."""
        data = {"generator": GENERATOR, **dataclasses.asdict(self), "fused": self.fused}
        return json.dumps(data, indent=2) + "\n"


def is_fuse_attn_report(path: str | os.PathLike) -> bool:
    """Whether `path` holds a report an earlier run wrote (or nothing at all): the only kind of
    existing file the CLI replaces with a report."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return True
        if not os.path.isfile(path) or size > _LARGEST_REPORT:
            return False
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("generator") == GENERATOR or _UNMARKED_REPORT_KEYS <= data.keys()
