"""GRPO under Lightning: rollouts, group-relative advantages, the clipped objective.

``build_grpo(loaded, encoder, task, stage, seed, grad_clip=...)`` turns a typed
``GRPOStageIR`` into a ``GRPOModule`` (manual optimisation), which reads its settings from
the stage as they are, and a ``PromptDataModule`` (batches of train-split prompt indices).
One training step (``GRPOModule.training_step``):

1. **Rollouts.** Each prompt of the batch is encoded once; its G samples share that
   encoding (the prompt rows are repeated, never re-processed). Sampling runs a KV-cached
   decode loop (``sample_completions``) over all B·G rows at once and stops when every row
   has produced EOS or reached ``max_new_tokens``.
2. **Rewards.** Each group is scored by the task once (``RolloutGroup``); the compiled
   reward (``rewards.compile_reward``) gives a total and per-term values; diagnostics update.
   A NaN/inf reward raises ``RewardError`` here, before any update of the step.
3. **Advantages.** ``A = (r − mean_group(r)) / (std + 1e-4)``, std per group (``scale =
   group``), over the batch (``batch``), or none (``none``, Dr. GRPO).
4. **Updates.** ``updates`` optimiser steps on the same rollouts, each minimising the
   clipped surrogate ``−min(ρA, clip(ρ, 1−ε, 1+ε_high)A)`` (+ ``β·KL`` to a frozen
   reference, k3 estimator, when ``kl > 0``), aggregated as TRL's ``loss_type`` of the same
   name (``aggregate``): ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``. Completions that hit
   ``max_new_tokens`` are left out of the loss (``mask_truncated``). The learning rate at
   step s is ``value_at(stage.lr, s, stage.steps)`` (the schedule evaluator SFT uses too).
   With ``token_weights`` each token's loss is weighted by its role first, or the role
   groups' policy gradients are normalised (NGDiff): see ``token_weights.py``.

``stage.steps`` counts optimiser steps (Lightning's ``global_step``), so a stage with
``updates = u`` generates ``ceil(steps / u)`` batches.

Logged every step (``self.log``): ``loss``, ``lr``, ``grad_norm``, ``clip_frac``, ``kl`` (when
β > 0), ``adv_std``, ``trained_rows`` (share of rows in the update forward), ``completion_tokens``,
``truncated_frac``, ``gen_s``, ``gen_tokens_per_s``, ``update_s``, ``token_share/<role>`` of the loss tokens,
on logged steps ``pg_norm/<role>`` and ``pg_share/<role>`` (each role's share of the policy gradient; with
``token_weights`` also ``token_weight/<role>`` or NGDiff's ``grad_norm/<group>``), the reward diagnostics of the step (``reward``,
``reward/<term>``, ``reward_perception_corr``, ... — see ``rewards.RewardDiagnostics``) and each scheduled
reward weight at the step (``reward_weight/<term>``; ``value_at``, like the learning rate), and the
constant-group filtering: ``constant_group_frac_before`` (share of constant groups in the sampler's
batch), ``constant_group_frac_after`` (in the groups of the loss), ``trained_group_frac`` (groups in
the loss / ``batch``) and ``resample_draws`` (extra prompt batches).
``GRPOModule.diagnostics()`` returns the same statistics aggregated over the whole stage,
for the run's ``summary.json``.

Numerics: the policy forward runs under the trainer's precision (bf16 autocast measured
faster on CPU); log-probabilities are taken in float32. Sampling (``runtime/sampling.py``)
runs outside that autocast, in ``sample_precision`` (fp32 weight copies by default, which
reproduce Hugging Face's greedy tokens; ``bf16`` copies halve the bytes, and sampled slower
here). With ``updates = 1`` the importance ratio is exactly 1 (the old log-probs are the first
update's own, detached), so the sampler's precision never enters the objective.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from percepdsl.ir import GRPOStageIR, value_at

from .encoding import collate
from .generation import eval_mode
from .models import drop_frozen, freeze_parts, restore_frozen
from .optim import adamw
from .probe import METRIC_ROLE as DEPENDENCY_ROLE
from .probe import RolloutDependency, blank_like
from .rewards import WARN_AFTER, Reward, RewardDiagnostics, RewardError, RolloutGroup, compile_reward, constant_groups
from .sampling import Rollouts, cache_kwarg, cache_of, llava_parts, position_ids, sample_completions
from .token_weights import TokenWeighting, role_gradient_norms

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ADV_EPS = 1e-4  # added to the std: a group with rewards {0, 0, 0, 1e-6} must not explode (TRL uses the same)


# --------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, scale: Scale = "group", eps: float = ADV_EPS, batch_std: float | None = None) -> torch.Tensor:
    """Advantages of ``rewards[B, G]``: centred on each group's mean, divided by the
    group's std (``group``), the whole batch's std (``batch``; ``batch_std`` when given: the
    global batch's under data parallelism) or nothing (``none``).
    Stds are unbiased (n−1), as in DeepSeekMath / TRL. A constant group gets exactly 0
    (not ±1e-17 of rounding), so its rows can be skipped in the update."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    centred = centred.masked_fill(constant, 0.0)
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    raise ValueError(f"unknown advantage scale {scale!r}")


AGGREGATIONS: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


def loss_denominator(
    mask: torch.Tensor,
    how: Aggregation = "grpo",
    *,
    max_new_tokens: int | None = None,
    global_tokens: float | None = None,
    world: int = 1,
) -> float:
    """What ``aggregate`` divides by, as TRL's ``loss_type`` of the same name, computed on the
    whole generated batch ``mask[N, T]`` (so rows that cannot contribute can be left out of
    the forward without changing the loss):

    - ``grpo``: N, the number of completions (each contributes its token mean; a completion
      without loss tokens, e.g. a masked truncated one, contributes 0 and still counts);
    - ``bnpo``: the number of loss tokens in this device's batch (at least 1);
    - ``dr_grpo``: N × ``max_new_tokens``, a constant;
    - ``dapo``: the loss tokens of the global batch (``global_tokens``: the count summed over
      the ``world`` devices; default this batch's) divided by ``world``, because data-parallel
      training averages the devices' gradients: the result is the token sum over the global
      batch divided by its token count."""
    if how == "grpo":
        return float(max(mask.shape[0], 1))
    if how == "bnpo":
        return max(float(mask.sum()), 1.0)
    if how == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo divides by completions × max_new_tokens: pass max_new_tokens")
        return float(mask.shape[0] * max_new_tokens)
    if how == "dapo":
        return max(float(mask.sum()) if global_tokens is None else float(global_tokens), 1.0) / world
    raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "grpo", denominator: float | None = None) -> torch.Tensor:
    """Reduce ``per_token[N, T]`` over the tokens where ``mask`` is 1, as TRL's ``loss_type``:
    ``grpo`` sums each completion's token mean, ``bnpo``/``dr_grpo``/``dapo`` sum all tokens;
    both then divide by ``denominator`` (default ``loss_denominator(mask, how)``; ``dr_grpo``
    needs it given)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    m = mask.to(per_token.dtype)
    denominator = loss_denominator(mask, how) if denominator is None else denominator
    if how == "grpo":
        return ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum() / denominator
    return (per_token * m).sum() / denominator


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    aggregation: Aggregation = "grpo",
    ref_logp: torch.Tensor | None = None,
    kl: float = 0.0,
    denominator: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss and its statistics: ``aggregate`` of ``grpo_token_loss`` (see there),
    each token's loss first multiplied by ``token_weights[N, T]`` when given (role-weighted
    GRPO, ``token_weights.py``; the denominators stay token counts); ``denominator``: see
    ``aggregate`` (pass the whole batch's when these rows are a subset of it)."""
    per_token, stats = grpo_token_loss(logp, old_logp, adv, mask, clip=clip, clip_high=clip_high, ref_logp=ref_logp, kl=kl)
    if token_weights is not None:
        per_token = per_token * token_weights
    return aggregate(per_token, mask, aggregation, denominator), stats


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """[N, T] per-token GRPO loss and its statistics.

    ``logp``/``old_logp``/``ref_logp``: [N, T] log-probabilities of the sampled tokens under
    the policy being trained, the policy that sampled them, and the reference; ``adv``:
    [N] one advantage per sequence; ``mask``: [N, T] tokens in the loss (for the statistics).
    Per token: ``−min(ρA, clip(ρ, 1−ε, 1+ε_high)·A) + β·(e^{ref−logp} − (ref−logp) − 1)``
    with ``ρ = e^{logp − old}`` (the KL term is the k3 estimator: unbiased, always ≥ 0).
    """
    eps_high = clip if clip_high is None else clip_high
    a = adv[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * a, clipped * a)
    m = mask.bool()
    stats: dict[str, float] = {}
    with torch.no_grad():  # clip_frac: tokens whose gradient the clip removed
        hit = ((ratio < 1.0 - clip) & (a < 0)) | ((ratio > 1.0 + eps_high) & (a > 0))
        stats["clip_frac"] = float(hit[m].float().mean()) if m.any() else 0.0
    if ref_logp is not None and kl > 0:
        d = ref_logp - logp
        kl_tok = torch.exp(d) - d - 1.0
        per_token = per_token + kl * kl_tok
        stats["kl"] = float(kl_tok.detach()[m].mean()) if m.any() else 0.0
    return per_token, stats


def pad_cat(masks: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of [n_i, T_i] masks, right-padded with 0 to the longest T."""
    T = max(m.shape[1] for m in masks)
    return torch.cat([torch.nn.functional.pad(m, (0, T - m.shape[1])) for m in masks])


class _Batch:
    """One generated batch of a step (the sampler's, or a resampled one): its rollouts, rewards
    [B, G] and the groups that enter the loss (``keep``); ``rows``/``mask`` are the rollout rows of
    those groups and their loss masks, narrowed by the step to the rows the forward needs."""

    def __init__(self, roll: Rollouts, rewards: torch.Tensor, keep: torch.Tensor, group: int, mask_truncated: bool):
        self.roll, self.rewards, self.keep = roll, rewards, keep
        self.rows = keep.repeat_interleave(group).nonzero()[:, 0].to(roll.ids.device)
        self.mask = loss_mask(roll, mask_truncated)[self.rows]
        self.roles: torch.Tensor = torch.zeros(0, dtype=torch.long)  # role id of every rollout token (the step sets it)
        self.adv: torch.Tensor = torch.zeros(0)
        self.ref: torch.Tensor | None = None
        self.old: torch.Tensor | None = None


def loss_mask(roll: Rollouts, mask_truncated: bool = True) -> torch.Tensor:
    """[N, T] tokens in the loss: every generated token (EOS included), except — with
    ``mask_truncated`` — all tokens of completions that hit the cap without EOS (their
    reward judges an unfinished text; DAPO's overlong filtering)."""
    return roll.mask * (~roll.truncated)[:, None] if mask_truncated else roll.mask


# --------------------------------------------------------------------------- log-probs
def prompt_rows(prompt: Mapping[str, torch.Tensor], which: torch.Tensor) -> dict[str, torch.Tensor]:
    """The collated prompt batch's inputs for rows that repeat prompts ``which`` (one prompt
    index per row).

    Inputs with one entry per prompt (``input_ids``, masks, LLaVA's ``pixel_values [B, C, H, W]``,
    Idefics3's ``[B, images, C, H, W]``) are indexed by ``which``. Models with flattened image
    patches (Qwen2-VL, Qwen2.5-VL: ``pixel_values [Σ patches, D]`` with ``image_grid_thw
    [images, 3]``, an image's patches being ``t·h·w`` consecutive rows) get each row's image:
    the per-image blocks of patches and their grid rows, repeated per row. Indexing the
    flattened patches by row would hand a row other images' patches. One image per prompt."""
    B = prompt["input_ids"].shape[0]
    grid = prompt.get("image_grid_thw")
    out: dict[str, torch.Tensor] = {}
    for k, v in prompt.items():
        if grid is not None and k == "pixel_values":
            if grid.shape[0] != B:
                raise ValueError(f"flattened image patches need one image per prompt; got {grid.shape[0]} images for {B} prompts")
            blocks = v.split(grid.prod(dim=-1).tolist())
            out[k] = torch.cat([blocks[i] for i in which.tolist()])
        else:
            out[k] = v[which]
    return out


def completion_logprobs(
    model: Any, roll: Rollouts, temperature: float = 1.0, rows: torch.Tensor | None = None, decoder: Any = None
) -> torch.Tensor:
    """[n, T] float32 log-probabilities of the sampled tokens under ``model``, for the
    rollout rows ``rows`` (default: all N). Logits are divided by the sampling temperature
    (the ratio compares the distributions the tokens were drawn from). ``decoder``: see
    ``completion_logits``."""
    rows = torch.arange(roll.ids.shape[0], device=roll.ids.device) if rows is None else rows
    logits = completion_logits(model, roll, rows, decoder) / max(temperature, 1e-6)
    return torch.log_softmax(logits, dim=-1).gather(-1, roll.ids[rows][..., None])[..., 0]


def completion_logits(model: Any, roll: Rollouts, rows: torch.Tensor | None = None, decoder: Any = None) -> torch.Tensor:
    """[n, T, V] float32 next-token logits at the completion positions (position t predicts
    completion token t) of the rollout rows ``rows`` (default: all N), teacher-forced on the
    sampled tokens under ``roll.prompt`` (the same prompt text with other images gives the
    visual-dependency reward term's forwards).

    The sequences are laid out as they were sampled — left-padded prompt, then the
    completion — with the same position ids, so the training forward sees exactly the
    sampler's context. Only the completion positions go through the LM head.

    LLaVA models run the shared prompt once per prompt, not once per row: a forward over
    the B prompts (vision tower included) fills a KV cache, which is repeated for the G
    rows of each prompt and attended to by one forward over the completions. Gradients
    flow through the repeat into the prompt's K/V and the vision tower, so the result and
    its gradient equal those of a full forward over prompt + completion per row (tested),
    at (G−1)/G less prompt compute. ``decoder`` (LLaVA only) runs that completion forward in
    place of the text decoder: the same module under ``torch.compile`` (``compile = true``).
    """
    rows = torch.arange(roll.ids.shape[0], device=roll.ids.device) if rows is None else rows
    ids, G = roll.ids[rows], roll.group
    which = torch.div(rows, G, rounding_mode="floor")  # the prompt of each row (row i*G+j samples prompt i)
    parts = llava_parts(model)
    if parts is None:  # generic: one full forward per row; models compute their own positions
        inputs = prompt_rows(roll.prompt, which)
        P = inputs["input_ids"].shape[1]
        for k, v in inputs.items():  # per-token inputs run on over the completion
            if k == "input_ids":
                inputs[k] = torch.cat([v, ids], dim=1)
            elif k == "attention_mask":
                inputs[k] = torch.cat([v, roll.mask[rows]], dim=1)
            elif v.dim() == 2 and v.shape == (len(rows), P):  # e.g. Qwen2-VL's mm_token_type_ids: 0 = text
                inputs[k] = torch.cat([v, v.new_zeros(ids.shape)], dim=1)
        logits = model(**inputs, use_cache=False).logits[:, P - 1 : -1]
    else:
        from transformers import DynamicCache

        lm, head, full = parts
        prompt_mask = roll.prompt["attention_mask"]
        prompt_pos = position_ids(prompt_mask)
        out = full.model(**roll.prompt, position_ids=prompt_pos, use_cache=True)
        cache = DynamicCache(config=full.config.get_text_config())
        for i, layer in enumerate(cache_of(out).layers):
            cache.update(layer.keys[which], layer.values[which], i)
        mask = torch.cat([prompt_mask[which], roll.mask[rows]], dim=1)
        pos = position_ids(mask)[:, prompt_mask.shape[1] :]
        kw = {cache_kwarg(lm): cache}
        hidden = (lm if decoder is None else decoder)(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw
        ).last_hidden_state
        # the prompt's last position predicts completion token 0; completion position t predicts t+1
        hidden = torch.cat([out.last_hidden_state[which, -1:], hidden[:, :-1]], dim=1)
        logits = head(hidden)
    return logits.float()


# --------------------------------------------------------------------------- module
class GRPOModule(L.LightningModule):
    """GRPO with manual optimisation: one generated batch per ``training_step``.

    ``training_step`` raises ``rewards.RewardError`` (naming the term) when a reward is NaN,
    infinite, of the wrong length or raises, before any update of that step; Lightning then
    runs the callbacks' ``on_exception`` and re-raises, so the runner keeps the last good
    checkpoint. ``diagnostics()`` gives the stage's reward statistics for ``summary.json``.
    """

    def __init__(
        self,
        loaded: Any,
        encoder: Any,
        task: Any,
        stage: GRPOStageIR,
        reward: Reward | None = None,
        *,
        seed: int = 0,
        grad_clip: float | None = None,
        warn_after: int = WARN_AFTER,
        split: str = "train",
        visual: Any = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.loaded, self.model, self.encoder, self.task = loaded, loaded.model, encoder, task
        # the stage's frozen parts, the rest as loaded (`SFTModule`): before the KL reference copies
        # the policy, the optimiser takes the trainable parameters and a resume checkpoint is loaded
        self.trainable_parameters = freeze_parts(loaded, stage.freeze)
        reward = compile_reward(stage.reward) if reward is None else reward  # tests pass one with their own resolver
        self.stage, self.reward, self.seed, self.split, self.grad_clip = stage, reward, int(seed), split, grad_clip
        self._ref: list[torch.nn.Module] = []  # the KL reference (iff kl > 0): see setup_reference
        self.diag = RewardDiagnostics(reward.term_names, reward.surrogates, warn_after, stage.name)
        image_token = getattr(getattr(self.model, "config", None), "image_token_id", None) or getattr(
            getattr(self.model, "config", None), "image_token_index", None
        )
        self.suppress: tuple[int, ...] = (int(image_token),) if image_token is not None else ()
        self.timing: dict[str, float] = {"gen_s": 0.0, "gen_tokens": 0.0, "steps": 0.0}
        self.tokens_processed = 0  # completion tokens sampled: the progress bar's throughput
        self.filtering: dict[str, float] = {}  # running sums of the constant-group logs (see gather)
        self.weighting = TokenWeighting(stage.token_weights, encoder.role_names)
        self.visual = visual  # probe.VisualRoles: the `visual(...)` roles token_weights names, or None
        # `compile = true`: the update's text decoder under torch.compile, made at the first update ([]:
        # not yet; [None]: eager, by choice or after a failed compile); a list keeps it out of the module
        # tree (the compiled wrapper holds the same parameters: not twice in a checkpoint)
        self._update_decoder: list[Any] = []
        self.setup_reference()

    # -- setup ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.model.train()
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resumable stage statistics (the weights and optimiser are Lightning's; frozen weights,
        LoRA's base model, are left out: ``models.drop_frozen``)."""
        drop_frozen(self, checkpoint)
        checkpoint["grpo"] = {"diagnostics": self.diag.state_dict(), "timing": dict(self.timing), "filtering": dict(self.filtering)}
        if self.visual is not None:  # refreshed reference models of the visual roles
            checkpoint["grpo"]["visual_references"] = self.visual.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(self, checkpoint)
        if "grpo" in checkpoint:
            self.diag.load_state_dict(checkpoint["grpo"]["diagnostics"])
            self.timing.update(checkpoint["grpo"]["timing"])
            self.filtering.update(checkpoint["grpo"].get("filtering", {}))
            if self.visual is not None:
                self.visual.load_state_dict(checkpoint["grpo"].get("visual_references", {}))

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen reference of the KL term. Held outside the module tree (a list), so it
        is neither in checkpoints nor in Lightning's train/eval-mode bookkeeping."""
        return self._ref[0] if self._ref else None

    def setup_reference(self) -> None:
        """Freeze a copy of the policy as the stage starts: called on construction, after
        the runner loaded the parent stage's weights and before a resume restores later
        ones. None when β = 0, and none for PEFT models either: their base model (adapter
        disabled) is the reference."""
        self._ref.clear()
        if self.stage.kl > 0 and not hasattr(self.model, "disable_adapter"):
            self._ref.append(copy.deepcopy(self.model).eval().requires_grad_(False))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        st = self.stage
        return adamw(self.model, lr=self._lr(0), weight_decay=st.weight_decay, betas=(st.adam_beta1, st.adam_beta2), eps=st.adam_eps)

    def _lr(self, step: int) -> float:
        return value_at(self.stage.lr, step, self.stage.steps)

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _batch_std(self, rewards: torch.Tensor) -> float | None:
        """The unbiased std of the rewards of the global batch (every rank's), for ``scale =
        batch`` under data parallelism; None otherwise (``group_advantages`` takes this batch's)."""
        if self.stage.scale != "batch" or self._world() == 1:
            return None
        r = rewards.double().flatten()
        moments = torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()])
        torch.distributed.all_reduce(moments)
        n, s, ss = moments.tolist()
        return float(max(ss - s * s / n, 0.0) / max(n - 1, 1.0)) ** 0.5

    def _agree_on_reward_error(self, error: RewardError | None) -> None:
        """Raise on every rank when a reward failed on any (a rank that went on would wait in the
        next gradient all-reduce for ever); the message is the failing rank's."""
        if self._world() == 1:
            if error is not None:
                raise error
            return
        if not self.trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            return
        messages: list[Any] = [None] * self._world()
        torch.distributed.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            raise error
        rank, msg = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise RewardError(f"{msg} (on rank {rank})")

    def _denominator(self, mask: torch.Tensor) -> float:
        """``loss_denominator`` for this batch; ``dapo`` counts the loss tokens of every device."""
        st, world = self.stage, self.trainer.world_size if self._trainer is not None else 1
        tokens = None
        if st.aggregation == "dapo" and world > 1:
            count = mask.sum().to(torch.float64)
            torch.distributed.all_reduce(count)
            tokens = float(count)
        return loss_denominator(mask, st.aggregation, max_new_tokens=st.max_new_tokens, global_tokens=tokens, world=world)

    # -- the step ------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        st = self.stage
        error = None
        try:
            parts, logs = self.gather(batch)  # a RewardError comes before any update
        except RewardError as exc:
            error = exc
        self._agree_on_reward_error(error)
        rewards = torch.cat([p.rewards[p.keep] for p in parts])  # the groups in the loss, [B', G]
        batch_std = self._batch_std(rewards)  # a collective under data parallelism: every rank calls it
        adv = group_advantages(rewards, st.scale, batch_std=batch_std).flatten() if len(rewards) else rewards.flatten()
        denom = self._denominator(pad_cat([p.mask for p in parts]))
        # Rows with A = 0 (constant groups) and no KL term, or no loss tokens, add exactly 0 to
        # the loss and its gradient: leave them out of the forward, keep them in the denominator.
        for p, a in zip(parts, adv.split([len(p.rows) for p in parts])):
            p.adv = a.to(p.roll.ids.device)
            active = p.mask.any(dim=1) & ((p.adv != 0) | (st.kl > 0))
            p.rows, p.adv, p.mask = p.rows[active], p.adv[active], p.mask[active]
        # Under data parallelism every rank must join each update's gradient all-reduce: a rank
        # with no such row runs one row with its loss multiplied by 0 (its gradient share is 0).
        idle = not any(len(p.rows) for p in parts) and self._world() > 1
        if idle:
            p = parts[0]
            p.rows, p.adv, p.mask = p.rows.new_zeros(1), p.adv.new_zeros(1), loss_mask(p.roll, st.mask_truncated)[:1]
        if self.visual is not None:  # the steps since the last batch: `updates` each (the stage's last may take fewer)
            self.visual.refresh(self.model, self.global_step, since=self.global_step - st.updates)
        for p in parts:
            p.ref = self.reference_logprobs(p.roll, p.rows) if st.kl > 0 and len(p.rows) else None
            p.roles = self.encoder.completion_roles(p.roll.ids.cpu(), p.roll.lengths.tolist()).to(p.roll.ids.device)[p.rows]
            if self.visual is not None and len(p.rows):  # label-free roles: a frozen reference reads the image there
                p.roles = self.visual_roles(p.roll, p.rows, p.roles)
                logs["visual_roles_s"] = logs.get("visual_roles_s", 0.0) + self.visual.seconds
        logs.update(
            self.weighting.share_logs(pad_cat([p.roles for p in parts]), pad_cat([p.mask for p in parts]), self.global_step, st.steps)
        )
        opt = self.optimizers()
        t0 = time.perf_counter()
        loss, stats = torch.zeros(()), {}
        for u in range(st.updates):
            if u > 0 and self.global_step >= st.steps:
                break  # the stage's step budget ends inside this batch's updates
            lr = self._lr(self.global_step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=False)
            per_parts, stats, n_tok = [], {}, 0.0
            for p in parts:  # each generated batch's share of the loss (one denominator for all)
                if not len(p.rows):
                    continue
                logp = self._update_logprobs(p.roll, p.rows)
                p.old = logp.detach() if p.old is None else p.old  # update 0 runs the sampling policy: ρ = 1
                per_token, part_stats = grpo_token_loss(
                    logp, p.old, p.adv, p.mask, clip=st.clip, clip_high=st.clip_high, ref_logp=p.ref, kl=st.kl
                )
                w_tok = self.weighting.token_weights(p.roles, self.global_step, st.steps)  # role-weighted GRPO
                per_parts.append((per_token if w_tok is None else per_token * w_tok, p.mask, p.roles))
                w = float(p.mask.sum())
                for k, v in part_stats.items():  # token-weighted over the generated batches
                    stats[k] = (stats.get(k, 0.0) * n_tok + v * w) / max(n_tok + w, 1.0)
                n_tok += w
            loss = torch.zeros(())
            if per_parts:  # one backward per update on every rank, however many batches it drew
                loss, more = self._backward(per_parts, denom, measure=u == 0, idle=idle)
                stats = {} if idle else {**stats, **more}
            logs["grad_norm"] = self._clip_grads()
            opt.step()  # also with zero gradients, as any GRPO step: Adam's momentum still moves
        n_rows = sum(int(p.keep.sum()) for p in parts) * st.group
        logs.update(
            stats,
            loss=float(loss),
            lr=lr,
            adv_std=float(adv.std()) if adv.numel() > 1 else 0.0,
            trained_rows=0.0 if idle else sum(len(p.rows) for p in parts) / max(n_rows, 1),
            update_s=time.perf_counter() - t0,
        )
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=max(n_rows, 1))

    # -- pieces of the step ----------------------------------------------------------------
    def _update_logprobs(self, roll: Rollouts, rows: torch.Tensor) -> torch.Tensor:
        """The update's log-probabilities of the sampled tokens (with gradients). With ``compile =
        true`` the completion forward runs the text decoder under ``torch.compile`` (Inductor's
        fused kernels; shapes: the cap's width, automatic dynamic rows): 1.4× faster forward and
        backward on the tiny model, exact to 6e-6 in fp32 (docs/performance.md, GRPO, session 15).
        A compile that fails says so once and the update runs eagerly."""
        if not self._update_decoder:
            parts = llava_parts(self.model) if self.stage.compile else None
            self._update_decoder.append(torch.compile(parts[0]) if parts is not None else None)
        if self._update_decoder[0] is not None:
            try:
                return completion_logprobs(self.model, roll, self.stage.temperature, rows, decoder=self._update_decoder[0])
            except Exception as exc:  # noqa: BLE001 — a compile error surfaces at the first call
                warnings.warn(
                    f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); the GRPO update runs eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._update_decoder[:] = [None]
        return completion_logprobs(self.model, roll, self.stage.temperature, rows)

    def _backward(
        self, per_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], denom: float, measure: bool, idle: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Backpropagate the loss Σ_batches aggregate(per-token loss) of ``per_parts`` (per
        generated batch: its [n, T] per-token loss, already role-weighted, its loss mask and role
        ids); returns it (detached) and its stats. NGDiff token weights normalise each role
        group's share; ``measure`` (update 0) adds each role's policy-gradient norm on logged
        steps; ``idle``: a data-parallel rank without rows joins the all-reduce with a zero loss."""
        st = self.stage

        def reduce(select: Any = None) -> torch.Tensor:
            return torch.stack(
                [aggregate(pt if select is None else pt * select(r), m, st.aggregation, denom) for pt, m, r in per_parts]
            ).sum()

        if idle:
            loss = reduce() * 0.0
            self.manual_backward(loss)
            return loss.detach(), {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        names, stats = self.weighting.role_names, {}
        if measure and self._logger_step():
            present = {int(x) for _, m, r in per_parts for x in r[m.bool() & (r >= 0)].unique().tolist()}
            stats.update(role_gradient_norms({names[i]: reduce(lambda r, i=i: r == i) for i in sorted(present)}, params))
        loss = reduce()
        if self.weighting.normalised:  # g = Σ_i g_i/‖g_i‖ over the role groups' losses
            groups = []
            for g in self.weighting.groups:
                has = any(bool((torch.isin(r, torch.tensor(g, device=r.device)) & m.bool()).any()) for _, m, r in per_parts)
                groups.append(reduce(lambda r, g=g: torch.isin(r, torch.tensor(g, device=r.device))) if has else None)
            stats.update(self.weighting.ngdiff_backward(groups, params, self.manual_backward, self.global_step))
        else:
            self.manual_backward(loss)
        return loss.detach(), stats

    def _logger_step(self) -> bool:
        """Whether Lightning writes this step's metrics (``log_every_n_steps``); True outside a trainer."""
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

    def gather(self, indices: torch.Tensor) -> tuple[list[_Batch], dict[str, float]]:
        """The step's generated batches and its logs. The sampler's batch comes first; groups
        whose rewards are all equal (no advantage) are kept in it (``constant_groups = keep``)
        or left out of the loss (``drop``, ``resample``); with ``resample``, batches of fresh
        prompts follow, until ``batch`` groups with a reward signal are collected or
        ``resample_tries`` extra batches were drawn (DAPO's dynamic sampling; their extra groups
        beyond ``batch`` are not used). The reward diagnostics cover every group sampled."""
        st, B = self.stage, len(indices)
        parts: list[_Batch] = []
        groups_all: list[RolloutGroup] = []
        values_all: list[Any] = []
        need = B
        while True:
            draw = len(parts)
            idx = indices if draw == 0 else self.resample_indices(B, draw)
            roll, groups, values = self.rollout(idx, draw)
            groups_all += groups
            values_all += values
            rewards = torch.tensor(np.stack([v.total for v in values]), dtype=torch.float32)
            const = torch.from_numpy(constant_groups(rewards.numpy()))
            keep = torch.ones(B, dtype=torch.bool) if st.constant_groups == "keep" else ~const
            keep &= keep.cumsum(0) <= need  # a fresh batch fills the rest of the batch, no more
            parts.append(_Batch(roll, rewards, keep, st.group, st.mask_truncated))
            if draw == 0:
                before = float(const.float().mean())
            need -= int(keep.sum())
            if st.constant_groups != "resample" or need <= 0 or draw >= st.resample_tries:
                break
        step, steps = self.global_step, self.stage.steps
        logs = self.diag.update(groups_all, values_all)
        logs.update(self.reward.weights(step, steps))
        kept = torch.cat([p.rewards[p.keep] for p in parts]).numpy()
        after = float(constant_groups(kept).mean()) if len(kept) else 0.0
        filt = {"constant_group_frac_before": before, "constant_group_frac_after": after}
        filt |= {"trained_group_frac": (B - need) / B, "resample_draws": float(len(parts) - 1)}
        for k, v in filt.items():
            self.filtering[k] = self.filtering.get(k, 0.0) + v
        self.filtering["steps"] = self.filtering.get("steps", 0.0) + 1
        lengths = torch.cat([p.roll.lengths for p in parts]).tolist()
        gen_s, n_tok = sum(p.roll.gen_s for p in parts), float(sum(lengths))
        probe_s = sum(p.roll.probe_s for p in parts)  # the visual_dependency term's forwards
        if probe_s:
            logs["visual_dependency_s"] = probe_s
            self.timing["probe_s"] = self.timing.get("probe_s", 0.0) + probe_s
        self.tokens_processed += int(n_tok)
        self.timing["gen_s"] += gen_s
        self.timing["gen_tokens"] += n_tok
        self.timing["steps"] += 1
        logs.update(
            filt,
            completion_tokens=n_tok / len(lengths),
            truncated_frac=float(torch.cat([p.roll.truncated for p in parts]).float().mean()),
            gen_s=gen_s,
            gen_tokens_per_s=n_tok / max(gen_s, 1e-9),
        )
        return parts, logs

    def resample_indices(self, n: int, draw: int) -> torch.Tensor:
        """Fresh prompts for the ``draw``-th extra batch of a step: n distinct train-split
        indices, a pure function of (seed, step, draw, rank), so a resumed run draws the same."""
        rng = np.random.default_rng([self.seed, self.global_step, draw, self.global_rank])
        size = self.task.size(self.split)
        return torch.from_numpy(rng.choice(size, size=min(n, size), replace=False))

    @torch.no_grad()
    def rollout(self, indices: torch.Tensor, draw: int = 0) -> tuple[Rollouts, list[RolloutGroup], list[Any]]:
        """Sample G completions per prompt, score them, evaluate the reward.
        Returns the rollouts, the scored groups and their reward values."""
        samples = [self.task.sample(self.split, int(i)) for i in indices.tolist()]
        prompt = collate([self.encoder.encode_prompt(s.query, s.image) for s in samples], self.encoder.pad_token_id)
        prompt = {k: v.to(self.device) for k, v in prompt.items() if isinstance(v, torch.Tensor)}
        # a stream per (seed, step, rank, draw): data-parallel ranks and a step's batches must not draw the same noise
        noise = self.seed * 1_000_003 + self.global_step + (self.global_rank << 40) + (draw << 50)
        gen = torch.Generator(device=self.device).manual_seed(noise)
        bf16 = self.stage.sample_precision == "bf16"  # fused decoder weights; autocast for prefill / HF generate
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        with amp, eval_mode(self.model):
            roll = sample_completions(
                self.model,
                prompt,
                group=self.stage.group,
                max_new_tokens=self.stage.max_new_tokens,
                temperature=self.stage.temperature,
                top_p=self.stage.top_p,
                eos_token_id=self.encoder.eos_token_id,
                pad_token_id=self.encoder.pad_token_id,
                suppress=self.suppress,
                generator=gen,
                dtype=torch.bfloat16 if bf16 else torch.float32,
                compile=self.stage.compile,
            )
        G, lengths = self.stage.group, roll.lengths.tolist()
        texts = [self.encoder.decode(row[:n]) for row, n in zip(roll.ids.tolist(), lengths)]
        trunc = roll.truncated.tolist()
        dep = self.dependency(roll, samples, indices)  # lazy: costs nothing unless a reward term reads it
        groups = [
            RolloutGroup.score(self.task, s, texts[i * G : (i + 1) * G], trunc[i * G : (i + 1) * G], dep.view(i * G, (i + 1) * G))
            for i, s in enumerate(samples)
        ]
        step, steps = self.global_step, self.stage.steps  # scheduled reward weights are read at the step that samples
        values = [self.reward(g, step, steps) for g in groups]
        roll.probe_s = dep.seconds
        return roll, groups, values

    def dependency(self, roll: Rollouts, samples: list[Any], indices: torch.Tensor) -> RolloutDependency:
        """The visual dependency of the rollouts' perception tokens on their image (the
        ``visual_dependency`` reward term): no-grad teacher-forced forwards of the policy as it
        sampled, under the trainer's precision, with the true image and with another item's (the
        next item of the split) or a blank one, the prompt text unchanged."""
        size = self.task.size(self.split)

        def prompt(against: str) -> dict[str, torch.Tensor]:
            if against == "other":
                images = [self.task.sample(self.split, (int(i) + 1) % size).image for i in indices.tolist()]
            else:
                images = [blank_like(s.image) for s in samples]
            alt = collate([self.encoder.encode_prompt(s.query, im) for s, im in zip(samples, images)], self.encoder.pad_token_id)
            alt = {k: v.to(self.device) for k, v in alt.items() if isinstance(v, torch.Tensor)}
            if not torch.equal(alt["input_ids"], roll.prompt["input_ids"]):
                raise ValueError(f"the prompt with the {against} image has other tokens than the true one (images of different sizes?)")
            return alt

        def forward(alt: dict[str, torch.Tensor] | None, rows: torch.Tensor, length: int) -> torch.Tensor:
            head = dataclasses.replace(roll, ids=roll.ids[:, :length], mask=roll.mask[:, :length], prompt=alt or roll.prompt)
            with torch.no_grad(), eval_mode(self.model):
                return completion_logits(self.model, head, rows.to(roll.ids.device))

        names = self.encoder.role_names
        role = names.index(DEPENDENCY_ROLE) if DEPENDENCY_ROLE in names else None
        return RolloutDependency(forward, prompt, lambda: self.encoder.completion_roles(roll.ids.cpu(), roll.lengths.tolist()), role)

    def visual_roles(self, roll: Rollouts, rows: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        """``roles`` [n, T] of rollout rows ``rows`` re-tagged by the stage's visual role rules."""

        def logits(model: Any, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
            with eval_mode(model):
                return completion_logits(model, dataclasses.replace(roll, prompt=prompt), rows)

        return self.visual.tag_rollouts(logits, roll.prompt, roles, roll.mask[rows])

    @torch.no_grad()
    def reference_logprobs(self, roll: Rollouts, rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.ref_model is not None:
            return completion_logprobs(self.ref_model, roll, self.stage.temperature, rows)
        if hasattr(self.model, "disable_adapter"):  # PEFT: the base model is the reference
            with self.model.disable_adapter():
                return completion_logprobs(self.model, roll, self.stage.temperature, rows)
        raise RuntimeError("kl > 0 but no reference model: call setup_reference() (done in on_fit_start)")

    def _clip_grads(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # parameters the forward did not reach (or no forward at all): zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    # -- reporting -------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, Any]:
        """Stage-wide aggregates for summary.json: the reward diagnostics (keys containing
        ``corr``: ``reward_perception_corr``, ``reward_reasoning_corr``, their ``_within``
        variants, ``surrogate_corr/<term>``) plus generation throughput (this rank's). Under data
        parallelism the statistics are over every rank's rollouts, gathered: every rank must call it."""
        diag = self.diag
        if self._world() > 1:  # every rank's rollouts: a collective, so every rank calls this
            states: list[Any] = [None] * self._world()
            torch.distributed.all_gather_object(states, diag.state_dict())
            diag = RewardDiagnostics.merged(states, diag.term_names, diag.surrogates, stage=self.stage.name)
        out: dict[str, Any] = dict(diag.summary())
        n = self.filtering.get("steps", 0.0)  # this rank's constant-group filtering, mean per step
        out.update({k: v / n for k, v in self.filtering.items() if k != "steps" and n})
        if self.timing["gen_s"] > 0:
            out["gen_tokens_per_s"] = self.timing["gen_tokens"] / self.timing["gen_s"]
            out["gen_s_per_step"] = self.timing["gen_s"] / self.timing["steps"]
        if self.timing.get("probe_s"):
            out["visual_dependency_s_per_step"] = self.timing["probe_s"] / self.timing["steps"]
        return out


# --------------------------------------------------------------------------- data
class PromptSampler(Sampler[list[int]]):
    """An endless stream of prompt-index batches: epoch e is a permutation seeded by
    (seed, e), cut into global batches of ``batch_size × world`` (the remainder is dropped), of
    which rank r takes the r-th ``batch_size``: a step's prompts are those of one process with
    the global batch size. Endless, so ``max_steps`` alone ends the stage. ``start`` (read when
    iteration starts) is the batch the stream begins at: a resumed stage's, so its batches are
    those an uninterrupted stage draws at the same steps."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, start: Callable[[], int] = lambda: 0):
        if n < batch_size * world:
            raise ValueError(f"the split has {n} prompts, fewer than one batch of {batch_size} per device")
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start

    def __iter__(self) -> Iterator[list[int]]:
        size = self.batch_size * self.world
        epoch, offset = divmod(self.start(), self.n // size)
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for i in range(offset * size, self.n - size + 1, size):
                yield perm[i + self.rank * self.batch_size : i + (self.rank + 1) * self.batch_size].tolist()
            epoch, offset = epoch + 1, 0


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PromptDataModule(L.LightningDataModule):
    """Batches (LongTensor [B]) of prompt indices of a task split. Under a trainer the stream starts
    at the batch the stage stands at (a batch takes ``updates`` optimiser steps), so a stage resumed
    from its checkpoint draws the prompts an uninterrupted one draws."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int = 0, updates: int = 1):
        super().__init__()
        self.n_prompts, self.batch_size, self.seed, self.updates = n_prompts, batch_size, seed, updates

    def sampler(self) -> PromptSampler:
        trainer = self.trainer
        if trainer is None:
            return PromptSampler(self.n_prompts, self.batch_size, self.seed)
        # batches begun: a resume checkpoint is taken at a batch end, after its `updates` steps
        return PromptSampler(
            self.n_prompts,
            self.batch_size,
            self.seed,
            trainer.global_rank,
            trainer.world_size,
            start=lambda: -(-trainer.global_step // self.updates),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Indices(self.n_prompts), batch_sampler=self.sampler(), collate_fn=torch.tensor)


# --------------------------------------------------------------------------- entry point
def build_grpo(
    loaded: Any, encoder: Any, task: Any, stage: GRPOStageIR, seed: int, *, grad_clip: float | None = None, visual: Any = None
) -> tuple[GRPOModule, PromptDataModule]:
    """The module and data module of a ``grpo`` stage. ``grad_clip`` is the trainer block's
    ``clip``; ``visual``: the stage's ``probe.VisualRoles`` (``run.visual_roles``). The trainer
    that fits them needs ``max_steps = stage.steps`` and no ``gradient_clip_val`` (manual
    optimisation clips itself, at ``grad_clip``)."""
    if not isinstance(stage, GRPOStageIR):
        raise ValueError(f"stage `{stage.name}` is not a grpo stage")
    module = GRPOModule(loaded, encoder, task, stage, seed=seed, grad_clip=grad_clip, visual=visual)
    return module, PromptDataModule(task.size("train"), stage.batch, seed, updates=stage.updates)


__all__ = [
    "AGGREGATIONS",
    "GRPOModule",
    "PromptDataModule",
    "PromptSampler",
    "aggregate",
    "build_grpo",
    "loss_denominator",
    "loss_mask",
    "completion_logits",
    "completion_logprobs",
    "group_advantages",
    "prompt_rows",
    "grpo_loss",
    "grpo_token_loss",
]
