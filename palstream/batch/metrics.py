"""Prometheus metrics of the batch system.

Worker-side series are recorded by :func:`palstream.batch.worker.encode_unit` in each Dask
worker process and served by the worker's own HTTP server at ``/metrics`` (Dask serves the
default ``prometheus_client`` registry there). Driver-side series (``palstream_job_*``) are
served by :func:`serve_driver_metrics`. Names follow ``palstream_<what>_<unit>``; labels have
few values (never a video or unit id). ``monitoring/`` uses exactly these names.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from palstream.errors import PalstreamError
from palstream.tuner.space import ARM_NAMES

# Stages a unit goes through; the codec reports its inner stages in stats["stage_seconds"].
STAGES = ("decode", "features", "palettes", "entropy", "encode", "write")
UNIT_OUTCOMES = ("committed", "failed")
JOB_STATES = ("pending", "running", "committed", "quarantined")

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

source_frames = Counter("palstream_source_frames", "Frames decoded from source videos")
source_bytes = Counter("palstream_source_bytes", "Raw 8-bit 4:2:0 bytes of the frames decoded from sources")
encoded_frames = Counter("palstream_encoded_frames", "Frames written to archives")
encoded_bytes = Counter("palstream_encoded_bytes", "Encoded payload bytes written to archives")
units = Counter("palstream_units", "Units (GOP chunks) finished by workers, by outcome", ["outcome"])
stage_duration = Histogram(
    "palstream_stage_duration_seconds", "Time per unit in each stage", ["stage"], buckets=SECONDS_BUCKETS
)
compression_ratio = Histogram(
    "palstream_chunk_compression_ratio",
    "Raw 4:2:0 bytes over encoded bytes, per unit",
    buckets=(1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000),
)
psnr = Histogram(
    "palstream_chunk_psnr_decibels",
    "Luma PSNR of each lossy unit",
    buckets=(25, 30, 35, 38, 40, 42, 44, 46, 48, 50, 55, 60),
)
last_success = Gauge("palstream_last_success_timestamp_seconds", "Unix time of the last committed unit")

job_units = Gauge("palstream_job_units", "Units of the running job, by state", ["state"])
job_frames = Counter("palstream_job_committed_frames", "Frames of units the driver saw committed")
job_workers = Gauge("palstream_job_workers", "Dask workers connected to the job's scheduler")
job_workers_requested = Gauge("palstream_job_workers_requested", "Dask workers the job asked for")
job_last_progress = Gauge(
    "palstream_job_last_progress_timestamp_seconds", "Unix time the driver last saw a unit finish"
)
# The stalled-job alert measures from here until the first unit finishes (the progress gauge is 0).
job_start = Gauge("palstream_job_start_timestamp_seconds", "Unix time the driver started the running job")

# Driver side, tuned jobs only (docs/tuner.md): one decision per batch, one reward per finished batch.
tuner_decisions = Counter("palstream_tuner_decisions", "Encoder configurations the tuner chose, by arm", ["arm"])
tuner_reward = Histogram(
    "palstream_tuner_reward",
    "Reward of each finished tuned batch (weighted log2 ratio, quality above the floor and cost)",
    buckets=(0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12),  # rewards below 0 (heavy cost weights) count in le="0"
)

# Make every labelled series exist from the start, so dashboards and alerts see zeros, not gaps.
for _outcome in UNIT_OUTCOMES:
    units.labels(_outcome)
for _state in JOB_STATES:
    job_units.labels(_state)
for _arm in ARM_NAMES:
    tuner_decisions.labels(_arm)
# The series a committed unit updates, resolved once: ``labels()`` per unit was a measurable share
# of the batch's own CPU per unit (issue 19).
_committed_units = units.labels("committed")
_stage_series = {stage: stage_duration.labels(stage) for stage in STAGES}


def record_unit(summary: dict, stage_seconds: dict[str, float]) -> None:
    """Record one committed unit (called in the worker; failures count in ``units{outcome="failed"}``)."""
    _committed_units.inc()
    for stage, seconds in stage_seconds.items():
        series = _stage_series.get(stage)
        if series is not None:
            series.observe(seconds)
    source_frames.inc(summary["frames"])
    source_bytes.inc(summary["raw_bytes"])
    encoded_frames.inc(summary["frames"])
    encoded_bytes.inc(summary["bytes"])
    compression_ratio.observe(summary["raw_bytes"] / max(summary["bytes"], 1))
    if summary.get("psnr_y") is not None and summary["psnr_y"] != float("inf"):
        psnr.observe(summary["psnr_y"])
    last_success.set(time.time())


# Prometheus's default scrape interval is 1 minute (monitoring/prometheus.yml and the chart use 15 s).
FINAL_SCRAPE_SECONDS = 60.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes are not worth a log line each
        pass


class _MetricsServer(ThreadingWSGIServer):
    # Closing waits for scrapes in flight, so the one that read the final state is delivered.
    daemon_threads = False
    block_on_close = True


class _ScrapeCount:
    """A WSGI app serving the default registry that counts the scrapes it has answered."""

    def __init__(self):
        self.app = make_wsgi_app()
        self.count = 0
        self.changed = threading.Condition()

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)  # the registry is read here, before counting
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return body

    def wait_for_next(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a scrape after this call; True if one came."""
        with self.changed:
            seen = self.count
            return self.changed.wait_for(lambda: self.count > seen, timeout)


@contextlib.contextmanager
def serve_driver_metrics(
    port: int | None, host: str = "127.0.0.1", final_scrape_timeout: float = FINAL_SCRAPE_SECONDS
) -> Iterator[None]:
    """Serve the default registry at ``http://host:port/metrics`` while the block runs.

    Parameters
    ----------
    port : int or None
        TCP port; None serves nothing.
    host : str, default "127.0.0.1"
        Interface to bind.
    final_scrape_timeout : float, default :data:`FINAL_SCRAPE_SECONDS`
        When the block ends and the endpoint has been scraped periodically (at least twice), keep
        serving until one more scrape has read the final state, at most this many seconds
        (not after Ctrl-C).
        Otherwise Prometheus keeps the units the job had left at its last scrape before the end,
        and ``PalstreamDriverDown`` (monitoring/alerts.yml) would fire after every finished job.

    Raises
    ------
    PalstreamError
        The port cannot be bound.
    """
    if port is None:
        yield
        return
    scrapes = _ScrapeCount()
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_MetricsServer", (_MetricsServer,), {"address_family": family})  # IPv4 or IPv6 host
        server: _MetricsServer = make_server(host, port, scrapes, server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise PalstreamError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose another --metrics-port") from None
    thread = threading.Thread(target=server.serve_forever, name="palstream-metrics", daemon=True)
    thread.start()
    job_start.set(time.time())
    linger = True
    try:
        yield
    except BaseException as exc:
        linger = isinstance(exc, Exception)  # Ctrl-C exits at once
        raise
    finally:
        if linger and scrapes.count >= 2:
            scrapes.wait_for_next(final_scrape_timeout)
        server.shutdown()
        server.server_close()
        thread.join()
