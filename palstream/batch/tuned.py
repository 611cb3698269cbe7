"""The tuner inside a batch job: batches, decisions, the ledger, rewards, resume and replay.

A tuned job (``[tuner] enabled``) splits each input's units into batches of ``batch_units``
consecutive units. Before a batch's units are submitted, :class:`TunedUnits` decides its
encoder configuration (from the batch's content statistics, computed on a worker), appends the
decision to the job's ledger, records the configuration in the archive, and only then hands the
units to the runner. When every unit of a batch has finished, the batch's reward goes into the
ledger and the agent. Layout::

    <output>/_palstream/tuner/ledger.jsonl          append-only: one JSON record per line
    <output>/_palstream/tuner/initial_policy.json   the policy the job started from
    <output>/_palstream/tuner/policy.json           the agent after the last reward (reuse it)

The agent's state is a function of the initial policy and the ledger, so a resumed driver
rebuilds it exactly, reuses every recorded decision (uncommitted units of a decided batch are
re-encoded with the same configuration) and decides only the batches never decided.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import numpy as np

from palstream.batch import metrics
from palstream.batch.commits import read_index
from palstream.batch.plan import Plan, Unit
from palstream.batch.store import JOB_DIR, read_json, write_json
from palstream.codec import EncoderConfig
from palstream.errors import ConfigError
from palstream.storage import Location
from palstream.tuner.agent import LinUCB, load_policy
from palstream.tuner.features import context_vector, unit_features
from palstream.tuner.reward import RewardWeights, components
from palstream.tuner.space import ARM_NAMES, arm_config

TUNER_DIR = "tuner"
LEDGER_NAME = "ledger.jsonl"
LEDGER_VERSION = 1


def tuner_location(output: Location, name: str) -> Location:
    return output.child(JOB_DIR, TUNER_DIR, name)


@dataclass(frozen=True)
class Batch:
    """Consecutive units ``units`` of input ``source``; ``id`` is ``"<source>-<first unit>"``."""

    source: int
    units: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"{self.source}-{self.units[0]}"


def plan_batches(plan: Plan, batch_units: int) -> list[Batch]:
    """Every batch of the plan, interleaved across inputs (first batches of all inputs first)."""
    per_source = [
        [Batch(i, tuple(range(first, min(first + batch_units, len(src.units)))))
         for first in range(0, len(src.units), batch_units)]
        for i, src in enumerate(plan.sources)
    ]
    depth = max((len(b) for b in per_source), default=0)
    return [batches[k] for k in range(depth) for batches in per_source if k < len(batches)]


class Ledger:
    """The job's append-only decision log (JSON Lines) on any fsspec filesystem."""

    def __init__(self, location: str | Location):
        self.location = Location.of(location)
        self.url = self.location.url

    def _lines(self) -> list[str]:
        fs, path = self.location.filesystem()
        try:
            return fs.cat_file(path).decode().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def read(self) -> list[dict]:
        """Every complete record (a last line torn by a crash is not one)."""
        records = []
        for number, line in enumerate(self._lines(), 1):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ConfigError(f"tuner ledger {self.url} line {number} is not JSON; it was edited or damaged: restore it") from None
        return records

    def repair(self) -> None:
        """Cut a torn last line (the driver crashed while appending), so the next append starts clean."""
        lines = self._lines()
        if lines and not lines[-1].endswith("\n"):
            fs, path = self.location.filesystem()
            fs.pipe_file(path, "".join(lines[:-1]).encode())

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fs, path = self.location.filesystem()
        if "file" in fs.protocol or "local" in fs.protocol:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "ab") as f:
                f.write(line)
        else:  # object stores have no append: rewrite the object (the driver is the only writer)
            try:
                old = fs.cat_file(path)
            except FileNotFoundError:
                old = b""
            fs.pipe_file(path, old + line)


def _replay_decisions(path: str, plan: Plan, batches: list[Batch]) -> dict[str, dict]:
    """Decisions of a recorded ledger, by batch id, checked against this job's plan and floor."""
    records = [r for r in Ledger(path).read() if r.get("event") == "decision"]
    if not records:
        raise ConfigError(f"tuner.replay: {path} holds no tuner decisions; give a tuned job's _palstream/tuner/{LEDGER_NAME}")
    by_key = {(r["archive"], tuple(r["units"])): r for r in records}
    base = plan.config
    found = {}
    for batch in batches:
        archive = plan.sources[batch.source].archive
        record = by_key.get((archive, batch.units))
        if record is None:
            raise ConfigError(
                f"tuner.replay: {path} has no decision for {archive} units {batch.units[0]}..{batch.units[-1]}; "
                "replay the same inputs with the same gop and batch_units"
            )
        try:
            config = EncoderConfig.from_dict(record["config"])
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"tuner.replay: {path}: batch {record['batch']} has an invalid config ({exc})") from None
        if config.digest != record["digest"]:
            raise ConfigError(f"tuner.replay: {path}: batch {record['batch']}'s config does not match its digest; the ledger was edited")
        floor = ("target_psnr", "lossless", "gop")
        if any(getattr(config, k) != getattr(base, k) for k in floor):
            raise ConfigError(
                f"tuner.replay: {path} was recorded with floor/GOP {config.target_psnr:g} dB, lossless={config.lossless}, "
                f"gop {config.gop}; this job has {base.target_psnr:g} dB, lossless={base.lossless}, gop {base.gop}"
            )
        found[batch.id] = record
    return found


class TunedUnits:
    """The units of a tuned job in batch order: what the runner submits instead of its plain queue.

    ``len(queue)`` counts the units left; :meth:`popleft` returns the next one, deciding
    the next batch's configuration first when the previous batch is handed out.

    Parameters
    ----------
    client : distributed.Client
        Runs the ``unit_features-*`` tasks (the driver never decodes video).
    output : Location
        The job's output root.
    plan : Plan
        A plan with ``tuner`` settings.
    committed : dict of int -> set of int
        Committed unit indices per input (the runner's, updated as units commit).
    skip_sources : set of int
        Inputs given up on (the runner's quarantine); their batches are not decided.
    source_options : callable
        ``url -> storage options`` for reading sources.
    """

    def __init__(self, client, output: Location, plan: Plan, committed, skip_sources, source_options, retries: int = 2):
        settings = plan.tuner
        assert settings is not None  # only a tuned job's plan has a tuned queue
        self.client, self.output, self.plan = client, output, plan
        self.committed, self.skip_sources, self.source_options, self.retries = committed, skip_sources, source_options, retries
        self.weights = RewardWeights(settings["ratio_weight"], settings["quality_weight"], settings["cost_weight"])
        self.seed = settings["seed"]
        self.batches = plan_batches(plan, settings["batch_units"])
        self.batch_of = {(b.source, u): b for b in self.batches for u in b.units}
        self.replay_url = settings.get("replay")
        self.replay = _replay_decisions(self.replay_url, plan, self.batches) if self.replay_url else None
        self.ledger = Ledger(tuner_location(output, LEDGER_NAME))
        self.ledger.repair()
        self.agent = self._initial_agent(settings.get("policy"))
        self.decisions: dict[str, dict] = {}
        self.rewarded: set[str] = set()
        self.last_ratio: dict[int, float] = {}
        self.results: dict[str, dict[int, dict]] = {}
        for record in self.ledger.read():  # rebuild the agent from the ledger (resume)
            if record["event"] == "decision":
                self.decisions[record["batch"]] = record
            elif record["event"] == "reward":
                self._learn(self.decisions[record["batch"]], record["components"])
        self.buffer: list[Unit] = []
        self.next_batch = 0
        self._settle_committed_batches()

    # -- the queue the runner pops -------------------------------------------------------------
    def __len__(self) -> int:
        """Units not yet handed out (and not committed earlier)."""
        return len(self.buffer) + sum(len(self._todo(b)) for b in self.batches[self.next_batch :])

    def popleft(self) -> Unit:
        while not self.buffer:
            batch = self.batches[self.next_batch]
            self.next_batch += 1
            todo = self._todo(batch)
            if todo:
                if batch.id not in self.decisions:
                    self._decide(batch)
                self.buffer = [self._unit(batch.source, u) for u in todo]
        return self.buffer.pop(0)

    def config_for(self, unit: Unit) -> EncoderConfig:
        """The encoder configuration of ``unit``'s batch, as decided."""
        return EncoderConfig.from_dict(self.decisions[self.batch_of[(unit.source, unit.index)].id]["config"])

    def unit_finished(self, unit: Unit, summary: dict) -> None:
        """A committed unit's summary; the last one of a batch makes the batch's reward."""
        batch = self.batch_of[(unit.source, unit.index)]
        self.results.setdefault(batch.id, {})[unit.index] = summary
        if len(self.results[batch.id]) == len(batch.units):
            self._reward(batch)

    # -- internals -----------------------------------------------------------------------------
    def _todo(self, batch: Batch) -> list[int]:
        if batch.source in self.skip_sources:
            return []
        return [u for u in batch.units if u not in self.committed[batch.source]]

    def _unit(self, source: int, index: int) -> Unit:
        start, count = self.plan.sources[source].units[index]
        return Unit(source, index, start, count)

    def _initial_agent(self, policy: str | None) -> LinUCB:
        """The job's starting policy: its saved copy when resuming, else the configured one (copied)."""
        location = tuner_location(self.output, "initial_policy.json")
        saved = read_json(location)
        if saved is not None:
            return LinUCB.from_dict(saved, location.url)
        agent = load_policy(policy)
        write_json(location, agent.to_dict(source=policy or "shipped default"))
        return agent

    def _decide(self, batch: Batch) -> dict:
        from palstream import archive

        src = self.plan.sources[batch.source]
        first = self._unit(batch.source, batch.units[0])
        last_ratio = self.last_ratio.get(batch.source)
        features, note = None, None
        try:
            features = self.client.submit(
                unit_features, Location(src.url, self.source_options(src.url)), first.start, first.count,
                key=f"unit_features-{self.plan.hash[:12]}-{batch.id}-{uuid.uuid4().hex[:8]}", retries=self.retries, pure=False,
            ).result()
        except Exception as exc:  # an unreadable batch fails in its units too; decide without context
            note = f"features failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.replay is not None:
            replayed = self.replay[batch.id]
            arm, config = replayed["arm"], EncoderConfig.from_dict(replayed["config"])
            note = f"replayed from {self.replay_url}"
        elif features is None:
            arm = "default"
            config = arm_config(arm, self.plan.config)
        else:
            x = context_vector(features, last_ratio)
            arm = self.agent.choose(x, self.weights, self.seed, len(self.decisions))
            config = arm_config(arm, self.plan.config)
        record = {
            "event": "decision",
            "version": LEDGER_VERSION,
            "batch": batch.id,
            "decision": len(self.decisions),
            "source": batch.source,
            "archive": src.archive,
            "units": list(batch.units),
            "features": features,
            "last_log2_ratio": last_ratio,
            "context": None if features is None else context_vector(features, last_ratio).tolist(),
            "arm": arm,
            "config": config.to_dict(),
            "digest": config.digest,
        }
        if note:
            record["note"] = note
        # Ledger first, then the archive, then the units: a crash in between leaves a decision
        # that a resumed driver reuses, never a chunk whose configuration is unrecorded.
        self.ledger.append(record)
        writer = archive.ArchiveWriter.open(self.plan.archive_location(self.output, batch.source))
        writer.record_chunk_config(batch.units[0], len(batch.units), config)
        self.decisions[batch.id] = record
        metrics.tuner_decisions.labels(arm).inc()
        return record

    def _reward(self, batch: Batch) -> None:
        if batch.id in self.rewarded:
            return
        decision = self.decisions[batch.id]
        info = self.plan.sources[batch.source].info
        config = EncoderConfig.from_dict(decision["config"])
        units = [self.results[batch.id][u] for u in batch.units]
        comps = components(units, info.width, info.height, config.target_psnr, config.lossless)
        reward = self.weights.reward(comps)
        self.ledger.append(
            {"event": "reward", "version": LEDGER_VERSION, "batch": batch.id, "arm": decision["arm"],
             "components": comps, "reward": reward}
        )
        self._learn(decision, comps)
        metrics.tuner_reward.observe(reward)
        write_json(tuner_location(self.output, "policy.json"), self.agent.to_dict(source=f"job {self.plan.hash[:12]}"))

    def _learn(self, decision: dict, comps: dict) -> None:
        self.rewarded.add(decision["batch"])
        self.last_ratio[decision["source"]] = comps["log2_ratio"]
        if decision["context"] is not None and self.replay is None:
            self.agent.update(decision["arm"], np.asarray(decision["context"]), comps)

    def _settle_committed_batches(self) -> None:
        """Reward decided batches whose units were all committed by an earlier run (from their summaries)."""
        summaries = read_index(self.output)
        for batch in self.batches:
            if batch.id not in self.decisions or batch.id in self.rewarded:
                continue
            for u in batch.units:
                if u in self.committed[batch.source] and (batch.source, u) in summaries:
                    self.results.setdefault(batch.id, {})[u] = summaries[(batch.source, u)]
            if len(self.results.get(batch.id, {})) == len(batch.units):
                self._reward(batch)


def ledger_summary(output: Location) -> dict | None:
    """What ``palstream status`` shows of a tuned job: decisions and mean reward by arm."""
    records = Ledger(tuner_location(output, LEDGER_NAME)).read()
    if not records:
        return None
    decisions = [r for r in records if r.get("event") == "decision"]
    rewards = {r["batch"]: r["reward"] for r in records if r.get("event") == "reward"}
    by_arm = {}
    for arm in ARM_NAMES:
        mine = [d for d in decisions if d["arm"] == arm]
        if mine:
            got = [rewards[d["batch"]] for d in mine if d["batch"] in rewards]
            by_arm[arm] = {"decisions": len(mine), "rewarded": len(got), "mean_reward": sum(got) / len(got) if got else None}
    return {
        "decisions": len(decisions),
        "rewarded": len(rewards),
        "mean_reward": sum(rewards.values()) / len(rewards) if rewards else None,
        "by_arm": by_arm,
    }
