"""Rate control: how far above its PSNR-Y floor each chunk lands, and what that costs (issue 16 item 6).

Per corpus clip (first ``--frames`` frames, GOP chunks as the default config) and target, every
chunk is encoded, decoded and measured: PSNR-Y of the decoded chunk minus the floor (the
overshoot; negative would break the promise), the ladder rung of the final encode, the encodes
it took (prefix probes and full-chunk encodes), bytes and encode time. Each source tree given
with ``--tree`` runs in its own worker process (``PYTHONPATH=<tree>``, one torch and numba
thread), the trees taking turns case by case and round by round, so that before/after figures
share the machine's load::

    .venv/bin/python -m benchmarks.rate_control --tree /work/main --tree . --repeat 3

Prints one table per tree and a before/after table (the last tree against the first); writes
``benchmarks/results/rate_control.json``.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent


# --- worker: runs inside one tree ------------------------------------------------------------


def _serve() -> None:
    """Answer one JSON case per stdin line with one JSON line of per-chunk records."""
    import numba
    import numpy as np
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    from palstream.codec import EncoderConfig, chunk, decode_chunk, encode_chunk
    from palstream.io import read_frames

    calls = []  # (frames, rung) of every encode this chunk's rate control asked for
    encode_at = chunk._encode_at

    def recording(padded, rung, *args, **kwargs):
        calls.append((padded[0].shape[0], repr(rung)))
        return encode_at(padded, rung, *args, **kwargs)

    chunk._encode_at = recording
    clips = {}
    for line in sys.stdin:
        case = json.loads(line)
        key = (case["clip"], case["frames"])
        if key not in clips:
            clips[key] = read_frames(case["clip"], 0, case["frames"])
        frames = clips[key]
        config = EncoderConfig(target_psnr=case["target"], **({"gop": case["gop"]} if case["gop"] else {}))
        records = []
        for index, first in enumerate(range(0, frames.y.shape[0], config.gop)):
            part = frames[first : first + config.gop]
            calls.clear()
            start, cpu = time.perf_counter(), time.process_time()
            encoded = encode_chunk(part, config)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            decoded = decode_chunk(encoded.payload)
            mse = float(np.mean((decoded.y.astype(np.float64) - part.y) ** 2))
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
            count = part.y.shape[0]
            records.append({
                "chunk": index,
                "frames": count,
                "pixels": int(part.y[0].size),
                "psnr_y": psnr,
                "overshoot_db": psnr - case["target"],
                "bytes": len(encoded.payload),
                "step": encoded.stats["step"],
                "rung": calls[-1][1],
                "encodes": len(calls),
                "full_encodes": sum(n == count for n, _ in calls),
                "encode_seconds": seconds,
                "encode_cpu_seconds": cpu,
            })
        print(json.dumps(records), flush=True)


class _Worker:
    """A ``--serve`` process importing palstream from ``tree``."""

    def __init__(self, tree: Path):
        env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree,
        )

    def measure(self, case: dict) -> list[dict]:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker stopped (exit {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# --- driver ----------------------------------------------------------------------------------


def _commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "palstream/codec"], capture_output=True, text=True, check=False)
    return (out.stdout.strip() or "unknown") + ("+codec edits" if dirty.stdout.strip() else "")


def _summary(records: list[dict]) -> dict:
    """One tree's figures for one clip and target; fps from the median round."""
    first_round = [r for r in records if r["round"] == 0]
    over = [r["overshoot_db"] for r in first_round]
    bits = 8 * sum(r["bytes"] for r in first_round)
    pixels = sum(r["pixels"] * r["frames"] for r in first_round)
    frames = sum(r["frames"] for r in first_round)
    rounds = sorted({r["round"] for r in records})
    seconds = statistics.median(sum(r["encode_seconds"] for r in records if r["round"] == k) for k in rounds)
    cpu = statistics.median(sum(r["encode_cpu_seconds"] for r in records if r["round"] == k) for k in rounds)
    return {
        "chunks": len(first_round),
        "mean_overshoot_db": sum(over) / len(over),
        "max_overshoot_db": max(over),
        "below_floor": sum(o < 0 for o in over),
        "encodes": sum(r["encodes"] for r in first_round) / len(first_round),
        "full_encodes": sum(r["full_encodes"] for r in first_round) / len(first_round),
        "bpp": bits / pixels,
        "psnr_y": min(r["psnr_y"] for r in first_round),
        "encode_fps": frames / seconds,
        "encode_fps_cpu": frames / cpu,  # frames per CPU second: what a shared machine's load distorts least
        "rungs": [r["rung"] for r in first_round],
    }


def main(
    corpus: Annotated[Path, typer.Option(help="Folder of the corpus clips.")] = REPO.parent / "shared" / "corpus",
    clips: Annotated[str, typer.Option(help="Glob of clip file names in the corpus.")] = "*.mkv",
    frames: Annotated[int, typer.Option(min=1, help="First N frames of each clip.")] = 32,
    target: Annotated[list[float] | None, typer.Option(help="PSNR-Y floor(s) in dB (repeat the option; default 40 and 45).")] = None,
    gop: Annotated[int, typer.Option(min=0, help="Frames per chunk; 0: the default config's.")] = 0,
    tree: Annotated[list[Path] | None, typer.Option(help="Source tree(s) to measure (repeat; default: this one).")] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Rounds per case, for encode fps (median).")] = 1,
    out: Annotated[Path, typer.Option(help="JSON results file.")] = REPO / "benchmarks" / "results" / "rate_control.json",
    serve: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Overshoot above the PSNR-Y floor, encodes, bpp and encode fps per clip, for one or more trees."""
    if serve:
        return _serve()
    target = target or [40.0, 45.0]
    trees = [t.resolve() for t in tree or [REPO]]
    for t in trees:
        if not (t / "palstream" / "codec" / "chunk.py").is_file():
            raise typer.BadParameter(f"{t} is not a palstream source tree (no palstream/codec/chunk.py); pass its root")
    if not corpus.is_dir():
        raise typer.BadParameter(f"corpus folder {corpus} does not exist; pass --corpus DIR")
    paths = sorted(p for p in corpus.iterdir() if fnmatch.fnmatch(p.name, clips))
    if not paths:
        raise typer.BadParameter(f"no file in {corpus} matches {clips!r}; pass --clips GLOB")
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    workers = [_Worker(t) for t in trees]
    records: dict[str, list[dict]] = {str(t): [] for t in trees}
    try:
        for k in range(repeat):
            for i, path in enumerate(paths):
                for j, floor in enumerate(target):
                    # alternate which tree goes first, so neither always meets the same load
                    order = list(zip(trees, workers))
                    if (k + i + j) % 2:
                        order.reverse()
                    for t, w in order:
                        case = {"clip": str(path), "frames": frames, "target": floor, "gop": gop}
                        for r in w.measure(case):
                            records[str(t)].append({"clip": path.stem, "target": floor, "round": k, **r})
    finally:
        for w in workers:
            w.close()

    console = Console(width=200)
    summaries = {}
    for t in trees:
        rows = summaries[str(t)] = {}
        table = Table(title=f"{t} ({_commit(t)})")
        for col in ("clip", "target", "chunks", "mean over dB", "max over dB", "below", "encodes (full)", "bpp", "enc fps", "fps (CPU)"):
            table.add_column(col, justify="left" if col == "clip" else "right")
        for path in paths:
            for floor in target:
                s = rows[f"{path.stem}@{floor:g}"] = _summary(
                    [r for r in records[str(t)] if r["clip"] == path.stem and r["target"] == floor]
                )
                table.add_row(
                    path.stem, f"{floor:g}", str(s["chunks"]), f"{s['mean_overshoot_db']:.3f}", f"{s['max_overshoot_db']:.3f}",
                    str(s["below_floor"]), f"{s['encodes']:.1f} ({s['full_encodes']:.1f})", f"{s['bpp']:.4f}", f"{s['encode_fps']:.2f}", f"{s['encode_fps_cpu']:.2f}",
                )
        console.print(table)
        for floor in target:
            over = [r["overshoot_db"] for r in records[str(t)] if r["target"] == floor and r["round"] == 0]
            rows[f"corpus@{floor:g}"] = {
                "chunks": len(over), "mean_overshoot_db": sum(over) / len(over), "max_overshoot_db": max(over),
                "below_floor": sum(o < 0 for o in over),
            }
            console.print(
                f"  {floor:g} dB: mean overshoot {sum(over) / len(over):.3f} dB over {len(over)} chunks, "
                f"max {max(over):.3f}, below the floor {sum(o < 0 for o in over)}"
            )
    if len(trees) > 1:
        before, after = summaries[str(trees[0])], summaries[str(trees[-1])]
        table = Table(title=f"{trees[-1]} against {trees[0]}")
        for col in ("case", "mean over dB", "bpp", "bpp ratio", "enc fps (CPU)", "fps ratio"):
            table.add_column(col, justify="left" if col == "case" else "right")
        for case, a in after.items():
            b = before[case]
            if "bpp" in a:
                table.add_row(
                    case, f"{b['mean_overshoot_db']:.3f} → {a['mean_overshoot_db']:.3f}", f"{b['bpp']:.4f} → {a['bpp']:.4f}",
                    f"{a['bpp'] / b['bpp']:.3f}", f"{b['encode_fps_cpu']:.2f} → {a['encode_fps_cpu']:.2f}",
                    f"{a['encode_fps_cpu'] / b['encode_fps_cpu']:.3f}",
                )
        console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python -m benchmarks.rate_control", *sys.argv[1:]]),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "threads": "torch 1, numba 1 per worker",
        "trees": {str(t): _commit(t) for t in trees},
        "frames": frames,
        "summaries": summaries,
        "records": records,
    }, indent=1) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
