"""Fixtures shared by test modules."""

import sys

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the module (restored after): on a shared 2-core machine the
    simulator's small tensor ops are several times slower with two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ZooExportNotice:
    """The `log` of `fuse_attn.models.build.build_all` in tests: silent while every export is cached; before the
    first export, one line on the terminal (past pytest's capture) saying what takes the time,
    then one line per model exported."""

    def __init__(self, write):
        self.write = write
        self.announced = False

    def __call__(self, message: str) -> None:
        if message.endswith(": cached"):
            return
        if not self.announced:
            from fuse_attn import models

            self.write(f"exporting the model zoo into {models.cache_dir()} before its first test "
                       f"(minutes on a fresh clone; cached afterwards, set {models.CACHE_ENV} to share it)")
            self.announced = True
        self.write(f"  zoo: {message}")


@pytest.fixture(scope="session")
def zoo_log(request):
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            if reporter is not None:
                if getattr(reporter._tw, "width_of_current_line", 0):  # after -q's progress dots
                    reporter._tw.line()
                reporter.write_line(line)
            else:
                print(line, file=sys.stderr, flush=True)

    return ZooExportNotice(write)
