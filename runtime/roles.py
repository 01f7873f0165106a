"""Role tagging: which part of a target response each character and token belongs to.

Roles come from the compiled IR as a list of ``RoleRuleIR`` (a mapping of the same fields is
validated into one), applied in declaration order; a character takes the role of the FIRST
rule that covers it:

    RoleRuleIR(role="perception", kind="between", open="<perception>", close="</perception>")
    RoleRuleIR(role="digits", kind="regex", pattern="[0-9]+")
    RoleRuleIR(role="reasoning", kind="rest")

- ``between`` covers every ``open ... close`` span (all occurrences, left to right); with
  ``markers`` (the default) the marker text belongs to the role, otherwise only the inside.
  An ``open`` without its ``close`` runs to the end of the text (a truncated generation).
- ``regex`` covers every non-empty match of ``pattern``.
- ``rest`` covers every character no other rule covers, wherever it is declared. Without a
  ``rest`` rule, uncovered characters get an implicit role ``other`` (the last role id).
- ``visual`` covers no character: it tags *tokens* by a reference model's visual dependency,
  per batch, after the text rules (``probe.VisualRoles``); here its role only gets its id.

Role ids follow the order in which role names first appear among the rules.

Tokens get roles from characters through the tokenizer's offsets (``token_roles``): a
token takes the role of its first non-space character; a token made only of whitespace
takes the role of the next non-space character (or, at the very end, the previous one).
So every target token has exactly one role, whatever the tokenizer does with spaces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from percepdsl.ir import RoleRuleIR

OTHER = "other"  # implicit role of uncovered characters when there is no `rest` rule


@dataclass(frozen=True)
class RoleTagger:
    """Compiled role rules: ``tag(text)`` gives one role id per character."""

    rules: tuple[RoleRuleIR, ...]
    role_names: tuple[str, ...]
    rest_id: int  # role id for uncovered characters (`rest` rule or implicit `other`)

    @classmethod
    def from_rules(cls, rules: Sequence[RoleRuleIR | Mapping[str, object]]) -> RoleTagger:
        """Raises ``ValueError`` for rules the tagger cannot apply (a pydantic ``ValidationError``
        for a mapping that is not a rule)."""
        rules = [r if isinstance(r, RoleRuleIR) else RoleRuleIR.model_validate(r) for r in rules]
        names: list[str] = []
        rest_id = -1
        for rule in rules:
            kind, role = rule.kind, rule.role
            if not role:
                raise ValueError(f"role rule {rule!r}: needs a role name")
            if kind == "between" and not (rule.open and rule.close):
                raise ValueError(f"role rule {rule!r}: between needs open and close markers")
            if kind == "regex":
                re.compile(rule.pattern or "")  # fail early on a bad pattern
            if role not in names:
                names.append(role)
            if kind == "rest":
                if rest_id >= 0:
                    raise ValueError("at most one `rest` rule")
                rest_id = names.index(role)
        if rest_id < 0:
            if OTHER in names:
                raise ValueError(f"role name `{OTHER}` is reserved for uncovered text when there is no rest rule")
            names.append(OTHER)
            rest_id = len(names) - 1
        return cls(tuple(rules), tuple(names), rest_id)

    def tag(self, text: str) -> np.ndarray:
        """Role id of every character of ``text`` (int64 array, same length)."""
        roles = np.full(len(text), -1, dtype=np.int64)
        for rule in self.rules:
            if rule.kind in ("rest", "visual"):
                continue  # rest: applied last, it only takes what nothing else took; visual: per batch, by a model
            rid = self.role_names.index(rule.role)
            for start, end in _spans(rule, text):
                seg = roles[start:end]
                seg[seg < 0] = rid  # first rule wins
        roles[roles < 0] = self.rest_id
        return roles


def _spans(rule: RoleRuleIR, text: str) -> list[tuple[int, int]]:
    """Character spans a `between` or `regex` rule covers."""
    if rule.kind == "regex":
        return [m.span() for m in re.finditer(rule.pattern or "", text) if m.end() > m.start()]
    open_, close, markers = rule.open or "", rule.close or "", rule.markers
    spans, pos = [], 0
    while (start := text.find(open_, pos)) >= 0:
        inner = start + len(open_)
        stop = text.find(close, inner)
        end = len(text) if stop < 0 else stop + len(close)
        spans.append((start, end) if markers else (inner, len(text) if stop < 0 else stop))
        pos = end
    return spans


def token_roles(char_roles: np.ndarray, text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """One role id per token from per-character roles and the tokens' character offsets.

    ``text`` is the target text the offsets index into; ``char_roles`` may be shorter than
    ``text`` (e.g. it covers the response but not a chat template's end-of-turn marker):
    characters past its end take the role of its last non-space character.
    """
    n = len(text)
    roles = np.empty(n, dtype=np.int64)
    k = min(len(char_roles), n)
    roles[:k] = char_roles[:k]
    nonspace = np.fromiter((not c.isspace() for c in text), dtype=bool, count=n)
    ns_idx = np.flatnonzero(nonspace[:k])
    fill = int(char_roles[ns_idx[-1]]) if len(ns_idx) else (int(char_roles[-1]) if len(char_roles) else 0)
    roles[k:] = fill
    # next_ns[i]: first non-space index >= i (n if none); found by a reverse running minimum
    idx = np.where(nonspace, np.arange(n), n)
    next_ns = np.minimum.accumulate(idx[::-1])[::-1] if n else idx
    last_ns = int(np.flatnonzero(nonspace)[-1]) if nonspace.any() else -1
    out = []
    for start, _end in offsets:
        j = int(next_ns[start]) if start < n else n
        if j >= n:  # only whitespace from here to the end: the previous content's role
            out.append(int(roles[last_ns]) if last_ns >= 0 else fill)
        else:  # first non-space char inside the token, or (whitespace-only token) the next one
            out.append(int(roles[j]))
    return out
