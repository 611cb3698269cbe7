"""Effect of REINFORCE fine-tuning (`palstream train --reinforce`) on cgan-v1, on held-out clips only.

1. Candidate blocks: every 16x16 block on the codec's grid of every frame of the three held-out
   clips that the codec would send to the generator (``palstream.learned.finetune.candidate_mask``),
   k = 16 as the codec asks, each generator called as the codec calls it (``generate``). Totals of
   SSE, coded bits and RD cost ``SSE + lambda * bits`` as defined in
   ``palstream.learned.finetune.coded_cost`` (the fine-tuning reward); k-means(10) for reference.
2. Codec end to end: the first ``--codec-frames`` frames of each held-out clip, one chunk,
   ``--palette cgan-v1`` at 40 and 45 dB (``--psnr``) with the shipped weights and with the fine-tuned ones,
   and as a control with a useless generator (every entry the block mean): where that control
   gives the same bytes, the generator's proposals do not reach the bitstream at all.
3. Side effects elsewhere: mean block MSE on all grid blocks (not only candidates) of frames 0 and
   15 of each held-out clip, for the palette sizes the fine-tuning never saw (k = 4, 64) and k = 16.

Run from the repository root::

    .venv/bin/python benchmarks/reinforce_effect.py --weights /tmp/rl/cgan-v1-rl.pt --corpus ../shared/corpus
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from palette_quality import HELD_OUT, cgan_generator

from palstream.learned.data import grid_blocks, palette_mse, read_frames
from palstream.learned.finetune import BLOCK, DEFAULT_LAMBDA, PROPOSAL_SIZE, collect_candidates, rd_cost
from palstream.learned.generator import weights_info
from palstream.palettes import create_palette_generator
from palstream.palettes.base import PaletteGenerator


class MeanOnly(PaletteGenerator):
    """Control: proposes the block mean for every entry (a palette that can only lose)."""

    def generate(self, samples: torch.Tensor, k: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return samples.mean(1, keepdim=True).expand(-1, int(k.max()), -1).contiguous()


def block_costs(corpus: Path, generators: dict, rd_lambda: float) -> list[dict]:
    rows = []
    for clip in HELD_OUT:
        luma, chroma = collect_candidates([corpus / clip], BLOCK, 1)
        for comp, blocks in (("luma", luma), ("chroma", chroma)):
            x = blocks.float()
            k = torch.full((len(x),), PROPOSAL_SIZE, dtype=torch.long)
            for name, gen in generators.items():
                row = {"clip": clip, "component": comp, "generator": name, **rd_cost(x, gen.generate(x, k), rd_lambda)}
                rows.append(row)
                print(f"{clip[:22]:22} {comp:6} {name:12} {row['blocks']:4} blocks  MSE {row['mse']:7.3f}  "
                      f"bits/block {row['bits'] / max(1, row['blocks']):7.1f}  cost {row['cost']:12.0f}", flush=True)
    return rows


def other_sizes(corpus: Path, generators: dict) -> list[dict]:
    rows = []
    for clip in HELD_OUT:
        frames = read_frames(corpus / clip, every=15)[:2]
        for size, k in ((16, 4), (16, 16), (32, 64)):
            parts = [grid_blocks(f, size) for f in frames]
            for comp, i in (("luma", 0), ("chroma", 1)):
                x = torch.from_numpy(np.concatenate([p[i] for p in parts])).float()
                kk = torch.full((len(x),), k)
                mse = {name: float(palette_mse(x, gen.generate(x, kk), kk).mean()) for name, gen in generators.items()}
                rows.append({"clip": clip, "block": size, "k": k, "component": comp, "blocks": len(x), "mse": mse})
                print(f"{clip[:22]:22} {size}px k={k:2} {comp:6} MSE fine-tuned / cgan-v1 {mse['fine-tuned'] / mse['cgan-v1']:.3f}", flush=True)
    return rows


def codec(corpus: Path, frames: int, generators: dict, targets: list[float]) -> list[dict]:
    from palstream.codec import EncoderConfig, encode_chunk
    from palstream.io import read_frames as read_clip

    rows = []
    warm = read_clip(str(corpus / HELD_OUT[0]), 0, 1)
    encode_chunk(warm, EncoderConfig(palette="cgan-v1", gop=1), generator=generators["cgan-v1"])  # compile kernels
    for clip in HELD_OUT:
        chunk = read_clip(str(corpus / clip), 0, frames)
        for psnr in targets:
            for name, gen in generators.items():
                stats = encode_chunk(chunk, EncoderConfig(target_psnr=psnr, palette="cgan-v1", gop=frames), generator=gen).stats
                rows.append({"clip": clip, "target_psnr": psnr, "weights": name, **stats})
                print(f"codec {clip[:22]:22} {psnr:g} dB {name:12} {stats['bytes']:8d} B {stats['bpp']:.4f} bpp "
                      f"@ {stats['psnr_y']:.3f} dB", flush=True)
    return rows


def summary(blocks: list[dict], rows: list[dict], others: list[dict]) -> str:
    lines = [
        "| clip | component | blocks | cgan-v1: MSE, bits/block | fine-tuned: MSE, bits/block | RD cost fine-tuned ÷ cgan-v1 | k-means(10) ÷ cgan-v1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in blocks:
        if r["generator"] != "cgan-v1":
            continue
        same = {x["generator"]: x for x in blocks if x["clip"] == r["clip"] and x["component"] == r["component"]}
        f, km, n = same["fine-tuned"], same["kmeans(10)"], max(1, r["blocks"])
        lines.append(
            f"| {r['clip'].rsplit('_', 1)[0]} | {r['component']} | {r['blocks']} | {r['mse']:.3f}, {r['bits'] / n:.1f} "
            f"| {f['mse']:.3f}, {f['bits'] / n:.1f} | {f['cost'] / max(r['cost'], 1e-9):.4f} | {km['cost'] / max(r['cost'], 1e-9):.4f} |"
        )
    if rows:
        lines += ["", "| clip | target | cgan-v1: bytes, bpp (PSNR-Y) | fine-tuned: bytes, bpp (PSNR-Y) | fine-tuned ÷ cgan-v1 bytes "
                  "| control (block mean): bytes (PSNR-Y) |", "|---|---|---|---|---|---|"]
        for r in rows:
            if r["weights"] != "cgan-v1":
                continue
            same = {x["weights"]: x for x in rows if x["clip"] == r["clip"] and x["target_psnr"] == r["target_psnr"]}
            f, m = same["fine-tuned"], same["mean-only"]
            lines.append(
                f"| {r['clip'].rsplit('_', 1)[0]} | {r['target_psnr']:g} dB | {r['bytes']}, {r['bpp']:.4f} ({r['psnr_y']:.3f}) "
                f"| {f['bytes']}, {f['bpp']:.4f} ({f['psnr_y']:.3f}) | {f['bytes'] / r['bytes']:.4f} | {m['bytes']} ({m['psnr_y']:.3f}) |"
            )
    lines += ["", "| clip | component | " + " | ".join(f"{s}px k={k}" for s, k in ((16, 4), (16, 16), (32, 64))) + " |", "|---|---|---|---|---|"]
    for clip in HELD_OUT:
        for comp in ("luma", "chroma"):
            cells = [r["mse"]["fine-tuned"] / max(r["mse"]["cgan-v1"], 1e-9) for r in others if r["clip"] == clip and r["component"] == comp]
            if cells:
                lines.append(f"| {clip.rsplit('_', 1)[0]} | {comp} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="fine-tuned weights (from palstream train --reinforce)")
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"), help="folder with the corpus clips")
    parser.add_argument("--rd-lambda", type=float, default=DEFAULT_LAMBDA, help="squared error one bit is worth")
    parser.add_argument("--codec-frames", type=int, default=16, help="frames per clip for the codec comparison (0: skip)")
    parser.add_argument("--psnr", type=float, nargs="+", default=[40.0, 45.0], help="codec quality targets, dB")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reinforce_effect.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generators = {"cgan-v1": cgan_generator(None, "cpu"), "fine-tuned": cgan_generator(args.weights, "cpu")}
    blocks = block_costs(args.corpus, {**generators, "kmeans(10)": create_palette_generator("kmeans", device="cpu")}, args.rd_lambda)
    others = other_sizes(args.corpus, generators)
    rows = codec(args.corpus, args.codec_frames, {**generators, "mean-only": MeanOnly("cpu")}, args.psnr) if args.codec_frames else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"weights": str(args.weights), "finetune": weights_info(args.weights), "rd_lambda": args.rd_lambda,
                                    "threads": args.threads, "blocks": blocks, "codec": rows, "other_sizes": others}, indent=1))
    print(summary(blocks, rows, others))


if __name__ == "__main__":
    main()
