"""`python -m percepdsl.lsp`: the language server over stdio (same as `percep lsp`)."""

from . import lsp_command

lsp_command()
