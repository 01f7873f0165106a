"""GRPO step time on the embedded tiny VLM: TRL GRPOTrainer vs our Lightning GRPOModule.

Side by side, same tiny LLaVA weights (``build_tiny`` defaults: CLIP h128×2, Llama h256×4,
64 px), same graph-colouring prompts, same reward (our compiled reward, called on TRL's
completions grouped by prompt), 2 prompts × 4 generations, 64 new tokens, temperature 1,
β = 0, one optimiser update per generated batch, bf16 autocast for the training forward:

1. TRL ``GRPOTrainer``, default generation (dynamic KV cache) and with
   ``cache_implementation="static"`` (its fastest CPU setting here);
2. our ``GRPOModule`` + ``PromptDataModule`` under a Lightning Trainer.

The model first gets a short SFT warm start (``--sft-steps``), as GRPO starts from an SFT
checkpoint: random weights emit EOS after a few tokens, which would time almost nothing
but overhead. Our side uses ``mask_truncated = false`` (TRL's default) and both bf16 and
fp32 sampling weights (``sample_precision``) are timed, and bf16 with ``compile = true`` (the
sampler's decoder under torch.compile; its one-time compile is measured separately and
left out of the timed steps, as warm-up is on every side).

A step is timed end to end, between step ends (generation, scoring, reward, forward,
backward, optimiser, framework overhead), in wall time and in process CPU time: with one
torch thread CPU time is the work done and barely moves when other processes load the
machine. Generated tokens are counted up to and including EOS on both sides. Runs
alternate (ours, TRL, TRL static, ours, ...) so that load drifts hit every side alike;
medians over rounds are reported.

    python benchmarks/bench_grpo.py --threads 1      # ≈5 min on 2 cores
    python benchmarks/bench_grpo.py --steps 10 --rounds 3 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>", "markers": True},
    {"role": "reasoning", "kind": "between", "open": "<reasoning>", "close": "</reasoning>", "markers": True},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>", "markers": True},
]
PROMPTS, G, NEW_TOKENS = 2, 4, 64


def reward_ir() -> Any:
    """0.5·outcome + 0.3·perception_partial + 0.2·brevity(max_words = 40) (the example
    plugin: it varies with completion length, so even an untrained model's groups carry signal)."""
    from percepdsl.ir import RewardIR

    def term(name: str, impl: str, **params: Any) -> RewardIR:
        return RewardIR(kind="term", name=name, impl=impl, params=params)

    return RewardIR(
        kind="sum",
        children=[
            RewardIR(kind="scale", value=0.5, children=[term("outcome", "percepdsl_runtime.rewards:outcome")]),
            RewardIR(kind="scale", value=0.3, children=[term("perception_partial", "percepdsl_runtime.rewards:perception_partial")]),
            RewardIR(kind="scale", value=0.2, children=[term("brevity", "percep_example_plugin.rewards:brevity", max_words=40)]),
        ],
    )


def _stats(ends: list[tuple[float, float]], tokens: list[int], warmup: int) -> dict[str, float]:
    """Per-step wall and CPU seconds (median over the timed steps) and generated tokens/s.
    With one torch thread, process CPU time is the work a step did; unlike wall time it
    hardly changes when other processes compete for the cores."""
    wall = [b[0] - a[0] for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
    tok = tokens[warmup : warmup + len(wall)]
    return {
        "step_s": statistics.median(wall),
        "cpu_step_s": statistics.median(cpu),
        "gen_tokens_per_step": statistics.mean(tok),
        "tokens_per_s": sum(tok) / sum(wall),
        "tokens_per_cpu_s": sum(tok) / sum(cpu),
    }


def _gen_stats(gen_s: list[float], tokens: list[int], warmup: int) -> dict[str, float]:
    """Sampling alone: seconds per step and generated tokens per second of sampling."""
    g, tok = gen_s[warmup:], tokens[warmup : warmup + len(gen_s[warmup:])]
    return {"gen_s": statistics.median(g), "gen_tokens_per_s": sum(tok) / sum(g)}


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# ---------------------------------------------------------------------------------- TRL
def bench_trl(model_dir: Path, task: Any, steps: int, warmup: int, cache: str | None) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from percepdsl_runtime.rewards import RolloutGroup, compile_reward

    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(model_dir)
    n = 64
    samples = [task.sample("train", i) for i in range(n)]
    rows = {
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.query}]}] for s in samples],
        "image": [s.image for s in samples],
        "idx": list(range(n)),
    }
    reward = compile_reward(reward_ir())
    eos = processor.tokenizer.eos_token_id
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []

    def reward_fn(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], idx: list[int], **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        tokens.append(sum(len(c[: c.index(eos) + 1]) if eos in c else len(c) for c in completion_ids))
        out: list[float] = []
        for start in range(0, len(texts), G):  # TRL lays the G generations of a prompt side by side
            group = RolloutGroup.score(task, samples[idx[start]], texts[start : start + G])
            out += reward(group).total.tolist()
        return out

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(_now())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-grpo-"),
        per_device_train_batch_size=PROMPTS * G,
        num_generations=G,
        max_completion_length=NEW_TOKENS,
        max_steps=steps + warmup,
        learning_rate=1e-4,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        remove_unused_columns=False,
        seed=0,
        cache_implementation=cache,
        dataloader_num_workers=0,
    )
    gen_s: list[float] = []
    generate = model.generate

    def timed_generate(*a: Any, **k: Any) -> Any:  # TRL samples through model.generate
        t = time.perf_counter()
        out = generate(*a, **k)
        gen_s.append(time.perf_counter() - t)
        return out

    model.generate = timed_generate
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_dict(rows), processing_class=processor)
    trainer.add_callback(Clock())
    trainer.train()
    return _stats(ends, tokens, warmup) | _gen_stats(gen_s, tokens, warmup)


# ---------------------------------------------------------------------------------- ours
def bench_ours(model_dir: Path, task: Any, steps: int, warmup: int, gen_precision: str, compile: bool = False) -> dict[str, float]:
    import lightning as L

    from percepdsl.ir import GRPOStageIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.grpo import build_grpo
    from percepdsl_runtime.models import load_hf

    loaded = load_hf(model_dir)
    enc = Encoder(loaded, RULES)
    stage = GRPOStageIR(
        name="rl",
        steps=steps + warmup,
        lr=1e-4,
        batch=PROMPTS,
        group=G,
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        kl=0.0,
        mask_truncated=False,  # TRL's default
        compile=compile,
        sample_precision=gen_precision,
        reward=reward_ir(),
    )
    module, dm = build_grpo(loaded, enc, task, stage, seed=0, grad_clip=1.0)
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []
    trained: list[float] = []
    gen_s: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            ends.append(_now())
            tokens.append(int(module.timing["gen_tokens"]) - sum(tokens))
            trained.append(float(trainer.callback_metrics["trained_rows"]))
            gen_s.append(float(trainer.callback_metrics["gen_s"]))

    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    trainer.fit(module, datamodule=dm)
    # share of rows in the training forward (rows of constant-reward groups are skipped)
    return _stats(ends, tokens, warmup) | _gen_stats(gen_s, tokens, warmup) | {"trained_rows": statistics.mean(trained[warmup:])}


# ---------------------------------------------------------------------------------- warm start
def sft_warm_start(model_dir: Path, task: Any, steps: int) -> None:
    """A few SFT steps on the task's targets, saved over ``model_dir``: GRPO starts from an
    SFT checkpoint, whose completions follow the format and run to the 64-token cap (the
    trace targets are longer), so both sides generate full-length rows."""
    import lightning as L

    from percepdsl.ir import SFTStageIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sft import SFTDataModule, SFTModule

    loaded = load_hf(model_dir)
    enc = Encoder(loaded, RULES)
    module = SFTModule(loaded, SFTStageIR(name="warm", steps=steps, lr=2e-3), enc.role_names)
    L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, datamodule=SFTDataModule(task, enc, batch_size=8, seed=0, n_items=8 * steps))
    loaded.model.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    ap.add_argument(
        "--sft-steps",
        type=int,
        default=60,
        help="SFT steps before GRPO (0 = random weights, which emit EOS early and make short completions)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT / "examples" / "plugin"))  # the brevity reward term

    from percepdsl_runtime.models import build_tiny
    from percepdsl_runtime.tasks import build_task

    task = build_task("graph_coloring", {}, seed=0)
    model_dir = Path(tempfile.mkdtemp(prefix="bench-grpo-tiny-"))
    loaded = build_tiny(task.vocabulary(), image=task.params.image, save_dir=model_dir)
    print(
        f"tiny VLM: {loaded.num_parameters() / 1e6:.2f}M params; {PROMPTS} prompts x {G} generations, "
        f"{NEW_TOKENS} new tokens; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    if args.sft_steps:
        t0 = time.perf_counter()
        sft_warm_start(model_dir, task, args.sft_steps)
        print(f"SFT warm start: {args.sft_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    # the one-time cost of compile = true: a 2-step run with it minus one without (the compile,
    # or its load from Inductor's on-disk cache when an earlier process compiled the same graph)
    t0 = time.perf_counter()
    bench_ours(model_dir, task, 1, 1, "bf16", compile=True)
    t1 = time.perf_counter()
    bench_ours(model_dir, task, 1, 1, "bf16")
    compile_s = max((t1 - t0) - (time.perf_counter() - t1), 0.0)
    sides = {
        "ours": lambda: bench_ours(model_dir, task, args.steps, args.warmup, "bf16"),
        "ours_fp32": lambda: bench_ours(model_dir, task, args.steps, args.warmup, "fp32"),
        # compile = true: the warm-up steps include the one-time compile (timed below, not in the steps)
        "ours_compiled": lambda: bench_ours(model_dir, task, args.steps, args.warmup, "bf16", compile=True),
        "trl": lambda: bench_trl(model_dir, task, args.steps, args.warmup, None),
        "trl_static": lambda: bench_trl(model_dir, task, args.steps, args.warmup, "static"),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            res = fn()
            runs[name].append(res)
            extra = f", {res['trained_rows']:.0%} of rows trained" if "trained_rows" in res else ""
            print(
                f"round {r}: {name:10s} {res['step_s']:.3f} s/step ({res['cpu_step_s']:.3f} CPU s), "
                f"sampling {res['gen_s']:.3f} s ({res['gen_tokens_per_s']:.0f} tok/s), "
                f"{res['gen_tokens_per_step']:.0f} tok/step{extra}",
                flush=True,
            )
    # Other processes share this machine: wall time per step swings with their load, CPU
    # time (one thread) much less. Medians over rounds of both are reported; the speed-up
    # is taken against TRL's faster setting.
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    out: dict[str, Any] = {"median": med, "runs": runs, "threads": torch.get_num_threads()}
    print(
        "\n| side | s/step (wall) | s/step (CPU) | tok/s per step (wall) | sampling s/step | sampling tok/s | tokens/step |"
        "\n|---|---|---|---|---|---|---|"
    )
    for k, v in med.items():
        print(
            f"| {k} | {v['step_s']:.3f} | {v['cpu_step_s']:.3f} | {v['tokens_per_s']:.0f} | {v['gen_s']:.3f} "
            f"| {v['gen_tokens_per_s']:.0f} | {v['gen_tokens_per_step']:.0f} |"
        )
    for ours in ("ours", "ours_compiled"):
        for clock, step_key, tok_key in (("wall", "step_s", "tokens_per_s"), ("CPU", "cpu_step_s", "tokens_per_cpu_s")):
            base = min(("trl", "trl_static"), key=lambda k: med[k][step_key])
            speed = med[base][step_key] / med[ours][step_key]
            tok = med[ours][tok_key] / med[base][tok_key]
            print(f"{ours} vs TRL ({base}), {clock} time: {speed:.2f}x per step, {tok:.2f}x generated tokens/s (goal >= 2x)")
            out[f"speedup_{ours}_{clock.lower()}"] = {"baseline": base, "step": speed, "tokens": tok}
    print(f"compile = true: one-time cost {compile_s:.1f} s (compiling, or loading Inductor's on-disk cache)")
    out["compile_s"] = compile_s
    base = min(("trl", "trl_static"), key=lambda k: med[k]["gen_s"])
    gen = med["ours"]["gen_tokens_per_s"] / med[base]["gen_tokens_per_s"]
    print(f"sampling alone vs TRL ({base}): {gen:.2f}x tokens/s")
    out["speedup_sampling"] = {"baseline": base, "tokens": gen}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
