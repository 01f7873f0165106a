"""benchmarks/run_all.py: the one command that runs every benchmark and writes perf.md/perf.json.
The default run checks its plumbing on the cheapest piece; the full --quick smoke run (every
benchmark at tiny sizes, TRL included) is slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402


def test_quick_matmul_piece_writes_both_files(tmp_path: Path) -> None:
    assert run_all.main(["--quick", "--only", "matmul", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "perf.json").read_text())
    peaks = res["pieces"]["matmul"]
    assert set(peaks) == {"1", "2"} and all(v["bf16_tflops"] > 0 and v["fp32_tflops"] > 0 for v in peaks.values())
    md = (tmp_path / "perf.md").read_text()
    assert "Matmul peak" in md and "--quick" in md
    assert f"measured {res['measured']['matmul']})" in md  # each piece says when it was measured


def test_a_piece_keeps_its_own_time(tmp_path: Path) -> None:
    """A run that measures some pieces only leaves the others with their own times, and a piece
    taken from a script's JSON file carries that file's time, so perf.md never dates an older
    measurement with the latest run."""
    peaks = {"1": {"bf16_tflops": 1.0, "fp32_tflops": 0.5}, "2": {"bf16_tflops": 2.0, "fp32_tflops": 1.0}}
    added = tmp_path / "matmul.json"
    added.write_text(json.dumps(peaks))
    os.utime(added, (946684800, 946684800))  # 2000-01-01 00:00 UTC
    (tmp_path / "perf.json").write_text(json.dumps({"pieces": {}, "measured": {"scaling": "by 1999"}}))
    assert run_all.main(["--add", f"matmul={added}", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "perf.json").read_text())
    assert res["measured"] == {"scaling": "by 1999", "matmul": "2000-01-01 00:00 UTC"}
    assert "Matmul peak (MFU's denominator, measured 2000-01-01 00:00 UTC)" in (tmp_path / "perf.md").read_text()


def test_the_full_run_measures_the_quickstarts_own_sequences() -> None:
    """The SFT, NGDiff and packing pieces run on `specs/quickstart.pd`'s task and model as the spec
    says them (benchlib reads the spec), beside the short-target and long-target regimes."""
    import benchlib as bl

    from percepdsl.api import check

    names = set(run_all.pieces(quick=False))
    for regime in ("quickstart", "quick", "long"):
        assert {f"sft_{regime}_1", f"sft_{regime}_2", f"ngdiff_{regime}_1", f"packing_{regime}_1"} <= names
    ir = check(ROOT / "specs" / "quickstart.pd")
    assert bl.task_of("quickstart").params == ir.task.params
    assert bl.REGIMES["quickstart"]["patch"] == ir.model.params.patch


@pytest.mark.slow
def test_quick_run_of_every_benchmark(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "perf.json").read_text())
    pieces = ("sft_quick_1", "ngdiff_quick_1", "packing_quick_1", "grpo_1", "grpo_equal_1", "eval_1", "eval_long_1", "scaling")
    assert set(res["pieces"]) == {"matmul", *pieces}
    md = (tmp_path / "perf.md").read_text()
    for heading in ("## Targets", *(f"## {name}" for name in pieces)):
        assert heading in md


def test_ngdiff_variants_take_turns_in_the_given_order() -> None:
    """bench_sft's NGDiff comparison steps its variants (one thread each) one at a time, in the
    order given: here the order within each batch alternates."""
    import threading

    import bench_sft

    order = [(n, j) for j in range(4) for n in (("a", "b") if j % 2 == 0 else ("b", "a"))]
    turns, ran = bench_sft.Turns(order), []

    def work(name: str) -> None:
        for j in range(4):
            turns.wait((name, j))
            ran.append((name, j))
            turns.next()

    threads = [threading.Thread(target=turns.run, args=(lambda n=n: work(n),)) for n in ("b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    turns.check()
    assert ran == order


def test_a_failing_variant_wakes_the_others() -> None:
    """A variant that fails does not leave the others waiting for its turn: they stop, and the
    first error is raised in the main thread."""
    import threading

    import bench_sft

    turns = bench_sft.Turns([("a", 0), ("b", 0), ("a", 1), ("b", 1)])

    def a() -> None:
        turns.wait(("a", 0))
        turns.next()
        turns.wait(("a", 1))
        raise ValueError("a failed")

    def b() -> None:
        for j in range(2):
            turns.wait(("b", j))
            turns.next()

    threads = [threading.Thread(target=turns.run, args=(f,)) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(ValueError, match="a failed"):
        turns.check()


def test_ngdiff_report_reads_both_layouts() -> None:
    """perf.json keeps NGDiff pieces measured with the old design (a Lightning run per variant, one
    after another) and the paired one; the report renders both."""
    import bench_sft

    old = json.loads((ROOT / "benchmarks" / "results" / "perf.json").read_text())["pieces"]["ngdiff_long_1"]
    assert "best of rounds" in bench_sft.report_ngdiff(old)
    ng = {"plain_step_cpu_s": 0.4, "batches": 20, "passes": 2, "chunked_share": 1.0, "prefix_share": 0.27, "packed": True}
    for name, r in (("ngdiff", 1.25), ("ngdiff_one_pass", 1.45), ("ngdiff_lagged", 1.05)):
        rounds = [r, r + 0.02, r - 0.01]
        ng |= {f"{name}_ratio_rounds": rounds, f"{name}_passes": [[x, x] for x in rounds], f"{name}_paired": [r - 0.1, r, r + 0.1]}
    text = bench_sft.report_ngdiff({"regime": "quickstart", "threads": 1, "rounds": 3, "loadavg": [2.0, 2.5], "ngdiff": ng})
    assert "chunked forward" in text and "median 1.25x (rounds 1.25 [1.25/1.25], 1.27 [1.27/1.27], 1.24 [1.24/1.24])" in text
    assert "per batch 1.45x (quartiles 1.35–1.55x)" in text and "load 2.0–2.5" in text
