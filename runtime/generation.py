"""Batched generation for evaluation (GRPO samples its rollouts with ``sampling.py``).

Generation is the dominant cost of evaluating small models, so this module does the few
things that matter:

* LLaVA models with a plain Llama text decoder decode through GRPO's sampler path
  (``sampling.decode_llava``: one Hugging Face prefill, then ``FusedLlamaDecoder``'s
  single-token steps over a preallocated KV cache); in fp32 it writes exactly the tokens
  of ``model.generate`` (tested), 1.7x (short outputs) to 2.1x (the reproduction
  regime's long ones) faster than batched ``generate`` (docs/performance.md, Evaluation).
  Other models (and ``decoder="generate"``) go through Hugging Face ``model.generate``
  with the KV cache, so each new token costs one forward over one position instead of
  the whole sequence;
* prompts are sorted by *prompt length + token cap* and cut into batches of
  ``batch_size`` rows, so that rows sharing a batch need similar amounts of left
  padding and finish at about the same step (a batch runs until its slowest row);
* every prompt carries its own cap on new tokens (evaluation sets it to about
  1.3x the reference length + 20): a per-row stopping criterion retires a row at
  its cap, and the batch stops when every row has hit EOS or its cap;
* precision, KV-cache kind and attention kernel are parameters; the defaults come
  from measurement (``benchmarks/bench_eval.py``, docs/performance.md, Evaluation).
  Precision: ``bf16`` runs the prefill under bf16 autocast and, on the fused path,
  the decoding steps on bf16 weight copies (attention in fp32, as GRPO's sampler);
  through ``generate`` it is bf16 autocast throughout. fp32 stays the default: it
  does not depend on native bf16 support (AMX/AVX512-BF16), and greedy outputs of
  the two precisions differ wherever logits nearly tie (compare runs at one precision).
  Cache (``generate`` only): dynamic — with the tiny model's eager attention a static
  cache attends over its whole preallocated length every step and measured 7-13% slower.

Results come back in input order whatever the internal sorting was.

The encoder contract (``percepdsl_runtime.encoding``): ``encoder.encode_prompt(query,
image, prefix, response)`` returns a dict with a 1-D ``input_ids`` and model extras such as
``pixel_values``; ``collate(items, pad_token_id)`` left-pads a list of them into a
batch; ``encoder.decode(ids)`` turns new token ids back into text. An encoder object
may carry its own ``collate`` method, which then takes precedence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from percepdsl.catalogue import default

Precision = Literal["fp32", "bf16"]
CacheKind = Literal["dynamic", "static"]
Decoder = Literal["fused", "generate"]


# ---------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One generation request.

    ``prefix`` is text forced at the start of the answer (the oracle perception for
    counterfactual evaluation); generation continues after it. ``max_new_tokens``
    caps this prompt's continuation; ``None`` means ``GenConfig.max_new_tokens``.
    ``response`` is the training response that ``prefix`` is the start of: the forced
    tokens are then that training sequence's own (``Encoder.encode_prompt``).
    """

    query: str
    image: Any  # PIL.Image.Image; kept loose so that text-only stand-ins work too
    prefix: str = ""
    max_new_tokens: int | None = None
    response: str | None = None


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``token_ids`` are the new tokens up to and including EOS (if one was produced);
    ``n_tokens == len(token_ids)``. ``truncated`` is True when the row hit its cap
    without producing EOS. With ``num_return_sequences = k`` the completions of
    prompt ``i`` are ``sample_index = 0..k-1`` at flat positions ``i*k .. i*k+k-1``.
    """

    text: str
    n_tokens: int
    truncated: bool
    token_ids: tuple[int, ...] = ()
    prompt_index: int = 0
    sample_index: int = 0


@dataclass(frozen=True)
class GenConfig:
    """Decoding settings.

    ``temperature == 0`` means greedy decoding (the evaluation default); any positive
    temperature samples, with nucleus filtering at ``top_p``. ``batch_size`` counts
    *generated rows* per ``generate`` call, i.e. prompts x ``num_return_sequences``:
    50 and 100 measured equally fast for an evaluation of the tiny model, 25 and
    200 slower (small batches underuse the matmuls; one huge batch waits for its
    longest row and drags the longest cache). ``max_new_tokens`` caps prompts that
    carry no cap of their own (every evaluation prompt carries one).

    The fields a spec's ``eval`` block sets (``temperature``, ``top_p``, ``batch_size``,
    ``precision``) default to the catalogue's values; the rest are deliberately internal
    (library knobs measured in benchmarks/bench_eval.py).

    ``cache="static"`` preallocates the KV cache (prompt + cap) and writes in place
    instead of concatenating every step: faster with SDPA attention (measured on a
    stand-in), slower with the tiny model's eager attention, which then attends over
    the whole preallocated length. ``attention`` switches the model's attention
    implementation for the call (``"sdpa"``, ``"eager"``; ``None`` keeps the loaded
    one) and restores it; both apply to ``generate`` only. ``decoder="fused"`` decodes
    through ``sampling.decode_llava`` where ``sampling.fused_parts`` accepts the model (a
    LLaVA with a plain Llama decoder, no forward hooks) and the encoder has a single EOS id,
    else through ``generate``; ``"generate"`` always uses ``generate`` (the benchmark's
    baseline). ``seed`` (sampling only) makes sampling reproducible without touching the
    caller's global RNG stream; the two decoders draw differently from the same distribution.
    """

    max_new_tokens: int = 512
    temperature: float = default("block", "eval", "temperature")
    top_p: float = default("block", "eval", "top_p")
    num_return_sequences: int = 1
    batch_size: int = default("block", "eval", "batch")
    precision: Precision = default("block", "eval", "precision")
    cache: CacheKind = "dynamic"
    attention: str | None = None
    sort_by_length: bool = True
    seed: int | None = None
    decoder: Decoder = "fused"

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class GenerateFn(Protocol):
    """What ``evaluate`` needs from a generator: prompts in, completions out, in order."""

    def __call__(self, prompts: Sequence[Prompt], cfg: GenConfig) -> list[Completion]: ...


# ---------------------------------------------------------------------------
# Per-row caps
# ---------------------------------------------------------------------------


class PerRowCap:
    """Stopping criterion that retires row ``r`` once it has ``caps[r]`` new tokens.

    ``generate`` ORs this with its EOS check: a retired row keeps receiving pad
    tokens (cheap, it is in the batch anyway) and the batch stops once all rows are
    retired or finished. Usable as a ``transformers`` ``StoppingCriteria``.
    """

    def __init__(self, caps: torch.Tensor, prompt_length: int) -> None:
        self.caps = caps
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_length
        return (self.caps.to(input_ids.device) <= n_new).bool()


# ---------------------------------------------------------------------------
# Batching helpers (pure, tested on their own)
# ---------------------------------------------------------------------------


def plan_batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Group item indices into batches of at most ``batch_size``.

    With ``sort`` the items are ordered by ``lengths`` descending (longest first, so
    a batch that does not fit in memory fails at the start, not after minutes) with
    the index as a tie-breaker so the plan is deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if sort:
        order.sort(key=lambda i: (-lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def split_completion(ids: Sequence[int], eos_token_id: int | Sequence[int] | None, cap: int) -> tuple[list[int], bool]:
    """Cut a generated row at its first EOS (kept) or at ``cap`` tokens.

    Returns ``(token_ids, truncated)``; ``truncated`` is True when no EOS appeared
    within the cap. Anything after EOS is padding written by ``generate``.
    """
    eos = _as_id_set(eos_token_id)
    out: list[int] = []
    for tok in ids[:cap]:
        out.append(int(tok))
        if tok in eos:
            return out, False
    return out, True


def _as_id_set(ids: int | Sequence[int] | None) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    return {int(i) for i in ids}


def precision_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``precision`` (``fp32`` is a no-op)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'bf16'")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore its previous mode afterwards.

    Evaluation runs in the middle of training; leaving the model in eval mode
    would silently switch dropout off for the rest of the run.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def attention_impl(model: Any, name: str | None) -> Iterator[None]:
    """Use attention implementation ``name`` inside the block, then restore the loaded one.

    Training and generation favour different kernels (the tiny model trains with
    eager attention; see ``models.TINY_ATTENTION``), so generation may switch.
    """
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name is None or name == current or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def generate(loaded: Any, encoder: Any, prompts: Sequence[Prompt], cfg: GenConfig | None = None) -> list[Completion]:
    """Generate a continuation for every prompt; results come back in input order.

    ``loaded`` is a ``LoadedModel`` (anything with a ``.model`` that has the Hugging
    Face ``generate``); ``encoder`` encodes prompts and decodes ids. The result has
    ``len(prompts) * cfg.num_return_sequences`` completions, prompt-major.
    """
    cfg = cfg or GenConfig()
    if not prompts:
        return []
    k = cfg.num_return_sequences
    if k < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {k}")
    model = loaded.model
    caps = [_cap(p, cfg) for p in prompts]
    encoded = [encoder.encode_prompt(p.query, p.image, prefix=p.prefix, response=p.response) for p in prompts]
    # Sort key: tokens the row will occupy at its end (prompt + cap). Rows with
    # similar totals pad little and stop at about the same step.
    lengths = [int(e["input_ids"].shape[-1]) + c for e, c in zip(encoded, caps)]
    prompts_per_batch = max(1, cfg.batch_size // k)
    results: list[list[Completion] | None] = [None] * len(prompts)
    fused = _fused_decoder(model, encoder, cfg)
    rng = torch.random.fork_rng(devices=[]) if (not cfg.greedy and cfg.seed is not None) else contextlib.nullcontext()
    with rng, eval_mode(model), attention_impl(model, cfg.attention), torch.inference_mode():
        if not cfg.greedy and cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for batch in plan_batches(lengths, prompts_per_batch, cfg.sort_by_length):
            outs = _generate_batch(model, encoder, [encoded[i] for i in batch], [caps[i] for i in batch], cfg, fused)
            for j, i in enumerate(batch):
                results[i] = [
                    Completion(c.text, c.n_tokens, c.truncated, c.token_ids, prompt_index=i, sample_index=s)
                    for s, c in enumerate(outs[j * k : (j + 1) * k])
                ]
    return [c for group in results if group is not None for c in group]


def _cap(prompt: Prompt, cfg: GenConfig) -> int:
    cap = cfg.max_new_tokens if prompt.max_new_tokens is None else prompt.max_new_tokens
    return max(1, int(cap))  # generate needs at least one step


def _collate(encoder: Any, items: list[Mapping[str, Any]]) -> dict[str, Any]:
    collate_fn: Callable[..., dict[str, Any]] | None = getattr(encoder, "collate", None)
    if collate_fn is None:
        from percepdsl_runtime.encoding import collate as collate_fn  # the real encoder's collate
    return dict(collate_fn(items, encoder.pad_token_id))


def _fused_decoder(model: Any, encoder: Any, cfg: GenConfig) -> tuple[Any, Any] | None:
    """(the LLaVA model, the ``FusedLlamaDecoder`` of its text decoder) that decode this call's
    batches (the weight copies made once per call, in ``cfg.precision``), or None: decode
    through ``generate``."""
    if cfg.decoder == "generate":
        return None
    if cfg.decoder != "fused":
        raise ValueError(f"unknown decoder {cfg.decoder!r}; expected 'fused' or 'generate'")
    from .sampling import FusedLlamaDecoder, fused_parts

    parts = fused_parts(model)
    if parts is None or not isinstance(encoder.eos_token_id, int):
        return None
    return parts[2], FusedLlamaDecoder(parts[0], parts[1], torch.bfloat16 if cfg.precision == "bf16" else torch.float32)


def _generate_batch(
    model: Any, encoder: Any, items: list[Mapping[str, Any]], caps: list[int], cfg: GenConfig, fused: tuple[Any, Any] | None = None
) -> list[Completion]:
    """Decode one left-padded batch (with ``fused``: ``sampling.decode_llava``, else one
    ``generate`` call); rows in batch order."""
    device = _model_device(model)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in _collate(encoder, items).items()}
    input_ids = batch["input_ids"]
    if "attention_mask" not in batch:
        batch["attention_mask"] = (input_ids != encoder.pad_token_id).long()
    prompt_length = int(input_ids.shape[1])
    k = cfg.num_return_sequences
    # generate expands each prompt into k consecutive rows (repeat_interleave).
    row_caps = torch.tensor(caps, dtype=torch.long).repeat_interleave(k)
    if fused is not None:
        from .sampling import decode_llava

        with precision_context(cfg.precision, device):  # the prefill's; the steps run on the decoder's copies
            ids = decode_llava(*fused, batch, k, row_caps, cfg.temperature, cfg.top_p, encoder.eos_token_id, encoder.pad_token_id)
        return _completions(encoder, ids.tolist(), row_caps)
    from transformers import StoppingCriteriaList  # lazy: keeps module import light

    with precision_context(cfg.precision, device):
        out = model.generate(
            **batch,
            max_new_tokens=max(caps),
            num_return_sequences=k,
            eos_token_id=encoder.eos_token_id,
            pad_token_id=encoder.pad_token_id,
            stopping_criteria=StoppingCriteriaList([PerRowCap(row_caps, prompt_length)]),
            use_cache=True,
            **_cache_kwargs(cfg.cache),
            **decoding_kwargs(cfg),
        )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return _completions(encoder, sequences[:, prompt_length:].tolist(), row_caps)


def _completions(encoder: Any, new: list[list[int]], row_caps: torch.Tensor) -> list[Completion]:
    """Completions of generated rows (new token ids), each cut at its EOS or cap."""
    completions = []
    for row, cap in zip(new, row_caps.tolist()):
        ids, truncated = split_completion(row, encoder.eos_token_id, cap)
        completions.append(Completion(_decode(encoder, ids), len(ids), truncated, tuple(ids)))
    return completions


# ``generate`` fills knobs left unset from the checkpoint's ``generation_config`` (a real checkpoint
# may ship e.g. ``repetition_penalty=1.05``, ``num_beams=3`` or ``min_new_tokens``): evaluation and
# GRPO's rollouts (``sampling._hf_generate``) pass these neutral values, so both decode the model's own
# distribution whatever the checkpoint ships.
NEUTRAL_DECODING: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "min_length": 0,
    "min_new_tokens": None,  # None, not 0: with min_length also set, transformers warns on every call
}


def decoding_kwargs(cfg: GenConfig) -> dict[str, Any]:
    """Every decoding knob set explicitly (``NEUTRAL_DECODING``: evaluation must not depend on the
    checkpoint's ``generation_config``). When sampling, ``top_k=0`` disables top-k filtering
    (transformers' default is 50); greedy decoding ignores temperature, top-p and top-k.
    """
    common = dict(NEUTRAL_DECODING)
    if cfg.greedy:
        return {**common, "do_sample": False}
    return {**common, "do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}


def _cache_kwargs(cache: CacheKind) -> dict[str, Any]:
    if cache == "dynamic":
        return {}
    if cache == "static":
        return {"cache_implementation": "static"}
    raise ValueError(f"unknown cache {cache!r}; expected 'dynamic' or 'static'")


def _decode(encoder: Any, ids: list[int]) -> str:
    """Decode new tokens; never raises (garbage ids decode to whatever they decode to)."""
    if not ids:
        return ""
    try:
        return str(encoder.decode(ids))
    except Exception:  # a decoder choking on an odd id must not lose the whole evaluation
        return ""


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def reference_cap(n_reference_tokens: int, factor: float, margin: int) -> int:
    """Cap on new tokens given a reference length: ``ceil(factor * n) + margin``.

    1.3x + 20 leaves room for a model that is a bit more verbose than the reference (or
    off by a few tokens) while bounding the cost of untrained or looping models, which
    otherwise generate until the global cap: with KV-cache decoding and length-sorted
    batches, it took one 200-item evaluation of the tiny model from over 4 min to 40-50 s.
    """
    return int(math.ceil(factor * max(0, n_reference_tokens))) + int(margin)


__all__ = [
    "CacheKind",
    "Completion",
    "Decoder",
    "GenConfig",
    "GenerateFn",
    "PerRowCap",
    "Precision",
    "Prompt",
    "attention_impl",
    "decoding_kwargs",
    "eval_mode",
    "generate",
    "plan_batches",
    "precision_context",
    "reference_cap",
    "split_completion",
]
