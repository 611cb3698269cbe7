"""The palstream archive: a zarr v3 group of independently coded GOP chunks (``storage/FORMAT.md``).

Layout (``{i:06d}`` is the zero-padded chunk index)::

    zarr.json                root group; attributes describe the whole archive, sealed by a digest
    chunks/{i:06d}/          1-D uint8 array: the chunk's payload bytes (one zarr chunk, crc32c)
    commits/{i:06d}/         empty group whose attributes repeat the payload's sha256 and length,
                             and bind the chunk to the archive (digest of the root's core)

One task writes one chunk: first the array metadata (with the chunk's sha256 and statistics),
then its data, and last its commit marker. A chunk is *committed* only when its marker exists
*and* agrees with the array's metadata, so a half-written chunk is never taken for done.
``finalize`` checks every chunk and only then sets ``status`` to ``"complete"``.

Format 4 (FORMAT.md §8) packs the chunks of a task into one object::

    chunks/zarr.json         1-D array of variable-length bytes, one zarr shard per K chunks
    chunks/c/{s}             shard s: chunks sK..sK+K-1 back to back, then zarr's shard index
    commits/{s:06d}/         the shard's commit marker: its digest and every chunk's attributes

One task writes one shard whole, then its marker: two objects for K chunks instead of 3K.

Writing goes through zarr. Reading does not: every ``zarr.json`` is read as bytes with a size
ceiling, parsed as strict JSON and compared field by field with what FORMAT.md allows, because
zarr would honour whatever a damaged document declares (a gzip codec, a shape of 10^12).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import struct
import uuid
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Literal

import google_crc32c
import numpy as np
import zarr
import zarr.codecs

import palstream
from palstream.codec import BitstreamError, EncodedChunk, EncoderConfig, ModeStats, decode_chunk
from palstream.codec.chunk import HEADER, MAGIC
from palstream.errors import ArchiveError, DamagedChunkError, PalstreamError
from palstream.frames import Frames
from palstream.io import (
    INDEX_COLUMNS,
    KeptStream,
    SideStreams,
    SourceInfo,
    read_side_streams,
)
from palstream.storage import Location, rename_exchange

FORMAT_NAME = "palstream"
FORMAT_VERSION = 3  # what a writer of one object per chunk writes (``palstream encode``)
SHARDED_VERSION = 4  # one object per K chunks (FORMAT.md §8): what the batch job writes
READABLE_VERSIONS = (1, 2, 3, 4)
STREAM_CHUNK_BYTES = 16 << 20  # zarr chunk of a kept stream's packet bytes (FORMAT.md §3.1)
INDEX_CHUNK_ROWS = 1 << 16  # zarr chunk of a kept stream's packet index
# Sanity limits for declared sizes: reading a malformed archive must fail cleanly, not allocate wildly.
MAX_DIMENSION = 16384
MAX_FRAMES = 10**9
MAX_GOP = 1024
MAX_ROOT_JSON = 64 << 20  # root zarr.json; tuner runs make it grow with the number of batches
MAX_NODE_JSON = 1 << 20  # a chunk array's or commit marker's zarr.json
MAX_SHARD_CHUNKS = 1024  # chunks per shard (format 4)
MAX_SHARD_MARKER_JSON = 16 << 20  # a shard's commit marker: the attributes of up to 1024 chunks
SHARD_EMPTY = 2**64 - 1  # zarr's shard index entry of an absent inner chunk (offset and length)
MAX_JSON_DEPTH = 32  # documents of the format nest 4 deep; deeper ones are damage, refused before recursion
MAX_JSON_INT = 2**53  # RFC 8785 numbers are IEEE doubles: larger integers have no canonical form
PAYLOAD_BYTES_PER_SAMPLE = 4  # payload ceiling per coded sample (FORMAT.md §3): far above any real chunk
CTU = 64  # coded planes are padded to multiples of 64 (BITSTREAM.md §2)
TEMP_MARK = ".palstream-tmp-"
_REQUIRED_ATTRS = ("format", "format_version", "source", "encoder", "gop", "n_chunks", "frame_count", "status")
_CORE_ATTRS = ("format", "format_version", "source", "encoder", "gop", "n_chunks", "frame_count", "shard_chunks")
_MUTABLE_ENCODER_KEYS = ("configs", "chunk_configs")  # appended by the tuner's driver during a job
_NAMED_FIELDS = ("source", "encoder")  # the integrity record names the altered key inside these
_FOREIGN = "belongs to another archive"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_RATIO = re.compile(r"([0-9]{1,10})/([0-9]{1,10})")


def _key(index: int) -> str:
    return f"{index:06d}"


class IncompleteArchiveError(ArchiveError):
    """Chunks of an archive being finalized are not committed; ``missing`` lists them, in order."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


class _ShardError(Exception):
    """A shard's commit marker is absent (``missing``) or fails its checks: every chunk of it is damaged."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


class DamagedStreamError(ArchiveError):
    """A kept stream (audio, subtitles, an attachment: FORMAT.md §3.1) fails its checksums."""

    def __init__(self, source_index: int, reason: str):
        super().__init__(f"stream {source_index} is damaged: {reason}")
        self.source_index = source_index
        self.reason = reason


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


# -- canonical JSON and digests (FORMAT.md §5) ---------------------------------------------------


def _jcs_number(value: float) -> str:
    """A finite double as ECMAScript's Number::toString writes it (RFC 8785 §3.2.2.3)."""
    if value == 0:
        return "0"
    sign, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    assert isinstance(exponent, int)  # a finite value: not "n", "N" or "F"
    digits = "".join(map(str, digit_tuple))
    k, n = len(digits), len(digits) + exponent  # ECMAScript's k and n: value = 0.digits * 10^n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if n - 1 > 0 else '-'}{abs(n - 1)}"
    return ("-" if value < 0 else "") + text


def canonical_json(value) -> bytes:
    """``value`` serialised by the JSON Canonicalization Scheme (RFC 8785), UTF-8.

    Raises
    ------
    ValueError
        The value has no canonical form: an integer beyond 2^53, a non-finite float, a lone
        surrogate, or a type JSON lacks.
    """

    def write(v, out: list) -> None:
        if v is None or isinstance(v, bool):
            out.append({None: "null", True: "true", False: "false"}[v])
        elif isinstance(v, int):
            if abs(v) > MAX_JSON_INT:
                raise ValueError(f"integer {v} is beyond 2^53")
            out.append(str(v))
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError("non-finite number")
            out.append(_jcs_number(v))
        elif isinstance(v, str):
            out.append(json.dumps(v, ensure_ascii=False))
        elif isinstance(v, (list, tuple)):
            out.append("[")
            for i, item in enumerate(v):
                out.append("," if i else "")
                write(item, out)
            out.append("]")
        elif isinstance(v, dict):
            out.append("{")
            # RFC 8785 sorts names by their UTF-16 code units
            for i, name in enumerate(sorted(v, key=lambda s: s.encode("utf-16-be", "surrogatepass"))):
                out.append(("," if i else "") + json.dumps(name, ensure_ascii=False) + ":")
                write(v[name], out)
            out.append("}")
        else:
            raise ValueError(f"{type(v).__name__} is not JSON")

    out: list[str] = []
    write(value, out)
    return "".join(out).encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError)


def _sha256(value) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _core(attrs: dict) -> dict:
    """The root attributes fixed at creation: what every commit marker binds its chunk to."""
    core = {k: attrs[k] for k in _CORE_ATTRS if k in attrs}
    if isinstance(core.get("encoder"), dict):
        core["encoder"] = {k: v for k, v in core["encoder"].items() if k not in _MUTABLE_ENCODER_KEYS}
    return core


def _field_digests(attrs: dict) -> dict:
    fields = {}
    for name, value in attrs.items():
        if name == "integrity":
            continue
        if name in _NAMED_FIELDS and isinstance(value, dict):
            fields.update({f"{name}.{sub}": _sha256(v)[:16] for sub, v in value.items()})
        else:
            fields[name] = _sha256(value)[:16]
    return fields


def _seal(attrs: dict) -> dict:
    """``attrs`` with its integrity record (FORMAT.md §2.3) recomputed."""
    body = {k: v for k, v in attrs.items() if k != "integrity"}
    return {**body, "integrity": {"sha256": _sha256(body), "fields": _field_digests(body)}}


def _root_alteration(attrs: dict) -> str | None:
    """None when the root attributes match their integrity record, else what changed."""
    record = attrs.get("integrity")
    body = {k: v for k, v in attrs.items() if k != "integrity"}
    try:
        actual = _sha256(body)
        fields = _field_digests(body)
    except ValueError as exc:
        return f"a value has no canonical JSON form ({exc})"
    if not (
        isinstance(record, dict)
        and record.keys() == {"sha256", "fields"}
        and isinstance(record.get("sha256"), str)
        and _HEX64.fullmatch(record["sha256"])
        and isinstance(record.get("fields"), dict)
        and all(isinstance(v, str) and _HEX16.fullmatch(v) for v in record["fields"].values())
    ):
        return "its integrity record is missing or damaged"
    recorded = record["fields"]
    changed = [k for k in fields if k in recorded and recorded[k] != fields[k]]
    added = [k for k in fields if k not in recorded]
    removed = [k for k in recorded if k not in fields]
    if record["sha256"] == actual:
        if changed or added or removed:
            return "its integrity record is damaged (the field digests disagree; the attributes match the main digest)"
        return None
    parts = [f"{_names(names)} {what}" for names, what in ((changed, "changed"), (added, "added"), (removed, "removed")) if names]
    return "; ".join(parts) or "its integrity digest does not match (the digest itself is damaged)"


def _names(names: list[str]) -> str:
    """Attribute names for a one-line message: odd ones escaped, long lists cut."""
    shown = [n if n.isprintable() and len(n) <= 40 else _show(n) for n in names[:6]]
    return ", ".join(shown) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


# -- raw, bounded reading ------------------------------------------------------------------------


class _Store:
    """Bytes of an archive's objects through fsspec, each read bounded by a ceiling."""

    def __init__(self, location: Location):
        try:
            self.fs, self.root = location.filesystem()
        except PalstreamError as exc:
            raise ArchiveError(f"archive: {exc}") from None
        self.local = location.is_local
        self.seen: dict[str, tuple[str, int]] | None = None  # when a dict: SHA-256 and size of each object read whole

    def read(self, key: str, limit: int) -> bytes | None:
        """The bytes of ``key``, None if absent: on object storage one ranged GET of at most
        ``limit + 1`` bytes; a local file is sized first (free there), so no buffer of ``limit``
        bytes is ever allocated for it.

        Raises
        ------
        ValueError
            The object is larger than ``limit`` bytes.
        OSError
            It cannot be read.
        """
        path = f"{self.root}/{key}"
        try:
            end = limit + 1
            if self.local:
                end = min(end, self.fs.size(path) + 1)  # + 1: a file that grew since shows it
            data = self.fs.cat_file(path, start=0, end=end)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise OSError(errno.EISDIR, "a folder where an object belongs") from None
        if len(data) > limit:
            raise ValueError(f"{key} holds more than the {limit} bytes allowed")
        if self.seen is not None:
            self.seen[key] = (hashlib.sha256(data).hexdigest(), len(data))
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes | None:
        """``length`` bytes of ``key`` from ``start`` (fewer where it ends sooner; None if absent):
        one ranged GET on object storage."""
        try:
            return self.fs.cat_file(f"{self.root}/{key}", start=start, end=start + length)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise OSError(errno.EISDIR, "a folder where an object belongs") from None

    def delete(self, key: str) -> None:
        """Remove the object or folder ``key`` if it is there."""
        path = f"{self.root}/{key}"
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def put(self, key: str, data: bytes, create: bool = False) -> bool:
        """Write ``key`` (one PUT); with ``create``, only if absent (``O_EXCL`` locally,
        ``If-None-Match: *`` on S3). False when ``create`` found the object there already."""
        path = f"{self.root}/{key}"
        mode = "create" if create else "overwrite"
        try:
            try:
                self.fs.pipe_file(path, data, mode=mode)
            except FileNotFoundError:  # a local folder not made yet (object stores have none)
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(path, data, mode=mode)
        except FileExistsError:
            return False
        return True

    def names(self, key: str) -> list[str]:
        """Names directly under the folder/prefix ``key`` ([] if absent)."""
        self.fs.invalidate_cache(f"{self.root}/{key}")
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.root}/{key}", detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(data: bytes, limit: int) -> dict:
    """A zarr.json document as a dict; ValueError for anything but a strict JSON object."""
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), parse_float=_finite, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    level: list[dict | list] = [doc]
    depth = 0
    while level:  # iterative, so the depth check itself cannot overflow the stack
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
    return doc


def _show(value) -> str:
    """A value for a one-line message, however large."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _same(a, b) -> bool:
    """JSON equality that also compares types (``3.0`` is not ``3``, ``true`` is not ``1``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _is_int(value, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _node_attributes(doc: dict, node_type: str) -> dict:
    """The attributes of a zarr v3 group document, after checking it is exactly a group."""
    extra = set(doc) - {"zarr_format", "node_type", "attributes", "consolidated_metadata"}
    if extra:
        raise ValueError(f"unexpected key(s) {_show(sorted(extra))}")
    if not _same(doc.get("zarr_format"), 3) or not _same(doc.get("node_type"), node_type):
        raise ValueError(f"not a zarr v3 {node_type}")
    if doc.get("consolidated_metadata") is not None:
        raise ValueError("consolidated metadata is not part of the format")
    if not isinstance(doc.get("attributes"), dict):
        raise ValueError("its attributes are not an object")
    return doc["attributes"]


def _array_document(length, attributes: dict | None = None) -> dict:
    """The one chunk-array document FORMAT.md §3 allows (keys in zarr's order), with ``attributes``."""
    return {
        "shape": [length],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [length]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        **({} if attributes is None else {"attributes": attributes}),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _document_bytes(doc: dict) -> bytes:
    """A zarr.json document serialised as zarr writes it, so archive bytes do not depend on the writer."""
    return json.dumps(doc, indent=2).encode()


def max_payload_bytes(frames: int, width: int, height: int) -> int:
    """Largest payload FORMAT.md §3 allows for a chunk of ``frames`` frames of ``width`` x ``height``."""
    padded = (width + -width % CTU) * (height + -height % CTU)
    return HEADER.size + PAYLOAD_BYTES_PER_SAMPLE * frames * padded * 3 // 2


# -- shards (format 4, FORMAT.md §8) -------------------------------------------------------------


def _sharded_array_document(n_chunks: int, shard_chunks: int) -> dict:
    """The one ``chunks/zarr.json`` format 4 allows: zarr's sharded array of variable-length bytes."""
    return {
        "shape": [n_chunks],
        "data_type": "variable_length_bytes",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": "",
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1],
                    "codecs": [{"name": "vlen-bytes", "configuration": {}}, {"name": "crc32c"}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _folder_document(folder: str, n_chunks: int, shard_chunks: int | None) -> dict:
    """What ``chunks/zarr.json`` or ``commits/zarr.json`` must hold."""
    if folder == "chunks" and shard_chunks is not None:
        return _sharded_array_document(n_chunks, shard_chunks)
    return {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _crc(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "little")


INNER_OVERHEAD = 12  # an inner chunk: count (1) and length as uint32, the payload, its CRC-32C
SHARD_INDEX_ENTRY = 16  # (offset, length) as uint64 per inner chunk


def _inner_chunk(payload: bytes) -> bytes:
    """One payload as zarr's vlen-bytes codec and crc32c store an inner chunk of one element."""
    body = struct.pack("<II", 1, len(payload)) + payload
    return body + _crc(body)


def _shard_index(lengths: list[int], shard_chunks: int) -> bytes:
    """The shard index (offset and size of each inner chunk, absent ones all ones) and its CRC-32C."""
    entries, offset = [], 0
    for length in lengths:
        entries.append(struct.pack("<QQ", offset, length + INNER_OVERHEAD))
        offset += length + INNER_OVERHEAD
    entries += [struct.pack("<QQ", SHARD_EMPTY, SHARD_EMPTY)] * (shard_chunks - len(lengths))
    index = b"".join(entries)
    return index + _crc(index)


def _shard_size(lengths: list[int], shard_chunks: int) -> int:
    return sum(lengths) + INNER_OVERHEAD * len(lengths) + SHARD_INDEX_ENTRY * shard_chunks + 4


def _shard_key(shard: int) -> str:
    return f"chunks/c/{shard}"


def _marker_key(shard: int) -> str:
    return f"commits/{_key(shard)}/zarr.json"


def _entry_attributes(entry: dict) -> dict:
    """A chunk's attributes as a shard marker lists them, less its length (what format 3 keeps in
    the chunk array's attributes)."""
    return {k: v for k, v in entry.items() if k != "bytes"}


def _unsealed_marker_digest(marker: dict) -> str:
    return _sha256({k: v for k, v in marker.items() if k != "marker_sha256"})


# -- root attributes ----------------------------------------------------------------------------


def _check_root(doc: dict, location: Location) -> dict:
    """The root attributes, every field checked against FORMAT.md §2 before anything uses it."""

    def bad(what: str) -> ArchiveError:
        return ArchiveError(f"archive {location} is malformed: {what}; restore zarr.json from a copy or re-encode")

    try:
        attrs = _node_attributes(doc, "group")
    except ValueError as exc:
        raise bad(f"zarr.json {exc}") from None
    if attrs.get("format") != FORMAT_NAME:
        raise ArchiveError(f"{location} is not a palstream archive (format attribute is {_show(attrs.get('format'))})")
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise bad(f"missing attribute(s) {', '.join(missing)}")
    version = attrs["format_version"]
    if not _is_int(version, 0, MAX_JSON_INT) or version not in READABLE_VERSIONS:
        raise ArchiveError(
            f"archive {location} has format version {_show(version)}; this palstream reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: use the palstream that wrote it"
        )

    def check_int(value, lo, hi, what):
        if not _is_int(value, lo, hi):
            raise bad(f"{what} {_show(value)} is out of range {lo}..{hi}")

    source = attrs["source"]
    if not isinstance(source, dict):
        raise bad("its source attribute is not an object")
    for name in ("url", "name", "sha256", "fps", "time_base", "pix_fmt"):
        if not isinstance(source.get(name), str):
            raise bad(f"source.{name} is missing or not a string")
    if not _HEX64.fullmatch(source["sha256"]):
        raise bad("source.sha256 is not 64 lowercase hex digits")
    fps, time_base = _RATIO.fullmatch(source["fps"]), _RATIO.fullmatch(source["time_base"])
    if not fps or int(fps[1]) == 0 or int(fps[2]) == 0:
        raise bad(f"source.fps {_show(source['fps'])} is not a positive num/den")
    if not time_base or int(time_base[2]) == 0:
        raise bad(f"source.time_base {_show(source['time_base'])} is not num/den")
    color = source.get("color")
    if not isinstance(color, dict) or not all(isinstance(v, str) for v in color.values()):
        raise bad("source.color is not an object of names")
    check_int(source.get("size_bytes"), 0, MAX_JSON_INT, "source.size_bytes")
    check_int(source.get("width"), 1, MAX_DIMENSION, "width")
    check_int(source.get("height"), 1, MAX_DIMENSION, "height")
    check_int(attrs["frame_count"], 1, MAX_FRAMES, "frame_count")
    if not _same(source.get("frame_count"), attrs["frame_count"]):
        raise bad(f"source.frame_count {_show(source.get('frame_count'))} differs from frame_count")
    check_int(attrs["gop"], 1, MAX_GOP, "gop")
    expected = math.ceil(attrs["frame_count"] / attrs["gop"])
    if not _same(attrs["n_chunks"], expected):
        raise bad(
            f"n_chunks {_show(attrs['n_chunks'])} does not match {attrs['frame_count']} frames in GOPs of {attrs['gop']} ({expected})"
        )
    if attrs["status"] not in ("incomplete", "complete") or not isinstance(attrs["status"], str):
        raise bad(f"status {_show(attrs['status'])} is neither incomplete nor complete")
    if attrs["status"] == "complete" or "payload_bytes" in attrs:
        check_int(attrs.get("payload_bytes"), expected, MAX_JSON_INT, "payload_bytes")
    if version == SHARDED_VERSION:
        check_int(attrs.get("shard_chunks"), 1, MAX_SHARD_CHUNKS, "shard_chunks")
    elif "shard_chunks" in attrs:
        raise bad(f"shard_chunks is set in a format-{version} archive (only format 4 has shards)")
    _check_encoder(attrs["encoder"], expected, bad)
    _check_side_attributes(attrs, bad)
    return attrs


def _check_side_attributes(attrs: dict, bad: Callable[[str], ArchiveError]) -> None:
    """The format-3 attributes (FORMAT.md §2.1 timing, §2.4), checked where present."""
    timing = attrs["source"].get("timing")
    if timing is not None:
        runs = timing.get("pts_runs") if isinstance(timing, dict) else None
        time_base = timing.get("time_base") if isinstance(timing, dict) else None
        ratio = _RATIO.fullmatch(time_base) if isinstance(time_base, str) else None
        if not (
            ratio
            and int(ratio[2]) != 0
            and isinstance(runs, list)
            and all(isinstance(r, list) and len(r) == 3 and all(_is_int(v, -MAX_JSON_INT, MAX_JSON_INT) for v in r) for r in runs)
            and all(r[2] >= 1 for r in runs)
            and sum(r[2] for r in runs) == attrs["frame_count"]
        ):
            raise bad("source.timing is not {time_base, pts_runs} covering every frame")
    for key, kind in (("container", dict), ("chapters", list), ("streams", list), ("dropped_streams", list)):
        if key in attrs and not isinstance(attrs[key], kind):
            raise bad(f"{key} is not a JSON {'object' if kind is dict else 'array'}")
    for number, stream in enumerate(attrs.get("streams", [])):
        if not (
            isinstance(stream, dict)
            and isinstance(stream.get("type"), str)
            and isinstance(stream.get("codec"), str)
            and _is_int(stream.get("source_index"), 0, MAX_JSON_INT)
            and _is_int(stream.get("bytes"), 0, MAX_JSON_INT)
            and _is_int(stream.get("packets"), 0, MAX_JSON_INT)
            and isinstance(stream.get("data_sha256"), str)
            and _HEX64.fullmatch(stream["data_sha256"])
            and isinstance(stream.get("index_sha256"), str)
            and _HEX64.fullmatch(stream["index_sha256"])
        ):
            raise bad(f"streams[{number}] lacks type, codec, source_index, bytes, packets or its digests")


def _check_encoder(encoder, n_chunks: int, bad: Callable[[str], ArchiveError]) -> None:
    if not isinstance(encoder, dict):
        raise bad("its encoder attribute is not an object")
    if not isinstance(encoder.get("palstream_version"), str) or not isinstance(encoder.get("config_digest"), str):
        raise bad("encoder.palstream_version or encoder.config_digest is missing or not a string")
    if not isinstance(encoder.get("config"), dict):
        raise bad("encoder.config is not an object")
    generator = encoder.get("palette_generator")
    if not (
        isinstance(generator, dict)
        and isinstance(generator.get("name"), str)
        and (generator.get("weights_hash") is None or isinstance(generator["weights_hash"], str))
    ):
        raise bad("encoder.palette_generator is not {name, weights_hash}")
    configs = encoder.get("configs", {})
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise bad("encoder.configs is not an object of configurations")
    runs = encoder.get("chunk_configs", [])
    if not isinstance(runs, list):
        raise bad("encoder.chunk_configs is not a list")
    end = 0
    for run in runs:
        if not (
            isinstance(run, dict)
            and _is_int(run.get("first"), end, n_chunks - 1)
            and _is_int(run.get("count"), 1, n_chunks - run["first"])
            and isinstance(run.get("digest"), str)
            and run["digest"] in configs
        ):
            raise bad(f"encoder.chunk_configs entry {_show(run)} is invalid, overlaps or is out of order")
        end = run["first"] + run["count"]


def _chunk_frames(attrs: dict, index: int) -> range:
    if not _is_int(index, 0, attrs["n_chunks"] - 1):
        raise ArchiveError(f"chunk {index} does not exist; the archive has chunks 0..{attrs['n_chunks'] - 1}")
    start = index * attrs["gop"]
    return range(start, min(start + attrs["gop"], attrs["frame_count"]))


def _load_root(store: _Store, location: Location, force: bool) -> tuple[dict, str | None]:
    """Validated root attributes and, when ``force`` let an altered root through, what changed."""
    try:
        data = store.read("zarr.json", MAX_ROOT_JSON)
    except OSError as exc:
        raise ArchiveError(f"cannot open archive {location}: {exc.strerror or exc}; check the path and permissions") from None
    except ValueError as exc:
        raise ArchiveError(f"archive {location} is malformed: {exc}; restore zarr.json from a copy or re-encode") from None
    if data is None:
        raise ArchiveError(f"no palstream archive at {location}; check the path")
    try:
        doc = _parse(data, MAX_ROOT_JSON)
    except ValueError as exc:
        raise ArchiveError(f"archive {location} is malformed: zarr.json {exc}; restore it from a copy or re-encode") from None
    altered = None
    attrs = doc.get("attributes")
    # Checked whenever present, whatever format_version says: a version edited down to 1 is caught.
    if isinstance(attrs, dict) and (attrs.get("format_version") in (2, 3, 4) or "integrity" in attrs):
        altered = _root_alteration(attrs)
        # An altered root cannot be trusted for sizes or provenance: refuse it before its values are used.
        if altered and not force:
            raise ArchiveError(
                f"archive {location}: root metadata altered: {altered}; restore zarr.json from a copy or re-encode "
                "(--force, or force=True, reads it anyway)"
            )
    return _check_root(doc, location), altered


# -- reading ------------------------------------------------------------------------------------


class Archive:
    """A palstream archive opened for reading (see :func:`open_archive`).

    Every read is bounded and checked: chunk metadata must be exactly the documented zarr array,
    payload lengths are capped by the frame size, and in format 2 each commit marker binds its
    chunk to the root's digest.
    """

    def __init__(self, location: Location, force: bool = False):
        self.location = location
        self._store = _Store(location)
        self.attrs, self.root_altered = _load_root(self._store, location, force)
        self.n_chunks: int = self.attrs["n_chunks"]
        self.shard_chunks: int | None = self.attrs.get("shard_chunks")  # format 4 only
        self._last_marker: tuple[int, dict] | None = None  # read_chunk's one-shard cache (decode reads chunk after chunk)
        self.source = SourceInfo.from_dict(self.attrs["source"])
        self._core_sha256 = _sha256(_core(self.attrs)) if self.root_protected and not self.root_altered else None
        # Before any loop over n_chunks: a root replaced whole, digest and all, claims a layout the
        # chunks do not share (a forged n_chunks of 10^9 would otherwise make decode run for days).
        if self._root_replaced():
            raise ArchiveError(
                f"archive {location}: root metadata altered: its core does not match the digest recorded in the "
                "commit markers; restore zarr.json from a copy or re-encode"
            )
        if self.root_altered:
            warnings.warn(f"archive {location}: root metadata altered ({self.root_altered}); read anyway because forced", stacklevel=2)

    @property
    def complete(self) -> bool:
        return self.attrs["status"] == "complete"

    @property
    def frame_count(self) -> int:
        return self.attrs["frame_count"]

    @property
    def root_protected(self) -> bool:
        """Whether the root attributes carry an integrity digest (format version 2 and later)."""
        return self.attrs["format_version"] >= 2

    def chunk_frames(self, index: int) -> range:
        """Frame numbers (in the source) that chunk ``index`` holds."""
        return _chunk_frames(self.attrs, index)

    @property
    def sharded(self) -> bool:
        """Whether chunks are stored K to an object (format 4, FORMAT.md §8)."""
        return self.shard_chunks is not None

    @property
    def n_shards(self) -> int:
        """Number of shards (format 4)."""
        assert self.shard_chunks is not None
        return -(-self.n_chunks // self.shard_chunks)

    def shard_range(self, shard: int) -> range:
        """The chunks shard ``shard`` holds (format 4)."""
        assert self.shard_chunks is not None
        return range(shard * self.shard_chunks, min((shard + 1) * self.shard_chunks, self.n_chunks))

    def _shard_marker(self, shard: int) -> dict:
        """The commit marker of ``shard``, every field checked (FORMAT.md §8.3).

        Raises
        ------
        _ShardError
            Absent (``missing``), unreadable, malformed, or not this shard's of this archive.
        """
        try:
            data = self._store.read(_marker_key(shard), MAX_SHARD_MARKER_JSON)
        except OSError as exc:
            raise _ShardError(f"commit marker of shard {shard} unreadable ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise _ShardError(f"commit marker of shard {shard} oversized ({exc})") from None
        if data is None:
            raise _ShardError("not written (the encode did not finish); re-encode or resume the job", missing=True)
        try:
            marker = _node_attributes(_parse(data, MAX_SHARD_MARKER_JSON), "group")
        except ValueError as exc:
            raise _ShardError(f"commit marker of shard {shard} {exc}") from None

        def bad(what: str) -> _ShardError:
            return _ShardError(f"commit marker of shard {shard} {what}")

        chunks = self.shard_range(shard)
        entries = marker.get("chunks")
        if not _same(marker.get("shard"), shard):
            raise bad(f"names shard {_show(marker.get('shard'))}")
        if not isinstance(entries, list) or len(entries) != len(chunks):
            raise bad(f"does not list the shard's {len(chunks)} chunk(s)")
        for index, entry in zip(chunks, entries):
            frames = self.chunk_frames(index)
            ceiling = max_payload_bytes(len(frames), self.source.width, self.source.height)
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and _HEX64.fullmatch(entry["sha256"])
                and _is_int(entry.get("bytes"), 1, ceiling)
                and isinstance(entry.get("stats", {}), dict)
            ):
                raise bad(f"has no valid sha256, bytes (1..{ceiling}) or stats for chunk {index}")
            if not _same(entry.get("frames"), len(frames)) or not _same(entry.get("first_frame"), frames.start):
                raise bad(f"records a frame range for chunk {index} that does not match the archive's GOP layout")
        assert self.shard_chunks is not None
        size = _shard_size([e["bytes"] for e in entries], self.shard_chunks)
        if not _same(marker.get("bytes"), size) or not (isinstance(marker.get("sha256"), str) and _HEX64.fullmatch(marker["sha256"])):
            raise bad(f"has no valid sha256, or bytes other than the {size} its chunks add up to")
        if not self.root_altered and marker.get("core_sha256") != self._core_sha256:
            raise bad(f"{_FOREIGN} (its core_sha256 does not match the root's)")
        try:
            digest = _unsealed_marker_digest(marker)
        except ValueError as exc:
            raise bad(f"has no canonical form ({exc})") from None
        if marker.get("marker_sha256") != digest:
            raise bad("is altered (its marker_sha256 differs)")
        return marker

    def _shard_payload(self, index: int, marker: dict, blob: bytes | None = None) -> bytes:
        """The payload of chunk ``index`` from its shard: one ranged read, or a slice of ``blob``
        (the whole shard object), checked (FORMAT.md §8.4)."""
        assert self.shard_chunks is not None
        shard, position = divmod(index, self.shard_chunks)
        lengths = [entry["bytes"] for entry in marker["chunks"]]
        length = lengths[position]
        offset = sum(lengths[:position]) + INNER_OVERHEAD * position
        if blob is None:
            try:
                inner = self._store.read_range(_shard_key(shard), offset, length + INNER_OVERHEAD)
            except OSError as exc:
                raise DamagedChunkError(index, f"shard {shard} unreadable ({exc.strerror or exc})") from None
            if inner is None:
                raise DamagedChunkError(index, f"shard {shard} object is missing")
        else:
            inner = blob[offset : offset + length + INNER_OVERHEAD]
        if len(inner) != length + INNER_OVERHEAD:
            raise DamagedChunkError(index, f"shard {shard} object ends before this chunk's {length + INNER_OVERHEAD} bytes at {offset}")
        if inner[:8] != struct.pack("<II", 1, length):
            raise DamagedChunkError(index, f"its inner chunk header in shard {shard} does not declare one payload of {length} bytes")
        if _crc(inner[:-4]) != inner[-4:]:
            raise DamagedChunkError(index, "crc32c mismatch")
        payload = inner[8:-4]
        if hashlib.sha256(payload).hexdigest() != marker["chunks"][position]["sha256"]:
            raise DamagedChunkError(index, "sha256 mismatch")
        self._check_header(index, payload)
        return payload

    def _check_shard(self, shard: int) -> tuple[dict[int, bytes], list[DamagedChunkError], bool]:
        """Every chunk of ``shard`` checked from its marker and one read of the whole shard
        (FORMAT.md §8.4; ``verify`` and ``finalize``).

        Returns
        -------
        tuple
            The payloads of the chunks that check, the damaged chunks, and whether the damage
            is the marker's (absent or failing: the shard is not committed).
        """
        chunks = self.shard_range(shard)
        try:
            marker = self._shard_marker(shard)
        except _ShardError as exc:
            return {}, [DamagedChunkError(i, exc.reason) for i in chunks], True

        def all_damaged(reason: str) -> tuple[dict[int, bytes], list[DamagedChunkError], bool]:
            return {}, [DamagedChunkError(i, reason) for i in chunks], False

        try:
            blob = self._store.read(_shard_key(shard), marker["bytes"])
        except OSError as exc:
            return all_damaged(f"shard {shard} unreadable ({exc.strerror or exc})")
        except ValueError:
            return all_damaged(f"shard {shard} object is larger than the {marker['bytes']} bytes of its marker")
        if blob is None:
            return all_damaged(f"shard {shard} object is missing")
        good, damaged = {}, []
        for index in chunks:
            try:
                good[index] = self._shard_payload(index, marker, blob)
            except DamagedChunkError as exc:
                damaged.append(exc)
        assert self.shard_chunks is not None
        index_bytes = _shard_index([e["bytes"] for e in marker["chunks"]], self.shard_chunks)
        if not damaged and (len(blob) != marker["bytes"] or not blob.endswith(index_bytes) or hashlib.sha256(blob).hexdigest() != marker["sha256"]):
            # Every payload checks, so the bytes that differ are the index's: palstream reads the
            # chunks from the marker, zarr (which reads the index) cannot.
            return all_damaged(f"shard {shard}'s index is damaged (its payloads check); rewrite the shard")
        return good, damaged, False

    def _chunk_meta(self, index: int) -> tuple[int, dict]:
        """Payload length and attributes of a committed chunk, every field checked (FORMAT.md §5 1-2).

        Raises
        ------
        DamagedChunkError
            Not written, or its metadata or commit marker is malformed or disagrees.
        """
        if self.sharded:
            assert self.shard_chunks is not None
            self.chunk_frames(index)  # in range
            shard, position = divmod(index, self.shard_chunks)
            try:
                entry = self._shard_marker(shard)["chunks"][position]
            except _ShardError as exc:
                raise DamagedChunkError(index, exc.reason) from None
            return entry["bytes"], _entry_attributes(entry)
        frames = self.chunk_frames(index)
        try:
            array_data = self._store.read(f"chunks/{_key(index)}/zarr.json", MAX_NODE_JSON)
            marker_data = self._store.read(f"commits/{_key(index)}/zarr.json", MAX_NODE_JSON)
        except OSError as exc:
            raise DamagedChunkError(index, f"metadata unreadable ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise DamagedChunkError(index, f"metadata oversized ({exc})") from None
        if array_data is None or marker_data is None:
            raise DamagedChunkError(index, "not written (the encode did not finish); re-encode or resume the job")
        try:
            array = _parse(array_data, MAX_NODE_JSON)
        except ValueError as exc:
            raise DamagedChunkError(index, f"array metadata {exc}") from None
        try:
            marker = _node_attributes(_parse(marker_data, MAX_NODE_JSON), "group")
        except ValueError as exc:
            raise DamagedChunkError(index, f"commit marker {exc}") from None
        attrs = array.get("attributes")
        shape = array.get("shape")
        length = shape[0] if isinstance(shape, list) and shape else None
        ceiling = max_payload_bytes(len(frames), self.source.width, self.source.height)
        if not isinstance(length, int) or not _is_int(length, 1, ceiling):
            raise DamagedChunkError(index, f"declared payload length {_show(length)} is outside 1..{ceiling}")
        if not isinstance(attrs, dict) or not _same({k: v for k, v in array.items() if k != "attributes"}, _array_document(length)):
            raise DamagedChunkError(index, "array metadata is not the documented uint8/crc32c array (FORMAT.md §3)")
        if not (isinstance(attrs.get("sha256"), str) and _HEX64.fullmatch(attrs["sha256"])):
            raise DamagedChunkError(index, "array metadata has no valid sha256")
        if not _same(attrs.get("frames"), len(frames)) or not _same(attrs.get("first_frame"), frames.start):
            raise DamagedChunkError(index, "recorded frame range does not match the archive's GOP layout")
        if not isinstance(attrs.get("stats", {}), dict):
            raise DamagedChunkError(index, "array metadata stats is not an object")
        if not _same(marker.get("sha256"), attrs["sha256"]) or not _same(marker.get("bytes"), length):
            raise DamagedChunkError(index, "commit marker does not match the stored chunk")
        # Forced past an altered root, chunks are read without binding them to it. A format-2
        # marker under a format-1 root means the root was edited down to the unprotected version.
        if not self.root_altered and ("core_sha256" in marker or self.root_protected):
            if marker.get("core_sha256") != self._core_sha256:
                raise DamagedChunkError(index, f"commit marker {_FOREIGN} (its core_sha256 does not match the root's)")
        if self.root_protected:
            try:
                attrs_sha = _sha256(attrs)
            except ValueError as exc:
                raise DamagedChunkError(index, f"array attributes have no canonical form ({exc})") from None
            if marker.get("attributes_sha256") != attrs_sha:
                raise DamagedChunkError(index, "array attributes altered (attributes_sha256 of the commit marker differs)")
        return length, attrs

    def chunk_attrs(self, index: int) -> dict:
        """The chunk array's attributes (sha256, frames, first_frame, stats).

        ``{}`` when the chunk is not written or its metadata is damaged (:meth:`verify` names it).
        """
        try:
            return dict(self._chunk_meta(index)[1])
        except DamagedChunkError:
            return {}

    def is_committed(self, index: int) -> bool:
        """Whether chunk ``index`` is committed: its commit marker exists and agrees with the chunk's
        metadata (FORMAT.md §5). The one commit predicate: every other answer is built on it."""
        try:
            self._chunk_meta(index)
        except DamagedChunkError:
            return False
        return True

    def committed_chunks(self) -> dict[int, tuple[int, dict]]:
        """Payload length and attributes of every committed chunk (:meth:`is_committed`), found from
        the markers listed; each chunk's metadata and marker are read once (a catalogue's one pass)."""
        names = self._store.names("commits")
        limit = self.n_shards if self.sharded else self.n_chunks
        indices = sorted(int(n) for n in names if n.isdigit() and len(n) <= 10 and n == _key(int(n)) and int(n) < limit)
        found: dict[int, tuple[int, dict]] = {}
        if self.sharded:  # one marker per shard names all its chunks
            for shard in indices:
                try:
                    entries = self._shard_marker(shard)["chunks"]
                except _ShardError:
                    continue
                found.update((i, (e["bytes"], _entry_attributes(e))) for i, e in zip(self.shard_range(shard), entries))
            return found
        for index in indices:
            try:
                found[index] = self._chunk_meta(index)
            except DamagedChunkError:
                continue
        return found

    def committed(self) -> set[int]:
        """Indices of the committed chunks (:meth:`committed_chunks`)."""
        return set(self.committed_chunks())

    def uncommitted(self) -> list[int]:
        """Indices of the chunks not committed, in order: what a resume still has to write."""
        return sorted(set(range(self.n_chunks)) - self.committed())

    def chunk_config(self, index: int) -> dict:
        """The encoder configuration that encoded chunk ``index`` (FORMAT.md §2.2).

        ``encoder.config`` unless ``encoder.chunk_configs`` names another one for this chunk.
        """
        self.chunk_frames(index)
        encoder = self.attrs["encoder"]
        for run in encoder.get("chunk_configs", []):
            if run["first"] <= index < run["first"] + run["count"]:
                return dict(encoder["configs"][run["digest"]])
        return dict(encoder["config"])

    def payload_bytes(self) -> int:
        """Total bytes of the committed chunk payloads (from metadata; zarr overhead excluded)."""
        return sum(length for length, _ in self.committed_chunks().values())

    def read_chunk(self, index: int) -> bytes:
        """The payload of chunk ``index``, checked against its metadata, crc32c and sha256.

        Raises
        ------
        DamagedChunkError
            Not written/committed, malformed metadata, wrong size, crc32c or sha256 mismatch, or a
            payload header that disagrees with the archive's frame count and size.
        """
        if not self.sharded:
            return self._payload(index, *self._chunk_meta(index))
        assert self.shard_chunks is not None
        self.chunk_frames(index)  # in range
        shard = index // self.shard_chunks
        if self._last_marker is not None and self._last_marker[0] == shard:
            marker = self._last_marker[1]
        else:
            try:
                marker = self._shard_marker(shard)
            except _ShardError as exc:
                raise DamagedChunkError(index, exc.reason) from None
        try:
            payload = self._shard_payload(index, marker)
        except DamagedChunkError:
            self._last_marker = None  # the shard may have been rewritten since its marker was read
            raise
        self._last_marker = (shard, marker)
        return payload

    def _payload(self, index: int, length: int, attrs: dict) -> bytes:
        """The payload of chunk ``index`` whose metadata :meth:`_chunk_meta` gave, checked (FORMAT.md §5 step 3)."""
        try:
            stored = self._store.read(f"chunks/{_key(index)}/c/0", length + 4)
        except OSError as exc:
            raise DamagedChunkError(index, f"payload unreadable ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise DamagedChunkError(index, f"payload object oversized ({exc})") from None
        if stored is None:
            raise DamagedChunkError(index, "payload data is missing")
        if len(stored) != length + 4:
            raise DamagedChunkError(index, f"payload object holds {len(stored)} bytes, expected {length + 4}")
        payload = stored[:length]
        if google_crc32c.value(payload).to_bytes(4, "little") != stored[length:]:
            raise DamagedChunkError(index, "crc32c mismatch")
        if hashlib.sha256(payload).hexdigest() != attrs["sha256"]:
            raise DamagedChunkError(index, "sha256 mismatch")
        self._check_header(index, payload)
        return payload

    def _check_header(self, index: int, payload: bytes) -> None:
        """The payload header must declare this chunk's frames and size (FORMAT.md §3), so the
        decoder never sizes its work by a header the archive contradicts."""
        if len(payload) < HEADER.size or payload[:4] != MAGIC:
            raise DamagedChunkError(index, "payload is not a palstream chunk (no PSC1 header)")
        frames, width, height = HEADER.unpack_from(payload)[3:6]
        expected = (len(self.chunk_frames(index)), self.source.width, self.source.height)
        if (frames, width, height) != expected:
            raise DamagedChunkError(
                index, f"payload header declares {frames} frames of {width}x{height}, the archive {expected[0]} of {expected[1]}x{expected[2]}"
            )

    def decode_chunk(self, index: int, modes: ModeStats | None = None) -> Frames:
        """Decode chunk ``index``; any damage or malformed payload raises :class:`DamagedChunkError`.
        ``modes`` receives its leaves' mode shares (``palstream.codec.modes``)."""
        payload = self.read_chunk(index)
        try:
            frames = decode_chunk(payload, modes=modes)
        except BitstreamError as exc:
            raise DamagedChunkError(index, f"payload does not decode ({exc})") from None
        expected = (len(self.chunk_frames(index)), self.source.height, self.source.width)
        if frames.y.shape != expected:
            raise DamagedChunkError(index, f"decodes to frames of shape {frames.y.shape}, expected {expected}")
        return frames

    def verify(self) -> list[DamagedChunkError]:
        """Fixity check of every chunk (metadata, commit marker, crc32c, sha256); returns the damaged ones.

        A format-1 archive, whose root has no digest, is checked too, with a warning that changes
        to its root metadata cannot be detected.

        Raises
        ------
        ArchiveError
            The root metadata was altered (opened with ``force``), or the ``chunks`` or
            ``commits`` group document is damaged.
        """
        if self.root_altered:
            raise ArchiveError(f"archive {self.location}: root metadata altered: {self.root_altered}; restore zarr.json from a copy or re-encode")
        if not self.root_protected:
            warnings.warn(
                f"archive {self.location} is format version 1: its root metadata is unprotected (no digest), "
                "so changes to it cannot be detected; re-encode it to protect it",
                stacklevel=2,
            )
        self._check_groups()
        damaged = []
        if self.sharded:
            for shard in range(self.n_shards):
                damaged += self._check_shard(shard)[1]
            return damaged
        for index in range(self.n_chunks):
            try:
                self.read_chunk(index)
            except DamagedChunkError as exc:
                damaged.append(exc)
        return damaged

    def _check_groups(self) -> None:
        """The ``chunks`` and ``commits`` group documents must be empty zarr groups (FORMAT.md §1);
        in format 4, ``chunks`` is the sharded array of §8.1."""
        for folder in ("chunks", "commits"):
            expected = _folder_document(folder, self.n_chunks, self.shard_chunks)
            array = expected["node_type"] == "array"
            try:
                data = self._store.read(f"{folder}/zarr.json", MAX_NODE_JSON)
                if data is None:
                    raise ValueError("missing")
                doc = _parse(data, MAX_NODE_JSON)
                if not (_same(doc, expected) if array else _node_attributes(doc, "group") == {}):
                    raise ValueError(f"not {'the sharded array of FORMAT.md §8.1' if array else 'an empty group'}")
            except (OSError, ValueError) as exc:
                raise ArchiveError(
                    f"archive {self.location}: {folder}/zarr.json is damaged ({exc}); restore it as "
                    f"{json.dumps(expected, separators=(', ', ': '))}"
                ) from None

    @property
    def streams(self) -> list[dict]:
        """Descriptions of the kept streams besides the video (FORMAT.md §2.4); [] when none."""
        return [dict(s) for s in self.attrs.get("streams", [])]

    def _stream_array(self, number: int, name: str, shape: tuple, dtype: str):
        """Kept stream ``number``'s zarr array ``name``, after checking it has the declared shape."""
        source_index = self.attrs["streams"][number]["source_index"]
        try:
            array = _open_group(self.location, "r")[f"streams/{_key(number)}/{name}"]
        except Exception as exc:  # zarr and the stores raise many kinds for damaged objects
            raise DamagedStreamError(source_index, f"its {name} array does not open ({type(exc).__name__}: {_show(str(exc))})") from None
        if not isinstance(array, zarr.Array) or tuple(array.shape) != shape or array.dtype != np.dtype(dtype):
            raise DamagedStreamError(source_index, f"its {name} array is not the {dtype}{list(shape)} the root declares")
        return array

    def _stream_region(self, number: int, array, start: int, stop: int) -> np.ndarray:
        try:
            return np.ascontiguousarray(array[start:stop])
        except Exception as exc:  # a CRC-32C mismatch, a missing or malformed chunk object
            source_index = self.attrs["streams"][number]["source_index"]
            raise DamagedStreamError(source_index, f"bytes {start}..{stop} unreadable ({type(exc).__name__}: {_show(str(exc))})") from None

    def _stream_pieces(self, number: int) -> Iterator[bytes]:
        """Kept stream ``number``'s bytes, one zarr chunk at a time; its SHA-256 is checked at the end."""
        info = self.attrs["streams"][number]
        array = self._stream_array(number, "data", (info["bytes"],), "uint8")
        digest = hashlib.sha256()
        for start in range(0, info["bytes"], STREAM_CHUNK_BYTES):
            piece = self._stream_region(number, array, start, min(start + STREAM_CHUNK_BYTES, info["bytes"])).tobytes()
            digest.update(piece)
            yield piece
        if digest.hexdigest() != info["data_sha256"]:
            raise DamagedStreamError(info["source_index"], "sha256 mismatch of its packets")

    def read_stream(self, number: int) -> KeptStream:
        """Kept stream ``number`` (position in :attr:`streams`): its index read and checked now, its
        bytes read chunk by chunk as they are used and checked against their SHA-256 at the end.

        Raises
        ------
        DamagedStreamError
            An object is missing, malformed, or fails its CRC-32C or SHA-256 (the bytes: when the
            last of them is read).
        """
        info = self.streams[number]
        shape = (info["packets"], len(INDEX_COLUMNS))
        index = self._stream_region(number, self._stream_array(number, "index", shape, "<i8"), 0, info["packets"])
        if hashlib.sha256(index.astype("<i8").tobytes()).hexdigest() != info["index_sha256"]:
            raise DamagedStreamError(info["source_index"], "sha256 mismatch of its packet index")
        if info["type"] != "attachment" and (int(index[:, 3].sum()) != info["bytes"] or (index[:, 3] < 1).any()):
            raise DamagedStreamError(info["source_index"], "its packet sizes do not add up to its bytes")
        return KeptStream(info, index, functools.partial(self._stream_pieces, number))

    def side_streams(self, drop_streams=()) -> SideStreams | None:
        """Chapters, container tags and every kept stream (less ``drop_streams``, source indices),
        read and checked; None for an archive that records no streams (written before format 3)."""
        if "streams" not in self.attrs:
            return None
        kept = [self.read_stream(n) for n, s in enumerate(self.streams) if s["source_index"] not in set(drop_streams)]
        return SideStreams(
            dict(self.attrs.get("container", {})),
            list(self.attrs.get("chapters", [])),
            kept,
            list(self.attrs.get("dropped_streams", [])),
        )

    def verify_streams(self) -> list[DamagedStreamError]:
        """Fixity check of every kept stream (CRC-32C of each zarr chunk, SHA-256 of packets and index)."""
        damaged = []
        for number in range(len(self.streams)):
            try:
                for _ in self.read_stream(number).pieces():
                    pass
            except DamagedStreamError as exc:
                damaged.append(exc)
        return damaged

    def _root_replaced(self) -> bool:
        """Whether the first few commit markers that exist all disagree with this root's core."""
        if self._core_sha256 is None:
            return False
        names = sorted(n for n in self._store.names("commits") if n.isdigit() and len(n) <= 10)[:3]
        cores = []
        for name in names:
            try:
                data = self._store.read(f"commits/{name}/zarr.json", MAX_SHARD_MARKER_JSON if self.sharded else MAX_NODE_JSON)
                cores.append(_node_attributes(_parse(data or b"", MAX_NODE_JSON), "group").get("core_sha256"))
            except (OSError, ValueError):
                continue  # a damaged marker is that chunk's damage, named in the chunk loop
        return bool(cores) and self._core_sha256 not in cores

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


def open_archive(location: str | Location, storage_options: dict | None = None, force: bool = False) -> Archive:
    """Open an archive for reading.

    Parameters
    ----------
    location : str or Location
        Local path, fsspec URL, or a location with its storage options.
    storage_options : dict, optional
        Only for ``palstream.batch``, which still passes its options apart (removed when it moves
        to :class:`~palstream.storage.Location`).
    force : bool, default False
        Read an archive whose root metadata fails its integrity digest (with a warning).

    Raises
    ------
    ArchiveError
        No archive there, malformed root metadata, or (unless ``force``) root metadata altered:
        its integrity digest fails, or its core disagrees with the commit markers.
    """
    return Archive(Location.of(location, storage_options), force)


# -- writing ------------------------------------------------------------------------------------


def _open_group(location: Location, mode: Literal["r", "r+", "a", "w", "w-"], **kwargs) -> zarr.Group:
    return zarr.open_group(**location.zarr_args(), mode=mode, **kwargs)


def check_destination(location: Location, overwrite: bool = False) -> None:
    """Refuse an existing output (unless ``overwrite``) or an unwritable location, before any work.

    Writes and removes one empty probe object. ``overwrite`` only ever replaces an existing
    palstream archive, never an unrelated file or folder.

    Raises
    ------
    ArchiveError
        The destination exists, is not a palstream archive, or cannot be written.
    """
    try:
        fs, path = location.filesystem()
        if fs.exists(path):
            if fs.isfile(path):
                raise ArchiveError(f"{location} exists and is a file; choose another archive path")
            if fs.ls(path, detail=False):
                if not _is_palstream(fs, path):
                    raise ArchiveError(f"{location} exists and is not a palstream archive; choose another path")
                if not overwrite:
                    raise ArchiveError(f"archive {location} already exists; pass --overwrite to replace it")
        created = location.is_local and not fs.exists(path)
        if location.is_local:
            fs.makedirs(path, exist_ok=True)
        test = f"{path.rstrip('/')}/.palstream-write-test"
        fs.pipe_file(test, b"")
        fs.rm_file(test)
        if created:
            fs.rmdir(path)  # leave nothing behind until the archive is really created
    except ArchiveError:
        raise
    except PalstreamError as exc:  # no filesystem for the URL
        raise ArchiveError(f"cannot write archive: {exc}") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise ArchiveError(f"cannot write archive {location}: {reason}; choose a writable location") from None


def _is_palstream(fs, path: str) -> bool:
    try:
        doc = _parse(fs.cat_file(f"{path.rstrip('/')}/zarr.json", start=0, end=MAX_ROOT_JSON + 1), MAX_ROOT_JSON)
    except (OSError, ValueError):
        return False
    return isinstance(doc.get("attributes"), dict) and doc["attributes"].get("format") == FORMAT_NAME


def _swap_into_place(replacement: Location, location: Location) -> None:
    """Put the finished archive at ``replacement`` in place of the one at ``location`` (FORMAT.md §4.1)."""
    fs, new = replacement.filesystem()
    target = location.filesystem()[1]
    if location.is_local:
        try:
            rename_exchange(new, target)  # one atomic step: readers see the old or the new archive
        except OSError:
            # A filesystem without exchange: a crash between these renames leaves the old archive
            # at `aside` and the new at `new`, both whole; nothing is ever half replaced.
            aside = f"{new}.old"
            os.rename(target, aside)
            os.rename(new, target)
            new = aside
        fs.rm(new, recursive=True)
        return
    # Object storage has no rename. The root goes first and comes back last, so an interruption
    # leaves a prefix that is no archive at all (never a mix taken for one), and the complete new
    # archive still at `new`.
    objects = {p[len(new) :]: p for p in fs.find(new)}
    fs.rm_file(f"{target}/zarr.json")
    for rel, path in objects.items():
        if rel != "/zarr.json":
            fs.copy(path, target + rel)
    stale = [p for p in fs.find(target) if p[len(target) :] not in objects]
    if stale:
        fs.rm(stale)
    fs.copy(objects["/zarr.json"], f"{target}/zarr.json")
    fs.rm(new, recursive=True)


class _StreamSink:
    """A kept stream's bytes into its data array, a zarr chunk at a time, hashed on the way.

    The size of a copied stream is known from its index; an attachment's (``size`` None) is
    written when it is closed, from one piece."""

    def __init__(self, writer: ArchiveWriter, key: str, size: int | None):
        self.writer, self.key, self.expected = writer, key, size
        self.array = None if size is None else self._create(size)
        self.buffer = bytearray()
        self.size = 0
        self.digest = hashlib.sha256()

    def _create(self, size: int):
        return self.writer._new_array(self.key, (size,), "uint8", (STREAM_CHUNK_BYTES,))

    def add(self, piece: bytes) -> None:
        self.digest.update(piece)
        self.buffer += piece
        if self.array is not None:
            whole = len(self.buffer) - len(self.buffer) % STREAM_CHUNK_BYTES
            if whole and self.expected is not None and self.size + whole <= self.expected:
                self.array[self.size : self.size + whole] = np.frombuffer(bytes(self.buffer[:whole]), np.uint8)
                del self.buffer[:whole]
                self.size += whole

    def close(self) -> None:
        if self.array is None:  # an attachment: one piece, written whole
            self.array = self._create(len(self.buffer))
        end = self.size + len(self.buffer)
        if self.buffer and end <= self.array.shape[0]:
            self.array[self.size : end] = np.frombuffer(bytes(self.buffer), np.uint8)
        self.size = end
        self.buffer = bytearray()


class ArchiveWriter:
    """Writes an archive chunk by chunk; every chunk can be written by a different task.

    Use :meth:`create` for a new archive and :meth:`open` to resume an incomplete one. With
    ``create(..., overwrite=True)`` on an existing archive the new one is written beside it
    (``<url>.palstream-tmp-<id>``) and replaces it only in :meth:`finalize`; :meth:`abort`
    removes what this writer created and leaves the old archive untouched.
    """

    def __init__(self, location: Location, write_location: Location, created: bool):
        self.location = location
        self.write_location = write_location
        self._created = created
        self._reader = Archive(write_location)
        if not self._reader.root_protected:
            raise ArchiveError(
                f"archive {location} is format version 1, which this palstream reads but does not extend; re-encode it"
            )
        self._store = _Store(write_location)
        self.attrs = self._reader.attrs
        self.n_chunks = self.attrs["n_chunks"]
        self.shard_chunks: int | None = self._reader.shard_chunks  # None: one object per chunk (format 3)

    @functools.cached_property
    def _group(self) -> zarr.Group:
        """The archive as a zarr group, for the kept streams' arrays only: opening it costs 8
        requests on S3 (zarr looks for version-2 metadata too), which the tasks writing chunks and
        the finalize of an archive without other streams skip."""
        return _open_group(self.write_location, "r+")

    @property
    def replacing(self) -> bool:
        """Whether this writer builds a replacement beside an existing archive."""
        return self.write_location != self.location

    @classmethod
    def create(
        cls,
        location: str | Location,
        source: SourceInfo,
        config: EncoderConfig,
        generator=None,
        n_chunks: int | None = None,
        storage_options: dict | None = None,
        overwrite: bool = False,
        shard_chunks: int | None = None,
    ) -> ArchiveWriter:
        """Create an empty archive with status ``"incomplete"``.

        Parameters
        ----------
        location : str or Location
            Local path or fsspec URL of the archive (a folder / key prefix), or a location with
            its storage options.
        source : SourceInfo
            The probed source.
        config : EncoderConfig
            Recorded with its digest.
        generator : PaletteGenerator, optional
            Recorded by name and weights hash; default: the generator named in ``config``.
        n_chunks : int, optional
            Must equal ``ceil(source.frame_count / config.gop)`` (the default).
        storage_options : dict, optional
            Only for ``palstream.batch``, which still passes its options apart (removed when it
            moves to :class:`~palstream.storage.Location`).
        overwrite : bool, default False
            Replace an existing palstream archive at ``location``: the new archive is written at
            ``<location>.palstream-tmp-<id>`` and swapped in by :meth:`finalize`; until then (and
            after a failure or :meth:`abort`) the old archive stays as it was.
        shard_chunks : int, optional
            Write format 4: chunks stored ``shard_chunks`` to an object, each shard written
            whole by :meth:`write_shard` (FORMAT.md §8). Default: format 3, an object per chunk
            written by :meth:`write_chunk`.
        """
        expected = math.ceil(source.frame_count / config.gop)
        if shard_chunks is not None and not _is_int(shard_chunks, 1, MAX_SHARD_CHUNKS):
            raise ArchiveError(f"{shard_chunks!r} chunks per shard: give 1..{MAX_SHARD_CHUNKS}")
        if n_chunks is not None and n_chunks != expected:
            raise ArchiveError(
                f"{n_chunks} chunks do not fit {source.frame_count} frames in GOPs of {config.gop}; use {expected}"
            )
        location = Location.of(location, storage_options)
        check_destination(location, overwrite)
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if shard_chunks is None else SHARDED_VERSION,
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
            **({} if shard_chunks is None else {"shard_chunks": shard_chunks}),
        }
        try:
            attrs = _seal(attrs)
        except ValueError as exc:  # e.g. a file name that is not valid UTF-8 has no canonical JSON
            raise ArchiveError(f"cannot record the source of {location} in the archive ({exc}); rename the source file") from None
        write_location = location
        try:
            fs, path = location.filesystem()
            if overwrite and _is_palstream(fs, path):
                for stale in fs.glob(f"{path}{TEMP_MARK}*"):
                    fs.rm(stale, recursive=True)  # left by a killed replacement of this archive
                write_location = Location(f"{location.url.rstrip('/')}{TEMP_MARK}{uuid.uuid4().hex[:12]}", location.options)
            group = _open_group(write_location, "w", attributes=attrs)
            if shard_chunks is None:
                group.create_group("chunks")
            else:
                document = _sharded_array_document(expected, shard_chunks)
                _Store(write_location).put("chunks/zarr.json", _document_bytes(document))
            group.create_group("commits")
        except OSError as exc:
            raise ArchiveError(f"cannot write archive {location}: {exc}; choose a writable location") from None
        return cls(location, write_location, created=True)

    @classmethod
    def open(cls, location: str | Location, storage_options: dict | None = None) -> ArchiveWriter:
        """Reopen an existing archive to write its remaining chunks (resume).

        ``storage_options`` only for ``palstream.batch``, which still passes its options apart
        (removed when it moves to :class:`~palstream.storage.Location`).
        """
        location = Location.of(location, storage_options)
        return cls(location, location, created=False)

    def chunk_frames(self, index: int) -> range:
        """Frame numbers of chunk ``index`` in the source."""
        return _chunk_frames(self.attrs, index)

    def restore_groups(self) -> None:
        """Write the ``chunks`` and ``commits`` group documents where they are absent.

        zarr writes the root first, so a creation killed just after it leaves an archive that opens
        and takes chunks but that :meth:`finalize` refuses; the job's driver calls this when it
        reopens an archive. A group document that is there is left as it is (damage is ``verify``'s).
        """
        for folder in ("chunks", "commits"):
            if self._store.read(f"{folder}/zarr.json", MAX_NODE_JSON) is None:
                document = _folder_document(folder, self.n_chunks, self.shard_chunks)
                self._store.put(f"{folder}/zarr.json", _document_bytes(document), create=True)

    def write_chunk(self, index: int, encoded: EncodedChunk) -> None:
        """Store one encoded chunk: its array metadata, its data, then its commit marker, if absent.

        Three PUTs and nothing read (FORMAT.md §4). Idempotent: when the marker is there already
        (a duplicated task), it is read once; the same marker means the same payload and nothing
        more is done, another one (a stale or half-written marker) is replaced by this chunk's.
        Until then the old marker disagrees with the new metadata, so the chunk is never taken
        for committed with mixed data.
        """
        if self.shard_chunks is not None:
            raise ArchiveError(f"archive {self.location} is format 4: its chunks are written a shard at a time (write_shard)")
        payload, attributes = self._chunk_attributes(index, encoded)
        sha = attributes["sha256"]
        marker = {
            "sha256": sha,
            "bytes": len(payload),
            "core_sha256": self._reader._core_sha256,
            "attributes_sha256": _sha256(attributes),
        }
        marker_bytes = _document_bytes({"attributes": marker, "zarr_format": 3, "node_type": "group"})
        store, key = self._store, _key(index)
        store.put(f"chunks/{key}/zarr.json", _document_bytes(_array_document(len(payload), attributes)))
        store.put(f"chunks/{key}/c/0", payload + google_crc32c.value(payload).to_bytes(4, "little"))
        self._commit(f"commits/{key}/zarr.json", marker_bytes, MAX_NODE_JSON)

    def _commit(self, key: str, marker_bytes: bytes, limit: int) -> None:
        """Create the commit marker ``key`` if absent (FORMAT.md §4 step 3, §8.5 steps 3-4); one
        already there is kept if it is the same document (a duplicated task), else replaced."""
        if self._store.put(key, marker_bytes, create=True):
            return
        try:
            if self._store.read(key, limit) == marker_bytes:
                return
        except ValueError:
            pass  # an oversized marker is damage: replaced below
        self._store.put(key, marker_bytes)

    def _chunk_attributes(self, index: int, encoded: EncodedChunk) -> tuple[bytes, dict]:
        """Chunk ``index``'s payload, checked, and its attributes (FORMAT.md §3)."""
        frames = self.chunk_frames(index)
        payload = bytes(encoded.payload)
        if not payload:
            raise ArchiveError(f"chunk {index} has an empty payload; the encoder failed")
        if encoded.stats.get("frames", len(frames)) != len(frames):
            raise ArchiveError(f"chunk {index} holds {encoded.stats['frames']} frames; expected {len(frames)}")
        ceiling = max_payload_bytes(len(frames), self._reader.source.width, self._reader.source.height)
        if len(payload) > ceiling:
            raise ArchiveError(f"chunk {index} payload of {len(payload)} bytes exceeds the format's {ceiling}; the encoder failed")
        attributes = json_safe(
            {
                "sha256": hashlib.sha256(payload).hexdigest(),
                "frames": len(frames),
                "first_frame": frames.start,
                # Timings vary run to run; leaving them out keeps archive bytes reproducible.
                "stats": {k: v for k, v in encoded.stats.items() if not k.endswith("_seconds")},
            }
        )
        return payload, attributes

    def shard_range(self, shard: int) -> range:
        """The chunks shard ``shard`` holds (format 4)."""
        return self._reader.shard_range(shard)

    def write_shard(self, shard: int, encoded: list[EncodedChunk]) -> None:
        """Store every chunk of shard ``shard`` (format 4): the shard object whole, then its commit
        marker, created only if absent (FORMAT.md §8.5).

        The marker is read first (one GET, absent in the common case): a marker of other content
        (stale) is deleted before the shard is written, so no reader ever finds a marker that
        disagrees with the shard under it. Idempotent: a duplicated task writes the same bytes and
        finds the same marker.

        Parameters
        ----------
        shard : int
            0 <= shard < the number of shards.
        encoded : list of EncodedChunk
            Every chunk of the shard, in order (:meth:`shard_range`).
        """
        if self.shard_chunks is None:
            raise ArchiveError(f"archive {self.location} is format {self.attrs['format_version']}: its chunks are written one at a time (write_chunk)")
        if not _is_int(shard, 0, self._reader.n_shards - 1):
            raise ArchiveError(f"shard {shard} does not exist; the archive has shards 0..{self._reader.n_shards - 1}")
        chunks = self.shard_range(shard)
        if len(encoded) != len(chunks):
            raise ArchiveError(f"shard {shard} holds chunks {chunks.start}..{chunks.stop - 1}: {len(chunks)} chunk(s), not {len(encoded)}")
        payloads, entries = [], []
        for index, chunk in zip(chunks, encoded):
            payload, attributes = self._chunk_attributes(index, chunk)
            payloads.append(payload)
            entries.append({**attributes, "bytes": len(payload)})
        body = b"".join(map(_inner_chunk, payloads)) + _shard_index([len(p) for p in payloads], self.shard_chunks)
        marker = {
            "shard": shard,
            "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body),
            "core_sha256": self._reader._core_sha256,
            "chunks": entries,
        }
        marker["marker_sha256"] = _unsealed_marker_digest(marker)
        marker_bytes = _document_bytes({"attributes": marker, "zarr_format": 3, "node_type": "group"})
        store, key = self._store, _marker_key(shard)
        try:
            stale = store.read(key, MAX_SHARD_MARKER_JSON)
        except ValueError:
            stale = b""  # an oversized marker is damage: deleted below
        if stale is not None and stale != marker_bytes:
            store.delete(key.rsplit("/", 1)[0])
        store.put(_shard_key(shard), body)
        self._commit(key, marker_bytes, MAX_SHARD_MARKER_JSON)

    def _new_array(self, key: str, shape: tuple, dtype, chunk: tuple):
        """A new (or replaced) array of FORMAT.md §3.1: ``chunk``-sized zarr chunks, CRC-32C, no compressor."""
        chunks = tuple(max(1, min(n, c)) for n, c in zip(shape, chunk))
        return self._group.create_array(
            key,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            filters=None,
            compressors=[zarr.codecs.Crc32cCodec()],  # packets are coded already: checksum, no compressor
            fill_value=0,
            overwrite=True,
            config={"write_empty_chunks": True},
        )

    def write_streams(self, side: SideStreams) -> None:
        """Store the source's other streams, chapters and tags (FORMAT.md §2.4, §3.1), once.

        Bytes go to the arrays one zarr chunk at a time as ``side`` yields them (never a whole
        stream in memory). Idempotent: an archive that records them already is left as it is, so
        a resumed finalisation writes them exactly once. The root lists them only after every
        array is written; a writer killed before that leaves arrays the next call overwrites.

        Raises
        ------
        ArchiveError
            The source's streams changed between the pass that indexed them and this one.
        """
        if "streams" in self.attrs:
            return
        arrays, indexes = [], []
        for number, kept in enumerate(side.streams):
            index = np.ascontiguousarray(kept.index, dtype="<i8").reshape(-1, len(INDEX_COLUMNS))
            size = int(index[:, 3].sum()) if kept.info["type"] != "attachment" else None
            arrays.append((size, f"streams/{_key(number)}/data"))
            indexes.append(index)
            array = self._new_array(f"streams/{_key(number)}/index", index.shape, "<i8", (INDEX_CHUNK_ROWS, len(INDEX_COLUMNS)))
            if index.size:
                array[...] = index
        written = [_StreamSink(self, key, size) for size, key in arrays]
        for number, piece in side.pieces():
            written[number].add(piece)
        records = []
        for number, (kept, sink) in enumerate(zip(side.streams, written)):
            sink.close()
            if kept.info["type"] != "attachment" and sink.size != int(indexes[number][:, 3].sum()):
                raise ArchiveError(
                    f"stream {kept.info['source_index']} of the source gave {sink.size} bytes, its index "
                    f"{int(indexes[number][:, 3].sum())}: the source changed while it was read; encode it again"
                )
            records.append(
                {
                    **kept.info,
                    "packets": len(indexes[number]),
                    "bytes": sink.size,
                    "data_sha256": sink.digest.hexdigest(),
                    "index_sha256": hashlib.sha256(indexes[number].tobytes()).hexdigest(),
                }
            )
        try:
            self._write_root({**side.to_attributes(), "streams": json_safe(records)})
        except ValueError as exc:  # a tag without a canonical JSON form (a lone surrogate)
            raise ArchiveError(f"cannot record the streams of {self.location} ({exc}); fix the source's tags") from None

    def keep_streams(
        self, source: str | Location, audio: str = "copy", drop_streams=()
    ) -> None:
        """Read the source's other streams and :meth:`write_streams` them, unless already recorded.

        What a batch's finalisation calls, before :meth:`finalize`, with the job's source URL and options.
        """
        if "streams" not in self.attrs:
            self.write_streams(read_side_streams(source, audio, drop_streams))

    def _write_root(self, changes: dict) -> None:
        """Rewrite the root with ``changes`` and a new integrity record in one PUT: zarr's
        ``attrs.update`` writes the document once per key, and a writer killed between those
        writes left a root whose digest no longer matched (an archive refused as altered)."""
        attrs = {**self.attrs, **changes}  # zarr's key order: changed keys in place, new ones last
        attrs["integrity"] = _seal(attrs)["integrity"]
        self._store.put("zarr.json", _document_bytes({"attributes": attrs, "zarr_format": 3, "node_type": "group"}))
        self._reader = Archive(self.write_location)
        self.attrs = self._reader.attrs

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
                f"archive {self.location}: chunks {first}..{first + count - 1} already have configuration "
                f"{overlap[0]['digest']}; a chunk's configuration is decided once"
            )
        configs = {**encoder.get("configs", {}), config.digest: config.to_dict()}
        runs = sorted([*runs, run], key=lambda r: r["first"])
        self._write_root({"encoder": {**encoder, "configs": configs, "chunk_configs": runs}})

    def revoke(self, index: int) -> None:
        """Delete chunk ``index``'s commit marker, so the chunk counts as not written (and is redone).

        In format 4 the marker is its shard's: every chunk of the shard is revoked with it.
        """
        self.chunk_frames(index)  # in range
        shard = index if self.shard_chunks is None else index // self.shard_chunks
        self._store.delete(f"commits/{_key(shard)}")

    def committed(self) -> set[int]:
        """Indices of the committed chunks (:meth:`Archive.is_committed`)."""
        return self._reader.committed()

    def uncommitted(self) -> list[int]:
        """Indices of the chunks not committed, in order (:meth:`Archive.uncommitted`)."""
        return self._reader.uncommitted()

    def finalize(self) -> dict:
        """Check every chunk, mark the archive complete, (when replacing) swap it into place, and
        return its fixity record.

        One pass reads each chunk's three objects once (FORMAT.md §5 steps 0-3: what ``verify``
        checks; format 4: each shard's marker and object, §8.4); the fixity record is built from
        those same bytes, so nothing is read twice.

        Returns
        -------
        dict
            ``files``: ``{path relative to the archive: sha256}`` of every object of the archive;
            ``bytes``: their total size; ``payload_sha256`` and ``payload_bytes``: of the chunk
            payloads concatenated in chunk order.

        Raises
        ------
        IncompleteArchiveError
            Chunks are not committed (its ``missing`` lists them).
        ArchiveError
            Chunks or kept streams are damaged. In both cases the archive stays ``"incomplete"``;
            an archive being replaced stays as it was.
        """
        reader = self._reader
        seen: dict[str, tuple[str, int]] = {}
        reader._store.seen = seen
        reader._check_groups()
        missing, damaged, payload, payload_bytes = [], [], hashlib.sha256(), 0
        for shard in range(reader.n_shards) if reader.sharded else ():
            good, bad, uncommitted = reader._check_shard(shard)
            if uncommitted:  # no valid marker: a rerun writes the shard, as a missing chunk in format 3
                missing += [exc.index for exc in bad]
            else:
                damaged += bad
            for index in sorted(good):
                payload.update(good[index])
                payload_bytes += len(good[index])
        for index in range(0 if reader.sharded else self.n_chunks):
            try:
                meta = reader._chunk_meta(index)
            except DamagedChunkError:
                missing.append(index)
                continue
            try:
                chunk = reader._payload(index, *meta)
            except DamagedChunkError as exc:
                damaged.append(exc)
                continue
            payload.update(chunk)
            payload_bytes += len(chunk)
        reader._store.seen = None
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise IncompleteArchiveError(
                f"archive {self.location} lacks {len(missing)} chunk(s) ({shown}); write them, then finalize", missing
            )
        if damaged:
            raise ArchiveError(f"archive {self.location} cannot be finalized: {damaged[0]}; rewrite that chunk")
        damaged_streams = reader.verify_streams()
        if damaged_streams:
            raise ArchiveError(f"archive {self.location} cannot be finalized: {damaged_streams[0]}; re-encode it")
        self._write_root({"status": "complete", "payload_bytes": payload_bytes})
        seen.pop("zarr.json", None)  # rewritten just now
        if self.replacing:
            try:
                _swap_into_place(self.write_location, self.location)
            except OSError as exc:
                self._created = False  # the new archive may now be the only whole copy: abort() keeps it
                raise ArchiveError(
                    f"cannot replace archive {self.location} with the new one at {self.write_location}: {exc}; "
                    "move it into place by hand"
                ) from None
            self.write_location = self.location
            self._reader = Archive(self.location)
            self._store = _Store(self.location)
        self._created = False  # finished: nothing left for abort() to remove
        return {**self._fixity(seen), "payload_sha256": payload.hexdigest(), "payload_bytes": payload_bytes}

    def _fixity(self, seen: dict[str, tuple[str, int]]) -> dict:
        """SHA-256 and size of every object of the archive: those in ``seen`` from the reads that
        checked them, the others (root, kept streams) read now."""
        store = self._store
        files, total = {}, 0
        for path in sorted(store.fs.find(store.root)):
            key = path[len(store.root) + 1 :]
            if key not in seen:
                blob = store.fs.cat_file(path)
                seen[key] = (hashlib.sha256(blob).hexdigest(), len(blob))
            files[key], size = seen[key]
            total += size
        return {"files": files, "bytes": total}

    def abort(self) -> None:
        """Remove what this writer created and could not finish (best effort).

        A replacement's temporary archive goes; an archive being replaced is never touched; an
        archive reopened with :meth:`open` is left for a later resume.
        """
        if not self._created:
            return
        try:
            fs, path = self.write_location.filesystem()
            fs.rm(path, recursive=True)
        except (OSError, PalstreamError):
            pass  # the archive stays with status "incomplete", which readers report
