"""The action space: a few named encoder configurations (arms) the tuner chooses between.

An arm overrides only knobs that trade size, quality and time. The quality floor
(``target_psnr``/``lossless``), the GOP and everything else come from the job and are never
part of an action: :func:`arm_config` lays the arm over the job's configuration.
"""

from __future__ import annotations

import hashlib
import json

from palstream.codec import EncoderConfig
from palstream.errors import ConfigError

# Knobs an arm may set; the job's floor and GOP are excluded on purpose.
TUNABLE = ("palette", "max_palette", "search_range", "min_block", "max_block", "lambda_scale", "refine")

# name -> overrides. Order matters only for tie-breaking and display.
ARMS: dict[str, dict] = {
    "default": {},
    "static": {"search_range": 0},  # screen recordings, slides: motion search finds nothing
    "wide-motion": {"search_range": 16},  # fast pans and sport
    "small": {"lambda_scale": 2.0},  # spend distortion down to the floor for size
    "sharp": {"lambda_scale": 0.5},  # spend rate on quality above the floor
    "fast": {"min_block": 16},  # fewer, larger leaves: cheaper to search
    "few-colours": {"max_palette": 16},  # flat animation: small palettes suffice
    "learned": {"palette": "cgan-v1"},  # the learned palette generator
}


def _check_arms(arms: dict[str, dict]) -> None:
    for name, overrides in arms.items():
        bad = sorted(set(overrides) - set(TUNABLE))
        if bad:
            raise ConfigError(f"tuner arm {name!r} sets {', '.join(bad)}; an arm may set only {', '.join(TUNABLE)}")
        EncoderConfig(**overrides)  # validates the values


_check_arms(ARMS)
ARM_NAMES: tuple[str, ...] = tuple(ARMS)


def arm_config(arm: str, base: EncoderConfig) -> EncoderConfig:
    """The job's configuration ``base`` with arm ``arm``'s overrides: floor and GOP always ``base``'s."""
    if arm not in ARMS:
        raise ConfigError(f"unknown tuner arm {arm!r}; known: {', '.join(ARM_NAMES)}")
    return EncoderConfig.from_dict({**base.to_dict(), **ARMS[arm]})


def space_hash() -> str:
    """Identity of the action space: a saved policy is only meaningful for the same arms."""
    return hashlib.sha256(json.dumps(ARMS, sort_keys=True).encode()).hexdigest()[:16]
