"""Supervised fine-tuning under Lightning: module, data module, diagnostics.

``SFTModule(loaded, stage, role_names, grad_clip=...)`` trains a ``LoadedModel`` as the
typed ``SFTStageIR`` says: its loss becomes an ``Objective`` (losses.py); the parts its ``freeze``
lists are kept fixed (``models.freeze_parts``); AdamW takes the trainable parameters with the
stage's ``weight_decay``, ``adam_beta1``/``adam_beta2``/``adam_eps``; the learning rate at
optimiser step ``s`` is ``value_at(stage.lr, s, stage.steps)`` in absolute values (the one
schedule evaluator, shared with GRPO and the loss weights), times NGDiff's auto-LR
multiplier when ``auto_lr`` is on. Token-mean and mix losses use Lightning's automatic
optimisation; NGDiff performs its own backward (manual optimisation). ``grad_clip`` is the
trainer block's ``clip``.

Speed notes (the tiny model is small enough that overheads dominate):
- logits are computed only at target positions (``target_logits``): the LM head and the
  cross-entropy never see prompt or image tokens;
- batches can be length-bucketed (``LengthBucketSampler``, ``bucket=True``): little compute goes
  to padding, but a batch then holds look-alike items (on graph colouring, equal length means
  similar graphs), which kept the tiny model from learning perception; so it is opt-in;
- items are encoded once in ``setup`` (processor + tokenizer cost paid once, not per epoch);
- NGDiff runs its forward in two chunks, the prefix that holds perception's targets and the
  rest attending to the prefix's keys and values (``SFTModule.ngdiff_backward``): perception's
  gradient then costs a backward through the prefix only, not a second full backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from percepdsl.ir import SFTStageIR, value_at

from .encoding import Encoder, collate, model_inputs
from .generation import eval_mode
from .losses import Objective, quadratic_step, role_token_losses
from .models import LoadedModel, drop_frozen, freeze_parts, restore_frozen
from .optim import adamw
from .packing import (
    Layout,
    PrefixKV,
    bucket,
    collate_packed,
    n_tokens,
    next_targets,
    packable,
    split_batch,
    text_model_of,
    training_attention,
)


# --------------------------------------------------------------------------- forward
def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(backbone returning last_hidden_state, lm_head) when the model has the usual
    ``.model`` + ``.lm_head`` layout and no logit post-processing; else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    if getattr(text_cfg, "final_logit_softcapping", None):
        return None
    base, head = getattr(m, "model", None), getattr(m, "lm_head", None)
    return (base, head) if base is not None and isinstance(head, torch.nn.Module) else None


def target_logits(model: Any, batch: Mapping[str, Any], prefix: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at target positions only: (logits[N, V], labels[N], role_ids[N]).

    ``batch`` is right-padded items or one packed row (``packing.collate_packed``), or a chunk
    of either (``packing.split_batch``, with ``prefix`` the chunked forward's hand-over); the
    text decoder of a supported model attends with ``packing.packed_attention`` either way. In
    a packed row the last token of an item "predicts" the next item's first token, a prompt
    token with label -100: no target crosses an item boundary."""
    labels, roles = next_targets(batch)
    sel = labels != -100
    inputs = model_inputs(batch)
    split = _split_head(model)
    with training_attention(model) as own_attention:
        if ("seq_lengths" in batch or prefix is not None) and not own_attention:
            raise ValueError("a packed or chunked batch needs a model whose attention packing supports (packing.text_model_of)")
        if "seq_lengths" in batch:
            inputs["percep_layout"] = Layout.of(batch["seq_lengths"])
        if prefix is not None:
            inputs["percep_prefix"] = prefix
        if split is not None:
            base, head = split
            hidden = base(**inputs, use_cache=False).last_hidden_state
            # the LM head on bucket(n) rows (the extra ones repeat row 0 and are dropped): the
            # number of targets changes every batch, and every new matmul shape costs a kernel compile
            idx = sel.flatten().nonzero()[:, 0]
            n = idx.shape[0]
            logits = head(hidden.reshape(-1, hidden.shape[-1])[F.pad(idx, (0, bucket(n) - n))])[:n]
        else:
            logits = model(**inputs, use_cache=False).logits[sel]
    return logits, labels[sel], roles[sel]


def role_losses(model: Any, batch: Mapping[str, Any], n_roles: int, prefix: PrefixKV | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-role CE sums and token counts of one batch (one forward; a chunk's with ``prefix``)."""
    logits, labels, roles = target_logits(model, batch, prefix)
    return role_token_losses(logits, labels, roles, n_roles)


def chunked_role_losses(
    model: Any, prefix: Mapping[str, Any], rest: Mapping[str, Any], n_roles: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Per-role CE sums and counts of a batch's prefix chunk and of the whole batch, from one
    forward run in two chunks (``packing.split_batch``): the rest attends to the prefix's keys
    and values, so its logits are the unchunked forward's, and a loss on the prefix's targets
    depends on the prefix chunk's graph only."""
    kv = PrefixKV(Layout.of(prefix["seq_lengths"]) if "seq_lengths" in prefix else None)
    head = role_losses(model, prefix, n_roles, kv)
    if rest["input_ids"].shape[1] == 0:  # every item ends inside its prefix
        return head, head
    kv.reading = True
    tail = role_losses(model, rest, n_roles, kv)
    return head, (head[0] + tail[0], head[1] + tail[1])


# --------------------------------------------------------------------------- module
class SFTModule(L.LightningModule):
    """LightningModule for SFT with role-aware objectives.

    Deliberately internal (not spec settings): ``chunked`` (NGDiff's chunked forward: exact,
    only faster) and ``log_every_step`` (tests: every metric on every step instead of only on
    the logger's steps). NGDiff's ``auto_lr_every`` and ``norm_every`` are arguments of the
    stage's ``ngdiff(...)`` loss."""

    def __init__(
        self,
        loaded: LoadedModel,
        stage: SFTStageIR,
        role_names: Sequence[str],
        *,
        grad_clip: float | None = None,
        chunked: bool = True,
        log_every_step: bool = False,
        visual: Any = None,
    ):
        super().__init__()
        self.visual = visual  # probe.VisualRoles: the stage's `visual(...)` role rules, or None
        self.loaded = loaded
        self.model = loaded.model
        self.stage = stage
        # the stage's frozen parts, the rest as loaded: before the optimiser takes the trainable
        # parameters and before a resume checkpoint, which holds no frozen ones, is loaded
        self.trainable_parameters = freeze_parts(loaded, stage.freeze)
        self.objective = Objective(stage.loss, role_names)
        self.grad_clip = grad_clip
        self.chunked, self.log_every_step = chunked, log_every_step
        self.n_roles = len(self.objective.role_names)
        self.automatic_optimization = not self.objective.manual_backward
        self.lr_scale = 1.0  # NGDiff auto-LR multiplier (smoothed)
        self.tokens_processed = 0  # tokens the training forwards read (padding excluded): the progress bar's throughput

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as found

    # resuming from a Lightning checkpoint restores the NGDiff state too
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen(self, checkpoint)  # LoRA: the adapter, not the base model
        checkpoint["percep_sft"] = {"lr_scale": self.lr_scale, "ngdiff_norms": dict(self.objective._norms)}
        if self.visual is not None:  # refreshed reference models: a resume tags as the run would have
            checkpoint["percep_sft"]["visual_references"] = self.visual.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(self, checkpoint)
        state = checkpoint.get("percep_sft", {})
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.objective._norms = {int(k): float(v) for k, v in state.get("ngdiff_norms", {}).items()}
        if self.visual is not None:
            self.visual.load_state_dict(state.get("visual_references", {}))

    # -- optimisation -------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused AdamW, but not under fp16 AMP, where Lightning's grad scaler must unscale before clipping
        fused = self._trainer is None or str(self.trainer.precision) != "16-mixed"
        st = self.stage
        return adamw(
            self.model,
            lr=value_at(st.lr, 0, st.steps),
            weight_decay=st.weight_decay,
            betas=(st.adam_beta1, st.adam_beta2),
            eps=st.adam_eps,
            fused=fused,
        )

    @property
    def total_steps(self) -> int:
        """Steps the schedules run over: the stage's."""
        return self.stage.steps

    def _set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = value_at(self.stage.lr, step, self.total_steps) * self.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if clip:
            self._clip(float(clip))

    def _clip(self, clip: float) -> float:
        """Clip the global grad norm. Done here rather than by Lightning, which refuses
        fused optimisers under AMP (fused AdamW unscales fp16 grads itself; with bf16 or
        fp32 there is no scaling, so clipping the raw grads is exact)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))

    # -- the step ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        step, total = self.global_step, self.total_steps
        self.tokens_processed += n_tokens(batch)
        opt = self.optimizers()
        logs = {"lr": self._set_lr(opt.optimizer if hasattr(opt, "optimizer") else opt, step)}
        if self.visual is not None:  # label-free roles: a frozen reference's visual dependency tags the targets
            self.visual.refresh(self.model, step)
            batch = self.visual.tag(batch)
            logs["visual_roles_s"] = self.visual.seconds
        counts = self._global_counts(batch)
        if self.automatic_optimization:  # token mean, mix: Lightning does backward + step
            sums, local = role_losses(self.model, batch, self.n_roles)
            loss, obj_logs = self.objective.loss(sums, local if counts is None else counts, step, total)
        else:  # NGDiff: g = Σ g_i/‖g_i‖ from our own backward, then clip and step
            opt.zero_grad(set_to_none=True)
            loss, obj_logs = self.ngdiff_backward(batch, step, counts)
            if self.grad_clip:
                self._clip(float(self.grad_clip))
            if self.objective.auto_lr and step % self.stage.loss.auto_lr_every == 0:
                obj_logs.update(self._auto_lr_step(opt, batch, float(loss.detach()), counts))
            else:
                opt.step()
            obj_logs["lr_scale"] = self.lr_scale
        logs.update(obj_logs)
        if not self._logger_step():  # the logger writes every n-th step only: skip the rest's cost
            logs = {"loss": logs["loss"]}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=int(batch["n_target"].shape[0]))
        return loss if self.automatic_optimization else None

    def _global_counts(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Under data parallelism: the target tokens per role of the global batch (every rank's,
        summed) over the number of ranks; None on one process.

        Each rank's token means then divide its own loss sums by these, so the gradient the ranks
        average is Σ_ranks ∇(sums) / global count: the token mean over the global batch, exactly
        what one process with the whole batch computes. Dividing by each rank's own count instead
        would average per-rank means, which weights a rank's tokens more the fewer it holds."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        labels, roles = batch["labels"][:, 1:], batch["role_ids"][:, 1:]
        counts = torch.bincount(roles[(labels != -100) & (roles >= 0)], minlength=self.n_roles)[: self.n_roles].float()
        torch.distributed.all_reduce(counts)
        return counts / self.trainer.world_size

    def _logger_step(self) -> bool:
        """Whether Lightning writes this step's metrics (``log_every_n_steps``). Logging all
        ~20 metrics costs ≈4% of a tiny-model step; on other steps only ``loss`` is logged."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True)) or self.log_every_step

    def ngdiff_backward(
        self, batch: Mapping[str, Any], step: int, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Leave NGDiff's combined gradient in ``.grad``; returns (loss, logs) of the step.
        ``counts``: the token counts to take group means over (``_global_counts`` under DDP;
        default each forward's own).

        The forward runs in two chunks (``chunked_role_losses``) when a group's targets all sit
        in a prefix of every item (perception, right after the image and query; ``_chunk``):
        that group's loss then depends on the prefix chunk's graph only, so its gradient
        (``autograd.grad``, graph kept) costs a backward through the prefix, and the other
        groups' one backward through the whole graph — one forward, no second full backward.
        Otherwise (no such group, a model our attention does not serve, or norms reused under
        ``norm_every``) one forward and the objective's backward per group (exact too).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        reduce = self._all_reduce()
        pre: dict[int, list[torch.Tensor | None]] = {}
        plan = self._chunk(batch) if self.chunked and self.objective.exact_step(step) else None
        if plan is None:
            sums, local = role_losses(self.model, batch, self.n_roles)
        else:
            i, prefix, rest = plan
            (head, _), (sums, local) = chunked_role_losses(self.model, prefix, rest, self.n_roles)
            part = self.objective.term_losses(head, local if counts is None else counts)[i]
            assert part is not None  # _chunk picks a group with targets
            # materialised: under DDP every rank must all-reduce the same list of tensors
            pre[i] = list(torch.autograd.grad(part, params, retain_graph=True, allow_unused=True, materialize_grads=reduce is not None))
            if reduce is not None:
                reduce([g for g in pre[i] if g is not None])
        counts = local if counts is None else counts
        loss, logs = self.objective.loss(sums, counts, step, self.total_steps)
        backward = self.manual_backward if self._trainer is not None else None
        logs.update(
            self.objective.ngdiff_backward(
                sums,
                counts,
                params,
                backward=backward,
                step=step,
                all_reduce=reduce,
                pre_grads=pre,
                diagnostics=self._trainer is None or self._logger_step(),
            )
        )
        return loss, logs

    def _chunk(self, batch: Mapping[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """The group to take from a prefix chunk and the batch's two chunks (``split_batch``),
        or None. Item i's prefix ends after its last target of the group and not before its
        prompt (which holds the image); the group chosen is the one whose prefixes hold the
        fewest tokens (padded items: the longest prefix counts for all). Under DDP the ranks
        choose together (the largest share over ranks), so their all-reduces pair up."""
        if text_model_of(self.model) is None:
            return None
        labels, roles = batch["labels"], batch["role_ids"]
        if "seq_lengths" in batch:
            lay = Layout.of(batch["seq_lengths"])
            spans = [(0, s, n) for s, n in zip(lay.starts, lay.lengths)]
        else:
            spans = [(r, 0, int(labels.shape[1])) for r in range(labels.shape[0])]
        prompts: list[int] = []
        ends: list[list[int]] = []
        for r, s, n in spans:
            lab, rol = labels[r : r + 1, s : s + n], roles[r : r + 1, s : s + n]
            prompts.append(int((lab[0] == -100).long().argmin()) if bool((lab != -100).any()) else n)
            ends.append(self.objective.prefix_ends(lab, rol))
        total = sum(n for _, _, n in spans)
        shares = []
        for g in range(len(self.objective.terms)):
            cut = [max(e[g], p) for e, p in zip(ends, prompts)]  # an item without the group's targets: its prompt
            used = sum(cut) if "seq_lengths" in batch else max(cut) * len(spans)
            shares.append(used / total if any(e[g] for e in ends) else 1.0)
        if self._all_reduce() is not None:
            shares_t = torch.tensor(shares)
            torch.distributed.all_reduce(shares_t, op=torch.distributed.ReduceOp.MAX)
            shares = shares_t.tolist()
        g = min(range(len(shares)), key=shares.__getitem__)
        if shares[g] >= 1.0:
            return None
        cut = [max(e[g], p) for e, p in zip(ends, prompts)]
        prefix, rest = split_batch(batch, cut, int(self.loaded.tokenizer.pad_token_id or 0))
        return g, prefix, rest

    def _all_reduce(self) -> Any:
        """Under DDP, average the group gradients NGDiff computes with autograd.grad (the
        last group's goes through manual_backward, which DDP already averages)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        world = self.trainer.world_size

        def reduce(grads: list[torch.Tensor]) -> None:
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(world)

        return reduce

    @torch.no_grad()
    def _auto_lr_step(self, opt: Any, batch: Mapping[str, Any], l0: float, counts: torch.Tensor | None = None) -> dict[str, float]:
        """NGDiff automatic learning rate (a GeN-style line search, forward-only).

        Take the optimiser step Δ at the current lr, measure the objective (Σ group token
        means) at θ+Δ and θ+2Δ on the same batch, fit a parabola through the three
        losses and move to its minimum t*·Δ (AdamW's Δ is linear in lr, so this is the
        step a t*× larger lr would have taken). The lr multiplier tracks t* with an EMA
        (0.9: a probe every ``auto_lr_every`` steps, smoothed over ~10 probes) so the
        steps between probes use it too. Cost: 2 forwards + one parameter copy per probe.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        opt.step()
        delta = torch._foreach_sub([p.detach() for p in params], before)
        del before

        def objective_now() -> float:
            sums, local = role_losses(self.model, batch, self.n_roles)
            return float(self.objective.loss(sums, local if counts is None else counts, self.global_step, self.total_steps)[0])

        l1 = objective_now()
        torch._foreach_add_([p.data for p in params], delta)
        l2 = objective_now()
        losses = torch.tensor([l0, l1, l2])
        if (reduce := self._all_reduce()) is not None:  # every rank must take the same step
            reduce([losses])
        t = quadratic_step(*losses.tolist())
        torch._foreach_add_([p.data for p in params], delta, alpha=t - 2.0)  # θ + t·Δ
        self.lr_scale = float(min(max(0.9 * self.lr_scale + 0.1 * self.lr_scale * t, 0.05), 20.0))
        return {"auto_lr_t": t}


def build_trainer(
    max_steps: int,
    *,
    objective: Objective | None = None,
    precision: str = "bf16-mixed",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accumulate: int = 1,
    callbacks: Sequence[L.Callback] = (),
    logger: Any = False,
    **extra: Any,
) -> L.Trainer:
    """A Lightning Trainer from the run's settings.

    ``precision="bf16-mixed"`` is the default on CPU too (autocast; measured faster than
    fp32 for the tiny model, see benchmarks/bench_sft.py). Gradient clipping is a module
    setting (``grad_clip``), because Lightning refuses Trainer-level clipping under manual
    optimisation. NGDiff normalises each batch's gradients, so it cannot accumulate.
    With more than one device or node, ``auto`` is ``ddp`` (the one tested strategy).
    """
    if objective is not None and objective.manual_backward and accumulate > 1:
        raise ValueError("ngdiff normalises every batch's gradients; gradient accumulation is not supported (use a larger batch instead)")
    if strategy == "auto" and (num_nodes > 1 or (isinstance(devices, int) and devices > 1)):
        strategy = "ddp"
    if strategy == "ddp":  # VLMs carry unused parameters (e.g. CLIP's pooler norm under LLaVA)
        strategy = "ddp_find_unused_parameters_true"
    # use_distributed_sampler=False: LengthBucketSampler shards batches across ranks itself
    return L.Trainer(
        max_steps=max_steps,
        precision=precision,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        **{"enable_progress_bar": False, "use_distributed_sampler": False, **extra},
    )


# --------------------------------------------------------------------------- data
class EncodedDataset(Dataset):
    """Training items of one task split, encoded once (pixels stored in float16).

    float16 keeps 11 significant bits: for normalised 8-bit images (|v| ≲ 2.2) the error
    is ≤ 1e-3, under a tenth of one 8-bit grey level (≈0.015), at half the memory."""

    def __init__(self, task: Any, encoder: Encoder, split: str = "train", n_items: int | None = None):
        n = task.size(split) if n_items is None else min(n_items, task.size(split))
        self.items: list[dict[str, Any]] = []
        for i in range(n):
            s = task.sample(split, i)
            item = encoder.encode_train(s.query, s.image, s.response)
            self.items.append({k: (v.half() if _is_pixels(k, v, torch.float32) else v) for k, v in item.items()})
        self.lengths = np.array([int(it["input_ids"].shape[0]) for it in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: (v.float() if _is_pixels(k, v, torch.float16) else v) for k, v in self.items[i].items()}


def _is_pixels(key: str, v: Any, dtype: torch.dtype) -> bool:
    return key == "pixel_values" and isinstance(v, torch.Tensor) and v.dtype == dtype


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length, in a deterministic order from (seed, epoch).

    Shuffle all items, cut the permutation into windows of ``window`` batches, sort each
    window by length and cut it into batches, then shuffle the batches. Larger windows
    cut more padding but make batch composition less random; 50 batches (400 items at
    batch 8) brings padding to a few percent for lengths that vary by ±50%.

    Under data parallelism (``world`` ranks, ``batch_size`` per rank) the batches above are
    global batches of ``batch_size × world`` items and rank r takes the r-th part of each, so
    the items of a step are those one process with the global batch size sees at that step,
    whatever the number of ranks. A global batch too short to give every rank an item (the
    last of an epoch) is left out.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        window: int = 50,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.window, self.drop_last = batch_size, seed, window, drop_last
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches of ``batch_size × world`` items, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(self.lengths))
        size = self.batch_size * self.world
        span = size * max(self.window, 1)
        out: list[list[int]] = []
        for w in range(0, len(perm), span):
            chunk = perm[w : w + span]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out += [chunk[i : i + size].tolist() for i in range(0, len(chunk), size)]
        out = [b for b in out if len(b) == size or (not self.drop_last and len(b) >= self.world)]
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    def batches(self) -> list[list[int]]:
        """This rank's part of each global batch (all of it on one process)."""
        cut = lambda b, r: b[r * len(b) // self.world : (r + 1) * len(b) // self.world]  # noqa: E731
        return [cut(b, self.rank) for b in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        size = self.batch_size * self.world
        n, rest = divmod(len(self.lengths), size)
        return n + int(not self.drop_last and rest >= self.world)

    def padding_fraction(self) -> float:
        """Share of the batched token slots that are padding, this epoch."""
        real = pad = 0
        for b in self.batches():
            ls = self.lengths[b]
            real += int(ls.sum())
            pad += int(ls.max()) * len(b) - int(ls.sum())
        return pad / max(real + pad, 1)


class SFTDataModule(L.LightningDataModule):
    """Task split → encoded items → seeded batches: random (default) or length-bucketed.

    ``packing`` (default): each batch is one padding-free row (``packing.collate_packed``)
    when the model and the items allow it (``packing.text_model_of``, ``packing.packable``),
    else right-padded items; ``self.packed`` says which, after ``setup``. The batches hold
    the same items either way: packing changes the layout, not the composition."""

    def __init__(
        self,
        task: Any,
        encoder: Encoder,
        batch_size: int = 8,
        seed: int = 0,
        *,
        split: str = "train",
        n_items: int | None = None,
        bucket: bool = False,
        window: int = 50,
        num_workers: int = 0,
        packing: bool = True,
    ):
        super().__init__()
        self.task, self.encoder = task, encoder
        self.batch_size, self.seed, self.split, self.n_items = batch_size, seed, split, n_items
        self.bucket, self.window, self.num_workers = bucket, window, num_workers
        self.packing, self.packed = packing, False
        self.dataset: EncodedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = EncodedDataset(self.task, self.encoder, self.split, self.n_items)
            self.packed = (
                self.packing and text_model_of(self.encoder.loaded.model) is not None and all(packable(it) for it in self.dataset.items)
            )

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """One training batch: a packed row, or right-padded items whose length is rounded up
        by ``packing.bucket`` (fewer distinct matmul shapes, so fewer kernel compiles)."""
        pad = self.encoder.pad_token_id
        if self.packed:
            return collate_packed(items, pad)
        return collate(items, pad, length=bucket(max(int(it["input_ids"].shape[0]) for it in items)))

    def sampler(self) -> LengthBucketSampler:
        self.setup()
        assert self.dataset is not None
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # window=1 without bucketing: plain seeded shuffling with a sort inside each batch only
        return LengthBucketSampler(
            self.dataset.lengths, self.batch_size, self.seed, self.window if self.bucket else 1, rank=rank, world=world
        )

    def train_dataloader(self) -> DataLoader:
        batches: Sampler[list[int]] = self.sampler()
        trainer = self.trainer
        if trainer is not None and trainer.state.status.value == "running" and trainer.max_steps > 0:
            # Under a Trainer, serve the stream of batches from where training stands, so a run
            # resumed from a checkpoint sees exactly the batches an uninterrupted one would.
            acc = trainer.accumulate_grad_batches
            batches = StepStream(batches, lambda: trainer.global_step * acc, trainer.max_steps * acc)
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate,
        )


class StepStream(Sampler[list[int]]):
    """Batches of successive epochs (epoch e in ``base``'s seeded order for e) as one stream,
    started at ``position()`` batches and ended at ``total``.

    The position is read when iteration starts, so the stream resumes wherever the optimiser
    step counter stands (fresh run: 0; resumed run: the restored global step), and the batch
    at each step is a pure function of (seed, step)."""

    def __init__(self, base: LengthBucketSampler, position: Any, total: int):
        self.base, self.position, self.total = base, position, total

    def __iter__(self) -> Iterator[list[int]]:
        n = self.position()
        epoch, offset = divmod(n, max(len(self.base), 1))
        while n < self.total:
            self.base.set_epoch(epoch)
            for b in self.base.batches()[offset:]:
                if n >= self.total:
                    return
                yield b
                n += 1
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:
        # the whole stage: a resumed one's loop restarts at the restored batch of this one epoch (the
        # batches left made Lightning end that epoch early, and the rows of a resumed stage had epoch 1)
        return self.total


# --------------------------------------------------------------------------- diagnostics
def per_role_grad_norms(module: SFTModule | Any, batch: Mapping[str, Any], role_names: Sequence[str] | None = None) -> dict[str, float]:
    """Gradient norm of each role's token-mean loss and the cosine between every pair.

    One forward, one backward per role present (graph retained in between); ``.grad`` is
    untouched; memory: one float32 gradient copy per role (a diagnostic for eval points).
    Keys: ``grad_norm/<role>``, ``grad_cos/<a>/<b>``.
    """
    model = _model_of(module)
    names = list(role_names or module.objective.role_names)
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model), torch.enable_grad():  # no dropout: the diagnostic should not depend on a dropout draw
        sums, counts = role_losses(model, batch, len(names))
        present = [i for i in range(len(names)) if int(counts[i]) > 0]
        grads: dict[int, list[torch.Tensor]] = {}
        for j, i in enumerate(present):
            more = j < len(present) - 1
            gs = torch.autograd.grad(sums[i] / counts[i], params, retain_graph=more, allow_unused=True)
            grads[i] = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(gs, params)]
    norms = {i: float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))) for i, g in grads.items()}
    out = {f"grad_norm/{names[i]}": n for i, n in norms.items()}
    for a_i, a in enumerate(present):
        for b in present[a_i + 1 :]:
            dot = sum(float(x.reshape(-1) @ y.reshape(-1)) for x, y in zip(grads[a], grads[b]))
            out[f"grad_cos/{names[a]}/{names[b]}"] = dot / (norms[a] * norms[b] + 1e-12)
    return out


def _model_of(module: Any) -> Any:
    """The model inside a LightningModule (or the model itself)."""
    return module.model if isinstance(module, L.LightningModule) else module
