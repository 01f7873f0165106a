"""Planning a grid: check the grid file, fold in `--set` values, expand and compile its cells,
and find how far each cell got on disk (done, to resume, pending, failed earlier)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from percepdsl.diagnostics import Diagnostic, did_you_mean, relpath
from percepdsl.grid import Cell, expand, first_point, template_path, training_key
from percepdsl.ir import ExperimentIR, GridIR, content_hash

from .. import inputs
from .common import CELLS_DIR, DONE, FAILED, PENDING, RESUME, STATE_FILE, GridError
from .state import load_state, read_summary

GRID_ROOT = Path("runs/grids")  # default parent of grid directories


@dataclass
class CellPlan:
    """One cell of a grid: what to run, where its run directory is, and how far it got."""

    index: int  # 1-based position in the grid's stable cell order
    cell: Cell  # the grid-level params (axes, `fix`, --set) and the seed
    params: dict[str, Any]  # every template param of the compiled cell (what summaries report)
    seed: int  # the compiled seed (the grid's, or the template's when the grid has none)
    experiment: str
    hash: str  # content_hash of the compiled IR: names the run directory
    cells_dir: Path
    status: str = PENDING  # done | pending | resume | failed (from an earlier run of the grid)
    previous: dict[str, Any] | None = None  # this cell's entry in an earlier grid_state.json

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.hash}"

    @property
    def run_dir(self) -> Path:
        return self.cells_dir / self.name

    @property
    def log_path(self) -> Path:
        return self.cells_dir / f"{self.name}.log"

    @property
    def label(self) -> str:
        return self.cell.label()

    def overrides(self) -> dict[str, str]:
        """`--set` pairs that reproduce this cell from the template."""
        return self.cell.overrides()

    def run_args(self, template: Path, resume: bool) -> list[str]:
        """Arguments after the launcher: `SPEC --set k=v ... --out CELLS [--resume]`."""
        args = [str(template)]
        for k, v in self.overrides().items():
            args += ["--set", f"{k}={v}"]
        args += ["--out", str(self.cells_dir)]
        return args + (["--resume"] if resume else [])


@dataclass
class GridPlan:
    grid: GridIR  # with --set values folded into `fixed` (and `seeds` when --set seed=N)
    grid_file: Path
    template: Path
    out_dir: Path
    sets: dict[str, str]
    cells: list[CellPlan]

    @property
    def cells_dir(self) -> Path:
        return self.out_dir / CELLS_DIR

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    @property
    def swept(self) -> list[str]:
        return [n for ax in self.grid.axes for n in ax.names]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)


def default_out_dir(grid: GridIR) -> Path:
    return GRID_ROOT / grid.name


def compile_spec(path: Path, overrides: dict[str, str], origin: str = "--set") -> ExperimentIR:
    """The experiment IR of a spec with overrides, or a GridError carrying its diagnostics."""
    from percepdsl.check import check_file

    res = check_file(path, overrides, origin=origin, fragment_ok=False)
    if not isinstance(res.ir, ExperimentIR):
        errors = [d for d in res.diagnostics if d.is_error]
        what = "is a grid file, not an experiment spec" if res.ir is not None else "does not compile"
        raise GridError(
            f"{relpath(path)} {what}" + (f" with {origin} values" if overrides and res.ir is None else ""),
            errors,
            res.loaded.sources if res.loaded else {},
        )
    return res.ir


def _apply_sets(grid: GridIR, tpath: Path, sets: dict[str, str]) -> tuple[GridIR, dict[str, Any]]:
    """Fold `--set` values into the grid (as `fix` entries); return it and the template's params.

    A --set must name a template param that no axis sweeps; `seed` only when the grid has no
    `seeds`. Values are type-checked by compiling the template with them."""
    first: dict[str, str] = {}
    try:
        tir = compile_spec(tpath, {})
    except GridError:  # params without a default, which the grid sets (it checked): compile it with one of its cells
        cells = expand(grid)
        first = cells[0].overrides() if cells else first_point(grid)
        first.pop("seed", None)
        tir = compile_spec(tpath, first, origin="grid")
    tparams = {**tir.params, "seed": tir.seed}  # `seed`: a `where` on it in a grid without `seeds`
    swept = {n for ax in grid.axes for n in ax.names}
    for name in sets:
        if name == "seed":
            if grid.seeds:
                raise GridError(
                    f"grid `{grid.name}` sweeps seeds ({', '.join(map(str, grid.seeds))}); "
                    "--set seed=N is only for grids without a `seeds` line"
                )
        elif name in swept:
            raise GridError(
                f"--set {name}=...: `{name}` is swept by an axis of grid `{grid.name}`; "
                "--set fixes only template params that no axis sweeps (edit the axis instead)"
            )
        elif name not in tir.params:
            guess = did_you_mean(name, tir.params)
            hint = f"did you mean `{guess}`?" if guess else f"its params: {', '.join(tir.params) or 'none'}"
            raise GridError(f"--set {name}=...: the template {relpath(tpath)} has no param `{name}` ({hint})")
    for name in sets:
        if name == "seed":
            continue
        one = compile_spec(tpath, {**first, name: sets[name]})
        if one.params != tir.params and training_key(one) == training_key(tir):
            raise GridError(
                f"--set {name}=...: the template {relpath(tpath)} never uses `{name}`; the cells would train what they train "
                "without it, under new names (every cell run again)"
            )
    if not sets:
        return grid, dict(tparams)
    ir = compile_spec(tpath, {**first, **sets})
    typed = {n: ir.params[n] for n in sets if n != "seed"}
    update: dict[str, Any] = {"fixed": {**grid.fixed, **typed}}
    if "seed" in sets:
        update["seeds"] = [ir.seed]
    return grid.model_copy(update=update), {**ir.params, "seed": ir.seed}


def plan_grid(grid_file: str | Path, out: str | Path | None = None, sets: Sequence[str] | dict[str, str] = ()) -> GridPlan:
    """Check the grid, expand and compile its cells, and find each cell's status on disk.

    Raises GridError when the grid or a --set is wrong, or a cell does not compile."""
    from percepdsl.check import check_file, parse_overrides

    grid_file = Path(grid_file)
    res = check_file(grid_file, fragment_ok=False)
    sources = res.loaded.sources if res.loaded else {}
    if res.ir is None:
        raise GridError(f"grid {relpath(grid_file)} does not check", [d for d in res.diagnostics if d.is_error], sources)
    if not isinstance(res.ir, GridIR):
        raise GridError(f"{relpath(grid_file)} is an experiment spec, not a grid: run it with `percep run`")
    bad: list[Diagnostic] = []
    if isinstance(sets, dict):
        overrides = dict(sets)
    else:
        overrides, bad = parse_overrides(list(sets))
    if bad:
        raise GridError("malformed --set", bad)
    tpath = template_path(grid_file, res.ir)
    grid, tparams = _apply_sets(res.ir, tpath, overrides)
    out_dir = Path(out) if out is not None else default_out_dir(grid)
    out_dir = out_dir.absolute()
    cells_dir = out_dir / CELLS_DIR
    previous = load_state(out_dir)
    prev_by_hash = {e.get("hash"): e for e in (previous or {}).get("cells", []) if isinstance(e, dict)}

    plans: list[CellPlan] = []
    broken: list[str] = []
    trains: dict[tuple[str, int], Cell] = {}  # what a cell trains (and its seed) -> the first cell that trains it
    stale: list[str] = []  # cells run (or begun) with other inputs than the template names now
    for i, cell in enumerate(expand(grid, tparams), start=1):
        try:
            ir = compile_spec(tpath, cell.overrides(), origin="grid")
        except GridError as exc:
            broken.append(f"cell {cell.label()}: {exc.diagnostics[0].message if exc.diagnostics else exc.message}")
            continue
        h = content_hash(ir)
        twin = trains.setdefault((training_key(ir), ir.seed), cell)
        if twin is not cell and twin.params != cell.params:  # beyond the cells the checker compiles
            broken.append(
                f"cell {cell.label()}: trains the same run as cell {twin.label()} (their params differ in nothing the template uses)"
            )
            continue
        plan = CellPlan(i, cell, dict(ir.params), ir.seed, ir.name, h, cells_dir, previous=prev_by_hash.get(h))
        plan.status = _disk_status(plan)
        if plan.status in (DONE, RESUME) and (diff := inputs.changed(plan.run_dir, ir)):
            stale.append(f"cell {cell.label()} ({relpath(plan.run_dir)}): {'; '.join(diff)}")
        plans.append(plan)
    if stale:
        more = f" (and {len(stale) - 3} more)" if len(stale) > 3 else ""
        raise GridError(
            f"{len(stale)} cell{'s' if len(stale) > 1 else ''} of grid `{grid.name}` ran with other inputs than the template "
            f"names now{more}; run the grid into another --out, or delete those cells:\n  " + "\n  ".join(stale[:3])
        )
    if not plans and not broken:
        raise GridError(f"grid `{grid.name}` has no cells with these --set values (its `where` filter rejects every combination)")
    if broken:
        more = f" (and {len(broken) - 3} more)" if len(broken) > 3 else ""
        raise GridError(
            f"{len(broken)} cell{'s' if len(broken) > 1 else ''} of grid `{grid.name}` do not compile{more}:\n  " + "\n  ".join(broken[:3])
        )
    return GridPlan(grid, grid_file, tpath, out_dir, overrides, plans)


def _disk_status(cell: CellPlan) -> str:
    if read_summary(cell.run_dir) is not None:
        return DONE
    if cell.previous and cell.previous.get("status") == FAILED:
        return FAILED
    return RESUME if cell.run_dir.is_dir() else PENDING
