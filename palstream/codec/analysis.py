"""Encoder decisions: motion search and the rate-distortion quadtree.

Every candidate leaf (8x8 .. 64x64) is priced as J = D + lambda * R for each mode, with R
estimated from the quantised residual levels or the palette's size and index changes; a node
splits when its four children are cheaper. The decoder never runs any of this.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from palstream.codec.decoder import CODED
from palstream.codec.rangecoder import UEG_CONTEXTS
from palstream.codec.syntax import (
    ALONE,
    BI,
    CELL_FIELDS,
    CTX_ESC_MAG,
    CTX_ESC_ZERO,
    CTX_IDX_LEFT,
    CTX_IDX_TOP,
    CTX_INTER,
    CTX_PAL_CR_MAG,
    CTX_PAL_CR_ZERO,
    CTX_PAL_DELTA,
    CTX_PAL_ESCAPE,
    CTX_PAL_FIRST,
    CTX_PAL_GAP,
    CTX_PAL_NEW,
    CTX_PAL_REUSED,
    CTX_PALETTE,
    CTX_SKIP,
    INTER,
    INTERP_QUARTER,
    INTRA,
    MAX_PAL,
    MED_WEIGHT,
    MV2_X,
    MV2_Y,
    MV_X,
    MV_Y,
    OFFSET,
    PALETTE,
    SKIP,
    TC_ROUNDING,
    TC_SCALE,
    TRANSFORM,
    TRIM_LAMBDA,
    VARIANT,
    _key_distance,
    chroma_motion,
    inter_prediction,
    intra_planar,
    motion_sample,
    transform_levels,
)

ESCAPE_BITS = 6.0  # what an escape costs beyond an index, about: a sample farther than this many bits' worth of error escapes
PROPOSAL_SIZES = (8, 16, 32, 64)  # leaf sizes a batched generator proposes palettes for (``proposal_rows``)
DOMINANT = 8  # entries of the ``dominant`` generator's palettes, which the analysis picks itself (``_palette_clusters``)


@njit(cache=True, nogil=True, inline="always")
def _clamp(v, lo, hi):
    return lo if v < lo else (hi if v > hi else v)


@njit(cache=True, nogil=True, inline="always")
def _sort_prefix(keys, n):
    """Insertion sort of ``keys[:n]`` in place: palettes hold a few keys, mostly in order already."""
    for i in range(1, n):
        key = keys[i]
        j = i - 1
        while j >= 0 and keys[j] > key:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = key


@njit(cache=True, nogil=True)
def _sad8(cur, ref, y0, x0, my, mx, bound):
    """SAD of an 8x8 block against ``ref`` displaced by a half-pel vector, sampled bilinearly
    whatever the chunk's filter (the search only ranks vectors; ``decide`` prices the filter's
    prediction); stops early once it reaches ``bound`` (the caller only wants candidates below it)."""
    h, w = ref.shape
    iy = y0 + (my >> 1)
    ix = x0 + (mx >> 1)
    fy = my & 1
    fx = mx & 1
    inside = iy >= 0 and ix >= 0 and iy + 8 + fy <= h and ix + 8 + fx <= w
    s = 0
    for y in range(8):
        if inside:  # syntax.motion_sample without the clamping
            r0 = iy + y
            r1 = r0 + fy
            for x in range(8):
                c0 = ix + x
                c1 = c0 + fx
                p = (np.int64(ref[r0, c0]) + np.int64(ref[r0, c1]) + np.int64(ref[r1, c0]) + np.int64(ref[r1, c1]) + 2) >> 2
                s += abs(np.int64(cur[y0 + y, x0 + x]) - p)
        else:
            for x in range(8):
                s += abs(np.int64(cur[y0 + y, x0 + x]) - motion_sample(ref, y0 + y, x0 + x, my, mx, False))
        if s >= bound:
            break
    return s


GOOD_SAD = 2 * 64  # an 8x8 match this close needs no wider search
NEIGHBOURS = np.array([[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]])


@njit(cache=True, nogil=True)
def motion_search(cur, ref, prev_mv, search_range, grid=True):
    """Half-pel motion vector per 8x8 luma block.

    Candidates: zero, the neighbours' and the last frame's vectors, and a coarse grid where
    those match poorly; then a descent over whole-pixel and half-pixel neighbours.
    Vectors are in half-pel units, at most ``search_range`` pixels in each direction.
    """
    h, w = cur.shape
    h8 = h // 8
    w8 = w // 8
    mv = np.zeros((h8, w8, 2), np.int32)
    if search_range == 0:
        return mv
    lim = 2 * search_range
    step = 2 * max(1, search_range // 2)
    cands = np.empty((8, 2), np.int64)
    for by in range(h8):
        for bx in range(w8):
            n = 0
            cands[n, 0] = 0
            cands[n, 1] = 0
            n += 1
            if bx > 0:
                cands[n, 0] = mv[by, bx - 1, 0]
                cands[n, 1] = mv[by, bx - 1, 1]
                n += 1
            if by > 0:
                cands[n, 0] = mv[by - 1, bx, 0]
                cands[n, 1] = mv[by - 1, bx, 1]
                n += 1
                if bx + 1 < w8:
                    cands[n, 0] = mv[by - 1, bx + 1, 0]
                    cands[n, 1] = mv[by - 1, bx + 1, 1]
                    n += 1
            cands[n, 0] = prev_mv[by, bx, 0]
            cands[n, 1] = prev_mv[by, bx, 1]
            n += 1
            best = np.int64(1) << 60
            bdy = 0
            bdx = 0
            for i in range(n):
                dy = _clamp(cands[i, 0], -lim, lim)
                dx = _clamp(cands[i, 1], -lim, lim)
                c = _sad8(cur, ref, by * 8, bx * 8, dy, dx, best - abs(dy) - abs(dx)) + abs(dy) + abs(dx)
                if c < best:
                    best = c
                    bdy = dy
                    bdx = dx
            if grid and best > GOOD_SAD:
                # the predictors missed: try a coarse grid of whole-pixel vectors
                for gy in range(-lim, lim + 1, step):
                    for gx in range(-lim, lim + 1, step):
                        c = _sad8(cur, ref, by * 8, bx * 8, gy, gx, best - abs(gy) - abs(gx)) + abs(gy) + abs(gx)
                        if c < best:
                            best = c
                            bdy = gy
                            bdx = gx
            # descend: whole pixels, then half pixels, while a neighbour is better
            for stride in (2, 1):
                moved = True
                rounds = 0
                while moved and rounds < 8:
                    moved = False
                    rounds += 1
                    cy = bdy
                    cx = bdx
                    for k in range(8):
                        dy = cy + stride * NEIGHBOURS[k, 0]
                        dx = cx + stride * NEIGHBOURS[k, 1]
                        if abs(dy) <= lim and abs(dx) <= lim:
                            c = _sad8(cur, ref, by * 8, bx * 8, dy, dx, best - abs(dy) - abs(dx)) + abs(dy) + abs(dx)
                            if c < best:
                                best = c
                                bdy = dy
                                bdx = dx
                                moved = True
            mv[by, bx, 0] = bdy
            mv[by, bx, 1] = bdx
    return mv


# Bitstream 6: a frame's second reference is 2, 3 or 4 frames back. Frames whose number is a
# multiple of 4 are coded with the finest step (decoder.frame_coding), so by default each frame averages
# the previous one with the nearest such frame before it, or with frame f - 2 where that is one of them.
SECOND_REFERENCE = (4, 3, 2, 3)  # by f % 4
# ... unless frame f - 2 matches clearly better (fast motion, animation drawn on twos): its summed SAD
# along the first vectors scaled below this share of the layered reference's along its own vectors
PREFER_NEAR = 0.8


@njit(cache=True, nogil=True)
def _scaled_sad(cur, ref, mv, scale, search_range):
    """Summed SAD of the 8x8 blocks of ``cur`` against ``ref`` along ``scale`` times their vectors."""
    lim = 2 * search_range
    total = 0
    for by in range(mv.shape[0]):
        for bx in range(mv.shape[1]):
            total += _sad8(cur, ref, by * 8, bx * 8, _clamp(scale * mv[by, bx, 0], -lim, lim),
                           _clamp(scale * mv[by, bx, 1], -lim, lim), np.int64(1) << 60)
    return total


@njit(cache=True, nogil=True)
def _scaled_field(mv, num, den):
    """``mv`` times num / den, rounded (a candidate for a search at another distance)."""
    out = np.empty_like(mv)
    for i in range(mv.shape[0]):
        for j in range(mv.shape[1]):
            for k in range(2):
                out[i, j, k] = (2 * num * mv[i, j, k] + den) // (2 * den)
    return out


@njit(cache=True, nogil=True)
def motion_search_chunk(luma, search_range, searches):
    """Motion field of every frame between source frames, and each display-order frame's
    second-reference distance. ``searches``: int64 rows (frame, first reference, second reference,
    scale), one a frame in the order to search them (``decoder.Step``; the second reference -1
    for none, ``decoder.CODED`` for a display-order frame, whose distance this chooses by
    ``SECOND_REFERENCE`` and ``PREFER_NEAR``). Per 8x8 cell: the vector into the first reference
    (over the range times its distance; the frame searched before supplies candidates, scaled to
    this distance) and the vector into the second (searched around the first times ``scale``, over
    the range times its distance), in half-pels, as the first four fields of a cell record (MV_Y,
    MV_X, MV2_Y, MV2_X); zero where there is no such frame."""
    t, h, w = luma.shape
    field = np.zeros((t, h // 8, w // 8, BI), np.int32)
    distances = np.zeros(t, np.int64)
    last, last_d = 0, 1
    for i in range(searches.shape[0]):
        f, r, r2, scale = searches[i, 0], searches[i, 1], searches[i, 2], searches[i, 3]
        if r < 0:
            continue
        d = f - r
        hint = _scaled_field(field[last, :, :, MV_Y:MV_X + 1], d, last_d)
        first = motion_search(luma[f], luma[r], hint, abs(d) * search_range)
        field[f, :, :, MV_Y:MV_X + 1] = first
        last, last_d = f, d
        if r2 == CODED:
            d2 = min(SECOND_REFERENCE[f % 4], f)
            # around the first vector scaled, no grid: noise, not motion, is what averaging removes
            second = motion_search(luma[f], luma[f - d2], d2 * first, d2 * search_range, False)
            if d2 != 2 and (_scaled_sad(luma[f], luma[f - 2], first, 2, 2 * search_range)
                            < PREFER_NEAR * _scaled_sad(luma[f], luma[f - d2], second, 1, d2 * search_range)):
                d2 = 2
                second = motion_search(luma[f], luma[f - 2], 2 * first, 2 * search_range, False)
            field[f, :, :, MV2_Y:MV2_X + 1] = second
            distances[f] = d2
        elif r2 >= 0:  # a future reference, which may be used alone, is searched widely where the candidates miss
            field[f, :, :, MV2_Y:MV2_X + 1] = motion_search(luma[f], luma[r2], scale * first,
                                                            abs(f - r2) * search_range, scale < 0)
    return field, distances


@njit(cache=True, nogil=True)
def _sad8_quarter(cur, ref, y0, x0, qy, qx, bound, scratch):
    """``_sad8`` for a quarter-pel vector: the mean, rounded up, of two bilinear half-pel samples
    (``syntax._quarter_block``'s pair), whatever the chunk's filter."""
    if not (qy | qx) & 1:
        return _sad8(cur, ref, y0, x0, qy >> 1, qx >> 1, bound)
    h, w = ref.shape
    ay = qy >> 1
    by = (qy + 1) >> 1
    ax = qx >> 1
    bx = (qx + 1) >> 1
    if qy & 1 and qx & 1 and (ay & 1) == (ax & 1):
        ax, bx = bx, ax
    iay = y0 + (ay >> 1)
    iax = x0 + (ax >> 1)
    iby = y0 + (by >> 1)
    ibx = x0 + (bx >> 1)
    fay = ay & 1
    fax = ax & 1
    fby = by & 1
    fbx = bx & 1
    s = 0
    if min(iay, iby) < 0 or min(iax, ibx) < 0 or max(iay + fay, iby + fby) + 8 > h or max(iax + fax, ibx + fbx) + 8 > w:
        pred = inter_prediction(ref, ref, y0, x0, 8, (qy, qx, np.int64(0), np.int64(0), np.int64(0)), INTERP_QUARTER, scratch)
        for y in range(8):
            for x in range(8):
                s += abs(np.int64(cur[y0 + y, x0 + x]) - np.int64(pred[y, x]))
        return s
    for y in range(8):
        a0 = iay + y
        a1 = a0 + fay
        b0 = iby + y
        b1 = b0 + fby
        for x in range(8):
            c0 = iax + x
            c1 = c0 + fax
            d0 = ibx + x
            d1 = d0 + fbx
            a = (np.int64(ref[a0, c0]) + np.int64(ref[a0, c1]) + np.int64(ref[a1, c0]) + np.int64(ref[a1, c1]) + 2) >> 2
            b = (np.int64(ref[b0, d0]) + np.int64(ref[b0, d1]) + np.int64(ref[b1, d0]) + np.int64(ref[b1, d1]) + 2) >> 2
            s += abs(np.int64(cur[y0 + y, x0 + x]) - ((a + b + 1) >> 1))
        if s >= bound:
            break
    return s


@njit(cache=True, nogil=True)
def _refine_quarter(cur, ref, vectors, scratch):
    """``vectors`` (h/8, w/8, 2), half-pel on entry, each replaced by the quarter-pel vector within
    one quarter of it whose 8x8 block matches ``cur`` best (``_sad8_quarter`` plus half the
    vector's length in quarter-pels, as the half-pel search ranks): the four quarter-pel steps
    along the axes, then the diagonal step that combines the better vertical and horizontal one
    where both gain (five SADs for eight: the refinement was 7 % of rocket's encode). Returns the
    SADs summed over the blocks before and after."""
    before = 0
    after = 0
    for by in range(vectors.shape[0]):
        for bx in range(vectors.shape[1]):
            qy = 2 * np.int64(vectors[by, bx, 0])
            qx = 2 * np.int64(vectors[by, bx, 1])
            sad = _sad8_quarter(cur, ref, 8 * by, 8 * bx, qy, qx, np.int64(1) << 60, scratch)
            before += sad
            centre = 2 * sad + abs(qy) + abs(qx)
            best = centre
            bsad = sad
            sy = 0  # the better vertical and horizontal steps, 0 where neither gains
            sx = 0
            jy = centre
            jx = centre
            for k in range(4 if sad else 0):  # an exact match stays where it is
                dy = (-1, 1, 0, 0)[k]
                dx = (0, 0, -1, 1)[k]
                length = abs(qy + dy) + abs(qx + dx)
                s = _sad8_quarter(cur, ref, 8 * by, 8 * bx, qy + dy, qx + dx, (centre - length + 1) // 2, scratch)
                j = 2 * s + length
                if dy and j < jy:
                    jy = j
                    sy = dy
                if dx and j < jx:
                    jx = j
                    sx = dx
                if j < best:
                    best = j
                    bsad = s
            ry = sy if jy <= jx else 0  # the better single step
            rx = sx if jx < jy else 0
            if sy and sx:
                length = abs(qy + sy) + abs(qx + sx)
                s = _sad8_quarter(cur, ref, 8 * by, 8 * bx, qy + sy, qx + sx, (best - length + 1) // 2, scratch)
                if 2 * s + length < best:
                    bsad = s
                    ry = sy
                    rx = sx
            after += bsad
            vectors[by, bx, 0] = qy + ry
            vectors[by, bx, 1] = qx + rx
    return before, after


@njit(cache=True, nogil=True)
def refine_quarter(luma, field, searches, distances, second):
    """The first vectors (and with ``second`` the second ones) of the frames that ``searches``'
    rows name (``motion_search_chunk``'s arguments; ``distances`` its result) refined in ``field``
    to quarter-pels (``_refine_quarter``); returns the SADs of their first vectors summed before
    and after."""
    scratch = np.empty((3, 8, 8), np.int32)
    before = 0
    after = 0
    for i in range(searches.shape[0]):
        f, r, r2 = searches[i, 0], searches[i, 1], searches[i, 2]
        if r < 0:
            continue
        b, a = _refine_quarter(luma[f], luma[r], field[f, :, :, MV_Y:MV_X + 1], scratch)
        before += b
        after += a
        r2 = f - distances[f] if r2 == CODED else r2
        if second and r2 >= 0 and r2 != f:
            _refine_quarter(luma[f], luma[r2], field[f, :, :, MV2_Y:MV2_X + 1], scratch)
    return before, after


@njit(cache=True, nogil=True)
def subpel_errors(luma, field, refs, quarter):
    """Squared error of the first reference's prediction of every 8x8 luma cell that a vector moves
    by a fraction of a pixel, summed over the frames, bilinear (0) and by ``syntax.SHARP`` (1): the
    encoder's choice of filter for a chunk (``chunk._sharp_pays``). ``field``:
    ``motion_search_chunk``'s, in quarter-pels with ``quarter`` (``refine_quarter``); ``refs``: each
    frame's first reference, -1 for none; both on source frames."""
    fraction = 3 if quarter else 1
    t, h, w = luma.shape
    errors = np.zeros(2)
    scratch = np.empty((3, 8, 8), np.int32)
    for f in range(t):
        if refs[f] < 0:
            continue
        for cy in range(h // 8):
            for cx in range(w // 8):
                mot = (np.int64(field[f, cy, cx, MV_Y]), np.int64(field[f, cy, cx, MV_X]), np.int64(0), np.int64(0),
                       np.int64(0))
                if (mot[MV_Y] | mot[MV_X]) & fraction == 0:  # whole pixels: both filters copy
                    continue
                for sharp in range(2):
                    interp = sharp | (INTERP_QUARTER if quarter else 0)
                    pred = inter_prediction(luma[refs[f]], luma[refs[f]], 8 * cy, 8 * cx, 8, mot, interp, scratch)
                    for y in range(8):
                        for x in range(8):
                            d = np.int64(luma[f, 8 * cy + y, 8 * cx + x]) - np.int64(pred[y, x])
                            errors[sharp] += d * d
    return errors


def residual_cost_table(q4: int, rnd4: int, lam: float, dweight: float) -> np.ndarray:
    """J(e) for every prediction error e in -255..255: distortion after quantising with step q4/4,
    plus lambda times the estimated bits of its level."""
    e = np.arange(-255, 256)
    k = (4 * np.abs(e) + rnd4) // q4
    d = (np.abs(e) - ((k * q4 + 2) >> 2)) ** 2
    bits = np.where(k == 0, 0.3, 3.0 + 2.0 * np.log2(np.maximum(k, 1)))
    return dweight * d + lam * bits


@njit(cache=True, nogil=True)
def _intra_errors(src, amp4):
    """Intra prediction errors of every pixel, MED (0) and four-neighbour mean (1), the MED
    prediction itself (for combined inter/intra) and the offset source (for the INTRA transform's
    prediction): estimates of the syntax's predictions from the
    source's neighbours plus a fixed pseudo-random offset, uniform in +-amp4/8 (the decoder
    predicts from neighbours that carry quantisation error, which MED passes on and averaging
    damps); top-right always available."""
    h, w = src.shape
    noisy = np.empty((h, w), np.int32)
    for y in range(h):
        for x in range(w):
            hsh = ((y * 73856093) ^ (x * 19349663)) & 1023
            noisy[y, x] = np.int32(src[y, x]) + (((hsh - 512) * amp4 + 2048) >> 12)
    e = np.empty((2, h, w), np.int16)  # small types: these planes are fresh memory every frame
    med = np.empty((h, w), np.int16)
    for y in range(h):
        for x in range(w):
            if y == 0 and x == 0:
                p = 128
                q = p
            elif y == 0:
                p = np.int64(noisy[y, x - 1])
                q = p
            elif x == 0:
                p = np.int64(noisy[y - 1, x])
                q = p
            else:
                a = np.int64(noisy[y, x - 1])
                b = np.int64(noisy[y - 1, x])
                c = np.int64(noisy[y - 1, x - 1])
                d = np.int64(noisy[y - 1, x + 1]) if x + 1 < w else b
                if c >= max(a, b):
                    p = min(a, b)
                elif c <= min(a, b):
                    p = max(a, b)
                else:
                    p = a + b - c
                q = (a + b + c + d + 2) >> 2
            med[y, x] = p
            e[0, y, x] = np.int64(src[y, x]) - p
            e[1, y, x] = np.int64(src[y, x]) - q
    return e, med, noisy


@njit(cache=True, nogil=True)
def _block_cost(err, table, y0, x0, s):
    t = 0.0
    for y in range(y0, y0 + s):
        for x in range(x0, x0 + s):
            t += table[err[y, x] + 255]
    return t


@njit(cache=True, nogil=True)
def _inter_cost(cur, med, ref, ref2, table, y0, x0, s, mot, interp, scratch, out):
    """Adds the cost of a block's inter prediction under each INTER variant (its combinations
    with estimated MED, ``syntax.MED_WEIGHT``) to ``out``."""
    pred = inter_prediction(ref, ref2, y0, x0, s, mot, interp, scratch)
    plain = 0.0
    close = True  # every error is -1, 0 or 1
    o1, o2, o3 = out[1], out[2], out[3]  # one pass prices every variant: a second read the block again
    for y in range(s):
        for x in range(s):
            c = np.int64(cur[y0 + y, x0 + x]) + 255
            p = np.int64(pred[y, x])
            m = np.int64(med[y0 + y, x0 + x])
            e = c - p
            plain += table[e]
            close = close and 254 <= e <= 256
            o1 += table[c - ((p + m + 1) >> 1)]
            o2 += table[c - ((3 * p + m + 2) >> 2)]
            o3 += table[c - ((p + 3 * m + 2) >> 2)]
    out[0] += plain
    if close:  # errors of at most 1 leave a variant next to nothing to gain (much of a screen recording)
        for v in range(1, 4):
            out[v] += plain
    else:
        out[1] = o1
        out[2] = o2
        out[3] = o3


@njit(cache=True, nogil=True)
def _offset_cost(cur, med, pred, table, lam, y0, x0, s, wm, d):
    """Luma cost of an INTER leaf's prediction ``pred`` with offset ``d`` and MED weight ``wm``, and the offset's rate."""
    j = lam * (0.5 if d == 0 else 3.0 + 2.0 * np.log2(abs(d)))
    for y in range(s):
        for x in range(s):
            p = min(max(np.int64(pred[y, x]) + d, 0), 255)
            if wm:
                p = ((4 - wm) * p + wm * np.int64(med[y0 + y, x0 + x]) + 2) >> 2
            j += table[np.int64(cur[y0 + y, x0 + x]) - p + 255]
    return j


@njit(cache=True, nogil=True)
def _offset_gain(cur, med, ref, ref2, table, lam, y0, x0, s, mot, variant, interp, scratch):
    """RD-best luma offset of an INTER leaf (added to the motion-compensated prediction before
    any MED mix) and the change of the leaf's luma cost it brings: the mean error's offset and
    its neighbours, priced with ``table``, against no offset."""
    pred = inter_prediction(ref, ref2, y0, x0, s, mot, interp, scratch)
    total = 0
    for y in range(s):
        for x in range(s):
            total += np.int64(cur[y0 + y, x0 + x]) - np.int64(pred[y, x])
    centre = int(np.floor(total / (s * s) + 0.5))
    if centre == 0:  # a mean error under half a level: an offset rarely pays for itself
        return 0, 0.0
    wm = MED_WEIGHT[variant]
    jzero = _offset_cost(cur, med, pred, table, lam, y0, x0, s, wm, 0)
    best = 0
    jbest = jzero
    for d in range(centre - 1, centre + 2):
        if d != 0:
            j = _offset_cost(cur, med, pred, table, lam, y0, x0, s, wm, d)
            if j < jbest:
                jbest = j
                best = d
    return best, jbest - jzero


@njit(cache=True, nogil=True)
def _cell_inter_cost(cur, med, ref, ref2, table, cy8, cx8, mot, interp, scratch, out):
    """Inter costs (each INTER variant) of one 8x8 luma cell and its 4x4 chroma cells under
    motion ``mot`` (interpolated as ``interp``: ``syntax.Coding.interp``), into ``out`` (``cur``, ``med``,
    ``ref``, ``ref2``: the (Y, Cb, Cr) planes; ``scratch``: int32[2, 8, 8] for the predictions)."""
    cmot = chroma_motion(mot)
    for v in range(4):
        out[v] = 0.0
    _inter_cost(cur[0], med[0], ref[0], ref2[0], table, 8 * cy8, 8 * cx8, 8, mot, interp, scratch, out)
    _inter_cost(cur[1], med[1], ref[1], ref2[1], table, 4 * cy8, 4 * cx8, 4, cmot, interp, scratch, out)
    _inter_cost(cur[2], med[2], ref[2], ref2[2], table, 4 * cy8, 4 * cx8, 4, cmot, interp, scratch, out)


@njit(cache=True, nogil=True, inline="always")
def _cell_motion(field, cy8, cx8, bi):
    """Motion tuple of a cell: its vector, and with ``bi`` (1 or ``ALONE``) its second one."""
    if bi:
        return (np.int64(field[cy8, cx8, MV_Y]), np.int64(field[cy8, cx8, MV_X]), np.int64(field[cy8, cx8, MV2_Y]),
                np.int64(field[cy8, cx8, MV2_X]), np.int64(bi))
    return (np.int64(field[cy8, cx8, MV_Y]), np.int64(field[cy8, cx8, MV_X]), np.int64(0), np.int64(0), np.int64(0))


@njit(cache=True, nogil=True)
def _skip_sse(cur, ref, y0, x0, s):
    t = 0
    for y in range(y0, y0 + s):
        for x in range(x0, x0 + s):
            d = np.int64(cur[y, x]) - np.int64(ref[y, x])
            t += d * d
    return t


@njit(cache=True, nogil=True)
def _change_sums(keys2d):
    """Running sums that count, for any block, the pixels whose value differs from both the
    left and the top neighbour inside the block (``_transitions``) without visiting its pixels:
    2-D sums of 'differs from both', sums down each column of 'differs from the top' and along
    each row of 'differs from the left'."""
    h, w = keys2d.shape
    both = np.zeros((h + 1, w + 1), np.int32)
    down = np.zeros((h + 1, w), np.int32)
    along = np.zeros((h, w + 1), np.int32)
    for y in range(h):
        for x in range(w):
            k = keys2d[y, x]
            left = x > 0 and keys2d[y, x - 1] != k
            top = y > 0 and keys2d[y - 1, x] != k
            both[y + 1, x + 1] = both[y, x + 1] + both[y + 1, x] - both[y, x] + (1 if left and top else 0)
            down[y + 1, x] = down[y, x] + (1 if top else 0)
            along[y, x + 1] = along[y, x] + (1 if left else 0)
    return both, down, along


@njit(cache=True, nogil=True, inline="always")
def _transitions(changes, y0, x0, s):
    """Pixels of the block whose value differs from both its left and its top neighbour in the
    block (index changes); the block's left column and top row have no such neighbour to match."""
    both, down, along = changes
    y1 = y0 + s
    x1 = x0 + s
    inner = both[y1, x1] - both[y0 + 1, x1] - both[y1, x0 + 1] + both[y0 + 1, x0 + 1]
    return 1 + (down[y1, x0] - down[y0 + 1, x0]) + (along[y0, x1] - along[y0, x0 + 1]) + inner


@njit(cache=True, nogil=True, inline="always")
def _left_changes(changes, y0, x0, s):
    """Pixels of the block, left column aside, whose value differs from the left neighbour's."""
    along = changes[2]
    t = 0
    for y in range(y0, y0 + s):
        t += along[y, x0 + s] - along[y, x0 + 1]
    return t


@njit(cache=True, nogil=True, inline="always")
def _bit_cost(probs, ctx, bit):
    """Bits a binary decision costs in context ``ctx`` at the coder's current probabilities."""
    p0 = (probs[ctx, 0] + probs[ctx, 1]) / 65536.0
    return -math.log2(p0 if bit == 0 else 1.0 - p0)


@njit(cache=True, nogil=True)
def _ueg_cost(probs, base, v):
    """Bits of ``rangecoder.code_ueg(base, v)`` at the current probabilities."""
    if v == 0:
        return _bit_cost(probs, base, 0)
    e = 0
    t = v
    while t:
        e += 1
        t >>= 1
    c = 0.0
    for i in range(min(e, 20)):
        c += _bit_cost(probs, base + i, 1)
    if e < 20:
        c += _bit_cost(probs, base + e, 0)
    for j in range(e - 2, -1, -1):
        c += _bit_cost(probs, base + 21 + 20 * e + j, (v >> j) & 1)
    return c


@njit(cache=True, nogil=True, inline="always")
def _fresh(probs, ctx):
    """Whether context ``ctx`` has coded nothing yet in the chunk."""
    return probs[ctx, 0] == 16384 and probs[ctx, 1] == 16384


@njit(cache=True, nogil=True, inline="always")
def _adaptive_cost(ones, zeros):
    """Bits of ``ones`` 1s and ``zeros`` 0s in a context that learns them as it goes: their
    entropy plus about what learning costs (half a bit per doubling of the count, and one); the
    static price of a context that has not seen such decisions yet is far above it."""
    n = ones + zeros
    if n == 0:
        return 0.0
    h = 0.0
    if ones and zeros:
        p = ones / n
        h = -n * (p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))
    return h + 0.5 * math.log2(n + 1.0) + 1.0


@njit(cache=True, nogil=True)
def _tree_cost(probs, base, n, v):
    """Bits of ``rangecoder.code_tree(base, n, v)`` at the current probabilities."""
    node = 1
    c = 0.0
    for i in range(n - 1, -1, -1):
        b = (v >> i) & 1
        c += _bit_cost(probs, base + node, b)
        node = 2 * node + b
    return c


FRAME_COLOURS = 16  # the frame's most frequent values and colours, which its palettes will mostly have put in the predictor list
# rows of ``palette_coder``'s price table: new entries (``_entry_table``), escapes (``_escape_table``),
# per list the count of reused entries and the gaps between them, and (``_flag_prices``) the flags
# that the escape flag, the index map and a Cr difference cost
ENTRY_ROW = 0
ESCAPE_ROW = 6
REUSED_ROW = 9
GAP_ROW = 11
FLAG_ROW = 13
PRICE_ROWS = 14
# columns of FLAG_ROW, per component (luma at 0, chroma at FLAG_COLUMNS), then the Cr difference's flag
ESC_FLAG = 0  # the escape flag at 0, at 1
LEFT_REPEAT = 2  # an index the same as the left's
LEFT_OTHER = 3  # not the same as the left's
TOP_REPEAT = 4  # the same as the top's
TOP_OTHER = 5  # not the same as the top's
LEFT_FRESH = 6  # 1.0 where the 'same as left' context has coded nothing yet
TOP_FRESH = 7  # likewise the 'same as top' context
FLAG_COLUMNS = 8
CR_SAME = 2 * FLAG_COLUMNS  # a chroma entry's Cr the same as the previous entry's, not the same


def palette_coder(probs: np.ndarray, predictors: tuple, src: tuple, intra_only: bool) -> tuple:
    """What ``_price_palette`` prices palettes with in a frame: the coder's probabilities as the
    frame starts, each key's position in the palette predictor lists (-1: not there), per list
    the bits of each count of reused entries and of each gap between them (``syntax.code_palette``),
    and the bits of the leaf's mode flags (SKIP and INTER at 0 unless ``intra_only``, PALETTE at
    1), with one neighbour of the leaf's mode and one SKIP (INTRA in an intra-only frame).

    The lists are priced as the frame's palettes will find them: as the frame starts, then the
    frame's ``FRAME_COLOURS`` most frequent luma values and (Cb, Cr) colours of ``src`` (the
    source planes), which the first palettes coded put there (the first frame starts with empty
    lists).

    Returns (prices: rows ``ENTRY_ROW`` to ``FLAG_ROW``, positions: luma and chroma, indexed by
    key, the mode flags' bits): each array a kernel takes costs it reference counting per call,
    and the flags' ``log2`` per block cost more than looking them up."""
    pos = np.full((2, 65536), -1, np.int32)
    prices = np.zeros((PRICE_ROWS, 256))
    prices[ENTRY_ROW:ESCAPE_ROW] = _entry_table(probs)
    prices[ESCAPE_ROW:REUSED_ROW] = _escape_table(probs)
    _predictor_prices(probs, predictors, src, pos, prices[REUSED_ROW:FLAG_ROW])
    _flag_prices(probs, prices[FLAG_ROW])
    p0 = probs.sum(1, dtype=np.int64) / 65536.0
    mode = -math.log2(1.0 - p0[CTX_PALETTE + 1])
    if not intra_only:
        mode -= math.log2(p0[CTX_SKIP + 1]) + math.log2(p0[CTX_INTER])
    return prices, pos, mode


@njit(cache=True, nogil=True)
def _flag_prices(probs, out):
    """``palette_coder``'s ``FLAG_ROW``: the bits of the escape flag and the index map's flags per
    component, and of the Cr difference's flag, at the probabilities as the frame starts."""
    for comp in range(2):
        at = comp * FLAG_COLUMNS
        left = CTX_IDX_LEFT + comp * 6
        top = CTX_IDX_TOP + comp * 3 + 1
        out[at + ESC_FLAG] = _bit_cost(probs, CTX_PAL_ESCAPE + comp, 0)
        out[at + ESC_FLAG + 1] = _bit_cost(probs, CTX_PAL_ESCAPE + comp, 1)
        out[at + LEFT_REPEAT] = _bit_cost(probs, left + 1, 1)
        out[at + LEFT_OTHER] = _bit_cost(probs, left + 4, 0)
        out[at + TOP_REPEAT] = _bit_cost(probs, top, 1)
        out[at + TOP_OTHER] = _bit_cost(probs, top, 0)
        out[at + LEFT_FRESH] = 1.0 if _fresh(probs, left + 1) else 0.0
        out[at + TOP_FRESH] = 1.0 if _fresh(probs, top) else 0.0
    out[CR_SAME] = _bit_cost(probs, CTX_PAL_CR_ZERO, 0)
    out[CR_SAME + 1] = _bit_cost(probs, CTX_PAL_CR_ZERO, 1)


@njit(cache=True, nogil=True)
def _predictor_prices(probs, predictors, src, pos, reuse):
    """``palette_coder``'s predictor lists, into ``pos`` (luma, chroma; the frame's colours counted
    on every other row and column), and into ``reuse`` the bits of each count of reused entries
    (rows 0, 1: luma, chroma) and of each gap before one (rows 2, 3)."""
    pred_y, npred_y, pred_c, npred_c = predictors
    hist_y = np.zeros(256, np.int64)
    hist_c = np.zeros(65536, np.int64)
    for y in range(0, src[0].shape[0], 2):
        for x in range(0, src[0].shape[1], 2):
            hist_y[src[0][y, x]] += 1
    for y in range(0, src[1].shape[0], 2):
        for x in range(0, src[1].shape[1], 2):
            hist_c[np.int64(src[1][y, x]) * 256 + src[2][y, x]] += 1
    for comp in range(2):
        pred = pred_c if comp else pred_y
        npred = npred_c[0] if comp else npred_y[0]
        hist = hist_c if comp else hist_y
        for i in range(npred):
            pos[comp, pred[i]] = i
        for _ in range(FRAME_COLOURS):
            key = np.argmax(hist)
            if hist[key] == 0 or npred >= MAX_PAL:
                break
            hist[key] = 0
            if pos[comp, key] < 0:
                pos[comp, key] = npred
                npred += 1
        for v in range(MAX_PAL + 1):
            reuse[comp, v] = _ueg_cost(probs, CTX_PAL_REUSED + comp * UEG_CONTEXTS, v)
            reuse[2 + comp, v] = _ueg_cost(probs, CTX_PAL_GAP + comp * UEG_CONTEXTS, v)


@njit(cache=True, nogil=True)
def _entry_table(probs):
    """Bits of the values ``syntax.code_palette`` codes for new entries, 0..255, looked up per
    entry: a luma palette's first new level (row 0), a luma delta (1), a Cb delta (2), the count
    of new luma and chroma entries (3, 4), a Cr difference's magnitude less one with its sign (5)."""
    table = np.empty((6, 256))
    for v in range(256):
        table[0, v] = _tree_cost(probs, CTX_PAL_FIRST - 1, 8, v)
        table[1, v] = _ueg_cost(probs, CTX_PAL_DELTA, v)
        table[2, v] = _ueg_cost(probs, CTX_PAL_DELTA + UEG_CONTEXTS, v)
        table[3, v] = _ueg_cost(probs, CTX_PAL_NEW, v)
        table[4, v] = _ueg_cost(probs, CTX_PAL_NEW + UEG_CONTEXTS, v)
        table[5, v] = 1.0 + _ueg_cost(probs, CTX_PAL_CR_MAG, v)
    return table


@njit(cache=True, nogil=True)
def _escape_table(probs):
    """Bits of an escape's level 0..255 in each plane (``syntax._code_escape``), looked up per
    escaped value: priced one by one, they doubled the encoder's time."""
    table = np.empty((3, 256))
    for plane in range(3):
        table[plane, 0] = _bit_cost(probs, CTX_ESC_ZERO + plane, 0)
        nz = _bit_cost(probs, CTX_ESC_ZERO + plane, 1) + 1.0
        for level in range(1, 256):
            table[plane, level] = nz + _ueg_cost(probs, CTX_ESC_MAG + plane * UEG_CONTEXTS, level - 1)
    return table


@njit(cache=True, nogil=True)
def _entries_cost(coder, keys, u, two):
    """Bits of ``syntax.code_palette`` for the sorted ``keys[:u]``: the count of entries reused from
    the predictor list as the frame started and the gaps between them, then the new entries."""
    table, pos, _ = coder
    comp = 1 if two else 0
    c = 0.0
    taken = np.uint64(0)  # the reused entries' positions, a bit each
    nnew = 0
    prev = -1
    for i in range(u):
        k = keys[i]
        if pos[comp, k] >= 0:
            taken |= np.uint64(1) << np.uint64(pos[comp, k])
            continue
        if not two:
            c += table[ENTRY_ROW, k] if nnew == 0 else table[ENTRY_ROW + 1, k - prev - 1]
        else:
            cb = k >> 8
            cr = k & 255
            pu = prev >> 8 if nnew else 0
            pcr = prev & 255 if nnew else 128
            c += table[ENTRY_ROW + 2, cb - pu]
            c += table[FLAG_ROW, CR_SAME + (1 if cr != pcr else 0)]
            if cr != pcr:
                c += table[ENTRY_ROW + 5, abs(cr - pcr) - 1]
        nnew += 1
        prev = k
    count = 0
    last = -1
    for p in range(MAX_PAL):
        if taken == 0:
            break
        if taken & np.uint64(1):
            c += table[GAP_ROW + comp, p - last - 1]
            last = p
            count += 1
        taken >>= np.uint64(1)
    return c + table[REUSED_ROW + comp, count] + table[ENTRY_ROW + 3 + comp, nnew]




@njit(cache=True, nogil=True)
def exact_limit(samples, max_pal):
    """The most distinct values an exact palette of a block of ``samples`` may hold: ``max_pal``, and
    one per four samples (at least 4): past that, its index map costs more than a palette saves."""
    return min(max_pal, max(4, samples // 4))


@njit(cache=True, nogil=True)
def _exact_clusters(keys2d, y0, x0, s, two, max_pal, counts, seen, cl):
    """Each distinct value of the block as one cluster, in ascending order, into the scratch
    ``cl`` (rows: count, sum u, sum v, sum of squares); returns n.

    Returns n = 0 when the block has too many distinct values for a palette to pay (more than
    ``max_pal``, or more than one per four pixels): found as soon as there are, which is early in
    most blocks of camera content. ``counts`` is zeroed scratch indexed by key; ``seen`` holds
    MAX_PAL + 1 keys. Runs of a value are counted before they touch ``counts`` (``_count_runs``).
    """
    limit = exact_limit(s * s, max_pal)
    n = _count_runs(keys2d, y0, x0, s, limit, counts, seen)
    if n > limit:
        for i in range(limit):  # leave the scratch zeroed for the next block
            counts[seen[i]] = 0
        return 0
    _sort_prefix(seen, n)
    for i in range(n):
        k = seen[i]
        c = float(counts[k])
        counts[k] = 0
        u = float(k >> 8) if two else float(k)
        v = float(k & 255) if two else 0.0
        cl[0, i] = c
        cl[1, i] = u * c
        cl[2, i] = v * c
        cl[3, i] = (u * u + v * v) * c
    return n


@njit(cache=True, nogil=True, inline="always")
def _count_runs(keys2d, y0, x0, s, limit, counts, seen):
    """Count the block's values into ``counts`` and list them in ``seen`` in the order first seen;
    returns how many, stopping at ``limit`` + 1 (that value not counted). A run of one value is
    counted in a register, then added: in flat areas, adding one pixel at a time waited on the
    store before (the screen clip spent 17 % of ``decide`` here)."""
    n = 0
    prev = keys2d[y0, x0]
    run = 0
    for y in range(y0, y0 + s):
        for x in range(x0, x0 + s):
            k = keys2d[y, x]
            if k == prev:
                run += 1
                continue
            n = _add_run(counts, seen, n, limit, prev, run)
            if n > limit:
                return n
            prev = k
            run = 1
    return _add_run(counts, seen, n, limit, prev, run)


@njit(cache=True, nogil=True, inline="always")
def _add_run(counts, seen, n, limit, key, run):
    """Add ``run`` samples of ``key`` to ``counts``, listing it as the ``n``-th value of ``seen``
    where new; returns how many values there are now, leaving ``counts`` as it was past ``limit``."""
    c = counts[key]
    seen[n] = key  # kept where new (no branch to mispredict: camera blocks bring new values at random)
    n += c == 0
    if n <= limit:
        counts[key] = c + run
    return n


@njit(cache=True, nogil=True)
def _index_changes(keys2d, y0, x0, s, two, keys, u, esc_tol):
    """The index map ``syntax.code_indices`` would code for palette ``keys[:u]``, counted: samples
    that differ from both their left and top neighbours in the block, samples that differ from
    the left one, and escapes (farther than ``esc_tol`` from every entry)."""
    trans = 0
    lefts = 0
    nesc = 0
    row = np.empty(s, np.int64)  # the row above's indices
    for y in range(s):
        left = -1
        for x in range(s):
            v = keys2d[y0 + y, x0 + x]
            best = 0
            bestd = _key_distance(v, keys[0], two)
            for i in range(1, u):
                d = _key_distance(v, keys[i], two)
                if d < bestd:
                    best = i
                    bestd = d
                elif not two:
                    break  # sorted levels: farther from here on
            if bestd > esc_tol:
                best = u
                nesc += 1
            dl = x > 0 and best != left
            dt = y > 0 and best != row[x]
            if dl:
                lefts += 1
            if (dl or x == 0) and (dt or y == 0):
                trans += 1
            left = best
            row[x] = best
    return trans, lefts, nesc


@njit(cache=True, nogil=True)
def _price_palette(n, cl, changes, block, two, lam, dweight, out_keys, ce, coder, esc_tol, limit):
    """Merge clusters greedily (Ward) while the distortion added costs less than the bits saved;
    returns (J, palette size, estimated bits) with the sorted palette keys in ``out_keys``.
    ``cl``: the clusters (``_exact_clusters``); ``ce``: scratch rows (u, v, alive) for at least n
    clusters. Each array a kernel takes costs reference counting per call. The escapes' own bits and error
    are the caller's to add.

    The bits are the syntax's at the coder's probabilities as the frame started (``coder``,
    ``palette_coder``): the entries (``_entries_cost``), the escape flag, and the index map of the
    block (``block``: keys, y0, x0, s), counted by ``_index_changes``, or, for the block's distinct
    values, given as ``changes`` (transitions, left changes of the values, which overcount a
    merged palette's: counting its map cost the screen clip 20 % of its encoding time; (-1, -1)
    for none): a repeat of the left costs the 'same as left' flag, a repeat of the top both flags,
    a change both flags at 0 and an explicit index, each flag at its static price, or, in a context
    no block has used yet, at what a context learning the block's decisions charges
    (``_adaptive_cost``). Where the distortion alone reaches ``limit``, the bits are not counted
    and J is infinite: the caller has nothing cheaper than that to beat."""
    for i in range(n):
        ce[0, i] = cl[1, i] / cl[0, i]
        ce[1, i] = cl[2, i] / cl[0, i]
        ce[2, i] = 1.0
    dist = 0.0
    m = n
    while m > 1 and dweight < 1e5:
        best = np.inf
        bi = -1
        bj = -1
        for i in range(n):
            if ce[2, i] == 0.0:
                continue
            for j in range(i + 1, n):
                if ce[2, j] == 0.0:
                    continue
                du = ce[0, i] - ce[0, j]
                dv = ce[1, i] - ce[1, j]
                w = cl[0, i] * cl[0, j] / (cl[0, i] + cl[0, j])
                c = w * (du * du + dv * dv)
                if c < best:
                    best = c
                    bi = i
                    bj = j
                if not two:
                    break  # 1-D sorted levels: only the next live level can be nearest
        saved = 6.0 + 0.5 * min(cl[0, bi], cl[0, bj])
        if best * dweight >= lam * saved:
            break
        cl[0, bi] += cl[0, bj]
        cl[1, bi] += cl[1, bj]
        cl[2, bi] += cl[2, bj]
        cl[3, bi] += cl[3, bj]
        ce[0, bi] = cl[1, bi] / cl[0, bi]
        ce[1, bi] = cl[2, bi] / cl[0, bi]
        ce[2, bj] = 0.0
        m -= 1
    # integer centres; distortion of each cluster around its rounded centre
    k = 0
    for i in range(n):
        if ce[2, i] != 0.0:
            ru = math.floor(ce[0, i] + 0.5)
            rv = math.floor(ce[1, i] + 0.5)
            dist += cl[3, i] - 2.0 * (ru * cl[1, i] + rv * cl[2, i]) + (ru * ru + rv * rv) * cl[0, i]
            out_keys[k] = np.int64(ru) * 256 + np.int64(rv) if two else np.int64(ru)
            k += 1
    _sort_prefix(out_keys, k)
    # rounding can make two centres equal: keep the palette strictly increasing
    u = 0
    for i in range(k):
        if u == 0 or out_keys[i] != out_keys[u - 1]:
            out_keys[u] = out_keys[i]
            u += 1
    if dweight * dist >= limit:
        return np.inf, u, 0.0
    flags = coder[0][FLAG_ROW]
    comp = 1 if two else 0
    at = comp * FLAG_COLUMNS
    keys2d, y0, x0, s = block
    npx = s * s
    trans, lefts = changes
    nesc = 0
    if trans < 0:
        trans, lefts, nesc = _index_changes(keys2d, y0, x0, s, two, out_keys, u, float(esc_tol) if u < MAX_PAL else np.inf)
    rate = _entries_cost(coder, out_keys, u, two)
    m = u
    if u < MAX_PAL:
        rate += flags[at + ESC_FLAG + (1 if nesc else 0)]
        m += 1 if nesc else 0
    if m > 1:
        nbits = 0
        while (1 << nbits) < m:
            nbits += 1
        changes = min(trans, npx)
        tops = max(min(lefts, npx) - changes, 0)
        repeats = npx - changes - tops
        if flags[at + LEFT_FRESH]:
            rate += _adaptive_cost(repeats, tops + changes)
        else:
            rate += repeats * flags[at + LEFT_REPEAT] + (tops + changes) * flags[at + LEFT_OTHER]
        if flags[at + TOP_FRESH]:
            rate += _adaptive_cost(tops, changes)
        else:
            rate += tops * flags[at + TOP_REPEAT] + changes * flags[at + TOP_OTHER]
        rate += changes * nbits
    return dweight * dist + lam * rate, u, rate


@njit(cache=True, nogil=True, inline="always")
def _most_frequent(counts, seen, n, most, out, top):
    """The ``most`` most frequent of the ``n`` keys in ``seen`` counted at least twice in ``counts``,
    most frequent first, the first seen among equals, into ``out`` (their counts into ``top``), in
    one pass; returns how many."""
    nd = 0
    for i in range(n):
        c = counts[seen[i]]
        if c < 2 or (nd == most and c <= top[nd - 1]):
            continue
        j = nd if nd < most else most - 1
        while j > 0 and top[j - 1] < c:
            top[j] = top[j - 1]
            out[j] = out[j - 1]
            j -= 1
        top[j] = c
        out[j] = seen[i]
        nd = min(nd + 1, most)
    return nd


@njit(cache=True, nogil=True)
def _palette_clusters(keys2d, y0, x0, s, two, entries, ne, dominant, esc_tol, q4, escape, lam, dweight, limit, counts, seen,
                      cl, dom):
    """The block's samples as clusters around the nearest of a palette's entries, into the scratch
    ``cl`` as ``_exact_clusters`` does, ascending, entries no sample is nearest to dropped; a sample
    farther than ``esc_tol`` (squared error) from every entry is an escape (``syntax._code_escape``).
    The entries: a proposal's ``ne`` (sorted keys of ``entries``), or, with ``dominant``, the
    ``dominant`` generator's: the block's ``min(ne, DOMINANT)`` most frequent values seen at least
    twice, the first seen among equals (``palstream.palettes.dominant``).
    Returns (n, escaped samples, their bits and squared error, estimated: MED mostly predicts an
    escape from a neighbouring palette value, so its level is about its distance to the nearest
    entry, priced by ``escape``, ``palette_coder``'s prices); n = 0 where more than half the samples
    would escape or the escapes alone cost at least ``limit`` (J at ``lam``, ``dweight``): found as
    soon as they do, which is early in most blocks of camera content. Works on the block's distinct
    values, not its samples. ``counts``: zeroed scratch indexed by key, left zeroed; ``seen``: room
    for s * s keys; ``dom``: int64[2, DOMINANT] scratch for the dominant values and their counts."""
    n = _count_runs(keys2d, y0, x0, s, s * s, counts, seen)
    if dominant:
        entries = dom[0]
        ne = _most_frequent(counts, seen, n, min(ne, DOMINANT), entries, dom[1])
        _sort_prefix(entries, ne)
    for j in range(ne):
        cl[0, j] = 0.0
        cl[1, j] = 0.0
        cl[2, j] = 0.0
        cl[3, j] = 0.0
    nesc = 0
    bits = 0.0
    step = q4 / 4.0
    # rounding to the nearest step: uniform error of step^2 / 12 per component; none at step 1
    err = 0.0 if q4 == 4 else (2.0 if two else 1.0) * step * step / 12.0
    for i in range(n):
        k = seen[i]
        c = counts[k]
        counts[k] = 0
        if nesc < 0:
            continue  # given up: only leave the scratch zeroed
        u = float(k >> 8) if two else float(k)
        v = float(k & 255) if two else 0.0
        best = 0
        bestd = np.inf
        bu = 0.0
        bv = 0.0
        for j in range(ne):
            du = u - (float(entries[j] >> 8) if two else float(entries[j]))
            dv = v - (float(entries[j] & 255) if two else 0.0)
            d = du * du + dv * dv
            if d < bestd:
                best = j
                bestd = d
                bu = du
                bv = dv
        if bestd <= esc_tol:
            cl[0, best] += c
            cl[1, best] += u * c
            cl[2, best] += v * c
            cl[3, best] += (u * u + v * v) * c
        else:
            e = escape[ESCAPE_ROW + (1 if two else 0), min(int(abs(bu) / step + 0.5), 255)]
            if two:
                e += escape[ESCAPE_ROW + 2, min(int(abs(bv) / step + 0.5), 255)]
            bits += c * e
            nesc += c
            if 2 * nesc > s * s or lam * bits + dweight * err * nesc >= limit:
                nesc = -1
    if ne == 0 or nesc < 0:
        return 0, 0, 0.0, 0.0
    live = 0
    for j in range(ne):  # entries nothing is nearest to (or repeated ones) are not coded
        if cl[0, j] > 0:
            cl[:, live] = cl[:, j]
            live += 1
    return live, nesc, bits, err * nesc


@njit(cache=True, nogil=True, inline="always")
def _price_intra(intra_raw, lam):
    """RD cost of the block as an INTRA leaf, its predictor variant and transform flag: the
    cheapest of MED, the four-neighbour mean and (bitstream 9) the transform path."""
    variant = 1 if intra_raw[1] < intra_raw[0] else 0
    if intra_raw[2] + lam * 1.0 < intra_raw[variant]:
        return intra_raw[2] + lam * 3.0, 0, 1
    return intra_raw[variant] + lam * 2.0, variant, 0


@njit(cache=True, nogil=True, inline="always")
def _price_skip(skip_sse, lam, dweight):
    """RD cost of the block as a SKIP leaf."""
    return dweight * skip_sse + lam * 1.0


@njit(cache=True, nogil=True, inline="always")  # see decide
def _intra_skip_costs(err, cur, ref, has_ref, table, tq4, lam, intra_raw, skip_raw, lev, by, bx, s, scratch):
    """The block's intra cost under each predictor variant and, with ``tq4`` (the step; 0 where
    the chunk has no transform path), with its luma transform-coded (chroma by MED), without the
    mode's rate, into ``intra_raw[lev][by, bx]``; its squared error when skipped into
    ``skip_raw[lev][by, bx]``: priced at 8x8, summed over the quadrants above. The transform path's
    prediction is ``syntax.intra_planar`` of the source's neighbours with ``_intra_errors``' offsets
    (the decoder's carry quantisation error, as the MED estimate's do): from the clean source the
    transform won leaves that palettes code in fewer bytes."""
    ir = intra_raw[lev][by, bx]
    if lev == 0:
        y0 = by * s
        x0 = bx * s
        c0y = y0 // 2
        c0x = x0 // 2
        cs = s // 2
        luma_med = 0.0  # variant 0's luma cost, which the transform path replaces
        for v in range(2):
            luma = _block_cost(err[0][v], table, y0, x0, s)
            ir[v] = luma + _block_cost(err[1][v], table, c0y, c0x, cs) + _block_cost(err[2][v], table, c0y, c0x, cs)
            if v == 0:
                luma_med = luma
        ir[2] = np.inf
        if tq4:
            pred, levels, coef, noisy = scratch
            intra_planar(noisy, y0, x0, pred, 0, 0)
            step, zero_bound = _transform_step(tq4)
            ir[2] = (_cell_transform_cost(cur[0], pred, y0, x0, 0, 0, tq4, lam, levels, coef, step, zero_bound)
                     + ir[0] - luma_med)
        sr = 0
        if has_ref:
            sr = (_skip_sse(cur[0], ref[0], y0, x0, s) + _skip_sse(cur[1], ref[1], c0y, c0x, cs)
                  + _skip_sse(cur[2], ref[2], c0y, c0x, cs))
    else:
        sr = 0
        for j4 in range(4):
            for v in range(3):  # element by element: array expressions allocate
                ir[v] += intra_raw[lev - 1][2 * by + j4 // 2, 2 * bx + j4 % 2, v]
            sr += skip_raw[lev - 1][2 * by + j4 // 2, 2 * bx + j4 % 2]
    skip_raw[lev][by, bx] = sr


@njit(cache=True, nogil=True)
def _transform_cost(cur, pred, y0, x0, s, q4, lam, levels, coef, known, mot):
    """J of a block's luma residual coded by ``syntax.code_transform_block`` against prediction
    ``pred`` under motion ``mot``: squared error plus lambda times estimated bits (coded flag,
    last position, per level up to it: significance, sign and the magnitude's ueg code), cell by
    cell, each kept in ``known`` (``_known_slot``) for the levels above. The error is measured on
    the coefficients (the transform is orthogonal within 0.1 %), not on the reconstruction: that
    would cost an inverse transform per block."""
    step, zero_bound = _transform_step(q4)
    j = 0.0
    for sy in range(0, s, 8):
        for sx in range(0, s, 8):
            costs = known[1][(y0 + sy) // 8, (x0 + sx) // 8, _known_slot(known, (y0 + sy) // 8, (x0 + sx) // 8, mot)]
            if np.isnan(costs[4]):
                costs[4] = _cell_transform_cost(cur, pred, y0, x0, sy, sx, q4, lam, levels, coef, step, zero_bound)
            j += costs[4]
    return j


@njit(cache=True, nogil=True, inline="always")
def _transform_step(q4):
    """A transform level at step ``q4``, in the forward transform's units (16x orthonormal, after
    >> 11), and the squared error below which no coefficient of an 8x8 block reaches a level."""
    step = TC_SCALE * q4
    return step, (step * (64 - TC_ROUNDING) / 64) ** 2 / 256.0 / 1.01


@njit(cache=True, nogil=True, inline="always")
def _cell_transform_cost(cur, pred, y0, x0, sy, sx, q4, lam, levels, coef, step, zero_bound):
    """``_transform_cost`` of the 8x8 cell at (``sy``, ``sx``) of the block (``step``, ``zero_bound``:
    ``_transform_step``)."""
    sse = 0
    for y in range(8):
        for x in range(8):
            d = np.int64(cur[y0 + sy + y, x0 + sx + x]) - np.int64(pred[sy + y, sx + x])
            sse += d * d
    if sse < zero_bound:  # no coefficient can reach a level: no transform needed
        return sse + lam * 0.3
    last = transform_levels(cur, pred, y0 + sy, x0 + sx, sy, sx, q4, levels, coef, TRIM_LAMBDA)
    if last < 0:
        return sse + lam * 0.3
    bits = 5.0
    err = 0.0
    for i in range(64):
        k = abs(levels[i])
        e = abs(coef[i]) / 2048.0 - k * step
        err += e * e
        if i <= last:
            if k == 0:
                bits += 0.7
            else:
                bits += (1.0 if i < last else 0.0) + 2.0 + 2.0 * math.log2(k)
    return err / 256.0 + lam * bits


KNOWN_SLOTS = 8  # motions whose costs each cell keeps (``_known_slot``)


@njit(cache=True, nogil=True, inline="always")
def _holds_motion(row, mot):
    """Whether ``row`` (int64[5]) holds the motion tuple ``mot``."""
    return row[0] == mot[0] and row[1] == mot[1] and row[2] == mot[2] and row[3] == mot[3] and row[4] == mot[4]


@njit(cache=True, nogil=True, inline="always")
def _known_slot(known, cy8, cx8, mot):
    """The slot of ``known`` = (motions, costs, count) that holds cell (cy8, cx8)'s costs under
    ``mot``: each INTER variant's (``_cell_inter_cost``) and the transform path's
    (``_transform_cost``), NaN until priced; a motion not held takes the cell's oldest slot. The
    levels above 8x8 price each block under its quadrants' motions, which the cells of a smooth
    field share, and the transform path prices the cells of the motion chosen below again: kept
    (with the scratch changes beside them), rocket's analysis took 16 % less time (docs/codec.md,
    "The analysis after bitstream 8")."""
    motions, costs, count = known
    n = count[cy8, cx8]
    for i in range(min(n, KNOWN_SLOTS)):
        if _holds_motion(motions[cy8, cx8, i], mot):
            return i
    slot = n % KNOWN_SLOTS
    for i in range(5):
        motions[cy8, cx8, slot, i] = mot[i]
        costs[cy8, cx8, slot, i] = np.nan
    count[cy8, cx8] = n + 1
    return slot


@njit(cache=True, nogil=True, inline="always")  # see decide
def _price_inter(planes, field, cell_inter, known, below, table, lam, tq4, ref2_scale, interp, lev, by, bx, s, scratch, motion):
    """RD cost of the block as an INTER leaf: (J, variant, luma offset, transform) of its best
    candidate, whose motion tuple goes into ``motion``; J is infinite where there is no candidate.

    Candidates, each priced once: at 8x8 the cell's own motion with the first reference, with both
    and (a future second reference) with the second alone;
    above, the motion each INTER quadrant chose (``below``: the level below's modes and cell
    records) and the top-left cell's own single-reference motion. The best one then gets a luma
    offset where that pays. With ``tq4`` (the step, 0 where the chunk has no transform path), the
    best candidate without a variant is priced with its luma residual transform-coded
    (``_transform_cost``, no offset) too. ``planes``: (cur, med, ref, ref2), each (Y, Cb, Cr);
    ``cell_inter``: each 8x8 cell's costs under its own motion (``_cell_inter_cost``); ``known``:
    the costs of cells under other motions priced before (``_known_slot``)."""
    cur, med, ref, ref2 = planes
    below_mode, below_cells = below
    tried, prediction, leaf_prediction, jmot, motion0, levels, coef = scratch
    per_unit = 0.25 if interp & INTERP_QUARTER else 0.5  # a vector's estimated bits: one a pixel
    ntried = 0
    jinter = np.inf
    jinter0 = np.inf  # the best candidate without a variant, for the transform path
    ivar = 0
    for qd in range(5 if lev > 0 else 3):
        if lev == 0:
            if (qd == 1 and not ref2_scale) or (qd == ALONE and ref2_scale >= 0):
                continue
            b2 = qd
            mot = _cell_motion(field, by, bx, b2)
        elif qd < 4:
            cy = 2 * by + qd // 2
            cx = 2 * bx + qd % 2
            if below_mode[cy, cx] != INTER:
                continue
            child = below_cells[cy, cx]
            b2 = child[BI]
            mot = (np.int64(child[MV_Y]), np.int64(child[MV_X]), np.int64(child[MV2_Y]), np.int64(child[MV2_X]),
                   np.int64(child[BI]))
        else:
            b2 = 0
            mot = _cell_motion(field, by * (s // 8), bx * (s // 8), 0)
        seen = False
        for i in range(ntried):
            seen = seen or _holds_motion(tried[i], mot)
        if seen:
            continue
        for i in range(5):
            tried[ntried, i] = mot[i]
        ntried += 1
        j = lam * (3.0 + per_unit * (abs(mot[MV_Y]) + abs(mot[MV_X])))
        if b2:
            j += lam * ((3.0 if b2 == ALONE else 2.0)
                        + per_unit * (abs(mot[MV2_Y] - ref2_scale * mot[MV_Y]) + abs(mot[MV2_X] - ref2_scale * mot[MV_X])))
        jmot[0] = j
        for v in range(1, 4):
            jmot[v] = j + lam * 1.0  # the weight
        for cy8 in range(by * (s // 8), (by + 1) * (s // 8)):
            for cx8 in range(bx * (s // 8), (bx + 1) * (s // 8)):
                if _cell_motion(field, cy8, cx8, b2) == mot and cell_inter[cy8, cx8, b2, 0] < np.inf:
                    for v in range(4):  # the cell's own motion: known
                        jmot[v] += cell_inter[cy8, cx8, b2, v]
                else:
                    costs = known[1][cy8, cx8, _known_slot(known, cy8, cx8, mot)]
                    if np.isnan(costs[0]):
                        _cell_inter_cost(cur, med, ref, ref2, table, cy8, cx8, mot, interp, prediction, costs)
                    for v in range(4):
                        jmot[v] += costs[v]
            # costs only grow: a candidate whose partial sums lose to both bests can win neither
            if jmot[0] >= jinter0 and min(jmot[1], jmot[2], jmot[3]) >= jinter:
                break
        if jmot[0] < jinter0:
            jinter0 = jmot[0]
            for i in range(5):
                motion0[i] = mot[i]
        for v in range(4):
            if jmot[v] < jinter:
                jinter = jmot[v]
                ivar = v
                for i in range(5):
                    motion[i] = mot[i]
    if jinter == np.inf:
        return jinter, 0, 0, 0
    mot = (motion[0], motion[1], motion[2], motion[3], motion[4])
    dc, delta = _offset_gain(cur[0], med[0], ref[0], ref2[0], table, lam, by * s, bx * s, s, mot, ivar, interp, leaf_prediction)
    if delta < 0:
        jinter += delta
    else:
        dc = 0
    if tq4 == 0:
        return jinter, ivar, dc, 0
    # the transform path replaces the luma residual's cost in the best variant-free candidate's J
    y0 = by * s
    x0 = bx * s
    same = _holds_motion(motion0, mot)
    mot = (motion0[0], motion0[1], motion0[2], motion0[3], motion0[4])
    # _offset_gain left the best candidate's prediction in leaf_prediction[0], mostly this one
    pred = leaf_prediction[0] if same else inter_prediction(ref[0], ref2[0], y0, x0, s, mot, interp, leaf_prediction)
    spatial = _offset_cost(cur[0], med[0], pred, table, lam, y0, x0, s, 0, 0)
    jt = jinter0 - spatial + lam * 1.0 + _transform_cost(cur[0], pred, y0, x0, s, tq4, lam, levels, coef, known, mot)
    if jt < jinter:
        for i in range(5):
            motion[i] = motion0[i]
        return jt, 0, 0, 1
    return jinter, ivar, dc, 0


@njit(cache=True, nogil=True, inline="always")
def _best_palette(keys2d, changes, y0, x0, s, two, many, proposal, proposed, dominant, max_pal, esc_tol, q4, lam, dweight, coder,
                  bound, scratch, out):
    """RD-best palette of one component of a block: (J, size, estimated bits, too many colours for
    an exact palette, no candidate cost less than ``bound``, the palette is the generator's); size 0
    means none. Candidates: exact (one cluster per distinct value, merged by ``_price_palette``)
    unless ``many`` or too many distinct values, and the generator's palette with escapes
    (``_palette_clusters``: the ``proposed`` entries of ``proposal``, or with ``dominant`` the
    block's dominant values), where it has fewer entries than the block has values, priced only
    where its escapes alone cost less than ``bound`` (the best J of the other modes)."""
    counts, seen, cl, centres, cand, dom = scratch
    j = np.inf
    size = 0
    rate = 0.0
    n = 0
    generated = False
    if not many:
        n = _exact_clusters(keys2d, y0, x0, s, two, max_pal, counts, seen, cl)
        if n > 0:
            map_changes = (_transitions(changes, y0, x0, s), _left_changes(changes, y0, x0, s))
            j, size, rate = _price_palette(n, cl, map_changes, (keys2d, y0, x0, s), two, lam, dweight, out, centres, coder,
                                           esc_tol, bound)
    too_many = n == 0
    wanted = min(max_pal, DOMINANT) if dominant else proposed
    if wanted > 0 and (too_many or n > wanted):  # an exact palette of no more entries codes every sample exactly
        nd, nesc, ebits, edist = _palette_clusters(keys2d, y0, x0, s, two, proposal, wanted, dominant, esc_tol, q4, coder[0],
                                                   lam, dweight, bound, counts, seen, cl, dom)
        if nd > 0:
            extra = lam * ebits + dweight * edist
            je, ne, re = _price_palette(nd, cl, (-1, -1), (keys2d, y0, x0, s), two, lam, dweight, cand, centres, coder, esc_tol,
                                        bound - extra)
            re += ebits
            je += extra
            if je < j:
                j = je
                size = ne
                rate = re
                generated = True
                out[:ne] = cand[:ne]
    return j, size, rate, too_many, not j < bound, generated


@njit(cache=True, nogil=True, inline="always")  # see decide
def _price_palette_leaf(keys, changes, proposals, pricing, coder, bound, many, propose, row, by, bx, s, scratch, out_y,
                        out_c):
    """RD cost of the block as a PALETTE leaf, with its palettes' sorted keys in ``out_y`` and
    ``out_c``: (J, luma palette size, chroma palette size, too many colours for exact palettes,
    the luma palette is the generator's, estimated bits, no luma palette cost less than ``bound``);
    sizes of 0 mean no palette leaf.

    Each component's palette is ``_best_palette``'s: exact, or, with ``propose``, the generator's
    with escapes: the block's dominant values where ``pricing.dominant``, else the proposal for the
    block (row ``row`` of ``proposals``: luma keys, their count, chroma keys, their count, per block
    of every size in ``PROPOSAL_SIZES``, ``proposal_rows``). ``keys``, ``changes``: luma and chroma
    keys of the frame and their ``_change_sums``; ``coder``: ``palette_coder``'s prices; ``bound``:
    the best J of the other modes, above which no candidate needs an exact price."""
    keys_y, keys_c = keys
    changes_y, changes_c = changes
    prop_y, prop_yn, prop_c, prop_cn = proposals
    lam = pricing.lam
    dweight = pricing.dweight
    max_pal = pricing.max_pal
    esc_tol = pricing.esc_tol
    q4 = pricing.q4
    dominant = propose and pricing.dominant
    y0 = by * s
    x0 = bx * s
    c0y = y0 // 2
    c0x = x0 // 2
    cs = s // 2
    nc = 0
    jc = np.inf
    rc = 0.0
    jy, ny, ry, many_y, hopeless, generated = _best_palette(
        keys_y, changes_y, y0, x0, s, False, many, prop_y[row], prop_yn[row] if propose else 0, dominant, max_pal, esc_tol, q4,
        lam, dweight, coder, bound, scratch, out_y,
    )
    if ny > 0 and hopeless:
        # no chroma palette can make up for the luma's: only whether the chroma has too many colours counts
        many_y = many_y or many or _exact_clusters(keys_c, c0y, c0x, cs, True, max_pal, *scratch[:3]) == 0
    elif ny > 0:
        jc, nc, rc, many_c, _, _ = _best_palette(
            keys_c, changes_c, c0y, c0x, cs, True, many, prop_c[row], prop_cn[row] if propose else 0, dominant, max_pal,
            2 * esc_tol, q4, lam, dweight, coder, bound - jy, scratch, out_c,
        )
        many_y = many_y or many_c
    mode = coder[2]
    return jy + jc + lam * mode, ny, nc, many_y, generated, ry + rc + mode, hopeless


class Pricing(NamedTuple):
    """What ``decide`` prices leaves with: the rung being coded and the encoder's settings."""

    table: np.ndarray  # J of each prediction error -255..255 (``residual_cost_table``)
    lam: float  # lambda: squared error per bit
    dweight: float  # weight of the squared error (1e6 when lossless)
    noise: int  # amplitude of the reconstruction error the intra estimates assume, quarter levels (``_intra_errors``)
    min_block: int
    max_block: int
    max_pal: int
    tq4: int  # the step (quarter levels) of the transform path; 0 where the chunk has none (lossless)
    q4: int  # the frame's step, quarter levels
    esc_tol: int  # squared error above which a palette sample escapes (``syntax.Coding.esc_tol``)
    dominant: bool  # the palette generator is ``dominant``, which the analysis runs itself (``_palette_clusters``)
    interp: int  # motion interpolation (``syntax.Coding.interp``)


@njit(cache=True, nogil=True)
def proposal_rows(h, w):
    """Where each size of ``PROPOSAL_SIZES`` starts in a frame's proposals: the rows of a frame of
    ``h`` x ``w`` luma pixels are its 8x8 blocks in raster order, then its 16x16 blocks, and so on;
    the last entry is the number of rows."""
    first = np.zeros(len(PROPOSAL_SIZES) + 1, np.int64)
    for lev in range(len(PROPOSAL_SIZES)):
        s = PROPOSAL_SIZES[lev]
        first[lev + 1] = first[lev] + (h // s) * (w // s)
    return first


@njit(cache=True, nogil=True)
def decide(cur, ref, ref2, has_ref, ref2_scale, field, pricing, proposals, coder, decisions):
    """Fill ``decisions`` (``syntax.Decisions``) with the RD-best quadtree of the frame and each
    leaf's mode, motion, predictor variant, luma offset and palettes.

    ``cur``, ``ref``, ``ref2``: (Y, Cb, Cr) planes of the source frame, the previous reconstructed
    frame and the second reference, whose vector is predicted as ``ref2_scale`` times the first (0: no
    second reference); ``field``: the frame's motion field (``motion_search_chunk``);
    ``pricing``: a ``Pricing``; ``proposals``: the generator's palettes for the frame's blocks of every
    size (luma keys, their count, chroma keys, their count; rows as ``proposal_rows``); ``coder``: what palettes cost at the coder's state as
    the frame starts (``palette_coder``). Bottom-up, level by level (8x8 up to max_block), each
    block is priced as a leaf in every mode (``_price_intra``, ``_price_skip``, ``_price_inter``,
    ``_price_palette_leaf``) and against its four quadrants (from 32x32 up, only against them where
    all four split); ``_write_out`` then writes the tree.
    The per-block helpers are inlined (numba's ``inline="always"``): called, each call passed some
    twenty arrays for little work per block, and the screen clip encoded 5-10 % slower per CPU
    second (``benchmarks/codec_ab.py``).
    """
    table, lam, dweight, noise, min_block, max_block, max_pal, tq4, _, _, _, interp = pricing
    h, w = cur[0].shape
    err_y, med_y, noisy_y = _intra_errors(cur[0], noise)
    err_u, med_u, _ = _intra_errors(cur[1], noise)
    err_v, med_v, _ = _intra_errors(cur[2], noise)
    err = (err_y, err_u, err_v)
    planes = (cur, (med_y, med_u, med_v), ref, ref2)
    keys = (cur[0].astype(np.int64), cur[1].astype(np.int64) * 256 + cur[2].astype(np.int64))
    changes = (_change_sums(keys[0]), _change_sums(keys[1]))
    nlev = 4
    sizes = np.array([8, 16, 32, 64])
    first = proposal_rows(h, w)
    # per level: best cost, whether to split, the leaf (mode, cell record, palettes)
    best = [np.zeros((h // s, w // s)) for s in (8, 16, 32, 64)]
    lsplit = [np.zeros((h // s, w // s), np.bool_) for s in (8, 16, 32, 64)]
    lmode = [np.zeros((h // s, w // s), np.int32) for s in (8, 16, 32, 64)]
    lcells = [np.zeros((h // s, w // s, CELL_FIELDS), np.int32) for s in (8, 16, 32, 64)]
    lpy = [np.empty((h // s, w // s, MAX_PAL), np.int64) for s in (8, 16, 32, 64)]  # read only where chosen
    lpyn = [np.zeros((h // s, w // s), np.int32) for s in (8, 16, 32, 64)]
    lpc = [np.empty((h // s, w // s, MAX_PAL), np.int64) for s in (8, 16, 32, 64)]
    lpcn = [np.zeros((h // s, w // s), np.int32) for s in (8, 16, 32, 64)]
    lpgen = [np.zeros((h // s, w // s), np.int32) for s in (8, 16, 32, 64)]
    lpbits = [np.zeros((h // s, w // s)) for s in (8, 16, 32, 64)]
    toomany = [np.zeros((h // s, w // s), np.bool_) for s in (8, 16, 32, 64)]
    hopeless = [np.zeros((h // s, w // s), np.bool_) for s in (8, 16, 32, 64)]
    intra_raw = [np.zeros((h // s, w // s, 3)) for s in (8, 16, 32, 64)]  # per predictor variant, transform
    intra_scratch = (np.empty((8, 8), np.int32), np.zeros(64, np.int64), np.zeros(64, np.int64), noisy_y)
    skip_raw = [np.zeros((h // s, w // s), np.int64) for s in (8, 16, 32, 64)]
    # cost of each 8x8 cell under its own motion: [first ref / both / second alone][INTER variant]
    cell_inter = np.zeros((h // 8, w // 8, 3, 4))
    prediction = np.empty((3, 8, 8), np.int32)
    inter_scratch = (np.empty((8, 5), np.int64), prediction, np.empty((3, 64, 64), np.int32), np.zeros(4),
                     np.zeros(5, np.int64), np.zeros(64, np.int64), np.zeros(64, np.int64))
    imot = np.zeros(5, np.int64)
    known = (np.empty((h // 8, w // 8, KNOWN_SLOTS, 5), np.int64), np.empty((h // 8, w // 8, KNOWN_SLOTS, 5)),
             np.zeros((h // 8, w // 8), np.int64))
    # counts by key, values seen, clusters, their centres, a palette, dominant values and their counts
    palette_scratch = (np.zeros(65536, np.int32), np.empty(4096, np.int64), np.empty((4, MAX_PAL + 1)),
                       np.empty((3, MAX_PAL + 1)), np.empty(MAX_PAL, np.int64), np.empty((2, DOMINANT), np.int64))
    tmp_y = np.empty(MAX_PAL, np.int64)
    tmp_c = np.empty(MAX_PAL, np.int64)
    for lev in range(nlev):
        s = sizes[lev]
        if s > max_block:
            break
        for by in range(h // s):
            for bx in range(w // s):
                _intra_skip_costs(err, cur, ref, has_ref, table, tq4, lam, intra_raw, skip_raw, lev, by, bx, s, intra_scratch)
                if lev == 0 and has_ref:
                    for b2 in range(3 if ref2_scale < 0 else (2 if ref2_scale else 1)):
                        if b2 == ALONE and cell_inter[by, bx, 1, 0] < cell_inter[by, bx, 0, 0]:
                            # averaging helped: the past shows what the future does (the second
                            # alone pays where the past does not: a cut, an uncovered background)
                            cell_inter[by, bx, b2] = np.inf
                            continue
                        _cell_inter_cost(cur, planes[1], ref, ref2, table, by, bx, _cell_motion(field, by, bx, b2), interp, prediction,
                                         cell_inter[by, bx, b2])
                jbest = np.inf
                bm = INTRA
                bvar = 0
                bdc = 0
                btr = 0
                # a block whose four quadrants all split rarely codes better whole: pricing it anyway
                # cost 6-7 % of the analysis' time for 0.06 % of the bytes (corpus, docs/codec.md)
                quads = (slice(2 * by, 2 * by + 2), slice(2 * bx, 2 * bx + 2))
                whole = lev < 2 or not lsplit[lev - 1][quads].all()
                if not whole:  # what the level above asks of a leaf it cannot be: its quadrants' bounds
                    toomany[lev][by, bx] = toomany[lev - 1][quads].any()
                    hopeless[lev][by, bx] = hopeless[lev - 1][quads].all()
                if s >= min_block and whole:
                    jbest, bvar, btr = _price_intra(intra_raw[lev][by, bx], lam)
                    if has_ref:
                        j = _price_skip(skip_raw[lev][by, bx], lam, dweight)
                        if j < jbest:
                            jbest = j
                            bm = SKIP
                            bvar = 0
                            btr = 0
                        below = (lmode[max(lev - 1, 0)], lcells[max(lev - 1, 0)])  # at level 0: unused
                        jinter, ivar, dc, tr = _price_inter(planes, field, cell_inter, known, below, table, lam, tq4, ref2_scale,
                                                            interp, lev, by, bx, s, inter_scratch, imot)
                        if jinter < jbest:
                            jbest = jinter
                            bm = INTER
                            bvar = ivar
                            bdc = dc
                            btr = tr
                    # a block holds at least as many colours as any of its quadrants
                    many = lev > 0 and (
                        toomany[lev - 1][2 * by, 2 * bx] or toomany[lev - 1][2 * by, 2 * bx + 1]
                        or toomany[lev - 1][2 * by + 1, 2 * bx] or toomany[lev - 1][2 * by + 1, 2 * bx + 1]
                    )
                    # where no quadrant's luma palette could compete, the block's proposal rarely does
                    # (noise, text that INTRA codes better): trying anyway cost 10-20 % of the encoder's time
                    propose = lev == 0 or not (
                        hopeless[lev - 1][2 * by, 2 * bx] and hopeless[lev - 1][2 * by, 2 * bx + 1]
                        and hopeless[lev - 1][2 * by + 1, 2 * bx] and hopeless[lev - 1][2 * by + 1, 2 * bx + 1]
                    )
                    jpal, ny, nc, too_many, generated, pbits, hopeless[lev][by, bx] = _price_palette_leaf(
                        keys, changes, proposals, pricing, coder, jbest, many, propose, first[lev] + by * (w // s) + bx, by,
                        bx, s, palette_scratch, tmp_y,
                        tmp_c,
                    )
                    toomany[lev][by, bx] = too_many
                    if nc > 0 and jpal < jbest:
                        jbest = jpal
                        bm = PALETTE
                        bvar = 0
                        btr = 0
                        lpy[lev][by, bx, :ny] = tmp_y[:ny]
                        lpyn[lev][by, bx] = ny
                        lpc[lev][by, bx, :nc] = tmp_c[:nc]
                        lpcn[lev][by, bx] = nc
                        lpgen[lev][by, bx] = generated
                        lpbits[lev][by, bx] = pbits
                if lev > 0 and s > min_block:
                    below_best = best[lev - 1]
                    js = (below_best[2 * by, 2 * bx] + below_best[2 * by, 2 * bx + 1] + below_best[2 * by + 1, 2 * bx]
                          + below_best[2 * by + 1, 2 * bx + 1] + lam * 1.0)
                    if js < jbest:
                        jbest = js
                        lsplit[lev][by, bx] = True
                best[lev][by, bx] = jbest
                lmode[lev][by, bx] = bm
                cell = lcells[lev][by, bx]
                if bm == INTER:
                    cell[MV_Y] = imot[MV_Y]
                    cell[MV_X] = imot[MV_X]
                    cell[MV2_Y] = imot[MV2_Y]
                    cell[MV2_X] = imot[MV2_X]
                    cell[BI] = imot[BI]
                    cell[OFFSET] = bdc
                cell[TRANSFORM] = btr
                cell[VARIANT] = bvar
    _write_out(lsplit, (lmode, lcells, lpy, lpyn, lpc, lpcn, lpgen, lpbits), sizes, max_block, decisions)


@njit(cache=True, nogil=True)
def _write_out(split, leaves, sizes, max_block, decisions):
    """The chosen quadtree into the per-cell ``decisions``, top-down, one max_block-sized block at
    a time (as the syntax visits them), so the stack holds one block's subtree, never the frame's:
    each level below the top adds at most 3 entries. ``leaves``: per level, the leaf's mode, cell
    record, palettes (keys, count; luma then chroma), whether they are the generator's and their
    estimated bits."""
    lmode, lcells, lpy, lpyn, lpc, lpcn, lpgen, lpbits = leaves
    top = 0
    while top < len(sizes) - 1 and sizes[top] < max_block:
        top += 1
    stack = np.empty((3 * top + 1, 3), np.int64)
    rows, cols = split[top].shape
    for cty in range(rows):
        for ctx in range(cols):
            stack[0, 0] = top
            stack[0, 1] = cty
            stack[0, 2] = ctx
            sp = 1
            while sp > 0:
                sp -= 1
                lev = stack[sp, 0]
                by = stack[sp, 1]
                bx = stack[sp, 2]
                if split[lev][by, bx]:
                    for j in range(4):
                        stack[sp, 0] = lev - 1
                        stack[sp, 1] = 2 * by + j // 2
                        stack[sp, 2] = 2 * bx + j % 2
                        sp += 1
                    continue
                s = sizes[lev]
                n8 = s // 8
                cy8 = by * n8
                cx8 = bx * n8
                for yy in range(cy8, cy8 + n8):
                    for xx in range(cx8, cx8 + n8):
                        decisions.leaf_size[yy, xx] = s
                        decisions.mode[yy, xx] = lmode[lev][by, bx]
                        for i in range(CELL_FIELDS):
                            decisions.cells[yy, xx, i] = lcells[lev][by, bx, i]
                ny = lpyn[lev][by, bx]
                nc = lpcn[lev][by, bx]
                decisions.pal_yn[cy8, cx8] = ny
                decisions.pal_y[cy8, cx8, :ny] = lpy[lev][by, bx, :ny]
                decisions.pal_cn[cy8, cx8] = nc
                decisions.pal_c[cy8, cx8, :nc] = lpc[lev][by, bx, :nc]
                decisions.pal_gen[cy8, cx8] = lpgen[lev][by, bx]
                decisions.pal_bits[cy8, cx8] = lpbits[lev][by, bx]
