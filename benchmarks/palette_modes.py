"""Palette modes (issue 15): where the bits go, by leaf mode and palette, for each palette generator.

Per corpus clip (its first ``--frames`` frames, one chunk), target PSNR-Y (40 and 45 dB) and palette
generator (the default, ``none``, ``kmeans``, and ``cgan-v1`` when registered), one encode on one
thread: bpp, PSNR-Y, the share of area and of bits by leaf mode (SKIP, INTER, INTRA, PALETTE), the
PALETTE leaves by luma palette size (1, 2-4, 5-16, 17-64 entries) and by source (exact clusters or
the generator's proposal), and the seconds the generator spent against k-means'. Leaf bits come
from the encoder's range coder (``palstream.codec.modes``); every payload is decoded again and the
decoder's counts must agree with the encoder's (the run stops otherwise).

With ``--bracket N`` every generator is also coded at the fixed rungs ``r - N .. r + N`` around the
rung the default generator's rate control chose (``encode_chunk(..., rung=)``), and each pair is
compared at equal PSNR-Y on lines fitted through those points (:func:`bracket_ratio`): a single
rate-controlled encode lands on a rung, and one rung moves a clip's bytes by more than most palette
decisions do, so single clips' ratios are mostly landings; the bracket averages them out.

Prints markdown tables and writes ``benchmarks/results/palette_modes.json``. Run from the
repository root::

    .venv/bin/python benchmarks/palette_modes.py                      # issue 15's baseline: every clip, 16 frames
    .venv/bin/python benchmarks/palette_modes.py --clips 'screen*' --frames 2 --targets 40
    .venv/bin/python benchmarks/palette_modes.py --bracket 2           # and five fixed rungs a generator and target
    .venv/bin/python benchmarks/palette_modes.py --report benchmarks/results/palette_modes.json   # tables again
"""

from __future__ import annotations

import os

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one thread, before numba and torch start theirs

import argparse  # noqa: E402
import bisect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGETS = (40.0, 45.0)
SCREEN_AND_2D = ("screen_", "animation2d_")  # the clips issue 15 expects palettes to win on


def counting(inner):
    """``inner`` wrapped to add up the seconds spent in ``generate`` (the batch worker's
    ``TimedGenerator``) and the blocks asked about (luma calls; each block is asked about once for
    luma, then for chroma)."""
    from palstream.batch.worker import TimedGenerator

    class CountingGenerator(TimedGenerator):
        blocks = 0

        def generate(self, samples, k, features=None):
            if samples.shape[2] == 1:
                self.blocks += int(samples.shape[0])
            return super().generate(samples, k, features)

        def take(self) -> tuple[float, int]:
            """Seconds and blocks since the last call."""
            blocks, self.blocks = self.blocks, 0
            return self.take_seconds(), blocks

    return CountingGenerator(inner)


def warmed(name: str):
    """The generator ``name`` on the CPU, having generated once (weights loaded, first-call costs paid)."""
    import torch

    from palstream.palettes import create_palette_generator

    generator = counting(create_palette_generator(name, device="cpu"))
    rng = torch.Generator().manual_seed(0)
    for channels in (1, 2):
        generator.generate(torch.rand(64, 256 // channels ** 2, channels, generator=rng) * 255, torch.full((64,), 16))
    generator.take()
    return generator


def generators() -> list[str]:
    """The default generator, ``none``, ``kmeans`` and ``cgan-v1`` when registered; each once."""
    from palstream.codec import EncoderConfig
    from palstream.palettes import palette_generator_names

    names = [EncoderConfig().palette, "none", "kmeans"] + (["cgan-v1"] if "cgan-v1" in palette_generator_names() else [])
    return list(dict.fromkeys(names))


def measure(frames, clip: str, target: float, palette: str, generator, rung: int | None = None) -> dict:
    """Encode ``frames`` at ``target`` with ``palette`` (``generator``, warmed), or at the fixed
    ``rung`` with ``target``'s denoising (``encode_chunk``); decode it again and check the counts agree."""
    from palstream.codec import EncoderConfig, ModeStats, decode_chunk, encode_chunk
    from palstream.codec.syntax import STAT_PAL_ESTIMATE, STAT_PAL_SOURCE, STAT_ROWS

    encoded_modes, decoded_modes = ModeStats(), ModeStats()
    cpu = time.process_time()
    encoded = encode_chunk(frames, EncoderConfig(target_psnr=target, palette=palette), generator=generator, modes=encoded_modes, rung=rung)
    encode_cpu = time.process_time() - cpu
    seconds, blocks = generator.take()
    decode_chunk(encoded.payload, modes=decoded_modes)
    shared = [r for r in range(STAT_ROWS) if not STAT_PAL_SOURCE <= r < STAT_PAL_SOURCE + 2 and r != STAT_PAL_ESTIMATE]
    if not np.allclose(encoded_modes.counts[shared], decoded_modes.counts[shared], rtol=0, atol=1e-6):
        raise SystemExit(f"{clip} {target} dB {palette}: the decoder's leaf counts differ from the encoder's")
    return {
        "clip": clip,
        "target_db": target,
        "palette": palette,
        "frames": encoded.stats["frames"],
        "bytes": encoded.stats["bytes"],
        "bpp": encoded.stats["bpp"],
        "psnr_y": encoded.stats["psnr_y"],
        "rung": encoded.stats["rung"],
        "encode_cpu_seconds": encode_cpu,
        "generator_seconds": seconds,
        "generator_blocks": blocks,
        "modes": encoded_modes.to_dict(),
    }


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def bpp_at_psnr(points: list[tuple[float, float]], psnr: float) -> float | None:
    """A generator's bpp at ``psnr``, from its (PSNR-Y, bpp) points at the other targets.

    Rate control lands each encode at a different PSNR-Y above the same floor, so bytes at the same
    target compare encodes of unequal quality. Log bpp is taken as linear in PSNR-Y between the two
    nearest points (the segment at the end when ``psnr`` lies outside them), as BD-rate does with a
    higher-order fit over more points; ``None`` with fewer than two points.
    """
    points = sorted(points)
    if len(points) < 2:
        return None
    i = min(max(bisect.bisect_left([p for p, _ in points], psnr), 1), len(points) - 1)
    (p0, b0), (p1, b1) = points[i - 1], points[i]
    return math.exp(math.log(b0) + (psnr - p0) * (math.log(b1) - math.log(b0)) / (p1 - p0))


def bracket_ratio(mine: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> float:
    """bpp of one generator over another's at equal PSNR-Y, from (PSNR-Y, bpp) points of both
    coded at the same few fixed rungs.

    Each generator's log bpp is fitted as a line in PSNR-Y (least squares), and the lines are compared
    at the mean PSNR-Y of all the points: over a few adjacent rungs the curve is close to straight,
    and a fit, unlike interpolation between single points, averages out the decisions that move one
    encode's bytes up or down by a rung's worth.
    """
    x = np.array([p for p, _ in mine + theirs])
    lines = [np.polyfit([p for p, _ in pts], [math.log(b) for _, b in pts], 1) for pts in (mine, theirs)]
    at = float(x.mean())
    return math.exp(float(np.polyval(lines[0], at) - np.polyval(lines[1], at)))


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def tables(rows: list[dict], bracket: list[dict] | None = None) -> str:
    """Markdown: bpp and mode shares; palette sizes and sources; a summary against ``none`` and k-means;
    with ``bracket`` (the fixed-rung rows of ``--bracket``), the same comparisons on those."""
    from palstream.codec import EncoderConfig

    default = EncoderConfig().palette

    def label(palette: str) -> str:
        return f"{palette} (default)" if palette == default else palette

    base = {(r["clip"], r["target_db"]): r for r in rows if r["palette"] == "none"}
    kmeans = {(r["clip"], r["target_db"]): r for r in rows if r["palette"] == "kmeans"}
    out = [
        "| clip | dB | palette | bpp | vs none | PSNR-Y | area % skip / inter / intra / palette | "
        "bits % skip / inter / intra / palette / tree | blocks asked / generated leaves | generator s | vs k-means |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = (r["clip"], r["target_db"])
        m = r["modes"]
        area = " / ".join(f"{100 * m['modes'][k]['area_share']:.1f}" for k in ("skip", "inter", "intra", "palette"))
        bits = " / ".join(f"{100 * m['modes'][k]['bits_share']:.1f}" for k in ("skip", "inter", "intra", "palette"))
        vs_none = f"{100 * (r['bpp'] / base[key]['bpp'] - 1):+.2f} %" if key in base else "-"
        km = kmeans.get(key)
        vs_km = f"{r['generator_seconds'] / km['generator_seconds']:.2f}×" if km and km["generator_seconds"] > 0 else "-"
        out.append(
            f"| {r['clip']} | {r['target_db']:g} | {label(r['palette'])} | {r['bpp']:.4f} | {vs_none} | {r['psnr_y']:.2f} | {area} | "
            f"{bits} / {100 * m['quadtree']['bits_share']:.1f} | {r['generator_blocks']} / "
            f"{m['palette_source']['generated']['leaves']} | {r['generator_seconds']:.3f} | {vs_km} |"
        )
    out += [
        "",
        "PALETTE leaves: luma palette size buckets (share of the frame's area and of all bits), and the"
        " share of PALETTE area and bits whose luma palette was the generator's proposal, that have escape"
        " samples, and the analysis' estimate of the PALETTE leaves' bits over the bits they wrote.",
        "",
        "| clip | dB | palette | area % 1 / 2-4 / 5-16 / 17-64 | bits % 1 / 2-4 / 5-16 / 17-64 | "
        "multi-entry bits % | generated: % of palette area | % of palette bits | with escapes: % of palette bits | "
        "estimated / written bits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["modes"]
        sizes = m["palette_luma_sizes"]
        area = " / ".join(f"{100 * sizes[k]['area_share']:.2f}" for k in sizes)
        bits = " / ".join(f"{100 * sizes[k]['bits_share']:.2f}" for k in sizes)
        multi = sum(sizes[k]["bits_share"] for k in sizes if k != "1")
        pal, gen = m["modes"]["palette"], m["palette_source"]["generated"]
        estimate = f"{m['palette_estimated_bits'] / pal['bits']:.2f}" if pal["bits"] else "-"
        out.append(
            f"| {r['clip']} | {r['target_db']:g} | {label(r['palette'])} | {area} | {bits} | {100 * multi:.2f} | "
            f"{_pct(gen['area_px'], pal['area_px'])} | {_pct(gen['bits'], pal['bits'])} | "
            f"{_pct(m['palette_escapes']['bits'], pal['bits'])} | {estimate} |"
        )
    none_points: dict[str, list[tuple[float, float]]] = {}
    for r in base.values():
        none_points.setdefault(r["clip"], []).append((r["psnr_y"], r["bpp"]))
    out += [
        "",
        "Against `none`: at the same target (each encode at or above the same floor), and at equal PSNR-Y"
        " (`none`'s bpp at the generator's PSNR-Y, log bpp linear in PSNR-Y between `none`'s targets).",
        "",
        "| palette | same target: all clips | screen + 2-D animation | clips worse (worst) | equal PSNR-Y: all clips | "
        "screen + 2-D animation | clips worse (worst) |",
        "|---|---|---|---|---|---|---|",
    ]

    def summary(ratios: list[tuple[str, float]]) -> str:
        flat = [v for c, v in ratios if c.startswith(SCREEN_AND_2D)]
        worse = sum(v > 1 + 1e-9 for _, v in ratios)  # a ratio of equal bytes through log and exp is not exactly 1
        worst = 100 * (max(v for _, v in ratios) - 1)
        return (f"{100 * (geomean([v for _, v in ratios]) - 1):+.2f} % | {100 * (geomean(flat) - 1):+.2f} % | "
                f"{worse} of {len(ratios)} (worst {worst:+.2f} %)")

    for palette in dict.fromkeys(r["palette"] for r in rows):
        mine = [r for r in rows if r["palette"] == palette and (r["clip"], r["target_db"]) in base]
        same = [(r["clip"], r["bpp"] / base[(r["clip"], r["target_db"])]["bpp"]) for r in mine]
        equal = [(r["clip"], r["bpp"] / at) for r in mine
                 if (at := bpp_at_psnr(none_points[r["clip"]], r["psnr_y"])) is not None]
        out.append(f"| {label(palette)} | {summary(same)} | {summary(equal) if equal else '- | - | -'} |")
    if bracket:
        out += ["", *_bracket_tables(bracket, label, summary)]
    return "\n".join(out)


def _bracket_tables(bracket: list[dict], label, summary) -> list[str]:
    """Markdown lines: each generator against ``none``, and cgan-v1 against k-means, per clip and
    target at equal PSNR-Y on the fixed rungs (:func:`bracket_ratio`), then their summary."""
    points: dict[tuple[str, float, str], list[tuple[float, float]]] = {}
    for r in bracket:
        points.setdefault((r["clip"], r["target_db"], r["palette"]), []).append((r["psnr_y"], r["bpp"]))
    pairs = [(p, "none") for p in dict.fromkeys(r["palette"] for r in bracket) if p != "none"]
    pairs += [("cgan-v1", "kmeans")]
    ratios = {pair: [(clip, target, bracket_ratio(pts, points[(clip, target, pair[1])]))
                     for (clip, target, palette), pts in points.items()
                     if palette == pair[0] and (clip, target, pair[1]) in points] for pair in pairs}
    ratios = {pair: found for pair, found in ratios.items() if found}
    rungs = sorted({r["rung"] for r in bracket if r["clip"] == bracket[0]["clip"] and r["target_db"] == bracket[0]["target_db"]})
    out = [
        f"At fixed rungs: every generator coded at the {len(rungs)} rungs around the default's rate-controlled one,"
        " compared at equal PSNR-Y on log-bpp lines fitted through each one's points (`bracket_ratio`).",
        "",
        "| clip | dB | " + " | ".join(f"{label(a)} vs {b}" for a, b in ratios) + " |",
        "|---|---|" + "---|" * len(ratios),
    ]
    keys = dict.fromkeys((clip, target) for found in ratios.values() for clip, target, _ in found)
    for clip, target in keys:
        cells = [next((f"{100 * (v - 1):+.2f} %" for c, t, v in found if (c, t) == (clip, target)), "-") for found in ratios.values()]
        out.append(f"| {clip} | {target:g} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| at fixed rungs | all clips | screen + 2-D animation | clips worse (worst) |",
        "|---|---|---|---|",
    ]
    out += [f"| {label(a)} vs {b} | {summary([(c, v) for c, _, v in found])} |" for (a, b), found in ratios.items()]
    return out


def clip_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options this benchmark and ``generator_ablation.py`` share: which clips, frames and
    targets, where the results go (``benchmarks/results/OUT`` by default), and ``--report``."""
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus", help="folder of the corpus clips")
    parser.add_argument("--clips", default="*.mkv", help="file name pattern in the corpus (default *.mkv: all)")
    parser.add_argument("--frames", type=int, default=16, help="first N frames of each clip, one chunk (default 16)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="target PSNR-Y in dB (default 40 45)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / out)
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a saved results file and stop")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(parser, "palette_modes.json")
    parser.add_argument("--palettes", nargs="+", default=None, help="generators (default: the default one, none, kmeans, cgan-v1)")
    parser.add_argument("--bracket", type=int, default=0, metavar="N",
                        help="also code every generator at the rungs r-N..r+N around the default generator's rate-controlled rung r")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(tables(saved["rows"], saved.get("bracket")))
        return

    import torch

    from palstream.codec import EncoderConfig
    from palstream.codec.chunk import LADDER
    from palstream.io import read_frames

    torch.set_num_threads(1)
    clips = sorted(args.corpus.glob(args.clips))
    if not clips:
        raise SystemExit(f"no clip matches {args.clips!r} in {args.corpus}")
    palettes = args.palettes or generators()
    default = EncoderConfig().palette  # the bracket is around its rung (the first generator's without it)
    warm = {name: warmed(name) for name in palettes}
    rows: list[dict] = []
    bracket: list[dict] = []  # --bracket's fixed-rung encodes
    for path in clips:
        frames = read_frames(str(path), 0, args.frames)
        for target in args.targets:
            for palette in palettes:
                rows.append(measure(frames, path.name, target, palette, warm[palette]))
                r = rows[-1]
                print(f"{path.name} {target:g} dB {palette}: {r['bpp']:.4f} bpp, {r['psnr_y']:.2f} dB, "
                      f"generator {r['generator_seconds']:.3f} s", file=sys.stderr, flush=True)
            if args.bracket:
                here = rows[-len(palettes):]
                landed = next((r["rung"] for r in here if r["palette"] == default), here[0]["rung"])
                rungs = range(max(0, landed - args.bracket), min(len(LADDER), landed + args.bracket + 1))
                for rung in rungs:
                    for palette in palettes:
                        row = measure(frames, path.name, target, palette, warm[palette], rung)
                        bracket.append({k: v for k, v in row.items() if k != "modes"})  # checked, not kept: 5x the file
                print(f"{path.name} {target:g} dB: rungs {rungs.start}..{rungs.stop - 1} coded", file=sys.stderr, flush=True)
    report = tables(rows, bracket)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/palette_modes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    saved = {"command": command.strip(), "frames": args.frames, "rows": rows} | ({"bracket": bracket} if bracket else {})
    args.out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
