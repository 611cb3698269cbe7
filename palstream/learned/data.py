"""Training and evaluation blocks from real images and video clips.

Images (PNG/JPEG) are converted to 8-bit 4:2:0 YCbCr (BT.601 limited range, like the corpus
clips); clips are decoded with PyAV. Each frame is cut on the block grids the codec uses
(8..64 luma pixels, chroma blocks a quarter of that), and each block is paired with a palette
size and its k-means(10) palette, the "real" example for the discriminator and the yardstick
of the reconstruction loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from palstream.errors import InputError
from palstream.palettes.kmeans import KMeansGenerator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mkv", ".mp4", ".webm", ".mov", ".avi", ".y4m", ".nut"}
BLOCK_SIZES = (8, 16, 32, 64)


@dataclass
class Plane420:
    """One frame as uint8 planes: y (H, W), u and v (ceil(H/2), ceil(W/2))."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    source: str


def _to_planes(frame: av.VideoFrame, source: str) -> Plane420:
    if frame.width % 2 or frame.height % 2:
        frame = frame.reformat(width=frame.width - frame.width % 2, height=frame.height - frame.height % 2)
    raw = frame.to_ndarray(format="yuv420p")
    h, w = frame.height, frame.width
    y = raw[:h]
    chroma = raw[h:].reshape(2, h // 2, w // 2)
    return Plane420(np.ascontiguousarray(y), np.ascontiguousarray(chroma[0]), np.ascontiguousarray(chroma[1]), source)


def read_frames(path: Path, every: int = 1) -> list[Plane420]:
    """Frames of an image or clip, keeping every ``every``-th frame of a clip."""
    try:
        with av.open(str(path)) as container:
            frames = [f for i, f in enumerate(container.decode(video=0)) if i % every == 0]
            return [_to_planes(f, f"{path.name}#{i * every}") for i, f in enumerate(frames)]
    except (av.FFmpegError, IndexError) as exc:
        raise InputError(f"cannot read {path}: {exc}; pass images or video clips") from exc


def list_sources(dirs: list[Path]) -> list[Path]:
    """Image and clip files in ``dirs`` (not recursive), sorted for reproducibility."""
    found = []
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"training data folder {d} does not exist; pass folders of images or clips")
        found += [p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
    if not found:
        raise InputError(f"no images or clips in {', '.join(map(str, dirs))}; supported: {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}")
    return sorted(found)


def grid_blocks(frame: Plane420, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All whole ``size`` x ``size`` luma blocks of a frame on the block grid.

    Returns
    -------
    luma : np.ndarray
        uint8 (N, size*size, 1).
    chroma : np.ndarray
        uint8 (N, size*size/4, 2): the co-located Cb/Cr pairs.
    boxes : np.ndarray
        int64 (N, 4): top, left, height, width in luma pixels.
    """
    h, w = frame.y.shape
    rows, cols = h // size, w // size
    half = size // 2
    y = frame.y[: rows * size, : cols * size].reshape(rows, size, cols, size).transpose(0, 2, 1, 3)
    luma = y.reshape(rows * cols, size * size, 1)
    planes = [p[: rows * half, : cols * half].reshape(rows, half, cols, half).transpose(0, 2, 1, 3) for p in (frame.u, frame.v)]
    chroma = np.stack([p.reshape(rows * cols, half * half) for p in planes], -1)
    r, c = np.meshgrid(np.arange(rows) * size, np.arange(cols) * size, indexing="ij")
    boxes = np.stack([r.ravel(), c.ravel(), np.full(r.size, size), np.full(r.size, size)], 1)
    return luma, chroma, boxes.astype(np.int64)


def sample_k(n: int, gen: torch.Generator) -> torch.Tensor:
    """Palette sizes 1..64, log-uniform (small palettes are as common as large ones)."""
    return (2.0 ** (torch.rand(n, generator=gen) * 6.0)).round().long().clamp(1, 64)


@dataclass
class BlockSet:
    """Blocks of one size with palette sizes and k-means targets (all torch tensors, CPU).

    Attributes
    ----------
    luma, chroma : torch.Tensor
        uint8 (N, P, 1) and (N, P/4, 2).
    k_luma, k_chroma : torch.Tensor
        int64 (N,): palette size per block.
    km_luma, km_chroma : torch.Tensor
        float32 (N, 64, C): k-means(10) palettes (first k entries used).
    mse_luma, mse_chroma : torch.Tensor
        float32 (N,): k-means(10) per-block MSE.
    features : torch.Tensor or None
        float32 (N, D): pooled CNN features of the block's frame.
    """

    size: int
    luma: torch.Tensor
    chroma: torch.Tensor
    k_luma: torch.Tensor
    k_chroma: torch.Tensor
    km_luma: torch.Tensor
    km_chroma: torch.Tensor
    mse_luma: torch.Tensor
    mse_chroma: torch.Tensor
    features: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.luma)


def palette_mse(samples: torch.Tensor, palettes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-block MSE (per component, 0..255 scale) of hard nearest-entry assignment to the first k entries."""
    kmax = palettes.shape[1]
    dist = torch.cdist(samples, palettes).pow(2)  # (N, P, K)
    active = torch.arange(kmax, device=samples.device)[None, None, :] < k[:, None, None]
    return dist.masked_fill(~active, float("inf")).amin(-1).mean(1) / samples.shape[-1]


@torch.no_grad()
def kmeans_targets(samples: torch.Tensor, k: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means(10, k-means++) palettes padded to 64 entries, and their per-block MSE."""
    km = KMeansGenerator(device="cpu")
    pals, mses = [], []
    for i in range(0, len(samples), batch):
        s, kk = samples[i : i + batch].float(), k[i : i + batch]
        pal = km.generate(s, kk)
        mses.append(palette_mse(s, pal, kk))
        pals.append(torch.nn.functional.pad(pal, (0, 0, 0, 64 - pal.shape[1])))
    return torch.cat(pals), torch.cat(mses)


def build_blocks(
    frames: list[Plane420],
    per_size: dict[int, int],
    seed: int,
    backbone=None,
    progress=None,
) -> dict[int, BlockSet]:
    """Sample blocks of each size from ``frames`` and attach palette sizes and k-means targets.

    Parameters
    ----------
    frames : list of Plane420
        Source frames.
    per_size : dict
        Block size -> number of blocks to keep (fewer if the frames have fewer).
    seed : int
        Seeds block sampling and palette sizes.
    backbone : Backbone, optional
        When given, pooled CNN features are attached to every block.
    progress : callable, optional
        Called with a short description of each stage.
    """
    from palstream.learned.backbone import block_features  # the CNN is only needed with a backbone

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for size, count in per_size.items():
        lumas, chromas, feats = [], [], []
        for frame in frames:
            frame_luma, frame_chroma, boxes = grid_blocks(frame, size)
            if not len(frame_luma):
                continue
            lumas.append(torch.from_numpy(frame_luma))
            chromas.append(torch.from_numpy(frame_chroma))
            if backbone is not None:
                feats.append(block_features(backbone, frame.y, frame.u, frame.v, boxes))
        if not lumas:
            continue
        luma, chroma = torch.cat(lumas), torch.cat(chromas)
        pick = torch.randperm(len(luma), generator=gen)[:count]
        luma, chroma = luma[pick], chroma[pick]
        features = torch.cat(feats)[pick] if feats else None
        k_luma, k_chroma = sample_k(len(pick), gen), sample_k(len(pick), gen)
        if progress:
            progress(f"k-means targets for {len(pick)} blocks of {size}x{size}")
        km_luma, mse_luma = kmeans_targets(luma, k_luma)
        km_chroma, mse_chroma = kmeans_targets(chroma, k_chroma)
        out[size] = BlockSet(size, luma, chroma, k_luma, k_chroma, km_luma, km_chroma, mse_luma, mse_chroma, features)
    return out
