"""What a run reads from disk is known by content (`runtime/inputs.py`): a checkpoint retrained in
place under the same path is not taken for the one a finished run, a resumed run or the stage cache
was trained from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SPEC = """experiment ckpt
seed 0
include "{root}/specs/common/roles.pd"
task graph_coloring {{ nodes = 4, reasoning = brief, train = 16, test = 2 }}
model hf "{model}"
stage a = sft {{ steps = 1, batch = 2 }}
eval {{ test = 2, max_new_tokens = 4 }}
"""


def _checkpoint(path: Path, seed: int) -> None:
    """A tiny random checkpoint of a real architecture, written (again) at `path`."""
    from percepdsl.check import check_file
    from percepdsl_runtime.models import build_tiny
    from percepdsl_runtime.tasks import build_task

    task = build_task(check_file(ROOT / "specs/sft_smoke.pd").ir.task, seed=0)
    build_tiny(task.vocabulary(), image=64, width=32, depth=1, heads=2, vision_width=32, vision_depth=1, seed=seed, save_dir=path)


def test_a_checkpoint_retrained_in_place_is_not_taken_for_the_old_one(tmp_path: Path) -> None:
    """Same spec, same path, other weights: the complete run is refused (naming the checkpoint and
    `--out`) instead of reported as this spec's result; its stages get another identity, so the stage
    cache cannot hand them out; an interrupted run is not resumed on them; another --out runs."""
    from percepdsl.api import run_spec
    from percepdsl.check import check_file
    from percepdsl_runtime import stagecache
    from percepdsl_runtime.run import RunRefused

    ckpt, spec = tmp_path / "ckpt", tmp_path / "s.pd"
    _checkpoint(ckpt, seed=0)
    spec.write_text(SPEC.format(root=ROOT, model=ckpt))
    ir = check_file(spec).ir
    first = run_spec(spec, out=tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").glob("ckpt-*")
    recorded = json.loads((run_dir / "inputs.json").read_text())
    assert recorded["model"]["path"] == str(ckpt)
    config_sha = hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
    assert len(recorded["model"]["sha256"]) == 64 and recorded["model"]["sha256"] != config_sha
    assert run_spec(spec, out=tmp_path / "runs") == first  # unchanged inputs: complete, not redone
    before = stagecache.stage_identity(ir, ir.stage("a"), threads=1)

    _checkpoint(ckpt, seed=1)  # retrained in place: same files, other weights
    with pytest.raises(
        RunRefused, match=rf"complete run with other inputs .*; changed since: the model at {ckpt} \(SHA-256 .*another --out"
    ):
        run_spec(spec, out=tmp_path / "runs")
    assert stagecache.stage_identity(ir, ir.stage("a"), threads=1) != before

    (run_dir / "summary.json").unlink()  # the same run directory, now an interrupted run
    with pytest.raises(RunRefused, match=r"holds a run started with other inputs"):
        run_spec(spec, out=tmp_path / "runs", resume=True)

    fresh = run_spec(spec, out=tmp_path / "other")
    assert fresh["status"] == "complete"
    (fresh_dir,) = (tmp_path / "other").glob("ckpt-*")
    assert json.loads((fresh_dir / "inputs.json").read_text())["model"]["sha256"] != recorded["model"]["sha256"]


def test_a_spec_reading_nothing_from_disk_has_no_inputs() -> None:
    """The tiny model and built-in tasks read no file: nothing to record or to add to an identity."""
    from percepdsl.check import check_file
    from percepdsl_runtime import inputs

    assert inputs.current(check_file(ROOT / "specs/sft_smoke.pd").ir) == {}


def test_a_directory_digest_follows_content_not_python_caches(tmp_path: Path) -> None:
    from percepdsl_runtime.inputs import digest

    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    d0 = digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"compiled")
    (tmp_path / "pkg" / ".hidden").write_text("editor state")
    assert digest(tmp_path / "pkg") == d0
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert digest(tmp_path / "pkg") != d0
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "other.py").write_text("")
    assert digest(tmp_path / "pkg") != d0


def test_a_hugging_face_cache_blob_is_known_by_its_name(tmp_path: Path) -> None:
    """A hub snapshot links to blobs named by their content's hash: the name is taken, so a large
    cached checkpoint is not read."""
    from percepdsl_runtime.inputs import digest

    name = "ab" * 32
    blob = tmp_path / "blobs" / name
    blob.parent.mkdir()
    blob.write_bytes(b"not what the name says: proves the file was not read")
    snap = tmp_path / "snapshots" / "c0"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    assert digest(snap / "model.safetensors") == name


def test_plugin_source_and_python_reward_functions_are_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin `impl`'s package is digested by its files (found without importing it); a reward
    term registered from Python by its function's source."""
    from percepdsl.api import register_reward, unregister_reward
    from percepdsl.check import check_file
    from percepdsl_runtime import inputs

    site = tmp_path / "site"
    (site / "myplug").mkdir(parents=True)
    (site / "myplug" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (site / "myplug" / "tasks.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    ir = check_file(ROOT / "specs/sft_smoke.pd").ir
    ir = ir.model_copy(update={"task": ir.task.model_copy(update={"impl": "myplug:Task"})})
    assert inputs.locate(ir) == {"plugin myplug": site / "myplug"}
    before = inputs.digests(ir)
    (site / "myplug" / "tasks.py").write_text("CHANGED = True\n")
    assert inputs.digests(ir) != before

    def short(completions, **kwargs):
        return [1.0] * len(completions)

    def long(completions, **kwargs):
        return [float(len(c)) for c in completions]

    grpo = (ROOT / "specs/grpo_smoke.pd").read_text().replace("0.5 * outcome", "0.5 * length_bonus")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "common").symlink_to(ROOT / "specs" / "common")
    (tmp_path / "specs" / "rl.pd").write_text(grpo)
    try:
        register_reward("length_bonus", short)
        res = check_file(tmp_path / "specs" / "rl.pd")
        assert res.ok, res.diagnostics
        rl = res.ir
        a = inputs.digests(rl)["python reward length_bonus"]
        register_reward("length_bonus", long)
        assert inputs.digests(rl)["python reward length_bonus"] != a
    finally:
        unregister_reward("length_bonus")


def test_a_grid_whose_cells_ran_with_other_inputs_is_refused_before_running(tmp_path: Path) -> None:
    """`percep grid` skips complete cells: one whose checkpoint has changed since is named (exit 2)
    instead of counted as done."""
    from percepdsl_runtime import inputs
    from percepdsl_runtime.grid import GridError
    from percepdsl_runtime.grid.plan import plan_grid

    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt, seed=0)
    template = SPEC.format(root=ROOT, model=ckpt).replace("seed 0\n", "seed 0\nparam lr: float = 0.01\n")
    (tmp_path / "t.pd").write_text(template.replace("batch = 2 }", "batch = 2, lr = lr }"))
    (tmp_path / "g.pd").write_text('grid g\ntemplate "t.pd"\naxis lr = [0.01, 0.02]\n')
    plan = plan_grid(tmp_path / "g.pd", out=tmp_path / "grid")
    assert len(plan.cells) == 2
    for cell in plan.cells:  # as if they had run: complete, each recording what it read
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "summary.json").write_text(json.dumps({"status": "complete"}))
        (cell.run_dir / inputs.INPUTS_FILE).write_text(json.dumps({"model": {"path": str(ckpt), "sha256": inputs.digest(ckpt)}}))
    assert [c.status for c in plan_grid(tmp_path / "g.pd", out=tmp_path / "grid").cells] == ["done", "done"]
    _checkpoint(ckpt, seed=1)
    with pytest.raises(GridError, match=rf"2 cells of grid `g` ran with other inputs .*another --out.*\n  cell .*the model at {ckpt}"):
        plan_grid(tmp_path / "g.pd", out=tmp_path / "grid")
