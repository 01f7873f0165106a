"""`percep run --jobs N`: the stages of a run that can train at the same time, each in its own process.

A stage can start once its inputs are done (`ExperimentIR.inputs`: its parent and the stages whose
weights its `visual` role rules read); the arms of a shared base are the usual case. Each starts in a
fresh process (spawned, not forked: torch's thread pools do not survive a fork) that builds the task,
model and encoder privately (`prepare(..., private=True)`), loads its parent's saved weights and runs
the `train_stage` a one-at-a-time run calls. Its weights, records and evaluation are the ones that run
writes, because what a stage computes depends on its IR and its parent's weights only (the data order
is a function of (seed, step), GRPO samples from seeded generators), not on what its process ran
before; tests/test_stagepool.py compares the weights of SFT and of GRPO arms byte for byte. The
parent process keeps the run directory's shared files (`init/`, the summary, the report): a worker
writes only its stage's directory and that stage's cache entry.

Threads: `trainer { threads }` per worker when the spec sets it, else the machine's cores shared
among the workers (two processes' OpenMP threads competing for one core stall each other;
`run.stage_threads`). Only a spec that sets it gets the weights of `--jobs 1` byte for byte: a
one-at-a-time run of a spec without it trains on all the cores, and another thread count rounds
differently, so such a stage's identity holds its thread count and a cache entry is not shared.

Nothing is lost on failure: when a stage fails, the stages already running finish (their work is
kept), no new stage starts, and the run fails with the first failure. Ctrl-C or SIGTERM stops every
worker; each keeps its last resume checkpoint and `--resume` continues them all.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from percepdsl.ir import ExperimentIR

STOP_GRACE_S = 60  # a stopped worker's time to leave training cleanly before it is killed


def run_parallel(ctx: Any, jobs: int) -> dict[str, dict[str, Any]]:
    """Every stage's record, in the IR's order: `finished(ctx, stage)` (done, or cached), or trained
    by a worker process, at most `jobs` at a time."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from .run import RunInterrupted, announce, finished

    ir: ExperimentIR = ctx.ir
    spawn = mp.get_context("spawn")
    threads = ctx.threads
    records: dict[str, dict[str, Any]] = {}
    todo = list(ir.stages)
    to_train: set[str] = set()  # stages `finished` said need training (asked once each)
    running: dict[Any, tuple[str, Any]] = {}  # the parent's end of a worker's pipe -> (stage, process)
    failure: tuple[str, str] | None = None  # (outcome, message) of the first stage that did not finish
    try:
        while True:
            started = True
            while started and failure is None:  # a stage found done or cached may free its children at once
                started = False
                for stage in [s for s in todo if ir.inputs(s) <= records.keys()]:
                    if stage.name not in to_train:
                        record = finished(ctx, stage)
                        if record is not None:
                            records[stage.name] = record
                            todo.remove(stage)
                            started = True
                            continue
                        to_train.add(stage.name)
                    if len(running) < jobs:
                        ctx.echo(announce(stage, ctx.stage_trainable.get(stage.name)))
                        ours, theirs = spawn.Pipe(duplex=False)
                        preflight = {"token_share": ctx.token_share, "stage_token_share": ctx.stage_token_share}
                        proc = spawn.Process(target=_worker, args=(theirs, ir, str(ctx.run_dir), stage.name, threads, preflight))
                        proc.start()
                        theirs.close()  # the worker holds the only writing end: its exit ends our recv
                        running[ours] = (stage.name, proc)
                        todo.remove(stage)
                        started = True
            if not running:
                break
            for conn in wait(list(running)):
                name, proc = running.pop(conn)
                outcome, payload = _receive(conn, proc, name)
                if outcome == "ok":
                    records[name] = payload
                elif failure is None:
                    failure = (outcome, payload)
    except KeyboardInterrupt:
        stopped = _stop(running)
        raise RunInterrupted(
            f"stopped stage(s) {', '.join(f'`{n}`' for n in stopped) or '(none running)'}; each keeps its last resume "
            "checkpoint and finished stages are kept"
        ) from None
    if failure is not None:
        raise _as_exception(*failure)
    return {s.name: records[s.name] for s in ir.stages}


def _receive(conn: Any, proc: Any, name: str) -> tuple[str, Any]:
    """A worker's one message, or how it ended without one."""
    try:
        message = conn.recv()
    except EOFError:  # it died before reporting: killed (out of memory?) or crashed in the interpreter
        proc.join(timeout=STOP_GRACE_S)
        message = (
            "died",
            f"stage `{name}`: its process ended with exit code {proc.exitcode} before reporting (killed by the "
            "system, e.g. out of memory?); its last resume checkpoint is kept",
        )
    finally:
        conn.close()
    proc.join()
    return message


def _stop(running: dict[Any, tuple[str, Any]]) -> list[str]:
    """SIGTERM to every worker still running (each ends its stage as a one-process run does on
    SIGTERM), then wait for them; the names of the stages stopped."""
    for _, proc in running.values():
        if proc.is_alive():
            proc.terminate()
    for conn, (_, proc) in running.items():
        proc.join(timeout=STOP_GRACE_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
    return [name for name, _ in running.values()]


def _as_exception(outcome: str, message: str) -> Exception:
    from .run import RunFailed, RunInterrupted, RunRefused

    if outcome == "refused":
        return RunRefused(message)
    if outcome == "interrupted":
        return RunInterrupted(message)
    return RunFailed(message)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker(conn: Any, ir: ExperimentIR, run_dir: str, name: str, threads: int, preflight: dict[str, Any]) -> None:
    """Train one stage in this process and send back ("ok", record) or (outcome, message).
    `preflight`: the parent's preflight figures (the token shares of the experiment's items and of
    each stage's own task), which a stage's diagnostics record (a private `prepare` checks nothing
    and has none)."""
    signal.signal(signal.SIGTERM, _interrupt)  # as `percep run` itself: SIGTERM stops like Ctrl-C
    import torch

    torch.set_num_threads(threads)
    from .run import RunFailed, RunInterrupted, RunRefused, prepare, quiet_libraries, train_stage

    quiet_libraries()

    def echo(msg: str) -> None:  # evaluation lines name their stage already: `[tm step 300] …`
        print(msg, file=sys.stderr, flush=True)

    try:
        ctx = dataclasses.replace(prepare(ir, Path(run_dir), echo, private=True), threads=threads, **preflight)
        message: tuple[str, Any] = ("ok", train_stage(ctx, ir.stage(name), progress=False))
    except RunRefused as exc:
        message = ("refused", str(exc))
    except RunFailed as exc:
        message = ("failed", str(exc))
    except (RunInterrupted, KeyboardInterrupt) as exc:
        message = ("interrupted", str(exc) or f"stage `{name}` was stopped; its last resume checkpoint is kept")
    except BaseException:  # a bug: its traceback is the report
        message = ("crashed", f"stage `{name}` crashed in its worker process:\n{traceback.format_exc()}")
    conn.send(message)
    conn.close()


__all__ = ["run_parallel"]
