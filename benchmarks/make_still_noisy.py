"""A still scene with sensor noise, made from a corpus camera clip (issue 16, "Done when").

The corpus has no still camera shot: its most static clip by mean absolute frame difference is
the screen recording (1.09 levels, no sensor noise), and the static surveillance camera
(``camera_pedestrians_480x360``, 1.81) has walking people and a temporal luma noise of only
~0.9 levels (the source was MPEG-4 coded and downscaled, which smoothed it). So the still scene is
made from it, honestly and reproducibly:

1. the first frame of ``camera_pedestrians_480x360.mkv`` (480×360, 8-bit 4:2:0, limited range),
   repeated ``FRAMES`` times: nothing in the scene moves;
2. to every frame, temporally and spatially independent sensor noise, drawn with
   ``numpy.random.default_rng(SEED)``: luma gets shot noise plus read noise,
   ``Y' = Y + GAIN·(Poisson(n) − n) + Normal(0, READ_SIGMA)`` with ``n = max(Y − 16, 0) / GAIN``
   photo-electrons (variance ``READ_SIGMA² + GAIN·(Y − 16)``: σ 1.5 levels at black, 2.5 at
   mid-grey, 3.2 at white);
   Cb and Cr get ``Normal(0, CHROMA_SIGMA)`` (smaller: 4:2:0 chroma averages four sensor sites,
   and cameras denoise chroma harder);
3. rounded to the nearest level and clipped to 0..255, then stored losslessly as FFV1 (like
   the corpus) at the source's 10 fps.

The file goes to a cache folder (nothing large is committed) under a name that carries a hash of
the recipe, the source frame and numpy's version, so a changed recipe or source never reuses a
stale file::

    .venv/bin/python -m benchmarks.make_still_noisy            # prints the path of the clip
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from benchmarks.anchors import ToolError, ffmpeg
from palstream.errors import PalstreamError
from palstream.frames import Frames
from palstream.io import read_frames

REPO = Path(__file__).resolve().parent.parent
SOURCE = "camera_pedestrians_480x360.mkv"
NAME = "still_noisy_pedestrians_480x360"
FRAMES = 32
FPS = 10
SEED = 16
GAIN = 0.036  # levels per photo-electron: shot-noise variance GAIN·(Y − 16)
READ_SIGMA = 1.5  # levels, luma read noise
CHROMA_SIGMA = 1.0  # levels, Cb and Cr
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "palstream" / "benchmarks"
CORPUS = REPO.parent / "shared" / "corpus"




def add_sensor_noise(still: Frames, frames: int, seed: int) -> Frames:
    """``still`` (one frame) repeated ``frames`` times, each with its own independent sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(still.y[:1].astype(np.float64), frames, axis=0)
    photons = np.clip(y - 16, 0, None) / GAIN  # black level 16 (limited range) collects none
    noisy_y = y + GAIN * (rng.poisson(photons) - photons) + rng.normal(0, READ_SIGMA, y.shape)
    noisy = [noisy_y]
    for plane in (still.u, still.v):
        c = np.repeat(plane[:1].astype(np.float64), frames, axis=0)
        noisy.append(c + rng.normal(0, CHROMA_SIGMA, c.shape))
    return Frames(*(np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in noisy))


def recipe(source_frame: Frames) -> dict:
    """Everything the clip depends on; its hash names the cached file."""
    return {
        "source": SOURCE,
        "source_frame": 0,
        "source_frame_sha256": hashlib.sha256(source_frame.tobytes()).hexdigest(),
        "frames": FRAMES,
        "fps": FPS,
        "seed": SEED,
        "gain": GAIN,
        "read_sigma": READ_SIGMA,
        "chroma_sigma": CHROMA_SIGMA,
        "numpy": np.__version__,  # Generator streams may change between numpy versions
    }


def make_still_noisy(corpus: Path, cache: Path) -> Path:
    """Path of the still noisy clip in ``cache``, made from ``corpus`` if it is not there yet.

    Raises ``PalstreamError`` (unreadable source) or ``ToolError`` (ffmpeg failed), one line each.
    """
    still = read_frames(str(corpus / SOURCE), 0, 1)
    spec = recipe(still)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / f"{NAME}-{digest}"
    clip = folder / f"{NAME}.mkv"
    if clip.exists():
        return clip
    folder.mkdir(parents=True, exist_ok=True)
    frames = add_sensor_noise(still, FRAMES, SEED)
    raw = folder / "frames.yuv"
    raw.write_bytes(frames.tobytes())
    partial = folder / f"{NAME}.partial.mkv"  # renamed when complete: an interrupted run leaves no clip
    size = f"{still.width}x{still.height}"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", size, "-r", str(FPS), "-i", str(raw),
           "-c:v", "ffv1", "-level", "3", "-g", "1", "-pix_fmt", "yuv420p", "-f", "matroska", str(partial))  # fmt: skip
    raw.unlink()
    spec["frames_sha256"] = hashlib.sha256(frames.tobytes()).hexdigest()
    (folder / "recipe.json").write_text(json.dumps(spec, indent=1) + "\n")
    partial.rename(clip)
    return clip


def main(
    corpus: Annotated[Path, typer.Option(help="Corpus folder holding the source clip.")] = CORPUS,
    cache: Annotated[Path, typer.Option(help="Folder the clip is written to.")] = DEFAULT_CACHE,
) -> None:
    """Make (or find) the still noisy clip and print its path."""
    try:
        print(make_still_noisy(corpus, cache))
    except (PalstreamError, ToolError) as exc:
        print(f"error: cannot make the still noisy clip: {exc}; pass --corpus DIR holding {SOURCE}", file=sys.stderr)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    typer.run(main)
