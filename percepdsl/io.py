"""Atomic file writes: nothing half-written is ever presented as a result.

Every file a run or a grid leaves goes through ``atomic_path``: the writer fills a temporary
file in the destination's directory, which is flushed to disk (fsync) and then renamed over
the destination (``os.replace``, atomic on POSIX), and the directory entry is fsynced too. A
reader, a resumed run, or the machine after a crash sees the old file or the new one, never
a part of one. ``atomic_dir`` does the same for a directory that a library writes whole
(``save_pretrained``, ``save_to_disk``).

The small writers (text, JSON, JSON lines) are for content in memory; ``atomic_path``
is for writers that want a path (safetensors, matplotlib, Lightning checkpoints, PIL). The JSON
writers (``json_text``) write a number that is not finite (an undefined correlation, a one-seed
interval, a diverged loss) as null: Python's ``NaN`` / ``Infinity`` are not JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


def _sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to ``path`` that keeps its suffix (matplotlib and PIL pick
    the format from it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}{path.suffix}")


_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.(tmp|old)(\.[^/]*)?$")


def remove_stale_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that writers killed mid-write (SIGKILL, power loss) left under
    ``root``: names made by ``_sibling`` whose process is gone. A live writer's are kept.
    Returns what was removed."""
    removed = []
    for p in sorted(Path(root).rglob(".*"), reverse=True):  # a staging directory's contents first
        m = _TEMPORARY.match(p.name)
        if m is None or _alive(int(m.group(1))) or not p.exists():
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or no way to tell: keep its file
    return True


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's data to disk. Directories cannot be opened for
    fsync on every platform (Windows): there the rename alone has to do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer to fill; when the block ends
    without an error, put the file in place atomically (fsync, rename, fsync the directory).
    On an error the temporary file is removed and ``path`` is left as it was. The temporary
    file is created by the writer (with the usual permissions), not by this function; a file it
    replaces keeps its permission bits (`percep fmt` of a 0600 spec left it 0644), and a symlink
    is kept, its target replaced (`percep fmt` of a linked spec replaced the link by a file)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        with contextlib.suppress(FileNotFoundError):  # a new file: the writer's permissions
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        try:
            os.replace(tmp, path)
        except OSError as exc:  # a directory where the file goes: name it, not the temporary that is removed
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory next to ``path`` for a writer to fill; when the block
    ends without an error, fsync what it wrote and rename the staging directory to ``path``,
    replacing an existing one. Between the two renames of a replacement ``path`` is briefly
    absent, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(path, "tmp")
    staging.mkdir()
    try:
        yield staging
        for p in sorted(staging.rglob("*"), reverse=True):  # files before the directories holding them
            _fsync(p)
        _fsync(staging)
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(path.parent)


class LockHeld(Exception):
    """`hold_lock`'s file is locked by another process; `holder` is what that process wrote in it."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: str | os.PathLike[str], note: str) -> TextIO | None:
    """An exclusive lock on `path` (flock; the file is created), with `note` written in it for whoever finds
    it held. It lasts until the returned file is closed or the process ends (the kernel frees it then).
    None where there are no such locks (Windows, a filesystem without them): the caller goes unguarded.
    Raises LockHeld when another process holds it, OSError when the file cannot be opened."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until the caller closes it
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LockHeld(holder) from None
    except OSError:  # a filesystem without locks (some network mounts)
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(note + "\n")
    f.flush()
    return f


def write_text_atomic(path: str | os.PathLike[str], text: str, newline: str | None = None) -> Path:
    """`newline=""` writes the text's line endings as they are (no translation to the platform's)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    return write_text_atomic(path, json_text(data, indent=2) + "\n")


def os_error_text(exc: OSError) -> str:
    """An OSError for a message: what went wrong and on which path (`Permission denied: runs/x`),
    without Python's `[Errno 13]`. The two a file in the way of a directory raises are said so
    (`Path.mkdir` raises FileExistsError for the file itself, NotADirectoryError below it)."""
    if isinstance(exc, FileExistsError) and exc.filename is not None:
        return f"{exc.filename} exists and is not a directory"
    if isinstance(exc, NotADirectoryError) and exc.filename is not None:
        return f"{exc.filename}: a part of this path is a file, not a directory"
    what = exc.strerror or str(exc)
    return f"{what}: {exc.filename}" if exc.filename is not None else what


def json_default(obj: Any) -> Any:
    """JSON for what ``json`` cannot encode: numpy / torch scalars and arrays, sets; else ``str``."""
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch arrays and scalars (`item` refuses an array of 2)
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return str(obj)


def finite(obj: Any) -> Any:
    """``obj`` with every float that is not finite (NaN, ±infinity) replaced by None, in dicts, lists and
    tuples (as lists) at any depth: what JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(data: Any, indent: int | None = None, default: Callable[[Any], Any] | None = json_default) -> str:
    """``data`` as JSON, numbers that are not finite as null (also those ``default`` makes of numpy and torch
    values): every JSON file a run, a grid or a report writes goes through here."""
    kw: dict[str, Any] = {"indent": indent, "ensure_ascii": False, "allow_nan": False}
    if default is not None:
        kw["default"] = lambda o: finite(default(o))
    try:
        return json.dumps(data, **kw)
    except ValueError:  # a NaN or an infinity somewhere: walk the data only then
        return json.dumps(finite(data), **kw)


def write_jsonl_atomic(path: str | os.PathLike[str], records: Iterable[Any], default: Callable[[Any], Any] | None = json_default) -> Path:
    """One JSON object per line (non-finite numbers as null, as ``json_text``). ``records`` may be a
    generator: if it raises, ``path`` keeps its old content."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json_text(rec, default=default))
            f.write("\n")
    return Path(path)


class NotRegularFile(OSError):
    """A path to read names a named pipe, a device or a socket: reading one blocks for ever (a pipe with no
    writer) or never ends (/dev/zero)."""


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (with ``limit``, at most ``limit + 1`` of them, so a caller
    can tell a file over the limit). It is opened without blocking and judged by what was opened (fstat),
    so a named pipe, a device or a socket raises `NotRegularFile` at once, even one put in place after a
    check. Else raises what opening raises (FileNotFoundError, IsADirectoryError, ...; ValueError for a
    NUL in the name)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise NotRegularFile(exc.errno, "not a regular file", os.fspath(path)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        return f.read() if limit is None else f.read(limit + 1)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``, or None when it is absent, unreadable, not a regular file or not JSON
    (atomic writes never leave one cut short, but a failing disk or a hand can)."""
    try:
        return json.loads(read_regular(path).decode("utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
