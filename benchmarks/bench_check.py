"""`percep check` from a cold start: the whole process, this checkout against a baseline commit.

    python benchmarks/bench_check.py                       # baseline: main, against the working tree
    python benchmarks/bench_check.py --baseline 42bb176 --current 3abeaff --rounds 15

Both language packages are copied to temporary directories (from git, or the working
tree for the current side unless `--current` names a commit) and run as `python -m percepdsl check SPEC...` with the copy as
the working directory, alternating baseline and current in every round so that load on the
shared machine hits both alike. Each side is run once first to write its bytecode and
Lark's cached parse tables, as an installed package has them. Timed per spec set: one small
spec (`specs/quickstart.pd`, what docs/performance.md quotes), and every spec and grid in `specs/`
(the grids compile their cells), each side its own copy of `specs/`. Prints medians and
quartiles of wall time and of the process's CPU time (user + system), the least CPU time
(what a run costs when nothing else interferes: the steadiest figure on a shared machine),
and the ratios current/baseline.
This is a benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import io
import resource
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
    """`percepdsl/`, `grammars/` and `specs/` of a commit (None: the working tree) under dest."""
    dest.mkdir(parents=True)
    if rev is None:
        for d in ("percepdsl", "grammars", "specs"):
            shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        data = subprocess.run(["git", "archive", rev, "percepdsl", "grammars", "specs"], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
    (dest / "percepdsl" / "grammars").symlink_to("../grammars")  # what the installed package's mapping does
    return dest


def run_once(tree: Path, specs: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of one `percep check` process; it must find no error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "percepdsl", "check", *specs], cwd=tree, capture_output=True)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:  # an error would skip work (a grid's cells) and time less than a clean check
        raise SystemExit(f"percep check reported errors in {tree}:\n{proc.stdout.decode()[-2000:]}{proc.stderr.decode()[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision to compare against (default: main)")
    ap.add_argument("--current", default=None, help="git revision measured against it (default: the working tree)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-check-"))
    try:
        trees = {"baseline": export(args.baseline, tmp / "baseline"), "current": export(args.current, tmp / "current")}
        for name, tree in trees.items():
            mod = subprocess.run(
                [sys.executable, "-c", "import percepdsl; print(percepdsl.__file__)"], cwd=tree, capture_output=True, text=True
            )
            assert mod.stdout.strip().startswith(str(tree)), f"{name} imports {mod.stdout.strip()}"
        sets = {  # paths relative to each tree: each side checks its own specs
            "quickstart.pd": ["specs/quickstart.pd"],
            "all specs + grids": [str(p.relative_to(trees["current"])) for p in sorted((trees["current"] / "specs").rglob("*.pd"))],
        }
        current = args.current or "working tree"
        print(f"baseline {args.baseline}  vs  {current}; {args.rounds} rounds, alternating; python {sys.version.split()[0]}")
        print(f"{'specs':<20} {'side':<9} {'wall s':>7} {'q1':>7} {'q3':>7} {'cpu s':>7} {'q1':>7} {'q3':>7} {'cpu min':>8}")
        for label, specs in sets.items():
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
            for tree in trees.values():
                run_once(tree, specs)  # bytecode and parse tables written
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
                for name, tree in order:
                    times[name].append(run_once(tree, specs))
            med = {}
            for name, xs in times.items():
                cols = []
                for i in (0, 1):
                    v = [x[i] for x in xs]
                    q = statistics.quantiles(v, n=4)
                    med[name, i] = statistics.median(v)
                    cols.append(f"{med[name, i]:7.3f} {q[0]:7.3f} {q[2]:7.3f}")
                med[name, 2] = min(x[1] for x in xs)
                print(f"{label:<20} {name:<9} {' '.join(cols)} {med[name, 2]:8.3f}")
            wall, cpu, least = (med["current", i] / med["baseline", i] for i in (0, 1, 2))
            print(f"{label:<20} ratio current/baseline: wall {wall:.3f}, cpu {cpu:.3f} (medians), cpu {least:.3f} (minima)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
