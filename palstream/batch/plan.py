"""The job plan: every input probed and split into GOP-aligned units, frozen and content-hashed.

The plan is written once to ``<output>/_palstream/plan.json`` before any archive exists. A later
``submit`` with the same inputs and settings computes the same hash and continues it; one with
other inputs or settings is refused, so an output root never mixes two jobs. ``resume`` reads the
plan back and needs neither the inputs' globs nor a new probe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from palstream import __version__
from palstream.codec import EncoderConfig
from palstream.errors import ConfigError, InputError
from palstream.batch.spec import JobSpec
from palstream.batch.store import JOB_DIR, filesystem, join, read_json, write_json

PLAN_VERSION = 1
ARCHIVE_SUFFIX = ".zarr"


@dataclass(frozen=True)
class Unit:
    """One task: frames ``[start, start + count)`` of input ``source`` -> chunk ``index`` of its archive."""

    source: int
    index: int
    start: int
    count: int


@dataclass(frozen=True)
class Plan:
    """A validated plan.

    Attributes
    ----------
    data : dict
        The JSON document: ``codec``, ``sources`` (each with ``url``, ``archive``, ``info`` and
        ``units`` as ``[start, count]`` pairs) and ``rejected`` inputs (probe failures).
    hash : str
        sha256 of the canonical JSON of ``data``: the job's identity.
    """

    data: dict
    hash: str

    @classmethod
    def build(
        cls, config: EncoderConfig, probed: list[tuple[str, dict | None, str | None]], tuner: dict | None = None
    ) -> "Plan":
        """Plan from ``(url, SourceInfo dict or None, rejection reason or None)`` per input.

        ``tuner`` (the ``[tuner]`` settings of a tuned job) becomes part of the job's identity:
        an output never mixes tuned and untuned runs, or two tunings.
        """
        sources, rejected = [], []
        for url, info, reason in probed:
            if info is None:
                rejected.append({"url": url, "reason": reason})
                continue
            n, gop = info["frame_count"], config.gop
            sources.append(
                {
                    "url": url,
                    "archive": archive_name(url),
                    "info": info,
                    "units": [[s, min(gop, n - s)] for s in range(0, n, gop)],
                }
            )
        data = {"version": PLAN_VERSION, "codec": config.to_dict(), "sources": sources, "rejected": rejected}
        if tuner is not None:
            data["tuner"] = tuner
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: dict) -> "Plan":
        return cls(data, hashlib.sha256(_canonical(data)).hexdigest())

    @property
    def config(self) -> EncoderConfig:
        return EncoderConfig.from_dict(self.data["codec"])

    @property
    def tuner(self) -> dict | None:
        """The ``[tuner]`` settings of a tuned job, None for an untuned one."""
        return self.data.get("tuner")

    @property
    def sources(self) -> list[dict]:
        return self.data["sources"]

    @property
    def rejected(self) -> list[dict]:
        return self.data["rejected"]

    def units(self) -> list[Unit]:
        """Every unit, input by input, in frame order."""
        return [
            Unit(i, j, start, count)
            for i, src in enumerate(self.sources)
            for j, (start, count) in enumerate(src["units"])
        ]

    def archive_url(self, output: str, source: int) -> str:
        return join(output, self.sources[source]["archive"])

    def total_frames(self) -> int:
        return sum(src["info"]["frame_count"] for src in self.sources)


def archive_name(url: str) -> str:
    """Archive folder name for an input: its file name's stem plus ``.zarr``."""
    return PurePosixPath(url.rstrip("/").split("://", 1)[-1]).stem + ARCHIVE_SUFFIX


def plan_url(output: str) -> str:
    return join(output, JOB_DIR, "plan.json")


def expand_inputs(inputs: tuple[str, ...], storage_options_for) -> list[str]:
    """Resolve paths, globs and URLs to a sorted, de-duplicated list of input URLs.

    Local paths become absolute. A glob that matches nothing, or a path that does not exist,
    is an ``InputError``; two inputs that would share an archive name are a ``ConfigError``.
    """
    found: list[str] = []
    for pattern in inputs:
        remote = "://" in pattern and not pattern.startswith("file://")
        if not remote:
            pattern = os.path.abspath(pattern.removeprefix("file://"))
        fs, path = filesystem(pattern, storage_options_for(pattern))
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
    urls = sorted(set(found))
    names: dict[str, str] = {}
    for url in urls:
        name = archive_name(url)
        if name in names:
            raise ConfigError(
                f"inputs {names[name]} and {url} would both write archive {name}; rename one or run them as two jobs"
            )
        names[name] = url
    return urls


def load_plan(output: str, options: dict | None = None) -> Plan | None:
    """The plan stored under ``output``, or None when there is none."""
    data = read_json(plan_url(output), options)
    if data is None:
        return None
    stored = data.pop("hash", None)
    data.pop("written_by", None)
    plan = Plan.from_data(data)
    if stored != plan.hash:
        raise ConfigError(
            f"plan {plan_url(output)} was modified after it was written (hash mismatch); restore it or start a new output"
        )
    return plan


def save_plan(output: str, plan: Plan, options: dict | None = None) -> None:
    """Write the plan once; an existing identical plan is kept, a different one is refused."""
    existing = load_plan(output, options)
    if existing is not None:
        if existing.hash != plan.hash:
            raise ConfigError(
                f"output {output} already holds a different job (plan {existing.hash[:12]}, this job {plan.hash[:12]}); "
                "finish it with `palstream resume`, or choose another --out"
            )
        return
    write_json(plan_url(output), {**plan.data, "hash": plan.hash, "written_by": f"palstream {__version__}"}, options)


def save_job_settings(output: str, spec: JobSpec, options: dict | None = None) -> None:
    """Record how the job was run (no credentials: StorageSpec holds none) for ``resume``."""
    write_json(join(output, JOB_DIR, "job.json"), spec.to_dict(), options)


def load_job_settings(output: str, options: dict | None = None) -> dict | None:
    return read_json(join(output, JOB_DIR, "job.json"), options)


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def fs_exists(url: str, options: dict | None = None) -> bool:
    fs, path = filesystem(url, options)
    return fs.exists(path)
