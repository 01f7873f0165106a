"""Where cells run: child processes of the grid runner (`LocalBackend`), Ray tasks on a cluster
(`RayBackend`), or SLURM jobs submitted through submitit (`SlurmBackend`); each task or job runs
the same cell process where it lands. Ray and submitit are imported only when chosen."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from percepdsl.io import os_error_text

from .common import EXIT_NOT_STARTED, GridError, now
from .state import read_summary

if TYPE_CHECKING:
    from .plan import CellPlan

RAY_INSTALL = "pip install -e '.[ray]'"
SLURM_INSTALL = "pip install -e '.[slurm]'"
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000
STOP_GRACE_S = 15.0  # after SIGINT, how long a cell may take to stop (save a checkpoint) before SIGKILL
POLL_S = 0.2


def default_launcher() -> list[str]:
    """The real trainer, in the current interpreter: `python -m percepdsl run`."""
    return [sys.executable, "-m", "percepdsl", "run"]


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last lines of a log (what a failed cell said last)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return tail[-chars:]


def _open_log(path: Path, argv: Sequence[str]) -> io.BufferedWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab")
    f.write(f"==== {now()} percep grid: {' '.join(argv)}\n".encode())
    f.flush()
    return f


def _spawn(argv: Sequence[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a cell process, output to its log, in its own process group (so that stopping
    it reaches its workers, and a terminal's Ctrl-C reaches only the grid runner)."""
    log = _open_log(log_path, argv)
    try:
        with _sigint_inheritable():
            return subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=(os.name == "posix"),
                preexec_fn=_stop_with_parent(),
            )
    finally:
        log.close()  # the child holds its own descriptor


def _stop_with_parent():
    """In the child before exec (Linux): SIGINT when the process that started it dies.

    A cell runs in its own session, so a grid runner killed outright (SIGKILL, the OOM killer) could
    not stop it: it ran on, and the re-run of the grid started a second process on the same run
    directory. SIGINT stops it as Ctrl-C does (it keeps its resume checkpoint). None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGINT), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(130)

    return preexec


@contextlib.contextmanager
def _sigint_inheritable() -> Iterator[None]:
    """Let a child started inside see SIGINT, the signal that asks a run to stop cleanly.

    A child inherits a blocked signal mask (Ray workers block SIGINT) and an ignored SIGINT (a
    process started in the background by a shell ignores it). Unblock it for this thread and,
    from the main thread, install a handler (exec resets it to the default), both restored after.
    The cell is in its own session, so a terminal's Ctrl-C still reaches only the grid runner."""
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    ignored = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - Windows has no process groups here
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGINT (a run saves its state and exits), then SIGKILL whatever is left after `grace` s."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + grace
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # a second Ctrl-C: do not wait
        pass
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log tail is what the cell said last, not what it buffered
    env.update(extra)
    return env


def run_cell_process(
    run_args: Sequence[str], launcher: Sequence[str] | None, log_path: str, env_extra: dict[str, str], run_dir: str
) -> dict[str, Any]:
    """Run one cell to the end where this function is called (a Ray worker) and report back.

    Returns exit code, log tail, host, and the run's summary when it completed, so that the
    grid directory gets results even when the cluster does not share its filesystem. A Ray
    cancellation (KeyboardInterrupt in this task) stops the cell process before returning."""
    import socket

    argv = [*(launcher or default_launcher()), *run_args]
    t0 = time.monotonic()  # a queued Ray task or SLURM job starts here, not when the grid submitted it
    proc = _spawn(argv, Path(log_path), _child_env(env_extra))
    # A cancelled SLURM job gets SIGTERM (submitit only logs it): stop the cell as Ctrl-C would.
    main = threading.current_thread() is threading.main_thread()
    prev_term = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        # Wait in short slices: Ray delivers a cancellation as an asynchronous KeyboardInterrupt,
        # which a single blocking wait() would never see.
        while (rc := proc.poll()) is None:
            time.sleep(POLL_S)
    except BaseException:
        _stop([proc], STOP_GRACE_S)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, prev_term)
    return {
        "exit_code": rc,
        "log_tail": log_tail(log_path),
        "host": socket.gethostname(),
        "summary": read_summary(Path(run_dir)),
        "seconds": round(time.monotonic() - t0, 2),
    }


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


@dataclass
class Finished:
    """A cell process that ended: its exit code, what it said last, and (Ray) its summary."""

    exit_code: int
    log_tail: str
    summary: dict[str, Any] | None = None
    host: str | None = None
    error: str | None = None  # the backend failed to run it at all
    seconds: float | None = None  # how long the cell process ran, where the backend measured it (a task may wait in a queue first)


class Backend(Protocol):
    def start(self, cell: CellPlan, args: list[str]) -> None: ...
    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]: ...
    def stop_all(self, grace: float) -> list[CellPlan]: ...
    def close(self) -> None: ...
    @property
    def running(self) -> int: ...


class LocalBackend:
    """Cells as child processes of this one."""

    def __init__(self, launcher: Sequence[str] | None, env_extra: dict[str, str]):
        self.launcher = list(launcher or default_launcher())
        self.env = _child_env(env_extra)
        self.procs: dict[int, tuple[CellPlan, subprocess.Popen]] = {}
        self.unstarted: list[tuple[CellPlan, Finished]] = []  # launch failures, reported by the next poll

    @property
    def running(self) -> int:
        return len(self.procs) + len(self.unstarted)

    def start(self, cell: CellPlan, args: list[str]) -> None:
        argv = [*self.launcher, *args]
        try:
            self.procs[cell.index] = (cell, _spawn(argv, cell.log_path, self.env))
        except OSError as exc:  # the launcher does not exist or cannot be executed, the log cannot be opened
            what = "the cell" if exc.filename is not None and Path(exc.filename) == cell.log_path else argv[0]
            msg = f"percep grid: cannot start {what}: {os_error_text(exc)}"
            with contextlib.suppress(OSError), open(cell.log_path, "a", encoding="utf-8") as log:  # a directory there
                log.write(msg + "\n")
            self.unstarted.append((cell, Finished(EXIT_NOT_STARTED, msg, error=msg)))

    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]:
        if self.unstarted:
            out, self.unstarted = self.unstarted, []
            return out
        deadline = time.monotonic() + timeout
        while True:
            done = [(c, p) for c, p in self.procs.values() if p.poll() is not None]
            if done or time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, timeout))
        out = []
        for c, p in done:
            del self.procs[c.index]
            out.append((c, Finished(p.returncode, log_tail(c.log_path))))
        return out

    def stop_all(self, grace: float) -> list[CellPlan]:
        cells = [c for c, _ in self.procs.values()]
        _stop([p for _, p in self.procs.values()], grace)
        self.procs.clear()
        return cells

    def close(self) -> None:
        self.stop_all(0.0)


def import_ray():
    """`ray`, or a GridError that says how to install it."""
    try:
        import ray  # noqa: PLC0415 - optional dependency, imported only for --backend ray
    except ImportError as exc:
        raise GridError(f"--backend ray needs Ray, which is not installed ({exc}); install it with: {RAY_INSTALL}") from None
    return ray


class RayBackend:
    """Cells as Ray tasks on an existing cluster; each task runs the cell process on its worker.

    The grid directory and the spec files must be at the same paths on every node (a shared
    filesystem, as is usual for a cluster); without one, summaries and log tails still come
    back to this machine through the task's return value."""

    def __init__(
        self,
        launcher: Sequence[str] | None,
        env_extra: dict[str, str],
        address: str | None,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float = 0.0,
    ):
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()
        if self.owns_ray:
            # address None: RAY_ADDRESS, else a cluster already running on this machine, else a local one.
            try:
                self.ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except Exception as exc:  # ConnectionError, a bad address, a version mismatch, ...
                raise GridError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {type(exc).__name__}: {exc}") from None
        self.launcher = list(launcher) if launcher else None  # None: resolved on the worker
        # A cell uses the CPUs Ray reserved for it, no more (torch would otherwise take every core of the node).
        self.env_extra = {"OMP_NUM_THREADS": str(max(1, int(cpus_per_cell))), **env_extra}
        self.refs: dict[Any, CellPlan] = {}
        try:
            self.task = self.ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)(run_cell_process)
        except ValueError as exc:  # a quantity Ray does not take: 0.00001 CPUs, 1.5 GPUs
            self.close()
            raise GridError(f"Ray refuses --cpus-per-cell {cpus_per_cell:g} --gpus-per-cell {gpus_per_cell:g}: {exc}") from None
        try:
            self._check_fits(cpus_per_cell, gpus_per_cell)
        except GridError:
            self.close()
            raise

    def _check_fits(self, cpus: float, gpus: float) -> None:
        """A cell that no node can hold never starts: Ray keeps an infeasible task waiting, and the
        grid would wait with it. Refused when Ray was started here (a local instance cannot grow);
        on a cluster reached by address, said once (an autoscaler may add such a node)."""
        try:
            nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # a client connection or another Ray: nothing to check against
            return
        if not nodes or any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            return
        big = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)))
        why = (
            f"a cell asks Ray for {cpus:g} CPU(s) and {gpus:g} GPU(s) (--cpus-per-cell, --gpus-per-cell), "
            f"but no node of the cluster has that much (the largest: {big.get('CPU', 0):g} CPU(s), {big.get('GPU', 0):g} GPU(s))"
        )
        node = getattr(getattr(getattr(self.ray, "_private", None), "worker", None), "_global_node", None)
        if self.owns_ray and getattr(node, "head", False):  # the local instance ray.init started for this grid
            raise GridError(why + "; lower them, or run Ray with bigger nodes and pass --address")
        print(f"warning: {why}; the cells wait until a node that fits joins the cluster", file=sys.stderr)

    @property
    def running(self) -> int:
        return len(self.refs)

    def start(self, cell: CellPlan, args: list[str]) -> None:
        ref = self.task.remote(args, self.launcher, str(cell.log_path), self.env_extra, str(cell.run_dir))
        self.refs[ref] = cell

    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]:
        if not self.refs:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        out = []
        for ref in ready:
            cell = self.refs.pop(ref)
            try:
                r = self.ray.get(ref)
                out.append((cell, Finished(r["exit_code"], r["log_tail"], r.get("summary"), r.get("host"), seconds=r.get("seconds"))))
            except Exception as exc:  # the task itself died (worker lost, cancelled, import error on the worker)
                out.append((cell, Finished(-1, "", error=f"{type(exc).__name__}: {exc}"[-LOG_TAIL_CHARS:])))
        return out

    def stop_all(self, grace: float) -> list[CellPlan]:
        cells = list(self.refs.values())
        refs = list(self.refs)
        for ref in refs:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: it stops its process
        if refs:
            try:
                _, left = self.ray.wait(refs, num_returns=len(refs), timeout=grace)
            except KeyboardInterrupt:
                left = refs
            for ref in left:
                self.ray.cancel(ref, force=True)
        self.refs.clear()
        return cells

    def close(self) -> None:
        self.stop_all(0.0)
        if self.owns_ray:
            self.ray.shutdown()


def import_submitit():
    """`submitit`, or a GridError that says how to install it."""
    try:
        import submitit  # noqa: PLC0415 - optional dependency, imported only for --backend slurm
    except ImportError as exc:
        raise GridError(f"--backend slurm needs submitit, which is not installed ({exc}); install it with: {SLURM_INSTALL}") from None
    return submitit


@dataclass(frozen=True)
class SlurmOptions:
    """What each cell's SLURM job asks for (`percep grid --backend slurm` options)."""

    partition: str | None = None
    time_min: int = 60  # the job's time limit; a cell that hits it is resumed by the next `percep grid`
    cpus_per_cell: int = 1  # also the cell's thread count
    gpus_per_cell: int = 0
    mem_gb: float | None = None
    cluster: str = "slurm"  # submitit's executor: "slurm", or "local" (its stand-in that runs the same job code; tests)


class SlurmBackend:
    """Cells as SLURM jobs through submitit: each job runs the cell process on its node.

    Job scripts, submitit's logs and pickled results go to `<grid dir>/slurm/`; as with Ray, the
    grid directory and the spec files must be at the same paths on every node (a shared
    filesystem), and results also come back through the job's return value. Stopping the grid
    cancels the jobs (`scancel`: SIGTERM, which stops the cell like a Ctrl-C, so it keeps its
    resume checkpoint); the job ids are in grid_state.json."""

    def __init__(self, launcher: Sequence[str] | None, env_extra: dict[str, str], folder: Path, options: SlurmOptions):
        submitit = import_submitit()
        if options.cluster == "slurm" and shutil.which("sbatch") is None:
            raise GridError(
                "--backend slurm submits jobs with `sbatch`, which is not on this machine's PATH; run `percep grid` on a SLURM login node"
            )
        try:
            self.executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
        except Exception as exc:  # no sbatch here and no cluster named: say so, no traceback
            raise GridError(f"cannot submit SLURM jobs from this machine: {type(exc).__name__}: {exc}") from None
        params: dict[str, Any] = {
            "timeout_min": options.time_min,
            "cpus_per_task": options.cpus_per_cell,
            "gpus_per_node": options.gpus_per_cell,
            "name": "percep-grid",
        }
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.mem_gb is not None:
            params["mem_gb"] = options.mem_gb
        self.executor.update_parameters(**params)
        self.launcher = list(launcher) if launcher else None  # None: resolved on the node
        self.env_extra = {"OMP_NUM_THREADS": str(max(1, options.cpus_per_cell)), **env_extra}
        self.jobs: dict[int, tuple[CellPlan, Any]] = {}
        self.failed_submits: list[tuple[CellPlan, Finished]] = []

    @property
    def running(self) -> int:
        return len(self.jobs) + len(self.failed_submits)

    def start(self, cell: CellPlan, args: list[str]) -> None:
        try:
            job = self.executor.submit(run_cell_process, args, self.launcher, str(cell.log_path), self.env_extra, str(cell.run_dir))
        except Exception as exc:  # sbatch refused the job (bad partition, time over the limit, ...)
            msg = f"percep grid: SLURM refused the job: {type(exc).__name__}: {exc}"[-LOG_TAIL_CHARS:]
            self.failed_submits.append((cell, Finished(EXIT_NOT_STARTED, msg, error=msg)))
            return
        self.jobs[cell.index] = (cell, job)

    def job_id(self, cell: CellPlan) -> str | None:
        entry = self.jobs.get(cell.index)
        return str(entry[1].job_id) if entry else None

    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]:
        if self.failed_submits:
            out, self.failed_submits = self.failed_submits, []
            return out
        deadline = time.monotonic() + timeout
        while True:
            done = [(c, j) for c, j in self.jobs.values() if j.done()]
            if done or time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, timeout))
        out = []
        for cell, job in done:
            del self.jobs[cell.index]
            try:
                r = job.result()
                out.append((cell, Finished(r["exit_code"], r["log_tail"], r.get("summary"), r.get("host"), seconds=r.get("seconds"))))
            except Exception as exc:  # the job died (time limit, node failure, cancelled): submitit says why
                why = f"SLURM job {job.job_id}: {type(exc).__name__}: {exc}"[-LOG_TAIL_CHARS:]
                out.append((cell, Finished(-1, log_tail(cell.log_path), error=why)))
        return out

    def stop_all(self, grace: float) -> list[CellPlan]:
        cells = [c for c, _ in self.jobs.values()]
        for _, job in self.jobs.values():
            try:
                job.cancel(check=False)
            except Exception:  # already gone
                pass
        deadline = time.monotonic() + grace
        try:
            while time.monotonic() < deadline and not all(j.done() for _, j in self.jobs.values()):
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            pass
        self.jobs.clear()
        return cells

    def close(self) -> None:
        self.stop_all(0.0)
