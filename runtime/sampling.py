"""GRPO's sampler: G completions of every prompt of a batch, as ``Rollouts``.

``sample_completions`` takes the fast path for LLaVA models with a plain Llama text decoder
(``fused_parts``): ``decode_llava`` prefills each prompt once by the Hugging Face forward
(vision tower + decoder), copies its K/V to its G rows in a cache preallocated for prompt +
cap, and ``FusedLlamaDecoder`` runs the single-token steps (eagerly, or as ``compiled_step``
under ``torch.compile``). A PEFT LoRA model takes the same path, its adapters merged into the
decoder's weight copies (``dense_weights``); other models go through Hugging Face
``generate``. Evaluation (``generation.generate``) decodes through the same ``decode_llava``,
greedy, with a cap per row.

Numerics: the fused decoder runs on bf16 copies of the weights by default (the GRPO stage's
``sample_precision``). bf16 *autocast* measured slower than fp32 for decoding here because it
re-casts every weight at every step; the copy is made once per rollout instead, and bf16
matmuls of this size take about half the time of fp32 ones on this CPU (AMX). fp32 weights
reproduce Hugging Face's greedy tokens exactly (tested). Attention always runs in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Rollouts:
    """B prompts × G sampled completions, prompt-major (row ``i*G + j`` = sample j of prompt i)."""

    prompt: dict[str, torch.Tensor]  # collated prompt batch, B rows, left-padded
    ids: torch.Tensor  # [N, T] completion token ids, pad after EOS
    mask: torch.Tensor  # [N, T] 1 on generated tokens (EOS included)
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens
    group: int  # G
    gen_s: float = 0.0
    probe_s: float = 0.0  # seconds of the reward's visual-dependency forwards (grpo.GRPOModule.dependency)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def llava_parts(model: Any) -> tuple[Any, Any, Any] | None:
    """(text decoder, lm_head, unwrapped model) of a LLaVA model, whose text decoder takes
    plain 1-D position ids; else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(m.config, "model_type", None) != "llava":
        return None
    lm = getattr(getattr(m, "model", None), "language_model", None)
    head = getattr(m, "lm_head", None)
    return (lm, head, m) if lm is not None and head is not None else None


def fused_parts(model: Any) -> tuple[Any, Any, Any] | None:
    """``llava_parts`` of a model that ``FusedLlamaDecoder`` can decode, else None."""
    parts = llava_parts(model)
    return parts if parts is not None and FusedLlamaDecoder.supports(parts[0], parts[1]) else None


def cache_of(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers ≥ 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_kwarg(module: Any) -> str:
    """The forward's name for a KV cache: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def position_ids(mask: torch.Tensor) -> torch.Tensor:
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

    LLaVA models with a plain Llama decoder take the fast path (``decode_llava``): each
    prompt is prefilled once and its K/V shared by its G rows, in a cache preallocated for
    prompt + cap (Hugging Face's default dynamic cache concatenates every step, which
    profiled at ~75% of decoding time for the tiny model), and a fused decoder
    (``FusedLlamaDecoder``) runs the steps until every row has emitted EOS; LoRA adapters are
    merged into its weight copies. Other models go through Hugging Face ``generate``.
    ``suppress`` ids are never sampled (the image token: a sampled one would break the
    image-feature scatter in the training forward). ``compile``: the fast path's decoder
    runs under ``torch.compile`` (``compiled_step``); other models ignore it.
    """
    t0 = time.perf_counter()
    parts = fused_parts(model)
    if parts is None:
        ids = _hf_generate(model, prompt, group, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id, suppress, generator)
    else:
        dec = FusedLlamaDecoder(parts[0], parts[1], dtype, banned=suppress)
        ids = decode_llava(parts[2], dec, prompt, group, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id, generator, compile)
    is_eos = ids == eos_token_id
    seen_eos = is_eos.long().cumsum(dim=1)
    mask = (seen_eos == 0) | (is_eos & (seen_eos == 1))  # tokens up to and including the first EOS
    ids = ids.masked_fill(~mask, pad_token_id)
    return Rollouts(
        prompt=dict(prompt), ids=ids, mask=mask.long(), truncated=~is_eos.any(dim=1), group=group, gen_s=time.perf_counter() - t0
    )


def dense_weights(mod: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that a linear projection applies in eval mode: an ``nn.Linear``'s own, or
    for a PEFT LoRA linear its base weight plus each active adapter's ``B·A·scaling`` (exact:
    LoRA's dropout is off in eval mode). ``_mergeable`` says which modules qualify."""
    if type(mod) is torch.nn.Linear:
        return mod.weight, mod.bias
    base = mod.base_layer
    weight = base.weight
    if not mod.merged and not mod.disable_adapters:  # merged: the base weight already holds the deltas
        for name in mod.active_adapters:
            if name in mod.lora_A:
                weight = weight + mod.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def _mergeable(mod: Any) -> bool:
    """A plain linear, or a PEFT LoRA linear over one, with vanilla adapters only (no DoRA or
    other variants, no LoRA bias), unquantised."""
    if type(mod) is torch.nn.Linear:
        return True
    base = getattr(mod, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(mod, "get_delta_weight") or not hasattr(mod, "lora_A"):
        return False
    active = [n for n in mod.active_adapters if n in mod.lora_A]
    return not any(n in getattr(mod, "lora_variant", {}) or getattr(mod, "lora_bias", {}).get(n) for n in active)


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
    projections are plain ``nn.Linear`` or PEFT LoRA linears over them (merged into the
    copies: W + B·A·scaling per active adapter), not quantised.
    """

    def __init__(self, lm: Any, head: Any, dtype: torch.dtype = torch.float32, banned: tuple[int, ...] = ()):
        cfg = lm.config
        self.dtype, self.banned = dtype, banned
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        cast = lambda *ts: None if ts[0] is None else torch.cat(ts).to(dtype)  # noqa: E731

        def proj(*mods: Any) -> tuple[torch.Tensor, torch.Tensor | None]:  # fused (weight, bias) of projections
            dense = [dense_weights(mod) for mod in mods]
            return cast(*(w for w, _ in dense)), cast(*(b for _, b in dense))

        self.embed = cast(lm.embed_tokens.weight)
        self.head, self.head_b = proj(head)
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
            qkv_w, qkv_b = proj(a.q_proj, a.k_proj, a.v_proj)
            qkv_w[:q_rows] *= a.scaling
            if qkv_b is not None:
                qkv_b[:q_rows] *= a.scaling
            o_w, o_b = proj(a.o_proj)
            gu_w, gu_b = proj(m.gate_proj, m.up_proj)
            down_w, down_b = proj(m.down_proj)
            self.layers.append(
                dict(
                    ln1=cast(layer.input_layernorm.weight),
                    ln2=cast(layer.post_attention_layernorm.weight),
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=o_w,
                    o_b=o_b,
                    gu_w=gu_w,
                    gu_b=gu_b,
                    down_w=down_w,
                    down_b=down_b,
                    act=m.act_fn,
                )
            )

    @staticmethod
    def supports(lm: Any, head: Any = None) -> bool:
        """A Llama decoder whose projections (and head) are plain linears, or PEFT LoRA linears
        that ``dense_weights`` can merge, with no forward hooks (the decoder never calls the
        modules, so a hook's effect would be silently lost)."""
        if getattr(lm.config, "model_type", None) != "llama":
            return False
        hooked = [mod for root in (lm, head) if root is not None for mod in root.modules() if mod._forward_hooks or mod._forward_pre_hooks]
        if hooked:
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
        if head is not None:
            mods.append(head)
        return all(_mergeable(mod) for mod in mods)

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


def decode_llava(
    full: Any,
    dec: FusedLlamaDecoder,
    prompt: Mapping[str, torch.Tensor],
    G: int,
    caps: int | torch.Tensor,
    temperature: float,
    top_p: float,
    eos: int,
    pad: int,
    gen: torch.Generator | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """New token ids [B·G, max cap] of a LLaVA model ``full`` (prompt-major rows, pad after a
    row's end): prefill the B prompts once (Hugging Face forward: vision tower + decoder, under
    the caller's autocast if any), copy the prompt K/V G times into an fp32 cache preallocated
    for prompt + cap, then decode B·G rows with ``dec`` (``FusedLlamaDecoder`` of ``full``'s
    text decoder) until every row has emitted EOS or reached its cap. ``caps``: one cap for
    every row (GRPO) or a tensor of B·G caps (evaluation's per-item caps)."""
    attn = prompt["attention_mask"]
    B, P = attn.shape
    N = B * G
    row_caps = caps.to(attn.device) if isinstance(caps, torch.Tensor) else None
    T = int(caps.max()) if isinstance(caps, torch.Tensor) else int(caps)
    pos = position_ids(attn)
    out = full(**prompt, position_ids=pos, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)
    keys, values = [], []
    for layer in cache_of(out).layers:  # [B, KV, P, hd] → rows of the shared prefix, G times
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
    if dec.banned:  # the prefill's logits; the decoder's own carry the ban in the head bias
        logits[:, list(dec.banned)] = -math.inf
    step = compiled_step() if compile else None
    # The decoder sets its dtypes itself (weights in `dtype`, attention in fp32): a caller's
    # autocast would re-cast every op, which made sampling 15% slower per token here.
    with torch.autocast(attn.device.type, enabled=False):
        for t in range(T):
            tok = _sample(logits, temperature, top_p, gen).masked_fill(done, pad)
            ids[:, t] = tok
            done |= tok == eos
            if row_caps is not None:  # a row at its cap stops; later slots stay pad
                done |= row_caps <= t + 1
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
