"""Palette quality and speed: cgan-v1 (refine 0 and 1) against k-means(10) and median cut.

Blocks come from clips cgan-v1 was not trained on (see docs/model-card-cgan-v1.md). For each
block size and palette size, every method gets the same blocks in one batch (all blocks of
the sampled frames, as an encoder would batch a chunk) on the same device and thread count;
the time is the best of ``--repeat`` runs. MSE is per component on the 0..255 scale,
averaged over blocks. Two block populations are reported: all grid blocks, and "candidate"
blocks the codec sends to a batched generator (more distinct levels than a proposal's entries or
than an exact palette holds: ``palstream.learned.finetune.candidate_mask``).

Run from the repository root::

    .venv/bin/python benchmarks/palette_quality.py --corpus ../shared/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from palstream.learned.backbone import block_features, create_backbone
from palstream.learned.data import grid_blocks, palette_mse, read_frames
from palstream.learned.decoding import generate_palettes
from palstream.learned.finetune import candidate_mask
from palstream.learned.generator import CganGenerator
from palstream.palettes import create_palette_generator
from palstream.palettes.kmeans import lloyd

HELD_OUT = ("screen_gnome_settings_640x360.mkv", "animation2d_motiongraphics_480x352.mkv", "camera_rocket_launch_640x360.mkv")
CASES = ((16, 16), (16, 4), (32, 64))  # (luma block size, palette size); 16x16 with k = 16 is what the codec asks for


def median_cut(samples: torch.Tensor, k: int) -> torch.Tensor:
    """Batched median cut: split the box with the widest range at its median until there are k boxes.

    Parameters
    ----------
    samples : torch.Tensor
        float32 (N, P, C).
    k : int
        Palette size.

    Returns
    -------
    torch.Tensor
        float32 (N, k, C): box means (a box that could not be split repeats its parent's mean).
    """
    n, p, c = samples.shape
    label = torch.zeros(n, p, dtype=torch.long)
    rows = torch.arange(n)
    for j in range(1, k):
        lo = torch.full((n, j, c), float("inf")).scatter_reduce(1, label[..., None].expand(n, p, c), samples, "amin")
        hi = torch.full((n, j, c), -float("inf")).scatter_reduce(1, label[..., None].expand(n, p, c), samples, "amax")
        extent = (hi - lo).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # (N, j, C)
        widest, axis = extent.max(-1)  # per box: range along its longest axis
        box = widest.argmax(1)  # (N,)
        ax = axis[rows, box]
        values = samples[rows[:, None], torch.arange(p)[None, :], ax[:, None]]  # (N, P)
        inside = label == box[:, None]
        ranked = values.masked_fill(~inside, float("inf")).sort(1).values
        median = ranked[rows, (inside.sum(1) - 1) // 2]
        upper = inside & (values > median[:, None])
        # Ties: when the median is the box's largest value, move the pixels at it instead.
        upper = torch.where(upper.any(1, keepdim=True), upper, inside & (values >= median[:, None]))
        label = torch.where(upper, torch.full_like(label, j), label)
    onehot = torch.nn.functional.one_hot(label, k).float()  # (N, P, k)
    counts = onehot.sum(1)
    means = onehot.transpose(1, 2) @ samples / counts.clamp(min=1)[..., None]
    # Empty boxes (block had fewer distinct values than k) reuse the first box's mean.
    return torch.where(counts[..., None] > 0, means, means[:, :1])


def no_network(samples: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Ablation of cgan-v1 without its network: the shipped decoding from the plain companding cuts only."""
    return generate_palettes(None, samples, k, int(k.max()))[0]


def _generate_with_features(cgan, backbone, frames, parts, x, kk):
    """cgan-v1 conditioned on the CNN features, whose computation is part of the timed work."""
    feats = torch.cat([block_features(backbone, f.y, f.u, f.v, p[2]) for f, p in zip(frames, parts)])
    return cgan.generate_with_scores(x, kk, feats)[0]


def timed(fn, repeat: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if device != "cpu":
            torch.cuda.synchronize()  # kernels run asynchronously: time until they are done
        best = min(best, time.perf_counter() - t0)
    return out, best


def cgan_generator(weights: Path | None, device: str) -> CganGenerator:
    if weights is None:
        return CganGenerator(device=device).load()
    return CganGenerator(device=device, weights=weights, expected_sha256=None).load()


def run(corpus: Path, frames_per_clip: int, repeat: int, weights: Path | None, device: str, cnn_features: bool) -> list[dict]:
    kmeans = create_palette_generator("kmeans", device=device)
    cgan = cgan_generator(weights, device)
    backbone = create_backbone(cgan.backbone_name) if cgan.backbone_name and cnn_features else None
    results = []
    for clip in HELD_OUT:
        path = corpus / clip
        every = max(1, 30 // frames_per_clip)
        frames = read_frames(path, every=every)[:frames_per_clip]
        for size, k in CASES:
            parts = [grid_blocks(f, size) for f in frames]
            luma = np.concatenate([p[0] for p in parts])
            chroma = np.concatenate([p[1] for p in parts])
            cand = candidate_mask(luma)
            for comp, blocks in (("luma", luma), ("chroma", chroma)):
                x = torch.from_numpy(blocks).float().to(device)
                kk = torch.full((len(x),), min(k, x.shape[1]), dtype=torch.long, device=device)
                # every method takes (blocks, k); partial() binds this case's blocks when it is timed
                methods = {
                    "kmeans(10)": kmeans.generate,
                    "cgan-v1": cgan.generate,
                    "cgan-v1 refine 1": lambda x, kk: lloyd(x, cgan.generate(x, kk), kk, 1),
                }
                if device == "cpu":  # the CPU-only reference methods
                    methods["median cut"] = lambda x, kk: median_cut(x, int(kk[0]))
                    methods["no network (ablation)"] = no_network
                if backbone is not None:
                    methods["cgan-v1 + CNN features"] = partial(_generate_with_features, cgan, backbone, frames, parts)
                for name, fn in methods.items():
                    pal, seconds = timed(partial(fn, x, kk), repeat, device)
                    mse = palette_mse(x, pal, kk).cpu().numpy()
                    results.append(
                        {
                            "clip": clip,
                            "component": comp,
                            "block": size,
                            "k": int(kk[0]),
                            "blocks": len(x),
                            "candidates": int(cand.sum()),
                            "method": name,
                            "mse_all": float(mse.mean()),
                            "mse_candidates": float(mse[cand].mean()) if cand.any() else float("nan"),
                            "seconds": seconds,
                        }
                    )
                    print(f"{clip[:22]:22} {comp:6} {size:2}px k={int(kk[0]):2} {name:24} mse {mse.mean():8.3f} "
                          f"cand {results[-1]['mse_candidates']:8.3f} {seconds * 1e3:8.1f} ms", flush=True)
    return results


def codec_comparison(corpus: Path, frames: int, weights: Path | None, device: str, repeat: int) -> list[dict]:
    """End to end: the codec with ``--palette kmeans`` and ``--palette cgan-v1`` at 40 and 45 dB, same frames,
    on every clip of the corpus (the issue's criterion), not only the held-out ones.

    Encode speed differences are small next to the noise of a shared machine, so each case is
    encoded ``repeat`` times per generator, interleaved (kmeans, cgan-v1, then cgan-v1, kmeans,
    ...; use an even ``repeat`` so that each goes first equally often), and the median fps is
    reported; the bytes must be the same every time. The time spent inside the generator and
    the blocks it was asked for are recorded per encode: clips where the codec never asks it
    are a control for the noise.
    """
    from palstream.codec import EncoderConfig, encode_chunk
    from palstream.io import read_frames as read_clip

    generators = {"kmeans": create_palette_generator("kmeans", device=device), "cgan-v1": cgan_generator(weights, device)}
    calls: list[tuple[float, int]] = []
    for gen in generators.values():
        gen.generate = _timed(gen.generate, calls, device)
    rows = []
    warm = read_clip(str(corpus / HELD_OUT[0]), 0, 1)
    for name, gen in generators.items():  # compile the codec's kernels before anything is timed
        encode_chunk(warm, EncoderConfig(palette=name, gop=1), generator=gen)
    for clip in sorted(p.name for p in corpus.glob("*.mkv")):
        chunk = read_clip(str(corpus / clip), 0, frames)
        for psnr in (40.0, 45.0):
            runs: dict[str, list] = {name: [] for name in generators}
            for r in range(repeat):
                for name in (list(generators) if r % 2 == 0 else list(generators)[::-1]):
                    calls.clear()
                    enc = encode_chunk(chunk, EncoderConfig(target_psnr=psnr, palette=name, gop=frames), generator=generators[name])
                    stats = dict(enc.stats, generator_seconds=sum(t for t, _ in calls), generator_blocks=sum(b for _, b in calls))
                    runs[name].append((stats, hashlib.sha256(enc.payload).hexdigest()))
            for name, done in runs.items():
                if len({h for _, h in done}) != 1:
                    raise RuntimeError(f"{clip} {psnr} dB {name}: repeated encodes gave different bytes")
                stats = done[0][0]
                fps = [st["frames"] / st["encode_seconds"] for st, _ in done]
                gen_ms = float(np.median([st["generator_seconds"] for st, _ in done]) * 1e3)
                rows.append({"clip": clip, "target_psnr": psnr, "palette": name, **stats, "payload_sha256": done[0][1],
                             "fps_runs": fps, "fps_median": float(np.median(fps)), "generator_ms_median": gen_ms})
                print(f"codec {clip[:22]:22} {psnr:g} dB {name:8} {stats['bpp']:.4f} bpp @ {stats['psnr_y']:.2f} dB "
                      f"median {np.median(fps):.2f} fps of {', '.join(f'{f:.2f}' for f in fps)}; "
                      f"generator {gen_ms:.1f} ms for {stats['generator_blocks']} blocks", flush=True)
    return rows


def _timed(generate, calls: list, device: str):
    """``generate`` that appends (seconds, blocks) of every call to ``calls``."""

    def wrapped(samples, k):
        t0 = time.perf_counter()
        out = generate(samples, k)
        if device != "cpu":
            torch.cuda.synchronize()
        calls.append((time.perf_counter() - t0, len(samples)))
        return out

    return wrapped


def codec_summary(rows: list[dict]) -> str:
    lines = [
        "\n**codec end to end** (same frames, same config, only `--palette` differs; fps: median of interleaved runs)\n",
        "| clip | target | kmeans bpp | cgan-v1 bpp | cgan-v1 / kmeans | same bytes | blocks to the generator | generator ms: kmeans, cgan-v1 "
        "| kmeans fps | cgan-v1 fps | fps ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, used = [], []
    for r in rows:
        if r["palette"] != "kmeans":
            continue
        c = next(x for x in rows if x["palette"] == "cgan-v1" and x["clip"] == r["clip"] and x["target_psnr"] == r["target_psnr"])
        ratios.append(c["fps_median"] / r["fps_median"])
        used.append(r["generator_blocks"] > 0)
        lines.append(
            f"| {r['clip'].rsplit('_', 1)[0]} | {r['target_psnr']:g} dB | {r['bpp']:.4f} ({r['psnr_y']:.2f} dB) "
            f"| {c['bpp']:.4f} ({c['psnr_y']:.2f} dB) | {c['bpp'] / r['bpp']:.3f} | {'yes' if c['payload_sha256'] == r['payload_sha256'] else 'no'} "
            f"| {r['generator_blocks']} | {r['generator_ms_median']:.1f}, {c['generator_ms_median']:.1f} "
            f"| {r['fps_median']:.2f} | {c['fps_median']:.2f} | {ratios[-1]:.3f} |"
        )
    for label, pick in (("generator used", True), ("generator never called (noise control)", False)):
        sel = [x for x, u in zip(ratios, used) if u == pick]
        if sel:
            lines.append(f"\nfps ratio cgan-v1 / kmeans, {label}: median {np.median(sel):.3f}, range {min(sel):.3f}..{max(sel):.3f} "
                         f"({len(sel)} cases)")
        # Paired by round (the two encodes of a round ran back to back): mean and standard error of the
        # per-round fps ratios pooled over the cases.
        paired = [c / k for r in rows if r["palette"] == "kmeans" and (r["generator_blocks"] > 0) == pick
                  for x in rows if x["palette"] == "cgan-v1" and x["clip"] == r["clip"] and x["target_psnr"] == r["target_psnr"]
                  for k, c in zip(r["fps_runs"], x["fps_runs"])]
        if len(paired) > 1:
            lines.append(f"per-round paired fps ratio, {label}: mean {np.mean(paired):.4f} ± {np.std(paired, ddof=1) / np.sqrt(len(paired)):.4f} "
                         f"(standard error, {len(paired)} pairs)")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """Markdown tables: per case, MSE and time of every method relative to k-means(10)."""
    lines = []
    for comp in ("luma", "chroma"):
        lines += [
            f"\n**{comp}** — mean block MSE (all blocks / candidate blocks) and time for the batch; "
            "ratios are to k-means(10) on the same blocks\n",
            "| clip | block, k | method | MSE all | MSE cand. | MSE ratio all | MSE ratio cand. | time ms | speed-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if r["component"] != comp:
                continue
            ref = next(x for x in results if x["method"] == "kmeans(10)" and all(x[f] == r[f] for f in ("clip", "component", "block", "k")))
            lines.append(
                f"| {r['clip'].split('_')[0]}_{r['clip'].split('_')[1]} | {r['block']}px, {r['k']} ({r['blocks']} blk, {r['candidates']} cand) "
                f"| {r['method']} | {r['mse_all']:.2f} | {r['mse_candidates']:.2f} | {r['mse_all'] / max(ref['mse_all'], 1e-9):.3f} "
                f"| {r['mse_candidates'] / max(ref['mse_candidates'], 1e-9):.3f} | {r['seconds'] * 1e3:.1f} | {ref['seconds'] / r['seconds']:.1f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus"), help="folder with the corpus clips")
    parser.add_argument("--frames", type=int, default=2, help="frames sampled per clip (one batch)")
    parser.add_argument("--repeat", type=int, default=2, help="timing repeats (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--weights", type=Path, default=None, help="cgan weights (default: the shipped, hash-checked ones)")
    parser.add_argument("--codec-frames", type=int, default=0, help="also encode this many frames per clip with each palette generator (0: skip)")
    parser.add_argument("--codec-repeat", type=int, default=6, help="interleaved encodes per generator and case, even (median fps is reported)")
    parser.add_argument("--no-palettes", dest="palettes", action="store_false", help="skip the palette tables (codec comparison only)")
    parser.add_argument("--device", default="cpu", help="torch device for the generators: cpu or cuda")
    parser.add_argument("--no-cnn-features", dest="cnn_features", action="store_false",
                        help="skip the cgan-v1 + CNN features variant (where EfficientNet-Lite0 is not installed)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/palette_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args.corpus, args.frames, args.repeat, args.weights, args.device, args.cnn_features) if args.palettes else []
    codec = codec_comparison(args.corpus, args.codec_frames, args.weights, args.device, args.codec_repeat) if args.codec_frames else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    args.out.write_text(json.dumps({"threads": args.threads, "frames": args.frames, "device": device_name,
                                    "results": results, "codec": codec}, indent=1))
    print(summary(results))
    if codec:
        print(codec_summary(codec))


if __name__ == "__main__":
    main()
