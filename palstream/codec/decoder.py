"""Bytes back to frames: the chunk header, the frame loop both directions run, and ``decode_chunk``.

The payload layout is specified in ``storage/BITSTREAM.md``. The encoder (``chunk.py``) writes
this header and runs this frame loop too, with its decisions: its reconstruction is the
decoder's output by construction. Numpy and numba only: decoding never needs torch.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from palstream.codec import rangecoder, sao, syntax
from palstream.codec.modes import ModeStats
from palstream.errors import ArchiveError
from palstream.frames import Frames

MAGIC = b"PSC1"
VERSION = 12  # what the encoder writes
# version 11 is version 12 with a flag per predictor entry for a palette's reused entries, 10 is 11
# without FLAG_SAO, 9 is 10 without FLAG_QUARTER, 8 is 9 without FLAG_INTRA_TRANSFORM, 7 is 8 without
# FLAG_SHARP (bilinear half-pel motion only), 6 is 7 without FLAG_PYRAMID (display order only), 5 is 6
# with the second reference always 2 frames back and one step for every frame, 4 is 5 without escapes,
# 3 is 4 without the transform flag (storage/BITSTREAM.md)
READABLE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
HEADER = struct.Struct("<4sBBHHHBBBBI")  # magic, version, flags, frames, width, height, step*4, min, max, 0, body bytes
FLAG_LOSSLESS = 1
FLAG_PYRAMID = 2  # version 7: frames in coding_order's pyramid, predicted from past and future ones
FLAG_SHARP = 4  # versions 8-12: half-pel motion by syntax.SHARP's filter, not bilinear
FLAG_INTRA_TRANSFORM = 8  # versions 9-12: INTRA leaves may transform-code their luma (syntax.intra_planar)
FLAG_QUARTER = 16  # versions 10-12: motion vectors in quarter-pels (syntax.INTERP_QUARTER)
FLAG_SAO = 32  # versions 11-12: each frame's luma filtered by sample adaptive offsets (sao.py)
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
# Bitstream 7's pyramid (``_pyramid``) codes the frames between anchors four apart from past and
# future references, with the same levels.
LEVEL_STEP = (64, 72, 81)  # a frame's step in 64ths of the chunk's, by its level
MAX_REF2 = 4  # frames back that a second reference may be (display order)
SLOTS = MAX_REF2 + 1  # reconstructed frames a decoder keeps (versions 6 and later; 3 for versions 3-5)
CODED = -2  # a second reference whose distance the frame header codes (display order, versions 6 and later)


class Step(NamedTuple):
    """One frame of a chunk, in coding order."""

    f: int  # display index
    ref: int  # the first reference's display index; -1: none (intra only)
    ref2: int  # the second reference's; -1: none; CODED: 2-4 frames back, coded in the frame header
    scale: int  # the second vector is predicted as ``scale`` times the first
    level: int  # the frame's step level (LEVEL_STEP)


def frame_level(f: int) -> int:
    """Level 0 for every fourth frame, 1 for the frames halfway between, 2 for the rest."""
    return 0 if f % 4 == 0 else (1 if f % 2 == 0 else 2)


def _pyramid(t: int) -> list[Step]:
    """Version 7's pyramid: anchors every fourth frame and the last, each from the anchor before
    (its second reference the one before that); between two anchors four apart the middle frame
    first, then the two others, each from its past and future neighbours (a shorter last gap
    alike). Level 0 for the anchors, 1 for the frames between that a later one references, 2 for
    the rest (the same levels as ``frame_level`` gives where the gaps are four)."""
    anchors = list(range(0, t, 4)) + ([t - 1] if (t - 1) % 4 else [])
    order = [Step(0, -1, -1, 0, 0)]
    for i in range(1, len(anchors)):
        a, b = anchors[i - 1], anchors[i]
        gap = b - a
        if i >= 2:  # the second vector reaches twice as far (rounded: 7/3 for a last gap of 3)
            order.append(Step(b, a, anchors[i - 2], round((b - anchors[i - 2]) / gap), 0))
        else:
            order.append(Step(b, a, -1, 0, 0))
        if gap == 4:
            order += [Step(a + 2, a, b, -1, 1), Step(a + 1, a, a + 2, -1, 2), Step(a + 3, a + 2, b, -1, 2)]
        elif gap == 3:
            order += [Step(a + 1, a, b, -2, 1), Step(a + 2, a + 1, b, -1, 2)]
        elif gap == 2:
            order.append(Step(a + 1, a, b, -1, 2))
    return order


def coding_order(t: int, version: int, pyramid: bool) -> list[Step]:
    """The frames of a ``t``-frame chunk in coding order, with their references (storage/BITSTREAM.md
    5.0): display order for versions 3-5 (second reference 2 back, one step) and for versions 6 and later
    chunks without ``FLAG_PYRAMID`` (layered, coded second-reference distances); ``_pyramid``."""
    if pyramid:
        return _pyramid(t)
    if version < 6:
        return [Step(f, f - 1, f - 2 if f >= 2 else -1, 2, 0) for f in range(t)]
    return [Step(f, f - 1, CODED if f >= 2 else -1, 0, frame_level(f)) for f in range(t)]


def _slots(order: list[Step], n: int) -> dict[int, int]:
    """Slot of each frame (display index) in a buffer of ``n`` reconstructed frames: its own index
    where every frame has one (the encoder), else the first slot that holds no frame a later one
    still references (the decoder)."""
    if n >= len(order):
        return {s.f: s.f for s in order}
    last_use = {}
    for i, s in enumerate(order):
        for r in range(s.f - MAX_REF2, s.f) if s.ref2 == CODED else (s.ref, s.ref2):
            last_use[r] = i
    slot: dict[int, int] = {}
    live: dict[int, int] = {}  # slots of the frames that this step or a later one references
    for i, s in enumerate(order):
        live = {r: k for r, k in live.items() if last_use.get(r, -1) >= i}
        slot[s.f] = live[s.f] = min(set(range(n)) - set(live.values()))  # ValueError: an order that needs more slots
    return slot


def frame_coding(coding: syntax.Coding, level: int) -> syntax.Coding:
    """A frame's coding at ``level`` in a layered (version 6 and later) chunk: the step of its level, the
    encoder's rounding offsets and escape tolerance scaled with it. Lossless chunks (step 1) keep one step."""
    if coding.q4 <= 4:
        return coding
    q4 = min(255, (coding.q4 * LEVEL_STEP[level] + 32) >> 6)
    if q4 == coding.q4:
        return coding
    return coding._replace(q4=q4, rounding=tuple(r * q4 // coding.q4 for r in coding.rounding),
                           esc_tol=coding.esc_tol * q4 * q4 // (coding.q4 * coding.q4))


def _code_distance(enc, st, buf, f, d):
    """Frame ``f``'s second-reference distance in a layered display-order chunk: 2, 3 or 4 frames
    back, at most ``f``; two bypass bits at most (nothing is coded for frame 2)."""
    if f < 3 or not rangecoder.code_bypass(enc, st, buf, 1 if d != 2 else 0):
        return 2
    if f < 4:
        return 3
    return 4 if rangecoder.code_bypass(enc, st, buf, 1 if d == 4 else 0) else 3


def code_frames(enc, buf, planes, recon, coding, order, decide=None, emit=None, stats=NO_STATS, distances=None):
    """Code every frame of a chunk in one direction, in ``order`` (``coding_order``); returns the coder state.

    The encoder passes ``planes`` (the source), ``recon`` with a slot for every frame, and
    ``decide(f, src, ref, ref2, ref2_scale, coding, decisions, probs, predictors)``, which fills the
    ``syntax.Decisions`` of frame ``f`` coded with ``coding``, may price its choices at the
    coder's probabilities and palette predictors, and returns the RD lambda it priced them at (the
    loop filter's choice takes it too); in display order, ``distances[f]`` is frame f's
    second-reference distance. The decoder passes ``recon`` with at least ``SLOTS`` slots (3 for
    versions 3-5), used in turn, and receives each frame through ``emit(f, rec)`` once it is
    complete; it stops at the first frame that reads past the end of the body. Planes travel as
    (Y, Cb, Cr) tuples; ``coding`` is the chunk's ``syntax.Coding``. ``stats``: a float64
    (``syntax.STAT_ROWS``, 3) array that every coded leaf is added to (``palstream.codec.modes``),
    or ``NO_STATS``.
    """
    slot = _slots(order, recon[0].shape[0])
    h, w = recon[0].shape[1:]
    st = rangecoder.new_state()
    if not enc:
        rangecoder.start_decoding(st, buf)
    probs = rangecoder.new_probs(syntax.N_CONTEXTS)
    decisions = syntax.Decisions.zeros(h, w)
    # signed residual levels of the current and the previously coded frame, for contexts; swapped per frame
    levels, prev_levels = (tuple(np.zeros(shape, np.int8) for shape in [(h, w), (h // 2, w // 2), (h // 2, w // 2)])
                           for _ in range(2))
    # palette predictor lists: luma keys, their count, chroma keys, their count
    predictors = (np.zeros(syntax.MAX_PAL, np.int64), np.zeros(1, np.int64), np.zeros(syntax.MAX_PAL, np.int64),
                  np.zeros(1, np.int64))
    used = set()
    sao_pre = np.zeros((h, w), np.uint8)  # a frame's luma before its offsets, which classify its samples
    sao_params = np.zeros((-(-h // syntax.CTU), -(-w // syntax.CTU), sao.SAO_FIELDS), np.int64)
    for step in order:
        f = step.f
        rec = tuple(p[slot[f]] for p in recon)
        if slot[f] in used:
            for p in rec:  # a reused slot must read as undecoded (zero), as a fresh one does
                p[...] = 0
        used.add(slot[f])
        src = tuple(p[f] for p in planes) if enc else rec
        ref = tuple(p[slot[step.ref]] for p in recon) if step.ref >= 0 else rec
        ref2_f, scale = step.ref2, step.scale
        if ref2_f == CODED:
            d = _code_distance(enc, st, buf, f, distances[f] if enc else 0)
            ref2_f, scale = f - d, d
        ref2 = tuple(p[slot[ref2_f]] for p in recon) if ref2_f >= 0 else ref
        scale = scale if ref2_f >= 0 else 0
        frame = frame_coding(coding, step.level)
        lam = 0.0
        if decide is not None:
            lam = decide(f, src, ref, ref2, scale, frame, decisions, probs, predictors)
        syntax.code_frame(
            enc, st, buf, probs, src, rec, ref, ref2, levels, prev_levels, step.ref < 0, scale, frame, decisions, predictors,
            stats,
        )
        if coding.sao:
            sao.code_sao(enc, st, buf, probs, src[0], rec[0], sao_pre, lam, sao_params, stats)
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
    known = (FLAG_LOSSLESS | (FLAG_PYRAMID if version >= 7 else 0) | (FLAG_SHARP if version >= 8 else 0)
             | (FLAG_INTRA_TRANSFORM if version >= 9 else 0) | (FLAG_QUARTER if version >= 10 else 0)
             | (FLAG_SAO if version >= 11 else 0))
    if flags & ~known or reserved:
        raise BitstreamError(f"unknown header flags {flags:#x} / reserved byte {reserved}: written by a newer palstream?")
    if q4 < 4 or min_block not in (8, 16, 32, 64) or max_block not in (8, 16, 32, 64) or min_block > max_block:
        raise BitstreamError(f"declared coding parameters (step {q4}/4, blocks {min_block}..{max_block}) are invalid")
    if body_len != len(payload) - HEADER.size:
        raise BitstreamError(f"declared body of {body_len} bytes but {len(payload) - HEADER.size} are present")
    ph, pw = h + (-h % syntax.CTU), w + (-w % syntax.CTU)
    if t * ph * pw * 3 // 2 > MAX_CHUNK_SAMPLES:
        raise BitstreamError(f"declared size {t} frames of {w}x{h} exceeds the decoder's {MAX_CHUNK_SAMPLES >> 30} GiB chunk limit")
    slots = min(t, SLOTS if version >= 6 else 3)
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
        False, buf, None, recon, syntax.Coding(q4, (0,) * 5, min_block, max_block, version >= 4 and q4 > 4, version >= 5, 0,
                                                (syntax.INTERP_SHARP if flags & FLAG_SHARP else 0)
                                                | (syntax.INTERP_QUARTER if flags & FLAG_QUARTER else 0),
                                                bool(flags & FLAG_INTRA_TRANSFORM) and q4 > 4, bool(flags & FLAG_SAO) and q4 > 4,
                                                version >= 12),
        coding_order(t, version, bool(flags & FLAG_PYRAMID)), emit=emit, stats=stats,
    )
    if st[rangecoder.OVERRUN] > rangecoder.MAX_OVERRUN:
        raise BitstreamError("chunk body ends before its frames are complete (truncated)")
    if modes is not None:
        modes.add(stats, len(payload))
    return out
