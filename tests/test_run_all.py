"""benchmarks/run_all.py: the one command that runs every benchmark and writes perf.md/perf.json.
The default run checks its plumbing on the cheapest piece; the full --quick smoke run (every
benchmark at tiny sizes, TRL included) is slow."""

from __future__ import annotations

import json
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


def test_unknown_piece_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        run_all.main(["--only", "nope", "--out", str(tmp_path)])
    assert err.value.code == 2


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
