"""What a run reads besides its spec and our code, by content: the checkpoint of `model hf`, the
data of `task dataset`, the source of every plugin package an `impl` of the spec names, and the
function of every reward term registered from Python that it uses.

A run directory is named by the IR's hash, and the IR names these by path (or hub id, or import
path) only. So when a checkpoint is retrained in place, or a dataset or plugin edited, the same
spec names the same run directory and the same stage identities while its inputs are not the
same. This module digests them by content:

- `record` writes `inputs.json` into the run directory when a run starts;
- `changed` tells a later `percep run` of the spec what differs, so a complete run of other inputs
  is not reported as this one's result and an interrupted one is not resumed with other weights or
  data (`run._open_run_dir` refuses both, naming the input);
- `digests` is part of every stage's identity (`stagecache.stage_identity`), so the stage cache
  never hands a stage trained from other inputs to a run.

A file is digested by SHA-256 of its bytes, except in a Hugging Face cache, whose blobs are named
by their content's hash already (the checkpoint's snapshot links to them): that name is taken. A
directory's digest covers every file under it (hidden ones excluded) by relative path. Reading is
the cost (SHA-256 reads ≈ 1.3 GB per CPU-second here), paid once per file and process: files are remembered by path, size,
modification time and inode. A model or data path that does not exist (a hub id not in the local
cache, a checkpoint deleted since) has no digest and is not compared.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from percepdsl.api import python_rewards
from percepdsl.io import read_json, write_json_atomic
from percepdsl.ir import ExperimentIR

INPUTS_FILE = "inputs.json"
PYTHON_REWARD = "percepdsl.api:python_rewards."  # the `impl` of a reward term registered from Python
OURS = ("percepdsl", "percepdsl_runtime")  # their source is in `stagecache.code_digest` already
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git SHA-1 (small files) or SHA-256 (LFS) of the content


def locate(ir: ExperimentIR) -> dict[str, Path]:
    """The local files a run of `ir` reads, by what names them: `model` (an `hf` checkpoint: its
    path, or its snapshot in the local Hugging Face cache, never downloaded here), `dataset`, and
    `plugin <package>` for the top-level package (or module) of each plugin `impl` the IR names. Those
    not found are left out."""
    found: dict[str, Path] = {}
    if ir.model.kind == "hf" and ir.model.path:
        path = Path(ir.model.path).expanduser()
        found["model"] = path if path.exists() else _cached_snapshot(ir.model.path) or path
    if ir.task.name == "dataset":
        found["dataset"] = Path(ir.task.param("path"))
    for package in sorted({impl.partition(":")[0].split(".")[0] for impl in _impls(ir)} - set(OURS)):
        if (source := _package_source(package)) is not None:
            found[f"plugin {package}"] = source
    return {name: path for name, path in found.items() if path.exists()}


def current(ir: ExperimentIR) -> dict[str, dict[str, str]]:
    """Every input of `ir` by name → its `path` (for those on disk) and content `sha256`: `locate`'s,
    and the functions of reward terms registered from Python in this process (`python reward <name>`,
    by their source)."""
    out = {name: {"path": str(path), "sha256": digest(path)} for name, path in locate(ir).items()}
    for name in sorted(impl.removeprefix(PYTHON_REWARD) for impl in _impls(ir) if impl.startswith(PYTHON_REWARD)):
        if (term := python_rewards.terms.get(name)) is not None:
            out[f"python reward {name}"] = {"sha256": _function_digest(term.fn)}
    return out


def digests(ir: ExperimentIR) -> dict[str, str]:
    """`current`'s content digests: name → SHA-256 hex digest."""
    return {name: d["sha256"] for name, d in current(ir).items()}


def record(run_dir: Path, ir: ExperimentIR) -> None:
    """Write what this run reads (`current`) to `run_dir/inputs.json`."""
    write_json_atomic(run_dir / INPUTS_FILE, current(ir))


def changed(run_dir: Path, ir: ExperimentIR) -> list[str]:
    """The inputs whose content differs from what the run in `run_dir` recorded when it started,
    each as a phrase naming it ([] when none differs, or the run recorded none). An input found
    neither then nor now is not compared."""
    recorded = read_json(run_dir / INPUTS_FILE)
    if not isinstance(recorded, dict):
        return []
    now = current(ir)
    out = []
    for name, was in sorted(recorded.items()):
        if not isinstance(was, dict) or name not in now or now[name]["sha256"] == was.get("sha256"):
            continue
        where = f" at {now[name]['path']}" if "path" in now[name] else ""
        out.append(f"the {name}{where} (SHA-256 {str(was.get('sha256'))[:12]} then, {now[name]['sha256'][:12]} now)")
    return out


def digest(path: Path) -> str:
    """SHA-256 over a file's content, or over a directory's files (relative path and content digest
    each; hidden files and `__pycache__` left out: Python rewrites the latter on import)."""
    path = Path(path)
    if not path.is_dir():
        return _file_digest(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _skipped(p.relative_to(path).parts)):
        h.update(f"{f.relative_to(path).as_posix()}\0{_file_digest(f)}\0".encode())
    return h.hexdigest()


def _skipped(parts: tuple[str, ...]) -> bool:
    return any(x.startswith(".") or x == "__pycache__" for x in parts)


def _file_digest(path: Path) -> str:
    real = os.path.realpath(path)
    if Path(real).parent.name == "blobs" and _BLOB.fullmatch(Path(real).name):  # a Hugging Face cache blob
        return Path(real).name
    st = os.stat(real)
    return _content_digest(real, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4096)
def _content_digest(real: str, size: int, mtime_ns: int, inode: int) -> str:
    """The file's SHA-256; the stat fields key the cache, so a file rewritten since is read again."""
    with open(real, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _impls(ir: ExperimentIR) -> set[str]:
    """Every `impl` ("package.module:attr") in the IR: of its task, model and reward terms."""

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("impl"), str):
                yield node["impl"]
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                yield from walk(child)

    return set(walk(ir.model_dump(mode="json")))


def _function_digest(fn: Any) -> str:
    """SHA-256 of a function's source (of its compiled code where the source cannot be read: a lambda typed at a prompt)."""
    import inspect
    import marshal

    try:
        data = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        data = marshal.dumps(code) if code is not None else repr(fn).encode()
    return hashlib.sha256(data).hexdigest()


def _package_source(top: str) -> Path | None:
    """Where an importable top-level package's source lives (its directory; a module's file), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and spec.has_location else None


def _cached_snapshot(ref: str) -> Path | None:
    """The snapshot of hub id `ref` in the local Hugging Face cache, or None (no download)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None


__all__ = ["INPUTS_FILE", "changed", "current", "digest", "digests", "locate", "record"]
