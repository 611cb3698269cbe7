"""Encoder-only rate control inside one chunk: a per-frame multiplier of the RD lambda.

The chunk's quantiser step is one number in its header, and the ladder's rungs around a PSNR
target are 0.3-0.8 dB apart; prefix probes also misjudge chunks whose content changes after the
prefix. The lambda of the analysis' decisions (skip or code, merge palette entries, residual
levels) is no part of the bitstream and moves PSNR continuously (on 3-D animation at a fixed
step: +1.2 dB at half the lambda, -3.4 dB at twice it). :class:`LambdaControl` closes the loop
frame by frame: before each frame it compares the chunk's running luma MSE with what the floor
still allows for the frames left, and scales lambda so that the chunk lands just above its floor.
"""

from __future__ import annotations

import math

import numpy as np

AIM_DB = 0.1  # the controller steers to this much above the floor (frame-to-frame noise stays above it)
# after a miss: the chunk turned harder late, after the slack was spent (a dialog opening in a screen
# recording, the last frames of the film at 50 dB); its retry keeps more in hand
RETRY_AIM_DB = 0.4
GAIN = 0.5  # share of the log-MSE error corrected per frame: MSE grows about as lambda near the nominal one
# Largest change of the multiplier from one frame to the next. Spending slack is slow: a coarser
# frame also degrades the references of the frames after it, which shows only later (film grain
# at 50 dB overspent and missed with 2x a frame); recovering is fast.
RISE_LIMIT, FALL_LIMIT = 1.25, 2.0
# below 0.25 the decisions stop moving; 8 spends the slack a retry leaves on screen content
SCALE_RANGE = (0.25, 8.0)


class LambdaControl:
    """Per-frame lambda multiplier that steers a chunk's luma MSE to just under ``floor_mse``.

    Parameters
    ----------
    source_y : np.ndarray
        The chunk's luma frames (T, H, W), uncropped by padding.
    floor_mse : float
        Largest luma MSE of the whole chunk that meets its PSNR floor.
    aim_db : float, default AIM_DB
        How far above the floor, in dB PSNR, to steer.
    weights : sequence of float, optional
        Each frame's expected MSE relative to the others' at one multiplier (layered frames: their
        step squared), so that the controller compares like with like; default all equal.
    order : sequence of int, optional
        The frames' display indices in coding order; default display order.
    """

    def __init__(self, source_y: np.ndarray, floor_mse: float, aim_db: float = AIM_DB, weights=None, order=None):
        self.source_y = source_y
        self.aim_mse = floor_mse / 10 ** (aim_db / 10)
        self.weights = np.ones(len(source_y)) if weights is None else np.asarray(weights, np.float64)
        self.order = list(range(len(source_y))) if order is None else list(order)
        self.position = {f: k for k, f in enumerate(self.order)}
        self.frame_mse: list[float] = []
        self.scales: list[float] = []

    def scale(self, f: int, recon_y: np.ndarray) -> float:
        """Multiplier of lambda for frame ``f``; ``recon_y`` holds the frames coded before it, reconstructed."""
        k = self.position[f]
        if k == 0:
            self.frame_mse.clear()
            self.scales = [1.0]
            return 1.0
        t, h, w = self.source_y.shape
        last_f = self.order[k - 1]
        # float32 dot: a twentieth of the time of a float64 mean, ~1e-5 off; the chunk's check is exact
        diff = np.subtract(recon_y[last_f, :h, :w], self.source_y[last_f], dtype=np.int16).astype(np.float32).ravel()
        self.frame_mse.append(float(np.dot(diff, diff)) / diff.size)
        # per frame for the frames left, and the last frame's MSE, both in units of weight
        allowed = (self.aim_mse * t - sum(self.frame_mse)) / float(np.sum(self.weights[self.order[k:]]))
        last = max(self.frame_mse[-1] / self.weights[last_f], 1e-3)
        change = math.exp(GAIN * math.log(allowed / last)) if allowed > 0 else 1 / FALL_LIMIT
        change = min(RISE_LIMIT, max(1 / FALL_LIMIT, change))
        lo, hi = SCALE_RANGE
        self.scales.append(min(hi, max(lo, self.scales[-1] * change)))
        return self.scales[-1]
