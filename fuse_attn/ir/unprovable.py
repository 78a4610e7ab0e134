"""What a proof raises when a value cannot be evaluated from constants and shapes."""

from __future__ import annotations


class Unprovable(Exception):
    """The value cannot be evaluated from constants and shapes; the message says why."""


class DependsOnInput(Unprovable):
    def __init__(self, input_name: str, overridable: bool = False):
        super().__init__(overridable_reason(input_name) if overridable
                         else f"depends on the contents of graph input '{input_name}'")
        self.input_name = input_name
        self.overridable = overridable


def overridable_reason(name: str) -> str:
    return (f"depends on initializer '{name}', which is also a graph input: a caller may replace it "
            "(pass --freeze-initializer-inputs to read it as the constant it holds)")
