"""REINFORCE fine-tuning of the cgan-v1 generator on the measured rate-distortion cost.

``palstream train --reinforce --init WEIGHTS`` (issue 5, item 6). The codec asks a batched
generator for ``PROPOSAL_SIZE``-entry palettes of the blocks of every leaf size with more distinct
levels than that or than an exact palette holds (``palstream.codec.chunk.proposal_candidates``).
Fine-tuning treats the generator as a policy on those of the 16x16 ones (:func:`candidate_mask`):

* **action**: the network's width logits (:meth:`PaletteNet.policy`) plus Gaussian noise of a fixed
  ``sigma``: ``z ~ N(logits, sigma^2 I)`` over the used slots;
* **environment**: the rest of generation as shipped (:meth:`PaletteNet.decode` with the
  rank-domain Lloyd updates and the best of two against plain companding), entries rounded to
  integer levels as the codec does;
* **reward**: ``-(SSE + lambda * bits)`` of coding the block with that palette
  (:func:`coded_cost`): SSE of hard nearest-entry assignment, and bits actually written by a
  ``constriction`` ANS coder for the index map plus the palette side information;
* **update**: ``-(R - mean_b R) * log pi(z)``, the baseline being the mean reward of the samples of
  the same block, advantages scaled by their batch standard deviation; Adam.

Everything is seeded (noise and batches from one ``torch.Generator``), so a run on CPU with the
same thread count and torch build writes the same weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import constriction
import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from palstream.codec.chunk import LAMBDA, PROPOSAL_SIZE, proposal_candidates
from palstream.codec.config import EncoderConfig
from palstream.errors import InputError, PalstreamError
from palstream.learned.data import Plane420, list_sources, read_frames
from palstream.learned.generator import load_weights, save_weights
from palstream.learned.model import RANK_STEPS, PaletteNet

BLOCK = 16  # fine-tuning trains on 16x16 blocks, one of the leaf sizes the codec asks about
MAX_PALETTE = EncoderConfig.max_palette  # the default, part of the candidate rule
# The codec trades one bit for LAMBDA * step^2 squared error; step 6 lies between the steps its
# rate control picks for 40 and 45 dB on the corpus.
DEFAULT_LAMBDA = LAMBDA * 6**2


@dataclass(frozen=True)
class ReinforceConfig:
    """Settings of a fine-tuning run (recorded in the weights it writes).

    Parameters
    ----------
    seed : int
        Seeds batch sampling and exploration noise.
    steps : int
        Policy-gradient steps (each: one batch of luma blocks and their chroma).
    batch : int
        Candidate blocks per step.
    samples : int
        Palettes sampled per block (the baseline is their mean reward).
    sigma : float
        Standard deviation of the Gaussian exploration noise on the width logits.
    lr : float
        Adam learning rate.
    rd_lambda : float
        Bits are worth ``rd_lambda`` squared error (0..255 scale) each.
    stride : int
        Luma step between the 16x16 windows searched for candidate blocks (even; 16 = the codec's grid).
    clip_every : int
        Keep every n-th frame of a clip.
    max_blocks : int
        At most this many training blocks (a seeded random subset beyond it).
    eval_every : int
        Steps between held-out evaluations.
    """

    seed: int = 0
    steps: int = 600
    batch: int = 64
    samples: int = 8
    sigma: float = 0.5
    lr: float = 1e-4
    rd_lambda: float = DEFAULT_LAMBDA
    stride: int = 4
    clip_every: int = 1
    max_blocks: int = 4000
    eval_every: int = 25

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 1,
            "batch": self.batch >= 1,
            "samples": self.samples >= 2,
            "sigma": self.sigma > 0,
            "lr": self.lr > 0,
            "rd_lambda": self.rd_lambda >= 0,
            "stride": self.stride >= 2 and self.stride % 2 == 0,
            "clip_every": self.clip_every >= 1,
            "max_blocks": self.max_blocks >= 1,
            "eval_every": self.eval_every >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise PalstreamError(
                f"fine-tuning setting {bad[0]}={getattr(self, bad[0])!r} is out of range "
                "(steps, batch >= 1; samples >= 2; sigma, lr > 0; rd_lambda >= 0; stride even >= 2)"
            )


def candidate_mask(luma: np.ndarray, max_palette: int = MAX_PALETTE) -> np.ndarray:
    """The codec's rule for asking the generator (``palstream.codec.chunk.proposal_candidates``), as a mask.

    Parameters
    ----------
    luma : np.ndarray
        uint8 (N, 256): 16x16 luma blocks.

    Returns
    -------
    np.ndarray
        bool (N,): more distinct levels than ``PROPOSAL_SIZE`` (or than an exact palette holds).
    """
    return proposal_candidates(torch.from_numpy(luma.astype(np.int64)), PROPOSAL_SIZE, max_palette).numpy()


def candidate_blocks(frame: Plane420, stride: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Candidate 16x16 blocks of a frame, at every ``stride`` luma pixels (16: the codec's grid).

    Returns
    -------
    luma : np.ndarray
        uint8 (N, 256, 1).
    chroma : np.ndarray
        uint8 (N, 64, 2): the co-located Cb/Cr pairs (8x8 chroma window).
    """
    h, w = frame.y.shape
    if h < BLOCK or w < BLOCK:
        return np.zeros((0, BLOCK * BLOCK, 1), np.uint8), np.zeros((0, BLOCK * BLOCK // 4, 2), np.uint8)
    windows = sliding_window_view(frame.y, (BLOCK, BLOCK))[::stride, ::stride]
    rows, cols = windows.shape[:2]
    luma = windows.reshape(rows * cols, BLOCK * BLOCK)
    pick = np.flatnonzero(candidate_mask(luma))
    half = BLOCK // 2
    chroma = []
    for plane in (frame.u, frame.v):
        cw = sliding_window_view(plane, (half, half))[:: stride // 2, :: stride // 2][:rows, :cols]
        chroma.append(cw.reshape(-1, half * half)[pick])
    return np.ascontiguousarray(luma[pick, :, None]), np.stack(chroma, -1)


def collect_candidates(paths: list[Path], stride: int, clip_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate blocks of all frames of ``paths`` as uint8 tensors (N, 256, 1) and (N, 64, 2)."""
    lumas, chromas = [], []
    for path in paths:
        for frame in read_frames(path, every=clip_every):
            luma, chroma = candidate_blocks(frame, stride)
            lumas.append(luma)
            chromas.append(chroma)
    if not lumas:
        return torch.zeros(0, BLOCK * BLOCK, 1, dtype=torch.uint8), torch.zeros(0, BLOCK * BLOCK // 4, 2, dtype=torch.uint8)
    return torch.from_numpy(np.concatenate(lumas)), torch.from_numpy(np.concatenate(chromas))


def coded_cost(samples: torch.Tensor, palettes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Distortion and coded bits of each block coded with its palette.

    Entries are rounded to integer levels (as the codec does); each pixel takes its nearest entry
    (the lower value on ties, so the result does not depend on the order of the entries). Entries
    no pixel takes are not sent.

    * distortion: sum of squared errors over the block's samples and components (0..255 scale);
    * bits: the index map (used entries renumbered 0..u-1 by pixel count, then value) coded with
      ``constriction``'s ANS coder and a categorical model of the block's own index frequencies
      (``num_valid_bits`` of the coder, 0 when a single entry is used), plus side information per used entry: its value (8
      bits per component) and its pixel count (``ceil(log2(P + 1))`` bits), which a decoder needs
      to rebuild that model.

    Parameters
    ----------
    samples : torch.Tensor
        float (N, P, C), values 0..255.
    palettes : torch.Tensor
        float (N, K, C).

    Returns
    -------
    sse, bits : np.ndarray
        float64 (N,) each.
    """
    n, p, c = samples.shape
    x = samples.double()
    pal = palettes.detach().round().clamp(0, 255).double()
    value = pal[..., 0] * 256 + pal[..., 1] if c == 2 else pal[..., 0]
    value, by_value = value.sort(1)  # canonical: a pixel halfway between two entries takes the lower one
    pal = torch.gather(pal, 1, by_value[..., None].expand_as(pal))
    d2 = (x[:, :, None, :] - pal[:, None, :, :]).pow(2).sum(-1)  # (N, P, K)
    err, nearest = d2.min(-1)
    sse = err.sum(1).numpy()
    k = pal.shape[1]
    counts = torch.zeros(n, k, dtype=torch.long).scatter_add_(1, nearest, torch.ones_like(nearest))
    # Canonical symbols: entries renumbered by pixel count, largest first, ties by value, so the
    # measurement does not depend on the order the generator lists its entries in (the ANS
    # coder's final state, part of the coded size, does).
    order = ((p + 1 - counts).double() * 65536 + value).argsort(1)
    symbols = torch.gather(order.argsort(1), 1, nearest).to(torch.int32).numpy()
    ranked = torch.gather(counts, 1, order).numpy()
    used = (counts > 0).sum(1).numpy()
    side = used * (8 * c + math.ceil(math.log2(p + 1)))
    index_bits = np.zeros(n)
    for i in range(n):
        freq = ranked[i, : used[i]]
        if len(freq) > 1:
            coder = constriction.stream.stack.AnsCoder()  # compiled module: submodules are attributes, not importable
            coder.encode_reverse(symbols[i], constriction.stream.model.Categorical(freq / p, perfect=False))
            index_bits[i] = coder.num_valid_bits()
    return sse, side + index_bits


def rd_cost(samples: torch.Tensor, palettes: torch.Tensor, rd_lambda: float) -> dict[str, float]:
    """Totals over blocks: ``sse``, ``bits``, ``cost = sse + rd_lambda * bits`` and per-sample ``mse``."""
    sse, bits = coded_cost(samples, palettes)
    return {
        "blocks": len(samples),
        "sse": float(sse.sum()),
        "bits": float(bits.sum()),
        "cost": float(sse.sum() + rd_lambda * bits.sum()),
        "mse": float(sse.sum() / max(1, samples.shape[0] * samples.shape[1] * samples.shape[2])),
    }


def reinforce_loss(logits: torch.Tensor, z: torch.Tensor, cost: torch.Tensor, sigma: float) -> torch.Tensor:
    """REINFORCE loss; its gradient is the policy gradient of the expected reward ``-cost``.

    Parameters
    ----------
    logits : torch.Tensor
        (B, K) mean of the Gaussian policy (with gradient).
    z : torch.Tensor
        (B, S, K) actions sampled from it (no gradient).
    cost : torch.Tensor
        (B, S) cost of each action (lower is better).
    sigma : float
        Standard deviation of the policy.

    Notes
    -----
    The baseline is the mean cost of the ``S`` samples of the same block; advantages are divided
    by their standard deviation over the batch (scale-free step sizes whatever ``rd_lambda``).
    ``log pi(z) = -|z - logits|^2 / (2 sigma^2) + const``.
    """
    advantage = -(cost - cost.mean(1, keepdim=True))
    scale = advantage.std()
    advantage = (advantage / scale if scale > 0 else advantage).to(logits.dtype)
    log_prob = -0.5 * ((z.detach() - logits[:, None, :]) / sigma).pow(2).sum(-1)  # (B, S), up to a constant
    return -(advantage.detach() * log_prob).mean()


def _select(sources: list[Path], holdout: list[str]) -> tuple[list[Path], list[Path]]:
    from palstream.learned.train import _select as select  # same holdout rule as `palstream train`

    return select(sources, holdout)


class ReinforceTrainer:
    """One fine-tuning run: data, the two networks from ``init``, the policy-gradient steps.

    Parameters
    ----------
    init : Path
        Weights to start from (any ``palstream-cgan/1`` file; its hash is not checked but recorded).
    data_dirs : list of Path
        Folders of images and clips; candidate blocks are searched in their frames.
    holdout : list of str
        File-name patterns kept out of fine-tuning; their grid-aligned candidate blocks give the
        held-out cost reported during the run.
    config : ReinforceConfig
        Settings.
    progress : callable, optional
        Receives short status strings while data is prepared.
    """

    def __init__(self, init: Path, data_dirs: list[Path], holdout: list[str], config: ReinforceConfig, progress=None):
        self.cfg = config
        say = progress or (lambda msg: None)
        self.init = Path(init)
        luma, chroma, self.backbone_name, self.init_sha256 = load_weights(self.init, None)
        self.nets = nn.ModuleDict({"1": luma.requires_grad_(True).train(), "2": chroma.requires_grad_(True).train()})
        sources = list_sources([Path(d) for d in data_dirs])
        self.train_sources, self.held_sources = _select(sources, holdout)
        if not self.train_sources:
            raise PalstreamError("every data file matches --holdout; leave some files for fine-tuning")
        say(f"searching {len(self.train_sources)} files for candidate blocks")
        luma_blocks, chroma_blocks = collect_candidates(self.train_sources, config.stride, config.clip_every)
        if len(luma_blocks) == 0:
            raise InputError(
                "no candidate blocks (16x16, > 64 distinct levels, 16 most frequent >= 75% of pixels) in the "
                "fine-tuning data; add screen recordings, animation or photos with sharp edges"
            )
        self.gen = torch.Generator().manual_seed(config.seed)
        if len(luma_blocks) > config.max_blocks:
            keep = torch.randperm(len(luma_blocks), generator=self.gen)[: config.max_blocks].sort().values
            luma_blocks, chroma_blocks = luma_blocks[keep], chroma_blocks[keep]
        self.blocks = {1: luma_blocks, 2: chroma_blocks}
        self.held: dict[int, torch.Tensor] | None = None
        if self.held_sources:
            say(f"searching {len(self.held_sources)} held-out files for candidate blocks")
            held = collect_candidates(self.held_sources, BLOCK, config.clip_every)
            self.held = {1: held[0], 2: held[1]} if len(held[0]) else None
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=config.lr)
        self.step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.baseline = self.evaluate()

    def sample(self, c: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Sample palettes for blocks ``x`` and measure them.

        Returns
        -------
        logits : torch.Tensor
            (B, K) the network's output (with gradient).
        z : torch.Tensor
            (B, S, K) sampled actions.
        cost : torch.Tensor
            (B, S) float64 ``sse + rd_lambda * bits`` of each sample.
        info : dict
            Batch means of the samples' and the noise-free policy's cost.
        """
        cfg, kk = self.cfg, PROPOSAL_SIZE
        b, s = len(x), cfg.samples
        k = torch.full((b,), kk, dtype=torch.long)
        net = self.nets[str(c)]
        assert isinstance(net, PaletteNet)  # ModuleDict items are typed as Module
        logits, block = net.policy(x, k, kk)
        z = logits.detach()[:, None, :] + cfg.sigma * torch.randn(b, s, kk, generator=self.gen)
        with torch.no_grad():
            ordered, keys, axis = (t.repeat_interleave(s, 0) for t in block)  # each block once per sample
            pal, _ = PaletteNet.decode(z.reshape(b * s, kk), (ordered, keys, axis), k.repeat_interleave(s), RANK_STEPS)
            sse, bits = coded_cost(x.repeat_interleave(s, 0), pal)
            mean_pal, _ = PaletteNet.decode(logits.detach(), block, k, RANK_STEPS)
            msse, mbits = coded_cost(x, mean_pal)
        cost = torch.from_numpy(sse + cfg.rd_lambda * bits).reshape(b, s)
        info = {f"cost{c}": float(cost.mean()), f"policy_cost{c}": float((msse + cfg.rd_lambda * mbits).mean())}
        return logits, z, cost, info

    def train_step(self) -> dict:
        """One policy-gradient step for both networks on one batch of candidate blocks."""
        idx = torch.randint(len(self.blocks[1]), (self.cfg.batch,), generator=self.gen)
        total, record = torch.zeros(()), {}
        for c in (1, 2):
            logits, z, cost, info = self.sample(c, self.blocks[c][idx].float())
            total = total + reinforce_loss(logits, z, cost, self.cfg.sigma)
            record.update(info)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(self.nets.parameters(), 5.0)
        self.opt.step()
        self.step += 1
        record.update(step=self.step, loss=float(total.detach()))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out totals per component with the generator as shipped (noise-free, rank updates, best of two);
        empty without held-out blocks."""
        out: dict[str, float] = {}
        if self.held is None:
            return out
        for c, name in ((1, "luma"), (2, "chroma")):
            x = self.held[c].float()
            k = torch.full((len(x),), PROPOSAL_SIZE, dtype=torch.long)
            pal, _ = self.nets[str(c)](x, k, PROPOSAL_SIZE, refine_steps=RANK_STEPS)
            for key, value in rd_cost(x, pal, self.cfg.rd_lambda).items():
                out[f"heldout_{name}_{key}"] = value
        return out

    def run(self, on_step=None) -> None:
        """Run ``cfg.steps`` steps, evaluating on the held-out blocks every ``cfg.eval_every``."""
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            record = self.train_step()
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                record.update(self.evaluate())
            self.train_seconds += time.perf_counter() - t0
            self.history.append(record)
            if on_step:
                on_step(record)

    def export(self, path: Path) -> str:
        """Write the fine-tuned weights (with a record of the fine-tuning); returns their sha256."""
        record = {
            "method": "reinforce",
            "init": self.init.name,
            "init_sha256": self.init_sha256,
            "steps": self.step,
            "config": json.dumps(asdict(self.cfg), sort_keys=True),
            "train_blocks": len(self.blocks[1]),
            "reward": "-(SSE + rd_lambda * bits), bits from constriction ANS on the index map + palette side information",
        }
        for net in self.nets.values():
            net.eval().requires_grad_(False)
        luma, chroma = self.nets["1"], self.nets["2"]
        assert isinstance(luma, PaletteNet) and isinstance(chroma, PaletteNet)  # ModuleDict items are typed as Module
        return save_weights(path, luma, chroma, self.backbone_name, finetune=record)

    def report(self, path: Path, weights: Path, sha256: str, command: str) -> None:
        """JSON report: settings, data, held-out cost before and after, per-step history."""
        final: dict = next((h for h in reversed(self.history) if "heldout_luma_cost" in h), {})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "command": command,
                    "weights": str(weights),
                    "sha256": sha256,
                    "init": str(self.init),
                    "init_sha256": self.init_sha256,
                    "config": asdict(self.cfg),
                    "train_files": [p.name for p in self.train_sources],
                    "heldout_files": [p.name for p in self.held_sources],
                    "train_blocks": len(self.blocks[1]),
                    "heldout_blocks": len(self.held[1]) if self.held else 0,
                    "heldout_before": self.baseline,
                    "heldout_after": {k: v for k, v in final.items() if k.startswith("heldout_")},
                    "train_seconds": self.train_seconds,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "history": self.history,
                },
                indent=1,
            )
        )

