"""The language server (`percep lsp`).

Two layers:
- the features as functions of a document (completion contexts, hover, definition,
  outline, diagnostics conversion, positions) — fast, in process;
- the server driven by a real LSP client over stdio (pygls's client, the server in a
  subprocess): initialize, didOpen, didChange, didSave, didClose, hover, completion,
  definition, documentSymbol, formatting, codeAction, shutdown and exit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lsprotocol import types as T
from typer.testing import CliRunner

from percepdsl.check import check_file
from percepdsl.cli import app
from percepdsl.lsp import features as F
from percepdsl.lsp import scan as S
from percepdsl.lsp.testing import ROOT, LspSession, spec_of_lines

COMMON = textwrap.dedent("""\
    param lam: float = 0.3   # perception weight
    roles {
      perception = between("<perception>", "</perception>")
      reasoning  = between("<reasoning>", "</reasoning>")
      answer     = between("<answer>", "</answer>")
    }
""")

MAIN = textwrap.dedent("""\
    experiment demo
    include "common.pd"
    seed 7

    task graph_coloring { nodes = 4..6  edge_prob = 0.4  image = 64px }
    model tiny { width = 256  depth = 4 }

    # the base stage teaches the format
    stage base = sft { steps = 600  lr = cosine(1e-3, warmup = 50)  loss = token_mean() }
    stage post = sft from base {
      steps = 400
      loss = lam * mean(perception) + (1 - lam) * mean(reasoning, answer)
    }
    stage rl = grpo from post { steps = 200  group = 8  kl = 0.02  reward = 0.3 * perception_match + 0.7 * outcome }
    eval { every = 100  metrics = [end_to_end, perception, reasoning] }
""")


@pytest.fixture()
def project_dir(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "common.pd").write_text(COMMON, encoding="utf-8")
    (tmp_path / "main.pd").write_text(MAIN, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _project(path: Path, text: str) -> F.Project:
    return F.Project(F.Doc(text, path, path.as_uri()))


def _marked(marked: str) -> tuple[str, int]:
    off = marked.index("|")
    return marked[:off] + marked[off + 1 :], off


def _labels(path: Path, marked: str) -> list[str]:
    text, off = _marked(marked)
    return [i.label for i in F.complete(_project(path, text), off, F.Encoder())]


def _hover(path: Path, text: str, needle: str, delta: int = 0) -> str | None:
    h = F.hover(_project(path, text), text.index(needle) + delta, F.Encoder())
    return h.contents.value if h is not None else None


# ---- completion in context -------------------------------------------------------------------


def test_completion_contexts(project_dir: Path) -> None:
    p = project_dir / "main.pd"
    # top level: statement keywords, single-use ones already present left out
    top = _labels(p, MAIN + "|")
    assert {"stage", "param", "trainer", "include"} <= set(top)
    assert not {"experiment", "seed", "task", "eval", "grid"} & set(top)
    assert _labels(p, "|") and "grid" in _labels(p, "|")
    # heads
    assert _labels(p, "task |") == ["graph_coloring", "sudoku", "dataset"]
    assert _labels(p, "task gr|")[0] == "graph_coloring"
    assert _labels(p, "model |") == ["tiny", "hf"]
    assert _labels(p, "stage s = |") == ["sft", "grpo"]
    assert _labels(p, "stage s = sft |") == ["from"]
    assert _labels(p, MAIN.replace("stage post = sft from base", "stage post = sft from |base")) == ["base", "rl"]
    assert _labels(p, "param x: |") == ["int", "float", "bool", "str"]
    # block keys: the settings of that block not yet set
    keys = _labels(p, MAIN.replace("steps = 400", "steps = 400\n  |"))
    assert "lr" in keys and "batch" in keys and "steps" not in keys and "loss" not in keys
    assert "group" in _labels(p, "stage r = grpo from base { |")
    assert _labels(p, "task graph_coloring { nodes = 5 |")[:2] == ["edge_prob", "edges"]
    assert "width" in _labels(p, "model tiny { |")
    assert _labels(p, 'model hf "/m" { |') == ["dtype", "lora"]
    assert _labels(p, 'model hf "/m" { lora { r = 8 | } }') == ["alpha", "dropout", "target_modules"]
    assert "every" in _labels(p, "eval { |") and "precision" in _labels(p, "trainer { |")
    assert _labels(p, "roles { |") == ["perception", "reasoning", "answer"]
    # values
    loss = _labels(p, MAIN.replace("loss = lam", "loss = |lam"))
    assert {"token_mean", "mean", "ngdiff", "lam"} <= set(loss) and "outcome" not in loss
    assert _labels(p, MAIN.replace("mean(reasoning", "mean(|reasoning")) == ["perception", "reasoning", "answer"]
    assert _labels(p, "stage s = sft { loss = ngdiff(perception, [|") == ["perception", "reasoning", "answer"]
    assert "auto_lr =" in _labels(p, "stage s = sft { loss = ngdiff(perception, |")
    reward = _labels(p, MAIN.replace("reward = 0.3", "reward = |0.3"))
    assert {"outcome", "perception_match", "gate", "lam"} <= set(reward) and "mean" not in reward
    assert _labels(p, "task graph_coloring { layout = |") == ["circle", "random"]
    assert _labels(p, "task graph_coloring { perception_format = a|") == ["edges", "adjacency"]
    assert _labels(p, "task sudoku { size = |")[:2] == ["4", "9"]
    assert {"start =", "end =", "warmup ="} <= set(_labels(p, "stage s = sft { steps = 1 lr = cosine(1e-3, |"))
    assert "cosine" in _labels(p, "stage s = sft { steps = 1 lr = |")
    assert _labels(p, "roles { p = |") == ["between", "regex", "rest", "visual"]
    assert _labels(p, MAIN + "roles { g = visual(reference = |) }") == ["none", "base", "post", "rl"]
    assert _labels(p, "eval { metrics = [end_to_end, |") == [
        "end_to_end",
        "perception",
        "perception_partial",
        "reasoning",
        "format_ok",
        "visual_dependency",
    ]
    assert _labels(p, "stage s = grpo { token_weights { perception = 2 |") == ["reasoning", "answer"]
    assert _labels(p, "stage s = grpo { token_weights = |") == ["none", "ngdiff"]
    assert _labels(p, "stage s = grpo { token_weights = ngdiff(perception, [|") == ["perception", "reasoning", "answer"]
    assert _labels(p, "trainer { clip = |")[0] == "none"
    assert _labels(p, "stage s = grpo { mask_truncated = |")[:2] == ["true", "false"]
    # nothing in comments and numbers
    assert _labels(p, "# task |") == []
    assert _labels(p, "seed 12|") == []
    # include paths
    assert _labels(p, 'include "|') == ["common.pd"]


def test_completion_tolerates_broken_text(project_dir: Path) -> None:
    p = project_dir / "main.pd"
    # an unclosed block above does not hide the block the cursor is in
    broken = "experiment x\nstage a = sft {\n  steps = 3\n\nstage b = grpo from a { |"
    assert "reward" in _labels(p, broken)
    # an unclosed call on an earlier line ends at the next `key =`
    broken = "stage a = sft {\n  loss = mean(perception\n  |\n}"
    assert "perception" in _labels(p, broken)  # still inside mean(
    broken = "stage a = sft {\n  loss = mean(perception\n  steps = 3\n  |\n}"
    assert "lr" in _labels(p, broken) and "steps" not in _labels(p, broken)
    # grids: axes name the template's params
    (project_dir / "sweep.pd").write_text('grid sweep\ntemplate "main.pd"\n', encoding="utf-8")
    assert _labels(project_dir / "sweep.pd", 'grid sweep\ntemplate "main.pd"\naxis |') == ["lam"]
    assert "axis" in _labels(project_dir / "sweep.pd", 'grid sweep\ntemplate "main.pd"\n|')


def test_scanner_recovers_statements_and_blocks() -> None:
    text = "stage a = sft {\n  steps = 3\n  loss = mean(perc\nstage b = sft from a { steps = 1 }\nreport [a, b\nseed 3\n"
    o = S.outline(text)
    assert [s.kw for s in o.stmts] == ["stage", "stage", "report", "seed"]
    assert o.stmts[0].block.keys() == ["steps", "loss"] and o.stmts[0].block.close is None
    assert o.stmts[1].stage_parent().text == "a"
    deep = "seed " + "(" * 5000 + "1" + ")" * 5000 + "\n" + "task x {" * 3000
    S.outline(deep)  # no recursion
    assert S.context_at(deep, len(deep)).kind == "key"


def test_scanner_tables_are_the_grammars() -> None:
    """Every word the grammar spells out is a keyword the scanner knows, every other
    literal token of the grammar scans as one operator token."""
    from lark import Lark

    from percepdsl.parse import grammar_text

    lark = Lark(grammar_text(), parser="lalr")
    literals = {t.pattern.value for t in lark.terminals if t.pattern.type == "str"}
    words = {w for w in literals if w.isalpha()}
    assert words == S.STATEMENT_KEYWORDS | S.OPERATOR_WORDS | {"true", "false", "none"}
    assert S.OPERATOR_WORDS == {"and", "or", "not", "from"}
    for op in sorted(literals - words) + ["+", "-", "*", "/", "==", "<=", "<", ">"]:
        toks, _ = S.tokenize(op)
        assert [(t.kind, t.text) for t in toks] == [("op", op)]


def test_a_keyword_added_to_the_grammar_reaches_the_scanner(tmp_path: Path) -> None:
    """A new statement `budget EXPR` in the grammar only: the scanner outlines it as a statement."""
    code = textwrap.dedent(
        """
        import percepdsl.parse as P
        text = P.grammar_text()
        text = text.replace("?spec_item: experiment |", "?spec_item: experiment | budget |")
        text = text.replace("seed: \\"seed\\" expr", "seed: \\"seed\\" expr\\nbudget: \\"budget\\" expr")
        assert "budget" in text
        P.grammar_text = lambda: text
        from percepdsl.lsp import scan as S
        assert "budget" in S.SPEC_KEYWORDS and "budget" not in S.GRID_KEYWORDS
        o = S.outline("stage a = sft {\\n  steps = 3\\nbudget 5\\n")
        print([s.kw for s in o.stmts])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['stage', 'budget']"


# ---- hover, definition, outline -----------------------------------------------------------------


def test_hover(project_dir: Path) -> None:
    p = project_dir / "main.pd"
    h = _hover(p, MAIN, "lam *")
    assert "param lam: float = 0.3" in h and "perception weight" in h and "common.pd" in h
    h = _hover(p, MAIN, "perception)")
    assert 'perception = between("<perception>", "</perception>")' in h
    h = _hover(p, MAIN, "from base", 5)
    assert "stage base = sft" in h and "initial model" in h and "the base stage teaches the format" in h
    assert "optimizer steps" in _hover(p, MAIN, "steps = 400")
    assert "**cosine** — schedule" in _hover(p, MAIN, "cosine")
    assert "linear ramp from 0" in _hover(p, MAIN, "warmup = 50")
    assert "**perception_match** — reward" in _hover(p, MAIN, "perception_match")
    assert "**perception** — metric" in _hover(p, MAIN, "perception, reasoning]")
    assert "**graph_coloring** — task" in _hover(p, MAIN, "graph_coloring")
    assert "**sft** — block" in _hover(p, MAIN, "sft from")
    assert "`stage NAME = sft|grpo" in _hover(p, MAIN, "stage post")
    assert "three-way evaluation" in _hover(p, MAIN, "eval {")
    assert "node count" in _hover(p, MAIN, "nodes")
    text = MAIN.replace("nodes = 4..6", "layout = random")
    assert "one of the choices of `layout`" in _hover(p, text, "random")
    assert _hover(p, MAIN, "4..6") is None
    assert _hover(p, MAIN, "# the base", 3) is None
    # hover works on text that does not parse
    broken = "stage a = sft {\n  steps = \n  loss = mean(perception"
    assert "optimizer steps" in _hover(p, broken, "steps")
    assert "**mean** — loss" in _hover(p, broken, "mean")


def test_definition_and_symbols(project_dir: Path) -> None:
    p = project_dir / "main.pd"
    enc = F.Encoder()

    def where(needle: str, delta: int = 0):
        locs = F.definition(_project(p, MAIN), MAIN.index(needle) + delta, enc)
        return [(Path(loc.uri.removeprefix("file://")).name, loc.range.start.line, loc.range.start.character) for loc in locs]

    assert where("lam *") == [("common.pd", 0, 6)]
    assert where("perception)") == [("common.pd", 2, 2)]
    assert where("from base", 5) == [("main.pd", 8, 6)]
    assert where('"common.pd"', 3) == [("common.pd", 0, 0)]
    assert where("graph_coloring") == []
    syms = F.document_symbols(F.Doc(MAIN, p), enc)
    assert [(s.name, s.kind) for s in syms][:3] == [
        ("demo", T.SymbolKind.Module),
        ("common.pd", T.SymbolKind.File),
        ("seed", T.SymbolKind.Constant),
    ]
    post = next(s for s in syms if s.name == "post")
    assert post.detail == "stage sft from base" and [c.name for c in post.children] == ["steps", "loss"]
    for s in syms:  # selection inside range
        assert (s.range.start.line, s.range.start.character) <= (s.selection_range.start.line, s.selection_range.start.character)
        assert (s.selection_range.end.line, s.selection_range.end.character) <= (s.range.end.line, s.range.end.character)


def test_encoder_counts_utf16_units() -> None:
    text = "seed 1 # 🙂 é\nx"
    lines = S.Lines(text)
    for name, width in (("utf-16", 2), ("utf-32", 1), ("utf-8", 4)):
        enc = F.Encoder(name)
        pos = enc.offset_position(lines, text.index("é") + 1)
        assert pos.character == 9 + width + 1 + (2 if name == "utf-8" else 1)
        assert enc.to_offset(lines, pos) == text.index("é") + 1


# ---- diagnostics ------------------------------------------------------------------------------------


def _bad_files(d: Path) -> Path:
    (d / "frag.pd").write_text(COMMON + "param beta: float = 0.1\n", encoding="utf-8")
    text = (
        MAIN.replace("common.pd", "frag.pd")
        .replace("mean(perception)", "mean(perceptoin)")
        .replace("kl = 0.02", "kl = 0.02 temprature = 1")
    )
    (d / "bad.pd").write_text(text, encoding="utf-8")
    return d / "bad.pd"


def _cli_json(path: Path) -> list[dict]:
    res = CliRunner().invoke(app, ["check", "--format", "json", str(path.name)])
    return json.loads(res.stdout)


def test_diagnostics_are_the_checkers(project_dir: Path) -> None:
    bad = _bad_files(project_dir)
    text = bad.read_text()
    res = check_file(bad.name, text=text)
    diags = F.lsp_diagnostics(res.diagnostics, res.loaded.name, _project(bad, text), F.Encoder())
    cli = _cli_json(bad)
    assert len(diags) == len(cli) == 3
    for d, c in zip(diags, cli):
        assert d.code == c["code"] and d.source == "percep"
        if c["file"] == "bad.pd":
            assert (d.range.start.line + 1, d.range.start.character + 1, d.range.end.line + 1, d.range.end.character + 1) == (
                c["line"],
                c["column"],
                c["end_line"],
                c["end_column"],
            )
            assert d.message == c["message"] + (f"\nhelp: {c['hint']}" if "hint" in c else "")
    folded = diags[2]  # the fragment's warning sits on the include line, pointing into the fragment
    assert folded.severity == T.DiagnosticSeverity.Warning and folded.range.start.line == 1
    assert folded.message.startswith("frag.pd:7:7: param `beta`")
    assert folded.related_information[0].location.uri.endswith("/frag.pd")
    assert folded.related_information[0].location.range.start == T.Position(line=6, character=6)
    fixes = F.quick_fixes(bad.as_uri(), text, diags, F.Encoder())
    assert [f.title for f in fixes] == ["Replace `perceptoin` with `perception`", "Replace `temprature` with `temperature`"]


def test_server_import_does_not_import_torch() -> None:
    code = (
        "import sys, pathlib; import percepdsl.lsp.server as s; from percepdsl.lsp import features as F; "
        "p = pathlib.Path('x.pd'); s.server.diagnostics(p.resolve().as_uri(), 'experiment x\\nseed 1\\n'); "
        "F.complete(F.Project(F.Doc('task ', p)), 5, F.Encoder()); "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'percepdsl_runtime', 'lightning', 'transformers'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the server over stdio ---------------------------------------------------------------------------


def test_stdio_session(project_dir: Path, tmp_path: Path) -> None:
    bad = _bad_files(project_dir)
    modules = tmp_path / "modules.txt"
    cli = _cli_json(bad)

    async def scenario() -> None:
        async with LspSession(cwd=project_dir, modules_file=modules) as s:
            caps = s.capabilities
            assert caps.hover_provider and caps.definition_provider and caps.document_formatting_provider
            assert caps.document_symbol_provider and "(" in caps.completion_provider.trigger_characters
            uri = s.open(bad)
            diags = await s.diagnostics(uri, version=1)
            assert [d.code for d in diags] == [c["code"] for c in cli]
            assert [(d.range.start.line + 1, d.range.start.character + 1) for d in diags[:2]] == [(c["line"], c["column"]) for c in cli[:2]]
            # hover, completion, definition, outline, formatting, quick fixes
            h = await s.hover(uri, s.at(uri, "lam *"))
            assert h.contents.kind == T.MarkupKind.Markdown and "param lam: float = 0.3" in h.contents.value
            assert "group" not in await s.complete(uri, s.at(uri, "steps = 400"))
            assert "lr" in await s.complete(uri, s.at(uri, "steps = 400"))
            assert await s.complete(uri, s.at(uri, "graph_coloring")) == ["graph_coloring", "sudoku", "dataset"]
            locs = await s.definition(uri, s.at(uri, "from base", 5))
            assert locs[0].uri == uri and locs[0].range.start == T.Position(line=8, character=6)
            symbols = await s.symbols(uri)
            assert [x.name for x in symbols if x.kind == T.SymbolKind.Function] == ["base", "post", "rl"]
            edits = await s.format(uri)
            assert len(edits) == 1 and edits[0].new_text.startswith("experiment demo\n")
            actions = await s.code_actions(uri, diags)
            assert actions[0].title == "Replace `perceptoin` with `perception`"
            # didChange (incremental): fix the typo, diagnostics follow
            line = s.texts[uri].split("\n")[11]
            col = line.index("perceptoin")
            new_text = s.texts[uri].replace("perceptoin", "perception")
            s.edit(uri, 11, col, col + len("perceptoin"), "perception", new_text)
            diags = await s.diagnostics(uri, version=2)
            assert [d.code for d in diags] == ["unknown-setting", "unused-param"]
            # a syntax error: reported, formatting declines
            s.change(uri, new_text.replace("steps = 400", "steps = = 400"))
            diags = await s.diagnostics(uri, version=3)
            assert [d.code for d in diags] == ["syntax"]
            assert not await s.format(uri)
            # didClose clears
            t = s.published[-1][0]
            s.close(uri)
            _, p = await s.publication(uri, after=t + 1e-9)
            assert len(p.diagnostics) == 0
        assert s.returncode == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))
    loaded = set(modules.read_text().split())
    assert "pygls" in loaded and "percepdsl.check" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith(("torch.", "percepdsl_runtime"))}


def test_stdio_save_rechecks_includers_and_utf16(project_dir: Path) -> None:
    main = project_dir / "main.pd"
    frag = project_dir / "common.pd"
    emoji = project_dir / "emoji.pd"
    emoji_text = 'experiment e\nparam s: str = "🙂🙂"  param unused_x: float = 0.5\n'
    emoji.write_text(emoji_text, encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=project_dir) as s:
            m = s.open(main)
            assert len(await s.diagnostics(m, version=1)) == 0
            f = s.open(frag)
            await s.diagnostics(f, version=1)  # a fragment checked alone: what `percep check common.pd` says
            # the fragment gains an unused param and is saved: the including spec is checked again
            new = COMMON + "param beta: float = 0.1\n"
            s.change(f, new)
            frag.write_text(new, encoding="utf-8")
            t = s.published[-1][0]
            s.save(f)
            _, p = await s.publication(m, after=t)
            assert [d.code for d in p.diagnostics] == ["unused-param"]
            assert p.diagnostics[0].range.start.line == 1  # on `include "common.pd"`
            # positions are UTF-16 code units: two astral characters count four
            e = s.open(emoji)
            diags = await s.diagnostics(e, version=1)
            warn = next(d for d in diags if "unused_x" in d.message)
            col = emoji_text.split("\n")[1].index("unused_x")
            assert warn.range.start == T.Position(line=1, character=col + 2)
            h = await s.hover(e, s.at(e, "unused_x", 3))
            assert "param unused_x: float = 0.5" in h.contents.value

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stdio_diagnostics_latency_smoke(tmp_path: Path) -> None:
    """Diagnostics arrive for each edit of a 300-line spec; `benchmarks/bench_lsp.py` measures the latency."""
    spec = tmp_path / "big.pd"
    text = spec_of_lines(300)
    spec.write_text(text, encoding="utf-8")
    assert check_file(spec).diagnostics == []
    latencies = []

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            await s.diagnostics(uri, version=1)
            for i in range(3):
                await asyncio.sleep(0.2)  # an isolated edit, as when a user pauses
                new = text.replace("steps = 400", f"steps = {401 + i}", 1) if i % 2 == 0 else text.replace("batch = 8", "batch = 0", 1)
                sent = s.change(uri, new)
                t, p = await s.publication(uri, version=s.version[uri])
                latencies.append((t - sent) * 1000)
                assert bool(p.diagnostics) == (i % 2 == 1)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    print(f"didChange → publishDiagnostics, 300-line spec: {', '.join(f'{x:.0f} ms' for x in latencies)}")


# ---- robustness: any text, any position -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PIECES = st.sampled_from(
    [
        "stage",
        "task",
        "model",
        "roles",
        "eval",
        "trainer",
        "param",
        "include",
        "seed",
        "grid",
        "template",
        "axis",
        "zip",
        "where",
        "report",
        "fix",
        "experiment",
        "s",
        "base",
        "sft",
        "grpo",
        "from",
        "lam",
        "graph_coloring",
        "hf",
        "lora",
        "steps",
        "loss",
        "reward",
        "mean",
        "ngdiff",
        "cosine",
        "perception",
        "outcome",
        "=",
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        ",",
        ":",
        "..",
        "+",
        "*",
        "-",
        "1",
        "0.5",
        "64px",
        '"x.pd"',
        '"unterminated',
        "# note",
        "\n",
        " ",
        "\t",
        "🙂",
        "é",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(_PIECES, max_size=40), where=st.floats(0, 1))
def test_features_never_fail(project_dir: Path, pieces: list[str], where: float) -> None:
    text = " ".join(pieces)
    path = project_dir / "fuzz.pd"
    project = _project(path, text)
    offset = int(where * len(text))
    enc = F.Encoder()
    F.complete(project, offset, enc)
    F.hover(project, offset, enc)
    F.definition(project, offset, enc)
    for sym in F.document_symbols(project.doc, enc):
        assert (sym.range.start.line, sym.range.start.character) <= (sym.selection_range.start.line, sym.selection_range.start.character)
    res = check_file(path, text=text)
    for d in F.lsp_diagnostics(res.diagnostics, res.loaded.name, project, enc):
        assert d.range.start.line <= d.range.end.line


# ---- editors: the TextMate grammar and the VS Code manifest --------------------------------------------

EDITORS = ROOT / "editors"


def test_textmate_grammar_is_valid_and_knows_the_catalogue() -> None:
    import re

    from percepdsl.catalogue import BUILTINS

    grammar = json.loads((EDITORS / "vscode" / "syntaxes" / "percep.tmLanguage.json").read_text(encoding="utf-8"))
    assert grammar["scopeName"] == "source.percep"

    def regexes(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("match", "begin", "end"):
                    yield v
                else:
                    yield from regexes(v)
        elif isinstance(node, list):
            for v in node:
                yield from regexes(v)

    for rx in regexes(grammar):
        re.compile(rx)  # the grammar sticks to syntax Oniguruma and Python share

    def listed(name: str) -> set[str]:
        m = re.search(r"\\b\(([^)]*)\)\\b", grammar["repository"][name]["match"])
        return set(m.group(1).split("|"))

    def names(kinds, pred=lambda e: True) -> set[str]:
        return {e.name for e in BUILTINS if e.kind in kinds and pred(e)}

    assert listed("builtin-functions") == names(("loss", "schedule", "role_rule")) | names(("reward",), lambda e: bool(e.params))
    # a reward term whose parameters all have defaults is written bare or called: in both lists
    assert listed("builtin-constants") == names(("reward",), lambda e: not any(p.required for p in e.params)) | names(("metric",))
    assert listed("builtin-types") == names(("task", "model")) | {"sft", "grpo"}
    statements = re.findall(r"[a-z]+", " ".join(p["match"] for p in grammar["repository"]["statements"]["patterns"]))
    assert S.STATEMENT_KEYWORDS <= set(statements)


def test_vscode_manifest_starts_percep_lsp() -> None:
    pkg = json.loads((EDITORS / "vscode" / "package.json").read_text(encoding="utf-8"))
    lang = pkg["contributes"]["languages"][0]
    assert lang["id"] == "percep" and ".pd" in lang["extensions"]
    assert (EDITORS / "vscode" / lang["configuration"]).is_file()
    grammar = pkg["contributes"]["grammars"][0]
    assert grammar["scopeName"] == "source.percep" and (EDITORS / "vscode" / grammar["path"]).is_file()
    assert pkg["contributes"]["configuration"]["properties"]["percep.server.command"]["default"] == "percep"
    assert '"lsp"' in (EDITORS / "vscode" / pkg["main"]).read_text(encoding="utf-8")
    json.loads((EDITORS / "vscode" / "language-configuration.json").read_text(encoding="utf-8"))


def test_stdio_negotiates_utf32_positions(tmp_path: Path) -> None:
    spec = tmp_path / "e.pd"
    text = 'experiment e\nparam s: str = "🙂🙂"  param unused_x: float = 0.5\n'
    spec.write_text(text, encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path, position_encodings=["utf-32", "utf-16"]) as s:
            assert s.capabilities.position_encoding == T.PositionEncodingKind.Utf32
            uri = s.open(spec)
            warn = next(d for d in await s.diagnostics(uri, version=1) if "unused_x" in d.message)
            assert warn.range.start == T.Position(line=1, character=text.split("\n")[1].index("unused_x"))

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("uri", ["file:///tmp/a%00b.pd", "file:///tmp/" + "a" * 300 + ".pd", "untitled:Untitled-1"])
def test_server_diagnostics_for_uris_no_file_can_have(uri: str) -> None:
    """A buffer whose URI names no possible file is checked as text (a NUL in it raised ValueError)."""
    from percepdsl.lsp.server import server

    diags = server.diagnostics(uri, 'experiment x\ninclude "a\x00b.pd"\ntask graph_coloring {}\nstage base = sft { steps = 1 }\n')
    assert [d.code for d in diags] == ["missing-include"]
    assert "internal error" not in diags[0].message


def test_a_header_announcing_an_absurd_body_stops_the_server_with_one_line() -> None:
    """`Content-Length: 99999999999` made pygls allocate the body: a MemoryError traceback. The stream
    cannot be followed past it, so the server stops: one log line naming the size, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl.lsp"], input=b"Content-Length: 99999999999\r\n\r\n{}", capture_output=True, timeout=60, cwd=ROOT
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "announced 99999999999 bytes (over 64 MiB)" in err and "Traceback" not in err and "MemoryError" not in err, err


def test_malformed_message_is_one_log_line_and_the_server_goes_on() -> None:
    """A client that sends a body that is not JSON gets pygls's `window/showMessage`; the server's
    log (stderr) names the error in a line, no traceback, and the server reads on to the next
    messages (here `shutdown` and `exit`: exit status 0)."""
    shutdown_msg = b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown"}'
    exit_msg = b'{"jsonrpc": "2.0", "method": "exit"}'
    garbage = b"{garbage!}"
    stdin = b"".join(b"Content-Length: %d\r\n\r\n%s" % (len(m), m) for m in (garbage, shutdown_msg, exit_msg))
    proc = subprocess.run([sys.executable, "-m", "percepdsl.lsp"], input=stdin, capture_output=True, timeout=60, cwd=ROOT)
    err, out = proc.stderr.decode(), proc.stdout.decode()
    assert "JSONDecodeError: Expecting property name" in err and "Traceback" not in err, err
    assert "window/showMessage" in out and "Error in server" in out
    assert proc.returncode == 0


def test_stdio_diagnostics_for_a_path_the_client_percent_encodes(tmp_path: Path) -> None:
    """Clients percent-encode URIs (`my%20specs/a.pd`); pygls keys its open documents by the decoded
    URI, so the server found no open document under the client's spelling and never published."""
    folder = tmp_path / "my specs"
    folder.mkdir()
    spec = folder / "a.pd"
    frag = folder / "frag.pd"
    spec.write_text('experiment a\ninclude "frag.pd"\ntask graph_coloring {}\nstage base = sft { stepz = 10 }\n', encoding="utf-8")
    frag.write_text("param lam: float = 0.5\n", encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            assert "%20" in uri
            codes = [d.code for d in await s.diagnostics(uri, version=1, timeout=10)]
            assert "unknown-setting" in codes and "unused-param" in codes
            f = s.open(frag)
            await s.diagnostics(f, version=1, timeout=10)
            t = s.published[-1][0]
            s.save(f)  # the includer is checked again, and published under the client's own URI
            _, p = await s.publication(uri, after=t, timeout=10)
            assert p.uri == uri

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stdio_a_form_feed_in_a_comment_does_not_corrupt_incremental_edits(tmp_path: Path) -> None:
    """LSP lines end at \\n, \\r\\n or \\r only; pygls split its buffer with str.splitlines, which also
    breaks at a form feed, \\x85 or U+2028, so an edit below such a comment landed on the wrong line."""
    spec = tmp_path / "ff.pd"
    text = "experiment e  # page\x0c break\u2028 and\x85 more\ntask graph_coloring {}\nstage base = sft { steps = 10 }\n"
    spec.write_text(text, encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            assert len(await s.diagnostics(uri, version=1)) == 0
            col = text.split("\n")[2].index("steps")
            s.edit(uri, 2, col, col + 5, "stepz", text.replace("steps", "stepz"))
            diags = await s.diagnostics(uri, version=2)
            assert {d.code for d in diags} == {"unknown-setting", "missing-setting"}
            assert next(d for d in diags if d.code == "unknown-setting").range.start == T.Position(line=2, character=col)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def _raw_session(messages: list[dict], cwd: Path, end: bool = True) -> tuple[list[dict], str]:
    """Send these JSON-RPC messages (after initialize), then (if `end`) shutdown and exit; the server's messages and its log."""
    msgs, err, _ = _raw_run(messages, cwd, end)
    return msgs, err


def _raw_run(messages: list[dict], cwd: Path, end: bool = True) -> tuple[list[dict], str, int]:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"processId": None, "rootUri": None, "capabilities": {}}}
    tail = [{"jsonrpc": "2.0", "id": 999, "method": "shutdown"}, {"jsonrpc": "2.0", "method": "exit"}] if end else []
    stdin = b""
    for m in [init, {"jsonrpc": "2.0", "method": "initialized", "params": {}}, *messages, *tail]:
        body = json.dumps(m).encode()
        stdin += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    proc = subprocess.run([sys.executable, "-m", "percepdsl.lsp"], input=stdin, capture_output=True, timeout=60, cwd=cwd)
    out, msgs = proc.stdout, []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        n = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
        msgs.append(json.loads(rest[:n]))
        out = rest[n:]
    return msgs, proc.stderr.decode(), proc.returncode


def test_bad_requests_get_lsp_errors_without_tracebacks(tmp_path: Path) -> None:
    """A request for a document that is neither open nor on disk answered with pygls's internal error,
    the server's Python traceback in its `data`; a request whose params do not fit the method got no
    answer at all (the client waits forever) and a traceback in the log. Both are LSP errors now."""
    gone = (tmp_path / "gone.pd").as_uri()
    pos = {"line": 0, "character": 0}
    requests = [
        {"method": "textDocument/hover", "params": {"textDocument": {"uri": gone}, "position": pos}},
        {"method": "textDocument/completion", "params": {"textDocument": {"uri": gone}, "position": pos}},
        {"method": "textDocument/definition", "params": {"textDocument": {"uri": gone}, "position": pos}},
        {"method": "textDocument/documentSymbol", "params": {"textDocument": {"uri": gone}}},
        {"method": "textDocument/formatting", "params": {"textDocument": {"uri": gone}, "options": {"tabSize": 2, "insertSpaces": True}}},
        {"method": "textDocument/hover", "params": {"textDocument": {"uri": gone}}},  # no position
        {"method": "textDocument/hover", "params": {"textDocument": {"uri": gone}, "position": {"line": 0, "character": "x"}}},
    ]
    msgs, err = _raw_session([{"jsonrpc": "2.0", "id": i + 1, **r} for i, r in enumerate(requests)], tmp_path)
    answers = {m["id"]: m for m in msgs if "id" in m and "method" not in m}
    for i in range(1, len(requests) + 1):
        assert i in answers, f"request {i} ({requests[i - 1]['method']}) got no answer"
        e = answers[i].get("error")
        assert e is not None and e["code"] == -32602 and "Traceback" not in json.dumps(e) and "data" not in e, answers[i]
    assert "gone.pd" in answers[1]["error"]["message"]
    assert "position" in answers[6]["error"]["message"] and "character" in answers[7]["error"]["message"]
    assert answers[999].get("result", 1) is None
    assert "Traceback" not in err and "Exception Group" not in err, err


def test_shutdown_and_exit_follow_the_protocol(tmp_path: Path) -> None:
    """`exit` without `shutdown` must end the server with status 1 (pygls's sys.exit(1) was swallowed:
    always 0), and a request after `shutdown` must be answered with InvalidRequest (it got no answer)."""
    hover = {"method": "textDocument/hover", "params": {"textDocument": {"uri": "file:///x.pd"}, "position": {"line": 0, "character": 0}}}
    msgs, err, rc = _raw_run([{"jsonrpc": "2.0", "method": "exit"}], tmp_path, end=False)
    assert rc == 1, err
    msgs, err, rc = _raw_run(
        [{"jsonrpc": "2.0", "id": 1, "method": "shutdown"}, {"jsonrpc": "2.0", "id": 2, **hover}, {"jsonrpc": "2.0", "method": "exit"}],
        tmp_path,
        end=False,
    )
    answers = {m["id"]: m for m in msgs if "id" in m and "method" not in m}
    assert answers[1].get("result", 1) is None and rc == 0, err
    assert answers[2]["error"]["code"] == -32600 and "shut down" in answers[2]["error"]["message"]
    _, err, rc = _raw_run([], tmp_path, end=False)  # the client went away without shutdown
    assert rc == 1 and "Traceback" not in err, err


def test_stdio_no_quick_fix_rewrites_the_include_line(tmp_path: Path) -> None:
    """A "did you mean" problem inside an included file is shown on the `include` line; its quick
    fix replaced that whole line with the suggested name (`include "frag.pd"` → `steps`), preferred,
    so an editor's auto-fix deleted the include. The fix belongs in the fragment (open it: its own
    diagnostics carry it); on the including spec, no quick fix."""
    (tmp_path / "frag.pd").write_text("param lam: float = 0.3\nstage base = sft { stepz = 10 }\n", encoding="utf-8")
    spec = tmp_path / "main.pd"
    spec.write_text('experiment m\ninclude "frag.pd"\ntask graph_coloring {}\nstage s = sft from base { stepz = 1 }\n', encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            diags = await s.diagnostics(uri, version=1)
            folded = [d for d in diags if d.range.start.line == 1 and d.code == "unknown-setting"]
            own = [d for d in diags if d.range.start.line == 3 and d.code == "unknown-setting"]
            assert folded and own
            assert not await s.code_actions(uri, folded)
            assert [a.title for a in await s.code_actions(uri, own)] == ["Replace `stepz` with `steps`"]
            f = s.open(tmp_path / "frag.pd")
            fd = [d for d in await s.diagnostics(f, version=1) if d.code == "unknown-setting"]
            assert [a.title for a in await s.code_actions(f, fd)] == ["Replace `stepz` with `steps`"]

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stdio_an_included_file_changed_on_disk_rechecks_its_includers(tmp_path: Path) -> None:
    """Included files are read from disk, but only a save in the editor re-checked the specs that
    include them: a fragment rewritten by another program (git checkout, a generator) left stale
    diagnostics until the next keystroke. The server now watches `.pd` files (dynamic registration
    of workspace/didChangeWatchedFiles) and re-checks the open documents when one changes."""
    frag = tmp_path / "frag.pd"
    frag.write_text("param lam: float = 0.3\n", encoding="utf-8")
    spec = tmp_path / "main.pd"
    spec.write_text('experiment m\ninclude "frag.pd"\ntask graph_coloring {}\nstage s = sft { steps = 10, lr = lam }\n', encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            assert len(await s.diagnostics(uri, version=1)) == 0
            deadline = asyncio.get_running_loop().time() + 10
            while not s.registrations and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            (reg,) = [r for r in s.registrations if r.method == T.WORKSPACE_DID_CHANGE_WATCHED_FILES]
            assert [w["globPattern"] for w in reg.register_options["watchers"]] == ["**/*.pd"]
            frag.write_text("param lam: float = 0.3\nparam unused: int = 1\n", encoding="utf-8")
            t = s.published[-1][0]
            s.files_changed((frag, T.FileChangeType.Changed))
            _, p = await s.publication(uri, after=t + 1e-9)
            assert [d.code for d in p.diagnostics] == ["unused-param"] and p.diagnostics[0].range.start.line == 1
            frag.unlink()
            t = s.published[-1][0]
            s.files_changed((frag, T.FileChangeType.Deleted))
            _, p = await s.publication(uri, after=t + 1e-9)
            assert "missing-include" in [d.code for d in p.diagnostics]

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stdio_hover_and_definition_of_a_role_weighted_in_token_weights(tmp_path: Path) -> None:
    """A grpo stage's `token_weights { role = weight }` names roles as keys; completion offered them,
    but hover showed nothing and go-to-definition went nowhere (the key was looked up as a setting)."""
    (tmp_path / "roles.pd").write_text('roles {\n  percep = between("<p>", "</p>")\n  rest_ = rest()\n}\n', encoding="utf-8")
    spec = tmp_path / "main.pd"
    spec.write_text(
        'experiment m\ninclude "roles.pd"\ntask graph_coloring {}\nstage base = sft { steps = 10 }\n'
        "stage r = grpo from base { steps = 5  reward = outcome  token_weights { percep = 2, rest_ = 1 } }\n",
        encoding="utf-8",
    )

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            await s.diagnostics(uri, version=1)
            h = await s.hover(uri, s.at(uri, "percep = 2", 2))
            assert h is not None and 'percep = between("<p>", "</p>")' in h.contents.value and "role" in h.contents.value
            (loc,) = await s.definition(uri, s.at(uri, "rest_ = 1", 1))
            assert loc.uri == (tmp_path / "roles.pd").resolve().as_uri() and loc.range.start == T.Position(line=2, character=2)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_change_to_a_document_never_opened_is_ignored_with_a_log_line(tmp_path: Path) -> None:
    """didChange for a document the client never opened (or already closed) made pygls raise KeyError,
    shown to the user as the popup "Error in server: KeyError: 'file:///...'"; it is logged and ignored."""
    uri = (tmp_path / "never.pd").as_uri()
    change = {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}
    msgs, err = _raw_session(
        [
            {
                "jsonrpc": "2.0",
                "method": "textDocument/didChange",
                "params": {"textDocument": {"uri": uri, "version": 2}, "contentChanges": [change]},
            }
        ],
        tmp_path,
    )
    assert not [m for m in msgs if m.get("method") == "window/showMessage"], msgs
    assert f"didChange for {uri}, which is not open: ignored" in err and "KeyError" not in err, err


def test_stdio_path_completion_after_a_leading_slash_lists_the_root(tmp_path: Path) -> None:
    """`include "/` (the `/` is a trigger character) listed the spec's own folder, so accepting
    `frag.pd` wrote `"/frag.pd"`, a file at the root that does not exist; an absolute path lists from
    the root, a relative one from the spec's folder."""
    (tmp_path / "frag.pd").write_text("param lam: float = 0.3\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.pd").write_text("param mu: float = 0.3\n", encoding="utf-8")
    spec = tmp_path / "main.pd"

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec, 'experiment m\ninclude "/')
            at_root = await s.complete(uri, T.Position(line=1, character=10))
            assert "frag.pd" not in at_root and "tmp/" in at_root
            s.change(uri, 'experiment m\ninclude "sub/')
            assert await s.complete(uri, T.Position(line=1, character=13)) == ["inner.pd"]
            s.change(uri, f'experiment m\ninclude "{tmp_path}/')
            assert {"frag.pd", "sub/"} <= set(await s.complete(uri, T.Position(line=1, character=10 + len(str(tmp_path)))))

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
def test_stdio_an_include_naming_a_pipe_does_not_freeze_the_server(tmp_path: Path) -> None:
    """The checker reads only regular files, but the features read includes with `read_text`: on a named
    pipe (or /dev/zero, /dev/stdin) hover, completion and definition blocked the server for ever (or
    filled its memory). Only regular files are read; the checker said the pipe "does not exist"."""
    import os

    os.mkfifo(tmp_path / "fifo.pd")
    spec = tmp_path / "main.pd"
    spec.write_text('experiment m\ninclude "fifo.pd"\ntask graph_coloring {}\nstage base = sft { steps = 1 }\n', encoding="utf-8")

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec)
            (d,) = await s.diagnostics(uri, version=1)
            assert d.code == "missing-include" and "`fifo.pd` is not a regular file" in d.message, d.message
            h = await asyncio.wait_for(s.hover(uri, s.at(uri, "base", 1)), 10)
            assert h is not None and "stage base = sft" in h.contents.value
            assert "steps" in await asyncio.wait_for(s.complete(uri, s.at(uri, "steps")), 10)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stdio_formatting_a_crlf_document_is_idempotent(tmp_path: Path) -> None:
    """A document with CRLF line endings was formatted to LF text; an editor keeps the document's line
    endings when it applies the edit (VS Code does), so the next format request got the same CRLF text
    back and answered a whole-document edit again, every time. The canonical form keeps the text's line
    ending (its first line's), so a formatted CRLF document gets no edit; `percep fmt` leaves it CRLF."""
    text = "experiment   e  # head\r\ntask graph_coloring {nodes=5 # inner\r\n}\r\nstage base = sft { steps = 10 }\r\n"
    spec = tmp_path / "crlf.pd"
    spec.write_bytes(text.encode())

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec, text)
            (edit,) = await s.format(uri)
            assert (
                edit.new_text
                == "experiment e  # head\r\ntask graph_coloring {\r\n  nodes = 5  # inner\r\n}\r\nstage base = sft { steps = 10 }\r\n"
            )
            s.change(uri, edit.new_text)
            assert not await s.format(uri)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    res = CliRunner().invoke(app, ["fmt", str(spec)])
    assert res.exit_code == 0 and spec.read_bytes().count(b"\r\n") == 5 and b"\n" not in spec.read_bytes().replace(b"\r\n", b"")
    assert CliRunner().invoke(app, ["fmt", "--check", str(spec)]).exit_code == 0


def test_stdio_positions_count_a_lone_cr_as_a_line_break(tmp_path: Path) -> None:
    """LSP ends lines at \\n, \\r\\n and a lone \\r (editors count an old Mac line break in a comment as
    one); the parser and the scanner count \\n only, so after a lone \\r every diagnostic, hover and
    completion was a line off. Positions are converted through the text's offsets, counted both ways."""
    spec = tmp_path / "cr.pd"
    text = "experiment e  # old\rmac\ntask graph_coloring {}\nstage base = sft { stepz = 10 }\n"
    spec.write_bytes(text.encode())

    async def scenario() -> None:
        async with LspSession(cwd=tmp_path) as s:
            uri = s.open(spec, text)
            diags = await s.diagnostics(uri, version=1)
            unknown = next(d for d in diags if d.code == "unknown-setting")
            assert unknown.range.start == T.Position(line=3, character=19) and unknown.range.end == T.Position(line=3, character=24)
            h = await s.hover(uri, T.Position(line=3, character=2))
            assert h is not None and "**stage**" in h.contents.value
            assert h.range.start == T.Position(line=3, character=0)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_completion_and_hover_in_a_stages_task_block(project_dir: Path) -> None:
    """A stage's `task { ... }` offers the settings of the experiment's task that a stage may set
    (the catalogue's `ParamSpec.stage`), and hover explains them; a stage block offers the sub-block."""
    p = project_dir / "main.pd"
    stage = "stage x = sft from base { steps = 3, task { "
    assert _labels(p, MAIN + stage + "|") == [
        "layout",
        "reasoning",
        "jitter",
        "noise",
        "filler_words",
        "filler_rate",
        "line_width",
        "node_radius",
        "distractors",
    ]
    assert _labels(p, MAIN + stage + "reasoning = |") == ["brief", "trace", "verbose"]
    assert _labels(p, "task sudoku { size = 4 }\nstage x = grpo { task { reasoning = brief, |") == [
        "jitter",
        "noise",
        "filler_words",
        "filler_rate",
    ]
    assert "task" in _labels(p, MAIN + "stage x = sft from base { steps = 3, |")
    assert "task" not in _labels(p, MAIN + "stage x = sft from base { task { noise = 0.1 }, |")
    assert _labels(p, "stage x = sft { task { |") == []  # no task declared: nothing to offer
    # as the formatter writes it: one setting a line, no commas
    assert _labels(p, MAIN + "stage x = sft from base {\n  steps = 3\n  task {\n    reasoning = brief\n    |")[:2] == ["layout", "jitter"]
    text = MAIN + "stage x = sft from base { steps = 3, task { filler_words = 4 } }\n"
    assert "distinct filler words" in _hover(p, text, "filler_words")
    shown = _hover(p, text, "task {")
    assert "a stage may set" in shown and "`reasoning`" in shown and "`nodes`" not in shown


def test_a_stages_task_block_shows_what_it_inherits_from_the_experiments_task(project_dir: Path) -> None:
    """A setting a stage's `task { ... }` leaves out is the experiment's task block's, not the
    catalogue's default: completion and hover there show the experiment's value where it sets one
    (the task block may be in an include), and the catalogue's default where it does not."""
    p = project_dir / "main.pd"
    main = MAIN.replace("image = 64px }", "image = 64px  reasoning = verbose  jitter = 0.2 }")
    text, off = _marked(main + "stage x = sft from base { steps = 3, task { |")
    items = {i.label: i for i in F.complete(_project(p, text), off, F.Encoder())}
    assert items["reasoning"].detail == "one of `brief`, `trace`, `verbose` = verbose (the experiment's task)"
    assert "- the experiment's task sets: `verbose` (default: `trace`)" in items["reasoning"].documentation.value
    assert items["jitter"].detail == "a number = 0.2 (the experiment's task)"
    assert items["noise"].detail == "a number = 0" and "- default: `0`" in items["noise"].documentation.value
    # the value the stage would override is marked among the choices
    text, off = _marked(main + "stage x = sft from base { steps = 3, task { reasoning = |")
    choices = {i.label: i.detail for i in F.complete(_project(p, text), off, F.Encoder())}
    assert choices["verbose"].endswith("(the experiment's task sets it)") and not choices["trace"].endswith(")")
    # the `task` sub-block's own documentation, offered in the stage block, and its hover
    text, off = _marked(main + "stage x = sft from base { steps = 3, |")
    task_item = next(i for i in F.complete(_project(p, text), off, F.Encoder()) if i.label == "task")
    assert "the experiment's task sets `verbose`" in task_item.documentation.value
    text = main + "stage x = sft from base { steps = 3, task { noise = 0.1 } }\n"
    shown = _hover(p, text, "task { noise")
    assert "the experiment's task sets `0.2`" in shown and "default `0`" in shown
    assert "the experiment's task sets: `0.2` (default: `0`)" in _hover(p, text.replace("noise = 0.1", "jitter = 0.1"), "jitter = 0.1")
    # not in the experiment's own task block, which inherits nothing
    assert "- default: `trace`" in _hover(p, main.replace("reasoning = verbose", "reasoning = brief"), "reasoning = brief")
    # the experiment's task in an included file
    (project_dir / "task.pd").write_text("task graph_coloring { reasoning = trace }\n", encoding="utf-8")
    text, off = _marked('experiment e\ninclude "task.pd"\nstage x = sft { steps = 3, task { |')
    items = {i.label: i.detail for i in F.complete(_project(p, text), off, F.Encoder())}
    assert items["reasoning"] == "one of `brief`, `trace`, `verbose` = trace (the experiment's task)"


def test_completion_and_hover_of_a_stages_freeze(project_dir: Path) -> None:
    """`freeze = [` offers the model parts, from the catalogue, in both stage kinds; hover says what each is."""
    p = project_dir / "main.pd"
    assert _labels(p, MAIN + "stage x = sft from base { steps = 3, freeze = [|") == ["vision", "projector", "language"]
    assert _labels(p, MAIN + "stage x = grpo from base { reward = outcome, freeze = [vision, |")[:3] == ["vision", "projector", "language"]
    assert "freeze" in _labels(p, MAIN + "stage x = sft from base { steps = 3, |")
    shown = _hover(p, MAIN + "stage x = sft from base { steps = 3, freeze = [vision] }\n", "freeze")
    assert "model parts kept fixed" in shown and "`projector`" in shown
