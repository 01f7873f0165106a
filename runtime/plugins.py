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
