"""The palette generator interface and its registry of names.

A generator maps the pixels of many blocks to one palette per block, batched, in torch, so
it runs on CUDA when present. The encoder chooses sizes and prunes palettes by
rate-distortion cost; the decoder never needs a generator: palettes are data in the archive.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from palstream.errors import ConfigError

MAX_PALETTE = 64


class PaletteGenerator(ABC):
    """Maps block pixels to palettes.

    Attributes
    ----------
    name : str
        Registered name, recorded in the archive.
    """

    name: str = ""
    # True for a generator the codec runs itself, block by block where a palette can compete
    # (``dominant``): asked in batches about every block, it would cost more than the encode.
    in_codec: bool = False

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def weights_hash(self) -> str | None:
        """sha256 of the weights file for learned generators; None for algorithmic ones."""
        return None

    def block_features(self, luma: np.ndarray, cb: np.ndarray, cr: np.ndarray, boxes: np.ndarray) -> torch.Tensor | None:
        """Conditioning features of blocks computed from their whole frames, for :meth:`generate`.

        Parameters
        ----------
        luma, cb, cr : np.ndarray
            uint8 planes (T, H, W) and (T, H/2, W/2) of the frames the blocks are in.
        boxes : np.ndarray
            int (M, 4): ``frame, top, left, size`` of each block in luma pixels.

        Returns
        -------
        torch.Tensor or None
            float32 (M, D); None (the default) for generators that use the block's samples only.
        """
        return None

    @abstractmethod
    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Palettes for a batch of equally sized blocks.

        Parameters
        ----------
        samples : torch.Tensor
            float32, shape (N, P, C): N blocks of P pixels with C components (1: luma level,
            2: Cb/Cr pair), values in 0..255.
        k : torch.Tensor
            int64, shape (N,): wanted palette size per block, 1..64.
        features : torch.Tensor, optional
            float32 (N, D): the blocks' :meth:`block_features`, where the generator has them.

        Returns
        -------
        torch.Tensor
            float32, shape (N, max(k), C), values in 0..255; row i uses its first k[i] entries.
            Shape (N, 0, C): no proposal for any block (the ``none`` generator).
        """


# Built-in generators by name -> the module that defines (and registers) them. Modules import
# only when their name is asked for, as zarr's codec registry and entry points do: the learned
# generator sits in a higher layer (palstream.learned imports this module), so importing it here
# eagerly would close an import cycle and load torch models for every `--palette kmeans` run.
_BUILTIN_MODULES = {
    "dominant": "palstream.palettes.dominant",
    "kmeans": "palstream.palettes.kmeans",
    "none": "palstream.palettes.none",
    "cgan-v1": "palstream.learned.generator",
}
_REGISTRY: dict[str, Callable[..., PaletteGenerator]] = {}


def register_palette_generator(name: str):
    """Class decorator: make a generator selectable as ``--palette NAME``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def palette_generator_names() -> list[str]:
    """Every selectable name: the built-in ones and any registered since."""
    return sorted(set(_BUILTIN_MODULES) | set(_REGISTRY))


def create_palette_generator(name: str, device: str | torch.device | None = None) -> PaletteGenerator:
    """Instantiate the generator registered as ``name`` (e.g. ``"kmeans"``), importing its module on first use."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])  # its decorator registers the class
    if name not in _REGISTRY:
        raise ConfigError(f"unknown palette generator {name!r}; choose one of: {', '.join(palette_generator_names())}")
    return _REGISTRY[name](device=device)
