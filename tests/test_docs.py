"""The documentation: the MkDocs site builds in strict mode (every internal link and anchor
resolves), the language reference is the catalogue's, the README's links hold, and what the pages
show is what the code does: every spec shown checks, every command's flags exist, every repository
path and test named exists, every diagnostic code is listed, and the example diagnostics are printed."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from percepdsl.catalogue import BUILTINS, Catalogue, _entry_from_toml
from percepdsl.check import check_file
from percepdsl.docs import main, reference
from percepdsl.fmt import format_text
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


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPEC_WORDS = re.compile(
    r"(experiment|grid|include|param|seed|task|model|roles|stage|eval|trainer|template|axis|zip|seeds|reward|token_weights)\b"
)
GRPO_SETTINGS = ("reward", "token_weights")  # snippets of a grpo stage's body, one setting a line


def _fenced(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, info string, body, the `<!-- pd-check: ... -->` note just above it) of each fenced block."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        note = re.match(r"<!-- pd-check: (.*?) -->", before)
        out.append((text[: m.start()].count("\n") + 1, m.group(1).strip(), m.group(2), note.group(1) if note else ""))
    return out


def _code_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _without_comments(text: str) -> str:
    """The text with comments and blank lines dropped (no spec shown here has `#` inside a string)."""
    return "\n".join(re.sub(r"\s*#[^\"\n]*$", "", line) for line in _code_lines(text)) + "\n"


def _canonical(text: str) -> str:
    out, diags = format_text(_without_comments(text))
    assert out is not None, [d.message for d in diags]
    return "\n".join(line for line in out.splitlines() if line.strip())


def _pd_blocks() -> list[tuple[str, str, str]]:
    return [(f"{p.relative_to(ROOT)}:{line}", body, note) for p in DOCS for line, info, body, note in _fenced(p) if info == "pd"]


def test_every_spec_shown_is_fenced_as_pd() -> None:
    """A block that reads as spec text is fenced ```pd, so the next test checks it."""
    untagged = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in DOCS
        for line, info, body, _ in _fenced(p)
        if info in ("", "text") and _code_lines(body) and SPEC_WORDS.match(_code_lines(body)[0])
    ]
    assert not untagged, untagged
    assert len(_pd_blocks()) >= 10


def test_every_spec_shown_in_the_docs_checks(tmp_path: Path) -> None:
    """Every ```pd block checks with no error, in a copy of specs/ (so its includes and templates resolve):
    a whole spec or grid as a file of its own, a fragment as an include fragment, `reward = ...` and
    `token_weights ...` lines each in a grpo stage (with the example plugin's `brevity` term known). A block
    whose first line names a shipped file (`# specs/...`) is that file, comments and layout aside. A
    `<!-- pd-check: CODE ... -->` line above a block names the errors it is meant to have."""
    specs = tmp_path / "specs"
    shutil.copytree(ROOT / "specs", specs)
    plugin = tomllib.loads((ROOT / "examples/plugin/percep_example_plugin/percep_catalogue.toml").read_text(encoding="utf-8"))
    catalogue = Catalogue((*BUILTINS, *(_entry_from_toml(e, "percep-example-plugin") for e in plugin["entry"])))
    problems = []
    for where, body, note in _pd_blocks():
        lines = _code_lines(body)
        head = body.lstrip().splitlines()[0]
        named = re.match(r"# (specs/\S+\.pd)\b", head)
        if named:
            if _canonical(body) != _canonical((ROOT / named.group(1)).read_text(encoding="utf-8")):
                problems.append(f"{where}: differs from {named.group(1)}")
        first = lines[0].split()[0]
        if first in GRPO_SETTINGS:
            texts = [
                'experiment doc\nseed 1\ninclude "common/gc_base.pd"\n'
                f"stage rl = grpo from base {{\n  steps = 10\n  {line}\n{'' if line.startswith('reward') else '  reward = outcome'}\n}}\n"
                for line in lines
            ]
            target, fragment_ok = specs / "doc.pd", False
        elif first in ("experiment", "grid"):
            texts, fragment_ok = [body], False
            target = specs / ("grids" if first == "grid" else "") / "doc.pd"
        else:
            texts, target, fragment_ok = [body], specs / "common" / "doc.pd", True
        expected = sorted(note.split()[:1])
        for text in texts:
            target.write_text(text, encoding="utf-8")
            res = check_file(target, catalogue=catalogue, fragment_ok=fragment_ok)
            errors = sorted(d.code for d in res.diagnostics if d.is_error)
            if errors != expected:
                problems.append(f"{where}: {[(d.code, d.message) for d in res.diagnostics if d.is_error]} (expected {expected})")
    assert not problems, "\n".join(problems)


def test_the_diagnostics_example_is_what_check_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The language tour's example output: `percep check` of the shipped spec with the two edits it names."""
    from typer.testing import CliRunner

    from percepdsl.cli import app

    page = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    shown = re.search(r"```\n(specs/gc_sft_fixed\.pd:.*?)```", page, re.S).group(1)
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    spec = tmp_path / "specs" / "gc_sft_fixed.pd"
    text = spec.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^(param lam: .*\n)", r"\1param beta: float = 1.0\n", text, count=1)
    spec.write_text(text.replace("mean(perception)", "mean(perceptoin)"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["check", "specs/gc_sft_fixed.pd"])
    assert res.exit_code == 1
    assert res.stdout == shown


def _emitted_codes() -> set[str]:
    """The diagnostic codes the checker's source spells out (as tests/test_golden.py reads them)."""
    pattern = re.compile(r'\b(?:error|warning)\(\s*[^,()]*(?:\([^()]*\))?[^,()]*,\s*f?"([a-z]+(?:-[a-z]+)*)"')
    found = {m.group(1) for p in (ROOT / "percepdsl").rglob("*.py") for m in pattern.finditer(p.read_text(encoding="utf-8"))}
    assert len(found) > 40, "the pattern no longer finds the checker's codes"
    # spelt where the pattern cannot see them: f"unknown-{kind}", a conditional code, a call over several lines
    return found | {"unknown-task", "unknown-model", "unknown-reward", "cell-error"}


def test_the_language_tour_lists_every_diagnostic_code_and_no_other() -> None:
    page = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    section = page[page.index("All problems of a file") : page.index("Hostile input")]
    emitted = _emitted_codes()
    words = set(re.findall(r"`([a-z]+(?:-[a-z]+)*)`", section))
    # a one-word code (`syntax`, `type`) is told from the settings and names the list mentions by being a code
    named = {w for w in words if "-" in w or w in emitted}
    named |= {"unknown" + suffix for suffix in re.findall(r"`(-[a-z-]+)`", section)}
    assert not emitted - named, f"codes the checker emits that docs/language.md does not list: {sorted(emitted - named)}"
    assert not named - emitted, f"codes docs/language.md lists that the checker never emits: {sorted(named - emitted)}"


def _command_lines() -> list[tuple[str, str]]:
    """(where, text) of every line of the docs, `\\`-continued lines joined."""
    return [
        (f"{p.relative_to(ROOT)}:{i}", line)
        for p in DOCS
        for i, line in enumerate(p.read_text(encoding="utf-8").replace("\\\n", " ").splitlines(), 1)
    ]


def test_every_percep_command_shown_exists_with_its_flags() -> None:
    from typer.main import get_command

    from percepdsl.cli import app

    commands = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} for name, cmd in get_command(app).commands.items()}
    bad = []
    for where, line in _command_lines():
        for m in re.finditer(r"\bpercep ([a-z]+)((?: +[^`#|\s]+)*)", line):
            sub, rest = m.groups()
            if sub == "then":  # Lua in editor.md: `if not configs.percep then`
                continue
            if sub not in commands:
                bad.append(f"{where}: no command `percep {sub}`")
                continue
            bad += [
                f"{where}: `percep {sub}` has no {flag}"
                for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest)
                if flag not in commands[sub]
            ]
    assert not bad, bad


def test_every_benchmark_command_shown_exists_with_its_flags() -> None:
    flags: dict[str, set[str]] = {}
    bad = []
    for where, line in _command_lines():
        for m in re.finditer(r"\b(benchmarks/\w+\.py)((?: +[^`#|\s]+)*)", line):
            script, rest = m.groups()
            if script not in flags:
                source = (ROOT / script).read_text(encoding="utf-8") if (ROOT / script).exists() else None
                if source is None:
                    bad.append(f"{where}: no {script}")
                    continue
                flags[script] = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', source)) | {"--help"}
            bad += [
                f"{where}: {script} has no {flag}"
                for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", rest)
                if flag not in flags[script]
            ]
    assert flags, "the docs name benchmark scripts"
    assert not bad, bad


def test_every_repository_path_and_test_the_docs_name_exists() -> None:
    """`specs/...`, `tests/x.py::test_y`, `runtime/...` and the like, in backticks: each names a file (or folder)
    that exists, and a named test a function of that file."""
    roots = ("specs/", "tests/", "runtime/", "percepdsl/", "benchmarks/", "examples/", "editors/", "grammars/", "docs/", ".ci/")
    bad = []
    for where, line in _command_lines():
        for token in re.findall(r"`([^`\s]+)`", line):
            path, _, test = token.partition("::")
            if not path.startswith(roots) or any(c in path for c in "<*{"):
                continue
            if not (ROOT / path).exists():
                bad.append(f"{where}: {path} does not exist")
            elif test and not re.search(
                rf"def {re.escape(test.rstrip('*'))}" + ("" if test.endswith("*") else r"\("), (ROOT / path).read_text(encoding="utf-8")
            ):
                bad.append(f"{where}: {path} has no {test}")
    assert not bad, bad
