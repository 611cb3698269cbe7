"""Palette generators, selectable by name (``--palette NAME``); each module is imported when its name is first used."""

from palstream.palettes.base import (
    MAX_PALETTE,
    PaletteGenerator,
    create_palette_generator,
    palette_generator_names,
    register_palette_generator,
)

__all__ = [
    "MAX_PALETTE",
    "PaletteGenerator",
    "create_palette_generator",
    "palette_generator_names",
    "register_palette_generator",
]
