"""Fuzzing of the archive reader (issue 20): mutated payloads, chunk metadata and root metadata;
with ``--format 4``, shards and shard markers (FORMAT.md §8).

Each case copies a small archive, applies one mutation, and runs what a user would run on it,
``open_archive`` -> ``verify`` -> ``decode``, in a forked child with a time and memory ceiling.
The outcome is classified:

- ``detected``: an open/verify/decode error of one line, or a damaged chunk named;
- ``harmless``: verify passed and everything the reader exposes (decoded frames, root and chunk
  attributes, kept streams' packets) is identical to the unmutated archive's;
- ``UNDETECTED``: verify passed and something the reader exposes changed;
- ``resealed``: a payload changed *and* its CRC-32C, sha256 and commit marker were recomputed (a
  deliberate forgery no checksum can see): only the decoder's robustness is tested, and decoding
  to frames of the declared shape counts as a pass;
- ``TRACEBACK`` (an exception other than a one-line ``PalstreamError``), ``CRASH`` (the process
  died of a signal), ``HANG`` (over the time ceiling), ``OVER-MEMORY`` (peak RSS over 10x the
  unmutated case's, or a ``MemoryError`` under the address-space ceiling).

The last four are failures. Run from the repository root::

    .venv/bin/python -m benchmarks.fuzz_archive --cases 100000 --jobs 2
    .venv/bin/python -m benchmarks.fuzz_archive --cases 300 --seed 7 --out /tmp/fuzz.json
    .venv/bin/python -m benchmarks.fuzz_archive --format 4 --cases 300 --seed 7 --out /tmp/fuzz4.json
    .venv/bin/python -m benchmarks.fuzz_archive --seed 7 --case 123     # one case, verbosely
    .venv/bin/python -m benchmarks.fuzz_archive --merge part1.json part2.json  # runs continued with --first

The archive is tests/data/screen_37x29.mkv encoded losslessly in GOPs of 2 (three chunks; with
``--format 4``, in shards of two: ``chunks/c/0`` holds chunks 0-1, ``chunks/c/1`` chunk 2) unless
``--archive`` names an existing one (of either format). Results: a table on stdout and ``--out`` (default
``benchmarks/results/fuzz_archive.json``), listing every failing and undetected case with the
seed and index that reproduce it. Exit status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "tests" / "data" / "screen_37x29.mkv"
FAILURES = ("TRACEBACK", "CRASH", "HANG", "OVER-MEMORY")
MEMORY_FACTOR = 10
ADDRESS_SPACE_MARGIN = 4 << 30  # bytes a child may map beyond its parent: guards the machine
HUGE = ["1e400", "-1e400", "NaN", "Infinity", str(10**12), str(10**9), str(2**53 + 1), str(2**63), str(-(2**63)), "1" * 5000, "1e308", "-1"]
CODECS = [{"name": "gzip", "configuration": {"level": 9}}, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}, {"name": "blosc"}, {"name": "transpose", "configuration": {"order": [0]}}]


# -- mutations ----------------------------------------------------------------------------------


def _files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


def _raw(text: str) -> str:
    """A placeholder that survives json.dumps and is then replaced by raw (non-JSON) text."""
    return f"@@RAW:{text}@@"


def _dump(doc, rng) -> bytes:
    text = json.dumps(doc, indent=rng.choice([None, 2]))
    while "@@RAW:" in text:
        start = text.index('"@@RAW:')
        end = text.index('@@"', start)
        text = text[:start] + text[start + 7 : end] + text[end + 3 :]
    return text.encode()


def _structural(doc, rng) -> tuple[object, str]:
    """One structure-aware change of a parsed JSON document."""
    paths = list(_paths(doc))
    path, value = rng.choice(paths)
    keyed = [(p, v) for p, v in paths if p and isinstance(p[-1], str)]
    op = rng.choice(["rename", "delete", "type", "huge", "nest", "add", "number", "string", "codec"])
    if op == "rename" and keyed:
        path, value = rng.choice(keyed)
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        names = [p[-1] for p, _ in keyed]
        new = rng.choice([path[-1] + "x", path[-1].upper(), path[-1][:-1], rng.choice(names), "attributes"])
        parent[new] = parent.pop(path[-1])
        return doc, f"rename {'.'.join(map(str, path))} -> {new}"
    if op == "delete" and keyed:
        path, _ = rng.choice(keyed)
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        return doc, f"delete {'.'.join(map(str, path))}"
    if op == "type":
        new = rng.choice([str(value)[:50], [value], {"value": value}, None, True, False, 0, -1, 1.5, "", [], {}])
        return _set(doc, path, new), f"type {'.'.join(map(str, path))} -> {type(new).__name__}"
    if op == "huge":
        new = rng.choice(HUGE)
        return _set(doc, path, _raw(new)), f"huge {'.'.join(map(str, path))} = {new[:20]}"
    if op == "nest":
        depth = rng.choice([1, 2, 10, 100, 3000])
        if depth > 100:  # written as text: json.dumps itself would overflow the stack
            return _set(doc, path, _raw("[" * depth + "1" + "]" * depth)), f"nest {'.'.join(map(str, path))} x{depth}"
        new = value
        for _ in range(depth):
            new = [new] if rng.random() < 0.5 else {"a": new}
        return _set(doc, path, new), f"nest {'.'.join(map(str, path))} x{depth}"
    if op == "add":
        containers = [(p, v) for p, v in paths if isinstance(v, dict)]
        path, value = rng.choice(containers)
        name = rng.choice(["extra", "compressor", "filters", "dimension_names", "must_understand", "format", "gop"])
        value[name] = rng.choice([1, "x", None, [1], {"a": 1}, False])
        return doc, f"add {'.'.join(map(str, path + (name,)))}"
    if op == "number":
        numbers = [(p, v) for p, v in paths if type(v) in (int, float)]
        if numbers:
            path, value = rng.choice(numbers)
            new = rng.choice([value + 1, value - 1, value * 2, -value, value + 0.5, 0, float(value)])
            return _set(doc, path, new), f"number {'.'.join(map(str, path))} {value} -> {new}"
    if op == "string":
        strings = [(p, v) for p, v in paths if isinstance(v, str) and v]
        if strings:
            path, value = rng.choice(strings)
            i = rng.randrange(len(value))
            new = value[:i] + chr(rng.choice([ord(value[i]) ^ 1, 0x22, 0x5C, 0xE9, 0x1F600, 0xD800, 0x30])) + value[i + 1 :]
            return _set(doc, path, new), f"string {'.'.join(map(str, path))}"
    if op == "codec" and isinstance(doc, dict) and isinstance(doc.get("codecs"), list):
        doc["codecs"].insert(rng.randrange(len(doc["codecs"]) + 1), rng.choice(CODECS))
        return doc, "codec added"
    return _set(doc, path, None), f"null {'.'.join(map(str, path))}"


def _bytes_op(data: bytes, rng) -> tuple[bytes, str]:
    data = bytearray(data)
    op = rng.choice(["flip", "flip", "set", "insert", "delete", "truncate", "extend"]) if data else "extend"
    i = rng.randrange(len(data)) if data else 0
    if op == "flip":
        bit = rng.randrange(8)
        data[i] ^= 1 << bit
        return bytes(data), f"bit flip at {i}.{bit}"
    if op == "set":
        data[i] = rng.randrange(256)
        return bytes(data), f"byte set at {i}"
    if op == "insert":
        data[i:i] = bytes([rng.randrange(256)])
        return bytes(data), f"byte inserted at {i}"
    if op == "delete":
        del data[i]
        return bytes(data), f"byte deleted at {i}"
    if op == "truncate":
        return bytes(data[:i]), f"truncated to {i}"
    return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 100]))), "extended"


def _reseal(files: dict, index: int, payload: bytes) -> None:
    """Store ``payload`` as chunk ``index`` with every checksum and digest recomputed."""
    import google_crc32c

    from palstream.archive import _sha256

    key = f"{index:06d}"
    files[f"chunks/{key}/c/0"] = payload + google_crc32c.value(payload).to_bytes(4, "little")
    meta = json.loads(files[f"chunks/{key}/zarr.json"])
    meta["shape"] = [len(payload)]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [len(payload)]
    meta["attributes"]["sha256"] = hashlib.sha256(payload).hexdigest()
    files[f"chunks/{key}/zarr.json"] = json.dumps(meta).encode()
    marker = json.loads(files[f"commits/{key}/zarr.json"])
    marker["attributes"].update(
        sha256=meta["attributes"]["sha256"], bytes=len(payload), attributes_sha256=_sha256(meta["attributes"])
    )
    files[f"commits/{key}/zarr.json"] = json.dumps(marker).encode()


def _reseal_sharded(files: dict, index: int, payload: bytes) -> None:
    """Store ``payload`` as chunk ``index`` of a format-4 archive with its inner chunk's CRC-32C, the
    shard's index, the shard digest and the marker (entry, size, digest) recomputed."""
    from palstream.archive import INNER_OVERHEAD, _inner_chunk, _shard_index, _unsealed_marker_digest

    k = json.loads(files["zarr.json"])["attributes"]["shard_chunks"]
    shard, position = divmod(index, k)
    key = f"commits/{shard:06d}/zarr.json"
    doc = json.loads(files[key])
    marker = doc["attributes"]
    lengths = [c["bytes"] for c in marker["chunks"]]
    blob, inners, offset = files[f"chunks/c/{shard}"], [], 0
    for length in lengths:
        inners.append(blob[offset : offset + length + INNER_OVERHEAD])
        offset += length + INNER_OVERHEAD
    inners[position], lengths[position] = _inner_chunk(payload), len(payload)
    body = b"".join(inners) + _shard_index(lengths, k)
    files[f"chunks/c/{shard}"] = body
    marker["chunks"][position].update(sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    marker.update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    marker["marker_sha256"] = _unsealed_marker_digest(marker)
    files[key] = json.dumps(doc).encode()


def _sharded_payload(files: dict, index: int) -> bytes:
    k = json.loads(files["zarr.json"])["attributes"]["shard_chunks"]
    shard, position = divmod(index, k)
    lengths = [c["bytes"] for c in json.loads(files[f"commits/{shard:06d}/zarr.json"])["attributes"]["chunks"]]
    start = sum(lengths[:position]) + 12 * position + 8
    return files[f"chunks/c/{shard}"][start : start + lengths[position]]


def _mutate_document(files: dict, target: str, rng: random.Random) -> str:
    """Damage the JSON document ``target``: its bytes, or its structure written back valid."""
    if rng.random() < 0.5:
        files[target], what = _bytes_op(files[target], rng)
    else:
        doc, what = _structural(json.loads(files[target]), rng)
        files[target] = _dump(doc, rng)
    return what


def _mutate_sharded(files: dict, rng: random.Random) -> tuple[str, str]:
    """One mutation of a format-4 archive: its root, a shard, a shard's marker, the group and
    array documents, whole objects, a resealed payload, or a consistent lie across documents."""
    attrs = json.loads(files["zarr.json"])["attributes"]
    shard = rng.randrange(-(-attrs["n_chunks"] // attrs["shard_chunks"]))
    index = rng.randrange(attrs["n_chunks"])
    kept = sorted(p for p in files if p.startswith("streams/") and files[p] is not None)
    family = rng.choices(
        ["root", "shard-marker", "shard", "resealed", "groups", "objects", "attack", "streams"],
        weights=[25, 22, 20, 8, 4, 4, 7, 10 if kept else 0],
    )[0]
    target = {
        "root": "zarr.json",
        "shard-marker": f"commits/{shard:06d}/zarr.json",
        "shard": f"chunks/c/{shard}",
        "groups": rng.choice(["chunks/zarr.json", "commits/zarr.json"]),
    }.get(family)
    if family in ("root", "shard-marker", "groups"):
        return family, f"{target}: {_mutate_document(files, target, rng)}"
    if family == "shard":
        files[target], what = _bytes_op(files[target], rng)
        return family, f"{target}: {what}"
    if family == "resealed":
        payload, what = _bytes_op(_sharded_payload(files, index), rng)
        if not payload:
            payload, what = b"\0", "emptied (one byte)"
        _reseal_sharded(files, index, payload)
        return family, f"chunk {index} payload, resealed: {what}"
    if family in ("objects", "streams"):
        return _mutate_common(files, family, kept, rng)
    kind = rng.choice(["huge", "header", "n_chunks", "shard_chunks"])
    if kind == "huge":  # a marker that declares a huge chunk, sealed with its own digest
        from palstream.archive import _unsealed_marker_digest

        key = f"commits/{index // attrs['shard_chunks']:06d}/zarr.json"
        doc = json.loads(files[key])
        size = rng.choice([10**12, 10**9, 2**31])
        doc["attributes"]["chunks"][index % attrs["shard_chunks"]]["bytes"] = size
        doc["attributes"]["marker_sha256"] = _unsealed_marker_digest(doc["attributes"])
        files[key] = json.dumps(doc).encode()
        return family, f"chunk {index}: {size} bytes in a resealed marker"
    if kind == "header":
        payload = b"PSC1" + bytes([3, 1]) + bytes.fromhex("0500 0040 0040") + bytes([4, 8, 64, 0]) + (0).to_bytes(4, "little")
        _reseal_sharded(files, index, payload)
        return family, f"chunk {index}: resealed 20-byte payload declaring 5 frames of 16384x16384"
    root = json.loads(files["zarr.json"])
    if kind == "n_chunks":
        n = rng.choice([10**9, 10**6, attrs["n_chunks"] + 1])
        root["attributes"].update(n_chunks=n, frame_count=n * attrs["gop"])
        root["attributes"]["source"]["frame_count"] = n * attrs["gop"]
    else:
        root["attributes"]["shard_chunks"] = rng.choice([1, 3, 1024, 4096])
    files["zarr.json"] = json.dumps(root).encode()
    return family, f"root: {kind} changed, integrity not resealed"


def _mutate_common(files: dict, family: str, kept: list[str], rng: random.Random) -> tuple[str, str]:
    """The mutations of whole objects and of kept streams, which both formats share."""
    if family == "streams":  # a kept stream's packets, index or their array metadata
        target = rng.choice(kept)
        if target.endswith("zarr.json") and rng.random() < 0.5:
            doc, what = _structural(json.loads(files[target]), rng)
            files[target] = _dump(doc, rng)
        else:
            files[target], what = _bytes_op(files[target], rng)
        return family, f"{target}: {what}"
    path = rng.choice(sorted(files))
    op = rng.choice(["delete", "directory", "empty", "swap"])
    if op == "delete":
        files[path] = None
    elif op == "directory":
        files[path] = "dir"
    elif op == "empty":
        files[path] = b""
    else:
        other = rng.choice(sorted(p for p in files if files[p] is not None))
        files[path], files[other] = files[other], files[path]
    return family, f"{path}: {op}"


def mutate(files: dict, rng: random.Random) -> tuple[str, str]:
    """Apply one mutation to ``files`` (relative path -> bytes; None deletes); returns (family, what)."""
    if "chunks/c/0" in files:
        return _mutate_sharded(files, rng)
    chunks = sorted({p.split("/")[1] for p in files if p.startswith("chunks/") and p.count("/") >= 2})
    index = rng.choice(chunks)
    kept = sorted(p for p in files if p.startswith("streams/") and files[p] is not None)  # format 3
    family = rng.choices(
        ["root", "chunk-meta", "marker", "payload", "resealed", "groups", "objects", "attack", "streams"],
        weights=[30, 22, 14, 14, 8, 3, 4, 5, 10 if kept else 0],
    )[0]
    if family in ("streams", "objects"):
        return _mutate_common(files, family, kept, rng)
    target = {
        "root": "zarr.json",
        "chunk-meta": f"chunks/{index}/zarr.json",
        "marker": f"commits/{index}/zarr.json",
        "payload": f"chunks/{index}/c/0",
        "groups": rng.choice(["chunks/zarr.json", "commits/zarr.json"]),
    }.get(family)
    if family in ("root", "chunk-meta", "marker", "groups"):
        return family, f"{target}: {_mutate_document(files, target, rng)}"
    if family == "payload":
        files[target], what = _bytes_op(files[target], rng)
        return family, f"{target}: {what}"
    if family == "resealed":
        payload = files[f"chunks/{index}/c/0"][:-4]
        if rng.random() < 0.3:
            header = bytearray(payload[:20])
            field = rng.choice([(6, 2), (8, 2), (10, 2), (12, 1), (13, 1), (14, 1), (5, 1), (16, 4)])
            header[field[0] : field[0] + field[1]] = rng.randbytes(field[1])
            payload, what = bytes(header) + payload[20:], f"header bytes {field[0]}..{sum(field) - 1} randomised"
        else:
            payload, what = _bytes_op(payload, rng)
        _reseal(files, int(index), payload)
        return family, f"chunk {index} payload, resealed: {what}"
    return family, _attack(files, index, rng)


def _attack(files: dict, index: str, rng) -> str:
    """The issue's hand-made cases, with random sizes: consistent lies across documents."""
    kind = rng.choice(["shape", "gzip", "n_chunks", "header", "root-swap-version"])
    meta = json.loads(files[f"chunks/{index}/zarr.json"])
    marker = json.loads(files[f"commits/{index}/zarr.json"])
    if kind in ("shape", "gzip"):
        size = rng.choice([10**12, 10**9, 2**31, len(files[f"chunks/{index}/c/0"]) - 4 + rng.randrange(1, 1000)])
        if kind == "gzip":
            meta["codecs"] = [{"name": "bytes"}, rng.choice(CODECS)]
            size = len(files[f"chunks/{index}/c/0"])
        meta["shape"] = [size]
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [size]
        marker["attributes"]["bytes"] = size
        files[f"chunks/{index}/zarr.json"] = json.dumps(meta).encode()
        files[f"commits/{index}/zarr.json"] = json.dumps(marker).encode()
        return f"chunk {index}: {kind} {size} with a matching marker"
    root = json.loads(files["zarr.json"])
    attrs = root["attributes"]
    if kind == "n_chunks":
        n = rng.choice([10**9, 10**6, attrs["n_chunks"] + 1])
        attrs.update(n_chunks=n, frame_count=n * attrs["gop"])
        attrs["source"]["frame_count"] = n * attrs["gop"]
        files["zarr.json"] = json.dumps(root).encode()
        return f"root: n_chunks {n} with a consistent frame_count"
    if kind == "header":
        payload = b"PSC1" + bytes([3, 1]) + bytes.fromhex("0500 0040 0040") + bytes([4, 8, 64, 0]) + (0).to_bytes(4, "little")
        _reseal(files, int(index), payload)
        return f"chunk {index}: resealed 20-byte payload declaring 5 frames of 16384x16384"
    attrs["format_version"] = 1
    attrs.pop("integrity", None)
    attrs["source"]["fps"] = rng.choice(["30/1", "1/1", "1000000/1"])
    files["zarr.json"] = json.dumps(root).encode()
    return "root: integrity removed, version set to 1, fps changed"


# -- running one case ---------------------------------------------------------------------------


def _materialise(files: dict, where: Path) -> None:
    for rel, data in files.items():
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data == "dir":
            path.mkdir(exist_ok=True)
        elif data is not None:
            path.write_bytes(data)


def observe(url: str) -> dict:
    """Open, verify and decode an archive as a user would; what the reader exposes, or the error."""
    import warnings

    from palstream.archive import canonical_json, open_archive
    from palstream.errors import PalstreamError

    stage = "open"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive = open_archive(url)
            stage = "verify"
            damaged = archive.verify() + archive.verify_streams()
            if damaged:
                return {"outcome": "detected", "stage": stage, "message": str(damaged[0])}
            if not archive.complete:
                return {"outcome": "detected", "stage": stage, "message": "archive is incomplete"}
            stage = "decode"
            digest = hashlib.sha256(canonical_json(archive.attrs))
            for i in range(archive.n_chunks):
                digest.update(canonical_json(archive.chunk_attrs(i)))
            side = archive.side_streams()  # format 3: the kept streams' packets, index and description
            for kept in side.streams if side is not None else []:
                digest.update(canonical_json(kept.info) + kept.data + kept.index.tobytes())
            decoded_damage = []
            for frames in archive.decode(on_damaged=decoded_damage.append):
                for plane in (frames.y, frames.u, frames.v):
                    digest.update(plane.tobytes())
            if decoded_damage:
                return {"outcome": "detected", "stage": stage, "message": str(decoded_damage[0])}
            return {"outcome": "decoded", "signature": digest.hexdigest()}
    except PalstreamError as exc:
        message = str(exc)
        if "\n" in message or len(message) > 2000:
            return {"outcome": "TRACEBACK", "stage": stage, "message": "multi-line or huge error: " + message[:300]}
        return {"outcome": "detected", "stage": stage, "message": message}
    except MemoryError:
        return {"outcome": "OVER-MEMORY", "stage": stage, "message": "MemoryError"}
    except BaseException:
        return {"outcome": "TRACEBACK", "stage": stage, "message": traceback.format_exc()[-1500:]}


def _case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def run_case(base_files: dict, seed: int, index: int, workdir: Path, timeout: float, limit_as: int | None) -> dict:
    """Mutate, then observe in a forked child under the ceilings; the parent never runs reader code."""
    rng = _case_rng(seed, index)
    files = dict(base_files)
    family, what = mutate(files, rng) if index >= 0 else ("none", "unmutated")
    where = workdir / f"case-{index}"
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: mutate on disk, observe, report, exit without cleanup handlers
        try:
            os.close(read_end)
            if limit_as:
                resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
            _materialise(files, where)
            result = observe(str(where))
        except BaseException:
            result = {"outcome": "TRACEBACK", "stage": "harness", "message": traceback.format_exc()[-1500:]}
        with os.fdopen(write_end, "wb") as out:
            out.write(json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks, status, usage, timed_out = [], None, None, False
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            left = timeout - (time.monotonic() - started)
            ready, _, _ = select.select([pipe], [], [], max(left, 0))
            if not ready:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            data = os.read(pipe.fileno(), 1 << 16)
            if not data:
                break
            chunks.append(data)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    shutil.rmtree(where, ignore_errors=True)
    case = {"index": index, "family": family, "mutation": what, "seconds": round(seconds, 3), "max_rss_kb": usage.ru_maxrss}
    if timed_out:
        return {**case, "outcome": "HANG", "message": f"over {timeout} s"}
    if os.WIFSIGNALED(status):
        return {**case, "outcome": "CRASH", "message": f"signal {os.WTERMSIG(status)}"}
    try:
        return {**case, **json.loads(b"".join(chunks))}
    except ValueError:
        return {**case, "outcome": "CRASH", "message": f"no result (exit status {status})"}


def classify(case: dict, baseline: dict) -> str:
    if case["outcome"] in FAILURES:
        return case["outcome"]
    if case["max_rss_kb"] > MEMORY_FACTOR * baseline["max_rss_kb"]:
        return "OVER-MEMORY"
    if case["outcome"] == "detected":
        return "detected"
    if case["signature"] == baseline["signature"]:
        return "harmless"
    # a resealed payload passed every checksum by construction; decoding it to frames of the
    # declared shape (observe() checked them) is all the decoder owes
    return "resealed" if case["family"] == "resealed" else "UNDETECTED"


# -- workers ------------------------------------------------------------------------------------

_STATE: dict = {}


def _init_worker(base: str, seed: int, timeout: float, workdir: str) -> None:
    from palstream.archive import open_archive

    base_path = Path(base)
    files = {rel: (base_path / rel).read_bytes() for rel in _files(base_path)}
    list(open_archive(base).decode())  # load the compiled decoder once, before any fork
    vm = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    _STATE.update(files=files, seed=seed, timeout=timeout, workdir=Path(workdir), limit_as=vm + ADDRESS_SPACE_MARGIN)


def _run_batch(indices: list[int]) -> list[dict]:
    s = _STATE
    return [run_case(s["files"], s["seed"], i, s["workdir"], s["timeout"], s["limit_as"]) for i in indices]


def _build_archive(where: Path, version: int) -> None:
    """Encode the default clip in a separate process (zarr's writer threads must not be forked):
    format 3 as ``palstream encode`` writes it, or format 4 in shards of two chunks."""
    if version == 3:
        code = (
            "import sys; from palstream.pipeline import encode_file; from palstream.codec import EncoderConfig; "
            "encode_file(sys.argv[1], sys.argv[2], EncoderConfig(lossless=True, gop=2))"
        )
    else:
        code = (
            "import sys; from palstream import io; from palstream.archive import ArchiveWriter; "
            "from palstream.codec import EncoderConfig, encode_chunk; c = EncoderConfig(lossless=True, gop=2); "
            "w = ArchiveWriter.create(sys.argv[2], io.probe(sys.argv[1]), c, shard_chunks=2); "
            "e = [encode_chunk(f, c) for f in io.iter_chunks(sys.argv[1], 2)]; "
            "[w.write_shard(s, [e[i] for i in w.shard_range(s)]) for s in range(-(-len(e) // 2))]; "
            "w.keep_streams(sys.argv[1]); w.finalize()"
        )
    subprocess.run([sys.executable, "-c", code, str(SOURCE), str(where)], check=True, cwd=REPO)


def _table(counts: dict[str, Counter], total: Counter) -> str:
    columns = ["detected", "harmless", "resealed", "UNDETECTED", *FAILURES]
    rows = [f"{'family':<12}" + "".join(f"{c:>12}" for c in columns) + f"{'cases':>9}"]
    for family in sorted(counts):
        rows.append(f"{family:<12}" + "".join(f"{counts[family][c]:>12}" for c in columns) + f"{sum(counts[family].values()):>9}")
    rows.append(f"{'all':<12}" + "".join(f"{total[c]:>12}" for c in columns) + f"{sum(total.values()):>9}")
    return "\n".join(rows)


def _merge(paths: list[Path], out: Path) -> int:
    parts = [json.loads(p.read_text()) for p in paths]
    total: Counter = Counter()
    counts: dict[str, Counter] = {}
    for part in parts:
        total.update(part["totals"])
        for family, c in part["by_family"].items():
            counts.setdefault(family, Counter()).update(c)
    print(_table(counts, total))
    report = {
        "cases": sum(total.values()),
        "totals": dict(total),
        "by_family": {f: dict(c) for f, c in sorted(counts.items())},
        "slowest_case_seconds": max(p["slowest_case_seconds"] for p in parts),
        "peak_rss_kb": max(p["peak_rss_kb"] for p in parts),
        "failing_or_undetected": [c for p in parts for c in p["failing_or_undetected"]][:200],
        "parts": [{k: v for k, v in p.items() if k != "failing_or_undetected"} for p in parts],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(total[k] for k in (*FAILURES, "UNDETECTED")) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of mutated cases (default 1000)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed; a case is reproduced by seed and index")
    parser.add_argument("--first", type=int, default=0, help="index of the first case (to continue a run)")
    parser.add_argument("--case", type=int, help="run only this case index and print it")
    parser.add_argument("--timeout", type=float, default=30.0, help="time ceiling per case, seconds (default 30)")
    parser.add_argument("--archive", type=Path, help="archive to mutate (default: the 37x29 clip, lossless, GOP 2)")
    parser.add_argument("--format", type=int, choices=(3, 4), default=3, help="format of the default archive (4: shards of 2 chunks)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fuzz_archive.json")
    parser.add_argument("--merge", type=Path, nargs="+", help="combine the reports of runs over disjoint cases into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out)

    scratch = Path(tempfile.mkdtemp(prefix="palstream-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        base = scratch / "base.zarr"
        if args.archive:
            shutil.copytree(args.archive, base)
        else:
            _build_archive(base, args.format)
        context = multiprocessing.get_context("spawn")  # clean workers: nothing of this process is forked
        init = (str(base), args.seed, args.timeout, str(scratch))
        with context.Pool(args.jobs, initializer=_init_worker, initargs=init) as pool:
            baseline = pool.apply(_run_batch, ([-1],))[0]
            if baseline["outcome"] != "decoded":
                print(f"error: the unmutated archive does not decode: {baseline.get('message')}", file=sys.stderr)
                return 1
            if args.case is not None:
                case = pool.apply(_run_batch, ([args.case],))[0]
                case["class"] = classify(case, baseline)
                print(json.dumps(case, indent=2))
                return 0
            indices = list(range(args.first, args.first + args.cases))
            batches = [indices[i : i + 25] for i in range(0, len(indices), 25)]
            counts: dict[str, Counter] = {}
            total: Counter = Counter()
            notable, slowest, peak = [], 0.0, 0
            started = time.monotonic()
            for n, results in enumerate(pool.imap_unordered(_run_batch, batches), 1):
                for case in results:
                    kind = classify(case, baseline)
                    counts.setdefault(case["family"], Counter())[kind] += 1
                    total[kind] += 1
                    slowest, peak = max(slowest, case["seconds"]), max(peak, case["max_rss_kb"])
                    if kind in FAILURES or kind == "UNDETECTED":
                        notable.append({**case, "class": kind})
                if n % 40 == 0:
                    print(f"{sum(total.values())} cases, {time.monotonic() - started:.0f} s: {dict(total)}", file=sys.stderr, flush=True)
            elapsed = time.monotonic() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(_table(counts, total))
    print(
        f"{sum(total.values())} cases in {elapsed:.0f} s; slowest case {slowest:.2f} s (ceiling {args.timeout:.0f} s); "
        f"peak RSS {peak / 1024:.0f} MiB (unmutated {baseline['max_rss_kb'] / 1024:.0f} MiB, ceiling {MEMORY_FACTOR}x)"
    )
    report = {
        "command": "python -m benchmarks.fuzz_archive " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "first": args.first,
        "cases": sum(total.values()),
        "seconds": round(elapsed, 1),
        "totals": dict(total),
        "by_family": {f: dict(c) for f, c in sorted(counts.items())},
        "baseline": {"max_rss_kb": baseline["max_rss_kb"], "seconds": baseline["seconds"]},
        "slowest_case_seconds": slowest,
        "peak_rss_kb": peak,
        "failing_or_undetected": notable[:200],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(total[k] for k in (*FAILURES, "UNDETECTED")) else 0


if __name__ == "__main__":
    sys.exit(main())
