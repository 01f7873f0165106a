"""Plugins extend the catalogue as data; checking never imports plugin code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _install_fake_plugin(site: Path, poisoned: bool, extra: str = "") -> None:
    """A distribution on a private sys.path entry: dist-info with an entry point, and a package;
    `extra`: more TOML for its catalogue file."""
    pkg = site / "poison_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('plugin code was executed')\n" if poisoned else "")
    (pkg / "percep_catalogue.toml").write_text((ROOT / "examples/plugin/percep_example_plugin/percep_catalogue.toml").read_text() + extra)
    dist = site / "poison_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: poison-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[percepdsl.catalogue]\npoison = poison_plugin:percep_catalogue.toml\n")


SPEC = textwrap.dedent(
    """\
    experiment p
    task graph_coloring {}
    stage base = sft { steps = 1 }
    stage rl = grpo from base { steps = 1, reward = 0.5 * outcome + 0.5 * brevity(max_words = 40) }
    """
)


def _check(site: Path, spec: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        from percepdsl.check import check_file
        res = check_file({str(spec)!r})
        print([(d.code, d.message, d.hint) for d in res.diagnostics])
        rl = res.ir.stage("rl")
        print([(t.name, t.params, t.impl) for t in rl.reward.terms()])
        assert "poison_plugin" not in sys.modules
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_plugin_entries_are_read_without_running_plugin_code(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install_fake_plugin(site, poisoned=True)
    spec = tmp_path / "p.pd"
    spec.write_text(SPEC)
    proc = _check(site, spec)
    assert proc.returncode == 0, proc.stderr
    assert "('brevity', {'max_words': 40}, 'percep_example_plugin.rewards:brevity')" in proc.stdout


def test_plugin_parameters_are_checked(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install_fake_plugin(site, poisoned=True)
    spec = tmp_path / "p.pd"
    spec.write_text(SPEC.replace("max_words = 40", "max_word = 0"))
    proc = _check(site, spec)
    assert "unknown-argument" in proc.stdout and "did you mean `max_words`" in proc.stdout


def test_without_the_plugin_its_names_are_unknown(tmp_path: Path) -> None:
    from percepdsl.check import check_text

    res = check_text(SPEC, "p.pd")
    assert [d.code for d in res.diagnostics] == ["unknown-function"]


def test_example_plugin_reward_runs() -> None:
    """The plugin term follows the GRPO reward signature: one call per group, one value per completion."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "examples" / "plugin"))
    try:
        from percep_example_plugin.rewards import brevity
    finally:
        sys.path.pop(0)
    group = SimpleNamespace(completions=["a " * 10, "a " * 30, "a " * 50])
    assert brevity(group, max_words=20) == [1.0, 0.5, 0.0]


def test_a_plugin_loss_is_refused_where_it_is_used(tmp_path: Path) -> None:
    """The runtime computes only the built-in losses: a plugin loss is a located error at its
    use and a problem of the plugin, never a crash (it was `KeyError: 'groups'`)."""
    site = tmp_path / "site"
    _install_fake_plugin(site, poisoned=True)
    toml = site / "poison_plugin" / "percep_catalogue.toml"
    toml.write_text(
        toml.read_text()
        + '\n[[entry]]\nname = "focal"\nkind = "loss"\ndoc = "a focal loss"\nimpl = "poison_plugin:focal"\n'
        + '\n[[entry]]\nname = "mean"\nkind = "loss"\ndoc = "shadows the built-in"\n'
    )
    spec = tmp_path / "p.pd"
    spec.write_text(
        SPEC.replace(
            "stage base = sft { steps = 1 }",
            "stage base = sft { steps = 1, loss = focal() }\nstage b2 = sft { steps = 1, loss = mean(answer) }",
        )
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "percepdsl", "check", str(spec)], capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1
    assert "p.pd:3:38: error[plugin-unsupported]: `focal` is a loss from plugin `poison-plugin`" in proc.stdout
    assert "percepdsl computes only its own losses: token_mean, mean, ngdiff" in proc.stdout
    assert proc.stdout.count("error[") == 1  # the built-in `mean` is not replaced by the plugin's
    assert "warning: plugin `poison-plugin`: loss `focal` is not supported" in proc.stderr
    assert "loss `mean` is not supported" in proc.stderr


# a plugin task: `count` decides which instances exist, `style` only how they are written
DOTS = """
[[entry]]
name = "dots"
kind = "task"
doc = "count the dots"
impl = "poison_plugin:Dots"

[[entry.params]]
name = "count"
type = "int"
default = 3
min = 1
doc = "dots per image"

[[entry.params]]
name = "style"
type = "choice"
default = "plain"
choices = ["plain", "verbose"]
stage = true
doc = "how the reasoning is written"
"""


def _check_specs(site: Path, *specs: Path) -> list:
    """Check each spec with the plugin on sys.path: each one's diagnostics (code, message, hint) and
    its stages' own task settings, then the catalogue's plugin problems."""
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(site)!r})
        from percepdsl.catalogue import default_catalogue
        from percepdsl.check import check_file
        for spec in {[str(s) for s in specs]!r}:
            res = check_file(spec)
            print(json.dumps([[d.code, d.message, d.hint] for d in res.diagnostics]))
            print(json.dumps({{s.name: s.task.params for s in res.ir.stages if s.task is not None}} if res.ir is not None else None))
        print(json.dumps(default_catalogue().problems))
        assert "poison_plugin" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_a_plugin_task_setting_with_stage_true_may_be_set_by_a_stage(tmp_path: Path) -> None:
    """`stage = true` in a plugin's TOML lets a stage's `task { ... }` set that setting; a setting
    without it is the experiment's task block's alone (`stage-task`), as for a built-in task."""
    site = tmp_path / "site"
    _install_fake_plugin(site, poisoned=True, extra=DOTS)
    ok, bad = tmp_path / "ok.pd", tmp_path / "bad.pd"
    head = "experiment p\ntask dots { count = 4 }\n"
    ok.write_text(head + "stage base = sft { steps = 1, task { style = verbose } }\nstage b2 = sft from base { steps = 1 }\n")
    bad.write_text(head + "stage base = sft { steps = 1, task { count = 5 } }\n")
    ok_diags, ok_tasks, bad_diags, _, problems = _check_specs(site, ok, bad)
    assert ok_diags == [] and ok_tasks == {"base": {"count": 4, "style": "verbose"}}
    ((code, message, hint),) = bad_diags
    assert code == "stage-task" and message.startswith("stage `base` cannot set `count`: a stage may change how the task's items")
    assert hint == "set `count` in the `task dots` block; a stage may set: style"
    assert problems == []


@pytest.mark.parametrize("flag", ["stage", "required", "nullable"])
def test_a_malformed_plugin_flag_is_a_plugin_problem_that_names_it(tmp_path: Path, flag: str) -> None:
    """A flag written as a string (`stage = "yes"`) was read by truth value: "yes", "false" and "no"
    all turned it on. It is a problem of the plugin, naming the plugin, entry, setting and flag;
    the entry is left out, so a spec that uses it gets a located error, and checking goes on."""
    site = tmp_path / "site"
    _install_fake_plugin(site, poisoned=True, extra=DOTS.replace("stage = true", f'{flag} = "false"'))
    spec = tmp_path / "p.pd"
    spec.write_text("experiment p\ntask dots { count = 4 }\nstage base = sft { steps = 1, task { style = verbose } }\n")
    diags, _, problems = _check_specs(site, spec)
    assert [d[:2] for d in diags] == [["unknown-task", "unknown task `dots`"]], diags
    assert problems == [f"plugin `poison-plugin`: dots.style: `{flag}` must be true or false, not 'false'"]


def test_stage_marks_only_a_tasks_settings(tmp_path: Path) -> None:
    """`stage = true` on a reward term's parameter means nothing (no stage sets a reward's
    arguments in its `task` block): a plugin problem rather than a flag silently ignored."""
    site = tmp_path / "site"
    bad = '\n[[entry]]\nname = "short"\nkind = "reward"\ndoc = "d"\nimpl = "poison_plugin:short"\n'
    bad += '\n[[entry.params]]\nname = "n"\ntype = "int"\ndefault = 3\nstage = true\n'
    _install_fake_plugin(site, poisoned=True, extra=bad)
    spec = tmp_path / "p.pd"
    spec.write_text(SPEC)
    problems = _check_specs(site, spec)[-1]
    assert problems == [
        "plugin `poison-plugin`: short.n: `stage` marks a task setting that a stage's `task { ... }` may set; a reward has none"
    ]
