"""The tuner: agent arithmetic, determinism, policy files, features, rewards, and tuned batch jobs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from palstream.codec import EncoderConfig
from palstream.errors import ConfigError
from palstream.frames import Frames
from palstream.quality import FloorViolation, check_floor
from palstream.tuner.agent import LinUCB, load_policy
from palstream.tuner.features import FEATURE_NAMES, content_features, context_vector
from palstream.tuner.reward import RewardWeights, components
from palstream.tuner.space import ARM_NAMES, ARMS, arm_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "palstream" / "data" / "demo.mkv"


def unit_context(**content) -> np.ndarray:
    values = {name: 0.0 for name in ("motion", "static", "texture", "colourfulness", "flat", "distinct")}
    values.update(content)
    return context_vector(values, None)


# -- agent ------------------------------------------------------------------------------------
def test_linucb_update_rule_matches_hand_computation():
    agent = LinUCB(alpha=0.5, ridge=1.0)
    x = unit_context(motion=0.5)  # bias 1, motion 0.5, rest 0: |x|^2 = 1.25
    weights = RewardWeights()  # reward = 1 * log2_ratio + 0.1 * quality_db - 0.5 * cost
    comps = {"log2_ratio": 4.0, "quality_db": 1.0, "cost": 2.0}
    assert weights.reward(comps) == pytest.approx(3.1)

    fresh = 0.5 * math.sqrt(1.25)  # A = I: mean 0, width alpha * |x|
    np.testing.assert_allclose(agent.scores(x, weights), [fresh] * len(ARM_NAMES))

    agent.update("static", x, comps)
    # Sherman-Morrison: (I + x x^T)^-1 x = x / (1 + |x|^2) = x / 2.25. The pooled model has seen
    # the same one observation: theta_0 = 3.1 x / 2.25. An untried arm predicts theta_0;
    # "static" predicts (I + x x^T)^-1 (3.1 x + theta_0) = 3.1 (1 + 1/2.25) x / 2.25.
    pooled_mean = 3.1 * 1.25 / 2.25
    static_mean = 3.1 * (1 + 1 / 2.25) * 1.25 / 2.25
    scores = agent.scores(x, weights)
    assert scores[ARM_NAMES.index("static")] == pytest.approx(static_mean + 0.5 * math.sqrt(1.25 / 2.25))
    assert scores[ARM_NAMES.index("default")] == pytest.approx(pooled_mean + fresh)
    assert agent.choose(x, weights, seed=0, decision=0) == "static"

    agent.update("static", x, {"log2_ratio": 2.0, "quality_db": 0.0, "cost": 0.0})  # reward 2.0
    # A = I + 2 x x^T: A^-1 x = x / 3.5; the rewards add up to 5.1; theta_0 = 5.1 x / 3.5
    assert agent.predict(x, weights)[ARM_NAMES.index("static")] == pytest.approx(5.1 * (1 + 1 / 3.5) * 1.25 / 3.5)
    assert agent.scores(x, weights)[ARM_NAMES.index("static")] == pytest.approx(
        5.1 * (1 + 1 / 3.5) * 1.25 / 3.5 + 0.5 * math.sqrt(1.25 / 3.5)
    )
    # the weights apply at decision time: a job that only values cost sees -cost (2 + 0)
    cost_only = RewardWeights(ratio_weight=0, quality_weight=0, cost_weight=1)
    assert agent.predict(x, cost_only)[ARM_NAMES.index("static")] == pytest.approx(-2.0 * (1 + 1 / 3.5) * 1.25 / 3.5)


def test_decisions_are_deterministic_given_seed_and_rewards():
    rng = np.random.default_rng(7)
    contexts = [unit_context(motion=m, static=s) for m, s in rng.random((30, 2))]

    def run(seed):
        agent, picks = LinUCB(alpha=0.5), []
        for n, x in enumerate(contexts):
            arm = agent.choose(x, RewardWeights(), seed, n)
            picks.append(arm)
            agent.update(arm, x, {"log2_ratio": 3 + ARM_NAMES.index(arm) * x[1], "quality_db": 0.5, "cost": 1.0})
        return picks

    assert run(3) == run(3)
    # the seed breaks exact ties only (all arms are tied while untried)
    firsts = {LinUCB().choose(contexts[0], RewardWeights(), seed, 0) for seed in range(20)}
    assert len(firsts) > 1


def test_policy_round_trip(tmp_path):
    agent = LinUCB(alpha=0.7)
    x = unit_context(texture=0.3, flat=0.6)
    agent.update("fast", x, {"log2_ratio": 3.0, "quality_db": 0.2, "cost": 1.5})
    path = tmp_path / "policy.json"
    agent.save(path, note="test")
    loaded = load_policy(path)
    assert loaded.alpha == 0.7 and loaded.counts.tolist() == agent.counts.tolist()
    np.testing.assert_array_equal(loaded.A, agent.A)
    np.testing.assert_array_equal(loaded.B, agent.B)
    np.testing.assert_array_equal(loaded.scores(x, RewardWeights()), agent.scores(x, RewardWeights()))


def test_shipped_default_policy_is_reproduced_from_the_recorded_corpus_measurements(tmp_path, run_cli):
    policy = tmp_path / "policy.json"
    result = run_cli("tune", "--from-measurements", str(ROOT / "benchmarks" / "results" / "tuner_grid.json"), "--out", str(policy))
    assert result.code == 0, result.stderr
    shipped, refit = load_policy(), load_policy(policy)
    assert shipped.counts.min() > 0 and shipped.counts.tolist() == refit.counts.tolist()
    np.testing.assert_allclose(refit.A, shipped.A)
    np.testing.assert_allclose(refit.B, shipped.B)
    neither = run_cli("tune", "--out", str(policy))
    assert neither.code == 1 and "--from-measurements" in neither.stderr and "Traceback" not in neither.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "something-else"}', "is not a palstream tuner policy"),
        ("edit:version=99", "has format version 99"),
        ("edit:space=0000", "was trained for other encoder arms"),
        ("edit:features=0000", "other features"),
        ("edit:drop-A", "malformed fields"),
        ("edit:nan", "non-finite"),
    ],
)
def test_malformed_or_incompatible_policy_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "policy.json"
    if text.startswith("edit:"):
        data = LinUCB().to_dict()
        what = text[5:]
        if "=" in what:
            key, value = what.split("=")
            data[key] = int(value) if value.isdigit() and key == "version" else value
        elif what == "drop-A":
            del data["A"]
        elif what == "nan":
            data["B"]["default"][0][0] = float("nan")
        path.write_text(json.dumps(data))
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_policy(path)
    assert message in str(exc.value) and str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_policy_on_the_command_line_exits_1_without_traceback(tmp_path, run_cli):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["{DEMO}"]\noutput = "{tmp_path / "out"}"\n[tuner]\nenabled = true\npolicy = "bad.json"\n')
    result = run_cli("submit", str(job), "--no-progress")
    assert result.code == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.json is not valid JSON" in lines[0]


def test_tuner_table_is_validated_with_one_line_errors(tmp_path):
    from palstream.batch.spec import JobSpec

    base = {"inputs": [str(DEMO)], "output": str(tmp_path / "o")}
    for tuner, field in (({"batch_units": 0}, "tuner.batch_units"), ({"cost_weight": -1}, "tuner.cost_weight"),
                         ({"enabeld": True}, "unknown field 'enabeld'"), ({"enabled": "yes"}, "tuner.enabled")):
        with pytest.raises(ConfigError) as exc:
            JobSpec.from_dict({**base, "tuner": tuner})
        assert field in str(exc.value) and "\n" not in str(exc.value)
    spec = JobSpec.from_dict({**base, "tuner": {"enabled": True, "cost_weight": 2}})
    assert JobSpec.from_dict(spec.to_dict()) == spec


# -- action space, features, reward ---------------------------------------------------------
def test_arms_never_touch_the_quality_floor_or_gop():
    for base in (EncoderConfig(target_psnr=38.0, gop=4), EncoderConfig(lossless=True, gop=16)):
        digests = set()
        for arm in ARM_NAMES:
            config = arm_config(arm, base)
            assert (config.target_psnr, config.lossless, config.gop) == (base.target_psnr, base.lossless, base.gop)
            digests.add(config.digest)
        assert len(digests) == len(ARMS)  # every arm is a distinct, hashable configuration
    with pytest.raises(ConfigError, match="unknown tuner arm"):
        arm_config("turbo", EncoderConfig())


def test_content_features_tell_static_flat_screens_from_moving_texture():
    rng = np.random.default_rng(0)
    flat = np.full((4, 64, 64), 100, np.uint8)
    grey = np.full((4, 32, 32), 128, np.uint8)
    screen = content_features(Frames(flat, grey, grey.copy()))
    assert screen["motion"] == 0 and screen["static"] == 1 and screen["flat"] == 1 and screen["colourfulness"] == 0
    noise = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    camera = content_features(Frames(noise, grey, grey.copy()))
    assert camera["motion"] > 0.5 and camera["static"] == 0 and camera["flat"] == 0 and camera["distinct"] > 0.5
    assert len(context_vector(camera, 4.0)) == len(FEATURE_NAMES)


def test_reward_components_and_the_floor():
    units = [
        {"raw_bytes": 8000, "bytes": 1000, "frames": 2, "psnr_y": 46.0, "stage_seconds": {"encode": 0.5}},
        {"raw_bytes": 8000, "bytes": 1000, "frames": 2, "psnr_y": 45.5, "stage_seconds": {"encode": 0.3}},
    ]
    comps = components(units, 1000, 500, 45.0, False)  # 4 frames of 0.5 MP: 2 MP-frames in 0.8 s
    assert comps == pytest.approx({"log2_ratio": 3.0, "quality_db": 0.5, "cost": math.log2(1.4)})
    assert components(units, 1000, 500, 40.0, False)["quality_db"] == 3.0  # capped
    check_floor(45.0, 45.0, False, "u")
    check_floor(None, 45.0, False, "u")  # exact
    check_floor(30.0, 45.0, True, "u")  # lossless jobs have no PSNR floor to meet
    with pytest.raises(FloorViolation, match="below the job's floor"):
        check_floor(44.99, 45.0, False, "clip unit 3")


def test_ledger_cuts_a_torn_last_line(tmp_path):
    from palstream.batch.tuned import Ledger

    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(str(path))
    ledger.append({"event": "decision", "batch": "0-0"})
    with open(path, "a") as f:
        f.write('{"event": "rew')  # the driver died mid-append
    assert ledger.read() == [{"event": "decision", "batch": "0-0"}]
    ledger.repair()
    ledger.append({"event": "reward", "batch": "0-0"})
    assert [r["event"] for r in ledger.read()] == ["decision", "reward"]
    path.write_text('{"event": "decision"}\nnot json\n')  # edited by hand
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        ledger.read()


def test_archive_records_the_config_of_each_chunk(tmp_path, lossless_archive):
    from palstream.archive import ArchiveWriter, open_archive
    from palstream.errors import ArchiveError

    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    archive = open_archive(str(path))
    base = archive.attrs["encoder"]["config"]
    assert [archive.chunk_config(i) for i in range(3)] == [base] * 3  # an archive without chunk configs
    writer = ArchiveWriter.open(str(path))
    small = arm_config("few-colours", EncoderConfig.from_dict(base))
    writer.record_chunk_config(1, 2, small)
    writer.record_chunk_config(1, 2, small)  # a resumed driver repeats it: no-op
    with pytest.raises(ArchiveError, match="decided once"):
        writer.record_chunk_config(2, 1, EncoderConfig.from_dict(base))
    archive = open_archive(str(path))
    assert archive.chunk_config(0) == base
    assert archive.chunk_config(1) == archive.chunk_config(2) == small.to_dict()
    assert archive.attrs["encoder"]["chunk_configs"] == [{"first": 1, "count": 2, "digest": small.digest}]
    assert archive.verify() == []


# -- batch system ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    external = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    yield external.scheduler_address
    external.close()


def tuned_spec(inputs, output, scheduler, **tuner):
    from palstream.batch.spec import JobSpec

    return JobSpec.from_dict(
        {"inputs": [str(i) for i in inputs], "output": str(output), "cluster": scheduler, "max_in_flight": 3,
         "codec": {"gop": 2}, "tuner": {"enabled": True, "batch_units": 2, **tuner}}
    )


def chunks_of(archive_path) -> list[bytes]:
    from palstream.archive import open_archive

    archive = open_archive(str(archive_path))
    assert archive.complete and archive.verify() == []
    return [archive.read_chunk(i) for i in range(archive.n_chunks)]


def ledger_records(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "_palstream" / "tuner" / "ledger.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tuned_job_ledger_floor_replay_and_resume(tmp_path, cluster):
    from palstream.archive import ArchiveWriter, open_archive
    from palstream.batch import metrics
    from palstream.batch.runner import run_job
    from palstream.batch.status import job_status

    decided_before = {arm: metrics.tuner_decisions.labels(arm)._value.get() for arm in ARM_NAMES}
    out = tmp_path / "tuned"
    report = run_job(tuned_spec([DEMO], out, cluster))  # 16 frames: 8 units, 4 batches of 2
    assert report.complete

    records = ledger_records(out)
    decisions = [r for r in records if r["event"] == "decision"]
    rewards = [r for r in records if r["event"] == "reward"]
    assert [d["units"] for d in decisions] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(r["batch"] for r in rewards) == sorted(d["batch"] for d in decisions)
    for reward in rewards:  # a batch's reward comes after its decision
        assert records.index(reward) > next(i for i, r in enumerate(records) if r is not reward and r.get("batch") == reward["batch"])
    decided_now = {arm: metrics.tuner_decisions.labels(arm)._value.get() - decided_before[arm] for arm in ARM_NAMES}
    assert decided_now == {arm: sum(d["arm"] == arm for d in decisions) for arm in ARM_NAMES}

    # configs change only between batches; the archive says which encoded each chunk; floor held
    archive = open_archive(str(out / "demo.zarr"))
    for d in decisions:
        assert d["config"] == arm_config(d["arm"], EncoderConfig(gop=2)).to_dict()
        for unit in d["units"]:
            assert archive.chunk_config(unit) == d["config"]
            assert archive.chunk_attrs(unit)["stats"]["psnr_y"] >= 45.0
    summary = job_status(str(out))["tuner"]
    assert summary["decisions"] == 4 and summary["rewarded"] == 4
    assert summary["mean_reward"] == pytest.approx(np.mean([r["reward"] for r in rewards]))
    # what the job learned is a policy the next job can start from
    learned = load_policy(out / "_palstream" / "tuner" / "policy.json")
    assert learned.counts.sum() == load_policy().counts.sum() + 4
    original = chunks_of(out / "demo.zarr")

    # replay into a new output: the same archive bytes, whatever the agent would decide now
    replayed = tmp_path / "replayed"
    run_job(tuned_spec([DEMO], replayed, cluster, replay=str(out / "_palstream" / "tuner" / "ledger.jsonl"), seed=99))
    assert chunks_of(replayed / "demo.zarr") == original
    assert [(d["batch"], d["digest"]) for d in ledger_records(replayed) if d["event"] == "decision"] == [
        (d["batch"], d["digest"]) for d in decisions
    ]

    # a driver that died after deciding the last batch, before its units committed and its reward
    last = decisions[-1]
    writer = ArchiveWriter.open(str(out / "demo.zarr"))
    for unit in last["units"]:
        writer.revoke(unit)
        (out / "_palstream" / "commits" / f"0-{unit}.jsonl").unlink()  # tuned jobs: one unit per task and record
    (out / "_palstream" / "fixity" / "0.json").unlink()  # nor was the archive finalized
    kept = [r for r in records if not (r["event"] == "reward" and r["batch"] == last["batch"])]
    (out / "_palstream" / "tuner" / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = run_job(tuned_spec([DEMO], out, cluster), resume=True)
    assert resumed.units_encoded == 2 and resumed.complete
    after = ledger_records(out)
    assert [r for r in after if r["event"] == "decision"] == decisions  # no decision was made again
    assert [r["batch"] for r in after[len(kept):]] == [last["batch"]]  # only its reward is new
    assert chunks_of(out / "demo.zarr") == original


@pytest.mark.slow
def test_a_unit_below_the_floor_is_never_accepted(tmp_path, monkeypatch, run_cli):
    """A codec that broke its promise: the unit is uncommitted and its input quarantined."""
    from distributed import LocalCluster

    import palstream.codec
    from palstream.archive import open_archive
    from palstream.batch.runner import run_job
    from palstream.codec import EncodedChunk

    encode = palstream.codec.encode_chunk

    def below_floor(frames, config, generator=None):
        encoded = encode(frames, config, generator)
        return EncodedChunk(encoded.payload, {**encoded.stats, "psnr_y": config.target_psnr - 0.5})

    monkeypatch.setattr(palstream.codec, "encode_chunk", below_floor)  # in-process workers see it
    clip = ROOT / "tests" / "data" / "batch_testsrc_64x48.mkv"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as local:
        report = run_job(tuned_spec([clip], tmp_path / "out", local.scheduler_address, batch_units=3))
    assert not report.complete
    assert report.quarantined and all("below the job's floor" in q["reason"] for q in report.quarantined)
    assert open_archive(str(tmp_path / "out" / "batch_testsrc_64x48.zarr")).committed() == set()
    result = run_cli("status", str(tmp_path / "out"))
    assert "below the job's floor" in result.stdout and "tuner: 1 batch decision(s), 0 rewarded" in result.stdout


def test_the_tuner_imports_nothing_from_the_batch_system():
    """The tuned queue lives in palstream.batch.tuned and the floor in palstream.quality: the
    dependency goes one way (batch -> tuner), so neither can be changed into a cycle."""
    import subprocess
    import sys

    probe = (
        "import sys, pkgutil, importlib, palstream.tuner as t\n"
        "[importlib.import_module(f'palstream.tuner.{m.name}') for m in pkgutil.iter_modules(t.__path__)]\n"
        "print(sorted(m for m in sys.modules if m.startswith('palstream.batch')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
