"""Blocks: a `{ key = value, ... }` block checked against its catalogue entry.

Every key must name one of the entry's parameters (or an allowed sub-block), every
value is coerced to its parameter's type and range, required parameters must be set,
unset ones take the catalogue's default, and the entry's cross-setting constraints
hold for the result.
"""

from __future__ import annotations

from typing import Any

from .. import nodes as A
from ..catalogue import Entry
from ..diagnostics import Related, did_you_mean
from .values import Evaluator, default_value


def defaults(entry: Entry) -> dict[str, Any]:
    """Every parameter of an entry at its catalogue default."""
    return {p.name: default_value(p) for p in entry.params}


def check_block(ev: Evaluator, block: A.Block, entry: Entry, what: str, subblocks: tuple[str, ...] = (), fill: bool = True) -> dict | None:
    """The settings of `block` for `entry` (defaults filled in), or None if any was wrong. With `fill`
    false, only the settings written (none required, no defaults, no constraints: the caller merges
    them into settings from elsewhere and checks the whole)."""
    out: dict[str, Any] = {}
    ok = True
    seen: dict[str, A.Node] = {}
    for e in block.entries:
        key = e.key.id
        if key in seen:
            ev.error(
                e.key.span,
                "duplicate",
                f"`{key}` is set twice in {what}",
                "keep one",
                [Related.at(seen[key].span, "first set here")],
            )
            ok = False
            continue
        seen[key] = e.key
        if isinstance(e, A.SubBlock):
            if key not in subblocks:
                ev.error(e.key.span, "unknown-setting", f"{what} has no `{key} {{...}}` block", None)
                ok = False
            continue
        spec = entry.param(key)
        if spec is None:
            names = [p.name for p in entry.params] + list(subblocks)
            guess = did_you_mean(key, names)
            ev.error(
                e.key.span,
                "unknown-setting",
                f"{what} has no setting `{key}`",
                f"did you mean `{guess}`?" if guess else f"its settings are: {', '.join(names)}",
            )
            ok = False
            continue
        value = ev.coerce_expr(e.value, spec, f"`{key}`")
        if value is None and not (spec.nullable and isinstance(e.value, A.NoneLit)):
            ok = False
        out[key] = value
    if not fill:
        return out if ok else None
    for p in entry.params:
        if p.name not in out:
            if p.required:
                ev.error(
                    block.span,
                    "missing-setting",
                    f"{what} needs `{p.name}`",
                    f"add `{p.name} = ...` ({p.describe_type()}): {p.doc}",
                )
                ok = False
            else:
                out[p.name] = default_value(p)
    if ok:
        ok = check_constraints(ev, entry, out, block)
    return out if ok else None


def check_constraints(ev: Evaluator, entry: Entry, settings: dict, block: A.Block) -> bool:
    ok = True
    for c in entry.constraints:
        msg = c.rule(settings)
        if msg is None:
            continue
        ok = False
        written = [block.get(p) for p in c.params if block.get(p) is not None]
        span = written[0].span if written else block.span
        others = [Related.at(w.span, f"`{w.key.id}` set here") for w in written[1:]]
        ev.error(span, "incompatible", msg, c.hint or None, others)
    return ok
