"""Mode shares: how much of the picture, and of the bits, each kind of leaf takes.

``code_frame`` adds every coded leaf to a small float64 array when asked (rows ``syntax.STAT_*``:
leaves, luma pixels and bits by mode, PALETTE leaves by palette size, those with escape samples
and, when encoding, by where the luma palette came from and what the analysis estimated they would
cost), and the bits of the frames' sample offsets (bitstream 11). A leaf's bits are measured from the range coder's state at its
start and end (``rangecoder.bits_consumed``), so they are fractional and, over a chunk, add up to
its body less the coder's final flush. Areas count the padded frame (a multiple of 64 luma pixels
each way), as the syntax codes it.

``ModeStats`` sums those arrays over chunks and reports them: ``decode_chunk(payload, modes=...)``
and ``encode_chunk(frames, config, modes=...)`` fill one, ``palstream info --modes`` prints one.
"""

from __future__ import annotations

import numpy as np

from palstream.codec.syntax import (
    STAT_AREA,
    STAT_BITS,
    STAT_INTRA_TRANSFORM,
    STAT_LEAVES,
    STAT_PAL_C,
    STAT_PAL_ESCAPE,
    STAT_PAL_ESTIMATE,
    STAT_PAL_SOURCE,
    STAT_PAL_Y,
    STAT_ROWS,
    STAT_SAO,
    STAT_TRANSFORM,
    STAT_TREE,
)

MODES = ("skip", "inter", "intra", "palette")  # rows 0..3, syntax.SKIP .. syntax.PALETTE
SIZE_BUCKETS = ("1", "2-4", "5-16", "17-64")  # palette entries
SOURCES = ("exact", "generated")


class ModeStats:
    """Leaf counts, areas and bits by mode, summed over the chunks added.

    Attributes
    ----------
    counts : np.ndarray
        float64 (``syntax.STAT_ROWS``, 3): leaves, luma pixels and bits of each row.
    chunks : int
        Chunks added.
    payload_bytes : int
        Their payloads' sizes (header included).
    sources : bool
        Whether the PALETTE leaves' sources are known (only the encoder knows them).
    """

    def __init__(self) -> None:
        self.counts = np.zeros((STAT_ROWS, 3))
        self.chunks = 0
        self.payload_bytes = 0
        self.sources = False

    @staticmethod
    def new_counts() -> np.ndarray:
        """A zeroed array for one chunk's ``code_frame`` calls."""
        return np.zeros((STAT_ROWS, 3))

    def add(self, counts: np.ndarray, payload_bytes: int, sources: bool = False) -> None:
        """Add one chunk's ``counts``; ``sources``: they come from the encoder, with palette sources."""
        self.sources = sources if self.chunks == 0 else self.sources and sources
        self.counts += counts
        self.chunks += 1
        self.payload_bytes += payload_bytes

    @property
    def area(self) -> float:
        return float(self.counts[:4, STAT_AREA].sum())

    @property
    def bits(self) -> float:
        return float(self.counts[:4, STAT_BITS].sum() + self.counts[STAT_TREE, STAT_BITS] + self.counts[STAT_SAO, STAT_BITS])

    def _entry(self, row: int) -> dict:
        leaves, area, bits = (float(self.counts[row, c]) for c in (STAT_LEAVES, STAT_AREA, STAT_BITS))
        return {
            "leaves": int(leaves),
            "area_px": int(area),
            "bits": round(bits, 1),
            "area_share": area / self.area if self.area else 0.0,
            "bits_share": bits / self.bits if self.bits else 0.0,
        }

    def _bits_entry(self, row: int) -> dict:
        bits = float(self.counts[row, STAT_BITS])
        return {"bits": round(bits, 1), "bits_share": bits / self.bits if self.bits else 0.0}

    def to_dict(self) -> dict:
        """Plain JSON: per mode, per palette size bucket (luma, chroma) and, from the encoder, per
        palette source: leaves, area_px, bits, and area_share / bits_share of the whole; PALETTE
        leaves with escapes; from the encoder, the analysis' estimate of the PALETTE leaves' bits."""
        out = {
            "chunks": self.chunks,
            "payload_bytes": self.payload_bytes,
            "area_px": int(self.area),
            "bits": round(self.bits, 1),
            "modes": {name: self._entry(row) for row, name in enumerate(MODES)},
            "inter_transform": self._entry(STAT_TRANSFORM),
            "intra_transform": self._entry(STAT_INTRA_TRANSFORM),
            "quadtree": self._bits_entry(STAT_TREE),
            "sample_offsets": self._bits_entry(STAT_SAO),
            "palette_luma_sizes": {name: self._entry(STAT_PAL_Y + i) for i, name in enumerate(SIZE_BUCKETS)},
            "palette_chroma_sizes": {name: self._entry(STAT_PAL_C + i) for i, name in enumerate(SIZE_BUCKETS)},
            "palette_escapes": self._entry(STAT_PAL_ESCAPE),
        }
        if self.sources:
            out["palette_source"] = {name: self._entry(STAT_PAL_SOURCE + i) for i, name in enumerate(SOURCES)}
            out["palette_estimated_bits"] = round(float(self.counts[STAT_PAL_ESTIMATE, STAT_BITS]), 1)
        return out

    def table(self) -> list[str]:
        """The shares as lines of text, one row per mode and per palette size bucket."""
        lines = [f"{'leaves':<22}{'count':>10}{'area %':>9}{'bits %':>9}{'bits/px':>9}"]

        def row(label: str, r: int) -> None:
            leaves, area, bits = (self.counts[r, c] for c in (STAT_LEAVES, STAT_AREA, STAT_BITS))
            lines.append(
                f"{label:<22}{int(leaves):>10}{100 * area / max(self.area, 1):>9.1f}{100 * bits / max(self.bits, 1):>9.1f}"
                f"{bits / max(area, 1):>9.3f}"
            )

        for r, name in enumerate(MODES):
            row(name, r)
        row("  inter transform", STAT_TRANSFORM)
        row("  intra transform", STAT_INTRA_TRANSFORM)
        for title, base in (("palette luma", STAT_PAL_Y), ("palette chroma", STAT_PAL_C)):
            for i, name in enumerate(SIZE_BUCKETS):
                row(f"  {title} {name}", base + i)
        row("  palette escapes", STAT_PAL_ESCAPE)
        if self.sources:
            for i, name in enumerate(SOURCES):
                row(f"  palette {name}", STAT_PAL_SOURCE + i)
        for label, r in (("quadtree splits", STAT_TREE), ("sample offsets", STAT_SAO)):
            lines.append(f"{label:<22}{'':>10}{'':>9}{100 * self.counts[r, STAT_BITS] / max(self.bits, 1):>9.1f}")
        return lines
