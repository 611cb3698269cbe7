"""The naive palette codec that palstream has to beat (issue 2, "Why").

Fixed 16×16 luma blocks (8×8 Cb/Cr blocks in 4:2:0), one k-means palette per block for luma
levels and one for (Cb, Cr) pairs, every pixel stored as a raw one-byte index, and the whole
clip zstd-compressed. Intra only: no prediction, no skip blocks, no context modelling. It is
what "per-block palettes + a general-purpose compressor" buys without palstream's design.

Layout of a payload (all little-endian)::

    header   "NPK1", frames, width, height (uint16 each), K luma, K chroma (uint8 each)
    body     zstd( luma palettes | chroma palettes | luma indices | chroma indices )

Palettes are uint8, ``K`` entries per block (``2K`` bytes per chroma block: Cb, Cr
interleaved); indices are uint8 in block raster order, pixels of a block row by row.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import zstandard

from palstream.frames import Frames
from palstream.palettes import PaletteGenerator

BLOCK = 16  # luma block side; chroma blocks are BLOCK // 2 in 4:2:0
ZSTD_LEVEL = 19
_HEADER = struct.Struct("<4sHHHBB")
_MAGIC = b"NPK1"


def _blocks(plane: np.ndarray, side: int) -> np.ndarray:
    """(T, H, W[, C]) -> (T·blocks, side·side, C), edge-padded to whole blocks."""
    if plane.ndim == 3:
        plane = plane[..., None]
    t, h, w, c = plane.shape
    ph, pw = -h % side, -w % side
    plane = np.pad(plane, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    bh, bw = plane.shape[1] // side, plane.shape[2] // side
    blocks = plane.reshape(t, bh, side, bw, side, c).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(t * bh * bw, side * side, c)


def _unblocks(blocks: np.ndarray, t: int, h: int, w: int, side: int) -> np.ndarray:
    """Inverse of ``_blocks``: (T·blocks, side·side, C) -> (T, H, W, C), cropped."""
    bh, bw = -(-h // side), -(-w // side)
    c = blocks.shape[-1]
    plane = blocks.reshape(t, bh, bw, side, side, c).transpose(0, 1, 3, 2, 4, 5)
    return plane.reshape(t, bh * side, bw * side, c)[:, :h, :w]


def _quantise(blocks: np.ndarray, k: int, generator: PaletteGenerator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means palettes (rounded to uint8) and nearest-entry indices, ``batch`` blocks at a time."""
    palettes, indices = [], []
    for start in range(0, len(blocks), batch):
        samples = torch.from_numpy(blocks[start : start + batch].astype(np.float32))
        sizes = torch.full((len(samples),), k, dtype=torch.int64)
        pal = generator.generate(samples, sizes).to("cpu")[:, :k].round().to(torch.uint8)
        # Indices against the rounded palette: that is what the decoder has.
        idx = torch.cdist(samples, pal.to(torch.float32)).argmin(-1).to(torch.uint8)
        palettes.append(pal.numpy())
        indices.append(idx.numpy())
    return np.concatenate(palettes), np.concatenate(indices)


def encode(frames: Frames, k_luma: int, k_chroma: int, generator: PaletteGenerator) -> bytes:
    """Encode a clip with ``k_luma`` levels per luma block and ``k_chroma`` colours per chroma block.

    Parameters
    ----------
    frames : Frames
        The clip (8-bit 4:2:0).
    k_luma, k_chroma : int
        Palette sizes, 1..64 (the generator's limit); indices are one byte each.
    generator : PaletteGenerator
        Computes the palettes (the benchmark uses ``kmeans``).

    Returns
    -------
    bytes
        The payload; its length is the codec's whole size.
    """
    if not (1 <= k_luma <= 64 and 1 <= k_chroma <= 64):
        raise ValueError(f"palette sizes {k_luma}/{k_chroma} out of range; use 1..64")
    # ~900 blocks of a 640×360 frame per batch keeps torch.cdist's (N, P, K) buffer small.
    pal_y, idx_y = _quantise(_blocks(frames.y, BLOCK), k_luma, generator, batch=1024)
    uv = np.stack([frames.u, frames.v], axis=-1)
    pal_c, idx_c = _quantise(_blocks(uv, BLOCK // 2), k_chroma, generator, batch=4096)
    body = b"".join(a.tobytes() for a in (pal_y, pal_c, idx_y, idx_c))
    header = _HEADER.pack(_MAGIC, len(frames), frames.width, frames.height, k_luma, k_chroma)
    return header + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)


def decode(payload: bytes) -> Frames:
    """Decode a payload written by ``encode``."""
    magic, t, w, h, k_luma, k_chroma = _HEADER.unpack_from(payload)
    if magic != _MAGIC:
        raise ValueError("not a naive-codec payload")
    body = np.frombuffer(zstandard.ZstdDecompressor().decompress(payload[_HEADER.size :]), np.uint8)
    cw, ch = (w + 1) // 2, (h + 1) // 2
    n_y = t * -(-h // BLOCK) * -(-w // BLOCK)
    n_c = t * -(-ch // (BLOCK // 2)) * -(-cw // (BLOCK // 2))
    sizes = [n_y * k_luma, n_c * k_chroma * 2, n_y * BLOCK * BLOCK, n_c * (BLOCK // 2) ** 2]
    pal_y, pal_c, idx_y, idx_c = np.split(body, np.cumsum(sizes)[:-1])
    pal_y = pal_y.reshape(n_y, k_luma, 1)
    pal_c = pal_c.reshape(n_c, k_chroma, 2)
    rows_y, rows_c = np.arange(n_y)[:, None], np.arange(n_c)[:, None]
    y = pal_y[rows_y, idx_y.reshape(n_y, -1)]
    uv = pal_c[rows_c, idx_c.reshape(n_c, -1)]
    y = _unblocks(y, t, h, w, BLOCK)[..., 0]
    uv = _unblocks(uv, t, ch, cw, BLOCK // 2)
    return Frames(np.ascontiguousarray(y), np.ascontiguousarray(uv[..., 0]), np.ascontiguousarray(uv[..., 1]))
