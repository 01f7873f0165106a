"""The spec language: robustness, formatter, overrides, hashing and the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from percepdsl.check import check_file, check_text, parse_overrides
from percepdsl.fmt import format_text
from percepdsl.ir import content_hash
from percepdsl.parse import decode

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").rglob("*.pd"))
PERCEP = [sys.executable, "-m", "percepdsl"]


def run_cli(*args: str, input: bytes | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*PERCEP, *args], input=input, capture_output=True, cwd=cwd, timeout=120)


# ---- reference specs -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_reference_specs_check_clean(spec: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    res = check_file(spec)
    assert res.diagnostics == [], [d.message for d in res.diagnostics]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_reference_specs_are_formatted(spec: Path) -> None:
    text = spec.read_text(encoding="utf-8")
    out, diags = format_text(text)
    assert out == text


def test_a_fragment_stage_may_start_from_a_stage_of_its_includer(tmp_path: Path) -> None:
    (tmp_path / "warm.pd").write_text("stage warm = sft from base { steps = 5 }\n")
    assert check_file(tmp_path / "warm.pd").diagnostics == []  # alone: `base` may come from the includer
    head = 'experiment e\ninclude "warm.pd"\ntask graph_coloring { nodes = 4 }\n'
    assert check_file(tmp_path / "ok.pd", text=head + "stage base = sft { steps = 5 }\n").ok
    res = check_file(tmp_path / "bad.pd", text=head + "stage bass = sft { steps = 5 }\n")
    assert [d.code for d in res.diagnostics if d.is_error] == ["unknown-stage"]
    assert "did you mean `bass`" in res.diagnostics[0].hint


# ---- formatter -------------------------------------------------------------------------------


MESSY = """experiment   demo # trailing on header
param lam:float=0.25
# a leading comment
seed 3
include "common/roles.pd"
task graph_coloring{nodes=4..6,edge_prob=0.4 image=64px, # opening
  train = 100 # trailing on train

  # leading on test
  test = 20
  # end of block
}
stage base=sft{steps=10 loss=lam*mean(perception)+(1-lam)*mean(reasoning,answer)}
stage rl = grpo from base { steps = 2, reward = gate(0.5*outcome+0.5*(perception_match), by=format) }
# end of file
"""


def test_fmt_is_idempotent_and_keeps_comments_and_meaning(tmp_path: Path) -> None:
    spec = tmp_path / "messy.pd"
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "roles.pd").write_text((ROOT / "specs/common/roles.pd").read_text())
    spec.write_text(MESSY)
    out, _ = format_text(MESSY)
    assert out is not None
    again, _ = format_text(out)
    assert again == out
    comments = [line.split("#", 1)[1].strip() for line in MESSY.splitlines() if "#" in line]
    for c in comments:
        assert c in out, f"comment {c!r} lost"
    before = check_file(spec)
    spec.write_text(out)
    after = check_file(spec)
    assert before.ok and after.ok
    assert before.ir == after.ir and content_hash(before.ir) == content_hash(after.ir)


IDENT = st.sampled_from(["lam", "alpha", "x", "steps", "perception"])
ATOM = st.one_of(IDENT, st.integers(0, 999).map(str), st.sampled_from(["0.5", "1e-3", "64px", '"s"', "true", "none"]))


def _expr(depth: int = 3):
    if depth == 0:
        return ATOM
    sub = _expr(depth - 1)
    return st.one_of(
        ATOM,
        st.tuples(sub, st.sampled_from(["+", "-", "*", "/"]), sub).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        sub.map(lambda s: f"({s})"),
        sub.map(lambda s: f"-{s}"),
        st.lists(sub, max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
        st.tuples(IDENT, st.lists(sub, max_size=2)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs=st.lists(_expr(), min_size=1, max_size=4), comment=st.booleans())
def test_fmt_round_trip_property(exprs: list[str], comment: bool) -> None:
    body = "\n".join(f"  k{i} = {e}" + ("  # c" if comment else "") for i, e in enumerate(exprs))
    text = f"experiment p\ntask graph_coloring {{\n{body}\n}}\nstage s = sft {{ steps = 1 }}\n"
    out, diags = format_text(text)
    if out is None:
        return  # the generator can produce text that does not parse (e.g. `none(...)`); fine
    assert format_text(out)[0] == out
    a, b = check_text(text, "p.pd"), check_text(out, "p.pd")
    assert [(d.code, d.message) for d in a.diagnostics] == [(d.code, d.message) for d in b.diagnostics]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text: str) -> None:
    res = check_text(text, "fuzz.pd")
    for d in res.diagnostics:
        assert d.span.line >= 1 and d.span.column >= 1


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    text, diags = decode(data, "bin.pd")
    if text is not None:
        check_text(text, "bin.pd")
    else:
        assert diags and diags[0].code == "encoding"


# ---- hostile inputs: each gives a located diagnostic, never a traceback ----------------------------

HOSTILE = {
    "empty": b"",
    "binary": bytes(range(256)),
    "undecodable": b"experiment x\nseed \xff\xfe\n",
    "long_line": b"experiment x\nseed " + b"1+" * 100_000 + b"1\n",
    "deep_parens": b"experiment x\nseed " + b"(" * 3000 + b"1" + b")" * 3000 + b"\n",
    "huge_number": b"experiment x\nseed " + b"9" * 400 + b"\n",
    "huge_float": b"experiment x\ntask graph_coloring { edge_prob = 1" + b"0" * 400 + b".5 }\n",
    "nul": b"experiment x\x00\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_inputs_give_located_diagnostics(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pd"
    path.write_bytes(HOSTILE[name])
    proc = run_cli("check", "--format", "json", str(path), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    diags = json.loads(proc.stdout)
    assert diags and all(d["severity"] in ("error", "warning") for d in diags)
    for d in diags:
        assert d["line"] >= 1 and d["column"] >= 1 and d["end_line"] >= d["line"]


def test_missing_file_is_a_diagnostic(tmp_path: Path) -> None:
    proc = run_cli("check", str(tmp_path / "nope.pd"), cwd=tmp_path)
    assert proc.returncode == 1
    assert b"error[missing-file]: no such file" in proc.stdout
    assert b"Traceback" not in proc.stderr


def test_a_directory_without_specs_is_an_error(tmp_path: Path) -> None:
    """`percep check DIR` / `percep fmt DIR` with no .pd under DIR (a mistyped folder) checked
    nothing and exited 0; it is an error located at the directory."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a spec")
    proc = run_cli("check", "empty", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.decode().startswith("empty:1:1: error[missing-file]: no .pd files in the directory empty")
    fmt = run_cli("fmt", "--check", "empty", cwd=tmp_path)
    assert fmt.returncode == 1 and b"no .pd files in the directory empty" in fmt.stderr


# ---- CLI contract ----------------------------------------------------------------------------------


def test_check_text_format_and_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pd"
    bad.write_text("experiment x\ntask graph_coloring { edge_prob = 2 }\nstage s = sft { steps = 1 }\n")
    proc = run_cli("check", str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    first = proc.stdout.decode().splitlines()[0]
    assert first == "bad.pd:2:35: error[out-of-range]: `edge_prob` must be between 0 and 1, got 2"
    assert "^" in proc.stdout.decode()
    good = run_cli("check", "specs/quickstart.pd", "specs/gc_sft_fixed.pd")
    assert good.returncode == 0, good.stdout.decode()
    assert good.stdout.decode().strip().endswith("2 files checked: 0 errors, 0 warnings")


def test_check_json_lists_all_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pd", tmp_path / "b.pd"
    a.write_text("experiment a\nparam beta: float = 0.1\ntask graph_coloring {}\nstage s = sft { steps = 1 }\n")
    b.write_text("experiment b\ntask graph_colorin {}\nstage s = sft { steps = 1 }\n")
    proc = run_cli("check", "--format", "json", "a.pd", "b.pd", cwd=tmp_path)
    assert proc.returncode == 1
    diags = json.loads(proc.stdout)
    assert {(d["file"], d["code"], d["severity"]) for d in diags} == {
        ("a.pd", "unused-param", "warning"),
        ("b.pd", "unknown-task", "error"),
    }
    task = next(d for d in diags if d["code"] == "unknown-task")
    assert (task["line"], task["column"], task["end_line"], task["end_column"]) == (2, 6, 2, 19)
    assert task["hint"] == "did you mean `graph_coloring`?"


def test_warnings_do_not_fail(tmp_path: Path) -> None:
    a = tmp_path / "a.pd"
    a.write_text("experiment a\nparam beta: float = 0.1\ntask graph_coloring {}\nstage s = sft { steps = 1 }\n")
    assert run_cli("check", "a.pd", cwd=tmp_path).returncode == 0


def test_check_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom percepdsl.cli import app\n"
        "try:\n    app(['check', 'specs/quickstart.pd'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nassert 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()


def test_compile_json_and_schema() -> None:
    proc = run_cli("compile", "specs/gc_sft_fixed.pd", "--json", "--set", "lam=0.25")
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    post = next(s for s in doc["ir"]["stages"] if s["name"] == "post")
    assert [t["weight"] for t in post["loss"]["terms"]] == [0.25, 0.75]
    schema = json.loads(run_cli("schema").stdout)
    assert "ExperimentIR" in schema["$defs"]
    proc = run_cli("compile", "specs/gc_grpo_surrogate.pd")  # the summary names each stage's loss or reward
    assert proc.returncode == 0 and b"rl = grpo from warm: 200 steps, reward self_consistency" in proc.stdout, proc.stderr.decode()


def test_compile_refuses_errors_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pd"
    bad.write_text("experiment x\ntask graph_coloring {}\n")
    proc = run_cli("compile", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and b"missing-block" in proc.stderr


def test_fmt_check_mode(tmp_path: Path) -> None:
    f = tmp_path / "x.pd"
    f.write_text("experiment x\ntask graph_coloring{}\nstage s=sft{steps=1}\n")
    assert run_cli("fmt", "--check", "x.pd", cwd=tmp_path).returncode == 1
    assert run_cli("fmt", "x.pd", cwd=tmp_path).returncode == 0
    assert run_cli("fmt", "--check", "x.pd", cwd=tmp_path).returncode == 0
    assert f.read_text() == "experiment x\ntask graph_coloring {}\nstage s = sft { steps = 1 }\n"


# ---- --set overrides and hashing --------------------------------------------------------------------


def test_set_overrides_are_type_checked(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    ok = check_file("specs/gc_sft_fixed.pd", {"lam": "0.1"})
    assert ok.ok and ok.ir.params["lam"] == 0.1
    bad_type = check_file("specs/gc_sft_fixed.pd", {"lam": '"high"'})
    assert [d.code for d in bad_type.diagnostics] == ["type"]
    unknown = check_file("specs/gc_sft_fixed.pd", {"lamb": "0.1"})
    assert unknown.diagnostics[0].code == "unknown-param" and "did you mean `lam`" in unknown.diagnostics[0].hint
    out_of_range = check_file("specs/gc_sft_fixed.pd", {"lam": "1.5"})
    assert {d.code for d in out_of_range.diagnostics} == {"out-of-range"}
    assert "set by --set" in out_of_range.diagnostics[0].related[0].message
    seed = check_file("specs/gc_sft_fixed.pd", {"seed": "9"})
    assert seed.ir.seed == 9
    expr = check_file("specs/gc_sft_fixed.pd", {"lam": "1 - 0.5"})
    assert expr.diagnostics[0].code == "bad-override"
    _, bad = parse_overrides(["lam"])
    assert bad[0].code == "bad-override"
    for name, text, why in (("lam", "1e400", "number `1e400`"), ("seed", "1" + "0" * 20, "integer with 21 digits")):
        (huge,) = check_file("specs/gc_sft_fixed.pd", {name: text}).diagnostics
        assert huge.code == "bad-override" and huge.message == f"cannot parse the value of `--set {name}={text}`: {why} is too large"


def test_hash_ignores_formatting_and_comments_but_not_meaning(tmp_path: Path) -> None:
    base = "experiment h\nparam lam: float = 0.5\ntask graph_coloring { nodes = 5 }\nstage s = sft { steps = 10, loss = lam * mean(perception) + (1 - lam) * mean(reasoning, answer) }\n"
    noisy = "# comment\nexperiment   h\nparam lam:float=0.5 # c\ntask graph_coloring{nodes=5}\n\n\nstage s=sft{\n steps=10\n loss=lam*mean(perception)+(1-lam)*mean(reasoning,answer)\n}\n"

    def h(text: str, o: dict | None = None) -> str:
        return content_hash(check_text(text, "h.pd", o).ir)

    assert h(base) == h(noisy)
    assert h(base) != h(base, {"lam": "0.4"})
    assert h(base) != h(base.replace("steps = 10", "steps = 11"))
    assert h(base) == h(base, {"lam": "0.5"})  # same value, same run
    # token_mean() and a mean over every role are the same loss, hence the same run
    tm = (
        'experiment h\nroles { a = between("<a>", "</a>"), b = rest() }\ntask graph_coloring {}\nstage s = sft { steps = 1, loss = LOSS }\n'
    )
    assert h(tm.replace("LOSS", "token_mean()")) == h(tm.replace("LOSS", "mean(a, b)"))


def test_hash_is_stable_across_processes() -> None:
    code = "from percepdsl.check import check_file; from percepdsl.ir import content_hash; print(content_hash(check_file('specs/quickstart.pd').ir))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, cwd=ROOT, env={"PYTHONHASHSEED": s, "PATH": ""}, timeout=60
        ).stdout
        for s in ("1", "2")
    }
    assert len(outs) == 1 and len(outs.pop().strip()) == 12


def test_schedules_fold_into_the_ir(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    ir = check_file("specs/gc_sft_scheduled.pd").ir
    terms = ir.stage("post").loss.terms
    assert (terms[0].weight.kind, terms[0].weight.start, terms[0].weight.end) == ("linear", 0.1, 0.5)
    assert (terms[1].weight.start, terms[1].weight.end) == pytest.approx((0.9, 0.5))
    lr = ir.stage("base").lr
    assert lr.kind == "cosine" and lr.warmup == 100


@pytest.mark.parametrize("written", ["a\x00b.pd", "a" * 300 + ".pd", "x/" + "b" * 300 + "/c.pd"], ids=["nul", "long-name", "long-dir"])
def test_an_include_path_no_file_can_have_is_a_located_diagnostic(written: str, tmp_path: Path) -> None:
    """A NUL byte in the path was `ValueError: embedded null byte`; a name too long, an OSError."""
    spec = tmp_path / "s.pd"
    spec.write_text(f'experiment p\ninclude "{written}"\ntask graph_coloring {{}}\nstage base = sft {{ steps = 1 }}\n')
    grid = tmp_path / "g.pd"
    grid.write_text(f'grid g\ntemplate "{written}"\n')
    for path in (spec, grid):
        proc = run_cli("check", "--format", "json", str(path), cwd=tmp_path)
        assert b"Traceback" not in proc.stderr and proc.returncode == 1
        [d] = json.loads(proc.stdout)
        assert d["code"] in ("missing-include", "missing-file") and (d["line"], d["column"]) == (2, 9 if path == spec else 10)
    if "\x00" in written:
        assert "`a\\x00b.pd` cannot exist" in d["message"]
        text = run_cli("check", str(spec), cwd=tmp_path).stdout.decode()
        assert 'include "a␀b.pd"' in text and "\x00" not in text


@pytest.mark.parametrize(
    "setting, code",
    [
        ("lr = linear(1e-3, 0) / 0", "division-by-zero"),  # was ZeroDivisionError
        ("lr = linear(1e-3, 0) - linear(1e-3, 0)", "schedule-arith"),  # was TypeError / AttributeError
        ("lr = linear(1e-3, 0) * cosine(1, 2)", "schedule-arith"),
        ("lr = linear(1e-3, 0) * 1e300 * 1e300", "bad-number"),
        ("eval_every = 999999999999999999 * 999999999999999999", "bad-number"),  # beyond what the IR's JSON holds
    ],
)
def test_arithmetic_that_cannot_be_folded_is_a_diagnostic(setting: str, code: str) -> None:
    res = check_text(f"experiment p\ntask graph_coloring {{}}\nstage base = sft {{ steps = 10, {setting} }}\n", "p.pd")
    assert [d.code for d in res.diagnostics] == [code]
    assert res.diagnostics[0].span.line == 3


def test_a_reward_divided_into_infinity_is_a_diagnostic() -> None:
    text = "experiment p\ntask graph_coloring {}\nstage base = sft { steps = 1 }\nstage rl = grpo from base { steps = 1, reward = outcome / 1e-320 }\n"
    assert [d.code for d in check_text(text, "p.pd").diagnostics] == ["bad-number"]  # the IR held `Infinity`


@pytest.mark.parametrize("template", ["common/roles.pd", "grids/smoke.pd"])
def test_a_template_that_is_not_a_whole_spec_is_a_template_error(template: str, tmp_path: Path, monkeypatch) -> None:
    """A fragment or a grid as a grid's template crashed (`'NoneType' object has no attribute 'params'`)."""
    monkeypatch.chdir(ROOT)
    res = check_text(f'grid g\ntemplate "{template}"\nseeds 1..2\n', "g.pd", base_dir=ROOT / "specs")
    assert res.diagnostics[0].code == "template-error", res.diagnostics


def test_fmt_stdin_that_is_not_utf8_is_an_encoding_error() -> None:
    proc = run_cli("fmt", "-", input=b"experiment \xff\n")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr  # was UnicodeDecodeError
    assert b"<stdin>:1:12: error[encoding]" in proc.stderr


def _closed(*fds: int):
    import os

    return lambda: [os.close(fd) for fd in fds]


def test_closed_standard_streams_are_said_not_tracebacks() -> None:
    """A command started with stdin or stdout closed (`<&-`, `>&-`: a daemon, a cron job) gets
    `sys.stdin` / `sys.stdout` None: `percep fmt -` and `percep lsp` ended in `'NoneType' object has
    no attribute 'buffer'`, `percep check` in `... no attribute 'isatty'`. Now fmt - and lsp say that
    stdin is closed (fmt's exit 1, lsp's 2), and a closed stdout takes what would be printed (the
    exit code still says the outcome)."""
    spec = str(ROOT / "specs" / "sft_smoke.pd")
    cmd = [sys.executable, "-m", "percepdsl"]
    fmt = subprocess.run([*cmd, "fmt", "-"], capture_output=True, text=True, preexec_fn=_closed(0), cwd=ROOT)
    assert fmt.returncode == 1 and "Traceback" not in fmt.stderr and "error: cannot read the spec from stdin: it is closed" in fmt.stderr
    lsp = subprocess.run([*cmd, "lsp"], capture_output=True, text=True, preexec_fn=_closed(0), cwd=ROOT, timeout=30)
    assert lsp.returncode == 2 and "Traceback" not in lsp.stderr and "stdin is closed" in lsp.stderr
    for args, rc in (([spec], 0), ([spec, "--set", "nope=1"], 1)):
        chk = subprocess.run([*cmd, "check", *args], stderr=subprocess.PIPE, text=True, preexec_fn=_closed(1), cwd=ROOT)
        assert chk.returncode == rc and "Traceback" not in chk.stderr, chk.stderr


def test_fmt_reports_a_file_it_cannot_write(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import percepdsl.io
    from percepdsl.cli import app

    for name in ("a.pd", "b.pd"):
        (tmp_path / name).write_text("experiment   x\n")
    written = []

    def write(path, text, newline=None):
        if Path(path).name == "a.pd":
            raise PermissionError(13, "Permission denied")
        written.append(Path(path).name)

    monkeypatch.setattr(percepdsl.io, "write_text_atomic", write)
    res = CliRunner().invoke(app, ["fmt", str(tmp_path / "a.pd"), str(tmp_path / "b.pd")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert f"percep: cannot write {tmp_path / 'a.pd'}: Permission denied" in res.output
    assert written == ["b.pd"] and "reformatted" in res.output


@pytest.mark.parametrize("spec", [p for p in SPECS if p.parent.name != "common"], ids=lambda p: str(p.relative_to(ROOT)))
def test_compile_summarises_every_reference_spec(spec: Path, monkeypatch) -> None:
    """`percep compile` without --json prints a line per stage (a GRPO stage raised AttributeError: no `loss`)."""
    from typer.testing import CliRunner

    from percepdsl.cli import app

    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["compile", str(spec.relative_to(ROOT))])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "stage" in res.output or "cells" in res.output


@pytest.mark.parametrize(
    "lines, message",
    [
        ("axis lam = 1..999999999999999999", "axis `lam` has 999999999999999999 values (limit 10000)"),  # was spelled out: memory
        ("seeds 1..999999999999999", "`seeds` has 999999999999999 values (limit 10000)"),
        ("axis lam = [0.1]\naxis steps = 1..9000\nseeds 1..20", "the grid's axes and seeds span 180000 combinations (limit 100000)"),
        ("axis lam = [0.1]\nseeds -2..1", "a seed must be between 0 and 2147483647, got -2"),
    ],
)
def test_grid_ranges_are_bounded_before_they_are_spelled_out(lines: str, message: str) -> None:
    text = f'grid g\ntemplate "../gc_sft_fixed.pd"\n{lines}\n'
    res = check_text(text, "g.pd", base_dir=ROOT / "specs" / "grids")
    assert [d.message for d in res.diagnostics] == [message]


@pytest.mark.parametrize("digits", ["\uff10.5", "\u0661", "1\u0660"])  # fullwidth 0, Arabic-Indic 1, 1 then Arabic-Indic 0
def test_numbers_are_ascii_digits(digits: str) -> None:
    """The number token matched `\\d`, which in Python's regex is any Unicode digit: `lam = ０.5` in a
    spec, or `--set lam=١`, was read as 0.5 or 1 (the IR's value, not the text) while editors and
    the docs know only 0-9. Now such a digit is a located syntax error like any other stray character."""
    spec = (ROOT / "specs" / "sft_smoke.pd").read_text()
    res = check_text(spec.replace("param lam: float = 0.5", f"param lam: float = {digits}"), "p.pd", base_dir=ROOT / "specs")
    assert res.ir is None and {d.code for d in res.diagnostics if d.is_error} == {"syntax"}
    assert res.diagnostics[0].span.line == 3 and "unexpected character" in res.diagnostics[0].message
    res = check_text(spec, "p.pd", overrides={"lam": digits}, base_dir=ROOT / "specs")
    assert res.ir is None and [d.code for d in res.diagnostics if d.is_error] == ["bad-override"]


def test_a_set_value_that_is_not_utf8_is_a_bad_override(tmp_path: Path) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates: `--set name="\\xff"` for a
    str param passed the checker and ended `percep compile` / `percep run` in a UnicodeEncodeError
    traceback when the IR was hashed. A spec file with such bytes is an encoding error; now the
    --set value is one too (exit 2 from compile, 1 from check)."""
    spec = tmp_path / "s.pd"
    spec.write_text((ROOT / "specs" / "sft_smoke.pd").read_text().replace("seed 0", 'seed 0\nparam name: str = "a"'))
    (tmp_path / "common").symlink_to(ROOT / "specs" / "common")
    overrides, diags = parse_overrides(['name="\udcff"'])
    assert overrides == {} and [d.code for d in diags] == ["bad-override"] and "not valid UTF-8" in diags[0].message
    for cmd, rc in (("compile", 2), ("check", 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "percepdsl", cmd, str(spec), "--set", b'name="\xff"'], capture_output=True, cwd=ROOT, timeout=120
        )
        assert proc.returncode == rc and b"Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
        assert b"error[bad-override]" in proc.stderr + proc.stdout


def test_an_include_that_is_a_loop_or_a_directory_says_which(tmp_path: Path) -> None:
    """An include naming a symlink loop said `cannot exist` with the help `a file name cannot contain
    a NUL or other control character`, which is not why; one naming a directory `x.pd` beside other
    specs said `does not exist` (the did-you-mean hid that it is a directory). Now each says what it is."""
    (tmp_path / "loop.pd").symlink_to(tmp_path / "loop.pd")
    (tmp_path / "dir.pd").mkdir()
    (tmp_path / "dirs.pd").write_text("")
    for target, message, hint in (
        ("loop.pd", "included file `loop.pd` is a symbolic link loop", "point the link at a spec file"),
        ("dir.pd", "included file `dir.pd` is a directory", "did you mean `dirs.pd`?"),
    ):
        res = check_text(f'experiment x\ninclude "{target}"\n', "s.pd", base_dir=tmp_path)
        d = next(d for d in res.diagnostics if d.code == "missing-include")
        assert d.message == message and hint in d.hint, (d.message, d.hint)


def test_fmt_check_of_stdin_checks_and_dash_goes_alone() -> None:
    """`percep fmt --check -` ignored --check: it printed the formatted text and exited 0 for input
    that is not formatted. Now it changes and prints nothing, and exits 1 saying `would reformat
    <stdin>` (0 for formatted input). `percep fmt - FILE` read `-` as a file name (`no such file:
    -`); now it says that `-` goes alone."""
    proc = run_cli("fmt", "--check", "-", input=b"experiment  a\n")
    assert proc.returncode == 1 and proc.stdout == b"" and b"would reformat <stdin>" in proc.stderr
    proc = run_cli("fmt", "--check", "-", input=b"experiment a\n")
    assert proc.returncode == 0 and proc.stdout == b"", proc.stderr
    proc = run_cli("fmt", "-", "specs/sft_smoke.pd", input=b"experiment a\n")
    assert proc.returncode == 2 and b"`-` (stdin) goes alone" in proc.stderr and b"no such file" not in proc.stderr


def test_a_template_that_is_a_loop_or_a_directory_says_which(tmp_path: Path) -> None:
    """The grid template's path had the include's wrong messages: a symlink loop `cannot exist` (a NUL
    in the name), a directory `does not exist`."""
    (tmp_path / "loop.pd").symlink_to(tmp_path / "loop.pd")
    (tmp_path / "dir.pd").mkdir()
    for target, message in (("loop.pd", "is a symbolic link loop"), ("dir.pd", "is a directory")):
        res = check_text(f'grid g\ntemplate "{target}"\nseeds 1..2\n', "g.pd", base_dir=tmp_path)
        d = next(d for d in res.diagnostics if d.code == "missing-file")
        assert d.message == f"template spec `{target}` {message}", d.message


def test_a_grid_sweeping_a_param_the_template_never_uses_is_an_error(tmp_path: Path) -> None:
    """`axis unused = [1, 2]` over a param the template declares but never uses made cells with different
    params (so different IR hashes and run directories) that trained the very same run: no diagnostic, a
    grid twice as long and "arms" whose difference is pure noise. Now the cells are compared by what they
    train (the IR without params and seed) and such an axis is a located error."""
    spec = (ROOT / "specs" / "sft_smoke.pd").read_text().replace("seed 0", "seed 0\nparam unused: int = 3")
    (tmp_path / "common").symlink_to(ROOT / "specs" / "common")
    (tmp_path / "t.pd").write_text(spec)
    grid = 'grid g\ntemplate "t.pd"\naxis lam = [0.25, 0.75]\naxis unused = [1, 2]\nseeds [0, 1]\n'
    res = check_text(grid, "g.pd", base_dir=tmp_path)
    errors = [d for d in res.diagnostics if d.is_error]
    assert res.ir is None and [d.code for d in errors] == ["duplicate-cell"]
    assert errors[0].span.line == 4, "located at the axis that sweeps the unused param"
    assert "lam=0.25 unused=1 and lam=0.25 unused=2 train the same run" in errors[0].message
    assert "the template never uses `unused`" in errors[0].message
    fine = check_text(grid.replace("axis unused = [1, 2]\n", ""), "g.pd", base_dir=tmp_path)
    assert fine.ok, [d.message for d in fine.diagnostics]
    fixed = check_text(grid.replace("axis unused = [1, 2]", "fix unused = 2"), "g.pd", base_dir=tmp_path)  # no repeat, but no effect
    assert fixed.ok and [(d.code, d.span.line) for d in fixed.diagnostics] == [("unused-param", 4)]


def test_a_template_param_without_a_default_may_be_left_to_the_grid(tmp_path: Path) -> None:
    """`param lam: float` (no default) in a template whose grid sweeps `lam` was refused as a template
    error ("has no default and is not set"), though every cell sets it. A param the grid leaves unset is still one."""
    spec = (ROOT / "specs" / "sft_smoke.pd").read_text().replace("param lam: float = 0.5", "param lam: float")
    (tmp_path / "common").symlink_to(ROOT / "specs" / "common")
    (tmp_path / "t.pd").write_text(spec)
    for axis in ("axis lam = [0.25, 0.75]", "zip { lam = [0.25, 0.75] }", "fix lam = 0.25"):
        res = check_text(f'grid g\ntemplate "t.pd"\n{axis}\nseeds [0, 1]\n', "g.pd", base_dir=tmp_path)
        assert res.ok, (axis, [d.message for d in res.diagnostics])
    bad = check_text('grid g\ntemplate "t.pd"\nseeds [0, 1]\n', "g.pd", base_dir=tmp_path)
    assert bad.ir is None and {d.code for d in bad.diagnostics if d.is_error} == {"template-error", "unset-param"}
    out_of_range = check_text('grid g\ntemplate "t.pd"\naxis lam = [1.5, 0.5]\n', "g.pd", base_dir=tmp_path)
    assert [d.code for d in out_of_range.diagnostics if d.is_error] == ["cell-error"]


@pytest.mark.parametrize(
    "where, message",
    [
        ('lam < 0.5 or steps == "4"', "`where` compares a number with a string"),  # dropped every steps=4 cell, silently
        ("lam == true", "`where` compares a number with a bool"),
        ('steps + "a" > 1', "`where` arithmetic is on numbers"),
    ],
)
def test_a_where_filter_comparing_a_param_with_a_value_of_another_type_is_an_error(where: str, message: str) -> None:
    text = f'grid g\ntemplate "../gc_sft_fixed.pd"\naxis lam = [0.1, 0.5]\nwhere {where}\n'
    res = check_text(text, "g.pd", base_dir=ROOT / "specs" / "grids")
    errors = [d for d in res.diagnostics if d.is_error]
    assert res.ir is None and [(d.code, d.message, d.span.line) for d in errors] == [("type", message, 4)]


def test_a_cell_error_points_at_the_axis_that_broke_the_cell() -> None:
    """It pointed at the grid's first axis whatever broke the cell: here `steps`, when `lam = 1.5` is out of range."""
    text = 'grid g\ntemplate "../gc_sft_fixed.pd"\naxis steps = [300, 600]\naxis lam = [0.25, 1.5]\n'
    res = check_text(text, "g.pd", base_dir=ROOT / "specs" / "grids")
    errors = [d for d in res.diagnostics if d.is_error]
    assert errors and all(d.code == "cell-error" and "lam=1.5" in d.message and d.span.line == 4 for d in errors)


def test_a_where_on_the_template_seed_and_params_counts_the_cells_the_grid_runs(tmp_path: Path) -> None:
    """`where seed == 1` in a grid without `seeds` read the seed as missing (None): every cell was dropped
    ("the grid has no cells"), though the template's seed is 1. And `percep compile GRID` expanded the
    grid without the template's params, so a `where` on one (`steps > 2`) counted 0 cells."""
    (tmp_path / "g.pd").write_text('grid g\ntemplate "../gc_sft_fixed.pd"\naxis lam = [0.1, 0.5]\nwhere seed == 1 and lam < 0.3\n')
    res = check_text((tmp_path / "g.pd").read_text(), "g.pd", base_dir=ROOT / "specs" / "grids")
    assert res.ok, [d.message for d in res.diagnostics]
    (tmp_path / "h.pd").write_text(f'grid h\ntemplate "{ROOT}/specs/gc_sft_fixed.pd"\naxis lam = [0.1, 0.5]\nseeds 1..3\nwhere steps > 2\n')
    res = run_cli("compile", str(tmp_path / "h.pd"))
    assert res.returncode == 0 and res.stdout.splitlines()[-1].endswith(b": 6 cells"), (res.stdout, res.stderr)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
@pytest.mark.parametrize(
    "cmd,rc",
    [
        (["check"], 1),
        (["fmt"], 1),
        (["fmt", "--check"], 1),
        (["compile"], 2),
        (["run"], 2),
        (["grid", "--dry-run"], 2),
        (["gen", "-o", "g"], 2),
        (["probe"], 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_a_spec_that_is_not_a_regular_file_is_refused_not_read(cmd: list[str], rc: int, tmp_path: Path) -> None:
    """`percep check fifo.pd` (and every other command that reads a spec) blocked for ever on a named pipe
    and on /dev/zero read until memory ran out; includes and templates naming one were already refused as
    "not a regular file". The file named on the command line is refused the same way, located, with the
    command's exit code, and nothing is read from it."""
    import os

    os.mkfifo(tmp_path / "fifo.pd")
    for target in ("fifo.pd", "/dev/zero"):
        proc = subprocess.run([*PERCEP, *cmd, target], capture_output=True, cwd=tmp_path, timeout=30)
        out = (proc.stdout + proc.stderr).decode()
        assert proc.returncode == rc, (target, proc.returncode, out[-2000:])
        assert "Traceback" not in out and f"{target}:1:1: error[missing-file]: spec file `{target}` is not a regular file" in out, out


def test_a_huge_spec_file_is_refused_unread(tmp_path: Path) -> None:
    """A checkpoint or data file named by mistake (`percep check model.safetensors`) was read whole into
    memory, decoded and parsed; one of gigabytes took minutes or the machine's memory. A spec file is
    refused past `MAX_SPEC_BYTES`, after reading no more than that."""
    from percepdsl.check.load import MAX_SPEC_BYTES

    big = tmp_path / "big.pd"
    with open(big, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB of NULs that take no disk
    (d,) = check_file(big).diagnostics
    assert d.code == "missing-file" and d.message == f"spec file `{big}` is larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec", d.message


def test_rendering_many_diagnostics_of_a_long_file_takes_linear_time() -> None:
    """Each rendered diagnostic split the whole source into lines again: 40,000 warnings of a 40,000-line
    spec took 84 s to print (1 s to check). The lines are split once per source."""
    import time

    from percepdsl.diagnostics import Diagnostic, Severity, Span, render

    n = 20_000
    source = "".join(f"param p{i}: int = {i}\n" for i in range(n))
    diags = [Diagnostic("s.pd", Span(i + 1, 7, i + 1, 9), Severity.WARNING, "unused-param", "unused") for i in range(n)]
    start = time.perf_counter()
    out = [render(d, source) for d in diags]
    assert time.perf_counter() - start < 5
    assert out[-1].splitlines()[2] == f"{n} | param p{n - 1}: int = {n - 1}"


def test_check_reads_a_spec_on_stdin_with_includes_from_the_working_directory() -> None:
    """`percep check -`: a spec piped in (an editor's buffer, a generated spec) checks as its file would,
    located as `<stdin>`, its includes resolved against the working directory. A named pipe given as a file
    is refused (it may never end), so `-` is the way to pipe one in; `-` beside files is a usage error."""
    text = (ROOT / "specs" / "quickstart.pd").read_bytes()
    proc = run_cli("check", "-", input=text, cwd=ROOT / "specs")
    assert proc.returncode == 0 and b"1 file checked: 0 errors" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli("check", "-", input=text.replace(b"token_mean()", b"token_maen()"), cwd=ROOT / "specs")
    assert proc.returncode == 1 and b"<stdin>:" in proc.stdout and b"token_mean" in proc.stdout and b"Traceback" not in proc.stderr
    proc = run_cli("check", "-", input=text, cwd=ROOT)  # includes are relative to the working directory
    assert proc.returncode == 1 and b"missing-include" in proc.stdout
    proc = run_cli("check", "-", "specs/quickstart.pd", input=text)
    assert proc.returncode == 2 and b"`-` (stdin) goes alone" in proc.stderr
