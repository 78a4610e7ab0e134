"""A dim_param read as data: a symbol's name, or integer arithmetic over symbols.

Exporters write dims such as `batch`, `past_sequence_length + sequence_length` or `2*s1`. This
parser accepts exactly integer constants, symbol names, `+ - * // %` and parentheses; any other
text (and text longer than `MAX_EXPRESSION_CHARS`) is one opaque symbol named by the whole
string, as ONNX itself treats a dim_param. It never runs model text: a tokenizer and an
explicit-stack operator-precedence parser, linear in the length, with no recursion to exhaust.
"""

from __future__ import annotations

import functools
import re

# Real dims are a few dozen characters; beyond this a dim is a name, whatever it spells.
MAX_EXPRESSION_CHARS = 1000
# A constant is a size: 18 digits stay within int64. Longer is not a dim the parser evaluates.
_MAX_DIGITS = 18
# Values a dim can take (ONNX dims are int64); arithmetic leaving this range has no size.
_INT64_MAX = (1 << 63) - 1

_TOKEN = re.compile(r"\s*(?:(\d+)|([^\W\d]\w*)|(//|[-+*%()]))", re.ASCII)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}


def _apply(op: str, a: int, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return None  # `//` and `%` by a zero size: no size
    return a // b if op == "//" else a % b


class DimExpr:
    """One dim_param: `symbols` (in order of first use) and `evaluate(binding)`.

    A plain name and an opaque string are both a symbol (`is_symbol`) whose only symbol is the
    text itself; an expression with no symbol at all (`3`, `2*4`) is a name too, as before
    any arithmetic: a dim_param is never a number."""

    __slots__ = ("text", "symbols", "_rpn", "_spans")

    def __init__(self, text: str, rpn: list | None, spans: list[tuple[int, int, str]]):
        self.text = text
        self._rpn = rpn  # postfix: ("n", int) | ("s", name) | ("op", op); None for a symbol
        self._spans = spans  # (start, end, name) of each symbol in `text`
        self.symbols: tuple[str, ...] = (tuple(dict.fromkeys(name for _, _, name in spans))
                                         if rpn is not None else (text,))

    def __repr__(self) -> str:
        return f"DimExpr({self.text!r})"

    @property
    def is_symbol(self) -> bool:
        """A name (plain or opaque), not arithmetic."""
        return self._rpn is None

    def evaluate(self, binding: dict[str, int]) -> int | None:
        """The size under `binding`; None when a symbol is unbound or the arithmetic has no
        size (a division by zero, a value outside int64)."""
        if self._rpn is None:
            return binding.get(self.text)
        stack: list[int] = []
        for kind, item in self._rpn:
            if kind == "n":
                stack.append(item)
            elif kind == "s":
                if item not in binding:
                    return None
                stack.append(binding[item])
            else:
                b = stack.pop()
                value = _apply(item, stack.pop(), b)
                if value is None or abs(value) > _INT64_MAX:
                    return None
                stack.append(value)
        return stack[0]

    def substitute(self, binding: dict[str, int]) -> int | str:
        """The dim with the symbols `binding` holds written as their numbers: an int when none
        is left free, else the text with the bound names replaced (`0 + sequence_length`).
        Raises ValueError when every symbol is bound but the arithmetic has no size."""
        value = self.evaluate(binding)
        if value is not None:
            return value
        if not any(s in binding for s in self.symbols):
            return self.text
        if self._rpn is None or all(s in binding for s in self.symbols):
            raise ValueError(f"dim {self.text!r} has no size with {binding}")
        parts, at = [], 0
        for start, end, name in self._spans:
            parts += [self.text[at:start], str(binding[name]) if name in binding else name]
            at = end
        return "".join(parts) + self.text[at:]


def _tokens(text: str) -> list[tuple[str, object, int, int]] | None:
    """(kind, value, start, end) per token; None when the text is not all arithmetic tokens."""
    out, at, end = [], 0, len(text.rstrip())
    while at < end:
        match = _TOKEN.match(text, at)
        if match is None:
            return None
        number, name, op = match.groups()
        if number is not None:
            if len(number) > _MAX_DIGITS:
                return None
            out.append(("n", int(number), match.start(1), match.end(1)))
        elif name is not None:
            out.append(("s", name, match.start(2), match.end(2)))
        else:
            out.append(("op", op, match.start(3), match.end(3)))
        at = match.end()
    return out


def _postfix(tokens) -> tuple[list, list[tuple[int, int, str]]] | None:
    """Shunting-yard: binary operators only, left-associative; None when malformed."""
    rpn, ops, spans = [], [], []
    operand_next = True  # what the grammar expects: an operand (or "("), else an operator (or ")")
    for kind, value, start, end in tokens:
        if kind in ("n", "s"):
            if not operand_next:
                return None
            rpn.append((kind, value))
            if kind == "s":
                spans.append((start, end, value))
            operand_next = False
        elif value == "(":
            if not operand_next:
                return None
            ops.append(value)
        elif value == ")":
            if operand_next:
                return None
            while ops and ops[-1] != "(":
                rpn.append(("op", ops.pop()))
            if not ops:
                return None
            ops.pop()
        else:
            if operand_next:
                return None  # a unary sign, or two operators in a row
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[value]:
                rpn.append(("op", ops.pop()))
            ops.append(value)
            operand_next = True
    if operand_next or "(" in ops:
        return None
    rpn += [("op", op) for op in reversed(ops)]
    return rpn, spans


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> DimExpr:
    """`text` as a DimExpr: arithmetic when it is exactly that, else one opaque symbol."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return DimExpr(text, None, [])
    tokens = _tokens(text)
    parsed = _postfix(tokens) if tokens else None
    if parsed is None:
        return DimExpr(text, None, [])
    rpn, spans = parsed
    if not spans or len(rpn) == 1:
        return DimExpr(text, None, [])  # a plain name, or arithmetic of constants only
    return DimExpr(text, rpn, spans)
