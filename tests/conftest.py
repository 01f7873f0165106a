"""Shared fixtures: one CPU thread for in-process tensor work, a task and a tiny model."""

from __future__ import annotations

import signal

import pytest
import torch

from percepdsl_runtime.models import build_tiny
from percepdsl_runtime.tasks import build_task


def pytest_configure(config):
    """A suite started in the background of a non-interactive shell (`cmd &`) inherits SIGINT ignored,
    and so would every process it starts: the tests that stop a run or a grid with Ctrl-C would then
    wait in vain. Catching it here gives the children the default disposition back (exec resets a
    caught signal, not an ignored one); `test_gridrun`'s `ignore_sigint` still tests the background case."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core box
    multi-threaded kernels stall behind other processes (20 steps: 0.5 s vs 40 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return build_task("graph_coloring", {}, seed=0)


@pytest.fixture(scope="module")
def tiny(task, tmp_path_factory):
    return build_tiny(
        task.vocabulary(),
        image=task.params.image,
        width=64,
        depth=2,
        heads=2,
        vision_width=32,
        vision_depth=1,
        save_dir=tmp_path_factory.mktemp("tiny"),
    )
