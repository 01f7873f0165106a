"""Packed rows against right-padded items, step by step on the same batches: which layout wins,
and at what padding fraction.

For each random batch (batch 8, the SFT default composition) one training step (bf16 autocast
forward, token-mean loss, backward, fused AdamW) runs on its packed row and on its right-padded
items, alternating A, B, A, B in this one process, so drift and a neighbour's bursts hit both
layouts alike; the second run of each layout is kept (the first compiles kernels for new
shapes, which training reuses). Times are CPU seconds with one thread, wall seconds with more.
The padding fraction of a batch is the share of the padded layout's token slots that hold no
item token (its length rounded up by ``packing.bucket``, as ``SFTDataModule.collate`` does).

    python benchmarks/bench_packing.py --regime quick --threads 1 --batches 40
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import benchlib as bl

BATCH = 8


def measure(regime: str, threads: int, batches: int, items: int) -> dict[str, Any]:
    import torch

    from percepdsl_runtime.encoding import Encoder, collate
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.optim import adamw
    from percepdsl_runtime.packing import bucket, collate_packed
    from percepdsl_runtime.sft import SFTDataModule, role_losses

    bl.setup_process(threads)
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        loaded = load_hf(bl.build_model(regime, Path(tmp) / "tiny"))
    enc = Encoder(loaded, bl.RULES)
    dm = SFTDataModule(bl.task_of(regime), enc, batch_size=BATCH, seed=0, n_items=items)
    dm.setup()
    model, pad = loaded.model.train(), enc.pad_token_id
    opt = adamw(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)
    n_roles = len(enc.role_names)
    clock = (lambda: bl.now()[1]) if threads == 1 else (lambda: bl.now()[0])

    def step(batch: dict[str, Any]) -> float:
        t = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, counts = role_losses(model, batch, n_roles)
        (sums.sum() / counts.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t

    rows = []
    load0 = bl.loadavg()
    for b in dm.sampler().batches()[:batches]:
        its = [dm.dataset[i] for i in b]
        lengths = [int(it["input_ids"].shape[0]) for it in its]
        packed = collate_packed(its, pad)
        padded = collate(its, pad, length=bucket(max(lengths)))
        times: dict[str, list[float]] = {"packed": [], "padded": []}
        for _ in range(2):
            times["packed"].append(step(packed))
            times["padded"].append(step(padded))
        rows.append(
            {
                "padding_fraction": 1.0 - sum(lengths) / padded["input_ids"].numel(),
                "tokens": sum(lengths),
                "packed_s": times["packed"][1],
                "padded_s": times["padded"][1],
            }
        )
    total = {k: sum(r[f"{k}_s"] for r in rows) for k in ("packed", "padded")}
    return {
        "regime": regime,
        "threads": threads,
        "clock": "cpu_s" if threads == 1 else "wall_s",
        "loadavg": [load0, bl.loadavg()],
        "rows": rows,
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in rows),
        "packed_s": total["packed"],
        "padded_s": total["padded"],
        "padded_over_packed": total["padded"] / total["packed"],
        "padded_over_packed_batches": [r["padded_s"] / r["packed_s"] for r in rows],
    }


def report(res: dict[str, Any]) -> str:
    rows = sorted(res["rows"], key=lambda r: r["padding_fraction"])
    third = max(len(rows) // 3, 1)
    lines = [
        f"Packed vs padded, regime {res['regime']}, {res['threads']} thread(s), {len(rows)} random batches of {BATCH} "
        f"({res['clock']}, load {res['loadavg'][0]:.1f}–{res['loadavg'][1]:.1f}): padded time / packed time "
        f"(> 1: packing wins) {res['padded_over_packed']:.2f}x over all batches; mean padding fraction {res['padding_fraction']:.1%}",
        "",
        "| batches by padding fraction | padding fraction | padded / packed |",
        "|---|---:|---:|",
    ]
    for name, part in (("lowest third", rows[:third]), ("middle third", rows[third:-third]), ("highest third", rows[-third:])):
        if part:
            pf = statistics.mean(r["padding_fraction"] for r in part)
            ratio = sum(r["padded_s"] for r in part) / sum(r["packed_s"] for r in part)
            lines.append(f"| {name} | {pf:.1%} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=sorted(bl.REGIMES), default="quick")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--emit", action="store_true", help="print the result as one JSON line (run_all.py's child)")
    args = ap.parse_args()
    res = measure(args.regime, args.threads, args.batches, args.items)
    if args.emit:
        bl.emit(res)
        return
    print(report(res))
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
