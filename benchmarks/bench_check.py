"""`percep check` from a cold start: the whole process, this checkout against a baseline commit.

    python benchmarks/bench_check.py                       # baseline: main
    python benchmarks/bench_check.py --baseline 42bb176 --rounds 15

Both language packages are copied to temporary directories (the baseline from git, this
one from the working tree) and run as `python -m percepdsl check SPEC...` with the copy as
the working directory, alternating baseline and current in every round so that load on the
shared machine hits both alike. Each side is run once first to write its bytecode and
Lark's cached parse tables, as an installed package has them. Timed per spec set: one small
spec (`specs/quickstart.pd`, what the README quotes), and every spec and grid in `specs/`
(the grids compile their cells). Prints medians, quartiles and the ratio current/baseline.
This is a benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str | None, dest: Path) -> Path:
    """`percepdsl/` and `grammars/` of a commit (None: the working tree) under dest, grammars linked in."""
    dest.mkdir(parents=True)
    if rev is None:
        for d in ("percepdsl", "grammars"):
            shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        data = subprocess.run(["git", "archive", rev, "percepdsl", "grammars"], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    (dest / "percepdsl" / "grammars").symlink_to("../grammars")  # what the installed package's mapping does
    return dest


def run_once(tree: Path, specs: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "percepdsl", "check", *specs], cwd=tree, capture_output=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"percep check failed in {tree}:\n{proc.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision to compare against (default: main)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-check-"))
    try:
        trees = {"baseline": export(args.baseline, tmp / "baseline"), "current": export(None, tmp / "current")}
        for name, tree in trees.items():
            mod = subprocess.run(
                [sys.executable, "-c", "import percepdsl; print(percepdsl.__file__)"], cwd=tree, capture_output=True, text=True
            )
            assert mod.stdout.strip().startswith(str(tree)), f"{name} imports {mod.stdout.strip()}"
        sets = {
            "quickstart.pd": [str(ROOT / "specs" / "quickstart.pd")],
            "all specs + grids": [str(p) for p in sorted((ROOT / "specs").rglob("*.pd"))],
        }
        print(f"baseline {args.baseline}  vs  working tree; {args.rounds} rounds, alternating; python {sys.version.split()[0]}")
        print(f"{'specs':<20} {'side':<9} {'median s':>9} {'q1':>7} {'q3':>7}")
        for label, specs in sets.items():
            times: dict[str, list[float]] = {k: [] for k in trees}
            for tree in trees.values():
                run_once(tree, specs)  # bytecode and parse tables written
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    times[name].append(run_once(tree, specs))
            for name, xs in times.items():
                q = statistics.quantiles(xs, n=4)
                print(f"{label:<20} {name:<9} {statistics.median(xs):9.3f} {q[0]:7.3f} {q[2]:7.3f}")
            print(
                f"{label:<20} ratio current/baseline (medians): {statistics.median(times['current']) / statistics.median(times['baseline']):.3f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
