"""Batch jobs on real Dask clusters, real processes and a real S3 server (moto) on 127.0.0.1.

Every archive a job writes must be the same, chunk for chunk, as the in-process
``palstream encode`` path (``pipeline.encode_file``) with the same settings.
"""

from __future__ import annotations

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

import pytest
from typer.testing import CliRunner

from palstream.archive import open_archive
from palstream.pipeline import encode_file
from palstream.batch import cluster as batch_cluster
from palstream.batch.runner import run_job
from palstream.batch.spec import JobSpec
from palstream.batch.status import job_status
from palstream.batch.store import JobLockedError
from palstream.cli import app
from palstream.codec import EncoderConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GOOD = ("batch_testsrc_64x48.mkv", "batch_mandel_48x32.mkv")  # 12 and 8 frames
GOP = 2


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


def assert_identical(output: str, reference: dict, options: dict | None = None, names=GOOD) -> None:
    for name in names:
        archive = open_archive(f"{output}/{Path(name).stem}.zarr", options)
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
    assert result.exit_code == 0
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
        if killed:
            return
        busy = [addr for addr, keys in p.client.processing().items() if keys]
        assert busy, "no worker is running a unit: nothing to kill mid-job"
        pid = p.client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    report = run_job(spec, on_progress=on_progress)
    assert killed
    assert report.complete and not report.quarantined
    # Every unit was reported exactly once.
    assert report.units_encoded == report.units_total == 10 and report.units_skipped == 0
    assert_identical(str(out), reference)
    assert (out / "_palstream" / "SUCCESS").exists()


def test_sigkill_of_the_driver_then_resume_finishes_without_recomputing(library, reference, tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "palstream.cli", "submit", *(str(library / n) for n in GOOD), "--out", str(out),
         "--workers", "1", "--max-in-flight", "1", "--gop", str(GOP), "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    units = out / "_palstream" / "units"
    try:
        deadline = time.monotonic() + 180
        # Kill at the first committed unit: a unit of these tiny clips takes tens of ms, so a
        # slower poll could see the whole job finish first.
        while not (units.exists() and any(units.glob("*.json"))):
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no unit committed within 180 s"
            time.sleep(0.005)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        time.sleep(1.0)  # its worker processes exit when their parent's pipe closes; make sure
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (out / "_palstream" / "lock.json").exists()  # left behind by the killed driver
    committed = sum(len(open_archive(str(out / f"{Path(n).stem}.zarr")).committed()) for n in GOOD)
    assert 1 <= committed < 10

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

    def restart_later():
        from moto.server import ThreadedMotoServer

        time.sleep(3.0)  # down long enough that tasks hit refused connections
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_server["port"], verbose=False)
        server.start()
        s3_server["server"] = server
        restarted.set()

    def on_progress(p):
        if not stopped.is_set():
            stopped.set()
            s3_server["server"].stop()
            threading.Thread(target=restart_later, daemon=True).start()

    report = run_job(spec, on_progress=on_progress)
    assert restarted.is_set()
    assert report.complete and report.units_encoded == 10
    summaries = [json.loads(fs.cat_file(p)) for p in fs.find("archive/job/_palstream/units")]
    assert max(s["seconds"] for s in summaries) > 2.0  # some unit waited out the outage and then committed
    options = spec.storage.options("s3://archive/job")
    assert_identical("s3://archive/job", reference, options)
    status = job_status("s3://archive/job", options)
    assert status["state"] == "complete"
    assert "palstream-test-secret" not in json.dumps(status)
    stored = b"".join(fs.cat_file(p) for p in fs.find("archive/job/_palstream"))
    assert b"palstream-test-secret" not in stored and b"palstream-test" not in stored


def test_units_of_a_source_that_breaks_mid_job_are_quarantined_on_an_existing_scheduler(library, reference, tmp_path):
    from distributed import LocalCluster

    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    out = tmp_path / "out"
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
        external.close()
    assert [(q["input"], q["unit"]) for q in report.quarantined] == [(str(lib / GOOD[1]), 0)]
    assert "corrupt" in report.quarantined[0]["reason"]
    assert report.archives == {"batch_testsrc_64x48.zarr": "complete", "batch_mandel_48x32.zarr": "incomplete"}
    assert_identical(str(out), reference, names=GOOD[:1])
    assert not open_archive(str(out / "batch_mandel_48x32.zarr")).complete
    states = {v["name"]: v["state"] for v in job_status(str(out))["videos"]}
    assert states == {GOOD[0]: "complete", GOOD[1]: "quarantined"}
