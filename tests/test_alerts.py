"""Alert rules (monitoring/alerts.yml) and what the driver exports for them."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from palstream.batch import metrics

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian: apt-get install prometheus); alert rules not unit-tested",
)
def test_alert_rules_pass_their_promtool_unit_tests():
    checked = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_rule_has_a_unit_test_that_fires_it_and_one_that_does_not():
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [c for t in tests["tests"] for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    rules = set(_rules())
    assert {"PalstreamJobStalled", "PalstreamDriverDown", "PalstreamWorkerLoss"} <= rules
    assert fired == rules and quiet == rules


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, series: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(series + " ")))


def _pending(text: str) -> float:
    return _value(text, 'palstream_job_units{state="pending"}')


def test_a_finishing_driver_waits_until_a_periodic_scraper_has_read_its_final_state():
    port = _free_port()
    late = []

    def scrape_later():
        time.sleep(1.0)
        late.append(_pending(_scrape(port)))

    started = time.time()
    with metrics.serve_driver_metrics(port, final_scrape_timeout=60):
        metrics.job_units.labels("pending").set(5)
        text = _scrape(port)
        assert _value(text, "palstream_job_start_timestamp_seconds") >= started  # the stalled alert's origin
        assert _pending(text) == 5 and _pending(_scrape(port)) == 5  # a periodic scraper
        metrics.job_units.labels("pending").set(0)  # the job's final state
        scraper = threading.Thread(target=scrape_later, daemon=True)
        scraper.start()
    # The driver kept serving until the scrape after the end, which saw no unit left (the scraper
    # may still be reading the response the server finished sending, hence the join).
    scraper.join(timeout=10)
    assert late == [0]
    with pytest.raises(OSError):
        _scrape(port)


@pytest.mark.parametrize("scrapes, interrupt", [(1, None), (2, KeyboardInterrupt)])
def test_a_driver_exits_at_once_without_a_periodic_scraper_or_on_ctrl_c(scrapes, interrupt):
    port = _free_port()
    start = time.monotonic()
    expected = pytest.raises(KeyboardInterrupt) if interrupt else contextlib.nullcontext()
    with expected, metrics.serve_driver_metrics(port, final_scrape_timeout=60):
        for _ in range(scrapes):
            _scrape(port)
        if interrupt:
            raise interrupt
    assert time.monotonic() - start < 30
