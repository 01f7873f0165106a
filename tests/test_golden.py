"""Golden files: the rendered diagnostics of every error kind, and the IR of reference specs.

Regenerate after an intended change with `PERCEP_UPDATE_GOLDEN=1 pytest tests/test_golden.py`
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from percepdsl.check import check_file
from percepdsl.diagnostics import render, summary_line
from percepdsl.ir import content_hash

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("PERCEP_UPDATE_GOLDEN") == "1"
ERROR_SPECS = sorted((GOLDEN / "errors").glob("*.pd"))
IR_SPECS = [
    "specs/quickstart.pd",
    "specs/gc_sft_fixed.pd",
    "specs/gc_sft_ngdiff.pd",
    "specs/gc_grpo_surrogate.pd",
    "specs/gc_cot_arms.pd",
    "specs/grids/lambda_sweep.pd",
]


def _compare(path: Path, actual: str) -> None:
    if UPDATE or not path.exists():
        path.write_text(actual, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"golden file {path.name} was missing and has been written; review it and rerun")
    assert actual == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("spec", ERROR_SPECS, ids=lambda p: p.stem)
def test_diagnostics_golden(spec: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    res = check_file(spec.relative_to(ROOT))
    sources = res.loaded.sources if res.loaded else {}
    text = "\n".join(render(d, sources.get(d.file)) for d in res.diagnostics) + "\n" + summary_line(1, res.diagnostics) + "\n"
    _compare(spec.with_suffix(".expected"), text)
    assert res.diagnostics, "every golden error spec must produce diagnostics"


@pytest.mark.parametrize("spec", IR_SPECS, ids=lambda p: Path(p).stem)
def test_ir_golden(spec: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    res = check_file(spec, fragment_ok=False)
    assert res.ok, [d.message for d in res.diagnostics]
    doc = {"hash": content_hash(res.ir), "ir": res.ir.model_dump(mode="json")}
    _compare(GOLDEN / "ir" / (Path(spec).stem + ".json"), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def test_every_diagnostic_code_is_pinned_by_a_test() -> None:
    """Each code the checker emits (spelled out in its source) appears in a golden file's
    rendered diagnostics or in a test that names it, so a code that stops firing fails a test."""
    import re

    emitted = {
        m.group(1)
        for path in (ROOT / "percepdsl").rglob("*.py")
        for m in re.finditer(
            r'\b(?:error|warning)\(\s*[^,()]*(?:\([^()]*\))?[^,()]*,\s*f?"([a-z]+(?:-[a-z]+)*)"', path.read_text(encoding="utf-8")
        )
    }
    assert len(emitted) > 40, "the pattern no longer finds the checker's codes"
    golden = "".join(p.read_text(encoding="utf-8") for p in (GOLDEN / "errors").glob("*.expected"))
    tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("*.py") if p.name != "test_golden.py")
    unpinned = sorted(c for c in emitted if f"[{c}]" not in golden and f'"{c}"' not in tests and f"[{c}]" not in tests)
    assert not unpinned, f"diagnostic codes no golden file or test names: {unpinned}"
