"""SFT throughput on the embedded tiny VLM: TRL's SFTTrainer vs our SFTModule, and NGDiff's cost.

Side by side on the same weights and the same items, batch 8, random batch composition on
both sides (each its own seeded shuffle), bf16 autocast:

1. ``trl``: TRL ``SFTTrainer`` at its defaults for this work (bf16=True, assistant-only loss
   through the tiny template's {% generation %} markers, no gradient checkpointing, eager
   attention as ours); its own ``padding_free`` refuses vision datasets;
2. ``ours``: ``SFTModule`` + ``SFTDataModule`` under a Lightning Trainer at the defaults
   (``batching = random``, ``packing = true``: one padding-free row per batch);
3. ``ours_padded``: the same with ``packing = false`` (right-padded items);
4. ``ngdiff`` (``--ngdiff``, its own comparison): step time of NGDiff over a token-mean step on
   the same batches, in one process, paired batch by batch (``child_ngdiff``): exact (the
   default chunked forward, and one forward with a second full backward), and with
   ``norm_every = 4``.

Throughput is *target* tokens per second (response tokens + end-of-turn: the tokens the loss is
on), between step ends after a warm-up (data loading, collation, logging and the optimiser all
count); both sides count the same tokens per item (from our encoder). Regimes (``--regime``):
``quickstart`` (specs/quickstart.pd's task and model, read from the spec), ``quick`` (short targets:
the quickstart's settings until session 5) and ``long`` (the reproduction regime's `verbose`
targets); see benchlib.REGIMES. Every side runs in its own process, in alternating rounds; the
best round of each side is kept and the range over rounds reported.

    python benchmarks/bench_sft.py --regime quickstart --threads 1
    python benchmarks/bench_sft.py --regime long --threads 2 --rounds 3 --json out.json
    python benchmarks/bench_sft.py --regime quick --ngdiff --rounds 5 --json ngdiff.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import benchlib as bl

BATCH = 8
SIDES = ("trl", "ours", "ours_padded")


# ---------------------------------------------------------------------------------- children
def child_trl(model_dir: Path, regime: str, items: int, steps: int, warmup: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf

    task = bl.task_of(regime)
    samples = [task.sample("train", i) for i in range(items)]
    enc = Encoder(load_hf(model_dir), bl.RULES)
    n_target = [enc.encode_train(s.query, s.image, s.response)["n_target"] for s in samples]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = {
        "messages": [
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.query}]},
                {"role": "assistant", "content": [{"type": "text", "text": s.response}]},
            ]
            for s in samples
        ],
        "images": [[s.image] for s in samples],
        "n_target": n_target,
    }
    ends: list[tuple[float, float]] = []
    counted: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(bl.now())

    args = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(prefix="bench-trl-sft-"))),
        per_device_train_batch_size=BATCH,
        max_steps=steps + warmup,
        learning_rate=1e-3,
        bf16=True,
        gradient_checkpointing=False,
        assistant_only_loss=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10,  # the same logging cadence as our side (log_every_n_steps=10)
        dataloader_num_workers=0,
        remove_unused_columns=False,
        max_length=None,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=processor)
    collate = trainer.data_collator

    def counting_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        counted.append(sum(int(e.pop("n_target")) for e in examples))  # target tokens of this batch
        return collate(examples)

    trainer.data_collator = counting_collator
    trainer.add_callback(Clock())
    rss0 = bl.rss_mb()
    trainer.train()
    # step i trains batch i (the loader fetching ahead only appends to `counted`)
    return throughput(ends, counted, warmup) | {"rss_before_mb": rss0}


def child_ours(model_dir: Path, regime: str, items: int, steps: int, warmup: int, packing: bool) -> dict[str, Any]:
    import lightning as L

    from percepdsl.ir import SFTStageIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sft import SFTDataModule, SFTModule, build_trainer

    loaded = load_hf(model_dir)
    enc = Encoder(loaded, bl.RULES)
    dm = SFTDataModule(bl.task_of(regime), enc, batch_size=BATCH, seed=0, n_items=items, packing=packing)
    dm.setup()
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []
    flops: list[float] = []
    count = FlopCounter(loaded.model)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, out: Any, batch: Any, i: int) -> None:
            ends.append(bl.now())
            tokens.append(int(batch["n_target"].sum()))
            flops.append(count(batch))

    module = SFTModule(loaded, SFTStageIR(name="bench", steps=steps + warmup, lr=1e-3), enc.role_names)
    logger = L.pytorch.loggers.CSVLogger(tempfile.mkdtemp(prefix="bench-sft-"), name="", version="log")
    trainer = build_trainer(steps + warmup, accelerator="cpu", callbacks=[Clock()], logger=logger, log_every_n_steps=10)
    rss0 = bl.rss_mb()
    trainer.fit(module, datamodule=dm)
    res = throughput(ends, tokens, warmup)
    res["model_flops_per_cpu_s"] = sum(flops[warmup:]) / res["cpu_s"]
    res["model_flops_per_s"] = sum(flops[warmup:]) / res["wall_s"]
    return res | {"rss_before_mb": rss0, "packed": dm.packed, "padding_fraction": padding(dm)}


def child_ngdiff(model_dir: Path, regime: str, items: int, steps: int, passes: int) -> dict[str, Any]:
    """Step CPU time of NGDiff (exact: chunked forward, and one forward with a second full
    backward; norms every 4 steps) over a token-mean step's, paired batch by batch in this process
    (one round of ``run_ngdiff``).

    Every variant trains under its own Lightning Trainer (``grad_clip`` 1.0, as the quickstart's
    trainer block) in its own thread, and the threads take turns one step at a time
    (``Turns``): on every batch each variant steps once, the order rotating from batch to batch,
    so a neighbour's burst on this shared machine falls on the variants alike and no variant
    always runs first. One pass over ``steps`` batches warms up (oneDNN compiles a kernel for
    every new matmul shape, and NGDiff's chunks have shapes of their own), then ``passes``
    timed passes go over the same batches. A step's time is the process's CPU time from
    ``on_train_batch_start`` to ``on_train_batch_end`` (one torch thread; the other variants'
    threads wait meanwhile; ``run_ngdiff`` starts this process with ``MALLOC_ARENA_MAX=1``, so the
    threads allocate from one malloc arena as a training run's one thread does: with an arena per
    thread, processes on the quickstart's batches gave NGDiff 1.23x to 1.46x, with one arena three
    processes gave 1.24-1.28x). A variant's ratio is its summed step time over the token-mean
    steps' on the same batches (also per pass); ``<variant>_per_batch`` holds the per-batch ratios."""
    import lightning as L
    import torch

    from percepdsl.ir import SFTStageIR
    from percepdsl_runtime.encoding import Encoder
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sft import SFTDataModule, SFTModule, build_trainer

    enc = Encoder(load_hf(model_dir), bl.RULES)
    dm = SFTDataModule(bl.task_of(regime), enc, batch_size=BATCH, seed=0, n_items=items)
    dm.setup()
    batches = [dm.collate([dm.dataset[i] for i in b]) for b in dm.sampler().batches()[:steps]]
    stream = batches * (passes + 1)  # the warm-up pass, then the timed ones
    loader = torch.utils.data.DataLoader(stream, batch_size=None)
    groups = [["perception"], ["reasoning", "answer"]]
    specs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "plain": ({"kind": "token_mean"}, {}),
        "ngdiff": ({"kind": "ngdiff", "groups": groups}, {}),
        "ngdiff_one_pass": ({"kind": "ngdiff", "groups": groups}, {"chunked": False}),
        "ngdiff_lagged": ({"kind": "ngdiff", "groups": groups, "norm_every": 4}, {}),
    }
    names = list(specs)
    turns = Turns([(names[(j + k) % len(names)], j) for j in range(len(stream)) for k in range(len(names))])
    times: dict[str, list[float]] = {k: [] for k in names}
    modules: dict[str, Any] = {}

    class Clock(L.Callback):
        def __init__(self, name: str):
            self.name, self.step, self.t = name, 0, bl.now()

        def on_train_batch_start(self, *a: Any) -> None:
            turns.wait((self.name, self.step))
            self.t = bl.now()

        def on_train_batch_end(self, *a: Any) -> None:
            times[self.name].append(bl.span(self.t, bl.now())["cpu_s"])
            self.step += 1
            turns.next()

    def fit(name: str) -> None:
        spec, kw = specs[name]
        stage = SFTStageIR(name=name, steps=len(stream), lr=1e-3, loss=spec)
        modules[name] = SFTModule(load_hf(model_dir), stage, enc.role_names, grad_clip=1.0, **kw)
        trainer = build_trainer(len(stream), accelerator="cpu", callbacks=[Clock(name)], log_every_n_steps=10)
        turns.run(lambda: trainer.fit(modules[name], train_dataloaders=loader))

    threads = [threading.Thread(target=fit, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns.check()
    n = len(batches)
    timed = {k: v[n:] for k, v in times.items()}  # the first pass warmed up
    out: dict[str, Any] = {"plain_step_cpu_s": statistics.median(timed["plain"]), "batches": n}
    for name in names[1:]:
        out[f"{name}_step_cpu_s"] = statistics.median(timed[name])
        out[f"{name}_ratio"] = sum(timed[name]) / sum(timed["plain"])
        out[f"{name}_passes"] = [sum(timed[name][r * n : (r + 1) * n]) / sum(timed["plain"][r * n : (r + 1) * n]) for r in range(passes)]
        out[f"{name}_per_batch"] = [a / b for a, b in zip(timed[name], timed["plain"])]
    module = modules["ngdiff"]
    shares = [_prefix_share(module, b) for b in batches]
    return out | {
        "chunked_share": sum(module._chunk(b) is not None for b in batches) / n,
        "prefix_share": statistics.mean(shares),
        "packed": dm.packed,
    }


class Turns:
    """Threads that run one at a time in a given order: ``order`` lists keys (here (variant,
    step)); ``wait(key)`` blocks until it is that key's turn, ``next()`` passes the turn on.
    ``run(fn)`` runs a thread's work and, should it fail, wakes the others (which then fail
    too) instead of leaving them waiting for a turn that never comes; ``check()`` re-raises."""

    def __init__(self, order: list[Any]):
        self.order, self.pos, self.cond = order, 0, threading.Condition()
        self.errors: list[BaseException] = []

    def wait(self, key: Any) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.errors or (self.pos < len(self.order) and self.order[self.pos] == key))
            if self.errors:
                raise RuntimeError("another variant failed")

    def next(self) -> None:
        with self.cond:
            self.pos += 1
            self.cond.notify_all()

    def run(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as e:  # re-raised by check() in the main thread
            with self.cond:
                self.errors.append(e)
                self.cond.notify_all()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


def _prefix_share(module: Any, batch: dict[str, Any]) -> float:
    """The share of the batch's tokens in the prefix chunk of NGDiff's chunked forward."""
    plan = module._chunk(batch)
    if plan is None:
        return 1.0
    from percepdsl_runtime.packing import n_tokens

    return n_tokens(plan[1]) / n_tokens(batch)


def throughput(ends: list[tuple[float, float]], tokens: list[int], warmup: int) -> dict[str, float]:
    """Target tokens per wall and per CPU second over the steps after ``warmup``."""
    n = len(ends) - warmup
    dt = bl.span(ends[warmup - 1], ends[-1])
    tok = sum(tokens[warmup : warmup + n])
    return {
        "tokens_per_s": tok / dt["wall_s"],
        "tokens_per_cpu_s": tok / dt["cpu_s"],
        "step_s": dt["wall_s"] / n,
        "step_cpu_s": dt["cpu_s"] / n,
        "target_tokens_per_step": tok / n,
        **dt,
    }


def padding(dm: Any) -> float:
    """Share of the token slots the model computes that hold no item token (padded items'
    tails, or a packed row's rounding-up), over one epoch's batches."""
    from percepdsl_runtime.packing import bucket

    lengths = dm.dataset.lengths
    real = slots = 0
    for b in dm.sampler().batches():
        ls = lengths[b]
        real += int(ls.sum())
        slots += bucket(int(ls.sum())) if dm.packed else bucket(int(ls.max())) * len(b)
    return 1.0 - real / slots


class FlopCounter:
    """Model FLOPs of one training step (forward + backward = 3× forward), real tokens only:
    6·P per token for the decoder's matrices, attention 12·L·d·T per token (causal: T/2 keys
    on average, forward and backward), the LM head on target tokens only (all we compute),
    the vision tower and projector per image patch."""

    def __init__(self, model: Any):
        cfg = model.config
        t, v = cfg.text_config, cfg.vision_config
        lm = model.model.language_model
        self.p_dec = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and p.dim() == 2)
        self.p_head = model.lm_head.weight.numel()
        self.p_vis = sum(p.numel() for p in model.model.vision_tower.parameters() if p.dim() == 2)
        self.p_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters() if p.dim() == 2)
        self.t_layers, self.t_width = t.num_hidden_layers, t.hidden_size
        self.v_layers, self.v_width = v.num_hidden_layers, v.hidden_size
        self.v_seq = (v.image_size // v.patch_size) ** 2 + 1

    def __call__(self, batch: dict[str, Any]) -> float:
        n_items = int(batch["n_target"].shape[0])
        if "seq_lengths" in batch:
            lengths = batch["seq_lengths"][:n_items].tolist()
        else:
            lengths = batch["attention_mask"].sum(1).tolist()
        n_target = int(batch["n_target"].sum())
        text = sum(6 * self.p_dec * n + 12 * self.t_layers * self.t_width * n * n / 2 for n in lengths)
        vision = n_items * (
            6 * self.p_vis * self.v_seq + 12 * self.v_layers * self.v_width * self.v_seq**2 + 6 * self.p_proj * (self.v_seq - 1)
        )
        return text + vision + 6 * self.p_head * n_target


# ---------------------------------------------------------------------------------- parent
def run(regime: str, threads: int, rounds: int, steps: int, warmup: int, items: int, log: Any = print) -> dict[str, Any]:
    """Every side in alternating rounds (own processes); returns the best round of each, the
    ranges, and the ratios against TRL."""
    with tempfile.TemporaryDirectory(prefix="bench-sft-model-") as tmp:
        model_dir = bl.build_model(regime, Path(tmp) / "tiny")
        common = ["--model-dir", str(model_dir), "--regime", regime, "--items", str(items)]
        common += ["--steps", str(steps), "--warmup", str(warmup)]
        load0 = bl.loadavg()
        sides = {s: (lambda s=s: bl.run_child("bench_sft.py", ["--side", s, *common], threads)) for s in SIDES}
        runs = bl.alternate(sides, rounds, log)
    clock = "tokens_per_cpu_s" if threads == 1 else "tokens_per_s"  # see benchlib: one thread → CPU time
    out: dict[str, Any] = {"regime": regime, "threads": threads, "rounds": rounds, "clock": clock, "loadavg": [load0, bl.loadavg()]}
    for side, rs in runs.items():
        out[side] = bl.best(rs, clock) | {f"{clock}_rounds": [r[clock] for r in rs]}
    for side in ("ours", "ours_padded"):
        ratios = [o[clock] / t[clock] for o, t in zip(runs[side], runs["trl"])]
        out[f"{side}_vs_trl"] = out[side][clock] / out["trl"][clock]
        out[f"{side}_vs_trl_rounds"] = ratios  # round by round (the same load on both)
    return out


def run_ngdiff(regime: str, threads: int, rounds: int, steps: int, items: int, passes: int = 2) -> dict[str, Any]:
    """NGDiff's step against a token-mean step: ``rounds`` processes, each pairing the variants
    batch by batch (``child_ngdiff``). Within a process the passes agree to a few percent; a round
    is a process, so that what differs between processes (memory layout, the neighbours' load)
    shows in the spread: the median over rounds is the figure."""
    with tempfile.TemporaryDirectory(prefix="bench-sft-model-") as tmp:
        model_dir = bl.build_model(regime, Path(tmp) / "tiny")
        load0 = bl.loadavg()
        args = ["--side", "ngdiff", "--model-dir", str(model_dir), "--regime", regime, "--items", str(items)]
        args += ["--steps", str(steps), "--passes", str(passes)]
        runs = [bl.run_child("bench_sft.py", args, threads, env={"MALLOC_ARENA_MAX": "1"}) for _ in range(rounds)]
    first = runs[0]
    ng: dict[str, Any] = {
        "plain_step_cpu_s": statistics.median(r["plain_step_cpu_s"] for r in runs),
        "batches": first["batches"],
        "passes": passes,
        "chunked_share": first["chunked_share"],
        "prefix_share": first["prefix_share"],
        "packed": first["packed"],
    }
    for name in ("ngdiff", "ngdiff_one_pass", "ngdiff_lagged"):
        ng[f"{name}_step_cpu_s"] = statistics.median(r[f"{name}_step_cpu_s"] for r in runs)
        ng[f"{name}_ratio_rounds"] = [r[f"{name}_ratio"] for r in runs]
        ng[f"{name}_ratio"] = min(ng[f"{name}_ratio_rounds"])  # the best round (run_all's "best rounds" column)
        ng[f"{name}_passes"] = [r[f"{name}_passes"] for r in runs]
        ng[f"{name}_paired"] = bl.quartiles([x for r in runs for x in r[f"{name}_per_batch"]])
    return {"regime": regime, "threads": threads, "rounds": rounds, "loadavg": [load0, bl.loadavg()], "ngdiff": ng}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=sorted(bl.REGIMES), default="quick")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept, range reported)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--ngdiff", action="store_true", help="measure NGDiff's step against a token-mean step instead")
    ap.add_argument("--ngdiff-steps", type=int, default=20, help="--ngdiff: batches, a warm-up pass then --passes timed passes over them")
    ap.add_argument("--passes", type=int, default=2, help="--ngdiff: timed passes over the batches in each round (process)")
    ap.add_argument("--json", type=Path, default=None)
    # one side in this process (what the parent runs)
    ap.add_argument("--side", choices=(*SIDES, "ngdiff"), default=None)
    ap.add_argument("--model-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.side:
        bl.setup_process(args.threads)
        if args.side == "trl":
            res = child_trl(args.model_dir, args.regime, args.items, args.steps, args.warmup)
        elif args.side == "ngdiff":
            res = child_ngdiff(args.model_dir, args.regime, args.items, args.steps, args.passes)
        else:
            res = child_ours(args.model_dir, args.regime, args.items, args.steps, args.warmup, args.side == "ours")
        bl.emit(res)
        return
    if args.ngdiff:
        res = run_ngdiff(args.regime, args.threads, args.rounds, args.ngdiff_steps, args.items, args.passes)
        print(report_ngdiff(res))
    else:
        res = run(args.regime, args.threads, args.rounds, args.steps, args.warmup, args.items)
        print(report(res))
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, res)


def report(res: dict[str, Any]) -> str:
    clock = res["clock"]
    per = "per CPU second" if clock == "tokens_per_cpu_s" else "per wall second"
    lines = [
        f"SFT, regime {res['regime']}, {res['threads']} thread(s): target tokens {per} (best of {res['rounds']} rounds; range)",
        "",
        "| side | target tok/s | range | ms/step | target tok/step | peak RSS MiB (+ over start) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for side in SIDES:
        r = res[side]
        rng = bl.spread(r[f"{clock}_rounds"])
        step = r["step_cpu_s"] if clock == "tokens_per_cpu_s" else r["step_s"]
        lines.append(
            f"| {side} | {r[clock]:,.0f} | {rng[0]:,.0f}–{rng[2]:,.0f} | {step * 1e3:.0f} | {r['target_tokens_per_step']:.0f} "
            f"| {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f}) |"
        )
    lines.append("")
    for side in ("ours", "ours_padded"):
        rng = bl.spread(res[f"{side}_vs_trl_rounds"])
        lines.append(f"- {side} / TRL: {res[f'{side}_vs_trl']:.2f}x (best rounds); round by round {rng[0]:.2f}–{rng[2]:.2f}x")
    if "ngdiff" in res:  # measured with the SFT sides before NGDiff became its own comparison
        lines.append(report_ngdiff(res).splitlines()[-1])
    return "\n".join(lines)


def report_ngdiff(res: dict[str, Any]) -> str:
    ng = res["ngdiff"]
    rounds = lambda key: ", ".join(f"{x:.2f}" for x in ng[key])  # noqa: E731
    if "ngdiff_paired" in ng:
        load = ", load {:.1f}–{:.1f}".format(*res["loadavg"]) if "loadavg" in res else ""
        lines = [
            f"NGDiff, regime {res['regime']}, {res['threads']} thread(s): summed step CPU time over the token-mean steps' on the same "
            f"batches, paired batch by batch in one process per round ({res['rounds']} rounds; {ng['batches']} batches, a warm-up pass, "
            f"then {ng['passes']} timed passes{load}); the median and range over rounds, and the quartiles of the per-batch ratios",
            "",
        ]

        def with_passes(key: str) -> str:  # each round's ratio, its passes' in brackets
            return ", ".join(
                f"{r:.2f} [{'/'.join(f'{x:.2f}' for x in ps)}]" for r, ps in zip(ng[f"{key}_ratio_rounds"], ng[f"{key}_passes"])
            )

        what = {
            "ngdiff": f"chunked forward (the default; {ng['chunked_share']:.0%} of the steps chunked, prefix chunk "
            f"{ng['prefix_share']:.0%} of the tokens, {'packed rows' if ng['packed'] else 'padded items'})",
            "ngdiff_one_pass": "one forward, second full backward (the fallback)",
            "ngdiff_lagged": "norms every 4 steps (an approximation)",
        }
        for key, text in what.items():
            q = ng[f"{key}_paired"]
            lines.append(
                f"- {text}: median {statistics.median(ng[f'{key}_ratio_rounds']):.2f}x (rounds {with_passes(key)}); "
                f"per batch {q[1]:.2f}x (quartiles {q[0]:.2f}–{q[2]:.2f}x)"
            )
        lines.append(f"- token-mean step: {ng['plain_step_cpu_s'] * 1e3:.0f} ms CPU (median)")
        return "\n".join(lines)
    # measured before session 10: each variant a Lightning run of its own, one after the other
    lines = [f"NGDiff, regime {res['regime']}, {res['threads']} thread(s): median step CPU time over a token-mean step's, same batches"]
    if "ngdiff_one_pass_ratio" in ng:
        lines += [
            "",
            f"- chunked forward (the default; {ng['chunked_share']:.0%} of the steps chunked, prefix chunk "
            f"{ng['prefix_share']:.0%} of the tokens, {'packed rows' if ng['packed'] else 'padded items'}): "
            f"{ng['ngdiff_ratio']:.2f}x (best of rounds; rounds {rounds('ngdiff_ratio_rounds')})",
            f"- one forward, second full backward (the fallback): {ng['ngdiff_one_pass_ratio']:.2f}x (rounds {rounds('ngdiff_one_pass_ratio_rounds')})",
            f"- norms every 4 steps (an approximation): {ng['ngdiff_lagged_ratio']:.2f}x",
            f"- token-mean step: {ng['plain_step_cpu_s'] * 1e3:.0f} ms CPU",
        ]
        return "\n".join(lines)
    return (
        f"- NGDiff step / token-mean step (exact gradients): {ng['ngdiff_ratio']:.2f}x "
        f"(rounds {rounds('ngdiff_ratio_rounds')}); norms every 4 steps: {ng['ngdiff_lagged_ratio']:.2f}x"
    )


if __name__ == "__main__":
    main()
