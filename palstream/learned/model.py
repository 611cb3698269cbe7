"""The cgan-v1 networks: block statistics, the palette generator and its discriminator.

A block enters the networks as a fixed-size summary that does not depend on its pixel count:
``Q`` of its samples picked at evenly spaced ranks (sorted luma levels; Cb/Cr pairs sorted
along the block's principal colour axis), plus mean, spread and the wanted palette size.
The generator turns that summary into cuts of the block's value axis; the means of the pixels
between cuts are the palette (see :class:`PaletteNet`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from palstream.palettes.base import MAX_PALETTE


@dataclass(frozen=True)
class NetConfig:
    """Shape of one palette network (one for luma, one for chroma).

    Parameters
    ----------
    components : int
        1 for luma levels, 2 for Cb/Cr pairs.
    tokens : int, default 32
        Samples taken from each block at evenly spaced ranks.
    hidden : int, default 256
        Width of the hidden layers.
    layers : int, default 3
        Hidden layers of the generator MLP.
    feature_dim : int, default 0
        Size of optional per-block CNN features (0: the network takes none).
    """

    components: int
    tokens: int = 32
    hidden: int = 256
    layers: int = 3
    feature_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def sort_blocks(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each block's samples along one axis.

    Luma is sorted by level. Cb/Cr pairs are sorted by their projection on the block's principal
    colour axis (closed-form 2x2 eigenvector): chroma in a block mostly spreads along one line.

    Parameters
    ----------
    samples : torch.Tensor
        float32 (N, P, C), values 0..255.

    Returns
    -------
    ordered : torch.Tensor
        (N, P, C) samples in rank order.
    keys : torch.Tensor
        (N, P) ascending sort keys (level, or projection on the axis).
    axis : torch.Tensor
        (N, C) unit sort axis.
    mean : torch.Tensor
        (N, C) block mean.
    spread : torch.Tensor
        (N, C) standard deviation along the axis (and across it, for chroma).
    """
    n, p, c = samples.shape
    mean = samples.mean(1)
    centred = samples - mean[:, None, :]
    if c == 1:
        axis = torch.ones(n, 1, device=samples.device)
        key = samples[..., 0]
        spread = centred[..., 0].pow(2).mean(1, keepdim=True).sqrt()
    else:
        cxx = centred[..., 0].pow(2).mean(1)
        cyy = centred[..., 1].pow(2).mean(1)
        cxy = (centred[..., 0] * centred[..., 1]).mean(1)
        angle = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
        axis = torch.stack([angle.cos(), angle.sin()], -1)
        key = (samples * axis[:, None, :]).sum(-1)
        across = centred[..., 0] * -axis[:, None, 1] + centred[..., 1] * axis[:, None, 0]
        spread = torch.stack([(key - key.mean(1, keepdim=True)).pow(2).mean(1).sqrt(), across.pow(2).mean(1).sqrt()], -1)
    keys, order = key.sort(dim=1)
    ordered = torch.gather(samples, 1, order[..., None].expand(n, p, c))
    return ordered, keys, axis, mean, spread


def rank_tokens(ordered: torch.Tensor, q: int) -> torch.Tensor:
    """``q`` samples at evenly spaced ranks (the first and last are the extremes): (N, q, C)."""
    ranks = torch.linspace(0, ordered.shape[1] - 1, q, device=ordered.device).round().long()
    return ordered[:, ranks]


def condition(tokens: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Conditioning vector of a block: its shape (scale-free), level, spread and palette size."""
    shape = (tokens - mean[:, None, :]) / (spread.norm(dim=-1, keepdim=True)[:, None, :] + 1.0)
    size = nn.functional.one_hot((k - 1).clamp(0, MAX_PALETTE - 1), MAX_PALETTE).to(tokens.dtype)
    return torch.cat([shape.flatten(1), mean / 255.0, torch.log1p(spread) / 5.0, size], 1)


def active_mask(k: torch.Tensor, kmax: int) -> torch.Tensor:
    """(N, kmax) bool: which palette slots a block uses."""
    return torch.arange(kmax, device=k.device)[None, :] < k[:, None]


def condition_dim(cfg: NetConfig) -> int:
    return cfg.tokens * cfg.components + 2 * cfg.components + MAX_PALETTE


RANK_STEPS = 4  # rank-domain Lloyd updates of PaletteNet.decode (the fine-tuning environment; see rank_lloyd)
HISTOGRAM_BINS = 256
COMPANDING = 1.0 / 3.0  # high-resolution optimal quantiser: entry density ~ pixel density ** (1/3)


def companded_segments(ordered: torch.Tensor, keys: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Palette entries as means of the pixels between cuts placed on a companded key axis.

    The key range of each block is split into 256 equal bins; the companded axis is the running
    sum of ``count ** (1/3)`` over those bins (normalised to 0..1), the point density of an
    optimal high-resolution quantiser. Entry ``j`` covers the companded interval
    ``[sum(shares[:j]), sum(shares[:j+1]))``: uniform shares give the classic companding
    quantiser; the network learns better shares. Fractional bin positions are interpolated, so
    entries are differentiable with respect to ``shares``.

    Parameters
    ----------
    ordered : torch.Tensor
        (N, P, C) samples sorted by ``keys``.
    keys : torch.Tensor
        (N, P) ascending keys.
    shares : torch.Tensor
        (N, K) non-negative widths summing to 1 over the used slots.

    Returns
    -------
    torch.Tensor
        (N, K, C); an empty interval takes the sample at its rank.
    """
    n, p, c = ordered.shape
    bins = HISTOGRAM_BINS
    lo_key = keys[:, :1]
    span = (keys[:, -1:] - lo_key).clamp(min=1e-6)
    index = ((keys - lo_key) / span * bins).long().clamp(0, bins - 1)
    counts = keys.new_zeros(n, bins).scatter_add_(1, index, torch.ones_like(keys))
    sums = ordered.new_zeros(n, bins, c).scatter_add_(1, index[..., None].expand(n, p, c), ordered)
    axis = nn.functional.pad(counts.pow(COMPANDING).cumsum(1), (1, 0))
    axis = axis / axis[:, -1:]
    count_prefix = nn.functional.pad(counts.cumsum(1), (1, 0))
    sum_prefix = nn.functional.pad(sums.cumsum(1), (0, 0, 1, 0))

    def prefix_at(g):
        # Bin i holds g: axis[i] <= g < axis[i+1]; interpolate the prefix sums inside it.
        i = (torch.searchsorted(axis.contiguous(), g.detach().contiguous(), right=True) - 1).clamp(0, bins - 1)
        g0, g1 = torch.gather(axis, 1, i), torch.gather(axis, 1, i + 1)
        frac = ((g - g0) / (g1 - g0).clamp(min=1e-9)).clamp(0, 1)
        c0 = torch.gather(count_prefix, 1, i)
        cnt = c0 + frac * (torch.gather(count_prefix, 1, i + 1) - c0)
        ii = i[..., None].expand(n, g.shape[1], c)
        s0 = torch.gather(sum_prefix, 1, ii)
        return cnt, s0 + frac[..., None] * (torch.gather(sum_prefix, 1, ii + 1) - s0)

    hi = shares.cumsum(-1).clamp(max=1.0)
    count_lo, sum_lo = prefix_at((hi - shares).clamp(min=0.0))
    count_hi, sum_hi = prefix_at(hi)
    rank = count_lo.long().clamp(0, p - 1)[..., None].expand(n, shares.shape[1], c)
    eps = 1e-3  # below ~1/1000 of a pixel an interval is empty: fall back to the sample at its rank
    return (sum_hi - sum_lo + eps * torch.gather(ordered, 1, rank)) / (count_hi - count_lo + eps)[..., None]


def rank_lloyd(
    ordered: torch.Tensor, keys: torch.Tensor, axis: torch.Tensor, palettes: torch.Tensor, k: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd updates done on sorted samples: O(K log P) per block instead of O(P K).

    Along the sort axis, the pixels nearest to each entry form one rank segment bounded by the
    midpoints between neighbouring entries, found by binary search; the new entry is the segment
    mean from prefix sums. Exact Lloyd for luma; for chroma the partition is the one along the
    principal axis (exact when the colours lie on that line).

    Returns
    -------
    palettes : torch.Tensor
        (N, K, C) with entries sorted along the axis; entries past k[i] are copies of entry 0.
    shares : torch.Tensor
        (N, K) fraction of the block's pixels each entry takes (0 past k[i]).
    sse : torch.Tensor
        (N,) float64 squared error of that partition with those entries (for luma exactly the
        nearest-entry error; for chroma an upper bound of it).
    """
    n, p, c = ordered.shape
    kmax = palettes.shape[1]
    active = active_mask(k, kmax)
    prefix = nn.functional.pad(ordered.cumsum(1), (0, 0, 1, 0))
    zero = torch.zeros(n, 1, dtype=torch.long, device=ordered.device)

    def segment(table, lo, hi):
        width = table.shape[-1]
        return torch.gather(table, 1, hi[..., None].expand(n, kmax, width)) - torch.gather(table, 1, lo[..., None].expand(n, kmax, width))

    for step in range(steps + 1):
        key = (palettes * axis[:, None, :]).sum(-1).masked_fill(~active, float("inf"))
        key, order = key.sort(1)
        palettes = torch.gather(palettes, 1, order[..., None].expand(n, kmax, c))
        mid = (key[:, :-1] + key[:, 1:]) * 0.5  # inf past k: those cuts land at P
        cuts = torch.searchsorted(keys.contiguous(), mid.contiguous())  # (N, K-1)
        lo, hi = torch.cat([zero, cuts], 1), torch.cat([cuts, zero + p], 1)
        counts = (hi - lo).clamp(min=0)
        if step == steps:
            break
        update = (counts > 0) & active
        palettes = torch.where(update[..., None], segment(prefix, lo, hi) / counts.clamp(min=1)[..., None], palettes)
    # Error from prefix sums in float64: sum(x^2) - 2 e.sum(x) + n |e|^2 cancels badly in float32.
    wide = ordered.double()
    sums = segment(nn.functional.pad(wide.cumsum(1), (0, 0, 1, 0)), lo, hi)
    squares = segment(nn.functional.pad(wide.pow(2).sum(-1, keepdim=True).cumsum(1), (0, 0, 1, 0)), lo, hi)[..., 0]
    entries = palettes.double()
    sse = (squares - 2 * (entries * sums).sum(-1) + counts * entries.pow(2).sum(-1)) * active
    palettes = torch.where(active[..., None], palettes, palettes[:, :1])
    return palettes, counts.to(palettes.dtype) / p * active, sse.sum(1).clamp(min=0)


class PaletteNet(nn.Module):
    """Conditional generator: block summary (+ optional CNN features) -> palette in one pass.

    The network does not regress levels. It predicts how to cut the block's value axis (luma
    level, or position along the principal chroma axis) into ``k`` intervals: softmax widths on
    a companded axis (:func:`companded_segments`); every entry is the mean of the pixels in its
    interval, computed exactly from histogram prefix sums. Every optimal 1-D quantiser has this
    form, so the network only learns where to cut, and entries land exactly on the dominant
    levels of flat content. The width layer starts at zero, i.e. at the companding quantiser.
    The shipped generator decodes the width logits with :mod:`palstream.learned.decoding`; the
    simpler ``refine_steps`` decoding here (rank-domain Lloyd updates, :func:`rank_lloyd`, on both
    the network's and the plain companding cuts, the better kept) is what REINFORCE fine-tuning
    (:mod:`palstream.learned.finetune`) samples through.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        width = condition_dim(cfg) + (cfg.feature_dim + 1 if cfg.feature_dim else 0)
        body: list[nn.Module] = []
        for _ in range(cfg.layers):
            body += [nn.Linear(width, cfg.hidden), nn.GELU()]
            width = cfg.hidden
        self.body = nn.Sequential(*body)
        self.widths = nn.Linear(cfg.hidden, MAX_PALETTE)
        nn.init.zeros_(self.widths.weight)
        nn.init.zeros_(self.widths.bias)

    def forward(
        self,
        samples: torch.Tensor,
        k: torch.Tensor,
        kmax: int,
        features: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
        refine_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Palettes (N, kmax, C) and shares (N, kmax) of blocks (N, P, C).

        ``features`` (N, feature_dim) are optional CNN features; ``present`` (N,) bool marks the
        rows that have them (default: all rows when ``features`` is given, none otherwise).
        With ``refine_steps`` None the output is the differentiable network output (training) and
        the shares are interval widths on the companded axis; with an int, entries come out
        sorted along the block's axis after that many rank-domain Lloyd updates (0 allowed) and
        the shares are the pixels each entry takes.
        """
        logits, block = self.policy(samples, k, kmax, features, present)
        return self.decode(logits, block, k, refine_steps)

    def policy(
        self,
        samples: torch.Tensor,
        k: torch.Tensor,
        kmax: int,
        features: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The network's own output: width logits (N, kmax), and the sorted block for :meth:`decode`.

        ``forward`` is ``decode(*policy(...))``; REINFORCE fine-tuning
        (:mod:`palstream.learned.finetune`) perturbs the logits between the two.

        Returns
        -------
        logits : torch.Tensor
            (N, kmax) unnormalised interval widths (only the first k[i] of row i are used).
        block : tuple
            ``(ordered, keys, axis)`` from :func:`sort_blocks`.
        """
        ordered, keys, axis, mean, spread = sort_blocks(samples)
        cond = condition(rank_tokens(ordered, self.cfg.tokens), mean, spread, k)
        return self.logits(cond, features, present, kmax), (ordered, keys, axis)

    def logits(
        self, cond: torch.Tensor, features: torch.Tensor | None, present: torch.Tensor | None, kmax: int
    ) -> torch.Tensor:
        """Width logits (N, kmax) from a conditioning vector (:func:`condition`) and optional CNN features."""
        if self.cfg.feature_dim:
            n = len(cond)
            if features is None:
                features = cond.new_zeros(n, self.cfg.feature_dim)
                present = torch.zeros(n, dtype=torch.bool, device=cond.device)
            elif present is None:
                present = torch.ones(n, dtype=torch.bool, device=cond.device)
            flag = present.to(cond.dtype)[:, None]
            cond = torch.cat([cond, features.to(cond.dtype) * flag, flag], 1)
        h = self.body(cond)
        return nn.functional.linear(h, self.widths.weight[:kmax], self.widths.bias[:kmax])

    @staticmethod
    def decode(
        logits: torch.Tensor, block: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: torch.Tensor, refine_steps: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Palettes and shares from width logits (see :meth:`forward` for ``refine_steps``)."""
        ordered, keys, axis = block
        kmax = logits.shape[1]
        active = active_mask(k, kmax)
        shares = logits.masked_fill(~active, float("-inf")).softmax(-1)
        palettes = companded_segments(ordered, keys, shares)
        if refine_steps is None:
            return palettes, shares
        # Inference: the network's cuts and the plain companding cuts both get the rank-domain
        # updates; each block keeps whichever has the lower error (exact, from prefix sums). The
        # network is better for small palettes, plain companding often for large ones.
        n = len(ordered)
        plain = companded_segments(ordered, keys, active.to(shares.dtype) / k[:, None].to(shares.dtype))
        both = rank_lloyd(
            ordered.repeat(2, 1, 1), keys.repeat(2, 1), axis.repeat(2, 1), torch.cat([palettes, plain]), k.repeat(2), refine_steps
        )
        pick = both[2][:n] <= both[2][n:]
        palettes = torch.where(pick[:, None, None], both[0][:n], both[0][n:])
        shares = torch.where(pick[:, None], both[1][:n], both[1][n:])
        return palettes, shares


def canonical_palette(palettes: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Palettes as the discriminator sees them: standardised, order-free (sorted), unused slots zeroed."""
    n, kmax, c = palettes.shape
    scaled = (palettes - mean[:, None, :]) / (spread.norm(dim=-1, keepdim=True)[:, None, :] + 1.0)
    active = active_mask(k, kmax)
    key = scaled.sum(-1).masked_fill(~active, float("inf"))
    order = key.argsort(dim=1)
    ranked = torch.gather(scaled, 1, order[..., None].expand(n, kmax, c))
    return ranked.masked_fill(~torch.gather(active, 1, order)[..., None], 0.0)


class Discriminator(nn.Module):
    """Judges a (block, palette) pair: k-means palettes of the block are the real examples."""

    def __init__(self, cfg: NetConfig, hidden: int = 256):
        super().__init__()
        self.cfg = cfg
        width = condition_dim(cfg) + MAX_PALETTE * cfg.components
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, samples: torch.Tensor, k: torch.Tensor, palettes: torch.Tensor) -> torch.Tensor:
        ordered, _, _, mean, spread = sort_blocks(samples)
        cond = condition(rank_tokens(ordered, self.cfg.tokens), mean, spread, k)
        pal = canonical_palette(palettes, mean, spread, k)
        pal = nn.functional.pad(pal, (0, 0, 0, MAX_PALETTE - pal.shape[1]))
        return self.net(torch.cat([cond, pal.flatten(1)], 1)).squeeze(1)
