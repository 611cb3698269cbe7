"""The tuner's context: cheap content statistics of a batch, plus the source's last result.

Statistics come from the first :data:`SAMPLE_FRAMES` frames of a batch (one short read of the
source; a batch is consecutive units of one video, so its start is representative). Every value
is scaled to roughly 0..1 so that one exploration width fits every feature.
"""

from __future__ import annotations

import hashlib

import numpy as np

from palstream.frames import Frames
from palstream.storage import Location

SAMPLE_FRAMES = 4
BLOCK = 16
CONTENT_FEATURES = ("motion", "static", "texture", "colourfulness", "flat", "distinct")
# The context vector: a bias term, the content statistics, then the result of the source's
# previous batch (its log2 compression ratio: how hard this video is, whatever the weights).
FEATURE_NAMES = ("bias", *CONTENT_FEATURES, "last_log2_ratio", "has_last")
LAST_RATIO_SCALE = 10.0  # log2 ratios are 1..9 in practice; keep the feature near 0..1


def content_features(frames: Frames) -> dict[str, float]:
    """Content statistics of a few frames (all in 0..1).

    ``motion``: mean absolute luma difference between consecutive frames / 32;
    ``static``: fraction of 16x16 luma blocks identical to the previous frame;
    ``texture``: mean absolute luma gradient / 32;
    ``colourfulness``: mean absolute chroma deviation from neutral (128) / 32;
    ``flat``: fraction of 16x16 luma blocks whose values span at most 4 levels;
    ``distinct``: mean number of distinct luma values per 16x16 block / 256.
    """
    y = frames.y[:SAMPLE_FRAMES].astype(np.int16)
    t, h, w = y.shape
    hb, wb = max(h // BLOCK, 1), max(w // BLOCK, 1)
    blocks = y[:, : hb * BLOCK, : wb * BLOCK]
    if blocks.shape[1] < BLOCK or blocks.shape[2] < BLOCK:  # tiny frames: the whole frame is one block
        blocks = y
        hb = wb = 1
    bh, bw = blocks.shape[1] // hb, blocks.shape[2] // wb
    tiles = blocks[:, : hb * bh, : wb * bw].reshape(t, hb, bh, wb, bw).transpose(0, 1, 3, 2, 4).reshape(t * hb * wb, bh * bw)
    if t > 1:
        diff = np.abs(np.diff(y, axis=0))
        motion = float(diff.mean()) / 32
        tile_diff = np.abs(np.diff(tiles.reshape(t, hb * wb, -1), axis=0)).max(axis=2)
        static = float((tile_diff == 0).mean())
    else:
        motion, static = 0.0, 0.0
    texture = (float(np.abs(np.diff(y, axis=2)).mean()) + float(np.abs(np.diff(y, axis=1)).mean())) / 2 / 32
    chroma = np.concatenate([frames.u[:SAMPLE_FRAMES].ravel(), frames.v[:SAMPLE_FRAMES].ravel()]).astype(np.int16)
    colourfulness = float(np.abs(chroma - 128).mean()) / 32
    span = tiles.max(axis=1) - tiles.min(axis=1)
    flat = float((span <= 4).mean())
    ordered = np.sort(tiles, axis=1)
    distinct = float((1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)).mean()) / 256
    values = {
        "motion": motion,
        "static": static,
        "texture": texture,
        "colourfulness": colourfulness,
        "flat": flat,
        "distinct": distinct,
    }
    return {k: round(min(max(v, 0.0), 1.0), 6) for k, v in values.items()}


def context_vector(content: dict[str, float], last_log2_ratio: float | None) -> np.ndarray:
    """The agent's input, ``FEATURE_NAMES`` in order; ``last_log2_ratio`` None for a source's first batch."""
    last = 0.0 if last_log2_ratio is None else float(np.clip(last_log2_ratio / LAST_RATIO_SCALE, 0, 2))
    return np.array(
        [1.0, *(float(content[name]) for name in CONTENT_FEATURES), last, 0.0 if last_log2_ratio is None else 1.0]
    )


def features_hash() -> str:
    """Identity of the context definition: a saved policy is only meaningful for the same features."""
    text = ",".join(FEATURE_NAMES) + f"|{SAMPLE_FRAMES}|{BLOCK}|{LAST_RATIO_SCALE}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unit_features(source: str | Location, start: int, count: int) -> dict[str, float]:
    """Content statistics of frames ``[start, start + min(count, SAMPLE_FRAMES))`` of a source
    (a path, URL or :class:`~palstream.storage.Location` with its storage options).

    Runs as a Dask task (key ``unit_features-*``) so the driver never decodes video.
    """
    from palstream import io

    frames = io.read_frames(source, start, min(count, SAMPLE_FRAMES))
    return content_features(frames)
