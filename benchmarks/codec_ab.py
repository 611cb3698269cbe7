"""Interleaved A/B of the codec's speed between two source trees (e.g. a base commit and a change).

Each measurement is a fresh process with ``PYTHONPATH=<tree>`` (so each tree runs its own code and
its own numba cache), one thread everywhere, that encodes a clip's first frames at a target
PSNR and decodes the result; it keeps its fastest of ``--encode-repeat`` encodes and
``--decode-repeat`` decodes, in wall time and in the process's CPU time (with one thread, CPU
time is the work done: on a machine that other work shares, wall time also counts the waits).
Rounds alternate the trees (A, B, then B, A, ...), so load from elsewhere on a shared machine
falls on both alike. Both trees are run once, untimed, before the rounds: that compiles
whatever their caches lack.

Prints a table per clip (median fps of the rounds, and the median and range of the per-round
B/A ratios) and writes ``benchmarks/results/codec_ab.json``. It also checks that both trees
write the same payload bytes, and exits 1 when they do not::

    python benchmarks/codec_ab.py /path/to/base-tree . --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIPS = ("camera_rocket_launch_640x360.mkv", "screen_gnome_settings_640x360.mkv")
MEASURES = ("encode", "encode_cpu", "decode", "decode_cpu")  # fps per wall second, per CPU second
ONE_THREAD = {name: "1" for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

# Runs inside the tree under test: argv = clip, frames, target, encode repeats, decode repeats.
WORKER = """
import hashlib, json, sys, time
import torch
torch.set_num_threads(1)
import palstream
from palstream.codec import EncoderConfig, decode_chunk, encode_chunk
from palstream.io import read_frames
clip, frames, target, encodes, decodes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
video = read_frames(clip, 0, frames)
config = EncoderConfig(target_psnr=target)
times = {"encode_s": [], "encode_cpu_s": [], "decode_s": [], "decode_cpu_s": []}
for _ in range(encodes):
    start, cpu = time.perf_counter(), time.process_time()
    payload = encode_chunk(video, config).payload
    times["encode_s"].append(time.perf_counter() - start)
    times["encode_cpu_s"].append(time.process_time() - cpu)
for _ in range(decodes):
    start, cpu = time.perf_counter(), time.process_time()
    decode_chunk(payload)
    times["decode_s"].append(time.perf_counter() - start)
    times["decode_cpu_s"].append(time.process_time() - cpu)
print(json.dumps({"package": palstream.__file__, "frames": len(video), "bytes": len(payload),
                  "payload_sha256": hashlib.sha256(payload).hexdigest(), **times}))
"""


def measure(tree: Path, clip: Path, args) -> dict:
    """One fresh process in ``tree``: its timings of ``clip``."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", WORKER, str(clip), str(args.frames), str(args.target),
            str(args.encode_repeat), str(args.decode_repeat)]
    done = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"codec_ab: the run in {tree} failed ({tail}); check that it imports there")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(tree):
        raise SystemExit(f"codec_ab: {tree} imported palstream from {result['package']}; pass the tree's root")
    return result


def summarise(runs: dict[str, list[dict]], frames: int) -> dict:
    """Median fps of each side over the rounds, and the per-round B/A ratios (paired by round)."""
    fps = {
        side: {f"{what}_fps": [frames / min(r[f"{what}_s"]) for r in rounds] for what in MEASURES}
        for side, rounds in runs.items()
    }
    out = {}
    for what in (f"{m}_fps" for m in MEASURES):
        ratios = [b / a for a, b in zip(fps["A"][what], fps["B"][what])]
        out[what] = {
            "A_median": statistics.median(fps["A"][what]),
            "B_median": statistics.median(fps["B"][what]),
            "B/A_of_medians": statistics.median(fps["B"][what]) / statistics.median(fps["A"][what]),
            "B/A_per_round_median": statistics.median(ratios),
            "B/A_per_round_range": [min(ratios), max(ratios)],
            "A_rounds": fps["A"][what],
            "B_rounds": fps["B"][what],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree_a", type=Path, help="source tree of side A (the base)")
    parser.add_argument("tree_b", type=Path, help="source tree of side B (the change)")
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--clips", nargs="+", default=list(CLIPS), help="file names in --corpus")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--target", type=float, default=45.0, help="PSNR-Y floor in dB")
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each tree per clip (at least 3)")
    parser.add_argument("--encode-repeat", type=int, default=2, help="encodes per measurement; the fastest counts")
    parser.add_argument("--decode-repeat", type=int, default=5, help="decodes per measurement; the fastest counts")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "codec_ab.json")
    args = parser.parse_args()
    trees = {"A": args.tree_a.resolve(), "B": args.tree_b.resolve()}
    for side, tree in trees.items():
        if not (tree / "palstream" / "codec" / "__init__.py").is_file():
            raise SystemExit(f"codec_ab: tree {side} {tree} holds no palstream/codec; pass a checkout's root")
    if args.rounds < 3:
        raise SystemExit(f"codec_ab: --rounds {args.rounds} is too few for an A/B; use 3 or more")
    clips = [args.corpus / name for name in args.clips]
    missing = [str(c) for c in clips if not c.is_file()]
    if missing:
        raise SystemExit(f"codec_ab: clip not found: {missing[0]}; pass --corpus (the folder of the corpus clips)")

    results = {"trees": {s: str(t) for s, t in trees.items()}, "frames": args.frames, "target_psnr": args.target,
               "rounds": args.rounds, "encode_repeat": args.encode_repeat, "decode_repeat": args.decode_repeat,
               "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "clips": {}}
    identical = True
    for clip in clips:
        for tree in trees.values():  # untimed: compiles what a tree's numba cache lacks
            measure(tree, clip, argparse.Namespace(**{**vars(args), "encode_repeat": 1, "decode_repeat": 1}))
        runs: dict[str, list[dict]] = {"A": [], "B": []}
        for round_ in range(args.rounds):
            for side in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                runs[side].append(measure(trees[side], clip, args))
        payloads = {r["payload_sha256"] for rounds in runs.values() for r in rounds}
        identical &= len(payloads) == 1
        summary = summarise(runs, runs["A"][0]["frames"])
        results["clips"][clip.name] = {
            "bytes": {side: runs[side][0]["bytes"] for side in runs},
            "same_payload": len(payloads) == 1,
            **summary,
        }
        same = "identical" if len(payloads) == 1 else "DIFFER"
        print(f"\n{clip.name}: {runs['A'][0]['frames']} frames at {args.target:g} dB, {args.rounds} interleaved rounds; "
              f"payloads {same} ({runs['A'][0]['bytes']} / {runs['B'][0]['bytes']} bytes)")
        print(f"{'fps':16}{'A':>10}{'B':>10}{'B/A':>8}   B/A per round: median (range)")
        for what in MEASURES:
            s = summary[f"{what}_fps"]
            lo, hi = s["B/A_per_round_range"]
            label = what.replace("_cpu", " per CPU s")
            print(f"{label:16}{s['A_median']:10.2f}{s['B_median']:10.2f}{s['B/A_of_medians']:8.3f}"
                  f"   {s['B/A_per_round_median']:.3f} ({lo:.3f}..{hi:.3f})")
    results["load_average_after"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
