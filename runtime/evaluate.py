"""The study's three-way evaluation (end-to-end, perception, counterfactual reasoning) and its
per-sample records.

For every test item two generations are scored with the task's own verifier:

* **end-to-end** — prompt = image + query; the model writes perception, reasoning
  and answer. ``task.score`` on that text gives ``a`` (outcome), ``a_p``
  (perception exact), partial perception credit, format validity, per-slot
  perception errors and ``reasoning`` (is the answer right *for what the model
  perceived*).
* **counterfactual** — the oracle perception ``p*`` is forced as the start of the
  answer (``task.counterfactual_prefix(sample)``) and the model continues;
  ``task.score(prefix + continuation)`` gives ``a_r`` as its outcome.

Every item yields one flat JSON record (``eval.jsonl``) holding the instance id,
the generated texts and every verdict; the metrics are a pure function of those
records (:func:`summarize_records`), so any figure in a report can be recomputed
from, and traced back to, the records.

Token caps: each generation is capped at ``ceil(1.3 * reference tokens) + 20``
(``cap_factor``, ``cap_margin``; see ``generation.reference_cap``), measured against the task's reference
response. Untrained models otherwise run to the global cap and dominate evaluation time.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from percepdsl.catalogue import default
from percepdsl.io import json_default
from percepdsl.ir import EvalIR

from .generation import Completion, GenConfig, GenerateFn, Prompt, generate, reference_cap

# Metric keys, in the order reports print them.
METRIC_KEYS: tuple[str, ...] = (
    "end_to_end",
    "perception",
    "perception_partial",
    "reasoning",
    "format_ok",
    "reasoning_given_perceived",
    "mean_new_tokens",
    "truncated_frac",
    "cf_mean_new_tokens",
    "cf_truncated_frac",
    "slot_errors",
    "score_errors",
    "n",
)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    ``cap_factor``/``cap_margin`` set the per-item cap on new tokens from the
    reference length, ``⌈cap_factor × reference tokens⌉ + cap_margin``, bounded by
    ``max_cap`` when given (``None`` factor: every item gets ``gen.max_new_tokens``).
    ``counterfactual=False`` skips the a_r pass (halves the cost when only a and
    a_p are wanted); ``reasoning`` is then ``None`` in the metrics. Defaults are the
    catalogue's (``eval`` block); a run builds this from its IR (``from_ir``).
    """

    gen: GenConfig = field(default_factory=GenConfig)
    counterfactual: bool = True
    cap_factor: float | None = default("block", "eval", "cap_factor")
    cap_margin: int = default("block", "eval", "cap_margin")
    max_cap: int | None = None

    @classmethod
    def from_ir(cls, ev: EvalIR) -> EvalConfig:
        """The evaluation an ``eval`` block asks for: one cap for every item when it sets
        ``max_new_tokens``, else per-item caps; a_r only when ``reasoning`` is a metric."""
        gen = GenConfig(temperature=ev.temperature, top_p=ev.top_p, batch_size=ev.batch, precision=ev.precision)
        if ev.max_new_tokens is not None:
            gen = replace(gen, max_new_tokens=ev.max_new_tokens)
        return cls(
            gen=gen,
            counterfactual="reasoning" in ev.metrics,
            cap_factor=None if ev.max_new_tokens is not None else ev.cap_factor,
            cap_margin=ev.cap_margin,
        )

    def seeded(self, seed: int) -> EvalConfig:
        """This evaluation with its sampling drawn from ``seed`` (greedy decoding ignores it)."""
        return replace(self, gen=replace(self.gen, seed=seed))


def eval_seed(run_seed: int, step: int) -> int:
    """The sampling seed of a run's evaluation at ``step`` (``eval { temperature > 0 }``): a function
    of the run's seed and the step only, so a resumed stage, a `--jobs` worker and a one-at-a-time run
    draw the same samples, and the stages of one run evaluated at the same step draw with common random
    numbers (their paired differences carry less sampling noise). Without it, sampled evaluation drew
    from torch's global stream, which depends on what the process ran before."""
    return run_seed * 1_000_003 + step


@dataclass
class EvalResult:
    """Metrics (a pure function of ``records``), the records, wall time, and the
    evaluation settings as plain data (precision, caps, ... for ``summary.json``:
    greedy outputs depend on them)."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def evaluate(
    loaded: Any,
    encoder: Any,
    task: Any,
    split: str = "test",
    n: int | None = None,
    cfg: EvalConfig | GenConfig | None = None,
    generate_fn: GenerateFn | None = None,
) -> EvalResult:
    """Run the end-to-end and counterfactual passes over the first ``n`` items of ``split``.

    ``generate_fn(prompts, gen_cfg) -> completions`` defaults to batched KV-cache
    generation with ``loaded``/``encoder``; tests (and alternative back ends)
    inject their own. A bare ``GenConfig`` is accepted as ``cfg`` for convenience.
    """
    cfg = _as_eval_config(cfg)
    start = time.perf_counter()
    gen = generate_fn or _default_generate(loaded, encoder)
    samples = [task.sample(split, i) for i in range(_n_items(task, split, n))]
    prefixes = [task.counterfactual_prefix(s) for s in samples] if cfg.counterfactual else []
    caps_e2e, caps_cf = _caps(encoder, samples, prefixes, cfg)

    prompts = [Prompt(s.query, s.image, "", c) for s, c in zip(samples, caps_e2e)]
    # the forced prefix as the model was trained on it: the reference's own tokens up to p*'s end
    prompts += [Prompt(s.query, s.image, p, c, response=s.response) for s, p, c in zip(samples, prefixes, caps_cf)]
    # One generate call for both passes: the length sort then packs end-to-end and
    # counterfactual prompts of similar total length together (fewer, fuller batches).
    completions = _generate_all(gen, prompts, cfg.gen)
    e2e, cf = completions[: len(samples)], completions[len(samples) :]

    records = [
        build_record(
            task,
            sample,
            e2e[i],
            caps_e2e[i],
            cf_completion=cf[i] if cf else None,
            cf_prefix=prefixes[i] if cf else None,
            cf_cap=caps_cf[i] if cf else None,
        )
        for i, sample in enumerate(samples)
    ]
    settings = {"split": split, **asdict(cfg)}
    return EvalResult(summarize_records(records), records, time.perf_counter() - start, settings)


def _as_eval_config(cfg: EvalConfig | GenConfig | None) -> EvalConfig:
    if cfg is None:
        return EvalConfig()
    if isinstance(cfg, GenConfig):
        return EvalConfig(gen=cfg)
    return cfg


def _default_generate(loaded: Any, encoder: Any) -> GenerateFn:
    def gen(prompts: Sequence[Prompt], gen_cfg: GenConfig) -> list[Completion]:
        return generate(loaded, encoder, prompts, gen_cfg)

    return gen


def _n_items(task: Any, split: str, n: int | None) -> int:
    size = int(task.size(split))
    return size if n is None else max(0, min(int(n), size))


def _generate_all(gen: GenerateFn, prompts: list[Prompt], gen_cfg: GenConfig) -> list[Completion]:
    """Generate one completion per prompt (evaluation never samples groups)."""
    if gen_cfg.num_return_sequences != 1:
        gen_cfg = replace(gen_cfg, num_return_sequences=1)
    out = list(gen(prompts, gen_cfg))
    if len(out) != len(prompts):
        raise RuntimeError(f"generator returned {len(out)} completions for {len(prompts)} prompts")
    return out


# ---------------------------------------------------------------------------
# Token caps from reference lengths
# ---------------------------------------------------------------------------


def _caps(encoder: Any, samples: Sequence[Any], prefixes: Sequence[str], cfg: EvalConfig) -> tuple[list[int], list[int]]:
    """Per-item caps for the end-to-end and counterfactual passes.

    The counterfactual reference is the full target minus the forced prefix.
    """
    if cfg.cap_factor is None:
        full = [cfg.gen.max_new_tokens] * len(samples)
        return full, list(full) if prefixes else []
    e2e: list[int] = []
    cf: list[int] = []
    for i, s in enumerate(samples):
        n_full = count_target_tokens(encoder, s.response)
        e2e.append(_bounded_cap(n_full, cfg))
        if prefixes:
            cf.append(_bounded_cap(n_full - count_text_tokens(encoder, prefixes[i]), cfg))
    return e2e, cf


def count_target_tokens(encoder: Any, response: str) -> int:
    """Tokens a model writes for ``response``, end-of-turn marker included
    (``encoder.target_text``) when the encoder knows its template."""
    target = encoder.target_text(response) if hasattr(encoder, "target_text") else response
    return count_text_tokens(encoder, target)


def count_text_tokens(encoder: Any, text: str) -> int:
    """Tokens of ``text`` by the encoder's tokenizer (text only, ~0.05 ms: no image
    processing); whitespace words for an encoder without a tokenizer."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bounded_cap(n_reference: int, cfg: EvalConfig) -> int:
    assert cfg.cap_factor is not None
    cap = reference_cap(n_reference, cfg.cap_factor, cfg.cap_margin)
    return cap if cfg.max_cap is None else min(cfg.max_cap, cap)


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

_SECTION = {name: re.compile(rf"<{name}>(.*?)(?:</{name}>|$)", re.S) for name in ("perception", "answer")}


def extract_section(text: str, name: str) -> str | None:
    """Text between ``<name>`` and ``</name>`` (or the end), stripped; ``None`` if absent.

    For human reading only; every verdict comes from ``task.score``.
    """
    pattern = _SECTION.get(name) or re.compile(rf"<{name}>(.*?)(?:</{name}>|$)", re.S)
    m = pattern.search(text or "")
    return m.group(1).strip() if m else None


def join_prefix(prefix: str, continuation: str) -> str:
    """Full counterfactual text: the forced prefix followed by the model's continuation.

    Decoders differ on leading spaces; one space between the two halves is what the
    task format (space-separated tags) expects, and scorers ignore extra whitespace.
    """
    if not continuation:
        return prefix
    return prefix.rstrip() + " " + continuation.lstrip()


def build_record(
    task: Any,
    sample: Any,
    completion: Completion,
    cap: int,
    cf_completion: Completion | None = None,
    cf_prefix: str | None = None,
    cf_cap: int | None = None,
) -> dict[str, Any]:
    """One flat, JSON-serialisable record for ``eval.jsonl``.

    Names the instance (``id``, ``split``, ``index``, ``instance``), the references,
    the generated texts and every verdict of both passes.
    """
    text = completion.text or ""
    scores, err = safe_score(task, sample.instance, text)
    rec: dict[str, Any] = {
        "id": sample.id,
        "split": sample.split,
        "index": int(sample.index),
        "query": sample.query,
        "perception_ref": sample.perception,
        "ground_truth": sample.ground_truth,
        "instance": _jsonable(sample.instance),
        "generated": text,
        "generated_perception": extract_section(text, "perception"),
        "generated_answer": extract_section(text, "answer"),
        "format_ok": scores["format_ok"],
        "outcome": scores["outcome"],
        "perception_exact": scores["perception_exact"],
        "perception_partial": scores["perception_partial"],
        "reasoning_perceived": scores["reasoning"],
        "slot_errors": scores["slot_errors"],
        "n_tokens": int(completion.n_tokens),
        "truncated": bool(completion.truncated),
        "max_new_tokens": int(cap),
        "score_error": err,
    }
    if cf_completion is not None:
        cf_text = join_prefix(cf_prefix or "", cf_completion.text or "")
        cf_scores, cf_err = safe_score(task, sample.instance, cf_text)
        rec.update(
            {
                "counterfactual_generated": cf_text,
                "cf_generated_answer": extract_section(cf_text, "answer"),
                "cf_outcome": cf_scores["outcome"],
                "cf_format_ok": cf_scores["format_ok"],
                "cf_n_tokens": int(cf_completion.n_tokens),
                "cf_truncated": bool(cf_completion.truncated),
                "cf_max_new_tokens": int(cf_cap if cf_cap is not None else 0),
                "cf_score_error": cf_err,
            }
        )
    return rec


_ZERO_SCORES: dict[str, Any] = {
    "format_ok": False,
    "outcome": False,
    "perception_exact": False,
    "perception_partial": 0.0,
    "reasoning": False,
    "slot_errors": [],
}


def safe_score(task: Any, instance: Any, text: str) -> tuple[dict[str, Any], str | None]:
    """``task.score`` as a dict, plus an error string if the scorer broke its no-raise promise.

    A scorer bug must not throw away a finished evaluation: the item is scored as
    all-wrong, and the error is kept in the record and counted in ``score_errors``.
    """
    try:
        s = task.score(instance, text)
        return {
            "format_ok": bool(s.format_ok),
            "outcome": bool(s.outcome),
            "perception_exact": bool(s.perception_exact),
            "perception_partial": float(s.perception_partial),
            "reasoning": bool(s.reasoning),
            "slot_errors": [int(x) for x in (s.slot_errors or [])],
        }, None
    except Exception as exc:  # noqa: BLE001 - deliberately broad, see docstring
        return dict(_ZERO_SCORES), f"{type(exc).__name__}: {exc}"


def _jsonable(obj: Any) -> Any:
    """Round-trip ``obj`` through JSON (tuples become lists, odd scalars strings)."""
    return json.loads(json.dumps(obj, default=json_default))


# ---------------------------------------------------------------------------
# Metrics from records
# ---------------------------------------------------------------------------


def summarize_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics as a pure function of eval records (e.g. re-read from ``eval.jsonl``).

    Accuracies are means of per-item booleans; ``reasoning`` is ``None`` when no
    record has a counterfactual verdict; ``slot_errors`` sums per-slot error counts
    element-wise (shorter lists are zero-padded). An empty record list gives zero
    rates with ``n = 0``.
    """
    cf = [r for r in records if "cf_outcome" in r]
    return {
        "end_to_end": _mean(r["outcome"] for r in records),
        "perception": _mean(r["perception_exact"] for r in records),
        "perception_partial": _mean(r["perception_partial"] for r in records),
        "reasoning": _mean(r["cf_outcome"] for r in cf) if cf else None,
        "format_ok": _mean(r["format_ok"] for r in records),
        "reasoning_given_perceived": _mean(r["reasoning_perceived"] for r in records),
        "mean_new_tokens": _mean(r["n_tokens"] for r in records),
        "truncated_frac": _mean(r["truncated"] for r in records),
        "cf_mean_new_tokens": _mean(r["cf_n_tokens"] for r in cf) if cf else None,
        "cf_truncated_frac": _mean(r["cf_truncated"] for r in cf) if cf else None,
        "slot_errors": sum_slot_errors(r.get("slot_errors", []) for r in records),
        "score_errors": sum(1 for r in records if r.get("score_error") or r.get("cf_score_error")),
        "n": len(records),
    }


def _mean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values]
    return math.fsum(vals) / len(vals) if vals else 0.0


def sum_slot_errors(per_item: Iterable[Sequence[int]]) -> list[int]:
    """Element-wise sum of per-slot error lists of possibly different lengths."""
    total: list[int] = []
    for errs in per_item:
        if len(errs) > len(total):
            total.extend([0] * (len(errs) - len(total)))
        for j, e in enumerate(errs):
            total[j] += int(e)
    return total


__all__ = [
    "METRIC_KEYS",
    "EvalConfig",
    "EvalResult",
    "build_record",
    "count_target_tokens",
    "count_text_tokens",
    "evaluate",
    "extract_section",
    "join_prefix",
    "safe_score",
    "sum_slot_errors",
    "summarize_records",
]
