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

``stage.steps`` counts optimiser steps (Lightning's ``global_step``), so a stage with
``updates = u`` generates ``ceil(steps / u)`` batches.

Logged every step (``self.log``): ``loss``, ``lr``, ``grad_norm``, ``clip_frac``, ``kl`` (when
β > 0), ``adv_std``, ``trained_rows`` (share of rows in the update forward), ``completion_tokens``,
``truncated_frac``, ``gen_s``, ``gen_tokens_per_s``, ``update_s``, and the reward diagnostics of the step (``reward``,
``reward/<term>``, ``reward_perception_corr``, ... — see ``rewards.RewardDiagnostics``).
``GRPOModule.diagnostics()`` returns the same statistics aggregated over the whole stage,
for the run's ``summary.json``.

Numerics: the policy forward runs under the trainer's precision (bf16 autocast measured
faster on CPU); log-probabilities are taken in float32. Sampling (``sample_precision``) runs
the fused decoder on bf16 copies of the weights by default: unlike bf16 *autocast*, which
DESIGN §7 found slower than fp32 for decoding because it re-casts every weight every step,
the copy is made once per rollout, and bf16 matmuls of this size take ~half the time of
fp32 ones here. ``sample_precision = fp32`` reproduces Hugging Face's greedy tokens exactly.
With ``updates = 1`` the importance ratio is exactly 1 (the old log-probs are the first
update's own, detached), so the sampler's precision never enters the objective.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from percepdsl.ir import GRPOStageIR, value_at

from .encoding import collate
from .generation import eval_mode
from .rewards import WARN_AFTER, Reward, RewardDiagnostics, RolloutGroup, compile_reward

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ADV_EPS = 1e-4  # added to the std: a group with rewards {0, 0, 0, 1e-6} must not explode (TRL uses the same)


# --------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, scale: Scale = "group", eps: float = ADV_EPS) -> torch.Tensor:
    """Advantages of ``rewards[B, G]``: centred on each group's mean, divided by the
    group's std (``group``), the whole batch's std (``batch``) or nothing (``none``).
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
        return centred / (rewards.std() + eps)
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
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss and its statistics.

    ``logp``/``old_logp``/``ref_logp``: [N, T] log-probabilities of the sampled tokens under
    the policy being trained, the policy that sampled them, and the reference; ``adv``:
    [N] one advantage per sequence; ``mask``: [N, T] tokens in the loss; ``denominator``:
    see ``aggregate`` (pass the whole batch's when these rows are a subset of it).
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
    return aggregate(per_token, mask, aggregation, denominator), stats


# --------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """B prompts × G sampled completions, prompt-major (row ``i*G + j`` = sample j of prompt i)."""

    prompt: dict[str, torch.Tensor]  # collated prompt batch, B rows, left-padded
    ids: torch.Tensor  # [N, T] completion token ids, pad after EOS
    mask: torch.Tensor  # [N, T] 1 on generated tokens (EOS included)
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens
    group: int  # G
    gen_s: float = 0.0

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def _llava_parts(model: Any) -> tuple[Any, Any, Any] | None:
    """(text decoder, lm_head, unwrapped model) of a LLaVA model, whose text decoder takes
    plain 1-D position ids; else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(m.config, "model_type", None) != "llava":
        return None
    lm = getattr(getattr(m, "model", None), "language_model", None)
    head = getattr(m, "lm_head", None)
    return (lm, head, m) if lm is not None and head is not None else None


def _cache_of(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers ≥ 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(module: Any) -> str:
    """The forward's name for a KV cache: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from ``logits[N, V]`` at ``temperature`` with nucleus ``top_p``
    (temperature 0 = greedy)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
    # (the Gumbel-max trick); cheap ops where multinomial measured ~65 µs per call here.
    # E can be exactly 0 (float draws); the floor keeps 0/0 (a banned token) from winning.
    race = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=gen).clamp_(min=1e-20)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_p >= 1.0:  # in log space: argmax logit_i/T − log E_i, no softmax (banned: −inf stays −inf)
        return (scaled - race.log_()).argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1)
    # keep the smallest set of top tokens whose mass reaches top_p
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # the first token is always kept
    probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return (probs / race).argmax(dim=-1)


@torch.no_grad()  # not inference_mode: the ids and masks feed the autograd-tracked training forward
def sample_completions(
    model: Any,
    prompt: Mapping[str, torch.Tensor],
    *,
    group: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    suppress: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> Rollouts:
    """Sample ``group`` completions of every prompt of a collated, left-padded batch.

    LLaVA models with a plain Llama decoder take the fast path (``_decode_llava``): each
    prompt is prefilled once and its K/V shared by its G rows, in a cache preallocated for
    prompt + cap (Hugging Face's default dynamic cache concatenates every step, which
    profiled at ~75% of decoding time for the tiny model), and a fused decoder
    (``FusedLlamaDecoder``) runs the steps until every row has emitted EOS. Other models
    (and PEFT-wrapped ones) go through Hugging Face ``generate``.
    ``suppress`` ids are never sampled (the image token: a sampled one would break the
    image-feature scatter in the training forward). ``compile``: the fast path's decoder
    runs under ``torch.compile`` (``compiled_step``); other models ignore it.
    """
    t0 = time.perf_counter()
    parts = _llava_parts(model)
    if parts is None or not FusedLlamaDecoder.supports(parts[0]):
        ids = _hf_generate(model, prompt, group, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id, suppress, generator)
    else:
        ids = _decode_llava(
            parts, prompt, group, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id, suppress, generator, dtype, compile
        )
    is_eos = ids == eos_token_id
    seen_eos = is_eos.long().cumsum(dim=1)
    mask = (seen_eos == 0) | (is_eos & (seen_eos == 1))  # tokens up to and including the first EOS
    ids = ids.masked_fill(~mask, pad_token_id)
    return Rollouts(
        prompt=dict(prompt), ids=ids, mask=mask.long(), truncated=~is_eos.any(dim=1), group=group, gen_s=time.perf_counter() - t0
    )


class FusedLlamaDecoder:
    """Single-token decoding for a plain Llama text decoder, with fused projections.

    For the tiny model a decoding step is overhead-bound (8 rows × width 256: each matmul
    is ~1 MFLOP), so kernel launches and Python calls are what cost. A step here is 4
    matmuls per layer (q|k|v fused, o, gate|up fused, down) and a 3-op attention over a
    preallocated KV cache, instead of 7 matmuls, SDPA and the generic module stack.
    The weights are copied from the live model once per rollout (under no_grad, a few MB
    for the tiny model), in ``dtype``: bf16 halves the time of these small matmuls on
    AMX CPUs (measured 58 vs 107 µs for 8×256 @ 256×768), fp32 reproduces Hugging Face's
    greedy tokens exactly (tested). ``supports`` says when it applies: a Llama whose
    projections are plain ``nn.Linear`` (not PEFT-wrapped, not quantised).
    """

    def __init__(self, lm: Any, head: Any, dtype: torch.dtype = torch.float32, banned: tuple[int, ...] = ()):
        cfg = lm.config
        self.dtype = dtype
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        cast = lambda *ts: None if ts[0] is None else torch.cat(ts).to(dtype)  # noqa: E731
        self.embed, self.head = cast(lm.embed_tokens.weight), cast(head.weight)
        self.head_b = cast(head.bias) if getattr(head, "bias", None) is not None else None
        if banned:  # never sampled: −inf in the head's bias costs no op per step
            if self.head_b is None:
                self.head_b = torch.zeros(self.head.shape[0], dtype=dtype, device=self.head.device)
            self.head_b[list(banned)] = -math.inf
        self.norm, self.rotary = cast(lm.norm.weight), lm.rotary_emb
        self.layers = []
        q_rows = self.n_heads * self.hd
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            # the attention scale is folded into q's rows (RoPE is linear, so it commutes); for
            # a power-of-two head dim it is a power of two and the product is exact
            qkv_w = cast(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            qkv_w[:q_rows] *= a.scaling
            qkv_b = cast(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
            if qkv_b is not None:
                qkv_b[:q_rows] *= a.scaling
            self.layers.append(
                dict(
                    ln1=cast(layer.input_layernorm.weight),
                    ln2=cast(layer.post_attention_layernorm.weight),
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=cast(a.o_proj.weight),
                    o_b=cast(a.o_proj.bias),
                    gu_w=cast(m.gate_proj.weight, m.up_proj.weight),
                    gu_b=cast(m.gate_proj.bias, m.up_proj.bias),
                    down_w=cast(m.down_proj.weight),
                    down_b=cast(m.down_proj.bias),
                    act=m.act_fn,
                )
            )

    @staticmethod
    def supports(lm: Any) -> bool:
        if getattr(lm.config, "model_type", None) != "llama":
            return False
        mods = [
            mod
            for layer in lm.layers
            for mod in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            )
        ]
        return all(type(mod) is torch.nn.Linear for mod in mods)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm in one fused op (it accumulates in fp32 for bf16 inputs)."""
        return F.rms_norm(x, x.shape[-1:], w, self.eps)

    def rope_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n, hd] for positions 0..n-1, from the model's own rotary module
        (its scaling included), so a step indexes a table instead of recomputing them.
        The sin table carries rotate_half's sign: rope(x) = x·cos + roll(x, hd/2)·sin±."""
        x = torch.zeros(1, 1, dtype=torch.float32, device=device)
        cos, sin = self.rotary(x, torch.arange(n, device=device)[None])
        half = self.hd // 2
        return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def step(
        self,
        tok: torch.Tensor,
        pos: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        at: int | torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [N, V] after feeding ``tok[N]`` at positions ``pos[N]``; its K/V go to cache
        slot ``at``; attention covers slots ``0..at`` (``bias``: additive padding mask).

        ``at`` as an int: attention over the slice ``0..at``, which grows every step (eager).
        ``at`` as a 1-element tensor: the static-shape form that ``compiled_step`` compiles
        once: attention over the whole cache with the slots after ``at`` masked, and ``bias``
        covering the whole cache."""
        N, H, KV, hd = tok.shape[0], self.n_heads, self.n_kv, self.hd
        static = isinstance(at, torch.Tensor)
        unwritten = torch.arange(keys[0].shape[2], device=tok.device) > at if static else None
        x = F.embedding(tok[:, None], self.embed)  # [N, 1, D]
        cos, sin = rope[0][pos][:, None, None], rope[1][pos][:, None, None]  # [N, 1, 1, hd]
        for i, layer in enumerate(self.layers):
            # attention runs in fp32 whatever the weights: bf16 bmm over a cache whose length
            # changes every step measured ~5x slower than fp32 here (no kernel per new shape)
            qkv = F.linear(self._norm(x, layer["ln1"]), layer["qkv_w"], layer["qkv_b"]).float()  # [N, 1, (H + 2·KV)·hd]
            # one position, so [N, 1, heads·hd] → [N, heads, 1, hd] is a view; q and k rotate together
            qk = qkv[..., : (H + KV) * hd].view(N, H + KV, 1, hd)
            qk = torch.addcmul(qk * cos, qk.roll(self.hd // 2, dims=-1), sin)
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[..., (H + KV) * hd :].view(N, KV, 1, hd)
            if static:
                keys[i].index_copy_(2, at, k)
                values[i].index_copy_(2, at, v)
                K, V = keys[i], values[i]
            else:
                keys[i][:, :, at : at + 1] = k
                values[i][:, :, at : at + 1] = v
                K, V = keys[i][:, :, : at + 1], values[i][:, :, : at + 1]
            if KV != H:  # grouped-query attention: each K/V head serves H/KV query heads
                K, V = K.repeat_interleave(H // KV, dim=1), V.repeat_interleave(H // KV, dim=1)
            # eager attention: for one query position 2 bmm + softmax beat CPU SDPA (~3x per call here)
            att = q @ K.transpose(-1, -2)  # q carries the scale
            if bias is not None:
                att = att + bias
            if static:
                att = att.masked_fill(unwritten, -math.inf)
            y = (torch.softmax(att, dim=-1) @ V).to(self.dtype)
            x = x + F.linear(y.view(N, 1, H * hd), layer["o_w"], layer["o_b"])
            gate, up = F.linear(self._norm(x, layer["ln2"]), layer["gu_w"], layer["gu_b"]).chunk(2, dim=-1)
            x = x + F.linear(layer["act"](gate) * up, layer["down_w"], layer["down_b"])
        return F.linear(self._norm(x, self.norm)[:, 0], self.head, self.head_b).float()


_COMPILED: list[Any] = []  # the compiled FusedLlamaDecoder.step, made on first use; [None] if compiling failed


def compiled_step() -> Any | None:
    """``FusedLlamaDecoder.step`` under ``torch.compile`` (static shapes), or None where it
    cannot compile (no C++ compiler, an unsupported op): a warning is given once and decoding
    stays eager. Measured on the tiny model: 0.72 vs 1.07 ms per decoding step (8 rows), after
    a ≈10 s compile that Inductor caches on disk for later processes. Dynamo compiles one
    graph per (rows, prompt + cap) shape and guards on tensor metadata, not identity, so the
    per-rollout weight copies reuse it."""
    if not _COMPILED:
        try:
            _COMPILED.append(torch.compile(FusedLlamaDecoder.step, dynamic=False))
        except Exception as exc:  # noqa: BLE001 — any failure means: decode eagerly
            _compile_failed(exc)
    return _COMPILED[0]


def _compile_failed(exc: Exception) -> None:
    warnings.warn(
        f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); the GRPO sampler decodes eagerly", RuntimeWarning, stacklevel=3
    )
    _COMPILED[:] = [None]


def _decode_llava(
    parts: tuple[Any, Any, Any],
    prompt: Mapping[str, torch.Tensor],
    G: int,
    T: int,
    temperature: float,
    top_p: float,
    eos: int,
    pad: int,
    suppress: tuple[int, ...],
    gen: torch.Generator | None,
    dtype: torch.dtype,
    compile: bool = False,
) -> torch.Tensor:
    """Prefill the B prompts once (Hugging Face forward: vision tower + decoder), copy the
    prompt K/V G times into an fp32 cache preallocated for prompt + cap, then decode B·G rows."""
    lm, head, full = parts
    attn = prompt["attention_mask"]
    B, P = attn.shape
    N = B * G
    pos = _positions(attn)
    out = full(**prompt, position_ids=pos, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)
    dec = FusedLlamaDecoder(lm, head, dtype, banned=suppress)
    keys, values = [], []
    for layer in _cache_of(out).layers:  # [B, KV, P, hd] → rows of the shared prefix, G times
        for store, t in ((keys, layer.keys), (values, layer.values)):
            buf = t.new_zeros(N, t.shape[1], P + T, t.shape[3], dtype=torch.float32)
            buf[:, :, :P] = t.repeat_interleave(G, dim=0)
            store.append(buf)
    # left padding: an additive mask over cache slots (0 = attend, -inf = pad); none without padding
    bias = None
    if not bool(attn.all()):
        bias = torch.zeros(N, 1, 1, P + T, device=attn.device)
        bias[:, 0, 0, :P].masked_fill_(attn.repeat_interleave(G, dim=0) == 0, -math.inf)
    rope = dec.rope_table(P + T, attn.device)
    next_pos = pos[:, -1].repeat_interleave(G, dim=0) + 1
    ids = torch.full((N, T), pad, dtype=torch.long, device=attn.device)
    done = torch.zeros(N, dtype=torch.bool, device=attn.device)
    if suppress:  # the prefill's logits; the decoder's own carry the ban in the head bias
        logits[:, list(suppress)] = -math.inf
    step = compiled_step() if compile else None
    # The decoder sets its dtypes itself (weights in `dtype`, attention in fp32): a caller's
    # autocast would re-cast every op, which made sampling 15% slower per token here.
    with torch.autocast(attn.device.type, enabled=False):
        for t in range(T):
            tok = _sample(logits, temperature, top_p, gen).masked_fill(done, pad)
            ids[:, t] = tok
            done |= tok == eos
            if t == T - 1 or bool(done.all()):
                break
            new = None
            if step is not None:
                try:  # a compile error surfaces at the first call, before the graph touches the cache
                    new = step(dec, tok, next_pos, rope, keys, values, torch.tensor([P + t], device=attn.device), bias)
                except Exception as exc:  # noqa: BLE001
                    _compile_failed(exc)
                    step = None
            if new is None:
                new = dec.step(tok, next_pos, rope, keys, values, P + t, None if bias is None else bias[..., : P + t + 1])
            logits = new
            next_pos = next_pos + 1
    return ids


def _hf_generate(
    model: Any,
    prompt: Mapping[str, torch.Tensor],
    G: int,
    T: int,
    temperature: float,
    top_p: float,
    eos: int,
    pad: int,
    suppress: tuple[int, ...],
    gen: torch.Generator | None,
) -> torch.Tensor:
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {"do_sample": False}
    rng = torch.random.fork_rng(devices=[]) if gen is not None else contextlib.nullcontext()
    with rng:
        if gen is not None:  # generate takes no generator: seed a forked global stream from it
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        seqs = model.generate(
            **prompt,
            num_return_sequences=G,
            max_new_tokens=T,
            eos_token_id=eos,
            pad_token_id=pad,
            suppress_tokens=list(suppress) or None,
            use_cache=True,
            **sampling,
        )
    new = seqs[:, prompt["input_ids"].shape[1] :]
    return torch.nn.functional.pad(new, (0, T - new.shape[1]), value=pad)


def loss_mask(roll: Rollouts, mask_truncated: bool = True) -> torch.Tensor:
    """[N, T] tokens in the loss: every generated token (EOS included), except — with
    ``mask_truncated`` — all tokens of completions that hit the cap without EOS (their
    reward judges an unfinished text; DAPO's overlong filtering)."""
    return roll.mask * (~roll.truncated)[:, None] if mask_truncated else roll.mask


# --------------------------------------------------------------------------- log-probs
def completion_logprobs(model: Any, roll: Rollouts, temperature: float = 1.0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[n, T] float32 log-probabilities of the sampled tokens under ``model``, for the
    rollout rows ``rows`` (default: all N).

    The sequences are laid out as they were sampled — left-padded prompt, then the
    completion — with the same position ids, so the training forward sees exactly the
    sampler's context. Logits are divided by the sampling temperature (the ratio compares
    the distributions the tokens were drawn from) and only the completion positions go
    through the LM head.

    LLaVA models run the shared prompt once per prompt, not once per row: a forward over
    the B prompts (vision tower included) fills a KV cache, which is repeated for the G
    rows of each prompt and attended to by one forward over the completions. Gradients
    flow through the repeat into the prompt's K/V and the vision tower, so the result and
    its gradient equal those of a full forward over prompt + completion per row (tested),
    at (G−1)/G less prompt compute.
    """
    rows = torch.arange(roll.ids.shape[0], device=roll.ids.device) if rows is None else rows
    ids, G = roll.ids[rows], roll.group
    parts = _llava_parts(model)
    if parts is None:  # generic: one full forward per row; models compute their own positions
        # one image per prompt row (LLaVA-style pixel_values [B, C, H, W]): row i*G+j uses prompt i
        inputs = {k: v.repeat_interleave(G, dim=0)[rows] for k, v in roll.prompt.items()}
        P = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], roll.mask[rows]], dim=1)
        logits = model(**inputs, use_cache=False).logits[:, P - 1 : -1]
    else:
        from transformers import DynamicCache

        lm, head, full = parts
        prompt_mask = roll.prompt["attention_mask"]
        prompt_pos = _positions(prompt_mask)
        out = full.model(**roll.prompt, position_ids=prompt_pos, use_cache=True)
        which = torch.div(rows, G, rounding_mode="floor")  # the prompt of each row
        cache = DynamicCache(config=full.config.get_text_config())
        for i, layer in enumerate(_cache_of(out).layers):
            cache.update(layer.keys[which], layer.values[which], i)
        mask = torch.cat([prompt_mask[which], roll.mask[rows]], dim=1)
        pos = _positions(mask)[:, prompt_mask.shape[1] :]
        kw = {_cache_kwarg(lm): cache}
        hidden = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw).last_hidden_state
        # the prompt's last position predicts completion token 0; completion position t predicts t+1
        hidden = torch.cat([out.last_hidden_state[which, -1:], hidden[:, :-1]], dim=1)
        logits = head(hidden)
    logits = logits.float() / max(temperature, 1e-6)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]


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
    ):
        super().__init__()
        self.automatic_optimization = False
        self.loaded, self.model, self.encoder, self.task = loaded, loaded.model, encoder, task
        reward = compile_reward(stage.reward) if reward is None else reward  # tests pass one with their own resolver
        self.stage, self.reward, self.seed, self.split, self.grad_clip = stage, reward, int(seed), split, grad_clip
        self._ref: list[torch.nn.Module] = []  # the KL reference (iff kl > 0): see setup_reference
        self.diag = RewardDiagnostics(reward.term_names, reward.surrogates, warn_after, stage.name)
        image_token = getattr(getattr(self.model, "config", None), "image_token_id", None) or getattr(
            getattr(self.model, "config", None), "image_token_index", None
        )
        self.suppress: tuple[int, ...] = (int(image_token),) if image_token is not None else ()
        self.timing: dict[str, float] = {"gen_s": 0.0, "gen_tokens": 0.0, "steps": 0.0}
        self.setup_reference()

    # -- setup ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.model.train()
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resumable stage statistics (the weights and optimiser are Lightning's)."""
        checkpoint["grpo"] = {"diagnostics": self.diag.state_dict(), "timing": dict(self.timing)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "grpo" in checkpoint:
            self.diag.load_state_dict(checkpoint["grpo"]["diagnostics"])
            self.timing.update(checkpoint["grpo"]["timing"])

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
        params = [p for p in self.model.parameters() if p.requires_grad]
        st = self.stage
        groups = [  # decay matrices only (nanoGPT convention), as in SFTModule
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": st.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        kwargs = dict(lr=self._lr(0), betas=(st.adam_beta1, st.adam_beta2), eps=st.adam_eps)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, **kwargs)

    def _lr(self, step: int) -> float:
        return value_at(self.stage.lr, step, self.stage.steps)

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
        roll, rewards, logs = self.rollout(batch)  # may raise RewardError: no update was made yet
        adv = group_advantages(rewards, st.scale).flatten().to(roll.ids.device)
        mask = loss_mask(roll, st.mask_truncated)
        # Rows with A = 0 (constant groups) and no KL term, or no loss tokens, add exactly 0 to
        # the loss and its gradient: leave them out of the forward, keep them in the denominator.
        rows = (mask.any(dim=1) & ((adv != 0) | (st.kl > 0))).nonzero()[:, 0]
        denom = self._denominator(mask)
        ref = self.reference_logprobs(roll, rows) if st.kl > 0 and len(rows) else None
        opt = self.optimizers()
        t0 = time.perf_counter()
        old, loss, stats = None, torch.zeros(()), {}
        for u in range(st.updates):
            if u > 0 and self.global_step >= st.steps:
                break  # the stage's step budget ends inside this batch's updates
            lr = self._lr(self.global_step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=False)
            if len(rows):
                logp = completion_logprobs(self.model, roll, st.temperature, rows)
                old = logp.detach() if old is None else old  # update 0 runs the sampling policy: ρ = 1
                loss, stats = grpo_loss(
                    logp,
                    old,
                    adv[rows],
                    mask[rows],
                    clip=st.clip,
                    clip_high=st.clip_high,
                    aggregation=st.aggregation,
                    ref_logp=ref,
                    kl=st.kl,
                    denominator=denom,
                )
                self.manual_backward(loss)
            logs["grad_norm"] = self._clip_grads()
            opt.step()  # also with zero gradients, as any GRPO step: Adam's momentum still moves
        logs.update(
            stats,
            loss=float(loss.detach()),
            lr=lr,
            adv_std=float(adv.std()),
            trained_rows=len(rows) / max(len(adv), 1),
            update_s=time.perf_counter() - t0,
        )
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=int(roll.ids.shape[0]))

    # -- pieces of the step ----------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, indices: torch.Tensor) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
        """Sample G completions per prompt, score them, evaluate the reward.
        Returns the rollouts, rewards [B, G] and the step's logs."""
        samples = [self.task.sample(self.split, int(i)) for i in indices.tolist()]
        prompt = collate([self.encoder.encode_prompt(s.query, s.image) for s in samples], self.encoder.pad_token_id)
        prompt = {k: v.to(self.device) for k, v in prompt.items() if isinstance(v, torch.Tensor)}
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.global_step)
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
        groups = [RolloutGroup.score(self.task, s, texts[i * G : (i + 1) * G], trunc[i * G : (i + 1) * G]) for i, s in enumerate(samples)]
        values = [self.reward(g) for g in groups]
        logs = self.diag.update(groups, values)
        n_tok = float(sum(lengths))
        self.timing["gen_s"] += roll.gen_s
        self.timing["gen_tokens"] += n_tok
        self.timing["steps"] += 1
        logs.update(
            completion_tokens=n_tok / len(lengths),
            truncated_frac=float(np.mean(trunc)),
            gen_s=roll.gen_s,
            gen_tokens_per_s=n_tok / max(roll.gen_s, 1e-9),
        )
        return roll, torch.tensor(np.stack([v.total for v in values]), dtype=torch.float32), logs

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
        variants, ``surrogate_corr/<term>``) plus generation throughput."""
        out: dict[str, Any] = dict(self.diag.summary())
        if self.timing["gen_s"] > 0:
            out["gen_tokens_per_s"] = self.timing["gen_tokens"] / self.timing["gen_s"]
            out["gen_s_per_step"] = self.timing["gen_s"] / self.timing["steps"]
        return out


# --------------------------------------------------------------------------- data
class PromptSampler(Sampler[list[int]]):
    """An endless stream of prompt-index batches: epoch e is a permutation seeded by
    (seed, e), cut into batches of ``batch_size`` (the remainder is dropped); under DDP
    rank r takes every world-th batch. Endless, so ``max_steps`` alone ends the stage."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise ValueError(f"the split has {n} prompts, fewer than one batch of {batch_size} per device")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            batches = [perm[i : i + self.batch_size].tolist() for i in range(0, self.n - self.batch_size + 1, self.batch_size)]
            yield from batches[self.rank :: self.world]
            epoch += 1


class _Indices(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PromptDataModule(L.LightningDataModule):
    """Batches (LongTensor [B]) of prompt indices of a task split."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int = 0):
        super().__init__()
        self.n_prompts, self.batch_size, self.seed = n_prompts, batch_size, seed

    def sampler(self) -> PromptSampler:
        trainer = getattr(self, "_trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return PromptSampler(self.n_prompts, self.batch_size, self.seed, rank, world)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Indices(self.n_prompts), batch_sampler=self.sampler(), collate_fn=torch.tensor)


# --------------------------------------------------------------------------- entry point
def build_grpo(
    loaded: Any, encoder: Any, task: Any, stage: GRPOStageIR, seed: int, *, grad_clip: float | None = None
) -> tuple[GRPOModule, PromptDataModule]:
    """The module and data module of a ``grpo`` stage. ``grad_clip`` is the trainer block's
    ``clip``. The trainer that fits them needs ``max_steps = stage.steps`` and no
    ``gradient_clip_val`` (manual optimisation clips itself, at ``grad_clip``)."""
    if not isinstance(stage, GRPOStageIR):
        raise ValueError(f"stage `{stage.name}` is not a grpo stage")
    module = GRPOModule(loaded, encoder, task, stage, seed=seed, grad_clip=grad_clip)
    return module, PromptDataModule(task.size("train"), stage.batch, seed)


__all__ = [
    "FusedLlamaDecoder",
    "GRPOModule",
    "PromptDataModule",
    "PromptSampler",
    "Rollouts",
    "AGGREGATIONS",
    "aggregate",
    "build_grpo",
    "loss_denominator",
    "loss_mask",
    "completion_logprobs",
    "group_advantages",
    "grpo_loss",
    "sample_completions",
]
