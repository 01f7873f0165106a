"""A real LSP client over stdio, for the tests and the latency benchmark: pygls's
`LanguageClient` driving `python -m percepdsl.lsp` in a subprocess.

    async with LspSession(cwd) as s:
        uri = s.open(path, text)
        diags = await s.diagnostics(uri)          # the first publish after didOpen
        s.change(uri, new_text)
        diags = await s.diagnostics(uri, version=s.version[uri])

The server runs under a small wrapper that, on exit, writes the names of every module
it imported to `modules_file` (when given): tests check that no torch was imported.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from lsprotocol import types as T
from pygls.lsp.client import LanguageClient

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the server imports this percepdsl

_WRAPPER = (
    "import atexit, runpy, sys\n"
    "out = sys.argv[1]\n"
    "if out:\n"
    "    atexit.register(lambda: open(out, 'w').write('\\n'.join(sorted(sys.modules))))\n"
    "sys.argv = ['percep-lsp']\n"
    "runpy.run_module('percepdsl.lsp', run_name='__main__')\n"
)


class LspSession:
    def __init__(
        self,
        cwd: Path | None = None,
        modules_file: Path | None = None,
        debounce_ms: int | None = None,
        position_encodings: list[str] | None = None,
    ):
        self.cwd = Path(cwd or ROOT)
        self.modules_file = modules_file
        self.debounce_ms = debounce_ms
        self.position_encodings = position_encodings
        self.client = LanguageClient("percep-test-client", "0")
        self.published: list[tuple[float, T.PublishDiagnosticsParams]] = []
        self._new = asyncio.Event()
        self.version: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        self.capabilities: T.ServerCapabilities | None = None
        self.returncode: int | None = None

        @self.client.feature(T.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def _on_diagnostics(params: T.PublishDiagnosticsParams) -> None:
            self.published.append((time.perf_counter(), params))
            self._new.set()

        self.registrations: list[T.Registration] = []

        @self.client.feature(T.CLIENT_REGISTER_CAPABILITY)
        def _on_register(params: T.RegistrationParams) -> None:
            self.registrations.extend(params.registrations)
            self._new.set()

        @self.client.feature(T.WINDOW_LOG_MESSAGE)
        def _on_log(params) -> None:  # pragma: no cover - only when the server logs
            pass

        @self.client.feature(T.WINDOW_SHOW_MESSAGE)
        def _on_show(params) -> None:  # pragma: no cover
            pass

    async def __aenter__(self) -> LspSession:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        await self.client.start_io(sys.executable, "-c", _WRAPPER, str(self.modules_file or ""), cwd=str(self.cwd), env=env)
        general = T.GeneralClientCapabilities(position_encodings=self.position_encodings) if self.position_encodings else None
        caps = T.ClientCapabilities(
            general=general,
            workspace=T.WorkspaceClientCapabilities(
                did_change_watched_files=T.DidChangeWatchedFilesClientCapabilities(dynamic_registration=True)
            ),
            text_document=T.TextDocumentClientCapabilities(
                completion=T.CompletionClientCapabilities(completion_item=T.ClientCompletionItemOptions(snippet_support=False)),
                hover=T.HoverClientCapabilities(content_format=[T.MarkupKind.Markdown, T.MarkupKind.PlainText]),
                publish_diagnostics=T.PublishDiagnosticsClientCapabilities(related_information=True, version_support=True),
            ),
        )
        opts = {"debounceMs": self.debounce_ms} if self.debounce_ms is not None else None
        result = await asyncio.wait_for(
            self.client.initialize_async(
                T.InitializeParams(capabilities=caps, process_id=os.getpid(), root_uri=self.cwd.as_uri(), initialization_options=opts)
            ),
            60,
        )
        self.capabilities = result.capabilities
        self.client.initialized(T.InitializedParams())
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), 10)
            self.client.exit(None)
            proc = self.client._server
            if proc is not None:
                self.returncode = await asyncio.wait_for(proc.wait(), 10)
        finally:
            await asyncio.wait_for(self.client.stop(), 10)

    # -- documents
    def open(self, path: Path, text: str | None = None) -> str:
        uri = Path(path).resolve().as_uri()
        text = Path(path).read_text(encoding="utf-8") if text is None else text
        self.version[uri] = 1
        self.texts[uri] = text
        self.client.text_document_did_open(
            T.DidOpenTextDocumentParams(text_document=T.TextDocumentItem(uri=uri, language_id="percep", version=1, text=text))
        )
        return uri

    def change(self, uri: str, text: str) -> float:
        """Replace the whole text; returns the time the notification was sent."""
        self.version[uri] += 1
        self.texts[uri] = text
        sent = time.perf_counter()
        self.client.text_document_did_change(
            T.DidChangeTextDocumentParams(
                text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=self.version[uri]),
                content_changes=[T.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )
        return sent

    def edit(self, uri: str, line: int, start: int, end: int, new: str, new_text: str) -> float:
        """An incremental change of one line's characters [start, end) to `new`; `new_text` is the result."""
        self.version[uri] += 1
        self.texts[uri] = new_text
        sent = time.perf_counter()
        rng = T.Range(start=T.Position(line=line, character=start), end=T.Position(line=line, character=end))
        self.client.text_document_did_change(
            T.DidChangeTextDocumentParams(
                text_document=T.VersionedTextDocumentIdentifier(uri=uri, version=self.version[uri]),
                content_changes=[T.TextDocumentContentChangePartial(range=rng, text=new)],
            )
        )
        return sent

    def save(self, uri: str) -> None:
        self.client.text_document_did_save(T.DidSaveTextDocumentParams(text_document=T.TextDocumentIdentifier(uri=uri)))

    def files_changed(self, *changes: tuple[Path, T.FileChangeType]) -> None:
        """What an editor's file watcher says when files change on disk (another program wrote them)."""
        events = [T.FileEvent(uri=Path(p).resolve().as_uri(), type=kind) for p, kind in changes]
        self.client.workspace_did_change_watched_files(T.DidChangeWatchedFilesParams(changes=events))

    def close(self, uri: str) -> None:
        self.client.text_document_did_close(T.DidCloseTextDocumentParams(text_document=T.TextDocumentIdentifier(uri=uri)))

    async def diagnostics(self, uri: str, version: int | None = None, after: float = 0.0, timeout: float = 20.0) -> list[T.Diagnostic]:
        return (await self.publication(uri, version, after, timeout))[1].diagnostics

    async def publication(self, uri: str, version: int | None = None, after: float = 0.0, timeout: float = 20.0):
        """The first publishDiagnostics for `uri` received after `after` (and for `version`, if given)."""
        deadline = time.perf_counter() + timeout
        while True:
            for t, p in self.published:
                if p.uri == uri and t >= after and (version is None or p.version == version):
                    return t, p
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no diagnostics for {uri} (version {version})")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except asyncio.TimeoutError:
                pass

    # -- requests
    @staticmethod
    def _pos(text: str, needle: str, delta: int = 0, last: bool = False) -> T.Position:
        """The position of `needle` (+delta characters; its last occurrence if `last`) in `text`, in UTF-16 units."""
        off = (text.rindex(needle) if last else text.index(needle)) + delta
        line = text.count("\n", 0, off)
        col_text = text[text.rfind("\n", 0, off) + 1 : off]
        return T.Position(line=line, character=len(col_text.encode("utf-16-le")) // 2)

    def at(self, uri: str, needle: str, delta: int = 0, last: bool = False) -> T.Position:
        return self._pos(self.texts[uri], needle, delta, last)

    async def hover(self, uri: str, pos: T.Position) -> T.Hover | None:
        return await self.client.text_document_hover_async(T.HoverParams(text_document=T.TextDocumentIdentifier(uri=uri), position=pos))

    async def complete(self, uri: str, pos: T.Position) -> list[str]:
        res = await self.client.text_document_completion_async(
            T.CompletionParams(text_document=T.TextDocumentIdentifier(uri=uri), position=pos)
        )
        items = res.items if isinstance(res, T.CompletionList) else (res or [])
        return [i.label for i in items]

    async def definition(self, uri: str, pos: T.Position):
        return await self.client.text_document_definition_async(
            T.DefinitionParams(text_document=T.TextDocumentIdentifier(uri=uri), position=pos)
        )

    async def symbols(self, uri: str):
        return await self.client.text_document_document_symbol_async(
            T.DocumentSymbolParams(text_document=T.TextDocumentIdentifier(uri=uri))
        )

    async def format(self, uri: str):
        return await self.client.text_document_formatting_async(
            T.DocumentFormattingParams(
                text_document=T.TextDocumentIdentifier(uri=uri), options=T.FormattingOptions(tab_size=2, insert_spaces=True)
            )
        )

    async def code_actions(self, uri: str, diagnostics: list[T.Diagnostic]):
        rng = diagnostics[0].range if diagnostics else T.Range(start=T.Position(line=0, character=0), end=T.Position(line=0, character=0))
        return await self.client.text_document_code_action_async(
            T.CodeActionParams(
                text_document=T.TextDocumentIdentifier(uri=uri), range=rng, context=T.CodeActionContext(diagnostics=diagnostics)
            )
        )


def spec_of_lines(n_lines: int = 300) -> str:
    """A valid spec of about `n_lines` lines: a chain of sft stages with comments, then GRPO."""
    head = [
        "experiment bench_spec",
        "param lam: float = 0.3     # perception weight",
        "param alpha: float = 0.3   # perception share of the reward",
        "seed 7",
        "",
        "task graph_coloring { nodes = 4..6  edge_prob = 0.4  image = 64px  train = 4000  test = 200 }",
        "model tiny { width = 256  depth = 4 }",
        "",
        "roles {",
        '  perception = between("<perception>", "</perception>")',
        '  reasoning  = between("<reasoning>", "</reasoning>")',
        '  answer     = between("<answer>", "</answer>")',
        "}",
        "",
        "stage base = sft { steps = 600  lr = cosine(1e-3, warmup = 50)  loss = token_mean() }",
        "",
    ]
    tail = [
        "stage rl = grpo from s{last} {{ steps = 200  group = 8  kl = 0.02  reward = alpha * perception_match + (1 - alpha) * outcome }}",
        "",
        "eval { every = 100  metrics = [end_to_end, perception, reasoning] }",
    ]
    lines = list(head)
    i, prev = 0, "base"
    while len(lines) + 8 + len(tail) <= n_lines:
        lines += [
            f"# stage {i}: moderate upweighting of perception",
            f"stage s{i} = sft from {prev} {{",
            "  steps = 400",
            "  lr = cosine(1e-3, 0, warmup = 50)",
            "  batch = 8",
            "  loss = lam * mean(perception) + (1 - lam) * mean(reasoning, answer)",
            "}",
            "",
        ]
        prev = f"s{i}"
        i += 1
    lines += [tail[0].format(last=i - 1)] + tail[1:]
    while len(lines) < n_lines:
        lines.append("# padding")
    return "\n".join(lines) + "\n"
