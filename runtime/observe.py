"""What a run shows and records besides its results: the loggers of the `trainer` block, the
progress bar, and the environment it ran in.

- **Loggers** (`trainer { loggers = [csv, tensorboard, wandb, mlflow] }`): Lightning's own
  `CSVLogger` (always: `metrics.csv` is built from it), `TensorBoardLogger`, `WandbLogger` and
  `MLFlowLogger` (metric names with `.` for `/`), one run per stage, all under the run directory (`tensorboard/<stage>/`,
  `wandb/`, `mlruns/` as an MLflow file store). `check_loggers` refuses, before any training, a
  logger whose package is not installed, naming the extra that installs it. Weights & Biases
  follows its own settings (`WANDB_MODE=offline` writes under `wandb/` and needs no network or
  login).
- **Progress** (`RunProgress`): Lightning's tqdm bar on stderr with the loss and the training
  throughput (tokens per second of training step time: the tokens an SFT forward reads, the
  completion tokens a GRPO step samples); messages printed while it shows (evaluation lines) go
  through tqdm's external-write mode, so they land on their own lines and the bar is redrawn
  below them.
- **Environment** (`record_environment`): `environment.json`, one entry per start of the run
  (a resume adds one): the package versions and the code revision of percepdsl (`git describe`
  of its checkout, else its installed version). It lies outside the IR, so it never changes the
  run's content hash.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

from percepdsl.io import write_json_atomic

#: logger name → (module that must import, the extra that installs it)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
#: packages whose versions a run records (missing ones are recorded as null)
PACKAGES = (
    "percepdsl",
    "torch",
    "transformers",
    "trl",
    "peft",
    "lightning",
    "datasets",
    "tokenizers",
    "accelerate",
    "safetensors",
    "pydantic",
    "numpy",
    "pillow",
    "tensorboard",
    "wandb",
    "mlflow-skinny",
    "mlflow",
)
ENVIRONMENT_FILE = "environment.json"


# ---- loggers ---------------------------------------------------------------------------------------


def check_loggers(loggers: list[str]) -> str | None:
    """Why the listed loggers cannot run here (a package missing: the extra to install), or None."""
    missing = [name for name in loggers if name in LOGGER_PACKAGES and not _installed(LOGGER_PACKAGES[name][0])]
    if not missing:
        return None
    extras = ",".join(LOGGER_PACKAGES[m][1] for m in missing)
    return (
        f"`trainer {{ loggers = [...] }}` lists {', '.join(f'`{m}`' for m in missing)}, whose package is not installed; "
        f"install it with: pip install -e '.[{extras}]' (or pip install 'percepdsl[{extras}]')"
    )


def _installed(module: str) -> bool:
    """Whether `module` can be imported (found, not imported; a module blocked in sys.modules is not)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def stage_loggers(loggers: list[str], run_dir: Path, experiment: str, stage: str, attempt: int) -> list[Any]:
    """The Lightning loggers of one stage. `attempt` counts the stage's starts (a resumed stage
    logs into a new version, as the CSV logs do)."""
    from lightning.pytorch import loggers as pl_loggers

    sdir = run_dir / "stages" / stage
    version = f"log{attempt}"
    out: list[Any] = [pl_loggers.CSVLogger(str(sdir), name="", version=version)]  # first: trainer.log_dir is its directory
    for name in loggers:
        if name == "tensorboard":
            out.append(pl_loggers.TensorBoardLogger(str(run_dir / "tensorboard"), name=stage, version=version, default_hp_metric=False))
        elif name == "wandb":
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            out.append(
                pl_loggers.WandbLogger(
                    name=f"{run_dir.name}/{stage}" + (f" ({version})" if attempt else ""),
                    project=experiment,
                    group=run_dir.name,
                    save_dir=str(run_dir),
                    job_type=stage,
                )
            )
        elif name == "mlflow":
            # MLflow 3 keeps its file store "in maintenance mode" behind this switch; a file store
            # under the run directory needs no server and no database package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "experiment not found, creating it"
            out.append(
                _mlflow_logger()(
                    experiment_name=experiment,
                    run_name=f"{run_dir.name}/{stage}" + (f" ({version})" if attempt else ""),
                    tracking_uri=(run_dir / "mlruns").absolute().as_uri(),
                    tags={"percep.run_dir": run_dir.name, "percep.stage": stage},
                )
            )
    return out


def open_loggers(loggers: list[Any]) -> str | None:
    """Start every logger's run now, before training (a W&B login, a tracking store that cannot be
    written): why one cannot start, or None."""
    for logger in loggers:
        try:
            _ = logger.experiment
        except Exception as exc:  # any failure of a third-party logger is a refusal, not a traceback
            return f"the {type(logger).__name__} cannot start: {type(exc).__name__}: {exc}"
    return None


def _mlflow_logger() -> type:
    """Lightning's MLFlowLogger, with `/` in metric names written as `.`: the file store keeps a
    metric in a file named after it, so `loss` and `loss/perception` cannot both exist."""
    from lightning.pytorch.loggers import MLFlowLogger

    class Logger(MLFlowLogger):
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            super().log_metrics({k.replace("/", "."): v for k, v in metrics.items()}, step)

    return Logger


def close_loggers(loggers: list[Any]) -> None:
    """End what Lightning leaves open after a fit: the stage's W&B run (the next stage starts its own)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


# ---- progress ----------------------------------------------------------------------------------------


class RunProgress(TQDMProgressBar):
    """Lightning's progress bar on stderr, showing the loss and the tokens per second of training.

    Throughput is tokens / training-step time: each module counts the tokens of its steps in
    `tokens_processed`; the time is that of the steps themselves (batch start to batch end),
    so an evaluation between steps does not lower it. Put it first among the callbacks, so that
    its batch end is the step's end."""

    def __init__(self) -> None:
        super().__init__()
        self._t0: float | None = None
        self._seconds = 0.0
        self._tokens0 = 0

    def init_train_tqdm(self):
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(  # Lightning's, on stderr: stdout stays for what a command prints as its result
            desc=self.train_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._seconds, self._tokens0 = 0.0, int(getattr(pl_module, "tokens_processed", 0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None:
            self._seconds += time.perf_counter() - self._t0
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        loss = trainer.callback_metrics.get("loss")
        if loss is not None:
            out["loss"] = f"{float(loss):.4g}"
        tokens = int(getattr(pl_module, "tokens_processed", 0)) - self._tokens0
        if self._seconds > 0 and tokens > 0:
            out["tok/s"] = f"{tokens / self._seconds:,.0f}"
        return out

    def wrap(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """`echo` that prints above the bar: the bar is cleared, the message printed, the bar redrawn."""
        from tqdm import tqdm

        def write(msg: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                echo(msg)

        return write


# ---- environment ------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_revision(package_dir: Path | None = None) -> dict[str, Any]:
    """The revision of the percepdsl code that runs: `git describe --always --dirty --tags` and the
    commit when it runs from a git checkout of the project, else the installed package version."""
    import percepdsl

    pkg = Path(package_dir or Path(percepdsl.__file__).parent).resolve()
    out: dict[str, Any] = {"version": percepdsl.__version__}

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=pkg, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # a checkout of this project, not some other repository that happens to contain site-packages
    if top and (Path(top) / pkg.name / "__init__.py").resolve() == pkg / "__init__.py":
        out["git"] = {"describe": git("describe", "--always", "--dirty", "--tags"), "commit": git("rev-parse", "HEAD"), "root": top}
    return out


def record_environment(run_dir: Path, resumed: bool) -> dict[str, Any]:
    """Append this start of the run to `environment.json` (written atomically) and return the entry."""
    path = run_dir / ENVIRONMENT_FILE
    try:
        starts = json.loads(path.read_text(encoding="utf-8")).get("starts", [])
    except (OSError, ValueError, AttributeError):
        starts = []
    entry = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "resumed": resumed,
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "code": code_revision(),
    }
    write_json_atomic(path, {"starts": [*starts, entry]})
    return entry
