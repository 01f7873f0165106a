"""Running ablation grids (`percep grid`) and aggregating them (`percep report`).

A grid file (see `percepdsl.grid`) sweeps the params of a template spec. This package
turns it into cells, runs every cell as its own `percep run` process, and gathers the
finished run directories into one results table and a few plots.

Layout of a grid directory (default `runs/grids/<grid name>`)::

    GRID_OUT/
      grid_state.json            what was planned, what ran, what failed (exit code, log tail)
      cells/<experiment>-<hash>/ one `percep run` directory per cell; <hash> = content_hash(IR)
      cells/<experiment>-<hash>.log   the cell's stdout + stderr
      results.csv, results.md    a row per setting: mean ± std over seeds
      paired.md, paired.json     with --baseline: each setting's paired differences to it, 95% CIs
      tradeoff.png, metrics_vs_<axis>.png

Resumability comes from the run directories themselves: a cell whose
`summary.json` says `"status": "complete"` is done and never re-run; a run
directory without one was interrupted (or failed) and is continued with
`percep run --resume`. `grid_state.json` only adds what the directories cannot
say (exit codes, log tails) and is rewritten atomically after every event.

Execution backends: local processes (default; no extra dependency), Ray tasks on an
existing cluster (`--backend ray`; `pip install -e '.[ray]'`) or SLURM jobs through
submitit (`--backend slurm`; `pip install -e '.[slurm]'`), each task or job running the
same subprocess where it lands. `--fail-fast` stops the grid at the first failed cell.
This package never imports torch: it launches processes and reads JSON. Ray, submitit and
matplotlib are imported only when used.

Modules, each importing only those above it:

- `common`: file names, exit codes, cell status values, `GridError`
- `state`: run summaries, grid_state.json, the grid directory's lock
- `plan`: check, expand and compile the cells; their status on disk
- `backends`: local processes, Ray tasks, SLURM jobs
- `progress`: done / running / failed and an ETA
- `execute`: run the cells that are not done, record every event
- `results`: the results table (CSV, Markdown)
- `plots`: the table's plots (matplotlib)
- `paired`: paired differences to a baseline arm, t and hierarchical-bootstrap intervals
- `commands`: `percep grid` and `percep report`
"""

from .backends import SlurmOptions
from .commands import grid_command, report_command, run_plan, write_results
from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, GridError
from .execute import GridOutcome, execute
from .plan import CellPlan, GridPlan, plan_grid
from .results import ResultsTable, aggregate

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CellPlan",
    "GridError",
    "GridOutcome",
    "GridPlan",
    "ResultsTable",
    "SlurmOptions",
    "aggregate",
    "execute",
    "grid_command",
    "plan_grid",
    "report_command",
    "run_plan",
    "write_results",
]
