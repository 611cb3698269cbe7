"""The palstream archive: a zarr v3 group of independently coded GOP chunks (``storage/FORMAT.md``).

Layout (``{i:06d}`` is the zero-padded chunk index)::

    zarr.json                root group; attributes describe the whole archive (see FORMAT.md)
    chunks/{i:06d}/          1-D uint8 array: the chunk's payload bytes (one zarr chunk, crc32c)
    commits/{i:06d}/         empty group whose attributes repeat the payload's sha256 and length

One task writes one chunk: first the array metadata (with the chunk's sha256 and statistics),
then its data, and last its commit marker. A chunk is *committed* only when its marker exists
*and* agrees with the array's metadata, so a half-written chunk is never taken for done.
``finalize`` checks every chunk and only then sets ``status`` to ``"complete"``.
"""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
from typing import Callable, Iterator

import fsspec
import numpy as np
import zarr
import zarr.codecs

import palstream
from palstream.codec import BitstreamError, EncodedChunk, EncoderConfig, decode_chunk
from palstream.errors import ArchiveError, DamagedChunkError
from palstream.frames import Frames
from palstream.io import SourceInfo, fsspec_options

FORMAT_NAME = "palstream"
FORMAT_VERSION = 1
# Sanity limits for declared sizes: reading a malformed archive must fail cleanly, not allocate wildly.
MAX_DIMENSION = 16384
MAX_FRAMES = 10**9
MAX_GOP = 1024
_REQUIRED_ATTRS = ("format", "format_version", "source", "encoder", "gop", "n_chunks", "frame_count", "status")


def _key(index: int) -> str:
    return f"{index:06d}"


def json_safe(value):
    """Statistics as plain JSON: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # e.g. PSNR of an exact chunk; FORMAT.md: null means infinite
    return value


def _store_args(url: str, storage_options: dict | None) -> dict:
    if "://" not in str(url):
        return {}  # a plain path: zarr's LocalStore
    options = fsspec_options(url, storage_options)
    if str(url).startswith("file://"):
        options["auto_mkdir"] = True  # zarr needs it to create a new local folder through fsspec
    return {"storage_options": options}


def _open_group(url: str, mode: str, storage_options: dict | None, **kwargs) -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, **_store_args(url, storage_options), **kwargs)


def check_destination(url: str, storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Refuse an existing output (unless ``overwrite``) or an unwritable location, before any work.

    Writes and removes one empty probe object. ``overwrite`` only ever replaces an existing
    palstream archive, never an unrelated file or folder.

    Raises
    ------
    ArchiveError
        The destination exists, is not a palstream archive, or cannot be written.
    """
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **fsspec_options(url, storage_options))
        if fs.exists(path):
            if fs.isfile(path):
                raise ArchiveError(f"{url} exists and is a file; choose another archive path")
            if fs.ls(path, detail=False):
                if not _is_palstream(fs, path):
                    raise ArchiveError(f"{url} exists and is not a palstream archive; choose another path")
                if not overwrite:
                    raise ArchiveError(f"archive {url} already exists; pass --overwrite to replace it")
        local = "file" in fs.protocol or "local" in fs.protocol
        created = local and not fs.exists(path)
        if local:
            fs.makedirs(path, exist_ok=True)
        test = f"{path.rstrip('/')}/.palstream-write-test"
        fs.pipe_file(test, b"")
        fs.rm_file(test)
        if created:
            fs.rmdir(path)  # leave nothing behind until the archive is really created
    except ArchiveError:
        raise
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise ArchiveError(f"cannot write archive {url}: {reason}; choose a writable location") from None


def _is_palstream(fs, path: str) -> bool:
    try:
        meta = json.loads(fs.cat_file(f"{path.rstrip('/')}/zarr.json"))
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("format") == FORMAT_NAME


class ArchiveWriter:
    """Writes an archive chunk by chunk; every chunk can be written by a different task.

    Use :meth:`create` for a new archive and :meth:`open` to resume an incomplete one.
    """

    def __init__(self, group: zarr.Group, url: str):
        self._group = group
        self.url = url
        self.attrs = _validated_attrs(dict(group.attrs), url)
        self.n_chunks = self.attrs["n_chunks"]

    @classmethod
    def create(
        cls,
        url: str,
        source: SourceInfo,
        config: EncoderConfig,
        generator=None,
        n_chunks: int | None = None,
        storage_options: dict | None = None,
        overwrite: bool = False,
    ) -> "ArchiveWriter":
        """Create an empty archive with status ``"incomplete"``.

        Parameters
        ----------
        url : str
            Local path or fsspec URL of the archive (a folder / key prefix).
        source : SourceInfo
            The probed source.
        config : EncoderConfig
            Recorded with its digest.
        generator : PaletteGenerator, optional
            Recorded by name and weights hash; default: the generator named in ``config``.
        n_chunks : int, optional
            Must equal ``ceil(source.frame_count / config.gop)`` (the default).
        storage_options : dict, optional
            Passed to fsspec.
        overwrite : bool, default False
            Replace an existing palstream archive at ``url``.
        """
        expected = math.ceil(source.frame_count / config.gop)
        if n_chunks is not None and n_chunks != expected:
            raise ArchiveError(
                f"{n_chunks} chunks do not fit {source.frame_count} frames in GOPs of {config.gop}; use {expected}"
            )
        check_destination(url, storage_options, overwrite)
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": source.to_dict(),
            "encoder": {
                "palstream_version": palstream.__version__,
                "config": config.to_dict(),
                "config_digest": config.digest,
                "palette_generator": {
                    "name": generator.name if generator is not None else config.palette,
                    "weights_hash": generator.weights_hash if generator is not None else None,
                },
            },
            "gop": config.gop,
            "n_chunks": expected,
            "frame_count": source.frame_count,
            "status": "incomplete",
        }
        try:
            group = _open_group(url, "w", storage_options, attributes=attrs)
            group.create_group("chunks")
            group.create_group("commits")
        except OSError as exc:
            raise ArchiveError(f"cannot write archive {url}: {exc}; choose a writable location") from None
        return cls(group, str(url))

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> "ArchiveWriter":
        """Reopen an existing archive to write its remaining chunks (resume)."""
        return cls(_open_existing(url, "r+", storage_options), str(url))

    def chunk_frames(self, index: int) -> range:
        """Frame numbers of chunk ``index`` in the source."""
        return _chunk_frames(self.attrs, index)

    def write_chunk(self, index: int, encoded: EncodedChunk) -> None:
        """Store one encoded chunk, then its commit marker.

        Idempotent: rewriting a committed chunk with the same payload does nothing. A different
        payload first removes the old marker, so the chunk is never committed with mixed data.
        """
        frames = self.chunk_frames(index)
        payload = bytes(encoded.payload)
        if not payload:
            raise ArchiveError(f"chunk {index} has an empty payload; the encoder failed")
        if encoded.stats.get("frames", len(frames)) != len(frames):
            raise ArchiveError(f"chunk {index} holds {encoded.stats['frames']} frames; expected {len(frames)}")
        sha = hashlib.sha256(payload).hexdigest()
        marker = self._marker(index)
        if marker is not None:
            if marker.get("sha256") == sha and self._array_consistent(index, marker):
                return
            del self._group[f"commits/{_key(index)}"]
        attributes = {
            "sha256": sha,
            "frames": len(frames),
            "first_frame": frames.start,
            # Timings vary run to run; leaving them out keeps archive bytes reproducible.
            "stats": json_safe({k: v for k, v in encoded.stats.items() if not k.endswith("_seconds")}),
        }
        array = self._group.create_array(
            f"chunks/{_key(index)}",
            shape=(len(payload),),
            chunks=(len(payload),),
            dtype="uint8",
            filters=None,
            compressors=[zarr.codecs.Crc32cCodec()],  # payload is entropy-coded: checksum, no compressor
            fill_value=0,
            attributes=attributes,
            overwrite=True,
            config={"write_empty_chunks": True},
        )
        array[:] = np.frombuffer(payload, np.uint8)
        self._group.create_group(
            f"commits/{_key(index)}", attributes={"sha256": sha, "bytes": len(payload)}, overwrite=True
        )

    def record_chunk_config(self, first: int, count: int, config: EncoderConfig) -> None:
        """Record that chunks ``[first, first + count)`` are encoded with ``config`` (FORMAT.md §2.2).

        For the tuner's batches, whose configuration differs from ``encoder.config``. Called by
        the job's single driver before those chunks' tasks run; repeating a record (a resumed
        job) writes nothing.
        """
        encoder = dict(self.attrs["encoder"])
        run = {"first": first, "count": count, "digest": config.digest}
        runs = list(encoder.get("chunk_configs", []))
        if run in runs:
            return
        overlap = [r for r in runs if r["first"] < first + count and first < r["first"] + r["count"]]
        if overlap:
            raise ArchiveError(
                f"archive {self.url}: chunks {first}..{first + count - 1} already have configuration "
                f"{overlap[0]['digest']}; a chunk's configuration is decided once"
            )
        configs = {**encoder.get("configs", {}), config.digest: config.to_dict()}
        runs = sorted([*runs, run], key=lambda r: r["first"])
        self._group.attrs.update({"encoder": {**encoder, "configs": configs, "chunk_configs": runs}})
        self.attrs = _validated_attrs(dict(self._group.attrs), self.url)

    def revoke(self, index: int) -> None:
        """Delete chunk ``index``'s commit marker, so the chunk counts as not written (and is redone)."""
        if self._marker(index) is not None:
            del self._group[f"commits/{_key(index)}"]

    def _marker(self, index: int) -> dict | None:
        try:
            return dict(self._group[f"commits/{_key(index)}"].attrs)
        except KeyError:
            return None

    def _array_consistent(self, index: int, marker: dict) -> bool:
        try:
            array = self._group[f"chunks/{_key(index)}"]
        except KeyError:
            return False
        return array.attrs.get("sha256") == marker.get("sha256") and array.shape == (marker.get("bytes"),)

    def committed(self) -> set[int]:
        """Indices whose commit marker exists and matches the chunk's recorded sha256 and length."""
        return _committed(self._group, self.n_chunks)

    def finalize(self) -> None:
        """Check that every chunk is committed and intact, then mark the archive complete.

        Raises
        ------
        ArchiveError
            Chunks are missing or damaged (the archive stays ``"incomplete"``).
        """
        missing = sorted(set(range(self.n_chunks)) - self.committed())
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ArchiveError(f"archive {self.url} lacks {len(missing)} chunk(s) ({shown}); write them, then finalize")
        archive = Archive(self._group, self.url)
        damaged = archive.verify()
        if damaged:
            raise ArchiveError(f"archive {self.url} cannot be finalized: {damaged[0]}; rewrite that chunk")
        payload_bytes = sum(self._group[f"chunks/{_key(i)}"].shape[0] for i in range(self.n_chunks))
        self._group.attrs.update({"status": "complete", "payload_bytes": payload_bytes})
        self.attrs = dict(self._group.attrs)


def _committed(group: zarr.Group, n_chunks: int) -> set[int]:
    try:
        commits = group["commits"]
        chunks = group["chunks"]
    except KeyError:
        return set()
    names = set(chunks.array_keys())
    done = set()
    for name, marker in commits.groups():
        if not (name.isdigit() and len(name) == 6 and int(name) < n_chunks and name in names):
            continue
        array = chunks[name]
        if array.attrs.get("sha256") == marker.attrs.get("sha256") and array.shape == (marker.attrs.get("bytes"),):
            done.add(int(name))
    return done


def _open_existing(url: str, mode: str, storage_options: dict | None) -> zarr.Group:
    try:
        return _open_group(url, mode, storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise ArchiveError(f"no palstream archive at {url}; check the path") from None
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"cannot open archive {url}: {exc}") from None


def _validated_attrs(attrs: dict, url: str) -> dict:
    """Check the root attributes; every number later used for sizes or indexing is range-checked."""
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if attrs.get("format") != FORMAT_NAME:
        raise ArchiveError(f"{url} is not a palstream archive (format attribute is {attrs.get('format')!r})")
    if missing:
        raise ArchiveError(f"archive {url} is malformed: missing attribute(s) {', '.join(missing)}")
    if attrs["format_version"] != FORMAT_VERSION:
        raise ArchiveError(
            f"archive {url} has format version {attrs['format_version']}; this palstream reads version {FORMAT_VERSION}"
        )
    source = attrs["source"]
    try:
        if not isinstance(source, dict) or not isinstance(source.get("color"), dict):
            raise TypeError
        SourceInfo.from_dict(source)
        if Fraction(source["fps"]) <= 0:
            raise ValueError
    except (TypeError, ValueError, ZeroDivisionError):
        raise ArchiveError(f"archive {url} is malformed: its source attribute is incomplete or invalid") from None

    def check_int(value, lo, hi, what):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ArchiveError(f"archive {url} is malformed: {what} {value!r} is out of range {lo}..{hi}")

    check_int(source["width"], 1, MAX_DIMENSION, "width")
    check_int(source["height"], 1, MAX_DIMENSION, "height")
    check_int(attrs["frame_count"], 1, MAX_FRAMES, "frame_count")
    check_int(attrs["gop"], 1, MAX_GOP, "gop")
    expected = math.ceil(attrs["frame_count"] / attrs["gop"])
    if attrs["n_chunks"] != expected:
        raise ArchiveError(
            f"archive {url} is malformed: n_chunks {attrs['n_chunks']!r} does not match "
            f"{attrs['frame_count']} frames in GOPs of {attrs['gop']} ({expected})"
        )
    if attrs["status"] not in ("incomplete", "complete"):
        raise ArchiveError(f"archive {url} is malformed: status {attrs['status']!r}")
    return attrs


def _chunk_frames(attrs: dict, index: int) -> range:
    if not isinstance(index, int) or not 0 <= index < attrs["n_chunks"]:
        raise ArchiveError(f"chunk {index} does not exist; the archive has chunks 0..{attrs['n_chunks'] - 1}")
    start = index * attrs["gop"]
    return range(start, min(start + attrs["gop"], attrs["frame_count"]))


class Archive:
    """A palstream archive opened for reading (see :func:`open_archive`)."""

    def __init__(self, group: zarr.Group, url: str):
        self._group = group
        self.url = url
        self.attrs = _validated_attrs(dict(group.attrs), url)
        self.n_chunks: int = self.attrs["n_chunks"]
        self.source = SourceInfo.from_dict(self.attrs["source"])

    @property
    def complete(self) -> bool:
        return self.attrs["status"] == "complete"

    @property
    def frame_count(self) -> int:
        return self.attrs["frame_count"]

    def chunk_frames(self, index: int) -> range:
        """Frame numbers (in the source) that chunk ``index`` holds."""
        return _chunk_frames(self.attrs, index)

    def chunk_attrs(self, index: int) -> dict:
        """The chunk array's attributes (sha256, frames, first_frame, stats); {} if not written."""
        self.chunk_frames(index)
        try:
            return dict(self._group[f"chunks/{_key(index)}"].attrs)
        except KeyError:
            return {}

    def committed(self) -> set[int]:
        return _committed(self._group, self.n_chunks)

    def chunk_config(self, index: int) -> dict:
        """The encoder configuration that encoded chunk ``index`` (FORMAT.md §2.2).

        ``encoder.config`` unless ``encoder.chunk_configs`` names another one for this chunk.
        """
        self.chunk_frames(index)
        encoder = self.attrs["encoder"]
        for run in encoder.get("chunk_configs", []):
            try:
                if run["first"] <= index < run["first"] + run["count"]:
                    return dict(encoder["configs"][run["digest"]])
            except (KeyError, TypeError):
                raise ArchiveError(f"archive {self.url} is malformed: encoder.chunk_configs entry {run!r}") from None
        return dict(encoder["config"])

    def payload_bytes(self) -> int:
        """Total bytes of the written chunk payloads (from metadata; zarr overhead excluded)."""
        total = 0
        for index in range(self.n_chunks):
            try:
                total += self._group[f"chunks/{_key(index)}"].shape[0]
            except KeyError:
                continue
        return total

    def read_chunk(self, index: int) -> bytes:
        """The payload of chunk ``index``, checked against its recorded sha256.

        Raises
        ------
        DamagedChunkError
            Not written/committed, wrong size, crc32c or sha256 mismatch.
        """
        frames = self.chunk_frames(index)
        try:
            array = self._group[f"chunks/{_key(index)}"]
            marker = dict(self._group[f"commits/{_key(index)}"].attrs)
        except KeyError:
            raise DamagedChunkError(
                index, "not written (the encode did not finish); re-encode or resume the job"
            ) from None
        except (OSError, ValueError) as exc:
            raise DamagedChunkError(index, f"metadata unreadable ({exc})") from None
        sha = array.attrs.get("sha256")
        if not isinstance(array, zarr.Array) or array.ndim != 1 or array.dtype != np.uint8:
            raise DamagedChunkError(index, "stored as the wrong kind of array")
        if marker.get("sha256") != sha or array.shape != (marker.get("bytes"),):
            raise DamagedChunkError(index, "commit marker does not match the stored chunk")
        if array.attrs.get("frames") != len(frames) or array.attrs.get("first_frame") != frames.start:
            raise DamagedChunkError(index, "recorded frame range does not match the archive's GOP layout")
        if array.nchunks_initialized != 1:
            raise DamagedChunkError(index, "payload data is missing")
        try:
            payload = array[:].tobytes()
        except (ValueError, OSError) as exc:
            raise DamagedChunkError(index, f"payload unreadable ({str(exc).split('.')[0]})") from None
        if hashlib.sha256(payload).hexdigest() != sha:
            raise DamagedChunkError(index, "sha256 mismatch")
        return payload

    def decode_chunk(self, index: int) -> Frames:
        """Decode chunk ``index``; any damage or malformed payload raises :class:`DamagedChunkError`."""
        payload = self.read_chunk(index)
        try:
            frames = decode_chunk(payload)
        except BitstreamError as exc:
            raise DamagedChunkError(index, f"payload does not decode ({exc})") from None
        except MemoryError:
            # a header declaring absurd sizes; the codec should refuse it first (see BITSTREAM.md §1)
            raise DamagedChunkError(index, "payload declares frames too large to allocate") from None
        expected = (len(self.chunk_frames(index)), self.source.height, self.source.width)
        if frames.y.shape != expected:
            raise DamagedChunkError(index, f"decodes to frames of shape {frames.y.shape}, expected {expected}")
        return frames

    def verify(self) -> list[DamagedChunkError]:
        """Fixity check of every chunk (commit marker, crc32c, sha256); returns the damaged ones."""
        damaged = []
        for index in range(self.n_chunks):
            try:
                self.read_chunk(index)
            except DamagedChunkError as exc:
                damaged.append(exc)
        return damaged

    def decode(
        self, start: int = 0, stop: int | None = None, on_damaged: Callable[[DamagedChunkError], None] | None = None
    ) -> Iterator[Frames]:
        """Decode frames ``[start, stop)`` chunk by chunk.

        Parameters
        ----------
        start, stop : int
            Frame range; ``stop`` defaults to the end.
        on_damaged : callable, optional
            Called with each :class:`DamagedChunkError`; that chunk's frames are skipped and the
            others still decode. Without it the first damaged chunk raises.
        """
        stop = self.frame_count if stop is None else stop
        if not 0 <= start < stop <= self.frame_count:
            raise ArchiveError(f"frame range {start}:{stop} is outside the archive's 0:{self.frame_count}")
        gop = self.attrs["gop"]
        for index in range(start // gop, (stop - 1) // gop + 1):
            frames = self.chunk_frames(index)
            try:
                decoded = self.decode_chunk(index)
            except DamagedChunkError as exc:
                if on_damaged is None:
                    raise
                on_damaged(exc)
                continue
            yield decoded[max(start, frames.start) - frames.start : min(stop, frames.stop) - frames.start]


def open_archive(url: str, storage_options: dict | None = None) -> Archive:
    """Open an archive for reading; malformed root metadata raises :class:`ArchiveError`."""
    return Archive(_open_existing(url, "r", storage_options), str(url))
