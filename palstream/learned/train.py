"""Training of the cgan-v1 palette generator.

Objective per batch of blocks, for the luma network and the chroma network alike:

* reconstruction: soft assignment of pixels to entries (temperature annealed towards hard)
  plus the hard nearest-entry error, both divided by the batch's k-means(10) error so that
  1.0 means "as good as k-means";
* perceptual (luma): 1 - MS-SSIM of a mosaic of reconstructed blocks, and the distance between
  early EfficientNet-Lite0 features of reconstructed and original mosaics;
* palette diversity: penalty on pairs of active entries closer than a few levels;
* adversarial: a discriminator judges (block, palette) pairs, k-means palettes being "real".

Everything is seeded; a checkpoint holds networks, optimisers, sampler state and loss history,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pytorch_msssim import ms_ssim
from torch import nn

from palstream.errors import PalstreamError
from palstream.learned.backbone import Backbone, create_backbone
from palstream.learned.data import BlockSet, build_blocks, list_sources, palette_mse, read_frames
from palstream.learned.decoding import generate_palettes
from palstream.learned.generator import save_weights
from palstream.learned.model import Discriminator, NetConfig, PaletteNet, active_mask

FEATURE_BACKBONE = "efficientnet-lite0"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (recorded in the checkpoint and the model card).

    Parameters
    ----------
    steps : int
        Optimiser steps; each step uses one luma batch and one chroma batch of one block size.
    batch : int
        Blocks per batch (halved for 64x64 blocks).
    blocks_per_size : dict
        Training blocks sampled per luma block size.
    clip_every : int
        Keep every n-th frame of a clip (consecutive frames are near duplicates).
    features : bool
        Condition on pooled EfficientNet-Lite0 features (dropped for half the blocks, so the
        weights also work without them).
    """

    seed: int = 0
    steps: int = 2000
    batch: int = 96
    lr: float = 1e-3
    lr_disc: float = 2e-4
    tokens: int = 32
    hidden: int = 64
    layers: int = 2
    blocks_per_size: dict = field(default_factory=lambda: {8: 12000, 16: 12000, 32: 3000, 64: 400})
    size_weights: dict = field(default_factory=lambda: {8: 0.3, 16: 0.35, 32: 0.25, 64: 0.1})
    clip_every: int = 4
    features: bool = False
    feature_dropout: float = 0.5
    w_hard: float = 1.0
    w_soft: float = 0.5
    w_msssim: float = 0.1
    w_deep: float = 0.05
    w_diversity: float = 0.01
    w_adv: float = 0.01
    temp_start: float = 64.0
    temp_end: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 200
    eval_blocks: int = 600


def _select(sources: list[Path], holdout: list[str]) -> tuple[list[Path], list[Path]]:
    held = [p for p in sources if any(fnmatch.fnmatch(p.name, pat) for pat in holdout)]
    return [p for p in sources if p not in held], held


def _frames(paths: list[Path], every: int):
    frames = []
    for path in paths:
        frames += read_frames(path, every=every)
    return frames


class Trainer:
    """One training run: data, networks, optimisers, losses, checkpoints and reports.

    Parameters
    ----------
    data_dirs : list of Path
        Folders of images and clips.
    holdout : list of str
        File-name patterns kept out of training; their blocks give the held-out metric.
    config : TrainConfig
        Hyper-parameters.
    progress : callable, optional
        Receives short status strings while data is prepared.
    """

    def __init__(self, data_dirs: list[Path], holdout: list[str], config: TrainConfig, progress=None):
        self.cfg = config
        self.say = progress or (lambda msg: None)
        sources = list_sources([Path(d) for d in data_dirs])
        self.train_sources, self.held_sources = _select(sources, holdout)
        if not self.train_sources:
            raise PalstreamError("every data file matches --holdout; leave some files for training")
        torch.manual_seed(config.seed)
        self.backbone: Backbone = create_backbone(FEATURE_BACKBONE)
        feat_dim = self.backbone.channels if config.features else 0
        self.nets = nn.ModuleDict(
            {
                str(c): PaletteNet(NetConfig(c, config.tokens, config.hidden, config.layers, feat_dim))
                for c in (1, 2)
            }
        )
        self.discs = nn.ModuleDict({str(c): Discriminator(NetConfig(c, config.tokens)) for c in (1, 2)})
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=config.lr)
        self.opt_d = torch.optim.Adam(self.discs.parameters(), lr=config.lr_disc, betas=(0.5, 0.999))
        self.sampler = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.say(f"reading {len(self.train_sources)} training files")
        frames = _frames(self.train_sources, config.clip_every)
        self.n_train_frames = len(frames)
        backbone = self.backbone if config.features else None
        self.blocks = build_blocks(frames, dict(config.blocks_per_size), config.seed, backbone, self.say)
        self.held = None
        if self.held_sources:
            self.say(f"reading {len(self.held_sources)} held-out files")
            held_frames = _frames(self.held_sources, config.clip_every)
            per = {16: config.eval_blocks, 32: config.eval_blocks // 2}
            self.held = build_blocks(held_frames, per, config.seed + 2, None, self.say)

    # -- losses ---------------------------------------------------------------------------------
    def _temperature(self) -> float:
        frac = min(1.0, self.step / max(1, self.cfg.steps - 1))
        return math.exp(math.log(self.cfg.temp_start) + frac * (math.log(self.cfg.temp_end) - math.log(self.cfg.temp_start)))

    def _component_losses(self, c: int, samples, k, km_mse, features, present) -> tuple[dict, torch.Tensor, torch.Tensor]:
        net, disc = self.nets[str(c)], self.discs[str(c)]
        palettes, _ = net(samples, k, 64, features, present)
        active = active_mask(k, 64)
        d2 = torch.cdist(samples, palettes).pow(2) / c  # (N, P, 64) per-component squared error
        d2 = d2.masked_fill(~active[:, None, :], 1e9)
        scale = km_mse.mean() + 1.0
        hard, nearest = d2.min(-1)
        soft = (torch.softmax(-d2 / self._temperature(), -1) * d2).sum(-1)
        gap = torch.cdist(palettes, palettes).pow(2) / c
        pair = active[:, :, None] & active[:, None, :] & ~torch.eye(64, dtype=torch.bool)[None]
        diversity = torch.exp(-gap / 8.0)[pair].mean() if pair.any() else palettes.sum() * 0
        adv = nn.functional.binary_cross_entropy_with_logits(disc(samples, k, palettes), torch.ones(len(k)))
        losses = {
            f"hard{c}": hard.mean() / scale,
            f"soft{c}": soft.mean() / scale,
            f"div{c}": diversity,
            f"adv{c}": adv,
        }
        recon = torch.gather(palettes, 1, nearest[..., None].expand(*nearest.shape, c))  # hard reconstruction
        return losses, recon, palettes

    def _perceptual(self, blocks: torch.Tensor, recon: torch.Tensor, size: int) -> dict:
        """MS-SSIM and deep-feature distance on a mosaic of luma blocks (>= 40 px a side)."""
        g = math.ceil(40 / size)
        n = g * g
        if len(blocks) < n:
            return {}

        def mosaic(x):
            return x[:n, :, 0].reshape(g, g, size, size).permute(0, 2, 1, 3).reshape(1, 1, g * size, g * size)

        orig, rec = mosaic(blocks), mosaic(recon)
        ssim = ms_ssim(rec, orig, data_range=255.0, win_size=3, weights=[0.3, 0.4, 0.3])
        rgb = lambda x: (x / 255.0).expand(-1, 3, -1, -1)  # noqa: E731  (grey luma through the RGB CNN)
        target = self.backbone.shallow(rgb(orig))
        deep = (self.backbone.shallow(rgb(rec)) - target).pow(2).mean() / (target.pow(2).mean() + 1e-6)
        return {"msssim": 1.0 - ssim, "deep": deep}

    def _disc_loss(self, c: int, samples, k, real, fake) -> torch.Tensor:
        disc = self.discs[str(c)]
        ones, zeros = torch.ones(len(k)), torch.zeros(len(k))
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(disc(samples, k, real[:, : fake.shape[1]]), ones) + bce(disc(samples, k, fake.detach()), zeros)

    def train_step(self) -> dict:
        """One optimiser step for the generators and one for the discriminators; returns the losses."""
        cfg = self.cfg
        sizes = [s for s in cfg.size_weights if s in self.blocks]
        probs = torch.tensor([cfg.size_weights[s] for s in sizes])
        size = sizes[int(torch.multinomial(probs, 1, generator=self.sampler))]
        data: BlockSet = self.blocks[size]
        batch = cfg.batch // 2 if size == 64 else cfg.batch
        idx = torch.randint(len(data), (batch,), generator=self.sampler)
        present = torch.rand(batch, generator=self.sampler) >= cfg.feature_dropout
        features = data.features[idx] if data.features is not None else None
        w = {"hard": cfg.w_hard, "soft": cfg.w_soft, "div": cfg.w_diversity, "adv": cfg.w_adv}
        losses, fakes, total = {}, {}, torch.zeros(())
        for c, samples, k, km, mse in (
            (1, data.luma, data.k_luma, data.km_luma, data.mse_luma),
            (2, data.chroma, data.k_chroma, data.km_chroma, data.mse_chroma),
        ):
            s = samples[idx].float()
            part, recon, palettes = self._component_losses(c, s, k[idx], mse[idx], features, present)
            fakes[c] = (s, k[idx], km[idx], palettes)
            if c == 1:
                percept = self._perceptual(s, recon, size)
                part.update(percept)
                total = total + cfg.w_msssim * percept.get("msssim", 0.0) + cfg.w_deep * percept.get("deep", 0.0)
            total = total + sum(w[name[:-1]] * value for name, value in part.items() if name[:-1] in w)
            losses.update(part)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(self.nets.parameters(), 5.0)
        for group in self.opt.param_groups:  # cosine decay to 5% of the initial rate
            group["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * self.step / cfg.steps)))
        self.opt.step()
        d_loss = self._disc_loss(1, *fakes[1]) + self._disc_loss(2, *fakes[2])
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        self.step += 1
        out = {name: float(v.detach()) for name, v in losses.items()}
        out.update(total=float(total.detach()), disc=float(d_loss.detach()), step=self.step)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out mean block MSE over that of k-means(10), plain API (no CNN features).

        ``heldout_*_ratio`` is the generator as shipped (:func:`palstream.learned.decoding.generate_palettes`);
        ``heldout_*_raw_ratio`` is the network output alone (its companded cuts, no updates).
        """
        if not self.held:
            return {}
        self.nets.eval()
        sums: dict[str, float] = {}
        for data in self.held.values():
            for c, name, samples, k, mse in (
                (1, "luma", data.luma, data.k_luma, data.mse_luma),
                (2, "chroma", data.chroma, data.k_chroma, data.mse_chroma),
            ):
                s = samples.float()
                net = self.nets[str(c)]
                shipped, _ = generate_palettes(net, s, k, int(k.max()))
                raw, _ = net(s, k, int(k.max()))
                for tag, pal in (("", shipped), ("_raw", raw)):
                    sums[f"{name}{tag}"] = sums.get(f"{name}{tag}", 0.0) + float(palette_mse(s, pal, k).sum())
                sums[f"{name}_km"] = sums.get(f"{name}_km", 0.0) + float(mse.sum())
        self.nets.train()
        return {
            f"heldout_{name}{tag}_ratio": sums[f"{name}{tag}"] / sums[f"{name}_km"]
            for name in ("luma", "chroma")
            for tag in ("", "_raw")
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": json.dumps(asdict(self.cfg), sort_keys=True),
            "step": self.step,
            "nets": self.nets.state_dict(),
            "discs": self.discs.state_dict(),
            "opt": self.opt.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sampler": self.sampler.get_state(),
            "history": json.dumps(self.history),
            "train_seconds": self.train_seconds,
        }

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)  # atomic: a kill during the write never leaves a half checkpoint

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PalstreamError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over") from exc
        if state["config"] != json.dumps(asdict(self.cfg), sort_keys=True):
            raise PalstreamError(f"checkpoint {path} was made with other settings; use them again or delete the checkpoint")
        self.nets.load_state_dict(state["nets"])
        self.discs.load_state_dict(state["discs"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sampler.set_state(state["sampler"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self.train_seconds = float(state["train_seconds"])

    # -- the run --------------------------------------------------------------------------------
    def run(self, checkpoint: Path | None = None, on_step=None) -> None:
        """Train up to ``cfg.steps``, checkpointing every ``cfg.checkpoint_every`` steps."""
        self.nets.train()
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            record = self.train_step()
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                record.update(self.evaluate())
            self.train_seconds += time.perf_counter() - t0
            self.history.append(record)
            if checkpoint and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save_checkpoint(checkpoint)
            if on_step:
                on_step(record)
        self.nets.eval()

    def export(self, path: Path) -> str:
        """Write the generator weights; returns their sha256."""
        luma, chroma = self.nets["1"], self.nets["2"]
        assert isinstance(luma, PaletteNet) and isinstance(chroma, PaletteNet)  # ModuleDict items are typed as Module
        return save_weights(path, luma, chroma, FEATURE_BACKBONE if self.cfg.features else None)


def plot_history(history: list[dict], path: Path) -> None:
    """Loss curves (smoothed) and the held-out MSE ratio, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, n=25):
        out, acc = [], []
        for v in values:
            acc = (acc + [v])[-n:]
            out.append(sum(acc) / len(acc))
        return out

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("hard1", "luma hard MSE / k-means"), ("hard2", "chroma hard MSE / k-means"),
                       ("soft1", "luma soft MSE / k-means"), ("msssim", "1 - MS-SSIM"), ("disc", "discriminator")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax1.plot([p[0] for p in pts], smooth([p[1] for p in pts]), label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training losses (moving average of 25 steps)")
    ax1.legend(fontsize=8)
    for key, label in (("heldout_luma_ratio", "luma"), ("heldout_chroma_ratio", "chroma"),
                       ("heldout_luma_raw_ratio", "luma, network alone"), ("heldout_chroma_raw_ratio", "chroma, network alone")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax2.axhline(1.1, color="grey", linestyle="--", linewidth=1, label="k-means(10) + 10%")
    ax2.set_xlabel("step")
    ax2.set_title("held-out mean block MSE / k-means(10)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_model_card(path: Path, trainer: Trainer, sha256: str, weights: Path, command: str) -> None:
    """Markdown model card: data, objective, hyper-parameters, held-out metrics, training time."""
    cfg = trainer.cfg
    last: dict = next((h for h in reversed(trainer.history) if "heldout_luma_ratio" in h), {})
    sizes = {s: len(b) for s, b in trainer.blocks.items()}
    lines = [
        f"# Model card: {weights.stem}",
        "",
        "Learned palette generator of palstream (issue 3), selected with `--palette cgan-v1`.",
        "",
        "## Files",
        f"- weights: `{weights.name}` ({weights.stat().st_size / 1e6:.2f} MB), sha256 `{sha256}`",
        f"- backbone for optional block features and the perceptual loss: `{FEATURE_BACKBONE}` (ImageNet, frozen)",
        "",
        "## Data",
        f"- training files ({len(trainer.train_sources)}): " + ", ".join(p.name for p in trainer.train_sources),
        "- held out (never trained on; held-out metric): " + (", ".join(p.name for p in trainer.held_sources) or "none"),
        f"- {trainer.n_train_frames} training frames (every {cfg.clip_every}th frame of a clip), "
        + ", ".join(f"{n} blocks of {s}x{s}" for s, n in sizes.items())
        + "; palette size per block log-uniform in 1..64; k-means(10, k-means++) palettes as targets.",
        "",
        "## Objective",
        "- reconstruction: soft-assignment MSE (temperature "
        f"{cfg.temp_start:g} -> {cfg.temp_end:g} level^2) x {cfg.w_soft:g} + hard-assignment MSE x {cfg.w_hard:g}, "
        "both divided by the batch's k-means(10) MSE + 1",
        f"- perceptual (luma mosaics >= 40 px): (1 - MS-SSIM, 3 scales, window 3) x {cfg.w_msssim:g} "
        f"+ relative early-EfficientNet feature distance x {cfg.w_deep:g}; LPIPS not used (needs torchvision and downloaded weights)",
        f"- palette diversity: mean exp(-d^2/8) over pairs of active entries x {cfg.w_diversity:g}",
        f"- adversarial: non-saturating GAN loss x {cfg.w_adv:g}; discriminator MLP on (block summary, sorted palette), "
        "k-means palettes as real",
        "",
        "## Hyper-parameters",
        "```json",
        json.dumps(asdict(cfg), indent=1, sort_keys=True),
        "```",
        "",
        "## Training",
        f"- command: `{command}`",
        f"- {trainer.step} steps in {trainer.train_seconds / 60:.1f} min of optimisation "
        f"(data preparation not included), torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)",
        "",
        "## Held-out metric at the end of training",
        "Mean block MSE of cgan-v1 as shipped (no --refine, no CNN features) over that of k-means(10), "
        "on blocks of 16x16 and 32x32 of the held-out files with log-uniform palette sizes:",
        f"- luma: {last.get('heldout_luma_ratio', float('nan')):.3f} "
        f"(network output alone, before the decoding's updates: {last.get('heldout_luma_raw_ratio', float('nan')):.3f})",
        f"- chroma: {last.get('heldout_chroma_ratio', float('nan')):.3f} "
        f"(before the updates: {last.get('heldout_chroma_raw_ratio', float('nan')):.3f})",
        "",
        "Loss curves: `" + f"{weights.stem}-loss.png" + "`. Speed and quality against k-means and median cut: `BENCHMARKS.md`.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
