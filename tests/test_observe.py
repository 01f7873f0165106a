"""What a run shows and records besides its results: loggers, the progress bar, the environment."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from realise import MICRO, compile_spec

from percepdsl.ir import content_hash
from percepdsl_runtime.observe import ENVIRONMENT_FILE, check_loggers, code_revision
from percepdsl_runtime.run import RunRefused, run

ROOT = Path(__file__).resolve().parents[1]
SPEC = (
    MICRO.replace("log_every = 1 }", "log_every = 1, loggers = [csv, tensorboard, wandb, mlflow] }").replace(
        "eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, max_new_tokens = 8, every = 2 }"
    )
    + "stage s = sft { steps = 4, batch = 2 }\n"
)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> tuple[Path, str]:
    """One micro run with every logger and the progress bar; its stderr."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # no network, no login
    mp.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("runs")
    ir = compile_spec(SPEC)
    assert ir.trainer.loggers == ["csv", "tensorboard", "wandb", "mlflow"]
    err: list[str] = []
    import io

    buf = io.StringIO()
    real = sys.stderr
    sys.stderr = buf  # where the bar and the echo write
    try:
        run_dir = run(ir, {"spec.pd": SPEC}, out, progress=True, echo=lambda m: print(m, file=sys.stderr))
    finally:
        sys.stderr = real
        mp.undo()
    err.append(buf.getvalue())
    return run_dir, err[0]


def test_every_logger_records_the_loss(logged_run) -> None:
    run_dir, _ = logged_run
    # TensorBoard: an event file per stage with the logged loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run_dir / "tensorboard" / "s" / "log0").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2, 3]
    # MLflow: a file store under the run directory, one run named after the stage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("micro")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.tags["mlflow.runName"] == f"{run_dir.name}/s" and mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "loss")] == [0, 1, 2, 3]
    # Weights & Biases, offline: a run directory with its history file
    (wrun,) = (run_dir / "wandb").glob("offline-run-*")
    assert any(wrun.glob("*.wandb"))
    # and the CSV every run keeps
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,") and len(rows) == 5


def test_the_progress_bar_shows_loss_and_throughput_and_evaluation_lines_do_not_break_it(logged_run) -> None:
    _, err = logged_run
    bars = [seg for seg in re.split(r"[\r\n]", err) if "it/s" in seg or "s/it" in seg]
    assert any("loss=" in b and "tok/s=" in b for b in bars), bars[-3:]
    # the evaluation line at step 2 starts a line of its own: tqdm cleared the bar first
    assert re.search(r"[\r\n]\[s step 2\] end_to_end=", err), err[-2000:]
    assert "[s step 2] end_to_end=" in err and not re.search(r"\]\[s step 2\]", err)


def test_the_run_records_versions_and_code_revision_outside_the_hash(logged_run) -> None:
    run_dir, _ = logged_run
    env = json.loads((run_dir / ENVIRONMENT_FILE).read_text())
    (start,) = env["starts"]
    pk = start["packages"]
    assert all(pk[p] for p in ("torch", "transformers", "trl", "peft", "lightning", "datasets", "percepdsl"))
    assert start["code"]["git"]["commit"] and len(start["code"]["git"]["commit"]) == 40  # tests run from a checkout
    ir = json.loads((run_dir / "ir.json").read_text())
    assert ir["hash"] == content_hash(compile_spec(SPEC)) and run_dir.name.endswith(ir["hash"])


def test_outside_a_checkout_the_revision_is_the_package_version(tmp_path: Path) -> None:
    pkg = tmp_path / "percepdsl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    rev = code_revision(pkg)
    assert rev == {"version": __import__("percepdsl").__version__}


def test_a_logger_without_its_package_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    why = check_loggers(["csv", "wandb", "tensorboard"])
    assert why is not None and "`wandb`" in why and "pip install -e '.[wandb]'" in why and "tensorboard" not in why.split("install")[0]
    with pytest.raises(RunRefused, match=re.escape(".[wandb]")):
        run(compile_spec(SPEC), {"spec.pd": SPEC}, tmp_path, progress=False, echo=lambda _: None)
    assert not list(tmp_path.glob("*/stages"))  # nothing trained

    from typer.testing import CliRunner

    from percepdsl.cli import app

    spec = tmp_path / "s.pd"
    spec.write_text(SPEC)
    res = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "pip install -e '.[wandb]'" in res.output and "Traceback" not in res.output


def test_loggers_are_a_checked_list_with_completion_and_hover(tmp_path: Path) -> None:
    import percepdsl.lsp.features as F
    from percepdsl.check import check_text

    base = "experiment x\ntask sudoku {}\nstage s = sft { steps = 1 }\n"
    ok = check_text(base + "trainer { loggers = [tensorboard, wandb] }\n")
    assert ok.ir.trainer.loggers == ["csv", "tensorboard", "wandb"]  # csv always runs: one IR for what runs the same
    bad = check_text(base + "trainer { loggers = [tensorbord] }\n")
    (d,) = [d for d in bad.diagnostics if d.is_error]
    assert d.code == "unknown-choice" and d.hint == "did you mean `tensorboard`?" and (d.span.line, d.span.column) == (4, 22)

    path = tmp_path / "x.pd"
    text = "trainer { loggers = [csv, "
    items = [i.label for i in F.complete(F.Project(F.Doc(text, path, path.as_uri())), len(text), F.Encoder())]
    assert items == ["csv", "tensorboard", "wandb", "mlflow"]
    text = "trainer { loggers = [csv, mlflow] }"
    hover = F.hover(F.Project(F.Doc(text, path, path.as_uri())), text.index("mlflow"), F.Encoder()).contents.value
    assert "one of the choices of `loggers`" in hover and "= [csv]" in hover
