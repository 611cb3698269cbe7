"""Write the archive conformance vector of format 4 (FORMAT.md §8); run once, keep the result.

    python tests/conformance/generate_archive.py

``archive-4/screen_37x29_k2.zarr`` is tests/data/screen_37x29.mkv encoded losslessly in GOPs of 2
(three chunks) in shards of two (``chunks/c/0`` holds chunks 0 and 1, ``chunks/c/1`` chunk 2, the
last shard not full). ``archive-4/expected.json`` gives, per chunk, the SHA-256 of its payload
and of the frames it decodes to (``Frames.tobytes()``), and per shard its object's SHA-256 and
size: what an independent reader of FORMAT.md §8 must find (tests/test_archive_format4.py reads
the vector with nothing but json, struct, hashlib and a CRC-32C, as such a reader would).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "data" / "screen_37x29.mkv"
OUT = HERE / "archive-4"
NAME = "screen_37x29_k2.zarr"


def main() -> int:
    from palstream import io
    from palstream.archive import ArchiveWriter, open_archive
    from palstream.codec import EncoderConfig, encode_chunk

    if (OUT / NAME).exists():
        print(f"{OUT / NAME} exists: vectors are written once; delete it to regenerate on purpose", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    config = EncoderConfig(lossless=True, gop=2)
    writer = ArchiveWriter.create(str(OUT / NAME), io.probe(str(SOURCE)), config, shard_chunks=2)
    encoded = [encode_chunk(frames, config) for frames in io.iter_chunks(str(SOURCE), config.gop)]
    for shard in range(2):
        writer.write_shard(shard, [encoded[i] for i in writer.shard_range(shard)])
    writer.keep_streams(str(SOURCE))
    writer.finalize()
    archive = open_archive(str(OUT / NAME))
    chunks = [
        {"payload_sha256": hashlib.sha256(archive.read_chunk(i)).hexdigest(),
         "frames_sha256": hashlib.sha256(archive.decode_chunk(i).tobytes()).hexdigest()}
        for i in range(archive.n_chunks)
    ]
    shards = [
        {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        for blob in ((OUT / NAME / "chunks" / "c" / str(s)).read_bytes() for s in range(2))
    ]
    (OUT / "expected.json").write_text(json.dumps({"archive": NAME, "chunks": chunks, "shards": shards}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
