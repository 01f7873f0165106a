"""`percep run` on several processes (DDP over gloo on the CPU): rank 0 alone writes, evaluates
and reports; the ranks end every stage with identical weights; SFT on 2 ranks × batch 2 equals
one process with batch 4; a killed multi-device run resumes; untested strategies are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SPEC = """experiment ddp
seed 3
include "{root}/specs/common/roles.pd"
task graph_coloring {{ nodes = 4, reasoning = brief, train = 32, test = 4 }}
model tiny {{ width = 64, depth = 2, heads = 2, vision_width = 32, vision_depth = 1 }}
stage base = sft {{ steps = 6, batch = {batch}, lr = 0.003, eval_every = 3 }}
stage warm = sft from base {{ steps = 30, batch = {batch}, lr = 0.01 }}
stage rl = grpo from warm {{ steps = 2, batch = {grpo_batch}, group = 4, max_new_tokens = 16, reward = perception_partial + outcome }}
eval {{ test = 4, max_new_tokens = 16 }}
trainer {{ precision = "32-true", accelerator = "cpu", devices = {devices}, log_every = 1 }}
"""

# The comparison with one process runs in fp32 (no bf16 autocast), so that it measures the
# data-parallel arithmetic alone: the order of float32 sums (the gradient all-reduce adds the two
# ranks' sums; one process sums over its padded batch of 4). Measured after these 6 steps at lr
# 3e-3: max |Δw| 7.5e-6 (the largest update 1.8e-2; ‖Δw‖ 5e-6 of ‖update‖); 4.8e-6 after 4 steps.
# The tolerance is ≈7× that. Over many steps
# at a large lr the difference grows, as any rounding difference does under AdamW (a coordinate
# whose gradient is near 0 gets a ±lr step whichever its sign): after 40 steps at lr 1e-2 the
# two runs differed by 13% of the update norm, so the check is made on the first, short stage.
TOLERANCE = 5e-5


def percep(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "percepdsl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_spec(path: Path, devices: int, batch: int, grpo_batch: int = 2, **extra: str) -> Path:
    text = SPEC.format(root=ROOT, devices=devices, batch=batch, grpo_batch=grpo_batch)
    for old, new in extra.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The spec on 2 processes (batch 2 each) and on 1 (batch 4)."""
    out: dict[str, Path] = {}
    for name, devices, batch in (("two", 2, 2), ("one", 1, 4)):
        tmp = tmp_path_factory.mktemp(name)
        spec = write_spec(tmp / "ddp.pd", devices, batch)
        if devices == 1:  # the comparison needs the first stage only
            spec.write_text("".join(line for line in spec.read_text().splitlines(True) if not line.startswith(("stage warm", "stage rl"))))
        proc = percep("run", str(spec), "--out", str(tmp / "runs"), "-q", cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = Path(proc.stdout.strip().splitlines()[-1])
        out[name + "_stderr"] = proc.stderr  # type: ignore[assignment]
    return out


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "stages" / stage / "model" / "model.safetensors")


def test_rank_zero_alone_writes_and_reports(runs) -> None:
    run_dir = runs["two"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and list(summary["stages"]) == ["base", "warm", "rl"]
    err = runs["two_stderr"]
    assert err.count("stage base (sft)") == 1 and err.count("| stage ") == 1  # one report (the stage table), from rank 0
    assert "2 ranks" in err and "Traceback" not in err
    base = json.loads((run_dir / "stages" / "base" / "done.json").read_text())
    assert [h["step"] for h in base["history"]] == [3, 6]  # the evaluation inside the stage (at step 3) did not hang
    assert len([p for p in (run_dir / "stages" / "base").iterdir() if p.name.startswith("log")]) == 1
    # the reward statistics are over both ranks' rollouts: 2 steps × 2 ranks × 2 prompts × group 4
    assert summary["stages"]["rl"]["diagnostics"]["rollouts"] == 32


def test_ranks_end_every_stage_with_identical_weights(runs) -> None:
    """SFT and GRPO stages (whose update, after the warm-up stage, sees rewards that vary within
    groups, so it moves the weights) end with the same weights on both ranks."""
    digests = {}
    for stage in ("base", "warm", "rl"):
        done = json.loads((runs["two"] / "stages" / stage / "done.json").read_text())
        assert done["ranks"]["world"] == 2
        a, b = done["ranks"]["weights_sha256"]
        assert a == b, stage
        digests[stage] = a
    assert len(set(digests.values())) == 3  # every stage changed the weights
    rl = json.loads((runs["two"] / "summary.json").read_text())["stages"]["rl"]["diagnostics"]
    assert rl["constant_group_frac"] < 1  # some groups had an advantage to learn from


def test_two_ranks_equal_one_process_with_the_global_batch(runs) -> None:
    """SFT with batch 2 on each of 2 ranks trains the weights one process with batch 4 trains: the
    same items at every step (each global batch cut in two) and the token mean over the global
    batch (the ranks divide by the global token count)."""
    from safetensors.torch import load_file

    two, one = weights(runs["two"], "base"), weights(runs["one"], "base")
    init = load_file(runs["one"] / "init" / "model.safetensors")
    assert two.keys() == one.keys() == init.keys()
    diff = max(float((two[k] - one[k]).abs().max()) for k in two)
    moved = max(float((one[k] - init[k]).abs().max()) for k in one)
    assert moved > 100 * TOLERANCE  # training moved the weights far more than the tolerance
    assert diff <= TOLERANCE, f"max |Δw| {diff:.3g} between 2 ranks × batch 2 and 1 process × batch 4"


def test_a_second_invocation_finds_the_run_complete(runs) -> None:
    spec_dir = runs["two"].parent.parent
    proc = percep("run", "ddp.pd", "--out", str(runs["two"].parent), "-q", cwd=spec_dir)
    assert proc.returncode == 0 and "already complete" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_multi_device_run_resumes(runs, tmp_path: Path) -> None:
    """SIGKILL rank 0 mid-stage: the rank it started exits too; --resume on 2 ranks ends with the
    weights of the uninterrupted 2-rank run, bit for bit. (Two more 2-process runs, ≈35 s on an
    idle 2-core machine, 2.5 min under load: slow.)"""
    spec = write_spec(tmp_path / "ddp.pd", 2, 2)
    spec.write_text("".join(line for line in spec.read_text().splitlines(True) if not line.startswith(("stage warm", "stage rl"))))
    env = dict(os.environ, PERCEP_RESUME_EVERY="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "percepdsl", "run", str(spec), "--out", str(tmp_path / "runs"), "-q"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline, ckpt = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and ckpt is None:
        ckpt = next(iter((tmp_path / "runs").glob("*/stages/base/resume.ckpt")), None)
        time.sleep(0.05)
    assert ckpt is not None, "no resume checkpoint appeared"
    children = _children(proc.pid)
    assert children, "rank 0 started no other rank"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    assert not any(_alive(c) for c in children), "a rank outlived the killed rank 0"
    resumed = percep("run", str(spec), "--out", str(tmp_path / "runs"), "--resume", "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = Path(resumed.stdout.strip().splitlines()[-1])
    want, got = weights(runs["two"], "base"), weights(run_dir, "base")
    assert all(torch.equal(want[k], got[k]) for k in want)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_untested_strategies_are_refused_at_check_time(strategy: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.pd", 2, 2, **{"devices = 2,": f'devices = 2, strategy = "{strategy}",'})
    proc = percep("check", str(spec), cwd=tmp_path)
    assert proc.returncode == 1 and "error[unsupported-choice]" in proc.stdout and "untested" in proc.stdout, proc.stdout
    run = percep("run", str(spec), "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert run.returncode == 2 and "untested" in run.stderr and not (tmp_path / "runs").exists()


def test_devices_that_are_not_there_are_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.pd", 2, 2, **{'accelerator = "cpu"': 'accelerator = "cuda"'})
    proc = percep("run", str(spec), "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot start 2 device(s) × 1 node(s) on `cuda`" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_nodes_started_by_hand_train_as_two_devices_do(runs, tmp_path: Path) -> None:
    """`num_nodes = 2, devices = 1`, each node's `percep run` started by hand with Lightning's
    MASTER_ADDR, MASTER_PORT and NODE_RANK (here both on this machine, one run directory): node 1
    writes nothing, and the first stage ends with the 2-device run's weights, bit for bit.
    (≈1 min under load: slow.)"""
    import socket

    spec = write_spec(tmp_path / "ddp.pd", 1, 2, **{"devices = 1,": "devices = 1, num_nodes = 2,"})
    spec.write_text("".join(line for line in spec.read_text().splitlines(True) if not line.startswith(("stage warm", "stage rl"))))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for node in (1, 0):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "percepdsl", "run", str(spec), "--out", str(tmp_path / "runs"), "-q"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0].strip() == "" and outs[0][1].count("stage base") == 0  # node 1 reports nothing
    run_dir = Path(outs[1][0].strip().splitlines()[-1])
    done = json.loads((run_dir / "stages" / "base" / "done.json").read_text())
    assert done["ranks"]["world"] == 2 and len(set(done["ranks"]["weights_sha256"])) == 1
    want, got = weights(runs["two"], "base"), weights(run_dir, "base")
    assert all(torch.equal(want[k], got[k]) for k in want)
