"""Library scale (issue 19): the commit index, tasks of many units, and the scale simulator.

The fast tests need no cluster. The simulator test runs ``benchmarks/scale_sim.py`` small: a real
LocalCluster, the driver killed at half the units and resumed, workers added, killed and retired
during the run; every unit must end committed, recorded once, and rewritten only where it was in
flight when something died.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from palstream.batch.commits import committed_units, read_index, record_location, write_record
from palstream.batch.plan import Plan, Unit
from palstream.batch.runner import _Execution
from palstream.codec import EncoderConfig
from palstream.storage import Location

ROOT = Path(__file__).resolve().parents[1]


def _info(name: str, frames: int, width: int = 48) -> dict:
    return {"url": f"/v/{name}", "name": name, "size_bytes": 1, "sha256": "0" * 64, "width": width, "height": 32,
            "frame_count": frames, "fps": "25/1", "time_base": "1/25", "pix_fmt": "yuv420p", "color": {}}


def test_the_commit_index_reads_one_record_per_task_and_skips_torn_lines(tmp_path):
    out = Location(str(tmp_path))
    assert read_index(out) == {}
    write_record(record_location(out, 0, 0), [{"source": 0, "index": 0, "bytes": 5}, {"source": 0, "index": 1, "bytes": 6}])
    write_record(record_location(out, 1, 4), [{"source": 1, "index": 4, "bytes": 7}])
    torn = tmp_path / "_palstream" / "commits" / "2-0.jsonl"
    torn.write_text('{"source": 2, "units": [0, 1]}\n{"source": 2, "index": 0}\n{"source": 2, "ind')  # cut short
    (tmp_path / "_palstream" / "commits" / "3-0.jsonl").write_text('{"source": true, "units": [0]}\n[1]\n')
    index = read_index(out)
    assert sorted(index) == [(0, 0), (0, 1), (1, 4), (2, 0)]
    assert index[(0, 1)]["bytes"] == 6
    # A resume reads only each record's first line: the units its task committed.
    assert committed_units(out) == {(0, 0), (0, 1), (1, 4), (2, 0), (2, 1)}
    assert committed_units(out, skip={0, 2}) == {(1, 4)}


def test_units_are_grouped_into_tasks_of_consecutive_units_of_one_shard_largest_first():
    plan = Plan.build(EncoderConfig(gop=4), [("/v/a.mkv", _info("a.mkv", 20), None), ("/v/b.mkv", _info("b.mkv", 12, width=96), None)])
    execution = _Execution.__new__(_Execution)
    execution.plan, execution.per_task = plan, 2
    todo = [u for u in plan.units() if (u.source, u.index) not in {(0, 2)}]  # unit 2 of a is committed
    tasks = execution._tasks(todo)
    # A task never crosses a block of 2 units (a shard of a format-4 archive): 3 and 4 of a stay apart.
    assert [[(u.source, u.index) for u in t] for t in tasks] == [
        [(1, 0), (1, 1)],  # b's frames are twice as large
        [(0, 0), (0, 1)],
        [(1, 2)],
        [(0, 3)],
        [(0, 4)],
    ]
    assert all(isinstance(u, Unit) for t in tasks for u in t)


def test_tasks_follow_the_plans_shard_size_whatever_the_run_asks(tmp_path):
    """A format-4 plan fixes the archives' shard size: a resume asking for other task sizes gets
    tasks of whole shards, and the log says so; a plan from before format 4 follows the run."""
    from palstream.batch.runner import JobLog
    from palstream.batch.spec import JobSpec

    probed = [("/v/a.mkv", _info("a.mkv", 20), None)]
    spec = JobSpec.from_dict({"inputs": ["/v/a.mkv"], "output": str(tmp_path), "units_per_task": 5, "codec": {"gop": 4}})
    log = JobLog(Location(str(tmp_path)))
    sharded = _Execution(None, spec, Plan.build(EncoderConfig(gop=4), probed, shard_chunks=2), None, None, log, "run")
    assert sharded.per_task == 2 and [len(t) for t in sharded._tasks(sharded.plan.units())] == [2, 2, 1]
    assert "units_per_task 5 ignored" in (tmp_path / "_palstream" / "job.log").read_text()
    older = _Execution(None, spec, Plan.build(EncoderConfig(gop=4), probed), None, None, log, "run")
    assert older.per_task == 5 and older.plan.shard_chunks is None


@pytest.mark.slow
def test_scale_simulator_kill_resume_and_elastic_workers_commit_every_unit_once(tmp_path):
    result_file = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale_sim.py"), "--units", "600", "--archives", "6",
         "--units-per-task", "10", "--kill-at", "0.5", "--elastic", "--workdir", str(tmp_path / "work"),
         "--json", str(result_file)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    check = result["check"]
    assert check["all_units_committed_once"], check
    assert check["units_committed"] == 600 and check["archives_complete"] == 6
    first, resumed = result["runs"]
    assert first.get("killed") and resumed["complete"]
    assert [e["event"] for e in first["events"]][:3] == ["worker add", "worker kill", "worker remove"]
    # The resume found what was done from the commit index and ran only the rest.
    assert resumed["committed_at_start"] + resumed["report"]["units_encoded"] == 600
    # A unit is encoded again only when it was in flight when the driver or a worker died:
    # at most two tasks of ten units per event (one per worker thread).
    assert check["units_written_again"] <= 2 * 10 * 2
