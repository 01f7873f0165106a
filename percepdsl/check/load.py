"""Loading: read a file, parse it, and splice its includes in order.

Include problems (a missing file, a cycle, bytes that are not UTF-8) are diagnostics
located at the `include` that caused them; the statements of every file that did load
are kept, so the checker still reports what it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import nodes as A
from ..diagnostics import Diagnostic, Reporter, Severity, Span, did_you_mean, relpath
from ..io import NotRegularFile, read_regular
from ..parse import decode, parse_text


@dataclass
class Loaded:
    """A parsed file and, flattened in order, the statements of it and its includes.

    Each statement's span names the file it came from."""

    path: Path | None
    name: str  # as shown in diagnostics
    text: str | None
    tree: A.File | None
    items: list[A.Statement] = field(default_factory=list)
    # A headerless file is a fragment (checked leniently) unless it cannot be one:
    # an empty file, or one given as text with no path (nothing could include it).
    is_root_only: bool = False
    sources: dict[str, str] = field(default_factory=dict)  # file name → text, for rendering


def resolve_written(base: Path, written: str) -> Path | None:
    """A path written in a spec, relative to `base`, resolved; None if no file can have
    that name (a NUL byte in it) or it cannot be resolved (a symlink loop)."""
    try:
        return (base / written).resolve()
    except (ValueError, OSError, RuntimeError):
        return None


def is_file(path: Path, kind: str = "file") -> bool:
    """`path.is_file()` (`kind="dir"`: `is_dir()`), False where the name itself is an error."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError:  # a name too long for the file system
        return False


def pd_files_near(path: Path) -> list[str]:
    """Names of the spec files next to `path`: candidates for a "did you mean"."""
    try:
        return [p.name for p in path.parent.glob("*.pd") if p.is_file()] if path.parent.is_dir() else []
    except OSError:
        return []


def shown(written: str) -> str:
    """A written path for a message: control characters escaped (`a\\x00b.pd`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in written)


MAX_SPEC_BYTES = 4 << 20  # the largest reference spec is 2 kB; a checkpoint or data file named by mistake is not read whole


def not_regular(what: str, written: str, verb: str) -> tuple[str, str]:
    """(message, hint) for a spec path that names a named pipe, a device or a socket: never read (a pipe
    blocks the reader for ever, /dev/zero fills its memory)."""
    return f"{what} `{shown(written)}` is not a regular file", f"{verb} a spec file"


def path_problem(what: str, written: str, target: Path | None, verb: str, relative_to: str) -> tuple[str, str] | None:
    """(message, hint) when the spec file a statement names (`written`, resolved to `target`, None when it
    cannot be) is not one to read: a name no file can have, a symbolic link loop, a directory, something
    that is not a regular file (a named pipe, a device), or nothing there; else None. `what` names it in
    the message ("included file"), `verb` in the hints ("include")."""
    if target is None:
        if "\x00" in written:
            return f"{what} `{shown(written)}` cannot exist", "a file name cannot contain a NUL or other control character"
        return f"{what} `{shown(written)}` is a symbolic link loop", f"point the link at a spec file, or {verb} the file itself"
    if is_file(target):
        return None
    try:
        special = target.exists() and not target.is_dir()  # a named pipe, a device, a socket: never read
    except OSError:
        special = False
    if special:
        return not_regular(what, written, verb)
    guess = did_you_mean(target.name, pd_files_near(target))
    is_dir = is_file(target, "dir")  # said even with a guess: `x.pd` may be a directory beside specs
    hint = f"did you mean `{guess}`?" if guess else f"{verb} one .pd file of it" if is_dir else f"the path is relative to {relative_to}"
    return f"{what} `{shown(written)}` " + ("is a directory" if is_dir else "does not exist"), hint


def read_source(path: Path) -> tuple[str | None, list[Diagnostic]]:
    """The text of the spec file at `path` (UTF-8, a BOM allowed), or None and an error located at its
    start. Only a regular file of at most `MAX_SPEC_BYTES` is read (`io.read_regular`: opened without
    blocking, judged by fstat), so a named pipe, a device or a huge file is refused, not read, even when
    the name is the command line's rather than an `include`'s (checked by `path_problem`)."""
    name = relpath(path)
    at = Span.point(file=name)

    def refused(message: str, hint: str | None = None) -> tuple[None, list[Diagnostic]]:
        return None, [Diagnostic(name, at, Severity.ERROR, "missing-file", message, hint)]

    try:
        data = read_regular(path, MAX_SPEC_BYTES)
    except FileNotFoundError:
        return refused(f"no such file: {name}")
    except IsADirectoryError:
        return refused(f"{name} is a directory, not a spec file")
    except NotRegularFile:
        return refused(*not_regular("spec file", name, "name"))
    except OSError as e:
        return refused(f"cannot read {name}: {e.strerror}")
    except ValueError:  # a NUL in the name
        return refused(f"no file can be named {shown(name)}")
    if len(data) > MAX_SPEC_BYTES:
        return refused(
            f"spec file `{shown(name)}` is larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec",
            "name a spec file (text); split a very long one with `include`",
        )
    return decode(data, name)


def load(path: Path | None, text: str | None = None, name: str | None = None) -> tuple[Loaded, list[Diagnostic]]:
    """Read, parse and splice includes. `text` given: check it as if it were at `path`."""
    diags: list[Diagnostic] = []
    if name is None:
        name = relpath(path) if path is not None else "<string>"
    if text is None:
        assert path is not None
        text, d = read_source(path)
        diags += d
    loaded = Loaded(path, name, text, None)
    if text is None:
        return loaded, diags
    loaded.sources[name] = text
    tree, d = parse_text(text, name)
    diags += d
    loaded.tree = tree
    loaded.is_root_only = tree is not None and not tree.items
    if tree is not None:
        own = resolve_written(path.parent, path.name) if path is not None else None
        stack = [own] if own is not None else []
        rep = Reporter()
        _splice(loaded, tree, path.parent if path is not None else Path.cwd(), stack, rep)
        diags += rep.items
    return loaded, diags


def _splice(loaded: Loaded, tree: A.File, base: Path, stack: list[Path], rep: Reporter) -> None:
    for stmt in tree.items:
        if not isinstance(stmt, A.Include):
            loaded.items.append(stmt)
            continue
        target = resolve_written(base, stmt.path.value)
        if problem := path_problem("included file", stmt.path.value, target, "include", f"{relpath(base) or '.'}/"):
            rep.error(stmt.path.span, "missing-include", *problem)
            continue
        if target in stack:
            chain = " → ".join(relpath(p) for p in stack[stack.index(target) :] + [target])
            rep.error(
                stmt.path.span,
                "include-cycle",
                f"include cycle: {chain}",
                "move the shared statements into a fragment that includes nothing",
            )
            continue
        text, d = read_source(target)
        rep.items += d
        if text is None:
            continue
        inc_name = relpath(target)
        loaded.sources[inc_name] = text
        sub, d = parse_text(text, inc_name)
        rep.items += d
        header = next((s for s in sub.items if isinstance(s, (A.Experiment, A.Grid))), None) if sub is not None else None
        if header is not None:  # its task, stages, ... would each be reported as a duplicate of the includer's
            kind = "an experiment" if isinstance(header, A.Experiment) else "a grid"
            rep.error(
                stmt.path.span,
                "not-a-fragment",
                f"included file `{shown(stmt.path.value)}` is {kind} (line {header.span.line}), not a fragment",
                "include only headerless files; to vary a whole experiment, make it a grid's `template`",
            )
        elif sub is not None:
            _splice(loaded, sub, target.parent, stack + [target], rep)
