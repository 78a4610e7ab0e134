"""What every fuse-attn command shares: errors as one line with one prefix, exit code 2 for bad
input or usage, and FUSE_ATTN_DEBUG=1 for the traceback behind any error.

A command is a function `argv -> exit code` that raises `InputError` for bad input; `run` turns
that (and any unexpected exception) into the line and the code.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn

from fuse_attn.modelio import InputError
from fuse_attn.printable import printable

ERROR_PREFIX = "fuse-attn: error: "
EXIT_BAD_INPUT = 2
DEBUG_ENV = "FUSE_ATTN_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors in the commands' own format (usage line, then the error)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise InputError(message)


def _print_traceback(exc: BaseException) -> None:
    # An InputError is raised `from None` to keep its line short; the debug view wants the cause.
    exc.__suppress_context__ = False
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def run(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run `command(argv)`: bad input is one line and exit 2, never a traceback unless asked for."""
    try:
        return command(argv)
    except InputError as exc:
        if debugging():
            _print_traceback(exc)
        print(printable(f"{ERROR_PREFIX}{exc}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fuse-attn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for a user; one line and the way to get more
        if debugging():
            _print_traceback(exc)
        hint = "" if debugging() else f" ({DEBUG_ENV}=1 shows the traceback)"
        print(printable(f"{ERROR_PREFIX}cannot process the model: {type(exc).__name__}: {exc}{hint}"), file=sys.stderr)
        return EXIT_BAD_INPUT
