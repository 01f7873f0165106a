"""Every benchmark in one command: writes benchmarks/results/perf.md and perf.json.

    python benchmarks/run_all.py            # the full set (hours on a shared 2-core CPU)
    python benchmarks/run_all.py --quick    # a smoke check: every piece, tiny sizes, one round
    python benchmarks/run_all.py --only matmul sft_quick_1

Pieces (``--only``): ``matmul`` (the matmul peak, MFU's denominator, measured in this run),
``sft_<regime>_<threads>`` (bench_sft.py: SFT vs TRL's SFTTrainer, regimes ``quickstart``
(specs/quickstart.pd's sequences), ``quick`` (short targets) and ``long``, 1 and 2 threads), ``ngdiff_<regime>_1`` (bench_sft.py --ngdiff: NGDiff's step against a
token-mean step), ``packing_<regime>_1`` (bench_packing.py: packed rows against padded items,
batch by batch), ``grpo_1`` and ``grpo_equal_1`` (bench_grpo.py: GRPO vs TRL's GRPOTrainer; ``equal``: EOS
suppressed on both sides, so both generate the same tokens per step,
with LoRA), ``eval_1`` and ``eval_long_1`` (bench_eval.py: the three-way evaluation in items/s,
through the fused decoder, against plain ``model.generate`` and the batched ``generate`` evaluation,
regimes ``quick`` and ``long``; ``--eval-model PATH`` evaluates a checkpoint in the long regime
instead of the untrained tiny model), ``scaling`` (bench_scaling.py). Every ratio is taken against its baseline
measured in the same run, side by side (see benchlib). The JSON is rewritten after every piece,
so an interrupted run keeps what it measured; ``--only`` updates those pieces in an existing
perf.json and leaves the others, and ``--add PIECE=FILE`` takes a piece from the JSON its own
script wrote (``bench_sft.py --json``, ...: the same result), for pieces run separately.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

RESULTS = bl.ROOT / "benchmarks" / "results"
TARGETS = {"sft": 1.5, "ngdiff": 1.3, "grpo": 3.0}

# sizes of each piece: full, and --quick (a smoke check of every code path, not a measurement)
FULL = {
    "matmul": {"n": 2048},
    "sft": {"rounds": 3, "steps": 30, "warmup": 8, "items": 400},
    "ngdiff": {"rounds": 5, "steps": 20, "items": 400, "passes": 2},  # a round: one process (bench_sft.run_ngdiff)
    "packing": {"batches": 40, "items": 400},
    "grpo": {"rounds": 3, "steps": 8, "warmup": 3, "sft_steps": 60},
    "eval": {"items": 500, "naive_items": 10, "repeats": 2},
    "eval_long": {"items": 100, "naive_items": 8, "repeats": 2},
    "scaling": {"reps": 2},
}
QUICK = {
    "matmul": {"n": 256},
    "sft": {"rounds": 1, "steps": 2, "warmup": 2, "items": 48},
    "ngdiff": {"rounds": 1, "steps": 2, "items": 48, "passes": 1},
    "packing": {"batches": 2, "items": 48},
    "grpo": {"rounds": 1, "steps": 1, "warmup": 1, "sft_steps": 2, "sides": ("trl", "ours")},
    "eval": {"items": 4, "naive_items": 2, "repeats": 1},
    "eval_long": {"items": 2, "naive_items": 1, "repeats": 1},
    "scaling": {"reps": 1, "quick": True},
}


def pieces(quick: bool, rounds: int | None = None, eval_model: str = "") -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    size = {k: dict(v) for k, v in (QUICK if quick else FULL).items()}
    for k in ("sft", "ngdiff", "grpo"):
        size[k]["rounds"] = rounds or size[k]["rounds"]
    n = size["matmul"]["n"]
    out: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"matmul": lambda _: {str(t): bl.matmul_peak(t, n) for t in (1, 2)}}
    regimes = ("quick",) if quick else ("quickstart", "quick", "long")
    for regime in regimes:
        for threads in (1,) if quick else (1, 2):
            out[f"sft_{regime}_{threads}"] = lambda _, r=regime, t=threads: _sft(r, t, size["sft"])
    for regime in regimes:
        out[f"ngdiff_{regime}_1"] = lambda _, r=regime: _ngdiff(r, 1, size["ngdiff"])
        out[f"packing_{regime}_1"] = lambda _, r=regime: _packing(r, 1, size["packing"])
    out["grpo_1"] = lambda _: _grpo(1, size["grpo"])
    out["grpo_equal_1"] = lambda _: _grpo(1, {**size["grpo"], "sides": ("trl", "ours_eager")}, no_eos=True)
    out["eval_1"] = lambda _: _eval("quick", 1, size["eval"])
    out["eval_long_1"] = lambda _: _eval("long", 1, size["eval_long"], eval_model)
    out["scaling"] = lambda _: _scaling(size["scaling"])
    return out


def _sft(regime: str, threads: int, s: dict[str, Any]) -> dict[str, Any]:
    import bench_sft

    return bench_sft.run(regime, threads, s["rounds"], s["steps"], s["warmup"], s["items"], log=_log)


def _ngdiff(regime: str, threads: int, s: dict[str, Any]) -> dict[str, Any]:
    import bench_sft

    return bench_sft.run_ngdiff(regime, threads, s["rounds"], s["steps"], s["items"], s["passes"])


def _packing(regime: str, threads: int, s: dict[str, Any]) -> dict[str, Any]:
    args = ["--regime", regime, "--batches", str(s["batches"]), "--items", str(s["items"]), "--emit"]
    return bl.run_child("bench_packing.py", args, threads)


def _grpo(threads: int, s: dict[str, Any], no_eos: bool = False) -> dict[str, Any]:
    import bench_grpo

    sides = s.get("sides", bench_grpo.SIDES)
    return bench_grpo.run(threads, s["rounds"], s["steps"], s["warmup"], s["sft_steps"], tuple(sides), log=_log, no_eos=no_eos)


def _eval(regime: str, threads: int, s: dict[str, Any], model: str = "") -> dict[str, Any]:
    """The default evaluation (fused decoder), the batched ``generate`` one it replaced and the
    plain ``model.generate`` baseline (batch 1, one global cap), in a child process (bench_eval.py)."""
    args = ["--regime", regime, "--items", str(s["items"]), "--naive-items", str(s["naive_items"]), "--repeats", str(s["repeats"])]
    args += ["--naive-repeats", str(s["repeats"]), "--only", "naive", "[generate]", "[default]", "--emit"]
    return bl.run_child("bench_eval.py", args + (["--model", model] if model else []), threads)


def _scaling(s: dict[str, Any]) -> dict[str, Any]:
    args = ["--reps", str(s["reps"]), "--emit"] + (["--quick"] if s.get("quick") else [])
    return bl.run_child("bench_scaling.py", args, 1)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- report
def render(res: dict[str, Any]) -> str:
    """perf.md from perf.json's content."""
    import bench_grpo
    import bench_packing
    import bench_scaling
    import bench_sft

    p = res.get("pieces", {})
    lines = [
        "# Performance (generated by `python benchmarks/run_all.py`; do not edit)",
        "",
        f"Latest run {res.get('finished', res.get('started', '?'))}{' (--quick: a smoke check, not a measurement)' if res.get('quick') else ''}; "
        f"{res.get('machine', '')}. A run can re-measure some pieces only (`--only`): each row says when its piece was "
        "measured. Ratios are ours against the baseline measured in the same piece, side by side in "
        "alternating rounds, each side in its own process; with one thread on CPU time (the work done: other "
        "processes on this shared machine barely move it), with two threads on wall time. Ranges are over rounds.",
        "",
        "## Targets",
        "",
        "| what | baseline | best rounds | median of rounds | range over rounds | target | met (median) | measured |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for name, r in p.items():
        if name.startswith("sft_"):
            rng = bl.spread(r["ours_vs_trl_rounds"])
            lines.append(
                _target(
                    f"SFT target tokens/s, regime {r['regime']}, {r['threads']} thread(s)",
                    "TRL SFTTrainer",
                    r["ours_vs_trl"],
                    rng,
                    "sft",
                    _when(res, name),
                )
            )
        if name.startswith("ngdiff_") or (name.startswith("sft_") and "ngdiff" in r):  # sft_*: measured with the SFT sides before
            ng = r["ngdiff"]
            what = f"NGDiff step (exact{', chunked forward' if 'ngdiff_one_pass_ratio' in ng else ''}), regime {r['regime']}, {r['threads']} thread(s)"
            lines.append(
                _target(
                    what,
                    "token-mean step",
                    ng["ngdiff_ratio"],
                    bl.spread(ng["ngdiff_ratio_rounds"]),
                    "ngdiff",
                    _when(res, name),
                    lower=True,
                )
            )
    if "grpo_1" in p:
        r = p["grpo_1"]
        labels = {
            "ours_eager": "GRPO step, the defaults (eager sampler)",
            "ours": "GRPO step, `compile = true`",
            "ours_lora": "GRPO step with LoRA (fused sampler, adapters merged)",
            "ours_lora_generate": "GRPO step with LoRA, sampling through `generate` (before)",
        }
        for ours, base in (("ours_eager", "trl"), ("ours", "trl"), ("ours_lora", "trl_lora"), ("ours_lora_generate", "trl_lora")):
            if f"{ours}_vs_{base}" in r:
                rng = bl.spread(r[f"{ours}_vs_{base}_rounds"])
                row = _target(
                    labels[ours],
                    f"TRL GRPOTrainer{' + LoRA' if 'lora' in base else ''}",
                    r[f"{ours}_vs_{base}"],
                    rng,
                    "grpo",
                    _when(res, "grpo_1"),
                )
                if ours == "ours_lora_generate":  # a reference point, not a configuration with a target
                    row = row.rsplit("|", 4)[0] + f"| — | — | {_when(res, 'grpo_1')} |"
                lines.append(row)
    if "grpo_equal_1" in p:
        r = p["grpo_equal_1"]
        rng = bl.spread(r["ours_eager_vs_trl_rounds"])
        what = "GRPO step, the defaults, equal tokens per step (EOS suppressed on both sides)"
        lines.append(_target(what, "TRL GRPOTrainer", r["ours_eager_vs_trl"], rng, "grpo", _when(res, "grpo_equal_1")))
    for name in ("eval_1", "eval_long_1"):
        if name in p:
            lines += _eval_targets(p[name], _when(res, name))
    if "matmul" in p:
        m = p["matmul"]
        lines += ["", f"## Matmul peak (MFU's denominator, measured {_when(res, 'matmul')})", ""]
        lines += [
            f"- {t} thread(s): bf16 {v['bf16_tflops']:.2f} TFLOP/s, fp32 {v['fp32_tflops']:.2f} TFLOP/s (square matmuls, best of 3)"
            for t, v in m.items()
        ]
        sft_rows = [(n, r) for n, r in p.items() if n.startswith("sft_")]
        if sft_rows:
            lines += ["", "| SFT run | ours model TFLOP/s | ours MFU (bf16) | TRL MFU (same FLOPs per token) |", "|---|---:|---:|---:|"]
            for n, r in sft_rows:
                peak = m[str(r["threads"])]["bf16_tflops"] * 1e12
                key = "model_flops_per_cpu_s" if r["clock"] == "tokens_per_cpu_s" else "model_flops_per_s"
                ours_f = r["ours"][key]
                trl_f = ours_f * r["trl"][r["clock"]] / r["ours"][r["clock"]]
                lines.append(f"| {n} | {ours_f / 1e12:.3f} | {ours_f / peak:.1%} | {trl_f / peak:.1%} |")
    for name, r in p.items():
        if name.startswith("sft_"):
            lines += ["", f"## {name}", "", bench_sft.report(r)]
        elif name.startswith("ngdiff_"):
            lines += ["", f"## {name}", "", bench_sft.report_ngdiff(r)]
        elif name.startswith("packing_"):
            lines += ["", f"## {name}", "", bench_packing.report(r)]
    for name in ("grpo_1", "grpo_equal_1"):
        if name in p:
            lines += ["", f"## {name}", "", bench_grpo.report(p[name])]
    for name in ("eval_1", "eval_long_1"):
        if name not in p:
            continue
        lines += ["", f"## {name}", "", p[name]["header"], ""]
        lines += ["| configuration | items | items/s | items/CPU-s | x (CPU) | CPU s by round |", "|---|---:|---:|---:|---:|---|"]
        for row in p[name]["rows"]:
            cpu = ", ".join(f"{run['cpu']:.1f}" for run in row["runs"])
            lines.append(
                f"| {row['name']} | {row['items']} | {row['items_per_s']:.2f} | {row['items_per_cpu_s']:.2f} | {row['speedup_cpu']:.1f} | {cpu} |"
            )
    if "scaling" in p:
        lines += ["", "## scaling", "", bench_scaling.report(p["scaling"])]
    return "\n".join(lines) + "\n"


def _eval_targets(r: dict[str, Any], when: str) -> list[str]:
    """Target-table rows of an evaluation piece: the default (fused decoder) against plain
    ``model.generate`` and, where measured, against the batched ``generate`` evaluation."""
    rows = {row["name"]: row for row in r["rows"]}
    base = next(v for k, v in rows.items() if k.startswith("naive"))
    ours = next(v for k, v in rows.items() if "[default]" in k)
    regime = r.get("args", {}).get("regime", "quick")
    what = f"three-way evaluation, regime {regime}, {ours['items']} items: {ours['items_per_cpu_s']:.2f} items/CPU-s"
    out = [
        f"| {what} | plain `model.generate` (batch 1, no per-item cap): {base['items_per_cpu_s']:.2f} items/CPU-s "
        f"| {ours['items_per_cpu_s'] / base['items_per_cpu_s']:.1f}x | | | | | {when} |"
    ]
    hf = next((v for k, v in rows.items() if "[generate]" in k), None)
    if hf is not None:
        ratios = [h["cpu"] / o["cpu"] for h, o in zip(hf["runs"], ours["runs"])]  # same items, round by round
        out.append(
            f"| {what} | batched `generate` evaluation (the default before): {hf['items_per_cpu_s']:.2f} items/CPU-s "
            f"| {ours['items_per_cpu_s'] / hf['items_per_cpu_s']:.2f}x | {statistics.median(ratios):.2f}x | {min(ratios):.2f}–{max(ratios):.2f}x | | | {when} |"
        )
    return out


def _target(what: str, base: str, value: float, rng: list[float], kind: str, when: str, lower: bool = False) -> str:
    """A targets row: the ratio of the best rounds (``value``), the median of the round-by-round
    ratios ``rng`` ([min, median, max]) and their range; a target counts as met only if the
    median meets it (a best round can be luck on this shared machine)."""
    goal, median = TARGETS[kind], rng[1]
    met = median <= goal if lower else median >= goal
    return (
        f"| {what} | {base} | {value:.2f}x | {median:.2f}x | {rng[0]:.2f}–{rng[2]:.2f}x | {'≤' if lower else '≥'} {goal}x "
        f"| {'yes' if met else 'no'} | {when} |"
    )


def _when(res: dict[str, Any], name: str) -> str:
    """When a piece was measured: stamped as it finishes, or, for a piece taken from a script's
    ``--json`` file, that file's modification time."""
    return res.get("measured", {}).get(name, "not recorded")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke check: every piece at tiny sizes")
    ap.add_argument("--only", nargs="+", default=None, help="run only these pieces")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where perf.md and perf.json go")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds of the SFT and GRPO comparisons")
    ap.add_argument("--add", nargs="+", default=[], metavar="PIECE=FILE", help="take these pieces from their scripts' --json files")
    ap.add_argument("--eval-model", default="", help="a checkpoint for eval_long_1 (default: the untrained tiny model)")
    args = ap.parse_args(argv)
    from percepdsl.io import write_json_atomic

    todo = pieces(args.quick, args.rounds, args.eval_model)
    added = dict(a.split("=", 1) for a in args.add if "=" in a)
    unknown = sorted((set(args.only or ()) | set(added)) - set(todo))
    if unknown or len(added) < len(args.add):
        ap.error(f"unknown piece(s) {', '.join(unknown) or args.add}; choose from {', '.join(todo)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "perf.json"
    partial = args.only is not None or bool(added)
    res: dict[str, Any] = json.loads(path.read_text()) if partial and path.exists() else {}
    res.update(quick=args.quick, started=_now(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    res.setdefault("pieces", {})
    res.setdefault("measured", {})
    for name, file in added.items():
        res["pieces"][name] = json.loads(Path(file).read_text())
        res["measured"][name] = _now(Path(file).stat().st_mtime)
    _supersede(res["pieces"])
    if added and args.only is None:
        args.only = []
    for name, fn in todo.items():
        if args.only is not None and name not in args.only:
            continue
        _log(f"{name} ...")
        res["pieces"][name] = fn(res)
        res["measured"][name] = _now()
        _supersede(res["pieces"])
        res["finished"] = _now()
        write_json_atomic(path, res)
        (args.out / "perf.md").write_text(render(res))
    write_json_atomic(path, res)
    (args.out / "perf.md").write_text(render(res))
    print((args.out / "perf.md").read_text())
    return 0


def _supersede(pieces: dict[str, Any]) -> None:
    """NGDiff was measured inside the SFT pieces before it became its own piece: an
    ``ngdiff_<regime>_<threads>`` piece replaces the ``ngdiff`` part of ``sft_<regime>_<threads>``."""
    for name in pieces:
        if name.startswith("ngdiff_"):
            pieces.get(f"sft_{name[len('ngdiff_') :]}", {}).pop("ngdiff", None)


def _now(timestamp: float | None = None) -> str:
    when = dt.datetime.now(dt.UTC) if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    sys.exit(main())
