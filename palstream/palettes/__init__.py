"""Palette generators, selectable by name (``--palette NAME``)."""

from palstream.palettes.base import (
    MAX_PALETTE,
    PaletteGenerator,
    create_palette_generator,
    palette_generator_names,
    register_palette_generator,
)
from palstream.palettes import kmeans as _kmeans  # noqa: F401  (registers "kmeans")
from palstream.learned import generator as _cgan  # noqa: F401,E402  (registers "cgan-v1"; weights load lazily)

__all__ = [
    "MAX_PALETTE",
    "PaletteGenerator",
    "create_palette_generator",
    "palette_generator_names",
    "register_palette_generator",
]
