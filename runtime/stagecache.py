"""Stages shared across runs: a content-addressed cache of finished stage directories.

Arms of a grid (or separate runs) that share a base stage need not train it again. A stage's
*identity* is a hash of everything its weights and its evaluation depend on: the IR without
the experiment's name, params and stages (so: IR version, seed, task, model, roles, eval and
trainer blocks), plus the stage itself and each of its ancestors (name and every setting), so
the parent's identity is part of the child's, and the identity of every stage whose weights a
`visual` role rule of that chain takes as its reference. Params are not in it: their values are already
in the settings that use them.

Runs written under the same `--out` directory (a grid's `cells/`) share the cache
`<out>/.stage-cache/<identity>/`. A stage that finishes is published there (hard links to its
files, a copy where the filesystem has none; staged and renamed into place, so an entry is
whole or absent). A run that reaches a stage with an identity in the cache takes that
directory instead of training (again hard links, staged and renamed), and its `done.json`
records `reused_from` (the identity and the run that trained it). Files of a run are only
ever replaced by renames, never rewritten in place, so the shared links cannot change under
another run. The code is part of the identity too (a digest of percepdsl's and its runtime's
source and grammar, and the versions of the libraries that train), so a stage trained by other
code is never reused; so are the contents of what the run reads from disk (an `hf` checkpoint, a
dataset, a plugin's source: `inputs.py`), so a stage trained from a checkpoint since retrained in
place is not either; and so is the thread count it trains with when the spec's trainer does not
set it (the IR holds it when it does), since another thread count rounds differently. Setting
`PERCEP_STAGE_CACHE=off` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from percepdsl.io import atomic_dir, read_json, write_json_atomic
from percepdsl.ir import OUTSIDE_HASH, ExperimentIR, Stage

from . import inputs

CACHE_DIR = ".stage-cache"
SKIP = ("resume.ckpt",)  # a finished stage has none; an unfinished one is never published


def enabled() -> bool:
    return os.environ.get("PERCEP_STAGE_CACHE", "on").lower() not in ("off", "0", "false", "no")


TRAINING_LIBRARIES = ("torch", "transformers", "peft", "lightning", "trl", "tokenizers")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of what computes a stage besides its IR: the source files of `percepdsl` and
    `percepdsl_runtime` (Python and grammar, by path and content) and the training libraries'
    versions. Read once per process (≈0.2 MB of source)."""
    from importlib import metadata

    import percepdsl
    import percepdsl.grammars
    import percepdsl_runtime

    h = hashlib.sha256()
    for pkg in (percepdsl, percepdsl.grammars, percepdsl_runtime):  # the grammars live apart in a checkout
        for root in map(Path, pkg.__path__):
            for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".lark") and p.is_file()):
                h.update(f"{pkg.__name__}/{path.relative_to(root).as_posix()}\0".encode())
                h.update(path.read_bytes())
    for dist in TRAINING_LIBRARIES:
        try:
            h.update(f"{dist}=={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent\0".encode())
    return h.hexdigest()


def stage_identity(ir: ExperimentIR, stage: Stage, *, threads: int, length: int = 16) -> str:
    """The hash naming a stage's cache entry (see the module doc); `threads`: the CPU threads it
    trains with (`run.stage_threads`), part of it when the spec's trainer leaves them open."""
    data = ir.model_dump(mode="json", exclude=OUTSIDE_HASH.get(ExperimentIR))
    shared = {k: v for k, v in data.items() if k not in ("name", "params", "stages")}
    chain: list[dict[str, Any]] = []
    refs: set[str] = set()  # stages whose weights a `visual` role of the chain reads: their identities count too
    st: Stage | None = stage
    while st is not None:
        chain.append(st.model_dump(mode="json"))
        refs |= ir.visual_references(st)
        st = ir.stage(st.parent) if st.parent else None
    doc: dict[str, Any] = {"code": code_digest(), "shared": shared, "chain": chain[::-1]}
    if read := inputs.digests(ir):  # none for a spec that reads nothing from disk (the tiny model, built-in tasks)
        doc["inputs"] = read
    if ir.trainer.threads is None:  # another thread count rounds differently: another stage
        doc["threads"] = threads
    if refs:
        doc["references"] = {name: stage_identity(ir, ir.stage(name), threads=threads, length=length) for name in sorted(refs)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def cache_entry(run_dir: Path, identity: str) -> Path:
    return Path(run_dir).parent / CACHE_DIR / identity


def _link_tree(src: Path, dst: Path) -> None:
    """Fill the empty directory `dst` with `src`'s files: hard links, copies where links fail."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(*SKIP), dirs_exist_ok=True)


def lookup(run_dir: Path, identity: str) -> dict[str, Any] | None:
    """The cached stage's record (its done.json), if the cache holds this identity."""
    record = read_json(cache_entry(run_dir, identity) / "done.json")
    return record if is_done_record(record) else None  # a damaged entry is no hit: the stage is trained


def is_done_record(record: Any) -> bool:
    """Whether ``record`` is a finished stage's done.json, down to what the run's summary reads; not
    JSON or another shape (another tool's file, a hand's edit) is a damaged one."""
    if not isinstance(record, dict) or not {"steps", "train_seconds"} <= record.keys():
        return False
    return isinstance(record.get("metrics"), dict) and isinstance(record.get("diagnostics"), dict)


def publish(run_dir: Path, stage_dir: Path, identity: str) -> None:
    """Put a finished stage directory into the cache (no-op when the entry exists)."""
    entry = cache_entry(run_dir, identity)
    if entry.exists():  # published by another run (or being replaced): never replaced while others read it
        return
    with atomic_dir(entry) as tmp:
        _link_tree(stage_dir, tmp)
        record = json.loads((tmp / "done.json").read_text(encoding="utf-8"))
        record.setdefault("trained_in", Path(run_dir).name)
        (tmp / "done.json").unlink()  # a link to the run's own file: replaced, not rewritten
        write_json_atomic(tmp / "done.json", record)


def reuse(run_dir: Path, stage_dir: Path, identity: str) -> dict[str, Any]:
    """Take the cached stage as this run's `stage_dir` (replacing a partial one); returns its
    record with `reused_from` added."""
    entry = cache_entry(run_dir, identity)
    with atomic_dir(stage_dir) as tmp:
        _link_tree(entry, tmp)
        record = json.loads((tmp / "done.json").read_text(encoding="utf-8"))
        record["reused_from"] = {"identity": identity, "run": record.pop("trained_in", None), "cache": str(entry)}
        (tmp / "done.json").unlink()
        write_json_atomic(tmp / "done.json", record)
    return record


__all__ = ["CACHE_DIR", "cache_entry", "enabled", "is_done_record", "lookup", "publish", "reuse", "stage_identity"]
