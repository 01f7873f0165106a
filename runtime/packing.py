"""Padding-free SFT batches: the items of a random batch packed into one row.

A batch of B items is laid out as one row of ``N = Σ len_i`` tokens (rounded up, see
``bucket``), each item keeping its own position ids (0, 1, ... from its first token) and its
image in order: LLaVA writes image features into the placeholder tokens in order, so the B
images of a packed row land in their own items. Every token-wise op of the decoder (norms,
projections, MLP, the LM head) then runs on real tokens only, whatever the batch's mix of
lengths; only attention needs the items apart. ``packed_attention`` (registered with
transformers' ``AttentionInterface`` as ``PACKED_ATTENTION``) scatters q, k, v into a
[B, heads, L, head_dim] block (L = the longest item, rounded up) and attends causally inside
each item, so its cost is B·L² as in a padded batch, never N² as a block-diagonal mask over
the whole row would cost (transformers' own packed-sequence path from position ids: measured
2× slower per step than padding, on the quick start's batches).

The same attention function serves right-padded batches (``layout`` None): with causal
attention no real token attends to the padding after it, so no padding mask is needed.
Attention runs at the model's compute dtype (bf16 under autocast): the scores are rounded to
bf16 by the matmul either way, and a softmax over bf16 input accumulates in fp32 and writes
bf16 — what transformers' eager path does with an fp32 round trip (two extra passes over the
B·heads·L² scores, forward and backward).

Shapes are rounded up by ``bucket`` because oneDNN compiles a bf16 matmul kernel for every
new shape (≈2 ms each on this CPU, against ≈0.2 ms for the matmul itself): with the exact
token count of every random batch, most steps would pay it again for every projection.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "percep_packed"  # the name under transformers' AttentionInterface

# keys a packed batch concatenates per token, with their padding values
_TOKEN_PAD = {"labels": -100, "role_ids": -1}


def bucket(n: int, smallest: int = 16) -> int:
    """``n`` rounded up to a multiple of a granule of about n/16 (at least ``smallest``): at
    most 16 distinct sizes per doubling of n (so kernels compiled per shape get reused), at a
    cost of under 1/16 extra tokens."""
    g = max(smallest, 1 << max(int(n).bit_length() - 5, 0))
    return -(-int(n) // g) * g


# ------------------------------------------------------------------------------ batches
def collate_packed(items: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Training items (1-D ``input_ids``/``labels``/``role_ids``, ``pixel_values``,
    ``n_target``) → one packed row: per-token tensors concatenated to [1, N], position ids
    restarting at every item, images concatenated in item order, ``seq_lengths`` [items].
    The row is padded with pad tokens (no targets; positions 0, 1, ... of their own) to a
    ``bucket`` size that leaves room after every item for its attention window (``Layout``)."""
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    n = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total = bucket(max(s + bucket(ln) for s, ln in zip(starts, lengths)))
    fill = total - n
    batch: dict[str, Any] = {
        "input_ids": _cat([it["input_ids"] for it in items], fill, pad_token_id),
        "position_ids": torch.cat([torch.arange(ln) for ln in lengths] + [torch.arange(fill)])[None],
        "seq_lengths": torch.tensor(lengths),
    }
    for key, pad in _TOKEN_PAD.items():
        batch[key] = _cat([it[key] for it in items], fill, pad)
    batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items], dim=0)
    batch["n_target"] = torch.tensor([int(it["n_target"]) for it in items])
    return batch


def n_tokens(batch: Mapping[str, Any]) -> int:
    """The item tokens of a training batch, padding excluded: a packed row's item lengths, or
    the ones of a padded batch's attention mask."""
    if "seq_lengths" in batch:
        return int(batch["seq_lengths"].sum())
    return int(batch["attention_mask"].sum())


def packed_prefixes(batch: Mapping[str, Any], ends: Sequence[int], pad_token_id: int) -> dict[str, Any]:
    """A packed row of the items of ``batch`` (a ``collate_packed`` row), item i cut to its
    first ``ends[i]`` tokens (at least its prompt, which holds its image): with causal
    attention and per-item positions the kept tokens' logits are exactly the full row's.
    NGDiff takes a group's gradient from such a row of each item's prefix that holds the
    group's targets (``SFTModule.ngdiff_backward``)."""
    items = []
    for i, (s, n) in enumerate(zip(Layout.of(batch["seq_lengths"]).starts, batch["seq_lengths"].tolist())):
        labels = batch["labels"][0, s : s + n]
        prompt = int((labels == -100).long().argmin()) if bool((labels != -100).any()) else n
        end = min(max(int(ends[i]), prompt), n)
        cut = {k: batch[k][0, s : s + end] for k in ("input_ids", *_TOKEN_PAD)}
        cut["pixel_values"] = batch["pixel_values"][i : i + 1]
        cut["n_target"] = int((cut["labels"] != -100).sum())
        items.append(cut)
    return collate_packed(items, pad_token_id)


def _cat(parts: list[torch.Tensor], fill: int, value: int) -> torch.Tensor:
    row = torch.cat(parts)
    return F.pad(row, (0, fill), value=value)[None]


def packable(item: Mapping[str, Any]) -> bool:
    """Whether an encoded item carries only what a packed row can hold: per-token ids, labels,
    roles and an attention mask of ones, one image tensor and the target count (models whose
    processors add image sizes or token types need their own batch layout)."""
    allowed = {"input_ids", "attention_mask", "labels", "role_ids", "pixel_values", "n_target"}
    return set(item) <= allowed and bool(item.get("attention_mask", torch.ones(1)).all())


# ------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class Layout:
    """The items of a packed row: where each starts, its length, and its attention window
    (the length rounded up by ``bucket``; ``collate_packed`` leaves room for it)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    windows: tuple[int, ...]

    @classmethod
    def of(cls, seq_lengths: torch.Tensor) -> Layout:
        lengths = tuple(int(x) for x in seq_lengths.tolist())
        starts = tuple(sum(lengths[:i]) for i in range(len(lengths)))
        return cls(starts, lengths, tuple(bucket(n) for n in lengths))


_CAUSAL: dict[tuple[int, torch.device], torch.Tensor] = {}


def _future(n: int, device: torch.device) -> torch.Tensor:
    """[n, n] True above the diagonal (the keys a causal query must not see), cached."""
    mask = _CAUSAL.get((n, device))
    if mask is None:
        mask = _CAUSAL[(n, device)] = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + causal mask)·v over [..., T, head_dim], at the inputs' dtype.
    The scale goes on q (T·hd values, not T²; a power of two for power-of-two head dims, so
    exact)."""
    scores = torch.matmul(q * scaling, k.transpose(-1, -2)).masked_fill(_future(q.shape[-2], q.device), -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


class _ItemAttention(torch.autograd.Function):
    """Causal attention inside each item of a packed row: q, k, v [H, N, hd] → [N, H, hd].

    Item i attends over the window ``q[:, s : s + w]`` (w = its length rounded up by
    ``bucket``, so few distinct matmul shapes): the tokens past its end belong to the next
    item, but causally no real query sees them, and their own outputs are dropped. The cost is
    Σ w_i² per head, against B·max(w)² for padded items. The backward is written out (the
    softmax's saved per item) so that the gradients of q, k, v are written once into one
    tensor each, not summed from one full-size zero-padded slice gradient per item."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scaling: float) -> torch.Tensor:
        out = q.new_zeros(q.shape[1], q.shape[0], q.shape[2])  # the filler after the items stays 0
        probs = []
        for s, n, w in zip(layout.starts, layout.lengths, layout.windows):
            scores = torch.matmul(q[:, s : s + w] * scaling, k[:, s : s + w].transpose(-1, -2))
            p = torch.softmax(scores.masked_fill(_future(w, q.device), -math.inf), dim=-1)
            out[s : s + n] = torch.matmul(p, v[:, s : s + w])[:, :n].transpose(0, 1)
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.layout, ctx.scaling = layout, scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, *probs = ctx.saved_tensors
        lay, scale = ctx.layout, ctx.scaling
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for s, n, w, p in zip(lay.starts, lay.lengths, lay.windows, probs):
            g = grad.new_zeros(q.shape[0], w, q.shape[2])  # rows past the item: no gradient
            g[:, :n] = grad[s : s + n].transpose(0, 1).to(g.dtype)
            dv[:, s : s + n] = torch.matmul(p.transpose(-1, -2), g)[:, :n]
            dp = torch.matmul(g, v[:, s : s + w].transpose(-1, -2))
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale  # softmax backward, with the scale
            dq[:, s : s + n] = torch.matmul(ds, k[:, s : s + w])[:, :n]
            dk[:, s : s + n] = torch.matmul(ds.transpose(-1, -2), q[:, s : s + w])[:, :n]
        return dq, dk, dv, None, None


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    percep_layout: Layout | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [batch, heads, T, hd] in, [batch, T, heads, hd] out.

    With ``percep_layout`` the batch is one packed row and attention stays inside each item
    (``_ItemAttention``); without it, the rows are right-padded items (training batches),
    attended causally. Attention dropout is not supported with packing (Llama has none).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module is not None and module.training else 0.0
    if percep_layout is None:
        return causal_attention(query, key, value, scaling, p).transpose(1, 2).contiguous(), None
    if p > 0.0:
        raise ValueError("packed batches do not support attention dropout; set packing = false")
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)  # as matmul under autocast would
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    q, k, v = (x[0].to(dtype) for x in (query, key, value))
    return _ItemAttention.apply(q, k, v, percep_layout, scaling)[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


_register()


# ------------------------------------------------------------------------------ models
def text_model_of(model: Any) -> Any | None:
    """The text decoder of a LLaVA model whose attention goes through transformers'
    ``AttentionInterface`` and whose positions are plain 1-D ids (Llama), else None."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(m.config, "model_type", None) != "llava":
        return None
    lm = getattr(getattr(m, "model", None), "language_model", None)
    if lm is None or getattr(lm.config, "model_type", None) != "llama":
        return None
    return lm


@contextlib.contextmanager
def training_attention(model: Any) -> Iterator[bool]:
    """Inside the block the text decoder of a supported model (``text_model_of``) attends
    with ``packed_attention``; yields whether it does. The vision tower keeps its own."""
    lm = text_model_of(model)
    if lm is None:
        yield False
        return
    config = lm.config
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = before
