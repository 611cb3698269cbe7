"""TEMPORARY PLACEHOLDER (being replaced by the real palette codec): zlib of raw planes.

Its API is final: EncodedChunk, encode_chunk, decode_chunk, BitstreamError.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from palstream.codec.config import EncoderConfig
from palstream.errors import ArchiveError
from palstream.frames import Frames


class BitstreamError(ArchiveError):
    """A chunk payload does not parse (damaged or not palstream data)."""


@dataclass
class EncodedChunk:
    payload: bytes
    stats: dict = field(default_factory=dict)  # frames, bytes, psnr_y, mse_y, encode_seconds, ...


def encode_chunk(frames: Frames, config: EncoderConfig, generator=None) -> EncodedChunk:
    header = struct.pack("<4sHHH", b"PSC0", len(frames), frames.width, frames.height)
    payload = header + zlib.compress(frames.tobytes(), 6)
    return EncodedChunk(payload, {"frames": len(frames), "bytes": len(payload), "psnr_y": float("inf"), "mse_y": 0.0})


def decode_chunk(payload: bytes) -> Frames:
    try:
        magic, t, w, h = struct.unpack_from("<4sHHH", payload)
        raw = np.frombuffer(zlib.decompress(payload[10:]), np.uint8)
    except (struct.error, zlib.error) as exc:
        raise BitstreamError(f"payload does not parse: {exc}") from None
    cw, ch = (w + 1) // 2, (h + 1) // 2
    per = w * h + 2 * cw * ch
    if magic != b"PSC0" or raw.size != t * per:
        raise BitstreamError("payload size does not match its header")
    raw = raw.reshape(t, per)
    y = raw[:, : w * h].reshape(t, h, w)
    u = raw[:, w * h : w * h + cw * ch].reshape(t, ch, cw)
    v = raw[:, w * h + cw * ch :].reshape(t, ch, cw)
    return Frames(y.copy(), u.copy(), v.copy())
