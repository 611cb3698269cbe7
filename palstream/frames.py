"""Planar 8-bit YCbCr 4:2:0 frames, the unit every stage exchanges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frames:
    """A run of frames as three planes.

    Parameters
    ----------
    y : np.ndarray
        uint8, shape (T, H, W): luma.
    u, v : np.ndarray
        uint8, shape (T, ceil(H/2), ceil(W/2)): Cb and Cr (4:2:0; odd sizes round up).
    """

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray

    def __post_init__(self):
        t, h, w = self.y.shape
        chroma = (t, (h + 1) // 2, (w + 1) // 2)
        for name, plane in (("y", self.y), ("u", self.u), ("v", self.v)):
            if plane.dtype != np.uint8:
                raise ValueError(f"plane {name} must be uint8, got {plane.dtype}")
        if self.u.shape != chroma or self.v.shape != chroma:
            raise ValueError(f"chroma planes must be {chroma}, got {self.u.shape} and {self.v.shape}")

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def height(self) -> int:
        return self.y.shape[1]

    @property
    def width(self) -> int:
        return self.y.shape[2]

    def __getitem__(self, index: slice) -> Frames:
        if not isinstance(index, slice):
            raise TypeError("Frames supports slicing only; use frames[i:i+1] for one frame")
        return Frames(self.y[index], self.u[index], self.v[index])

    @classmethod
    def concatenate(cls, parts: list[Frames]) -> Frames:
        return cls(*(np.concatenate([getattr(p, n) for p in parts]) for n in "yuv"))

    def tobytes(self) -> bytes:
        """Raw yuv420p bytes, frame after frame (Y, then Cb, then Cr)."""
        return b"".join(self.y[t].tobytes() + self.u[t].tobytes() + self.v[t].tobytes() for t in range(len(self)))
