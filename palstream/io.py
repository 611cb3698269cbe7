"""Video input through PyAV, local files or any fsspec URL (writers: :mod:`palstream.writers`).

Input policy (what an archivist gets, see README "Input formats"):

- 8-bit YCbCr 4:2:0 (``yuv420p``, ``yuvj420p``, ``nv12``, ``nv21``) is read as is.
- Other 8-bit formats (YCbCr 4:2:2 / 4:4:4 / 4:1:1, RGB, grey, palette) are converted to 4:2:0
  with a :class:`ConversionWarning` that names the loss (chroma resolution, RGB->YCbCr rounding).
- Sources with more than 8 bits per sample, or with an alpha channel, are refused with an
  :class:`~palstream.errors.InputError`: palstream would silently drop what the archivist keeps.
- Odd widths and heights are kept exactly (chroma planes round up, see :class:`~palstream.frames.Frames`).
- A truncated or damaged source is refused by :func:`probe`, every time, unless the caller opts in
  with ``allow_truncated=True``; then the frames before the break are kept and
  :attr:`SourceInfo.truncated` records what was detected.
- FIFOs, devices, sockets and other non-regular local files are refused before they are opened.
- Credentials in input URLs never reach anything stored or printed (:func:`palstream.storage.redact_url`).
"""

from __future__ import annotations

import array
import base64
import contextlib
import functools
import hashlib
import itertools
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from io import BytesIO
from urllib.parse import urlsplit

import av
import av.logging
import numpy as np

from palstream.errors import InputError
from palstream.frames import Frames
from palstream.storage import Location, storage_error

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
        Where the source was read from (path or fsspec URL), credentials redacted
        (:func:`palstream.storage.redact_url`).
    name : str
        File name without directories.
    size_bytes : int
        Size of the source file.
    sha256 : str
        Hex sha256 of the source file's bytes (fixity of the original).
    width, height : int
        Luma size in pixels (odd sizes allowed).
    frame_count : int
        Exact number of decodable video frames (those before the break, for a kept truncated source).
    fps : str
        Frame rate as ``"num/den"``.
    time_base : str
        Stream time base as ``"num/den"``.
    pix_fmt : str
        The source's FFmpeg pixel format before conversion to 4:2:0.
    color : dict
        ``matrix``, ``range`` (``tv``/``pc``/``unspecified``), ``primaries``, ``transfer``,
        ``chroma_location``: FFmpeg's names.
    timing : dict or None
        The presentation time of every frame (FORMAT.md §2.1): ``time_base`` ``"num/den"`` and
        ``pts_runs``, runs ``[first_pts, step, count]`` in that time base (one run for a constant
        frame rate); None in archives written before format 3 (frames then run at ``fps`` from 0).
    field_order : str or None
        ``progressive``, ``tt``, ``bb``, ``tb``, ``bt`` (FFmpeg's names) or ``unknown``; None before format 3.
    sample_aspect_ratio : str or None
        Pixel aspect ratio ``"num/den"`` (``"0/1"`` when unknown); None before format 3.
    truncated : dict or None
        None for a complete source. For a truncated or damaged source kept on request
        (``probe(..., allow_truncated=True)``): ``reason`` (one line: what breaks where),
        ``decoded_frames``, ``decoded_seconds``, ``file_bytes`` and what the container declares,
        ``declared_frames``, ``declared_seconds``, ``declared_bytes`` (each None where it declares
        nothing).
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
    timing: dict | None = None
    field_order: str | None = None
    sample_aspect_ratio: str | None = None
    truncated: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SourceInfo:
        """Inverse of :meth:`to_dict`; keys added by later versions are ignored (FORMAT.md §1).

        Archives written before ``truncated`` existed read as complete sources (``truncated=None``).
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def fps_fraction(self) -> Fraction:
        """Frame rate as an exact fraction."""
        return Fraction(self.fps)

    def frame_times(self) -> tuple[Fraction, list[int]]:
        """(time base, presentation timestamp of every frame): the recorded timing, or for
        archives without one, frames at ``fps`` from 0."""
        if self.timing is None:
            time_base = 1 / self.fps_fraction
            return time_base, list(range(self.frame_count))
        pts = [first + step * i for first, step, count in self.timing["pts_runs"] for i in range(count)]
        return Fraction(self.timing["time_base"]), pts[: self.frame_count]

    @property
    def constant_rate(self) -> bool:
        """Whether every frame is where ``fps`` puts it, to within one tick of the time base (all
        that y4m and raw outputs can carry; Matroska's milliseconds round 15 fps to 66/67 ms)."""
        if self.timing is None or len(self.timing["pts_runs"]) <= 1:
            return True
        time_base, pts = self.frame_times()
        tick = 1 / (self.fps_fraction * time_base)
        return all(abs(p - pts[0] - i * tick) <= 1 for i, p in enumerate(pts))


def pts_runs(pts: list[int]) -> list[list[int]]:
    """Timestamps as runs ``[first, step, count]`` (``first + step * i`` for i < count): one run
    for a constant frame rate, a few for a variable one."""
    runs: list[list[int]] = []
    for value in pts:
        if runs and runs[-1][2] == 1:
            runs[-1][1:] = [value - runs[-1][0], 2]
        elif runs and value == runs[-1][0] + runs[-1][1] * runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([value, 0, 1])
    return runs


FIELD_ORDERS = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}  # AVFieldOrder


def _display_name(source: Location) -> str:
    """The file name of ``source``: its last path component, without a query string."""
    path = source.local_path or urlsplit(source.url).path
    return os.path.basename(path.rstrip("/"))


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(source: str | Location) -> None:
    """Refuse a local input that is not a regular file, without opening it.

    Opening a FIFO blocks until a writer appears, and a device or socket cannot be read twice
    (probe, then encode) or hashed; ``os.stat`` answers without opening. Remote URLs pass.

    Raises
    ------
    InputError
        Missing, a directory, a FIFO, a device, a socket, or otherwise not a regular file.
    """
    source = Location.of(source)
    path, url = source.local_path, source.redacted
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"input {url} does not exist; check the path or URL") from None
    except OSError as exc:
        raise InputError(f"cannot open input {url}: {exc.strerror}; check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"input {url} is a directory; give a video file")
    if not stat.S_ISREG(mode):
        kind = next((text for test, text in _SPECIAL_KINDS if test(mode)), "not a regular file")
        raise InputError(
            f"input {url} is {kind}: palstream reads a source twice and hashes it; copy the stream to a file first"
        )


_log_lock = threading.Lock()
_log_users = 0  # readers inside _libav_errors; FFmpeg's log level and PyAV's de-duplication are process-wide
_log_saved = None


@contextlib.contextmanager
def _libav_errors():
    """Collect the FFmpeg log lines of this thread's demuxing and decoding (damage PyAV does not raise).

    PyAV drops a log line identical to the previous one, process-wide: the same file probed twice
    logs "File ended prematurely" twice and the second line never reached a capture, so a second
    probe passed. Captures therefore run with the de-duplication off (and FFmpeg's error level on),
    restored when the last capture ends. Lines are attributed by thread, so decoding happens in
    the calling thread (:func:`_open_input` turns FFmpeg's own threads off).
    """
    global _log_users, _log_saved
    with _log_lock:
        if _log_users == 0:
            _log_saved = (av.logging.get_level(), av.logging.get_skip_repeated())
            av.logging.set_level(av.logging.ERROR)
            av.logging.set_skip_repeated(False)
        _log_users += 1
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        with _log_lock:
            _log_users -= 1
            if _log_users == 0:
                av.logging.set_level(_log_saved[0])
                av.logging.set_skip_repeated(_log_saved[1])


def _new_errors(logs: list, seen: int) -> str | None:
    """The first error-level line logged after ``seen`` lines, or None."""
    for level, _, message in logs[seen:]:
        if level <= av.logging.ERROR:
            return message.strip() or "FFmpeg reported an error"
    return None


@contextlib.contextmanager
def _storage_failures(source: Location):
    """Turn a storage backend's exception (S3, HTTP) while reading ``source`` into one ``InputError``."""
    try:
        yield
    except Exception as exc:  # every backend raises its own family
        mapped = storage_error(exc, source, "read input", InputError)
        if mapped is None:
            raise
        raise mapped from None


def _open_handle(source: Location):
    """The input's fsspec file object, opened for reading; failures as one-line ``InputError``."""
    shown, url = source.redacted, source.url
    check_regular_file(source)
    try:
        fs, path = source.filesystem()
        return fs.open(path, "rb")
    except Exception as exc:  # every backend raises its own family
        mapped = storage_error(exc, source, "read input", InputError)
        if mapped is not None:
            raise mapped from None
        if isinstance(exc, FileNotFoundError):
            raise InputError(f"input {shown} does not exist; check the path or URL") from None
        if isinstance(exc, IsADirectoryError):
            raise InputError(f"input {shown} is a directory; give a video file") from None
        if isinstance(exc, OSError):
            reason = _first_line(exc).replace(str(url), shown)  # backends quote the URL they were given
            raise InputError(f"cannot open input {shown}: {reason}; check the path and its permissions") from None
        raise


@contextlib.contextmanager
def _open_input(source: Location):
    """Open ``source`` through fsspec; yield a PyAV input container, its video stream and the file handle.

    Storage failures while the caller reads (S3, HTTP) come out as one-line ``InputError``.
    """
    name = _display_name(source)
    handle = _open_handle(source)
    try:
        with _storage_failures(source):
            try:
                container = av.open(handle, mode="r")
            except UnicodeDecodeError:
                raise InputError(f"{name} is corrupt: its metadata is not valid UTF-8 text; re-copy or re-export it") from None
            except (av.FFmpegError, OSError) as exc:
                # a cut file can also make FFmpeg seek before its start (a Python OSError from the handle)
                if not isinstance(exc, av.FFmpegError) and storage_error(exc, source, "read input") is not None:
                    raise
                cut = _structure_break(handle, _file_size(handle))
                if cut:
                    raise InputError(f"{name} is truncated: {cut[0]}; re-copy or re-export it") from None
                if isinstance(exc, (av.error.InvalidDataError, av.error.EOFError)):
                    raise InputError(
                        f"{name} is not a video FFmpeg can read; give a video file (mp4, mkv, y4m, ...)"
                    ) from None
                raise InputError(f"{name} cannot be opened as a video: {_first_line(exc)}") from None
            with container:
                if not container.streams.video:
                    if cut := _structure_break(handle, _file_size(handle)):
                        raise InputError(f"{name} is truncated: {cut[0]}; re-copy or re-export it")
                    raise InputError(f"{name} has no video stream (audio, subtitles or data only); give a video file")
                stream = container.streams.video[0]
                # FFmpeg's worker threads log under their own thread ids, outside this thread's capture
                stream.thread_type = "NONE"
                yield container, stream, handle
    finally:
        handle.close()


def _classify(fmt: av.video.format.VideoFormat, name: str) -> str | None:
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


def _planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three planes of a yuv420p/yuvj420p frame, without line padding (odd sizes kept)."""
    out = []
    for plane in frame.planes:
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)  # type: ignore[call-overload]  # PyAV planes are buffers; numpy's stubs say so only from Python 3.12
        out.append(rows[:, : plane.width].copy())
    return out[0], out[1], out[2]


def _file_digest(source: Location) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with _storage_failures(source), _open_handle(source) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _file_size(handle) -> int:
    handle.seek(0, os.SEEK_END)
    return handle.tell()


def _read_at(handle, offset: int, length: int) -> bytes:
    handle.seek(offset)
    return handle.read(length)


_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MATROSKA_SEGMENT = b"\x18\x53\x80\x67"
_Y4M_HEADER_MAX = 4096  # longer than any header line a y4m writer produces
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"styp", b"moof", b"sidx", b"pnot", b"uuid"}


def _ebml_size(data: bytes, at: int) -> tuple[int | None, int]:
    """EBML variable-size integer at ``at``: (value, or None for "unknown size"; its length in bytes)."""
    first = data[at]
    length = 9 - first.bit_length()
    if not 1 <= length <= 8 or at + length > len(data):
        return None, max(length, 1)
    value = int.from_bytes(data[at : at + length], "big") & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), length


def _structure_break(handle, size: int) -> tuple[str, int | None] | None:
    """Where the container's own byte structure says the file was cut: (reason, declared length), or None.

    Matroska declares its segment's length, an ISO BMFF (mp4, mov) file is a chain of boxes
    with declared lengths, and a y4m stream starts with one header line: any of them ending
    past the end of the file is a truncation, found whatever the demuxer makes of the rest.
    """
    head = _read_at(handle, 0, 256)
    if head.startswith(_EBML_MAGIC):
        header_size, length = _ebml_size(head, 4)
        at = 4 + length + (header_size or 0)
        if header_size is None or at + 5 > len(head):
            return None if header_size is not None else ("its EBML header is incomplete", None)
        if head[at : at + 4] != _MATROSKA_SEGMENT:
            return None
        segment_size, length = _ebml_size(head, at + 4)
        if segment_size is None:
            return None  # written live, without a final size
        declared = at + 4 + length + segment_size
        if declared > size:
            return f"the Matroska segment declares {declared} bytes and the file ends at byte {size}", declared
        return None
    if head.startswith(b"YUV4MPEG2"):
        whole = b"\n" in _read_at(handle, 0, _Y4M_HEADER_MAX)
        return None if whole else ("its YUV4MPEG2 header line is incomplete", None)
    if head[4:8] in _MP4_BOXES:
        offset = 0
        while offset < size:
            box = _read_at(handle, offset, 16)
            if len(box) < 8:
                return f"a box header at byte {offset} is incomplete (file ends at byte {size})", None
            length, kind = int.from_bytes(box[:4], "big"), box[4:8].decode("latin-1")
            if length == 1:
                length = int.from_bytes(box[8:16], "big") if len(box) == 16 else 0
            elif length == 0:
                return None  # the last box runs to the end of the file
            if length < 8:
                return f"the box at byte {offset} declares an impossible size {length}", None
            if offset + length > size:
                end = offset + length
                return f"its '{kind}' box declares bytes {offset}..{end} and the file ends at byte {size}", end
            offset += length
    return None


def _y4m_end(handle, scan: _Scan) -> int:
    """Where the whole frames of a y4m file end: after the last whole frame, or after the header line."""
    if scan.byte_end is not None:
        return scan.byte_end
    return _read_at(handle, 0, _Y4M_HEADER_MAX).index(b"\n") + 1


def _declared_seconds(stream) -> float | None:
    """The stream's duration as its container states it (Matroska's per-track DURATION tag), or None."""
    text = stream.metadata.get("DURATION")
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", text.strip()) if text else None
    if match is None:
        return None
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])


@dataclass
class _Scan:
    """What one pass over a stream's packets found: frames decoded, where it broke, what it consumed."""

    frames: int = 0
    packets: int = 0
    byte_end: int | None = None  # end of the last whole packet in the file, where the demuxer says
    start: float | None = None  # seconds
    end: float | None = None  # seconds: the last decoded frame's timestamp plus its duration
    problem: str | None = None  # the first damage seen, one line
    pts: list = field(default_factory=list)  # every frame's timestamp, None where it has none

    def note(self, frame: av.VideoFrame, time_base: Fraction) -> None:
        self.frames += 1
        self.pts.append(frame.pts)
        if frame.pts is not None and time_base:
            start = float(frame.pts * time_base)
            end = float((frame.pts + (frame.duration or 0)) * time_base)
            self.start = start if self.start is None else min(self.start, start)
            self.end = end if self.end is None else max(self.end, end)


def _frames(container, stream, logs: list, scan: _Scan) -> Iterator[av.VideoFrame]:
    """Every frame that decodes cleanly, in order; stops at the first damage and records it in ``scan``.

    The one decoding loop behind :func:`probe` and the readers, so both count the same frames.
    Damage is a decoder or demuxer error, a packet the demuxer flags corrupt (an mp4 sample cut
    by the end of the file), or an FFmpeg error log line (an FFV1 slice CRC mismatch is only
    logged). A break while demuxing still lets the decoder return the frames of the whole packets
    it holds; a break while decoding a packet keeps nothing of that packet's output.
    """
    time_base = stream.time_base
    packets = container.demux(stream)
    peeked: list[av.Packet] = []
    while True:
        seen = len(logs)
        try:
            packet = peeked.pop() if peeked else next(packets)
        except StopIteration:
            break
        except av.FFmpegError as exc:
            scan.problem = f"the container cannot be read after frame {scan.frames} ({_first_line(exc)})"
            break
        if packet.size == 0:  # end of stream
            if (error := _new_errors(logs, seen)) is not None:
                scan.problem = f"the container ends abruptly after frame {scan.frames} ({error})"
            break
        if (error := _new_errors(logs, seen)) is not None:
            scan.problem = f"packet {scan.packets} (after frame {scan.frames}) is damaged: {error}"
            break
        if packet.is_corrupt:
            # A short read flags a packet corrupt; so do MPEG-TS continuity gaps, which the decoder
            # may well survive. Only a flagged packet that ends the stream is a cut: drop it.
            try:
                following = next(packets)
            except (StopIteration, av.FFmpegError):
                following = None
            if following is None or following.size == 0:
                scan.problem = f"the file ends inside packet {scan.packets} (after frame {scan.frames})"
                break
            peeked.append(following)
        try:
            decoded = packet.decode()
        except av.FFmpegError as exc:
            scan.problem = f"frame data after frame {scan.frames} does not decode ({_first_line(exc)})"
            return
        if (error := _new_errors(logs, seen)) is not None:
            scan.problem = f"frame data after frame {scan.frames} is damaged ({error})"
            return
        scan.packets += 1
        if packet.pos is not None and packet.pos >= 0:
            scan.byte_end = packet.pos + packet.size
        for frame in decoded:
            scan.note(frame, time_base)
            yield frame
    if stream.codec_context is None:  # no decoder: FFmpeg did not find the codec's parameters
        scan.problem = scan.problem or "the video stream has no decodable codec parameters"
        return
    seen = len(logs)
    try:
        decoded = stream.codec_context.decode(None)  # the decoder's delayed frames
    except av.FFmpegError as exc:
        scan.problem = scan.problem or f"the last frames do not decode ({_first_line(exc)})"
        return
    if (error := _new_errors(logs, seen)) is not None:
        scan.problem = scan.problem or f"the last frames are damaged ({error})"
        return
    for frame in decoded:
        scan.note(frame, time_base)
        yield frame


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return exc.strerror  # without the errno and the C function PyAV appends
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _completeness(container, stream, handle, scan: _Scan) -> dict:
    """Compare what decoded with what the file and its container declare; ``reason`` is None if complete."""
    size = _file_size(handle)
    declared_frames = stream.frames if container.format.name.startswith("mov") and stream.frames > 0 else None
    declared_seconds = _declared_seconds(stream)
    decoded_seconds = None if scan.end is None else scan.end - (scan.start or 0.0)
    facts = {
        "reason": scan.problem,
        "damaged": scan.problem is not None,
        "decoded_frames": scan.frames,
        "declared_frames": declared_frames,
        "decoded_seconds": decoded_seconds,
        "declared_seconds": declared_seconds,
        "file_bytes": size,
        "declared_bytes": None,
    }
    cut = _structure_break(handle, size)
    if cut is not None:
        # the structure names the cut exactly; a decoding break at the end is its symptom
        facts.update(reason=cut[0], damaged=False, declared_bytes=cut[1])
    elif scan.problem is None:
        facts["reason"] = _shortfall(container, stream, handle, scan, size, facts)
    return facts


def _shortfall(container, stream, handle, scan: _Scan, size: int, facts: dict) -> str | None:
    """What the container declares beyond the frames that decoded cleanly, or None."""
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    declared_frames, declared_seconds, decoded_seconds = (
        facts["declared_frames"],
        facts["declared_seconds"],
        facts["decoded_seconds"],
    )
    if container.format.name == "yuv4mpegpipe" and (whole := _y4m_end(handle, scan)) < size:
        return f"{size - whole} bytes after frame {scan.frames} (byte {whole}) are an incomplete frame"
    if declared_frames is not None and scan.packets < declared_frames:
        # samples, not decoded frames: an edit list may hide samples from the output, never from the file
        return f"its index declares {declared_frames} samples and the file holds {scan.packets}"
    # a missing last frame shortens the stream by one frame duration: half of one is the tolerance
    if None not in (declared_seconds, decoded_seconds) and fps and declared_seconds - decoded_seconds > 0.5 / fps:
        return f"its header declares {declared_seconds:.3f} s and the frames end at {decoded_seconds:.3f} s"
    return None


def probe(source: str | Location, *, allow_truncated: bool = False) -> SourceInfo:
    """Describe a source video and check that palstream can read all of it.

    Every frame is decoded once (no conversion), so the frame count is exact, and the result is
    compared with what the file declares: the byte structure of the container (Matroska segment
    size, mp4 boxes, whole y4m frames), mp4's sample count, Matroska's track duration. A
    truncated or damaged file is refused here, before any archive is written, the same way on
    every call.

    Parameters
    ----------
    source : str or Location
        Local path, fsspec URL (``file://``, ``memory://``, ``s3://``, ...), or a location with
        its storage options (an S3 endpoint and credentials).
    allow_truncated : bool, default False
        Keep a truncated or damaged source: ``frame_count`` is then the number of frames before
        the break, and :attr:`SourceInfo.truncated` records what was detected.

    Returns
    -------
    SourceInfo

    Raises
    ------
    InputError
        Missing file, not a regular file, not a video, truncated/corrupt (unless
        ``allow_truncated``), zero frames, a refused pixel format, or a storage failure.
    """
    source = Location.of(source)
    name = _display_name(source)
    first = None
    scan = _Scan()
    with _open_input(source) as (container, stream, handle), _libav_errors() as logs:
        for frame in _frames(container, stream, logs, scan):
            if first is None:
                first = frame
                _classify(frame.format, name)
            elif (frame.width, frame.height, frame.format.name) != (first.width, first.height, first.format.name):
                raise InputError(
                    f"{name} changes from {first.width}x{first.height} {first.format.name} to {frame.width}x"
                    f"{frame.height} {frame.format.name} at frame {scan.frames - 1}; split it where the size changes"
                )
        facts = _completeness(container, stream, handle, scan)
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        time_base = stream.time_base
        field_order = FIELD_ORDERS.get(stream.codec_context.field_order, "unknown")
        if field_order == "unknown" and first is not None and not first.interlaced_frame:
            field_order = "progressive"
        aspect = stream.codec_context.sample_aspect_ratio or Fraction(0, 1)
    if facts["reason"] is not None and (not allow_truncated or first is None):
        state = "is corrupt" if facts["damaged"] else "is truncated"
        frames = f"{scan.frames} frame" + ("s" if scan.frames != 1 else "")
        keep = f", or keep the {frames} before the break with --allow-truncated" if first else ""
        raise InputError(f"{name} {state}: {facts['reason']}; re-copy or re-export it{keep}")
    if first is None:
        raise InputError(f"{name} has a video stream but zero frames; give a video with at least one frame")
    if not fps:
        raise InputError(f"{name} does not state a frame rate; remux it with ffmpeg -r RATE")
    size, sha = _file_digest(source)
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
        url=source.redacted,
        name=name,
        size_bytes=size,
        sha256=sha,
        width=first.width,
        height=first.height,
        frame_count=scan.frames,
        fps=f"{fps.numerator}/{fps.denominator}",
        time_base=f"{time_base.numerator}/{time_base.denominator}" if time_base else "0/1",
        pix_fmt=first.format.name,
        color=color,
        timing=_timing(scan.pts[: scan.frames], time_base),
        field_order=field_order,
        sample_aspect_ratio=f"{aspect.numerator}/{aspect.denominator}",
        truncated=None if facts["reason"] is None else facts,
    )


def _timing(pts: list, time_base: Fraction | None) -> dict | None:
    """The frames' presentation times (:attr:`SourceInfo.timing`); None when some frame has none."""
    if not time_base or any(p is None for p in pts):
        return None
    return {"time_base": f"{time_base.numerator}/{time_base.denominator}", "pts_runs": pts_runs(pts)}


class _Converter:
    """Applies the input policy to decoded frames, warning once per source about a lossy conversion."""

    def __init__(self, name: str):
        self.name = name
        self.warned = False

    def __call__(self, frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if frame.format.name not in _NATIVE:
            message = _classify(frame.format, self.name)
            if message and not self.warned:
                warnings.warn(message, ConversionWarning, stacklevel=4)
                self.warned = True
            frame = frame.reformat(format=_target_format(frame.format.name))
        return _planes(frame)


def _decode_frames(
    source: Location, frame_count: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every frame as 8-bit 4:2:0 planes, converting (with one warning) per the input policy.

    With ``frame_count`` (what :func:`probe` fixed) exactly that many frames are yielded: reading
    stops there (a kept truncated source breaks after them), and a source that breaks or ends
    before them raises. Without it, any damage raises.
    """
    name = _display_name(source)
    convert = _Converter(name)
    scan = _Scan()
    count = 0
    with _open_input(source) as (container, stream, _), _libav_errors() as logs:
        if frame_count == 0:
            return
        for frame in _frames(container, stream, logs, scan):
            count += 1
            yield convert(frame)
            if count == frame_count:
                return  # what follows (a kept cut or damage) was judged by probe
    if scan.problem is not None:
        raise InputError(f"{name} is corrupt: {scan.problem}; re-copy or re-export it")
    if frame_count is not None and count < frame_count:
        raise InputError(
            f"{name} ends after {count} frames but was probed with {frame_count}; "
            "it changed since it was probed: probe it again"
        )


def _read_by_seeking(
    source: Location, start: int, stop: int | None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Frames [start, stop) by seeking to the keyframe before ``start``; None if that cannot be proven exact.

    A frame's number is taken from its timestamp, (pts - start_time) * time_base * fps. The read
    is accepted only if the first decoded frame is at or before ``start`` and the numbers then run
    without a gap or repeat; otherwise (variable frame rate, missing timestamps, a seek that lands
    late, any damage before ``stop``) the caller decodes from the first frame instead.
    """
    convert = _Converter(_display_name(source))
    kept = []
    scan = _Scan()
    with _open_input(source) as (container, stream, _), _libav_errors() as logs:
        fps, time_base = stream.average_rate, stream.time_base
        if not fps or not time_base:
            return None
        origin = stream.start_time or 0
        try:
            container.seek(origin + math.floor(start / (fps * time_base)), stream=stream, backward=True)
        except av.FFmpegError:
            return None
        previous = None
        for frame in _frames(container, stream, logs, scan):
            if frame.pts is None:
                return None
            index = round((frame.pts - origin) * time_base * fps)
            if (index > start) if previous is None else (index != previous + 1):
                return None  # landed after the wanted frame, or timestamps with gaps/repeats
            previous = index
            if index >= start:
                kept.append(convert(frame))
            if stop is not None and index >= stop - 1:
                return kept
    return None if scan.problem is not None else kept


def _stack(planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Frames:
    return Frames(*(np.stack([p[i] for p in planes]) for i in range(3)))


def iter_chunks(
    source: str | Location, frames_per_chunk: int, frame_count: int | None = None
) -> Iterator[Frames]:
    """Read a video sequentially in runs of ``frames_per_chunk`` frames (the last may be shorter).

    Parameters
    ----------
    source : str or Location
        Local path, fsspec URL, or a location with its storage options.
    frames_per_chunk : int
        Frames per yielded run, >= 1 (the GOP size when encoding).
    frame_count : int, optional
        The frame count :func:`probe` fixed (``SourceInfo.frame_count``): exactly that many frames
        are yielded, also from a truncated source kept with ``allow_truncated``.

    Yields
    ------
    Frames
        8-bit 4:2:0 frames; conversions warn with :class:`ConversionWarning`.

    Raises
    ------
    InputError
        The source breaks before ``frame_count`` frames (or anywhere, without ``frame_count``).
    """
    if frames_per_chunk < 1:
        raise ValueError("frames_per_chunk must be >= 1")
    batch = []
    for planes in _decode_frames(Location.of(source), frame_count):
        batch.append(planes)
        if len(batch) == frames_per_chunk:
            yield _stack(batch)
            batch = []
    if batch:
        yield _stack(batch)


def read_frames(
    source: str | Location,
    start: int = 0,
    count: int | None = None,
    *,
    exact: bool = False,
) -> Frames:
    """Frames ``[start, start + count)`` of a video as 8-bit 4:2:0 (all from ``start`` if count is None).

    For ``start > 0`` it seeks to the preceding keyframe when the stream's timestamps prove the
    frame numbers (constant frame rate), so a worker reading chunk i does not decode chunks
    0..i-1; otherwise it decodes from the first frame. Both give the same frames.

    Parameters
    ----------
    source : str or Location
        Local path, fsspec URL, or a location with its storage options.
    start : int, default 0
        First frame number (0-based).
    count : int, optional
        Number of frames; default all frames from ``start``.
    exact : bool, default False
        Raise unless exactly ``count`` frames are read (what encoding a planned range needs);
        by default ``count`` is a maximum, as in slicing.

    Raises
    ------
    InputError
        Unreadable source, the range holds no frame, the source is damaged before the end of the
        range, or (``exact``) fewer than ``count`` frames.
    """
    if start < 0 or (count is not None and count < 1):
        raise ValueError("start must be >= 0 and count >= 1")
    stop = None if count is None else start + count
    source = Location.of(source)
    kept = _read_by_seeking(source, start, stop) if start > 0 else None
    if kept is None:
        kept = []
        for index, planes in enumerate(_decode_frames(source)):
            if stop is not None and index >= stop:
                break
            if index >= start:
                kept.append(planes)
    name = _display_name(source)
    if not kept:
        raise InputError(f"{name} has no frames in [{start}, {stop}); check the frame range")
    if exact and count is not None and len(kept) < count:
        raise InputError(
            f"{name} ends after frame {start + len(kept)}, inside the asked range [{start}, {stop}); "
            "probe it again: it is shorter than when it was probed"
        )
    return _stack(kept)


# -- the other streams: audio, subtitles, attachments, data (FORMAT.md §2.4) --------------------

NO_PTS = -(2**63)  # FFmpeg's AV_NOPTS_VALUE: a packet without a timestamp
PACKET_KEYFRAME, PACKET_DISCARD = 1, 2  # flags of a packet's index row
INDEX_COLUMNS = ("pts", "dts", "duration", "size", "flags")
AUDIO_MODES = ("copy", "flac")
# Containers tried, in order, for a stream's codec parameters (FORMAT.md §2.4: `parameters`).
# The source's own family goes first (what its container could express survives: Matroska's codec
# delay, mp4's channel layouts); NUT keeps time bases and layouts for the rest.
_PARAMETER_FORMATS = ("nut", "matroska", "mp4")


@dataclass
class KeptStream:
    """One stream besides the archived video, as the archive keeps it.

    Parameters
    ----------
    info : dict
        Its JSON description (FORMAT.md §2.4): ``source_index``, ``type``, ``codec``,
        ``metadata``, ``disposition``, ``parameters``, ... (checksums are added when stored).
    index : numpy.ndarray
        int64 ``(packets, 5)``: pts, dts, duration, size, flags per packet (``(0, 5)`` for an
        attachment); a missing timestamp is :data:`NO_PTS`.
    pieces : callable
        Returns an iterator over its bytes (packets back to back; an attachment: the file),
        front to back, in pieces of any size: streams are never held whole in memory.
    """

    info: dict
    index: np.ndarray
    pieces: Callable[[], Iterator[bytes]]

    @property
    def data(self) -> bytes:
        """All its bytes at once (attachments, tests)."""
        return b"".join(self.pieces())

    def packets(self) -> Iterator[tuple[bytes, np.ndarray]]:
        """(bytes, index row) of every packet, in stored order."""
        rows = iter(self.index)
        row = next(rows, None)
        pending = b""
        for piece in self.pieces():
            data, at = (pending + piece if pending else piece), 0
            while row is not None and len(data) - at >= row[3]:
                yield data[at : at + int(row[3])], row
                at += int(row[3])
                row = next(rows, None)
            pending = data[at:]


@dataclass
class SideStreams:
    """Everything of a source file except its archived video stream (see :func:`read_side_streams`)."""

    container: dict  # format name, container metadata (tags)
    chapters: list  # {id, start, end, time_base "num/den", metadata}
    streams: list  # KeptStream, in source order
    dropped: list  # {source_index, type, codec, reason} of streams not kept (--drop-stream)
    # One pass over every stream's bytes: (position in `streams`, piece); default: stream after stream
    read: Callable[[], Iterator[tuple[int, bytes]]] | None = None

    def to_attributes(self) -> dict:
        """The archive's root attributes describing these (FORMAT.md §2.4), stream data aside."""
        return {
            "container": self.container,
            "chapters": self.chapters,
            "streams": [s.info for s in self.streams],
            "dropped_streams": self.dropped,
        }

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        """(position in :attr:`streams`, bytes) of every stream's data, each stream's in order."""
        if self.read is not None:
            return self.read()
        return ((number, piece) for number, kept in enumerate(self.streams) for piece in kept.pieces())


def _ratio(value) -> str:
    value = Fraction(value or 0)
    return f"{value.numerator}/{value.denominator}"


def _stream_parameters(stream, packet, source_format: str) -> tuple[str, bytes] | tuple[None, None]:
    """The stream's codec parameters as a tiny container holding it and its first packet, which
    FFmpeg reads back to remux the stream; (None, None) when no container takes the codec."""
    family = next((name for name in _PARAMETER_FORMATS if name in source_format.split(",")), None)
    for name in sorted(_PARAMETER_FORMATS, key=lambda n: n != family):
        buffer = BytesIO()
        try:
            # bitexact: no random segment UID or muxer version, so the same stream always gives the same bytes
            with av.open(buffer, "w", format=name, container_options={"fflags": "+bitexact"}) as out:
                copy = out.add_stream_from_template(stream)
                if packet is not None:
                    out.mux(stored_packet(packet[0], packet[1], copy, stream.time_base))
                else:
                    out.start_encoding()
            blob = buffer.getvalue()
            with av.open(BytesIO(blob), format=name) as check:
                if check.streams and check.streams[0].type == stream.type:
                    return name, blob
        except (av.FFmpegError, ValueError, OSError):
            continue
    return None, None


def stored_packet(data: bytes, row, stream, time_base) -> av.Packet:
    """An ``av.Packet`` for ``stream`` from stored bytes and an index row."""
    packet = av.Packet(data)
    pts, dts, duration, _, flags = (int(v) for v in row)
    packet.pts = None if pts == NO_PTS else pts
    packet.dts = None if dts == NO_PTS else dts
    packet.duration = duration
    packet.is_keyframe = bool(flags & PACKET_KEYFRAME)  # PACKET_DISCARD is recorded; PyAV cannot set it
    packet.time_base = time_base
    packet.stream = stream
    return packet


def _describe(stream) -> dict:
    context = stream.codec_context
    info = {
        "source_index": stream.index,
        "type": stream.type,
        "codec": "attachment" if stream.type == "attachment" else context.name if context is not None else "unknown",
        "time_base": _ratio(stream.time_base),
        "start_time": stream.start_time,
        "duration": stream.duration,
        "metadata": dict(stream.metadata),
        "disposition": [name for name, flag in av.stream.Disposition.__members__.items() if stream.disposition & flag],
    }
    if stream.type == "audio":
        info.update(sample_rate=context.sample_rate, channels=context.channels, layout=context.layout.name)
    elif stream.type == "attachment":
        info.update(filename=stream.name, mimetype=stream.mimetype)
    elif context is not None and stream.type in ("video", "subtitle"):
        info.update(width=getattr(context, "width", 0) or 0, height=getattr(context, "height", 0) or 0)
    return info


def read_side_streams(
    source: str | Location, audio: str = "copy", drop_streams: Iterable[int] = ()
) -> SideStreams:
    """Every stream of a source except its archived video, with chapters and container tags.

    Packets are copied as the demuxer gives them (bit-exact); ``audio="flac"`` re-encodes audio
    to FLAC losslessly (from the decoded samples) instead. The first video stream is the one
    palstream codes; any other (a second angle, cover art) is kept as packets too.

    Parameters
    ----------
    source : str or Location
        Local path or fsspec URL of the source, or a location with its storage options.
    audio : {"copy", "flac"}, default "copy"
        How audio is kept.
    drop_streams : iterable of int
        Source stream indices not to keep (recorded as dropped on request).

    Raises
    ------
    InputError
        ``drop_streams`` names the video or a stream that does not exist; ``audio="flac"`` for
        audio whose samples FLAC cannot hold exactly (floating point); the source breaks.
    """
    if audio not in AUDIO_MODES:
        raise InputError(f"--audio {audio} is not one of {', '.join(AUDIO_MODES)}; choose copy or flac")
    source = Location.of(source)
    name = _display_name(source)
    drop = set(drop_streams)
    with _open_input(source) as (container, video, _):
        absent = sorted(drop - {s.index for s in container.streams} | (drop & {video.index}))
        if absent:
            raise InputError(
                f"--drop-stream {absent[0]}: {name} has no such stream besides the archived video "
                f"(stream {video.index}); see its streams with ffprobe or palstream info"
            )
        kept = [s for s in container.streams if s.index != video.index and s.index not in drop]
        dropped = [
            {"source_index": s.index, "type": s.type, "codec": _describe(s)["codec"], "reason": "dropped by --drop-stream"}
            for s in container.streams
            if s.index in drop
        ]
        flac = {s.index for s in kept if audio == "flac" and s.type == "audio" and _describe(s)["codec"] != "flac"}
        rows = {s.index: array.array("q") for s in kept if s.type != "attachment"}
        first: dict[int, tuple] = {}  # each stream's first packet: its codec parameters are written with it
        held: dict[int, list] = {index: [] for index in flac}  # audio to re-encode: its packets, for the decoder
        for packet, row in _side_packets(container, video, rows, name):
            rows[packet.stream.index].extend(row)
            if packet.stream.index not in first:
                first[packet.stream.index] = (bytes(packet), row)
            if packet.stream.index in held:
                held[packet.stream.index].append((bytes(packet), row))
        streams = []
        copied: dict[int, int] = {}  # source index -> position in `streams`, for the second pass
        for stream in kept:
            info = _describe(stream)
            if stream.type == "attachment":
                data = bytes(stream.data)
                streams.append(KeptStream(info, np.zeros((0, 5), np.int64), functools.partial(iter, [data])))
                continue
            index = np.frombuffer(rows[stream.index], np.int64).reshape(-1, 5).copy()
            packet = first.get(stream.index)
            if stream.index in flac:
                stream, found, info = _to_flac(stream, held.pop(stream.index), info, name)
                index = np.array([row for _, row in found], np.int64).reshape(-1, 5)
                data = b"".join(d for d, _ in found)
                pieces, packet = (lambda data=data: iter([data])), (found[0] if found else None)
            else:
                copied[stream.index] = len(streams)
                pieces = functools.partial(_stream_pieces, source, stream.index, name)
            info["parameters_format"], blob = _stream_parameters(stream, packet, container.format.name)
            info["parameters"] = None if blob is None else base64.b64encode(blob).decode("ascii")
            streams.append(KeptStream(info, index, pieces))
        chapters = [
            {
                "id": chapter["id"],
                "start": chapter["start"],
                "end": chapter["end"],
                "time_base": _ratio(chapter["time_base"]),
                "metadata": dict(chapter["metadata"]),
            }
            for chapter in container.chapters()
        ]
        described = {"format": container.format.name, "metadata": dict(container.metadata)}

    def read() -> Iterator[tuple[int, bytes]]:  # one second pass for every copied stream, then the rest
        for source_index, data in _demux_again(source, set(copied), name):
            yield copied[source_index], data
        for number, kept_stream in enumerate(streams):
            if number not in copied.values():
                yield from ((number, piece) for piece in kept_stream.pieces())

    return SideStreams(described, chapters, streams, dropped, read)


def _side_packets(container, video, wanted, name: str):
    """(packet, index row) of the packets of the streams in ``wanted``, in file order."""
    video.discard = av.stream.Discard.all
    try:
        for packet in container.demux():
            if packet.size == 0 or packet.stream.index not in wanted:
                continue
            flags = (PACKET_KEYFRAME if packet.is_keyframe else 0) | (PACKET_DISCARD if packet.is_discard else 0)
            pts, dts = (NO_PTS if t is None else t for t in (packet.pts, packet.dts))
            yield packet, [pts, dts, packet.duration or 0, packet.size, flags]
    except av.FFmpegError as exc:
        raise InputError(f"{name} is corrupt: its streams cannot be read ({_first_line(exc)}); re-copy or re-export it") from None


def _demux_again(source: Location, wanted: set, name: str) -> Iterator[tuple[int, bytes]]:
    """(source index, packet bytes) of the streams in ``wanted``: the pass that stores them."""
    if not wanted:
        return
    with _open_input(source) as (container, video, _):
        for packet, _row in _side_packets(container, video, wanted, name):
            yield packet.stream.index, bytes(packet)


def _stream_pieces(source: Location, source_index: int, name: str) -> Iterator[bytes]:
    return (data for _, data in _demux_again(source, {source_index}, name))


def _to_flac(stream, found: list, info: dict, name: str):
    """Audio re-encoded to FLAC from its decoded samples: (template stream, packets, description).

    The FLAC stream is muxed into an in-memory NUT file (which keeps the sample time base) and
    read back, so it is kept exactly as a copied FLAC source would be.
    """
    decoder = stream.codec_context

    def decoded():
        for data, row in found:
            yield from decoder.decode(stored_packet(data, row, stream, stream.time_base))
        yield from decoder.decode(None)

    frames = decoded()
    head = next(frames, None)
    if head is None:
        return stream, found, info
    sample_format = head.format.name.rstrip("p")
    if sample_format not in ("s16", "s32", "u8"):
        raise InputError(
            f"--audio flac: stream {info['source_index']} of {name} ({info['codec']}) decodes to {head.format.name} "
            "samples, which FLAC cannot hold exactly; keep it as it is with --audio copy"
        )
    buffer = BytesIO()
    with av.open(buffer, "w", format="nut") as out:
        target = out.add_stream("flac", rate=head.sample_rate)
        target.layout = head.layout
        target.format = "s32" if sample_format == "s32" else "s16"
        resampler = av.AudioResampler(format=target.format, layout=head.layout, rate=head.sample_rate)
        time_base = Fraction(1, head.sample_rate)
        samples = round((head.pts or 0) * (head.time_base or stream.time_base) / time_base)  # the source's start
        for frame in itertools.chain([head], frames):
            for converted in resampler.resample(frame):
                converted.pts, converted.time_base = samples, time_base  # counted in samples: no rounding
                samples += converted.samples
                out.mux(target.encode(converted))
        out.mux(target.encode(None))
    nut = av.open(BytesIO(buffer.getvalue()), mode="r", format="nut")
    flac = nut.streams[0]
    packets = []
    for packet in nut.demux(flac):
        if packet.size:
            flags = PACKET_KEYFRAME if packet.is_keyframe else 0
            packets.append((bytes(packet), [packet.pts, packet.dts, packet.duration or 0, packet.size, flags]))
    described = {**_describe(flac), **{k: info[k] for k in ("source_index", "metadata", "disposition")}}
    described.update(transcoded_from=info["codec"], start_time=flac.start_time)
    return flac, packets, described
