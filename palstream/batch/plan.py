"""The job plan: every input probed and split into GOP-aligned units, frozen and content-hashed.

The plan is written once to ``<output>/_palstream/plan.json`` before any archive exists. It fixes
each input's probe result (frame count, size, SHA-256) or its refusal: a later ``submit`` of the
same inputs and settings, and ``resume``, continue from the stored plan without probing again, so
a refusal is never turned into an acceptance by a second probe. A ``submit`` with other inputs or
settings is refused, so an output root never mixes two jobs.

Archives mirror the input tree: an input's path relative to the inputs' common folder, with its
suffix replaced by ``.zarr``, is its archive's path under the output root. Every path read back
from a plan is checked to stay inside the output root (``resume`` trusts nothing it reads).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import PurePosixPath

from palstream import __version__
from palstream.batch.spec import JobSpec
from palstream.batch.store import JOB_DIR, read_json, write_json
from palstream.codec import EncoderConfig
from palstream.errors import ConfigError, InputError
from palstream.io import SourceInfo
from palstream.storage import Location, redact_url

PLAN_VERSION = 2
KNOWN_PLAN_VERSIONS = (1, 2)  # version 1: flat layout, no source paths
ARCHIVE_SUFFIX = ".zarr"


@dataclass(frozen=True, slots=True)
class Unit:
    """One task: frames ``[start, start + count)`` of input ``source`` -> chunk ``index`` of its archive."""

    source: int
    index: int
    start: int
    count: int


def _plan_json(data: dict) -> dict:
    """An input's entry as the plan file holds it: ``path`` absent when None, as version 1 plans wrote it."""
    return data if data["path"] is not None else {k: v for k, v in data.items() if k != "path"}


@dataclass(frozen=True, slots=True)
class PlannedSource:
    """One accepted input as the plan records it.

    Attributes
    ----------
    url : str
        The input's URL or absolute local path.
    path : str or None
        Its path relative to the inputs' common folder (None in version 1 plans).
    archive : str
        Its archive's path relative to the output root.
    info : SourceInfo
        Its probe result (frame count, size, SHA-256, ...).
    units : tuple of (start, count)
        Its GOP-aligned units, in frame order.
    """

    url: str
    path: str | None
    archive: str
    info: SourceInfo
    units: tuple[tuple[int, int], ...]

    @classmethod
    def from_dict(cls, data: dict) -> PlannedSource:
        return cls(
            data["url"], data.get("path"), data["archive"], SourceInfo.from_dict(data["info"]),
            tuple((start, count) for start, count in data["units"]),
        )

    def to_dict(self) -> dict:
        """The plan file's JSON form (``path`` absent when None, as version 1 plans wrote it)."""
        return _plan_json({"url": self.url, "path": self.path, "archive": self.archive, "info": self.info.to_dict(),
                           "units": [list(unit) for unit in self.units]})

    @property
    def name(self) -> str:
        """How reports name the input: its path under the inputs' folder, or its file name."""
        return self.path if self.path is not None else self.info.name


@dataclass(frozen=True, slots=True)
class RejectedSource:
    """An input the plan refused (its probe failed), as the plan records it.

    Attributes
    ----------
    url : str
        The input's URL or absolute local path.
    path : str or None
        Its path relative to the inputs' common folder (None in version 1 plans).
    reason : str
        Why it was refused (one line).
    """

    url: str
    path: str | None
    reason: str

    @classmethod
    def from_dict(cls, data: dict) -> RejectedSource:
        return cls(data["url"], data.get("path"), data["reason"])

    def to_dict(self) -> dict:
        """The plan file's JSON form (``path`` absent when None, as version 1 plans wrote it)."""
        return _plan_json({"url": self.url, "path": self.path, "reason": self.reason})

    @property
    def name(self) -> str:
        """How reports name the input: its path under the inputs' folder, or its file name."""
        return self.path if self.path is not None else self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Plan:
    """A validated plan.

    Attributes
    ----------
    data : dict
        The JSON document: ``codec``, ``sources`` (:meth:`PlannedSource.to_dict` each) and
        ``rejected`` inputs (probe failures). Kept as read: the hash is of these bytes.
    hash : str
        sha256 of the canonical JSON of ``data``: the job's identity.
    sources : tuple of PlannedSource
        ``data["sources"]`` as records (parsed on first use, after :func:`load_plan` checked them).
    rejected : tuple of RejectedSource
        ``data["rejected"]`` as records.
    """

    data: dict
    hash: str

    @classmethod
    def build(
        cls,
        config: EncoderConfig,
        probed: list[tuple[str, dict | None, str | None]],
        tuner: dict | None = None,
        allow_truncated: bool = False,
        streams: dict | None = None,
        shard_chunks: int | None = None,
    ) -> Plan:
        """Plan from ``(url, SourceInfo dict or None, rejection reason or None)`` per input.

        ``shard_chunks`` (K) makes every archive of the job format 4, K chunks to an object, and
        every task one shard (``palstream.archive``, FORMAT.md §8); a plan without it (written
        before format 4) keeps its archives in format 3 through every resume.

        ``tuner`` (the ``[tuner]`` settings of a tuned job), ``allow_truncated`` and ``streams``
        (:func:`streams_settings`) become part of the job's identity: an output never mixes
        tuned and untuned runs, or two tunings, or runs that keep and refuse truncated inputs,
        or that keep the other streams differently.
        """
        layout = mirror_layout([url for url, _, _ in probed])
        sources, rejected = [], []
        for url, info, reason in probed:
            path, archive = layout[url]
            if info is None:
                rejected.append(RejectedSource(url, path, reason or "").to_dict())
                continue
            source = SourceInfo.from_dict(info)
            units = tuple((s, min(config.gop, source.frame_count - s)) for s in range(0, source.frame_count, config.gop))
            sources.append(PlannedSource(url, path, archive, source, units).to_dict())
        data = {"version": PLAN_VERSION, "codec": config.to_dict(), "sources": sources, "rejected": rejected}
        if tuner is not None:
            data["tuner"] = tuner
        if allow_truncated:  # absent by default: plans of other jobs keep their hashes
            data["allow_truncated"] = True
        if streams:  # absent for the defaults (audio copied, nothing dropped), as above
            data["streams"] = streams
        if shard_chunks is not None:
            data["shard_chunks"] = shard_chunks
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: dict) -> Plan:
        return cls(data, hashlib.sha256(_canonical(data)).hexdigest())

    def matches(
        self, urls: list[str], config: EncoderConfig, tuner: dict | None, allow_truncated: bool = False, streams: dict | None = None
    ) -> bool:
        """Whether this plan is the job of ``urls`` encoded with ``config`` (``tuner``, ``allow_truncated``, ``streams``).

        The shard size is not compared: a stored plan keeps its own (its archives are written in it).
        """
        planned = sorted([s.url for s in self.sources] + [r.url for r in self.rejected])
        return (
            planned == sorted(urls)
            and self.config == config
            and self.tuner == tuner
            and self.data.get("allow_truncated", False) == allow_truncated
            and self.data.get("streams") == (streams or None)
        )

    @property
    def audio(self) -> str:
        """How the archives keep audio: ``"copy"`` or ``"flac"`` (``palstream encode --audio``)."""
        return self.data.get("streams", {}).get("audio", "copy")

    @property
    def drop_streams(self) -> tuple[int, ...]:
        """Source stream indices the archives leave out (``palstream encode --drop-stream``)."""
        return tuple(self.data.get("streams", {}).get("drop_streams", ()))

    @property
    def config(self) -> EncoderConfig:
        return EncoderConfig.from_dict(self.data["codec"])

    @property
    def shard_chunks(self) -> int | None:
        """Chunks per shard of the job's archives (format 4); None: format 3, an object per chunk."""
        return self.data.get("shard_chunks")

    @property
    def tuner(self) -> dict | None:
        """The ``[tuner]`` settings of a tuned job, None for an untuned one."""
        return self.data.get("tuner")

    @cached_property
    def sources(self) -> tuple[PlannedSource, ...]:
        return tuple(PlannedSource.from_dict(src) for src in self.data["sources"])

    @cached_property
    def rejected(self) -> tuple[RejectedSource, ...]:
        return tuple(RejectedSource.from_dict(r) for r in self.data["rejected"])

    def units(self) -> list[Unit]:
        """Every unit, input by input, in frame order."""
        return [
            Unit(i, j, start, count)
            for i, src in enumerate(self.sources)
            for j, (start, count) in enumerate(src.units)
        ]

    def archive_location(self, output: Location, source: int) -> Location:
        """Input ``source``'s archive under the output root ``output``."""
        return output.child(self.sources[source].archive)

    def total_frames(self) -> int:
        return sum(src.info.frame_count for src in self.sources)


def streams_settings(spec: JobSpec) -> dict | None:
    """How the job keeps each input's other streams, as the plan records it: None for the defaults."""
    settings: dict[str, str | list[int]] = {}
    if spec.audio != "copy":
        settings["audio"] = spec.audio
    if spec.drop_streams:
        settings["drop_streams"] = list(spec.drop_streams)
    return settings or None


def _parts(url: str) -> list[str]:
    """``[protocol, *path components]`` of a URL or absolute local path."""
    protocol, _, path = url.rpartition("://") if "://" in url else ("file", "", url)
    return [protocol or "file", *[p for p in path.split("/") if p]]


def mirror_layout(urls: list[str]) -> dict[str, tuple[str, str]]:
    """``url -> (source path, archive path)``, both relative to the inputs' common folder.

    The archive path is the source path with its suffix replaced by ``.zarr``
    (``in/a/x.mkv`` -> ``a/x.zarr``). Inputs that differ only by suffix in one folder
    (``x.mkv``, ``x.mp4``) keep their whole file name (``x.mkv.zarr``, ``x.mp4.zarr``).
    Inputs under different protocols keep the protocol as their first folder.
    """
    parts = {url: _parts(url) for url in urls}
    common: list[str] = []
    for level in zip(*(p[:-1] for p in parts.values())):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    # Inputs under different protocols share no folder: the protocol is then their first one.
    relative = {url: "/".join(p[len(common):]) for url, p in parts.items()}
    stems: dict[str, list[str]] = {}
    for url, rel in relative.items():
        stems.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(url)
    layout = {}
    for stem, members in stems.items():
        for url in members:
            archive = (relative[url] if len(members) > 1 else stem) + ARCHIVE_SUFFIX
            layout[url] = (relative[url], archive)
    return layout


def archive_name(url: str) -> str:
    """Archive path of a single input: its file name's stem plus ``.zarr``."""
    return mirror_layout([url])[url][1]


def check_archive_path(path, where: str) -> str:
    """``path`` if it is a relative path confined to the output root, else a one-line ``ConfigError``.

    No scheme, no absolute path, no ``..`` or empty component, not inside ``_palstream/``,
    and ending in ``.zarr``: a plan cannot make a job write anywhere but its own archives.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: archive path {path!r} is not a relative path; restore the file or start a new output")
    components = path.split("/")
    if (
        "://" in path
        or ":" in components[0]
        or path.startswith("/")
        or "\\" in path
        or any(c in ("", ".", "..") for c in components)
        or components[0] == JOB_DIR
        or not path.endswith(ARCHIVE_SUFFIX)
        or posixpath.normpath(path) != path
    ):
        raise ConfigError(
            f"{where}: archive path {path!r} leaves the output root; restore the file or start a new output"
        )
    return path


def credential_free(url: str) -> str:
    """``url`` if it carries no credential; a one-line ``ConfigError`` otherwise.

    A password in the URL or a signed query string (what ``palstream.storage.redact_url`` removes)
    would be stored in ``plan.json`` and ``job.json`` and shown by ``status``; credentials come
    from the environment or a profile.
    """
    redacted = redact_url(url)
    if redacted != url:
        raise ConfigError(
            f"input {redacted} carries credentials in its URL, which would be stored in the job's files; "
            "set them in the environment (AWS_ACCESS_KEY_ID, ...) or use storage.aws_profile"
        )
    return url


def plan_location(output: Location) -> Location:
    return output.child(JOB_DIR, "plan.json")


def expand_inputs(inputs: tuple[str, ...], storage_options_for) -> list[str]:
    """Resolve paths, globs and URLs to a sorted, de-duplicated list of input URLs.

    Local paths become absolute. A glob that matches nothing, or a path that does not exist,
    is an ``InputError``; a URL with credentials in it is a ``ConfigError``.
    """
    found: list[str] = []
    for pattern in inputs:
        credential_free(pattern)
        remote = "://" in pattern and not pattern.startswith("file://")
        if not remote:
            pattern = os.path.abspath(pattern.removeprefix("file://"))
        fs, path = Location(pattern, storage_options_for(pattern)).filesystem()
        if any(ch in pattern for ch in "*?["):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
            if not matches:
                raise InputError(f"input pattern {pattern} matches no file; check the path or glob")
        else:
            if not fs.isfile(path):
                raise InputError(f"input {pattern} does not exist or is not a file; check the path or URL")
            matches = [path]
        protocol = pattern.split("://", 1)[0] if remote else None
        found += [f"{protocol}://{m}" if protocol else m for m in matches]
    return sorted(set(found))


def load_plan(output: Location) -> Plan | None:
    """The plan stored under ``output``, or None when there is none.

    Raises
    ------
    ConfigError
        The file is not the plan palstream wrote: not JSON, hash mismatch, unknown version,
        malformed fields, or an archive path outside the output root.
    """
    where = plan_location(output).url
    data = read_json(plan_location(output))
    if data is None:
        return None
    stored = data.pop("hash", None)
    data.pop("written_by", None)
    plan = Plan.from_data(data)
    if stored != plan.hash:
        raise ConfigError(f"plan {where} was modified after it was written (hash mismatch); restore it or start a new output")
    _check_plan(data, where)
    return plan


def _check_plan(data: dict, where: str) -> None:
    """Check the fields a run uses; every archive path must stay inside the output root."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"plan {where}: {what}; restore it or start a new output")

    if data.get("version") not in KNOWN_PLAN_VERSIONS:
        raise bad(f"unknown version {data.get('version')!r}")
    if not isinstance(data.get("sources"), list) or not isinstance(data.get("rejected"), list):
        raise bad("'sources' and 'rejected' must be lists")
    from palstream.archive import MAX_SHARD_CHUNKS

    shard_chunks = data.get("shard_chunks", 1)
    if isinstance(shard_chunks, bool) or not isinstance(shard_chunks, int) or not 1 <= shard_chunks <= MAX_SHARD_CHUNKS:
        raise bad(f"shard_chunks {shard_chunks!r} is not 1..{MAX_SHARD_CHUNKS}")
    try:
        EncoderConfig.from_dict(data["codec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"codec settings are invalid ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for i, rejected in enumerate(data["rejected"]):
        if not (isinstance(rejected, dict) and isinstance(rejected.get("url"), str) and isinstance(rejected.get("reason"), str)
                and isinstance(rejected.get("path", ""), str)):
            raise bad(f"rejected input {i} is malformed")
    archives = set()
    for i, src in enumerate(data["sources"]):
        if not isinstance(src, dict) or not isinstance(src.get("url"), str) or not isinstance(src.get("info"), dict):
            raise bad(f"source {i} is malformed")
        archives.add(check_archive_path(src.get("archive"), f"plan {where} source {i}"))
        n = src["info"].get("frame_count")
        units = src.get("units")
        if not isinstance(n, int) or n < 1 or not isinstance(units, list):
            raise bad(f"source {i} has no valid frame count or units")
        expected = [[s, min(data["codec"]["gop"], n - s)] for s in range(0, n, data["codec"]["gop"])]
        if units != expected:
            raise bad(f"source {i}: units do not cover its {n} frames in GOPs")
        try:
            SourceInfo.from_dict(src["info"])
        except TypeError:
            raise bad(f"source {i}: its probe result lacks fields this version needs") from None
    if len(archives) != len(data["sources"]):
        raise bad("two sources share an archive")


def save_plan(output: Location, plan: Plan) -> None:
    """Write the plan once; an existing identical plan is kept, a different one is refused."""
    existing = load_plan(output)
    if existing is not None:
        if existing.hash != plan.hash:
            raise ConfigError(
                f"output {output.url} already holds a different job (plan {existing.hash[:12]}, this job {plan.hash[:12]}); "
                "finish it with `palstream resume`, or choose another --out"
            )
        return
    write_json(plan_location(output), {**plan.data, "hash": plan.hash, "written_by": f"palstream {__version__}"})


def job_location(output: Location) -> Location:
    return output.child(JOB_DIR, "job.json")


def save_job_settings(output: Location, spec: JobSpec) -> None:
    """Record how the job was run, under the hash of its canonical JSON, for ``resume``.

    No credentials: StorageSpec holds none, and inputs with credentials are refused.
    """
    data = spec.to_dict()
    write_json(job_location(output), {**data, "hash": hashlib.sha256(_canonical(data)).hexdigest()})


def load_job_settings(output: Location) -> dict | None:
    """The job settings stored under ``output`` (None when there are none), hash checked.

    Raises
    ------
    ConfigError
        Not JSON, not an object, or modified after it was written (hash missing or wrong).
    """
    where = job_location(output).url
    data = read_json(job_location(output))
    if data is None:
        return None
    stored = data.pop("hash", None)
    if stored != hashlib.sha256(_canonical(data)).hexdigest():
        raise ConfigError(f"job settings {where} were modified after they were written (hash mismatch); restore the file or start a new output")
    return data


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def fs_exists(location: Location) -> bool:
    fs, path = location.filesystem()
    return fs.exists(path)
