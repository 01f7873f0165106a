"""How step time and memory grow with model width, depth, sequence length and group size.

SFT: one training step (bf16 autocast forward, backward, fused AdamW) on 8 items of the long
regime's task, cut or extended to exactly ``length`` tokens each (the image and query first,
then targets), for:

- ``ours``: the packed row our SFT takes by default (``packing.collate_packed``; per-item
  attention, LM head on target positions only);
- ``padded``: our step on the same items right-padded (``packing = false``);
- ``hf``: the step as TRL's ``SFTTrainer`` computes it: the model's own forward with
  ``labels`` (eager attention, the LM head and the cross-entropy over every position of the
  padded batch), the loss on target tokens only, AdamW as TRL's default (``adamw_torch``: not
  fused). TRL itself adds its data collation and Trainer overhead on top (bench_sft.py measures
  those at the `quick` regime's and the reproduction's sizes); this isolates the model's compute.

Items of equal length make ``ours`` and ``padded`` compute the same tokens: the difference
between them there is the attention implementation and the LM head, not padding. Random
batches (bench_sft.py) add the padding.

GRPO: one rollout of 2 prompts × G completions of 64 new tokens (EOS suppressed, so every row
runs to the cap) by our fused sampler and by Hugging Face ``generate`` (what TRL's
``GRPOTrainer`` calls), and the update's forward + backward over them (``completion_logprobs``),
for G and width.

Time: CPU seconds of this process (one thread, so the work done), best of ``--reps`` steps after
a warm-up step. Memory: bytes saved for backward during the forward (activations, measured by
``torch.autograd.graph.saved_tensors_hooks``), and parameters + gradients + AdamW moments (16
bytes per parameter): this process's RSS mixes every configuration, so it is not reported.

    python benchmarks/bench_scaling.py --json out.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as bl

BATCH = 8
REGIME = "long"
# (width, depth, heads) swept at the default length, and lengths swept at the default width
SFT_WIDTHS = (64, 128, 256, 512, 1024)
SFT_DEPTHS = (2, 4, 8)
SFT_LENGTHS = (100, 200, 400, 800, 1500)
BASE = {"width": 256, "depth": 4, "length": 400}
GRPO_GROUPS = (2, 4, 8, 16)
GRPO_WIDTHS = (64, 256, 1024)
NEW_TOKENS = 64
QUICK = {
    "widths": (64,),
    "depths": (2,),
    "lengths": (100,),
    "base": {"width": 64, "depth": 2, "length": 100},
    "groups": (2,),
    "gwidths": (64,),
}


def heads_of(width: int) -> int:
    return max(width // 64, 2)


def _cpu_best(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes of the tensors autograd saved for backward while it ran."""
    import torch

    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


# ---------------------------------------------------------------------------------- SFT
def items_of_length(task: Any, enc: Any, length: int, n: int = BATCH) -> list[dict[str, Any]]:
    """``n`` training items of exactly ``length`` tokens: each task item's response repeated
    until it is long enough, then cut (the prompt, with the image, stays whole)."""
    out = []
    for i in range(n):
        s = task.sample("train", i)
        reps = 1
        while True:
            it = enc.encode_train(s.query, s.image, " ".join([s.response] * reps))
            if it["input_ids"].shape[0] >= length:
                break
            reps *= 2
        cut = {k: (v[:length] if k in ("input_ids", "labels", "role_ids", "attention_mask") else v) for k, v in it.items()}
        cut["n_target"] = int((cut["labels"] != -100).sum())
        out.append(cut)
    return out


def sft_point(model_dir: Path, task: Any, length: int, reps: int) -> dict[str, Any]:
    import torch

    from percepdsl_runtime.encoding import Encoder, collate, model_inputs
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.optim import adamw
    from percepdsl_runtime.packing import collate_packed
    from percepdsl_runtime.sft import role_losses

    loaded = load_hf(model_dir)
    model = loaded.model.train()
    enc = Encoder(loaded, bl.RULES)
    items = items_of_length(task, enc, length)
    n_params = sum(p.numel() for p in model.parameters())
    n_roles = len(enc.role_names)
    batches = {"ours": collate_packed(items, enc.pad_token_id), "padded": collate(items, enc.pad_token_id)}
    out: dict[str, Any] = {"params": n_params, "target_tokens": sum(int(it["n_target"]) for it in items)}

    def ours_step(batch: dict[str, Any], opt: Any) -> Callable[[], Any]:
        def step() -> int:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                (sums, counts), saved = saved_bytes(lambda: role_losses(model, batch, n_roles))
            (sums.sum() / counts.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return saved

        return step

    def hf_step(opt: Any) -> Callable[[], int]:
        batch = batches["padded"]
        inputs = model_inputs(batch) | {"labels": batch["labels"]}

        def step() -> int:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out_, saved = saved_bytes(lambda: model(**inputs, use_cache=False))
            out_.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return saved

        return step

    for side in ("ours", "padded", "hf"):
        opt = adamw(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, fused=side != "hf")
        fn = hf_step(opt) if side == "hf" else ours_step(batches[side], opt)
        out[f"{side}_step_cpu_s"] = _cpu_best(fn, reps)
        out[f"{side}_activation_mb"] = fn() / 2**20
    out["state_mb"] = 16 * n_params / 2**20
    return out


# ---------------------------------------------------------------------------------- GRPO
def grpo_point(model_dir: Path, task: Any, group: int, reps: int) -> dict[str, Any]:
    import torch

    from percepdsl_runtime.encoding import Encoder, collate
    from percepdsl_runtime.grpo import completion_logprobs
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.sampling import _hf_generate, sample_completions

    loaded = load_hf(model_dir)
    model = loaded.model
    enc = Encoder(loaded, bl.RULES)
    prompt = collate([enc.encode_prompt(s.query, s.image) for s in (task.sample("train", i) for i in range(2))], enc.pad_token_id)
    suppress = (model.config.image_token_id, enc.eos_token_id)  # every row runs to the cap
    kw = dict(temperature=1.0, top_p=1.0, eos_token_id=enc.eos_token_id, pad_token_id=enc.pad_token_id, suppress=suppress)
    out: dict[str, Any] = {}
    roll = None

    def fused() -> None:
        nonlocal roll
        with torch.no_grad():
            roll = sample_completions(model.eval(), prompt, group=group, max_new_tokens=NEW_TOKENS, dtype=torch.bfloat16, **kw)

    def hf() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _hf_generate(model.eval(), prompt, group, NEW_TOKENS, 1.0, 1.0, enc.eos_token_id, enc.pad_token_id, suppress, None)

    out["sample_cpu_s"] = _cpu_best(fused, reps)
    out["hf_generate_cpu_s"] = _cpu_best(hf, reps)
    model.train()

    def update() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, saved = saved_bytes(lambda: completion_logprobs(model, roll))
        lp.mean().backward()
        model.zero_grad(set_to_none=True)
        return saved

    out["update_cpu_s"] = _cpu_best(update, reps)
    out["update_activation_mb"] = update() / 2**20
    return out


# ---------------------------------------------------------------------------------- driver
def run(quick: bool = False, reps: int = 2, log: Any = print) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    q = QUICK if quick else None
    widths = q["widths"] if q else SFT_WIDTHS
    depths = q["depths"] if q else SFT_DEPTHS
    lengths = q["lengths"] if q else SFT_LENGTHS
    base = q["base"] if q else BASE
    groups = q["groups"] if q else GRPO_GROUPS
    gwidths = q["gwidths"] if q else GRPO_WIDTHS
    task = bl.task_of(REGIME)
    sft_points = [("width", w, {"width": w, "depth": base["depth"]}, base["length"]) for w in widths]
    sft_points += [("depth", d, {"width": base["width"], "depth": d}, base["length"]) for d in depths]
    sft_points += [("length", n, {"width": base["width"], "depth": base["depth"]}, n) for n in lengths]
    grpo_points = [("group", g, {"width": base["width"], "depth": base["depth"]}, g) for g in groups]
    grpo_points += [("width", w, {"width": w, "depth": base["depth"]}, 4 if not quick else groups[0]) for w in gwidths]
    out: dict[str, Any] = {"base": base, "batch": BATCH, "new_tokens": NEW_TOKENS, "sft": [], "grpo": []}
    models: dict[tuple[int, int], Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:

        def model(size: dict[str, int]) -> Path:
            key = (size["width"], size["depth"])
            if key not in models:
                models[key] = bl.build_model(REGIME, Path(tmp) / f"w{key[0]}d{key[1]}", heads=heads_of(key[0]), **size)
            return models[key]

        for axis, value, size, length in sft_points:
            res = {"axis": axis, "value": value, **size, "length": length} | sft_point(model(size), task, length, reps)
            out["sft"].append(res)
            log(
                f"  sft {axis}={value}: ours {res['ours_step_cpu_s']:.3f}s padded {res['padded_step_cpu_s']:.3f}s hf {res['hf_step_cpu_s']:.3f}s"
            )
        for axis, value, size, group in grpo_points:
            res = {"axis": axis, "value": value, **size, "group": group} | grpo_point(model(size), task, group, reps)
            out["grpo"].append(res)
            log(
                f"  grpo {axis}={value}: sample {res['sample_cpu_s']:.3f}s hf {res['hf_generate_cpu_s']:.3f}s update {res['update_cpu_s']:.3f}s"
            )
    return out


def report(res: dict[str, Any]) -> str:
    b = res["base"]
    lines = [
        f"SFT step, {res['batch']} items of `length` tokens, CPU s (1 thread; best of the reps); activations: MiB saved for "
        f"backward; the others at width {b['width']}, depth {b['depth']}, length {b['length']}",
        "",
        "| axis | value | params M | ours s | padded s | HF forward (TRL's compute) s | HF / ours | ours act. MiB | HF act. MiB | params+grads+Adam MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["sft"]:
        lines.append(
            f"| {r['axis']} | {r['value']} | {r['params'] / 1e6:.1f} | {r['ours_step_cpu_s']:.3f} | {r['padded_step_cpu_s']:.3f} "
            f"| {r['hf_step_cpu_s']:.3f} | {r['hf_step_cpu_s'] / r['ours_step_cpu_s']:.2f}x | {r['ours_activation_mb']:.0f} "
            f"| {r['hf_activation_mb']:.0f} | {r['state_mb']:.0f} |"
        )
    lines += [
        "",
        f"GRPO rollout of 2 prompts × G completions, {res['new_tokens']} new tokens each (EOS suppressed), and the update's "
        "forward + backward over them, CPU s",
        "",
        "| axis | value | width | G | fused sampler s | HF generate s | generate / fused | update s | update act. MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["grpo"]:
        lines.append(
            f"| {r['axis']} | {r['value']} | {r['width']} | {r['group']} | {r['sample_cpu_s']:.3f} | {r['hf_generate_cpu_s']:.3f} "
            f"| {r['hf_generate_cpu_s'] / r['sample_cpu_s']:.2f}x | {r['update_cpu_s']:.3f} | {r['update_activation_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small point per table (a smoke check)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--emit", action="store_true", help="end with the result as one JSON line (run_all.py reads it)")
    ap.add_argument("--threads", type=int, default=1, help="must be 1 (CPU time is the work done with one thread)")
    args = ap.parse_args()
    if args.threads != 1:
        ap.error("bench_scaling measures with one thread")
    bl.setup_process(1)
    res = run(args.quick, args.reps, log=lambda m: print(m, flush=True))
    print(report(res))
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, res)
    if args.emit:
        bl.emit(res)


if __name__ == "__main__":
    main()
