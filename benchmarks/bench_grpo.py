"""GRPO step time on the embedded tiny VLM: TRL's GRPOTrainer vs our GRPOModule, and where it goes.

Side by side on the same tiny LLaVA weights, the same graph-colouring prompts (the `quick` regime's:
the quickstart's task and model until session 5), the same reward (our compiled reward, called on TRL's completions grouped by
prompt), 2 prompts × 4 generations, 64 new tokens, temperature 1, β = 0, one update per batch,
bf16 autocast for the training forward:

- ``trl``: TRL ``GRPOTrainer`` at its defaults for this work (dynamic KV cache);
- ``ours_eager``: ``GRPOModule`` under a Lightning Trainer at the stage defaults (eager
  sampler; ``mask_truncated = false`` to match TRL); ``ours``: the same with ``compile = true``;
- with LoRA (r 8, all linear layers) on both sides: ``trl_lora`` (``peft_config``), ``ours_lora``
  (the fused sampler with the adapters merged) and ``ours_lora_generate`` (our step sampling
  through Hugging Face ``generate``, the path PEFT models took before).

The model first gets a short SFT warm start (``--sft-steps``), as GRPO starts from an SFT
checkpoint: random weights emit EOS after a few tokens and would time mostly overhead.

A step is timed end to end between step ends, and split into sampling (``generate`` on TRL's
side), the rest of the rollout (prompt encoding, decoding, rewards; TRL: also its log-prob
bookkeeping), the update's forward, its backward, and the optimiser with framework overhead.
Generated tokens are counted up to and including EOS on both sides. Each side runs in its own
process, in alternating rounds; medians over a run's timed steps, best round per side.
``compile = true`` pays a one-time compile per process: measured separately with an empty
Inductor cache (``compile_cold_s``) and with the on-disk cache an earlier process left
(``compile_warm_s``), and left out of the timed steps.

``--no-eos`` suppresses EOS on both sides, so every completion runs to the cap and both sides
generate the same tokens per step (at the defaults the two policies' completion lengths drift apart
during the run: the reward's brevity term). The compile cost is measured only when a compiled side runs.

    python benchmarks/bench_grpo.py --threads 1
    python benchmarks/bench_grpo.py --steps 10 --rounds 3 --json out.json
    python benchmarks/bench_grpo.py --sides trl ours_eager --no-eos
    python benchmarks/bench_grpo.py --sides trl ours_eager --no-eos --group 8 --new-tokens 128   # the stage's defaults
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as bl

PROMPTS, G, NEW_TOKENS = 2, 4, 64
REGIME = "quick"
SIDES = ("trl", "ours", "ours_eager", "trl_lora", "ours_lora", "ours_lora_generate")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
PARTS = ("sampling", "rollout_rest", "forward", "backward", "optimizer_rest")


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


class Timer:
    """Wraps callables and accumulates their wall and CPU seconds per step."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t = bl.now()
            try:
                return fn(*a, **k)
            finally:
                d = bl.span(t, bl.now())
                acc = self.acc.setdefault(name, [0.0, 0.0])
                acc[0] += d["wall_s"]
                acc[1] += d["cpu_s"]

        return timed

    def take(self) -> dict[str, tuple[float, float]]:
        out = {k: (v[0], v[1]) for k, v in self.acc.items()}
        self.acc = {}
        return out


def summarise(steps: list[dict[str, Any]], warmup: int, cpu: bool) -> dict[str, Any]:
    """Medians over the timed steps of the step time, its parts, and generated tokens."""
    timed = steps[warmup:]
    i = 1 if cpu else 0
    out: dict[str, Any] = {
        "step_s": statistics.median(s["step"][0] for s in timed),
        "step_cpu_s": statistics.median(s["step"][1] for s in timed),
        "gen_tokens_per_step": statistics.mean(s["tokens"] for s in timed),
    }
    for part in PARTS:
        out[f"{part}_s"] = statistics.median(s["parts"][part][i] if part in s["parts"] else 0.0 for s in timed)  # (wall, cpu)
    out["sampling_tokens_per_s"] = out["gen_tokens_per_step"] / max(out["sampling_s"], 1e-9)
    return out


def _parts(t: dict[str, tuple[float, float]], step: tuple[float, float], outer: str, inner: list[str]) -> dict[str, tuple[float, float]]:
    """Split a step into PARTS from the wrapped timings (wall, cpu) of nested calls."""

    def get(k: str) -> tuple[float, float]:
        return t.get(k, (0.0, 0.0))

    def sub(a: tuple[float, float], *bs: tuple[float, float]) -> tuple[float, float]:
        return (a[0] - sum(b[0] for b in bs), a[1] - sum(b[1] for b in bs))

    gen, roll, fwd, train = get("generate"), get("rollout"), get("forward"), get(outer)
    parts = {"sampling": gen, "rollout_rest": sub(roll, gen), "forward": fwd}
    parts["backward"] = sub(train, *(get(k) for k in inner))
    parts["optimizer_rest"] = sub(step, train)
    return parts


# ---------------------------------------------------------------------------------- children
def child_trl(model_dir: Path, steps: int, warmup: int, lora: bool, no_eos: bool = False) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from percepdsl_runtime.rewards import RolloutGroup, compile_reward

    task = bl.task_of(REGIME)
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
    tokens: list[int] = []
    timer = Timer()
    records: list[dict[str, Any]] = []

    def reward_fn(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], idx: list[int], **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        tokens.append(sum(len(c[: c.index(eos) + 1]) if eos in c else len(c) for c in completion_ids))
        out: list[float] = []
        for start in range(0, len(texts), G):  # TRL lays the G generations of a prompt side by side
            group = RolloutGroup.score(task, samples[idx[start]], texts[start : start + G])
            out += reward(group).total.tolist()
        return out

    last = [bl.now()]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            last[0] = bl.now()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            end = bl.now()
            d = bl.span(last[0], end)
            step = (d["wall_s"], d["cpu_s"])
            t = timer.take()
            records.append({"step": step, "tokens": tokens[-1] if tokens else 0, "parts": _parts(t, step, "train", ["rollout", "forward"])})

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear")
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
        dataloader_num_workers=0,
        # TRL's own suppression is the image token; --no-eos adds EOS
        generation_kwargs={"suppress_tokens": [model.config.image_token_id, eos]} if no_eos else None,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=processor,
        peft_config=peft_config,
    )
    gen_model = trainer.model
    gen_model.generate = timer.wrap("generate", gen_model.generate)  # TRL samples through model.generate
    trainer._generate_and_score_completions = timer.wrap("rollout", trainer._generate_and_score_completions)
    trainer.compute_loss = timer.wrap("forward", trainer.compute_loss)
    trainer.training_step = timer.wrap("train", trainer.training_step)
    trainer.add_callback(Clock())
    rss0 = bl.rss_mb()
    trainer.train()
    return {"rss_before_mb": rss0, "records": records}


def child_ours(model_dir: Path, steps: int, warmup: int, compile: bool, lora: bool, generate: bool, no_eos: bool = False) -> dict[str, Any]:
    import lightning as L

    import percepdsl_runtime.grpo as grpo
    from percepdsl.ir import GRPOStageIR, LoraIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sampling import FusedLlamaDecoder

    if generate:  # the path PEFT models took before the fused sampler merged adapters
        FusedLlamaDecoder.supports = staticmethod(lambda *a, **k: False)
    lora_ir = LoraIR(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules="all-linear")
    loaded = load_hf(model_dir, lora=lora_ir if lora else None)
    enc = Encoder(loaded, bl.RULES)
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
        reward=reward_ir(),
    )
    module, dm = grpo.build_grpo(loaded, enc, bl.task_of(REGIME), stage, seed=0, grad_clip=1.0)
    if no_eos:
        module.suppress = (*module.suppress, enc.eos_token_id)
    timer = Timer()
    grpo.sample_completions = timer.wrap("generate", grpo.sample_completions)
    grpo.completion_logprobs = timer.wrap("forward", grpo.completion_logprobs)
    module.rollout = timer.wrap("rollout", module.rollout)
    module.training_step = timer.wrap("train", module.training_step)
    records: list[dict[str, Any]] = []
    last = [bl.now()]

    class Clock(L.Callback):
        def on_train_start(self, trainer: Any, *a: Any) -> None:
            opt = trainer.optimizers[0]
            opt.step = timer.wrap("opt", opt.step)

        def on_train_batch_start(self, *a: Any) -> None:
            last[0] = bl.now()

        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            d = bl.span(last[0], bl.now())
            step = (d["wall_s"], d["cpu_s"])
            t = timer.take()
            parts = _parts(t, step, "train", ["rollout", "forward", "opt"])
            opt = t.get("opt", (0.0, 0.0))  # the optimiser step runs inside our training_step
            parts["optimizer_rest"] = (parts["optimizer_rest"][0] + opt[0], parts["optimizer_rest"][1] + opt[1])
            tokens = float(trainer.callback_metrics["completion_tokens"]) * PROMPTS * G
            records.append({"step": step, "tokens": tokens, "parts": parts})

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
    rss0 = bl.rss_mb()
    trainer.fit(module, datamodule=dm)
    return {"rss_before_mb": rss0, "records": records}


def child_compile(model_dir: Path) -> dict[str, Any]:
    """Seconds the first compiled rollout and the first compiled update (forward and backward of
    the log-probs over every row, bf16 autocast) take over later ones: the compile, or its load
    from Inductor's on-disk cache. An update over another row count recompiles once more (rows
    with zero advantage are skipped), which this leaves out."""
    import torch

    from percepdsl_runtime.encoding import Encoder, collate
    from percepdsl_runtime.grpo import completion_logprobs
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sampling import llava_parts, sample_completions

    loaded = load_hf(model_dir)
    enc = Encoder(loaded, bl.RULES)
    task = bl.task_of(REGIME)
    samples = [task.sample("train", i) for i in range(PROMPTS)]
    prompt = collate([enc.encode_prompt(s.query, s.image) for s in samples], enc.pad_token_id)
    kw = dict(group=G, max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, eos_token_id=-1, pad_token_id=enc.pad_token_id)
    out = {}
    for name, comp in (("eager", False), ("first_compiled", True), ("compiled", True)):
        t = bl.now()
        with torch.no_grad():
            roll = sample_completions(loaded.model.eval(), prompt, dtype=torch.bfloat16, compile=comp, **kw)
        out[name] = bl.span(t, bl.now())
    decoder = torch.compile(llava_parts(loaded.model)[0])  # what `compile = true`'s update runs (GRPOModule)
    for name in ("update_first_compiled", "update_compiled"):
        t = bl.now()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = completion_logprobs(loaded.model.train(), roll, decoder=decoder)
        logp.sum().backward()
        loaded.model.zero_grad(set_to_none=True)
        out[name] = bl.span(t, bl.now())
    return {
        key: out["first_compiled"][clock] - out["compiled"][clock] + out["update_first_compiled"][clock] - out["update_compiled"][clock]
        for key, clock in (("compile_s", "wall_s"), ("compile_cpu_s", "cpu_s"))
    }


# ---------------------------------------------------------------------------------- warm start
def sft_warm_start(model_dir: Path, steps: int) -> None:
    """A few SFT steps on the task's targets, saved over ``model_dir``: GRPO starts from an
    SFT checkpoint, whose completions follow the format and run to the 64-token cap."""
    import lightning as L

    from percepdsl.ir import SFTStageIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sft import SFTDataModule, SFTModule, build_trainer

    loaded = load_hf(model_dir)
    enc = Encoder(loaded, bl.RULES)
    module = SFTModule(loaded, SFTStageIR(name="warm", steps=steps, lr=2e-3), enc.role_names)
    dm = SFTDataModule(bl.task_of(REGIME), enc, batch_size=8, seed=0, n_items=8 * steps)
    build_trainer(steps, accelerator="cpu").fit(module, datamodule=dm)
    L.seed_everything(0, verbose=False)
    loaded.model.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------- parent
def set_shape(group: int, new_tokens: int) -> None:
    """G and the generation cap of this process (a child gets them as flags)."""
    global G, NEW_TOKENS
    G, NEW_TOKENS = group, new_tokens


def run(
    threads: int,
    rounds: int,
    steps: int,
    warmup: int,
    sft_steps: int,
    sides: tuple[str, ...] = SIDES,
    log: Any = print,
    no_eos: bool = False,
) -> dict[str, Any]:
    shape = ["--group", str(G), "--new-tokens", str(NEW_TOKENS)]
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        model_dir = bl.build_model(REGIME, Path(tmp) / "tiny")
        bl.run_child("bench_grpo.py", ["--side", "warm_start", "--model-dir", str(model_dir), "--sft-steps", str(sft_steps)], threads)
        common = ["--model-dir", str(model_dir), "--steps", str(steps), "--warmup", str(warmup), *shape] + (["--no-eos"] if no_eos else [])
        compiled = any(s not in ("trl", "trl_lora", "ours_eager") for s in sides)
        if compiled:
            cold = bl.run_child("bench_grpo.py", ["--side", "compile", "--cold", *common], threads)
            warm = bl.run_child("bench_grpo.py", ["--side", "compile", *common], threads)
        load0 = bl.loadavg()
        runs = bl.alternate(
            {s: (lambda s=s: _summary(bl.run_child("bench_grpo.py", ["--side", s, *common], threads), warmup, threads)) for s in sides},
            rounds,
            log,
        )
    key = "step_cpu_s" if threads == 1 else "step_s"
    out: dict[str, Any] = {"threads": threads, "rounds": rounds, "clock": key, "loadavg": [load0, bl.loadavg()], "no_eos": no_eos}
    out |= {"prompts": PROMPTS, "group": G, "new_tokens": NEW_TOKENS}
    if compiled:
        out["compile_cold_s"], out["compile_cold_cpu_s"] = cold["compile_s"], cold["compile_cpu_s"]
        out["compile_warm_s"], out["compile_warm_cpu_s"] = warm["compile_s"], warm["compile_cpu_s"]
    for side, rs in runs.items():
        out[side] = bl.best(rs, key, higher=False) | {f"{key}_rounds": [r[key] for r in rs]}
    for ours, base in (("ours", "trl"), ("ours_eager", "trl"), ("ours_lora", "trl_lora"), ("ours_lora_generate", "trl_lora")):
        if ours in runs and base in runs:
            out[f"{ours}_vs_{base}"] = out[base][key] / out[ours][key]
            out[f"{ours}_vs_{base}_rounds"] = [b[key] / o[key] for o, b in zip(runs[ours], runs[base])]
            out[f"{ours}_sampling_vs_{base}"] = out[ours]["sampling_tokens_per_s"] / out[base]["sampling_tokens_per_s"]
    return out


def _summary(child: dict[str, Any], warmup: int, threads: int) -> dict[str, Any]:
    return summarise(child["records"], warmup, cpu=threads == 1) | {k: v for k, v in child.items() if k != "records"}


def report(res: dict[str, Any]) -> str:
    key = res["clock"]
    per = "CPU" if key == "step_cpu_s" else "wall"
    lines = [
        f"GRPO step, {res['threads']} thread(s), {res.get('prompts', PROMPTS)} prompts × {res.get('group', G)}, "
        f"{res.get('new_tokens', NEW_TOKENS)} new tokens"
        f"{' (EOS suppressed on both sides: every completion runs to the cap)' if res.get('no_eos') else ''}: {per} seconds "
        f"(median step of the best round; parts are medians too, so they need not add up)",
        "",
        "| side | s/step | range | sampling | rollout rest | forward | backward | optimiser + rest | sampling tok/s | tok/step | peak RSS MiB (+) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        if side not in res:
            continue
        r = res[side]
        rng = bl.spread(r[f"{key}_rounds"])
        lines.append(
            f"| {side} | {r[key]:.3f} | {rng[0]:.3f}–{rng[2]:.3f} | "
            + " | ".join(f"{r[f'{p}_s']:.3f}" for p in PARTS)
            + f" | {r['sampling_tokens_per_s']:.0f} | {r['gen_tokens_per_step']:.0f} | {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f}) |"
        )
    lines.append("")
    for ours, base in (("ours", "trl"), ("ours_eager", "trl"), ("ours_lora", "trl_lora"), ("ours_lora_generate", "trl_lora")):
        if f"{ours}_vs_{base}" in res:
            rng = bl.spread(res[f"{ours}_vs_{base}_rounds"])
            lines.append(
                f"- {ours} vs {base}: {res[f'{ours}_vs_{base}']:.2f}x per step (round by round {rng[0]:.2f}–{rng[2]:.2f}x); "
                f"sampling {res[f'{ours}_sampling_vs_{base}']:.2f}x tokens/s"
            )
    if "compile_cold_s" in res:
        lines.append(
            f"- compile = true, one-time cost per process: {res['compile_cold_s']:.1f} s wall / {res['compile_cold_cpu_s']:.1f} s CPU "
            f"with an empty Inductor cache, {res['compile_warm_s']:.1f} s / {res['compile_warm_cpu_s']:.1f} s CPU from the on-disk cache"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    ap.add_argument("--sft-steps", type=int, default=60, help="SFT steps before GRPO (0: random weights, short completions)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-eos", action="store_true", help="suppress EOS on both sides: equal tokens per step")
    ap.add_argument("--group", type=int, default=G, help="completions per prompt (the GRPO stage's default is 8)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="generation cap (the GRPO stage's default is 128)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_shape(args.group, args.new_tokens)
    if args.side:
        if args.cold:  # an empty Inductor cache of our own
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
        bl.setup_process(args.threads)
        if args.side == "warm_start":
            sft_warm_start(args.model_dir, args.sft_steps)
            res: dict[str, Any] = {}
        elif args.side == "compile":
            res = child_compile(args.model_dir)
        elif args.side in ("trl", "trl_lora"):
            res = child_trl(args.model_dir, args.steps, args.warmup, lora=args.side == "trl_lora", no_eos=args.no_eos)
        else:
            res = child_ours(
                args.model_dir,
                args.steps,
                args.warmup,
                compile=args.side != "ours_eager",
                lora=args.side.startswith("ours_lora"),
                generate=args.side == "ours_lora_generate",
                no_eos=args.no_eos,
            )
        bl.emit(res)
        return
    t0 = time.perf_counter()
    res = run(args.threads, args.rounds, args.steps, args.warmup, args.sft_steps, tuple(args.sides), no_eos=args.no_eos)
    res["wall_s"] = time.perf_counter() - t0
    print(report(res))
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
