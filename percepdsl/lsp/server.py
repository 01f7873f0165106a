"""`percep lsp`: the language server, a thin pygls adapter over the library.

- Diagnostics: `check_file(path, text=buffer)`, exactly what `percep check` reports, on
  open and save (at once), on change (debounced, see `Debouncer`) and when a watched `.pd`
  file changes on disk (includes and templates are read from disk). Problems located
  in included files are shown on the `include` line that brings them in, with the exact
  place as related information.
- Hover, completion, go-to-definition, the outline and quick fixes read a tolerant scan
  of the buffer (`features.py`, `scan.py`), so they work while the text does not parse.
- Formatting runs the formatter (`percep fmt`); a buffer with syntax errors is left as is.

Threads: the features that read the scan answer on the event-loop thread; everything
that runs the Lark parser (checks, formatting) runs on one worker thread, since the
parser is not re-entrant and a grid file's check (it compiles the grid's cells) may take
longer than a keystroke. A check requested while one runs for the same document is
coalesced into one more check of the latest text; stale results are not published.
The server imports neither torch nor the runtime and never imports plugin code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import cattrs
from lsprotocol import types as T
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.workspace import TextDocument, Workspace

from .. import __version__ as _version
from . import features as F

log = logging.getLogger("percepdsl.lsp")

DEFAULT_DEBOUNCE_MS = 75
TRIGGER_CHARACTERS = ["=", "(", "[", ",", '"', "/"]


def uri_to_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    path = unquote(parsed.path)
    if "\x00" in path:  # no file has this name: the buffer is checked as text
        return None
    if os.name == "nt" and path.startswith("/") and len(path) > 2 and path[2] == ":":
        path = path[1:]
    return Path(path)


class _Document(TextDocument):
    """pygls's document with LSP's lines: they end at \\n, \\r\\n or \\r only. pygls splits with
    `str.splitlines`, which also breaks at a form feed, \\x1c-\\x1e, \\x85, U+2028 and U+2029, so an
    incremental edit below a comment holding one was applied to the wrong line."""

    @property
    def lines(self) -> tuple[str, ...]:
        out: list[str] = []
        for piece in self.source.splitlines(True):
            if out and not out[-1].endswith(("\n", "\r")):
                out[-1] += piece
            else:
                out.append(piece)
        return tuple(out)


class _Workspace(Workspace):
    def update_text_document(self, text_doc: T.VersionedTextDocumentIdentifier, change: T.TextDocumentContentChangeEvent) -> None:
        if unquote(text_doc.uri) not in self.text_documents:  # pygls raised KeyError: a popup "Error in server: KeyError"
            log.warning("didChange for %s, which is not open: ignored", text_doc.uri)
            return
        super().update_text_document(text_doc, change)

    def _create_text_document(self, doc_uri: str, source=None, version=None, language_id=None) -> TextDocument:
        return _Document(
            doc_uri,
            source=source,
            version=version,
            language_id=language_id,
            sync_kind=self._sync_kind,
            position_codec=self._position_codec,
        )


class _Rejected:
    """A message whose params do not fit its method (`structure_message` could not type them)."""

    def __init__(self, data: dict, reason: str):
        self.data, self.reason = data, reason


class _Protocol(LanguageServerProtocol):
    """pygls's protocol, answering bad requests with LSP errors and no Python internals.

    - A request whose params do not fit its method (a missing `position`, a string for a line)
      got no response at all (the client waits for ever) and a traceback in the log: it is
      answered with InvalidParams naming the field; such a notification is logged in a line.
    - An error response carried the server's traceback in its `data`: it is left out (logged
      with `PERCEP_LSP_LOG=DEBUG`)."""

    def structure_message(self, data: dict) -> Any:
        method = data.get("method") if "jsonrpc" in data and "error" not in data else None
        msg_type = self.get_message_type(method) if isinstance(method, str) else None
        if msg_type is None:
            return super().structure_message(data)
        try:
            return self._converter.structure(data, msg_type)
        except Exception as exc:
            reason = "; ".join(cattrs.transform_error(exc)) if isinstance(exc, cattrs.ClassValidationError) else str(exc)
            return _Rejected(data, reason)

    def handle_message(self, message: Any) -> None:
        method, msg_id = getattr(message, "method", None), getattr(message, "id", None)
        if self._shutdown and method is not None and method != T.EXIT and msg_id is not None:
            # pygls dropped it with a log line, so the client waited for an answer that never came
            self._send_response(msg_id, error=JsonRpcInvalidRequest(f"{method}: the server is shut down").to_response_error())
            return None
        if not isinstance(message, _Rejected):
            return super().handle_message(message)
        method, msg_id = message.data.get("method"), message.data.get("id")
        text = f"invalid params for {method}: {message.reason}"
        log.warning("%s", text)
        if msg_id is not None:
            self._send_response(msg_id, error=JsonRpcInvalidParams(text).to_response_error())

    def _send_response(self, msg_id: Any, result: Any = None, error: T.ResponseError | None = None) -> None:
        if error is not None and isinstance(error.data, dict) and "traceback" in error.data:
            log.debug("the error answering %s came from:\n%s", msg_id, "".join(error.data["traceback"]))
            error = T.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result=result, error=error)


class Debouncer:
    """Leading and trailing edge: an edit after a quiet spell is checked at once; edits that
    follow within `delay` of the last check are coalesced into one check `delay` after
    the latest of them. Isolated edits cost no waiting; bursts of typing cost one check
    per `delay`."""

    def __init__(self, delay_s: float, run):
        self.delay = delay_s
        self.run = run
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.last_run: dict[str, float] = {}

    def changed(self, uri: str) -> None:
        loop = asyncio.get_running_loop()
        pending = self.timers.pop(uri, None)
        if pending is not None:
            pending.cancel()
        quiet = time.monotonic() - self.last_run.get(uri, float("-inf")) >= self.delay
        if pending is None and quiet:
            self.timers[uri] = loop.call_soon(self._fire, uri)
        else:
            self.timers[uri] = loop.call_later(self.delay, self._fire, uri)

    def _fire(self, uri: str) -> None:
        self.timers.pop(uri, None)
        self.run(uri)

    def now(self, uri: str) -> None:
        self.cancel(uri)
        self.run(uri)

    def cancel(self, uri: str) -> None:
        pending = self.timers.pop(uri, None)
        if pending is not None:
            pending.cancel()

    def done(self, uri: str) -> None:
        self.last_run[uri] = time.monotonic()


class PercepLanguageServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("percep-lsp", _version, text_document_sync_kind=T.TextDocumentSyncKind.Incremental, protocol_cls=_Protocol)
        ms = os.environ.get("PERCEP_LSP_DEBOUNCE_MS")
        self.debouncer = Debouncer((int(ms) if ms and ms.isdigit() else DEFAULT_DEBOUNCE_MS) / 1000, self.request_check)
        self.snippets = False
        # Everything that runs the Lark parser (checks, formatting) runs on this one thread: the parser is
        # not re-entrant, and a grid file (which compiles its cells) must not hold up hover and completion.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="percep-check")
        self.running: set[str] = set()
        self.again: set[str] = set()
        self.docs: dict[str, F.Doc] = {}  # last scanned text per open document (loop thread only)

    # -- helpers
    @property
    def enc(self) -> F.Encoder:
        try:
            return F.Encoder(self.workspace.position_encoding or "utf-16")
        except Exception:  # before initialize
            return F.Encoder()

    def is_open(self, uri: str) -> bool:
        """Whether the client has this document open. pygls keys its documents by the decoded URI
        (`my specs/a.pd`), while the client names them as it spells them (`my%20specs/a.pd`)."""
        return unquote(uri) in self.workspace.text_documents

    def open_uris(self) -> list[str]:
        """The open documents, each under the URI the client spelt (the one it expects diagnostics for)."""
        return [td.uri for td in self.workspace.text_documents.values()]

    def reader(self, path: Path) -> str | None:
        """Open buffers first (what the user sees), then the disk. Compared as paths: clients
        spell URIs in their own ways (percent-encoding, drive letters)."""
        target = path.resolve()
        for td in self.workspace.text_documents.values():
            p = uri_to_path(td.uri)
            if p is not None and p.resolve() == target:
                return td.source
        return F.read_disk(path)

    def doc(self, uri: str) -> F.Doc:
        """The buffer with its scan, kept while the text is unchanged: hover, completion and the outline share it."""
        if not self.is_open(uri):  # a request about a document the client has not opened: the file, if there is one
            path = uri_to_path(uri)
            text = F.read_disk(path) if path is not None else None
            if text is None:
                raise JsonRpcInvalidParams(f"{uri} is not open, and no readable file is there")
            return F.Doc(text, path, uri)
        text = self.workspace.get_text_document(uri).source
        cached = self.docs.get(uri)
        if cached is not None and cached.text == text:
            return cached
        doc = self.docs[uri] = F.Doc(text, uri_to_path(uri), uri)
        return doc

    def project(self, uri: str) -> F.Project:
        return F.Project(self.doc(uri), self.reader)

    def offset(self, doc: F.Doc, pos: T.Position) -> int:
        return self.enc.to_offset(doc.lines, pos)

    # -- diagnostics
    def request_check(self, uri: str) -> None:
        """Check a document on the worker; a request while its check runs re-checks once that ends."""
        if uri in self.running:
            self.again.add(uri)
            return
        self.running.add(uri)
        asyncio.get_running_loop().create_task(self._check_loop(uri))

    async def _check_loop(self, uri: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.is_open(uri):
                self.again.discard(uri)
                td = self.workspace.get_text_document(uri)
                text, version, enc = td.source, td.version, self.enc
                diags = await loop.run_in_executor(self.worker, self.safe_diagnostics, uri, text, enc)
                if uri in self.again:
                    continue  # the text changed while it was checked: check the new text instead
                if self.is_open(uri):
                    self.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, diagnostics=diags, version=version))
                break
        finally:
            self.running.discard(uri)
            self.debouncer.done(uri)

    def safe_diagnostics(self, uri: str, text: str, enc: F.Encoder | None = None) -> list[T.Diagnostic]:
        try:
            return self.diagnostics(uri, text, enc)
        except Exception as exc:  # a crash in the checker must not take the server down
            log.exception("checking %s failed", uri)
            return [
                T.Diagnostic(
                    range=T.Range(start=T.Position(line=0, character=0), end=T.Position(line=0, character=0)),
                    message=f"percep: internal error while checking: {exc!r}",
                    severity=T.DiagnosticSeverity.Error,
                    source="percep",
                )
            ]

    def diagnostics(self, uri: str, text: str, enc: F.Encoder | None = None) -> list[T.Diagnostic]:
        """`percep check` of the buffer, as LSP diagnostics (runs on the worker thread)."""
        from ..check import check_file, check_text

        path = uri_to_path(uri)
        if path is not None:
            res = check_file(path, text=text)
        else:
            res = check_text(text, name=Path(urlparse(uri).path).name or "untitled.pd")
        name = res.loaded.name if res.loaded is not None else ""
        return F.lsp_diagnostics(res.diagnostics, name, F.Project(F.Doc(text, path, uri), F.read_disk), enc or F.Encoder())


server = PercepLanguageServer()


@server.feature(T.INITIALIZE)
def initialize(ls: PercepLanguageServer, params: T.InitializeParams) -> None:
    # pygls has just made the workspace (no document is open yet): its documents split lines as LSP does
    ls.workspace.__class__ = _Workspace
    opts = params.initialization_options
    if isinstance(opts, dict) and isinstance(opts.get("debounceMs"), (int, float)):
        ls.debouncer.delay = max(0.0, float(opts["debounceMs"]) / 1000)
    try:
        ls.snippets = bool(params.capabilities.text_document.completion.completion_item.snippet_support)
    except AttributeError:
        ls.snippets = False


@server.feature(T.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: PercepLanguageServer, params: T.DidOpenTextDocumentParams) -> None:
    ls.debouncer.now(params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: PercepLanguageServer, params: T.DidChangeTextDocumentParams) -> None:
    ls.debouncer.changed(params.text_document.uri)


@server.feature(T.TEXT_DOCUMENT_DID_SAVE)
def did_save(ls: PercepLanguageServer, params: T.DidSaveTextDocumentParams) -> None:
    saved = params.text_document.uri
    ls.debouncer.now(saved)
    # other open documents may include the saved file: the checker reads includes from disk
    for uri in ls.open_uris():
        if uri != saved:
            ls.debouncer.changed(uri)


WATCHED = "**/*.pd"


@server.feature(T.INITIALIZED)
def initialized(ls: PercepLanguageServer, params: T.InitializedParams) -> None:
    """Ask the client to watch the `.pd` files: includes and templates are read from disk, so one
    rewritten by another program (a checkout, a generator) must re-check the documents that read it."""
    try:
        dynamic = bool(ls.client_capabilities.workspace.did_change_watched_files.dynamic_registration)
    except AttributeError:
        dynamic = False
    if dynamic:
        watch = T.DidChangeWatchedFilesRegistrationOptions(watchers=[T.FileSystemWatcher(glob_pattern=WATCHED)])
        reg = T.Registration(id="percep-watch-pd", method=T.WORKSPACE_DID_CHANGE_WATCHED_FILES, register_options=watch)
        ls.client_register_capability(T.RegistrationParams(registrations=[reg]))


@server.feature(T.WORKSPACE_DID_CHANGE_WATCHED_FILES)
def did_change_watched_files(ls: PercepLanguageServer, params: T.DidChangeWatchedFilesParams) -> None:
    for uri in ls.open_uris():  # any of them may include (or be a grid over) a changed file
        ls.debouncer.changed(uri)


@server.feature(T.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: PercepLanguageServer, params: T.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.debouncer.cancel(uri)
    ls.docs.pop(uri, None)
    ls.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, diagnostics=[]))


@server.feature(T.TEXT_DOCUMENT_HOVER)
def hover(ls: PercepLanguageServer, params: T.HoverParams) -> T.Hover | None:
    project = ls.project(params.text_document.uri)
    return F.hover(project, ls.offset(project.doc, params.position), ls.enc)


@server.feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions(trigger_characters=TRIGGER_CHARACTERS))
def completion(ls: PercepLanguageServer, params: T.CompletionParams) -> T.CompletionList:
    project = ls.project(params.text_document.uri)
    items = F.complete(project, ls.offset(project.doc, params.position), ls.enc, snippets=ls.snippets)
    return T.CompletionList(is_incomplete=False, items=items)


@server.feature(T.TEXT_DOCUMENT_DEFINITION)
def definition(ls: PercepLanguageServer, params: T.DefinitionParams) -> list[T.Location]:
    project = ls.project(params.text_document.uri)
    return F.definition(project, ls.offset(project.doc, params.position), ls.enc)


@server.feature(T.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
def document_symbol(ls: PercepLanguageServer, params: T.DocumentSymbolParams) -> list[T.DocumentSymbol]:
    return F.document_symbols(ls.doc(params.text_document.uri), ls.enc)


@server.feature(T.TEXT_DOCUMENT_FORMATTING)
async def formatting(ls: PercepLanguageServer, params: T.DocumentFormattingParams) -> list[T.TextEdit] | None:
    doc = ls.doc(params.text_document.uri)
    return await asyncio.get_running_loop().run_in_executor(ls.worker, F.format_edits, doc.text, doc.display(), ls.enc)


@server.feature(T.TEXT_DOCUMENT_CODE_ACTION, T.CodeActionOptions(code_action_kinds=[T.CodeActionKind.QuickFix]))
def code_action(ls: PercepLanguageServer, params: T.CodeActionParams) -> list[T.CodeAction]:
    doc = ls.doc(params.text_document.uri)
    return F.quick_fixes(params.text_document.uri, doc.text, params.context.diagnostics, ls.enc)


class _LogFormat(logging.Formatter):
    """The server's log on stderr (an editor's output panel). An error that pygls logs with its
    traceback (a malformed JSON-RPC message from the client: it answers the client with a
    `window/showMessage` and goes on) gets the exception's own line instead; the traceback
    only with `PERCEP_LSP_LOG=DEBUG`."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        if log.isEnabledFor(logging.DEBUG):
            return super().formatException(ei)
        return f"  {ei[0].__name__}: {ei[1]}" if ei[0] is not None else ""


MAX_MESSAGE_BYTES = 64 << 20  # a message carries a document and positions: far below this from any editor


class _BoundedStdin:
    """stdin as pygls reads it (``readline``; ``read(n)`` of a body whose header announced n bytes), with
    a bound on n: a header announcing more than ``MAX_MESSAGE_BYTES`` (a corrupt stream, or not an LSP
    client) made pygls allocate it, a MemoryError and a traceback. The stream cannot be followed past
    such a header, so the read returns nothing (pygls's end of input) and ``main`` says why and exits 2."""

    def __init__(self, raw: Any):
        self.raw, self.oversized = raw, 0

    def readline(self) -> bytes:
        return self.raw.readline()

    def read(self, n: int = -1) -> bytes:
        if n > MAX_MESSAGE_BYTES:
            self.oversized = n
            return b""
        return self.raw.read(n)


def main() -> None:
    """Serve LSP over stdin/stdout until the client says exit."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat("percep-lsp %(levelname)s: %(message)s"))
    logging.basicConfig(level=os.environ.get("PERCEP_LSP_LOG", "WARNING").upper(), handlers=[handler])
    stdin = _BoundedStdin(sys.stdin.buffer)
    server.start_io(stdin=stdin)  # returns on `exit` (pygls's sys.exit in it is swallowed) or the end of input
    if stdin.oversized:
        log.error(
            "a message header announced %d bytes (over %d MiB): not an LSP stream this server can follow; stopping",
            stdin.oversized,
            MAX_MESSAGE_BYTES >> 20,
        )
        sys.exit(2)
    # LSP: exit status 0 after a `shutdown` request, 1 otherwise (an `exit` without one, or the client gone)
    sys.exit(0 if server.protocol._shutdown else 1)


if __name__ == "__main__":
    main()
