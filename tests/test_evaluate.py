"""Tests for batched generation (``generation.py``) and the three-way evaluation (``evaluate.py``).

They run the real pieces — the built-in tasks, the embedded tiny LLaVA (shrunk for speed)
and the project's Encoder — and use test doubles only where a *trained* model is needed:
a generator that writes the reference response (``CheatingGenerator``) and one that
writes fixed garbage (``ScriptedGenerator``), both through ``evaluate``'s ``generate_fn``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from percepdsl.io import read_jsonl, write_jsonl_atomic
from percepdsl_runtime.encoding import Encoder
from percepdsl_runtime.evaluate import (
    METRIC_KEYS,
    EvalConfig,
    evaluate,
    extract_section,
    join_prefix,
    sum_slot_errors,
    summarize_records,
)
from percepdsl_runtime.generation import (
    Completion,
    GenConfig,
    Prompt,
    _fused_decoder,
    generate,
    plan_batches,
    reference_cap,
    split_completion,
)
from percepdsl_runtime.models import LoadedModel, build_tiny
from percepdsl_runtime.tasks import Scores, build_task

ROLE_RULES = [
    {"kind": "between", "role": "perception", "open": "<perception>", "close": "</perception>"},
    {"kind": "rest", "role": "reasoning"},
]

# ---------------------------------------------------------------------------
# Fixtures and doubles
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these models are too small to gain from two, and on a shared
    2-core machine two spinning OpenMP threads slow down badly under foreign load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> Any:
    return build_task("graph_coloring", {"nodes": (4, 5), "test": 12, "train": 20}, seed=3)


@pytest.fixture(scope="module")
def loaded(task: Any, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    # A smaller tiny model than the default (same architecture) keeps the tests fast.
    return build_tiny(task.vocabulary(), image=task.params.image, width=64, depth=2, heads=2, vision_width=32, vision_depth=1,
                      seed=0, save_dir=tmp_path_factory.mktemp("tiny"))  # fmt: skip


@pytest.fixture(scope="module")
def encoder(loaded: LoadedModel) -> Encoder:
    return Encoder(loaded, ROLE_RULES)


@contextmanager
def eos_logit(model: torch.nn.Module, eos_token_id: int, value: float) -> Iterator[None]:
    """Force (+inf) or forbid (-inf) EOS by overwriting its logit, to steer an untrained model."""

    def hook(module: Any, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., eos_token_id] = value
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def varied_prompts(task: Any, n: int = 6) -> list[Prompt]:
    """Prompts of different lengths (forced prefixes of 0..n-1 response words) and caps."""
    out = []
    for i in range(n):
        s = task.sample("test", i)
        out.append(Prompt(s.query, s.image, " ".join(s.response.split()[: 3 * i]), max_new_tokens=4 + 3 * i))
    return out


def image_key(image: Any) -> bytes:
    return image.tobytes()


class CheatingGenerator:
    """The generate interface, answering with the task's reference response.

    Finds the sample by its image (queries are the same for every item); for a
    counterfactual prompt it writes what follows the forced prefix. Keeps every prompt.
    """

    def __init__(self, task: Any) -> None:
        samples = [task.sample("test", i) for i in range(task.size("test"))]
        self.by_image = {image_key(s.image): s for s in samples}
        self.seen: list[Prompt] = []

    def __call__(self, prompts: list[Prompt], cfg: GenConfig) -> list[Completion]:
        self.seen.extend(prompts)
        out = []
        for p in prompts:
            ref = self.by_image[image_key(p.image)].response
            assert ref.startswith(p.prefix)
            text = ref[len(p.prefix) :]
            out.append(Completion(text, len(text.split()) + 1, False))
        return out


class ScriptedGenerator:
    """Returns the given texts in turn, flagged truncated."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __call__(self, prompts: list[Prompt], cfg: GenConfig) -> list[Completion]:
        return [Completion(self.texts[i % len(self.texts)], 0, True) for i in range(len(prompts))]


# ---------------------------------------------------------------------------
# Generation: pure helpers
# ---------------------------------------------------------------------------


def test_plan_batches_sorts_longest_first_and_covers_every_index() -> None:
    assert plan_batches([3, 9, 1, 9, 5], batch_size=2) == [[1, 3], [4, 0], [2]]
    assert plan_batches([3, 9, 1], batch_size=2, sort=False) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        plan_batches([1], batch_size=0)


def test_split_completion_cuts_at_eos_or_cap() -> None:
    assert split_completion([5, 6, 2, 0, 0], eos_token_id=2, cap=10) == ([5, 6, 2], False)
    assert split_completion([5, 6, 7, 8], eos_token_id=2, cap=3) == ([5, 6, 7], True)
    assert split_completion([2, 5], eos_token_id=[9, 2], cap=1) == ([2], False)
    assert split_completion([], eos_token_id=2, cap=5) == ([], True)


def test_reference_cap() -> None:
    assert reference_cap(100, 1.3, 20) == 150  # ceil(1.3 * 100) + 20
    assert reference_cap(7, 1.3, 20) == 30  # ceil(9.1) + 20
    assert reference_cap(0, 1.3, 20) == 20


# ---------------------------------------------------------------------------
# Generation on the tiny model
# ---------------------------------------------------------------------------


def test_batched_sorted_generation_matches_one_by_one_in_input_order(task, loaded, encoder) -> None:
    prompts = varied_prompts(task)
    batched = generate(loaded, encoder, prompts, GenConfig(batch_size=4))
    single = [generate(loaded, encoder, [p], GenConfig(batch_size=1))[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.prompt_index for c in batched] == list(range(len(prompts)))


def test_cap_honoured_and_truncation_flagged(task, loaded, encoder) -> None:
    prompts = varied_prompts(task)
    with eos_logit(loaded.model, encoder.eos_token_id, float("-inf")):
        out = generate(loaded, encoder, prompts, GenConfig(batch_size=3))
        assert [c.n_tokens for c in out] == [p.max_new_tokens for p in prompts]
        assert all(c.truncated and len(c.token_ids) == c.n_tokens for c in out)
        # A prompt without its own cap takes the config's.
        out = generate(loaded, encoder, [Prompt(prompts[0].query, prompts[0].image)], GenConfig(max_new_tokens=3))
        assert out[0].n_tokens == 3 and out[0].truncated


def test_eos_stops_generation_and_is_not_truncated(task, loaded, encoder) -> None:
    with eos_logit(loaded.model, encoder.eos_token_id, float("inf")):
        out = generate(loaded, encoder, varied_prompts(task), GenConfig())
    assert all(c.n_tokens == 1 and not c.truncated and c.text == "" for c in out)
    assert all(c.token_ids == (encoder.eos_token_id,) for c in out)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_caches_and_attention_kernels_agree(task, loaded, encoder, cache) -> None:
    prompts = varied_prompts(task)
    reference = generate(loaded, encoder, prompts, GenConfig(batch_size=1))  # the fused decoder
    via_generate = GenConfig(batch_size=4, cache=cache, decoder="generate")
    assert generate(loaded, encoder, prompts, via_generate) == reference
    assert generate(loaded, encoder, prompts, replace(via_generate, attention="sdpa")) == reference
    assert loaded.model.config._attn_implementation == "eager"  # restored after the call


class OtherEos:
    """The encoder with another token as its EOS: one this untrained model writes now and
    then, so that rows end at different steps (a hook on the head would switch the fused
    decoder off: it never calls the modules)."""

    def __init__(self, encoder: Encoder, eos_token_id: int) -> None:
        self._encoder, self.eos_token_id = encoder, eos_token_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def test_fused_decoder_writes_generates_greedy_tokens(task, loaded, encoder) -> None:
    """Evaluation's default decoder (GRPO's fused one, fp32) writes exactly the token ids of
    Hugging Face ``generate``, with left padding, a cap per row and EOS ending rows at
    different steps; a forward hook, or ``decoder = "generate"``, selects ``generate``."""
    prompts = [replace(p, max_new_tokens=10 + 5 * i) for i, p in enumerate(varied_prompts(task, 8))]
    enc = OtherEos(encoder, 19)
    assert _fused_decoder(loaded.model, enc, GenConfig()) is not None
    assert _fused_decoder(loaded.model, enc, GenConfig(decoder="generate")) is None
    fused = generate(loaded, enc, prompts, GenConfig(batch_size=4))
    assert fused == generate(loaded, enc, prompts, GenConfig(batch_size=4, decoder="generate"))
    ended = [c.n_tokens for c in fused if not c.truncated]
    assert len(set(ended)) >= 3 and all(c.token_ids[-1] == 19 for c in fused if not c.truncated)
    assert any(c.truncated and c.n_tokens == p.max_new_tokens for c, p in zip(fused, prompts))
    with eos_logit(loaded.model, encoder.eos_token_id, float("-inf")):
        assert _fused_decoder(loaded.model, encoder, GenConfig()) is None


def test_evaluation_records_are_the_same_through_either_decoder(task, loaded, encoder) -> None:
    fused = evaluate(loaded, encoder, task, n=6, cfg=EvalConfig())
    via_generate = evaluate(loaded, encoder, task, n=6, cfg=EvalConfig(gen=GenConfig(decoder="generate")))
    assert fused.records == via_generate.records and fused.metrics == via_generate.metrics


def test_bf16_autocast_generation_runs(task, loaded, encoder) -> None:
    prompts = varied_prompts(task)
    out = generate(loaded, encoder, prompts, GenConfig(precision="bf16"))
    assert [c.prompt_index for c in out] == list(range(len(prompts)))
    assert all(1 <= c.n_tokens <= p.max_new_tokens for c, p in zip(out, prompts))


def test_greedy_generation_is_deterministic_and_restores_train_mode(task, loaded, encoder) -> None:
    loaded.model.train()
    try:
        a = generate(loaded, encoder, varied_prompts(task), GenConfig())
        assert loaded.model.training  # evaluation mid-training must not switch dropout off
        b = generate(loaded, encoder, varied_prompts(task), GenConfig())
    finally:
        loaded.model.eval()
    assert a == b


def test_group_sampling_layout_and_seed(task, loaded, encoder) -> None:
    prompts = varied_prompts(task, 3)
    cfg = GenConfig(temperature=1.0, top_p=0.9, num_return_sequences=4, batch_size=8, seed=3)
    torch.manual_seed(0)
    before = torch.rand(1)
    out = generate(loaded, encoder, prompts, cfg)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, s) for i in range(3) for s in range(4)]
    assert all(c.n_tokens <= prompts[c.prompt_index].max_new_tokens for c in out)
    assert out == generate(loaded, encoder, prompts, cfg)  # same seed, same samples
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched
    assert len({c.token_ids for c in out}) > 1  # it did sample


def test_empty_prompt_list(loaded, encoder) -> None:
    assert generate(loaded, encoder, [], GenConfig()) == []


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task_name", ["graph_coloring", "sudoku"])
def test_cheating_model_scores_one_everywhere(task_name, encoder) -> None:
    task = build_task(task_name, {"test": 10, "train": 20}, seed=1)
    gen = CheatingGenerator(task)
    m = evaluate(None, encoder, task, "test", cfg=EvalConfig(), generate_fn=gen).metrics
    assert (m["end_to_end"], m["perception"], m["reasoning"]) == (1.0, 1.0, 1.0)
    assert m["perception_partial"] == m["format_ok"] == m["reasoning_given_perceived"] == 1.0
    assert m["n"] == 10 and m["score_errors"] == 0 and m["truncated_frac"] == 0.0
    assert m["slot_errors"] and not any(m["slot_errors"])
    assert set(m) == set(METRIC_KEYS)
    # Both passes were generated; the counterfactual prompts carry the oracle prefix, and the reference
    # response it starts (whose training tokens the prompt is made of).
    assert len(gen.seen) == 20
    assert gen.seen[10].prefix == task.counterfactual_prefix(task.sample("test", 0))
    assert gen.seen[10].response == task.sample("test", 0).response and gen.seen[0].response is None


def test_caps_follow_reference_length(task, encoder) -> None:
    gen = CheatingGenerator(task)
    evaluate(None, encoder, task, n=3, cfg=EvalConfig(), generate_fn=gen)
    # The tiny tokenizer is word-level: reference tokens are the response's words + <eos>.
    for p in gen.seen[:3]:
        s = gen.by_image[image_key(p.image)]
        assert p.max_new_tokens == math.ceil(1.3 * (len(s.response.split()) + 1)) + 20
    for p in gen.seen[3:]:
        s = gen.by_image[image_key(p.image)]
        assert p.max_new_tokens == math.ceil(1.3 * (len(s.response.split()) + 1 - len(p.prefix.split()))) + 20
    gen = CheatingGenerator(task)
    evaluate(None, encoder, task, n=2, cfg=EvalConfig(max_cap=7), generate_fn=gen)
    assert all(p.max_new_tokens == 7 for p in gen.seen)  # max_cap bounds the per-item caps
    gen = CheatingGenerator(task)
    evaluate(None, encoder, task, n=2, cfg=EvalConfig(cap_factor=None), generate_fn=gen)
    assert all(p.max_new_tokens == GenConfig().max_new_tokens for p in gen.seen)


GARBAGE = ["", " ", "<answer>", "</perception> </perception> <answer> c1", "<perception> 9 9 9 : 0-1 0-1",
           "\x00\ufffd <reasoning>", "<answer> </answer> " * 50, "<perception> 5 : </perception> <answer> x </answer>",
           "<perception> 4 : 0-1 </perception> <reasoning> </reasoning> <answer> c1 c2 c1 c1 </answer>"]  # fmt: skip


@pytest.mark.parametrize("task_name", ["graph_coloring", "sudoku"])
def test_garbage_and_empty_outputs_are_scored_without_error(task_name, encoder, tmp_path: Path) -> None:
    task = build_task(task_name, {"test": len(GARBAGE), "train": 20}, seed=2)
    res = evaluate(None, encoder, task, cfg=EvalConfig(), generate_fn=ScriptedGenerator(GARBAGE))
    assert res.metrics["end_to_end"] == 0.0 and res.metrics["score_errors"] == 0
    assert res.metrics["truncated_frac"] == 1.0 and res.metrics["n"] == len(GARBAGE)
    assert res.records[0]["generated"] == "" and res.records[0]["generated_perception"] is None
    write_jsonl_atomic(tmp_path / "eval.jsonl", res.records)
    assert summarize_records(read_jsonl(tmp_path / "eval.jsonl")) == res.metrics


def test_scorer_that_raises_is_recorded_not_propagated(task, encoder) -> None:
    class Broken:
        name = "broken"

        def __getattr__(self, attr: str) -> Any:
            return getattr(task, attr)

        def score(self, instance: dict[str, Any], output: str) -> Scores:
            raise ValueError("boom")

    res = evaluate(None, encoder, Broken(), n=2, generate_fn=ScriptedGenerator(["x"]))
    assert res.metrics["score_errors"] == 2 and res.metrics["end_to_end"] == 0.0
    assert res.records[0]["score_error"] == "ValueError: boom"


def test_records_roundtrip_and_summarize_equals_metrics(task, loaded, encoder, tmp_path: Path) -> None:
    res = evaluate(loaded, encoder, task, n=6, cfg=EvalConfig(gen=GenConfig(batch_size=4, max_new_tokens=40)))
    path = write_jsonl_atomic(tmp_path / "run" / "eval.jsonl", res.records)
    back = read_jsonl(path)
    assert back == res.records
    assert summarize_records(back) == res.metrics
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    for key in ("id", "split", "index", "perception_ref", "ground_truth", "instance", "generated",
                "counterfactual_generated", "outcome", "perception_exact", "perception_partial", "format_ok",
                "reasoning_perceived", "cf_outcome", "cf_format_ok", "n_tokens", "cf_n_tokens", "truncated",
                "cf_truncated", "max_new_tokens", "cf_max_new_tokens", "slot_errors"):  # fmt: skip
        assert key in back[0], key
    sample = task.sample("test", 0)
    assert back[0]["id"] == sample.id and back[0]["perception_ref"] == sample.perception
    assert back[0]["counterfactual_generated"].startswith(task.counterfactual_prefix(sample))
    assert all(r["n_tokens"] <= r["max_new_tokens"] and r["cf_n_tokens"] <= r["cf_max_new_tokens"] for r in back)
    assert res.config["gen"]["precision"] == "fp32" and res.config["cap_factor"] == 1.3
    json.dumps(res.config)


def test_greedy_evaluation_is_deterministic(task, loaded, encoder) -> None:
    cfg = EvalConfig(gen=GenConfig(batch_size=3, max_new_tokens=30))
    a = evaluate(loaded, encoder, task, n=5, cfg=cfg)
    b = evaluate(loaded, encoder, task, n=5, cfg=cfg)
    assert a.records == b.records and a.metrics == b.metrics


def test_end_to_end_only_and_n_limit(task, encoder) -> None:
    gen = CheatingGenerator(task)
    res = evaluate(None, encoder, task, n=4, cfg=EvalConfig(counterfactual=False), generate_fn=gen)
    assert res.metrics["n"] == 4 and res.metrics["reasoning"] is None and res.metrics["end_to_end"] == 1.0
    assert "cf_outcome" not in res.records[0] and len(gen.seen) == 4
    assert evaluate(None, encoder, task, n=0, generate_fn=gen).metrics["n"] == 0


def test_atomic_write_replaces_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    write_jsonl_atomic(path, [{"a": 2}, {"b": (1, 2)}])
    assert read_jsonl(path) == [{"a": 2}, {"b": [1, 2]}]

    def interrupted() -> Iterator[dict[str, int]]:
        yield {"a": 3}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, interrupted())
    assert read_jsonl(path) == [{"a": 2}, {"b": [1, 2]}]
    assert [p.name for p in tmp_path.iterdir()] == ["eval.jsonl"]


def test_small_helpers() -> None:
    assert sum_slot_errors([[1, 0], [0, 1, 1], []]) == [1, 1, 1]
    assert extract_section("<perception> 1 2 </perception> <answer> 3", "answer") == "3"
    assert extract_section("nothing", "perception") is None
    assert join_prefix("<perception> 1 </perception> <reasoning>", " 1 + 1") == "<perception> 1 </perception> <reasoning> 1 + 1"
    assert join_prefix("<p>", "") == "<p>"
    empty = summarize_records([])
    assert empty["n"] == 0 and empty["reasoning"] is None
    json.dumps(empty)


QWEN_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe_encoder(task: Any, across_spaces: bool = False) -> Encoder:
    """An encoder over a real byte-level BPE tokenizer trained on the task's text, behind a LLaVA
    processor with a Qwen-like chat template (an end-of-turn token). ``across_spaces``: no regex
    split before the merges, so a token may span spaces (as in a SentencePiece model trained without
    splitting at whitespace): `4Ġ</perception>Ġ<reasoning>ĠtryĠ2Ġ:Ġ` is then one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    texts = [t for i in range(30) for t in (task.sample("train", i).query, task.sample("train", i).response)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not across_spaces), decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )
    image = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=QWEN_LIKE_TEMPLATE)  # fmt: skip
    return Encoder(LoadedModel(model=None, processor=processor, kind="hf", path=None), ROLE_RULES)


@pytest.mark.parametrize("task_name", ["graph_coloring", "sudoku"])
def test_counterfactual_prompt_is_the_training_tokens_with_a_bpe_tokenizer(task_name) -> None:
    """a_r continues from p* as the model saw it in training: with a byte-level BPE tokenizer (merges
    within words, a chat template with an end-of-turn token) the counterfactual prompt's ids are the
    training sequence's ids up to the end of the prefix, the end-to-end prompt's up to the response,
    and the prefix + the decoded rest of the target is the target again."""
    task = build_task(task_name, {"test": 6, "train": 30, "reasoning": "trace"}, seed=4)
    enc = _bpe_encoder(task)
    tok = enc.tokenizer
    assert enc.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for i in range(6):
        s = task.sample("test", i)
        train = enc.encode_train(s.query, s.image, s.response)["input_ids"].tolist()
        prefix = task.counterfactual_prefix(s)
        cf = enc.encode_prompt(s.query, s.image, prefix, response=s.response)["input_ids"].tolist()
        e2e = enc.encode_prompt(s.query, s.image)["input_ids"].tolist()
        assert train[: len(cf)] == cf and train[: len(e2e)] == e2e
        # where p* ends at a token boundary of the training sequence, the prefix alone is tokenized the same
        assert enc.encode_prompt(s.query, s.image, prefix)["input_ids"].tolist() == cf
        assert any(len(tok.convert_ids_to_tokens(t)) > 1 for t in train[len(e2e) :])  # the BPE merged something
        rest = train[len(cf) : train.index(enc.eos_token_id, len(cf)) + 1]  # the target: to its end-of-turn token
        assert join_prefix(prefix, enc.decode(rest)) == s.response
        assert task.score(s.instance, join_prefix(prefix, enc.decode(rest))).outcome


def test_counterfactual_prompt_is_the_training_tokens_with_the_tiny_tokenizer(task, encoder) -> None:
    """The tiny model's word-level tokenizer splits at spaces only: the counterfactual prompt, with or
    without the response it starts, is the training sequence's tokens up to the end of p*."""
    for i in range(6):
        s = task.sample("test", i)
        train = encoder.encode_train(s.query, s.image, s.response)
        prefix = task.counterfactual_prefix(s)
        cf = encoder.encode_prompt(s.query, s.image, prefix, response=s.response)
        n = len(cf["input_ids"])
        assert torch.equal(cf["input_ids"], train["input_ids"][:n]) and torch.equal(cf["pixel_values"], train["pixel_values"])
        assert torch.equal(cf["attention_mask"], train["attention_mask"][:n])
        assert torch.equal(encoder.encode_prompt(s.query, s.image, prefix)["input_ids"], cf["input_ids"])
        assert n == len(encoder.encode_prompt(s.query, s.image)["input_ids"]) + len(prefix.split())


@pytest.mark.parametrize("task_name", ["graph_coloring", "sudoku"])
def test_a_counterfactual_prefix_inside_a_training_token_is_refused(task_name) -> None:
    """With a tokenizer whose merges cross spaces, p*'s end can fall inside a training token
    (`4Ġ</perception>Ġ<reasoning>ĠtryĠ2Ġ:Ġ`): no token sequence the model was trained on ends there,
    and the prefix tokenized alone (`... <reasoning`, `>`) is one it never saw. Evaluation continued
    from it silently, so a_r measured something else; the prompt is refused, naming the token, and a run
    is refused before it trains (`_preflight_counterfactual`)."""
    from percepdsl_runtime.encoding import EncodingError
    from percepdsl_runtime.run import RunRefused, _preflight_counterfactual

    task = build_task(task_name, {"test": 6, "train": 30, "reasoning": "trace"}, seed=4)
    enc = _bpe_encoder(task, across_spaces=True)
    for i in range(6):
        s = task.sample("test", i)
        train = enc.encode_train(s.query, s.image, s.response)["input_ids"].tolist()
        alone = enc.encode_prompt(s.query, s.image, task.counterfactual_prefix(s))["input_ids"].tolist()
        assert train[: len(alone)] != alone  # the defect: not what the model saw in training
        with pytest.raises(EncodingError, match="the counterfactual prefix ends inside the training token '.*<reasoning> "):
            enc.encode_prompt(s.query, s.image, task.counterfactual_prefix(s), response=s.response)
    with pytest.raises(EncodingError, match="ends inside the training token"):  # what evaluation asks for
        evaluate(enc.loaded, enc, task, n=2, cfg=EvalConfig())
    with pytest.raises(RunRefused, match="a_r would continue p\\* from tokens the model was never trained on"):
        _preflight_counterfactual(task, enc, "hf")
    _preflight_counterfactual(task, _bpe_encoder(task), "hf")  # a tokenizer that splits at spaces passes
