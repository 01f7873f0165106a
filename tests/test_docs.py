"""The documentation: the MkDocs site builds in strict mode (every internal link and anchor
resolves), the language reference is the catalogue's, and the README's links and example hold."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from percepdsl.catalogue import BUILTINS
from percepdsl.check import check_file
from percepdsl.docs import main, reference
from percepdsl.ir import content_hash
from percepdsl.parse import grammar_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (it is in the dev extra)")
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for e in BUILTINS:
        assert e.name in page, e.name
    assert not (site / "hooks.py").exists()


def test_the_reference_states_every_setting_as_the_catalogue_does(tmp_path: Path) -> None:
    text = reference()
    for e in BUILTINS:
        if e.kind == "keyword":
            assert f"| `{e.name}` |" in text, e.name
            continue
        section = text[text.index(f"### `{e.name}`\n\n{e.doc}") :]
        for p in e.params:
            row = next(line for line in section.splitlines() if line.startswith(f"| `{p.name}` |"))
            assert p.describe_type() in row.replace("\\|", "|"), (e.name, p.name, row)
            if not (p.required or p.variadic):
                assert f"`{p.default_text()}`" in row, (e.name, p.name, row)
        if e.impl:
            assert f"Implemented by `{e.impl}`." in section
    assert grammar_text().rstrip() in text
    assert main(["--out", str(tmp_path / "reference.md")]) == 0
    assert (tmp_path / "reference.md").read_text(encoding="utf-8") == text


def test_the_readme_links_point_at_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links into docs/"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_the_readme_example_is_the_quickstart(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```\n(experiment .*?)```", readme, re.S).group(1)
    (tmp_path / "common").mkdir()
    shutil.copy(ROOT / "specs" / "common" / "roles.pd", tmp_path / "common" / "roles.pd")
    (tmp_path / "quickstart.pd").write_text(example, encoding="utf-8")
    shown, shipped = check_file(tmp_path / "quickstart.pd"), check_file(ROOT / "specs" / "quickstart.pd")
    assert not shown.diagnostics, [d.message for d in shown.diagnostics]
    assert content_hash(shown.ir) == content_hash(shipped.ir)


def test_the_readme_headline_table_is_the_one_command_report_s() -> None:
    """The README leads with the headline table of `benchmarks/reproduce.py`'s report, row for row (its links
    made relative to the repository), so every figure there traces to the parts' report.json."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    report = ROOT / "benchmarks" / "results" / "reproduce" / "report.md"
    section = readme.split("## Headline results", 1)[1].split("\n## ", 1)[0]
    shown = [line for line in section.splitlines() if line.startswith("| F") or line.startswith("| issue")]
    table = report.read_text(encoding="utf-8").split("## Headline\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [re.sub(r"\]\(", "](benchmarks/results/reproduce/", line) for line in table.splitlines()[2:]]
    assert shown == rows


def test_nothing_points_at_documents_outside_the_repository() -> None:
    outside = re.compile(r"\bD[E]SIGN\b|\.\./[s]hared/")  # written so that this line does not match itself
    files = [ROOT / "README.md"] + [
        p
        for d in ("percepdsl", "runtime", "specs", "docs", "tests", "examples", "benchmarks", "editors", "grammars")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".md", ".pd", ".lark", ".toml") and p != Path(__file__).resolve()
    ]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits
