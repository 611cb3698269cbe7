"""Whole files in and out of archives: ``encode_file`` (source -> archive) and ``decode_file``.

The container itself (layout, commits, verification) is :mod:`palstream.archive`; this module
runs the codec over it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

import numpy as np

from palstream.archive import (
    Archive,
    ArchiveWriter,
    DamagedStreamError,
    check_destination,
    open_archive,
)
from palstream.codec import EncoderConfig, encode_chunk
from palstream.codec.precompile import announce_if_cold
from palstream.errors import DamagedChunkError, PalstreamError
from palstream.frames import Frames
from palstream.io import iter_chunks, probe, read_side_streams
from palstream.storage import Location
from palstream.writers import STDOUT, output_format, write_video


def encode_file(
    input: str | Location,
    archive: str | Location,
    config: EncoderConfig,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    allow_truncated: bool = False,
    audio: str = "copy",
    drop_streams: tuple[int, ...] = (),
) -> Archive:
    """Encode a whole video into a new archive, GOP chunk by GOP chunk (streaming).

    Parameters
    ----------
    input : str or Location
        Source video: local path or fsspec URL, or a location with its storage options.
    archive : str or Location
        Archive location: local path or fsspec URL (``file://``, ``memory://``, ``s3://``), or a
        location with its storage options.
    config : EncoderConfig
        Encoder settings; ``config.gop`` frames per chunk.
    overwrite : bool, default False
        Replace an existing palstream archive: the new one is built beside it and swapped in
        when complete (:meth:`ArchiveWriter.create`).
    progress : callable, optional
        ``progress(frames_done, frame_count)`` after each chunk.
    threads : int, optional
        Chunks encoded at once; default: one per CPU core. The archive bytes do not depend on it.
    allow_truncated : bool, default False
        Keep a truncated or damaged source's frames before the break instead of refusing it;
        the archive's source record says so (``SourceInfo.truncated``).
    audio : {"copy", "flac"}, default "copy"
        Audio packets kept bit-exact as they are, or re-encoded losslessly to FLAC.
    drop_streams : tuple of int
        Source stream indices not to keep (recorded in the archive as dropped on request);
        every other stream, chapter, attachment and tag is kept (:func:`palstream.io.read_side_streams`).

    Returns
    -------
    Archive
        The finished archive, opened for reading.

    Raises
    ------
    ArchiveError
        Output exists (without ``overwrite``) or cannot be written: checked before any work.
    InputError
        The source cannot be read; checked before the archive is created.

    Notes
    -----
    After any failure (interrupts included) nothing this call created remains: no stub
    archive, no replacement beside the old one, no parent folder it made; an archive it was
    replacing stays as it was.
    """
    announce_if_cold()  # a cold cache means minutes of compiling: say so before seconds of set-up (torch)
    from palstream.palettes import create_palette_generator

    input, archive = Location.of(input), Location.of(archive)
    new_folder = _first_missing_folder(archive)
    existed = _exists(archive)
    writer = None
    try:
        check_destination(archive, overwrite)
        generator = create_palette_generator(config.palette)
        source = probe(input, allow_truncated=allow_truncated)
        side = read_side_streams(input, audio, drop_streams)  # refused here, before the video's work
        writer = ArchiveWriter.create(archive, source, config, generator, overwrite=overwrite)
        done = 0
        # Chunks are independent and the codec kernels release the GIL: encode up to `threads`
        # of them at once, and write them in order (at most `threads` chunks held in memory).
        workers = threads or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()

            def write_oldest():
                nonlocal done
                index, count, future = pending.popleft()
                writer.write_chunk(index, future.result())
                done += count
                if progress is not None:
                    progress(done, source.frame_count)

            for index, frames in enumerate(iter_chunks(input, config.gop, frame_count=source.frame_count)):
                pending.append((index, len(frames), pool.submit(encode_chunk, frames, config, generator)))
                if len(pending) >= workers:
                    write_oldest()
            while pending:
                write_oldest()
        writer.write_streams(side)
        writer.finalize()
    except BaseException:
        if writer is not None:
            writer.abort()  # its new archive (or replacement) goes; an archive it replaces stays
        elif not existed:
            _remove_incomplete(archive)
        if new_folder is not None:
            shutil.rmtree(new_folder, ignore_errors=True)
        raise
    return open_archive(archive)


def _exists(location: Location) -> bool:
    try:
        fs, path = location.filesystem()
        return fs.exists(path)
    except (OSError, ValueError, PalstreamError):
        return False  # check_destination reports why


def _first_missing_folder(location: Location) -> Path | None:
    """The outermost parent folder of a local archive that does not exist yet (creating the
    archive creates it; a failed encode removes it again), or None."""
    _, path = _location(location)
    if not isinstance(path, Path):  # a URL
        return None
    missing = None
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing


def _remove_incomplete(location: Location) -> None:
    """Delete the archive this call created and could not finish (best effort)."""
    try:
        fs, path = location.filesystem()
        fs.rm(path, recursive=True)
    except (OSError, PalstreamError):
        pass  # the archive stays with status "incomplete", which readers report


FILL = 128  # Y = Cb = Cr = 128: the mid-grey that stands in for each frame of a damaged chunk


@dataclass
class DecodeResult:
    """What :func:`decode_file` wrote.

    ``frames_written`` counts every frame in the output, decoded or fill; ``filled`` holds, for
    each chunk in ``damaged``, the frame numbers (in the archive) written as mid-grey fill.
    """

    frames_written: int
    damaged: list[DamagedChunkError] = field(default_factory=list)
    filled: list[range] = field(default_factory=list)


def parse_frame_range(text: str | None, frame_count: int) -> tuple[int, int]:
    """``"A:B"`` (either side optional; B exclusive) -> (start, stop), with ``0 <= A < B <= frame_count``.

    Raises
    ------
    PalstreamError
        Not ``A:B``, or a range that selects nothing or reaches outside the archive (never clamped).
    """
    if not text:
        return 0, frame_count
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else frame_count
    except ValueError:
        raise PalstreamError(f"frame range {text!r} is not A:B; e.g. 0:32 or 10:") from None
    return _checked_range(start, stop, frame_count, text)


def _checked_range(start: int, stop: int, frame_count: int, text: str) -> tuple[int, int]:
    if not 0 <= start < stop <= frame_count:
        raise PalstreamError(
            f"frame range {text} is outside the archive's frames 0:{frame_count} or empty; "
            f"give A:B with 0 <= A < B <= {frame_count}"
        )
    return start, stop


def _location(value: str | Location) -> tuple[str, PurePath]:
    """(protocol, path) of a local path or URL; local paths resolved through links."""
    location = Location.of(value)
    local_path = location.local_path
    if local_path is not None:
        return "file", Path(os.path.realpath(local_path))
    return location.protocol, PurePosixPath("/" + location.url.split("://", 1)[1].strip("/"))


def _refuse_output_inside(output: str, archive: Location) -> None:
    """An output inside the archive (or the archive itself) would change what it decodes from."""
    if output == STDOUT:
        return
    (out_protocol, out), (protocol, root) = _location(output), _location(archive)
    if out_protocol == protocol and (out == root or root in out.parents):
        raise PalstreamError(f"output {output} is inside the archive {archive}; write it somewhere else")


def decode_file(
    archive: str | Location,
    output: str,
    frames: str | slice | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    format: str | None = None,
    force: bool = False,
    video_only: bool = False,
    drop_streams: tuple[int, ...] = (),
) -> DecodeResult:
    """Decode an archive (or a frame range of it) to a video file.

    Every frame of the range is written, so timing holds: the frames of a damaged chunk are
    written as mid-grey fill (Y = Cb = Cr = 128) and named in the result. The output appears
    only when it is complete (see :func:`palstream.writers.write_video`).

    Parameters
    ----------
    archive : str or Location
        Archive location: local path or fsspec URL, or a location with its storage options.
    output : str
        Output path; format by extension (see :func:`palstream.writers.write_video`); ``-`` for stdout.
    frames : str or slice, optional
        ``"A:B"`` or ``slice(A, B)`` with ``0 <= A < B <= frame_count``; default all frames.
    progress : callable, optional
        ``progress(frames_done, frames_total)``.
    overwrite : bool, default False
        Replace an existing output.
    format : str, optional
        ``"y4m"`` (default) or ``"yuv"`` when ``output`` is ``-``.
    force : bool, default False
        Decode even if the archive's root metadata fails its checksum (a warning says what changed).
    video_only : bool, default False
        Write the video alone. Otherwise a container output (``.mkv``, ``.mp4``, ...) of the whole
        archive gets every kept stream, attachment, chapter and tag, packets as stored; outputs
        that hold video only (y4m, raw, PNG) and frame ranges warn that the rest is left out.
    drop_streams : tuple of int
        Kept streams (source indices) to leave out of the output.

    Raises
    ------
    PalstreamError
        A frame range outside the archive; an output that exists (without ``overwrite``), is
        inside the archive, is not a regular file, or cannot be written; a kept stream the
        output container cannot hold (named, with ``--drop-stream``). Checked before decoding.
    ArchiveError
        The archive cannot be opened; a kept stream is damaged (named, with ``--drop-stream``).
    """
    output = str(output)
    announce_if_cold()
    archive = Location.of(archive)
    reader = open_archive(archive, force=force)
    if isinstance(frames, slice):
        if frames.step not in (None, 1):
            raise PalstreamError(f"frame range {frames} has a step; give a contiguous range")
        first = 0 if frames.start is None else frames.start
        last = reader.frame_count if frames.stop is None else frames.stop
        start, stop = _checked_range(first, last, reader.frame_count, f"{first}:{last}")
    else:
        start, stop = parse_frame_range(frames, reader.frame_count)
    _refuse_output_inside(output, archive)
    result = DecodeResult(0)
    source = reader.source
    gop = reader.attrs["gop"]

    def chunks():
        for index in range(start // gop, (stop - 1) // gop + 1):
            held = reader.chunk_frames(index)
            wanted = range(max(start, held.start), min(stop, held.stop))
            try:
                runs = [reader.decode_chunk(index)[wanted.start - held.start : wanted.stop - held.start]]
            except DamagedChunkError as exc:
                result.damaged.append(exc)
                result.filled.append(wanted)
                runs = [_fill(source.height, source.width)] * len(wanted)  # one frame in memory, however many
            for run in runs:
                result.frames_written += len(run)
                if progress is not None:
                    progress(result.frames_written, stop - start)
                yield run

    try:
        with warnings.catch_warnings(record=True) as notes:  # said once the output is written, not before its checks
            warnings.simplefilter("always")
            side = None if video_only else _side_streams(reader, output, format, drop_streams, (start, stop))
        write_video(chunks(), output, source, overwrite=overwrite, format=format, side=side, first_frame=start)
    except DamagedStreamError as exc:  # found before decoding (its index) or at its end (its bytes): no output
        raise DamagedStreamError(exc.source_index, f"{exc.reason}; decode without it with --drop-stream {exc.source_index}") from None
    for note in notes:
        warnings.warn(note.message, stacklevel=2)
    return result


def _side_streams(reader: Archive, output: str, format: str | None, drop_streams, span: tuple[int, int]):
    """What goes beside the video into ``output``: the archive's other streams for a container
    output of every frame; None (with a warning naming what is left out) otherwise."""
    kept = [s for s in reader.streams if s["source_index"] not in set(drop_streams)]
    container = output_format(output, format) == "container"
    if not container and not reader.source.constant_rate:
        warnings.warn(f"{output} has a constant frame rate: the source's variable timing is kept in .mkv or .mp4", stacklevel=3)
    if container and span == (0, reader.frame_count):
        return reader.side_streams(drop_streams)
    if kept or reader.attrs.get("chapters"):
        why = f"{output} holds" if not container else "a frame range is written as"
        warnings.warn(
            f"{why} video only: the archive's {len(kept)} other stream(s) and {len(reader.attrs.get('chapters', []))} "
            "chapter(s) are left out; decode all frames to .mkv to keep them (--video-only silences this)",
            stacklevel=3,
        )
    return None


def _fill(height: int, width: int) -> Frames:
    """One mid-grey frame (``FILL``)."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    return Frames(*(np.full(shape, FILL, np.uint8) for shape in ((1, height, width), (1, ch, cw), (1, ch, cw))))
