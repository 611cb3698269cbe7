"""Decoded frames for the browser: PNG thumbnails, fragmented MP4 for playback, FFV1/MKV downloads.

Everything is decoded from the archive on the server (the decoder is integer-exact; the browser
only sees standard formats) and nothing is written under the output root.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable

import av
import numpy as np

from palstream.archive import Archive
from palstream.frames import Frames
from palstream.io import SourceInfo
from palstream.writers import rgb_frame, write_video

THUMB_WIDTH = 320  # thumbnails are scaled down to this width at most
MAX_PLAY_FRAMES = 900  # one playback or download request decodes at most this many frames...
MAX_PLAY_SAMPLES = 600 * 1920 * 1080  # ...and at most this many luma samples (frames x width x height)
PLAY_CRF = "20"

class RangeTooLargeError(ValueError):
    """A playback or download range over the server's limits."""


def max_frames(width: int, height: int) -> int:
    """Most frames of ``width`` x ``height`` one playback or download request decodes."""
    return min(MAX_PLAY_FRAMES, max(1, MAX_PLAY_SAMPLES // (width * height)))


def check_range(source: SourceInfo, start: int, stop: int) -> None:
    """Refuse a range the server will not decode in one request.

    Raises
    ------
    RangeTooLargeError
        More than :data:`MAX_PLAY_FRAMES` frames or :data:`MAX_PLAY_SAMPLES` luma samples.
    """
    frames = stop - start
    limit = max_frames(source.width, source.height)
    if frames > limit:
        raise RangeTooLargeError(
            f"range {start}:{stop} is {frames} frames; one request plays or downloads at most {limit} frames "
            f"of {source.width}x{source.height}: ask for a shorter range"
        )


def _yuv_frame(frames: Frames, t: int, fmt: str, width: int, height: int) -> av.VideoFrame:
    """Frame ``t`` as a PyAV frame of ``width`` x ``height`` (larger sizes pad by repeating edges)."""
    frame = av.VideoFrame(width, height, fmt)
    for plane, data in zip(frame.planes, (frames.y[t], frames.u[t], frames.v[t]), strict=True):
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)  # type: ignore[call-overload]  # PyAV planes are buffers; numpy's stubs say so only from Python 3.12
        pad = ((0, plane.height - data.shape[0]), (0, plane.width - data.shape[1]))
        rows[:, : plane.width] = np.pad(data, pad, mode="edge") if any(p for _, p in pad) else data
    return frame


def thumbnail_png(frames: Frames, t: int, source: SourceInfo, width: int = THUMB_WIDTH) -> bytes:
    """Frame ``t`` of ``frames`` as an RGB PNG, scaled down to ``width`` pixels wide at most."""
    out_w = min(width, source.width)
    out_h = max(1, round(source.height * out_w / source.width))
    rgb = rgb_frame(frames, t, source, out_w, out_h)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = out_w, out_h, "rgb24"
    return b"".join(bytes(p) for p in codec.encode(rgb))


def playable_mp4(runs: Iterable[Frames], source: SourceInfo) -> bytes:
    """Frames as H.264 in fragmented MP4 (``frag_keyframe+empty_moov``), which browsers play as it arrives."""
    buffer = io.BytesIO()
    # H.264 in 4:2:0 needs even sizes: pad by repeating the last row/column.
    width, height = source.width + source.width % 2, source.height + source.height % 2
    with av.open(
        buffer, mode="w", format="mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}
    ) as container:
        stream = container.add_stream("libx264", rate=source.fps_fraction)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": PLAY_CRF, "preset": "veryfast", "tune": "zerolatency"}
        written = 0
        for frames in runs:
            for t in range(len(frames)):
                frame = _yuv_frame(frames, t, "yuv420p", width, height)
                frame.pts = written
                container.mux(stream.encode(frame))
                written += 1
        container.mux(stream.encode(None))
    return buffer.getvalue()


def ffv1_mkv(runs: Iterable[Frames], source: SourceInfo) -> bytes:
    """Frames as lossless FFV1 in Matroska (through :func:`palstream.writers.write_video`), in a temp folder."""
    with tempfile.TemporaryDirectory(prefix="palstream-serve-") as tmp:
        path = os.path.join(tmp, "range.mkv")
        write_video(runs, path, source)
        with open(path, "rb") as f:
            return f.read()


class DecodedCache:
    """Decoded chunks and encoded thumbnails kept in memory, least recently used dropped first.

    Keys include the archive's root digest, so a replaced archive is never served from the cache.
    """

    def __init__(self, chunks: int = 8, thumbnails: int = 2048):
        self._chunks: OrderedDict = OrderedDict()
        self._thumbs: OrderedDict = OrderedDict()
        self._limits = {id(self._chunks): chunks, id(self._thumbs): thumbnails}
        self._lock = threading.Lock()

    def _get(self, table: OrderedDict, key):
        with self._lock:
            if key in table:
                table.move_to_end(key)
                return table[key]
        return None

    def _put(self, table: OrderedDict, key, value) -> None:
        with self._lock:
            table[key] = value
            while len(table) > self._limits[id(table)]:
                table.popitem(last=False)

    def chunk(self, archive: Archive, key: tuple, index: int) -> Frames:
        """Chunk ``index`` of ``archive`` decoded (raises :class:`palstream.errors.DamagedChunkError`)."""
        frames = self._get(self._chunks, (*key, index))
        if frames is None:
            frames = archive.decode_chunk(index)
            self._put(self._chunks, (*key, index), frames)
        return frames

    def thumbnail(self, archive: Archive, key: tuple, frame: int) -> bytes:
        """PNG thumbnail of frame ``frame`` of ``archive``."""
        png = self._get(self._thumbs, (*key, frame))
        if png is None:
            index = frame // archive.attrs["gop"]
            decoded = self.chunk(archive, key, index)
            png = thumbnail_png(decoded, frame - archive.chunk_frames(index).start, archive.source)
            self._put(self._thumbs, (*key, frame), png)
        return png
