"""The reward of a batch: compression ratio, quality above the floor and compute cost, weighted.

A batch's measurements reduce to three components (:func:`components`), which the agent learns
separately; the job's weights (``[tuner]`` table) combine them (:meth:`RewardWeights.reward`),
so one policy serves jobs with different weights::

    reward = ratio_weight   * log2(raw bytes / coded bytes)
           + quality_weight * min(min PSNR-Y - floor, QUALITY_CAP_DB)      (0 when lossless)
           - cost_weight    * log2(1 + encode seconds per megapixel-frame)

The quality floor is not traded: a unit below it is an error (``palstream.quality.check_floor``),
never a low reward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from palstream.errors import ConfigError

COMPONENTS = ("log2_ratio", "quality_db", "cost")
QUALITY_CAP_DB = 3.0  # quality far above the floor is worth no more than 3 dB of it


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward components (``[tuner]`` ``ratio_weight``, ``quality_weight``, ``cost_weight``).

    Parameters
    ----------
    ratio_weight : float, default 1.0
        Per doubling of the compression ratio.
    quality_weight : float, default 0.1
        Per dB of PSNR-Y above the floor (counted up to 3 dB).
    cost_weight : float, default 0.5
        Per doubling of (1 + encode seconds per megapixel-frame).
    """

    ratio_weight: float = 1.0
    quality_weight: float = 0.1
    cost_weight: float = 0.5

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ConfigError(f"tuner.{name}: must be a number in 0..100, got {value!r}")

    def vector(self) -> tuple[float, float, float]:
        """Weights in :data:`COMPONENTS` order, signed so that reward = weights . components."""
        return (float(self.ratio_weight), float(self.quality_weight), -float(self.cost_weight))

    def reward(self, comps: dict[str, float]) -> float:
        return sum(w * comps[name] for w, name in zip(self.vector(), COMPONENTS))


def components(units: list[dict], width: int, height: int, target_psnr: float, lossless: bool) -> dict[str, float]:
    """Reward components of a batch from its units' summaries.

    Parameters
    ----------
    units : list of dict
        Worker summaries (``raw_bytes``, ``bytes``, ``frames``, ``psnr_y``, ``stage_seconds``).
    width, height : int
        Luma size of the source.
    target_psnr, lossless : float, bool
        The job's floor.
    """
    raw = sum(u["raw_bytes"] for u in units)
    coded = sum(u["bytes"] for u in units)
    frames = sum(u["frames"] for u in units)
    seconds = sum(u["stage_seconds"]["encode"] for u in units)
    psnrs = [u["psnr_y"] for u in units if u.get("psnr_y") is not None]
    if lossless or not psnrs:
        quality = 0.0
    else:
        quality = min(min(psnrs) - target_psnr, QUALITY_CAP_DB)
    per_mp_frame = seconds / (frames * width * height / 1e6)
    return {
        "log2_ratio": math.log2(raw / max(coded, 1)),
        "quality_db": max(quality, 0.0),
        "cost": math.log2(1 + per_mp_frame),
    }
