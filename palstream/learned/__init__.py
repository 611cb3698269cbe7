"""The learned palette generator ``cgan-v1`` and its training (``palstream train``).

Importing this package registers ``cgan-v1`` with :mod:`palstream.palettes`; weights are
read on first use. Training code (and the CNN backbone) load only when asked for.
"""

from palstream.learned.generator import CganGenerator, WeightsError

__all__ = ["CganGenerator", "WeightsError"]
