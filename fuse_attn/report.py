"""What the pass did, block by block: a plain dataclass the CLI prints and writes as JSON."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass
class BlockReport:
    block: str  # where the block is: its Softmax or Attention node
    fused: bool
    reason: str | None = None  # why not, when not fused
    node: str | None = None  # the FlashFwd node that replaced it
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    batch: int | str | None = None
    seq: int | str | None = None
    scale: float | None = None
    causal: bool | None = None
    grid: list | None = None  # [b, kv]: the kernel launch grid
    seq_tile_size: int | None = None
    dropout_p: float | None = None
    transposes_added: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        if not self.fused:
            return f"not fused  {self.block}: {self.reason}"
        text = (f"fused      {self.block} -> {self.node}: heads {self.heads}, kv heads {self.kv_heads}, "
                f"head dim {self.head_dim}, seq {self.seq}, scale {self.scale:.6g}, "
                f"{'causal' if self.causal else 'no mask'}, grid {self.grid}")
        if self.dropout_p:
            text += f", dropout {self.dropout_p}"
        return text + "".join(f"; {note}" for note in self.notes)


@dataclasses.dataclass
class FuseReport:
    model: str
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    already_fused: int = 0  # FlashFwd nodes the input had
    transposes_added: int = 0  # net change in Transpose nodes
    assumptions: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def fused(self) -> int:
        return sum(b.fused for b in self.blocks)

    def summary(self) -> str:
        if not self.blocks:
            extra = f" ({self.already_fused} FlashFwd already present)" if self.already_fused else ""
            return f"no attention blocks found in {self.model}{extra}; the model is unchanged"
        text = (f"{self.fused} of {len(self.blocks)} attention blocks fused, "
                f"{self.transposes_added:+d} Transpose nodes, {self.seconds:.2f} s")
        if self.already_fused:
            text += f"; {self.already_fused} FlashFwd already present"
        return text

    def lines(self) -> list[str]:
        out = [b.line() for b in self.blocks]
        out += [f"assumed: {a}" for a in self.assumptions]
        return out + [self.summary()]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["fused"] = self.fused
        return json.dumps(data, indent=2)
