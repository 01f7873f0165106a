"""Shared fixtures: one CPU thread for in-process tensor work, a task and a tiny model."""

from __future__ import annotations

import pytest
import torch

from percepdsl_runtime.models import build_tiny
from percepdsl_runtime.tasks import build_task


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
