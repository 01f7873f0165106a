"""GRPO: advantages, the clipped objective, aggregation, masking, the fast sampler against
Hugging Face generation, the reference model, bad rewards, and real steps on a tiny VLM."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from percepdsl.ir import GRPOStageIR, LoraIR, RewardIR, value_at
from percepdsl_runtime.encoding import Encoder, collate
from percepdsl_runtime.grpo import (
    AGGREGATIONS,
    GRPOModule,
    PromptDataModule,
    PromptSampler,
    aggregate,
    build_grpo,
    completion_logprobs,
    group_advantages,
    grpo_loss,
    loss_denominator,
    loss_mask,
)
from percepdsl_runtime.models import load_hf
from percepdsl_runtime.rewards import RewardError, compile_reward
from percepdsl_runtime.sampling import FusedLlamaDecoder, Rollouts, _hf_generate, llava_parts, sample_completions
from percepdsl_runtime.tasks import build_task

RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>"},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>"},
    {"role": "reasoning", "kind": "rest"},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny-model ops last microseconds: a second OpenMP thread only adds synchronisation,
    and on a loaded machine it made these tests ~40x slower (21 s vs 0.5 s for two steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ the math
def test_group_advantages_scales() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    std_g = torch.tensor([1, 0, 3 / 2]).float()  # unbiased stds per group
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.75, -0.75, -0.75, 2.25]])
    assert torch.allclose(group_advantages(r, "none"), centred)
    a = group_advantages(r, "group")
    assert torch.allclose(a[0], centred[0] / (1 / math.sqrt(3) + 1e-4), atol=1e-5)
    assert torch.allclose(a[2], centred[2] / (std_g[2] + 1e-4), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # a constant group is exactly 0, not rounding noise
    assert torch.allclose(group_advantages(r, "batch"), centred / (r.std() + 1e-4))
    const = torch.full((1, 3), 0.1) * 3  # 0.30000000000000004: its mean does not round-trip
    assert torch.equal(group_advantages(const, "group"), torch.zeros(1, 3))
    with pytest.raises(ValueError):
        group_advantages(r, "rank")  # type: ignore[arg-type]


def test_clipped_objective_matches_a_hand_computation() -> None:
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(1.1), math.log(0.7), math.log(1.3)]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # ratios: row 0 (A=+1): 1.5, 0.5 | row 1 (A=-2): 1.1, 0.7, 1.3; ε = 0.2, ε_high = 0.3
    # token objective min(ρA, clip(ρ)A): row 0: min(1.5, 1.3)=1.3, min(0.5, 0.8)=0.5
    #                                    row 1: min(-2.2, -2.2)=-2.2, min(-1.4, -1.6)=-1.6, min(-2.6, -2.6)=-2.6
    seq = (-(1.3 + 0.5) / 2 + -(-2.2 - 1.6 - 2.6) / 3) / 2
    tok = (-(1.3 + 0.5) + (2.2 + 1.6 + 2.6)) / 5
    loss, stats = grpo_loss(logp, old, adv, mask, clip=0.2, clip_high=0.3, aggregation="grpo")
    assert float(loss) == pytest.approx(seq, rel=1e-5)
    loss_t, _ = grpo_loss(logp, old, adv, mask, clip=0.2, clip_high=0.3, aggregation="bnpo")
    assert float(loss_t) == pytest.approx(tok, rel=1e-5)
    # clipped tokens (gradient removed): row 0 token 0 (1.5 > 1.3, A>0), row 1 token 1 (0.7 < 0.8, A<0)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    # symmetric clipping (ε_high = ε): row 0 token 0 now clips at 1.2
    loss_s, _ = grpo_loss(logp, old, adv, mask, clip=0.2)
    assert float(loss_s) == pytest.approx((-(1.2 + 0.5) / 2 + (2.2 + 1.6 + 2.6) / 3) / 2, rel=1e-5)
    # the gradient flows only through unclipped tokens
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, adv, mask, clip=0.2, clip_high=0.3)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 1] == 0 and lp.grad[0, 2] == 0 and lp.grad[0, 1] != 0


def _trl_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int, world: int = 1):
    """TRL's GRPOTrainer._compute_loss aggregation (trl 1.16, one accumulation step), as written there."""
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":  # num_items_in_batch: active tokens of the global batch, over all processes
        normalizer = (mask.sum() * world).clamp(min=1.0) / world  # every process holds the same count here
        return (per_token_loss * mask).sum() / normalizer
    raise AssertionError(loss_type)


def test_aggregations_are_trls_loss_types() -> None:
    """`aggregation` is named and computed as TRL's `loss_type`: grpo (mean per completion,
    then over completions, masked ones counting 0), bnpo (batch token mean), dr_grpo (token sum
    over completions × max_new_tokens), dapo (token sum over the global batch's active tokens)."""
    from percepdsl.catalogue import builtin

    assert set(AGGREGATIONS) == set(builtin("block", "grpo").param("aggregation").choices)
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[2] = 0  # a masked (e.g. truncated) completion
    T = 8  # max_new_tokens: the completions here are shorter than the cap
    for how in AGGREGATIONS:
        ours = aggregate(per_token, mask, how, loss_denominator(mask, how, max_new_tokens=T))
        assert float(ours) == pytest.approx(float(_trl_loss(per_token, mask.float(), how, T)), rel=1e-6), how
    # by hand on a toy batch: rows of 4, 1 and 0 loss tokens
    pt = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert float(aggregate(pt, m, "grpo")) == pytest.approx((1.0 + 3.0 + 0.0) / 3)  # the masked row counts as 0
    assert float(aggregate(pt, m, "bnpo")) == pytest.approx((4.0 + 3.0) / 5)
    assert float(aggregate(pt, m, "dr_grpo", loss_denominator(m, "dr_grpo", max_new_tokens=4))) == pytest.approx(7.0 / 12)
    # dapo over 2 devices: the global token count (5 here, 9 on the other device) / world
    d = loss_denominator(m, "dapo", global_tokens=14, world=2)
    assert float(aggregate(pt, m, "dapo", d)) == pytest.approx(7.0 / 7.0)
    # a subset of rows with the whole batch's denominator gives the same loss
    for how in AGGREGATIONS:
        den = loss_denominator(m, how, max_new_tokens=4)
        assert float(aggregate(pt[:2], m[:2], how, den)) == pytest.approx(float(aggregate(pt, m, how, den)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        loss_denominator(m, "dr_grpo")


def test_kl_term_only_with_positive_beta() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    adv, mask = torch.tensor([0.0]), torch.ones(1, 2)
    base, stats0 = grpo_loss(logp, logp, adv, mask, ref_logp=ref, kl=0.0)
    assert float(base) == 0.0 and "kl" not in stats0
    loss, stats = grpo_loss(logp, logp, adv, mask, ref_logp=ref, kl=0.1)
    d = ref - logp
    k3 = (torch.exp(d) - d - 1).mean()  # k3 estimator, ≥ 0
    assert float(loss) == pytest.approx(0.1 * float(k3)) and stats["kl"] == pytest.approx(float(k3))


def test_truncated_completions_are_masked() -> None:
    roll = Rollouts(
        prompt={},
        ids=torch.zeros(2, 3, dtype=torch.long),
        mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        truncated=torch.tensor([False, True]),
        group=2,
    )
    assert loss_mask(roll, True).tolist() == [[1, 1, 0], [0, 0, 0]]
    assert loss_mask(roll, False).tolist() == [[1, 1, 0], [1, 1, 1]]


def test_prompt_batches_are_seeded_endless_and_sharded() -> None:
    it = iter(PromptSampler(10, 3, seed=1))
    first = [next(it) for _ in range(6)]  # 3 batches per epoch (remainder dropped), then epoch 1
    assert all(len(b) == 3 for b in first) and len(set(sum(first[:3], []))) == 9
    assert first[:3] != first[3:]
    assert first == [b for b, _ in zip(PromptSampler(10, 3, seed=1), range(6))]
    # DDP: a step's prompts over the ranks are one process's with the global batch size (2 × 2)
    ranks = [[b for b, _ in zip(PromptSampler(12, 2, seed=0, rank=r, world=2), range(3))] for r in range(2)]
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))
    single = [b for b, _ in zip(PromptSampler(12, 4, seed=0), range(3))]
    assert [a + b for a, b in zip(*ranks)] == single
    with pytest.raises(ValueError, match="fewer than one batch"):
        PromptSampler(3, 4)
    batch = next(iter(PromptDataModule(10, 4, seed=0).train_dataloader()))
    assert batch.dtype == torch.long and batch.shape == (4,)


def test_a_resumed_stage_draws_the_prompts_of_its_step() -> None:
    """Under a trainer the prompt stream starts at the batch the stage stands at: a stage resumed at
    step 4 (from `resume.ckpt`) drew the prompts of step 0 again, so it trained on other prompts than
    an uninterrupted one. With `updates = u` a batch takes u steps."""
    stream = [b for b, _ in zip(PromptSampler(10, 3, seed=1), range(8))]
    for updates, step in ((1, 0), (1, 4), (2, 6), (3, 12)):
        dm = PromptDataModule(10, 3, seed=1, updates=updates)
        dm.trainer = SimpleNamespace(global_step=step, global_rank=0, world_size=1)
        got = [b.tolist() for b, _ in zip(dm.train_dataloader(), range(2))]
        assert got == stream[step // updates : step // updates + 2], (updates, step)


def test_prompt_batches_are_sharded_by_the_trainers_rank() -> None:
    """The data module reads the rank from its trainer (it read a `_trainer` attribute a data module
    never has, so every rank drew rank 0's prompts)."""
    shards = []
    for rank in range(2):
        dm = PromptDataModule(12, 2, seed=0)
        dm.trainer = SimpleNamespace(global_step=0, global_rank=rank, world_size=2)
        shards.append(next(iter(dm.train_dataloader())).tolist())
    assert shards[0] + shards[1] == next(iter(PromptSampler(12, 4, seed=0)))


def test_stage_defaults_come_from_the_catalogue_and_lr_is_absolute() -> None:
    from percepdsl.catalogue import default

    stage = GRPOStageIR(
        name="rl",
        steps=10,
        lr={"kind": "cosine", "start": 1e-4, "end": 0.0, "warmup": 2},
        group=4,
        clip_high=0.28,
        reward=RewardIR(kind="term", name="outcome", impl="percepdsl_runtime.rewards:outcome"),
    )
    assert stage.kl == default("block", "grpo", "kl") and stage.aggregation == default("block", "grpo", "aggregation")
    assert value_at(stage.lr, 0, stage.steps) == 0.0 and value_at(stage.lr, 2, stage.steps) == pytest.approx(1e-4)


def test_sampler_draws_from_the_tempered_nucleus() -> None:
    from percepdsl_runtime.sampling import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20_000, 1)
    g = torch.Generator().manual_seed(0)
    freq = lambda x: (torch.bincount(x, minlength=4) / x.numel()).tolist()  # noqa: E731
    assert freq(_sample(logits, 1.0, 1.0, g)) == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.015)
    # top_p = 0.7 keeps {0.5, 0.3} (the smallest head reaching 0.7), renormalised
    assert freq(_sample(logits, 1.0, 0.7, g)) == pytest.approx([0.625, 0.375, 0, 0], abs=0.015)
    # temperature 2 flattens: p ∝ sqrt(p)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert freq(_sample(logits, 2.0, 1.0, g)) == pytest.approx((p / p.sum()).tolist(), abs=0.015)
    banned = logits.clone()
    banned[:, 0] = -math.inf
    assert freq(_sample(banned, 1.0, 1.0, g))[0] == 0.0
    assert _sample(logits[:3], 0.0, 1.0, g).tolist() == [0, 0, 0]  # temperature 0: greedy


# ------------------------------------------------------------------ tiny model (conftest.py's, on this task)
@pytest.fixture(scope="module")
def task():
    return build_task("graph_coloring", {"nodes": 4, "reasoning": "brief", "train": 32, "test": 4}, seed=0)


@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(tiny, RULES)


def _prompts(task, encoder, pad: bool):
    s = [task.sample("train", i) for i in range(2)]
    extra = " color the graph" if pad else ""  # a longer second query: the first row is left-padded
    return collate(
        [encoder.encode_prompt(s[0].query, s[0].image), encoder.encode_prompt(s[1].query + extra, s[1].image)], encoder.pad_token_id
    )


@pytest.mark.parametrize("pad", [False, True])
def test_fused_sampler_reproduces_hf_greedy_generation(tiny, task, encoder, pad: bool) -> None:
    model = tiny.model.eval()
    prompt = _prompts(task, encoder, pad)
    kw = dict(
        temperature=0.0,
        top_p=1.0,
        eos_token_id=encoder.eos_token_id,
        pad_token_id=encoder.pad_token_id,
        suppress=(tiny.model.config.image_token_id,),
    )
    roll = sample_completions(model, prompt, group=2, max_new_tokens=12, **kw)
    ref = _hf_generate(model, prompt, 1, 12, 0.0, 1.0, encoder.eos_token_id, encoder.pad_token_id, kw["suppress"], None)
    assert torch.equal(roll.ids[0::2], ref.masked_fill(roll.mask[0::2] == 0, encoder.pad_token_id))
    assert torch.equal(roll.ids[0::2], roll.ids[1::2])  # greedy: the G copies of a prompt agree
    bf16 = sample_completions(model, prompt, group=2, max_new_tokens=12, dtype=torch.bfloat16, **kw)
    assert bf16.ids.shape == roll.ids.shape


@pytest.mark.parametrize("static", [False, True])
def test_fused_decoder_step_matches_hf_logits_with_grouped_query_attention_and_biases(static: bool) -> None:
    """The fused step's layout choices (q|k|v columns reordered so each KV head's k and v sit
    together, RoPE over the whole row, the RMSNorm weights folded into the next projection,
    grouped-query attention as a view of q, keys stored transposed) give Hugging Face's
    logits, here on a Llama with 4 query heads over 2 KV heads and biases on every
    projection, for two steps after a prefix shared by G = 2 rows; eager and static forms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():  # non-trivial norms and biases
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    dec = FusedLlamaDecoder(model.model, model.lm_head)
    prompt = torch.randint(0, 40, (1, 5), generator=gen)
    nxt = torch.tensor([[7], [11]])  # the two rows of the group continue differently
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = dec.prefix_cache(out.past_key_values.layers, 2, 8, zero=True)
        rope = dec.rope_table(8, prompt.device)
        pos = torch.tensor([5, 5])
        for t in range(2):
            at = torch.tensor([5 + t]) if static else 5 + t
            logits = dec.step(nxt[:, t], pos + t, rope, cache, at, None)
            ref = model(torch.cat([prompt.repeat(2, 1), nxt[:, : t + 1]], dim=1)).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
            nxt = torch.cat([nxt, logits.argmax(-1, keepdim=True)], dim=1)


@pytest.mark.parametrize("pad", [False, True])
def test_fused_sampler_merges_lora_adapters(tiny, task, encoder, pad: bool) -> None:
    """A PEFT LoRA model takes the fast path with its adapters merged into the decoder's weight
    copies: in fp32 it writes Hugging Face's greedy tokens through the PEFT modules, and with the
    adapters disabled the base model's (which differ: the adapters matter here)."""
    loaded = load_hf(tiny.path, lora=LoraIR(r=4, alpha=8, dropout=0.0))
    model = loaded.model.eval()
    assert FusedLlamaDecoder.supports(*llava_parts(model)[:2])
    roll = _greedy_as_hugging_face(model, task, encoder, pad)
    with model.disable_adapter():
        base = _greedy_as_hugging_face(model, task, encoder, pad)
    assert not torch.equal(base.ids, roll.ids)


def _greedy_as_hugging_face(model, task, encoder, pad: bool) -> Rollouts:
    """The fused sampler's greedy rollouts of a PEFT model, after giving its adapters an effect (LoRA starts
    at B = 0: no change), checked token for token against Hugging Face `generate` through the PEFT modules."""
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_embedding" in name:
            param.data.normal_(0.0, 0.5, generator=gen)
    prompt = _prompts(task, encoder, pad)
    kw = dict(temperature=0.0, top_p=1.0, eos_token_id=encoder.eos_token_id, pad_token_id=encoder.pad_token_id)
    suppress = (model.config.image_token_id,)
    roll = sample_completions(model, prompt, group=2, max_new_tokens=12, suppress=suppress, **kw)
    ref = _hf_generate(model, prompt, 1, 12, 0.0, 1.0, encoder.eos_token_id, encoder.pad_token_id, suppress, None)
    assert torch.equal(roll.ids[0::2], ref.masked_fill(roll.mask[0::2] == 0, encoder.pad_token_id))
    return roll


def test_fused_sampler_keeps_an_embedding_adapter(tiny, task, encoder) -> None:
    """`lora { target_modules = ["embed_tokens", "q_proj", "lm_head"] }`: the decoder looks new tokens up
    in its own copy of the embedding, so that copy must hold the embedding adapter's delta too; else
    rollouts come from another policy than the one trained. Greedy tokens equal Hugging Face's."""
    loaded = load_hf(tiny.path, lora=LoraIR(r=4, alpha=8, dropout=0.0, target_modules=["embed_tokens", "q_proj", "lm_head"]))
    model = loaded.model.eval()
    roll = _greedy_as_hugging_face(model, task, encoder, True)
    with model.disable_adapter():
        base = _greedy_as_hugging_face(model, task, encoder, True)
    assert not torch.equal(base.ids, roll.ids)  # the adapters matter here


def test_hf_sampling_ignores_the_checkpoints_generation_config(task, tmp_path) -> None:
    """Rollouts of a model off the fused path (here Idefics3) go through Hugging Face `generate`, which
    fills every knob left unset from the checkpoint's generation_config: a real checkpoint shipping
    `repetition_penalty`, `no_repeat_ngram_size`, `num_beams` or `min_new_tokens` sampled from another
    distribution than the policy whose log-probs GRPO takes. The neutral values are spelled out."""
    from test_models import make_idefics3

    from percepdsl_runtime.sampling import fused_parts

    loaded = load_hf(make_idefics3(tmp_path / "ckpt", task))
    enc = Encoder(loaded, RULES)
    model = loaded.model.eval()
    assert fused_parts(model) is None
    prompt = _prompts(task, enc, True)
    kw = dict(group=1, max_new_tokens=8, temperature=0.0, top_p=1.0, pad_token_id=enc.pad_token_id)
    stop = int(sample_completions(model, prompt, eos_token_id=enc.eos_token_id, **kw).ids[0, 2])  # a token it writes
    plain = sample_completions(model, prompt, eos_token_id=stop, **kw)  # stops early: a minimum length would show
    assert plain.mask[0].sum() <= 3
    for knobs in (dict(repetition_penalty=50.0, no_repeat_ngram_size=1, num_beams=2), dict(min_new_tokens=8), dict(min_length=60)):
        model.generation_config.update(**knobs)
        assert torch.equal(sample_completions(model, prompt, eos_token_id=stop, **kw).ids, plain.ids), knobs


@pytest.mark.parametrize("pad", [False, True])
def test_compiled_decoder_matches_the_eager_one(tiny, task, encoder, pad: bool) -> None:
    """`compile = true`: the static-shape decoder under torch.compile writes the same greedy
    tokens as the eager one (fp32), with and without left padding. Where torch.compile cannot
    run, a RuntimeWarning says so and the eager decoder serves."""
    from percepdsl_runtime.sampling import compiled_step

    model = tiny.model.eval()
    prompt = _prompts(task, encoder, pad)
    kw = dict(
        group=2,
        max_new_tokens=12,
        temperature=0.0,
        top_p=1.0,
        eos_token_id=encoder.eos_token_id,
        pad_token_id=encoder.pad_token_id,
        suppress=(tiny.model.config.image_token_id,),
    )
    eager = sample_completions(model, prompt, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = sample_completions(model, prompt, compile=True, **kw)
    assert torch.equal(compiled.ids, eager.ids)
    if compiled_step() is None:
        assert any(issubclass(w.category, RuntimeWarning) and "torch.compile" in str(w.message) for w in caught)


def test_sampled_rows_stop_at_eos_and_sampling_is_seeded(tiny, task, encoder) -> None:
    prompt = _prompts(task, encoder, pad=True)
    kw = dict(
        group=4,
        max_new_tokens=10,
        temperature=1.0,
        top_p=0.9,
        eos_token_id=encoder.eos_token_id,
        pad_token_id=encoder.pad_token_id,
        suppress=(tiny.model.config.image_token_id,),
    )
    a = sample_completions(tiny.model, prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = sample_completions(tiny.model, prompt, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.ids, b.ids) and a.ids.shape == (8, 10)
    assert not (a.ids == tiny.model.config.image_token_id).any()
    for row, m, t in zip(a.ids.tolist(), a.mask.tolist(), a.truncated.tolist()):
        n = sum(m)
        assert m == [1] * n + [0] * (10 - n)  # generated tokens form a prefix
        assert t == (encoder.eos_token_id not in row[:n])
        if not t:
            assert row[n - 1] == encoder.eos_token_id and all(x == encoder.pad_token_id for x in row[n:])


def _six_token_rollout(model, prompt, encoder):
    """Two completions of 6 tokens per prompt (no EOS), seeded: the rollouts the log-prob tests score."""
    kw = dict(temperature=1.0, top_p=1.0, eos_token_id=-1, pad_token_id=encoder.pad_token_id)
    return sample_completions(model, prompt, group=2, max_new_tokens=6, generator=torch.Generator().manual_seed(1), **kw)


def test_training_logprobs_match_an_unpadded_forward(tiny, task, encoder) -> None:
    model = tiny.model.eval()
    prompt = _prompts(task, encoder, pad=True)
    roll = _six_token_rollout(model, prompt, encoder)
    with torch.no_grad():
        lp = completion_logprobs(model, roll, temperature=0.7)
        sub = completion_logprobs(model, roll, temperature=0.7, rows=torch.tensor([3]))
        i = 3  # a row of prompt 1; then row 0, whose prompt is left-padded
        for i in (3, 0):
            keep = prompt["attention_mask"][i // 2].bool()
            ids = torch.cat([prompt["input_ids"][i // 2][keep], roll.ids[i]])[None]
            logits = model(input_ids=ids, pixel_values=prompt["pixel_values"][i // 2 : i // 2 + 1]).logits[0]
            P = int(keep.sum())
            want = torch.log_softmax(logits[P - 1 : -1].float() / 0.7, -1).gather(-1, roll.ids[i][:, None])[:, 0]
            assert torch.allclose(lp[i], want, atol=1e-4)
    assert torch.allclose(sub[0], lp[3])

    # the gradient too: the shared-prompt forward equals one full forward per row
    def grads(fn) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        fn().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    weights = torch.linspace(0.5, 1.5, roll.ids.shape[1])
    shared = grads(lambda: (completion_logprobs(model, roll, 0.7)[[0, 3]] * weights).sum())

    def full() -> torch.Tensor:
        total = torch.zeros(())
        for i in (0, 3):
            keep = prompt["attention_mask"][i // 2].bool()
            ids = torch.cat([prompt["input_ids"][i // 2][keep], roll.ids[i]])[None]
            logits = model(input_ids=ids, pixel_values=prompt["pixel_values"][i // 2 : i // 2 + 1]).logits[0]
            P = int(keep.sum())
            lp_i = torch.log_softmax(logits[P - 1 : -1].float() / 0.7, -1).gather(-1, roll.ids[i][:, None])[:, 0]
            total = total + (lp_i * weights).sum()
        return total

    reference = grads(full)
    assert len(shared) == len(reference) > 0
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(shared, reference))
    model.zero_grad(set_to_none=True)


def _module(tiny, encoder, task, reward_ir: RewardIR, resolve=None, **settings) -> tuple[GRPOModule, PromptDataModule]:
    loaded = load_hf(tiny.path)  # fresh weights for every training test
    stage = GRPOStageIR(
        **{"name": "rl", "steps": 2, "batch": 2, "group": 4, "max_new_tokens": 12, "lr": 1e-3, "reward": reward_ir, **settings}
    )
    module = GRPOModule(loaded, encoder, task, stage, compile_reward(reward_ir, resolve), seed=0, grad_clip=1.0)
    return module, PromptDataModule(task.size("train"), stage.batch, seed=0)


def _fit(module, dm, steps: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def _diversity(group, **_):
    """A reward that varies with the text of an untrained model: share of distinct words."""
    return [len(set(t.split())) / max(len(t.split()), 1) for t in group.completions]


DIVERSITY = RewardIR(
    kind="sum",
    children=[
        RewardIR(kind="term", name="diversity", impl="test:diversity"),
        RewardIR(kind="scale", value=0.5, children=[RewardIR(kind="term", name="outcome", impl="x:outcome")]),
    ],
)


def _resolve(impl: str):
    from percepdsl_runtime import rewards

    return _diversity if impl == "test:diversity" else getattr(rewards, impl.split(":")[1])


def test_compile_true_runs_the_update_through_the_compiled_text_decoder(tiny, encoder, task) -> None:
    """`compile = true`: the update's completion forward runs the text decoder under torch.compile,
    held outside the module tree (a checkpoint holds each weight once); its log-probs and their
    gradient are the eager forward's (fp32); `compile = false` stays eager. Where torch.compile
    cannot run, a warning says so and the update is eager."""
    import warnings

    compiled, _ = _module(tiny, encoder, task, DIVERSITY, _resolve, compile=True)
    eager, _ = _module(tiny, encoder, task, DIVERSITY, _resolve)
    roll = _six_token_rollout(eager.model.eval(), _prompts(task, encoder, pad=True), encoder)
    weights = torch.linspace(0.5, 1.5, roll.ids.shape[1])

    def update(module: GRPOModule, rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.model.eval().zero_grad(set_to_none=True)
        lp = module._update_logprobs(roll, torch.tensor(rows))
        (lp * weights).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in ([0, 1, 3], [2, 3]):  # a second row count: the compiled graph takes it too
            (lp_c, g_c), (lp_e, g_e) = update(compiled, rows), update(eager, rows)
            assert torch.allclose(lp_c, lp_e, atol=1e-4), (lp_c - lp_e).abs().max()
            assert g_c.keys() == g_e.keys() and len(g_c) > 0
            assert all(torch.allclose(g_c[k], g_e[k], atol=1e-5, rtol=1e-3) for k in g_c)
    from percepdsl_runtime.sampling import compiled_step

    failed = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "torch.compile" in str(w.message)]
    assert eager._update_decoder == [None]
    if compiled_step() is not None:  # where torch.compile runs at all, the update's decoder compiled (no fallback)
        assert not failed and compiled._update_decoder[0] is not None, failed
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    else:
        assert failed and compiled._update_decoder == [None]
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_grpo_steps_run_end_to_end_and_change_the_weights(tiny, encoder, task) -> None:
    module, dm = _module(
        tiny, encoder, task, DIVERSITY, _resolve, steps=4, updates=2, mask_truncated=False, aggregation="bnpo", clip_high=0.28
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = _fit(module, dm, 4)
    assert trainer.global_step == 4  # updates=2: two generated batches, two optimiser steps each
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("vision_tower" in n for n in moved) and any("language_model" in n for n in moved)
    logs = trainer.logged_metrics
    for key in (
        "loss",
        "grad_norm",
        "clip_frac",
        "reward",
        "reward/diversity",
        "reward/outcome",
        "gen_tokens_per_s",
        "constant_group_frac",
        "trained_rows",
    ):
        assert key in logs, key
    assert module.ref_model is None  # kl = 0: no reference model
    diag = module.diagnostics()
    assert diag["steps"] == 2 and diag["rollouts"] == 16 and "surrogate_corr/diversity" in diag
    assert diag["reward_perception_corr"] is None  # an untrained model perceives nothing: undefined, not NaN
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)  # the stage statistics survive a resume
    again, _ = _module(tiny, encoder, task, DIVERSITY, _resolve)
    again.on_load_checkpoint(ckpt)
    assert again.diagnostics() == diag


def test_reference_model_and_kl_term_only_when_beta_positive(tiny, encoder, task) -> None:
    no_kl, _ = _module(tiny, encoder, task, DIVERSITY, _resolve, kl=0.0)
    assert no_kl.ref_model is None
    module, dm = _module(tiny, encoder, task, DIVERSITY, _resolve, steps=2, kl=0.05, mask_truncated=False)
    ref = module.ref_model
    assert ref is not None and ref is not module.model and not any(p.requires_grad for p in ref.parameters())
    assert not any(n.startswith("_ref") for n in module.state_dict())  # not in checkpoints
    trainer = _fit(module, dm, 2)
    assert "kl" in trainer.logged_metrics and trainer.logged_metrics["kl"] > 0  # the policy moved away from it
    # the reference stays where the stage started while the policy moves
    fresh = load_hf(tiny.path).model
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(module.model.state_dict().values(), fresh.state_dict().values()))


def test_nan_reward_stops_the_run_before_any_update(tiny, encoder, task) -> None:
    bad = RewardIR(
        kind="sum",
        children=[RewardIR(kind="term", name="outcome", impl="x:outcome"), RewardIR(kind="term", name="flaky", impl="test:flaky")],
    )
    resolve = lambda impl: (lambda g, **_: [math.nan] * len(g)) if impl == "test:flaky" else _resolve(impl)  # noqa: E731
    module, dm = _module(tiny, encoder, task, bad, resolve)
    before = [p.detach().clone() for p in module.model.parameters()]
    with pytest.raises(RewardError, match="`flaky`") as exc:
        _fit(module, dm, 2)
    assert exc.value.term == "flaky"
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


def test_build_grpo_from_a_stage(tiny, encoder, task) -> None:
    stage = GRPOStageIR(
        name="rl",
        steps=3,
        batch=2,
        group=3,
        scale="batch",
        reward=RewardIR(kind="term", name="outcome", impl="percepdsl_runtime.rewards:outcome"),
    )
    module, dm = build_grpo(load_hf(tiny.path), encoder, task, stage, seed=5, grad_clip=0.5)
    assert isinstance(module, GRPOModule) and isinstance(dm, PromptDataModule)
    assert module.stage is stage and module.grad_clip == 0.5 and module.reward.term_names == ["outcome"]
    assert dm.batch_size == 2 and dm.n_prompts == task.size("train")
    with pytest.raises(ValueError, match="not a grpo stage"):
        build_grpo(tiny, encoder, task, SimpleNamespace(kind="sft", name="base", reward=None), seed=0)


# ---- constant groups: keep, drop, resample (DAPO's dynamic sampling) ----------------------------------
def _odd_prompts_vary(group, **_):
    """Constant (0.5) on prompts with an even index: no signal; 0, 1/G, … on odd ones."""
    n = len(group.completions)
    return [0.5] * n if group.sample.index % 2 == 0 else [i / n for i in range(n)]


ODD_VARY = RewardIR(kind="term", name="odd", impl="test:odd")
FLAT = RewardIR(kind="term", name="flat", impl="test:flat")


def _resolve_groups(impl: str):
    return {"test:odd": _odd_prompts_vary, "test:flat": lambda g, **_: [1.0] * len(g)}[impl]


def _fit_watching(module, dm, steps: int):
    """Fit, recording the loss denominator's mask rows and the prompts of every scored group per step."""
    seen: dict[str, list] = {"denominator_rows": [], "prompts": []}
    denominator, rollout = module._denominator, module.rollout

    def watch_denominator(mask):
        seen["denominator_rows"].append(mask.shape[0])
        return denominator(mask)

    def watch_rollout(indices, draw=0):
        seen["prompts"].append((module.global_step, draw, indices.tolist()))
        return rollout(indices, draw)

    module._denominator, module.rollout = watch_denominator, watch_rollout
    return _fit(module, dm, steps), seen


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_constant_groups_keep_or_drop_from_the_loss(tiny, encoder, task, mode) -> None:
    module, dm = _module(
        tiny, encoder, task, ODD_VARY, _resolve_groups, steps=3, batch=4, group=3, aggregation="bnpo", constant_groups=mode
    )
    trainer, seen = _fit_watching(module, dm, 3)
    odd = [sum(i % 2 for i in idx) for _, _, idx in seen["prompts"]]  # groups with a signal, per step
    assert [d for _, d, _ in seen["prompts"]] == [0, 0, 0]  # no extra batches without `resample`
    # `drop`: the constant groups' rows are out of the loss and its denominator (bnpo: their tokens)
    assert seen["denominator_rows"] == ([12, 12, 12] if mode == "keep" else [3 * k for k in odd])
    logs = trainer.logged_metrics
    last_before = 1 - odd[-1] / 4
    assert float(logs["constant_group_frac_before"]) == pytest.approx(last_before)
    assert float(logs["constant_group_frac_after"]) == pytest.approx(last_before if mode == "keep" else 0.0)
    assert float(logs["trained_group_frac"]) == pytest.approx(1.0 if mode == "keep" else odd[-1] / 4)
    diag = module.diagnostics()  # summary.json: means per step
    assert diag["constant_group_frac_before"] == pytest.approx(1 - sum(odd) / 12)
    assert diag["resample_draws"] == 0.0


def test_resample_fills_the_batch_with_groups_that_carry_a_signal(tiny, encoder, task) -> None:
    module, dm = _module(tiny, encoder, task, ODD_VARY, _resolve_groups, steps=2, batch=4, group=3, constant_groups="resample")
    trainer, seen = _fit_watching(module, dm, 2)
    for step in (0, 1):
        draws = [idx for s, _, idx in seen["prompts"] if s == step]
        signal = sum(i % 2 for idx in draws for i in idx)
        assert len(draws) > 1 or signal >= 4
        if len(draws) > 1:  # drawn until 4 groups with a signal were there, and no further
            assert sum(i % 2 for idx in draws[:-1] for i in idx) < 4 <= signal
        assert all(len(set(idx)) == 4 for idx in draws[1:])  # fresh prompts: distinct within a batch
    assert seen["denominator_rows"] == [12, 12]  # 4 groups × 3 rows in the loss
    logs = trainer.logged_metrics
    assert float(logs["constant_group_frac_after"]) == 0.0 and float(logs["trained_group_frac"]) == 1.0
    assert float(logs["resample_draws"]) == len([1 for s, _, _ in seen["prompts"] if s == 1]) - 1
    # the same run again draws the same prompts: a pure function of (seed, step, draw)
    again, _ = _module(tiny, encoder, task, ODD_VARY, _resolve_groups, steps=2, batch=4, group=3, constant_groups="resample")
    assert _fit_watching(again, PromptDataModule(task.size("train"), 4, seed=0), 2)[1]["prompts"] == seen["prompts"]


def test_resample_is_bounded_by_its_tries(tiny, encoder, task) -> None:
    module, dm = _module(tiny, encoder, task, FLAT, _resolve_groups, steps=2, constant_groups="resample", resample_tries=3)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer, seen = _fit_watching(module, dm, 2)
    assert [(s, d) for s, d, _ in seen["prompts"]] == [(s, d) for s in (0, 1) for d in range(4)]
    logs = trainer.logged_metrics
    assert float(logs["resample_draws"]) == 3 and float(logs["trained_group_frac"]) == 0.0
    assert float(logs["constant_group_frac_before"]) == 1.0 and float(logs["loss"]) == 0.0
    assert seen["denominator_rows"] == [0, 0]
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))  # nothing to learn from


def test_token_weights_on_a_visual_role_tag_the_rollouts_with_the_reference(tiny, task) -> None:
    """`token_weights { grounded = 2 }` with `grounded = visual(threshold = 0)` declared first: the
    reference (a copy of the start model, which sees its image) tags the generated tokens, the
    share is logged; a reference that cannot see tags none."""
    import copy

    from percepdsl.ir import RoleRuleIR, RoleWeights
    from percepdsl_runtime.probe import VisualRoles

    rule = RoleRuleIR(role="grounded", kind="visual", threshold=0.0, refresh=0, against="other")
    enc = Encoder(tiny, [rule, *RULES])
    shares = {}
    for blind in (False, True):
        loaded = load_hf(tiny.path)
        ref = copy.deepcopy(loaded.model).eval().requires_grad_(False)
        if blind:
            with torch.no_grad():
                ref.model.multi_modal_projector.linear_2.weight.zero_()
        visual = VisualRoles([(0, rule)], {(None, 0): ref}, rest_id=enc.role_names.index("reasoning"))
        stage = GRPOStageIR(
            name="rl", steps=2, batch=2, group=4, max_new_tokens=12, lr=1e-3, mask_truncated=False,
            reward=DIVERSITY, token_weights=RoleWeights(weights={"grounded": 2.0}),
        )  # fmt: skip
        module = GRPOModule(loaded, enc, task, stage, compile_reward(DIVERSITY, _resolve), seed=0, grad_clip=1.0, visual=visual)
        logs = _fit(module, PromptDataModule(task.size("train"), 2, seed=0), 2).logged_metrics
        shares[blind] = float(logs["token_share/grounded"])
        assert float(logs["visual_roles_s"]) > 0
    assert shares[False] > 0.5 and shares[True] == 0.0, shares
