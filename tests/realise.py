"""Run a spec's stages on a micro model and record what training realised, for the tests that
check "a spec that checks runs as written" (tests/test_runs_as_written.py).

Each stage is built by the run's own `build_stage` from the checked IR and fitted by the run's
own `build_trainer`; the recording observes it without changing it:

- `lr`: the learning rate of every optimiser step, read from the optimizer's param group by a
  step post-hook (so: the value the update used), with NGDiff's auto-LR multiplier at that moment;
- `role_weights`: for SFT, at every loss evaluation, the weight the loss puts on one token of each
  role — the gradient of the loss with respect to each role's summed cross-entropy — and the counts;
- `rewards`: for GRPO, every group's rollout scores with the term values and the total reward, and
  the optimiser step it was computed at (what scheduled reward weights are evaluated at).

The reference values these are compared with are computed in the tests, from the IR's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from percepdsl.check import check_text
from percepdsl.ir import ExperimentIR

# Task, model, evaluation and trainer of every micro spec: a 4-node graph, a 32 px image in 4
# patches, a 1-layer width-16 model. Specs add stages after this text.
MICRO = """\
experiment micro
seed 0
task graph_coloring { nodes = 4, reasoning = brief, image = 32px, node_radius = 2px, train = 16, test = 2 }
model tiny { width = 16, depth = 1, heads = 1, vision_width = 16, vision_depth = 1, patch = 16px }
eval { test = 2, max_new_tokens = 8 }
trainer { precision = "32-true", clip = 1.0, log_every = 1 }
"""


def compile_spec(text: str, catalogue: Any = None) -> ExperimentIR:
    res = check_text(text, "spec.pd", catalogue=catalogue)
    errors = [f"{d.code}: {d.message}" for d in res.diagnostics if d.is_error]
    assert res.ok and isinstance(res.ir, ExperimentIR), errors
    return res.ir


@dataclass
class Realised:
    lr: list[tuple[float, float]] = field(default_factory=list)  # (lr, auto-LR multiplier) per optimiser step
    role_weights: list[tuple[int, list[float], list[int]]] = field(default_factory=list)  # (step, per-token weight per role, counts)
    rewards: list[tuple[Any, Any, int]] = field(default_factory=list)  # (RolloutGroup, RewardValues, optimiser step)
    logs: list[dict[str, float]] = field(default_factory=list)  # the logged metrics after every step


class Micro:
    """A prepared run context (task, micro model, encoder, initial weights) built once, reused by
    every spec whose task and model are the micro ones."""

    def __init__(self, run_dir: Path):
        from percepdsl_runtime.run import prepare

        self.ctx = prepare(compile_spec(MICRO + "stage s = sft { steps = 1 }\n"), run_dir, echo=lambda _: None)

    def run(self, ir: ExperimentIR) -> dict[str, Realised]:
        """Fit every stage of `ir` (each from the initial weights: the values checked here do
        not depend on the parent's) and return what each realised."""
        import dataclasses

        from percepdsl_runtime.models import load_weights
        from percepdsl_runtime.run import build_stage
        from percepdsl_runtime.sft import build_trainer

        ctx = self.ctx
        assert (ir.task, ir.model, ir.roles) == (ctx.ir.task, ctx.ir.model, ctx.ir.roles), "not a micro spec"
        ctx = dataclasses.replace(ctx, ir=ir)
        out: dict[str, Realised] = {}
        for stage in ir.stages:
            load_weights(ctx.loaded, ctx.init_weights)
            module, datamodule = build_stage(ctx, stage)
            rec = out[stage.name] = Realised()
            _observe(module, rec)
            tr = ir.trainer
            trainer = build_trainer(
                stage.steps,
                objective=getattr(module, "objective", None),
                precision=tr.precision,
                accelerator="cpu",
                devices=1,
                accumulate=tr.accumulate if stage.kind == "sft" else 1,
                callbacks=[_Logs(rec)],
                log_every_n_steps=tr.log_every,
                num_sanity_val_steps=0,
                default_root_dir=str(ctx.run_dir),
            )
            trainer.fit(module, datamodule=datamodule)
            assert trainer.global_step == stage.steps
        return out


def _observe(module: Any, rec: Realised) -> None:
    configure = module.configure_optimizers

    def configure_and_watch():
        opt = configure()
        # after the step: under automatic optimisation the closure (training_step, which sets the
        # lr) runs inside optimizer.step, before the update reads the param group
        opt.register_step_post_hook(lambda o, args, kwargs: rec.lr.append((o.param_groups[0]["lr"], getattr(module, "lr_scale", 1.0))))
        return opt

    module.configure_optimizers = configure_and_watch
    objective = getattr(module, "objective", None)
    if objective is not None:
        loss = objective.loss

        def loss_and_weights(sums, counts, step, total):
            leaf = sums.detach().clone().requires_grad_(True)
            with torch.enable_grad():  # NGDiff's auto-LR line search evaluates the loss under no_grad
                (w,) = torch.autograd.grad(loss(leaf, counts, step, total)[0], leaf, allow_unused=True, materialize_grads=True)
            rec.role_weights.append((step, w.tolist(), counts.tolist()))
            return loss(sums, counts, step, total)

        objective.loss = loss_and_weights
    reward = getattr(module, "reward", None)
    if reward is not None:

        def reward_and_record(group, step, total):
            values = type(reward).__call__(reward, group, step, total)
            rec.rewards.append((group, values, step))
            return values

        module.reward = _Callable(reward, reward_and_record)


class _Callable:
    """`reward` with its call replaced (its other attributes unchanged)."""

    def __init__(self, inner: Any, call: Any):
        self._inner, self._call = inner, call

    def __call__(self, group: Any, step: int, total: int) -> Any:
        return self._call(group, step, total)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Logs(L.Callback):
    """The logged metrics after every step."""

    def __init__(self, rec: Realised):
        self.rec = rec

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.rec.logs.append({k: float(v) for k, v in trainer.callback_metrics.items()})
