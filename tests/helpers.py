"""Plain helpers shared by test modules (and by the scripts they run in subprocesses)."""

from __future__ import annotations

import hashlib
from typing import Any


def task_digest(task: Any, split: str, n: int) -> str:
    """SHA-256 over the responses and image bytes of a split's first ``n`` samples."""
    h = hashlib.sha256()
    for i in range(n):
        s = task.sample(split, i)
        h.update(s.response.encode())
        h.update(s.image.tobytes())
    return h.hexdigest()
