"""The learned palette generator ``cgan-v1`` and its training (``palstream train``).

``palstream.palettes`` imports :mod:`palstream.learned.generator` to register ``cgan-v1``;
weights are read on first use. Importing this package alone loads nothing heavy, so the CLI
starts without torch.
"""
