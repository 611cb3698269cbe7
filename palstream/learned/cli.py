"""Commands of this package; registered into ``palstream.cli.app``."""

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
