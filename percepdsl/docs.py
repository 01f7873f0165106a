"""The language reference, generated from the catalogue.

`reference()` writes every built-in entry of `percepdsl/catalogue.py` (tasks, model kinds,
stage kinds and their settings, losses, schedules, reward terms, metrics, role rules, the
`eval`, `trainer` and `lora` blocks and the statement keywords) as one Markdown page, with
each setting's type, default, range, unit and doc as the catalogue states them, followed by the
grammar (`grammars/percep.lark`). The
documentation site builds its reference page from this function at build time
(`docs/hooks.py`), so the page cannot drift from the catalogue; `python -m percepdsl.docs`
prints it (`--out FILE` writes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from percepdsl.catalogue import Catalogue, Entry, ParamSpec
from percepdsl.parse import grammar_text

STAGE_KINDS = ("sft", "grpo")  # the `block` entries a `stage NAME = KIND { ... }` names

# (section title, anchor, kind, which entries of that kind, what the section is)
SECTIONS = (
    ("Tasks", "tasks", "task", None, "What `task NAME { ... }` can name: the data a spec trains and evaluates on."),
    ("Model kinds", "models", "model", None, 'What `model NAME { ... }` (or `model hf "path" { ... }`) can name.'),
    (
        "Stage kinds",
        "stages",
        "block",
        STAGE_KINDS,
        "What `stage NAME = KIND [from PARENT] { ... }` can name, with the settings of its block. Either kind's block may "
        "also hold `task { ... }`: some of the task's settings for that stage's training data (see each task below).",
    ),
    ("Losses", "losses", "loss", None, "The `loss = ...` of an `sft` stage: terms, weighted and added."),
    (
        "Schedules",
        "schedules",
        "schedule",
        None,
        "A learning rate, a loss weight or a reward weight may be a schedule over the stage's optimiser steps.",
    ),
    ("Reward terms", "rewards", "reward", None, "The terms of a `grpo` stage's `reward = ...` expression."),
    ("Metrics", "metrics", "metric", None, "What `eval { metrics = [...] }` and a grid's `report [...]` can name."),
    ("Role rules", "role-rules", "role_rule", None, "The rules of a `roles { NAME = RULE ... }` block, tried in order."),
    ("Other blocks", "blocks", "block", ("eval", "trainer", "lora"), "The blocks that are not stages."),
    ("Statements", "statements", "keyword", None, "The statements of spec and grid files."),
)


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _setting_row(p: ParamSpec) -> str:
    kind = p.describe_type()
    rng = p.describe_range()
    if rng:
        kind += f", {rng}"
    if p.unit and p.type != "px":  # a px size says its unit already
        kind += f" ({p.unit})"
    if p.variadic:
        kind += ", any number"
    default = "required" if p.required else ("—" if p.variadic else f"`{p.default_text()}`")
    doc = p.doc
    for value, why in p.refused:
        doc += f". Refused: `{value}` ({why})"
    return f"| `{p.name}` | {_cell(kind)} | {_cell(default)} | {_cell(doc)} |"


def _entry(e: Entry) -> list[str]:
    lines = [f"### `{e.name}`", "", e.doc, ""]
    if e.kind in ("task", "model", "reward", "loss", "schedule", "role_rule") and e.params:
        lines += [f"`{e.signature()}`" if e.kind not in ("task", "model") else "", ""]
    if e.params:
        lines += ["| setting | value | default | what it does |", "|---|---|---|---|"]
        lines += [_setting_row(p) for p in e.params]
        lines.append("")
    if e.kind == "task":
        own = ", ".join(f"`{p.name}`" for p in e.stage_settings())
        lines += [
            f"A stage's `task {{ ... }}` may set {own} for its own training data (the rest stay this block's; every stage is "
            "evaluated on the experiment's test items)."
            if own
            else "A stage cannot set settings of this task (no `task { ... }` in its stages).",
            "",
        ]
    for c in e.constraints:
        names = ", ".join(f"`{n}`" for n in c.params)
        lines += [f"Checked together: {names}" + (f" ({c.hint})." if c.hint else "."), ""]
    if e.kind == "reward" and not any(p.type == "reward" for p in e.params):  # a term, not a combinator such as gate
        lines += [
            "A label-free perception surrogate: its correlation with true perception correctness is reported."
            if e.surrogate
            else "Not a surrogate (it reads labels, or is the format check).",
            "",
        ]
    if e.impl:
        lines += [f"Implemented by `{e.impl}`.", ""]
    return [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]


def reference(cat: Catalogue | None = None) -> str:
    """The language reference page (Markdown) for the built-in catalogue (or `cat`)."""
    cat = cat or Catalogue()
    out = [
        "# Language reference",
        "",
        "Everything a spec can name, with every setting's type, default, range and meaning. This page is",
        "generated from the catalogue (`percepdsl/catalogue.py`) when the site is built, so it says what",
        "the checker accepts; `python -m percepdsl.docs` prints it. Entries added by installed plugins or",
        "registered from Python (`percepdsl.api.register_reward`) are not listed here; the language",
        "server's hover shows them. The syntax is described in the [language tour](language.md); the",
        "[grammar](#grammar) ends this page.",
        "",
        "A setting left out takes its default; `required` settings must be given. A value written",
        "`none` is accepted only where the type says so, and means what the setting's text says.",
        "",
        "Contents: " + " · ".join(f"[{title}](#{anchor})" for title, anchor, *_ in SECTIONS) + " · [Grammar](#grammar)",
        "",
    ]
    for title, anchor, kind, names, what in SECTIONS:
        entries = cat.entries(kind)
        if names is not None:
            entries = [e for e in entries if e.name in names]
        elif kind == "block":
            entries = [e for e in entries if e.name not in STAGE_KINDS]
        out += [f"## {title} {{#{anchor}}}", "", what, ""]
        if kind == "keyword":
            out += ["| statement | what it does |", "|---|---|"]
            out += [f"| `{e.name}` | {_cell(e.doc)} |" for e in entries]
            out.append("")
            continue
        for e in entries:
            out += _entry(e)
    out += [
        "## Grammar {#grammar}",
        "",
        "The LALR grammar of spec and grid files (`grammars/percep.lark`), as the parser reads it.",
        "",
        "```",
        grammar_text().rstrip(),
        "```",
    ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m percepdsl.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the reference here instead of printing it")
    args = parser.parse_args(argv)
    text = reference()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
