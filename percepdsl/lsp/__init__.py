"""The percep language server (`percep lsp`).

`lsp_command` is what the CLI calls; importing this package is cheap (pygls is imported
when the server starts). The features themselves live in `features.py` (pure functions
of a document's text) over a tolerant text scan (`scan.py`); `server.py` wires them to
pygls; `testing.py` is a stdio client for the tests and `benchmarks/bench_lsp.py`.
"""

from __future__ import annotations


def lsp_command() -> None:
    """Start the language server over stdio (editors run `percep lsp`)."""
    from .server import main

    main()


__all__ = ["lsp_command"]
