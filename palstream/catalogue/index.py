"""The catalogue of an output root: one SQLite file indexing every archive under it.

``<root>/_palstream/catalogue.sqlite`` holds a row per archive (source, size, duration, encoder
settings, bpp, PSNR from the chunk statistics, fixity state and last verification time) and a
row per chunk. Everything in it is read from the archives themselves, so deleting it loses only
the verification history: :func:`rebuild` makes it again, :func:`refresh` re-reads only archives
that changed since they were indexed.

A remote root (``s3://...``) is catalogued too: SQLite needs a local file, so its catalogue lives
in the user's cache folder (or where ``catalogue`` says). Archives are read through
:func:`palstream.archive.open_archive`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import fsspec

from palstream.archive import open_archive
from palstream.batch.store import JOB_DIR
from palstream.errors import ArchiveError, DamagedChunkError, PalstreamError
from palstream.storage import Location, storage_error

CATALOGUE_NAME = "catalogue.sqlite"
SCHEMA_VERSION = 1
ARCHIVE_SUFFIX = ".zarr"
TEMP_MARK = ".palstream-tmp-"  # replacements being written beside an archive (palstream.archive)

_ARCHIVE_COLUMNS = (
    ("path", "TEXT PRIMARY KEY"),  # relative to the root, '/'-separated
    ("state", "TEXT NOT NULL"),  # complete, incomplete, unreadable
    ("error", "TEXT"),  # why an archive is unreadable
    ("source_name", "TEXT"),
    ("source_url", "TEXT"),
    ("source_bytes", "INTEGER"),
    ("source_sha256", "TEXT"),
    ("width", "INTEGER"),
    ("height", "INTEGER"),
    ("frames", "INTEGER"),
    ("fps", "TEXT"),
    ("duration_s", "REAL"),
    ("pix_fmt", "TEXT"),
    ("streams", "TEXT"),  # JSON list of what the archive keeps
    ("color", "TEXT"),  # JSON object
    ("truncated", "TEXT"),  # JSON object for a truncated source kept on request, else NULL
    ("lossless", "INTEGER"),
    ("target_psnr", "REAL"),
    ("gop", "INTEGER"),
    ("palette", "TEXT"),
    ("config_digest", "TEXT"),
    ("palstream_version", "TEXT"),
    ("encoder", "TEXT"),  # JSON: the archive's whole encoder record
    ("n_chunks", "INTEGER"),
    ("committed", "INTEGER"),
    ("payload_bytes", "INTEGER"),
    ("archive_bytes", "INTEGER"),
    ("bpp", "REAL"),
    ("ratio", "REAL"),  # source file bytes / payload bytes
    ("psnr_min", "REAL"),  # lowest finite PSNR-Y of the chunks; NULL with exact chunks only
    ("psnr_mean", "REAL"),
    ("exact_chunks", "INTEGER"),  # chunks coded exactly (PSNR infinite)
    ("fixity", "TEXT NOT NULL"),  # unverified, intact, damaged, incomplete, unreadable
    ("fixity_detail", "TEXT"),
    ("verified_at", "REAL"),  # Unix time of the last verification
    ("root_sha256", "TEXT"),  # the root's integrity digest: a verification holds while it is unchanged
    ("signature", "TEXT"),  # file times and sizes that tell refresh the archive changed
    ("indexed_at", "REAL"),
)
ARCHIVE_FIELDS = tuple(name for name, _ in _ARCHIVE_COLUMNS)
_JSON_FIELDS = ("streams", "color", "truncated", "encoder")
_CHUNK_COLUMNS = (
    ("path", "TEXT NOT NULL"),
    ("idx", "INTEGER NOT NULL"),
    ("first_frame", "INTEGER"),
    ("frames", "INTEGER"),
    ("bytes", "INTEGER"),
    ("bpp", "REAL"),
    ("psnr_y", "REAL"),  # NULL for an exact chunk
    ("sha256", "TEXT"),
    ("state", "TEXT NOT NULL"),  # committed, missing, damaged
    ("detail", "TEXT"),
)
CHUNK_FIELDS = tuple(name for name, _ in _CHUNK_COLUMNS)
_SEARCHED = ("path", "source_name", "source_url", "source_sha256")  # columns a search word may match
# Sort keys the library table offers (column names, never user text, go into SQL).
SORT_KEYS = (
    "path",
    "source_name",
    "state",
    "fixity",
    "frames",
    "duration_s",
    "source_bytes",
    "payload_bytes",
    "bpp",
    "ratio",
    "psnr_min",
    "verified_at",
)


@dataclass(frozen=True)
class Catalogue:
    """The catalogue of one output root, and how to reach the archives under it.

    Parameters
    ----------
    location : Location
        The output root: a resolved local path, or a URL (``s3://bucket/prefix``) without a final
        ``/`` with its storage options.
    path : Path
        The SQLite file: ``<root>/_palstream/catalogue.sqlite`` for a local root, a file in the
        user's cache folder for a remote one (SQLite needs a local file).
    """

    location: Location
    path: Path

    @classmethod
    def of(cls, root: str | os.PathLike | Location, path: str | os.PathLike | None = None) -> Catalogue:
        """The catalogue of ``root``; ``path`` puts the SQLite file elsewhere (a read-only root).

        Raises
        ------
        PalstreamError
            ``root`` is not a folder (or holds nothing), is an archive itself, or cannot be read.
        """
        given = Location.of(root)
        local = given.local_path
        if local is not None:
            location = Location(str(Path(local).resolve()))
            exists, is_archive = os.path.isdir(location.url), os.path.isfile(os.path.join(location.url, "zarr.json"))
        else:
            location = Location(given.url.rstrip("/"), given.options)
            fs, base = location.filesystem()
            try:
                exists, is_archive = fs.isdir(base), fs.isfile(f"{base}/zarr.json")
            except Exception as exc:  # any backend failure becomes one line
                raise storage_error(exc, location, "read output root") or PalstreamError(
                    f"cannot read {location}: {exc}; check the URL and the storage settings"
                ) from None
        if not exists:
            raise PalstreamError(f"{given} is not a folder; give a job's output root or a folder of archives")
        if is_archive:
            raise PalstreamError(f"{given} is an archive, not a folder of archives; give the folder that holds it")
        if path is not None:
            where = Path(path).resolve()
        elif location.is_local:
            where = Path(location.url, JOB_DIR, CATALOGUE_NAME)
        else:
            where = _cache_folder() / f"{re.sub(r'[^A-Za-z0-9]+', '-', location.redacted)[:60]}-{_digest(location.url)}.sqlite"
        return cls(location, where)

    @property
    def root(self) -> str:
        """The output root's path or URL."""
        return self.location.url

    @property
    def remote(self) -> bool:
        """Whether the root is on remote storage (reached through fsspec)."""
        return not self.location.is_local

    @functools.cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem of a remote root."""
        return self.location.filesystem()[0]

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection (one per call: the server's threads each get their own); commits on success."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise PalstreamError(
                f"cannot open the catalogue {self.path}: {exc}; give a writable place with --catalogue"
            ) from None
        db.row_factory = sqlite3.Row
        try:
            with db:
                _ensure_schema(db)
            with db:
                yield db
        except sqlite3.Error as exc:
            raise PalstreamError(
                f"the catalogue {self.path} cannot be used ({exc}); rebuild it: palstream catalogue rebuild {self.location}"
            ) from None
        finally:
            db.close()

    def archive_location(self, rel: str) -> Location:
        """The archive at ``rel`` (a catalogue key), after checking it stays under the root.

        Raises
        ------
        OutsideRootError
            ``rel`` is absolute, holds ``..``, or resolves (through links) outside the root.
        """
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or "\\" in rel or any(p in ("..", ".", "") for p in parts):
            raise OutsideRootError(f"{rel!r} is not a path inside the catalogue's root")
        if self.remote:
            return self.location.child(rel)
        root = Path(self.root)
        resolved = (root / rel).resolve()
        if root not in resolved.parents:
            raise OutsideRootError(f"{rel!r} leads outside the catalogue's root")
        return Location(str(resolved))

    def holds(self, key: str) -> bool:
        """Whether the object or file ``key`` (relative to the root, already checked) exists."""
        if self.remote:
            return self.fs.isfile(f"{self.root}/{key}")
        return os.path.isfile(os.path.join(self.root, key))

    def relative(self, archive: str | os.PathLike | Location) -> str:
        """The catalogue key of ``archive``, a path or URL under the root.

        Raises
        ------
        OutsideRootError
            ``archive`` is not under the root.
        """
        location = Location.of(archive)
        text = location.url.rstrip("/")
        if self.remote:
            rel = text[len(self.root) + 1 :] if text.startswith(self.root + "/") else ""
        else:
            path, root = Path(location.local_path or text).resolve(), Path(self.root)
            rel = path.relative_to(root).as_posix() if root in path.parents else ""
        if not rel:
            raise OutsideRootError(f"archive {location} is not under the catalogue's root {self.location}")
        self.archive_location(rel)
        return rel


def _cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "palstream" / "catalogues"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class OutsideRootError(PalstreamError):
    """A requested path is not under the catalogue's root."""


def _ensure_schema(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    # Everything in the catalogue comes from the archives: an older layout is simply rebuilt.
    db.execute("DROP TABLE IF EXISTS archives")
    db.execute("DROP TABLE IF EXISTS chunks")
    db.execute(f"CREATE TABLE archives ({', '.join(f'{n} {t}' for n, t in _ARCHIVE_COLUMNS)})")
    db.execute(f"CREATE TABLE chunks ({', '.join(f'{n} {t}' for n, t in _CHUNK_COLUMNS)}, PRIMARY KEY (path, idx))")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# -- finding and reading archives ---------------------------------------------------------------


def find_archives(cat: Catalogue) -> list[str]:
    """Catalogue keys of every ``*.zarr`` folder with a ``zarr.json`` under the root, sorted.

    The job's own folder, replacements being written and links leading out of the root are left
    out; archives are not descended into (their chunks are never listed).

    Raises
    ------
    PalstreamError
        A remote root cannot be listed.
    """
    if cat.remote:
        return _find_remote(cat)
    root = Path(cat.root)
    found = []
    for folder, dirs, _ in os.walk(root):
        here = Path(folder)
        keep = []
        for name in sorted(dirs):
            if here == root and name == JOB_DIR or TEMP_MARK in name:
                continue
            full = here / name
            if full.is_symlink() and root not in full.resolve().parents:
                continue
            if name.endswith(ARCHIVE_SUFFIX) and (full / "zarr.json").is_file():
                found.append(full.relative_to(root).as_posix())  # an archive: not descended into
            else:
                keep.append(name)
        dirs[:] = keep
    return sorted(found)


def _find_remote(cat: Catalogue) -> list[str]:
    fs, base = cat.location.filesystem()
    fs.invalidate_cache()  # listings are cached by fsspec: each refresh must see the store as it is now
    found, folders = [], [base]
    try:
        while folders:
            here = folders.pop()
            for entry in fs.ls(here, detail=True):
                full = entry["name"].rstrip("/")
                name = full.rsplit("/", 1)[-1]
                if entry["type"] != "directory" or (here == base and name == JOB_DIR) or TEMP_MARK in name:
                    continue
                if name.endswith(ARCHIVE_SUFFIX) and fs.isfile(f"{full}/zarr.json"):
                    found.append(full[len(base) + 1 :])
                else:
                    folders.append(full)
    except Exception as exc:  # any backend failure becomes one line
        raise storage_error(exc, cat.location, "list output root") or PalstreamError(
            f"cannot list {cat.location}: {exc}; check the URL and the storage settings"
        ) from None
    return sorted(found)


def _signature(cat: Catalogue, rel: str) -> str:
    """What changes when an archive is written to: its root document and (locally) its commit folder.

    Remote stores have no folder times: there, chunks committed since (with the root unchanged)
    show up once the archive is finalized, or with a rebuild.
    """
    if cat.remote:
        try:
            info = cat.fs.info(cat.archive_location(rel).child("zarr.json").url)
        except (OSError, ValueError):
            return "-"
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("created")
        return f"{stamp}:{info.get('size')}"
    parts = []
    for sub in ("zarr.json", "commits"):
        try:
            st = os.stat(os.path.join(cat.root, rel, sub))
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append("-")
    return "/".join(parts)


def _tree_bytes(cat: Catalogue, rel: str) -> int | None:
    """Bytes of every file of the archive (None where the store cannot say)."""
    if cat.remote:
        try:
            return int(cat.fs.du(cat.archive_location(rel).url))
        except (OSError, ValueError, TypeError):
            return None
    total = 0
    for here, _, files in os.walk(os.path.join(cat.root, rel)):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(here, name)).st_size
    return total


def describe(cat: Catalogue, rel: str) -> tuple[dict, list[dict]]:
    """The catalogue row of the archive at ``rel`` and its chunk rows, read from the archive.

    An archive that cannot be opened gives a row with state ``unreadable`` and the reason.
    """
    location = cat.archive_location(rel)
    row = dict.fromkeys(ARCHIVE_FIELDS)
    row.update(path=rel, signature=_signature(cat, rel), indexed_at=time.time(), archive_bytes=_tree_bytes(cat, rel))
    try:
        archive = open_archive(location)
    except ArchiveError as exc:
        name = rel.rsplit("/", 1)[-1]
        row.update(state="unreadable", error=str(exc), fixity="unreadable", fixity_detail=str(exc), source_name=name)
        return row, []
    attrs, src = archive.attrs, archive.source
    encoder = attrs["encoder"]
    config = encoder["config"]
    chunks, finite, exact = [], [], 0
    committed = archive.committed_chunks()  # each chunk's metadata and marker read once
    for index in range(archive.n_chunks):
        frames = archive.chunk_frames(index)
        chunk = {"path": rel, "idx": index, "first_frame": frames.start, "frames": len(frames)}
        if index in committed:
            meta = committed[index][1]
            stats = meta.get("stats", {})
            psnr = stats.get("psnr_y")
            chunk.update(
                bytes=stats.get("bytes"),
                bpp=stats.get("bpp"),
                psnr_y=psnr,
                sha256=meta.get("sha256"),
                state="committed",
            )
            if isinstance(psnr, (int, float)):
                finite.append((psnr, len(frames)))
            else:
                exact += 1  # FORMAT.md: a null PSNR is infinite (an exact chunk)
        else:
            chunk.update(state="missing", detail="not written or its metadata is damaged")
        chunks.append(chunk)
    payload = sum(length for length, _ in committed.values())
    pixels = src.frame_count * src.width * src.height
    row.update(
        state="complete" if archive.complete else "incomplete",
        source_name=src.name,
        source_url=src.url,
        source_bytes=src.size_bytes,
        source_sha256=src.sha256,
        width=src.width,
        height=src.height,
        frames=src.frame_count,
        fps=src.fps,
        duration_s=float(src.frame_count / Fraction(src.fps)),
        pix_fmt=src.pix_fmt,
        # Only the video stream is archived today; audio and subtitles join this list once kept.
        streams=[{"type": "video", "width": src.width, "height": src.height, "fps": src.fps, "pix_fmt": src.pix_fmt}],
        color=src.color,
        truncated=src.truncated,
        lossless=bool(config.get("lossless")),
        target_psnr=config.get("target_psnr"),
        gop=attrs["gop"],
        palette=encoder["palette_generator"]["name"],
        config_digest=encoder["config_digest"],
        palstream_version=encoder["palstream_version"],
        encoder=encoder,
        n_chunks=archive.n_chunks,
        committed=len(committed),
        payload_bytes=payload,
        bpp=8.0 * payload / pixels if payload else None,
        ratio=src.size_bytes / payload if payload else None,
        psnr_min=min(p for p, _ in finite) if finite else None,
        psnr_mean=sum(p * n for p, n in finite) / sum(n for _, n in finite) if finite else None,
        exact_chunks=exact,
        fixity="unverified",
        root_sha256=(attrs.get("integrity") or {}).get("sha256"),
    )
    return row, chunks


# -- writing the catalogue ----------------------------------------------------------------------


def _store(db: sqlite3.Connection, row: dict, chunks: list[dict]) -> None:
    """Insert or replace one archive, keeping its last verification while the archive is unchanged."""
    old = db.execute(
        "SELECT root_sha256, signature, fixity, fixity_detail, verified_at FROM archives WHERE path = ?", (row["path"],)
    ).fetchone()
    old_chunks = {}
    if (
        old is not None
        and old["verified_at"] is not None
        and row["state"] != "unreadable"
        and (old["root_sha256"], old["signature"]) == (row["root_sha256"], row["signature"])
    ):
        row.update(fixity=old["fixity"], fixity_detail=old["fixity_detail"], verified_at=old["verified_at"])
        old_chunks = {
            r["idx"]: (r["state"], r["detail"])
            for r in db.execute("SELECT idx, state, detail FROM chunks WHERE path = ?", (row["path"],))
        }
    for chunk in chunks:
        if chunk["idx"] in old_chunks:
            chunk["state"], chunk["detail"] = old_chunks[chunk["idx"]]
    values = {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in row.items()}
    db.execute(
        f"INSERT OR REPLACE INTO archives ({', '.join(ARCHIVE_FIELDS)}) VALUES ({', '.join('?' * len(ARCHIVE_FIELDS))})",
        [values[k] for k in ARCHIVE_FIELDS],
    )
    db.execute("DELETE FROM chunks WHERE path = ?", (row["path"],))
    db.executemany(
        f"INSERT INTO chunks ({', '.join(CHUNK_FIELDS)}) VALUES ({', '.join('?' * len(CHUNK_FIELDS))})",
        [[c.get(k) for k in CHUNK_FIELDS] for c in chunks],
    )


Root = str | os.PathLike | Location | Catalogue  # an output root, or its catalogue already opened


def _open(root: Root, catalogue: str | os.PathLike | None) -> Catalogue:
    return root if isinstance(root, Catalogue) else Catalogue.of(root, catalogue)


def refresh(
    root: Root,
    catalogue: str | os.PathLike | None = None,
    full: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Bring the catalogue of ``root`` up to date with the archives under it.

    Archives whose files changed since they were indexed (or all, with ``full``) are read again;
    archives that disappeared are dropped. A kept verification stays while an archive's root
    digest and files are unchanged.

    Parameters
    ----------
    root : path, URL or Catalogue
        Output root.
    catalogue : path, optional
        SQLite file; default ``<root>/_palstream/catalogue.sqlite`` (a cache file for a remote root).
    full : bool, default False
        Read every archive again (``palstream catalogue rebuild``).
    progress : callable, optional
        ``progress(done, total)`` after each archive read.

    Returns
    -------
    dict
        ``{"archives": n, "read": n, "dropped": n}``.
    """
    cat = _open(root, catalogue)
    found = find_archives(cat)
    with cat.connect() as db:
        known = {r["path"]: r["signature"] for r in db.execute("SELECT path, signature FROM archives")}
    stale = [rel for rel in found if full or known.get(rel) != _signature(cat, rel)]
    gone = sorted(set(known) - set(found))
    described = []
    for done, rel in enumerate(stale, 1):
        described.append(describe(cat, rel))  # read outside the transaction: the server keeps reading
        if progress is not None:
            progress(done, len(stale))
    with cat.connect() as db:
        for rel in gone:
            db.execute("DELETE FROM archives WHERE path = ?", (rel,))
            db.execute("DELETE FROM chunks WHERE path = ?", (rel,))
        for row, chunks in described:
            _store(db, row, chunks)
    return {"archives": len(found), "read": len(stale), "dropped": len(gone)}


def rebuild(
    root: Root,
    catalogue: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Read every archive under ``root`` again (see :func:`refresh`)."""
    return refresh(root, catalogue, full=True, progress=progress)


def record_archive(
    root: Root,
    archive: str | os.PathLike | Location,
    catalogue: str | os.PathLike | None = None,
) -> None:
    """Index (again) one archive under ``root``: for the batch system after it finalizes an archive.

    Raises
    ------
    PalstreamError
        ``archive`` is not under ``root``.
    """
    cat = _open(root, catalogue)
    row, chunks = describe(cat, cat.relative(archive))
    with cat.connect() as db:
        _store(db, row, chunks)


def verify_archive(
    root: Root, rel: str, catalogue: str | os.PathLike | None = None
) -> dict:
    """Check the fixity of one archive now and record the result and its time in the catalogue.

    Returns
    -------
    dict
        The archive's updated row (see :func:`get_archive`).

    Raises
    ------
    PalstreamError
        ``rel`` is outside the root, or no archive is there.
    """
    cat = _open(root, catalogue)
    location = cat.archive_location(rel)
    if not cat.holds(f"{rel}/zarr.json"):
        raise MissingArchiveError(f"no archive at {rel}; it was moved or deleted (refresh the catalogue)")
    try:
        outcome: list[DamagedChunkError] | ArchiveError = open_archive(location).verify()
    except ArchiveError as exc:
        outcome = exc  # unreadable or altered root: recorded as such
    _record_verification(cat, rel, outcome)
    return get_archive(cat, rel)


def record_verification(archive: str | os.PathLike | Location, outcome: list[DamagedChunkError] | ArchiveError) -> bool:
    """Record a verification done elsewhere (``palstream verify``) in the catalogue of the output
    root that holds ``archive``, if any: the nearest folder above it with ``_palstream/catalogue.sqlite``.

    Parameters
    ----------
    archive : path
        The verified archive (a local path; URLs have no catalogue).
    outcome : list of DamagedChunkError, or ArchiveError
        What :meth:`palstream.archive.Archive.verify` returned, or the error it raised.

    Returns
    -------
    bool
        Whether a catalogue was updated.
    """
    location = Location.of(archive)
    local = location.local_path
    if local is None:
        return False
    path = Path(local).resolve()
    for parent in path.parents:
        if (parent / JOB_DIR / CATALOGUE_NAME).is_file():
            _record_verification(Catalogue.of(parent), path.relative_to(parent).as_posix(), outcome)
            return True
    return False


def _record_verification(cat: Catalogue, rel: str, outcome: list[DamagedChunkError] | ArchiveError) -> None:
    row, chunks = describe(cat, rel)
    if isinstance(outcome, ArchiveError):
        row.update(fixity="damaged" if row["state"] != "unreadable" else "unreadable", fixity_detail=str(outcome))
    elif row["state"] != "unreadable":
        damaged = {exc.index: exc.reason for exc in outcome}
        if damaged:
            listed = "; ".join(f"chunk {i}: {r}" for i, r in sorted(damaged.items()))
            row.update(
                fixity="damaged", fixity_detail=f"{len(damaged)} of {row['n_chunks']} chunk(s) damaged: {listed}"
            )
        elif row["state"] != "complete":
            row.update(
                fixity="incomplete",
                fixity_detail="the archive was never finalized (status incomplete); resume or re-encode it",
            )
        else:
            row.update(fixity="intact", fixity_detail=f"all {row['n_chunks']} chunk(s) intact")
        for chunk in chunks:
            if chunk["idx"] in damaged:
                chunk.update(state="damaged", detail=damaged[chunk["idx"]])
            elif chunk["state"] == "committed":
                chunk.update(state="intact", detail=None)
    row["verified_at"] = time.time()
    with cat.connect() as db:
        db.execute("DELETE FROM archives WHERE path = ?", (rel,))  # a fresh verification replaces the kept one
        _store(db, row, chunks)


class MissingArchiveError(PalstreamError):
    """The catalogue names an archive that is no longer there (or never was)."""


# -- reading the catalogue ----------------------------------------------------------------------


def _decode_row(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON_FIELDS:
        if key in out and out[key] is not None:
            out[key] = json.loads(out[key])
    if "lossless" in out and out["lossless"] is not None:
        out["lossless"] = bool(out["lossless"])
    return out


def list_archives(
    cat: Catalogue,
    query: str = "",
    state: str = "",
    fixity: str = "",
    min_psnr: float | None = None,
    sort: str = "path",
    descending: bool = False,
) -> list[dict]:
    """Rows of the catalogue, filtered and sorted (the library table and ``palstream ls``).

    Parameters
    ----------
    cat : Catalogue
    query : str
        Words that must each appear in the archive path, source name, source URL or SHA-256.
    state, fixity : str
        Keep only this state (``complete``, ``incomplete``, ``unreadable``) / fixity state.
    min_psnr : float, optional
        Keep archives whose lowest PSNR-Y is at least this (exact archives always pass).
    sort : str
        One of :data:`SORT_KEYS`.
    descending : bool
        Reverse order.
    """
    if sort not in SORT_KEYS:
        raise PalstreamError(f"cannot sort by {sort!r}; choose one of {', '.join(SORT_KEYS)}")
    where: list[str] = []
    args: list[str | float] = []
    for word in query.split():
        where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in _SEARCHED) + ")")
        pattern = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [pattern] * len(_SEARCHED)
    if state:
        where.append("state = ?")
        args.append(state)
    if fixity:
        where.append("fixity = ?")
        args.append(fixity)
    if min_psnr is not None:
        where.append("(psnr_min >= ? OR (psnr_min IS NULL AND exact_chunks > 0))")
        args.append(min_psnr)
    condition = f"WHERE {' AND '.join(where)}" if where else ""
    order = f"{sort} IS NULL, {sort} {'DESC' if descending else 'ASC'}, path"  # missing values last
    sql = f"SELECT * FROM archives {condition} ORDER BY {order}"
    with cat.connect() as db:
        return [_decode_row(r) for r in db.execute(sql, args)]


def get_archive(cat: Catalogue, rel: str) -> dict:
    """One archive's row with its chunk rows under ``"chunks"``.

    Raises
    ------
    MissingArchiveError
        Not in the catalogue.
    """
    with cat.connect() as db:
        row = db.execute("SELECT * FROM archives WHERE path = ?", (rel,)).fetchone()
        if row is None:
            raise MissingArchiveError(f"no archive {rel!r} in the catalogue of {cat.location}")
        chunks = [dict(r) for r in db.execute("SELECT * FROM chunks WHERE path = ? ORDER BY idx", (rel,))]
    return {**_decode_row(row), "chunks": chunks}


def totals(rows: list[dict]) -> dict:
    """Sums over catalogue rows: archives, frames, duration, source and payload bytes, overall ratio."""
    payload = sum(r["payload_bytes"] or 0 for r in rows)
    source = sum(r["source_bytes"] or 0 for r in rows if r["payload_bytes"])
    return {
        "archives": len(rows),
        "frames": sum(r["frames"] or 0 for r in rows),
        "duration_s": sum(r["duration_s"] or 0 for r in rows),
        "source_bytes": sum(r["source_bytes"] or 0 for r in rows),
        "payload_bytes": payload,
        "archive_bytes": sum(r["archive_bytes"] or 0 for r in rows),
        "ratio": source / payload if payload else None,
        "damaged": sum(r["fixity"] in ("damaged", "unreadable") for r in rows),
    }
