"""Running a job: lock the output, plan, create archives, run units on Dask, finalize, report.

Exactly once, by construction:

- the driver alone creates each archive, at its final shape, before any of its tasks runs;
- a task writes only its own chunks, each followed by its commit marker, and skips a unit whose
  marker exists (an earlier attempt on a worker that died after committing);
- ``resume`` and a rerun of ``submit`` run only the units the job's commit index does not name
  (``palstream.batch.commits``: one record per finished task, read in O(tasks)); the index is a
  cache of the markers: finalize reads the markers and the units the index claimed but the
  archive lacks run again;
- an archive is finalized (source checked against the plan's size and SHA-256, every chunk's
  checksum verified, success marker written) only when all its units are committed, and the
  job's ``_palstream/SUCCESS`` is written last.

An input is refused, never retried into an acceptance: a probe runs once and returns its
refusal as a value, and so does a unit or finalize task whose source no longer matches the plan.
Every failure is one line in the report and, with its traceback, an entry in
``_palstream/job.log``. When a run ends, ``manifest.csv`` and ``manifest-sha256.txt`` are
(re)written at the output root (``palstream.batch.manifest``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urlparse

import dask
import distributed
from distributed import Client, as_completed

from palstream import __version__
from palstream.batch import metrics
from palstream.batch.cluster import open_client, requested_workers
from palstream.batch.commits import committed_units, record_location
from palstream.batch.manifest import write_manifests
from palstream.batch.plan import Plan, Unit, expand_inputs, load_plan, save_job_settings, save_plan, streams_settings
from palstream.batch.spec import JobSpec
from palstream.batch.store import JOB_DIR, JobLock, check_writable, write_bytes, write_json
from palstream.batch.worker import (
    FinalizeTask,
    Task,
    UnitTask,
    encode_units,
    finalize_archive,
    generator_identity,
    probe_source,
)
from palstream.errors import ArchiveError, ConfigError, PalstreamError
from palstream.storage import Location

TASK_PREFIX = "encode_chunk"
PROBES_IN_FLIGHT = 512  # probes submitted at a time: enough to hide the round trips, never a whole library
ROOT_READS_IN_FLIGHT = 32  # concurrent reads of finalized archives' roots when a run starts


@dataclass
class Progress:
    """What the driver knows after each finished task (passed to ``on_progress``).

    Attributes
    ----------
    units_done, units_total : int
        Units committed (including earlier runs) or quarantined, and all units of the plan.
    frames_done, frames_total : int
        The same in frames.
    frames_per_second : float
        Frames encoded by this run per second of its wall time so far.
    last : dict or None
        The summary of the unit that just finished (None for finalize/quarantine events).
    quarantined : int
        Units or inputs given up on so far.
    client : distributed.Client
        The job's client (to inspect the cluster).
    """

    units_done: int
    units_total: int
    frames_done: int
    frames_total: int
    frames_per_second: float
    last: dict | None
    quarantined: int
    client: Client


@dataclass
class JobReport:
    """Outcome of one run of a job.

    Attributes
    ----------
    output : str
        The output root.
    plan_hash : str
        Identity of the job.
    archives : dict
        Archive name -> ``"complete"`` (finalized) or ``"incomplete"`` (has quarantined units).
    quarantined : list of dict
        ``{"input", "unit" (None for a whole input), "reason"}`` per unit or input given up on
        (input refusals included).
    log : str
        The job log holding every failure's details (``<output>/_palstream/job.log``).
    units_total, units_encoded, units_skipped : int
        Units in the plan; encoded by this run; already committed by an earlier run.
    frames_encoded : int
        Frames encoded by this run.
    seconds : float
        Wall time of the encode phase of this run.
    """

    output: str
    plan_hash: str
    archives: dict = field(default_factory=dict)
    quarantined: list = field(default_factory=list)
    log: str = ""
    units_total: int = 0
    units_encoded: int = 0
    units_skipped: int = 0
    frames_encoded: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.quarantined and all(state == "complete" for state in self.archives.values())

    @property
    def frames_per_second(self) -> float:
        return self.frames_encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "plan": self.plan_hash,
            "archives": self.archives,
            "quarantined": self.quarantined,
            "log": self.log,
            "units_total": self.units_total,
            "units_encoded": self.units_encoded,
            "units_skipped": self.units_skipped,
            "frames_encoded": self.frames_encoded,
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames_per_second, 2),
            "complete": self.complete,
        }


def run_job(
    spec: JobSpec,
    *,
    resume: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    on_progress: Callable[[Progress], None] | None = None,
    worker_targets: str | None = None,
) -> JobReport:
    """Run (or continue) a job to completion.

    Parameters
    ----------
    spec : JobSpec
        The validated job.
    resume : bool, default False
        Continue the plan stored under ``spec.output`` instead of planning ``spec.inputs``.
    metrics_port : int or None, default None
        Serve the driver's Prometheus metrics on this port while the job runs.
    metrics_host : str, default "127.0.0.1"
        Interface for the metrics server; use "0.0.0.0" only where the network is trusted.
    on_progress : callable, optional
        Called with a :class:`Progress` after every finished task.
    worker_targets : str, optional
        Local path of a Prometheus ``file_sd`` file kept listing every worker's ``/metrics``
        address while the job runs (worker HTTP ports are chosen at start-up).

    Returns
    -------
    JobReport
        Also written to ``<output>/_palstream/report.json``.

    Raises
    ------
    PalstreamError
        Unwritable output, locked output, missing inputs, different job on the output, bad
        metrics port, ...: all before any unit runs. Refused inputs and quarantined units do not
        raise; see ``JobReport.complete``.
    """
    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {metrics_port} is not a TCP port; give 1..65535")
    if worker_targets is not None and not os.access(os.path.dirname(os.path.abspath(worker_targets)), os.W_OK):
        # The watcher thread rewrites this file while the job runs; it must not fail silently there.
        raise ConfigError(f"--worker-targets {worker_targets}: its folder does not exist or is not writable; give a writable path")
    output = Location(spec.output, spec.storage.options(spec.output))
    check_writable(output)
    if spec.tuner.enabled and not resume:
        from palstream.tuner.agent import load_policy

        load_policy(spec.tuner.policy)  # a bad policy file is a one-line error before any work
    plan = load_plan(output)
    if resume:
        if plan is None:
            raise PalstreamError(f"output {spec.output} holds no job plan to resume; start the job with `palstream submit`")
        urls = []
    else:
        urls = expand_inputs(spec.inputs, spec.storage.options)
        if plan is not None and not plan.matches(
            urls, spec.codec, _tuner_settings(spec), spec.allow_truncated, streams_settings(spec)
        ):
            raise ConfigError(
                f"output {spec.output} already holds a different job (plan {plan.hash[:12]}: other inputs or settings); "
                "finish it with `palstream resume`, or choose another --out"
            )
    log = JobLog(output)
    with metrics.serve_driver_metrics(metrics_port, metrics_host), JobLock(output), open_client(spec) as client:
        # Task keys carry this run's token: on a cluster that outlives a killed driver, its tasks
        # are still being forgotten when the next driver starts, and a reused key comes back cancelled.
        run = uuid.uuid4().hex[:8]
        # A stored plan is continued as it is: its probe results and refusals are final.
        if plan is None:
            plan = _probe_and_plan(client, spec, urls, log, run)
        save_plan(output, plan)
        save_job_settings(output, spec)
        return _Execution(client, spec, plan, on_progress, worker_targets, log, run).run()


def _tuner_settings(spec: JobSpec) -> dict | None:
    return {k: v for k, v in spec.tuner.to_dict().items() if k != "enabled"} if spec.tuner.enabled else None


class JobLog:
    """The job's log file, ``<output>/_palstream/job.log``: full details of every failure.

    The terminal gets one line per failed input; the traceback and the task's key go here.
    Entries of earlier runs are kept (the file is rewritten whole: object stores cannot append).
    """

    def __init__(self, output: Location):
        self.location = output.child(JOB_DIR, "job.log")
        self.url = self.location.url
        try:
            fs, path = self.location.filesystem()
            self.text = fs.cat_file(path).decode(errors="replace")
        except Exception:  # no log yet, or an unreadable one: it must not stop the job
            self.text = ""

    def write(self, message: str, detail: str | None = None) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = f"{stamp} {message}\n"
        if detail:
            entry += "".join(f"    {line}\n" for line in detail.rstrip().splitlines())
        self.text += entry
        write_bytes(self.location, self.text.encode())

    def failure(self, what: str, fut) -> str:
        """Log a failed future with its traceback; returns the one-line reason."""
        exc = fut.exception()
        reason = _one_line(exc)
        tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback())) if exc is not None else None
        self.write(f"{what}: {reason} (task {fut.key})", tb)
        return reason


def _probe_and_plan(client: Client, spec: JobSpec, urls: list[str], log: JobLog, run: str) -> Plan:
    """Probe every input once, on the cluster (decoding a library is work for the workers).

    A probe is never retried: a refusal, or a crash of the probe, is the input's final answer
    in this job's plan.
    """
    def submit(i: int):
        url = urls[i]
        return client.submit(
            probe_source,
            url,
            spec.storage.options(url),
            spec.allow_truncated,
            spec.audio,
            spec.drop_streams,
            key=f"probe_source-{i}-{run}",
            retries=0,
            pure=False,
        )

    # A bounded window here too: a library of 10^5 inputs is never 10^5 tasks on the scheduler.
    # (4 per worker thread made 10^4 probes latency-bound: > 7 min on the loaded 2-core machine.)
    submitted = min(PROBES_IN_FLIGHT, len(urls))
    index = {}
    pending = as_completed()
    for i in range(submitted):
        fut = submit(i)
        index[fut.key] = i
        pending.add(fut)
    probed: list = [None] * len(urls)
    for fut in pending:
        i = index.pop(fut.key)
        url = urls[i]
        if fut.status == "finished":
            result = fut.result()
            probed[i] = (url, result.get("info"), result.get("refused"))
            if "refused" in result:
                log.write(f"refused {url}: {result['refused']}")
        else:  # e.g. KilledWorker: the input crashed the decoder
            probed[i] = (url, None, log.failure(f"refused {url}: its probe failed", fut))
        fut.release()
        if submitted < len(urls):
            nxt = submit(submitted)
            index[nxt.key] = submitted
            pending.add(nxt)
            submitted += 1
    from palstream.archive import MAX_SHARD_CHUNKS

    # A task is one shard of its archive (format 4); the tuner decides configurations unit by unit.
    shard_chunks = 1 if spec.tuner.enabled else min(spec.units_per_task, MAX_SHARD_CHUNKS)
    return Plan.build(spec.codec, probed, _tuner_settings(spec), spec.allow_truncated, streams_settings(spec), shard_chunks)


class _Execution:
    def __init__(self, client: Client, spec: JobSpec, plan: Plan, on_progress, worker_targets: str | None, log: JobLog, run: str):
        self.client, self.spec, self.plan, self.on_progress, self.run_token = client, spec, plan, on_progress, run
        self.worker_targets, self.log = worker_targets, log
        self.output = Location(spec.output, spec.storage.options(spec.output))
        self.config = plan.config
        # Format 4: a task writes one whole shard, so its size is the plan's, whatever this run asks.
        self.per_task = plan.shard_chunks or spec.units_per_task
        if plan.shard_chunks is not None and spec.units_per_task != plan.shard_chunks and plan.tuner is None:
            log.write(f"this job's archives hold {plan.shard_chunks} units per shard: tasks of {plan.shard_chunks} units (units_per_task {spec.units_per_task} ignored)")
        self.report = JobReport(spec.output, plan.hash, units_total=len(plan.units()), log=log.url)
        self.report.quarantined = [{"input": r.url, "unit": None, "reason": r.reason} for r in plan.rejected]
        self.committed: dict[int, set[int]] = {i: set() for i in range(len(plan.sources))}
        self.units_committed = 0  # sum of len(committed[i]), kept so a progress event costs O(1)
        self.frames_done = 0
        self.frames_total = plan.total_frames()  # O(inputs): computed once, not per progress event
        self.started = time.monotonic()

    # -- setup -------------------------------------------------------------------------------
    def _prepare_archives(self) -> None:
        """Find what is done: the job's commit index and the archives finalized by earlier runs.

        One LIST and one GET per task record, one LIST of the fixity records and a root read per
        finalized archive: nothing per chunk, so a resume of 10^6 units takes seconds. Archives
        are created when their first units are submitted (:meth:`_ensure_archive`).
        """
        from palstream import archive

        # The archive records the generator's name and weights hash; a worker, which loads the
        # model anyway, reports them, so the driver never loads a model (nor touches CUDA).
        identity = self.client.submit(
            generator_identity, self.plan.config.palette, key=f"generator_identity-{self.plan.hash[:12]}-{self.run_token}", pure=False
        ).result()
        self.generator = SimpleNamespace(**identity)
        sources = self.plan.sources
        self.finalized: set[int] = set()
        candidates = [i for i in self._fixity_records() if i < len(sources)]

        def complete(i: int) -> bool:
            return archive.open_archive(self.plan.archive_location(self.output, i)).complete

        # One root read per finalized archive, many at a time: on an object store each is a round trip.
        with ThreadPoolExecutor(ROOT_READS_IN_FLIGHT) as pool:
            found = [i for i, done in zip(candidates, pool.map(complete, candidates)) if done]
        for i in found:
            self.finalized.add(i)
            for index in range(len(sources[i].units)):
                self._commit(i, index)
            self.report.archives[sources[i].archive] = "complete"
        # The records of finalized archives are not even read: their fixity record stands for them.
        for source, index in committed_units(self.output, skip=self.finalized):
            if 0 <= source < len(sources) and 0 <= index < len(sources[source].units):
                self._commit(source, index)
        self.created = {i for i, done in self.committed.items() if done}

    def _fixity_records(self) -> list[int]:
        """Inputs whose archive an earlier run finalized (it writes ``fixity/<i>.json`` last)."""
        fs, path = self.output.child(JOB_DIR, "fixity").filesystem()
        try:
            names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
        return [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]

    def _ensure_archive(self, source: int) -> None:
        """Create input ``source``'s archive at final shape unless it exists (the driver is its single writer)."""
        if source in self.created:
            return
        from palstream import archive

        src = self.plan.sources[source]
        location = self.plan.archive_location(self.output, source)
        try:
            archive.ArchiveWriter.open(location).restore_groups()  # a killed driver may have left them out
        except ArchiveError:
            archive.ArchiveWriter.create(
                location, src.info, self.plan.config, self.generator, len(src.units), shard_chunks=self.plan.shard_chunks
            )
        self.created.add(source)

    def _commit(self, source: int, index: int) -> None:
        if index not in self.committed[source]:
            self.committed[source].add(index)
            self.units_committed += 1

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> JobReport:
        self._prepare_archives()
        units = self.plan.units()
        self.quarantined_sources: set[int] = set()
        self.tuned = None
        if self.plan.tuner is not None:
            from palstream.batch.tuned import TunedUnits

            for i in range(len(self.plan.sources)):
                self._ensure_archive(i)  # the tuner records each batch's configuration in its archive
            # The tuner hands out units batch by batch, deciding each batch's configuration.
            self.tuned = TunedUnits(
                self.client, self.output, self.plan, self.committed,
                self.quarantined_sources, self.spec.storage.options, self.spec.retries,
            )
            todo: deque[list] | _OnePerTask = _OnePerTask(self.tuned)
            pending = len(self.tuned)
        else:
            tasks = deque(self._tasks([u for u in units if u.index not in self.committed[u.source]]))
            pending = sum(len(task) for task in tasks)
            todo = tasks
        self.todo = todo
        self.report.units_skipped = len(units) - pending
        self.frames_done = sum(u.count for u in units if u.index in self.committed[u.source])
        self._set_unit_gauges(pending, 0)
        metrics.job_workers_requested.set(requested_workers(self.spec, self.client))
        metrics.job_start.set(time.time())  # units start now: probing is over (the stalled alert counts from here)
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_workers, args=(stop,), daemon=True)
        watcher.start()
        try:
            self._run_units()
        finally:
            stop.set()
            watcher.join()
        self.report.seconds = time.monotonic() - self.started
        write_json(self.output.child(JOB_DIR, "report.json"), {**self.report.to_dict(), "finished": time.time()})
        write_manifests(self.client, self.output, self.plan, self.report)
        self._refresh_catalogue()
        self.log.write(
            f"run of plan {self.plan.hash[:12]} ended: {self.report.units_encoded} unit(s) encoded, "
            f"{len(self.report.quarantined)} failure(s), {'complete' if self.report.complete else 'incomplete'}"
        )
        if self.report.complete:
            write_json(self.output.child(JOB_DIR, "SUCCESS"), self._provenance())
        return self.report

    def _tasks(self, units: list) -> list[list]:
        """Runs of consecutive units of one input within one block of ``units_per_task`` (format 4:
        one shard of the plan's ``shard_chunks``), largest first.

        Largest first (frames x pixels): the last tasks to finish are then small ones, which
        keeps every worker busy until the end.
        """
        per_task = self.per_task
        tasks: list[list] = []
        for unit in units:  # in plan order: input by input, unit by unit
            last = tasks[-1] if tasks else None
            if (
                last
                and last[-1].source == unit.source
                and last[-1].index + 1 == unit.index
                and last[0].index // per_task == unit.index // per_task
            ):
                last.append(unit)
            else:
                tasks.append([unit])

        def size(task):
            info = self.plan.sources[task[0].source].info
            return sum(u.count for u in task) * info.width * info.height

        return sorted(tasks, key=lambda task: -size(task))

    def _submit_task(self, units: list, ac: as_completed) -> None:
        first = units[0]
        src = self.plan.sources[first.source]
        self._ensure_archive(first.source)
        source = Location(src.url, self.spec.storage.options(src.url))
        archive = self.plan.archive_location(self.output, first.source)
        task = Task(
            tuple(
                UnitTask(
                    unit.source, unit.index, unit.start, unit.count, source,
                    src.info.frame_count, src.info.size_bytes, src.info.truncated is not None, archive,
                )
                for unit in units
            ),
            self.tuned.config_for(first) if self.tuned is not None else self.config,
            record_location(self.output, first.source, first.index),
        )
        fut = self.client.submit(
            encode_units,
            task,
            key=f"{TASK_PREFIX}-{self.plan.hash[:12]}-{first.source}-{first.index}-{self.run_token}",
            retries=self.spec.retries,
            pure=False,
        )
        self.inflight[fut.key] = units
        self.tasks_in_flight += 1
        ac.add(fut)

    def _run_units(self) -> None:
        # One task per worker thread by default: Dask binds a task to a worker when it is
        # submitted, so a backlog queued on one worker cannot move to the one that frees first,
        # and the largest-first order would not hold (measured on the corpus, 2 workers: a 1.1 s
        # tail at 2 per thread, none at 1; a worker waits only the driver's round trip per task).
        # The window is what keeps a library of 10^6 units from becoming 10^6 futures.
        limit = self.spec.max_in_flight or self._threads()
        self.inflight: dict = {}
        self.tasks_in_flight = 0
        self.requeued: set[int] = set()
        ac = as_completed()
        self.remaining = {i: len(src.units) - len(self.committed[i]) for i, src in enumerate(self.plan.sources)}
        for i, left in self.remaining.items():
            if left == 0 and i not in self.finalized:
                self._submit_finalize(i, ac)
        self._fill(ac, limit)
        for fut in ac:
            kind = self.inflight.pop(fut.key)
            if isinstance(kind, int):  # a finalize task
                self._finalized(kind, fut, ac)
            else:
                self.tasks_in_flight -= 1
                self._task_finished(kind, fut, ac)
            fut.release()
            self._fill(ac, limit)

    def _fill(self, ac, limit: int) -> None:
        """Submit tasks until ``limit`` are in flight or none are left."""
        while self.todo and self.tasks_in_flight < limit:
            task = self.todo.popleft()
            if task[0].source not in self.quarantined_sources:
                self._submit_task(task, ac)
        self._set_unit_gauges(len(self.todo), self.tasks_in_flight)

    def _task_finished(self, units: list, fut, ac) -> None:
        first = units[0]
        src_url = self.plan.sources[first.source].url
        if fut.status != "finished":
            # Retries are spent (or the task killed its workers): give this input up, keep the rest going.
            self._quarantine(first.source, first.index, self.log.failure(f"quarantined {src_url} unit {first.index}", fut))
            return
        result = fut.result()
        by_index = {u.index: u for u in units}
        last = None
        for summary in result["summaries"]:
            if self._unit_committed(by_index[summary["index"]], summary, ac):
                last = summary
        if last is not None:
            self._emit(last)  # once per task: a task's units finish together
        if result["refused"] is not None:
            # The source no longer matches the plan (truncated, changed): nothing was written for that unit.
            refused = result["refused"]
            self.log.write(f"refused {src_url} unit {refused['index']}: {refused['reason']}")
            self._quarantine(first.source, refused["index"], refused["reason"])

    def _unit_committed(self, unit, summary: dict, ac) -> bool:
        """Count a unit its task committed; False when it is below the floor (then quarantined)."""
        if not self._meets_floor(unit, summary):
            return False
        self._commit(unit.source, unit.index)
        self.frames_done += unit.count
        self.report.units_encoded += 1
        self.report.frames_encoded += unit.count
        metrics.job_frames.inc(unit.count)
        metrics.job_last_progress.set(time.time())
        self.remaining[unit.source] -= 1
        if self.remaining[unit.source] == 0:
            self._submit_finalize(unit.source, ac)
        if self.tuned is not None:
            self.tuned.unit_finished(unit, summary)
        return True

    def _quarantine(self, source: int, unit: int | None, reason: str) -> None:
        src = self.plan.sources[source]
        self.report.quarantined.append({"input": src.url, "unit": unit, "reason": reason})
        self.quarantined_sources.add(source)
        self.report.archives[src.archive] = "incomplete"
        self._emit(None)

    def _meets_floor(self, unit, summary: dict) -> bool:
        """A unit below the job's quality floor is never accepted: uncommit it and quarantine its input."""
        from palstream import archive
        from palstream.quality import FloorViolation, check_floor

        src = self.plan.sources[unit.source]
        try:
            check_floor(summary.get("psnr_y"), self.config.target_psnr, self.config.lossless, f"{src.url} unit {unit.index}")
            return True
        except FloorViolation as exc:
            archive.ArchiveWriter.open(self.plan.archive_location(self.output, unit.source)).revoke(unit.index)
            self.log.write(f"quarantined {src.url} unit {unit.index}: {exc}")
            self._quarantine(unit.source, unit.index, str(exc))
            return False

    def _submit_finalize(self, source: int, ac) -> None:
        src = self.plan.sources[source]
        task = FinalizeTask(
            archive=self.plan.archive_location(self.output, source),
            source=Location(src.url, self.spec.storage.options(src.url)),
            source_bytes=src.info.size_bytes,
            source_sha256=src.info.sha256,
            audio=self.plan.audio,
            drop_streams=self.plan.drop_streams,
            fixity=self.output.child(JOB_DIR, "fixity", f"{source}.json"),
        )
        fut = self.client.submit(
            finalize_archive,
            task,
            key=f"finalize_archive-{self.plan.hash[:12]}-{source}-{self.run_token}",
            retries=self.spec.retries,
            pure=False,
        )
        self.inflight[fut.key] = source
        ac.add(fut)

    def _finalized(self, source: int, fut, ac) -> None:
        src = self.plan.sources[source]
        if fut.status == "finished" and fut.result()["outcome"] == "complete":
            self.report.archives[src.archive] = "complete"
        elif fut.status == "finished" and fut.result()["outcome"] == "missing" and source not in self.requeued:
            # The commit index named units whose markers the archive lacks: run them again, once.
            missing = fut.result()["units"]
            self.log.write(f"{src.url}: {len(missing)} unit(s) the commit index named are not committed in the archive; running them again")
            self.requeued.add(source)
            for index in missing:
                self.committed[source].discard(index)
                self.units_committed -= 1
                self.frames_done -= src.units[index][1]
            self.remaining[source] = len(missing)
            units = [Unit(source, j, *src.units[j]) for j in missing]
            for task in reversed(self._tasks(units) if self.tuned is None else [[u] for u in units]):
                self.todo.appendleft(task)
        elif fut.status == "finished" and fut.result()["outcome"] == "missing":
            reason = f"units {fut.result()['units'][:10]} do not commit (their markers are missing after a rerun)"
            self.log.write(f"quarantined {src.url}: {reason}")
            self._quarantine(source, None, reason)
        elif fut.status == "finished":
            self.log.write(f"refused {src.url}: {fut.result()['reason']}")
            self._quarantine(source, None, fut.result()["reason"])
        else:
            reason = self.log.failure(f"finalizing the archive of {src.url} failed", fut)
            self._quarantine(source, None, f"finalize failed: {reason}")

    def _refresh_catalogue(self) -> None:
        """Bring the output root's library catalogue up to date (``palstream ls``/``serve``); a
        catalogue that cannot be written is logged and never fails the job: the archives are the record."""
        import sqlite3

        from palstream import catalogue

        try:
            catalogue.refresh(self.output)
        except (PalstreamError, OSError, sqlite3.Error) as exc:
            self.log.write(f"the library catalogue was not refreshed: {exc}")

    # -- reporting ---------------------------------------------------------------------------
    def _threads(self) -> int:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return max(1, sum(w.get("nthreads", 1) for w in info.values()))

    def _emit(self, summary: dict | None) -> None:
        if self.on_progress is None:
            return
        done_units = self.units_committed
        quarantined_units = sum(
            len(self.plan.sources[s].units) - len(self.committed[s]) for s in self.quarantined_sources
        )
        elapsed = time.monotonic() - self.started
        self.on_progress(
            Progress(
                units_done=done_units + quarantined_units,
                units_total=self.report.units_total,
                frames_done=self.frames_done,
                frames_total=self.frames_total,
                frames_per_second=self.report.frames_encoded / elapsed if elapsed > 0 else 0.0,
                last=summary,
                quarantined=len(self.report.quarantined),
                client=self.client,
            )
        )

    def _set_unit_gauges(self, pending: int, running: int) -> None:
        metrics.job_units.labels("pending").set(pending)
        metrics.job_units.labels("running").set(running)
        metrics.job_units.labels("committed").set(self.units_committed)
        metrics.job_units.labels("quarantined").set(len(self.report.quarantined))

    def _watch_workers(self, stop: threading.Event) -> None:
        """Keep the worker gauge and the Prometheus file_sd targets current."""
        written = None
        while True:
            try:
                workers = self.client.scheduler_info(n_workers=-1)["workers"]
                metrics.job_workers.set(len(workers))
                targets = sorted(
                    f"{urlparse(addr).hostname}:{info['services']['dashboard']}"
                    for addr, info in workers.items()
                    if "dashboard" in info.get("services", {})
                )
                if self.worker_targets and targets != written:
                    _write_targets(self.worker_targets, targets)
                    written = targets
            except Exception:  # monitoring must never stop the job; retried next beat
                pass
            if stop.wait(2.0):
                return

    def _provenance(self) -> dict:
        return {
            "plan": self.plan.hash,
            "palstream": __version__,
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "finished": time.time(),
            "archives": sorted(self.report.archives),
            "units": self.report.units_total,
            "frames": self.frames_total,
        }


def _write_targets(path: str, targets: list[str]) -> None:
    """Atomically replace a Prometheus file_sd file listing the workers' /metrics addresses."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([{"targets": targets, "labels": {"job": "palstream-workers"}}], f)
    os.replace(tmp, path)


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _OnePerTask:
    """The tuner's unit queue as a queue of one-unit tasks (each unit gets its batch's configuration)."""

    def __init__(self, units):
        self.units, self.front = units, deque()

    def __len__(self) -> int:
        return len(self.front) + len(self.units)

    def popleft(self) -> list:
        return self.front.popleft() if self.front else [self.units.popleft()]

    def appendleft(self, task: list) -> None:
        self.front.appendleft(task)
