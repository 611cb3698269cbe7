"""Sample adaptive offset (bitstream 11): HEVC's in-loop luma filter, one set of offsets per CTU.

After a frame's leaves are coded, each 64x64 CTU of its luma either keeps its reconstruction or
adds one of four offsets to each sample by class: edge offsets sort samples by how they compare
with their two neighbours along one of four directions (a local minimum, a concave corner, a
convex corner, a local maximum), band offsets by their level (four consecutive bands of eight
levels). Quantisation leaves such classes biased: spatial levels round toward zero, sub-blocks and
transform levels are dropped where they cost more than they save, and skipped blocks keep their
prediction's error. The offsets are chosen by the encoder against the source, coded after the
frame's leaves, and applied before the frame serves as a reference (storage/BITSTREAM.md 5.6).

Written here rather than taken from a library: the filter must match the decoder sample for sample
inside the compiled frame loop, which is where every other part of the syntax lives.
"""

import numpy as np
from numba import njit

from palstream.codec.rangecoder import bits_consumed, code_bit, code_bypass
from palstream.codec.syntax import CTU, CTX_SAO_BAND, CTX_SAO_MAG, CTX_SAO_MERGE, CTX_SAO_ON, STAT_BITS, STAT_SAO

# params of a CTU (int64[SAO_FIELDS]): kind (OFF, EDGE + direction, or BAND), the first band, 4 offsets
OFF, EDGE, BAND = 0, 1, 5
SAO_FIELDS = 6
DIRECTIONS = np.array([(0, 1), (1, 0), (1, 1), (1, -1)], np.int64)  # horizontal, vertical, and the two diagonals
BAND_SHIFT = 3  # 32 bands of 8 levels
MAX_OFFSET = 7
EDGE_INDEX = np.array([1, 2, 0, 3, 4], np.int64)  # edge class by the sum of the two signs, -2..2


@njit(cache=True, nogil=True, inline="always")
def _sign(v):
    return np.int64(v > 0) - np.int64(v < 0)  # no branches: the sample loops vectorise


@njit(cache=True, nogil=True, inline="always")
def _edge_index(s):
    """Edge class 0 (none) or 1-4 (a local minimum, a concave corner, a convex corner, a local
    maximum) of a sample whose signs against its two neighbours sum to ``s``."""
    return EDGE_INDEX[s + 2]


@njit(cache=True, nogil=True, inline="always")
def _edge_class_at(pre, y, x, d, h, w):
    """Edge class (``_edge_index``) of the sample at (y, x) along direction ``d``; 0 where a
    neighbour is outside the frame."""
    dy = DIRECTIONS[d, 0]
    dx = DIRECTIONS[d, 1]
    if y - dy < 0 or y + dy >= h or x - abs(dx) < 0 or x + abs(dx) >= w:
        return 0
    c = np.int64(pre[y, x])
    return _edge_index(_sign(c - np.int64(pre[y - dy, x - dx])) + _sign(c - np.int64(pre[y + dy, x + dx])))


@njit(cache=True, nogil=True, inline="always")
def _offset_bits(o):
    """The encoder's estimate of an offset's bits: its truncated unary magnitude (``_choose`` adds a
    band offset's sign)."""
    return abs(o) + (1 if abs(o) < MAX_OFFSET else 0)


@njit(cache=True, nogil=True)
def _choose(src, pre, y0, x0, h, w, lam, left, above, out):
    """Encoder: the params (into ``out``) of the CTU at (``y0``, ``x0``) that minimise squared error
    plus ``lam`` times their estimated bits, among off, its ``left`` and ``above`` neighbours'
    (kind -1 where there is none), each edge direction and the best run of four bands."""
    # per edge direction and class, and per band: sample count and summed error (source - pre)
    count = np.zeros(4 * 5 + 32, np.int64)  # edge classes 0-4 (0: none) by direction, then bands
    total = np.zeros(4 * 5 + 32, np.int64)
    for y in range(y0, min(y0 + CTU, h)):
        for x in range(x0, min(x0 + CTU, w)):
            c = np.int64(pre[y, x])
            e = np.int64(src[y, x]) - c
            b = 20 + (c >> BAND_SHIFT)
            count[b] += 1
            total[b] += e
            if 0 < y < h - 1 and 0 < x < w - 1:  # inside the frame: every direction has both neighbours
                i = _edge_index(_sign(c - np.int64(pre[y, x - 1])) + _sign(c - np.int64(pre[y, x + 1])))
                count[i] += 1
                total[i] += e
                i = 5 + _edge_index(_sign(c - np.int64(pre[y - 1, x])) + _sign(c - np.int64(pre[y + 1, x])))
                count[i] += 1
                total[i] += e
                i = 10 + _edge_index(_sign(c - np.int64(pre[y - 1, x - 1])) + _sign(c - np.int64(pre[y + 1, x + 1])))
                count[i] += 1
                total[i] += e
                i = 15 + _edge_index(_sign(c - np.int64(pre[y - 1, x + 1])) + _sign(c - np.int64(pre[y + 1, x - 1])))
                count[i] += 1
                total[i] += e
            else:
                for d in range(4):
                    i = 5 * d + _edge_class_at(pre, y, x, d, h, w)
                    count[i] += 1
                    total[i] += e
    best = lam * 2.0  # off: a merge flag or two and the on flag
    out[:] = 0
    for d in range(4):
        j = lam * 4.0  # merge flags, on, band flag, two direction bits
        offs = np.zeros(4, np.int64)
        for c in range(4):
            j += _best_offset(count[5 * d + 1 + c], total[5 * d + 1 + c], lam, c < 2, c >= 2, offs, c)
        if j < best:
            best = j
            out[0] = EDGE + d
            out[1] = 0
            out[2:6] = offs
    band_j = np.zeros(32)
    band_o = np.zeros(32, np.int64)
    for b in range(32):
        band_j[b] = _best_offset(count[20 + b], total[20 + b], lam, True, True, band_o, b) + lam  # and its sign
    for b in range(32):
        j = lam * 8.0  # merge flags, on, band flag, 5 bits
        for c in range(4):
            j += band_j[(b + c) & 31]
        if j < best:
            best = j
            out[0] = BAND
            out[1] = b
            for c in range(4):
                out[2 + c] = band_o[(b + c) & 31]
    for cand in (left, above):  # a neighbour's params cost a flag or two, whatever they are
        if cand[0] < 0:
            continue
        j = lam * 1.0 + _params_cost(count, total, cand)
        if j < best:
            best = j
            out[:] = cand


@njit(cache=True, nogil=True, inline="always")
def _best_offset(n, total, lam, up, down, offs, i):
    """Offset (into ``offs[i]``) for ``n`` samples whose error sums to ``total``, positive where
    ``up``, negative where ``down``, that minimises the change of squared error plus ``lam`` times
    its bits; returns that cost (0 or less)."""
    offs[i] = 0
    best = lam * _offset_bits(0)
    if n == 0:
        return best
    for o in range(-MAX_OFFSET if down else 0, MAX_OFFSET + 1 if up else 1):
        j = n * o * o - 2 * o * total + lam * _offset_bits(o)
        if j < best:
            best = j
            offs[i] = o
    return best


@njit(cache=True, nogil=True, inline="always")
def _params_cost(count, total, params):
    """Change of squared error of a CTU (``count``, ``total``: ``_choose``'s) under ``params``."""
    kind = params[0]
    j = 0.0
    if kind == OFF:
        return j
    for c in range(4):
        o = params[2 + c]
        i = 5 * (kind - EDGE) + 1 + c if kind != BAND else 20 + ((params[1] + c) & 31)
        j += count[i] * o * o - 2 * o * total[i]
    return j


@njit(cache=True, nogil=True)
def code_sao(enc, st, buf, probs, src, rec, pre, lam, params, stats):
    """Code the luma offsets of every CTU of a frame and apply them to ``rec``: ``pre`` receives
    the reconstruction before them, which classifies every sample; ``params`` (int64 (h/64, w/64,
    SAO_FIELDS)) the CTUs' params, for the merge flags of the CTUs after them. Per CTU: merge with
    the left, then the above CTU (flags where there is one), else an on flag, then a band flag, the
    first band (5 bypass bits) or the edge direction (2), and four magnitudes, truncated unary up to
    ``MAX_OFFSET``; a band offset's sign follows a non-zero magnitude (bypass), an edge offset's is
    that of its class (minima and concave corners up, the others down). ``lam``: encoder, a bit's worth
    in squared error. ``stats``: as ``syntax.code_frame``'s, whose ``STAT_SAO`` row gets the bits."""
    start = bits_consumed(enc, st) if stats.shape[0] > 0 else 0.0
    h, w = rec.shape
    pre[:, :] = rec
    none = np.full(SAO_FIELDS, -1, np.int64)
    p = np.zeros(SAO_FIELDS, np.int64)
    for cy in range(0, h, CTU):
        for cx in range(0, w, CTU):
            j, i = cy // CTU, cx // CTU
            left = params[j, i - 1] if i > 0 else none
            above = params[j - 1, i] if j > 0 else none
            if enc:
                _choose(src, pre, cy, cx, h, w, lam, left, above, p)
            merged = False
            if i > 0:
                merged = code_bit(enc, st, buf, probs, CTX_SAO_MERGE, 1 if enc and (p == left).all() else 0) == 1
                if merged:
                    p[:] = left
            if not merged and j > 0:
                merged = code_bit(enc, st, buf, probs, CTX_SAO_MERGE + 1, 1 if enc and (p == above).all() else 0) == 1
                if merged:
                    p[:] = above
            if not merged:
                _code_params(enc, st, buf, probs, p)
            params[j, i] = p
            if p[0] != OFF:
                _apply(pre, rec, cy, cx, p)
    if stats.shape[0] > 0:
        stats[STAT_SAO, STAT_BITS] += bits_consumed(enc, st) - start


@njit(cache=True, nogil=True)
def _apply(pre, rec, cy, cx, p):
    """Add the CTU at (``cy``, ``cx``)'s offsets ``p`` to ``rec``, classifying ``pre``; an edge class
    needs both neighbours inside the frame: the samples on its border along the direction keep theirs."""
    h, w = rec.shape
    if p[0] == BAND:
        for y in range(cy, min(cy + CTU, h)):
            for x in range(cx, min(cx + CTU, w)):
                c = np.int64(pre[y, x])
                k = ((c >> BAND_SHIFT) - p[1]) & 31
                if k < 4:
                    rec[y, x] = min(max(c + p[2 + k], 0), 255)
        return
    dy = DIRECTIONS[p[0] - EDGE, 0]
    dx = DIRECTIONS[p[0] - EDGE, 1]
    offset = np.zeros(5, np.int64)  # by edge class, 0 for none
    offset[1:] = p[2:]
    for y in range(max(cy, dy), min(cy + CTU, h - dy)):
        for x in range(max(cx, abs(dx)), min(cx + CTU, w - abs(dx))):
            c = np.int64(pre[y, x])
            k = _edge_index(_sign(c - np.int64(pre[y - dy, x - dx])) + _sign(c - np.int64(pre[y + dy, x + dx])))
            rec[y, x] = min(max(c + offset[k], 0), 255)


@njit(cache=True, nogil=True)
def _code_params(enc, st, buf, probs, p):
    """A CTU's params that merge with neither neighbour (``code_sao``), into ``p`` when decoding."""
    if not code_bit(enc, st, buf, probs, CTX_SAO_ON, 1 if p[0] != OFF else 0):
        p[:] = 0
        return
    band = code_bit(enc, st, buf, probs, CTX_SAO_BAND, 1 if p[0] == BAND else 0)
    v = p[1] if band else p[0] - EDGE
    value = 0
    for b in range(4 if band else 1, -1, -1):
        value = (value << 1) | code_bypass(enc, st, buf, (v >> b) & 1)
    if band:
        p[0] = BAND
        p[1] = value
    else:
        p[0] = EDGE + value
        p[1] = 0
    for c in range(4):
        mag = 0
        o = abs(p[2 + c])
        while mag < MAX_OFFSET and code_bit(enc, st, buf, probs, CTX_SAO_MAG + 7 * (4 if band else c) + mag,
                                            1 if o > mag else 0):
            mag += 1
        neg = c >= 2
        if band and mag:
            neg = code_bypass(enc, st, buf, 1 if p[2 + c] < 0 else 0) == 1
        p[2 + c] = -mag if neg else mag
