"""`percep`: the command line. A thin layer over the library; torch is imported only
by the commands that train or generate, so `check`, `fmt` and `lsp` start fast.

Exit codes: 0 success; 1 the spec has errors (check) or is not formatted (fmt --check);
2 bad usage or input refused before work started; 3 a run failed while running.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path

import typer

from .diagnostics import Diagnostic, Severity, Span, relpath, render, summary_line, to_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="percepdsl: specs for perception vs reasoning experiments in VLM post-training.",
)

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Format(str, Enum):
    text = "text"
    json = "json"


SetOpt = typer.Option(None, "--set", help="Override a param: NAME=VALUE (repeatable).", metavar="NAME=VALUE")


def _spec_files(paths: list[Path]) -> tuple[list[Path], list[Diagnostic]]:
    """The files named, directories replaced by the `*.pd` files under them; an error for a
    directory with none (a mistyped folder would otherwise check nothing and pass)."""
    out: list[Path] = []
    empty: list[Diagnostic] = []
    for p in paths:
        try:
            is_dir = p.is_dir()
        except OSError:  # a name too long: reading it reports the problem
            is_dir = False
        found = sorted(p.rglob("*.pd")) if is_dir else [p]
        if not found:
            name = relpath(p)
            empty.append(Diagnostic(name, Span.point(file=name), Severity.ERROR, "missing-file", f"no .pd files in the directory {name}"))
        out.extend(found)
    return out, empty


def _reads_stdin(files: list[Path], what: str) -> bool:
    """Whether the files named are `-` alone (the spec on stdin); `-` beside files is a usage error."""
    named = [str(f) for f in files]
    if "-" in named and len(named) > 1:
        print(f"error: `-` (stdin) goes alone: {what}; name files without it", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    return named == ["-"]


def _stdin_bytes() -> bytes:
    if sys.stdin is None:  # started with it closed (`<&-`)
        print("error: cannot read the spec from stdin: it is closed; pipe the spec in, or name the file", file=sys.stderr)
        raise typer.Exit(EXIT_ERRORS)
    return sys.stdin.buffer.read()


def _print_diags(diags: list[Diagnostic], sources: dict[str, str], fmt: Format, n_files: int, stream=None) -> None:
    stream = stream or sys.stdout
    if fmt is Format.json:
        print(to_json(diags), file=stream)
        return
    color = stream.isatty()
    for d in diags:
        print(render(d, sources.get(d.file), color=color), file=stream)
    if n_files:
        print(summary_line(n_files, diags), file=stream)


def _check(path: Path, sets: list[str] | None, fragment_ok: bool = True):
    from .check import check_file, parse_overrides

    overrides, bad = parse_overrides(sets or [])
    res = check_file(path, overrides, fragment_ok=fragment_ok)
    res.diagnostics[:0] = bad
    if bad:
        res.ir = None
    return res


@app.command()
def check(
    files: list[Path] = typer.Argument(..., help="Spec or grid files (directories: every .pd inside); `-` reads stdin."),
    format: Format = typer.Option(Format.text, "--format", "-f", help="text (file:line:col) or json."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Check specs: every error and warning, located. Exit 1 if any file has an error."""
    if _reads_stdin(files, "`percep check -` checks the spec on stdin"):
        from .check import check_text, parse_overrides
        from .parse import decode

        text, diags = decode(_stdin_bytes(), "<stdin>")
        overrides, bad = parse_overrides(set_ or [])
        if text is not None:  # its includes resolve against the working directory
            res = check_text(text, "<stdin>", overrides, base_dir=Path.cwd())
            diags, sources = bad + res.diagnostics, res.loaded.sources
        _print_diags(diags, sources if text is not None else {}, format, 1)
        raise typer.Exit(EXIT_ERRORS if any(d.is_error for d in diags) else EXIT_OK)
    sources: dict[str, str] = {}
    paths, all_diags = _spec_files(files)
    for path in paths:
        res = _check(path, set_)
        all_diags += res.diagnostics
        if res.loaded is not None:
            sources.update(res.loaded.sources)
    _print_diags(all_diags, sources, format, len(paths))
    from .catalogue import default_catalogue

    for problem in default_catalogue().problems:  # a broken plugin: said once, on stderr
        print(f"percep: warning: {problem}", file=sys.stderr)
    raise typer.Exit(EXIT_ERRORS if any(d.is_error for d in all_diags) else EXIT_OK)


def compile_or_exit(spec: Path, sets: list[str] | None, stream=None):
    """Check a spec and return (IR, result); on errors print them and exit 2."""
    res = _check(spec, sets, fragment_ok=False)
    if res.ir is None:
        sources = res.loaded.sources if res.loaded else {}
        _print_diags(res.diagnostics, sources, Format.text, 1, stream or sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    warnings = [d for d in res.diagnostics if not d.is_error]
    if warnings:
        _print_diags(warnings, res.loaded.sources, Format.text, 0, stream or sys.stderr)
    return res.ir, res


@app.command("compile")
def compile_(
    spec: Path = typer.Argument(..., help="Spec or grid file."),
    json_: bool = typer.Option(False, "--json", help="Print the IR as JSON."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Compile a spec to its IR (checked; exit 2 if it has errors)."""
    from .ir import ExperimentIR, content_hash

    ir, _ = compile_or_exit(spec, set_)
    if json_:
        print(json.dumps({"hash": content_hash(ir), "ir": ir.model_dump(mode="json")}, indent=2, ensure_ascii=False))
        return
    print(f"{ir.name}-{content_hash(ir)}")
    if isinstance(ir, ExperimentIR):
        print(f"  task   {ir.task.name} {ir.task.params}")
        print(f"  model  {ir.model.kind} {ir.model.path or ''}")
        print(f"  roles  {', '.join(ir.role_names)}")
        for st in ir.stages:
            what = st.loss.kind if st.kind == "sft" else "reward " + ", ".join(t.name for t in st.reward.terms())
            if st.kind == "grpo" and st.token_weights is not None:
                tw = st.token_weights
                what += ", token weights " + (", ".join(tw.weights) if tw.kind == "weights" else "ngdiff")
            print(f"  stage  {st.name} = {st.kind}{' from ' + st.parent if st.parent else ''}: {st.steps} steps, {what}")
    else:
        from .grid import expand, template_defaults

        print(f"  template {ir.template}: {len(expand(ir, template_defaults(spec, ir)))} cells")


@app.command()
def fmt(
    files: list[Path] = typer.Argument(..., help="Files to format in place; `-` reads stdin and writes stdout."),
    check_only: bool = typer.Option(False, "--check", help="Change nothing; exit 1 if a file is not formatted."),
) -> None:
    """Rewrite specs in canonical form (comments preserved)."""
    from .fmt import format_text
    from .io import write_text_atomic
    from .parse import decode

    if _reads_stdin(files, "`percep fmt -` formats stdin to stdout"):
        text, diags = decode(_stdin_bytes(), "<stdin>")
        out = None
        if text is not None:
            out, diags = format_text(text, "<stdin>")
        if out is None:
            _print_diags(diags, {"<stdin>": text or ""}, Format.text, 0, sys.stderr)
            raise typer.Exit(EXIT_ERRORS)
        if check_only:  # as for files: change and print nothing, say whether it would be reformatted
            if out != text:
                print("would reformat <stdin>", file=sys.stderr)
                raise typer.Exit(EXIT_ERRORS)
            return
        sys.stdout.write(out)
        return
    paths, empty = _spec_files(files)
    _print_diags(empty, {}, Format.text, 0, sys.stderr)
    changed, failed = [], bool(empty)
    for path in paths:
        from .check import read_source

        text, diags = read_source(path)
        out = None
        if text is not None:
            out, diags = format_text(text, str(path))
        if out is None:
            _print_diags(diags, {str(path): text or ""}, Format.text, 0, sys.stderr)
            failed = True
            continue
        if out != text:
            if not check_only:
                try:
                    write_text_atomic(path, out, newline="")  # the line endings format_text kept
                except OSError as e:
                    print(f"percep: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                    failed = True
                    continue
            changed.append(path)
    for p in changed:
        print(f"{'would reformat' if check_only else 'reformatted'} {p}")
    if failed or (check_only and changed):
        raise typer.Exit(EXIT_ERRORS)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Experiment spec to train and evaluate."),
    set_: list[str] | None = SetOpt,
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Parent of the run directory <experiment>-<hash>."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in its directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    jobs: int = typer.Option(
        1,
        "--jobs",
        "-j",
        min=1,
        help="Train up to N stages at once, each in its own process, as soon as the stages they start from are done "
        "(e.g. the arms of a shared base); the results are those of --jobs 1 when the spec sets `trainer { threads }` "
        "(else each worker gets the cores divided among the workers, and another thread count rounds differently).",
    ),
) -> None:
    """Train and evaluate a spec; leaves summary.json, metrics.csv, eval.jsonl, plots and report.md."""
    from .ir import ExperimentIR

    ir, res = compile_or_exit(spec, set_)
    if not isinstance(ir, ExperimentIR):
        print(f"error: {spec} is a grid file; run it with `percep grid {spec}`", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    from percepdsl_runtime.run import RunFailed, RunInterrupted, RunRefused, quiet_libraries, stage_table
    from percepdsl_runtime.run import run as run_experiment

    quiet_libraries()

    def echo(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    resume_hint = f"finished stages and the last resume checkpoint are kept: continue with `percep run {spec} --resume`"
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's stop (SLURM, Kubernetes) is a Ctrl-C
    try:
        run_dir = run_experiment(
            ir, res.loaded.sources, out, resume=resume, progress=not quiet and sys.stderr.isatty(), echo=echo, jobs=jobs
        )
        if run_dir is None:  # another rank than 0 of a multi-device run: rank 0 reports
            return
    except RunRefused as exc:
        print(f"{spec}: error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except RunFailed as exc:
        print(f"{spec}: error: run failed: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED) from None
    except RunInterrupted as exc:
        print(f"{spec}: interrupted: {exc}; continue with `percep run {spec} --resume`", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # outside training: preparing, evaluating, reporting
        print(f"{spec}: interrupted; {resume_hint}", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    echo("\n".join(stage_table(json.loads((run_dir / "summary.json").read_text()))))
    print(run_dir)


BaselineOpt = typer.Option(
    None,
    "--baseline",
    help="The arm the others are compared with, by its params: NAME=VALUE[,NAME=VALUE] (e.g. lam=0; experiment=NAME "
    "across experiments). Adds paired differences per metric with 95% CIs over seeds and over seeds and items.",
    metavar="NAME=VALUE",
)


class GridBackend(str, Enum):
    local = "local"
    ray = "ray"
    slurm = "slurm"


@app.command()
def grid(
    grid_file: Path = typer.Argument(..., help="Grid file (specs/grids/*.pd)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells (params, seed, IR hash, run dir, status); run nothing."),
    jobs: int | None = typer.Option(
        None, "--jobs", "-j", min=1, help="Cells run at once (default 1; with --backend ray, as many as the cluster schedules)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Grid directory (default runs/grids/<grid name>)."),
    set_: list[str] | None = SetOpt,
    backend: GridBackend = typer.Option(
        GridBackend.local,
        "--backend",
        help="local processes, Ray tasks on a cluster (pip install -e '.[ray]') or SLURM jobs (pip install -e '.[slurm]').",
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop the grid at the first failed cell (running cells are stopped)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)."),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="Ray, SLURM: CPUs reserved for each cell (also its thread count)."),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", help="Ray, SLURM: GPUs reserved for each cell."),
    partition: str | None = typer.Option(None, "--partition", help="SLURM: the partition of the cells' jobs."),
    time_min: int | None = typer.Option(None, "--time", help="SLURM: each job's time limit in minutes (default 60).", metavar="MINUTES"),
    mem_gb: float | None = typer.Option(None, "--mem", help="SLURM: memory per job in GB (default: the partition's).", metavar="GB"),
    baseline: str | None = BaselineOpt,
) -> None:
    """Run an ablation grid, a `percep run` per cell (resumable), then a results table and plots.

    Exit 0 every cell complete, 2 refused before running, 3 some cell failed (--fail-fast: the
    first failure stopped the grid), 130 interrupted."""
    from percepdsl_runtime.grid import grid_command

    raise typer.Exit(
        grid_command(
            grid_file,
            dry_run=dry_run,
            jobs=jobs,
            out=out,
            sets=set_ or [],
            backend=backend.value,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
            fail_fast=fail_fast,
            partition=partition,
            time_min=time_min,
            mem_gb=mem_gb,
            baseline=baseline,
        )
    )


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="A grid directory (runs/grids/<name>, or what --out named), or run directories."),
    baseline: str | None = BaselineOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Where run directories' paired.md / paired.json go."),
) -> None:
    """Rebuild a grid's results table (CSV, Markdown) and plots from its run directories; with
    --baseline, each arm's paired differences to that arm with 95% CIs (paired.md, paired.json).

    Exit 0 written, 2 not a grid / run directory or a baseline that names no single arm."""
    from percepdsl_runtime.grid import report_command

    raise typer.Exit(report_command(paths, baseline=baseline, out=out))


class GenFormat(str, Enum):
    hf = "hf"
    trl = "trl"


@app.command()
def probe(
    target: Path = typer.Argument(..., help="A run directory, or the spec whose run (under --out) to probe."),
    stage: str | None = typer.Option(None, "--stage", help="Stage to probe (default: the last finished one)."),
    items: int = typer.Option(64, "--items", help="Test items to probe (at least 2)."),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Where a spec's run directory is (as for `percep run`)."),
    set_: list[str] | None = SetOpt,
) -> None:
    """Visual dependency of a trained stage: per role and per perception slot, the divergence between the model's
    predictions with the true image and with another item's / a blank image. Writes probe/<stage>/probe.{json,csv,md,png}
    into the run directory and prints the table."""
    from .ir import ExperimentIR

    run_dir = target
    if not target.is_dir():
        ir, _ = compile_or_exit(target, set_)
        if not isinstance(ir, ExperimentIR):
            print(f"error: {target} is a grid file; probe one of its cells' run directories", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE)
        from percepdsl_runtime.run import run_dir_for

        run_dir = run_dir_for(ir, out)
        if not run_dir.is_dir():
            print(f"{target}: error: no run of this spec at {run_dir}; run it first with `percep run {target}`", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE)
    from percepdsl_runtime.probe import ProbeRefused, probe_run
    from percepdsl_runtime.run import quiet_libraries

    quiet_libraries()
    try:
        _, paths = probe_run(run_dir, stage, items)
    except ProbeRefused as exc:
        print(f"{target}: error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    print(Path(paths[2]).read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


@app.command()
def gen(
    spec: Path = typer.Argument(..., help="Spec whose task to materialise."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the dataset (datasets.load_from_disk) and contact sheet."),
    set_: list[str] | None = SetOpt,
    sheet: int = typer.Option(8, "--sheet", min=1, help="Samples on the contact sheet (at most the test split's size)."),
    format: GenFormat = typer.Option(
        GenFormat.hf,
        "--format",
        "-f",
        help="hf: query, image, perception, reasoning, answer, response, instance (what `task dataset` reads); "
        "trl: TRL's conversational prompt/completion/images (SFTTrainer, GRPOTrainer).",
    ),
) -> None:
    """Write the task's train/test data set as a Hugging Face dataset, plus a contact sheet PNG."""
    from .ir import ExperimentIR

    ir, _ = compile_or_exit(spec, set_)
    if not isinstance(ir, ExperimentIR):
        print(f"error: {spec} is a grid file; `percep gen` takes an experiment spec", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    import datasets

    from percepdsl_runtime.plugins import ImplError
    from percepdsl_runtime.tasks import build_task
    from percepdsl_runtime.tasks.dataset import contact_sheet, why_not_replace, write_dataset

    from .io import os_error_text

    datasets.disable_progress_bars()  # one line of our own says what is written
    if (why := why_not_replace(out)) is not None:  # before generating: nothing to lose, no time spent
        print(f"{spec}: error: {why}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)

    try:
        task = build_task(ir.task, seed=ir.seed)
    except (ImplError, ValueError) as exc:
        print(f"{spec}: error: cannot build task `{ir.task.name}`: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    splits = {s: task.size(s) for s in ("train", "test")}
    print(f"generating {ir.task.name}: {splits['train']} train + {splits['test']} test samples → {out}", file=sys.stderr)
    try:
        path = write_dataset(task, out, splits=splits, fmt=format.value)
        sheet_path = contact_sheet(task, path / "contact_sheet.png", n=sheet)  # resolved: `--out .` is a new directory now
    except OSError as exc:
        print(f"{spec}: error: cannot write the data set to {out}: {os_error_text(exc)}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED) from None
    print(f"wrote {path} and {sheet_path}")


@app.command()
def lsp() -> None:
    """Language server over stdio (what editors run)."""
    if sys.stdin is None:  # started with it closed (`<&-`): no client can talk to it
        print("error: stdin is closed: the language server reads its client's messages there (an editor starts it)", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    from .lsp import lsp_command

    lsp_command()


@app.command()
def schema() -> None:
    """Print the IR's JSON Schema."""
    from .ir import json_schema

    print(json.dumps(json_schema(), indent=2))


def _raise_interrupt(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main() -> None:
    for name in ("stdout", "stderr"):  # started with it closed (`>&-`): what would be printed goes nowhere, the exit code stays
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the life of the process
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
