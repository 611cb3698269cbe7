"""The ``palstream`` command line: a thin layer over the library.

Domain errors (``PalstreamError``) become a one-line message and exit code 1 here, and only here.
"""

from __future__ import annotations

import sys

import typer

from palstream.errors import PalstreamError

app = typer.Typer(
    name="palstream",
    help="Palette video codec and batch archiver for video libraries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups living beside their library code register themselves here.
from palstream.batch.cli import register as _register_batch  # noqa: E402
from palstream.learned.cli import register as _register_learned  # noqa: E402

_register_batch(app)
_register_learned(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except PalstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
