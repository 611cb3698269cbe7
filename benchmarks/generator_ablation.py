"""Generator ablation in coded bits (issue 15): what each part of cgan-v1's training is worth in the archive.

cgan-v1 is trained with four kinds of loss: reconstruction (hard and soft block error), perceptual
(MS-SSIM and early-EfficientNet features on block mosaics), diversity and adversarial. This trains
the same recipe with one kind removed at a time (same data, hold-outs, seed, steps and one thread
as the shipped weights: ``palstream train``'s defaults, so the shipped file is the full recipe's
run), and once with pooled EfficientNet-Lite0 features as input (the codec computes them once per
frame at half resolution; the same weights are also run with the features withheld). The shipped
decoding is also run without the network: its Lloyd and merge-and-split updates from the plain
companding cuts alone (which the decoding otherwise tries beside the network's cuts, keeping the
lower squared error), i.e. what the network itself is worth in bits. It then
encodes the first ``--frames`` frames of every corpus clip at 40 and 45 dB with each set of weights
as the codec's batched generator, beside k-means(10) and the shipped weights: once rate-controlled
(what an archive gets) and once at the rung rate control chose for k-means (one encode, nominal
lambda), since the rate control's probes turn sub-1 % differences between palettes into rung
jumps of several per cent. Reports bpp at equal PSNR-Y against the shipped weights and k-means.
Payloads are decoded again and their leaf counts checked, as in ``palette_modes.py``.

Training takes about 11 minutes a variant on one thread; weights are kept in ``--weights-dir`` and
a variant whose file exists is not trained again. Prints markdown tables and writes
``benchmarks/results/generator_ablation.json``. Run from the repository root::

    .venv/bin/python benchmarks/generator_ablation.py
    .venv/bin/python benchmarks/generator_ablation.py --steps 50 --clips 'screen*' --frames 2 --targets 40   # smoke run
"""

from __future__ import annotations

import os

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one thread, before numba and torch start theirs

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: the sibling benchmark module below

from benchmarks.palette_modes import SCREEN_AND_2D, bpp_at_psnr, clip_arguments, counting, geomean, measure  # noqa: E402

# The shipped run's data and hold-outs (docs/model-card-cgan-v1.md, "Training").
HOLDOUT = ("screen_*", "animation2d_*", "camera_rocket_*")
FEATURES, WITHHELD = "with CNN features", "with CNN features, withheld at inference"
NO_NETWORK = "no network (companding cuts and the updates only)"
# TrainConfig overrides: each kind of loss removed (its weights 0), all but reconstruction, CNN features as input.
VARIANTS: dict[str, dict[str, Any]] = {
    "no perceptual": {"w_msssim": 0.0, "w_deep": 0.0},
    "no diversity": {"w_diversity": 0.0},
    "no adversarial": {"w_adv": 0.0},
    "reconstruction only": {"w_msssim": 0.0, "w_deep": 0.0, "w_diversity": 0.0, "w_adv": 0.0},
    FEATURES: {"features": True},  # trained with them (dropped for half the blocks), so it runs without too
}
SHIPPED, KMEANS = "shipped (full recipe)", "kmeans"


def train(name: str, overrides: dict[str, Any], folder: Path, corpus: Path, steps: int) -> Path:
    """The weights of variant ``name`` in ``folder``, trained now unless the file exists."""
    import torch

    from palstream.learned.train import TrainConfig, Trainer

    path = folder / (name.replace(" ", "-") + ".pt")
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    trainer = Trainer([corpus, corpus / "images"], list(HOLDOUT), TrainConfig(steps=steps, **overrides))
    trainer.run(path.with_name(path.name + ".ckpt"))  # an interrupted run resumes from its checkpoint
    trainer.export(path)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s -> {path}", file=sys.stderr, flush=True)
    return path


def tables(rows: list[dict], fixed: list[dict]) -> str:
    """Markdown: bpp per clip and target for every generator, rate-controlled and at k-means' rungs;
    geomeans at equal PSNR-Y against the shipped weights and k-means."""
    return "\n\n".join([
        "Rate-controlled (what an archive gets: each encode lands at or above the target, by its own probes):",
        _table(rows), "At k-means' rungs (one encode at the rung rate control chose for k-means, nominal lambda: the"
        " generators' palettes alone decide the differences):", _table(fixed),
    ])


def _table(rows: list[dict]) -> str:
    by = {(r["clip"], r["target_db"], r["generator"]): r for r in rows}
    names = list(dict.fromkeys(r["generator"] for r in rows))
    keys = list(dict.fromkeys((r["clip"], r["target_db"]) for r in rows))
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (clip, generator) -> (PSNR-Y, bpp) at each target
    for r in rows:
        points.setdefault((r["clip"], r["generator"]), []).append((r["psnr_y"], r["bpp"]))

    def equal(clip: str, target: float, name: str) -> float:
        """``name``'s bpp at k-means' PSNR-Y (log bpp linear in PSNR-Y between its targets; its own bpp with one target)."""
        return bpp_at_psnr(points[(clip, name)], by[(clip, target, KMEANS)]["psnr_y"]) or by[(clip, target, name)]["bpp"]

    out = ["| clip | dB | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for clip, target in keys:
        out.append(f"| {clip} | {target:g} | " + " | ".join(
            f"{by[(clip, target, n)]['bpp']:.4f} ({by[(clip, target, n)]['psnr_y']:.2f} dB)" for n in names) + " |")
    out += ["", "Ratios at equal PSNR-Y (each generator's bpp at k-means' PSNR-Y):", "",
            "| generator | vs shipped: all clips | screen + 2-D animation | held-out clips | vs k-means: all clips | "
            "screen + 2-D animation | clips worse than k-means (worst) |", "|---|---|---|---|---|---|---|"]
    for n in names:
        def ratios(base: str, pick=lambda clip: True, n=n) -> list[float]:
            return [equal(c, t, n) / equal(c, t, base) for c, t in keys if pick(c)]

        def pct(values: list[float]) -> str:
            return f"{100 * (geomean(values) - 1):+.2f} %" if values else "-"

        screen = lambda c: c.startswith(SCREEN_AND_2D)  # noqa: E731
        held = lambda c: any(c.startswith(h.rstrip("*")) for h in HOLDOUT)  # noqa: E731
        vs_kmeans = ratios(KMEANS)  # "worse" below: by more than rounding (equal encodes interpolate to 1 +- 1e-15)
        out.append(f"| {n} | {pct(ratios(SHIPPED))} | {pct(ratios(SHIPPED, screen))} | {pct(ratios(SHIPPED, held))} | "
                   f"{pct(vs_kmeans)} | {pct(ratios(KMEANS, screen))} | {sum(v > 1 + 1e-9 for v in vs_kmeans)} of {len(keys)} "
                   f"({100 * (max(vs_kmeans) - 1):+.2f} %) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(parser, "generator_ablation.json")  # --corpus also holds the training images (its images/)
    parser.add_argument("--steps", type=int, default=2000, help="training steps per variant (default 2000, as shipped)")
    parser.add_argument("--weights-dir", type=Path, default=Path.home() / ".cache" / "palstream" / "ablation",
                        help="where the variants' weights are kept (a variant whose file exists is not trained again)")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(tables(saved["rows"], saved["fixed_rows"]))
        return

    from palstream.io import read_frames
    from palstream.learned.generator import CganGenerator
    from palstream.palettes import create_palette_generator

    class WithoutFeatures(CganGenerator):
        """The same weights asked without their CNN features: what the features are worth at inference."""

        def block_features(self, luma, cb, cr, boxes):
            return None

    class WithoutNetwork(CganGenerator):
        """The shipped decoding with no network: ``generate_palettes`` from the companding cuts alone."""

        def _networks(self):
            return {components: None for components in super()._networks()}

    clips = sorted(args.corpus.glob(args.clips))
    if not clips:
        raise SystemExit(f"no clip matches {args.clips!r} in {args.corpus}")
    weights = {name: train(name, overrides, args.weights_dir, args.corpus, args.steps) for name, overrides in VARIANTS.items()}
    generators = {KMEANS: counting(create_palette_generator("kmeans", device="cpu")),
                  SHIPPED: counting(CganGenerator(device="cpu").load())}
    generators |= {name: counting(CganGenerator(device="cpu", weights=path, expected_sha256=None).load()) for name, path in weights.items()}
    generators[WITHHELD] = counting(WithoutFeatures(device="cpu", weights=weights[FEATURES], expected_sha256=None).load())
    generators[NO_NETWORK] = counting(WithoutNetwork(device="cpu").load())
    rows, fixed = [], []
    for path in clips:
        frames = read_frames(str(path), 0, args.frames)
        for target in args.targets:
            for name, generator in generators.items():
                row = measure(frames, path.name, target, "kmeans" if name == KMEANS else "cgan-v1", generator)
                row.pop("modes")
                rows.append({"generator": name, **row})
                print(f"{path.name} {target:g} dB {name}: {row['bpp']:.4f} bpp, {row['psnr_y']:.2f} dB", file=sys.stderr, flush=True)
            rung = rows[-len(generators)]["rung"]  # k-means' (first in ``generators``)
            for name, generator in generators.items():
                row = measure(frames, path.name, target, "kmeans" if name == KMEANS else "cgan-v1", generator, rung)
                row.pop("modes")
                fixed.append({"generator": name, **row})
    report = tables(rows, fixed)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/generator_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    variants = {name: {"overrides": VARIANTS[name], "steps": args.steps, "sha256": generators[name].weights_hash,
                       "file": str(weights[name])} for name in VARIANTS}
    args.out.write_text(json.dumps({"command": command.strip(), "frames": args.frames, "variants": variants, "rows": rows,
                                     "fixed_rows": fixed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
