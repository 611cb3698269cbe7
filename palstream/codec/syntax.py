"""The frame syntax, written once for both directions.

``code_frame(enc=True, ...)`` writes the decisions in ``Decisions`` and the residuals/indices
it derives from the source; ``code_frame(enc=False, ...)`` reads the same syntax back and
fills the decisions. Both walk the same code path, so encoder and decoder cannot drift
apart, and the encoder's reconstruction is by construction the decoder's output.
See ``storage/BITSTREAM.md`` for the syntax in prose.

All planes are padded to a multiple of 64 (luma) by the caller. Everything is integer.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from palstream.codec.rangecoder import (
    MAX_OVERRUN,
    OVERRUN,
    UEG_CONTEXTS,
    bits_consumed,
    code_bit,
    code_bypass,
    code_tree,
    code_ueg,
)

SKIP, INTER, INTRA, PALETTE = 0, 1, 2, 3
CTU = 64
MV_LIMIT = 1024
MAX_PAL = 64

# Fields of the per-8x8-cell leaf record ``Decisions.cells[cy8, cx8, field]``. Motion comes first,
# in the one order every motion value has: a motion tuple is (MV_Y, MV_X, MV2_Y, MV2_X, BI), the
# half-pel vectors into the first and the second reference, and which the prediction uses (BI: 0
# the first, 1 the mean of both, ALONE the second); the motion search's field holds the first four.
# VARIANT: predictor variant; OFFSET: INTER luma offset; TRANSFORM: INTER luma residual coded by ``code_transform_block``
MV_Y, MV_X, MV2_Y, MV2_X, BI, VARIANT, OFFSET, TRANSFORM = range(8)
ALONE = 2
CELL_FIELDS = 8

# Rows of the per-leaf statistics ``code_frame`` accumulates when asked (``palstream.codec.modes``
# reads them): one per leaf mode (SKIP .. PALETTE), the quadtree's split flags (bits only), then
# PALETTE leaves by luma palette size bucket, by chroma palette size bucket, by where the
# encoder's luma palette came from (exact clusters or the generator's proposal; encoder only), and
# the INTER leaves whose luma is transform-coded, the PALETTE leaves with escape samples, (encoder
# only) the analysis' estimate of the PALETTE leaves' bits, to set against what they wrote, and the
# INTRA leaves whose luma is transform-coded (bitstream 9); then the frames' loop-filter offsets.
STAT_TREE = 4
STAT_PAL_Y = 5  # + size bucket: 1, 2-4, 5-16, 17-64 entries
STAT_PAL_C = 9
STAT_PAL_SOURCE = 13  # + 0 exact, + 1 generated
STAT_TRANSFORM = 15
STAT_PAL_ESCAPE = 16
STAT_PAL_ESTIMATE = 17
STAT_INTRA_TRANSFORM = 18
STAT_SAO = 19  # bitstream 11's sample adaptive offsets, after each frame's leaves (bits only; sao.py)
STAT_ROWS = 20
STAT_LEAVES, STAT_AREA, STAT_BITS = range(3)  # columns: leaves, luma pixels, bits


class Decisions(NamedTuple):
    """Per-8x8-cell decisions of a frame: the analysis fills them, ``code_frame`` writes them (and
    fills them when decoding). Every cell of a leaf holds the leaf's values; a PALETTE leaf's
    palettes are kept in its top-left cell. The syntax reads only cells already coded in the frame."""

    leaf_size: np.ndarray  # int32 (h/8, w/8)
    mode: np.ndarray  # int32 (h/8, w/8): SKIP, INTER, INTRA or PALETTE
    cells: np.ndarray  # int32 (h/8, w/8, CELL_FIELDS): motion, variant, offset, transform (MV_Y .. TRANSFORM)
    pal_y: np.ndarray  # int64 (h/8, w/8, MAX_PAL): sorted luma levels
    pal_yn: np.ndarray  # int32 (h/8, w/8): how many
    pal_c: np.ndarray  # int64 (h/8, w/8, MAX_PAL): sorted chroma keys Cb * 256 + Cr
    pal_cn: np.ndarray  # int32 (h/8, w/8)
    pal_gen: np.ndarray  # int32 (h/8, w/8): encoder only, never coded: 1 where the luma palette is the generator's
    pal_esc: np.ndarray  # int32 (h/8, w/8): escape flags as coded, 1 luma + 2 chroma
    pal_bits: np.ndarray  # float64 (h/8, w/8): encoder only: the analysis' estimate of the leaf's bits

    @classmethod
    def zeros(cls, h: int, w: int) -> "Decisions":
        """All-zero decisions for a frame of ``h`` x ``w`` luma samples."""
        h8, w8 = h // 8, w // 8
        return cls(
            np.zeros((h8, w8), np.int32), np.zeros((h8, w8), np.int32), np.zeros((h8, w8, CELL_FIELDS), np.int32),
            np.zeros((h8, w8, MAX_PAL), np.int64), np.zeros((h8, w8), np.int32),
            np.zeros((h8, w8, MAX_PAL), np.int64), np.zeros((h8, w8), np.int32), np.zeros((h8, w8), np.int32),
            np.zeros((h8, w8), np.int32), np.zeros((h8, w8)),
        )


class Coding(NamedTuple):
    """A chunk's coding parameters, as ``code_frame`` takes them."""

    q4: int  # quantiser step in quarter levels
    rounding: tuple  # encoder: dead-zone rounding offsets (quarter levels) by non-zero neighbours, 5 entries
    min_block: int
    max_block: int
    transform: bool  # INTER leaves carry a transform flag (bitstream 4 with a step above 1)
    escapes: bool  # palettes carry escape flags (bitstream 5)
    esc_tol: int  # encoder: squared error above which a palette sample is coded as an escape
    interp: int  # motion interpolation: INTERP_SHARP (bitstream 8's FLAG_SHARP) | INTERP_QUARTER (bitstream 10's FLAG_QUARTER)
    intra_transform: bool  # INTRA leaves carry a transform flag (bitstream 9's FLAG_INTRA_TRANSFORM)
    sao: bool  # frames end with their luma's sample adaptive offsets (bitstream 11's FLAG_SAO; sao.py)
    reuse_runs: bool  # palettes name their reused predictor entries by count and gaps, not a flag each (bitstream 12)


class _Contexts:
    """Running allocation of context indices (module constants below)."""

    n = 0

    @classmethod
    def take(cls, count):
        start = cls.n
        cls.n += count
        return start


_c = _Contexts.take
CTX_SPLIT = _c(4)  # by depth
CTX_SKIP = _c(3)  # by number of skipped neighbours
CTX_INTER = _c(3)
CTX_PALETTE = _c(3)
CTX_MV_ZERO = _c(2)
CTX_MV_MAG = _c(2 * UEG_CONTEXTS)
CTX_BI = _c(3)  # second reference used, by neighbours using it
CTX_MV2_ZERO = _c(2)
CTX_MV2_MAG = _c(2 * UEG_CONTEXTS)
CTX_VARIANT = _c(2 * 3)  # [INTER, INTRA] predictor variant != 0, by neighbours of that mode using one
CTX_WEIGHT = _c(2)  # INTER variant's MED weight: not 1/2, then 1/4 or 3/4
MED_WEIGHT = (0, 2, 1, 3)  # INTER variant -> weight of MED in quarters
CTX_DC_ZERO = _c(3)  # INTER luma offset != 0, by neighbours with one
CTX_DC_MAG = _c(UEG_CONTEXTS)
# residuals: [plane class 2][mode 2]
CTX_RES_CODED = _c(4 * 3)  # sub-block 'has non-zero levels', by coded neighbours
CTX_RES_ZERO = _c(4 * 48)  # neighbour magnitudes (6) x activity (4) x previous frame's level (2)
CTX_RES_SIGN = _c(4 * 9)  # signs of the left and top levels
CTX_RES_MAG = _c(4 * 6 * UEG_CONTEXTS)
# transform path (INTER luma, bitstream 4)
CTX_TRANSFORM = _c(3)  # by neighbours using it
CTX_TC_CODED = _c(3)  # 8x8 block has non-zero levels, by neighbours' levels (as RES_CODED)
CTX_TC_LAST = _c(64)  # zig-zag position of the last non-zero level: a 6-bit tree
CTX_TC_SIG = _c(7 * 3)  # frequency band x non-zero levels among the two coded before
CTX_TC_MAG = _c(3 * 3 * UEG_CONTEXTS)  # DC / low / high band x levels above 1 coded before (0, 1, 2+)
# palettes: [component class 2]
CTX_PAL_REUSE = _c(2 * 2)
CTX_PAL_NEW = _c(2 * UEG_CONTEXTS)
CTX_PAL_FIRST = _c(2 * 256)
CTX_PAL_DELTA = _c(2 * UEG_CONTEXTS)
CTX_PAL_CR_ZERO = _c(1)
CTX_PAL_CR_MAG = _c(UEG_CONTEXTS)
CTX_IDX_LEFT = _c(2 * 6)
CTX_IDX_TOP = _c(2 * 3)
CTX_IDX_EXPLICIT = _c(2 * 7 * 64)
# escapes (bitstream 5): flag per palette [component class 2]; residual levels [Y, Cb, Cr]
CTX_PAL_ESCAPE = _c(2)
CTX_ESC_ZERO = _c(3)
CTX_ESC_MAG = _c(3 * UEG_CONTEXTS)
CTX_ALONE = _c(1)  # a future second reference used alone (bitstream 7's pyramid)
# transform path for INTRA luma (bitstream 9): its flag, and its levels' own copy of the four
# CTX_TC_* groups above, at this offset from them (an intra residual's spectrum is not an inter one's)
CTX_INTRA_TRANSFORM = _c(3)  # by neighbours using it
TC_INTRA = _c(CTX_TC_MAG + 3 * 3 * UEG_CONTEXTS - CTX_TC_CODED) - CTX_TC_CODED
# bitstream 11's sample adaptive offset (sao.py)
CTX_SAO_MERGE = _c(2)  # with the left CTU's params, with the above one's
CTX_SAO_ON = _c(1)
CTX_SAO_BAND = _c(1)  # band offsets rather than edge offsets
CTX_SAO_MAG = _c(5 * 7)  # truncated unary bins of an offset's magnitude: by edge class (4), or band offsets (1)
# bitstream 12: a palette's reused predictor entries as their count and the gaps between them [component class 2]
CTX_PAL_REUSED = _c(2 * UEG_CONTEXTS)
CTX_PAL_GAP = _c(2 * UEG_CONTEXTS)
N_CONTEXTS = _Contexts.n


@njit(cache=True, nogil=True, inline="always")
def _clamp(v, lo, hi):
    return lo if v < lo else (hi if v > hi else v)


@njit(cache=True, nogil=True, inline="always")
def _med(rec, y, x):
    if y == 0 and x == 0:
        return 128
    if y == 0:
        return np.int64(rec[y, x - 1])
    if x == 0:
        return np.int64(rec[y - 1, x])
    a = np.int64(rec[y, x - 1])
    b = np.int64(rec[y - 1, x])
    c = np.int64(rec[y - 1, x - 1])
    if c >= max(a, b):
        return min(a, b)
    if c <= min(a, b):
        return max(a, b)
    return a + b - c


@njit(cache=True, nogil=True, inline="always")
def _average4(rec, y, x, y0, x0, size, sy, sx, sub):
    """Rounded mean of left, top, top-left and top-right, for smooth gradients and noise that
    MED's edge-following passes through. Top-right is used only where it is already decoded
    (above the sub-block, or inside it); elsewhere top stands in for it."""
    if y == 0 or x == 0:
        return _med(rec, y, x)
    a = np.int64(rec[y, x - 1])
    b = np.int64(rec[y - 1, x])
    c = np.int64(rec[y - 1, x - 1])
    d = b
    if x + 1 < rec.shape[1] and (x + 1 < sx + sub or (y == sy and x + 1 < x0 + size)):
        d = np.int64(rec[y - 1, x + 1])
    return (a + b + c + d + 2) >> 2


@njit(cache=True, nogil=True)
def _average4_call(rec, y, x, y0, x0, size, sy, sx, sub):
    """``_average4`` as a call: inlined into the per-sample loop it made the common path slower.

    The prediction is written out in both per-sample loops (``_sub_block_pays``,
    ``code_residual_block``): factored into one inlined helper, rocket decoding fell from
    113-117 to 82-83 fps (measured)."""
    return _average4(rec, y, x, y0, x0, size, sy, sx, sub)


@njit(cache=True, nogil=True, inline="always")
def _activity_bucket(rec, y, x, q4):
    """Local gradient of the reconstruction (left, top, top-left, top-right), in quantiser steps."""
    if y == 0 or x == 0:
        return 3
    a = np.int64(rec[y, x - 1])
    b = np.int64(rec[y - 1, x])
    c = np.int64(rec[y - 1, x - 1])
    d = np.int64(rec[y - 1, x + 1]) if x + 1 < rec.shape[1] else b
    # buckets of t = 4g // q4 at t = 0, 1..2, 3..6, 7..: compared, not divided (hot loop)
    g4 = 4 * (abs(a - c) + abs(b - c) + abs(b - d))
    if g4 < q4:
        return 0
    if g4 < 3 * q4:
        return 1
    if g4 < 7 * q4:
        return 2
    return 3


@njit(cache=True, nogil=True, inline="always")
def _sign3(v):
    return 0 if v == 0 else (1 if v > 0 else 2)


@njit(cache=True, nogil=True)
def _code_signed(enc, st, buf, probs, zero_ctx, mag_ctx, value):
    """A signed value: zero flag, then sign (bypass) and magnitude - 1."""
    if code_bit(enc, st, buf, probs, zero_ctx, 1 if value != 0 else 0):
        neg = code_bypass(enc, st, buf, 1 if value < 0 else 0)
        mag = code_ueg(enc, st, buf, probs, mag_ctx, abs(value) - 1) + 1
        return -mag if neg else mag
    return 0


# Bitstream 8's sharp half-pel filter (a chunk's FLAG_SHARP): H.264's six luma taps, whose negative
# lobes keep the edges and texture that bilinear averaging blurs (32 frames at fixed steps: 3-D
# animation -19 / -15 %, the rocket launch -10 / -5 % at 40 / 45 dB) but pass on more of a
# reference's noise (grain, sensor noise), so the encoder chooses it per chunk (chunk._sharp_pays).
SHARP = np.array([1, -5, 20, 20, -5, 1], np.int64)  # sums to 32: one pass shifts by 5, two by 10


@njit(cache=True, nogil=True, inline="always")
def _sharp6(row, x):
    """``SHARP`` over ``row[x:x + 6]`` (unrounded, 32 times the sample)."""
    return (np.int64(row[x]) - 5 * np.int64(row[x + 1]) + 20 * np.int64(row[x + 2]) + 20 * np.int64(row[x + 3])
            - 5 * np.int64(row[x + 4]) + np.int64(row[x + 5]))


@njit(cache=True, nogil=True, inline="always")
def motion_sample(ref, y, x, mvy, mvx, sharp):
    """Sample of ``ref`` displaced by a half-pel vector, rounded, edges repeated: bilinear, or
    with ``sharp`` the ``SHARP`` filter along each half-pel coordinate (rows first), clamped to 0..255.

    Bilinear is one formula for all four half-pel phases: (a + b + c + d + 2) >> 2 with the second
    row and column equal to the first where that coordinate is whole, which is a, (a + b + 1) >> 1
    or (a + c + 1) >> 1 exactly.
    """
    h, w = ref.shape
    py = 2 * y + mvy
    px = 2 * x + mvx
    iy = py >> 1
    ix = px >> 1
    fy = py & 1
    fx = px & 1
    if not sharp:
        y0 = _clamp(iy, 0, h - 1)
        x0 = _clamp(ix, 0, w - 1)
        y1 = _clamp(iy + fy, 0, h - 1)
        x1 = _clamp(ix + fx, 0, w - 1)
        return (np.int64(ref[y0, x0]) + np.int64(ref[y0, x1]) + np.int64(ref[y1, x0]) + np.int64(ref[y1, x1]) + 2) >> 2
    acc = 0
    for j in range(6 if fy else 1):
        r = _clamp(iy - 2 + j if fy else iy, 0, h - 1)
        row = 0
        for k in range(6 if fx else 1):
            row += (SHARP[k] if fx else 1) * np.int64(ref[r, _clamp(ix - 2 + k if fx else ix, 0, w - 1)])
        acc += (SHARP[j] if fy else 1) * row
    shift = 5 * (fy + fx)
    return _clamp((acc + ((1 << shift) >> 1)) >> shift, 0, 255)


@njit(cache=True, nogil=True, inline="always")
def _motion_block(ref, y0, x0, size, mvy, mvx, sharp, out):
    """``motion_sample`` of every sample of a block into ``out``; no clamping where none is needed."""
    h, w = ref.shape
    iy = y0 + (mvy >> 1)
    ix = x0 + (mvx >> 1)
    fy = mvy & 1
    fx = mvx & 1
    # whole-pixel vectors copy under either filter; within a row, slices of the reference rows let
    # numba vectorise the six taps (8x8 blocks: 60-110 ns a phase, 250 both; bilinear 38)
    if (not sharp or fy == fx == 0) and iy >= 0 and ix >= 0 and iy + size + fy <= h and ix + size + fx <= w:
        for y in range(size):
            r0 = iy + y
            r1 = r0 + fy
            for x in range(size):
                c0 = ix + x
                c1 = c0 + fx
                out[y, x] = (np.int64(ref[r0, c0]) + np.int64(ref[r0, c1]) + np.int64(ref[r1, c0])
                             + np.int64(ref[r1, c1]) + 2) >> 2
    elif sharp and iy >= 2 * fy and ix >= 2 * fx and iy + size + 3 * fy <= h and ix + size + 3 * fx <= w:
        if fy and fx:  # 36 products a sample along rows: as fast as 12 that keep sums down a column
            for y in range(size):
                r0 = ref[iy + y - 2, ix - 2:ix + size + 3]
                r1 = ref[iy + y - 1, ix - 2:ix + size + 3]
                r2 = ref[iy + y, ix - 2:ix + size + 3]
                r3 = ref[iy + y + 1, ix - 2:ix + size + 3]
                r4 = ref[iy + y + 2, ix - 2:ix + size + 3]
                r5 = ref[iy + y + 3, ix - 2:ix + size + 3]
                for x in range(size):
                    v = (_sharp6(r0, x) - 5 * _sharp6(r1, x) + 20 * _sharp6(r2, x) + 20 * _sharp6(r3, x) - 5 * _sharp6(r4, x)
                         + _sharp6(r5, x) + 512) >> 10
                    out[y, x] = min(max(v, 0), 255)
        elif fx:
            for y in range(size):
                row = ref[iy + y, ix - 2:ix + size + 3]
                for x in range(size):
                    out[y, x] = min(max((_sharp6(row, x) + 16) >> 5, 0), 255)
        else:  # fy alone
            for y in range(size):
                r0 = ref[iy + y - 2, ix:ix + size]
                r1 = ref[iy + y - 1, ix:ix + size]
                r2 = ref[iy + y, ix:ix + size]
                r3 = ref[iy + y + 1, ix:ix + size]
                r4 = ref[iy + y + 2, ix:ix + size]
                r5 = ref[iy + y + 3, ix:ix + size]
                for x in range(size):
                    v = (np.int64(r0[x]) - 5 * np.int64(r1[x]) + 20 * np.int64(r2[x]) + 20 * np.int64(r3[x]) - 5 * np.int64(r4[x])
                         + np.int64(r5[x]) + 16) >> 5
                    out[y, x] = min(max(v, 0), 255)
    else:
        for y in range(size):
            for x in range(size):
                out[y, x] = motion_sample(ref, y0 + y, x0 + x, mvy, mvx, sharp)


# A chunk's motion interpolation (``Coding.interp``): half-pel samples by the SHARP filter rather
# than bilinearly (bitstream 8), and vectors in quarter-pels rather than half-pels (bitstream 10)
INTERP_SHARP = 1
INTERP_QUARTER = 2


@njit(cache=True, nogil=True)
def _quarter_block(ref, y0, x0, size, qy, qx, sharp, out, tmp):
    """``_motion_block`` for a quarter-pel vector (``qy``, ``qx``), a kernel of its own (inlined in
    each of ``_quarter_prediction``'s three calls, the codec's kernels compiled in over 8.4 min of
    CPU instead of 5.2, at the same speed): a sample between two
    samples of the half-pel grid is their mean rounded up, H.264's quarter positions; with both
    coordinates between, the two of its four half-pel-grid neighbours that have exactly one
    half-pel coordinate (the diagonal through the whole and the half-half sample's midpoint)."""
    if not (qy | qx) & 1:
        _motion_block(ref, y0, x0, size, qy >> 1, qx >> 1, sharp, out)
        return
    ay = qy >> 1
    by = (qy + 1) >> 1
    ax = qx >> 1
    bx = (qx + 1) >> 1
    if qy & 1 and qx & 1 and (ay & 1) == (ax & 1):  # the other diagonal
        ax, bx = bx, ax
    _motion_block(ref, y0, x0, size, ay, ax, sharp, out)
    _motion_block(ref, y0, x0, size, by, bx, sharp, tmp)
    for y in range(size):
        for x in range(size):
            out[y, x] = (out[y, x] + tmp[y, x] + 1) >> 1


@njit(cache=True, nogil=True)
def _quarter_prediction(ref, ref2, y0, x0, size, mot, sharp, scratch):
    """``inter_prediction`` with quarter-pel vectors (``INTERP_QUARTER``): a kernel of its own, so
    that the half-pel path keeps its inlined blocks."""
    out = scratch[0]
    if mot[BI] == ALONE:
        _quarter_block(ref2, y0, x0, size, mot[MV2_Y], mot[MV2_X], sharp, out, scratch[2])
        return out
    _quarter_block(ref, y0, x0, size, mot[MV_Y], mot[MV_X], sharp, out, scratch[2])
    if mot[BI]:
        second = scratch[1]
        _quarter_block(ref2, y0, x0, size, mot[MV2_Y], mot[MV2_X], sharp, second, scratch[2])
        for y in range(size):
            for x in range(size):
                out[y, x] = (out[y, x] + second[y, x] + 1) >> 1
    return out


@njit(cache=True, nogil=True)
def inter_prediction(ref, ref2, y0, x0, size, mot, interp, scratch):
    """Motion-compensated prediction of a block: ``mot`` = (vy, vx, vy2, vx2, bi); with ``bi``
    1, the rounded mean of the first and the second reference's predictions, with ``ALONE`` the
    second's; ``interp``: ``Coding.interp``. Returns ``scratch[0]``, whose top-left ``size`` x
    ``size`` samples hold it (``scratch``: int32[3, >= size, >= size], preallocated by the caller:
    this runs for every candidate)."""
    sharp = interp & INTERP_SHARP != 0
    if interp & INTERP_QUARTER:
        return _quarter_prediction(ref, ref2, y0, x0, size, mot, sharp, scratch)
    out = scratch[0]
    if mot[BI] == ALONE:
        _motion_block(ref2, y0, x0, size, mot[MV2_Y], mot[MV2_X], sharp, out)
        return out
    _motion_block(ref, y0, x0, size, mot[MV_Y], mot[MV_X], sharp, out)
    if mot[BI]:
        second = scratch[1]
        _motion_block(ref2, y0, x0, size, mot[MV2_Y], mot[MV2_X], sharp, second)
        for y in range(size):
            for x in range(size):
                out[y, x] = (out[y, x] + second[y, x] + 1) >> 1
    return out


@njit(cache=True, nogil=True, inline="always")
def chroma_motion(mot):
    """A luma motion tuple's chroma counterpart: the same displacement in chroma half-pels (or
    quarter-pels, with ``INTERP_QUARTER``)."""
    return (mot[MV_Y] >> 1, mot[MV_X] >> 1, mot[MV2_Y] >> 1, mot[MV2_X] >> 1, mot[BI])


@njit(cache=True, nogil=True, inline="always")
def _level(e, q4, rnd4):
    """Encoder: level of prediction error e for a step of q4/4, rounding offset rnd4/4."""
    k = (4 * abs(e) + rnd4) // q4
    return -k if e < 0 else k


@njit(cache=True, nogil=True, inline="always")
def dequantise(k, q4):
    """Reconstruction offset of level k: k steps of q4/4, rounded half away from zero."""
    m = (abs(k) * q4 + 2) >> 2
    return -m if k < 0 else m


# encoder: a bit's worth in squared steps where levels of 1 are weighed against their bits
# (``_trim_levels``, ``_sub_block_pays``); for the transform's trailing levels at fixed rungs 0.19
# codes the corpus in 2.5 % fewer bytes at equal PSNR-Y, 0.13 and 0.26 in 2.1 and 2.5 % (3-D
# animation at 45 dB +0.4 %; docs/codec.md "Trimming levels of 1")
TRIM_LAMBDA = 0.19
# encoder: an INTER sub-block whose levels are all 1 and no more than this many is coded only where
# they pay (``_sub_block_pays``)
SPARSE_LEVELS = 4


@njit(cache=True, nogil=True)
def _sub_block_pays(src, rec, mode, variant, wm, inter, y0, x0, size, sy, sx, sub, q4, rnd4):
    """Encoder: whether to code this sub-block: not where every level quantises to zero (rounding
    ``rnd4``). Above step 1, an INTER sub-block without a variant whose levels are all 1 and at most
    ``SPARSE_LEVELS`` is coded only if the error they save is worth their bits at ``TRIM_LAMBDA``:
    about 2 for the sub-block's flag, 0.1 for each zero level and 6 for each level of 1 (its zero
    flag among zero neighbours, sign and magnitude). Such levels are mostly noise, dear to code in an
    otherwise empty sub-block (the analysis prices them as coded); INTRA and the variants predict from
    the samples as they are decoded, so leaving levels out would change the rest of the sub-block.
    Writes the tentative zero-level reconstruction into ``rec``; coding the sub-block afterwards
    overwrites it in the same raster order, so no sample is used before its final value is written."""
    sparse = mode == INTER and variant == 0 and q4 > 4
    count = 0
    saved = 0
    for y in range(sy, sy + sub):
        for x in range(sx, sx + sub):
            if mode == INTER:
                pred = np.int64(inter[y - y0, x - x0])
                if variant:
                    pred = ((4 - wm) * pred + wm * _med(rec, y, x) + 2) >> 2
            elif variant:
                pred = _average4_call(rec, y, x, y0, x0, size, sy, sx, sub)
            else:
                pred = _med(rec, y, x)
            e = abs(np.int64(src[y, x]) - pred)
            k = abs(_level(e, q4, rnd4))
            if k > 1 or (k and not sparse):
                return True
            if k:
                count += 1
                r = e - dequantise(1, q4)
                saved += e * e - r * r
            rec[y, x] = pred
    if count == 0:
        return False
    if count > SPARSE_LEVELS:
        return True
    step = q4 / 4.0
    return saved >= TRIM_LAMBDA * step * step * (2.0 + 0.1 * (sub * sub - count) + 6.0 * count)


@njit(cache=True, nogil=True)
def code_residual_block(
    enc, st, buf, probs, src, rec, ref, ref2, kmap, kprev, y0, x0, size, q4, rounding, mode, variant, plane_class, mot, dc,
    transform, interp,
):
    """Quantised prediction residual of one block of one plane: its 'palette of residual levels'.

    Prediction: ``inter_prediction`` plus the leaf's offset ``dc`` (INTER; the offset is 0 for
    chroma) or MED (INTRA); with a variant, INTER mixes in MED
    with weight ``MED_WEIGHT[variant]`` quarters (grain and flicker that motion cannot follow) and
    INTRA takes ``_average4``. The block is coded in sub-blocks of 8x8 (luma) or 4x4 (chroma) samples, each with
    a flag for 'all levels zero'; otherwise each level k (residual in steps of q4/4, rounded
    toward zero by the encoder's ``rounding``) is coded as zero flag, sign, magnitude - 1. The encoder
    rounds with ``rounding[j]`` (quarter levels) where j of the left, top, top-left and top-right
    levels are non-zero: there a level is cheaper to code. With ``transform`` (luma, variant 0)
    the residual is coded by ``code_transform_block`` instead. ``interp``: ``Coding.interp``.
    """
    cls = plane_class * 2 + (1 if mode == INTRA else 0)
    sub = min(size, 8 if plane_class == 0 else 4)
    wm = MED_WEIGHT[variant] if mode == INTER else 0
    # INTER predicts the whole block at once; INTRA predicts from samples as they are decoded
    scratch = np.empty((3, size, size), np.int32)
    inter = inter_prediction(ref, ref2, y0, x0, size, mot, interp, scratch) if mode == INTER else scratch[0]
    if dc:
        for y in range(size):
            for x in range(size):
                inter[y, x] = _clamp(inter[y, x] + dc, 0, 255)
    if transform:
        code_transform_block(enc, st, buf, probs, src, rec, kmap, inter, y0, x0, size, q4, mode == INTRA)
        return
    for sy in range(y0, y0 + size, sub):
        for sx in range(x0, x0 + size, sub):
            # context: does the sub-block to the left / above hold a non-zero level next to this one
            nzl = 0
            nzt = 0
            for i in range(sub):
                if sx > 0 and kmap[sy + i, sx - 1] != 0:
                    nzl = 1
                if sy > 0 and kmap[sy - 1, sx + i] != 0:
                    nzt = 1
            coded = 1
            if enc:
                coded = 1 if _sub_block_pays(src, rec, mode, variant, wm, inter, y0, x0, size, sy, sx, sub, q4, rounding[0]) else 0
            coded = code_bit(enc, st, buf, probs, CTX_RES_CODED + cls * 3 + nzl + nzt, coded)
            if not coded and mode == INTER and variant == 0:  # the prediction as it stands
                rec[sy:sy + sub, sx:sx + sub] = inter[sy - y0:sy - y0 + sub, sx - x0:sx - x0 + sub]
                kmap[sy:sy + sub, sx:sx + sub] = 0
                continue
            for y in range(sy, sy + sub):
                for x in range(sx, sx + sub):
                    if mode == INTER:
                        pred = np.int64(inter[y - y0, x - x0])
                        if variant:
                            pred = ((4 - wm) * pred + wm * _med(rec, y, x) + 2) >> 2
                    elif variant:
                        pred = _average4_call(rec, y, x, y0, x0, size, sy, sx, sub)
                    else:
                        pred = _med(rec, y, x)
                    k = 0
                    if coded:
                        w = kmap.shape[1]
                        kl = np.int64(kmap[y, x - 1]) if x > 0 else 0
                        kt = np.int64(kmap[y - 1, x]) if y > 0 else 0
                        ktl = np.int64(kmap[y - 1, x - 1]) if x > 0 and y > 0 else 0
                        ktr = np.int64(kmap[y - 1, x + 1]) if y > 0 and x + 1 < w else 0
                        t = abs(kl) + abs(kt) + abs(ktl) + abs(ktr)
                        nb = t if t < 3 else (3 if t < 5 else (4 if t < 8 else 5))
                        act = _activity_bucket(rec, y, x, q4)
                        tp = 1 if kprev[y, x] != 0 else 0
                        if enc:
                            busy = (1 if kl else 0) + (1 if kt else 0) + (1 if ktl else 0) + (1 if ktr else 0)
                            k = _level(np.int64(src[y, x]) - pred, q4, rounding[busy])
                        zctx = CTX_RES_ZERO + cls * 48 + nb * 8 + act * 2 + tp
                        nz = code_bit(enc, st, buf, probs, zctx, 1 if k != 0 else 0)
                        if nz:
                            sctx = CTX_RES_SIGN + cls * 9 + _sign3(kl) * 3 + _sign3(kt)
                            neg = code_bit(enc, st, buf, probs, sctx, 1 if k < 0 else 0)
                            mag = code_ueg(enc, st, buf, probs, CTX_RES_MAG + (cls * 6 + nb) * UEG_CONTEXTS, abs(k) - 1) + 1
                            k = -mag if neg else mag
                        else:
                            k = 0
                    rec[y, x] = _clamp(pred + dequantise(k, q4), 0, 255)
                    kmap[y, x] = _clamp(k, -15, 15)


# Transform path (bitstream 4): HEVC's 8-point integer DCT; row u holds basis function u. Its rows
# are orthogonal with squared norms within 0.1 % of 2^15, so the two inverse stages' shifts (7, 12)
# undo a forward transform scaled by 2^-11 and make a coefficient 16x its orthonormal value.
DCT8 = np.array([
    [64, 64, 64, 64, 64, 64, 64, 64],
    [89, 75, 50, 18, -18, -50, -75, -89],
    [83, 36, -36, -83, -83, -36, 36, 83],
    [75, -18, -89, -50, 50, 89, 18, -75],
    [64, -64, -64, 64, 64, -64, -64, 64],
    [50, -89, 18, 75, -75, -18, 89, -50],
    [36, -83, 83, -36, -36, 83, -83, 36],
    [18, -50, 75, -89, 89, -75, 50, -18],
], np.int64)


def _zigzag(n: int) -> np.ndarray:
    """(row, column) of each position of the JPEG zig-zag scan of an n x n block."""
    order = sorted(((y, x) for y in range(n) for x in range(n)), key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else p[1]))
    return np.array(order, np.int64)


ZIGZAG = _zigzag(8)
# frequency band of each zig-zag position for the significance contexts: 0, 1-2, 3-5, 6-9, 10-14, 15-27, 28-63
TC_BAND = np.array([0] + [1] * 2 + [2] * 3 + [3] * 4 + [4] * 5 + [5] * 13 + [6] * 36, np.int64)
TC_SCALE = 4  # a level is worth TC_SCALE * q4 coefficient units: the orthonormal step is the spatial step q4/4
TC_ROUNDING = 11  # encoder: levels round toward zero by this many 64ths of a step (HEVC's inter dead zone, 1/6)


@njit(cache=True, nogil=True, inline="always")
def _dct8(x0, x1, x2, x3, x4, x5, x6, x7):
    """``DCT8`` times a vector, by even/odd butterflies: 24 multiplications instead of 64, the same
    integers."""
    e0 = x0 + x7
    e1 = x1 + x6
    e2 = x2 + x5
    e3 = x3 + x4
    o0 = x0 - x7
    o1 = x1 - x6
    o2 = x2 - x5
    o3 = x3 - x4
    ee0 = e0 + e3
    ee1 = e1 + e2
    eo0 = e0 - e3
    eo1 = e1 - e2
    return (64 * (ee0 + ee1), 89 * o0 + 75 * o1 + 50 * o2 + 18 * o3, 83 * eo0 + 36 * eo1,
            75 * o0 - 18 * o1 - 89 * o2 - 50 * o3, 64 * (ee0 - ee1), 50 * o0 - 89 * o1 + 18 * o2 + 75 * o3,
            36 * eo0 - 83 * eo1, 18 * o0 - 50 * o1 + 75 * o2 - 89 * o3)


@njit(cache=True, nogil=True)
def transform_levels(src, inter, sy, sx, py, px, q4, levels, coef, trim):
    """Encoder: levels (zig-zag order, into ``levels``) of the 8x8 block at (``sy``, ``sx``) of
    ``src`` less its prediction, ``inter`` from (``py``, ``px``); returns the last non-zero
    position, -1 if none. ``coef`` receives the forward transform (zig-zag order, 2^11 times the
    inverse's coefficient units). ``trim``: a bit's worth in squared steps for ``_trim_levels``
    (``TRIM_LAMBDA``; 0: the dead zone alone). The passes run through ``coef`` and ``levels``
    themselves (the analysis calls this for every cell it prices: three allocated 8x8 arrays cost 17 %)."""
    for x in range(8):  # columns, into coef[8u + x]
        c = _dct8(np.int64(src[sy, sx + x]) - np.int64(inter[py, px + x]),
                  np.int64(src[sy + 1, sx + x]) - np.int64(inter[py + 1, px + x]),
                  np.int64(src[sy + 2, sx + x]) - np.int64(inter[py + 2, px + x]),
                  np.int64(src[sy + 3, sx + x]) - np.int64(inter[py + 3, px + x]),
                  np.int64(src[sy + 4, sx + x]) - np.int64(inter[py + 4, px + x]),
                  np.int64(src[sy + 5, sx + x]) - np.int64(inter[py + 5, px + x]),
                  np.int64(src[sy + 6, sx + x]) - np.int64(inter[py + 6, px + x]),
                  np.int64(src[sy + 7, sx + x]) - np.int64(inter[py + 7, px + x]))
        for u in range(8):
            coef[8 * u + x] = c[u]
    for u in range(8):  # then rows, into levels[8u + v]
        r = _dct8(coef[8 * u], coef[8 * u + 1], coef[8 * u + 2], coef[8 * u + 3], coef[8 * u + 4], coef[8 * u + 5],
                  coef[8 * u + 6], coef[8 * u + 7])
        for v in range(8):
            levels[8 * u + v] = r[v]
    for i in range(64):
        coef[i] = levels[8 * ZIGZAG[i, 0] + ZIGZAG[i, 1]]
    div = 2048 * TC_SCALE * q4
    off = (div * TC_ROUNDING) >> 6
    last = -1
    for i in range(64):
        fi = coef[i]
        k = (abs(fi) + off) // div
        levels[i] = -k if fi < 0 else k
        if k:
            last = i
    return _trim_levels(levels, coef, last, div, trim)


@njit(cache=True, nogil=True, inline="always")
def _trim_levels(levels, coef, last, div, trim):
    """Encoder: drop the block's trailing levels of 1 while the error each saves, (2r - 1) squared
    steps for a coefficient r steps from zero, is worth less than ``trim`` times the bits it costs
    (its sign and magnitude, about 2, and about 0.7 for each significance flag back to the level
    before it); returns the new last position. HEVC's encoder does the like in its RDOQ: an isolated
    high-frequency level is dear to code and saves little error."""
    while last >= 0 and abs(levels[last]) == 1:
        before = last - 1
        while before >= 0 and levels[before] == 0:
            before -= 1
        r = abs(coef[last]) / div
        if 2.0 * r - 1.0 >= trim * (2.0 + 0.7 * (last - before - 1)):
            break
        levels[last] = 0
        last = before
    return last


@njit(cache=True, nogil=True)
def inverse_transform(levels, last, q4, out):
    """Residual of an 8x8 block from its levels (zig-zag order, none after ``last``) into ``out``:
    dequantised coefficients limited to 16 bits, columns then rows, each stage rounded and shifted."""
    coef = np.zeros((8, 8), np.int64)
    for i in range(last + 1):
        coef[ZIGZAG[i, 0], ZIGZAG[i, 1]] = _clamp(levels[i] * TC_SCALE * q4, -32768, 32767)
    t = np.empty((8, 8), np.int64)
    for v in range(8):
        for y in range(8):
            acc = 0
            for u in range(8):
                acc += DCT8[u, y] * coef[u, v]
            t[y, v] = _clamp((acc + 64) >> 7, -32768, 32767)
    for y in range(8):
        for x in range(8):
            acc = 0
            for v in range(8):
                acc += t[y, v] * DCT8[v, x]
            out[y, x] = (acc + 2048) >> 12


@njit(cache=True, nogil=True, inline="always")
def _above(rec, y, x, i):
    """Sample i of the row above the 8x8 block at (y, x) for ``intra_planar``."""
    return np.int64(rec[y - 1, x + i]) if y > 0 else (np.int64(rec[y, x - 1]) if x > 0 else 128)


@njit(cache=True, nogil=True, inline="always")
def _left(rec, y, x, i):
    """Sample i of the column left of the 8x8 block at (y, x) for ``intra_planar``."""
    return np.int64(rec[y + i, x - 1]) if x > 0 else (np.int64(rec[y - 1, x]) if y > 0 else 128)


@njit(cache=True, nogil=True, inline="always")
def intra_planar(rec, y, x, out, oy, ox):
    """Bitstream 9's INTRA prediction of the 8x8 block at (``y``, ``x``) of ``rec``, into ``out``
    at (``oy``, ``ox``): HEVC's planar blend of the row above and the column to the left, their
    last samples standing in for the above-right and below-left ones (which are not always decoded
    yet). A missing row is the left column's first sample repeated and a missing column the row's;
    128 with neither."""
    tr = _above(rec, y, x, 7)
    bl = _left(rec, y, x, 7)
    for j in range(8):
        lj = _left(rec, y, x, j)
        for i in range(8):
            out[oy + j, ox + i] = ((7 - i) * lj + (i + 1) * tr + (7 - j) * _above(rec, y, x, i) + (j + 1) * bl + 8) >> 4


@njit(cache=True, nogil=True)
def code_transform_block(enc, st, buf, probs, src, rec, kmap, inter, y0, x0, size, q4, intra):
    """Transform-coded luma residual of a leaf: 8x8 blocks in raster order, each a coded flag,
    then the last non-zero zig-zag position and the levels from there back to DC (significance,
    sign, magnitude - 1). An INTER leaf's prediction is ``inter``; with ``intra``, each block's is
    ``intra_planar`` of the blocks decoded before it, written into ``inter``, and its levels take
    the INTRA copy of the contexts (``TC_INTRA``). The kmap gets each sample's residual in spatial
    levels (|r| * 4 // q4, limited to 15), which is what neighbours' contexts expect."""
    ctx = TC_INTRA if intra else 0
    levels = np.zeros(64, np.int64)
    coef = np.empty(64, np.int64)
    res = np.empty((8, 8), np.int64)
    for sy in range(y0, y0 + size, 8):
        for sx in range(x0, x0 + size, 8):
            nzl = 0
            nzt = 0
            for i in range(8):
                if sx > 0 and kmap[sy + i, sx - 1] != 0:
                    nzl = 1
                if sy > 0 and kmap[sy - 1, sx + i] != 0:
                    nzt = 1
            if intra:
                intra_planar(rec, sy, sx, inter, sy - y0, sx - x0)
            last = transform_levels(src, inter, sy, sx, sy - y0, sx - x0, q4, levels, coef, TRIM_LAMBDA) if enc else -1
            if not code_bit(enc, st, buf, probs, ctx + CTX_TC_CODED + nzl + nzt, 1 if last >= 0 else 0):
                rec[sy:sy + 8, sx:sx + 8] = inter[sy - y0:sy - y0 + 8, sx - x0:sx - x0 + 8]
                kmap[sy:sy + 8, sx:sx + 8] = 0
                continue
            last = code_tree(enc, st, buf, probs, ctx + CTX_TC_LAST - 1, 6, last)
            if not enc:
                levels[:] = 0
            big = 0  # levels above 1 coded so far
            for i in range(last, -1, -1):
                k = levels[i]
                nz = 1
                if i < last:
                    near = (1 if levels[i + 1] else 0) + (1 if i + 2 <= last and levels[i + 2] else 0)
                    nz = code_bit(enc, st, buf, probs, ctx + CTX_TC_SIG + TC_BAND[i] * 3 + near, 1 if k else 0)
                if nz:
                    neg = code_bypass(enc, st, buf, 1 if k < 0 else 0)
                    band = 0 if i == 0 else (1 if i < 10 else 2)
                    mag = code_ueg(enc, st, buf, probs, ctx + CTX_TC_MAG + (band * 3 + min(big, 2)) * UEG_CONTEXTS, abs(k) - 1) + 1
                    if mag > 1:
                        big += 1
                    k = -mag if neg else mag
                else:
                    k = 0
                levels[i] = k
            inverse_transform(levels, last, q4, res)
            for y in range(8):
                for x in range(8):
                    r = res[y, x]
                    rec[sy + y, sx + x] = _clamp(np.int64(inter[sy - y0 + y, sx - x0 + x]) + r, 0, 255)
                    k = min((4 * abs(r)) // q4, 15)
                    kmap[sy + y, sx + x] = -k if r < 0 else k


@njit(cache=True, nogil=True, inline="always")
def _key_at(rec_a, rec_b, two, y, x):
    if two:
        return np.int64(rec_a[y, x]) * 256 + np.int64(rec_b[y, x])
    return np.int64(rec_a[y, x])


@njit(cache=True, nogil=True, inline="always")
def _find(keys, n, key):
    for i in range(n):
        if keys[i] == key:
            return i
    return -1


@njit(cache=True, nogil=True, inline="always")
def _key_distance(a, b, two):
    if two:
        du = (a >> 8) - (b >> 8)
        dv = (a & 255) - (b & 255)
        return du * du + dv * dv
    return (a - b) * (a - b)


@njit(cache=True, nogil=True)
def code_palette(enc, st, buf, probs, keys, n, pred, npred, two, runs):
    """Palette (sorted keys) as the predictor list's entries it reuses, then new entries.

    The reused entries are a flag per predictor entry, or with ``runs`` (bitstream 12) their count
    and the gaps between them, as HEVC's screen-content palettes code them (a run of skipped
    entries before each reused one): a block mostly reuses one or two of up to 64, and a flag for
    each entry not reused cost 6-8 % of a cartoon's or a screen recording's bits (docs/codec.md).
    Returns the palette size; ``keys[:n]`` holds the sorted palette afterwards, and the predictor
    list is updated in place (current palette first, then unused old entries).
    """
    comp = 1 if two else 0
    out = np.empty(MAX_PAL, np.int64)
    m = 0
    reused = np.zeros(MAX_PAL, np.bool_)
    if runs:
        count = 0
        if enc:  # mark the entries the palette reuses once; the gaps are read off the marks
            for i in range(npred[0]):
                reused[i] = _find(keys, n, pred[i]) >= 0
                count += reused[i]
        count = min(code_ueg(enc, st, buf, probs, CTX_PAL_REUSED + comp * UEG_CONTEXTS, count), npred[0])
        i = -1
        for _ in range(count):
            gap = 0
            if enc:
                while not reused[i + 1 + gap]:
                    gap += 1
            i += 1 + code_ueg(enc, st, buf, probs, CTX_PAL_GAP + comp * UEG_CONTEXTS, gap)
            if i >= npred[0]:  # only damaged data points past the list
                break
            out[m] = pred[i]
            reused[i] = True
            m += 1
    else:
        for i in range(npred[0]):
            flag = 0
            if enc:
                flag = 1 if _find(keys, n, pred[i]) >= 0 else 0
            if m < MAX_PAL and code_bit(enc, st, buf, probs, CTX_PAL_REUSE + comp * 2 + (1 if i < 4 else 0), flag):
                out[m] = pred[i]
                reused[i] = True
                m += 1
    fresh = np.empty(MAX_PAL, np.int64)
    nnew = 0
    if enc:
        for i in range(n):
            if _find(pred, npred[0], keys[i]) < 0:
                fresh[nnew] = keys[i]
                nnew += 1
    nnew = code_ueg(enc, st, buf, probs, CTX_PAL_NEW + comp * UEG_CONTEXTS, nnew)
    nnew = min(nnew, MAX_PAL - m)
    prev = -1
    for i in range(nnew):
        v = fresh[i] if enc else 0
        if not two:
            if i == 0:
                v = code_tree(enc, st, buf, probs, CTX_PAL_FIRST + comp * 256 - 1, 8, v)
            else:
                v = prev + 1 + code_ueg(enc, st, buf, probs, CTX_PAL_DELTA + comp * UEG_CONTEXTS, v - prev - 1)
            v = min(v, 255)
        else:
            # pairs sorted by (Cb, Cr): Cb as a non-negative delta, Cr as a signed delta
            u = v >> 8
            cr = v & 255
            pu = -1 if i == 0 else prev >> 8
            pcr = 128 if i == 0 else prev & 255
            du = code_ueg(enc, st, buf, probs, CTX_PAL_DELTA + comp * UEG_CONTEXTS, u - pu - 1 if i == 0 else u - pu)
            u = min((du if i == 0 else pu + du), 255)
            cr = _clamp(pcr + _code_signed(enc, st, buf, probs, CTX_PAL_CR_ZERO, CTX_PAL_CR_MAG, cr - pcr), 0, 255)
            v = u * 256 + cr
        out[m] = v
        m += 1
        prev = v
    srt = np.sort(out[:m])
    keys[:m] = srt
    # predictor update: this palette, then the old entries it did not reuse
    newpred = np.empty(MAX_PAL, np.int64)
    c = 0
    for i in range(m):
        newpred[c] = srt[i]
        c += 1
    for i in range(npred[0]):
        if c < MAX_PAL and not reused[i] and _find(srt, m, pred[i]) < 0:
            newpred[c] = pred[i]
            c += 1
    pred[:c] = newpred[:c]
    npred[0] = c
    return m


@njit(cache=True, nogil=True)
def _nearest(keys, n, v, two):
    """Index and squared distance of the palette entry nearest to key ``v``."""
    best = 0
    bestd = _key_distance(v, keys[0], two)
    for i in range(1, n):
        d = _key_distance(v, keys[i], two)
        if d < bestd:
            best = i
            bestd = d
    return best, bestd


@njit(cache=True, nogil=True)
def _code_escape(enc, st, buf, probs, src, rec, kmap, y, x, q4, plane):
    """One escape sample of one plane: its MED prediction's residual as a level of step q4/4
    (rounded to nearest: an escape is there to be accurate), zero flag, sign, magnitude - 1."""
    pred = _med(rec, y, x)
    k = 0
    if enc:
        e = np.int64(src[y, x]) - pred
        k = (4 * abs(e) + (q4 >> 1)) // q4
        k = -k if e < 0 else k
    k = _code_signed(enc, st, buf, probs, CTX_ESC_ZERO + plane, CTX_ESC_MAG + plane * UEG_CONTEXTS, k)
    rec[y, x] = _clamp(pred + dequantise(k, q4), 0, 255)
    kmap[y, x] = _clamp(k, -15, 15)


@njit(cache=True, nogil=True)
def code_indices(
    enc, st, buf, probs, src_a, src_b, rec_a, rec_b, kmaps_a, kmaps_b, y0, x0, size, keys, n, two, escapes, esc_tol, q4
):
    """Index map of a palette block: 'same as left', 'same as top', or an explicit index. The
    encoder takes each sample's nearest entry: an index that repeats a neighbour's at a greater
    error would be cheaper to code, but the analysis could not price that error, and then chose
    palettes over skipped blocks that were better (screen clip, 6 frames at 40 dB: 30 % more bits).

    With ``escapes`` (bitstream 5) a palette of fewer than MAX_PAL entries first codes whether it
    has an escape, index ``n``: a sample coded as its MED residual (``_code_escape``). The encoder
    escapes the samples farther than ``esc_tol`` (squared error) from every entry. Returns the flag.
    """
    comp = 1 if two else 0
    esc = 0
    if escapes and n < MAX_PAL:
        want = 0
        if enc:
            for y in range(y0, y0 + size):
                for x in range(x0, x0 + size):
                    if _nearest(keys, n, _key_at(src_a, src_b, two, y, x), two)[1] > esc_tol:
                        want = 1
                        break
                if want:
                    break
        esc = code_bit(enc, st, buf, probs, CTX_PAL_ESCAPE + comp, want)
    m = n + esc  # index symbols
    idx = np.empty((size, size), np.int64)
    nbits = 0
    while (1 << nbits) < m:
        nbits += 1
    for yy in range(size):
        prev_left = 0
        for xx in range(size):
            y = y0 + yy
            x = x0 + xx
            a = -1
            b = -1
            if xx > 0:
                a = idx[yy, xx - 1]
            elif x > 0:
                a = _find(keys, n, _key_at(rec_a, rec_b, two, y, x - 1))
            if yy > 0:
                b = idx[yy - 1, xx]
            elif y > 0:
                b = _find(keys, n, _key_at(rec_a, rec_b, two, y - 1, x))
            choice = 0
            if enc:
                v = _key_at(src_a, src_b, two, y, x)
                best, bestd = _nearest(keys, n, v, two)
                choice = n if esc and bestd > esc_tol else best
            i = -1
            if m == 1:
                i = 0
            else:
                if a >= 0:
                    c = 0 if a == b else (1 if b < 0 else 2)
                    if code_bit(enc, st, buf, probs, CTX_IDX_LEFT + comp * 6 + c * 2 + prev_left, 1 if choice == a else 0):
                        i = a
                if i < 0 and b >= 0 and b != a:
                    c = 0 if a < 0 else 1
                    if code_bit(enc, st, buf, probs, CTX_IDX_TOP + comp * 3 + c, 1 if choice == b else 0):
                        i = b
                if i < 0:
                    i = code_tree(enc, st, buf, probs, CTX_IDX_EXPLICIT + (comp * 7 + nbits) * 64 - 1, nbits, choice)
                    i = min(i, m - 1)
            prev_left = 1 if (a >= 0 and i == a) else 0
            idx[yy, xx] = i
            if i == n:
                _code_escape(enc, st, buf, probs, src_a, rec_a, kmaps_a, y, x, q4, 1 if two else 0)
                if two:
                    _code_escape(enc, st, buf, probs, src_b, rec_b, kmaps_b, y, x, q4, 2)
                continue
            k = keys[i]
            if two:
                rec_a[y, x] = k >> 8
                rec_b[y, x] = k & 255
                kmaps_a[y, x] = 0
                kmaps_b[y, x] = 0
            else:
                rec_a[y, x] = k
                kmaps_a[y, x] = 0
    return esc


@njit(cache=True, nogil=True)
def code_frame(
    enc, st, buf, probs, src, rec, ref, ref2, levels, prev_levels, intra_only, ref2_scale, coding, decisions, predictors, stats
):
    """Code one frame: per 64x64 CTU a quadtree of leaves, each leaf a mode and its data.

    ``src``, ``rec``, ``ref``, ``ref2``: (Y, Cb, Cr) planes of the source (when decoding: ``rec``),
    the frame being reconstructed, the first and the second reference; a second vector is predicted
    as ``ref2_scale`` times the first (0: there is no second reference). ``levels`` and
    ``prev_levels``: (Y, Cb, Cr) signed residual levels of this frame and the previously coded one;
    ``levels`` are cleared a CTU row at a time, just before it is coded (the caller swaps the two
    between frames), so a stream that ends early has touched no more of them than it decoded.
    ``coding``: the chunk's ``Coding``. ``decisions``: the frame's ``Decisions`` (read when
    encoding, filled when decoding). ``predictors``: the palette predictor lists, (luma keys,
    their count, chroma keys, their count), updated in place. ``stats``: float64 (STAT_ROWS, 3)
    that the leaves' counts, areas and bits are added to (``_count_leaf``), or an empty array for none:
    the hot path then pays one test per leaf.

    The decoder returns as soon as it has read more than ``MAX_OVERRUN`` bytes past the end of the
    body (the caller reports it): a header cannot make it work through frames its data does not hold.
    """
    h, w = rec[0].shape
    min_block = coding.min_block
    max_block = coding.max_block
    leaf_size = decisions.leaf_size
    stack = np.empty((80, 3), np.int64)  # up to 64 max_block nodes + 3 per level below
    counting = stats.shape[0] > 0
    last = bits_consumed(enc, st) if counting else 0.0  # where the last leaf ended
    start = last
    for cy in range(0, h, CTU):
        levels[0][cy:cy + CTU, :] = 0
        levels[1][cy // 2:(cy + CTU) // 2, :] = 0
        levels[2][cy // 2:(cy + CTU) // 2, :] = 0
        for cx in range(0, w, CTU):
            if not enc and st[OVERRUN] > MAX_OVERRUN:
                return
            # nodes of max_block size covering the CTU, pushed so that they pop in row-major order
            per = CTU // max_block
            sp = 0
            for j in range(per * per - 1, -1, -1):
                stack[sp, 0] = cy + (j // per) * max_block
                stack[sp, 1] = cx + (j % per) * max_block
                stack[sp, 2] = max_block
                sp += 1
            while sp > 0:
                sp -= 1
                y0 = stack[sp, 0]
                x0 = stack[sp, 1]
                s = stack[sp, 2]
                cy8 = y0 // 8
                cx8 = x0 // 8
                split = 0
                if s > min_block:
                    depth = 0
                    t = CTU
                    while t > s:
                        t //= 2
                        depth += 1
                    split = code_bit(enc, st, buf, probs, CTX_SPLIT + depth, 1 if leaf_size[cy8, cx8] < s else 0)
                if split:
                    half = s // 2
                    for j in range(3, -1, -1):  # popped in Z order
                        stack[sp, 0] = y0 + (j // 2) * half
                        stack[sp, 1] = x0 + (j % 2) * half
                        stack[sp, 2] = half
                        sp += 1
                    continue
                if counting:
                    start = bits_consumed(enc, st)
                    stats[STAT_TREE, STAT_BITS] += start - last  # the split flags before this leaf
                _code_leaf(
                    enc, st, buf, probs, src, rec, ref, ref2, levels, prev_levels, intra_only, ref2_scale, coding,
                    decisions, predictors, y0, x0, s,
                )
                if counting:
                    last = bits_consumed(enc, st)
                    _count_leaf(enc, stats, decisions, cy8, cx8, s, last - start)


@njit(cache=True, nogil=True, inline="always")
def _size_bucket(n):
    """Palette size bucket: 1, 2-4, 5-16, 17-64 entries."""
    return 0 if n <= 1 else (1 if n <= 4 else (2 if n <= 16 else 3))


@njit(cache=True, nogil=True)
def _count_leaf(enc, stats, decisions, cy8, cx8, s, bits):
    """Add a coded leaf to ``stats`` (rows ``STAT_*``): its mode, area and bits, and a PALETTE leaf's
    palette sizes and, encoding, where its luma palette came from; an INTER or INTRA leaf's
    transform path."""
    m = decisions.mode[cy8, cx8]
    _add_row(stats, m, s, bits)
    if decisions.cells[cy8, cx8, TRANSFORM] and (m == INTER or m == INTRA):
        _add_row(stats, STAT_TRANSFORM if m == INTER else STAT_INTRA_TRANSFORM, s, bits)
    if m == PALETTE:
        _add_row(stats, STAT_PAL_Y + _size_bucket(decisions.pal_yn[cy8, cx8]), s, bits)
        _add_row(stats, STAT_PAL_C + _size_bucket(decisions.pal_cn[cy8, cx8]), s, bits)
        if decisions.pal_esc[cy8, cx8]:
            _add_row(stats, STAT_PAL_ESCAPE, s, bits)
        if enc:
            _add_row(stats, STAT_PAL_SOURCE + (1 if decisions.pal_gen[cy8, cx8] else 0), s, bits)
            _add_row(stats, STAT_PAL_ESTIMATE, s, decisions.pal_bits[cy8, cx8])


@njit(cache=True, nogil=True, inline="always")
def _add_row(stats, row, s, bits):
    stats[row, STAT_LEAVES] += 1
    stats[row, STAT_AREA] += s * s
    stats[row, STAT_BITS] += bits


@njit(cache=True, nogil=True, inline="always")
def _count_mode(m, nskip, nint, npal):
    if m == SKIP:
        nskip += 1
    elif m == INTER:
        nint += 1
    elif m == PALETTE:
        npal += 1
    return nskip, nint, npal


@njit(cache=True, nogil=True)
def _code_vector_component(enc, st, buf, probs, zero_ctx, mag_ctx, predicted, value):
    """One motion-vector component as a signed difference from its prediction."""
    d = _code_signed(enc, st, buf, probs, zero_ctx, mag_ctx, (value - predicted) if enc else 0)
    return _clamp(predicted + d, -MV_LIMIT, MV_LIMIT)


@njit(cache=True, nogil=True)
def _code_leaf(
    enc, st, buf, probs, src, rec, ref, ref2, levels, prev_levels, intra_only, ref2_scale, coding, decisions, predictors,
    y0, x0, s,
):
    """One leaf of size ``s`` at luma (``y0``, ``x0``): its mode, motion, variant, offset and transform flag, then
    its samples (``code_frame`` describes the arguments)."""
    mode = decisions.mode
    cells = decisions.cells
    cy8 = y0 // 8
    cx8 = x0 // 8
    n8 = s // 8
    # mode, in the context of the left and top neighbours' modes
    nskip = 0
    nint = 0
    npal = 0
    if cx8 > 0:
        nskip, nint, npal = _count_mode(mode[cy8, cx8 - 1], nskip, nint, npal)
    if cy8 > 0:
        nskip, nint, npal = _count_mode(mode[cy8 - 1, cx8], nskip, nint, npal)
    m = mode[cy8, cx8] if enc else INTRA
    if not intra_only:
        if code_bit(enc, st, buf, probs, CTX_SKIP + nskip, 1 if m == SKIP else 0):
            m = SKIP
        elif code_bit(enc, st, buf, probs, CTX_INTER + nint, 1 if m == INTER else 0):
            m = INTER
        else:
            m = PALETTE if code_bit(enc, st, buf, probs, CTX_PALETTE + npal, 1 if m == PALETTE else 0) else INTRA
    else:
        m = PALETTE if code_bit(enc, st, buf, probs, CTX_PALETTE + npal, 1 if m == PALETTE else 0) else INTRA
    left = cells[cy8, cx8 - 1] if cx8 > 0 else cells[cy8, cx8]  # read only where it exists
    top = cells[cy8 - 1, cx8] if cy8 > 0 else cells[cy8, cx8]
    left_is = mode[cy8, cx8 - 1] if cx8 > 0 else -1  # the neighbours' modes, -1 where there is none
    top_is = mode[cy8 - 1, cx8] if cy8 > 0 else -1
    this = cells[cy8, cx8]  # the encoder's decisions; overwritten below with what was coded
    mvy = 0
    mvx = 0
    bi = 0
    my2 = 0
    mx2 = 0
    if m == INTER:
        # predictor: left neighbour's vector if it is inter, else the top one's, else zero
        py = 0
        px = 0
        if left_is == INTER:
            py = left[MV_Y]
            px = left[MV_X]
        elif top_is == INTER:
            py = top[MV_Y]
            px = top[MV_X]
        mvy = _code_vector_component(enc, st, buf, probs, CTX_MV_ZERO, CTX_MV_MAG, py, this[MV_Y])
        mvx = _code_vector_component(enc, st, buf, probs, CTX_MV_ZERO + 1, CTX_MV_MAG + UEG_CONTEXTS, px, this[MV_X])
        if ref2_scale:
            # optional second vector into the second reference, predicted as the first scaled by its distance
            nbi = (1 if left_is == INTER and left[BI] else 0) + (1 if top_is == INTER and top[BI] else 0)
            bi = code_bit(enc, st, buf, probs, CTX_BI + nbi, 1 if enc and this[BI] else 0)
            if bi and ref2_scale < 0:  # a future reference may be used alone (what the past does not show)
                bi += code_bit(enc, st, buf, probs, CTX_ALONE, 1 if enc and this[BI] == ALONE else 0)
            if bi:
                my2 = _code_vector_component(enc, st, buf, probs, CTX_MV2_ZERO, CTX_MV2_MAG, ref2_scale * mvy, this[MV2_Y])
                mx2 = _code_vector_component(
                    enc, st, buf, probs, CTX_MV2_ZERO + 1, CTX_MV2_MAG + UEG_CONTEXTS, ref2_scale * mvx, this[MV2_X]
                )
    variant = 0
    if m == INTER or m == INTRA:
        nvar = (1 if left_is == m and left[VARIANT] else 0) + (1 if top_is == m and top[VARIANT] else 0)
        ctx = CTX_VARIANT + (3 if m == INTRA else 0) + nvar
        want = this[VARIANT] if enc else 0
        variant = code_bit(enc, st, buf, probs, ctx, 1 if want else 0)
        if variant and m == INTER and code_bit(enc, st, buf, probs, CTX_WEIGHT, 1 if want >= 2 else 0):
            variant = 2 + code_bit(enc, st, buf, probs, CTX_WEIGHT + 1, 1 if want == 3 else 0)
    dc = 0
    if m == INTER:
        ndc = (1 if left_is == INTER and left[OFFSET] else 0) + (1 if top_is == INTER and top[OFFSET] else 0)
        dc = _code_signed(enc, st, buf, probs, CTX_DC_ZERO + ndc, CTX_DC_MAG, this[OFFSET] if enc else 0)
    tr = 0
    if variant == 0 and ((m == INTER and coding.transform) or (m == INTRA and coding.intra_transform)):
        ntr = (1 if left_is == m and left[TRANSFORM] else 0) + (1 if top_is == m and top[TRANSFORM] else 0)
        tr = code_bit(enc, st, buf, probs, (CTX_TRANSFORM if m == INTER else CTX_INTRA_TRANSFORM) + ntr,
                      this[TRANSFORM] if enc else 0)
    for yy in range(cy8, cy8 + n8):
        for xx in range(cx8, cx8 + n8):
            decisions.leaf_size[yy, xx] = s
            mode[yy, xx] = m
            cells[yy, xx, MV_Y] = mvy
            cells[yy, xx, MV_X] = mvx
            cells[yy, xx, MV2_Y] = my2
            cells[yy, xx, MV2_X] = mx2
            cells[yy, xx, BI] = bi
            cells[yy, xx, VARIANT] = variant
            cells[yy, xx, OFFSET] = dc
            cells[yy, xx, TRANSFORM] = tr
    src_y, src_u, src_v = src
    rec_y, rec_u, rec_v = rec
    ref_y, ref_u, ref_v = ref
    kmap_y, kmap_u, kmap_v = levels
    c0y = y0 // 2
    c0x = x0 // 2
    cs = s // 2
    if m == SKIP:
        rec_y[y0:y0 + s, x0:x0 + s] = ref_y[y0:y0 + s, x0:x0 + s]
        rec_u[c0y:c0y + cs, c0x:c0x + cs] = ref_u[c0y:c0y + cs, c0x:c0x + cs]
        rec_v[c0y:c0y + cs, c0x:c0x + cs] = ref_v[c0y:c0y + cs, c0x:c0x + cs]
        kmap_y[y0:y0 + s, x0:x0 + s] = 0
        kmap_u[c0y:c0y + cs, c0x:c0x + cs] = 0
        kmap_v[c0y:c0y + cs, c0x:c0x + cs] = 0
    elif m == PALETTE:
        pred_y, npred_y, pred_c, npred_c = predictors
        pal_y, pal_yn, pal_c, pal_cn = decisions.pal_y, decisions.pal_yn, decisions.pal_c, decisions.pal_cn
        keys = np.empty(MAX_PAL, np.int64)
        n = pal_yn[cy8, cx8] if enc else 0
        if enc:
            keys[:n] = pal_y[cy8, cx8, :n]
        n = code_palette(enc, st, buf, probs, keys, n, pred_y, npred_y, False, coding.reuse_runs)
        if n == 0:  # only a damaged stream gets here; keep decoding safely
            keys[0] = 128
            n = 1
        pal_yn[cy8, cx8] = n
        pal_y[cy8, cx8, :n] = keys[:n]
        escapes = coding.escapes
        q4 = coding.q4
        esc = code_indices(
            enc, st, buf, probs, src_y, src_y, rec_y, rec_y, kmap_y, kmap_y, y0, x0, s, keys, n, False, escapes,
            coding.esc_tol, q4,
        )
        keys2 = np.empty(MAX_PAL, np.int64)
        n2 = pal_cn[cy8, cx8] if enc else 0
        if enc:
            keys2[:n2] = pal_c[cy8, cx8, :n2]
        n2 = code_palette(enc, st, buf, probs, keys2, n2, pred_c, npred_c, True, coding.reuse_runs)
        if n2 == 0:
            keys2[0] = 128 * 256 + 128
            n2 = 1
        pal_cn[cy8, cx8] = n2
        pal_c[cy8, cx8, :n2] = keys2[:n2]
        esc += 2 * code_indices(
            enc, st, buf, probs, src_u, src_v, rec_u, rec_v, kmap_u, kmap_v, c0y, c0x, cs, keys2, n2, True, escapes,
            2 * coding.esc_tol, q4,
        )
        decisions.pal_esc[cy8, cx8] = esc
    else:
        ref2_y, ref2_u, ref2_v = ref2
        kprev_y, kprev_u, kprev_v = prev_levels
        q4 = coding.q4
        rounding = coding.rounding
        mot = (np.int64(mvy), np.int64(mvx), np.int64(my2), np.int64(mx2), np.int64(bi))
        code_residual_block(
            enc, st, buf, probs, src_y, rec_y, ref_y, ref2_y, kmap_y, kprev_y, y0, x0, s, q4, rounding, m, variant, 0, mot, dc, tr,
            coding.interp,
        )
        cmot = chroma_motion(mot)
        code_residual_block(
            enc, st, buf, probs, src_u, rec_u, ref_u, ref2_u, kmap_u, kprev_u, c0y, c0x, cs, q4, rounding, m, variant, 1, cmot, 0, 0,
            coding.interp,
        )
        code_residual_block(
            enc, st, buf, probs, src_v, rec_v, ref_v, ref2_v, kmap_v, kprev_v, c0y, c0x, cs, q4, rounding, m, variant, 1, cmot, 0, 0,
            coding.interp,
        )
