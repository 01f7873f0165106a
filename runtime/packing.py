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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "percep_packed"  # the name under transformers' AttentionInterface

# keys a packed batch concatenates per token, with their padding values
_TOKEN_PAD = {"labels": -100, "role_ids": -1, "next_labels": -100, "next_roles": -1}


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
    ``bucket`` size that leaves room after every item for its attention window (``Layout``).
    Items may carry their own ``position_ids`` and next-token targets (``split_packed``'s
    chunks), and no image or target count."""
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    n = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total = bucket(max(s + bucket(ln) for s, ln in zip(starts, lengths)))
    fill = total - n
    positions = [it["position_ids"] if "position_ids" in it else torch.arange(ln) for it, ln in zip(items, lengths)]
    batch: dict[str, Any] = {
        "input_ids": _cat([it["input_ids"] for it in items], fill, pad_token_id),
        "position_ids": torch.cat([*positions, torch.arange(fill)])[None],
        "seq_lengths": torch.tensor(lengths),
    }
    for key, pad in _TOKEN_PAD.items():
        if key in items[0]:
            batch[key] = _cat([it[key] for it in items], fill, pad)
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items], dim=0)
    if "n_target" in items[0]:
        batch["n_target"] = torch.tensor([int(it["n_target"]) for it in items])
    return batch


def n_tokens(batch: Mapping[str, Any]) -> int:
    """The item tokens of a training batch, padding excluded: a packed row's item lengths, or
    the ones of a padded batch's attention mask."""
    if "seq_lengths" in batch:
        return int(batch["seq_lengths"].sum())
    return int(batch["attention_mask"].sum())


def next_targets(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The label and role of the token after each position (-100 / -1 at the end): what the
    logits at that position are trained on. A chunk carries its own (``next_labels``,
    ``next_roles``), because its last position predicts the next chunk's first token."""
    if "next_labels" in batch:
        return batch["next_labels"], batch["next_roles"]
    return F.pad(batch["labels"][:, 1:], (0, 1), value=-100), F.pad(batch["role_ids"][:, 1:], (0, 1), value=-1)


def split_batch(batch: Mapping[str, Any], ends: Sequence[int], pad_token_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A training batch cut into two chunks for a chunked forward (``PrefixKV``): the prefix,
    item i's first ``ends[i]`` tokens with the images, and the rest, which attends to the
    prefix's keys and values. Right-padded items are cut at one common length, ``max(ends)``;
    a packed row (``collate_packed``) becomes two packed rows, the rest keeping its positions
    (item i's rest starts at position ``ends[i]``). Each chunk carries its next-token targets
    (``next_targets``), so the targets of both chunks are those of the batch, each predicted
    from the same position as in one forward. ``ends[i]`` must cover item i's image (its
    prompt): the rest has no image."""
    nxt_labels, nxt_roles = next_targets(batch)
    if "seq_lengths" not in batch:
        end = max(ends)
        shape = batch["input_ids"].shape
        cut = lambda a, b: {k: v[:, a:b] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == shape}  # noqa: E731
        prefix = cut(0, end) | {"next_labels": nxt_labels[:, :end], "next_roles": nxt_roles[:, :end]}
        prefix["pixel_values"] = batch["pixel_values"]
        T = shape[1]
        rest = cut(end, T) | {"next_labels": nxt_labels[:, end:], "next_roles": nxt_roles[:, end:]}
        rest["position_ids"] = torch.arange(end, T)[None].expand(shape[0], -1)
        rest.pop("attention_mask", None)  # right padding under causal attention: no mask needed
        return prefix, rest
    per_token = {"input_ids": batch["input_ids"][0], "next_labels": nxt_labels[0], "next_roles": nxt_roles[0]}
    lay = Layout.of(batch["seq_lengths"])
    heads, tails = [], []
    for i, (s, n) in enumerate(zip(lay.starts, lay.lengths)):
        e = min(int(ends[i]), n)
        heads.append({k: v[s : s + e] for k, v in per_token.items()} | {"pixel_values": batch["pixel_values"][i : i + 1]})
        tails.append({k: v[s + e : s + n] for k, v in per_token.items()} | {"position_ids": torch.arange(e, n)})
    return collate_packed(heads, pad_token_id), collate_packed(tails, pad_token_id)


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


_MASKS: dict[tuple[int, int, int, str], torch.Tensor] = {}


def _future(n: int, device: torch.device, before: int = 0) -> torch.Tensor:
    """[n, before + n]: True where a query may not look (cached). The last n keys are the
    queries' own tokens (causal: True above the diagonal); the first ``before`` are an earlier
    chunk's, seen by every query."""
    key = (n, before, -1, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        mask = _MASKS[key] = torch.ones(n, before + n, dtype=torch.bool, device=device).triu(1 + before)
    return mask


def _rest_mask(n: int, window: int, before: int, device: torch.device) -> torch.Tensor:
    """``_future(n, device, window)`` with the keys from ``before`` to ``window`` hidden too: an
    item's prefix window [0, window) holds ``before`` of its own keys, the rest another item's."""
    key = (n, window, before, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        mask = _future(n, device, window).clone()
        mask[:, before:window] = True
        _MASKS[key] = mask
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + causal mask)·v over [..., T, head_dim], at the inputs' dtype; k and v
    may start with an earlier chunk's keys and values (``PrefixKV``). The scale goes on q (T·hd values, not T²; a power of two for power-of-two head dims, so
    exact)."""
    before = k.shape[-2] - q.shape[-2]  # keys of an earlier chunk (PrefixKV), seen by every query
    scores = torch.matmul(q * scaling, k.transpose(-1, -2)).masked_fill(_future(q.shape[-2], q.device, before), -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def softmax_backward(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The gradient of softmax's input, p·(dp − Σ dp·p), from its output ``p`` and output
    gradient ``dp``: aten's softmax backward kernel (what autograd runs for ``torch.softmax``),
    one pass over the scores with fp32 accumulation and one rounding for bf16, where the
    written-out formula took five passes and rounded at each (measured 1.13x faster per
    attention forward + backward at the `quick` benchmark regime's sizes, bf16, 1 thread)."""
    return torch._softmax_backward_data(dp, p, -1, p.dtype)


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
            p = torch.softmax(scores.masked_fill_(_future(w, q.device), -math.inf), dim=-1)
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
            ds = softmax_backward(dp, p)
            dq[:, s : s + n] = torch.matmul(ds, k[:, s : s + w])[:, :n] * scale  # the scale on [w, hd], not [w, w]
            dk[:, s : s + n] = torch.matmul(ds.transpose(-1, -2), q[:, s : s + w])[:, :n] * scale
        return dq, dk, dv, None, None


class _RestAttention(torch.autograd.Function):
    """The rest chunk of a packed row (``split_batch``) attending inside each item to its own
    prefix's keys and values (``kp``, ``vp`` [H, Np, hd], from the prefix chunk's row) and
    causally to its own: q, k, v [H, N, hd] → [N, H, hd]. Windows as in ``_ItemAttention``: the
    prefix window's keys past the item's prefix (the next item's) are masked. Backward written
    out for the same reason; it also returns the prefix keys' and values' gradients, which
    flow into the prefix chunk's graph."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        prefix: Layout,
        rest: Layout,
        scaling: float,
    ) -> torch.Tensor:
        out = q.new_zeros(q.shape[1], q.shape[0], q.shape[2])
        probs = []
        for (ps, pn, pw), (s, n, w) in zip(_items(prefix), _items(rest)):
            if n == 0:  # the whole item is in the prefix
                probs.append(q.new_zeros(0))
                continue
            keys = torch.cat([kp[:, ps : ps + pw], k[:, s : s + w]], 1)
            scores = torch.matmul(q[:, s : s + w] * scaling, keys.transpose(-1, -2))
            p = torch.softmax(scores.masked_fill_(_rest_mask(w, pw, pn, q.device), -math.inf), dim=-1)
            out[s : s + n] = torch.matmul(p, torch.cat([vp[:, ps : ps + pw], v[:, s : s + w]], 1))[:, :n].transpose(0, 1)
            probs.append(p)
        ctx.save_for_backward(q, k, v, kp, vp, *probs)
        ctx.layouts, ctx.scaling = (prefix, rest), scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, kp, vp, *probs = ctx.saved_tensors
        (prefix, rest), scale = ctx.layouts, ctx.scaling
        dq, dk, dv, dkp, dvp = (torch.zeros_like(x) for x in (q, k, v, kp, vp))
        for (ps, pn, pw), (s, n, w), p in zip(_items(prefix), _items(rest), probs):
            if n == 0:
                continue
            g = grad.new_zeros(q.shape[0], w, q.shape[2])  # rows past the item: no gradient
            g[:, :n] = grad[s : s + n].transpose(0, 1).to(g.dtype)
            keys = torch.cat([kp[:, ps : ps + pw], k[:, s : s + w]], 1)
            dvals = torch.matmul(p.transpose(-1, -2), g)
            dp = torch.matmul(g, torch.cat([vp[:, ps : ps + pw], v[:, s : s + w]], 1).transpose(-1, -2))
            ds = softmax_backward(dp, p)
            dq[:, s : s + n] = torch.matmul(ds, keys)[:, :n] * scale
            dkeys = torch.matmul(ds.transpose(-1, -2), q[:, s : s + w]) * scale
            dkp[:, ps : ps + pn], dk[:, s : s + n] = dkeys[:, :pn], dkeys[:, pw : pw + n]
            dvp[:, ps : ps + pn], dv[:, s : s + n] = dvals[:, :pn], dvals[:, pw : pw + n]
        return dq, dk, dv, dkp, dvp, None, None, None


def _items(layout: Layout) -> Iterator[tuple[int, int, int]]:
    return zip(layout.starts, layout.lengths, layout.windows)


@dataclass
class PrefixKV:
    """A chunked forward's hand-over: the prefix chunk's forward (``reading`` False) leaves
    every layer's keys and values here (with their graph); the rest chunk's forward
    (``reading`` True) attends to them as well as to its own. ``prefix`` is the prefix chunk's
    packed layout (None for right-padded items). Passed to the model as ``percep_prefix``."""

    prefix: Layout | None = None
    reading: bool = False
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    percep_layout: Layout | None = None,
    percep_prefix: PrefixKV | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [batch, heads, T, hd] in, [batch, T, heads, hd] out.

    With ``percep_layout`` the batch is one packed row and attention stays inside each item
    (``_ItemAttention``); without it, the rows are right-padded items (training batches),
    attended causally. With ``percep_prefix`` the forward is one chunk of a chunked forward
    (``PrefixKV``). Attention dropout is not supported with packing (Llama has none).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module is not None and module.training else 0.0
    chunk, layer = percep_prefix, getattr(module, "layer_idx", 0)
    if percep_layout is None:
        if chunk is not None and chunk.reading:
            kp, vp = chunk.kv[layer]
            key, value = torch.cat([kp, key], 2), torch.cat([vp, value], 2)
        elif chunk is not None:
            chunk.kv[layer] = (key, value)
        return causal_attention(query, key, value, scaling, p).transpose(1, 2).contiguous(), None
    if p > 0.0:
        raise ValueError("packed batches do not support attention dropout; set packing = false")
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)  # as matmul under autocast would
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    q, k, v = (x[0].to(dtype) for x in (query, key, value))
    if chunk is not None and chunk.reading:
        assert chunk.prefix is not None
        return _RestAttention.apply(q, k, v, *chunk.kv[layer], chunk.prefix, percep_layout, scaling)[None], None
    if chunk is not None:
        chunk.kv[layer] = (k, v)
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
