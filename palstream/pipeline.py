"""Whole files in and out of archives: ``encode_file`` (source -> archive) and ``decode_file``.

The container itself (layout, commits, verification) is :mod:`palstream.archive`; this module
runs the codec over it.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import fsspec

from palstream.archive import Archive, ArchiveWriter, check_destination, open_archive
from palstream.codec import EncoderConfig, encode_chunk
from palstream.errors import ArchiveError, DamagedChunkError
from palstream.io import fsspec_options, iter_chunks, probe
from palstream.writers import write_video


def encode_file(
    input: str,
    archive: str,
    config: EncoderConfig,
    storage_options: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    allow_truncated: bool = False,
) -> Archive:
    """Encode a whole video into a new archive, GOP chunk by GOP chunk (streaming).

    Parameters
    ----------
    input : str
        Source video: local path or fsspec URL.
    archive : str
        Archive location: local path or fsspec URL (``file://``, ``memory://``, ``s3://``).
    config : EncoderConfig
        Encoder settings; ``config.gop`` frames per chunk.
    storage_options : dict, optional
        fsspec options for both input and archive.
    overwrite : bool, default False
        Replace an existing palstream archive.
    progress : callable, optional
        ``progress(frames_done, frame_count)`` after each chunk.
    threads : int, optional
        Chunks encoded at once; default: one per CPU core. The archive bytes do not depend on it.
    allow_truncated : bool, default False
        Keep a truncated or damaged source's frames before the break instead of refusing it;
        the archive's source record says so (``SourceInfo.truncated``).

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
    """
    from palstream.palettes import create_palette_generator

    check_destination(archive, storage_options, overwrite)
    generator = create_palette_generator(config.palette)
    source = probe(input, storage_options, allow_truncated=allow_truncated)
    writer = ArchiveWriter.create(
        archive, source, config, generator, storage_options=storage_options, overwrite=overwrite
    )
    try:
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

            for index, frames in enumerate(iter_chunks(input, config.gop, storage_options, source.frame_count)):
                pending.append((index, len(frames), pool.submit(encode_chunk, frames, config, generator)))
                if len(pending) >= workers:
                    write_oldest()
            while pending:
                write_oldest()
        writer.finalize()
    except BaseException:
        _remove_incomplete(archive, storage_options)
        raise
    return open_archive(archive, storage_options)


def _remove_incomplete(url: str, storage_options: dict | None) -> None:
    """Delete the archive this call created and could not finish (best effort)."""
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **fsspec_options(url, storage_options))
        fs.rm(path, recursive=True)
    except OSError:
        pass  # the archive stays with status "incomplete", which readers report


@dataclass
class DecodeResult:
    """What :func:`decode_file` wrote."""

    frames_written: int
    damaged: list[DamagedChunkError] = field(default_factory=list)


def parse_frame_range(text: str | None, frame_count: int) -> tuple[int, int]:
    """``"A:B"`` (either side optional, Python slice semantics without step) -> (start, stop)."""
    if not text:
        return 0, frame_count
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0] else 0
        stop = int(parts[1]) if parts[1] else frame_count
    except ValueError:
        raise ArchiveError(f"frame range {text!r} is not A:B; e.g. 0:32 or 10:") from None
    start, stop, _ = slice(start, stop).indices(frame_count)
    if start >= stop:
        raise ArchiveError(f"frame range {text!r} selects no frames of 0:{frame_count}")
    return start, stop


def decode_file(
    archive: str,
    output: str,
    frames: str | slice | None = None,
    storage_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DecodeResult:
    """Decode an archive (or a frame range of it) to a video file.

    Damaged chunks are skipped and reported in the result; the other chunks are written.

    Parameters
    ----------
    archive : str
        Archive location.
    output : str
        Output path; format by extension (see :func:`palstream.writers.write_video`).
    frames : str or slice, optional
        ``"A:B"`` or ``slice(A, B)``; default all frames.
    storage_options : dict, optional
        fsspec options for the archive.
    progress : callable, optional
        ``progress(frames_done, frames_total)``.
    """
    reader = open_archive(archive, storage_options)
    if isinstance(frames, slice):
        start, stop, _ = frames.indices(reader.frame_count)
    else:
        start, stop = parse_frame_range(frames, reader.frame_count)
    result = DecodeResult(0)

    def chunks():
        done = 0
        for decoded in reader.decode(start, stop, on_damaged=result.damaged.append):
            done += len(decoded)
            if progress is not None:
                progress(done, stop - start)
            yield decoded

    result.frames_written = write_video(chunks(), output, reader.source)
    return result
