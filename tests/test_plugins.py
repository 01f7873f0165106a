"""Plugins extend the catalogue as data; checking never imports plugin code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _install_fake_plugin(site: Path, poisoned: bool) -> None:
    """A distribution on a private sys.path entry: dist-info with an entry point, and a package."""
    pkg = site / "poison_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('plugin code was executed')\n" if poisoned else "")
    (pkg / "percep_catalogue.toml").write_text((ROOT / "examples/plugin/percep_example_plugin/percep_catalogue.toml").read_text())
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
