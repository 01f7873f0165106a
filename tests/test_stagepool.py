"""`percep run --jobs N`: the arms of a shared base train side by side, each in its own process, and
leave exactly what a one-at-a-time run leaves; a failing or stopped arm loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = """experiment arms
seed 3
include "{root}/specs/common/roles.pd"
task graph_coloring {{ nodes = 4, reasoning = brief, train = 32, test = 4 }}
model tiny {{ width = 64, depth = 2, heads = 2, vision_width = 32, vision_depth = 1 }}
stage base = sft {{ steps = 6, batch = 4 }}
{arms}
eval {{ test = 4, max_new_tokens = 32 }}
trainer {{ precision = "bf16-mixed", log_every = 1, threads = 1 }}
"""
SFT_ARMS = """stage tm = sft from base {{ steps = {steps}, batch = 4 }}
stage ngdiff = sft from base {{ steps = {steps}, batch = 4, loss = ngdiff(perception, [reasoning, answer]), task {{ reasoning = trace, filler_words = 4 }} }}"""
# two GRPO arms sampling side by side: each worker's sampler must draw what a one-at-a-time run draws
# (named as the SFT arms, so that one test checks both)
GRPO_ARMS = """stage tm = grpo from base {{ steps = {steps}, batch = 2, group = 2, max_new_tokens = 12, reward = outcome }}
stage ngdiff = grpo from base {{ steps = {steps}, batch = 2, group = 2, max_new_tokens = 12, reward = perception_partial + outcome }}"""
# cache off: every stage trains in the run under test, none is taken from the other's
ENV = dict(os.environ, OMP_NUM_THREADS="1", PERCEP_STAGE_CACHE="off")
TIMED = ("_s_per_step", "_per_s")  # the diagnostics that are wall times


def spec(tmp_path: Path, steps: int = 4, arms: str = SFT_ARMS) -> Path:
    path = tmp_path / "arms.pd"
    path.write_text(ARMS.format(root=ROOT, arms=arms.format(steps=steps)))
    return path


def percep(*args: str, cwd: Path, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "percepdsl", *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def start(path: Path) -> subprocess.Popen:
    """`percep run --jobs 2` in the background, in its own process group (as a shell job is), with a
    resume checkpoint every 3 steps."""
    return subprocess.Popen(
        [sys.executable, "-m", "percepdsl", "run", str(path), "--out", "runs", "-q", "--jobs", "2"],
        cwd=path.parent,
        env=dict(ENV, PERCEP_RESUME_EVERY="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    "arms, sampled", [(SFT_ARMS, False), (GRPO_ARMS, False), (SFT_ARMS, True)], ids=["sft", "grpo", "sft-sampled-eval"]
)
def test_arms_side_by_side_write_what_a_one_at_a_time_run_writes(tmp_path: Path, arms: str, sampled: bool) -> None:
    """Also with a sampled evaluation (`eval { temperature = 1.0 }`): its draws are seeded by (seed,
    step) (`evaluate.eval_seed`), not taken from torch's global stream, which in a one-at-a-time run
    holds what the stages before it drew."""
    from safetensors.torch import load_file

    path = spec(tmp_path, arms=arms)
    if sampled:
        path.write_text(path.read_text().replace("max_new_tokens = 32,", "max_new_tokens = 32, temperature = 1.0,"))
    one = percep("run", str(path), "--out", "one", "-q", cwd=tmp_path)
    two = percep("run", str(path), "--out", "two", "-q", "--jobs", "2", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (tmp_path / p.stdout.split()[-1] for p in (one, two))
    assert a.name == b.name  # --jobs is not part of the experiment: the same IR, the same run name
    for stage in ("base", "tm", "ngdiff"):
        wa, wb = (load_file(d / "stages" / stage / "model" / "model.safetensors") for d in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] == wb[k]).all(), (stage, k)
        for d in (a, b):  # the spec sets `threads = 1`: both runs train every stage on one thread, and say so
            assert json.loads((d / "stages" / stage / "done.json").read_text())["threads"] == 1
        # the same files (a worker's tiny model lost its marker, percep_tiny.json: loaded again, the
        # stage was not the tiny model, eager attention, any more)
        ma, mb = (sorted(p.name for p in (d / "stages" / stage / "model").iterdir()) for d in (a, b))
        assert ma == mb, stage
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert list(sb["stages"]) == ["base", "tm", "ngdiff"]
    for stage in sa["stages"]:
        assert sa["stages"][stage]["metrics"] == sb["stages"][stage]["metrics"], stage
        # the diagnostics too, timings aside (a worker's stages had an empty token_share)
        da, db = ({k: v for k, v in s["stages"][stage]["diagnostics"].items() if not k.endswith(TIMED)} for s in (sa, sb))
        assert da == db, stage
        ea, eb = (
            [json.loads(x)["generated"] for x in sorted((d / "stages" / stage).glob("eval-*.jsonl"))[-1].read_text().splitlines()]
            for d in (a, b)
        )
        assert ea == eb, stage  # the same texts, sampled or greedy
    if arms == SFT_ARMS:  # ngdiff trains on its own task (`trace`, fillers): its diagnostics are its items', in a worker too
        shares = {stage: sb["stages"][stage]["diagnostics"]["token_share"] for stage in ("tm", "ngdiff")}
        assert shares["tm"] and shares["ngdiff"] and shares["tm"] != shares["ngdiff"], shares
    records = [json.loads(line) for line in (b / "eval.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"base", "tm", "ngdiff"}
    # the parent announced both arms; the workers' evaluation lines name their stage
    kind = arms.split("= ", 1)[1].split()[0]
    assert f"stage tm ({kind} from base)" in two.stderr and f"stage ngdiff ({kind} from base)" in two.stderr
    assert "[tm step 4]" in two.stderr and "[ngdiff step 4]" in two.stderr and "Traceback" not in two.stderr


def workers(pid: int) -> list[int]:
    """The stage workers among a process's children (spawned: `spawn_main` in their command line)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_an_arm_whose_process_dies_fails_the_run_and_the_other_arm_is_kept(tmp_path: Path) -> None:
    """An arm's process killed (as the out-of-memory killer does) while the other arm finishes:
    exit 3 naming the stage and the exit code, the finished arm kept, no summary, no traceback."""
    path = spec(tmp_path)
    path.write_text(path.read_text().replace("stage tm = sft from base { steps = 4", "stage tm = sft from base { steps = 100000"))
    proc = start(path)
    deadline = time.time() + 300
    left: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "runs").glob("*/stages/ngdiff/done.json")) and list((tmp_path / "runs").glob("*/stages/tm/resume.ckpt")):
            left = workers(proc.pid)
            if len(left) == 1:  # ngdiff's worker has exited: the one left trains tm
                break
        time.sleep(0.05)
    assert proc.poll() is None and len(left) == 1, proc.stderr.read()[-2000:]
    os.kill(left[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "run failed: stage `tm`: its process ended with exit code -9" in err and "Traceback" not in err, err[-3000:]
    run_dir = next((tmp_path / "runs").glob("arms-*"))
    assert (run_dir / "stages" / "ngdiff" / "done.json").exists() and (run_dir / "stages" / "tm" / "resume.ckpt").exists()
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["sigterm", "sigint"])
def test_a_signal_stops_every_arm_with_exit_130_and_resume_checkpoints(tmp_path: Path, sig: int) -> None:
    """A signal to `percep run --jobs 2` (to it alone, as a scheduler sends SIGTERM, or to its
    process group, as Ctrl-C does) stops both arms, each keeping its resume checkpoint."""
    path = spec(tmp_path, steps=100000)
    proc = start(path)
    deadline = time.time() + 300
    ckpts: list[Path] = []
    while time.time() < deadline and proc.poll() is None and len(ckpts) < 2:
        ckpts = list((tmp_path / "runs").glob("*/stages/*/resume.ckpt"))
        time.sleep(0.05)
    assert proc.poll() is None and len(ckpts) == 2, proc.stderr.read()[-2000:]
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: " in err and "--resume" in err and "Traceback" not in err, err[-3000:]
    assert {p.parent.name for p in (tmp_path / "runs").glob("*/stages/*/resume.ckpt")} == {"tm", "ngdiff"}


def test_jobs_with_several_ranks_per_stage_is_refused(tmp_path: Path) -> None:
    path = spec(tmp_path)
    path.write_text(path.read_text().replace("threads = 1 }", "threads = 1, devices = 2 }"))
    proc = percep("run", str(path), "--out", "runs", "-q", "--jobs", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--jobs 2 runs stages side by side" in proc.stderr and "2 ranks" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_stage_waits_for_the_stages_its_visual_roles_read() -> None:
    """`ExperimentIR.inputs`, what `--jobs` waits for: the parent, and a `visual` rule's reference
    stage where the stage's loss names that role (`post` reads `ref`'s weights though `ref` is not
    its ancestor); a root stage waits for nothing."""
    from percepdsl.check import check_text

    text = (
        'experiment v\nroles {\n  grounded = visual(reference = ref)\n  perception = between("<perception>", "</perception>")\n'
        "  reasoning = rest()\n}\ntask sudoku { size = 4 }\nmodel tiny { width = 32, depth = 1 }\n"
        "stage base = sft { steps = 10 }\nstage ref = sft { steps = 10 }\n"
        "stage post = sft from base { steps = 10, loss = 0.5 * mean(grounded) + 0.5 * mean(perception, reasoning) }\n"
        "stage plain = sft from base { steps = 10, loss = mean(perception, reasoning) }\n"
    )
    res = check_text(text, "v.pd")
    assert res.ok, [d.message for d in res.diagnostics]
    ir = res.ir
    assert ir.inputs(ir.stage("post")) == {"base", "ref"}
    assert ir.inputs(ir.stage("plain")) == {"base"}
    assert ir.inputs(ir.stage("base")) == ir.inputs(ir.stage("ref")) == set()
