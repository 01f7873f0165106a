"""Resolve catalogue `impl` paths ("package.module:attr") — the one place the runtime
imports code named by the catalogue, built-in or plugin."""

from __future__ import annotations

import importlib
from typing import Any


class ImplError(Exception):
    """An `impl` path that cannot be imported (a plugin not installed, a typo in its TOML)."""


def resolve(impl: str) -> Any:
    module, _, attr = impl.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImplError(f"cannot import `{impl}`: {exc}") from exc
    return obj


def build_task(task_ir, seed: int):
    """The task an IR names, through its catalogue `impl`, given its checked parameters as
    they are (typed for a built-in task, a dict for a plugin task)."""
    if not task_ir.impl:
        raise ImplError(f"task `{task_ir.name}` has no implementation (`impl`) in its catalogue entry")
    return resolve(task_ir.impl)(task_ir.params, seed)
