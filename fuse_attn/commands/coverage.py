"""The coverage table: one row per model, as `fuse-attn zoo` and `fuse-attn check` print it.

The zoo's rows carry what its manifest expects; a user's models (`fuse-attn check`) have no
manifest, so their table leaves those columns out (or shows a baseline in their place). Both
render through `render_markdown`, which takes the columns to show.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, NamedTuple

from fuse_attn.printable import printable, table_cell


@dataclasses.dataclass
class Row:
    model: str
    exporter: str  # e.g. "dynamo/20", "torchscript/17"; for a user's model "<producer>/<opset>"
    found: int | None  # blocks the pass reported
    fused: int | None
    expected: int | None  # blocks the manifest expects fused (None: no manifest)
    expected_found: int | None  # ... fused + expected not fused
    max_err: float | None  # original vs fused, onnxruntime
    seconds: float | None  # the pass alone
    ok: bool
    problems: list[str] = dataclasses.field(default_factory=list)
    family: str = ""
    dtype: str = ""
    attn_impl: str | None = None
    not_fused: list[str] = dataclasses.field(default_factory=list)  # the pass's reasons
    skipped: bool = False  # the recipe needs a package that is not installed
    known_issue: str | None = None  # the manifest's "known_issue": a failure the suite expects
    failure: str | None = None  # what kind of failure, shown after ❌: "wrong", "crashed", ...
    runnable: int | None = None  # blocks the kernel can run (the manifest's; None: no manifest)
    padded: str | None = None  # padded feeds within tolerance, "4 of 4" (None: no token mask to pad)


class Column(NamedTuple):
    header: str
    align: str  # the Markdown alignment cell: "---", "---:", ":-:"
    cell: Callable[[Row], str]


def _count(n: int | None) -> str:
    return "—" if n is None else str(n)


def _fmt_err(err: float | None) -> str:
    return "—" if err is None else f"{err:.1e}"


def _status(r: Row) -> str:
    if r.ok:
        return "✅" if not r.known_issue else "✅ (known issue fixed?)"
    if r.skipped:
        return "skipped"
    if r.known_issue:
        return "❌ known issue"
    return f"❌ {r.failure}" if r.failure else "❌"


MODEL = Column("model", "---", lambda r: r.model)
EXPORTER = Column("exporter", "---", lambda r: r.exporter)
DTYPE = Column("dtype", "---", lambda r: r.dtype or "—")
FOUND = Column("blocks found", "---:", lambda r: _count(r.found))
FUSED = Column("fused", "---:", lambda r: _count(r.fused))
MAX_ERR = Column("max err", "---:", lambda r: _fmt_err(r.max_err))
SECONDS = Column("pass s", "---:", lambda r: "—" if r.seconds is None else f"{r.seconds:.2f}")
OK = Column("ok", ":-:", _status)
# The padded feeds (`fuse_attn.verify`) within tolerance, for models whose report names token masks.
PADDED = Column("padded feeds ok", "---:", lambda r: r.padded or "—")

# The zoo's table: what the manifest says about each model sits beside what the pass did.
ZOO_COLUMNS = (
    MODEL,
    Column("family", "---", lambda r: r.family),
    EXPORTER,
    DTYPE,
    Column("attn", "---", lambda r: r.attn_impl or "—"),
    FOUND,
    FUSED,
    Column("expected fused", "---:", lambda r: f"{r.expected} of {r.expected_found}"),
    Column("kernel can run", "---:", lambda r: _count(r.runnable)),
    PADDED,
    MAX_ERR,
    SECONDS,
    OK,
)
# A user's models: no manifest, so no family, attention implementation or expected counts.
MODEL_COLUMNS = (MODEL, EXPORTER, DTYPE, FOUND, FUSED, PADDED, MAX_ERR, SECONDS, OK)


def _summary(rows: list[Row]) -> str:
    ok = sum(r.ok for r in rows)
    known = sum(1 for r in rows if r.known_issue and not r.ok)
    fused = sum(r.fused or 0 for r in rows)
    text = f"{ok}/{len(rows)} models ok" + (f" ({known} known issues)" if known else "")
    if rows and all(r.expected is not None for r in rows):
        return text + f"; {fused} of {sum(r.expected for r in rows)} expected blocks fused."
    return text + f"; {fused} of {sum(r.found or 0 for r in rows)} blocks found fused."


def _exporter_family(label: str) -> str:
    """"torchscript/14 (transformers 4.44.2)" -> "torchscript (transformers 4.44.2)"."""
    name, _, rest = label.partition("/")
    return f"{name} {rest.partition(' ')[2]}".strip()


def render_exporter_totals(rows: list[Row]) -> str:
    """Per exporter: models, blocks found, blocks the kernel can run, and how many are fused."""
    totals: dict[str, list[int]] = {}
    for r in rows:
        t = totals.setdefault(_exporter_family(r.exporter), [0, 0, 0, 0])
        t[0] += 1
        t[1] += r.found or 0
        t[2] += r.runnable or 0
        t[3] += r.fused or 0
    lines = ["| exporter | models | blocks found | kernel can run | fused |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {found} | {runnable} | {fused} |" for name, (n, found, runnable, fused) in totals.items()]
    return "\n".join(lines)


def render_markdown(rows: list[Row], *, columns: tuple[Column, ...] = ZOO_COLUMNS, details: bool = True) -> str:
    """The coverage table (and, below it, what went wrong and every not-fused reason)."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join(c.align for c in columns) + "|"]
    lines += ["| " + " | ".join(table_cell(c.cell(r)) for c in columns) + " |" for r in rows]
    lines += ["", _summary(rows)]
    if rows and all(r.runnable is not None for r in rows):
        lines += ["", render_exporter_totals(rows)]
    if details:
        notes = []
        for r in rows:
            if r.known_issue and not r.ok:
                notes.append(printable(f"- **{r.model}** (known issue: {r.known_issue})"))
            for p in r.problems:
                notes.append(printable(f"- **{r.model}**: {p}"))
        if notes:
            lines += ["", "Problems:", "", *notes]
        reasons = Counter(reason for r in rows for reason in r.not_fused)
        if reasons:
            lines += ["", "Blocks left unfused, by reason:", ""]
            lines += [printable(f"- {n} × {reason}") for reason, n in reasons.most_common()]
    return "\n".join(lines)
