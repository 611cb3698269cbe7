"""Decoder conformance: stored payloads of every bitstream version decode to their recorded frames.

The vectors under tests/conformance/bitstream-N/ are kept for good (see generate.py there). Every
version the decoder reads (``decoder.READABLE``: the current one and version 3, which version 4
extends) must decode bit-exactly; an older version's must be refused with one line that names the
version, never decoded into something else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from palstream.codec import BitstreamError, decode_chunk
from palstream.codec.decoder import READABLE, VERSION

FOLDER = Path(__file__).parent / "conformance"
VECTORS = [
    (index["bitstream_version"], version_dir / f"{name}.bin", vector)
    for version_dir in sorted(FOLDER.glob("bitstream-*"))
    for index in [json.loads((version_dir / "vectors.json").read_text())]
    for name, vector in index["vectors"].items()
]


def test_the_current_bitstream_has_vectors():
    assert any(version == VERSION for version, _, _ in VECTORS), f"run tests/conformance/generate.py for {VERSION}"


@pytest.mark.parametrize("version, path, vector", VECTORS, ids=[f"v{v}-{p.stem}" for v, p, _ in VECTORS])
def test_vector_decodes_to_its_recorded_frames(version, path, vector):
    payload = path.read_bytes()
    assert hashlib.sha256(payload).hexdigest() == vector["payload_sha256"], "the stored vector itself changed"
    if version not in READABLE:
        with pytest.raises(BitstreamError, match=f"version {version}"):
            decode_chunk(payload)
        return
    frames = decode_chunk(payload)
    assert (len(frames), frames.height, frames.width) == (vector["frames"], vector["height"], vector["width"])
    assert hashlib.sha256(frames.tobytes()).hexdigest() == vector["decoded_sha256"]
