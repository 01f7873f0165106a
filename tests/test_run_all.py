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
