"""What runs inside each Dask worker: the per-worker plugin and the unit task.

The driver sends only small dicts; each task reads its units' frames from the source, encodes
them with the worker's palette generator, writes them into the archive (format 4: the task's
shard whole, then its commit marker; format 3: each chunk and its marker), records the task's
units in the job's commit index and returns a summary of a few numbers per unit. No frames
travel through the scheduler.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from distributed import WorkerPlugin, get_worker

from palstream.batch.plan import Unit
from palstream.codec import BitstreamError, EncoderConfig
from palstream.errors import ArchiveError, DamagedChunkError, InputError, PalstreamError
from palstream.storage import Location

PLUGIN_NAME = "palstream"


@dataclass(frozen=True, slots=True)
class UnitTask(Unit):
    """What a worker needs to encode one unit: the plan's :class:`Unit` and the plan's record of
    its input.

    Attributes
    ----------
    source_location : Location
        The input, with its storage options.
    source_frames, source_bytes : int
        The input's planned frame count and size (a source that changed is refused).
    source_truncated : bool
        The plan kept a truncated input: read only up to ``source_frames``.
    archive : Location
        The input's archive.
    """

    source_location: Location
    source_frames: int
    source_bytes: int
    source_truncated: bool
    archive: Location


@dataclass(frozen=True, slots=True)
class Task:
    """One ``encode_chunk-*`` task: consecutive units of one input, encoded with ``config``.

    Attributes
    ----------
    units : tuple of UnitTask
        Consecutive units of one input.
    config : EncoderConfig
        The job's settings, or the tuner's choice for the units' batch.
    record : Location
        Where the task writes its commit-index record (:mod:`palstream.batch.commits`).
    """

    units: tuple[UnitTask, ...]
    config: EncoderConfig
    record: Location
@dataclass(frozen=True, slots=True)
class FinalizeTask:
    """One ``finalize_archive-*`` task: check an input's archive, keep its other streams, complete it.

    Attributes
    ----------
    archive : Location
        The archive.
    source : Location
        The input, with its storage options.
    source_bytes : int
        The input's size as planned.
    source_sha256 : str
        Its SHA-256 as planned: an archive whose source changed since the plan is never completed.
    audio : str
        How the archive keeps the input's audio (``"copy"`` or ``"flac"``).
    drop_streams : tuple of int
        Input stream indices the archive leaves out.
    fixity : Location
        Where the archive's fixity record goes (the one ``ArchiveWriter.finalize`` returns).
    """

    archive: Location
    source: Location
    source_bytes: int
    source_sha256: str
    audio: str
    drop_streams: tuple[int, ...]
    fixity: Location


# Keys of the tasks this module runs: their failures reach the driver, which writes one line to
# the terminal and the traceback to the job log, so the worker does not print them again.
TASK_KEY_PREFIXES = ("encode_chunk-", "probe_source-", "finalize_archive-", "archive_fixity-", "unit_features-")
# Transient storage failures (an object store restarting, a dropped connection) are retried in
# the task with backoff for this long before the task fails and Dask's own retries take over.
STORAGE_RETRY_SECONDS = 60.0


class PalstreamWorkerPlugin(WorkerPlugin):
    """Per-worker state: palette generators loaded once per worker process, on its GPU if any.

    Parameters
    ----------
    threads : int, default 1
        Threads the worker runs tasks on; torch and numba get as many intra-op threads, so
        workers x threads never exceeds the cores.
    palette : str or None, default None
        Generator to load at worker start (the job's); others load on first use.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, threads: int = 1, palette: str | None = None):
        self.threads = threads
        self.palette = palette
        self._generators: dict = {}
        self.device = "cpu"

    async def setup(self, worker) -> None:
        import torch

        _quiet_task_failures()

        import palstream.batch.metrics

        torch.set_num_threads(self.threads)
        try:
            import numba

            numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
        # dask-cuda sets CUDA_VISIBLE_DEVICES per worker, so "cuda" is this worker's own GPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Load the model and the codec's compiled kernels now, not in the first unit: encoding a
        # tiny noisy clip once makes numba load (or compile) the kernels the encoder uses.
        import palstream.archive  # noqa: F401

        if self.palette is not None:
            # Dask runs setup on the worker's event loop: warming up (a second from numba's cache,
            # minutes if the kernels must compile) runs in a thread, so heartbeats go on meanwhile.
            generator = await asyncio.get_running_loop().run_in_executor(None, self.generator, self.palette)
            await asyncio.get_running_loop().run_in_executor(None, _warm_up, generator, self.palette)

    def generator(self, name: str) -> TimedGenerator:
        """The palette generator ``name``, created on first use and kept for the worker's life."""
        if name not in self._generators:
            from palstream.palettes import create_palette_generator

            self._generators[name] = TimedGenerator(create_palette_generator(name, self.device))
        return self._generators[name]


class TimedGenerator:
    """A palette generator that also adds up, per thread, the time spent generating palettes
    and the blocks' features they are conditioned on.

    It is what the codec calls (``block_features``, ``generate``), so the worker can report the
    "palettes" stage without the codec knowing about metrics; everything else is the wrapped
    generator's.
    """

    def __init__(self, inner):
        self._inner = inner
        self._local = threading.local()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _timed(self, call, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._local.seconds = getattr(self._local, "seconds", 0.0) + time.perf_counter() - start

    def block_features(self, luma, cb, cr, boxes):
        return self._timed(self._inner.block_features, luma, cb, cr, boxes)

    def generate(self, samples, k, features=None):
        return self._timed(self._inner.generate, samples, k, features)

    def take_seconds(self) -> float:
        """Seconds spent in ``block_features`` and ``generate`` by this thread since the last call."""
        seconds, self._local.seconds = getattr(self._local, "seconds", 0.0), 0.0
        return seconds


def _warm_up(generator, palette: str) -> None:
    import numpy as np

    from palstream.codec import EncoderConfig, encode_chunk
    from palstream.frames import Frames

    rng = np.random.default_rng(0)
    y = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    y[1] = np.roll(y[0], 2, axis=1)  # the second frame moves: inter prediction paths too
    uv = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    encode_chunk(Frames(y, uv, uv.copy()), EncoderConfig(palette=palette, gop=2), generator)
    generator.take_seconds()


class _DropPalstreamTaskFailures(logging.Filter):
    """Drop distributed's "Compute Failed" records (with traceback) for palstream's own tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed"):
            return True
        return not any(isinstance(a, str) and a.startswith(TASK_KEY_PREFIXES) for a in record.args or ())


def _quiet_task_failures() -> None:
    log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _DropPalstreamTaskFailures) for f in log.filters):
        log.addFilter(_DropPalstreamTaskFailures())


def _plugin() -> PalstreamWorkerPlugin:
    try:
        plugin = get_worker().plugins[PLUGIN_NAME]
    except (ValueError, KeyError):  # not in a worker, or set up without the plugin (tests, scripts)
        return PalstreamWorkerPlugin()
    assert isinstance(plugin, PalstreamWorkerPlugin)  # registered under PLUGIN_NAME by this module only
    return plugin


def with_storage_retries(action, what: str, deadline: float = STORAGE_RETRY_SECONDS):
    """Run ``action()``, retrying storage errors with exponential backoff until ``deadline`` s.

    Errors the user must fix (``PalstreamError`` other than a storage ``ArchiveError``) and an
    ``IncompleteArchiveError`` (chunks not committed) are raised at once.
    """
    start, delay = time.monotonic(), 0.25
    while True:
        try:
            return action()
        except (DamagedChunkError, BitstreamError):
            raise
        except PalstreamError as exc:
            from palstream.archive import IncompleteArchiveError

            # Missing chunks stay missing however often finalize is retried: the caller reruns them.
            if not isinstance(exc, ArchiveError) or isinstance(exc, IncompleteArchiveError) or time.monotonic() - start > deadline:
                raise
        except Exception as exc:  # network/storage errors come in many types
            if time.monotonic() - start > deadline:
                raise ArchiveError(f"{what} failed for {deadline:.0f} s: {type(exc).__name__}: {exc}") from None
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def encode_units(task: Task) -> dict:
    """Encode a run of consecutive units of one input, commit each, then record them; the task
    every ``encode_chunk-*`` key runs.

    Many units per task keep the scheduler's load per unit small (a task costs the scheduler
    about a millisecond; a library has 10^6-10^8 units). The archive is opened and the source's
    size checked once per task, and the task writes one commit-index record for all its units
    (:mod:`palstream.batch.commits`) instead of an object per unit.

    Returns
    -------
    dict
        ``summaries``: :func:`encode_unit`'s summary per committed unit, in order; ``refused``:
        None, or the refusal of the unit that stopped the task (the units after it are not run).
    """
    summaries, refused, context = [], None, _TaskContext()
    for unit in task.units:
        result = encode_unit(unit, task.config, context)
        if result["outcome"] == "refused":
            refused = result
            break
        summaries.append(result)
    if context.pending:
        # Format 4: a shard is written whole or not at all; a refused unit leaves its shard unwritten.
        summaries = _write_shards(context, summaries) if refused is None else []
    if summaries:
        from palstream.batch.commits import write_record

        # Written after every chunk of the task is committed: the index never runs ahead of the markers.
        with_storage_retries(lambda: write_record(task.record, summaries), "writing the commit record")
    return {"summaries": summaries, "refused": refused}


class _TaskContext:
    """What the units of one task share: the archive writer, whether the source was checked, and
    (format 4) the encoded chunks waiting for their shard to be written."""

    def __init__(self):
        self.writer = None
        self.source_checked = False
        self.pending: list = []  # (EncodedChunk, stage seconds) per unit, in order

    @property
    def sharded(self) -> bool:
        return self.writer is not None and self.writer.shard_chunks is not None


def _write_shards(context: _TaskContext, summaries: list[dict]) -> list[dict]:
    """Write the task's chunks as whole shards (format 4), then count them in the metrics.

    The driver makes a task of exactly the units of one shard; units that do not fill their
    shards mean a driver that grouped them otherwise, and nothing is written.
    """
    from palstream.batch import metrics

    writer = context.writer
    indices = [s["index"] for s in summaries]
    shards: dict[int, list] = {}
    for index, (encoded, _) in zip(indices, context.pending):
        shards.setdefault(index // writer.shard_chunks, []).append((index, encoded))
    for shard, chunks in shards.items():
        expected = writer.shard_range(shard)
        if [index for index, _ in chunks] != list(expected):
            raise ArchiveError(
                f"units {indices[0]}..{indices[-1]} do not cover shard {shard} of {writer.location} "
                f"(chunks {expected.start}..{expected.stop - 1}); a task must write whole shards"
            )
    t0 = time.perf_counter()
    try:
        for shard, chunks in shards.items():
            encoded = [chunk for _, chunk in chunks]
            with_storage_retries(lambda: writer.write_shard(shard, encoded), "writing the shard")  # noqa: B023 (called at once)
    except BaseException:
        metrics.units.labels("failed").inc(len(summaries))
        raise
    share = (time.perf_counter() - t0) / len(summaries)
    for summary, (_, stages) in zip(summaries, context.pending):
        stages["write"] = share  # the shard's write, split over its units
        metrics.record_unit(summary, stages)
    return summaries


def encode_unit(unit: UnitTask, config: EncoderConfig, context: _TaskContext | None = None) -> dict:
    """Encode one unit and commit it.

    A second execution of a unit (its first worker died after committing, before reporting)
    encodes the same bytes again and ``ArchiveWriter.write_chunk`` (or ``write_shard``) finds the
    same commit marker, so nothing is ever written that differs.

    In a format-4 archive the chunk is kept in ``context`` and written with its shard by
    :func:`encode_units`.

    A source that cannot be read, whose size differs from the plan's, or that gives fewer or
    more frames than the plan says is refused: the unit returns ``outcome: "refused"`` (a value,
    so Dask does not retry it into an acceptance) and writes nothing.

    Parameters
    ----------
    unit : UnitTask
        The unit and the plan's record of its input.
    config : EncoderConfig
        The encoder settings.
    context : _TaskContext, optional
        Shared by the units of one task (see :func:`encode_units`).

    Returns
    -------
    dict
        A plain dict, because it is written as JSON as it is into the task's commit-index record
        (and read back from there by resume, the tuner and the manifests):
        ``outcome`` (``"committed"``), ``source``, ``index``, ``frames``, ``raw_bytes``,
        ``bytes``, ``psnr_y`` (None when exact), ``seconds``, ``finished``, ``stage_seconds``,
        ``worker``; or ``outcome`` (``"refused"``), ``source``, ``index``, ``reason``.
    """
    from palstream.batch import metrics

    context = context or _TaskContext()
    try:
        summary, stages = _encode_unit(unit, config, context)
    except InputError as exc:
        metrics.units.labels("failed").inc()
        return {"outcome": "refused", "source": unit.source, "index": unit.index, "reason": str(exc)}
    except BaseException:
        metrics.units.labels("failed").inc()
        raise
    if not context.sharded:  # format 4 counts a unit once its shard is written (_write_shards)
        metrics.record_unit(summary, stages)
    return summary


def _read_unit(unit: UnitTask, gop: int):
    """The unit's frames. A kept truncated source is read up to the planned frame count by
    ``io.iter_chunks`` (``io.read_frames`` would read on into the break and fail)."""
    from palstream import io

    if unit.source_truncated:
        chunks = io.iter_chunks(unit.source_location, gop, frame_count=unit.source_frames)
        return next(itertools.islice(chunks, unit.start // gop, None))
    return io.read_frames(unit.source_location, unit.start, unit.count)


def _source_size(source: Location) -> int:
    fs, path = source.filesystem()
    return fs.size(path)


def _check_source_size(source: Location, planned: int) -> None:
    size = with_storage_retries(lambda: _source_size(source), "reading the source's size")
    if size != planned:
        raise InputError(
            f"{source.url} is {size} bytes, the plan recorded {planned}: the source changed since it was planned; "
            "restore it, or encode it in a new job"
        )


def _encode_unit(unit: UnitTask, config: EncoderConfig, context: _TaskContext) -> tuple[dict, dict]:
    from palstream import archive
    from palstream.codec import encode_chunk

    started = time.time()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    # The source is checked against the plan before the archive is touched.
    if not context.source_checked:  # once per task: the units of a task share their source
        _check_source_size(unit.source_location, unit.source_bytes)
        context.source_checked = True
    frames = with_storage_retries(lambda: _read_unit(unit, config.gop), "reading the source")
    if len(frames) != unit.count:
        raise InputError(
            f"{unit.source_location.url} gave {len(frames)} frames at {unit.start}, the plan expects {unit.count}: "
            "the source is truncated or changed since it was planned; restore it, or encode it in a new job"
        )
    stages["decode"] = time.perf_counter() - t0
    if context.writer is None:
        context.writer = with_storage_retries(
            lambda: archive.ArchiveWriter.open(unit.archive), "opening the archive"
        )
    writer = context.writer
    generator = _plugin().generator(config.palette)
    generator.take_seconds()
    t0 = time.perf_counter()
    encoded = encode_chunk(frames, config, generator)
    stages["encode"] = time.perf_counter() - t0  # all of encode_chunk, palettes included
    stages["palettes"] = generator.take_seconds()
    # The codec may break its own time down (features, palettes, entropy).
    stages.update({k: float(v) for k, v in encoded.stats.get("stage_seconds", {}).items()})
    if context.sharded:
        context.pending.append((encoded, stages))  # written with its shard, by encode_units
    else:
        t0 = time.perf_counter()
        with_storage_retries(lambda: writer.write_chunk(unit.index, encoded), "writing the chunk")
        stages["write"] = time.perf_counter() - t0

    psnr_y = encoded.stats.get("psnr_y")
    summary = {
        "outcome": "committed",
        "source": unit.source,
        "index": unit.index,
        "frames": unit.count,
        "raw_bytes": len(frames) * (frames.y[0].size + 2 * frames.u[0].size),
        "bytes": len(encoded.payload),
        "psnr_y": None if psnr_y is None or psnr_y == float("inf") else float(psnr_y),
        "seconds": time.time() - started,
        "finished": time.time(),
        "stage_seconds": stages,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    return summary, stages


def finalize_archive(task: FinalizeTask) -> dict:
    """Check the source, verify every chunk's checksum and mark the archive complete (``finalize_archive-*``).

    Returns
    -------
    dict
        ``{"outcome": "complete", "fixity": ...}``; ``{"outcome": "refused", "reason": ...}``
        when the source changed or its other streams cannot be kept as asked (a value, so no
        retry turns it into a success); or
        ``{"outcome": "missing", "units": [...]}`` when chunks the job's commit index counted as
        done have no valid commit marker (nothing is changed; the driver runs those units again).
    """
    from palstream import archive
    from palstream.batch.store import write_json

    try:
        _check_source_size(task.source, task.source_bytes)
        digest = with_storage_retries(lambda: _sha256(task.source), "hashing the source")
    except InputError as exc:
        return {"outcome": "refused", "reason": str(exc)}
    if digest != task.source_sha256:
        return {
            "outcome": "refused",
            "reason": f"{task.source.url} has sha256 {digest[:12]}..., the plan recorded {task.source_sha256[:12]}...: "
            "the source changed since it was planned; restore it, or encode it in a new job",
        }
    writer = with_storage_retries(lambda: archive.ArchiveWriter.open(task.archive), "opening the archive")
    # The other streams are written once per archive, here: keep_streams writes nothing when the
    # root lists them already, and a run killed before the root is written is redone whole.
    try:
        with_storage_retries(
            lambda: writer.keep_streams(task.source, task.audio, task.drop_streams),
            "keeping the source's other streams",
        )
    except InputError as exc:
        return {"outcome": "refused", "reason": str(exc)}
    # finalize checks every chunk and returns the fixity record built from the bytes it checked:
    # no read of the markers before it and none of the archive after it.
    try:
        fixity = with_storage_retries(writer.finalize, "finalizing the archive")
    except archive.IncompleteArchiveError as exc:  # the job's commit index named units the archive lacks
        return {"outcome": "missing", "units": exc.missing}
    with_storage_retries(lambda: write_json(task.fixity, fixity), "writing the fixity record")
    return {"outcome": "complete", "fixity": fixity}


def _sha256(source: Location) -> str:
    fs, path = source.filesystem()
    with fs.open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def archive_fixity(location: Location) -> dict:
    """Checksums of one archive, for the job's manifests (``archive_fixity-*``).

    Returns
    -------
    dict
        ``files``: ``{path relative to the archive: sha256}`` of every file (object) of the
        archive; ``bytes``: their total size; ``payload_sha256`` and ``payload_bytes``: of the
        chunk payloads concatenated in chunk order (what the codec wrote, independent of
        zarr's file layout).
    """
    from palstream import archive

    fs, root = location.filesystem()
    files, total = {}, 0
    for path in sorted(fs.find(root)):
        blob = fs.cat_file(path)
        files[path[len(root) + 1 :]] = hashlib.sha256(blob).hexdigest()
        total += len(blob)
    arc = archive.open_archive(location)
    payload, size = hashlib.sha256(), 0
    for i in range(arc.n_chunks):
        chunk = arc.read_chunk(i)
        payload.update(chunk)
        size += len(chunk)
    return {"files": files, "bytes": total, "payload_sha256": payload.hexdigest(), "payload_bytes": size}


def probe_source(
    url: str, options: dict, allow_truncated: bool = False, audio: str = "copy", drop_streams: tuple[int, ...] = ()
) -> dict:
    """Probe one input (``probe_source-*``), run once per input.

    With ``allow_truncated`` a truncated or damaged input is accepted with the frames before
    its break, and its ``info["truncated"]`` says what was detected. Its other streams are
    indexed with ``audio`` and ``drop_streams`` (packets read, nothing kept), so an input
    whose streams cannot be kept as asked is refused here rather than at its finalisation.

    Returns
    -------
    dict
        ``{"info": SourceInfo dict}``, or ``{"refused": reason}`` when the input cannot be
        archived. The refusal is a value, not an exception, so no retry can turn it into an
        acceptance.
    """
    from palstream import io

    source = Location(url, options)
    try:
        info = io.probe(source, allow_truncated=allow_truncated).to_dict()
        io.read_side_streams(source, audio, drop_streams)
        return {"info": info}
    except PalstreamError as exc:
        return {"refused": str(exc)}


def generator_identity(name: str) -> dict:
    """Name and weights hash of the worker's palette generator ``name`` (recorded in archives)."""
    generator = _plugin().generator(name)
    return {"name": generator.name, "weights_hash": generator.weights_hash}
