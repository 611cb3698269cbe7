"""Batched k-means++ / Lloyd palettes in torch: the reference generator."""

from __future__ import annotations

import torch

from palstream.palettes.base import PaletteGenerator, register_palette_generator


def lloyd(samples: torch.Tensor, palettes: torch.Tensor, k: torch.Tensor, steps: int) -> torch.Tensor:
    """Run ``steps`` Lloyd iterations on a batch; entries past k[i], and empty clusters, stay put."""
    n, kmax, _ = palettes.shape
    active = torch.arange(kmax, device=samples.device)[None, :] < k[:, None]  # (N, K)
    for _ in range(steps):
        dist = torch.cdist(samples, palettes)  # (N, P, K)
        dist.masked_fill_(~active[:, None, :], float("inf"))
        onehot = torch.nn.functional.one_hot(dist.argmin(-1), kmax).to(samples.dtype)  # (N, P, K)
        counts = onehot.sum(1)  # (N, K)
        sums = onehot.transpose(1, 2) @ samples  # (N, K, C)
        palettes = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], palettes)
    return palettes


@register_palette_generator("kmeans")
class KMeansGenerator(PaletteGenerator):
    """k-means++ seeding then Lloyd iterations, for all blocks of a batch at once.

    Seeding uses a fixed torch generator, so palettes are reproducible run to run.
    """

    def __init__(self, device=None, iterations: int = 10, seed: int = 0):
        super().__init__(device)
        self.iterations = iterations
        self.seed = seed

    @torch.no_grad()
    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        samples = samples.to(self.device, torch.float32)
        k = k.to(self.device)
        n, p, c = samples.shape
        if n == 0:  # an empty batch (no block needs a palette) has palettes of one unused slot
            return samples.new_zeros(0, 1, c)
        kmax = int(k.max())
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        rows = torch.arange(n, device=self.device)
        palettes = torch.empty((n, kmax, c), device=self.device)
        palettes[:, 0] = samples[rows, torch.randint(p, (n,), generator=gen, device=self.device)]
        nearest = ((samples - palettes[:, :1]) ** 2).sum(-1)  # (N, P) squared distance to the seeds so far
        for j in range(1, kmax):
            # k-means++: draw the next seed with probability proportional to squared distance.
            weights = nearest + 1e-6
            pick = torch.multinomial(weights, 1, generator=gen).squeeze(1)
            palettes[:, j] = samples[rows, pick]
            nearest = torch.minimum(nearest, ((samples - palettes[:, j : j + 1]) ** 2).sum(-1))
        return lloyd(samples, palettes, k, self.iterations).clamp(0, 255)
