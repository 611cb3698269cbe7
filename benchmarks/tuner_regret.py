"""Tuner regret on the corpus: the tuner against the best fixed arm per clip (oracle) and the default.

Every unit of every clip is encoded once with every arm (``palstream.tuner.offline.measure``,
one thread, sequential: the same measurements ``palstream tune --measurements`` writes). A job is
then replayed over those measurements: batches of ``--batch-units`` units, interleaved across
clips as the batch runner orders them; the tuner decides each batch from its content statistics
and learns from the measured reward of the arm it chose, exactly as in a job (the agent never
sees the other arms' outcomes of a batch it decided). Because encoding is deterministic, a
replayed decision has the measured bytes and PSNR; its seconds are the measured ones.

Tuners compared:

- ``pretrained``: each clip is decided by a policy pretrained on the *other* clips only
  (leave-one-clip-out), then learning within the job;
- ``cold``: one agent starting from nothing, learning within the job only.

Baselines: ``default`` (the default configuration for every batch) and ``oracle`` (per clip,
the one arm with the best total reward on that clip, known only in hindsight).

    python benchmarks/tuner_regret.py --measurements benchmarks/results/tuner_grid.json

writes ``benchmarks/results/tuner_regret.json`` and ``tuner_regret.png`` (``tuner_grid_X.json`` gives
``tuner_regret_X.*``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from palstream.codec import EncoderConfig
from palstream.tuner.agent import LinUCB
from palstream.tuner.features import context_vector
from palstream.tuner.offline import measure, pretrain
from palstream.tuner.reward import RewardWeights
from palstream.tuner.space import ARM_NAMES

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path("/work/shared/corpus")
# The job's defaults, and a throughput-bound library (compute is the scarce resource).
WEIGHT_SETTINGS = {
    "default weights": RewardWeights(),
    "cost_weight 2": RewardWeights(cost_weight=2.0),
}


def batch_outcome(meas: dict, clip: dict, units: list[dict], arm: str) -> dict:
    """Reward components of a batch of measured units under one arm (as the tuned queue computes them)."""
    from palstream.tuner.reward import components

    base = EncoderConfig.from_dict(meas["base"])
    return components([u["arms"][arm] for u in units], clip["width"], clip["height"], base.target_psnr, base.lossless)


def job_batches(meas: dict, batch_units: int) -> list[tuple[int, list[dict]]]:
    """(clip index, units) per batch, interleaved across clips like ``palstream.batch.tuned.plan_batches``."""
    per_clip = [
        [(i, clip["units"][k : k + batch_units]) for k in range(0, len(clip["units"]), batch_units)]
        for i, clip in enumerate(meas["clips"])
    ]
    depth = max(len(b) for b in per_clip)
    return [b[k] for k in range(depth) for b in per_clip if k < len(b)]


def simulate(meas: dict, batches, agents: dict[int, LinUCB], weights: RewardWeights, seed: int) -> list[str]:
    """Arms a tuner picks over the job; ``agents[clip]`` decides (and learns from) that clip's batches."""
    last: dict[int, float] = {}
    arms = []
    for n, (ci, units) in enumerate(batches):
        clip = meas["clips"][ci]
        x = context_vector(units[0]["features"], last.get(ci))
        arm = agents[ci].choose(x, weights, seed, n)
        comps = batch_outcome(meas, clip, units, arm)
        agents[ci].update(arm, x, comps)
        last[ci] = comps["log2_ratio"]
        arms.append(arm)
    return arms


def evaluate(meas: dict, batch_units: int, weights: RewardWeights, alpha: float, seed: int, skip: int) -> dict:
    batches = job_batches(meas, batch_units)
    clips = meas["clips"]
    reward = {  # reward of every batch under every arm
        arm: np.array([weights.reward(batch_outcome(meas, clips[ci], units, arm)) for ci, units in batches]) for arm in ARM_NAMES
    }
    clip_of = np.array([ci for ci, _ in batches])
    oracle_arm = {ci: max(ARM_NAMES, key=lambda a: reward[a][clip_of == ci].sum()) for ci in range(len(clips))}
    names = [c["name"] for c in clips]
    loo = {ci: pretrain(meas, [n for n in names if n != names[ci]], alpha=alpha) for ci in range(len(clips))}
    cold = LinUCB(alpha=alpha)
    picks = {
        "pretrained": simulate(meas, batches, loo, weights, seed),
        "cold": simulate(meas, batches, {ci: cold for ci in range(len(clips))}, weights, seed),
        "default": ["default"] * len(batches),
        "oracle": [oracle_arm[ci] for ci in clip_of],
    }
    got = {name: np.array([reward[a][b] for b, a in enumerate(arms)]) for name, arms in picks.items()}
    # position of each batch within its clip: "after the first batches" drops the first `skip`
    position = np.array([sum(1 for c in clip_of[:b] if c == clip_of[b]) for b in range(len(batches))])
    late = position >= skip
    out = {"batches": len(batches), "skip_first_per_clip": skip, "policies": {}, "per_clip": {}, "picks": picks}
    for name, values in got.items():
        out["policies"][name] = {
            "mean_reward": float(values.mean()),
            "mean_reward_after_first": float(values[late].mean()),
            "cumulative_regret": np.cumsum(got["oracle"] - values).tolist(),
        }
    for ci, clip in enumerate(clips):
        sel = clip_of == ci
        out["per_clip"][clip["name"]] = {
            "batches": int(sel.sum()),
            "oracle_arm": oracle_arm[ci],
            **{name: float(values[sel].mean()) for name, values in got.items()},
            "arm_means": {a: float(reward[a][sel].mean()) for a in ARM_NAMES},
            "pretrained_picks": [a for a, s in zip(picks["pretrained"], sel) if s],
        }
    return out


def print_tables(setting: str, result: dict) -> None:
    pol = result["policies"]
    oracle = pol["oracle"]["mean_reward_after_first"]
    print(f"\n## {setting}: {result['batches']} batches; averages over batches after the first {result['skip_first_per_clip']} per clip")
    print("| policy | mean reward (all batches) | mean reward (after first) | vs oracle | vs default |")
    print("|---|---|---|---|---|")
    default = pol["default"]["mean_reward_after_first"]
    for name, p in pol.items():
        late = p["mean_reward_after_first"]
        print(f"| {name} | {p['mean_reward']:.3f} | {late:.3f} | {100 * (late / oracle - 1):+.1f}% | {100 * (late / default - 1):+.1f}% |")
    print("\n| clip | batches | oracle arm | oracle | default | pretrained | cold | default vs oracle | pretrained picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c in result["per_clip"].items():
        picks = ", ".join(f"{a}×{c['pretrained_picks'].count(a)}" for a in dict.fromkeys(c["pretrained_picks"]))
        print(
            f"| {name} | {c['batches']} | {c['oracle_arm']} | {c['oracle']:.3f} | {c['default']:.3f} | {c['pretrained']:.3f} | "
            f"{c['cold']:.3f} | {100 * (c['default'] / c['oracle'] - 1):+.1f}% | {picks} |"
        )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (setting, result) in zip(axes[0], results.items()):
        for name in ("pretrained", "cold", "default"):
            curve = result["policies"][name]["cumulative_regret"]
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"regret vs per-clip oracle ({setting})")
        ax.set_xlabel("batch (job order)")
        ax.set_ylabel("cumulative regret (reward units)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measurements", type=Path, help="measurements from `palstream tune --measurements` (default: measure now)")
    parser.add_argument("--frames", type=int, default=96, help="frames per clip when measuring")
    parser.add_argument("--gop", type=int, default=8, help="frames per unit when measuring")
    parser.add_argument("--batch-units", type=int, default=1, help="units per batch")
    parser.add_argument("--alpha", type=float, default=0.5, help="LinUCB exploration width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", type=int, default=1, help="batches per clip left out of the 'after first' averages")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.measurements is not None:
        meas = json.loads(args.measurements.read_text())
    else:
        clips = sorted(str(p) for p in CORPUS.glob("*.mkv"))
        meas = measure(clips, EncoderConfig(gop=args.gop), args.frames, progress=lambda c, d, t: print(f"\r{c} {d}/{t}", end="", file=sys.stderr))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tuner_grid.json").write_text(json.dumps(meas, indent=1) + "\n")
    # tuner_grid_gop4.json -> tuner_regret_gop4.{json,png}
    name = "tuner_regret" + (args.measurements.stem.removeprefix("tuner_grid") if args.measurements else "")
    results = {
        setting: evaluate(meas, args.batch_units, weights, args.alpha, args.seed, args.skip)
        for setting, weights in WEIGHT_SETTINGS.items()
    }
    for setting, result in results.items():
        print_tables(setting, result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps({"settings": {k: vars(w) for k, w in WEIGHT_SETTINGS.items()}, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1) + "\n"
    )
    plot(results, args.out / f"{name}.png")
    print(f"\nwrote {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
