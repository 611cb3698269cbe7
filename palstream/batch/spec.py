"""Job specifications: what to encode, where to write it, and on which cluster.

A job comes from a TOML file (examples in ``jobs/``), from the command line, or both.
Precedence is command line > job file > defaults: :func:`load_job_file` reads the file into a
plain dict, the CLI lays its options over that dict, and :meth:`JobSpec.from_dict` validates
the result once, up front, raising a one-line ``ConfigError`` that names the offending field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from palstream.codec import EncoderConfig
from palstream.errors import ConfigError
from palstream.io import AUDIO_MODES

CLUSTER_KINDS = ("local", "cuda")
SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://")
# Credentials never live in a job file: they come from the environment or an AWS profile.
SECRET_STORAGE_KEYS = ("key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")


@dataclass(frozen=True)
class StorageSpec:
    """Where and how to reach object storage (never the credentials themselves).

    Parameters
    ----------
    profile : str or None, default None
        Name of a profile in the storage profiles file (``storage/profiles.toml`` or
        ``$PALSTREAM_STORAGE_PROFILES``); its fields fill the ones left unset here.
    endpoint_url : str or None, default None
        S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``; None means AWS.
    region : str or None, default None
        S3 region name.
    aws_profile : str or None, default None
        Profile in ``~/.aws/credentials`` holding the keys; None uses the standard
        environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``).
    anon : bool, default False
        Read public buckets without credentials.
    """

    profile: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    aws_profile: str | None = None
    anon: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "storage") -> StorageSpec:
        data = dict(data)
        for key in data:
            if key in SECRET_STORAGE_KEYS:
                raise ConfigError(
                    f"{where}.{key}: credentials do not belong in a job file; set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY in the environment or use aws_profile"
                )
        _check_known(cls, data, where)
        for name in ("profile", "endpoint_url", "region", "aws_profile"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ConfigError(f"{where}.{name}: must be a string, got {data[name]!r}")
        if data.get("endpoint_url") and urlsplit(data["endpoint_url"]).password is not None:
            raise ConfigError(
                f"{where}.endpoint_url: credentials do not belong in the endpoint URL (they would be stored with the job); "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment or use aws_profile"
            )
        if "anon" in data and not isinstance(data["anon"], bool):
            raise ConfigError(f"{where}.anon: must be true or false, got {data['anon']!r}")
        spec = cls(**data)
        return spec._with_profile() if spec.profile else spec

    def _with_profile(self) -> StorageSpec:
        path = Path(os.environ.get("PALSTREAM_STORAGE_PROFILES", "storage/profiles.toml"))
        if not path.is_file():
            raise ConfigError(
                f"storage.profile: profile {self.profile!r} needs the profiles file {path}; create it "
                "(see storage/profiles.example.toml) or set PALSTREAM_STORAGE_PROFILES"
            )
        profiles = _read_toml(path).get("profiles", {})
        if self.profile not in profiles:
            raise ConfigError(
                f"storage.profile: no profile {self.profile!r} in {path}; known: {', '.join(sorted(profiles)) or 'none'}"
            )
        base = StorageSpec.from_dict({**profiles[self.profile], "profile": None}, where=f"{path}:{self.profile}")
        merged = base.to_dict()
        merged.update({k: v for k, v in self.to_dict().items() if v not in (None, False)})
        return StorageSpec(**merged)

    def options(self, url: str) -> dict:
        """fsspec ``storage_options`` for ``url`` (empty for local paths).

        Credentials are resolved by botocore inside each process from the environment or
        ``aws_profile``; they are never part of these options, the plan, or task arguments.
        """
        if not url.startswith(("s3://", "s3a://")):
            return {}
        opts: dict[str, Any] = {}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        if self.aws_profile:
            opts["profile"] = self.aws_profile
        if self.anon:
            opts["anon"] = True
        return opts


@dataclass(frozen=True)
class TunerSpec:
    """The ``[tuner]`` table: whether and how the tuner picks each batch's encoder configuration.

    See ``docs/tuner.md``.

    Parameters
    ----------
    enabled : bool, default False
        Let the tuner choose a configuration per batch (``--tune``); the floor stays the job's.
    batch_units : int, default 4
        Consecutive units of one input per batch; the configuration changes only between batches.
    policy : str or None, default None
        Policy file to start from (``palstream tune --out``, or a previous job's
        ``_palstream/tuner/policy.json``); None: the policy shipped with palstream.
    seed : int, default 0
        Seed of the agent's tie-breaking; same seed and same rewards give the same decisions.
    ratio_weight, quality_weight, cost_weight : float, default 1.0, 0.1, 0.5
        Reward weights (``palstream.tuner.reward.RewardWeights``).
    replay : str or None, default None
        A job's ``ledger.jsonl``: take every batch's configuration from it instead of deciding
        (reproduces that job's archives byte for byte).
    """

    enabled: bool = False
    batch_units: int = 4
    policy: str | None = None
    seed: int = 0
    ratio_weight: float = 1.0
    quality_weight: float = 0.1
    cost_weight: float = 0.5
    replay: str | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str = "tuner") -> TunerSpec:
        from palstream.tuner.reward import RewardWeights

        data = dict(data)
        _check_known(cls, data, where)
        if not isinstance(data.get("enabled", False), bool):
            raise ConfigError(f"{where}.enabled: must be true or false, got {data['enabled']!r}")
        for name, lo in (("batch_units", 1), ("seed", 0)):
            value = data.get(name, 0 if name == "seed" else 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{where}.{name}: must be an integer >= {lo}, got {value!r}")
        for name in ("policy", "replay"):
            if data.get(name) is not None and not (isinstance(data[name], str) and data[name]):
                raise ConfigError(f"{where}.{name}: must be a path, got {data[name]!r}")
        weights = {k: data[k] for k in ("ratio_weight", "quality_weight", "cost_weight") if k in data}
        try:
            RewardWeights(**weights)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{str(exc).removeprefix('tuner.')}") from None
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JobSpec:
    """One batch job, validated.

    Parameters
    ----------
    inputs : tuple of str
        Paths, globs or fsspec URLs (``s3://bucket/dir/*.mkv``); one archive per input.
    output : str
        Output root (local path or fsspec URL); archive ``<stem>.zarr`` per input beside
        the job's plan and lock under ``_palstream/``.
    codec : EncoderConfig
        Encoder settings shared by every input.
    cluster : str, default "local"
        ``"local"`` (``distributed.LocalCluster``, CPU), ``"cuda"`` (dask-cuda, one worker
        per GPU; needs ``palstream[gpu]``) or a scheduler address such as ``tcp://host:8786``.
    workers : int or None, default None
        Worker processes (local; None: one per CPU core) or GPUs (cuda; None: every visible
        GPU); ignored for a scheduler address.
    threads_per_worker : int, default 1
        Threads in each worker; one avoids oversubscribing cores with torch/numba threads.
    retries : int, default 2
        Extra attempts of a failing unit before it is quarantined.
    max_in_flight : int, default 0
        Units submitted but not finished at any time; 0 means one per worker thread (more helps
        where reading and writing a unit waits on remote storage). Counted in tasks.
    units_per_task : int, default 1
        Consecutive units of one input that one Dask task encodes, and the shard size K of the
        job's archives (format 4, at most 1024: one shard object and one commit marker per task).
        The scheduler spends about a millisecond per task: for libraries of 10^5 units and more,
        or units of well under a second, give tens (docs/scale.md). A task holds its K payloads
        in memory until it writes them. The plan records K: a resume keeps it. Tuned jobs run one
        unit per task (K = 1).
    storage : StorageSpec
        Endpoint/region/profile for ``s3://`` inputs and outputs.
    tuner : TunerSpec
        The ``[tuner]`` table (off by default).
    allow_truncated : bool, default False
        Archive the frames before the break of a truncated or damaged input instead of refusing
        it; the plan and the archive record what was detected (``SourceInfo.truncated``).
    audio : {"copy", "flac"}, default "copy"
        How each archive keeps its source's audio, as ``palstream encode --audio``: packets
        bit-exact, or re-encoded to FLAC losslessly (refused for floating-point audio).
    drop_streams : tuple of int, default ()
        Source stream indices every archive leaves out, as ``palstream encode --drop-stream``
        (an input without such a stream is refused). Every other stream, chapter, tag and
        attachment is kept.
    """

    inputs: tuple[str, ...]
    output: str
    codec: EncoderConfig = field(default_factory=EncoderConfig)
    cluster: str = "local"
    workers: int | None = None
    threads_per_worker: int = 1
    retries: int = 2
    max_in_flight: int = 0
    units_per_task: int = 1
    storage: StorageSpec = field(default_factory=StorageSpec)
    tuner: TunerSpec = field(default_factory=TunerSpec)
    allow_truncated: bool = False
    audio: str = "copy"
    drop_streams: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: dict, where: str = "job") -> JobSpec:
        """Validate a job given as a dict (a parsed job file with CLI overrides laid over it)."""
        data = dict(data)
        _check_known(cls, data, where)
        for required in ("inputs", "output"):
            if required not in data or data[required] in (None, "", [], ()):
                raise ConfigError(f"{where}: field '{required}' is missing; see jobs/README.md")
        inputs = data["inputs"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(i, str) and i for i in inputs):
            raise ConfigError(f"{where}.inputs: must be a list of paths or URLs, got {inputs!r}")
        if not isinstance(data["output"], str):
            raise ConfigError(f"{where}.output: must be a path or URL string, got {data['output']!r}")
        cluster = data.get("cluster", "local")
        if not isinstance(cluster, str) or not (cluster in CLUSTER_KINDS or cluster.startswith(SCHEDULER_SCHEMES)):
            raise ConfigError(
                f"{where}.cluster: {cluster!r} is not 'local', 'cuda' or a scheduler address like tcp://host:8786"
            )
        ints = {}
        if data.get("workers") is None:
            data.pop("workers", None)
        for name, lo in (("workers", 1), ("threads_per_worker", 1), ("retries", 0), ("max_in_flight", 0), ("units_per_task", 1)):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                    raise ConfigError(f"{where}.{name}: must be an integer >= {lo}, got {value!r}")
                ints[name] = value
        codec = data.get("codec", {})
        if isinstance(codec, EncoderConfig):
            config = codec
        elif isinstance(codec, dict):
            try:
                config = EncoderConfig.from_dict(codec)
            except ConfigError as exc:
                raise ConfigError(f"{where}.codec: {exc}") from None
            except TypeError as exc:  # a value of the wrong type reaches the dataclass comparisons
                raise ConfigError(f"{where}.codec: {exc}") from None
        else:
            raise ConfigError(f"{where}.codec: must be a table of encoder settings, got {codec!r}")
        storage = data.get("storage", {})
        if isinstance(storage, dict):
            storage = StorageSpec.from_dict(storage, where=f"{where}.storage")
        elif not isinstance(storage, StorageSpec):
            raise ConfigError(f"{where}.storage: must be a table, got {storage!r}")
        tuner = data.get("tuner", {})
        if isinstance(tuner, dict):
            tuner = TunerSpec.from_dict(tuner, where=f"{where}.tuner")
        elif not isinstance(tuner, TunerSpec):
            raise ConfigError(f"{where}.tuner: must be a table, got {tuner!r}")
        allow_truncated = data.get("allow_truncated", False)
        if not isinstance(allow_truncated, bool):
            raise ConfigError(f"{where}.allow_truncated: must be true or false, got {allow_truncated!r}")
        audio = data.get("audio", "copy")
        if audio not in AUDIO_MODES:
            raise ConfigError(f"{where}.audio: must be one of {', '.join(AUDIO_MODES)}, got {audio!r}")
        drop_streams = data.get("drop_streams", [])
        if not isinstance(drop_streams, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in drop_streams
        ):
            raise ConfigError(f"{where}.drop_streams: must be a list of stream indices (integers >= 0), got {drop_streams!r}")
        return cls(
            inputs=tuple(inputs),
            allow_truncated=allow_truncated,
            audio=audio,
            drop_streams=tuple(sorted(set(drop_streams))),
            output=data["output"].rstrip("/"),
            codec=config,
            cluster=cluster,
            storage=storage,
            tuner=tuner,
            **ints,
        )

    def to_dict(self) -> dict:
        """Plain dict (TOML/JSON-able); round-trips through :meth:`from_dict`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["inputs"] = list(self.inputs)
        out["drop_streams"] = list(self.drop_streams)
        out["codec"] = self.codec.to_dict()
        out["storage"] = {k: v for k, v in self.storage.to_dict().items() if v not in (None, False)}
        out["tuner"] = {k: v for k, v in self.tuner.to_dict().items() if v is not None}
        return out


def load_job_file(path: str | Path) -> dict:
    """Parse a job file into a dict for :meth:`JobSpec.from_dict` (not yet validated).

    Relative local ``inputs`` and ``output`` are taken relative to the job file's folder, so a
    job file works from any current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist; give a path to a .toml job file (see jobs/)")
    data = _read_toml(path)
    base = path.resolve().parent

    def anchor(p):
        return p if not isinstance(p, str) or "://" in p or os.path.isabs(p) else os.path.normpath(base / p)

    if isinstance(data.get("inputs"), list):
        data["inputs"] = [anchor(p) for p in data["inputs"]]
    elif isinstance(data.get("inputs"), str):
        data["inputs"] = [anchor(data["inputs"])]
    if "output" in data:
        data["output"] = anchor(data["output"])
    if isinstance(data.get("tuner"), dict):
        for key in ("policy", "replay"):
            if key in data["tuner"]:
                data["tuner"][key] = anchor(data["tuner"][key])
    return data


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a TOML job file") from None


def _check_known(cls, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
