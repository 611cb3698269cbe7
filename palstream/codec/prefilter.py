"""Encoder-only temporal denoising of a chunk before it is coded (issue 16 item 4).

Skipping a noisy frame from a noisy reference costs about twice the noise variance in error;
coding the frame costs the noise's bits. Like x265's ``--mcstf`` and AV1's alt-ref filtering, the
encoder instead codes frames whose static parts are averaged over the chunk: references carry
the scene, not one frame's noise, and later frames skip from them at about the noise variance.
The decoder and the bitstream are unchanged; the PSNR floor is still checked against the source.

Each 8x8 luma block (4x4 chroma) is averaged recursively over time, forward and backward, each
frame joining the running mean with a weight that falls to zero when it differs from that mean
by more than the noise explains (motion, cuts, fades, screen content): real changes pass through.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 8  # luma block whose weight is decided as one
NOISE_PERCENTILE = 25  # share of (block, frame pair)s taken as static when estimating the noise
LEVELS_PER_BAND = 32  # brightness bands of the noise estimate
MIN_BAND_BLOCKS = 16  # fewer blocks than this in a band: it takes the chunk's noise estimate
# Sensor noise is white: a 2x2 mean keeps a quarter of its energy. Changes that are content (film grain
# scanned at another scale, slow motion and compression in renders) keep more, and averaging them away
# costs more bits than it saves (corpus, 32 frames at 40 dB: 3-D animation +3 %, film +4 %); measured on
# the static blocks' frame differences: still scene 0.25, pedestrians 0.25, 2-D animation 0.49,
# 3-D animation 0.52, film 0.79.
MAX_POOLED_SHARE = 0.35
BAND_CAP = 3.0  # a band's noise estimate is at most this times the chunk's (still scene: 0.5-1.9 times)
MIN_NOISE = 0.1  # luma noise variance below which the chunk is coded as it is (screen content, clean renders)
# The filter may spend this share of the chunk's MSE budget against the source; the rest is the
# coding's. Skipped frames pay the noise variance whatever the share, so it has to be high for
# them to skip (a partly filtered reference adds its leftover noise to theirs).
FILTER_SHARE = 0.9


@njit(cache=True, nogil=True)
def _block_changes(luma):
    """Mean squared difference of consecutive frames over each 8x8 block (frames 1..T-1), and the
    block's brightness band in the later frame; flattened."""
    t, h, w = luma.shape
    hb, wb = h // BLOCK, w // BLOCK
    block_mse = np.empty((t - 1) * hb * wb, np.float32)
    band = np.empty((t - 1) * hb * wb, np.int64)
    i = 0
    for f in range(1, t):
        for by in range(hb):
            for bx in range(wb):
                d = 0
                level = 0
                for y in range(by * BLOCK, by * BLOCK + BLOCK):
                    for x in range(bx * BLOCK, bx * BLOCK + BLOCK):
                        e = np.int64(luma[f, y, x]) - np.int64(luma[f - 1, y, x])
                        d += e * e
                        level += luma[f, y, x]
                block_mse[i] = d / (BLOCK * BLOCK)
                band[i] = level // (BLOCK * BLOCK * LEVELS_PER_BAND)
                i += 1
    return block_mse, band


def noise_variance(luma: np.ndarray) -> float:
    """Luma noise variance of a chunk: half the ``NOISE_PERCENTILE`` percentile of the mean
    squared difference of consecutive frames over 8x8 blocks (the most static ones); 0 for one frame."""
    return float(np.percentile(_block_changes(luma)[0], NOISE_PERCENTILE)) / 2 if luma.shape[0] > 1 else 0.0


def pooled_share(luma: np.ndarray) -> float:
    """Share of the frame-difference energy of the chunk's most static 8x8 blocks (the
    ``NOISE_PERCENTILE`` lowest) that a 2x2 mean keeps: 0.25 for white noise, up to 1."""
    t, h, w = luma.shape
    hb, wb = h // BLOCK, w // BLOCK
    diff = np.diff(luma[:, : hb * BLOCK, : wb * BLOCK].astype(np.float32), axis=0)
    energy = (diff**2).reshape(t - 1, hb, BLOCK, wb, BLOCK).mean(axis=(2, 4))
    static = energy <= np.percentile(energy, NOISE_PERCENTILE)
    pooled = diff.reshape(t - 1, hb, BLOCK // 2, 2, wb, BLOCK // 2, 2).mean(axis=(3, 6))
    kept = (pooled**2).mean(axis=(2, 4))[static].sum()
    return float(kept / energy[static].sum()) if energy[static].sum() > 0 else 1.0


def noise_levels(luma: np.ndarray) -> np.ndarray:
    """:func:`noise_variance` by brightness band of ``LEVELS_PER_BAND`` levels (sensor noise grows
    with the signal), at most ``BAND_CAP`` times the chunk's figure (a band where everything moves
    has no static blocks to measure); bands with few blocks take the chunk's figure."""
    overall = noise_variance(luma)
    levels = np.full(256 // LEVELS_PER_BAND, overall, np.float32)
    if luma.shape[0] < 2:
        return levels
    block_mse, band = _block_changes(luma)
    for b in range(levels.size):
        inside = block_mse[band == b]
        if inside.size >= MIN_BAND_BLOCKS:
            levels[b] = min(np.percentile(inside, NOISE_PERCENTILE) / 2, BAND_CAP * overall)
    return levels


@njit(cache=True, nogil=True)
def _recursive_mean(plane, block, forward, weights, noise_levels, measure):
    """Running weighted mean of each ``block`` x ``block`` block over time, in one direction.

    A frame joins with weight exp(-excess), where excess is how far its squared difference
    from the running mean exceeds what the noise variance at the block's brightness
    (``noise_levels``, by band of ``LEVELS_PER_BAND``) explains, in units of that.
    ``measure``: compute ``weights`` (T, HB, WB) here (luma); otherwise use them (chroma, with
    the luma block's weights). Returns the means (T, H, W) and each block's total weight (T, HB, WB).
    """
    t, h, w = plane.shape
    hb, wb = h // block, w // block
    mean = np.empty((t, h, w), np.float32)
    count = np.empty((t, hb, wb), np.float32)
    for by in range(hb):
        for bx in range(wb):
            y0, x0 = by * block, bx * block
            n = 0.0
            for i in range(t):
                f = i if forward else t - 1 - i
                prev = f - 1 if forward else f + 1
                if n == 0.0:
                    wgt = 0.0
                elif measure:
                    d = 0.0
                    level = 0.0
                    for y in range(y0, y0 + block):
                        for x in range(x0, x0 + block):
                            e = np.float32(plane[f, y, x]) - mean[prev, y, x]
                            d += e * e
                            level += mean[prev, y, x]
                    band = min(int(level / (block * block)) // LEVELS_PER_BAND, noise_levels.size - 1)
                    expected = max(noise_levels[band], MIN_NOISE) * (1.0 + 1.0 / n)
                    excess = d / (block * block) / expected - 1.0
                    wgt = np.exp(-excess) if excess > 0.0 else 1.0
                    weights[f, by, bx] = wgt
                else:
                    wgt = weights[f, by, bx]
                kept = wgt * n
                for y in range(y0, y0 + block):
                    for x in range(x0, x0 + block):
                        p = np.float32(plane[f, y, x])
                        mean[f, y, x] = (kept * mean[prev, y, x] + p) / (kept + 1.0) if kept > 0.0 else p
                n = kept + 1.0
                count[f, by, bx] = n
    return mean, count


def _average(plane: np.ndarray, block: int, weights: tuple, noise: np.ndarray, measure: bool) -> np.ndarray:
    """Forward and backward running means combined: each frame's block averaged over every frame
    that matches it on either side (both runs hold the frame itself once)."""
    ahead, n_ahead = _recursive_mean(plane, block, True, weights[0], noise, measure)
    behind, n_behind = _recursive_mean(plane, block, False, weights[1], noise, measure)
    up = np.ones((1, block, block), np.float32)
    n_ahead, n_behind = np.kron(n_ahead, up), np.kron(n_behind, up)
    return (n_ahead * ahead + n_behind * behind - plane) / (n_ahead + n_behind - 1.0)


def denoise(planes: tuple[np.ndarray, np.ndarray, np.ndarray], size: tuple[int, int], floor_mse: float):
    """The frames the encoder codes for a chunk of padded (Y, Cb, Cr) planes whose luma MSE must
    stay at most ``floor_mse``; ``size`` is the picture's (height, width) inside the padding,
    where the noise is measured (edge padding repeats its noise and would hide it).

    Returns ``planes`` unchanged where the chunk's noise is negligible, at least the floor (the
    noise then has to be coded) or not white (``MAX_POOLED_SHARE``: content), else temporally averaged planes, blended back toward the
    source so that the filter alone costs no more than the noise it removes (more is content,
    not noise) and at most ``FILTER_SHARE`` of ``floor_mse``.
    """
    luma = planes[0]
    picture = luma[:, : size[0], : size[1]]
    noise = noise_variance(picture)
    if not MIN_NOISE <= noise < floor_mse or pooled_share(picture) > MAX_POOLED_SHARE:
        return planes
    levels = noise_levels(picture)
    t, h, w = luma.shape
    weights = (np.zeros((t, h // BLOCK, w // BLOCK), np.float32), np.zeros((t, h // BLOCK, w // BLOCK), np.float32))
    averaged = [_average(luma, BLOCK, weights, levels, True)]
    averaged += [_average(p, BLOCK // 2, weights, levels, False) for p in planes[1:]]
    cost = float(np.mean((averaged[0][:, : size[0], : size[1]] - picture) ** 2))
    allowed = min(FILTER_SHARE * floor_mse, float(np.average(levels[np.minimum(picture // LEVELS_PER_BAND, levels.size - 1)])))
    strength = min(1.0, (allowed / cost) ** 0.5) if cost > 0 else 1.0
    return tuple(
        np.clip(np.rint(p + strength * (a - p)), 0, 255).astype(np.uint8) for p, a in zip(planes, averaged)
    )
