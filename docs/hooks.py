"""MkDocs hook: the language reference page, generated from the catalogue at build time."""

from mkdocs.structure.files import File

from percepdsl.docs import reference


def on_files(files, config):
    files.append(File.generated(config, "reference.md", content=reference()))
    return files
