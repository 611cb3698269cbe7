"""Batch system: job specs, plans, the output lock, storage checks, metrics names, cluster choice.

Fast tests without a Dask cluster; jobs on real clusters are in test_batch_jobs.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from palstream.batch import cluster as batch_cluster
from palstream.batch.cli import _merge
from palstream.batch.plan import Plan, PlannedSource, RejectedSource, archive_name, expand_inputs, load_plan, save_plan
from palstream.batch.spec import JobSpec, StorageSpec, load_job_file
from palstream.batch.store import JobLock, JobLockedError, check_writable
from palstream.batch.worker import Task, UnitTask
from palstream.codec import EncoderConfig
from palstream.errors import ArchiveError, ConfigError, InputError
from palstream.io import SourceInfo
from palstream.storage import Location

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- job specs --------------------------------------------------------------------------------


def test_job_file_round_trip_and_relative_paths(tmp_path):
    job = write(
        tmp_path / "job.toml",
        'inputs = ["clips/*.mkv", "s3://bucket/a.mkv"]\noutput = "out"\nworkers = 3\nretries = 1\n'
        "[codec]\ngop = 8\nlossless = true\n[storage]\nendpoint_url = \"http://127.0.0.1:9000\"\nregion = \"eu-1\"\n",
    )
    spec = JobSpec.from_dict(load_job_file(job))
    assert spec.inputs == (str(tmp_path / "clips/*.mkv"), "s3://bucket/a.mkv")
    assert spec.output == str(tmp_path / "out")
    assert (spec.workers, spec.retries, spec.threads_per_worker, spec.cluster) == (3, 1, 1, "local")
    assert spec.codec == EncoderConfig(gop=8, lossless=True)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert spec.storage.options("s3://bucket/x") == {
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-1"},
    }
    assert spec.storage.options(str(tmp_path)) == {}


def test_precedence_command_line_over_job_file_over_defaults(tmp_path):
    job = write(tmp_path / "job.toml", 'inputs = ["a.mkv"]\noutput = "out"\nworkers = 3\n[codec]\ngop = 8\ntarget_psnr = 40.0\n')
    spec = JobSpec.from_dict(_merge(load_job_file(job), {"workers": 1, "codec": {"gop": 4}}))
    assert spec.workers == 1  # command line beats job file
    assert spec.codec.gop == 4
    assert spec.codec.target_psnr == 40.0  # job file beats default
    assert spec.codec.max_palette == EncoderConfig().max_palette  # default
    assert spec.retries == 2


@pytest.mark.parametrize(
    "text, field",
    [
        ('inputs = ["a.mkv"]\noutput = "o"\nworkers = "two"\n', "workers"),
        ('inputs = ["a.mkv"]\noutput = "o"\nwrkers = 2\n', "wrkers"),
        ('output = "o"\n', "inputs"),
        ('inputs = ["a.mkv"]\n', "output"),
        ('inputs = ["a.mkv"]\noutput = "o"\ncluster = "kubernetes"\n', "cluster"),
        ('inputs = ["a.mkv"]\noutput = "o"\n[codec]\ntarget_psnr = 99.0\n', "codec"),
        ('inputs = ["a.mkv"]\noutput = "o"\n[codec]\ngop = "big"\n', "codec"),
        ('inputs = ["a.mkv"]\noutput = "o"\n[codec]\npalete = "kmeans"\n', "palete"),
        ('inputs = ["a.mkv"]\noutput = "o"\n[storage]\nsecret = "hunter2"\n', "storage.secret"),
        ('inputs = ["a.mkv"]\noutput = "o"\nretries = -1\n', "retries"),
        ('inputs = ["a.mkv"\noutput = "o"\n', "line 2"),
    ],
)
def test_malformed_job_file_is_one_line_error_naming_the_field(tmp_path, text, field):
    job = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        JobSpec.from_dict(load_job_file(job), where=str(job))
    message = str(err.value)
    assert "\n" not in message
    assert field in message
    assert "hunter2" not in message


def test_storage_profile_fills_unset_fields_and_never_holds_secrets(tmp_path, monkeypatch):
    profiles = write(
        tmp_path / "profiles.toml",
        '[profiles.lab]\nendpoint_url = "http://10.0.0.5:9000"\nregion = "lab-1"\naws_profile = "archive"\n',
    )
    monkeypatch.setenv("PALSTREAM_STORAGE_PROFILES", str(profiles))
    spec = StorageSpec.from_dict({"profile": "lab", "region": "override-1"})
    assert spec.endpoint_url == "http://10.0.0.5:9000"
    assert spec.region == "override-1"
    assert spec.options("s3://b/k")["profile"] == "archive"
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        StorageSpec.from_dict({"profile": "nope"})
    write(profiles, '[profiles.bad]\nkey = "AKIA"\n')
    with pytest.raises(ConfigError, match="credentials do not belong"):
        StorageSpec.from_dict({"profile": "bad"})


def test_example_job_files_are_valid(monkeypatch):
    monkeypatch.setenv("PALSTREAM_STORAGE_PROFILES", str(ROOT / "storage" / "profiles.example.toml"))
    for job in sorted((ROOT / "jobs").glob("*.toml")):
        spec = JobSpec.from_dict(load_job_file(job), where=str(job))
        assert spec.inputs and spec.output
    demo = JobSpec.from_dict(load_job_file(ROOT / "jobs" / "demo.toml"))
    assert demo.inputs == (str(ROOT / "palstream" / "data" / "demo.mkv"),)
    assert demo.cluster == "local"


# -- plan -------------------------------------------------------------------------------------


def _info(name: str, frames: int) -> dict:
    return {"url": f"/v/{name}", "name": name, "size_bytes": 1, "sha256": "0" * 64, "width": 64, "height": 48,
            "frame_count": frames, "fps": "25/1", "time_base": "1/25", "pix_fmt": "yuv420p", "color": {}}


def test_plan_units_are_gop_aligned_and_hash_is_content_based(tmp_path):
    config = EncoderConfig(gop=4)
    probed = [("/v/a.mkv", _info("a.mkv", 10), None), ("/v/bad.mkv", None, "bad.mkv is corrupt"), ("/v/b.mkv", _info("b.mkv", 4), None)]
    plan = Plan.build(config, probed)
    assert plan.sources[0].units == ((0, 4), (4, 4), (8, 2))
    assert plan.sources[1].units == ((0, 4),)
    assert plan.rejected == (RejectedSource("/v/bad.mkv", "bad.mkv", "bad.mkv is corrupt"),)
    assert plan.data["rejected"] == [{"url": "/v/bad.mkv", "path": "bad.mkv", "reason": "bad.mkv is corrupt"}]  # plan.json as before
    assert [(u.source, u.index, u.start, u.count) for u in plan.units()][:3] == [(0, 0, 0, 4), (0, 1, 4, 4), (0, 2, 8, 2)]
    assert Plan.build(config, probed).hash == plan.hash
    assert Plan.build(EncoderConfig(gop=5), probed).hash != plan.hash

    out = Location(str(tmp_path / "out"))
    save_plan(out, plan)
    save_plan(out, plan)  # the same plan again: kept
    assert load_plan(out).hash == plan.hash
    with pytest.raises(ConfigError, match="already holds a different job"):
        save_plan(out, Plan.build(EncoderConfig(gop=5), probed))
    stored = tmp_path / "out" / "_palstream" / "plan.json"
    data = json.loads(stored.read_text())
    data["sources"][0]["units"][0] = [0, 3]
    stored.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="modified after it was written"):
        load_plan(out)


def test_plan_sources_are_records_and_the_plan_file_keeps_its_json_form(tmp_path):
    config = EncoderConfig(gop=4)
    info = SourceInfo.from_dict(_info("a.mkv", 6))
    plan = Plan.build(config, [("/v/a.mkv", info.to_dict(), None)])
    src = plan.sources[0]
    assert src == PlannedSource("/v/a.mkv", "a.mkv", "a.zarr", info, ((0, 4), (4, 2)))
    assert src.info.frame_count == 6 and src.name == "a.mkv"
    # The JSON form (and so the job's identity) is the one earlier versions wrote by hand.
    written = {"url": "/v/a.mkv", "path": "a.mkv", "archive": "a.zarr", "info": info.to_dict(), "units": [[0, 4], [4, 2]]}
    assert plan.data["sources"] == [written]
    assert plan.hash == Plan.from_data({"version": 2, "codec": config.to_dict(), "sources": [written], "rejected": []}).hash
    assert PlannedSource.from_dict(written).to_dict() == written

    # A version 1 plan (no source paths) still reads; one whose probe result lacks a field is refused in one line.
    old = {"version": 1, "codec": config.to_dict(), "sources": [{k: v for k, v in written.items() if k != "path"}], "rejected": []}
    stored = tmp_path / "out" / "_palstream" / "plan.json"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({**old, "hash": Plan.from_data(old).hash}))
    loaded = load_plan(Location(str(tmp_path / "out")))
    assert loaded.sources[0].path is None and loaded.sources[0].name == "a.mkv"
    assert loaded.sources[0].to_dict() == old["sources"][0]
    del old["sources"][0]["info"]["pix_fmt"]
    stored.write_text(json.dumps({**old, "hash": Plan.from_data(old).hash}))
    with pytest.raises(ConfigError, match=r"source 0: its probe result lacks fields .*start a new output"):
        load_plan(Location(str(tmp_path / "out")))

    # Refused inputs are records too: a version 1 entry (no path) is named by its file name; a
    # malformed one is refused in one line.
    old = {"version": 1, "codec": config.to_dict(), "sources": [], "rejected": [{"url": "/v/bad.mkv", "reason": "corrupt"}]}
    stored.write_text(json.dumps({**old, "hash": Plan.from_data(old).hash}))
    loaded = load_plan(Location(str(tmp_path / "out")))
    assert loaded.rejected == (RejectedSource("/v/bad.mkv", None, "corrupt"),) and loaded.rejected[0].name == "bad.mkv"
    assert loaded.rejected[0].to_dict() == old["rejected"][0]
    old["rejected"][0]["reason"] = None
    stored.write_text(json.dumps({**old, "hash": Plan.from_data(old).hash}))
    with pytest.raises(ConfigError, match=r"rejected input 0 is malformed; restore it"):
        load_plan(Location(str(tmp_path / "out")))


def test_a_task_crosses_the_dask_boundary_as_records():
    """What the driver submits pickles to equal records (Dask ships it to a worker process)."""
    unit = UnitTask(0, 1, 4, 4, Location("s3://lib/a.mkv", {"anon": True}), 8, 100, False, Location("/out/a.zarr"))
    task = Task((unit,), EncoderConfig(gop=4), Location("/out/_palstream/commits/0-1.jsonl"))
    assert pickle.loads(pickle.dumps(task)) == task
    assert pickle.loads(pickle.dumps(task)).units[0].source_location.options == {"anon": True}


def test_expand_inputs_globs_and_missing(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ("a.mkv", "b.mkv", "x/a.mp4"):
        (tmp_path / name).write_bytes(b"v")
    got = expand_inputs((str(tmp_path / "*.mkv"),), lambda url: {})
    assert got == [str(tmp_path / "a.mkv"), str(tmp_path / "b.mkv")]
    assert archive_name(got[0]) == "a.zarr"
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs((str(tmp_path / "*.avi"),), lambda url: {})
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs((str(tmp_path / "missing.mkv"),), lambda url: {})
    # Same name in two folders: both kept (the layout mirrors the tree, see test_jobs_trust.py).
    assert len(expand_inputs((str(tmp_path / "a.mkv"), str(tmp_path / "x/a.mp4")), lambda url: {})) == 2


# -- output checks and the lock ---------------------------------------------------------------


def test_unwritable_output_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ArchiveError) as err:
        check_writable(Location(str(blocker / "out")))
    assert "not writable" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_s3_output_is_one_line_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = StorageSpec(endpoint_url=f"http://127.0.0.1:{port}").options("s3://bucket/out")
    options["config_kwargs"] = {"connect_timeout": 1, "retries": {"max_attempts": 1}}
    with pytest.raises(ArchiveError) as err:
        check_writable(Location("s3://bucket/out", options))
    message = str(err.value)
    assert "s3://bucket/out" in message and "no storage endpoint answers" in message
    assert "\n" not in message and "testing-secret" not in message


def test_lock_refuses_a_second_run_and_takes_over_stale_locks(tmp_path):
    out = Location(str(tmp_path))
    first = JobLock(out).acquire()
    try:
        with pytest.raises(JobLockedError) as err:
            JobLock(out).acquire()
        assert f"pid {os.getpid()}" in str(err.value) and "lock.json" in str(err.value)
    finally:
        first.release()
    assert first.holder() is None

    lock_file = Path(out.child("_palstream", "lock.json").url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": 1e18}))
    with JobLock(out) as taken:  # holder's process is gone on this host: stale
        assert taken.holder()["token"] == taken.token
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": 0.0}))
    with JobLock(out, stale_after=60) as taken:  # heartbeat far too old: stale
        assert taken.holder()["pid"] == os.getpid()
    lock_file.write_text("{torn")
    with JobLock(out):  # a half-written lock from a killed driver
        pass


# -- metrics and monitoring -------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    import palstream.batch.metrics  # noqa: F401  (registers the series)

    return {s.name for family in REGISTRY.collect() for s in family.samples}


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\bpalstream_[a-z0-9_]+", text)) - {"palstream_io_worker_kind"}


def test_dashboard_and_alerts_use_only_exported_metrics():
    exported = _exported_metric_names()
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    rules = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = _referenced(" ".join(exprs + rules))
    assert len(used) >= 10
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # Dashboard conventions: a datasource variable, rates over $__rate_interval, GPU panels from DCGM.
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    assert all("$__rate_interval" in e for e in exprs if "rate(" in e)
    assert any("DCGM_FI_DEV_GPU_UTIL" in e for e in exprs)
    assert {"PalstreamJobStalled", "PalstreamUnitFailureRate", "PalstreamWorkerLoss"} <= {
        r["alert"] for g in alerts["groups"] for r in g["rules"]
    }
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert {"palstream-driver", "palstream-workers"} <= {c["job_name"] for c in scrape["scrape_configs"]}


def test_metric_names_follow_the_style():
    families = [f for f in __import__("prometheus_client").REGISTRY.collect() if f.name.startswith("palstream_")]
    _exported_metric_names()
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            # the tuner's reward is a dimensionless score (docs/tuner.md), named for what it is
            assert family.name.endswith(("_seconds", "_ratio", "_decibels")) or family.name == "palstream_tuner_reward"
        assert family.type != "summary"


# -- clusters ---------------------------------------------------------------------------------


def _cuda_spec(**kw) -> JobSpec:
    return JobSpec.from_dict({"inputs": ["a.mkv"], "output": "o", "cluster": "cuda", **kw})


def test_cuda_cluster_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(batch_cluster, "gpu_count", lambda: 0)
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        batch_cluster._cuda_cluster(_cuda_spec())


def test_cuda_cluster_one_worker_per_gpu_with_mocked_gpus(monkeypatch):
    calls = []
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: calls.append(kw) or "cluster"
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(batch_cluster, "gpu_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert batch_cluster._cuda_cluster(_cuda_spec()) == "cluster"
    assert calls[-1]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and calls[-1]["threads_per_worker"] == 1
    batch_cluster._cuda_cluster(_cuda_spec(workers=2))
    assert calls[-1]["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    batch_cluster._cuda_cluster(_cuda_spec())
    assert calls[-1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(ConfigError, match="only 2 GPU"):
        batch_cluster._cuda_cluster(_cuda_spec(workers=3))


def test_cuda_cluster_without_dask_cuda_names_the_extra(monkeypatch):
    monkeypatch.setattr(batch_cluster, "gpu_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"palstream\[gpu\]"):
        batch_cluster._cuda_cluster(_cuda_spec())


def test_unreachable_scheduler_is_one_line_error(monkeypatch):
    from palstream.errors import PalstreamError

    monkeypatch.setattr(batch_cluster, "CONNECT_TIMEOUT_SECONDS", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = JobSpec.from_dict({"inputs": ["a.mkv"], "output": "o", "cluster": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(PalstreamError) as err:
        with batch_cluster.open_client(spec):
            pass
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in str(err.value)
    assert "\n" not in str(err.value)


def test_cpu_code_paths_never_import_dask_cuda():
    code = "import palstream.cli, palstream.batch.runner, sys; print('dask_cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# -- command line -----------------------------------------------------------------------------


def _cli(*args, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "palstream.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_cli_commands_have_help():
    from typer.testing import CliRunner

    from palstream.cli import app

    runner = CliRunner()
    for command in ("submit", "status", "resume"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_cli_malformed_job_file_and_bad_output_are_one_line_errors(tmp_path):
    bad = write(tmp_path / "bad.toml", 'inputs = ["x.mkv"]\noutput = "out"\nworkers = 0\n')
    result = _cli("submit", str(bad), "--no-progress")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "workers" in result.stderr

    blocker = write(tmp_path / "blocker", "x")
    result = _cli("submit", str(DATA / "batch_mandel_48x32.mkv"), "--out", str(blocker / "out"), "--no-progress")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "not writable" in result.stderr
    assert not (tmp_path / "blocker.zarr").exists()

    result = _cli("status", str(tmp_path))
    assert result.returncode == 1 and "holds no palstream job" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(batch_cluster.gpu_count() == 0, reason="needs an NVIDIA GPU")
def test_cuda_cluster_runs_a_job_on_a_real_gpu(tmp_path):
    from palstream.archive import open_archive
    from palstream.batch.runner import run_job

    spec = JobSpec.from_dict(
        {"inputs": [str(DATA / "batch_mandel_48x32.mkv")], "output": str(tmp_path / "out"), "cluster": "cuda", "workers": 1,
         "codec": {"gop": 4}}
    )
    report = run_job(spec)
    assert report.complete
    assert open_archive(str(tmp_path / "out" / "batch_mandel_48x32.zarr")).complete


def test_lock_left_by_an_earlier_process_with_our_pid_is_stale(tmp_path):
    """A restarted container runs as pid 1 again: its predecessor's lock must not block it."""
    import os
    import socket

    from palstream.batch.store import JobLock

    lock = JobLock(Location(str(tmp_path)))
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0, "heartbeat": 9e12}
    assert lock.is_stale(record)
    assert not lock.is_stale(dict(record, started=lock.started))
