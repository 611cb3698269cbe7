"""The quality floor of an encode: a lossy unit never comes out below the job's ``target_psnr``.

Beside the encoder configuration it checks (``palstream/codec/config.py``, owned by the codec),
here so that the batch runner, the tuner and the offline measurements share one check without
importing each other. The floor is not traded: a unit below it is an error, never a low reward.
"""

from __future__ import annotations

from palstream.errors import PalstreamError

FLOOR_TOLERANCE_DB = 1e-6  # PSNR is a float; equality with the floor passes


class FloorViolation(PalstreamError):
    """A unit came out below the job's quality floor: the codec broke its promise."""


def check_floor(psnr_y: float | None, target_psnr: float, lossless: bool, where: str) -> None:
    """Raise :class:`FloorViolation` when a lossy unit's PSNR-Y is below the floor (None means exact)."""
    if lossless or psnr_y is None:
        return
    if psnr_y < target_psnr - FLOOR_TOLERANCE_DB:
        raise FloorViolation(
            f"{where} came out at PSNR-Y {psnr_y:.3f} dB, below the job's floor of {target_psnr:g} dB; "
            "this is a codec bug: report it with the source"
        )
