"""Decoded frames out to files: y4m, raw 4:2:0, PNG frames, and containers through PyAV.

The input side (probing, reading, the input policy) is :mod:`palstream.io`; this module only writes.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import io
import itertools
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from palstream.errors import PalstreamError
from palstream.frames import Frames
from palstream.io import (
    FIELD_ORDERS,
    MATRIX_NAMES,
    NO_PTS,
    PRIMARIES_NAMES,
    RANGE_NAMES,
    TRANSFER_NAMES,
    KeptStream,
    SideStreams,
    SourceInfo,
    stored_packet,
)
from palstream.storage import Location

# Output containers PyAV writes, and the codec palstream chooses for each (lossless where possible).
_CODEC_BY_EXTENSION = {
    ".mkv": "ffv1",
    ".avi": "ffv1",
    ".nut": "ffv1",
    ".mp4": "libx264",
    ".mov": "libx264",
    ".ts": "libx264",
    ".webm": "libvpx-vp9",
}
# y4m interlacing tokens by field order (FFmpeg's names).
# FFmpeg's "bt" is bottom coded first, top displayed first: y4m and x264 name the displayed order.
_Y4M_FIELDS: dict[str | None, str] = {"progressive": "Ip", "tt": "It", "bt": "It", "bb": "Ib", "tb": "Ib"}
# x264 needs its own flag to code interlaced pictures (a field order alone is only a label).
_X264_FIELDS = {"tt": "tff=1", "bt": "tff=1", "bb": "bff=1", "tb": "bff=1"}
# y4m chroma siting tokens (FFmpeg's chroma_location names).
_Y4M_CHROMA: dict[str | None, str] = {"center": "C420jpeg", "left": "C420mpeg2", "topleft": "C420paldv"}


STDOUT = "-"
STREAM_FORMATS = ("y4m", "yuv")  # the formats that can go to stdout: written front to back, no seeking
_FRAME_FILE = re.compile(r"frame_\d{6}\.png")  # what a PNG folder written here holds


def output_format(path: str, format: str | None = None) -> str:
    """The format ``path`` is written in: ``"y4m"``, ``"yuv"``, ``"png"`` (frames) or ``"container"`` (PyAV).

    ``path`` ``"-"`` is stdout, in ``format`` (``"y4m"``, the default, or ``"yuv"``); for any
    other path the extension decides and ``format`` must be None.

    Raises
    ------
    PalstreamError
        A format that cannot go to stdout, or ``format`` given with a file path.
    """
    if path == STDOUT:
        format = format or "y4m"
        if format not in STREAM_FORMATS:
            raise PalstreamError(f"{format} cannot be written to stdout; use --format y4m or --format yuv")
        return format
    if format is not None:
        raise PalstreamError(f"--format applies only to '-' (stdout); {path} gets the format of its extension")
    suffix = Path(path).suffix.lower()
    if suffix in (".y4m", ".yuv"):
        return suffix[1:]
    if "%" in path or path.endswith(("/", os.sep)) or os.path.isdir(path) or not suffix:
        return "png"
    return "container"


def write_video(
    frames_iter: Iterable[Frames],
    path: str | os.PathLike[str],
    source: SourceInfo,
    overwrite: bool = False,
    format: str | None = None,
    side: SideStreams | None = None,
    first_frame: int = 0,
) -> int:
    """Write decoded frames to ``path``; the format follows its extension.

    - ``.y4m``: YUV4MPEG2 with frame rate, colour range and chroma siting (exact).
    - ``.yuv``: raw planar 4:2:0 bytes (exact).
    - a folder (a path without extension, or ending in ``/``) or a ``%d`` pattern: one RGB PNG per
      frame (``frame_000000.png``, ... in a folder).
    - anything else through PyAV: ``.mkv``/``.avi``/``.nut`` FFV1 (exact), ``.mp4``/``.mov`` H.264,
      ``.webm`` VP9, other extensions the container's default video codec.
    - ``-``: stdout, as y4m or raw (``format``).

    Local outputs are written under a temporary name beside ``path`` and moved into place only
    when complete, so a failed write leaves nothing behind (remote ``.y4m``/``.yuv`` objects are
    removed instead).

    Parameters
    ----------
    frames_iter : iterable of Frames
        Runs of frames in display order.
    path : str or path-like
        Output path (local) or, for ``.y4m``/``.yuv``, any fsspec URL; ``-`` for stdout.
    source : SourceInfo
        Supplies frame rate and colour metadata.
    overwrite : bool, default False
        Replace an existing output (a file, or a folder holding only ``frame_*.png`` files).
    format : str, optional
        ``"y4m"`` or ``"yuv"`` for stdout; must be None for other paths.
    side : SideStreams, optional
        Streams, chapters and tags to mux beside the video (containers only): packets are
        copied as stored, with their timestamps.
    first_frame : int, default 0
        Number of the first frame in the source, whose recorded timestamp it gets (containers).

    Returns
    -------
    int
        Frames written.

    Raises
    ------
    PalstreamError
        The output exists (without ``overwrite``), is not a regular file (a FIFO, a device), or
        cannot be written; checked before the first frame is taken from ``frames_iter``. A
        stream of ``side`` the container cannot hold is named with the flag that leaves it out.
    """
    path = str(path)
    kind = output_format(path, format)
    if side is not None and kind != "container":
        raise PalstreamError(f"{path} holds video only; other streams go into containers such as .mkv")
    if path == STDOUT:
        return _write_stdout(frames_iter, kind, source)
    location = Location.of(path)
    local_path = location.local_path
    if local_path is None:
        if kind not in STREAM_FORMATS:
            raise PalstreamError(
                f"cannot write {path}: video containers and PNG frames are written to local paths; use .y4m or .yuv for URLs"
            )
        return _write_remote(frames_iter, location, kind, source, overwrite)
    path = local_path
    if kind == "png" and "%" in path:
        return _write_png_pattern(frames_iter, path, source, overwrite)
    check_output(path, overwrite, kind)
    with _staged(path, kind) as temp:
        if kind == "png":
            return _write_png(frames_iter, os.path.join(temp, "frame_%06d.png"), source)
        if kind == "container":
            return _write_pyav(frames_iter, temp, source, path, side, first_frame)
        with open(temp, "xb") as out:
            return (_write_y4m if kind == "y4m" else _write_raw)(frames_iter, out, source)


def check_output(path: str, overwrite: bool = False, kind: str | None = None) -> None:
    """Refuse a local output that exists (unless ``overwrite``) or that is not a regular file or folder.

    Raises
    ------
    PalstreamError
        With the problem and the fix on one line.
    """
    kind = kind or output_format(path)
    target = Path(path)
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PalstreamError(f"cannot write {path}: {parent} is not a folder; choose another output path")
    if not os.path.lexists(target):
        return
    if kind == "png":
        if not target.is_dir():
            raise PalstreamError(f"{path} exists and is not a folder; choose another output folder for PNG frames")
        names = os.listdir(target)
        if names and not overwrite:
            raise PalstreamError(f"output folder {path} is not empty; pass --overwrite to replace its frames")
        if any(not _FRAME_FILE.fullmatch(name) for name in names):
            raise PalstreamError(f"output folder {path} holds other files than frame_*.png; choose another folder")
        return
    if target.is_dir():
        raise PalstreamError(f"{path} is a folder; give a file name such as {os.path.join(path, 'out.mkv')}")
    try:
        mode = os.stat(target).st_mode
    except OSError:  # a dangling symbolic link
        mode = os.lstat(target).st_mode
    if not stat.S_ISREG(mode):
        raise PalstreamError(f"{path} is not a regular file (a FIFO, device or socket); choose a file path or '-'")
    if not overwrite:
        raise PalstreamError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def _new_parents(target: Path):
    """Create the missing parent folders of ``target``; remove them again if the block fails."""
    top = target.parent
    while not top.parent.exists():
        top = top.parent
    fresh = not top.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if fresh:
            shutil.rmtree(top, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _staged(path: str, kind: str):
    """A temporary name beside ``path`` (a folder for PNG frames), moved onto ``path`` on success
    and removed on any failure, with the parent folders this call created."""
    target = Path(path).absolute()
    with _new_parents(target):
        temp = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}{target.suffix}"
        try:
            if kind == "png":
                temp.mkdir()
            yield str(temp)
            if kind == "png" and target.is_dir():  # check_output allowed it: it holds old frames only
                shutil.rmtree(target)
            os.replace(temp, target)
        except BaseException:
            _remove(temp)
            raise


def _pattern_regex(name: str) -> re.Pattern:
    """The file names a ``%d`` pattern such as ``frame_%04d.png`` produces."""
    parts = re.split(r"%0?\d*d", name)
    if len(parts) != 2 or "%" in "".join(parts):
        raise PalstreamError(f"output pattern {name} needs exactly one %d (e.g. frame_%04d.png) and no other %")
    return re.compile(re.escape(parts[0]) + r"\d+" + re.escape(parts[1]))


def _write_png_pattern(frames_iter, path: str, source: SourceInfo, overwrite: bool) -> int:
    """PNG frames named by a ``%d`` pattern: written into a temporary folder beside them, then
    moved into place (replacing the old frames of that pattern) once all are written."""
    folder, name = os.path.split(os.path.abspath(path))
    matches = _pattern_regex(name).fullmatch
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise PalstreamError(f"cannot write {path}: {folder} is not a folder; choose another output path")
    old = [n for n in os.listdir(folder) if matches(n)] if os.path.isdir(folder) else []
    if old and not overwrite:
        raise PalstreamError(f"{os.path.join(folder, old[0])} already exists; pass --overwrite to replace the frames")
    with _new_parents(Path(folder, name)):
        temp = tempfile.mkdtemp(prefix=".frames.partial-", dir=folder)
        try:
            written = _write_png(frames_iter, os.path.join(temp, name), source)
            for n in old:
                os.remove(os.path.join(folder, n))
            for n in os.listdir(temp):
                os.replace(os.path.join(temp, n), os.path.join(folder, n))
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return written


def _write_stdout(frames_iter, kind: str, source: SourceInfo) -> int:
    out = sys.stdout.buffer
    if out.isatty():
        raise PalstreamError("stdout is a terminal; redirect it to a file or pipe it into another program")
    try:
        written = (_write_y4m if kind == "y4m" else _write_raw)(frames_iter, out, source)
        out.flush()
    except BrokenPipeError:
        raise PalstreamError("stdout was closed before every frame was written (broken pipe)") from None
    return written


def _write_remote(frames_iter, location: Location, kind: str, source: SourceInfo, overwrite: bool) -> int:
    fs, path = location.filesystem()
    if fs.exists(path) and not overwrite:
        raise PalstreamError(f"{location} already exists; pass --overwrite to replace it")
    try:
        with fs.open(path, "wb") as out:
            return (_write_y4m if kind == "y4m" else _write_raw)(frames_iter, out, source)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(path)
        raise


def _write_raw(frames_iter, out, source: SourceInfo) -> int:
    written = 0
    for frames in frames_iter:
        out.write(frames.tobytes())
        written += len(frames)
    return written


def _write_y4m(frames_iter, out, source: SourceInfo) -> int:
    fps = source.fps_fraction
    aspect = Fraction(source.sample_aspect_ratio or "1/1") or Fraction(1)  # 0/1 (unknown) is written square
    fields = _Y4M_FIELDS.get(source.field_order, "Ip")
    tokens = [
        f"YUV4MPEG2 W{source.width} H{source.height} F{fps.numerator}:{fps.denominator} {fields} "
        f"A{aspect.numerator}:{aspect.denominator}",
        _Y4M_CHROMA.get(source.color.get("chroma_location"), "C420jpeg"),
    ]
    colour_range = source.color.get("range")
    if colour_range in ("tv", "pc"):
        tokens.append("XCOLORRANGE=" + ("FULL" if colour_range == "pc" else "LIMITED"))
    written = 0
    out.write((" ".join(tokens) + "\n").encode())
    for frames in frames_iter:
        for t in range(len(frames)):
            out.write(b"FRAME\n")
            out.write(frames[t : t + 1].tobytes())
        written += len(frames)
    return written


def _to_av_frame(frames: Frames, t: int, fmt: str) -> av.VideoFrame:
    frame = av.VideoFrame(frames.width, frames.height, fmt)
    for plane, data in zip(frame.planes, (frames.y[t], frames.u[t], frames.v[t]), strict=True):
        # A plane is a buffer (PyAV's Buffer.__buffer__), which numpy's stubs accept only from Python 3.12.
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)  # type: ignore[call-overload]
        rows[:, : plane.width] = data
    return frame


def _av_format(source: SourceInfo) -> str:
    return "yuvj420p" if source.color.get("range") == "pc" else "yuv420p"


# YCbCr -> RGB matrices swscale knows, by FFmpeg matrix name (others and "unspecified": BT.601).
_SWS_MATRIX: dict[str | None, str] = {
    "bt709": "ITU709",
    "fcc": "FCC",
    "bt470bg": "ITU601",
    "smpte170m": "SMPTE170M",
    "smpte240m": "SMPTE240M",
    "bt2020nc": "BT2020",
    "bt2020c": "BT2020",
}


def rgb_frame(frames: Frames, t: int, source: SourceInfo, width: int | None = None, height: int | None = None):
    """Frame ``t`` as an RGB ``av.VideoFrame`` through the source's YCbCr matrix and range;
    scaled to ``width`` x ``height`` by area averaging when given (thumbnails)."""
    yuv = _to_av_frame(frames, t, _av_format(source))
    matrix = _SWS_MATRIX.get(source.color.get("matrix"), "ITU601")
    if width is None:
        return yuv.reformat(format="rgb24", src_colorspace=matrix)
    return yuv.reformat(width=width, height=height, format="rgb24", src_colorspace=matrix, interpolation="AREA")


def _write_png(frames_iter, pattern, source: SourceInfo) -> int:
    codec = None
    written = 0
    for frames in frames_iter:
        for t in range(len(frames)):
            rgb = rgb_frame(frames, t, source)
            if codec is None:
                codec = av.CodecContext.create("png", "w")
                codec.width, codec.height, codec.pix_fmt = frames.width, frames.height, "rgb24"
            data = b"".join(bytes(p) for p in codec.encode(rgb))
            with open(pattern % written, "wb") as out:
                out.write(data)
            written += 1
    return written


def _write_pyav(frames_iter, path, source: SourceInfo, target: str, side: SideStreams | None, first_frame: int) -> int:
    """Through PyAV into ``path``, choosing the codec and naming errors by the final ``target``.

    Frames get the source's recorded timestamps (variable frame rate and start offset kept),
    field order and pixel aspect ratio; ``side``'s packets are interleaved by time.
    """
    time_base, pts = source.frame_times()
    written = 0
    try:
        with av.open(path, mode="w", options=_container_options(target, time_base, side)) as container:
            codec = _CODEC_BY_EXTENSION.get(Path(target).suffix.lower(), container.default_video_codec)
            stream = container.add_stream(codec, rate=source.fps_fraction)
            assert isinstance(stream, av.VideoStream)  # typed as any stream kind: the codec name is known only at run time
            # Lossy viewing codecs need even sizes: pad by repeating the last row/column.
            even = codec != "ffv1"
            stream.width = source.width + (source.width % 2 if even else 0)
            stream.height = source.height + (source.height % 2 if even else 0)
            stream.pix_fmt = "yuv420p"
            stream.time_base = stream.codec_context.time_base = time_base
            if codec == "libx264":
                stream.options = {"crf": "12", "preset": "medium"}
                if source.field_order in _X264_FIELDS:
                    stream.options["x264-params"] = _X264_FIELDS[source.field_order]
            _tag_colour(stream.codec_context, source.color)
            _tag_geometry(stream.codec_context, source)
            pending = _Interleaved(iter(()))
            if side is not None:
                _refuse_unwritable(container.format.name, side, target)  # before any frame is decoded
                pending = _add_side(container, side, target)
            for frames in frames_iter:
                if even:
                    frames = _pad_even(frames)
                for t in range(len(frames)):
                    frame = _to_av_frame(frames, t, "yuv420p")
                    frame.pts, frame.time_base = pts[first_frame + written], time_base
                    for packet in stream.encode(frame):
                        if packet.dts is not None:
                            pending.mux_until(container, packet.dts * time_base)
                        container.mux(packet)
                    written += 1
            container.mux(stream.encode(None))
            pending.mux_until(container, None)
    except (av.FFmpegError, ValueError) as exc:
        raise PalstreamError(f"cannot write {target}: {exc}; choose .y4m, .yuv, .mkv or .mp4") from None
    return written


def _container_options(target: str, time_base: Fraction, side: SideStreams | None) -> dict:
    """Options that keep every stream's times: for mp4/mov a movie time scale in which every
    start is exact (the edit lists that carry start offsets count in it; the default 1000 moves
    audio by up to half a millisecond); for MPEG-TS no shift of all times by the first dts."""
    if Path(target).suffix.lower() == ".ts":
        return {"avoid_negative_ts": "disabled"}  # its mux delay holds the encoder's negative first dts: times stay
    if Path(target).suffix.lower() not in (".mp4", ".mov"):
        return {}
    scale = 1
    for base in [time_base, *(Fraction(k.info["time_base"]) for k in (side.streams if side else []) if k.info["type"] != "attachment")]:
        scale = math.lcm(scale, base.denominator)
    return {"movie_timescale": str(scale)} if scale < 2**31 else {}


def _tag_geometry(context, source: SourceInfo) -> None:
    """Field order and pixel aspect ratio as recorded (archives before format 3 record neither)."""
    codes = {name: code for code, name in FIELD_ORDERS.items()}
    if source.field_order in codes:
        context.field_order = codes[source.field_order]
    if source.sample_aspect_ratio and Fraction(source.sample_aspect_ratio):
        context.sample_aspect_ratio = Fraction(source.sample_aspect_ratio)


def _add_side(container, side: SideStreams, target: str) -> _Interleaved:
    """Add ``side``'s streams, attachments, chapters and tags to ``container``; return its packets,
    merged by time as they are read, for :meth:`_Interleaved.mux_until`."""
    container.metadata.update(side.container.get("metadata", {}))
    timed = []
    for kept in side.streams:
        stream = _new_stream(container, kept, target)
        if stream is not None:
            timed.append(_timed_packets(kept, stream))
    container.set_chapters(
        [
            {**chapter, "time_base": Fraction(chapter["time_base"]), "metadata": dict(chapter["metadata"])}
            for chapter in side.chapters
        ]
    )
    return _Interleaved(heapq.merge(*timed, key=lambda item: item[0]))


def _timed_packets(kept: KeptStream, stream):
    """(time in seconds, packet) of a kept stream, in stored order."""
    time_base = Fraction(kept.info["time_base"])
    for data, row in kept.packets():
        when = row[1] if row[1] != NO_PTS else row[0]  # dts, else pts, decides the muxing order
        yield when * time_base, stored_packet(data, row, stream, time_base)


class _Interleaved:
    """Side packets merged by time, muxed as the video's time passes theirs."""

    def __init__(self, merged):
        self.merged = merged
        self.next = next(merged, None)

    def mux_until(self, container, until) -> None:
        """Mux the side packets due by time ``until`` (seconds, a Fraction; None: all of them)."""
        while self.next is not None and (until is None or self.next[0] <= until):
            container.mux(self.next[1])
            self.next = next(self.merged, None)


def _new_stream(container, kept: KeptStream, target: str):
    """The output stream of a kept stream, with its tags, disposition and time base (None for an
    attachment); a container that cannot take it is refused by name, with the flag that leaves it out."""
    info = kept.info
    try:
        if info["type"] == "attachment":
            if "matroska" not in container.format.name:
                raise ValueError("attachments need Matroska")
            container.add_attachment(info["filename"], info["mimetype"], kept.data).metadata.update(info["metadata"])
            return None
        if info.get("parameters") is not None:
            blob = io.BytesIO(base64.b64decode(info["parameters"]))
            stream = container.add_stream_from_template(av.open(blob, format=info["parameters_format"]).streams[0])
        elif info["type"] == "data":
            stream = container.add_data_stream()  # opaque packets: for containers that take raw data (.ts)
        else:
            raise ValueError("opaque packets of a known type")
    except (av.FFmpegError, ValueError):
        raise PalstreamError(_refusal(kept, target)) from None
    stream.metadata.update(info["metadata"])
    stream.disposition = sum(av.stream.Disposition[d] for d in info["disposition"] if d in av.stream.Disposition.__members__)
    stream.time_base = Fraction(info["time_base"])
    return stream


def _refuse_unwritable(format_name: str, side: SideStreams, target: str) -> None:
    """Refuse, by name, the first kept stream the muxer does not take: each is written alone
    (header, first packet, trailer) into a scratch container of the output's format."""
    for kept in side.streams:
        try:
            with av.open(io.BytesIO(), "w", format=format_name) as probe:
                stream = _new_stream(probe, kept, target)
                for data, row in itertools.islice(kept.packets(), 1 if stream is not None else 0):
                    probe.mux(stored_packet(data, row, stream, Fraction(kept.info["time_base"])))  # some muxers check here
                probe.start_encoding()
        except (av.FFmpegError, ValueError):
            raise PalstreamError(_refusal(kept, target)) from None


def _refusal(kept: KeptStream, target: str) -> str:
    info = kept.info
    other = "" if Path(target).suffix.lower() == ".mkv" else "decode to .mkv, or "
    return (
        f"{target} cannot hold stream {info['source_index']} ({info['type']} {info['codec']}); {other}"
        f"leave it out with --drop-stream {info['source_index']}"
    )


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
