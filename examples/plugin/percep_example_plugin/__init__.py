"""Example percepdsl plugin. Its catalogue entries live in percep_catalogue.toml."""
