"""Scale simulator (issue 19): a synthetic library of 10^6 units through the real batch system.

What is real: the planner (``Plan.build``/``save_plan``/``load_plan``), the job lock, the commit
index, the runner (``run_job``: bounded window, tasks of many units, finalize, manifests), the
worker tasks (``encode_units``, ``finalize_archive``), a ``distributed.LocalCluster`` of worker
processes, and the storage: a local folder, or moto's S3 server on 127.0.0.1 behind a counter of
requests by kind. What is a stub: the encoder (``encode_chunk`` sleeps ``--encode-ms`` and returns
``--payload-bytes`` of deterministic bytes), the frame reader and the probe (each input is a
small real file whose probe says it holds ``units x gop`` frames), and, with ``--archive stub``,
the archive: a stand-in of the same three objects per unit as ``palstream/archive.py`` writes
(chunk metadata, payload, a commit marker written if absent; ``committed`` by one LIST per
archive; finalize one PUT, reading nothing back), or with ``--archive marker`` the marker alone
(10^6 units of three objects need gigabytes of 4 KiB blocks). ``--archive real`` runs the real
``ArchiveWriter``; ``--archive-breakdown`` counts the S3 requests of each of its operations.

A run: build the library; start the cluster (it outlives the drivers, as a Kubernetes cluster
does); run the job in a driver process; optionally add and kill workers during the run
(``--elastic``) and kill the driver at ``--kill-at`` of the units, then resume the job in a new
driver process (``run_job(resume=True)``: what ``palstream resume --cluster ...`` runs); check
that every unit is committed, recorded once in the commit index, and rewritten at most as often
as units were in flight when something died.

    .venv/bin/python benchmarks/scale_sim.py --units 1000000 --archives 10000 --archive marker --kill-at 0.5
        --skip-plan-measure --workdir /dev/shm/scale_1e6
    .venv/bin/python benchmarks/scale_sim.py --units 2000 --archives 10 --storage s3 --archive real --kill-at 0.5
    .venv/bin/python benchmarks/scale_sim.py --archive-breakdown 200 [--shard-chunks 25]

The CPU figures cover every process of the run (scheduler, nannies, drivers, workers) and the
simulator's own final check; ``--trace-requests FILE`` writes each S3 request's method and key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from distributed import WorkerPlugin

from palstream.storage import Location

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "scale"


# -- the stubs, installed in every worker and in the driver --------------------------------------
def install_stubs(settings: dict) -> None:
    """Replace the encoder, the frame reader, the probe (and, for ``archive: stub``, the archive)."""
    import numpy as np

    import palstream.archive
    import palstream.batch.runner
    import palstream.batch.store
    import palstream.batch.worker
    import palstream.codec
    import palstream.io
    from palstream.codec import EncodedChunk
    from palstream.codec.chunk import HEADER, MAGIC, VERSION
    from palstream.frames import Frames

    gop, per_archive = settings["gop"], settings["units_per_archive"]

    def probe(source, storage_options=None, allow_truncated=False):
        location = Location.of(source, storage_options)  # the batch passes a Location or a URL and options
        fs, path = location.filesystem()
        blob = fs.cat_file(path)
        url = location.url
        return palstream.io.SourceInfo(
            url=url, name=url.rsplit("/", 1)[-1], size_bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
            width=64, height=64, frame_count=gop * per_archive, fps="25/1", time_base="1/25", pix_fmt="yuv420p",
            color={"matrix": "bt709", "range": "tv", "primaries": "bt709", "transfer": "bt709", "chroma_location": "left"},
        )

    frames = {}

    def read_unit(unit, gop_):
        count = unit.count
        if count not in frames:
            y, uv = np.zeros((count, 2, 2), np.uint8), np.zeros((count, 1, 1), np.uint8)
            frames[count] = Frames(y, uv, uv.copy())
        return frames[count]

    def encode_chunk(frames, config, generator=None, **_):
        if settings["encode_ms"]:
            time.sleep(settings["encode_ms"] / 1000)
        # A payload whose header matches the archive (finalize checks it), padded to the size asked.
        body = max(settings["payload_bytes"] - HEADER.size, 1)
        header = HEADER.pack(MAGIC, VERSION, 0, len(frames), 64, 64, 0, 0, 0, 0, body)
        return EncodedChunk(header + bytes(body), {"frames": len(frames), "psnr_y": 50.0})

    def read_side_streams(source, audio="copy", drop_streams=()):
        return palstream.io.SideStreams({}, [], [], [])  # the synthetic inputs hold one video stream

    palstream.io.probe = probe
    palstream.io.read_side_streams = read_side_streams
    palstream.archive.read_side_streams = read_side_streams
    palstream.batch.worker._read_unit = read_unit
    palstream.codec.encode_chunk = encode_chunk
    if settings["archive"] in ("stub", "marker"):
        StubArchive.MODE = settings["archive"]
        palstream.archive.ArchiveWriter = StubArchive
        palstream.archive.open_archive = StubArchive.open
        palstream.batch.runner._Execution._refresh_catalogue = lambda self: None  # reads real archives only


def _url_and_options(location, options) -> tuple[str, dict]:
    """A Location, or a URL and its options, as a URL and options."""
    location = Location.of(location, options)
    return location.url, dict(location.options)


class StubArchive:
    """The write path asked of ``palstream/archive.py``: three objects per unit (format 3), or two
    per shard of K units (format 4, what the batch writes since its plans record ``shard_chunks``).

    Format 3: ``c/<i>.meta`` (the chunk's metadata), ``c/<i>.data`` (its payload), then
    ``c/<i>.commit``, created only if absent (``O_EXCL`` locally, ``If-None-Match: *`` on S3): a
    unit encoded twice rewrites the same two objects and leaves a ``c/<i>.again`` note the
    simulator counts. Format 4: ``c/s<s>.data`` (the shard) then ``c/s<s>.commit`` (its marker),
    ``c/s<s>.again`` for a shard written twice. ``committed()`` is one LIST; ``finalize()`` one PUT
    of the root document. In ``marker`` mode only the commit marker is written (10^6 units of
    three objects need ~12 GB of 4 KiB blocks).
    """

    MODE = "stub"

    def __init__(self, url: str, options: dict | None, attrs: dict):
        self.url, self.options, self.attrs = url, options, attrs
        self.fs, self.path = Location(url, options).filesystem()
        self.n_chunks = attrs["n_chunks"]
        self.shard_chunks = attrs.get("shard_chunks")

    @classmethod
    def create(cls, url, source, config, generator=None, n_chunks=None, storage_options=None, overwrite=False, shard_chunks=None):
        from palstream.batch.store import write_json

        url, storage_options = _url_and_options(url, storage_options)
        attrs = {"n_chunks": n_chunks, "status": "incomplete", "frame_count": source.frame_count}
        if shard_chunks is not None:
            attrs["shard_chunks"] = shard_chunks
        write_json(Location(f"{url}/zarr.json", storage_options), attrs)
        return cls(url, storage_options, attrs)

    @classmethod
    def open(cls, url, storage_options=None, force=False):
        from palstream.batch.store import read_json
        from palstream.errors import ArchiveError

        url, storage_options = _url_and_options(url, storage_options)
        attrs = read_json(Location(f"{url}/zarr.json", storage_options))
        if attrs is None:
            raise ArchiveError(f"no archive at {url}")
        return cls(url, storage_options, attrs)

    @property
    def complete(self) -> bool:
        return self.attrs["status"] == "complete"

    def _put(self, name: str, blob: bytes, exclusive: bool = False) -> bool:
        path = f"{self.path}/c/{name}"
        if "file" in self.fs.protocol or "local" in self.fs.protocol:
            return self._put_local(path, blob, exclusive)
        if not exclusive:
            self.fs.pipe_file(path, blob)
            return True
        try:
            with self.fs.open(path, "xb") as f:
                f.write(blob)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs: a failed If-None-Match
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def _put_local(self, path: str, blob: bytes, exclusive: bool) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return True

    def write_chunk(self, index: int, encoded) -> None:
        payload = bytes(encoded.payload)
        sha = hashlib.sha256(payload).hexdigest()
        if self.MODE == "stub":
            self._put(f"{index}.meta", json.dumps({"sha256": sha, "bytes": len(payload), "stats": encoded.stats}).encode())
            self._put(f"{index}.data", payload)
        if not self._put(f"{index}.commit", json.dumps({"sha256": sha, "bytes": len(payload)}).encode(), exclusive=True):
            self._put(f"{index}.again", b"")

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_chunks, min((shard + 1) * self.shard_chunks, self.n_chunks))

    def write_shard(self, shard: int, encoded: list) -> None:
        body = b"".join(bytes(e.payload) for e in encoded)
        if self.MODE == "stub":
            self._put(f"s{shard}.data", body)
        marker = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body), "chunks": [len(e.payload) for e in encoded]}
        if not self._put(f"s{shard}.commit", json.dumps(marker).encode(), exclusive=True):
            self._put(f"s{shard}.again", b"")

    def committed(self) -> set[int]:
        try:
            names = [n.rsplit("/", 1)[-1] for n in self.fs.ls(f"{self.path}/c", detail=False)]
        except FileNotFoundError:
            return set()
        if self.shard_chunks is not None:
            return {i for n in names if n.endswith(".commit") for i in self.shard_range(int(n[1:-7]))}
        return {int(n[:-7]) for n in names if n.endswith(".commit")}

    def keep_streams(self, source, audio="copy", drop_streams=()) -> None:
        pass  # the synthetic inputs hold one video stream

    def revoke(self, index: int) -> None:
        name = index if self.shard_chunks is None else f"s{index // self.shard_chunks}"
        self.fs.rm_file(f"{self.path}/c/{name}.commit")

    def finalize(self) -> dict:
        """Mark complete and return the fixity record, reading each object once, as
        ``ArchiveWriter.finalize`` does; ``IncompleteArchiveError`` when markers are missing."""
        from palstream.archive import IncompleteArchiveError
        from palstream.batch.store import write_json

        missing = sorted(set(range(self.n_chunks)) - self.committed())
        if missing:
            raise IncompleteArchiveError(f"archive {self.url} lacks {len(missing)} chunk(s)", missing)
        self.attrs = {**self.attrs, "status": "complete"}
        write_json(Location(f"{self.url}/zarr.json", self.options), self.attrs)
        blobs = {path[len(self.path) + 1 :]: self.fs.cat_file(path) for path in self.fs.find(self.path)}
        payload_suffix = ".data" if self.MODE == "stub" else ".commit"
        names = [f"s{s}" for s in range(-(-self.n_chunks // self.shard_chunks))] if self.shard_chunks else range(self.n_chunks)
        payload = hashlib.sha256()
        for name in names:
            payload.update(blobs[f"c/{name}{payload_suffix}"])
        return {"files": {name: hashlib.sha256(blob).hexdigest() for name, blob in sorted(blobs.items())},
                "bytes": sum(map(len, blobs.values())), "payload_sha256": payload.hexdigest(),
                "payload_bytes": sum(len(blobs[f"c/{name}{payload_suffix}"]) for name in names)}

    def read_chunk(self, index: int) -> bytes:
        """A chunk's stored bytes (the commit marker in ``marker`` mode, where it is all there is)."""
        suffix = "data" if self.MODE == "stub" else "commit"
        if self.shard_chunks is None:
            return self.fs.cat_file(f"{self.path}/c/{index}.{suffix}")
        shard, position = divmod(index, self.shard_chunks)
        blob = self.fs.cat_file(f"{self.path}/c/s{shard}.{suffix}")
        if self.MODE != "stub":
            return blob if position == 0 else b""
        lengths = json.loads(self.fs.cat_file(f"{self.path}/c/s{shard}.commit"))["chunks"]
        start = sum(lengths[:position])
        return blob[start : start + lengths[position]]


class Stubs(WorkerPlugin):
    """Installs the stubs in every worker, present and future (restarted or added ones too)."""

    name = "scale-sim-stubs"
    idempotent = True

    def __init__(self, settings: dict):
        self.settings = settings

    def setup(self, worker) -> None:
        install_stubs(self.settings)


# -- a counting S3 server -------------------------------------------------------------------------
class CountingS3:
    """moto's S3 server on 127.0.0.1, counting requests by kind (PUT, GET, HEAD, LIST, DELETE, POST)."""

    def __init__(self, trace: str | None = None):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):  # a line per request would cost more than the request
                pass

        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.trace = open(trace, "a") if trace else None  # one line per request: method and key
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
            path = environ.get("PATH_INFO", "").strip("/")
            kind = "LIST" if method == "GET" and ("list-type" in query or "/" not in path) else method
            where = _key_kind(path) if kind != "LIST" else "list"
            with self.lock:
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.counts[f"{kind} {where}"] = self.counts.get(f"{kind} {where}", 0) + 1
                if self.trace is not None:
                    self.trace.write(f"{kind} {path}?{query}\n")
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> dict[str, int]:
        with self.lock:
            counts, self.counts = self.counts, {}
        return counts


def _key_kind(path: str) -> str:
    """What an object key is: a unit's objects, an archive's root, a job file, a source."""
    if "/_palstream/" in path:
        return "job-files"
    if "/in/" in path:
        return "sources"
    if path.endswith(".zarr/zarr.json"):
        return "archive-roots"
    return "unit-objects"  # a chunk's metadata, data and commit marker (real or stub layout)


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}


# -- the driver process ---------------------------------------------------------------------------
def drive(config_path: str) -> None:
    """One driver: submit (or resume) the job and write what it measured beside the config."""
    config = json.loads(Path(config_path).read_text())
    install_stubs(config["settings"])
    from palstream.batch import runner
    from palstream.batch.runner import run_job
    from palstream.batch.spec import JobSpec

    prepared = {}
    original = runner._Execution._prepare_archives

    def timed_prepare(self):
        # How long the driver takes to find what is done (the resume target: <= 30 s at 10^6 units).
        t0 = time.perf_counter()
        original(self)
        prepared["seconds"] = time.perf_counter() - t0
        prepared["committed"] = self.units_committed

    runner._Execution._prepare_archives = timed_prepare
    progress_file = Path(config["progress"])
    last = [0.0]

    def on_progress(p):
        now = time.monotonic()
        if now - last[0] > 0.2:
            last[0] = now
            progress_file.write_text(f"{p.units_done} {p.units_total}")

    os.environ.update(config.get("env", {}))
    spec = JobSpec.from_dict(config["job"])
    t0 = time.perf_counter()
    report = run_job(spec, resume=config["resume"], on_progress=on_progress)
    result = {
        "seconds": time.perf_counter() - t0,
        "report": {k: v for k, v in report.to_dict().items() if k not in ("archives", "quarantined")},
        "quarantined": report.quarantined[:5],
        "complete": report.complete,
        "prepare_seconds": prepared.get("seconds"),
        "committed_at_start": prepared.get("committed"),
        "driver_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_cpu_seconds": round(_own_cpu_seconds(), 2),
    }
    Path(config["result"]).write_text(json.dumps(result))


# -- resume at 10^6 units without running them: a synthesized half-done job ---------------------
def synthesize_state(output: str, n_archives: int, per_archive: int, per_task: int, gop: int, finalized: bool) -> None:
    """The output of a job of ``n_archives x per_archive`` units killed at half its units.

    ``finalized``: the first half of the archives are complete (what a run in plan order leaves);
    otherwise every archive has its first half of units committed and none is finalized (the
    worst case for a resume: every commit record must be read).
    """
    from palstream.batch.commits import record_location, write_record
    from palstream.batch.plan import save_plan
    from palstream.batch.store import JOB_DIR, write_json

    plan = synthetic_plan(n_archives, per_archive, gop)
    root = Location(output)
    save_plan(root, plan)
    summary = {"outcome": "committed", "frames": gop, "raw_bytes": 96 * gop, "bytes": 64, "psnr_y": 50.0, "seconds": 0.001,
               "finished": 0.0, "stage_seconds": {"encode": 0.0}, "worker": "synthesized"}
    for i in range(n_archives):
        done = per_archive if (finalized and i < n_archives // 2) else (0 if finalized else per_archive // 2)
        if not done:
            continue
        attrs = {"n_chunks": per_archive, "status": "complete" if done == per_archive else "incomplete", "frame_count": gop * per_archive}
        write_json(plan.archive_location(root, i).child("zarr.json"), attrs)
        for first in range(0, done, per_task):
            write_record(record_location(root, i, first), [{**summary, "source": i, "index": j} for j in range(first, min(first + per_task, done))])
        if done == per_archive:
            write_json(root.child(JOB_DIR, "fixity", f"{i}.json"), {"files": {}, "bytes": 0, "payload_sha256": "", "payload_bytes": 0})


def synthetic_plan(n_archives: int, per_archive: int, gop: int):
    from palstream.batch.plan import Plan
    from palstream.codec import EncoderConfig

    info = {"url": "", "name": "", "size_bytes": 20, "sha256": "0" * 64, "width": 64, "height": 64,
            "frame_count": gop * per_archive, "fps": "25/1", "time_base": "1/25", "pix_fmt": "yuv420p",
            "color": {}, "truncated": None}
    probed = [(f"/lib/v{i:06d}.mkv", {**info, "url": f"/lib/v{i:06d}.mkv", "name": f"v{i:06d}.mkv"}, None) for i in range(n_archives)]
    return Plan.build(EncoderConfig(gop=gop), probed)


def time_prepare(output: str, result_path: str) -> None:
    """In a fresh driver process: load the plan and find what is done, as a resume does."""
    install_stubs({"gop": 16, "units_per_archive": 1, "encode_ms": 0, "payload_bytes": 64, "archive": "marker"})
    from distributed import Client, LocalCluster

    from palstream.batch.plan import load_plan
    from palstream.batch.runner import JobLog, _Execution
    from palstream.batch.spec import JobSpec

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        plan = load_plan(Location(output))
        loaded = time.perf_counter() - t0
        from palstream.batch.worker import generator_identity

        client.submit(generator_identity, plan.config.palette, pure=False).result()  # worker start-up, not resume work
        spec = JobSpec.from_dict({"inputs": ["/lib/x.mkv"], "output": output, "codec": {"gop": 16}})
        execution = _Execution(client, spec, plan, None, None, JobLog(Location(output)), "resume-bench")
        t0 = time.perf_counter()
        execution._prepare_archives()
        prepared = time.perf_counter() - t0
        units = plan.units()
        todo = [u for u in units if u.index not in execution.committed[u.source]]
        Path(result_path).write_text(json.dumps({
            "load_plan_seconds": round(loaded, 2), "prepare_seconds": round(prepared, 2),
            "committed_found": execution.units_committed, "finalized_found": len(execution.finalized),
            "units_left": len(todo), "driver_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }))


def resume_bench(args) -> dict:
    """Resume-finding time at ``--units`` for both synthesized states (see :func:`synthesize_state`)."""
    out = {}
    for finalized in (True, False):
        work = Path(tempfile.mkdtemp(prefix="scale-resume-", dir=args.workdir))
        output = str(work / "out")
        t0 = time.perf_counter()
        synthesize_state(output, args.archives, args.units // args.archives, args.units_per_task, args.gop, finalized)
        made = time.perf_counter() - t0
        result_path = work / "prepare.json"
        subprocess.run([sys.executable, __file__, "_prepare", output, str(result_path)], check=True)
        name = "half_the_archives_finalized" if finalized else "every_archive_half_done"
        out[name] = {**json.loads(result_path.read_text()), "state_build_seconds": round(made, 1)}
        print(name, out[name], flush=True)
    return out


# -- the experiment -------------------------------------------------------------------------------
def build_library(root: str, options: dict, n: int) -> None:
    """``n`` small distinct input files (what a probe hashes and a unit's size check reads)."""
    fs, path = Location(root, options).filesystem()
    if "file" in fs.protocol or "local" in fs.protocol:
        os.makedirs(path, exist_ok=True)
        for i in range(n):
            Path(path, f"v{i:06d}.mkv").write_bytes(f"synthetic video {i}\n".encode())
    else:
        fs.pipe({f"{path}/v{i:06d}.mkv": f"synthetic video {i}\n".encode() for i in range(n)})


def measure_plan(n_archives: int, per_archive: int, gop: int) -> dict:
    """Planning a library of ``n_archives x per_archive`` units: time, peak memory, plan size."""
    import tracemalloc

    from palstream.batch.plan import Plan, load_plan, save_plan
    from palstream.codec import EncoderConfig

    info = {"url": "", "name": "", "size_bytes": 20, "sha256": "0" * 64, "width": 64, "height": 64,
            "frame_count": gop * per_archive, "fps": "25/1", "time_base": "1/25", "pix_fmt": "yuv420p",
            "color": {}, "truncated": None}
    probed = [(f"/lib/v{i:06d}.mkv", {**info, "url": f"/lib/v{i:06d}.mkv", "name": f"v{i:06d}.mkv"}, None) for i in range(n_archives)]
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = Plan.build(EncoderConfig(gop=gop), probed)
    units = plan.units()
    build = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        save_plan(Location(out), plan)
        save = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_plan(Location(out))
        load = time.perf_counter() - t0
        size = Path(out, "_palstream", "plan.json").stat().st_size
    return {"units": len(units), "build_seconds": round(build, 2), "build_peak_mib": round(peak / 2**20, 1),
            "save_seconds": round(save, 2), "load_seconds": round(load, 2), "plan_json_mib": round(size / 2**20, 1)}


def run_driver(config: dict, work: Path, name: str, kill_at: float | None, cluster, client, elastic: bool) -> dict:
    """Run one driver process; sample the scheduler; kill it at ``kill_at`` of the units."""
    config = {**config, "progress": str(work / f"{name}.progress"), "result": str(work / f"{name}.json")}
    Path(config["progress"]).write_text("0 1")
    path = work / f"{name}.config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, __file__, "_drive", str(path)])
    samples, killed, events = [], False, []
    steps = iter([(0.2, "add"), (0.3, "kill"), (0.4, "remove")]) if elastic else iter(())
    step = next(steps, None)
    t0 = time.monotonic()
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            done, total = map(int, Path(config["progress"]).read_text().split())
            tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        except (ValueError, OSError):
            continue
        samples.append({"t": round(time.monotonic() - t0, 1), "units_done": done, "scheduler_tasks": tasks})
        while step is not None and done >= step[0] * total:  # every step that is due, before the kill
            events.append(change_workers(step[1], cluster, client, round(time.monotonic() - t0, 1)))
            step = next(steps, None)
        if kill_at is not None and done >= kill_at * total and not killed:
            proc.send_signal(signal.SIGKILL)
            killed = True
            events.append({"t": round(time.monotonic() - t0, 1), "event": "driver killed", "units_done": done})
    result = json.loads(Path(config["result"]).read_text()) if not killed else {"killed": True}
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["max_scheduler_tasks"] = max((s["scheduler_tasks"] for s in samples), default=0)
    result["events"] = events
    return result


def change_workers(what: str, cluster, client, t: float) -> dict:
    """Add a worker, kill one (SIGKILL: a preempted spot node; its nanny restarts it), or retire one."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if what == "add":
        cluster.scale(len(cluster.workers) + 1)
    elif what == "kill":
        pid = client.run(os.getpid, workers=[sorted(workers)[0]])[sorted(workers)[0]]
        os.kill(pid, signal.SIGKILL)
    else:
        cluster.scale(len(cluster.workers) - 1)
    return {"t": t, "event": f"worker {what}", "workers_before": len(workers)}


def check_exactly_once(output: str, options: dict, n_archives: int, per_archive: int, per_task: int, archive: str) -> dict:
    """Every unit committed, named by one commit record, and how many were written again."""
    from palstream.batch.commits import FOLDER
    from palstream.batch.store import JOB_DIR

    fs, root = Location(output, options).filesystem()
    records: dict[tuple[int, int], int] = {}
    names = fs.ls(f"{root}/{JOB_DIR}/{FOLDER}", detail=False)
    for blob in fs.cat(names).values():
        for line in blob.splitlines()[1:]:  # the first line names the record's units
            s = json.loads(line)
            records[(s["source"], s["index"])] = records.get((s["source"], s["index"]), 0) + 1
    out = {"units_in_index": len(records), "units_in_two_records": sum(1 for c in records.values() if c > 1)}
    if archive != "real":
        files = fs.find(f"{root}")

        def units(name: str) -> int:  # a format-4 object (s<shard>.*) stands for its shard's units
            stem = name.rsplit("/", 1)[-1].split(".")[0]
            return min(per_task, per_archive - int(stem[1:]) * per_task) if stem.startswith("s") else 1

        out["units_committed"] = sum(units(f) for f in files if f.endswith(".commit"))
        out["units_written_again"] = sum(units(f) for f in files if f.endswith(".again"))
        out["archives_complete"] = sum(
            1 for f in files if f.endswith(".zarr/zarr.json") and json.loads(fs.cat_file(f))["status"] == "complete"
        )
    out["all_units_committed_once"] = out["units_in_index"] == n_archives * per_archive and out["units_in_two_records"] == 0
    return out


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def archive_breakdown(chunks: int, shard_chunks: int | None = None) -> dict:
    """Requests per chunk of each archive operation on S3 (moto, counted), in this process: the real
    ``ArchiveWriter`` writing ``chunks`` stub chunks of one archive (format 3, or format 4 in shards
    of ``shard_chunks``), and what the batch reads of it."""
    import boto3

    from palstream import archive, io
    from palstream.batch.worker import archive_fixity
    from palstream.codec import EncodedChunk, EncoderConfig
    from palstream.codec.chunk import HEADER, MAGIC, VERSION

    s3 = CountingS3()
    boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    location = Location(f"s3://{BUCKET}/breakdown.zarr", s3_options(s3.endpoint))
    gop = 16
    info = io.SourceInfo(
        url="s3://in/v.mkv", name="v.mkv", size_bytes=1, sha256="0" * 64, width=64, height=64,
        frame_count=gop * chunks, fps="25/1", time_base="1/25", pix_fmt="yuv420p",
        color={"matrix": "bt709", "range": "tv", "primaries": "bt709", "transfer": "bt709", "chroma_location": "left"},
    )
    writer = archive.ArchiveWriter.create(location, info, EncoderConfig(gop=gop), shard_chunks=shard_chunks)
    body = 64 - HEADER.size
    payload = HEADER.pack(MAGIC, VERSION, 0, gop, 64, 64, 0, 0, 0, 0, body) + bytes(body)
    chunk = EncodedChunk(payload, {"frames": gop})
    if shard_chunks is None:
        writes = {
            "write_chunk": lambda: [writer.write_chunk(i, chunk) for i in range(chunks)],
            "write_chunk again (a duplicated task)": lambda: writer.write_chunk(0, chunk),
        }
    else:
        shards = range(-(-chunks // shard_chunks))
        writes = {
            "write_shard": lambda: [writer.write_shard(s, [chunk] * len(writer.shard_range(s))) for s in shards],
            "write_shard again (a duplicated task)": lambda: writer.write_shard(0, [chunk] * len(writer.shard_range(0))),
        }
    steps = {
        **writes,
        "uncommitted()": writer.uncommitted,
        "finalize()": writer.finalize,
        "archive_fixity() (batch)": lambda: archive_fixity(location),
        "committed_chunks() (the catalogue's one pass)": lambda: archive.open_archive(location).committed_chunks(),
        "read_chunk() of every chunk (decode)": lambda: [reader.read_chunk(i) for i in range(chunks)],
    }
    reader = archive.open_archive(location)
    out = {}
    for name, step in steps.items():
        s3.take()
        step()
        counts = {k: v for k, v in s3.take().items() if " " not in k}
        per = 1 if "again" in name else chunks
        out[name] = {k: round(v / per, 2) for k, v in sorted(counts.items())} | {"all": round(sum(counts.values()) / per, 2)}
        print(f"{name:45s} per {'call' if per == 1 else 'chunk'}: {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=1_000_000)
    ap.add_argument("--archives", type=int, default=10_000)
    ap.add_argument("--gop", type=int, default=16)
    ap.add_argument("--units-per-task", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-in-flight", type=int, default=0, help="tasks in flight (0: one per worker thread)")
    ap.add_argument("--encode-ms", type=float, default=0.0, help="stub encoder time per unit")
    ap.add_argument("--payload-bytes", type=int, default=64)
    ap.add_argument("--storage", choices=("local", "s3"), default="local")
    ap.add_argument("--archive", choices=("stub", "marker", "real"), default="stub")
    ap.add_argument("--kill-at", type=float, default=None, help="kill the driver at this fraction of units, then resume")
    ap.add_argument("--elastic", action="store_true", help="add, kill and retire workers during the first run")
    ap.add_argument("--resume-bench", action="store_true",
                    help="only time how a resume finds the done units of a synthesized half-done job of --units")
    ap.add_argument("--archive-breakdown", type=int, default=0, metavar="CHUNKS",
                    help="only count the S3 requests of each archive operation on one archive of CHUNKS chunks")
    ap.add_argument("--shard-chunks", type=int, default=None, metavar="K",
                    help="with --archive-breakdown: a format-4 archive in shards of K chunks (default: format 3)")
    ap.add_argument("--skip-plan-measure", action="store_true", help="do not time Plan.build on its own first")
    ap.add_argument("--trace-requests", default=None, metavar="FILE", help="with --storage s3: append each request's method and key here")
    ap.add_argument("--workdir", default=None, help="where the library and output go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.units % args.archives:
        ap.error("--units must be a multiple of --archives")
    per_archive = args.units // args.archives
    if args.archive_breakdown:
        result = {"args": vars(args), "requests_per_chunk": archive_breakdown(args.archive_breakdown, args.shard_chunks)}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if args.resume_bench:
        result = {"args": vars(args), "resume": resume_bench(args), "load_average": os.getloadavg()}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return

    import dask
    from distributed import Client, LocalCluster

    from palstream.batch.cluster import BUSY_MACHINE_CONFIG, worker_environment

    result: dict = {"args": vars(args), "plan": None if args.skip_plan_measure else measure_plan(args.archives, per_archive, args.gop)}
    print("plan:", result["plan"], flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    s3 = CountingS3(args.trace_requests) if args.storage == "s3" else None
    if s3 is not None:
        import boto3

        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        inputs, output, options = f"s3://{BUCKET}/in", f"s3://{BUCKET}/out", s3_options(s3.endpoint)
        storage = {"endpoint_url": s3.endpoint}
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
    else:
        inputs, output, options, storage, env = str(work / "in"), str(work / "out"), {}, {}, {}
    t0 = time.perf_counter()
    build_library(inputs, options, args.archives)
    result["library_seconds"] = round(time.perf_counter() - t0, 1)
    settings = {"gop": args.gop, "units_per_archive": per_archive, "encode_ms": args.encode_ms,
                "payload_bytes": args.payload_bytes, "archive": args.archive}
    cpu_before = _cpu_seconds()
    load_before = os.getloadavg()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {**worker_environment(), **env}, **BUSY_MACHINE_CONFIG}):
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40)
    client = Client(cluster)
    client.register_plugin(Stubs(settings))
    job = {"inputs": [f"{inputs}/*.mkv"], "output": output, "cluster": cluster.scheduler_address, "codec": {"gop": args.gop},
           "units_per_task": args.units_per_task, "max_in_flight": args.max_in_flight, "storage": storage}
    # A remote root's catalogue is a cache file keyed by the root's URL: a fresh one per run, or a
    # rerun on the same bucket name would find every (byte-identical) archive indexed already.
    env = {**env, "XDG_CACHE_HOME": str(work / "cache")}
    config = {"settings": settings, "job": job, "env": env}
    runs = []
    if s3 is not None:
        s3.take()
    first = run_driver({**config, "resume": False}, work, "run1", args.kill_at, cluster, client, args.elastic)
    first["requests"] = s3.take() if s3 else None
    runs.append(first)
    print("run 1:", first, flush=True)
    if args.kill_at is not None:
        time.sleep(1.0)  # the scheduler releases the dead driver's tasks
        second = run_driver({**config, "resume": True}, work, "resume", None, cluster, client, False)
        second["requests"] = s3.take() if s3 else None
        runs.append(second)
        print("resume:", second, flush=True)
    result["runs"] = runs
    result["check"] = check_exactly_once(output, options, args.archives, per_archive, args.units_per_task, args.archive)
    total_requests: dict[str, int] = {}
    for run in runs:
        for kind, n in (run.get("requests") or {}).items():
            total_requests[kind] = total_requests.get(kind, 0) + n
    if s3 is not None:
        result["requests_per_unit"] = {k: round(v / args.units, 3) for k, v in sorted(total_requests.items())}
        result["requests_per_unit"]["all"] = round(sum(v for k, v in total_requests.items() if " " not in k) / args.units, 3)
    wall = sum(r["wall_seconds"] for r in runs)
    result["wall_seconds"] = round(wall, 1)
    result["overhead_ms_per_unit"] = round((wall * args.workers - args.units * args.encode_ms / 1000) / args.units * 1000, 3)
    print("check:", result["check"], flush=True)
    print(f"wall {wall:.0f} s for {args.units} units: {result['overhead_ms_per_unit']} ms per unit per worker outside the encoder")
    if s3 is not None:
        print("requests per unit:", result["requests_per_unit"])
    # Where the CPU went: the workers alive now (a killed worker's share is only in the total below)
    # and this process (the scheduler, the cluster's nannies and, on S3, moto).
    result["worker_cpu_seconds"] = sorted(round(v, 1) for v in client.run(_own_cpu_seconds).values())
    result["scheduler_process_cpu_seconds"] = round(_own_cpu_seconds(), 1)
    client.close()
    cluster.close()
    # Every process of the run: the scheduler (in this process), the drivers and the workers
    # (children, reaped by now): CPU time does not grow with the machine's other load as wall time does.
    cpu = _cpu_seconds() - cpu_before
    result["cpu_seconds"] = round(cpu, 1)
    result["cpu_ms_per_unit_outside_encoder"] = round((cpu - args.units * args.encode_ms / 1000) / args.units * 1000, 3)
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    print(f"CPU {cpu:.0f} s of all processes: {result['cpu_ms_per_unit_outside_encoder']} ms per unit outside the encoder; "
          f"load average {load_before} -> {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_drive":
        drive(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "_prepare":
        time_prepare(sys.argv[2], sys.argv[3])
    else:
        main()
