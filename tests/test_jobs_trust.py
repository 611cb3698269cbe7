"""Library jobs that can be trusted: refusals are final, outputs stay in the output root,
job files are checked, failures are one line each, status exits by state, manifests.

Fast tests call the library and the CLI without a cluster; the one job on a real Dask
LocalCluster is marked slow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from distributed import WorkerPlugin

from palstream.batch.plan import (
    Plan,
    check_archive_path,
    credential_free,
    load_job_settings,
    load_plan,
    mirror_layout,
    save_job_settings,
    save_plan,
)
from palstream.batch.spec import JobSpec
from palstream.batch.status import EXIT_FAILED, EXIT_INCOMPLETE
from palstream.batch.store import read_json, write_bytes
from palstream.batch.worker import (
    FinalizeTask,
    UnitTask,
    _DropPalstreamTaskFailures,
    _read_unit,
    encode_unit,
    finalize_archive,
    probe_source,
)
from palstream.codec import EncoderConfig
from palstream.errors import ArchiveError, ConfigError
from palstream.storage import Location

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CLIP = "batch_mandel_48x32.mkv"  # 8 frames


def _info(name: str, frames: int) -> dict:
    return {"url": f"/v/{name}", "name": name, "size_bytes": 1, "sha256": "0" * 64, "width": 48, "height": 32,
            "frame_count": frames, "fps": "25/1", "time_base": "1/25", "pix_fmt": "yuv420p", "color": {}}


def _one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


# -- layout -----------------------------------------------------------------------------------


def test_outputs_mirror_the_input_tree_without_name_clashes():
    layout = mirror_layout(["/in/a/x.mkv", "/in/b/x.mkv", "/in/b/c/y.mp4"])
    assert layout == {
        "/in/a/x.mkv": ("a/x.mkv", "a/x.zarr"),
        "/in/b/x.mkv": ("b/x.mkv", "b/x.zarr"),
        "/in/b/c/y.mp4": ("b/c/y.mp4", "b/c/y.zarr"),
    }
    # Same stem, different suffix, one folder: the whole file name keeps them apart.
    assert {a for _, a in mirror_layout(["/in/x.mkv", "/in/x.mp4"]).values()} == {"x.mkv.zarr", "x.mp4.zarr"}
    # One input, or inputs in one folder: archives at the top of the output root.
    assert mirror_layout(["/in/a/x.mkv"])["/in/a/x.mkv"] == ("x.mkv", "x.zarr")
    # Different protocols share no folder.
    mixed = mirror_layout(["s3://bucket/x.mkv", "/in/x.mkv"])
    assert mixed["s3://bucket/x.mkv"][1] == "s3/bucket/x.zarr" and mixed["/in/x.mkv"][1] == "file/in/x.zarr"
    plan = Plan.build(EncoderConfig(gop=4), [("/in/a/x.mkv", _info("x.mkv", 4), None), ("/in/b/x.mkv", _info("x.mkv", 4), None)])
    assert [s.archive for s in plan.sources] == ["a/x.zarr", "b/x.zarr"]
    # A rerun of `submit` continues this plan (no second probe) only for the same inputs and settings.
    assert plan.matches(["/in/b/x.mkv", "/in/a/x.mkv"], EncoderConfig(gop=4), None)
    assert not plan.matches(["/in/a/x.mkv"], EncoderConfig(gop=4), None)
    assert not plan.matches(["/in/a/x.mkv", "/in/b/x.mkv"], EncoderConfig(gop=8), None)


# -- job files: hashes, confinement, scheduler --------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../evil.zarr", "/tmp/evil.zarr", "s3://other/evil.zarr", "a/../../evil.zarr", "_palstream/x.zarr",
             "a//b.zarr", "c:evil.zarr", "a\\..\\evil.zarr", "x.txt", "", None, 7],
)
def test_archive_paths_outside_the_output_root_are_refused(path):
    with pytest.raises(ConfigError) as err:
        check_archive_path(path, "plan.json")
    assert "\n" not in str(err.value)


def _tampered_plan(tmp_path: Path, edit) -> str:
    """An output root whose plan.json was edited and re-hashed, as a careful attacker would."""
    out = str(tmp_path / "out")
    save_plan(Location(out), Plan.build(EncoderConfig(gop=4), [("/in/x.mkv", _info("x.mkv", 8), None)]))
    path = tmp_path / "out" / "_palstream" / "plan.json"
    data = json.loads(path.read_text())
    data.pop("hash"), data.pop("written_by")
    edit(data)
    data["hash"] = Plan.from_data(data).hash
    path.write_text(json.dumps(data))
    return out


def test_a_rehashed_plan_cannot_send_writes_outside_the_output_root(tmp_path):
    out = _tampered_plan(tmp_path, lambda d: d["sources"][0].update(archive="../../escaped.zarr"))
    with pytest.raises(ConfigError, match="leaves the output root"):
        load_plan(Location(out))
    out = _tampered_plan(tmp_path / "2", lambda d: d["sources"][0].update(units=[[0, 4]]))
    with pytest.raises(ConfigError, match="do not cover"):
        load_plan(Location(out))


def _job(tmp_path: Path, **kw) -> tuple[str, JobSpec]:
    out = str(tmp_path / "out")
    spec = JobSpec.from_dict({"inputs": [str(DATA / CLIP)], "output": out, "codec": {"gop": 4}, **kw})
    save_plan(Location(out), Plan.build(spec.codec, [(str(DATA / CLIP), _info(CLIP, 8), None)]))
    save_job_settings(Location(out), spec)
    return out, spec


def test_job_settings_are_hashed_and_an_edit_is_refused(tmp_path, run_cli):
    out, spec = _job(tmp_path)
    assert JobSpec.from_dict({**load_job_settings(Location(out)), "output": out}) == spec
    path = Path(out) / "_palstream" / "job.json"
    data = json.loads(path.read_text())
    data["retries"] = 9
    path.write_text(json.dumps(data))
    result = run_cli("resume", out, "--no-progress")
    assert result.code == 1 and "modified after they were written" in _one_error_line(result.stderr)


def test_resume_refuses_a_stored_scheduler_the_command_line_did_not_name(tmp_path, run_cli):
    out, _ = _job(tmp_path, cluster="tcp://203.0.113.9:8786")
    result = run_cli("resume", out, "--no-progress")
    assert result.code == 1
    line = _one_error_line(result.stderr)
    assert "tcp://203.0.113.9:8786" in line and "--cluster" in line


def test_resume_refuses_a_stored_storage_endpoint_the_user_did_not_name(tmp_path, run_cli):
    out, _ = _job(tmp_path, storage={"endpoint_url": "http://203.0.113.9:9000"})
    result = run_cli("resume", out, "--no-progress")
    assert result.code == 1
    line = _one_error_line(result.stderr)
    assert "http://203.0.113.9:9000" in line and "--endpoint-url" in line


@pytest.mark.parametrize("name, text", [("plan.json", "{not json"), ("job.json", "[1, 2]"), ("plan.json", "\xff\xfe")])
def test_malformed_job_files_are_one_line_errors(tmp_path, run_cli, name, text):
    out, _ = _job(tmp_path)
    (Path(out) / "_palstream" / name).write_bytes(text.encode("latin-1"))
    for command in ("status", "resume"):
        result = run_cli(command, out, "--no-progress") if command == "resume" else run_cli(command, out)
        assert result.code == 1
        assert name in _one_error_line(result.stderr)


def test_credentials_in_input_urls_are_refused_before_they_are_stored():
    for url in ("https://user:hunter2@example.org/a.mkv", "https://example.org/a.mkv?X-Amz-Signature=hunter2&X-Amz-Credential=k",
                "s3://bucket/a.mkv?token=hunter2"):
        with pytest.raises(ConfigError) as err:
            credential_free(url)
        assert "hunter2" not in str(err.value) and "credentials" in str(err.value)
    assert credential_free("s3://bucket/dir/a.mkv?versionId=3") == "s3://bucket/dir/a.mkv?versionId=3"
    with pytest.raises(ConfigError) as err:
        JobSpec.from_dict({"inputs": ["a.mkv"], "output": "o", "storage": {"endpoint_url": "http://ak:hunter2@minio:9000"}})
    assert "hunter2" not in str(err.value) and "endpoint_url" in str(err.value)


def test_unreachable_s3_job_files_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    for action in (lambda: read_json(Location("s3://bucket/out/_palstream/plan.json", options)),
                   lambda: write_bytes(Location("s3://bucket/out/manifest.csv", options), b"x")):
        with pytest.raises(ArchiveError) as err:
            action()
        message = str(err.value)
        assert "s3://bucket/out/" in message and "endpoint" in message
        assert "\n" not in message and "testing-secret" not in message


# -- status and options -------------------------------------------------------------------------


def test_status_exits_nonzero_for_pending_and_refused_inputs(tmp_path, run_cli):
    out, _ = _job(tmp_path)
    result = run_cli("status", out)
    assert result.code == EXIT_INCOMPLETE == 3
    assert run_cli("status", out, "--json").code == EXIT_INCOMPLETE
    refused = str(tmp_path / "refused")
    save_plan(Location(refused), Plan.build(EncoderConfig(gop=4), [("/in/cut.mkv", None, "cut.mkv is truncated")]))
    save_job_settings(Location(refused), JobSpec.from_dict({"inputs": ["/in/cut.mkv"], "output": refused}))
    result = run_cli("status", refused)
    assert result.code == EXIT_FAILED == 4 and "cut.mkv is truncated" in result.stdout


def test_status_names_an_archive_that_is_there_but_does_not_open(tmp_path, run_cli):
    out, _ = _job(tmp_path)
    target = Path(load_plan(Location(out)).archive_location(Location(out), 0).url)
    target.mkdir(parents=True)
    (target / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"format": "palstream"}}))
    result = run_cli("status", out)
    assert result.code == EXIT_FAILED
    assert "damaged" in result.stdout and f"damaged: {CLIP}" in result.stdout


def test_bad_driver_options_are_one_line_errors(tmp_path, run_cli):
    result = run_cli("submit", str(DATA / CLIP), "--out", str(tmp_path / "out"), "--metrics-port", "99999", "--no-progress")
    assert result.code == 1 and "99999" in _one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()
    result = run_cli("submit", str(DATA / CLIP), "--out", str(tmp_path / "out"), "--worker-targets",
                     str(tmp_path / "missing" / "targets.json"), "--no-progress")
    assert result.code == 1 and "--worker-targets" in _one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


# -- the worker side: refusals are values, sources are checked against the plan ----------------


def test_probe_returns_a_refusal_as_a_value(tmp_path):
    cut = tmp_path / "cut.mkv"
    cut.write_bytes((DATA / CLIP).read_bytes()[:1500])
    result = probe_source(str(cut), {})
    assert set(result) == {"refused"} and "cut.mkv" in result["refused"]
    assert probe_source(str(DATA / CLIP), {})["info"]["frame_count"] == 8


def test_truncated_input_is_kept_only_with_the_opt_in_which_the_plan_records():
    cut = str(DATA / "truncated.mkv")
    assert "refused" in probe_source(cut, {})
    kept = probe_source(cut, {}, allow_truncated=True)["info"]
    assert kept["truncated"]["reason"] and kept["frame_count"] >= 1
    plan = Plan.build(EncoderConfig(gop=4), [(cut, kept, None)], allow_truncated=True)
    assert plan.data["allow_truncated"] and plan.sources[0].info.truncated == kept["truncated"]
    assert not plan.matches([cut], EncoderConfig(gop=4), None)  # a submit without the opt-in is another job
    # A unit of the kept source reads exactly its planned frames, not into the break.
    unit = UnitTask(0, 0, 0, kept["frame_count"], Location(cut), kept["frame_count"], kept["size_bytes"], True, Location("never.zarr"))
    assert len(_read_unit(unit, 4)) == kept["frame_count"]
    spec = JobSpec.from_dict({"inputs": [cut], "output": "o", "allow_truncated": True})
    assert JobSpec.from_dict(spec.to_dict()).allow_truncated
    with pytest.raises(ConfigError, match="allow_truncated"):
        JobSpec.from_dict({"inputs": [cut], "output": "o", "allow_truncated": "yes"})


def _unit(tmp_path: Path, start: int, count: int, size: int) -> UnitTask:
    return UnitTask(0, 0, start, count, Location(str(DATA / CLIP)), 8, size, False, Location(str(tmp_path / "never.zarr")))


def test_a_unit_whose_source_changed_or_is_short_is_refused_and_writes_nothing(tmp_path):
    size = (DATA / CLIP).stat().st_size
    changed = encode_unit(_unit(tmp_path, 0, 4, size + 1), EncoderConfig(gop=4))
    assert changed["outcome"] == "refused" and "changed since it was planned" in changed["reason"]
    short = encode_unit(_unit(tmp_path, 6, 4, size), EncoderConfig(gop=4))  # the plan says 4 frames, 2 are there
    assert short["outcome"] == "refused" and "gave 2 frames" in short["reason"]
    assert list(tmp_path.iterdir()) == []


def test_finalize_refuses_a_source_whose_hash_changed(tmp_path):
    task = FinalizeTask(Location(str(tmp_path / "never.zarr")), Location(str(DATA / CLIP)), (DATA / CLIP).stat().st_size,
                        "0" * 64, "copy", (), Location(str(tmp_path / "fixity.json")))
    result = finalize_archive(task)
    assert result["outcome"] == "refused" and "sha256" in result["reason"]
    assert list(tmp_path.iterdir()) == []


def test_workers_do_not_print_tracebacks_of_palstream_tasks():
    drop = _DropPalstreamTaskFailures()

    def record(key):
        return logging.LogRecord("distributed.worker", logging.ERROR, "w.py", 1, "Compute Failed\nKey: %s\n", (key,), None)

    assert not drop.filter(record("encode_chunk-abc-0-1"))
    assert not drop.filter(record("probe_source-3"))
    assert drop.filter(record("someone-elses-task"))
    assert drop.filter(logging.LogRecord("distributed.worker", logging.ERROR, "w.py", 1, "Worker stopped", (), None))


# -- a real job ----------------------------------------------------------------------------------


class FirstProbeFails(WorkerPlugin):
    """Worker plugin: the first probe of each file whose name contains ``target`` raises an InputError.

    What a flaky probe does (an input refused once, accepted when tried again): a job must
    keep the refusal, whatever its ``retries``.
    """

    name = "first-probe-fails"

    def __init__(self, target: str):
        self.target = target

    def setup(self, worker):
        from palstream import io
        from palstream.errors import InputError
        from palstream.storage import Location

        real, seen = io.probe, set()

        def probe(source, **options):
            url = Location.of(source).url
            if self.target in url and url not in seen:
                seen.add(url)
                raise InputError(f"{url} is truncated (forced on the first probe)")
            return real(source, **options)

        io.probe = probe


@pytest.mark.slow
def test_a_library_job_keeps_refusals_mirrors_the_tree_and_writes_manifests(tmp_path, capfd, monkeypatch):
    import cloudpickle
    from distributed import Client, LocalCluster

    from palstream.cli import main

    lib = tmp_path / "library"
    for folder in ("a", "b"):
        (lib / folder).mkdir(parents=True)
        shutil.copy(DATA / CLIP, lib / folder / CLIP)
    shutil.copy(DATA / "truncated.mkv", lib / "b" / "truncated.mkv")
    out = tmp_path / "out"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def cli(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()
        monkeypatch.setattr(sys, "argv", ["palstream", *args])
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capfd.readouterr()
        return code, captured.out, captured.err

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(FirstProbeFails(f"a/{CLIP}"))
        address = cluster.scheduler_address
        code, _, err = cli("submit", str(lib / "*" / "*.mkv"), "--out", str(out), "--cluster", address,
                           "--retries", "2", "--gop", "4", "--no-progress")
        # One line per failed input, then the summary line; no traceback from the workers.
        assert code == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err and "Compute Failed" not in err, err
        assert len(errors) == 3, err
        assert any(f"a/{CLIP}" in line and "forced on the first probe" in line for line in errors)
        assert any("truncated.mkv" in line for line in errors)
        assert "job.log" in errors[-1]
        assert not (out / "_palstream" / "SUCCESS").exists()
        assert not (out / "a").exists()
        log = (out / "_palstream" / "job.log").read_text()
        assert f"a/{CLIP}" in log and "truncated.mkv" in log

        # resume keeps the plan's refusal: no second probe accepts the input.
        code, _, err = cli("resume", str(out), "--cluster", address, "--no-progress")
        assert code == 1 and f"a/{CLIP}" in err and not (out / "a").exists()
        assert not (out / "_palstream" / "SUCCESS").exists()

    code, stdout, _ = cli("status", str(out))
    assert code == EXIT_FAILED and f"a/{CLIP}" in stdout
    plan = read_json(Location(str(out / "_palstream" / "plan.json")))
    assert [s["archive"] for s in plan["sources"]] == [f"b/{Path(CLIP).stem}.zarr"]

    rows = {r["source"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert {k: rows[k]["state"] for k in rows} == {f"a/{CLIP}": "quarantined", f"b/{CLIP}": "complete", "b/truncated.mkv": "quarantined"}
    good = rows[f"b/{CLIP}"]
    assert good["frames"] == "8" and good["source_sha256"] == hashlib.sha256((DATA / CLIP).read_bytes()).hexdigest()
    assert good["archive"] == f"b/{Path(CLIP).stem}.zarr" and int(good["payload_bytes"]) > 0
    listed = (out / "manifest-sha256.txt").read_text().splitlines()
    assert listed and all(line.split("  ", 1)[1].startswith(good["archive"] + "/") for line in listed)
    check = subprocess.run(["sha256sum", "--check", "--quiet", "manifest-sha256.txt"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_a_commit_index_that_names_an_uncommitted_unit_is_caught_by_finalize_and_the_unit_runs_again(tmp_path):
    """The job's commit index is a cache of the archives' markers: a resume that trusts it runs
    nothing for the units it names, and finalize, which reads the markers, sends back any unit
    the archive lacks; it runs again and the archive completes."""
    from palstream.archive import ArchiveWriter, open_archive
    from palstream.batch.runner import run_job

    lib = tmp_path / "library"
    lib.mkdir()
    shutil.copy(DATA / CLIP, lib / CLIP)
    out = tmp_path / "out"
    spec = JobSpec.from_dict({"inputs": [str(lib / CLIP)], "output": str(out), "workers": 1, "units_per_task": 2,
                              "codec": {"gop": 2}})
    first = run_job(spec)
    assert first.complete and first.units_encoded == 4
    records = sorted(p.name for p in (out / "_palstream" / "commits").iterdir())
    assert records == ["0-0.jsonl", "0-2.jsonl"]  # one record per task of two units
    archive = out / f"{Path(CLIP).stem}.zarr"
    reference = [open_archive(str(archive)).read_chunk(i) for i in range(4)]
    assert open_archive(str(archive)).attrs["shard_chunks"] == 2  # format 4: a shard per task
    # The marker of unit 3 goes (damage, or a hand edit): it is its shard's, units 2 and 3; the
    # index still names them, and the archive is no longer known to be finalized.
    ArchiveWriter.open(str(archive)).revoke(3)
    (out / "_palstream" / "fixity" / "0.json").unlink()
    resumed = run_job(spec, resume=True)
    assert resumed.complete and resumed.units_encoded == 2, resumed.to_dict()
    assert "not committed in the archive; running them again" in (out / "_palstream" / "job.log").read_text()
    assert [open_archive(str(archive)).read_chunk(i) for i in range(4)] == reference
    assert open_archive(str(archive)).committed() == {0, 1, 2, 3}


def test_a_format_4_task_writes_its_shard_whole_or_not_at_all(tmp_path):
    """A task refused at its second unit (the source gave fewer frames than planned) writes no
    shard, no marker and no commit record; the whole task writes one shard and one marker."""
    from palstream import io
    from palstream.archive import ArchiveWriter, open_archive
    from palstream.batch.worker import Task, encode_units

    source, size = Location(str(DATA / CLIP)), (DATA / CLIP).stat().st_size
    archive = tmp_path / "a.zarr"
    ArchiveWriter.create(str(archive), io.probe(str(DATA / CLIP)), EncoderConfig(gop=2), shard_chunks=2)

    def task(second_start: int) -> Task:
        units = (UnitTask(0, 0, 0, 2, source, 8, size, False, Location(str(archive))),
                 UnitTask(0, 1, second_start, 2, source, 8, size, False, Location(str(archive))))
        return Task(units, EncoderConfig(gop=2), Location(str(tmp_path / "record.jsonl")))

    refused = encode_units(task(7))  # unit 1 planned at frame 7: one frame is there, not two
    assert refused["summaries"] == [] and "gave 1 frames" in refused["refused"]["reason"]
    assert not (archive / "chunks" / "c" / "0").exists() and not (tmp_path / "record.jsonl").exists()
    assert open_archive(str(archive)).committed() == set()
    done = encode_units(task(2))
    assert [s["index"] for s in done["summaries"]] == [0, 1] and done["refused"] is None
    assert open_archive(str(archive)).committed() == {0, 1} and (tmp_path / "record.jsonl").exists()
    assert sorted(p.name for p in (archive / "commits").iterdir()) == ["000000", "zarr.json"]


def test_a_unit_below_the_floor_revokes_its_whole_shard(tmp_path, monkeypatch):
    """Format 4: the floor's revocation deletes the unit's shard marker, so none of the shard's
    units stays committed; the shard before it does, and the input is quarantined."""
    import numpy as np
    from distributed import LocalCluster

    import palstream.codec
    from palstream import io
    from palstream.archive import open_archive
    from palstream.batch.runner import run_job
    from palstream.codec import EncodedChunk

    encode = palstream.codec.encode_chunk
    third = io.read_frames(str(DATA / CLIP), 4, 2).y  # unit 2 of 8 frames in GOPs of 2

    def third_below_floor(frames, config, generator=None):
        encoded = encode(frames, config, generator)
        if np.array_equal(frames.y, third):
            return EncodedChunk(encoded.payload, {**encoded.stats, "psnr_y": config.target_psnr - 0.5})
        return encoded

    monkeypatch.setattr(palstream.codec, "encode_chunk", third_below_floor)  # in-process workers see it
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as local:
        spec = JobSpec.from_dict({"inputs": [str(DATA / CLIP)], "output": str(tmp_path / "out"), "cluster": local.scheduler_address,
                                  "units_per_task": 2, "max_in_flight": 1, "codec": {"gop": 2}})
        report = run_job(spec)
    assert not report.complete
    assert [q["unit"] for q in report.quarantined] == [2] and "below the job's floor" in report.quarantined[0]["reason"]
    archive = open_archive(str(tmp_path / "out" / f"{Path(CLIP).stem}.zarr"))
    assert archive.attrs["shard_chunks"] == 2 and archive.committed() == {0, 1}
