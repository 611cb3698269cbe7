"""Decoded frames out to files: y4m, raw 4:2:0, PNG frames, and containers through PyAV.

The input side (probing, reading, the input policy) is :mod:`palstream.io`; this module only writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import av
import fsspec
import numpy as np

from palstream.errors import PalstreamError
from palstream.frames import Frames
from palstream.io import MATRIX_NAMES, PRIMARIES_NAMES, RANGE_NAMES, TRANSFER_NAMES, SourceInfo

# Output containers PyAV writes, and the codec palstream chooses for each (lossless where possible).
_CODEC_BY_EXTENSION = {
    ".mkv": "ffv1",
    ".avi": "ffv1",
    ".nut": "ffv1",
    ".mp4": "libx264",
    ".mov": "libx264",
    ".webm": "libvpx-vp9",
}
# y4m chroma siting tokens (FFmpeg's chroma_location names).
_Y4M_CHROMA = {"center": "C420jpeg", "left": "C420mpeg2", "topleft": "C420paldv"}


def write_video(frames_iter: Iterable[Frames], path: str, source: SourceInfo) -> int:
    """Write decoded frames to ``path``; the format follows its extension.

    - ``.y4m``: YUV4MPEG2 with frame rate, colour range and chroma siting (exact).
    - ``.yuv``: raw planar 4:2:0 bytes (exact).
    - a folder (a path without extension, or ending in ``/``) or a ``%d`` pattern: one RGB PNG per
      frame (``frame_000000.png``, ... in a folder).
    - anything else through PyAV: ``.mkv``/``.avi``/``.nut`` FFV1 (exact), ``.mp4``/``.mov`` H.264,
      ``.webm`` VP9, other extensions the container's default video codec.

    Parameters
    ----------
    frames_iter : iterable of Frames
        Runs of frames in display order.
    path : str
        Output path (local) or, for ``.y4m``/``.yuv``, any fsspec URL.
    source : SourceInfo
        Supplies frame rate and colour metadata.

    Returns
    -------
    int
        Frames written.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".y4m":
        return _write_y4m(frames_iter, path, source)
    if suffix == ".yuv":
        return _write_raw(frames_iter, path)
    if "%" in path or path.endswith(("/", os.sep)) or os.path.isdir(path) or not suffix:
        return _write_png(frames_iter, path, source)
    return _write_pyav(frames_iter, path, source)


def _open_output(path: str):
    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return fsspec.open(path, "wb")


def _write_raw(frames_iter, path) -> int:
    written = 0
    with _open_output(path) as out:
        for frames in frames_iter:
            out.write(frames.tobytes())
            written += len(frames)
    return written


def _write_y4m(frames_iter, path, source: SourceInfo) -> int:
    fps = source.fps_fraction
    tokens = [
        f"YUV4MPEG2 W{source.width} H{source.height} F{fps.numerator}:{fps.denominator} Ip A1:1",
        _Y4M_CHROMA.get(source.color.get("chroma_location"), "C420jpeg"),
    ]
    colour_range = source.color.get("range")
    if colour_range in ("tv", "pc"):
        tokens.append("XCOLORRANGE=" + ("FULL" if colour_range == "pc" else "LIMITED"))
    written = 0
    with _open_output(path) as out:
        out.write((" ".join(tokens) + "\n").encode())
        for frames in frames_iter:
            for t in range(len(frames)):
                out.write(b"FRAME\n")
                out.write(frames[t : t + 1].tobytes())
            written += len(frames)
    return written


def _to_av_frame(frames: Frames, t: int, fmt: str) -> "av.VideoFrame":
    frame = av.VideoFrame(frames.width, frames.height, fmt)
    for plane, data in zip(frame.planes, (frames.y[t], frames.u[t], frames.v[t]), strict=True):
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        rows[:, : plane.width] = data
    return frame


def _av_format(source: SourceInfo) -> str:
    return "yuvj420p" if source.color.get("range") == "pc" else "yuv420p"


# YCbCr -> RGB matrices swscale knows, by FFmpeg matrix name (others and "unspecified": BT.601).
_SWS_MATRIX = {
    "bt709": "ITU709",
    "fcc": "FCC",
    "bt470bg": "ITU601",
    "smpte170m": "SMPTE170M",
    "smpte240m": "SMPTE240M",
    "bt2020nc": "BT2020",
    "bt2020c": "BT2020",
}


def _write_png(frames_iter, path, source: SourceInfo) -> int:
    pattern = path if "%" in path else os.path.join(path, "frame_%06d.png")
    os.makedirs(os.path.dirname(pattern) or ".", exist_ok=True)
    codec = None
    written = 0
    for frames in frames_iter:
        for t in range(len(frames)):
            yuv = _to_av_frame(frames, t, _av_format(source))
            rgb = yuv.reformat(format="rgb24", src_colorspace=_SWS_MATRIX.get(source.color.get("matrix"), "ITU601"))
            if codec is None:
                codec = av.CodecContext.create("png", "w")
                codec.width, codec.height, codec.pix_fmt = frames.width, frames.height, "rgb24"
            data = b"".join(bytes(p) for p in codec.encode(rgb))
            with open(pattern % written, "wb") as out:
                out.write(data)
            written += 1
    return written


def _write_pyav(frames_iter, path, source: SourceInfo) -> int:
    if "://" in path and not path.startswith("file://"):
        raise PalstreamError(
            f"cannot write {path}: video containers are written to local paths; use .y4m or .yuv for URLs"
        )
    path = path.removeprefix("file://")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fps = source.fps_fraction
    written = 0
    try:
        with av.open(path, mode="w") as container:
            codec = _CODEC_BY_EXTENSION.get(Path(path).suffix.lower(), container.default_video_codec)
            stream = container.add_stream(codec, rate=fps)
            # Lossy viewing codecs need even sizes: pad by repeating the last row/column.
            even = codec != "ffv1"
            stream.width = source.width + (source.width % 2 if even else 0)
            stream.height = source.height + (source.height % 2 if even else 0)
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "12", "preset": "medium"}
            _tag_colour(stream.codec_context, source.color)
            for frames in frames_iter:
                if even:
                    frames = _pad_even(frames)
                for t in range(len(frames)):
                    frame = _to_av_frame(frames, t, "yuv420p")
                    frame.pts = written
                    container.mux(stream.encode(frame))
                    written += 1
            container.mux(stream.encode(None))
    except (av.FFmpegError, ValueError) as exc:
        raise PalstreamError(f"cannot write {path}: {exc}; choose .y4m, .yuv, .mkv or .mp4") from None
    return written


def _tag_colour(context, color: dict) -> None:
    """Carry the source's recorded colour metadata into the output stream (unknown names stay unset)."""
    for attribute, names, key in (
        ("colorspace", MATRIX_NAMES, "matrix"),
        ("color_primaries", PRIMARIES_NAMES, "primaries"),
        ("color_trc", TRANSFER_NAMES, "transfer"),
        ("color_range", RANGE_NAMES, "range"),
    ):
        codes = {name: code for code, name in names.items()}
        if color.get(key) in codes and color[key] != "unspecified":
            setattr(context, attribute, codes[color[key]])


def _pad_even(frames: Frames) -> Frames:
    pad_h, pad_w = frames.height % 2, frames.width % 2
    if not (pad_h or pad_w):
        return frames
    # Chroma planes already have ceil sizes, so only luma grows.
    y = np.pad(frames.y, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    return Frames(y, frames.u, frames.v)
