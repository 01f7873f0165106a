"""Language-server latency: from `textDocument/didChange` to `publishDiagnostics`.

    python benchmarks/bench_lsp.py                    # 300-line spec, prints a table
    python benchmarks/bench_lsp.py --lines 600 --edits 50 --json out.json

A real client (pygls) drives `python -m percepdsl.lsp` over stdio. Timed, for a spec of
`--lines` lines (a chain of SFT stages with comments, then GRPO and eval):

* **check in process** — `check_file(path, text=...)` alone: the floor.
* **isolated edit** — one didChange after a pause (a user who stops typing), until the
  publishDiagnostics of that version arrives. Three kinds of edit alternate: a valid
  change, one that introduces a checker error, one that breaks the syntax.
* **burst** — a word typed one character every `--keystroke-ms`; latency from the last
  keystroke to the diagnostics of the final version (the debounce coalesces the burst).
* **hover / completion** — request round trips on the same document, at a position
  near its end (the context scan reads the text up to the cursor).

Goal: isolated edits under 100 ms. This is a benchmark, not a test: nothing asserts.
The server's own share is the difference between the first two rows; the rest is
`check_file` (parse and check), which grows linearly with the spec.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from percepdsl.check import check_file  # noqa: E402
from percepdsl.lsp.server import DEFAULT_DEBOUNCE_MS  # noqa: E402
from percepdsl.lsp.testing import LspSession, spec_of_lines  # noqa: E402


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return {"n": len(xs), "median_ms": statistics.median(xs), "p95_ms": p95, "min_ms": xs[0], "max_ms": xs[-1]}


def edits_of(text: str, i: int) -> str:
    kind = i % 3
    if kind == 0:  # valid
        return text.replace("steps = 400", f"steps = {400 + i + 1}", 1)
    if kind == 1:  # a checker error
        return text.replace("batch = 8", "batch = 0", 1)
    return text.replace("steps = 400", "steps = = 400", 1)  # a syntax error


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-lsp-"))
    spec = tmp / "bench.pd"
    text = spec_of_lines(args.lines)
    spec.write_text(text, encoding="utf-8")
    n_lines = text.count("\n")

    check_ms = []
    check_file(spec, text=text)
    for i in range(args.edits):
        t0 = time.perf_counter()
        check_file(spec, text=edits_of(text, i))
        check_ms.append((time.perf_counter() - t0) * 1000)

    out: dict = {
        "lines": n_lines,
        "debounce_ms": args.debounce_ms if args.debounce_ms is not None else DEFAULT_DEBOUNCE_MS,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "check_in_process": stats(check_ms),
    }
    async with LspSession(cwd=tmp, debounce_ms=args.debounce_ms) as s:
        uri = s.open(spec, text)
        await s.diagnostics(uri, version=1)
        by_kind: dict[str, list[float]] = {"valid": [], "checker error": [], "syntax error": []}
        for i in range(args.edits):
            await asyncio.sleep(args.pause_ms / 1000)
            sent = s.change(uri, edits_of(text, i))
            t, _ = await s.publication(uri, version=s.version[uri])
            by_kind[("valid", "checker error", "syntax error")[i % 3]].append((t - sent) * 1000)
        out["isolated_edit"] = stats([x for v in by_kind.values() for x in v])
        out["isolated_edit_by_kind"] = {k: stats(v) for k, v in by_kind.items() if v}

        bursts = []
        for b in range(args.bursts):
            await asyncio.sleep(args.pause_ms / 1000)
            base = s.texts[uri]
            word = f"# typed note {b}"
            cur = base
            sent = 0.0
            for ch in word:
                cur = cur + ch
                sent = s.change(uri, cur)
                await asyncio.sleep(args.keystroke_ms / 1000)
            t, _ = await s.publication(uri, version=s.version[uri])
            bursts.append((t - sent) * 1000)
            s.change(uri, text)
            await s.publication(uri, version=s.version[uri])
        out["burst_last_keystroke"] = stats(bursts)

        hov, comp = [], []
        for _ in range(args.edits):
            t0 = time.perf_counter()
            await s.hover(uri, s.at(uri, "lam *", last=True))  # near the end: the scan covers the whole text
            hov.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await s.complete(uri, s.at(uri, "batch = 8", last=True))
            comp.append((time.perf_counter() - t0) * 1000)
        out["hover"] = stats(hov)
        out["completion"] = stats(comp)
    out["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--pause-ms", type=float, default=250, help="quiet time before each isolated edit")
    ap.add_argument("--keystroke-ms", type=float, default=40, help="interval between keystrokes of a burst")
    ap.add_argument("--debounce-ms", type=int, default=None, help=f"server debounce (default {DEFAULT_DEBOUNCE_MS})")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    res = asyncio.run(run(args))
    print(f"percep lsp latency — {res['lines']}-line spec, debounce {res['debounce_ms']} ms, Python {res['python']} ({res['machine']})")
    print(f"{'measure':42} {'n':>4} {'median':>9} {'p95':>9} {'max':>9}")
    rows = [("check_file in process", res["check_in_process"]), ("didChange → publishDiagnostics (isolated)", res["isolated_edit"])]
    rows += [(f"  {k}", v) for k, v in res["isolated_edit_by_kind"].items()]
    rows += [
        ("burst: last keystroke → diagnostics", res["burst_last_keystroke"]),
        ("hover round trip", res["hover"]),
        ("completion round trip", res["completion"]),
    ]
    for name, st in rows:
        print(f"{name:42} {st['n']:>4} {st['median_ms']:>7.1f}ms {st['p95_ms']:>7.1f}ms {st['max_ms']:>7.1f}ms")
    iso = res["isolated_edit"]
    print(
        f"goal: isolated edit under 100 ms — median {iso['median_ms']:.0f} ms ({'met' if iso['median_ms'] < 100 else 'NOT met'}), "
        f"p95 {iso['p95_ms']:.0f} ms ({'met' if iso['p95_ms'] < 100 else 'NOT met'})"
    )
    print(f"machine: {res['cpus']} CPUs, load average {res['load']:.2f} during the run (p95 and max move with load)")
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
