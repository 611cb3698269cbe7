"""A short run of the archive fuzzer (benchmarks/fuzz_archive.py): no mutation may end in a
traceback, a crash, a hang, memory over 10x the normal, or a changed output that verify passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


def _fuzz_300(out: Path, *options: str) -> dict:
    """The fuzzer's report of 300 cases (seed 20) with ``options``, after checking that every case
    ended detected or harmless and that most mutations were caught (they are real)."""
    command = [sys.executable, "-m", "benchmarks.fuzz_archive", "--cases", "300", "--seed", "20",
               "--timeout", "20", *options, "--out", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    totals = report["totals"]
    assert sum(totals.values()) == 300
    assert not any(totals.get(k) for k in ("TRACEBACK", "CRASH", "HANG", "OVER-MEMORY", "UNDETECTED")), report
    assert totals["detected"] > 150
    return report


@pytest.mark.slow
def test_three_hundred_mutations_are_all_detected_or_harmless(lossless_archive, tmp_path):
    report = _fuzz_300(tmp_path / "fuzz.json", "--archive", str(lossless_archive))
    # every family of the harness ran
    assert {"root", "chunk-meta", "marker", "payload", "resealed", "attack"} <= set(report["by_family"])


@pytest.mark.slow
def test_three_hundred_mutations_of_a_sharded_archive_are_all_detected_or_harmless(tmp_path):
    """Format 4 (FORMAT.md §8): shards, shard markers and resealed payloads inside shards."""
    report = _fuzz_300(tmp_path / "fuzz4.json", "--format", "4")
    assert {"root", "shard", "shard-marker", "resealed", "attack"} <= set(report["by_family"])
