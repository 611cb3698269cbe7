"""Bytes back to frames: the chunk header, the frame loop both directions run, and ``decode_chunk``.

The payload layout is specified in ``storage/BITSTREAM.md``. The encoder (``chunk.py``) writes
this header and runs this frame loop too, with its decisions: its reconstruction is the
decoder's output by construction. Numpy and numba only: decoding never needs torch.
"""

from __future__ import annotations

import struct

import numpy as np

from palstream.codec import rangecoder, syntax
from palstream.codec.modes import ModeStats
from palstream.errors import ArchiveError
from palstream.frames import Frames

MAGIC = b"PSC1"
VERSION = 6  # what the encoder writes
# version 5 is version 6 with the second reference always 2 frames back and one step for every frame,
# 4 is 5 without escapes, 3 is 4 without the transform flag (storage/BITSTREAM.md)
READABLE = (3, 4, 5, 6)
HEADER = struct.Struct("<4sBBHHHBBBBI")  # magic, version, flags, frames, width, height, step*4, min, max, 0, body bytes
FLAG_LOSSLESS = 1
MAX_DIMENSION = 16384
MAX_FRAMES = 1024
MAX_CHUNK_SAMPLES = 1 << 31  # decoded samples of one chunk (2 GiB): a larger header is a lie or an error


class BitstreamError(ArchiveError):
    """A chunk payload does not parse (damaged or not palstream data)."""


NO_STATS = np.zeros((0, 3))  # ``code_frame`` counts nothing: same type as a statistics array, so one compiled kernel


# Bitstream 6's layered frames: the frames between every fourth one are coded with a coarser step
# (they are referenced less: frame f + 1 references them, later frames the level-0 ones), as x265's
# B-pyramid cascades its quantiser by temporal level. With the second references of
# analysis.SECOND_REFERENCE: the corpus at 40 and 45 dB, 2.5 % fewer bytes at equal PSNR-Y and fixed
# steps, /x265 -4.7 % at 40 dB and -1.0 % at 45 rate-controlled (docs/codec.md, issue-16 ledger).
LEVEL_STEP = (64, 72, 81)  # a frame's step in 64ths of the chunk's, by its level
MAX_REF2 = 4  # frames back that a second reference may be


def frame_level(f: int) -> int:
    """Level 0 for every fourth frame, 1 for the frames halfway between, 2 for the rest."""
    return 0 if f % 4 == 0 else (1 if f % 2 == 0 else 2)


def frame_coding(coding: syntax.Coding, f: int) -> syntax.Coding:
    """Frame ``f``'s coding in a layered (version 6) chunk: the step of its level, the encoder's
    rounding offsets and escape tolerance scaled with it. Lossless chunks (step 1) keep one step."""
    if coding.q4 <= 4:
        return coding
    q4 = min(255, (coding.q4 * LEVEL_STEP[frame_level(f)] + 32) >> 6)
    if q4 == coding.q4:
        return coding
    return coding._replace(q4=q4, rounding=tuple(r * q4 // coding.q4 for r in coding.rounding),
                           esc_tol=coding.esc_tol * q4 * q4 // (coding.q4 * coding.q4))


def _code_distance(enc, st, buf, f, d):
    """Frame ``f``'s second-reference distance in a layered chunk: 2, 3 or 4 frames back, at most
    ``f``; two bypass bits at most (nothing is coded for frame 2)."""
    if f < 3 or not rangecoder.code_bypass(enc, st, buf, 1 if d != 2 else 0):
        return 2
    if f < 4:
        return 3
    return 4 if rangecoder.code_bypass(enc, st, buf, 1 if d == 4 else 0) else 3


def code_frames(enc, buf, planes, recon, coding, decide=None, frames=None, emit=None, stats=NO_STATS, layered=False,
                distances=None):
    """Code every frame of a chunk in one direction; returns the coder state.

    The encoder passes ``planes`` (the source), ``recon`` with a slot for every frame, and
    ``decide(f, src, ref, ref2, ref2_dist, coding, decisions, probs, predictors)``, which fills the
    ``syntax.Decisions`` of frame ``f`` coded with ``coding`` and may price its choices at the
    coder's probabilities and palette predictors. The decoder passes ``frames`` (the count) and
    ``recon`` with at least ``MAX_REF2 + 1`` slots (3 for versions 3-5), used in turn, and receives
    each frame through ``emit(f, rec)`` once it is complete; it stops at the first frame that reads
    past the end of the body. Planes travel as (Y, Cb, Cr) tuples; ``coding`` is the chunk's
    ``syntax.Coding``. ``layered`` (version 6): frames take ``frame_coding``'s steps and a coded
    second-reference distance, the encoder's ``distances[f]`` (versions 3-5: always 2).
    ``stats``: a float64 (``syntax.STAT_ROWS``, 3) array that every coded leaf is added to
    (``palstream.codec.modes``), or ``NO_STATS``.
    """
    t = planes[0].shape[0] if enc else frames
    slots = recon[0].shape[0]
    h, w = recon[0].shape[1:]
    st = rangecoder.new_state()
    if not enc:
        rangecoder.start_decoding(st, buf)
    probs = rangecoder.new_probs(syntax.N_CONTEXTS)
    decisions = syntax.Decisions.zeros(h, w)
    # signed residual levels of the current and the previous frame, for contexts; swapped per frame
    levels, prev_levels = (tuple(np.zeros(shape, np.int8) for shape in [(h, w), (h // 2, w // 2), (h // 2, w // 2)])
                           for _ in range(2))
    # palette predictor lists: luma keys, their count, chroma keys, their count
    predictors = (np.zeros(syntax.MAX_PAL, np.int64), np.zeros(1, np.int64), np.zeros(syntax.MAX_PAL, np.int64),
                  np.zeros(1, np.int64))
    for f in range(t):
        rec = tuple(p[f % slots] for p in recon)
        if f >= slots:
            for p in rec:  # a reused slot must read as undecoded (zero), as a fresh one does
                p[...] = 0
        src = tuple(p[f] for p in planes) if enc else rec
        ref = tuple(p[(f - 1) % slots] for p in recon) if f > 0 else rec
        ref2_dist = 0
        if f >= 2:
            ref2_dist = _code_distance(enc, st, buf, f, distances[f] if enc else 0) if layered else 2
        ref2 = tuple(p[(f - ref2_dist) % slots] for p in recon) if ref2_dist else ref
        frame = frame_coding(coding, f) if layered else coding
        if decide is not None:
            decide(f, src, ref, ref2, ref2_dist, frame, decisions, probs, predictors)
        syntax.code_frame(
            enc, st, buf, probs, src, rec, ref, ref2, levels, prev_levels, f == 0, ref2_dist, frame, decisions, predictors,
            stats,
        )
        if st[rangecoder.OVERRUN] > rangecoder.MAX_OVERRUN:
            break
        levels, prev_levels = prev_levels, levels
        if emit is not None:
            emit(f, rec)
    return st


def decode_chunk(payload: bytes, expected: tuple[int, int, int] | None = None, modes: ModeStats | None = None) -> Frames:
    """Decode one GOP payload to frames.

    Work and memory follow the data: the header is checked before anything is allocated, the
    output grows a frame at a time, and decoding stops within one CTU of reading past the end of
    the body, however many frames the header declares.

    Parameters
    ----------
    payload : bytes
        The chunk as stored (header and body, ``storage/BITSTREAM.md``).
    expected : tuple of int, optional
        ``(frames, height, width)`` that the container says this chunk holds; a header that
        declares anything else is refused before decoding.
    modes : ModeStats, optional
        Receives the chunk's leaves: mode, area and bits of each (``palstream.codec.modes``).

    Returns
    -------
    Frames
        ``frames`` frames of ``height`` x ``width``.

    Raises
    ------
    BitstreamError
        The payload is malformed, truncated, or disagrees with ``expected``.
    """
    if len(payload) < HEADER.size:
        raise BitstreamError(f"payload of {len(payload)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, flags, t, w, h, q4, min_block, max_block, reserved, body_len = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise BitstreamError("payload does not start with the palstream chunk magic 'PSC1'")
    if version not in READABLE:
        raise BitstreamError(
            f"chunk bitstream version {version} is not supported (this decoder reads {', '.join(map(str, READABLE))})"
        )
    if not (1 <= t <= MAX_FRAMES and 1 <= w <= MAX_DIMENSION and 1 <= h <= MAX_DIMENSION):
        raise BitstreamError(f"declared size {t} frames of {w}x{h} is out of range")
    if expected is not None and tuple(expected) != (t, h, w):
        et, eh, ew = expected
        raise BitstreamError(f"header declares {t} frames of {w}x{h}, the archive {et} frames of {ew}x{eh}")
    if flags & ~FLAG_LOSSLESS or reserved:
        raise BitstreamError(f"unknown header flags {flags:#x} / reserved byte {reserved}: written by a newer palstream?")
    if q4 < 4 or min_block not in (8, 16, 32, 64) or max_block not in (8, 16, 32, 64) or min_block > max_block:
        raise BitstreamError(f"declared coding parameters (step {q4}/4, blocks {min_block}..{max_block}) are invalid")
    if body_len != len(payload) - HEADER.size:
        raise BitstreamError(f"declared body of {body_len} bytes but {len(payload) - HEADER.size} are present")
    ph, pw = h + (-h % syntax.CTU), w + (-w % syntax.CTU)
    if t * ph * pw * 3 // 2 > MAX_CHUNK_SAMPLES:
        raise BitstreamError(f"declared size {t} frames of {w}x{h} exceeds the decoder's {MAX_CHUNK_SAMPLES >> 30} GiB chunk limit")
    slots = min(t, MAX_REF2 + 1 if version >= 6 else 3)
    recon = (
        np.zeros((slots, ph, pw), np.uint8),
        np.zeros((slots, ph // 2, pw // 2), np.uint8),
        np.zeros((slots, ph // 2, pw // 2), np.uint8),
    )
    ch, cw = (h + 1) // 2, (w + 1) // 2
    # np.empty: pages are only taken as decoded frames are copied in
    out = Frames(np.empty((t, h, w), np.uint8), np.empty((t, ch, cw), np.uint8), np.empty((t, ch, cw), np.uint8))

    def emit(f, rec):
        out.y[f] = rec[0][:h, :w]
        out.u[f] = rec[1][:ch, :cw]
        out.v[f] = rec[2][:ch, :cw]

    buf = np.frombuffer(payload, np.uint8, offset=HEADER.size).copy()  # writable: one compiled coder for both directions
    stats = NO_STATS if modes is None else modes.new_counts()
    st = code_frames(
        False, buf, None, recon, syntax.Coding(q4, (0,) * 5, min_block, max_block, version >= 4 and q4 > 4, version >= 5, 0), frames=t,
        emit=emit, stats=stats, layered=version >= 6,
    )
    if st[rangecoder.OVERRUN] > rangecoder.MAX_OVERRUN:
        raise BitstreamError("chunk body ends before its frames are complete (truncated)")
    if modes is not None:
        modes.add(stats, len(payload))
    return out
