"""Batch jobs on real Dask clusters, real processes and a real S3 server (moto) on 127.0.0.1.

Every archive a job writes must be the same, chunk for chunk, as the in-process
``palstream encode`` path (``pipeline.encode_file``) with the same settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dask
import pytest
from typer.testing import CliRunner

from palstream.archive import open_archive
from palstream.batch import cluster as batch_cluster
from palstream.batch.runner import run_job
from palstream.batch.spec import JobSpec
from palstream.batch.status import EXIT_FAILED, job_status
from palstream.batch.store import JobLockedError
from palstream.cli import app
from palstream.codec import EncoderConfig
from palstream.pipeline import encode_file
from palstream.storage import Location

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GOOD = ("batch_testsrc_64x48.mkv", "batch_mandel_48x32.mkv")  # 12 and 8 frames
GOP = 2


# Ceilings for waits on observed progress, sized for a loaded 2-core machine (a fresh worker
# process imports torch and loads the codec's kernels first); a wait ends as soon as it sees it.
DRIVER_START_CEILING = 900
OUTAGE_CEILING = 300
OUTAGE = 3.0  # seconds the object store stays down once a unit is running against it


def wait_for(condition, what: str, ceiling: float) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``ceiling`` seconds."""
    deadline = time.monotonic() + ceiling
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {ceiling:.0f} s"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    lib = tmp_path_factory.mktemp("library")
    for name in GOOD:
        shutil.copy(DATA / name, lib / name)
    return lib


@pytest.fixture(scope="module")
def reference(library, tmp_path_factory) -> dict[str, list[bytes]]:
    """Chunk payloads of each good clip encoded in-process, as `palstream encode` does."""
    out = tmp_path_factory.mktemp("reference")
    refs = {}
    for name in GOOD:
        archive = encode_file(str(library / name), str(out / f"{name}.zarr"), EncoderConfig(gop=GOP))
        refs[name] = [archive.read_chunk(i) for i in range(archive.n_chunks)]
    return refs


def assert_identical(output: str, reference: dict, options: dict | None = None, names=GOOD, archives=()) -> None:
    """Archives under ``output`` (at ``<stem>.zarr``, or at the one of ``archives`` named so) equal the reference."""
    for name in names:
        stem = f"{Path(name).stem}.zarr"
        path = next((a for a in archives if a.endswith(f"/{stem}")), stem)
        archive = open_archive(f"{output}/{path}", options)
        assert archive.complete, name
        assert archive.verify() == []
        payloads = [archive.read_chunk(i) for i in range(archive.n_chunks)]
        assert payloads == reference[name], f"{name}: job output differs from in-process encode"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_job_completes_quarantines_corrupt_input_exports_metrics_and_matches_encode(library, reference, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    shutil.copy(DATA / "corrupt.mkv", lib / "broken.mkv")
    out = tmp_path / "out"
    targets = tmp_path / "workers.json"
    spec = JobSpec.from_dict({"inputs": [str(lib / "*.mkv")], "output": str(out), "workers": 2, "codec": {"gop": GOP}})
    port = free_port()
    seen = {}

    def on_progress(p):
        if seen:
            return
        seen["driver"] = scrape(f"http://127.0.0.1:{port}/metrics")
        workers = p.client.scheduler_info(n_workers=-1)["workers"]
        seen["workers"] = [scrape(f"http://127.0.0.1:{w['services']['dashboard']}/metrics") for w in workers.values()]
        seen["malloc"] = p.client.run(lambda: {k: int(os.environ[k]) for k in batch_cluster.WORKER_MALLOC})
        # A second run on the same output while this one holds it is refused before any work.
        with pytest.raises(JobLockedError, match="in use by another palstream run"):
            run_job(spec)
        seen["status"] = job_status(str(out))

    report = run_job(spec, metrics_port=port, on_progress=on_progress, worker_targets=str(targets))

    assert [q["input"] for q in report.quarantined] == [str(lib / "broken.mkv")]
    assert "corrupt" in report.quarantined[0]["reason"]
    assert report.archives == {"batch_mandel_48x32.zarr": "complete", "batch_testsrc_64x48.zarr": "complete"}
    assert report.units_encoded == report.units_total == 6 + 4
    assert_identical(str(out), reference)
    assert not (out / "_palstream" / "SUCCESS").exists()  # a quarantined input: the job is not a success
    assert not (out / "_palstream" / "lock.json").exists()

    assert "palstream_job_units{" in seen["driver"] and "palstream_job_workers " in seen["driver"]
    assert len(seen["workers"]) == 2
    assert all("palstream_encoded_frames_total" in text and "palstream_stage_duration_seconds_bucket" in text for text in seen["workers"])
    assert any("palstream_encoded_frames_total 0.0" not in text for text in seen["workers"])
    assert len(json.loads(targets.read_text())[0]["targets"]) == 2
    assert list(seen["malloc"].values()) == [batch_cluster.WORKER_MALLOC] * 2
    assert seen["status"]["state"] == "running" and f"pid {os.getpid()}" in seen["status"]["running_by"]
    assert 1 <= seen["status"]["units_done"] < 10

    status = job_status(str(out))
    assert status["state"] == "incomplete" and status["units_done"] == status["units_total"] == 10
    states = {v["name"]: v["state"] for v in status["videos"]}
    assert states == {"batch_mandel_48x32.mkv": "complete", "batch_testsrc_64x48.mkv": "complete", "broken.mkv": "quarantined"}
    assert all(v["ratio"] > 1 for v in status["videos"] if v["state"] == "complete")

    result = CliRunner().invoke(app, ["status", str(out)])
    assert result.exit_code == EXIT_FAILED  # finished, with a quarantined input
    assert "batch_testsrc_64x48.mkv" in result.output and "quarantined: " in result.output

    # Fixing the library means a new job; rerunning the same one recomputes nothing.
    again = run_job(spec)
    assert again.units_encoded == 0 and again.units_skipped == 10


def test_sigkill_of_a_worker_mid_job_loses_and_duplicates_nothing(library, reference, tmp_path):
    out = tmp_path / "out"
    spec = JobSpec.from_dict(
        {"inputs": [str(library / "*.mkv")], "output": str(out), "workers": 2, "max_in_flight": 4, "codec": {"gop": GOP}}
    )
    killed = []

    def on_progress(p):
        # Kill at the first progress report where a worker holds a unit and units remain: where
        # the job is then depends on the machine's load, so no fixed delay decides it.
        if killed or p.units_done == p.units_total:
            return
        busy = [addr for addr, keys in p.client.processing().items() if keys]
        if busy:
            pid = p.client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(p.units_done)

    report = run_job(spec, on_progress=on_progress)
    assert killed and killed[0] < 10, "no worker held a unit at any progress report: nothing was killed mid-job"
    assert report.complete and not report.quarantined
    # Every unit was reported exactly once.
    assert report.units_encoded == report.units_total == 10 and report.units_skipped == 0
    assert_identical(str(out), reference)
    assert (out / "_palstream" / "SUCCESS").exists()


# A driver in its own process that stops at its first committed unit, until the test kills it: the
# kill lands mid-job however fast or slow the machine is (no unit is in flight then).
HELD_DRIVER = """
import sys, time
from pathlib import Path
from palstream.batch.runner import run_job
from palstream.batch.spec import JobSpec

out, held, gop, *inputs = sys.argv[1:]

def hold(progress):
    Path(held).write_text(str(progress.units_done))
    time.sleep(3600)

spec = JobSpec.from_dict({"inputs": inputs, "output": out, "workers": 1, "max_in_flight": 1, "codec": {"gop": int(gop)}})
run_job(spec, on_progress=hold)
"""


def test_sigkill_of_the_driver_then_resume_finishes_without_recomputing(library, reference, tmp_path):
    out = tmp_path / "out"
    held = tmp_path / "held"
    driver = subprocess.Popen(
        [sys.executable, "-c", HELD_DRIVER, str(out), str(held), str(GOP), *(str(library / n) for n in GOOD)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_for(lambda: held.exists() or driver.poll() is not None, "the driver's first committed unit", DRIVER_START_CEILING)
        assert driver.poll() is None, f"the driver ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        # Its local cluster's processes too (they would exit once their parent's pipe closes).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.stderr.close()
    assert held.read_text() == "1"
    assert (out / "_palstream" / "lock.json").exists()  # left behind by the killed driver
    # Archives are created when their first units are submitted: the second may not exist yet.
    archives = [out / f"{Path(n).stem}.zarr" for n in GOOD]
    committed = sum(len(open_archive(str(a)).committed()) for a in archives if a.exists())
    assert committed == 1

    result = CliRunner().invoke(app, ["resume", str(out), "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    # Committed units were not recomputed.
    assert f"{10 - committed} unit(s) encoded, {committed} already committed" in result.output
    assert_identical(str(out), reference)
    assert (out / "_palstream" / "SUCCESS").exists()


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 with throw-away credentials in the environment."""
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "palstream-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "palstream-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    state = {"server": server, "port": port}
    yield state
    state["server"].stop()


def test_s3_job_survives_a_restart_of_the_object_store(library, reference, s3_server):
    import s3fs

    endpoint = f"http://127.0.0.1:{s3_server['port']}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("library")
    fs.mkdir("archive")
    fs.put_file(str(library / GOOD[1]), f"library/{GOOD[1]}")
    spec = JobSpec.from_dict(
        {
            "inputs": [str(library / GOOD[0]), "s3://library/*.mkv"],  # a local file and an S3 glob
            "output": "s3://archive/job",
            "workers": 2,
            "max_in_flight": 2,
            "codec": {"gop": GOP},
            "storage": {"endpoint_url": endpoint},
        }
    )
    restarted = threading.Event()
    stopped = threading.Event()

    def restart_when_a_unit_waited(client):
        from moto.server import ThreadedMotoServer

        # Keep the store down until one unit has been on a worker for OUTAGE seconds of it (its
        # reads and writes retry meanwhile), however long the machine takes to get there.
        since: dict[str, float] = {}

        def a_unit_waited() -> bool:
            now = time.monotonic()
            keys = {k for held in client.processing().values() for k in held}
            for key in set(since) - keys:
                del since[key]
            return any(now - since.setdefault(key, now) >= OUTAGE for key in keys)

        try:
            wait_for(a_unit_waited, f"unit on a worker for {OUTAGE:.0f} s of the outage", OUTAGE_CEILING)
        finally:  # the job must be able to finish either way; the assertions below tell
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_server["port"], verbose=False)
            server.start()
            s3_server["server"] = server
            restarted.set()

    def on_progress(p):
        if not stopped.is_set():
            stopped.set()
            s3_server["server"].stop()
            threading.Thread(target=restart_when_a_unit_waited, args=(p.client,), daemon=True).start()

    report = run_job(spec, on_progress=on_progress)
    assert restarted.is_set()
    assert report.complete and report.units_encoded == 10, (report.archives, report.quarantined)
    summaries = [json.loads(line) for p in fs.find("archive/job/_palstream/commits") for line in fs.cat_file(p).splitlines()[1:]]
    assert max(s["seconds"] for s in summaries) > OUTAGE - 1  # some unit waited out the outage and then committed
    options = spec.storage.options("s3://archive/job")
    # A local and an S3 input share no folder: each archive is under its protocol's folder.
    assert_identical("s3://archive/job", reference, options, archives=report.archives)
    status = job_status(Location("s3://archive/job", options))
    assert status["state"] == "complete"
    assert "palstream-test-secret" not in json.dumps(status)
    stored = b"".join(fs.cat_file(p) for p in fs.find("archive/job/_palstream"))
    assert b"palstream-test-secret" not in stored and b"palstream-test" not in stored


def test_an_s3_job_writes_a_shard_per_task_and_resumes_a_task_killed_before_its_marker(library, reference, s3_server):
    """Format 4 on S3: a task of 4 units writes one shard object and one marker; a task killed
    between its shard and its marker left nothing committed (nor its commit record), and the
    resume writes that shard whole again, byte-identical to the in-process encode."""
    import s3fs

    endpoint = f"http://127.0.0.1:{s3_server['port']}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("sharded")
    spec = JobSpec.from_dict({"inputs": [str(library / n) for n in GOOD], "output": "s3://sharded/job", "workers": 1,
                              "units_per_task": 4, "codec": {"gop": GOP}, "storage": {"endpoint_url": endpoint}})
    report = run_job(spec)
    assert report.complete and report.units_encoded == 10, report.to_dict()
    options = spec.storage.options("s3://sharded/job")
    assert_identical("s3://sharded/job", reference, options)
    testsrc = "sharded/job/batch_testsrc_64x48.zarr"  # 12 frames in GOPs of 2: 6 units, shards [0..3] and [4, 5]
    assert open_archive(f"s3://{testsrc}", options).attrs["shard_chunks"] == 4
    assert sorted(p[len(testsrc) + 1 :] for p in fs.find(testsrc) if p.split("/")[-2] in ("c", "000000", "000001")) == [
        "chunks/c/0", "chunks/c/1", "commits/000000/zarr.json", "commits/000001/zarr.json"]
    # The second task of testsrc "killed" after its shard: no marker, no commit record, no finalize.
    record = next(p for p in fs.ls("sharded/job/_palstream/commits") if p.endswith("-4.jsonl"))
    fs.rm([record, f"{testsrc}/commits/000001/zarr.json"])
    fs.rm("sharded/job/_palstream/fixity", recursive=True)
    fs.rm("sharded/job/_palstream/SUCCESS")
    resumed = run_job(spec, resume=True)
    assert resumed.complete and resumed.units_encoded == 2 and resumed.units_skipped == 8, resumed.to_dict()
    assert_identical("s3://sharded/job", reference, options)


def test_a_job_planned_before_format_4_keeps_writing_format_3(library, reference, tmp_path):
    """A plan without ``shard_chunks`` (written by an earlier palstream) resumes in format 3."""
    from palstream.batch.plan import Plan, load_plan, save_plan

    out = tmp_path / "out"
    spec = JobSpec.from_dict({"inputs": [str(library / GOOD[1])], "output": str(out), "workers": 1, "units_per_task": 2,
                              "codec": {"gop": GOP}})
    assert run_job(spec).complete
    plan = load_plan(Location(str(out)))
    assert plan.shard_chunks == 2
    # As an earlier version left it: its plan, and a run killed before any unit was committed.
    (out / "_palstream" / "plan.json").unlink()
    save_plan(Location(str(out)), Plan.from_data({k: v for k, v in plan.data.items() if k != "shard_chunks"}))
    for name in ("batch_mandel_48x32.zarr", "_palstream/commits", "_palstream/fixity", "_palstream/SUCCESS"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    resumed = run_job(spec, resume=True)
    assert resumed.complete and resumed.units_encoded == 4
    archive = open_archive(str(out / "batch_mandel_48x32.zarr"))
    assert archive.attrs["format_version"] == 3 and (out / "batch_mandel_48x32.zarr" / "chunks" / "000003" / "c" / "0").exists()
    assert_identical(str(out), reference, names=GOOD[1:])


def test_units_of_a_source_that_breaks_mid_job_are_quarantined_on_an_existing_scheduler(library, reference, tmp_path):
    from distributed import LocalCluster

    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    out = tmp_path / "out"
    with dask.config.set(batch_cluster.BUSY_MACHINE_CONFIG):
        external = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    spec = JobSpec.from_dict(
        {"inputs": [str(lib / "*.mkv")], "output": str(out), "cluster": external.scheduler_address, "max_in_flight": 1,
         "retries": 1, "codec": {"gop": GOP}}
    )
    broken = []

    def on_progress(p):
        # Units run largest first: all of the 64x48 clip, then the 48x32 one, which breaks now.
        if not broken:
            shutil.copy(DATA / "corrupt.mkv", lib / GOOD[1])
            broken.append(True)

    try:
        report = run_job(spec, on_progress=on_progress)
        assert len(external.scheduler.workers) == 1  # an external cluster is left running
    finally:
        batch_cluster.close_cluster(external)
    assert [(q["input"], q["unit"]) for q in report.quarantined] == [(str(lib / GOOD[1]), 0)]
    assert "the source changed since it was planned" in report.quarantined[0]["reason"]
    assert report.archives == {"batch_testsrc_64x48.zarr": "complete", "batch_mandel_48x32.zarr": "incomplete"}
    assert_identical(str(out), reference, names=GOOD[:1])
    assert not open_archive(str(out / "batch_mandel_48x32.zarr")).complete
    states = {v["name"]: v["state"] for v in job_status(str(out))["videos"]}
    assert states == {GOOD[0]: "complete", GOOD[1]: "quarantined"}
