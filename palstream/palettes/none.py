"""The ``none`` generator: proposes nothing, so blocks get exact palettes or no palette at all.

For comparisons (issue 15): the difference between an archive made with a generator and one made
with ``--palette none`` is what that generator's proposals are worth.
"""

from __future__ import annotations

import torch

from palstream.palettes.base import PaletteGenerator, register_palette_generator


@register_palette_generator("none")
class NoProposals(PaletteGenerator):
    """Returns palettes of no entries for every block: the encoder then uses none of them."""

    @torch.no_grad()
    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return samples.new_zeros(samples.shape[0], 0, samples.shape[2])
