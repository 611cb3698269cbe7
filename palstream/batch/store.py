"""Output-root bookkeeping on any fsspec filesystem: paths, write checks, JSON files, the job lock.

Layout of an output root::

    <output>/<dir>/<stem>.zarr      one archive per input, mirroring the input tree (palstream.archive)
    <output>/manifest.csv           one row per input: paths, state, frames, sizes, checksums, quality
    <output>/manifest-sha256.txt    sha256 of every file of every complete archive (BagIt style)
    <output>/_palstream/plan.json   the immutable, content-hashed plan
    <output>/_palstream/job.json    how the job was run (hashed; checked by ``resume``)
    <output>/_palstream/job.log     full details of every failure (the terminal gets one line each)
    <output>/_palstream/fixity/     per-archive file checksums, written when an archive is finalized
    <output>/_palstream/lock.json   held by the running driver (see JobLock)
    <output>/_palstream/commits/    the commit index: one record per finished task (palstream.batch.commits)
    <output>/_palstream/report.json quarantined units and outcome of the last run
    <output>/_palstream/SUCCESS     written last, once every archive is finalized
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from palstream.errors import ArchiveError, ConfigError, PalstreamError
from palstream.storage import Location, redact_url
from palstream.storage import storage_error as remote_storage_error

JOB_DIR = "_palstream"
LOCK_STALE_SECONDS = 120.0  # a lock whose heartbeat is older than this belongs to a dead driver
LOCK_HEARTBEAT_SECONDS = 15.0


class JobLockedError(PalstreamError):
    """Another driver is running a job on the same output."""


class JobFileError(ConfigError):
    """A file under ``_palstream/`` is not what palstream wrote (not JSON, not an object)."""


def check_writable(output: Location) -> None:
    """Fail now, with one line, if ``output`` cannot be written (before any work is done).

    Creates the output folder where the filesystem has folders, then writes and removes a probe
    object under ``_palstream/``.
    """
    try:
        fs, path = output.filesystem()
        probe = f"{path}/{JOB_DIR}/.write-check-{uuid.uuid4().hex}"
        _ensure_parent(fs, probe)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except FileNotFoundError as exc:
        if output.url.startswith(("s3://", "s3a://")):  # s3fs: the bucket does not exist
            raise ArchiveError(f"output {output.url}: bucket {path.split('/', 1)[0]!r} does not exist; create it first") from None
        raise ArchiveError(f"output {output.url} is not writable ({_one_line(exc)}); check the path and permissions") from None
    except Exception as exc:  # every backend raises its own family; all mean "cannot write"
        mapped = remote_storage_error(exc, output.url, "write the output", ArchiveError)
        if mapped is not None:
            raise mapped from None
        raise ArchiveError(f"output {output.url} is not writable ({_one_line(exc)}); check the path, endpoint and permissions") from None


def read_json(location: Location) -> dict | None:
    """The JSON object stored at ``location``, or None when it does not exist.

    Raises
    ------
    JobFileError
        The file is not a JSON object.
    ArchiveError
        The storage cannot be read (credentials, endpoint, permissions, timeout).
    """
    url = location.url
    try:
        fs, path = location.filesystem()
        # s3fs sizes the object from a listing it cached, which may predate it (a fixity record a
        # worker wrote after the driver listed fixity/): it would answer "absent" without asking.
        fs.invalidate_cache(path)
        blob = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # every backend raises its own family
        raise storage_error(url, exc, "read") from None
    try:
        data = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise JobFileError(f"{url} is not valid JSON; restore it or start a new output") from None
    if not isinstance(data, dict):
        raise JobFileError(f"{url} holds a JSON {type(data).__name__}, not an object; restore it or start a new output")
    return data


def storage_error(url: str, exc: BaseException, action: str) -> PalstreamError:
    """One line for a storage failure of a job file: what could not be done where, and what to check.

    Remote failures (credentials, endpoint, permissions, timeout) are named by
    :func:`palstream.storage.storage_error`; others get the backend's first line.
    """
    if isinstance(exc, PalstreamError):
        return exc
    mapped = remote_storage_error(exc, url, action, ArchiveError)
    if mapped is not None:
        return mapped
    hint = "check the endpoint, credentials and permissions" if "://" in url else "check the path and permissions"
    return ArchiveError(f"cannot {action} {redact_url(url)} ({_one_line(exc)}); {hint}")


def _ensure_parent(fs, path: str) -> None:
    """Local filesystems need folders before files; object stores have none."""
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def write_json(location: Location, data: dict) -> None:
    write_bytes(location, json.dumps(data, indent=1, sort_keys=True).encode())


def write_bytes(location: Location, blob: bytes) -> None:
    """Write ``blob`` to ``location``; a storage failure is a one-line ``ArchiveError``."""
    try:
        fs, path = location.filesystem()
        _ensure_parent(fs, path)
        fs.pipe_file(path, blob)
    except Exception as exc:  # every backend raises its own family
        raise storage_error(location.url, exc, "write") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


_PROCESS_STARTED = time.time()  # lock records older than this with our pid belong to a previous process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLock:
    """Exclusive use of one output root by one driver.

    The lock is ``_palstream/lock.json``, created with an exclusive create (``O_EXCL`` locally,
    ``If-None-Match: *`` on S3), so two drivers cannot both take it. The holder rewrites its
    heartbeat every 15 s. A lock is stale, and is taken over, when its holder's process is gone
    (same host) or its heartbeat is older than ``stale_after`` seconds (any host); a live lock
    makes :meth:`acquire` raise ``JobLockedError`` naming the holder.
    """

    def __init__(self, output: Location, stale_after: float = LOCK_STALE_SECONDS):
        self.location = output.child(JOB_DIR, "lock.json")
        self.url = self.location.url
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "started": self.started,
                "heartbeat": now,
            }
        ).encode()

    def _create(self) -> bool:
        fs, path = self.location.filesystem()
        _ensure_parent(fs, path)
        try:
            with fs.open(path, "xb") as f:
                f.write(self._record())
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # s3fs reports a failed precondition as an OSError
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def holder(self) -> dict | None:
        """The current lock record, or None when the output is not locked."""
        try:
            return read_json(self.location)
        except JobFileError:  # torn write by a killed driver: treat as stale
            return {"heartbeat": 0.0}

    def is_stale(self, record: dict) -> bool:
        if record.get("host") == socket.gethostname() and "pid" in record:
            if not _pid_alive(record["pid"]):
                return True
            # our own pid from before this process started: a restarted container (pid 1 again)
            if record["pid"] == os.getpid() and float(record.get("started", 0.0)) < _PROCESS_STARTED:
                return True
        return time.time() - float(record.get("heartbeat", 0.0)) > self.stale_after

    def acquire(self) -> JobLock:
        """Take the lock (taking over a stale one) and start the heartbeat thread."""
        for _ in range(3):
            if self._create():
                break
            record = self.holder()
            if record is None:
                continue  # released between our create and read: try again
            if not self.is_stale(record):
                age = time.time() - float(record.get("heartbeat", 0.0))
                raise JobLockedError(
                    f"output {self.url.rsplit('/', 2)[0]} is in use by another palstream run "
                    f"(pid {record.get('pid')} on {record.get('host')}, heartbeat {age:.0f} s ago); wait for it to "
                    f"finish, or if it is dead remove {self.url}"
                )
            fs, path = self.location.filesystem()
            fs.rm_file(path)
        else:
            raise JobLockedError(f"could not take the lock {self.url}: another run keeps taking it; retry later")
        self._thread = threading.Thread(target=self._beat, name="palstream-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
            try:
                if (self.holder() or {}).get("token") != self.token:
                    return  # someone broke our lock by hand; do not fight over it
                fs, path = self.location.filesystem()
                fs.pipe_file(path, self._record())
            except Exception:  # a missed heartbeat is retried at the next beat
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self.holder() or {}).get("token") == self.token:
                fs, path = self.location.filesystem()
                fs.rm_file(path)
        except Exception:  # a lock left behind is stale once our pid is gone
            pass

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
