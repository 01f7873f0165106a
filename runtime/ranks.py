"""The processes of a multi-device run and what they agree on.

A run with ``trainer { devices = n, num_nodes = m }`` has n·m processes ("ranks"). ``start``
launches them through Lightning Fabric before anything else happens: on each node the process
the user started re-executes its own command line once per further local device (Lightning's
subprocess launcher; other launchers — torchrun, SLURM tasks — start every rank themselves),
and all of them join one process group, which the per-stage Lightning Trainers then use.

Rank 0 alone prepares the run directory, writes, evaluates and reports; the other ranks build
the same task, model and encoder privately (before the process group exists: transformers
writes a model only on rank 0 of an initialised one), train, and learn every decision rank 0
takes (refused, already complete, which stages are done, whether to resume) by ``broadcast``.
Weights travel the same way (``sync_weights``), so only ``--resume`` needs the other ranks to
see the run directory (Lightning's checkpoint is read by every rank).

An outcome every rank takes part in (a refusal, a non-finite loss, a bad reward) ends the other
ranks with exit 0 and is reported by rank 0 with its exit code: Lightning's launcher kills every
process as soon as one it started exits non-zero, which would cut rank 0's report short. A rank
started by that launcher exits when rank 0 is gone (``_exit_with_parent``), so a killed run leaves
no process behind.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from percepdsl.ir import TrainerIR


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM allocation, `taskset`, a container's
    cpuset), not every core of the machine (`os.cpu_count()`), which split among parallel cells or stage
    workers gave each as many threads as the node has cores and left them stalling on a few."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity here (macOS, Windows)
        return os.cpu_count() or 1


# Collectives wait this long for every rank. Evaluation runs on rank 0 while the others wait at a
# barrier, and evaluating a real model on a CPU can take well over Lightning's default 30 min.
TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run; ``world == 1``: a single process."""

    world: int = 1
    rank: int = 0

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_weights(self, model: Any) -> None:
        """Give every rank rank 0's parameters and buffers (in place)."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def weights_digests(self, model: Any) -> list[str]:
        """SHA-256 of each rank's parameters and buffers (in rank order): data-parallel ranks
        must end a stage with identical weights."""
        import torch

        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return self.gather(h.hexdigest())


class LaunchError(Exception):
    """The trainer settings cannot start the ranks here (the message is Lightning's)."""


def launched_as_rank_zero(trainer: TrainerIR) -> bool:
    """Whether this process will be rank 0, as its launcher's environment says before the process
    group exists: torchrun's ``RANK``; a SLURM task's ``SLURM_PROCID``; else Lightning's
    ``NODE_RANK`` and ``LOCAL_RANK`` (a process started by hand: rank 0 of node 0). ``start``
    checks it against the rank the process group gives."""
    if trainer.devices * trainer.num_nodes == 1:
        return True
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if SLURMEnvironment.detect():
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("NODE_RANK", 0)) == 0 and int(env.get("LOCAL_RANK", 0)) == 0


def others_wait_for_this_one(trainer: TrainerIR) -> bool:
    """Whether other ranks were started without this process (other nodes, torchrun, SLURM tasks)
    and wait to hear from it; else rank 0 starts them itself, and need not when it has nothing
    for them (a complete or refused run)."""
    if trainer.devices * trainer.num_nodes == 1:
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return trainer.num_nodes > 1 or "RANK" in os.environ or SLURMEnvironment.detect()


def start(trainer: TrainerIR) -> Ranks:
    """Launch and join the ranks of ``trainer`` (one process: nothing to do)."""
    world = trainer.devices * trainer.num_nodes
    if world == 1:
        return Ranks()
    import lightning as L
    from lightning.fabric.strategies import DDPStrategy

    try:
        fabric = L.Fabric(
            accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes, strategy=DDPStrategy(timeout=TIMEOUT)
        )
    except Exception as exc:  # noqa: BLE001 - Lightning's configuration errors, e.g. more devices than there are
        raise LaunchError(f"{type(exc).__name__}: {exc}") from exc
    spawned = "LOCAL_RANK" in os.environ and int(os.environ["LOCAL_RANK"]) > 0 and "TORCHELASTIC_RUN_ID" not in os.environ
    fabric.launch()
    if spawned:
        _exit_with_parent()
    return Ranks(world=fabric.world_size, rank=fabric.global_rank)


def _exit_with_parent(every: float = 1.0) -> None:
    """End this process when the one that started it is gone (a rank Lightning's launcher started:
    rank 0 of its node; killed or failed, it would otherwise leave this rank waiting in a collective)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
