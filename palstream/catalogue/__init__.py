"""The library catalogue of an output root (SQLite) and ``palstream serve``, its local web browser.

See ``docs/catalogue.md``. The batch system keeps the catalogue current with
:func:`record_archive` (after an archive is finalized) and :func:`refresh` (after a run);
``palstream verify`` with :func:`record_verification`.
"""

from palstream.catalogue.index import Catalogue, rebuild, record_archive, record_verification, refresh, verify_archive

__all__ = ["Catalogue", "rebuild", "record_archive", "record_verification", "refresh", "verify_archive"]
