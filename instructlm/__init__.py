"""The `instructlm` command. Subcommands live in `instructlm.commands` and import their heavy code lazily."""

__version__ = "0.1.0"
