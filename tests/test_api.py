"""The Python API (`percepdsl.api`): specs and grids from Python, reward terms registered from Python."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

from percepdsl import api
from percepdsl.catalogue import default_catalogue
from percepdsl.check import check_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "api" / "train_from_python.py"
GRPO = """\
experiment x
task graph_coloring { nodes = 4, reasoning = brief, train = 16, test = 2 }
stage s = sft { steps = 2 }
stage g = grpo from s { steps = 2, reward = %s }
"""


@pytest.fixture(autouse=True)
def _forget_registrations():
    yield
    for name in ("concise", "seen", "bad", "knobs"):
        api.unregister_reward(name)


def test_a_registered_term_is_known_to_the_checker_with_its_parameters() -> None:
    res = check_text(GRPO % "0.5 * knobs(limit = 3, strict = true) + 0.5 * outcome")
    assert not res.ok and [d.code for d in res.diagnostics if d.is_error] == ["unknown-function"]

    def knobs(completions, *, limit=10, strict=False, **kwargs):
        """Counts words."""
        return [0.0] * len(completions)

    entry = api.register_reward("knobs", knobs)
    assert entry.impl == "percepdsl.api:python_rewards.knobs" and entry.source == "python" and entry.doc == "Counts words."
    assert default_catalogue().get("reward", "knobs") is entry
    ir = check_text(GRPO % "0.5 * knobs(limit = 3, strict = true) + 0.5 * outcome").ir
    assert ir.stage("g").reward.terms()[0].params == {"limit": 3, "strict": True}
    bad = check_text(GRPO % "knobs(limit = 1.5)")
    assert [d.code for d in bad.diagnostics if d.is_error] == ["type"]  # limit is an int: its default's type
    api.unregister_reward("knobs")
    assert default_catalogue().get("reward", "knobs") is None


@pytest.mark.parametrize(
    "fn, error, message",
    [
        (lambda texts: [], TypeError, "must take `completions`"),
        (lambda completions: [], TypeError, "must accept `\\*\\*kwargs`"),
        (lambda completions, solution, **kw: [], TypeError, "parameter `solution` has no default"),
        (lambda completions, scale=2.0, **kw: [], TypeError, "must be keyword-only"),
    ],
)
def test_a_function_that_cannot_be_a_term_is_refused(fn, error, message) -> None:
    with pytest.raises(error, match=message):
        api.register_reward("bad", fn)
    assert default_catalogue().get("reward", "bad") is None


def test_built_in_names_cannot_be_replaced() -> None:
    with pytest.raises(ValueError, match="`outcome` already exists"):
        api.register_reward("outcome", lambda completions, **kw: [])


def test_run_spec_trains_with_a_python_term_and_a_scheduled_weight(tmp_path: Path) -> None:
    """The example (examples/api/train_from_python.py) run as a user would: its term is called with
    TRL's arguments, its scheduled weight follows the stage's steps, and the summary comes back."""
    seen: list[dict] = []

    def spy(completions, *, max_words=40, **kwargs):
        seen.append({"completions": completions, "max_words": max_words, **kwargs})
        return [1.0] * len(completions)

    mod = runpy.run_path(str(EXAMPLE))
    concise = mod["concise"]
    assert concise(["<answer> c1 </answer>", "a b c"], max_words=2, prompts=["q", "q"]) == [0.0, 0.0]
    assert concise(["<answer> </answer>"], max_words=2) == [1.0]
    summary = mod["main"](tmp_path)
    run_dir = summary["run_dir"]
    assert run_dir.parent == tmp_path and (run_dir / "summary.json").exists() and summary["status"] == "complete"
    assert set(summary["final"]) >= {"end_to_end", "perception", "reasoning"}
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["stage"] == "rl"]
    key = "reward_weight/concise(max_words=12)"
    assert [float(r[key]) for r in rows] == pytest.approx([0.1, 0.1 + 0.4 / 3, 0.1 + 0.8 / 3], rel=1e-6)
    assert all(r["reward/concise(max_words=12)"] != "" for r in rows)

    # the same term under a spy: what a TRL-style function receives
    api.register_reward("concise", spy)
    again = api.run_spec(mod["SPEC"], set={"seed": 2}, out=tmp_path)
    assert again["run_dir"] != run_dir and seen
    call = seen[0]
    assert set(call) == {"completions", *api.REWARD_KWARGS, "max_words"} and call["max_words"] == 12
    n = len(call["completions"])
    assert n == 4 and all(len(call[k]) == n for k in api.REWARD_KWARGS)
    assert call["instance"][0]["task"] == "graph_coloring" and call["prompts"][0].startswith("color the graph")


def test_run_spec_refuses_a_spec_that_does_not_check(tmp_path: Path) -> None:
    spec = tmp_path / "bad.pd"
    spec.write_text(GRPO % "0.5 * nonexistent + 0.5 * outcome")
    with pytest.raises(api.SpecError) as info:
        api.run_spec(spec, out=tmp_path)
    assert "unknown-reward" in str(info.value) and "bad.pd:4" in str(info.value)
    assert [d.code for d in info.value.diagnostics] == ["unknown-reward"]
    with pytest.raises(api.SpecError, match="a `set` value must be"):
        api.check(spec, set={"x": [1]})
    for x in (float("nan"), float("-inf")):  # not "a literal value, not an expression" (repr gives the name `nan`)
        with pytest.raises(api.SpecError, match="a `set` value must be a finite number"):
            api.check(spec, set={"x": x})
    assert not any(tmp_path.glob("x-*"))


def test_plan_grid_and_run_grid_from_python(tmp_path: Path) -> None:
    plan = api.plan_grid(ROOT / "specs" / "grids" / "smoke.pd", out=tmp_path / "g")
    assert len(plan.cells) == 4 and {c.status for c in plan.cells} == {"pending"}
    with pytest.raises(api.SpecError, match="swept by an axis"):
        api.plan_grid(ROOT / "specs" / "grids" / "smoke.pd", set={"lam": 0.5})
    fake = [sys.executable, str(ROOT / "tests" / "fake_run.py")]
    with pytest.raises(api.SpecError, match="matches none of the arms"):  # checked before anything runs
        api.run_grid(ROOT / "specs" / "grids" / "smoke.pd", out=tmp_path / "g", launcher=fake, baseline="lam=0.5")
    outcome = api.run_grid(ROOT / "specs" / "grids" / "smoke.pd", out=tmp_path / "g", launcher=fake, baseline="lam=0.25")
    assert outcome.status == "complete" and outcome.exit_code == 0 and len(outcome.table.rows) == 2
    assert (tmp_path / "g" / "paired.json").exists()


def test_run_grid_refuses_a_template_with_a_python_term(tmp_path: Path) -> None:
    api.register_reward("seen", lambda completions, **kw: [0.0] * len(completions))
    (tmp_path / "t.pd").write_text("param a: float = 0.5\n" + GRPO % "a * seen + (1 - a) * outcome")
    (tmp_path / "g.pd").write_text('grid g\ntemplate "t.pd"\naxis a = [0.25, 0.75]\n')
    with pytest.raises(api.SpecError, match="reward term\\(s\\) `seen` registered from Python"):
        api.run_grid(tmp_path / "g.pd", out=tmp_path / "out")
    assert not (tmp_path / "out" / "cells").exists()
