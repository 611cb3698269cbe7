"""Clusters a job runs on, and the one worker setup they all share.

- ``local``: ``distributed.LocalCluster`` (CPU worker processes, 1 thread each by default).
- ``cuda``: dask-cuda's ``LocalCUDACluster``, one worker per GPU (``pip install 'palstream[gpu]'``).
  dask-cuda is imported only here, only when asked for, so CPU-only hosts never import it.
- an address (``tcp://host:8786``): an existing scheduler, e.g. on Kubernetes; its workers must
  have palstream installed.

Whatever the cluster, :func:`setup_workers` registers the same :class:`PalstreamWorkerPlugin`.
The driver never touches CUDA: GPUs are counted through NVML, not torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from palstream.batch.spec import JobSpec
from palstream.batch.worker import PalstreamWorkerPlugin
from palstream.errors import ConfigError, PalstreamError

# An external scheduler must answer within this (a wrong address fails after it).
CONNECT_TIMEOUT_SECONDS = 15

# Dask's timeouts assume an idle machine. On a busy one (CI: 2 cores shared by several jobs) a new
# worker process takes tens of seconds to import torch and start, its event loop is blocked while
# the palstream plugin warms the codec up (minutes if the kernels must be compiled), and every
# process answers late. Set for the clusters palstream starts and for the driver's connections.
BUSY_MACHINE_CONFIG = {
    # Connecting includes the handshake with the peer's event loop (default 30 s).
    "distributed.comm.timeouts.connect": "60s",
    # A killed worker's nanny starts a new one; the cluster waits this long for it to register
    # before it closes that nanny mid-start (default 15 s; the close then fails the job's end).
    "distributed.deploy.lost-worker-timeout": "10 minutes",
    # The scheduler restarts a worker whose heartbeats stop for this long (default 5 minutes).
    "distributed.scheduler.worker-ttl": "15 minutes",
}
# Time a worker process gets to stop when the cluster closes, including the rest of its start if a
# nanny is still restarting it; Dask's nanny allows 5 s, then raises TimeoutError.
WORKER_STOP_SECONDS = 300
# The scheduler's HTTP server (/metrics, /health) on a free local port, not the shared 8787.
_SCHEDULER_HTTP = {"dashboard_address": "127.0.0.1:0"}


# glibc malloc settings for worker processes. Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 (to
# hand freed memory back to the OS); that also turns off glibc's dynamic mmap threshold, so every
# frame-sized array the codec allocates is mapped and page-faulted afresh: measured 8x the page
# faults and ~15 % more time per unit than the same encode in-process. These keep freed memory
# (a worker's is bounded by its in-flight units) and serve arrays below 32 MiB from the heap.
# helm/palstream sets the same through DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_MMAP_THRESHOLD_": 32 << 20}


def worker_environment() -> dict:
    """Dask's environment for new worker processes, with :data:`WORKER_MALLOC`."""
    return {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC}


def gpu_count() -> int:
    """NVIDIA GPUs visible to this host, without creating a CUDA context (NVML, else /proc)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, or no driver: fall back to the kernel's view
        return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def _visible_gpus(requested: int | None) -> list[str]:
    available = gpu_count()
    if available == 0:
        raise ConfigError("cluster 'cuda': this host has no NVIDIA GPU (NVML finds none); use cluster = \"local\"")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(available)]
    if requested is not None and requested > len(ids):
        raise ConfigError(f"workers: {requested} GPU workers requested but only {len(ids)} GPU(s) are visible; use workers <= {len(ids)}")
    return ids[: requested or len(ids)]


def _cuda_cluster(spec: JobSpec):
    devices = _visible_gpus(spec.workers)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ConfigError("cluster 'cuda' needs dask-cuda: pip install 'palstream[gpu]'") from None
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=",".join(devices),
        threads_per_worker=spec.threads_per_worker,
        dashboard_address=None,
        scheduler_kwargs=_SCHEDULER_HTTP,
        silence_logs=40,
    )


def _local_cluster(spec: JobSpec) -> LocalCluster:
    return LocalCluster(
        n_workers=spec.workers or os.cpu_count() or 1,
        threads_per_worker=spec.threads_per_worker,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs=_SCHEDULER_HTTP,
        silence_logs=40,
    )


@contextlib.contextmanager
def open_client(spec: JobSpec) -> Iterator[Client]:
    """A client on the job's cluster, with the workers set up; the cluster closes on exit
    (an external scheduler is left running)."""
    cluster = None
    # Nannies read the environment when they are created and reuse it when they restart a worker;
    # they hand the whole Dask configuration to their worker processes.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environment(), **BUSY_MACHINE_CONFIG}):
        if spec.cluster == "local":
            cluster = _local_cluster(spec)
        elif spec.cluster == "cuda":
            cluster = _cuda_cluster(spec)
        try:
            timeout = CONNECT_TIMEOUT_SECONDS if cluster is None else dask.config.get("distributed.comm.timeouts.connect")
            try:
                client = Client(cluster if cluster is not None else spec.cluster, timeout=timeout)
            except (OSError, TimeoutError) as exc:
                raise PalstreamError(
                    f"cannot reach the Dask scheduler at {spec.cluster} ({exc}); check the address and that it is running"
                ) from None
            with client:
                setup_workers(client, spec.threads_per_worker, spec.codec.palette)
                yield client
        finally:
            if cluster is not None:
                close_cluster(cluster)


def close_cluster(cluster) -> None:
    """Close a local cluster, giving each worker process :data:`WORKER_STOP_SECONDS` to stop.

    Parameters
    ----------
    cluster : distributed.SpecCluster
        A ``LocalCluster`` or ``LocalCUDACluster`` (their workers run under nannies).
    """

    async def stop_workers():
        await asyncio.gather(*(nanny.close(timeout=WORKER_STOP_SECONDS) for nanny in list(cluster.workers.values())))

    try:
        cluster.sync(stop_workers)
    finally:
        cluster.close()  # the scheduler; nannies already closed return at once


def setup_workers(client: Client, threads: int = 1, palette: str | None = None) -> None:
    """Prepare every worker, present and future, of any cluster kind for palstream tasks.

    Parameters
    ----------
    client : distributed.Client
        Connected to a LocalCluster, a LocalCUDACluster or an external scheduler.
    threads : int, default 1
        Threads per worker (sizes torch's and numba's thread pools).
    palette : str, optional
        Palette generator to load on each worker at start.
    """
    client.register_plugin(PalstreamWorkerPlugin(threads, palette))


def requested_workers(spec: JobSpec, client: Client) -> int:
    """How many workers the job should have (what the worker-loss alert compares against)."""
    if spec.cluster == "local":
        return spec.workers or os.cpu_count() or 1
    if spec.cluster == "cuda":
        return len(_visible_gpus(spec.workers))
    return len(client.scheduler_info(n_workers=-1)["workers"])
