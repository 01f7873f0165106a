"""Atomic writes (percepdsl/io.py): a reader, a crash or a resumed run sees a whole old file or a
whole new one, never part of one; weights files included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from percepdsl.io import (
    NotRegularFile,
    atomic_dir,
    atomic_path,
    json_text,
    read_json,
    read_jsonl,
    read_regular,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a new fi")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_replaced_file_keeps_its_mode_and_a_symlink_stays_a_link(tmp_path: Path) -> None:
    """`percep fmt` of a 0600 spec left it world-readable, and of a symlinked spec replaced the link
    by a formatted copy, the linked file unformatted."""
    private = tmp_path / "private.pd"
    private.write_text("old")
    private.chmod(0o600)
    write_text_atomic(private, "new")
    assert private.read_text() == "new" and (private.stat().st_mode & 0o777) == 0o600
    real = tmp_path / "real.pd"
    real.write_text("old")
    link = tmp_path / "link.pd"
    link.symlink_to("real.pd")
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pd", "private.pd", "real.pd"]


def test_a_directory_in_the_way_is_named_not_the_temporary(tmp_path: Path) -> None:
    """Replacing a file that is a directory (metrics.csv made one by hand) failed in the rename with
    the temporary as the error's path: `percep run --resume` said `run failed: Is a directory:
    runs/x/.metrics.csv.309-0f4d9c2f.tmp.csv`, a file that no longer exists. Now the error names the
    path that is in the way, and no temporary is left."""
    from percepdsl.io import os_error_text

    (tmp_path / "metrics.csv").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        write_text_atomic(tmp_path / "metrics.csv", "a,b\n")
    assert os_error_text(err.value) == f"Is a directory: {tmp_path / 'metrics.csv'}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.png"):
        pass
    assert not list(tmp_path.iterdir())


def test_temporary_keeps_the_suffix_and_small_writers_round_trip(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "sub" / "curves.png") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.suffix == ".png" and tmp.name.startswith(".curves.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "sub" / "curves.png").read_bytes() == b"png"
    write_text_atomic(tmp_path / "a.md", "é\n")
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    write_jsonl_atomic(tmp_path / "a.jsonl", [{"s": {3, 1}}, {"t": (1,)}])
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "é\n"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert read_jsonl(tmp_path / "a.jsonl") == [{"s": [1, 3]}, {"t": [1]}]


def test_atomic_dir_replaces_a_directory_whole(tmp_path: Path) -> None:
    out = tmp_path / "model_init"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    with atomic_dir(out) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "sub").mkdir()
        (staging / "sub" / "w").write_bytes(b"1")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["config.json", "sub", "sub/w"]
    with pytest.raises(ValueError), atomic_dir(out) as staging:
        (staging / "config.json").write_text("half")
        raise ValueError
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["model_init"]


WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from percepdsl_runtime.models import build_tiny, save_pretrained_dir

    torch.set_num_threads(1)
    vocab = [f"w{i}" for i in range(50)]
    loaded = build_tiny(vocab, image=32, width=128, depth=2, heads=2, vision_width=32, vision_depth=1, patch=16)
    k = 1
    while True:  # until killed: every version has all its tensors equal to k
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.fill_(k)
        save_pretrained_dir(loaded, sys.argv[1])
        k += 1
    """
)


def test_weights_are_never_seen_half_written_while_saved_nor_after_a_kill(tmp_path: Path) -> None:
    """The real stage writer (``save_pretrained_dir``: the model's and processor's
    ``save_pretrained`` into a staging directory, renamed into place) rewrites a stage directory
    in a loop; this process reads its weights as often as it can meanwhile, then SIGKILLs the
    writer. Every read and the directory left behind must be one whole version (a file written in
    place is seen truncated, and fails to load). Between the two renames of a replacement the
    directory is briefly absent: a read then finds nothing, never a part."""
    from safetensors.torch import load

    path = tmp_path / "stage" / "model"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stderr=subprocess.PIPE)
    seen: set[int] = set()
    reads = 0

    def read_whole() -> int | None:
        try:
            data = (path / "model.safetensors").read_bytes()  # one open: the bytes of one file
        except FileNotFoundError:
            return None
        tensors = load(data)
        k = int(next(iter(tensors.values())).flatten()[0])
        for name, t in tensors.items():
            assert bool((t == k).all()), f"{name} of version {k} is not whole"
        return k

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(seen) < 4 or reads < 30):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            if (k := read_whole()) is not None:
                seen.add(k)
                reads += 1
    finally:
        proc.kill()
        proc.wait()
    assert len(seen) >= 4, f"only versions {sorted(seen)} seen in {reads} reads: the writer did not get going"
    if read_whole() is not None:  # what the kill left in place is whole too (absent if killed between the two renames)
        assert json.loads((path / "config.json").read_text())["model_type"] == "llava"


DDP_RESUME = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch

    from percepdsl_runtime.run import ResumeCheckpoint


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        trainer = L.Trainer(
            max_steps=3, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[ResumeCheckpoint(Path(sys.argv[1]) / "resume.ckpt", 1)],
        )
        trainer.fit(Tiny())
        Path(f"rank{trainer.global_rank}.done").write_text(str(trainer.global_step))
    """
)


def test_the_resume_checkpoint_under_ddp(tmp_path: Path) -> None:
    """Every rank joins the checkpoint save, only rank 0 writes and renames it into place (when
    every rank renamed the same temporary, the second rank's rename failed and crashed the run)."""
    import torch

    (tmp_path / "ddp.py").write_text(DDP_RESUME)
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "ddp.py", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.done").read_text() for r in (0, 1)] == ["3", "3"]
    assert [p.name for p in out.iterdir()] == ["resume.ckpt"]
    assert torch.load(out / "resume.ckpt", weights_only=False)["global_step"] == 2  # the last save before max_steps


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    from percepdsl.io import remove_stale_temporaries

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / "stages" / "s" / f".summary.json.{proc.pid}-0123abcd.tmp.json"
    staging = tmp_path / "stages" / "s" / f".model.{proc.pid}-89abcdef.tmp"
    live = tmp_path / f".metrics.csv.{os.getpid()}-0123abcd.tmp.csv"
    other = tmp_path / ".hidden.tmp"  # not a name the writers make
    for p in (dead, live, other, staging / "model.safetensors"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, staging])
    assert not dead.exists() and not staging.exists() and live.exists() and other.exists()


def strict_json(text: str):
    """`json.loads` that refuses the `NaN` / `Infinity` Python's json writes and other readers (jq, JavaScript) reject."""

    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    """Python's json writes NaN and infinities as `NaN` / `Infinity`, which is not JSON: a report.json with an
    undefined correlation or a one-seed interval could not be read by jq, a browser or pandas' strict reader.
    Every JSON file written through percepdsl.io has null there instead, numpy scalars included."""
    import numpy as np

    nan, inf = float("nan"), float("inf")
    data = {"r": nan, "ci": (1.0, inf), "nested": [{"x": -inf, "y": np.float32("nan"), "z": np.float64(2.5)}], "n": 3, "ok": True}
    want = {"r": None, "ci": [1.0, None], "nested": [{"x": None, "y": None, "z": 2.5}], "n": 3, "ok": True}
    assert strict_json(write_json_atomic(tmp_path / "a.json", data).read_text()) == want
    write_jsonl_atomic(tmp_path / "a.jsonl", [data, {"v": np.array([1.0, nan])}])
    assert [strict_json(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [want, {"v": [1.0, None]}]
    assert strict_json(json_text({"v": nan})) == {"v": None}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_reading_a_named_pipe_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """`read_json` (a run's summary.json, a grid's state, a probe's ir.json) read with `read_text`: a named pipe
    in their place blocked the reader for ever. `read_regular` refuses anything but a regular file, without
    waiting for a writer; `read_json` gives None for it, as for a missing file."""
    import signal

    os.mkfifo(tmp_path / "summary.json")
    signal.alarm(20)  # a regression blocks in open(): fail, do not hang the suite
    try:
        assert read_json(tmp_path / "summary.json") is None
        for path in (tmp_path / "summary.json", "/dev/zero"):
            with pytest.raises(NotRegularFile):
                read_regular(path)
        with pytest.raises(IsADirectoryError):
            read_regular(tmp_path)
    finally:
        signal.alarm(0)
    (tmp_path / "a.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "a.json") == {"a": 1} and read_regular(tmp_path / "a.json", limit=3) == b'{"a"'
