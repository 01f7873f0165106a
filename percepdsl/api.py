"""The Python API: check and run specs, plan and run grids, and add reward terms from Python.

    from percepdsl import api

    def short(completions, **kwargs):              # TRL's reward signature
        return [1.0 if len(c.split()) < 40 else 0.0 for c in completions]

    api.register_reward("short", short)            # now `reward = 0.2 * short + 0.8 * outcome` checks
    summary = api.run_spec("specs/grpo_smoke.pd", set={"seed": 1}, out="runs")
    summary["final"]["end_to_end"], summary["run_dir"]

    plan = api.plan_grid("specs/grids/smoke.pd", out="runs/grids/smoke")
    outcome = api.run_grid("specs/grids/smoke.pd", out="runs/grids/smoke", jobs=1)

Everything here is the library the `percep` command runs: `run_spec` is `percep run` in this
process (same checks, same run directory, same exit conditions raised as exceptions:
`SpecError` for a spec that does not check, `RunRefused` for input refused before training,
`RunFailed` for a run that broke), `run_grid` is `percep grid`. This module never imports
torch at import time; the runtime is imported by the calls that train.

**Reward terms from Python.** `register_reward(name, fn)` adds a reward term to the catalogue
of this process, so the checker resolves the name like a built-in one (and `run_spec` runs
it). `fn` has TRL's reward signature: `fn(completions, **kwargs) -> list[float]`, one value per
completion of a group (the G completions of one prompt). The keyword arguments are `prompts`
(the query of each completion's prompt) and the prompt's task fields, one entry per completion
as TRL repeats dataset columns: `id`, `image`, `perception` (p*), `response` (the reference
target), `ground_truth` (the reference answer), `instance` (the task's description of the true
instance), and `truncated` (whether the completion hit `max_new_tokens`). Keyword-only
parameters with a default (int, float, bool or str) become the term's parameters in specs:
`def brevity(completions, *, max_words=40, **kwargs)` is written `brevity(max_words = 60)`.
A registered term lives in this process: grid cells run as their own processes and do not see
it (`run_grid` refuses such a grid; package the term as a plugin, see examples/plugin).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalogue import Entry, ParamSpec, default_catalogue, register, unregister

if TYPE_CHECKING:
    from percepdsl_runtime.grid import GridOutcome, GridPlan

    from .ir import ExperimentIR

#: What a registered term receives besides `completions` (see the module doc).
REWARD_KWARGS = ("prompts", "id", "image", "perception", "response", "ground_truth", "instance", "truncated")
_PARAM_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}

Overrides = Mapping[str, Any] | Sequence[str] | None


class SpecError(Exception):
    """A spec or grid that does not check (what `percep check` reports), or bad `set` values."""

    def __init__(self, message: str, diagnostics: Sequence[Any] = (), sources: Mapping[str, str] | None = None):
        from .diagnostics import render

        self.diagnostics = list(diagnostics)
        text = "\n".join([*(render(d, (sources or {}).get(d.file)) for d in self.diagnostics), f"error: {message}"])
        super().__init__(text)


def __getattr__(name: str) -> Any:
    """`RunRefused` and `RunFailed` live with the runtime (imported on first use, not here)."""
    if name in ("RunRefused", "RunFailed"):
        from percepdsl_runtime import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- specs ----------------------------------------------------------------------------------------


def _override_text(value: Any) -> str:
    """A Python value as the literal `--set` takes: true/false, a number, a quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):  # repr would write `nan`, read as a name
        raise SpecError(f"a `set` value must be a finite number, got {value!r}")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise SpecError(f"a `set` value must be a bool, a number or a string, got {type(value).__name__} {value!r}")


def _overrides(values: Overrides) -> dict[str, str]:
    """`{"lam": 0.5}` or `["lam=0.5"]` as the `--set` overrides of the checker."""
    from .check import parse_overrides

    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {str(k): _override_text(v) for k, v in values.items()}
    pairs, bad = parse_overrides([str(v) for v in values])
    if bad:
        raise SpecError("malformed `set` values", bad)
    return pairs


def check(path: str | Path, set: Overrides = None) -> ExperimentIR:  # noqa: A002 - the CLI's --set
    """The checked IR of an experiment spec with `set` overrides, or `SpecError`."""
    from .check import check_file
    from .ir import ExperimentIR

    res = check_file(Path(path), _overrides(set), fragment_ok=False)
    sources = res.loaded.sources if res.loaded else {}
    if res.ir is None:
        raise SpecError(f"{path} does not check", [d for d in res.diagnostics if d.is_error], sources)
    if not isinstance(res.ir, ExperimentIR):
        raise SpecError(f"{path} is a grid file: run it with `run_grid`")
    return res.ir


def run_spec(
    path: str | Path,
    set: Overrides = None,  # noqa: A002 - the CLI's --set
    out: str | Path = "runs",
    resume: bool = False,
    *,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """`percep run` in this process: check, train, evaluate; returns the run's `summary.json`
    as a dict, plus `run_dir` (the run directory, a `Path`). A run that is complete already
    is not redone (its summary is returned). `jobs` > 1 trains stages that can run at the same
    time (the arms of a shared base) in that many worker processes. Raises `SpecError`,
    `RunRefused` or `RunFailed`."""
    from .check import load

    ir = check(path, set)
    loaded, _ = load(Path(path))
    from percepdsl_runtime.run import quiet_libraries, run

    quiet_libraries()
    run_dir = run(ir, loaded.sources, Path(out), resume=resume, progress=progress, echo=echo or (lambda _: None), jobs=jobs)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {**summary, "run_dir": run_dir}


# ---- grids ----------------------------------------------------------------------------------------


def plan_grid(grid_file: str | Path, out: str | Path | None = None, set: Overrides = None) -> GridPlan:  # noqa: A002
    """The cells of a grid (params, seed, IR hash, run directory, status on disk), nothing run.
    Raises `SpecError` when the grid, its template or a `set` value does not check."""
    from percepdsl_runtime.grid import GridError
    from percepdsl_runtime.grid import plan_grid as plan

    try:
        return plan(grid_file, out, _overrides(set))
    except GridError as exc:
        raise SpecError(exc.message, exc.diagnostics, exc.sources) from None


def run_grid(
    grid_file: str | Path,
    out: str | Path | None = None,
    set: Overrides = None,  # noqa: A002
    *,
    jobs: int | None = 1,
    backend: str = "local",
    fail_fast: bool = False,
    baseline: str | None = None,
    **backend_options: Any,
) -> GridOutcome:
    """`percep grid`: run every cell that is not done (resumable), then write the results table
    and plots. Returns the outcome (`status`: complete | failed | interrupted, `exit_code`, the
    failed and stopped cells, `stopped` with `fail_fast`, and `table`, the results). `baseline`
    (`"lam=0"`, as `--baseline`) adds the paired differences to that setting (paired.md, .json).
    `backend_options` are `run_plan`'s: `address`, `cpus_per_cell`, `gpus_per_cell` (Ray), and
    `slurm` (a `SlurmOptions` or a dict of its fields: partition, time_min, cpus_per_cell, ...)."""
    from percepdsl_runtime.grid import GridError, SlurmOptions, run_plan
    from percepdsl_runtime.grid.commands import check_baseline

    if isinstance(backend_options.get("slurm"), Mapping):
        backend_options["slurm"] = SlurmOptions(**backend_options["slurm"])

    plan = plan_grid(grid_file, out, set)
    local = _registered_terms_used(plan)
    if local:
        raise SpecError(
            f"grid `{plan.grid.name}` uses reward term(s) {', '.join(f'`{t}`' for t in local)} registered from Python in this "
            "process; its cells run as separate processes, which cannot see them (package the term as a plugin: examples/plugin)"
        )
    try:
        if baseline:
            check_baseline(plan, baseline)
        return run_plan(plan, jobs=jobs, backend=backend, fail_fast=fail_fast, baseline=baseline, **backend_options)
    except GridError as exc:
        raise SpecError(exc.message, exc.diagnostics, exc.sources) from None


def _registered_terms_used(plan: GridPlan) -> list[str]:
    from .check import check_file

    names = {e.name for e in default_catalogue().entries("reward") if e.source == "python"}
    if not names:
        return []
    ir = check_file(plan.template, plan.cells[0].overrides() if plan.cells else {}, fragment_ok=False).ir
    used = {t.name for st in getattr(ir, "stages", []) if st.kind == "grpo" for t in st.reward.terms()}
    return sorted(used & names)


# ---- reward terms from Python -------------------------------------------------------------------


class PythonRewardTerm:
    """A TRL-style reward function as a catalogue reward term: called as `term(group, **params)`
    by the runtime, it calls `fn(completions=..., prompts=..., <task fields>..., **params)`."""

    def __init__(self, name: str, fn: Callable[..., Sequence[float]]):
        self.name, self.fn = name, fn

    def __call__(self, group: Any, **params: Any) -> Sequence[float]:
        s, n = group.sample, len(group.completions)
        columns = {
            "prompts": [s.query] * n,
            "id": [s.id] * n,
            "image": [s.image] * n,
            "perception": [s.perception] * n,
            "response": [s.response] * n,
            "ground_truth": [s.ground_truth] * n,
            "instance": [s.instance] * n,
            "truncated": list(group.truncated) or [False] * n,
        }
        return self.fn(completions=list(group.completions), **columns, **params)


class _PythonRewards:
    """The registered terms by name: their catalogue `impl` is `percepdsl.api:python_rewards.<name>`,
    resolved by the runtime like any other implementation path."""

    def __init__(self) -> None:
        self.terms: dict[str, PythonRewardTerm] = {}

    def __getattr__(self, name: str) -> PythonRewardTerm:
        try:
            return self.__dict__["terms"][name]
        except KeyError:
            raise AttributeError(f"no reward term `{name}` is registered from Python in this process") from None


python_rewards = _PythonRewards()


def register_reward(name: str, fn: Callable[..., Sequence[float]], *, doc: str | None = None, surrogate: bool = True) -> Entry:
    """Make `fn` the reward term `name` for this process (checker, language features, runs).

    `fn(completions, **kwargs) -> list[float]` (TRL's signature; see the module doc for the
    keyword arguments). Its keyword-only parameters with a default become the term's
    parameters. `surrogate`: whether the term reads no labels, so that its correlation with
    true perception correctness is reported (as for plugin terms). Registering a name again
    replaces the earlier function; a built-in or plugin term's name is refused (`ValueError`),
    as is a function that cannot take the arguments (`TypeError`)."""
    if not name.isidentifier():
        raise ValueError(f"a reward term's name is an identifier (letters, digits, _), got {name!r}")
    params = _reward_params(name, fn)
    entry = Entry(
        name,
        "reward",
        doc or (inspect.getdoc(fn) or f"reward term `{name}`, registered from Python").splitlines()[0],
        params,
        impl=f"{__name__}:python_rewards.{name}",
        source="python",
        surrogate=surrogate,
    )
    register(entry)
    python_rewards.terms[name] = PythonRewardTerm(name, fn)
    return entry


def unregister_reward(name: str) -> None:
    """Forget a term registered with `register_reward`."""
    unregister("reward", name)
    python_rewards.terms.pop(name, None)


def _reward_params(name: str, fn: Callable[..., Any]) -> tuple[ParamSpec, ...]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"reward `{name}`: cannot read the signature of {fn!r}: {exc}") from None
    ps = sig.parameters.values()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in ps)
    supplied = {"completions", *REWARD_KWARGS}
    if "completions" not in sig.parameters and not var_kw:
        raise TypeError(f"reward `{name}` must take `completions` (TRL's signature: `def {name}(completions, **kwargs)`)")
    out = []
    for p in ps:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in supplied:
            continue
        if p.default is p.empty:
            raise TypeError(
                f"reward `{name}`: parameter `{p.name}` has no default and is not one of the arguments a term receives "
                f"(completions, {', '.join(REWARD_KWARGS)}); give it a default to make it a spec parameter"
            )
        if p.kind is not p.KEYWORD_ONLY or type(p.default) not in _PARAM_TYPES:
            raise TypeError(
                f"reward `{name}`: parameter `{p.name}` must be keyword-only (after `*`) with a bool, int, float or "
                f"str default to be a spec parameter"
            )
        out.append(ParamSpec(p.name, _PARAM_TYPES[type(p.default)], p.default, f"parameter of `{name}`"))
    if not var_kw:
        missing = [k for k in REWARD_KWARGS if k not in sig.parameters]
        raise TypeError(f"reward `{name}` must accept `**kwargs` (it is also given {', '.join(missing)})")
    return tuple(out)


__all__ = [
    "REWARD_KWARGS",
    "PythonRewardTerm",
    "SpecError",
    "check",
    "plan_grid",
    "python_rewards",
    "register_reward",
    "run_grid",
    "run_spec",
    "unregister_reward",
]
