"""`percep run`: execute a compiled experiment, stage by stage, into a run directory.

Read top to bottom, a run is:

1. **prepare** — build the task, the model and the encoder, and refuse bad input
   before any training (a missing model path, a tokenizer that cannot encode the
   task vocabulary, a role that matches no target token): `RunRefused`, exit 2;
2. **stages** — for each stage in topological order: start from the parent's
   weights, train under a Lightning `Trainer`, evaluate three ways (periodically
   and at the end), save the model as a Hugging Face directory (`save_pretrained`
   of the model or PEFT adapter and of the processor) and mark the stage done
   (`--jobs N`: the stages whose inputs are done train side by side, each in its
   own process: `stagepool.py`);
3. **report** — `summary.json` (final metrics, per-stage metrics and deltas,
   diagnostics), `metrics.csv`, `eval.jsonl`, plots and `report.md`.

Everything a run leaves is written atomically. A stage writes `resume.ckpt`
(Lightning's full training state) every `RESUME_EVERY` steps, so a killed run
continues with `--resume` where it stopped; the data order is a pure function of
(seed, step), so the resumed run sees exactly the batches it would have seen.

With `trainer { devices = n, num_nodes = m }` a run has n·m processes (`ranks.py`): every
rank runs `run`, rank 0 alone prepares the run directory, writes, evaluates and reports,
and the others build the same task and model privately, train, and take every decision
from rank 0 (`Ranks.broadcast`); evaluation runs on rank 0 while the others wait at a
barrier. `run` returns None on the other ranks.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from percepdsl.io import (
    LockHeld,
    atomic_path,
    hold_lock,
    json_default,
    os_error_text,
    read_json,
    remove_stale_temporaries,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from percepdsl.ir import ExperimentIR, SFTStageIR, Stage, content_hash, named_roles

from . import inputs, stagecache
from .ranks import LaunchError, Ranks, launched_as_rank_zero, others_wait_for_this_one, start, usable_cpus

RESUME_EVERY = int(
    os.environ.get("PERCEP_RESUME_EVERY", 50)
)  # steps between resume checkpoints: ≈1–2 s of tiny-model training lost at most
PREFLIGHT_ITEMS = 32  # training items encoded before training to check role coverage
HEADLINE = ("end_to_end", "perception", "reasoning")


class RunRefused(Exception):
    """Bad input found before training started (exit 2)."""


class RunFailed(Exception):
    """The run broke while running (exit 3); finished stages and the last checkpoint are kept."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training (exit 130); finished stages and the last checkpoint are
    kept, and `--resume` continues."""


@dataclass
class Context:
    ir: ExperimentIR
    run_dir: Path
    task: Any
    loaded: Any
    encoder: Any
    init_weights: Path
    echo: Callable[[str], None]
    token_share: dict[str, float] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)
    threads: int = 1  # CPU threads every stage of this process trains with (`stage_threads`)
    # the tasks of the stages whose `task { ... }` sets some of the task's settings, by stage name
    # (`training_task`), and the token share per role of their training items (diagnostics)
    stage_tasks: dict[str, Any] = field(default_factory=dict)
    stage_token_share: dict[str, dict[str, float]] = field(default_factory=dict)
    # the trainable parameters of each stage that freezes a part (`freeze`), found by rank 0's preflight
    stage_trainable: dict[str, int] = field(default_factory=dict)

    def training_task(self, stage: Stage) -> Any:
        """The task a stage trains on (its SFT items, its GRPO prompts): its own, else the experiment's.
        Evaluation always reads `task`, the experiment's: every stage is scored on the same test items."""
        return self.stage_tasks.get(stage.name, self.task)


def stage_threads(ir: ExperimentIR, jobs: int = 1) -> int:
    """The CPU threads a stage trains and evaluates with: `trainer { threads }`; when the spec leaves
    it open, torch's default (the cores) in a one-at-a-time run, the cores divided among the workers
    under `--jobs`. It is part of what a stage computes: with another thread count some reductions
    split differently and round differently (the quickstart's stages after 30 steps: weights apart by
    up to 2e-3), so each stage records it and, when the spec leaves it open, its identity holds it."""
    if ir.trainer.threads:
        return ir.trainer.threads
    if jobs > 1:
        return max(1, usable_cpus() // jobs)
    import torch

    return torch.get_num_threads()


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no library banners, tips or load bars."""
    import logging

    import transformers
    from huggingface_hub.utils import disable_progress_bars

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*reproducibility.*")
    # every resume is mid-epoch (a stage is one epoch); the batch streams start at the restored step
    # (sft.StepStream, grpo.PromptSampler), so Lightning's "can cause unreliable results" is not so here
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


def run_dir_for(ir: ExperimentIR, out: Path) -> Path:
    return Path(out) / f"{ir.name}-{content_hash(ir)}"


# ---- 1. prepare ---------------------------------------------------------------------------------


def prepare(ir: ExperimentIR, run_dir: Path, echo: Callable[[str], None], ranks: Ranks = Ranks(), private: bool = False) -> Context:
    """Task, model and encoder of the run. Rank 0 builds the model into `init/` and checks the
    roles; other ranks, and the stage workers of `--jobs` (`private`), build theirs in a private
    directory and write nothing."""
    import tempfile

    from .encoding import Encoder, EncodingError
    from .models import check_vocabulary, save_pretrained_dir
    from .observe import check_loggers
    from .plugins import ImplError
    from .tasks import build_task

    if (why := check_loggers(ir.trainer.loggers)) is not None:
        raise RunRefused(why)
    try:
        task = build_task(ir.task, seed=ir.seed)
        # a stage's own task: the experiment's instances (same seed, instance settings and splits), written its way
        stage_tasks = {st.name: build_task(st.task, seed=ir.seed) for st in ir.stages if st.task is not None}
    except (ImplError, ValueError) as exc:
        raise RunRefused(f"cannot build task `{ir.task.name}`: {exc}") from exc
    if (why := _unfilled(ir, task)) is not None:
        raise RunRefused(why)
    vocab = task.vocabulary()
    if stage_tasks:  # one tokenizer for every stage: the words any stage's task writes (fillers only one writes)
        vocab = sorted(set(vocab).union(*(t.vocabulary() for t in stage_tasks.values())))
    if ranks.is_zero and not private:
        loaded = build_model(ir, task, run_dir / "init", vocabulary=vocab)
    else:  # its weights are rank 0's (Ranks.sync_weights), or the parent stage's, once a stage starts
        with tempfile.TemporaryDirectory(prefix="percep-rank-") as scratch:
            loaded = build_model(ir, task, Path(scratch) / "init", vocabulary=vocab)
        if loaded.path is not None and Path(loaded.path).is_relative_to(scratch):
            # built where it is gone now: it is the model rank 0 built into init/ (the same IR and seed),
            # whose files a stage's directory takes along (the tiny model's marker: `save_pretrained_dir`)
            loaded = dataclasses.replace(loaded, path=run_dir / "init")
    missing = check_vocabulary(loaded, vocab)
    if missing:
        shown = ", ".join(f"`{w}`" for w in missing[:8]) + (" …" if len(missing) > 8 else "")
        raise RunRefused(
            f"the tokenizer of {ir.model.path or ir.model.kind} cannot encode {len(missing)} word(s) of the "
            f"`{ir.task.name}` vocabulary: {shown}"
        )
    try:
        encoder = Encoder(loaded, ir.roles)  # items whole; an sft stage cuts its own (`build_stage`)
    except EncodingError as exc:
        raise RunRefused(str(exc)) from exc
    init = run_dir / "init"  # the parent of root stages; a tiny model was built here already
    if private or not ranks.is_zero:
        return Context(ir, run_dir, task, loaded, encoder, init, echo, {}, ranks, stage_tasks=stage_tasks)
    token_share = _preflight_roles(ir, task, encoder)
    _preflight_forward(ir, task, loaded, encoder)
    if "reasoning" in ir.eval.metrics:  # a_r forces p* as the model was trained on it
        _preflight_counterfactual(task, encoder, str(ir.model.path or ir.model.kind))
    stage_share = {name: _preflight_roles(ir, t, encoder, f"stage `{name}` (its `task`)") for name, t in stage_tasks.items()}
    for stage in ir.stages:  # a stage that cuts its items must keep a token of every role too
        if isinstance(stage, SFTStageIR) and stage.max_length is not None:
            own = stage_tasks.get(stage.name, task)
            _preflight_roles(ir, own, encoder.truncating(stage.max_length), f"stage `{stage.name}` (`max_length = {stage.max_length}`)")
    trainable = _preflight_freeze(ir, loaded)
    if not init.exists():  # written whole or not at all (atomic_dir)
        save_pretrained_dir(loaded, init)
    echo(
        f"model: {ir.model.kind} ({loaded.num_parameters() / 1e6:.2f}M parameters, "
        f"{loaded.num_parameters(trainable_only=True) / 1e6:.2f}M trainable)" + (f", {ranks.world} ranks" if ranks.world > 1 else "")
    )
    return Context(
        ir,
        run_dir,
        task,
        loaded,
        encoder,
        init,
        echo,
        token_share,
        ranks,
        stage_tasks=stage_tasks,
        stage_token_share=stage_share,
        stage_trainable=trainable,
    )


def build_model(ir: ExperimentIR, task: Any, save_dir: Path, vocabulary: list[str] | None = None) -> Any:
    """The model through its kind's catalogue `impl` (built-in or plugin), called as
    `impl(model_ir, vocabulary=, image=, seed=, save_dir=) -> LoadedModel`; `image` is the
    side of the task's images, `vocabulary` the task's (or the words of every stage's task,
    `prepare`'s). Any failure is a refusal that names the model kind."""
    from .models import LoadedModel, ModelLoadError
    from .plugins import ImplError, resolve

    kind = ir.model.kind
    if not ir.model.impl:
        raise RunRefused(f"model kind `{kind}` has no implementation (`impl`) in its catalogue entry")
    try:
        impl = resolve(ir.model.impl)
        loaded = impl(
            ir.model,
            vocabulary=task.vocabulary() if vocabulary is None else vocabulary,
            image=task.sample("train", 0).image.size[0],
            seed=ir.seed,
            save_dir=save_dir,
        )
    except (ImplError, ModelLoadError) as exc:
        raise RunRefused(str(exc)) from exc
    except Exception as exc:  # a plugin's builder failing is bad input to this run, not a crash
        raise RunRefused(f"model `{kind}` ({ir.model.impl}) failed to build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, LoadedModel):
        raise RunRefused(f"model `{kind}` ({ir.model.impl}) returned {type(loaded).__name__}, not a LoadedModel")
    return loaded


def _unfilled(ir: ExperimentIR, task: Any) -> str | None:
    """A batch (on every rank) or an eval test count the task's splits cannot fill, else None. The
    checker refuses them where it knows the counts (a built-in task's `train` and `test`); a dataset's
    rows and a plugin task's splits are counted here. Else the sft sampler makes the batch the whole
    split, the grpo sampler stops in the first step, and the evaluation takes the whole test split."""
    ranks = ir.trainer.devices * ir.trainer.num_nodes
    train, test = task.size("train"), task.size("test")
    for stage in ir.stages:
        if stage.batch * ranks > train:
            what = f"`batch = {stage.batch}`" + (f" on each of {ranks} ranks" if ranks > 1 else "")
            return f"stage `{stage.name}`: {what} is more than the {train} training items of the task"
    if ir.eval.test is not None and ir.eval.test > test:
        return f"eval: `test = {ir.eval.test}` is more than the {test} test items of the task"
    return None


def _preflight_roles(ir: ExperimentIR, task: Any, encoder: Any, cut: str | None = None) -> dict[str, float]:
    """Encode a few targets: every declared role must own tokens; returns the token share per role.
    `cut`: the stage whose `max_length` the encoder truncates at (named in a refusal)."""
    import torch

    from .encoding import EncodingError

    counts = torch.zeros(len(encoder.role_names), dtype=torch.long)
    n = min(PREFLIGHT_ITEMS, task.size("train"))
    for i in range(n):
        s = task.sample("train", i)
        try:
            roles = encoder.encode_train(s.query, s.image, s.response)["role_ids"]
        except EncodingError as exc:
            raise RunRefused(f"{cut}: {exc}" if cut else str(exc)) from exc
        counts += torch.bincount(roles[roles >= 0], minlength=len(encoder.role_names))
    declared = {r.role for r in ir.roles if r.kind != "visual"}  # a visual role is tagged per batch, by a model
    empty = [name for name, c in zip(encoder.role_names, counts.tolist()) if c == 0 and name in declared]
    if empty:
        sample = task.sample("train", 0).response
        raise RunRefused(
            f"role(s) {', '.join(f'`{r}`' for r in empty)} match no target token in the first {n} training "
            f"items{' of ' + cut if cut else ''}; check the roles block against a target such as: {sample[:160]}"
        )
    total = max(int(counts.sum()), 1)
    return {name: c / total for name, c in zip(encoder.role_names, counts.tolist())}


def _preflight_freeze(ir: ExperimentIR, loaded: Any) -> dict[str, int]:
    """Each stage's `freeze` on the loaded model, before anything trains: a part its architecture has
    no module for (`models.part_parameters`), or a freeze that leaves no parameter to train (with LoRA:
    adapters in the frozen parts only), is refused here, not by a traceback when the stage starts.
    Returns the trainable parameter count of each stage that freezes a part; the model is left as
    loaded."""
    from .models import ModelPartError, freeze_parts

    counts: dict[str, int] = {}
    try:
        for stage in ir.stages:
            if not stage.freeze:
                continue
            try:
                counts[stage.name] = freeze_parts(loaded, stage.freeze)
            except ModelPartError as exc:
                raise RunRefused(f"stage `{stage.name}`: `freeze = [{', '.join(stage.freeze)}]`: {exc}") from exc
            if counts[stage.name] == 0:
                raise RunRefused(
                    f"stage `{stage.name}`: `freeze = [{', '.join(stage.freeze)}]` leaves no parameter of "
                    f"{ir.model.path or ir.model.kind} to train (with LoRA, only the adapters train: are they all in the frozen parts?); "
                    "freeze fewer parts, or adapt modules of a part that trains (`lora { target_modules = ... }`)"
                )
    finally:
        freeze_parts(loaded, [])
    return counts


def _preflight_counterfactual(task: Any, encoder: Any, model: str, n: int = 8) -> None:
    """The counterfactual prompts of the first `n` test items: a tokenizer that merges across the
    end of p* (`Encoder.prefix_tokens`) is refused here, before anything trains, not by the first
    evaluation at a stage's end."""
    from .encoding import EncodingError

    for i in range(min(n, int(task.size("test")))):
        s = task.sample("test", i)
        try:
            encoder.prefix_tokens(s.query, task.counterfactual_prefix(s), s.response, s.image is not None)
        except EncodingError as exc:
            raise RunRefused(
                f"the tokenizer of {model!r} cannot force test item {i}'s p* as it was trained, so a_r would continue p* "
                f"from tokens the model was never trained on: {exc}"
            ) from exc


def _preflight_forward(ir: ExperimentIR, task: Any, loaded: Any, encoder: Any) -> None:
    """One no-grad forward of the first training item's prompt: a checkpoint whose processor does
    not fit its model (an image expanded into more or fewer tokens than the vision tower gives
    features, a token id past the embedding) is refused here, naming the checkpoint, not by a
    traceback from the first training step or generation."""
    import torch

    from .encoding import collate, model_inputs

    s = task.sample("train", 0)
    batch = model_inputs(collate([encoder.encode_prompt(s.query, s.image)], encoder.pad_token_id))
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**batch)
    except Exception as exc:  # noqa: BLE001 - any failure here is the checkpoint's, before anything trained
        where = ir.model.path or ir.model.kind
        raise RunRefused(
            f"the model in {str(where)!r} cannot read an encoded training item: {type(exc).__name__}: "
            f"{str(exc)[:300].rstrip('.')}; its processor (image tokens per image, tokenizer) must match the model's config"
        ) from exc
    finally:
        model.train(was_training)


# ---- 2. stages --------------------------------------------------------------------------------------


def stage_dir(ctx: Context, stage: Stage) -> Path:
    return ctx.run_dir / "stages" / stage.name


def run_stage(ctx: Context, stage: Stage, progress: bool) -> dict[str, Any]:
    """Train one stage (resuming if it was interrupted) and evaluate it; returns its record."""
    import torch

    from .evaluate import EvalConfig
    from .models import ModelLoadError, ModelPartError, load_weights, save_pretrained_dir
    from .observe import RunProgress, close_loggers, open_loggers, stage_loggers
    from .sft import build_trainer

    ranks = ctx.ranks
    sdir = stage_dir(ctx, stage)
    parent = stage_dir(ctx, ctx.ir.stage(stage.parent)) / "model" if stage.parent else ctx.init_weights
    damaged = None
    if ranks.is_zero:
        sdir.mkdir(parents=True, exist_ok=True)
        try:
            load_weights(ctx.loaded, parent)
        except ModelLoadError as exc:
            redo = f"{parent.parent if stage.parent else parent}"  # the parent stage's directory, or init/
            if stage.parent and stagecache.enabled():  # published there as hard links: the same damaged files
                entry = stagecache.cache_entry(ctx.run_dir, identity(ctx, ctx.ir.stage(stage.parent)))
                redo += f" and its stage-cache entry {entry}" if entry.exists() else ""
            damaged = f"stage `{stage.name}` cannot start: {exc}; delete {redo} and run again with --resume to rebuild it"
    if (damaged := ranks.broadcast(damaged)) is not None:  # every rank stops, not only rank 0
        raise RunFailed(damaged)
    ranks.sync_weights(ctx.loaded.model)  # before the module is built: a KL reference copies these weights

    try:
        module, datamodule = build_stage(ctx, stage)
    except ModelPartError as exc:  # rank 0's preflight refuses these first; a stage built elsewhere, here
        raise RunRefused(f"stage `{stage.name}`: `freeze = [{', '.join(stage.freeze)}]`: {exc}") from exc
    tr = ctx.ir.trainer
    ev = ctx.ir.eval
    every = stage.eval_every or ev.every
    bar = RunProgress() if progress else None  # evaluation lines print above it
    evaluator = StageEval(ctx, stage, EvalConfig.from_ir(ev), every, echo=bar.wrap(ctx.echo) if bar else ctx.echo)
    torch.set_num_threads(ctx.threads)
    ckpt = sdir / "resume.ckpt"
    loggers: list[Any] = []  # only rank 0 logs
    if ranks.is_zero:
        attempt = len(list(sdir.glob("log*")))  # a resumed stage logs into a new file; write_metrics_csv merges them
        loggers = stage_loggers(tr.loggers, ctx.run_dir, ctx.ir.name, stage.name, attempt)
    # every rank learns of a logger that cannot start: the others would wait for rank 0 in the first step
    if (why := ranks.broadcast(open_loggers(loggers))) is not None:
        close_loggers(loggers)
        raise RunRefused(f"stage `{stage.name}`: {why}")
    try:
        trainer = build_trainer(
            stage.steps,
            objective=getattr(module, "objective", None),
            precision=tr.precision,
            accelerator=tr.accelerator,
            devices=tr.devices,
            num_nodes=tr.num_nodes,
            strategy=tr.strategy,
            accumulate=tr.accumulate if stage.kind == "sft" else 1,
            # the bar first (its batch end is the step's end: throughput excludes evaluations); then
            # the guard: a non-finite step never reaches an evaluation or a checkpoint
            callbacks=[*([bar] if bar else []), FiniteLoss(stage.name), evaluator, ResumeCheckpoint(ckpt, RESUME_EVERY)],
            logger=loggers or False,
            log_every_n_steps=tr.log_every,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            default_root_dir=str(sdir),
        )
    except ValueError as exc:
        raise RunRefused(f"stage `{stage.name}`: {exc}") from exc
    if str(trainer.precision) != tr.precision:  # Lightning swaps fp16 AMP for bf16 on the CPU (a warning only)
        close_loggers(loggers)
        raise RunRefused(
            f'trainer: `precision = "{tr.precision}"` does not run on {trainer.accelerator.__class__.__name__.replace("Accelerator", "")}: '
            f'Lightning would train in `{trainer.precision}`; write `precision = "{trainer.precision}"` or train on a GPU'
        )
    resume = ranks.broadcast(ckpt.exists())
    if resume and not all(seen := ranks.gather(ckpt.exists())):
        blind = [r for r, ok in enumerate(seen) if not ok]
        raise RunRefused(
            f"--resume: rank(s) {blind} cannot read {ckpt}; every rank loads the checkpoint, so a run on several "
            "nodes resumes only from a run directory on a filesystem every node shares"
        )
    if resume and (why := ranks.broadcast(damaged_checkpoint(ckpt) if ranks.is_zero else None)) is not None:
        raise RunFailed(
            f"stage `{stage.name}`: its resume checkpoint {ckpt} is damaged ({why}); delete it to train the stage "
            f"again from its start ({parent}), the same steps and batches"
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    from .rewards import RewardError

    def kept() -> str:
        return f"the last good checkpoint is {ckpt}" if ckpt.exists() else f"the stage started from {parent}"

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if resume else None)
    except RewardError as exc:  # raised before the update of the bad step: no bad weights were saved
        raise RunFailed(f"stage `{stage.name}` at step {trainer.global_step}: {exc}; {kept()}") from exc
    except RunFailed as exc:
        raise RunFailed(f"{exc}; {kept()}") from exc
    except SystemExit:  # Lightning ends fit on Ctrl-C with exit(1), on SIGTERM with SIGTERMException (exit 0)
        by = "SIGTERM" if trainer.received_sigterm else "Ctrl-C (SIGINT)"
        raise RunInterrupted(f"stage `{stage.name}` stopped at step {trainer.global_step} by {by}; {kept()}") from None
    finally:
        close_loggers(loggers)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    digests = ranks.weights_digests(ctx.loaded.model) if ranks.world > 1 else []
    if len(set(digests)) > 1:  # every rank sees this: all stop
        raise RunFailed(f"stage `{stage.name}`: the ranks ended with different weights (SHA-256 {digests}); nothing was saved")
    if ranks.is_zero:
        save_pretrained_dir(ctx.loaded, sdir / "model")
    final = evaluator.evaluate_now(trainer.global_step, module, datamodule, final=True)
    if not ranks.is_zero:
        return {}
    diagnostics = evaluator.history[-1]["diagnostics"]
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
        # this process's CPU time (all its threads), less moved than the wall time by other processes on
        # the cores (not immune: shared caches): for the training (with any evaluation during it), and for
        # the whole stage
        "train_cpu_seconds": round(train_cpu, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "threads": ctx.threads,
        # what trained: the parameters the optimiser took (the stage's `freeze` left out)
        "trainable_parameters": module.trainable_parameters,
        "metrics": final,
        "history": evaluator.history,
        "diagnostics": diagnostics,
    }
    if digests:
        record["ranks"] = {"world": ranks.world, "weights_sha256": digests}
    write_json_atomic(sdir / "done.json", record)
    ckpt.unlink(missing_ok=True)
    return record


def damaged_checkpoint(path: Path) -> str | None:
    """Why a resume checkpoint cannot be loaded, or None. It is written atomically, so only the disk
    or a hand breaks one; torch saves a zip archive, whose CRCs are checked here without unpickling
    (a truncated or overwritten file made `trainer.fit` end in an UnpicklingError traceback)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if bad is None else f"the CRC of its member {bad} does not match"


def build_stage(ctx: Context, stage: Stage):
    """The Lightning module and data module of a stage, from its typed IR as it is; its training
    items (sft) or prompts (grpo) are its task's (`Context.training_task`)."""
    from .sft import SFTDataModule, SFTModule

    task = ctx.training_task(stage)
    if stage.kind == "grpo":
        from .grpo import build_grpo

        return build_grpo(ctx.loaded, ctx.encoder, task, stage, ctx.ir.seed, grad_clip=ctx.ir.trainer.clip, visual=visual_roles(ctx, stage))
    module = SFTModule(ctx.loaded, stage, ctx.encoder.role_names, grad_clip=ctx.ir.trainer.clip, visual=visual_roles(ctx, stage))
    datamodule = SFTDataModule(
        task,
        ctx.encoder.truncating(stage.max_length),  # this stage's own cut (none: whole items)
        batch_size=stage.batch,
        seed=ctx.ir.seed,
        bucket=stage.batching == "length",
        packing=stage.packing,
    )
    return module, datamodule


def visual_roles(ctx: Context, stage: Stage) -> Any:
    """The `visual(...)` role rules a stage trains on (its loss names their roles; see
    ``percepdsl.ir.named_roles``), with their frozen reference models: the stage's start model
    (the weights loaded when the stage is built: its parent's) or a finished earlier stage's saved
    weights. None when the stage names no visual role (the rule then tags nothing there)."""
    import copy
    import dataclasses

    from .models import load_weights
    from .probe import VisualRoles, blank_like

    names = ctx.encoder.role_names
    rules = [(names.index(r.role), r) for r in ctx.ir.roles if r.kind == "visual" and r.role in named_roles(stage)]
    if not rules:
        return None
    refs: dict[tuple[str | None, int], Any] = {}
    for _, r in rules:
        if (r.reference, r.refresh) not in refs:
            model = copy.deepcopy(ctx.loaded.model).eval().requires_grad_(False)
            if r.reference is not None:
                load_weights(dataclasses.replace(ctx.loaded, model=model), stage_dir(ctx, ctx.ir.stage(r.reference)) / "model")
            refs[r.reference, r.refresh] = model
    sample = ctx.task.sample("train", 0)
    blank = ctx.encoder.encode_prompt(sample.query, blank_like(sample.image))["pixel_values"]  # one white image
    rest = next((names.index(r.role) for r in ctx.ir.roles if r.kind == "rest"), len(names) - 1)  # else the implicit `other`
    return VisualRoles(rules, refs, rest, blank)


def _stage_diagnostics(ctx: Context, stage: Stage, module: Any, datamodule: Any, module_diagnostics: dict[str, Any]) -> dict[str, Any]:
    """Token and loss share per role (of the stage's training items), per-role gradient norms and their
    cosines, on one fixed batch; a module's own statistics (GRPO's reward diagnostics) instead where there is none."""
    out: dict[str, Any] = {"token_share": ctx.stage_token_share.get(stage.name, ctx.token_share)}
    if not hasattr(datamodule, "dataset") or datamodule.dataset is None:
        return out | module_diagnostics
    import torch

    from .encoding import collate
    from .sft import per_role_grad_norms, role_losses

    items = [datamodule.dataset[i] for i in range(min(16, len(datamodule.dataset)))]
    batch = collate(items, ctx.encoder.pad_token_id)
    if getattr(module, "visual", None) is not None:  # the stage's visual roles, as its training steps tag them
        batch = module.visual.tag(batch)
    with torch.no_grad():
        sums, counts = role_losses(ctx.loaded.model, batch, len(ctx.encoder.role_names))
    total = float(sums.sum()) or 1.0
    out["loss_share"] = {n: float(s) / total for n, s in zip(ctx.encoder.role_names, sums)}
    out["role_loss"] = {n: float(s) / max(int(c), 1) for n, s, c in zip(ctx.encoder.role_names, sums, counts) if int(c)}
    out.update(per_role_grad_norms(module, batch))
    return out


class StageEval(L.Callback):
    """Three-way evaluation every N steps and at the stage end, on rank 0; the other ranks wait
    at a barrier meanwhile (they would otherwise wait in the next step's gradient all-reduce).

    Its history of evaluation points is part of the resume checkpoint (`state_dict`): a resumed
    stage's done.json lists the points evaluated before the checkpoint too, and what is computed
    across the points (GRPO's `checkpoint_coupling`) is the uninterrupted stage's. The last point's
    headline metrics are logged again at every batch end (Lightning repeats a value logged from a
    callback in every later row until it is logged again, but does not checkpoint it), so the rows
    of a resumed stage's loggers carry the values an uninterrupted stage's carry."""

    def __init__(self, ctx: Context, stage: Stage, cfg: Any, every: int | None, echo: Callable[[str], None] | None = None):
        self.ctx, self.stage, self.cfg, self.every = ctx, stage, cfg, every
        self.echo = echo or ctx.echo  # through the progress bar while it shows
        self.history: list[dict[str, Any]] = []
        self.last = 0  # the optimiser step at the last batch end

    def state_dict(self) -> dict[str, Any]:
        # JSON text: plain data for torch.load(weights_only=True); NaN and infinities kept as such
        return {"history": json.dumps(self.history, default=json_default)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = json.loads(state_dict.get("history", "[]"))

    def on_train_start(self, trainer, pl_module) -> None:
        self.last = trainer.global_step  # a resumed stage: the points before it were evaluated

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, last = trainer.global_step, self.last
        self.last = step
        metrics = None
        if self.every and passed(last, step, self.every) and 0 < step < self.stage.steps:
            metrics = self.evaluate_now(step, pl_module, trainer.datamodule)
        elif self.history:  # the last point's values again (see the class doc)
            metrics = self.history[-1]
        if metrics is not None:
            pl_module.log_dict({f"eval/{k}": float(metrics[k]) for k in (*HEADLINE, "visual_dependency") if metrics.get(k) is not None})

    def evaluate_now(self, step: int, module: Any, datamodule: Any, final: bool = False) -> dict[str, Any] | None:
        """Metrics on the test split, and the diagnostics (loss share, per-role gradient norms
        and cosines) at the same point; both go into the stage's history. Every rank calls it;
        rank 0 evaluates, the others get None."""
        from .evaluate import eval_seed, evaluate
        from .generation import eval_mode
        from .rewards import checkpoint_coupling

        ctx, ev = self.ctx, self.ctx.ir.eval
        module_diagnostics = module.diagnostics() if hasattr(module, "diagnostics") else {}  # gathered from every rank
        window = module.diag.window() if hasattr(module, "diag") else None  # GRPO: reward and term means since the last point
        if not ctx.ranks.is_zero:
            ctx.ranks.barrier()
            return None
        with eval_mode(ctx.loaded.model):  # the experiment's task, whatever the stage trains on: the same test items for every stage
            res = evaluate(ctx.loaded, ctx.encoder, ctx.task, "test", ev.test, self.cfg.seeded(eval_seed(ctx.ir.seed, step)))
            if "visual_dependency" in ev.metrics:  # the probe: teacher-forced, no labels beyond the reference text
                from .probe import PROBE_ITEMS, probe

                vd = probe(ctx.loaded, ctx.encoder, ctx.task, "test", min(ev.test or PROBE_ITEMS, PROBE_ITEMS))
                res.metrics.update(visual_dependency=vd.metric(), **vd.flat())
        tagged = [{"stage": self.stage.name, "step": step, "final": final, **r} for r in res.records]
        write_jsonl_atomic(ctx.run_dir / "stages" / self.stage.name / f"eval-{step:06d}.jsonl", tagged)
        entry = {"step": step, **{k: v for k, v in res.metrics.items() if not isinstance(v, list)}, "seconds": round(res.seconds, 1)}
        entry["slot_errors"] = res.metrics.get("slot_errors")
        entry["diagnostics"] = _stage_diagnostics(ctx, self.stage, module, datamodule, module_diagnostics)
        if window:
            entry["reward_window"] = window
            entry["diagnostics"] |= checkpoint_coupling([*self.history, entry])  # up to this point
        self.history.append(entry)
        self.echo(
            f"[{self.stage.name} step {step}] "
            + "  ".join(f"{k}={res.metrics.get(k):.3f}" for k in (*HEADLINE, "visual_dependency") if res.metrics.get(k) is not None)
            + f"  ({res.seconds:.0f}s, n={res.metrics.get('n')})"
        )
        ctx.ranks.barrier()
        return res.metrics


class FiniteLoss(L.Callback):
    """Stop the stage at the first non-finite training loss (of any rank: all stop together)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("loss")
        bad = loss is not None and not math.isfinite(float(loss))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            what = f"is {float(loss)}" if loss is not None and not math.isfinite(float(loss)) else "is not finite on another rank"
            raise RunFailed(f"stage `{self.stage}`: the training loss {what} at step {trainer.global_step}")


def passed(last: int, step: int, every: int) -> bool:
    """Whether the optimiser steps since the last batch end (`last` → `step`) reached a multiple of
    `every`. A batch end is not always a step's: under `accumulate = k` a step ends every k-th batch
    (the others see the same step again), and a grpo batch with `updates = u` takes u steps (its batch
    ends see every u-th step only); the point is taken at the first batch end on or past it, once."""
    return step // every > last // every


class ResumeCheckpoint(L.Callback):
    """The full training state (weights, optimiser, loop position) every N steps, written atomically,
    at the end of an optimiser step (`passed`): never mid-accumulation, never twice for one step."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.last = path, every, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last, self.last = self.last, trainer.global_step
        if passed(last, trainer.global_step, self.every) and trainer.global_step < trainer.max_steps:
            # Every rank calls save_checkpoint (it synchronises them); only global rank 0 writes the
            # file, so only rank 0 renames it into place.
            if trainer.is_global_zero:
                with atomic_path(self.path) as tmp:
                    trainer.save_checkpoint(str(tmp))
            else:
                trainer.save_checkpoint(str(self.path))


# ---- 3. report ---------------------------------------------------------------------------------------


def summarize(ctx: Context, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    prev: str | None = None  # a stage without a parent is compared with the stage before it
    for st in ctx.ir.stages:
        rec = records[st.name]
        m = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float)) or v is None}
        entry: dict[str, Any] = {
            "kind": st.kind,
            "parent": st.parent,
            "steps": rec["steps"],
            "train_seconds": rec["train_seconds"],
            # None in a stage cached before they were recorded
            "train_cpu_seconds": rec.get("train_cpu_seconds"),
            "cpu_seconds": rec.get("cpu_seconds"),
            "frozen": list(st.freeze),
            "trainable_parameters": rec.get("trainable_parameters"),  # None in a stage cached before it was recorded
            "metrics": m,
        }
        start = st.parent or prev
        if start is not None:
            base = records[start]["metrics"]
            entry["delta_from"] = start
            entry["delta"] = {k: (m[k] - base[k]) for k in HEADLINE if m.get(k) is not None and base.get(k) is not None}
        if rec.get("reused_from"):  # trained by another run (the stage cache): which, and under what identity
            entry["reused_from"] = rec["reused_from"]
        entry["slot_errors"] = rec["metrics"].get("slot_errors")
        entry["diagnostics"] = rec["diagnostics"]
        stages[st.name] = entry
        prev = st.name
    last = ctx.ir.stages[-1].name
    return {
        "experiment": ctx.ir.name,
        "hash": content_hash(ctx.ir),
        "status": "complete",
        "seed": ctx.ir.seed,
        "params": ctx.ir.params,
        "final": {k: stages[last]["metrics"].get(k) for k in ("end_to_end", "perception", "perception_partial", "reasoning", "format_ok")},
        "final_stage": last,
        "stages": stages,
        "diagnostics": {"token_share": ctx.token_share, **{k: v for k, v in stages[last]["diagnostics"].items() if k != "token_share"}},
    }


def write_metrics_csv(ctx: Context) -> None:
    """One CSV of every logged step of every stage (`stage` column first). Steps logged
    again after a resume replace the rows the interrupted attempt logged for them."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    keys: list[str] = ["stage"]
    for st in ctx.ir.stages:
        for path in sorted(stage_dir(ctx, st).glob("log*/metrics.csv"), key=lambda p: int(p.parent.name[3:] or 0)):
            text = path.read_text()
            # Lightning appends its rows; a kill during a flush leaves a last line cut short, whose
            # step or values would be wrong: only lines a newline ends are rows
            for row in csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1])):
                rows[(st.name, row.get("step", ""))] = {"stage": st.name, **row}
                keys += [k for k in row if k not in keys]
    with atomic_path(ctx.run_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows.values())


def merge_eval_jsonl(ctx: Context) -> None:
    parts = sorted((ctx.run_dir / "stages").glob("*/eval-*.jsonl"))
    order = {st.name: i for i, st in enumerate(ctx.ir.stages)}
    parts.sort(key=lambda p: (order.get(p.parent.name, 99), p.name))
    write_text_atomic(ctx.run_dir / "eval.jsonl", "".join(p.read_text() for p in parts))


def write_plots(ctx: Context) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for st in ctx.ir.stages:
        hist = json.loads((stage_dir(ctx, st) / "done.json").read_text())["history"]
        for key, style in zip(HEADLINE, ("-o", "-s", "-^")):
            xs = [offset + h["step"] for h in hist if h.get(key) is not None]
            ys = [h[key] for h in hist if h.get(key) is not None]
            if xs:
                ax.plot(xs, ys, style, label=f"{key} ({st.name})", markersize=4)
        offset += st.steps
        ax.axvline(offset, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step (stages concatenated)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{ctx.ir.name}: a, a_p, a_r over training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(ctx.run_dir / "curves.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_reward_plot(ctx: Context) -> None:
    """``rewards.png`` for runs with GRPO stages: each reward term's mean, and the correlations of
    the total reward (and of each surrogate term) with perception and reasoning correctness, at
    every logged step (``metrics.csv``)."""
    grpo = {st.name for st in ctx.ir.stages if st.kind == "grpo"}
    if not grpo:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (ctx.run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] in grpo]
    offsets, offset = {}, 0
    for st in ctx.ir.stages:
        offsets[st.name], offset = offset, offset + st.steps
    cols = list(rows[0]) if rows else []
    panels = (
        ("reward (mean per step)", [c for c in cols if c == "reward" or c.startswith("reward/")]),
        ("Pearson r with correctness", [c for c in cols if "corr" in c and "corr_groups" not in c]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(offsets[r["stage"]] + int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), "--" if key.endswith("_within") else "-", label=key, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step (stages concatenated)")
        if ax.get_legend_handles_labels()[0]:  # a panel can be empty (every correlation undefined)
            ax.legend(fontsize=6)
    fig.suptitle(f"{ctx.ir.name}: GRPO rewards and reward coupling")
    fig.tight_layout()
    with atomic_path(ctx.run_dir / "rewards.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def stage_table(summary: dict[str, Any]) -> list[str]:
    """The stages side by side, from `summary.json`: a, a_p, a_r after each stage and Δ from the stage
    it started from (its parent, else the stage before it). A Markdown table whose columns are padded
    to line up, so the same lines serve report.md and the end of `percep run` on a terminal."""

    def f(x: Any, sign: str = "") -> str:
        return "–" if x is None else f"{x:{sign}.3f}" if isinstance(x, float) else str(x)

    head = ["stage", "kind", "from", "steps", "a", "a_p", "a_r", "Δa", "Δa_p", "Δa_r"]
    rows = [
        [name, st["kind"], st.get("delta_from") or "–", str(st["steps"])]
        + [f(st["metrics"].get(k)) for k in HEADLINE]
        + [f(st.get("delta", {}).get(k), "+") for k in HEADLINE]
        for name, st in summary["stages"].items()
    ]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = [i >= 3 for i in range(len(head))]  # numbers right-aligned

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, width, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(width, right)) + "|"
    return [line(head), rule, *map(line, rows)]


def _task_changes(ir: ExperimentIR, stage: Stage) -> dict[str, Any]:
    """The task settings a stage trains with that differ from the experiment's."""
    ours, theirs = ir.training_task(stage).model_dump(mode="json")["params"], ir.task.model_dump(mode="json")["params"]
    return {k: v for k, v in ours.items() if theirs.get(k) != v}


def write_report(ctx: Context, summary: dict[str, Any]) -> None:
    lines = [
        f"# {ctx.ir.name} ({summary['hash']})",
        "",
        f"Task `{ctx.ir.task.name}`, model `{ctx.ir.model.kind}`, seed {ctx.ir.seed}, params {ctx.ir.params or '{}'}.",
        "Every figure below comes from `summary.json`, which is computed from the records in `eval.jsonl`:",
        "a is end-to-end accuracy, a_p perception, a_r counterfactual reasoning; Δ is from the stage in `from`.",
        "",
        *stage_table(summary),
    ]
    own = [(st.name, _task_changes(ctx.ir, st)) for st in ctx.ir.stages if st.task is not None]
    if own:  # stages that train on the task written otherwise; evaluation is the experiment's task for all
        lines += [
            "",
            "Trained on the task written otherwise (every stage is evaluated on the experiment's test items, as its task writes them):",
        ]
        lines += [f"- `{name}`: " + ", ".join(f"{k} = {v}" for k, v in changes.items()) for name, changes in own]
    frozen = [(name, st) for name, st in summary["stages"].items() if st.get("frozen")]
    if frozen:  # stages that kept parts of the model fixed
        lines += ["", "Trained with parts of the model frozen (their weights are the parent stage's):"]
        lines += [f"- `{name}`: {_and(st['frozen'])} frozen{_trainable(st.get('trainable_parameters'))}" for name, st in frozen]
    share = summary["diagnostics"].get("token_share", {})
    lines += ["", "Token share per role: " + ", ".join(f"{k} {v:.1%}" for k, v in share.items()), "", "![curves](curves.png)", ""]
    if (ctx.run_dir / "rewards.png").exists():
        lines += ["![rewards and reward coupling](rewards.png)", ""]
    write_text_atomic(ctx.run_dir / "report.md", "\n".join(lines))


# ---- the whole run --------------------------------------------------------------------------------------


def run(
    ir: ExperimentIR,
    sources: dict[str, str],
    out: Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    jobs: int = 1,
) -> Path | None:
    """Execute `ir` into `out/<name>-<hash>/`; returns the run directory (None on a rank other
    than 0, which ends quietly also when the run is refused or fails: rank 0 reports that).

    `jobs` > 1 trains up to that many stages at once, each in its own process, as soon as the
    stages they start from are done (the arms of a shared base side by side); every stage's
    weights and records are the ones a one-at-a-time run writes (`stagepool.py`).

    Every rank prepares before the ranks join their process group (transformers writes a
    model only on rank 0 of an initialised one, and the tiny model is built by writing it):
    rank 0 opens the run directory and prepares in it, the others prepare privately. A
    refusal on any rank is then every rank's."""
    run_dir = run_dir_for(ir, out)
    world = ir.trainer.devices * ir.trainer.num_nodes
    if jobs < 1:
        raise RunRefused(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and world > 1:
        raise RunRefused(
            f"--jobs {jobs} runs stages side by side in processes of one machine; this spec trains each stage on "
            f"{world} ranks (trainer devices × num_nodes): run it with --jobs 1"
        )
    zero = launched_as_rank_zero(ir.trainer)
    lock = lock_run_dir(run_dir) if zero else None  # RunRefused while another process runs it
    try:
        return _run(ir, sources, run_dir, resume, progress, echo, jobs, zero, world)
    finally:
        if lock is not None:
            lock.close()  # closing releases the flock


def lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock on a run directory (`.<name>.lock` beside it, released when the process ends), or
    RunRefused naming the process that holds it. Two processes on one run directory (a grid re-run while a
    cell of a killed grid was still saving its checkpoint) deleted each other's temporaries and trained the
    same stage twice. None where it cannot be taken (no locks; an --out that is no directory: opening the
    run directory says so)."""
    try:
        return hold_lock(run_dir.parent / f".{run_dir.name}.lock", f"pid {os.getpid()}")
    except LockHeld as held:
        raise RunRefused(f"{run_dir} is in use by another `percep run` ({held.holder}); wait for it to end, or stop it") from None
    except OSError:
        return None


def _run(
    ir: ExperimentIR,
    sources: dict[str, str],
    run_dir: Path,
    resume: bool,
    progress: bool,
    echo: Callable[[str], None],
    jobs: int,
    zero: bool,
    world: int,
) -> Path | None:
    complete, ctx, refusal = False, None, None
    try:
        if zero:
            complete = _open_run_dir(ir, sources, run_dir, resume)
        if not complete:
            ctx = prepare(ir, run_dir, echo if zero else _silent, Ranks(world=world, rank=0 if zero else 1))
            if zero:  # after prepare: a hub model is in the local cache by then
                inputs.record(run_dir, ir)
    except RunRefused as exc:
        refusal = exc
    if zero and (complete or refusal) and not others_wait_for_this_one(ir.trainer):  # no rank to start for nothing
        if refusal is not None:
            raise refusal
        echo(f"already complete: {run_dir} (delete it to run again)")
        return run_dir
    try:
        ranks = start(ir.trainer)
    except LaunchError as exc:
        tr = ir.trainer
        raise RunRefused(f"trainer: cannot start {tr.devices} device(s) × {tr.num_nodes} node(s) on `{tr.accelerator}`: {exc}") from exc
    if ranks.is_zero != zero:  # a launcher whose environment this process misread
        raise RunRefused(f"rank {ranks.rank}: its launcher's environment named it rank {0 if zero else 'other than 0'}")
    refusals = ranks.gather(None if refusal is None else str(refusal))
    if any(refusals):
        if not ranks.is_zero:
            return None
        r, msg = next((r, m) for r, m in enumerate(refusals) if m)
        raise refusal if r == 0 and refusal is not None else RunRefused(f"rank {r}: {msg}")
    if ranks.broadcast(complete):
        echo(f"already complete: {run_dir} (delete it to run again)")
        return run_dir if ranks.is_zero else None
    assert ctx is not None
    ctx = dataclasses.replace(ctx, ranks=ranks, echo=echo if ranks.is_zero else _silent, threads=stage_threads(ir, jobs))
    try:
        return _run_stages(ctx, progress, jobs)
    except (RunRefused, RunFailed, RunInterrupted):
        if ranks.is_zero:
            raise
        return None
    except OSError as exc:  # a full disk, a run directory removed or made read-only under the run
        if ranks.is_zero:
            raise RunFailed(f"{os_error_text(exc)}; finished stages and the last resume checkpoint are kept") from exc
        return None


def is_run_summary(data: Any) -> bool:
    """Whether ``data`` is a complete run's summary as `summarize` writes it, down to what
    `stage_table` reads (each stage's kind, steps and metrics)."""
    from .grid.state import is_complete_summary

    if not is_complete_summary(data) or not isinstance(data.get("final"), dict) or not data.get("stages"):
        return False
    return all({"kind", "steps", "metrics"} <= st.keys() for st in data["stages"].values())


def _silent(_: str) -> None:
    pass


def _open_run_dir(ir: ExperimentIR, sources: dict[str, str], run_dir: Path, resume: bool) -> bool:
    """Whether the run is complete already; else write its spec and IR (refusing a directory
    that holds an interrupted run without `--resume`, and one that cannot be made or written).

    Interrupted means a stage started (`stages/` is not empty): a run refused or killed while
    preparing leaves only its spec, IR and `init/` (the same for the same IR), so the next
    `percep run` of that spec, its model or data fixed, starts without `--resume`."""
    try:
        # a damaged one, or JSON of another shape: not complete, and --resume rewrites it
        complete = is_run_summary(read_json(run_dir / "summary.json"))
        stages = run_dir / "stages"
        interrupted = not complete and stages.is_dir() and any(stages.iterdir())
        if interrupted and not resume:
            raise RunRefused(f"{run_dir} holds an interrupted run; continue it with --resume, or delete it")
        if (complete or interrupted) and (diff := inputs.changed(run_dir, ir)):
            what = "is a complete run" if complete else "holds a run started"
            raise RunRefused(
                f"{run_dir} {what} with other inputs than the spec names now; changed since: {'; '.join(diff)}. "
                "The run directory is named by the spec, which names its inputs by path only: run this one into "
                f"another --out, or delete {run_dir} to run it again"
            )
        if complete:
            return True
        if run_dir.exists():
            remove_stale_temporaries(run_dir)  # what a killed writer was filling when it stopped
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in sources.items():
            write_text_atomic(run_dir / "spec" / Path(name).name, text)
        write_json_atomic(run_dir / "ir.json", {"hash": content_hash(ir), "ir": ir.model_dump(mode="json")})
        from .observe import record_environment

        record_environment(run_dir, resumed=interrupted)  # versions and code revision: beside the IR, outside its hash
    except OSError as exc:  # --out is a file, read-only, on a full disk, ...
        raise RunRefused(f"cannot use the run directory: {os_error_text(exc)}") from exc  # the path that failed
    return False


def _run_stages(ctx: Context, progress: bool, jobs: int = 1) -> Path | None:
    ir, ranks, echo, run_dir = ctx.ir, ctx.ranks, ctx.echo, ctx.run_dir
    if jobs > 1:  # stages whose inputs are done train at the same time, each in its own process
        from .stagepool import run_parallel

        records = run_parallel(ctx, jobs)
    else:
        records: dict[str, dict[str, Any]] = {}
        for stage in ir.stages:
            record = finished(ctx, stage)
            if record is None:
                echo(announce(stage, ctx.stage_trainable.get(stage.name)))
                record = train_stage(ctx, stage, progress)
            records[stage.name] = record
    if not ranks.is_zero:
        return None
    summary = summarize(ctx, records)
    write_metrics_csv(ctx)
    merge_eval_jsonl(ctx)
    write_plots(ctx)
    write_reward_plot(ctx)
    write_report(ctx, summary)
    write_json_atomic(run_dir / "summary.json", summary)  # last: its presence marks the run complete
    return run_dir


def announce(stage: Stage, trainable: int | None = None) -> str:
    """The line a stage starts with; `trainable`: its trainable parameters, shown when it freezes a part."""
    frozen = f", {_and(stage.freeze)} frozen{_trainable(trainable)}" if stage.freeze else ""
    return f"stage {stage.name} ({stage.kind}{' from ' + stage.parent if stage.parent else ''}): {stage.steps} steps{frozen}"


def _and(words: list[str]) -> str:
    return " and ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " and " + words[-1]


def _trainable(n: int | None) -> str:
    if n is None:
        return ""
    return f" ({n / 1e6:.2f}M trainable)" if n >= 100_000 else f" ({n:,} trainable)"


def finished(ctx: Context, stage: Stage) -> dict[str, Any] | None:
    """The stage's record when it needs no training: done in this run directory (an interrupted
    run resumed), or the same stage (same identity: settings, ancestors, task, model, seed)
    finished in another run under `--out` and taken from the stage cache; else None."""
    ranks, echo = ctx.ranks, ctx.echo
    done = stage_dir(ctx, stage) / "done.json"
    record = None
    if ranks.is_zero and done.exists():
        record = read_json(done)
        if not stagecache.is_done_record(record):  # the batches are a function of (seed, step): training again changes nothing
            echo(f"stage {stage.name}: its done.json cannot be read; training the stage again")
            record = None
    record = ranks.broadcast(record)
    if record is not None:
        echo(f"stage {stage.name}: done (resumed)")
        return record
    key = identity(ctx, stage) if stagecache.enabled() and ranks.is_zero else None
    reused = None
    if key is not None and stagecache.lookup(ctx.run_dir, key) is not None:
        try:
            reused = stagecache.reuse(ctx.run_dir, stage_dir(ctx, stage), key)
        except OSError as exc:  # the entry went away while being linked (another run replaced it): train instead
            echo(f"stage {stage.name}: could not reuse the cached stage {key} ({exc}); training it")
    if not ranks.broadcast(reused is not None):
        return None
    record = reused or {}  # the other ranks keep no record
    echo(f"stage {stage.name}: reused, trained by run {record.get('reused_from', {}).get('run')} (stage identity {key})")
    return record


def identity(ctx: Context, stage: Stage) -> str:
    """The stage's cache identity as this run trains it (its thread count included)."""
    return stagecache.stage_identity(ctx.ir, stage, threads=ctx.threads)


def train_stage(ctx: Context, stage: Stage, progress: bool) -> dict[str, Any]:
    """Train and evaluate the stage (`run_stage`), then publish it to the stage cache."""
    record = run_stage(ctx, stage, progress)
    if ctx.ranks.is_zero and stagecache.enabled():
        stagecache.publish(ctx.run_dir, stage_dir(ctx, stage), identity(ctx, stage))
    return record
