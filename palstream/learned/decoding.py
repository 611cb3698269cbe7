"""Inference-time decoding of cgan-v1: from the network's width logits to palettes, fast.

Training (:mod:`palstream.learned.train`) uses the differentiable path of
:class:`palstream.learned.model.PaletteNet` on sorted samples. At inference the same cuts are
decoded with cheaper, exact equivalents, and a few deterministic layers follow the network:

Luma (1-D) works on a per-block 256-bin level histogram (one ``bincount`` over the pixels):

* the network's inputs (samples at evenly spaced ranks, mean, spread) come from the histogram's
  prefix sums instead of a sort;
* the companded cuts (:func:`palstream.learned.model.companded_segments`) are evaluated on the
  histogram; for integer levels (what the codec sends) the result is identical;
* each Lloyd update is O(256 + k) per block, independent of the pixel count: the pixels nearest
  to each entry are the levels between midpoints, and their count and sum come from prefix sums;
  merge-and-split moves (:meth:`LevelHistogram.swap`) leave Lloyd's local optima, also O(k);
* a block with at most ``k`` distinct levels gets them as its palette (zero error).

Chroma (Cb/Cr pairs) is cut along the block's principal colour axis like luma, on the samples
sorted along it (Lloyd updates and a merge-and-split move from prefix sums), then made 2-D by
one pass over the pixels: each pixel goes to its nearest entry, about k/4 merge-and-split moves
in 2-D fix what a single axis cannot separate, and each entry moves to its pixels' mean. A
block with at most ``k`` distinct pairs gets them as its palette. At these block sizes batched
torch ops cost more in per-op overhead than in arithmetic, so chroma runs as per-block numba
kernels on the CPU (:mod:`palstream.learned.chroma`; samples on CUDA are copied to the CPU for
it), with only the network's forward pass in torch, between the kernel that sorts and
summarises the blocks and the one that decodes the cuts.

Both keep the better (lower squared error) of the network's cuts and the plain companding cuts,
per block. Everything here is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from palstream.learned import chroma
from palstream.learned.chroma import SPLIT_STEPS  # 2-means updates that place a split (luma and chroma)
from palstream.learned.model import COMPANDING, HISTOGRAM_BINS, active_mask, condition
from palstream.palettes.base import MAX_PALETTE

LUMA_STEPS = 2  # Lloyd updates on the level histogram (each O(k) per block from prefix sums)
SWAPS_PER_ENTRY = 0.25  # then max(1, k/4) updates, each combined with a merge-and-split move
SWAP_STEPS = 0  # plain updates after each move
CHUNK_ELEMENTS = 1 << 17  # luma blocks are decoded in chunks of about this many table entries
CHROMA_STEPS = 2  # Lloyd updates along the principal axis (O(k log P) per block from prefix sums)
CHROMA_SWAPS = 1  # then merge-and-split moves along the axis


class LevelHistogram:
    """Per-block 256-bin level histogram with float64 prefix sums of count, sum and square.

    Bin ``b`` holds the pixels whose level rounds to ``b``; its representative is the mean of
    those pixels (the level itself for integer input). Palettes are handled as (N, S, K):
    S candidate palettes ("starts") per block, decoded side by side.

    Parameters
    ----------
    counts : torch.Tensor
        int64 (N, 256) pixels per level bin (:func:`level_counts`).
    p : int
        Pixels per block.
    sums, squares : torch.Tensor, optional
        float64 (N, 256) sum and square sum of the pixels in each bin, for non-integer samples;
        without them the samples are integer levels and both follow from the counts.
    """

    def __init__(self, counts: torch.Tensor, p: int, sums: torch.Tensor | None = None, squares: torch.Tensor | None = None):
        n = len(counts)
        dev = counts.device
        self.n, self.p = n, p
        bins = HISTOGRAM_BINS
        # Integer levels (what the codec sends) give integer tables: float32 holds them exactly
        # while P * 255^2 < 2^24 (blocks up to 16x16), at half the memory traffic.
        self.dtype = torch.float32 if sums is None and p * 255 * 255 < (1 << 24) else torch.float64
        self.counts = counts.to(self.dtype)
        levels = torch.arange(bins, device=dev, dtype=self.dtype)
        if sums is None:
            self.sums = self.counts * levels
            squares = self.sums * levels
            self.reps = levels.expand(n, bins)
        else:
            self.sums = sums
            self.reps = torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), levels)
        pad = lambda t: nn.functional.pad(t, (1, 0)).cumsum(1)  # noqa: E731
        self.prefix = tuple(pad(t) for t in (self.counts, self.sums, squares))  # 3 x (N, 257)
        self.flat = tuple(t.reshape(-1) for t in self.prefix)
        self.row_base = torch.arange(n, device=dev)[:, None] * (bins + 1)
        self.totals = tuple(t[:, -1:].double() for t in self.prefix)  # 3 x (N, 1)

    def take(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix count, sum and square at bin boundaries: bounds (N, ...) int64 in 0..256 -> 3 x (N, ...)."""
        flat = (bounds.reshape(self.n, -1) + self.row_base).reshape(-1)
        count, total, square = (t.index_select(0, flat).reshape(bounds.shape).double() for t in self.flat)
        return count, total, square

    def value_at_rank(self, ranks: torch.Tensor) -> torch.Tensor:
        """(N, R) float64: the sample value at each (0-based) rank, as a sort would give it."""
        b = torch.searchsorted(self.prefix[0][:, 1:].contiguous(), ranks.to(self.dtype).contiguous(), right=True)
        return torch.gather(self.reps, 1, b.clamp(max=HISTOGRAM_BINS - 1)).double()

    def summary(self, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's block summary: rank tokens (N, q, 1), mean (N, 1) and spread (N, 1), float32."""
        ranks = torch.linspace(0, self.p - 1, q, device=self.counts.device).round()
        tokens = self.value_at_rank(ranks.expand(self.n, q))
        mean = self.totals[1] / self.p
        spread = (self.totals[2] / self.p - mean * mean).clamp(min=0).sqrt()
        return tokens[..., None].float(), mean.float(), spread.float()

    def companded(self, shares: torch.Tensor) -> torch.Tensor:
        """Entries (N, S, K) as means of the pixels between cuts on the companded level axis.

        ``shares`` (N, S, K) are interval widths on the axis. Same construction as
        :func:`palstream.learned.model.companded_segments` (identical for integer levels): the
        axis is the running sum of ``count ** (1/3)`` over the bins, interpolated inside a bin.
        """
        n, s, kk = shares.shape
        bins = HISTOGRAM_BINS
        axis = nn.functional.pad(self.counts.pow(COMPANDING), (1, 0)).cumsum(1).double()
        axis = axis / axis[:, -1:]
        g_hi = shares.double().cumsum(-1).clamp(max=1.0)
        g = torch.cat([(g_hi - shares.double()).clamp(min=0.0), g_hi], -1).reshape(n, -1)
        i = (torch.searchsorted(axis, g.contiguous(), right=True) - 1).clamp(0, bins - 1)
        a0, a1 = torch.gather(axis, 1, i), torch.gather(axis, 1, i + 1)
        frac = ((g - a0) / (a1 - a0).clamp(min=1e-9)).clamp(0, 1)
        (c0, s0, _), (c1, s1, _) = self.take(i), self.take(i + 1)
        cnt = (c0 + frac * (c1 - c0)).reshape(n, s, 2 * kk)
        tot = (s0 + frac * (s1 - s0)).reshape(n, s, 2 * kk)
        count_lo, count_hi = cnt[..., :kk], cnt[..., kk:]
        fallback = self.value_at_rank(count_lo.reshape(n, -1).floor().clamp(0, self.p - 1)).reshape(n, s, kk)
        eps = 1e-3  # as in companded_segments: an empty interval takes the sample at its rank
        return (tot[..., kk:] - tot[..., :kk] + eps * fallback) / (count_hi - count_lo + eps)

    def cells(self, entries: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Nearest-entry cells of ascending entries (N, S, K) (+inf past k): bin bounds (N, S, K+1) and
        (count, sum, square) of each cell, 3 x (N, S, K). Levels below a midpoint go left."""
        mid = (entries[..., :-1] + entries[..., 1:]) * 0.5
        cuts = mid.ceil().clamp(0, HISTOGRAM_BINS).long()
        edge = cuts.new_zeros(*cuts.shape[:-1], 1)  # not zeros_like(cuts[..., :1]): k = 1 leaves no cuts
        bounds = torch.cat([edge, cuts, edge + HISTOGRAM_BINS], -1)
        count, total, square = (v[..., 1:] - v[..., :-1] for v in self.take(bounds))
        return bounds, (count, total, square)

    def lloyd(self, entries: torch.Tensor, k: torch.Tensor, steps: int, swaps: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lloyd updates on the histogram, with merge-and-split moves, then the exact error.

        ``steps`` updates, then ``swaps`` times: one update combined with a merge-and-split move
        (:meth:`swap`) and ``SWAP_STEPS`` more updates.

        Parameters
        ----------
        entries : torch.Tensor
            float64 (N, S, K) starting entries (first k[i] used).
        k : torch.Tensor
            int64 (N,).

        Returns
        -------
        entries : torch.Tensor
            (N, S, K) float64, ascending over the first k[i]; later slots copy entry 0.
        counts : torch.Tensor
            (N, S, K) float64 pixels each entry takes (0 past k[i]).
        sse : torch.Tensor
            (N, S) float64 squared error of nearest-entry assignment (exact for integer levels).
        """
        kmax = entries.shape[-1]
        active = active_mask(k, kmax)[:, None, :].expand_as(entries)
        swap_at = {steps + r * (SWAP_STEPS + 1) for r in range(swaps)}
        for step in range(steps + swaps * (SWAP_STEPS + 1) + 1):
            entries = entries.masked_fill(~active, float("inf")).sort(-1).values
            bounds, cell = self.cells(entries)
            if step == steps + swaps * (SWAP_STEPS + 1):
                break
            cnt = cell[0]
            means = torch.where((cnt > 0) & active, cell[1] / cnt.clamp(min=1), entries)
            entries = self.swap(means, active, bounds, cell) if step in swap_at and kmax > 1 else means
        cnt, tot, sq = cell
        safe = entries.masked_fill(~active, 0.0)
        sse = ((sq - 2 * safe * tot + cnt * safe * safe) * active).sum(-1).clamp(min=0)
        entries = torch.where(active, entries, entries[..., :1])
        return entries, cnt * active, sse

    def swap(
        self, means: torch.Tensor, active: torch.Tensor, bounds: torch.Tensor, cell: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """A merge-and-split move on each block (and start) where it lowers the error.

        Lloyd stops at a local optimum; this move leaves it. The two adjacent cells whose merge
        costs least become one entry; the entry freed splits the cell with the largest error
        (another one) in two, placed by a 2-means on that cell's bins (``SPLIT_STEPS`` updates
        from mean -/+ one standard deviation). The move is made where the split's gain exceeds
        the merge's cost, so the partition's error drops, and Lloyd updates only lower it
        further. O(k) per block from the prefix sums (the pixels are not visited).

        ``means`` (N, S, K) are the cell means (the Lloyd update of the cells ``bounds``/``cell``).
        """
        def sse_of(v):
            return (v[2] - v[1] * v[1] / v[0].clamp(min=1)).clamp(min=0)

        def minus(u, v):
            return tuple(a - b for a, b in zip(u, v))

        err = sse_of(cell)
        joined = tuple(v[..., :-1] + v[..., 1:] for v in cell)
        cost = (sse_of(joined) - err[..., :-1] - err[..., 1:]).masked_fill(~active[..., 1:], float("inf"))
        cost, j = cost.min(-1, keepdim=True)  # merge cells j and j+1
        slots = torch.arange(means.shape[-1], device=means.device)
        pool = err.masked_fill(~active | (slots == j) | (slots == j + 1), -1.0)
        big, c = pool.max(-1, keepdim=True)  # split cell c
        clo, chi = torch.gather(bounds, -1, c), torch.gather(bounds, -1, c + 1)
        vlo, vhi = self.take(clo), self.take(chi)
        whole = minus(vhi, vlo)
        mean = whole[1] / whole[0].clamp(min=1)
        sd = (big.clamp(min=0) / whole[0].clamp(min=1)).sqrt()
        a, b = mean - sd, mean + sd
        for _ in range(SPLIT_STEPS + 1):
            cut = ((a + b) * 0.5).ceil().clamp(0, HISTOGRAM_BINS).long()
            cut = torch.maximum(torch.minimum(cut, chi), clo)
            vc = self.take(cut)
            left, right = minus(vc, vlo), minus(vhi, vc)
            a = torch.where(left[0] > 0, left[1] / left[0].clamp(min=1), a)
            b = torch.where(right[0] > 0, right[1] / right[0].clamp(min=1), b)
        ok = (left[0] > 0) & (right[0] > 0) & (big >= 0)
        gain = (big - sse_of(left) - sse_of(right)).masked_fill(~ok, -1.0)
        do = gain > cost + 1e-9
        joined_mean = torch.gather(joined[1], -1, j) / torch.gather(joined[0], -1, j).clamp(min=1)
        moved = means.scatter(-1, j, joined_mean).scatter(-1, j + 1, a).scatter(-1, c, b)
        return torch.where(do, moved, means)



def level_counts(rounded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 256) int64 counts of integer levels (N, P), and the flat bin index of every pixel."""
    n = len(rounded)
    flat = (rounded.long() + torch.arange(n, device=rounded.device)[:, None] * HISTOGRAM_BINS).reshape(-1)
    return torch.bincount(flat, minlength=n * HISTOGRAM_BINS).reshape(n, HISTOGRAM_BINS), flat


def exact_levels(counts: torch.Tensor, sums: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Palettes of blocks with at most kmax occupied bins: each bin's mean (the level, for integer input).

    ``counts`` and ``sums`` (N, 256) per bin. Returns (N, kmax) float64 entries, ascending (later
    slots copy entry 0), and (N, kmax) counts. O(256) per block: the pixels are not visited.
    """
    n = len(counts)
    occupied = counts > 0
    slot = (occupied.cumsum(1) - 1).masked_fill(~occupied, kmax).clamp(max=kmax)  # kmax: a dump column
    cnt = counts.new_zeros(n, kmax + 1, dtype=torch.float64).scatter_add_(1, slot, counts.double())
    tot = cnt.new_zeros(n, kmax + 1).scatter_add_(1, slot, sums.double())
    cnt, tot = cnt[:, :kmax], tot[:, :kmax]
    entries = tot / cnt.clamp(min=1)
    entries = torch.where(cnt > 0, entries, entries[:, :1])
    return entries, cnt


def _luma(net, samples: torch.Tensor, k: torch.Tensor, kmax: int, features, present, steps: int, swaps: int):
    n, p, _ = samples.shape
    x = samples[..., 0]
    rounded = x.round().clamp(0, HISTOGRAM_BINS - 1)
    counts, flat = level_counts(rounded)
    sums = squares = None
    if not torch.equal(rounded, x):  # not integer levels: each bin's exact sums (integer levels need none)
        wide = x.reshape(-1).double()
        sums = torch.bincount(flat, weights=wide, minlength=n * HISTOGRAM_BINS).reshape(n, HISTOGRAM_BINS)
        squares = torch.bincount(flat, weights=wide * wide, minlength=n * HISTOGRAM_BINS).reshape(n, HISTOGRAM_BINS)
    fits = (counts > 0).sum(1) <= k
    entries = samples.new_zeros(n, kmax, dtype=torch.float64)
    shares = samples.new_zeros(n, kmax, dtype=torch.float64)
    if bool(fits.any()):  # at most k distinct levels: they are the palette (zero error)
        exact = fits.nonzero()[:, 0]
        level_sums = counts[exact] * torch.arange(HISTOGRAM_BINS, device=x.device) if sums is None else sums[exact]
        e, c = exact_levels(counts[exact], level_sums, kmax)
        entries[exact], shares[exact] = e, c / p
    if bool(fits.all()):
        return entries[..., None].float(), shares.float()
    rows: torch.Tensor | slice = (~fits).nonzero()[:, 0] if bool(fits.any()) else slice(None)
    kk = k[rows]
    hist = LevelHistogram(counts[rows], p, None if sums is None else sums[rows], None if squares is None else squares[rows])
    active = active_mask(kk, kmax)
    starts = [active.double() / kk[:, None].double()]  # plain companding cuts
    if net is not None:
        tokens, mean, spread = hist.summary(net.cfg.tokens)
        feats = None if features is None else features[rows]
        pres = None if present is None else present[rows]
        logits = net.logits(condition(tokens, mean, spread, kk), feats, pres, kmax)
        starts.insert(0, logits.masked_fill(~active, float("-inf")).softmax(-1).double())
    e, c, sse = hist.lloyd(hist.companded(torch.stack(starts, 1)), kk, steps, swaps)
    pick = sse.argmin(1, keepdim=True)[..., None].expand(-1, 1, kmax)  # ties go to the network (start 0)
    e, c = torch.gather(e, 1, pick)[:, 0], torch.gather(c, 1, pick)[:, 0] / p
    if isinstance(rows, slice):
        return e[..., None].float(), c.float()
    entries[rows], shares[rows] = e, c
    return entries[..., None].float(), shares.float()


def _chroma(net, samples: torch.Tensor, k: torch.Tensor, kmax: int, features, present, steps: int, swaps: int, moves: int):
    """Chroma palettes by the per-block kernels of :mod:`palstream.learned.chroma`, on the CPU.

    Samples on another device (CUDA) are copied to the CPU for the kernels and the result is
    copied back; only the network's forward pass runs on the network's device.
    """
    n, p, _ = samples.shape
    x = samples.detach().to("cpu", torch.float32).contiguous().numpy()
    kk = k.detach().to("cpu", torch.int64).contiguous().numpy()
    order, axis = np.empty((n, p), np.int32), np.empty((n, 2))
    q = net.cfg.tokens if net is not None else 1
    cond = np.empty((n, 2 * q + 4 + MAX_PALETTE), np.float32)
    rows = np.empty(n, np.int64)
    palettes, shares = np.empty((n, kmax, 2), np.float32), np.empty((n, kmax), np.float32)
    ranks = torch.linspace(0, p - 1, q).round().long().numpy()  # as rank_tokens
    todo = chroma.summarise(x, kk, ranks, order, axis, cond, rows, palettes, shares)
    if todo:
        rows = rows[:todo]
        logits = np.empty((todo, 0), np.float32)
        if net is not None:
            device = next(net.parameters()).device
            pick = torch.from_numpy(rows).to(device)
            feats = None if features is None else features[pick]
            pres = None if present is None else present[pick]
            logits = net.logits(torch.from_numpy(cond[:todo]).to(device), feats, pres, kmax).float().cpu().contiguous().numpy()
        chroma.decode(x, order, axis, kk, rows, logits, steps, swaps, moves, palettes, shares)
    return torch.from_numpy(palettes).to(samples.device), torch.from_numpy(shares).to(samples.device)


@torch.no_grad()
def generate_palettes(
    net,
    samples: torch.Tensor,
    k: torch.Tensor,
    kmax: int,
    features: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    luma_steps: int = LUMA_STEPS,
    luma_swaps: int | None = None,
    chroma_steps: int = CHROMA_STEPS,
    chroma_swaps: int = CHROMA_SWAPS,
    chroma_moves: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Palettes (N, kmax, C) and pixel shares (N, kmax) of blocks (N, P, C), as cgan-v1 ships them.

    Parameters
    ----------
    net : PaletteNet or None
        The trained network for this component; ``None`` decodes the plain companding cuts
        only (the "no network" ablation of ``benchmarks/palette_quality.py``).
    samples : torch.Tensor
        float32 (N, P, C), values 0..255.
    k : torch.Tensor
        int64 (N,), 1..kmax.
    luma_steps, luma_swaps, chroma_steps, chroma_swaps, chroma_moves : int
        Numbers of the deterministic update layers (see the module docstring); ``luma_swaps``
        and ``chroma_moves`` default to about one per four entries.
    """
    n, p, c = samples.shape
    if n == 0:
        return samples.new_zeros(0, kmax, c), samples.new_zeros(0, kmax)
    if luma_swaps is None:
        luma_swaps = max(1, round(SWAPS_PER_ENTRY * kmax))
    if chroma_moves is None:
        chroma_moves = round(SWAPS_PER_ENTRY * kmax)
    if c == 2:  # per-block kernels: no temporaries over the batch, no chunks
        return _chroma(net, samples, k, kmax, features, present, chroma_steps, chroma_swaps, chroma_moves)
    # Luma works in chunks of blocks whose largest temporaries stay near 1 MB: beyond a few MB
    # every new tensor is fresh memory from the OS (page faults), which costs more than the arithmetic.
    rows = max(16, CHUNK_ELEMENTS // (HISTOGRAM_BINS + 1))
    outs = []
    for lo in range(0, n, rows):
        part = slice(lo, lo + rows)
        feats = None if features is None else features[part]
        pres = None if present is None else present[part]
        outs.append(_luma(net, samples[part], k[part], kmax, feats, pres, luma_steps, luma_swaps))
    if len(outs) == 1:
        return outs[0]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
