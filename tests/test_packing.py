"""Padding-free packed SFT batches (runtime/packing.py): a packed row gives the same per-role
losses and the same gradients as the same items right-padded, through the real tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from percepdsl_runtime.encoding import Encoder, collate
from percepdsl_runtime.models import load_hf
from percepdsl_runtime.packing import Layout, PrefixKV, bucket, collate_packed, packed_attention, training_attention
from percepdsl_runtime.sft import SFTDataModule, role_losses

RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>"},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>"},
    {"role": "reasoning", "kind": "rest"},
]


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(tiny, RULES)


@pytest.fixture(scope="module")
def items(task, encoder):
    dm = SFTDataModule(task, encoder, batch_size=5, seed=0, n_items=5)
    dm.setup()
    assert dm.packed  # the tiny LLaVA and its items qualify: packing is the default
    out = [dm.dataset[i] for i in range(5)]
    assert len({int(it["input_ids"].shape[0]) for it in out}) > 1  # lengths differ: padding to remove
    return out


def test_bucket_rounds_up_to_few_sizes() -> None:
    sizes = [bucket(n) for n in range(1, 5000)]
    assert all(s >= n for n, s in zip(range(1, 5000), sizes))
    assert all(s - n < max(16, n / 16 + 1) for n, s in zip(range(1, 5000), sizes))
    assert len(set(sizes[1024:2048])) <= 16


def test_packed_row_layout(items, encoder) -> None:
    batch = collate_packed(items, encoder.pad_token_id)
    lengths = [int(it["input_ids"].shape[0]) for it in items]
    n = batch["input_ids"].shape[1]
    assert n == bucket(n) and n >= sum(lengths)
    assert batch["seq_lengths"].tolist() == lengths
    lay = Layout.of(batch["seq_lengths"])
    assert all(s + w <= n for s, w in zip(lay.starts, lay.windows))  # every item's window fits the row
    for it, s, ln in zip(items, lay.starts, lengths):
        assert torch.equal(batch["input_ids"][0, s : s + ln], it["input_ids"])
        assert batch["position_ids"][0, s : s + ln].tolist() == list(range(ln))
    assert int((batch["labels"] != -100).sum()) == int(batch["n_target"].sum())
    assert batch["pixel_values"].shape[0] == len(items)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_losses_and_gradients_equal_padded(tiny, items, encoder, precision: str) -> None:
    """The same items packed and right-padded: per-role CE sums, token counts and every
    parameter's gradient agree (exactly up to float rounding in fp32; bf16 autocast: within
    its rounding)."""
    model = load_hf(tiny.path).model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_roles = len(encoder.role_names)
    results = []
    for batch in (collate_packed(items, encoder.pad_token_id), collate(items, encoder.pad_token_id)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            sums, counts = role_losses(model, batch, n_roles)
        grads = torch.autograd.grad(sums.sum() / counts.sum(), params, allow_unused=True)
        results.append((sums.detach(), counts, grads))
    (s1, c1, g1), (s2, c2, g2) = results
    assert torch.equal(c1, c2)
    rtol, atol = (1e-4, 1e-5) if precision == "fp32" else (3e-2, 3e-3)
    torch.testing.assert_close(s1, s2, rtol=rtol, atol=atol * 100)
    assert [a is None for a in g1] == [b is None for b in g2]
    pairs = [(a, b) for a, b in zip(g1, g2) if b is not None]
    # per tensor, relative to its own scale, or to the largest gradient for (near-)zero ones
    top = max(float(b.abs().max()) for _, b in pairs)
    tol = 1e-4 if precision == "fp32" else 5e-2
    for a, b in pairs:
        assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-3 * top)


def test_packed_attention_matches_eager_on_padded_rows(tiny, items, encoder) -> None:
    """On right-padded rows (no layout) the packing attention is transformers' eager causal
    attention at every real position."""
    model = load_hf(tiny.path).model.eval()
    batch = collate(items, encoder.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ref = model(**inputs).logits
        with training_attention(model) as own:
            assert own
            out = model(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)


def test_packed_attention_gradcheck() -> None:
    """The written-out backward of the per-item attention against autograd's numerical one."""
    gen = torch.Generator().manual_seed(0)
    lay = Layout.of(torch.tensor([5, 3]))
    n = bucket(max(s + w for s, w in zip(lay.starts, lay.windows)))
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        out, _ = packed_attention(None, q, k, v, None, 0.5, percep_layout=lay)
        return out[:, : sum(lay.lengths)]

    assert torch.autograd.gradcheck(f, (q, k, v))


def _row(parts: list[torch.Tensor], lay: Layout, gen: torch.Generator) -> torch.Tensor:
    """[1, H, n, hd]: the items' [H, len, hd] tensors at their places in a packed row, random
    filler elsewhere (which must not matter)."""
    n = bucket(max(s + w for s, w in zip(lay.starts, lay.windows)))
    row = torch.randn(1, parts[0].shape[0], n, parts[0].shape[2], dtype=torch.float64, generator=gen)
    for s, x in zip(lay.starts, parts):
        row[0, :, s : s + x.shape[1]] = x
    return row


@pytest.mark.parametrize("packed", [True, False])
def test_chunked_attention_equals_one_pass_and_gradcheck(packed: bool) -> None:
    """A chunked forward's attention (the prefix chunk, then the rest attending to the prefix's
    keys and values) gives the one-pass outputs, and its written-out backward (into the prefix's
    keys and values too) passes gradcheck. Packed: item 2 lies wholly in its prefix."""
    gen = torch.Generator().manual_seed(1)
    lengths, ends = [7, 3, 5], [2, 3, 4]
    if not packed:
        lengths, ends = [6, 6], [4, 4]
    qkv = [[torch.randn(2, n, 4, dtype=torch.float64, generator=gen) for n in lengths] for _ in range(3)]

    def attend(q, k, v, lay, chunk=None):
        if packed:
            return packed_attention(None, q, k, v, None, 0.5, percep_layout=lay, percep_prefix=chunk)[0][0]
        return packed_attention(None, q, k, v, None, 0.5, percep_prefix=chunk)[0]  # [B, T, H, hd]

    if packed:
        full_lay = Layout.of(torch.tensor(lengths))
        pre_lay, rest_lay = Layout.of(torch.tensor(ends)), Layout.of(torch.tensor([n - e for n, e in zip(lengths, ends)]))
        full = attend(*(_row(x, full_lay, gen) for x in qkv), full_lay)
        want = torch.cat([full[s : s + n] for s, n in zip(full_lay.starts, full_lay.lengths)])
        pre = [_row([x[:, :e] for x, e in zip(xs, ends)], pre_lay, gen).requires_grad_() for xs in qkv]
        rest = [_row([x[:, e:] for x, e in zip(xs, ends)], rest_lay, gen).requires_grad_() for xs in qkv]
    else:
        full_lay = pre_lay = rest_lay = None
        full = attend(*(torch.stack(x) for x in qkv), None)
        want = full.reshape(-1, *full.shape[2:])
        pre = [torch.stack(x)[:, :, : ends[0]].clone().requires_grad_() for x in qkv]
        rest = [torch.stack(x)[:, :, ends[0] :].clone().requires_grad_() for x in qkv]

    def chunked(qp, kp, vp, qr, kr, vr):
        kv = PrefixKV(pre_lay)
        head = attend(qp, kp, vp, pre_lay, kv)
        kv.reading = True
        tail = attend(qr, kr, vr, rest_lay, kv)
        if not packed:
            return torch.cat([head, tail], 1).reshape(-1, *head.shape[2:])
        parts = []
        for (ps, pn), (s, n) in zip(zip(pre_lay.starts, pre_lay.lengths), zip(rest_lay.starts, rest_lay.lengths)):
            parts += [head[ps : ps + pn], tail[s : s + n]]
        return torch.cat(parts)

    torch.testing.assert_close(chunked(*pre, *rest), want)
    assert torch.autograd.gradcheck(chunked, (*pre, *rest))
