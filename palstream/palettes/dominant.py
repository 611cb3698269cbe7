"""The ``dominant`` generator: each block's most frequent values, for palettes with escape samples.

Antialiased text, cartoon outlines and flat areas with a little noise have a few values that most
pixels take and a tail of others; a palette of the few, with the tail coded as escapes, is what
screen-content codecs code there. Counting is exact and cheap (one sort per batch), so this is the
non-learned generator the learned ones must beat in coded bits (issue 15).
"""

from __future__ import annotations

import torch

from palstream.palettes.base import PaletteGenerator, register_palette_generator


def value_counts(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's distinct values, most frequent first (the first seen first among equals).

    Parameters
    ----------
    keys : torch.Tensor
        int64 (N, P), values 0..65535.

    Returns
    -------
    tuple of torch.Tensor
        int64 (N, P) values and int64 (N, P) counts; past a row's distinct values, counts are 0.
    """
    n, p = keys.shape
    ordered, where = keys.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.cumsum(1) - 1  # each sample's run (distinct value) in ascending order
    counts = torch.zeros_like(ordered).scatter_add_(1, run, torch.ones_like(ordered))
    values = torch.zeros_like(ordered).scatter_(1, run, ordered)
    first = torch.full_like(ordered, p).scatter_reduce_(1, run, where, "amin")  # where each value is first seen
    # one sort by (count descending, first seen ascending): unique scores, so every device agrees
    score = counts * (p + 1) + (p - first)
    order = score.argsort(dim=1, descending=True)
    return values.gather(1, order), counts.gather(1, order)


@register_palette_generator("dominant")
class DominantValues(PaletteGenerator):
    """The ``k`` most frequent values of each block among those taken by at least two pixels, the
    first seen (in raster order) among equals.

    A block with fewer such values repeats its most frequent one (an entry no pixel is nearest
    to, which the encoder drops). Chroma samples (C = 2) count as (Cb, Cr) pairs. The encoder
    does not call ``generate``: it picks the same values itself, block by block and only where a
    palette can compete (``palstream.codec.analysis._palette_clusters``, up to 8 entries);
    ``generate`` is the reference it is tested against.
    """

    in_codec = True

    @torch.no_grad()
    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        n, p, c = samples.shape
        kmax = int(k.max()) if n else 1
        levels = samples.to(self.device).round().clamp(0, 255).to(torch.int64)
        keys = levels[..., 0] * 256 + levels[..., 1] if c == 2 else levels[..., 0]
        values, counts = value_counts(keys)
        values, counts = values[:, :kmax], counts[:, :kmax]
        if values.shape[1] < kmax:  # blocks of fewer pixels than entries asked for
            pad = kmax - values.shape[1]
            values = torch.cat([values, values[:, :1].expand(n, pad)], 1)
            counts = torch.cat([counts, counts.new_zeros(n, pad)], 1)
        wanted = torch.arange(kmax, device=values.device)[None, :] < k.to(values.device)[:, None]
        values = torch.where((counts >= 2) & wanted, values, values[:, :1])
        entries = torch.stack([values >> 8, values & 255], -1) if c == 2 else values[..., None]
        return entries.to(torch.float32)
