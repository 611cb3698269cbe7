"""cgan-v1 chroma decoding as per-block numba kernels (used by :mod:`palstream.learned.decoding`).

At the codec's block sizes (64 or 256 Cb/Cr pairs, 4 to 64 entries) a chain of batched torch
ops over (blocks x pixels x entries) tensors costs more in per-op overhead and memory passes
than in arithmetic; here each block is decoded in one go while its pixels sit in cache. Two
kernels, with the network's forward pass (torch) between them:

1. :func:`summarise`: each block's principal colour axis (closed-form 2x2 eigenvector), the
   order of its samples along it, and the network's conditioning vector (the quantities of
   :func:`palstream.learned.model.sort_blocks`, :func:`~palstream.learned.model.rank_tokens` and
   :func:`~palstream.learned.model.condition`, computed in float64 instead of float32: the
   network sees the same inputs up to rounding); a block with at most ``k`` distinct pairs gets
   them as its palette here (zero error) and skips the rest.
2. :func:`decode`: for every other block, the network's interval widths and the plain
   companding widths each become entries on the companded key axis (:func:`companded_keys`,
   as :func:`~palstream.learned.model.companded_segments`), refined along the axis by Lloyd
   updates and a merge-and-split move from prefix sums (:func:`axis_lloyd`); the start with the
   lower exact squared error is kept (ties: the network). Then one 2-D pass: every pixel to its
   nearest entry, up to ``moves`` 2-D merge-and-split moves (:func:`merge_split_moves`), and
   each entry to its pixels' mean (an entry without pixels stays put).

Everything is float64 inside, single-threaded and deterministic (ties go to the lowest index).
Per block the cost is O(P log P) for the sort (O(P) for spread-out keys), O(K log P) per update
along the axis, at most O(P K) for the nearest-entry pass, O(P + K^2) to set up the 2-D moves
and O(P + K) per move.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

import palstream.codec  # noqa: F401  (sets up numba's cache folder before these kernels are defined)
from palstream.learned.model import COMPANDING, HISTOGRAM_BINS
from palstream.palettes.base import MAX_PALETTE

EPS = 1e-3  # as in companded_segments: below ~1/1000 of a pixel an interval takes the sample at its rank
SPLIT_STEPS = 2  # 2-means updates that place a split along the axis
FEW = 8  # palettes up to this size try every entry for every pixel; larger ones search by key


@njit(cache=True, nogil=True)
def _sort_by_key(keys, order, count, bucket):
    """Stable argsort of ``keys`` (P,) into ``order``: a counting pass over P equal buckets of the
    key range, then insertion sort (only the few inversions inside buckets are left).

    ``count`` (P+1,) and ``bucket`` (P,) int64 are scratch.
    """
    p = len(keys)
    lo, hi = keys[0], keys[0]
    for i in range(1, p):
        lo = min(lo, keys[i])
        hi = max(hi, keys[i])
    scale = p / max(hi - lo, 1e-12)
    count[:] = 0
    for i in range(p):
        b = min(int((keys[i] - lo) * scale), p - 1)
        bucket[i] = b
        count[b + 1] += 1
    for b in range(p):
        count[b + 1] += count[b]
    for i in range(p):
        b = bucket[i]
        order[count[b]] = i
        count[b] += 1
    for i in range(1, p):
        j, cur = i, order[i]
        kc = keys[cur]
        while j > 0 and keys[order[j - 1]] > kc:
            order[j] = order[j - 1]
            j -= 1
        order[j] = cur


@njit(cache=True, nogil=True, inline="always")
def principal_axis(cxx, cyy, cxy):
    """Unit principal axis (cos t, sin t), t = atan2(2 cxy, cxx - cyy) / 2, of a 2x2 covariance, without trigonometry.

    With u = cxx - cyy, v = 2 cxy, r = |(u, v)|: cos 2t = u / r, so the better conditioned of
    cos t = sqrt((1 + u/r) / 2) and |sin t| = sqrt((1 - u/r) / 2) comes first and the other from
    cos t sin t = v / (2 r); cos t >= 0 and sin t has the sign of v. (1, 0) for an isotropic block.
    """
    u, v = cxx - cyy, 2.0 * cxy
    r = math.sqrt(u * u + v * v)
    if r == 0:
        return 1.0, 0.0
    if u >= 0:
        c = math.sqrt(0.5 * (1.0 + u / r))
        return c, v / (2.0 * r * c)
    s = math.sqrt(0.5 * (1.0 - u / r))
    return abs(v) / (2.0 * r * s), (s if v >= 0 else -s)


@njit(cache=True, nogil=True, inline="always")
def _key(samples, b, i, ax, ay):
    """Position of pixel i of block b along the block's axis (the sort key; one expression for both kernels)."""
    return samples[b, i, 0] * ax + samples[b, i, 1] * ay


@njit(cache=True, nogil=True)
def summarise(samples, k, ranks, order, axis, cond, rows, palettes, shares):
    """Kernel 1: sort every block along its principal axis and summarise it for the network.

    Parameters
    ----------
    samples : np.ndarray
        float32 (N, P, 2) Cb/Cr pairs.
    k : np.ndarray
        int64 (N,) palette sizes.
    ranks : np.ndarray
        int64 (Q,) ranks of the network's tokens (:func:`palstream.learned.model.rank_tokens`).

    Outputs, filled in place: ``order`` int32 (N, P), each block's pixels in ascending order of
    their projection on ``axis`` float64 (N, 2). A block with at most k[i] distinct pairs gets
    them here as ``palettes`` float32 (N, kmax, 2) and ``shares`` float32 (N, kmax), in axis
    order, unused slots repeating the first with share 0 (equal pairs are neighbours in axis
    order; two different pairs with the same key can make the count too high, never too low).
    The M other blocks are listed in ``rows`` int64 (N,) and their conditioning vectors
    (:func:`palstream.learned.model.condition`) put in ``cond`` float32 (N, 2Q + 4 + 64), both
    in the first M rows. Returns M.
    """
    n, p = samples.shape[0], samples.shape[1]
    kmax = palettes.shape[1]
    q = len(ranks)
    rank = np.empty(p, np.int64)
    bucket = np.empty(p, np.int64)
    count = np.empty(p + 1, np.int64)
    raw = np.empty(p)
    todo = 0
    for b in range(n):
        sx = sy = sxx = syy = sxy = 0.0
        for i in range(p):
            x, y = float(samples[b, i, 0]), float(samples[b, i, 1])
            sx += x
            sy += y
            sxx += x * x
            syy += y * y
            sxy += x * y
        mx, my = sx / p, sy / p
        cxx, cyy, cxy = sxx / p - mx * mx, syy / p - my * my, sxy / p - mx * my
        ax, ay = principal_axis(cxx, cyy, cxy)
        axis[b, 0] = ax
        axis[b, 1] = ay
        for i in range(p):
            raw[i] = _key(samples, b, i, ax, ay)
        _sort_by_key(raw, rank, count, bucket)
        distinct = 1
        px, py = samples[b, rank[0], 0], samples[b, rank[0], 1]
        order[b, 0] = rank[0]
        for i in range(1, p):
            order[b, i] = rank[i]
            x, y = samples[b, rank[i], 0], samples[b, rank[i], 1]
            distinct += (x != px) | (y != py)
            px, py = x, y
        if distinct <= k[b]:
            slot = -1
            for i in range(p):
                x, y = samples[b, rank[i], 0], samples[b, rank[i], 1]
                if i == 0 or x != samples[b, rank[i - 1], 0] or y != samples[b, rank[i - 1], 1]:
                    slot += 1
                    palettes[b, slot, 0] = x
                    palettes[b, slot, 1] = y
                    shares[b, slot] = 0.0
                shares[b, slot] += 1.0
            for j in range(kmax):
                if j > slot:
                    palettes[b, j, 0] = palettes[b, 0, 0]
                    palettes[b, j, 1] = palettes[b, 0, 1]
                    shares[b, j] = 0.0
                else:
                    shares[b, j] /= p
            continue
        # Conditioning vector: shape tokens (scale-free), level, spread along and across the axis,
        # one-hot palette size.
        s0 = math.sqrt(max(ax * ax * cxx + 2.0 * ax * ay * cxy + ay * ay * cyy, 0.0))
        s1 = math.sqrt(max(ay * ay * cxx - 2.0 * ax * ay * cxy + ax * ax * cyy, 0.0))
        scale = math.sqrt(s0 * s0 + s1 * s1) + 1.0
        rows[todo] = b
        for j in range(q):
            cond[todo, 2 * j] = (samples[b, rank[ranks[j]], 0] - mx) / scale
            cond[todo, 2 * j + 1] = (samples[b, rank[ranks[j]], 1] - my) / scale
        base = 2 * q
        cond[todo, base] = mx / 255.0
        cond[todo, base + 1] = my / 255.0
        cond[todo, base + 2] = math.log1p(s0) / 5.0
        cond[todo, base + 3] = math.log1p(s1) / 5.0
        for j in range(MAX_PALETTE):
            cond[todo, base + 4 + j] = 0.0
        cond[todo, base + 4 + min(max(k[b] - 1, 0), MAX_PALETTE - 1)] = 1.0
        todo += 1
    return todo


@njit(cache=True, nogil=True)
def prefix_table(ordered, keys, table):
    """Prefix sums (P+1, 5) of x, y, x^2 + y^2 and key over the sorted samples, into ``table``.

    Column 4 holds 1/i (0 for i = 0): segment means and errors divide by a segment's count,
    and a multiplication is cheaper than a division.
    """
    sx = sy = sq = sk = 0.0
    table[0, :] = 0.0
    for i in range(len(keys)):
        x, y = ordered[i, 0], ordered[i, 1]
        sx += x
        sy += y
        sq += x * x + y * y
        sk += keys[i]
        table[i + 1, 0] = sx
        table[i + 1, 1] = sy
        table[i + 1, 2] = sq
        table[i + 1, 3] = sk
        table[i + 1, 4] = 1.0 / (i + 1)


@njit(cache=True, nogil=True, inline="always")
def _segment_sse(table, lo, hi):
    """2-D squared error about their mean of the sorted samples lo..hi-1 (0 for an empty segment)."""
    sx = table[hi, 0] - table[lo, 0]
    sy = table[hi, 1] - table[lo, 1]
    return max(table[hi, 2] - table[lo, 2] - (sx * sx + sy * sy) * table[hi - lo, 4], 0.0)


@njit(cache=True, nogil=True, inline="always")
def _key_mean(table, lo, hi, default):
    return (table[hi, 3] - table[lo, 3]) * table[hi - lo, 4] if hi > lo else default


@njit(cache=True, nogil=True, inline="always")
def _rank_of(keys, value):
    """Number of keys (ascending) smaller than ``value`` (searchsorted, left; branch-free halving)."""
    base, n = 0, len(keys)
    while n > 1:
        half = n >> 1
        base = base + half if keys[base + half] < value else base
        n -= half
    return base + (1 if keys[base] < value else 0)


@njit(cache=True, nogil=True)
def companding_axis(keys, cube, starts, level):
    """The companded key axis of a block; returns its number of occupied bins M.

    :func:`palstream.learned.model.companded_segments` splits the key range into 256 equal bins
    and runs ``count ** (1/3)`` over them (normalised to 0..1). Only occupied bins move that
    axis, and the sorted samples of a bin are consecutive, so it is kept as ``starts`` (M+1,):
    the first rank of each occupied bin (and P), and ``level`` (M+1,): the axis at each.
    ``cube`` (P+1,) holds ``c ** (1/3)``.
    """
    p = len(keys)
    lo_key = keys[0]
    scale = HISTOGRAM_BINS / max(keys[p - 1] - lo_key, 1e-6)
    m = 0
    last = -1
    for i in range(p):
        j = min(max(int((keys[i] - lo_key) * scale), 0), HISTOGRAM_BINS - 1)
        if j != last:
            starts[m] = i
            m += 1
            last = j
    starts[m] = p
    level[0] = 0.0
    for j in range(m):
        level[j + 1] = level[j] + cube[starts[j + 1] - starts[j]]
    scale = 1.0 / level[m]
    for j in range(m + 1):
        level[j] *= scale
    return m


@njit(cache=True, nogil=True, inline="always")
def _at_level(g, starts, level, m, table):
    """Count and (x, y) sums of the samples below companded position ``g``, interpolated inside a bin."""
    # The last j in 0..m-1 with level[j] <= g (searchsorted right, minus one, clamped; branch-free halving).
    j, n = 0, m
    while n > 1:
        half = n >> 1
        j = j + half if level[j + half] <= g else j
        n -= half
    frac = min(max((g - level[j]) / max(level[j + 1] - level[j], 1e-9), 0.0), 1.0)
    r0, r1 = starts[j], starts[j + 1]
    return (
        r0 + frac * (r1 - r0),
        table[r0, 0] + frac * (table[r1, 0] - table[r0, 0]),
        table[r0, 1] + frac * (table[r1, 1] - table[r0, 1]),
    )


@njit(cache=True, nogil=True)
def companded_keys(ordered, table, starts, level, m, ax, ay, widths, kk, out):
    """Keys along (ax, ay) of the entries cut by ``widths`` (kk,) on the companded axis, into ``out``.

    Entry ``j`` is the mean of the samples between companded positions ``sum(widths[:j])`` and
    ``sum(widths[:j+1])`` (:func:`palstream.learned.model.companded_segments`; an empty interval
    takes the sample at its rank). ``table``: :func:`prefix_table`; ``starts``, ``level``, ``m``:
    :func:`companding_axis`.
    """
    p = ordered.shape[0]
    run = 0.0
    for s in range(kk):
        run += widths[s]
        hi = min(run, 1.0)
        lo = max(hi - widths[s], 0.0)
        c0, x0, y0 = _at_level(lo, starts, level, m, table)
        c1, x1, y1 = _at_level(hi, starts, level, m, table)
        rank = min(max(int(c0), 0), p - 1)
        den = c1 - c0 + EPS
        ex = (x1 - x0 + EPS * ordered[rank, 0]) / den
        ey = (y1 - y0 + EPS * ordered[rank, 1]) / den
        out[s] = ex * ax + ey * ay


@njit(cache=True, nogil=True)
def _axis_cells(keys, entries, kk, bounds):
    """Sort the entry keys and put the rank bounds of their nearest-entry cells (kk+1,) in ``bounds``."""
    for i in range(1, kk):
        j, cur = i, entries[i]
        while j > 0 and entries[j - 1] > cur:
            entries[j] = entries[j - 1]
            j -= 1
        entries[j] = cur
    bounds[0] = 0
    for j in range(1, kk):
        bounds[j] = _rank_of(keys, (entries[j - 1] + entries[j]) * 0.5)
    bounds[kk] = len(keys)


@njit(cache=True, nogil=True)
def _axis_swap(table, keys, entries, kk, bounds):
    """One merge-and-split move along the axis where it lowers the error (``entries`` are the cell means).

    Lloyd stops at a local optimum; this move leaves it. The two adjacent cells whose merge
    costs least become one entry; the entry freed splits the cell with the largest 2-D error
    (another one) in two, placed by a 2-means on its keys (``SPLIT_STEPS`` updates from
    mean -/+ one standard deviation). Made where the split's gain exceeds the merge's cost;
    returns whether it was.
    """
    jm, cost = -1, math.inf
    right = _segment_sse(table, bounds[0], bounds[1])
    for j in range(kk - 1):
        left, right = right, _segment_sse(table, bounds[j + 1], bounds[j + 2])
        c = _segment_sse(table, bounds[j], bounds[j + 2]) - left - right
        jm = j if c < cost else jm  # selects, not branches: the comparisons are unpredictable
        cost = min(c, cost)
    big, c = -1.0, -1
    for j in range(kk):
        e = _segment_sse(table, bounds[j], bounds[j + 1]) if j != jm and j != jm + 1 else -1.0
        c = j if e > big else c
        big = max(e, big)
    if c < 0:
        return False
    clo, chi = bounds[c], bounds[c + 1]
    whole = chi - clo
    mean = (table[chi, 3] - table[clo, 3]) * table[whole, 4]
    sd = math.sqrt(big * table[whole, 4])
    a, b = mean - sd, mean + sd
    cut = clo
    for _ in range(SPLIT_STEPS + 1):
        cut = min(max(_rank_of(keys, (a + b) * 0.5), clo), chi)
        a = _key_mean(table, clo, cut, a)
        b = _key_mean(table, cut, chi, b)
    if cut == clo or cut == chi:
        return False
    gain = big - _segment_sse(table, clo, cut) - _segment_sse(table, cut, chi)
    if gain > cost + 1e-9:
        entries[jm] = _key_mean(table, bounds[jm], bounds[jm + 2], 0.0)
        entries[jm + 1] = a
        entries[c] = b
        return True
    return False


@njit(cache=True, nogil=True)
def axis_lloyd(ordered, keys, table, entries, kk, steps, swaps, bounds, means):
    """Lloyd updates along the axis with merge-and-split moves; returns the partition's 2-D squared error.

    ``entries`` (kk,) are start keys; ``steps`` updates, then ``swaps`` updates each combined
    with a move (:func:`_axis_swap`), every one O(K log P) from the prefix ``table``
    (:func:`prefix_table`); an update that changes no entry is not repeated (its cells are
    known). The final cells' 2-D means go to ``means`` (kk, 2) (an empty cell takes the sample
    at its bound); the error returned is exact for that partition.
    """
    p = len(keys)
    total = steps + swaps
    same = False  # entries unchanged by the last update: their cells are those already in ``bounds``
    for step in range(total + 1):
        if not same:
            _axis_cells(keys, entries, kk, bounds)
        if step == total:
            break
        same = True
        for j in range(kk):
            mean = _key_mean(table, bounds[j], bounds[j + 1], entries[j])
            same = same and mean == entries[j]
            entries[j] = mean
        if step >= steps and kk > 1 and _axis_swap(table, keys, entries, kk, bounds):
            same = False
    sse = 0.0
    for j in range(kk):
        lo, hi = bounds[j], bounds[j + 1]
        sse += _segment_sse(table, lo, hi)
        if hi > lo:
            means[j, 0] = (table[hi, 0] - table[lo, 0]) * table[hi - lo, 4]
            means[j, 1] = (table[hi, 1] - table[lo, 1]) * table[hi - lo, 4]
        else:
            r = min(lo, p - 1)
            means[j, 0] = ordered[r, 0]
            means[j, 1] = ordered[r, 1]
    return sse


@njit(cache=True, nogil=True, inline="always")
def _err(n, sx, sy, sq):
    return max(sq - (sx * sx + sy * sy) / max(n, 1.0), 0.0)


@njit(cache=True, nogil=True, inline="always")
def _near_side(x, y, cell, c):
    """Whether (x, y) lies on the near side of the cut of cell c (through its mean, across its axis)."""
    return (x - cell[1, c]) * cell[3, c] + (y - cell[2, c]) * cell[4, c] < 0


@njit(cache=True, nogil=True)
def cell_moments(ordered, label, mom, cell=None):
    """Count and sums of x, y, x^2, y^2, xy of each label's pixels, into ``mom`` (K, 6); with
    ``cell`` (:func:`_split_cells`), of only the pixels on the near side of their cell's cut.

    Pixels in axis order mostly come in runs of one label: sums are kept in registers along a
    run and added to ``mom`` when it ends.
    """
    mom[:] = 0.0
    p = len(label)
    i = 0
    while i < p:
        c = label[i]
        n = sx = sy = sxx = syy = sxy = 0.0
        while i < p and label[i] == c:
            x, y = ordered[i, 0], ordered[i, 1]
            w = 1.0 if cell is None or _near_side(x, y, cell, c) else 0.0
            wx, wy = w * x, w * y
            n += w
            sx += wx
            sy += wy
            sxx += wx * x
            syy += wy * y
            sxy += wx * y
            i += 1
        mom[c, 0] += n
        mom[c, 1] += sx
        mom[c, 2] += sy
        mom[c, 3] += sxx
        mom[c, 4] += syy
        mom[c, 5] += sxy


@njit(cache=True, nogil=True)
def move_scratch(kmax):
    """Work arrays of :func:`merge_split_moves` for palettes of up to ``kmax`` entries."""
    return (
        np.empty((5, kmax)),  # cell: count, mean x, mean y and principal axis (cos, sin) of each cell
        np.empty((kmax, 6)),  # left: moments (as mom) of the near side of each cell's cut
        np.empty(kmax),  # gain of each cell's cut
        np.empty((kmax, kmax)),  # merge cost of each pair a < b
        np.empty(kmax),  # cheapest merge in each row a (over b > a)
        np.empty(kmax, np.int64),  # and its b
        np.empty(3, np.int64),  # the cells a move changed
        np.arange(kmax),  # every cell
    )


@njit(cache=True, nogil=True)
def _split_cells(ordered, label, kk, mom, cell, left, gain, cells):
    """Each cell's cut through its mean across its own principal axis, and what it gains.

    The count, mean and axis of ``cells`` are recomputed from ``mom``; then one pass over the
    pixels sums the moments of the near side of every cut (``left``; in registers along runs
    of one label) and the gains of ``cells`` are updated (-1 where one side would be empty).
    """
    for c in cells:
        n = max(mom[c, 0], 1.0)
        mx, my = mom[c, 1] / n, mom[c, 2] / n
        cell[0, c] = mom[c, 0]
        cell[1, c] = mx
        cell[2, c] = my
        cell[3, c], cell[4, c] = principal_axis(mom[c, 3] / n - mx * mx, mom[c, 4] / n - my * my, mom[c, 5] / n - mx * my)
    cell_moments(ordered, label, left[:kk], cell)
    for c in cells:
        ln = left[c, 0]
        rn = mom[c, 0] - ln
        if ln == 0 or rn == 0:
            gain[c] = -1.0
        else:
            sq, lsq = mom[c, 3] + mom[c, 4], left[c, 3] + left[c, 4]
            gain[c] = (
                _err(mom[c, 0], mom[c, 1], mom[c, 2], sq)
                - _err(ln, left[c, 1], left[c, 2], lsq)
                - _err(rn, mom[c, 1] - left[c, 1], mom[c, 2] - left[c, 2], sq - lsq)
            )


@njit(cache=True, nogil=True, inline="always")
def _merge_cost(cell, a, b):
    """n_a n_b / (n_a + n_b) |m_a - m_b|^2: the error added by merging cells a and b (0 if one is empty)."""
    na, nb = cell[0, a], cell[0, b]
    dx = cell[1, a] - cell[1, b]
    dy = cell[2, a] - cell[2, b]
    return na * nb / max(na + nb, 1.0) * (dx * dx + dy * dy)


@njit(cache=True, nogil=True, inline="always")
def _row_min(cost, kk, a, rowmin, rowarg):
    best, arg = math.inf, -1
    for b in range(a + 1, kk):
        arg = b if cost[a, b] < best else arg
        best = min(cost[a, b], best)
    rowmin[a] = best
    rowarg[a] = arg


@njit(cache=True, nogil=True)
def merge_split_moves(ordered, label, kk, moves, mom, scratch):
    """Up to ``moves`` 2-D merge-and-split moves on the partition ``label`` (P,) of kk cells, in place.

    Lloyd stops at a local optimum; a move leaves it. The two cells cheapest to merge
    (:func:`_merge_cost`; the first pair a < b on ties) become one (a takes b's pixels); the
    entry freed (b) takes the near half of the cell whose cut through its mean across its own
    principal axis gains most. Made only where the gain exceeds the cost, so each move lowers
    the partition's error by their difference; the first move not made ends the loop (the next
    would be the same). ``mom`` (K, 6) holds the cells' moments (:func:`cell_moments`) and is
    kept up to date; ``scratch`` is :func:`move_scratch`. A move changes three cells, so it
    costs two passes over the pixels (relabel, and the new cells' cuts) and O(K) merge costs
    (kept per pair, with row minima).
    """
    cell, left, gain, cost, rowmin, rowarg, changed, every = scratch
    _split_cells(ordered, label, kk, mom, cell, left, gain, every[:kk])
    for a in range(kk):
        for b in range(a + 1, kk):
            cost[a, b] = _merge_cost(cell, a, b)
        _row_min(cost, kk, a, rowmin, rowarg)
    for move in range(moves):
        ca, cheapest = 0, math.inf
        for a in range(kk - 1):
            ca = a if rowmin[a] < cheapest else ca
            cheapest = min(rowmin[a], cheapest)
        cb = rowarg[ca]
        best, cc = -1.0, -1
        for j in range(kk):
            g = gain[j] if j != ca and j != cb else -1.0
            cc = j if g > best else cc
            best = max(g, best)
        if not best > cheapest + 1e-6:
            break
        for i in range(len(label)):
            c = label[i]
            near = _near_side(ordered[i, 0], ordered[i, 1], cell, cc)
            label[i] = ca if c == cb else (cb if c == cc and near else c)
        for t in range(6):  # the moments follow: a gains b's pixels, b is the near side of c's cut
            mom[ca, t] += mom[cb, t]
            mom[cb, t] = left[cc, t]
            mom[cc, t] -= left[cc, t]
        changed[0], changed[1], changed[2] = ca, cb, cc
        if move == moves - 1:
            break  # the cuts and merge costs of the new cells are not needed
        _split_cells(ordered, label, kk, mom, cell, left, gain, changed)
        for c in changed:
            for j in range(c):
                cost[j, c] = _merge_cost(cell, j, c)
            for j in range(c + 1, kk):
                cost[c, j] = _merge_cost(cell, c, j)
        for a in range(kk - 1):
            if a == ca or a == cb or a == cc or rowarg[a] == ca or rowarg[a] == cb or rowarg[a] == cc:
                _row_min(cost, kk, a, rowmin, rowarg)
            else:
                for c in changed:
                    if c > a and (cost[a, c] < rowmin[a] or (cost[a, c] == rowmin[a] and c < rowarg[a])):
                        rowmin[a] = cost[a, c]
                        rowarg[a] = c


@njit(cache=True, nogil=True, inline="always")
def _scan_by_key(pal, entry_keys, order, x, y, kp, start, stop, step, near, best):
    """Nearest entry to (x, y) among ``order[start:stop:step]`` (entries in key order), starting
    from ``near``/``best``: stops where the key distance alone exceeds the best distance."""
    for t in range(start, stop, step):
        e = order[t]
        dk = entry_keys[e] - kp
        if dk * dk > best * (1.0 + 1e-9) + 1e-9:
            break
        dx, dy = x - pal[e, 0], y - pal[e, 1]
        d = dx * dx + dy * dy
        if d < best or (d == best and e < near):
            near, best = e, d
    return near, best


@njit(cache=True, nogil=True)
def nearest_labels(ordered, keys, pal, ax, ay, kk, order, entry_keys, label):
    """Each sorted pixel's nearest entry of ``pal`` (kk, 2) (the lowest index on ties), into ``label``.

    Up to ``FEW`` entries every one is tried. Otherwise the pixels are sorted by their key along (ax, ay); with the entries sorted by theirs too,
    the search starts at the pixel's key and stops on each side once the key difference alone
    exceeds the best distance. Equal neighbouring pairs reuse the previous answer.
    ``order``, ``entry_keys`` (kk,) are scratch.
    """
    if kk <= FEW:  # try them all (no branches to mispredict)
        for i in range(len(label)):
            x, y = ordered[i, 0], ordered[i, 1]
            near, best = 0, math.inf
            for j in range(kk):
                dx, dy = x - pal[j, 0], y - pal[j, 1]
                d = dx * dx + dy * dy
                near = j if d < best else near
                best = min(d, best)
            label[i] = near
        return
    for j in range(kk):
        entry_keys[j] = pal[j, 0] * ax + pal[j, 1] * ay
        order[j] = j
    for i in range(1, kk):
        j, cur = i, order[i]
        while j > 0 and entry_keys[order[j - 1]] > entry_keys[cur]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = cur
    pos = 0
    for i in range(len(label)):
        x, y = ordered[i, 0], ordered[i, 1]
        if i and x == ordered[i - 1, 0] and y == ordered[i - 1, 1]:
            label[i] = label[i - 1]
            continue
        kp = keys[i]
        while pos < kk and entry_keys[order[pos]] < kp:
            pos += 1
        near, best = _scan_by_key(pal, entry_keys, order, x, y, kp, pos, kk, 1, kk, math.inf)  # upward from the key
        label[i] = _scan_by_key(pal, entry_keys, order, x, y, kp, pos - 1, -1, -1, near, best)[0]  # then downward


@njit(cache=True, nogil=True)
def decode(samples, order, axis, k, rows, logits, steps, swaps, moves, palettes, shares):
    """Kernel 2: palettes and pixel shares of the blocks ``rows`` (M,), written into ``palettes`` and ``shares``.

    ``order`` and ``axis`` come from :func:`summarise`; ``logits`` float32 (M, kmax) are the
    network's width logits for those rows (M, 0: no network, the plain companding cuts only).
    ``steps`` Lloyd updates and ``swaps`` moves along the axis, then up to ``moves`` moves in
    the 2-D pass (see the module docstring).
    """
    p = samples.shape[1]
    kmax = palettes.shape[1]
    use_net = logits.shape[1] > 0
    cube = np.empty(p + 1)
    for c in range(p + 1):
        cube[c] = c ** COMPANDING
    block = np.empty((p, 2))
    keys = np.empty(p)
    table = np.empty((p + 1, 5))
    starts = np.empty(p + 1, np.int64)
    level = np.empty(p + 1)
    widths = np.empty(kmax)
    entries = np.empty(kmax)
    bounds = np.empty(kmax + 1, np.int64)
    means = np.empty((2, kmax, 2))
    label = np.empty(p, np.int64)
    mom = np.empty((kmax, 6))
    by_key = np.empty(kmax, np.int64)
    entry_keys = np.empty(kmax)
    scratch = move_scratch(kmax)
    for r in range(len(rows)):
        b = rows[r]
        kk = k[b]
        ax, ay = axis[b, 0], axis[b, 1]
        for i in range(p):
            o = order[b, i]
            block[i, 0] = samples[b, o, 0]
            block[i, 1] = samples[b, o, 1]
            keys[i] = _key(samples, b, o, ax, ay)
        prefix_table(block, keys, table)
        m = companding_axis(keys, cube, starts, level)
        best, pick = math.inf, 0
        for s in range(2 if use_net else 1):
            if use_net and s == 0:  # the network's widths: softmax over the block's k slots
                top = -math.inf
                for j in range(kk):
                    top = max(top, float(logits[r, j]))
                total = 0.0
                for j in range(kk):
                    widths[j] = math.exp(float(logits[r, j]) - top)
                    total += widths[j]
                for j in range(kk):
                    widths[j] /= total
            else:  # plain companding cuts
                for j in range(kk):
                    widths[j] = 1.0 / kk
            companded_keys(block, table, starts, level, m, ax, ay, widths, kk, entries)
            sse = axis_lloyd(block, keys, table, entries, kk, steps, swaps, bounds, means[s])
            if sse < best:  # ties go to the first start (the network)
                best, pick = sse, s
        pal = means[pick]
        # The 2-D pass: nearest entries, moves, each entry to its pixels' mean.
        nearest_labels(block, keys, pal, ax, ay, kk, by_key, entry_keys, label)
        cell_moments(block, label, mom)
        if moves and kk > 2:
            merge_split_moves(block, label, kk, moves, mom, scratch)
        for j in range(kmax):
            if j < kk:
                n = mom[j, 0]
                if n > 0:
                    pal[j, 0] = mom[j, 1] / n
                    pal[j, 1] = mom[j, 2] / n
                palettes[b, j, 0] = pal[j, 0]
                palettes[b, j, 1] = pal[j, 1]
                shares[b, j] = n / p
            else:
                palettes[b, j, 0] = pal[0, 0]
                palettes[b, j, 1] = pal[0, 1]
                shares[b, j] = 0.0
