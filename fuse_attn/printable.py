"""Text from a model, shown as data: control characters escaped where a line is written.

Names, dims and messages read from a model file reach the terminal and `check`'s Markdown.
Written raw, an escape sequence in a node name would drive the terminal and a newline would
forge a report line. Each line is escaped once where it is written (not in each message that
quotes a name): every character `str.isprintable` refuses — control characters, line and
paragraph separators, bidirectional overrides — is shown as its Python escape (`\\x1b`, `\\n`,
`\\u202e`). The JSON report keeps the exact names.
"""

from __future__ import annotations


def _escaped(ch: str) -> str:
    return ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")


def printable(text: str) -> str:
    """`text` as one line a terminal shows as it is."""
    text = str(text)
    return text if text.isprintable() else "".join(map(_escaped, text))


def table_cell(text: str) -> str:
    """`text` as one Markdown table cell: printable, and `|` escaped so it stays in its column."""
    return printable(text).replace("|", "\\|")
