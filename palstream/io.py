"""Video input through PyAV, local files or any fsspec URL (writers: :mod:`palstream.writers`).

Input policy (what an archivist gets, see README "Input formats"):

- 8-bit YCbCr 4:2:0 (``yuv420p``, ``yuvj420p``, ``nv12``, ``nv21``) is read as is.
- Other 8-bit formats (YCbCr 4:2:2 / 4:4:4 / 4:1:1, RGB, grey, palette) are converted to 4:2:0
  with a :class:`ConversionWarning` that names the loss (chroma resolution, RGB->YCbCr rounding).
- Sources with more than 8 bits per sample, or with an alpha channel, are refused with an
  :class:`~palstream.errors.InputError`: palstream would silently drop what the archivist keeps.
- Odd widths and heights are kept exactly (chroma planes round up, see :class:`~palstream.frames.Frames`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Iterator

import av
import av.logging
import fsspec
import numpy as np

from palstream.errors import InputError
from palstream.frames import Frames

# FFmpeg's enum values (libavutil/pixfmt.h) -> the names ffprobe prints.
MATRIX_NAMES = {
    0: "gbr",
    1: "bt709",
    2: "unspecified",
    4: "fcc",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020nc",
    10: "bt2020c",
    11: "smpte2085",
    12: "chroma-derived-nc",
    13: "chroma-derived-c",
    14: "ictcp",
}
PRIMARIES_NAMES = {
    1: "bt709",
    2: "unspecified",
    4: "bt470m",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "film",
    9: "bt2020",
    10: "smpte428",
    11: "smpte431",
    12: "smpte432",
    22: "jedec-p22",
}
TRANSFER_NAMES = {
    1: "bt709",
    2: "unspecified",
    4: "gamma22",
    5: "gamma28",
    6: "smpte170m",
    7: "smpte240m",
    8: "linear",
    9: "log100",
    10: "log316",
    11: "iec61966-2-4",
    12: "bt1361e",
    13: "iec61966-2-1",
    14: "bt2020-10",
    15: "bt2020-12",
    16: "smpte2084",
    17: "smpte428",
    18: "arib-std-b67",
}
RANGE_NAMES = {0: "unspecified", 1: "tv", 2: "pc"}

# Read without conversion: planar 8-bit 4:2:0 (nv12/nv21 are the same samples, interleaved).
_NATIVE = {"yuv420p", "yuvj420p"}
_SAME_SAMPLES = {"nv12", "nv21"}


class ConversionWarning(UserWarning):
    """The source is converted to 8-bit 4:2:0 and loses something on the way."""


@dataclass(frozen=True)
class SourceInfo:
    """What the archive records about its source video.

    Parameters
    ----------
    url : str
        Where the source was read from (path or fsspec URL).
    name : str
        File name without directories.
    size_bytes : int
        Size of the source file.
    sha256 : str
        Hex sha256 of the source file's bytes (fixity of the original).
    width, height : int
        Luma size in pixels (odd sizes allowed).
    frame_count : int
        Exact number of decodable video frames.
    fps : str
        Frame rate as ``"num/den"``.
    time_base : str
        Stream time base as ``"num/den"``.
    pix_fmt : str
        The source's FFmpeg pixel format before conversion to 4:2:0.
    color : dict
        ``matrix``, ``range`` (``tv``/``pc``/``unspecified``), ``primaries``, ``transfer``,
        ``chroma_location``: FFmpeg's names.
    """

    url: str
    name: str
    size_bytes: int
    sha256: str
    width: int
    height: int
    frame_count: int
    fps: str
    time_base: str
    pix_fmt: str
    color: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SourceInfo":
        """Inverse of :meth:`to_dict`; keys added by later versions are ignored (FORMAT.md §1)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def fps_fraction(self) -> Fraction:
        """Frame rate as an exact fraction."""
        return Fraction(self.fps)


def fsspec_options(url: str, storage_options: dict | None) -> dict:
    """The fsspec options that apply to ``url``: none for local paths and ``file://`` URLs.

    One set of options (e.g. an S3 endpoint) can then be passed for a job whose input is local
    and whose archive is remote, or the other way round.
    """
    protocol = str(url).split("://", 1)[0] if "://" in str(url) else "file"
    return {} if protocol in ("file", "local") else dict(storage_options or {})


_log_lock = threading.Lock()
_log_users = 0  # readers inside _libav_errors; FFmpeg's log level is process-wide
_log_saved_level = None


@contextlib.contextmanager
def _libav_errors():
    """Collect FFmpeg's error-level log lines (they reveal truncation PyAV does not raise)."""
    global _log_users, _log_saved_level
    with _log_lock:
        if _log_users == 0:
            _log_saved_level = av.logging.get_level()
            av.logging.set_level(av.logging.ERROR)
        _log_users += 1
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        with _log_lock:
            _log_users -= 1
            if _log_users == 0:
                av.logging.set_level(_log_saved_level)


@contextlib.contextmanager
def _open_input(url: str, storage_options: dict | None):
    """Open ``url`` through fsspec and yield a PyAV input container and its video stream."""
    name = os.path.basename(str(url).rstrip("/"))
    try:
        handle = fsspec.open(str(url), "rb", **fsspec_options(url, storage_options)).open()
    except FileNotFoundError:
        raise InputError(f"input {url} does not exist; check the path or URL") from None
    except IsADirectoryError:
        raise InputError(f"input {url} is a directory; give a video file") from None
    except OSError as exc:
        raise InputError(f"cannot open input {url}: {exc}; check the path and its permissions") from None
    try:
        try:
            container = av.open(handle, mode="r")
        except (av.error.InvalidDataError, av.error.EOFError):
            raise InputError(f"{name} is not a video FFmpeg can read; give a video file (mp4, mkv, y4m, ...)") from None
        except av.FFmpegError as exc:
            raise InputError(f"{name} cannot be opened as a video: {exc}") from None
        with container:
            if not container.streams.video:
                raise InputError(f"{name} has no video stream (audio, subtitles or data only); give a video file")
            yield container, container.streams.video[0]
    finally:
        handle.close()


def _classify(fmt: "av.video.format.VideoFormat", name: str) -> str | None:
    """Check a decoded pixel format against the input policy; return a warning text if lossy."""
    if any(c.bits > 8 for c in fmt.components):
        bits = max(c.bits for c in fmt.components)
        raise InputError(
            f"{name} is {bits}-bit ({fmt.name}): palstream is 8-bit and would lose precision; "
            f"convert with ffmpeg -pix_fmt yuv420p if 8-bit is acceptable"
        )
    if any(c.is_alpha for c in fmt.components):
        raise InputError(
            f"{name} has an alpha channel ({fmt.name}) that palstream cannot store; "
            f"flatten it with ffmpeg -pix_fmt yuv420p if transparency may be dropped"
        )
    if fmt.is_bayer or fmt.is_bit_stream or fmt.name.endswith(("f32le", "f32be", "f16le", "f16be")):
        raise InputError(f"{name} has unsupported pixel format {fmt.name}; convert with ffmpeg -pix_fmt yuv420p")
    if fmt.name in _NATIVE or fmt.name in _SAME_SAMPLES:
        return None
    if fmt.is_rgb or fmt.has_palette:
        return (
            f"{name} is RGB ({fmt.name}): converted to YCbCr 4:2:0 (BT.601), "
            "which rounds colours and halves chroma resolution"
        )
    if fmt.name.startswith("gray"):
        return f"{name} is greyscale ({fmt.name}): stored as YCbCr 4:2:0 with neutral chroma"
    return f"{name} is {fmt.name}: converted to 4:2:0, which reduces chroma resolution"


def _target_format(fmt_name: str) -> str:
    # yuvj formats are full range; converting them to yuv420p would also squeeze the range.
    return "yuvj420p" if fmt_name.startswith("yuvj") else "yuv420p"


def _planes(frame: "av.VideoFrame") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three planes of a yuv420p/yuvj420p frame, without line padding (odd sizes kept)."""
    out = []
    for plane in frame.planes:
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        out.append(rows[:, : plane.width].copy())
    return out[0], out[1], out[2]


def _file_digest(url: str, storage_options: dict | None) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with fsspec.open(str(url), "rb", **fsspec_options(url, storage_options)) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def probe(url: str, storage_options: dict | None = None) -> SourceInfo:
    """Describe a source video and check that palstream can read all of it.

    Every frame is decoded once (no conversion), so the frame count is exact and a
    truncated or corrupt file is refused here, before any archive is written.

    Parameters
    ----------
    url : str
        Local path or fsspec URL (``file://``, ``memory://``, ``s3://``, ...).
    storage_options : dict, optional
        Passed to fsspec (e.g. S3 endpoint and credentials).

    Returns
    -------
    SourceInfo

    Raises
    ------
    InputError
        Missing file, not a video, truncated/corrupt, zero frames, or a refused pixel format.
    """
    name = os.path.basename(str(url).rstrip("/"))
    first = None
    count = 0
    with _libav_errors() as logs, _open_input(url, storage_options) as (container, stream):
        try:
            for frame in container.decode(stream):
                if first is None:
                    first = frame
                    _classify(frame.format, name)
                elif (frame.width, frame.height, frame.format.name) != (first.width, first.height, first.format.name):
                    raise InputError(
                        f"{name} changes from {first.width}x{first.height} {first.format.name} to {frame.width}x"
                        f"{frame.height} {frame.format.name} at frame {count}; split it where the size changes"
                    )
                count += 1
        except av.FFmpegError as exc:
            raise InputError(
                f"{name} is corrupt after frame {count}: {_reason(exc, logs)}; re-export or repair it"
            ) from None
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        time_base = stream.time_base
    if logs:
        raise InputError(f"{name} is truncated or corrupt ({_reason(None, logs)}); re-export or repair it")
    if first is None:
        raise InputError(f"{name} has a video stream but zero frames; give a video with at least one frame")
    if not fps:
        raise InputError(f"{name} does not state a frame rate; remux it with ffmpeg -r RATE")
    size, sha = _file_digest(url, storage_options)
    color = {
        "matrix": MATRIX_NAMES.get(first.colorspace, "unspecified"),
        "range": "pc" if first.format.name.startswith("yuvj") else RANGE_NAMES.get(first.color_range, "unspecified"),
        "primaries": PRIMARIES_NAMES.get(first.color_primaries, "unspecified"),
        "transfer": TRANSFER_NAMES.get(first.color_trc, "unspecified"),
        # PyAV does not expose the chroma siting; FFmpeg's 4:2:0 default is "left" (MPEG-2).
        "chroma_location": "unspecified",
    }
    if first.format.is_rgb or first.format.has_palette:
        color.update(matrix="smpte170m", range="tv")  # what the conversion to YCbCr produces
    return SourceInfo(
        url=str(url),
        name=name,
        size_bytes=size,
        sha256=sha,
        width=first.width,
        height=first.height,
        frame_count=count,
        fps=f"{fps.numerator}/{fps.denominator}",
        time_base=f"{time_base.numerator}/{time_base.denominator}" if time_base else "0/1",
        pix_fmt=first.format.name,
        color=color,
    )


def _reason(exc: Exception | None, logs: list) -> str:
    if logs:
        return logs[0][2].strip()
    return str(exc).split(";")[0] if exc else "unknown error"


class _Converter:
    """Applies the input policy to decoded frames, warning once per source about a lossy conversion."""

    def __init__(self, name: str):
        self.name = name
        self.warned = False

    def __call__(self, frame: "av.VideoFrame") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if frame.format.name not in _NATIVE:
            message = _classify(frame.format, self.name)
            if message and not self.warned:
                warnings.warn(message, ConversionWarning, stacklevel=4)
                self.warned = True
            frame = frame.reformat(format=_target_format(frame.format.name))
        return _planes(frame)


def _decode_frames(url: str, storage_options: dict | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every frame as 8-bit 4:2:0 planes, converting (with one warning) per the input policy."""
    name = os.path.basename(str(url).rstrip("/"))
    convert = _Converter(name)
    count = 0
    with _libav_errors() as logs, _open_input(url, storage_options) as (container, stream):
        try:
            for frame in container.decode(stream):
                if logs:
                    break
                count += 1
                yield convert(frame)
        except av.FFmpegError as exc:
            raise InputError(
                f"{name} is corrupt after frame {count}: {_reason(exc, logs)}; re-export or repair it"
            ) from None
    if logs:
        raise InputError(f"{name} is truncated or corrupt ({_reason(None, logs)}); re-export or repair it")


def _read_by_seeking(
    url: str, start: int, stop: int | None, storage_options: dict | None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Frames [start, stop) by seeking to the keyframe before ``start``; None if that cannot be proven exact.

    A frame's number is taken from its timestamp, (pts - start_time) * time_base * fps. The read
    is accepted only if the first decoded frame is at or before ``start`` and the numbers then run
    without a gap or repeat; otherwise (variable frame rate, missing timestamps, a seek that lands
    late, any FFmpeg complaint) the caller decodes from the first frame instead.
    """
    name = os.path.basename(str(url).rstrip("/"))
    convert = _Converter(name)
    kept = []
    with _libav_errors() as logs, _open_input(url, storage_options) as (container, stream):
        fps, time_base = stream.average_rate, stream.time_base
        if not fps or not time_base:
            return None
        origin = stream.start_time or 0
        try:
            container.seek(origin + math.floor(start / (fps * time_base)), stream=stream, backward=True)
            previous = None
            for frame in container.decode(stream):
                if frame.pts is None:
                    return None
                index = round((frame.pts - origin) * time_base * fps)
                if (index > start) if previous is None else (index != previous + 1):
                    return None  # landed after the wanted frame, or timestamps with gaps/repeats
                previous = index
                if index >= start:
                    kept.append(convert(frame))
                if stop is not None and index >= stop - 1:
                    break
        except av.FFmpegError:
            return None
    return None if logs else kept


def _stack(planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Frames:
    return Frames(*(np.stack([p[i] for p in planes]) for i in range(3)))


def iter_chunks(url: str, frames_per_chunk: int, storage_options: dict | None = None) -> Iterator[Frames]:
    """Read a video sequentially in runs of ``frames_per_chunk`` frames (the last may be shorter).

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    frames_per_chunk : int
        Frames per yielded run, >= 1 (the GOP size when encoding).
    storage_options : dict, optional
        Passed to fsspec.

    Yields
    ------
    Frames
        8-bit 4:2:0 frames; conversions warn with :class:`ConversionWarning`.
    """
    if frames_per_chunk < 1:
        raise ValueError("frames_per_chunk must be >= 1")
    batch = []
    for planes in _decode_frames(url, storage_options):
        batch.append(planes)
        if len(batch) == frames_per_chunk:
            yield _stack(batch)
            batch = []
    if batch:
        yield _stack(batch)


def read_frames(url: str, start: int = 0, count: int | None = None, storage_options: dict | None = None) -> Frames:
    """Frames ``[start, start + count)`` of a video as 8-bit 4:2:0 (all from ``start`` if count is None).

    For ``start > 0`` it seeks to the preceding keyframe when the stream's timestamps prove the
    frame numbers (constant frame rate), so a worker reading chunk i does not decode chunks
    0..i-1; otherwise it decodes from the first frame. Both give the same frames.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    start : int, default 0
        First frame number (0-based).
    count : int, optional
        Number of frames; default all frames from ``start``.
    storage_options : dict, optional
        Passed to fsspec for remote URLs.

    Raises
    ------
    InputError
        Unreadable source, or the range holds no frame.
    """
    if start < 0 or (count is not None and count < 1):
        raise ValueError("start must be >= 0 and count >= 1")
    stop = None if count is None else start + count
    kept = _read_by_seeking(url, start, stop, storage_options) if start > 0 else None
    if kept is None:
        kept = []
        for index, planes in enumerate(_decode_frames(url, storage_options)):
            if stop is not None and index >= stop:
                break
            if index >= start:
                kept.append(planes)
    if not kept:
        raise InputError(f"{os.path.basename(str(url))} has no frames in [{start}, {stop}); check the frame range")
    return _stack(kept)
