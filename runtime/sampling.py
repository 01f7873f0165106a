"""GRPO's sampler: G completions of every prompt of a batch, as ``Rollouts``.

``sample_completions`` takes the fast path for LLaVA models with a plain Llama text decoder
(``fused_parts``): ``decode_llava`` prefills each prompt once by the Hugging Face forward
(vision tower + decoder), copies its K/V to its G rows in a cache preallocated for prompt +
cap, and ``FusedLlamaDecoder`` runs the single-token steps (eagerly, or as ``compiled_step``
under ``torch.compile``). A PEFT LoRA model takes the same path, its adapters merged into the
decoder's weight copies (``dense_weights``); other models go through Hugging Face
``generate``. Evaluation (``generation.generate``) decodes through the same ``decode_llava``,
greedy, with a cap per row.

Numerics: the fused decoder runs on copies of the weights in the GRPO stage's
``sample_precision`` (fp32 by default, and in evaluation), made once per rollout (bf16
*autocast* re-cast every weight at every step); attention and the RMSNorm statistics run in
fp32. With fp32 weights the decoder writes Hugging Face's greedy tokens (tested); its logits
differ from Hugging Face's by float rounding only (the norm weights are folded into the
next projection; tested to 1e-5). Where a decoding step's time goes (session 10, see
docs/performance.md): on the tiny model it is bound by memory traffic (each step streams
the weights, ~10 MB in fp32, and the KV cache) and by the ops that run cold after it;
bf16 halves the weight bytes but its matmuls (oneDNN) have a fixed cost per call and its
casts add ops, so fp32 sampled faster than bf16 on the session-10 machine.
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

from .generation import NEUTRAL_DECODING


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
    """(weight, bias) that a linear projection (or an embedding: bias None) applies in eval mode:
    an ``nn.Linear``'s or ``nn.Embedding``'s own, or for a PEFT LoRA layer over one its base weight
    plus each active adapter's delta (``B·A·scaling``; exact: LoRA's dropout is off in eval mode).
    ``_mergeable`` says which modules qualify."""
    if type(mod) in (torch.nn.Linear, torch.nn.Embedding):
        return mod.weight, getattr(mod, "bias", None)
    base = mod.base_layer
    weight = base.weight
    if not mod.merged and not mod.disable_adapters:  # merged: the base weight already holds the deltas
        for name in _active(mod):
            weight = weight + mod.get_delta_weight(name).to(weight.dtype)
    return weight, getattr(base, "bias", None)


def _active(mod: Any) -> list[str]:
    """The active adapters a PEFT LoRA layer holds (an embedding's are in ``lora_embedding_A``, its
    ``lora_A`` is empty)."""
    held = set(mod.lora_A) | set(getattr(mod, "lora_embedding_A", {}))
    return [name for name in mod.active_adapters if name in held]


def _mergeable(mod: Any, kind: type = torch.nn.Linear) -> bool:
    """A plain ``kind`` (a linear, or the token embedding), or a PEFT LoRA layer over one, with
    vanilla adapters only (no DoRA or other variants, no LoRA bias), unquantised."""
    if type(mod) is kind:
        return True
    base = getattr(mod, "base_layer", None)
    if type(base) is not kind or not hasattr(mod, "get_delta_weight") or not hasattr(mod, "lora_A"):
        return False
    active = _active(mod)
    return not any(n in getattr(mod, "lora_variant", {}) or getattr(mod, "lora_bias", {}).get(n) for n in active)


class FusedLlamaDecoder:
    """Single-token decoding for a plain Llama text decoder, with fused projections.

    For the tiny model a decoding step is ~60 ops (8 rows × width 256: a matmul is ~1 MFLOP),
    and each costs far more in the loop than alone: the step streams the weights and the KV
    cache through a 2 MB L2, so every small op runs with cold caches (a softmax measured 36 µs
    after a 10 MB stream, 3 µs in a warm loop). So: few ops, few bytes. A step here, per
    layer: RMSNorm (3 ops), one matmul for q|k|v, RoPE over the whole q|k|v row (3 ops), one
    write each of the new K and V, attention as 2 batched matmuls and a softmax, o with its
    residual add (``addmm``), RMSNorm, one matmul for gate|up, the activation, and down with
    its residual add.

    The weights are copied from the live model once per rollout (under no_grad, a few MB for
    the tiny model), in ``dtype``, transposed to [in, out] for a plain ``mm``: with the copy's
    cost (~7 ms a rollout) a rollout took 227 against 248 ms with ``F.linear``-style products
    on the [out, in] weight (in-process A/B, fp32, session 10). ``supports`` says when it
    applies: a Llama whose projections are plain ``nn.Linear`` or PEFT LoRA linears over them
    (merged into the copies: W + B·A·scaling per active adapter), not quantised.
    """

    @torch.no_grad()  # copies of the live weights, never part of a graph
    def __init__(self, lm: Any, head: Any, dtype: torch.dtype = torch.float32, banned: tuple[int, ...] = ()):
        cfg = lm.config
        self.dtype, self.banned = dtype, banned
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = torch.tensor(cfg.rms_norm_eps, device=lm.embed_tokens.weight.device)
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731

        def proj(*mods: Any, order: torch.Tensor | None = None, norm: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Fused (weight [in, out], bias) of projections, output features in ``order``,
            the RMSNorm weight ``norm`` of their input folded into the weight's rows; one
            copy of the weights per projection where it can (they are copied every rollout)."""
            dense = [dense_weights(mod) for mod in mods]
            w = dense[0][0] if len(dense) == 1 else torch.cat([w for w, _ in dense])
            b = None if dense[0][1] is None else torch.cat([b for _, b in dense])
            if order is not None:
                w, b = w[order], None if b is None else b[order]
            out = torch.empty(w.shape[::-1], dtype=dtype, device=w.device)
            if norm is None:
                out.copy_(w.t())
            else:
                torch.mul(w.t(), norm.weight[:, None], out=out)
            return out, cast(b)

        self.embed = cast(dense_weights(lm.embed_tokens)[0])  # with an embedding adapter's delta (LoRA on embed_tokens)
        self.head, self.head_b = proj(head, norm=lm.norm)
        if banned:  # never sampled: −inf in the head's bias costs no op per step
            if self.head_b is None:
                self.head_b = torch.zeros(self.head.shape[1], dtype=dtype, device=self.head.device)
            self.head_b[list(banned)] = -math.inf
        self.rotary = lm.rotary_emb
        # q|k|v's output features: the H q heads, then each KV head's k and v side by side, so
        # that one slice of the row is the [KV, 2·hd] block a cache slot holds
        kv = torch.arange(KV * hd).view(KV, 1, hd)
        order = torch.cat([torch.arange(H * hd), (H * hd + torch.cat([kv, kv + KV * hd], dim=1)).flatten()])
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            # the attention scale is folded into q's columns (RoPE is linear, so it commutes); for
            # a power-of-two head dim it is a power of two and the product is exact
            qkv_w, qkv_b = proj(a.q_proj, a.k_proj, a.v_proj, order=order, norm=layer.input_layernorm)
            qkv_w[:, : H * hd] *= a.scaling
            if qkv_b is not None:
                qkv_b[: H * hd] *= a.scaling
            o_w, o_b = proj(a.o_proj)
            gu_w, gu_b = proj(m.gate_proj, m.up_proj, norm=layer.post_attention_layernorm)
            down_w, down_b = proj(m.down_proj)
            self.layers.append(
                dict(
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
        return _mergeable(lm.embed_tokens, torch.nn.Embedding) and all(_mergeable(mod) for mod in mods)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next projection) in 3 ops, in fp32
        like Hugging Face's: x · rsqrt(eps + Σx²/D), the sum of squares as one batched dot
        product. ``F.rms_norm`` is a composite of ~9 ops on CPU; this made a rollout 5%
        faster (242 vs 255 ms, in-process A/B, session 10)."""
        xf = x.float()
        v = torch.baddbmm(self.eps, xf[:, None], xf[:, :, None], alpha=1 / x.shape[-1])  # [N, 1, 1]
        return (xf * v.rsqrt_().view(-1, 1)).to(self.dtype)

    def rope_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n, (H + 2·KV)·hd] for positions 0..n-1 over a whole q|k|v row,
        from the model's own rotary module (its scaling included), so a step indexes a table
        instead of recomputing them. The sin table carries rotate_half's sign: per head,
        rope(x) = x·cos + roll(x, hd/2)·sin±; the v heads get cos 1 and sin 0 (x·1 + y·0 = x
        exactly), so RoPE runs over the row as it comes out of the matmul."""
        x = torch.zeros(1, 1, dtype=torch.float32, device=device)
        cos, sin = self.rotary(x, torch.arange(n, device=device)[None])
        half, H, KV = self.hd // 2, self.n_heads, self.n_kv
        cos, sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        one, zero = torch.ones_like(cos), torch.zeros_like(sin)
        kv_cos, kv_sin = torch.cat([cos, one], dim=-1).repeat(1, KV), torch.cat([sin, zero], dim=-1).repeat(1, KV)
        return torch.cat([cos.repeat(1, H), kv_cos], dim=-1), torch.cat([sin.repeat(1, H), kv_sin], dim=-1)

    def prefix_cache(self, prefix: Any, G: int, slots: int, zero: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys [rows, KV, hd, slots], values [rows, KV, slots, hd]), fp32, holding
        the K/V of a Hugging Face cache's layers (``prefix``: [B, KV, P, hd] each) in slots
        0..P-1, each prompt's G times (rows prompt-major). Keys are stored transposed: q·Kᵀ is
        then a plain [1, hd] @ [hd, t] product (29 vs 49 µs for 136 slots in a warm loop, equal
        when the cache is cold). The slots after P are left unset unless ``zero`` (the static
        form reads them all: masked, but a NaN in V would still reach the output)."""
        out = []
        for layer in prefix:
            k, v = layer.keys, layer.values
            B, KV, P, hd = k.shape
            new = torch.zeros if zero else torch.empty
            keys = new(B * G, KV, hd, slots, dtype=torch.float32, device=k.device)
            values = new(B * G, KV, slots, hd, dtype=torch.float32, device=k.device)
            keys[..., :P] = k.transpose(-1, -2).repeat_interleave(G, dim=0)
            values[:, :, :P] = v.repeat_interleave(G, dim=0)
            out.append((keys, values))
        return out

    def step(
        self,
        tok: torch.Tensor,
        pos: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        at: int | torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [N, V] after feeding ``tok[N]`` at positions ``pos[N]``; its K/V go to cache
        slot ``at`` (``cache``: ``prefix_cache``'s); attention covers slots ``0..at`` (``bias``:
        additive padding mask, [N, 1, 1, slots]).

        ``at`` as an int: attention over the slice ``0..at``, which grows every step (eager).
        ``at`` as a 1-element tensor: the static-shape form that ``compiled_step`` compiles
        once: attention over the whole cache with the slots after ``at`` masked, and ``bias``
        covering the whole cache."""
        N, H, KV, hd = tok.shape[0], self.n_heads, self.n_kv, self.hd
        static = isinstance(at, torch.Tensor)
        unwritten = torch.arange(cache[0][1].shape[2], device=tok.device) > at if static else None
        x = F.embedding(tok, self.embed)  # [N, D]
        cos, sin = rope[0][pos], rope[1][pos]  # [N, (H + 2·KV)·hd]
        for layer, (keys, values) in zip(self.layers, cache):
            # attention runs in fp32 whatever the weights: bf16 bmm over a cache whose length
            # changes every step measured ~5x slower than fp32 here (no kernel per new shape)
            qkv = _linear(self._norm(x), layer["qkv_w"], layer["qkv_b"]).float()
            qkv = torch.addcmul(qkv * cos, qkv.view(N, H + 2 * KV, hd).roll(hd // 2, dims=-1).view(N, -1), sin)
            kv = qkv[:, H * hd :].view(N, KV, 2, hd)  # one position's k and v per KV head
            if static:
                keys.index_copy_(3, at, kv[:, :, 0, :, None])
                values.index_copy_(2, at, kv[:, :, 1:])
                K, V = keys, values
            else:
                keys[:, :, :, at] = kv[:, :, 0]
                values[:, :, at] = kv[:, :, 1]
                K, V = keys[:, :, :, : at + 1], values[:, :, : at + 1]
            # the H/KV query heads that share a KV head as rows of one product (grouped-query
            # attention without repeating K and V); q carries the scale
            att = qkv[:, : H * hd].view(N, KV, H // KV, hd) @ K  # [N, KV, H/KV, t]
            if bias is not None:
                att = att + bias
            if static:
                att = att.masked_fill(unwritten, -math.inf)
            y = (torch.softmax(att, dim=-1) @ V).view(N, H * hd).to(self.dtype)
            x = _linear(y, layer["o_w"], layer["o_b"], residual=x)
            gate, up = _linear(self._norm(x), layer["gu_w"], layer["gu_b"]).chunk(2, dim=-1)
            x = _linear(layer["act"](gate) * up, layer["down_w"], layer["down_b"], residual=x)
        return _linear(self._norm(x), self.head, self.head_b).float()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + x @ w + b`` for a weight stored [in, out], in as few ops as there are terms."""
    if residual is not None:
        out = torch.addmm(residual, x, w)
        return out if b is None else out.add_(b)
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


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
    cache = dec.prefix_cache(cache_of(out).layers, G, P + T, zero=compile)
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
                    new = step(dec, tok, next_pos, rope, cache, torch.tensor([P + t], device=attn.device), bias)
                except Exception as exc:  # noqa: BLE001
                    _compile_failed(exc)
                    step = None
            if new is None:
                new = dec.step(tok, next_pos, rope, cache, P + t, None if bias is None else bias[..., : P + t + 1])
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
            **NEUTRAL_DECODING,  # not the checkpoint's generation_config: the policy's own distribution
            **sampling,
        )
    new = seqs[:, prompt["input_ids"].shape[1] :]
    return torch.nn.functional.pad(new, (0, T - new.shape[1]), value=pad)
