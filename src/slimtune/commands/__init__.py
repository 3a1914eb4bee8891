"""CLI subcommands of the foundation: generate, shapes, convert."""
