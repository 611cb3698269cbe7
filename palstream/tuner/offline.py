"""Offline work: measure every arm on real clips, and pretrain a policy from the measurements.

:func:`measure` encodes the first frames of each clip, unit by unit, with every arm (one
thread, sequentially, so encode seconds are comparable), and records what a worker would
report. :func:`pretrain` feeds all of it to a fresh agent (full information: offline, every
arm's outcome is known). ``palstream tune`` runs both; ``benchmarks/tuner_regret.py``
replays jobs over the same measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palstream.codec import EncoderConfig, encode_chunk
from palstream.quality import check_floor
from palstream.tuner.agent import LinUCB
from palstream.tuner.features import content_features, context_vector
from palstream.tuner.reward import components
from palstream.tuner.space import ARM_NAMES, arm_config

MEASUREMENTS_FORMAT = "palstream-tuner-measurements"


def measure(
    clips: list[str],
    base: EncoderConfig,
    frames: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Encode frames ``[0, frames)`` of every clip in units of ``base.gop`` with every arm.

    Returns
    -------
    dict
        ``format``, ``base`` (config dict), ``frames``, ``arms``, and ``clips``: one entry per
        clip with ``name``, ``width``, ``height`` and ``units``: per unit ``start``, ``count``,
        ``features`` and ``arms`` (arm -> ``raw_bytes``, ``bytes``, ``frames``, ``psnr_y``,
        ``stage_seconds`` {``encode``}).
    """
    import numba
    import torch

    from palstream import io
    from palstream.palettes import create_palette_generator

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    configs = {arm: arm_config(arm, base) for arm in ARM_NAMES}
    generators = {name: create_palette_generator(name) for name in sorted({c.palette for c in configs.values()})}
    for name, generator in generators.items():  # compile kernels / load weights before any timing
        first = io.read_frames(clips[0], 0, min(2, frames))
        encode_chunk(first, EncoderConfig.from_dict({**base.to_dict(), "palette": name}), generator)
    total = len(clips) * len(ARM_NAMES) * -(-frames // base.gop)
    done = 0
    out: dict[str, Any] = {"format": MEASUREMENTS_FORMAT, "base": base.to_dict(), "frames": frames, "arms": list(ARM_NAMES), "clips": []}
    for clip in clips:
        video = io.read_frames(clip, 0, frames)
        height, width = video.y.shape[1:]
        entry: dict[str, Any] = {"name": Path(clip).stem, "width": int(width), "height": int(height), "units": []}
        for start in range(0, len(video), base.gop):
            unit = video[start : start + base.gop]
            results = {}
            for arm, config in configs.items():
                t0 = time.perf_counter()
                encoded = encode_chunk(unit, config, generators[config.palette])
                seconds = time.perf_counter() - t0
                psnr = encoded.stats["psnr_y"]
                psnr = None if psnr == float("inf") else float(psnr)
                check_floor(psnr, config.target_psnr, config.lossless, f"{entry['name']} frames {start}+ with arm {arm}")
                results[arm] = {
                    "raw_bytes": len(unit) * (unit.y[0].size + 2 * unit.u[0].size),
                    "bytes": len(encoded.payload),
                    "frames": len(unit),
                    "psnr_y": psnr,
                    "stage_seconds": {"encode": seconds},
                }
                done += 1
                if progress is not None:
                    progress(entry["name"], done, total)
            entry["units"].append({"start": start, "count": len(unit), "features": content_features(unit), "arms": results})
        out["clips"].append(entry)
    return out


def unit_components(measurements: dict, clip: dict, unit: dict, arm: str) -> dict[str, float]:
    """Reward components of one measured unit under one arm."""
    base = EncoderConfig.from_dict(measurements["base"])
    return components([unit["arms"][arm]], clip["width"], clip["height"], base.target_psnr, base.lossless)


def pretrain(measurements: dict, clip_names: list[str] | None = None, alpha: float = 0.5) -> LinUCB:
    """A fresh agent updated with every (unit, arm) outcome of the given clips (default all).

    A unit's ``last_log2_ratio`` feature is the previous unit's under the ``default`` arm: in a
    job it comes from whichever arm encoded the previous batch, which changes it by a few percent.
    """
    agent = LinUCB(alpha=alpha)
    for clip in measurements["clips"]:
        if clip_names is not None and clip["name"] not in clip_names:
            continue
        last = None
        for unit in clip["units"]:
            x = context_vector(unit["features"], last)
            for arm in ARM_NAMES:
                agent.update(arm, x, unit_components(measurements, clip, unit, arm))
            last = unit_components(measurements, clip, unit, "default")["log2_ratio"]
    return agent
