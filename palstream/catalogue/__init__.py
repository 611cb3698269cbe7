"""The library catalogue of an output root (SQLite) and ``palstream serve``, its local web browser.

See ``docs/catalogue.md``. The batch system keeps the catalogue current with
:func:`record_archive` (after an archive is finalized) and :func:`refresh` (after a run);
``palstream verify`` with :func:`record_verification`.
"""

__all__ = ["Catalogue", "rebuild", "record_archive", "record_verification", "refresh", "verify_archive"]


def __getattr__(name: str):
    # Imported on first use: `palstream.catalogue.cli` is loaded with every command, the archive
    # reader (zarr, the codec) only when a catalogue is used.
    if name in __all__:
        from palstream.catalogue import index

        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
