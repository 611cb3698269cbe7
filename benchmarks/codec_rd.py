"""Codec rate–distortion and speed benchmark: palstream against today's tools (issues 2 and 16).

One command measures, per corpus clip and in the same run, palstream (several
``--target-psnr`` and ``--lossless``) beside FFV1, x264 ``-qp 0``, x265, x264, SVT-AV1, FFmpeg
GIF, pngquant and the naive k-means + zstd palette codec, plus a still scene with sensor noise
made by ``make_still_noisy`` (reported apart, not in the corpus geomeans); prints the tables and
issue 16's "Done when" checks; writes ``codec_rd.json``, ``codec_rd.csv`` and one RD plot per
clip; and regenerates its section of ``BENCHMARKS.md``::

    .venv/bin/python -m benchmarks.codec_rd              # full run: first 32 frames, one thread
    .venv/bin/python -m benchmarks.codec_rd --quick --frames 4 --clips 'screen*' --no-still-noisy
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numba
import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

import palstream
import palstream.codec.chunk
from benchmarks.anchors import ANCHORS, Clip, Codec, Point, ToolError, ffmpeg_exe, measure
from benchmarks.make_still_noisy import DEFAULT_CACHE, make_still_noisy
from palstream.codec import DEFAULT_TARGET_PSNR, EncoderConfig, decode_chunk, encode_chunk
from palstream.errors import PalstreamError
from palstream.frames import Frames
from palstream.io import probe, read_frames
from palstream.palettes import create_palette_generator

REPO = Path(__file__).resolve().parent.parent
RD_TARGETS = (40.0, 45.0)  # dB PSNR-Y at which bpp is interpolated and compared
# Issue 16 "Done when": palstream / anchor bits.
X265_GEOMEAN_MAX = {"40": 1.6, "45": 1.25}
X265_CLIP_MAX = 2.5
LOSSLESS_GEOMEAN_MAX = {"x264 qp0": 1.0, "FFV1": 0.7}
OVERSHOOT_MEAN_MAX = 0.3  # dB above the chunk's PSNR-Y floor, mean over chunks
STILL_NOISY_X265_MAX = 2.0
SPEED_SIZE = (640, 360)  # the resolution the speed targets are stated for
ENCODE_FPS_MIN, DECODE_FPS_MIN = 10.0, 100.0

console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep table rows on one line


class Palstream(Codec):
    """palstream through the library: ``encode_chunk`` per GOP chunk, ``decode_chunk`` back."""

    name, family = "palstream", "palstream"

    def __init__(self, pyramid: bool = False):
        self._generator = None
        self.pyramid = pyramid

    def missing(self):
        return None

    def settings(self, quick):
        # Low targets bracket 40 dB from below: the rate control overshoots its floor (by ~6 dB on screen content).
        targets = {32.0, DEFAULT_TARGET_PSNR} if quick else {30.0, 36.0, 40.0, DEFAULT_TARGET_PSNR, 50.0}
        return sorted(targets) + ["lossless"]

    def _config(self, setting):
        if setting == "lossless":
            return EncoderConfig(lossless=True, pyramid=self.pyramid)
        return EncoderConfig(target_psnr=float(setting), pyramid=self.pyramid)

    def warm_up(self, clip: Clip) -> None:
        """Encode and decode a small crop once, so JIT compilation is not timed."""
        f = clip.frames[0:2]
        crop = Frames(f.y[:, :64, :64].copy(), f.u[:, :32, :32].copy(), f.v[:, :32, :32].copy())
        for setting in ("lossless", 40.0):
            decode_chunk(encode_chunk(crop, self._config(setting), self._get_generator()).payload)

    def _get_generator(self):
        if self._generator is None:
            self._generator = create_palette_generator(EncoderConfig.palette)
        return self._generator

    def run(self, clip, setting, work):
        config = self._config(setting)
        generator = self._get_generator()
        chunks = [clip.frames[a : a + config.gop] for a in range(0, len(clip.frames), config.gop)]
        # Wall time, and CPU time: on a shared machine the latter is what one thread of palstream costs.
        start, cpu = time.perf_counter(), time.process_time()
        payloads = [encode_chunk(chunk, config, generator).payload for chunk in chunks]
        enc, enc_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        parts = [decode_chunk(p) for p in payloads]
        dec, dec_cpu = time.perf_counter() - start, time.process_time() - cpu
        bits = 8 * sum(len(p) for p in payloads)
        quality = measure(clip.frames, Frames.concatenate(parts))
        # The rate control's floor is per chunk: each chunk's PSNR-Y (None: exact, coded losslessly).
        chunk_psnr = [measure(chunk, part)[0] for chunk, part in zip(chunks, parts, strict=True)]
        extra = {
            "chunk_psnr_y": [None if math.isinf(q) else round(q, 4) for q in chunk_psnr],
            "encode_cpu_s": round(enc_cpu, 4),
            "decode_cpu_s": round(dec_cpu, 4),
        }
        return Point(self.name, _label(setting), bits, clip.luma_pixels, len(clip.frames), *quality, enc, dec, extra)


# --- measurement -----------------------------------------------------------------------------


def load_clip(path: Path, max_frames: int | None, work: Path) -> Clip:
    """Decode a clip once with the library's reader; write the raw yuv420p the external tools read."""
    info = probe(str(path))
    frames = read_frames(str(path), 0, max_frames)
    raw = work / "source.yuv"
    raw.write_bytes(frames.tobytes())
    return Clip(path.stem, frames, info.fps_fraction, raw)


def run_codec(codec: Codec, clip: Clip, setting, work: Path) -> Point | str:
    """One point, or a one-line failure message (a failure never stops the benchmark)."""
    try:
        return codec.run(clip, setting, work)
    except Exception as exc:  # a missing tool or a codec bug: record it and measure the rest
        return f"{codec.name} {setting}: {one_line(exc)}"


def one_line(exc: Exception) -> str:
    if isinstance(exc, (ToolError, PalstreamError)):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def frontier(points: list[Point]) -> list[tuple[float, float]]:
    """(PSNR-Y, bpp) of the points no other point beats on both, ascending; exact points left out."""
    kept: list[tuple[float, float]] = []
    for p in sorted((p for p in points if math.isfinite(p.psnr_y)), key=lambda p: (-p.psnr_y, p.bpp)):
        if not kept or p.bpp < kept[-1][1]:
            kept.append((p.psnr_y, p.bpp))
    return kept[::-1]


def bpp_at(points: list[Point], psnr: float) -> float | None:
    """bpp at ``psnr`` dB by linear interpolation of log(bpp) over PSNR-Y; None outside the measured range."""
    front = frontier(points)
    if not front or not front[0][0] <= psnr <= front[-1][0]:
        return None
    q, b = np.array(front).T
    return float(np.exp(np.interp(psnr, q, np.log(b))))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def verdict(value: float | None, limit: float) -> str:
    return "n/a" if value is None else ("PASS" if value <= limit else "FAIL")


def geomean(values: list[float | None]) -> float | None:
    """Geometric mean, or None when any value is unknown (a partial mean would flatter)."""
    if not values or any(v is None for v in values):
        return None
    return float(np.exp(np.mean(np.log(values))))


def summarise(clip: Clip, points: list[Point]) -> dict:
    """Per-clip interpolated rates, ratios to the anchors, lossless ratios, chunk overshoot and speed."""
    by_codec: dict[str, list[Point]] = {}
    for p in points:
        by_codec.setdefault(p.codec, []).append(p)
    families = {cls.name: cls.family for cls in ANCHORS} | {Palstream.name: Palstream.family}
    palette_tools = [c for c in by_codec if families.get(c) == "palette"]
    ours = by_codec.get(Palstream.name, [])
    exact = {c: next((p.bpp for p in pts if p.lossless), None) for c, pts in by_codec.items()}

    rates = {c: {f"{t:g}": bpp_at(pts, t) for t in RD_TARGETS} for c, pts in by_codec.items()}
    ratios = {}
    for t in RD_TARGETS:
        key = f"{t:g}"
        mine = rates.get(Palstream.name, {}).get(key)
        best = [rates[c][key] for c in palette_tools if rates[c][key] is not None]
        # What a user asking for t dB pays: the frontier can bridge a cliff no target lands in.
        asked = next((p.bpp for p in ours if p.setting == _label(t)), None)
        ratios[key] = {
            "x265": ratio(mine, rates.get("x265", {}).get(key)),
            "x265_at_target": ratio(asked, rates.get("x265", {}).get(key)),
            "best_palette_tool": ratio(mine, min(best) if best else None),
            "FFV1": ratio(mine, exact.get("FFV1")),
        }

    lossless_point = next((p for p in ours if p.setting == "lossless"), None)
    lossless = None
    if lossless_point is not None:
        lossless = {
            "bpp": lossless_point.bpp,
            "exact": lossless_point.lossless,
            **{anchor: ratio(lossless_point.bpp, exact.get(anchor)) for anchor in LOSSLESS_GEOMEAN_MAX},
        }

    overshoot = {}
    for p in ours:
        if p.setting == "lossless":
            continue
        target = float(p.setting.split()[1])
        chunks = p.extra["chunk_psnr_y"]
        above = [q - target for q in chunks if q is not None]
        overshoot[p.setting] = {
            "target": target,
            "chunk_psnr_y": chunks,
            "mean_db": float(np.mean(above)) if above else None,
            "max_db": max(above) if above else None,
            "below_floor": sum(d < 0 for d in above),
            "exact_chunks": sum(q is None for q in chunks),  # coded losslessly: no finite overshoot
        }

    speed = None
    default = next((p for p in ours if p.setting == _label(DEFAULT_TARGET_PSNR)), None)
    if (clip.frames.width, clip.frames.height) == SPEED_SIZE and default is not None:
        speed = {
            "setting": default.setting,
            "encode_fps": default.frames / default.encode_s,
            "decode_fps": default.frames / default.decode_s,
            "encode_cpu_fps": default.frames / default.extra["encode_cpu_s"],
            "decode_cpu_fps": default.frames / default.extra["decode_cpu_s"],
        }
    return {"bpp_at": rates, "ratios": ratios, "lossless": lossless, "overshoot": overshoot, "speed": speed,
            "exact_bpp": exact}  # fmt: skip


def done_when(corpus: dict[str, dict], still: dict[str, dict], one_thread: bool) -> list[dict]:
    """Issue 16's "Done when" lines, each PASS, FAIL or n/a (a number that could not be measured).

    ``corpus`` and ``still`` map clip names to ``summarise`` results; the still noisy scene is
    judged on its own lines and is in none of the corpus lines.
    """
    checks = []

    def add(check: str, status: str, numbers: str, value=None) -> None:
        checks.append({"check": check, "status": status, "numbers": numbers, "value": value})

    def missing(values: dict) -> str:
        unknown = [n for n, v in values.items() if v is None]
        return f"; n/a for {', '.join(unknown)}" if unknown else ""

    for key, limit in X265_GEOMEAN_MAX.items():
        per_clip = {n: s["ratios"][key]["x265"] for n, s in corpus.items()}
        g = geomean(list(per_clip.values()))
        numbers = f"{_num(g, 3)} over {len(per_clip)} clips{missing(per_clip)}"
        add(f"geomean palstream/x265-medium at {key} dB ≤ {limit:g}", verdict(g, limit), numbers, g)

    per_point = {f"{n} @ {k} dB": s["ratios"][k]["x265"] for n, s in corpus.items() for k in X265_GEOMEAN_MAX}
    known = {where: r for where, r in per_point.items() if r is not None}
    worst = max(known, key=known.get, default=None)
    above = [f"{where} {r:.3f}" for where, r in known.items() if r > X265_CLIP_MAX]
    status = verdict(known[worst], X265_CLIP_MAX) if worst and len(known) == len(per_point) else "n/a"
    numbers = (f"worst {worst} {known[worst]:.3f}" if worst else "n/a") + missing(per_point)
    add(f"no clip above {X265_CLIP_MAX:g}× x265 at 40 or 45 dB", status,
        numbers + (f"; above: {', '.join(above)}" if above else ""), known.get(worst))  # fmt: skip

    lossless = {n: s["lossless"] or {} for n, s in corpus.items()}
    not_exact = [n for n, result in lossless.items() if result and not result["exact"]]
    for anchor, limit in LOSSLESS_GEOMEAN_MAX.items():
        per_clip = {n: result.get(anchor) for n, result in lossless.items()}
        g = geomean(list(per_clip.values()))
        numbers = f"{_num(g, 3)} over {len(per_clip)} clips{missing(per_clip)}"
        add(f"--lossless geomean ≤ {limit:g}× {anchor}, decoded exactly", "FAIL" if not_exact else verdict(g, limit),
            numbers + (f"; NOT exact: {', '.join(not_exact)}" if not_exact else ""), g)  # fmt: skip

    speeds = {n: s["speed"] for n, s in corpus.items() if s["speed"]}
    numbers = "; ".join(
        f"{n}: encode {v['encode_cpu_fps']:.1f} (wall {v['encode_fps']:.1f}), "
        f"decode {v['decode_cpu_fps']:.1f} (wall {v['decode_fps']:.1f}) frames per CPU second"
        for n, v in speeds.items()
    )
    numbers = (numbers or "no 640×360 clip at 45 dB") + ("" if one_thread else " (not one thread: use --threads 1)")
    fast = all(v["encode_cpu_fps"] >= ENCODE_FPS_MIN and v["decode_cpu_fps"] >= DECODE_FPS_MIN for v in speeds.values())
    status = ("PASS" if fast else "FAIL") if speeds and one_thread else "n/a"
    speed_check = f"encode ≥ {ENCODE_FPS_MIN:g} fps, decode ≥ {DECODE_FPS_MIN:g} fps at 640×360, 45 dB, one thread"
    add(speed_check, status, numbers)

    overshoots = [o for s in corpus.values() for o in s["overshoot"].values()]
    by_target: dict[float, list[float]] = {}
    for o in overshoots:
        by_target.setdefault(o["target"], []).extend(q - o["target"] for q in o["chunk_psnr_y"] if q is not None)
    deltas = [d for per_target in by_target.values() for d in per_target]
    exact_chunks = sum(o["exact_chunks"] for o in overshoots)
    below = sum(d < 0 for d in deltas)
    lowest = min(deltas, default=None)
    add("every chunk at or above its PSNR-Y floor", ("PASS" if below == 0 else "FAIL") if deltas else "n/a",
        f"{below} of {len(deltas)} chunks below; lowest {_num(lowest, 2)} dB from its floor", below)  # fmt: skip
    mean = float(np.mean(deltas)) if deltas else None
    numbers = f"mean {_num(mean, 2)} dB, max {_num(max(deltas, default=None), 2)} dB over {len(deltas)} chunks; "
    numbers += "mean per target: " + ", ".join(f"{t:g} dB {np.mean(d):.2f}" for t, d in sorted(by_target.items()) if d)
    numbers += f"; {exact_chunks} chunks coded losslessly, not in the mean"
    add(f"mean overshoot per chunk ≤ {OVERSHOOT_MEAN_MAX:g} dB", verdict(mean, OVERSHOOT_MEAN_MAX), numbers, mean)

    # The still scene is judged on the worse of the frontier ratio and the ratio of palstream's encode
    # at that target: its RD curve has a cliff where the noise starts to be coded (36 -> 45 dB).
    for key in X265_GEOMEAN_MAX:
        pairs = {n: (s["ratios"][key]["x265"], s["ratios"][key]["x265_at_target"]) for n, s in still.items()}
        per_clip = {n: None if None in pair else max(pair) for n, pair in pairs.items()}
        worst = None if not per_clip or None in per_clip.values() else max(per_clip.values())
        numbers = "; ".join(
            f"{n}: frontier {_num(a, 3)}, palstream at --target-psnr {key} {_num(b, 3)}" for n, (a, b) in pairs.items()
        ) or "not measured"
        add(f"still scene with sensor noise ≤ {STILL_NOISY_X265_MAX:g}× x265 at {key} dB",
            verdict(worst, STILL_NOISY_X265_MAX), numbers, worst)  # fmt: skip
    return checks


# --- reporting -------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _db(x: float) -> str:
    return "exact" if math.isinf(x) else f"{x:.2f}"


def _fps(frames: int, seconds: float) -> str:
    return f"{frames / seconds:.1f}" if seconds > 0 else "n/a"


def clip_rows(points: list[Point]) -> list[list[str]]:
    return [
        [p.codec, p.setting, f"{p.bpp:.4f}", _db(p.psnr_y), _db(p.psnr_yuv),
         _fps(p.frames, p.encode_s), _fps(p.frames, p.decode_s)]
        for p in points
    ]  # fmt: skip


POINT_HEADER = ["codec", "setting", "bpp", "PSNR-Y dB", "PSNR-YUV dB", "enc fps", "dec fps"]
RATE_HEADER = ["codec", "bpp @ 40 dB", "bpp @ 45 dB", "lossless bpp"]
RATIO_HEADER = ["ratio", "@ 40 dB", "@ 45 dB", "lossless"]


def rate_rows(summary: dict) -> list[list[str]]:
    rows = []
    for codec, rates in summary["bpp_at"].items():
        exact = summary["exact_bpp"][codec]
        rows.append([codec, _num(rates["40"]), _num(rates["45"]), "–" if exact is None else _num(exact)])
    return rows


def ratio_rows(summary: dict) -> list[list[str]]:
    lossless = summary["lossless"] or {}
    rows = []
    refs = (("x265", "x265"), ("x265_at_target", "x265, palstream at --target-psnr 40 / 45"),
            ("best_palette_tool", "best palette tool"), ("FFV1", "FFV1"), ("x264 qp0", "x264 qp0"))  # fmt: skip
    for ref, label in refs:
        at = [_num(summary["ratios"][f"{t:g}"][ref], 3) if ref in summary["ratios"]["40"] else "–" for t in RD_TARGETS]
        rows.append([f"palstream / {label}", *at, _num(lossless[ref], 3) if ref in lossless else "–"])
    return rows


DONE_HEADER = ["check (issue 16)", "result", "numbers"]
CLIP_HEADER = ["clip", "palstream/x265 @ 40 dB", "@ 45 dB", "lossless / x264 qp0", "lossless / FFV1", "lossless exact",
               "enc fps @ 45 dB: CPU (wall)", "dec fps @ 45 dB: CPU (wall)"]  # fmt: skip
OVERSHOOT_HEADER = ["clip", "target dB", "chunk PSNR-Y dB", "mean above floor dB", "max above floor dB", "below floor"]


def done_rows(checks: list[dict]) -> list[list[str]]:
    return [[c["check"], c["status"], c["numbers"]] for c in checks]


def clip_summary_rows(corpus: dict, still: dict, points: dict[str, list[Point]]) -> list[list[str]]:
    """One row per clip: the numbers the issue-16 checks pool, then their corpus geomeans, then the still scene."""

    def row(name: str, s: dict) -> list[str]:
        lossless = s["lossless"] or {}
        default = next((p for p in points[name] if p.setting == _label(DEFAULT_TARGET_PSNR)), None)

        def fps(stage: str) -> str:  # CPU (wall)
            cpu, wall = default.extra[f"{stage}_cpu_s"], getattr(default, f"{stage}_s")
            return f"{_fps(default.frames, cpu)} ({_fps(default.frames, wall)})"

        return [
            name, _num(s["ratios"]["40"]["x265"], 3), _num(s["ratios"]["45"]["x265"], 3),
            _num(lossless.get("x264 qp0"), 3), _num(lossless.get("FFV1"), 3),
            ("yes" if lossless["exact"] else "NO") if lossless else "n/a",
            fps("encode") if default else "n/a", fps("decode") if default else "n/a",
        ]  # fmt: skip

    rows = [row(n, s) for n, s in corpus.items()]
    x265 = [_num(geomean([s["ratios"][k]["x265"] for s in corpus.values()]), 3) for k in ("40", "45")]
    lossless = [_num(geomean([(s["lossless"] or {}).get(a) for s in corpus.values()]), 3) for a in LOSSLESS_GEOMEAN_MAX]
    rows.append(["geomean (corpus)", *x265, *lossless, "", "", ""])
    return rows + [[f"{r[0]} (apart: not in the geomean)", *r[1:]] for r in (row(n, s) for n, s in still.items())]


def overshoot_rows(summaries: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, s in summaries.items():
        for o in s["overshoot"].values():
            chunks = ", ".join("exact" if q is None else f"{q:.2f}" for q in o["chunk_psnr_y"])
            rows.append([name, f"{o['target']:g}", chunks, _num(o["mean_db"], 2), _num(o["max_db"], 2),
                         str(o["below_floor"])])  # fmt: skip
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_clip(name: str, points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    codecs = list(dict.fromkeys(p.codec for p in points))
    for i, codec in enumerate(codecs):
        mine = [p for p in points if p.codec == codec]
        lossy = sorted((p for p in mine if math.isfinite(p.psnr_y)), key=lambda p: p.bpp)
        colour = f"C{i}"
        if lossy:
            bold = codec == Palstream.name
            ax.plot([p.bpp for p in lossy], [p.psnr_y for p in lossy], "o-" if bold else ".--", color=colour,
                    lw=2 if bold else 1, label=codec)  # fmt: skip
        exact = [p.bpp for p in mine if math.isinf(p.psnr_y)]
        if exact:  # exact luma has no PSNR: a vertical line at the smallest such rate
            ax.axvline(min(exact), color=colour, ls=":", lw=1.5, label=f"{codec} exact luma")
    for t in RD_TARGETS:
        ax.axhline(t, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("bits per luma pixel (log)")
    ax.set_ylabel("Y PSNR (dB)")
    ax.set_title(f"{name}: rate–distortion")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(report: dict, tables: dict, md_path: Path, out: Path) -> None:
    """Replace the report's section of ``md_path``, or insert it as the first section."""
    env = report["environment"]
    heading = f"## {report['section']}"
    lines = [
        heading,
        "",
        "Generated by `benchmarks/codec_rd.py` (see `benchmarks/README.md` for method and definitions).",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Machine: {env['machine']}, {env['cpu_count']} CPU cores (shared), no GPU used; "
        f"torch threads {env['torch_threads']}, numba threads {env['numba_threads']}; "
        f"the external tools use their default threading; load average (1/5/15 min) {env['load_before']} at start, "
        f"{report['load_after']} at end (other work shares the cores, so fps are indicative).",
        f"- palstream codec: {env['palstream_codec']}, commit {env['palstream_commit']}; anchors: {env['ffmpeg']}.",
        f"- Clips: {report['clips_note']}; frames per clip: {report['frames_note']}; "
        f"sweep: {'quick' if report['quick'] else 'full'}. The still scene with sensor noise "
        f"({report['still_noisy_note']}) is reported apart and is in no corpus geomean.",
        "- bpp = coded bits / (luma pixels × frames), container overhead excluded for every codec; PSNR on 8-bit "
        "yuv420p against the source, MSE pooled over the clip; PSNR-YUV from the 6:1:1 weighted MSE. "
        "bpp at 40/45 dB: log(bpp) interpolated along each codec's measured RD frontier, *n/a* outside it "
        "(never extrapolated). Overshoot: each palstream chunk's PSNR-Y minus its target, for every target of "
        "the sweep.",
        f"- Raw data: `{_rel(out / 'codec_rd.json')}`, `{_rel(out / 'codec_rd.csv')}`; plots: "
        f"`{_rel(out)}/rd_<clip>.png`.",
        "",
        "### Done when (issue 16)",
        "",
        markdown_table(*tables["done when"]),
        "",
        "Not judged here: bit-exact decoding of every point beyond the lossless ones, golden bytes and the "
        "bad-input checks (the test suite's).",
        "",
        "### Per clip",
        "",
        markdown_table(*tables["per clip"]),
        "",
        "### PSNR-Y floor overshoot per chunk",
        "",
        markdown_table(*tables["overshoot"]),
        "",
    ]
    for clip in report["clips"]:
        lines += [
            f"### {clip['name']} ({clip['width']}×{clip['height']}, {clip['frames']} frames)",
            "",
            f"![RD {clip['name']}]({_rel(out / clip['plot'])})",
            "",
            markdown_table(*tables[clip["name"]]["interpolated rates"]),
            "",
            markdown_table(*tables[clip["name"]]["ratios"]),
            "",
            "<details><summary>all points</summary>",
            "",
            markdown_table(*tables[clip["name"]]["all points"]),
            "",
            "</details>",
            "",
        ]
        if clip["failures"]:
            lines += [f"Failed points: {'; '.join(clip['failures'])}", ""]
    if report["skipped"]:
        lines += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()), ""]
    section = "\n".join(lines).rstrip("\n") + "\n"

    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:  # a new section goes first, under the title: the newest measurement on top
        first = text.find("\n## ")
        if first < 0:
            text = text.rstrip("\n") + "\n\n"
        start = end = first + 1 if first >= 0 else len(text)
        section += "\n" if first >= 0 else ""
    else:  # the section ends where the next level-2 heading (another benchmark's section) begins
        nxt = text.find("\n## ", start + len(heading))
        end = nxt + 1 if nxt >= 0 else len(text)
        section += "\n" if nxt >= 0 else ""
    md_path.write_text(text[:start] + section + text[end:])


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def environment() -> dict:
    placeholder = "PLACEHOLDER" in Path(palstream.codec.chunk.__file__).read_text()
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "palstream_commit": _git_state(),
        "machine": cpu,
        "load_before": _load(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "palstream_version": getattr(palstream, "__version__", "unknown"),
        "palstream_codec": "zlib PLACEHOLDER (lossless only, not the palette codec)" if placeholder else "palette codec",
        "ffmpeg": _ffmpeg_version(),
        "pngquant": _first_line(["pngquant", "--version"]),
    }


def _git_state() -> str:
    """The checked-out commit, and whether the codec differs from it (the tree is shared while it is written)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "palstream/codec")
    return commit + (" + uncommitted changes in palstream/codec" if dirty else "")


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _ffmpeg_version() -> str:
    try:
        return _first_line([ffmpeg_exe(), "-version"]).split(" Copyright")[0]
    except ToolError as exc:
        return str(exc)


def _first_line(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


# --- command ---------------------------------------------------------------------------------


def show(p: Point) -> None:
    console.print(
        f"  {p.codec:<20} {p.setting:<18} {p.bpp:8.4f} bpp  PSNR-Y {_db(p.psnr_y):>6}  "
        f"enc {_fps(p.frames, p.encode_s):>6} fps  dec {_fps(p.frames, p.decode_s):>7} fps"
    )


def _label(setting) -> str:
    return "lossless" if setting == "lossless" else f"target {float(setting):g} dB"


def main(
    corpus: Annotated[Path, typer.Option(help="Folder of source clips.")] = REPO.parent / "shared" / "corpus",
    clips: Annotated[str, typer.Option(help="Glob of clip file names inside the corpus folder.")] = "*.mkv",
    frames: Annotated[int, typer.Option(min=1, help="Use at most N frames of each clip.")] = 32,
    quick: Annotated[bool, typer.Option(help="Fewer sweep points per codec (for a smoke run).")] = False,
    still_noisy: Annotated[
        bool, typer.Option(help="Also measure the still scene with sensor noise (make_still_noisy), reported apart.")
    ] = True,
    cache: Annotated[Path, typer.Option(help="Folder for the generated still noisy clip.")] = DEFAULT_CACHE,
    out: Annotated[Path, typer.Option(help="Folder for JSON, CSV and PNG results.")] = REPO / "benchmarks" / "results",
    markdown: Annotated[Path, typer.Option(help="Markdown file whose section (--section) is regenerated.")] = (
        REPO / "BENCHMARKS.md"
    ),
    section: Annotated[
        str | None, typer.Option(help="Heading of that section (default 'Codec RD vs anchors, N frames (issue 16)').")
    ] = None,
    threads: Annotated[
        int, typer.Option(min=1, help="torch and numba threads for palstream and the naive codec (speed check: 1).")
    ] = 1,
    pyramid: Annotated[bool, typer.Option(help="Encode palstream with EncoderConfig(pyramid=True).")] = False,
) -> None:
    """Measure palstream and the anchors on every clip; print and write the results and issue 16's checks."""
    # On an oversubscribed machine torch's spinning OpenMP workers can be 10x slower than 1 thread.
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    paths = sorted(p for p in corpus.glob("*") if fnmatch.fnmatch(p.name, clips)) if corpus.is_dir() else []
    if not paths:
        print(f"error: no clip matches {clips!r} in {corpus}; pass --corpus DIR and/or --clips GLOB", file=sys.stderr)
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    ours = Palstream(pyramid)
    codecs: list[Codec] = [cls() for cls in ANCHORS] + [ours]
    skipped = {c.name: reason for c in codecs if (reason := c.missing())}
    for name, reason in skipped.items():
        console.print(f"[yellow]skipping {name}: {reason}[/yellow]")
    codecs = [c for c in codecs if c.name not in skipped]

    still_note = "not measured: --no-still-noisy"
    jobs = [(path, True) for path in paths]
    if still_noisy:
        try:
            still_path = make_still_noisy(corpus, cache)
            jobs.append((still_path, False))
            still_note = f"`{still_path.stem}`, made by `benchmarks/make_still_noisy.py`"
        except (PalstreamError, ToolError) as exc:
            still_note = f"could not be made: {exc}"
            skipped["still noisy scene"] = still_note
            console.print(f"[red]still noisy scene: {still_note}[/red]")

    env = environment()
    one_thread = env["torch_threads"] == 1 and env["numba_threads"] == 1
    report_clips, all_points, tables = [], [], {}
    corpus_summaries: dict[str, dict] = {}
    still_summaries: dict[str, dict] = {}
    points_by_clip: dict[str, list[Point]] = {}

    def build_report(done: bool) -> tuple[dict, dict]:
        summaries = corpus_summaries | still_summaries
        checks = done_when(corpus_summaries, still_summaries, one_thread)
        tables["done when"] = (DONE_HEADER, done_rows(checks))
        tables["per clip"] = (CLIP_HEADER, clip_summary_rows(corpus_summaries, still_summaries, points_by_clip))
        tables["overshoot"] = (OVERSHOOT_HEADER, overshoot_rows(summaries))
        report = {
            "command": " ".join([".venv/bin/python -m benchmarks.codec_rd", *map(shlex.quote, sys.argv[1:])]),
            "section": section or f"Codec RD vs anchors, {frames} frames (issue 16)",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "environment": env,
            "load_after": _load(),
            "quick": quick,
            "frames_note": f"first {frames}",
            "clips_note": f"{len(corpus_summaries)} of {len(paths)} corpus clips"
            + ("" if done else " (run still going or interrupted)"),
            "still_noisy_note": still_note,
            "skipped": skipped,
            "clips": report_clips,
            "summaries": summaries,
            "in_corpus_geomean": list(corpus_summaries),
            "done_when": checks,
        }
        return report, tables

    warmed = False
    for path, in_corpus in jobs:
        with tempfile.TemporaryDirectory(prefix="codec_rd_") as tmp:
            work = Path(tmp)
            try:
                clip = load_clip(path, frames, work)
            except PalstreamError as exc:
                skipped[path.name] = f"cannot read: {exc}"
                console.print(f"[red]{path.name}: cannot read ({exc}); skipped[/red]")
                continue
            console.rule(f"{clip.name}: {clip.frames.width}×{clip.frames.height}, {len(clip.frames)} frames")
            if not warmed:
                warmed = True
                try:
                    ours.warm_up(clip)
                except Exception as exc:  # the timed runs will report the same failure per point
                    console.print(f"[red]palstream warm-up failed: {one_line(exc)}[/red]")
            points, failures = [], []
            for codec in codecs:
                for setting in codec.settings(quick):
                    result = run_codec(codec, clip, setting, work)
                    if isinstance(result, str):
                        failures.append(result)
                        console.print(f"[red]{result}[/red]")
                        continue
                    points.append(result)
                    show(result)
        summary = summarise(clip, points)
        (corpus_summaries if in_corpus else still_summaries)[clip.name] = summary
        points_by_clip[clip.name] = points
        all_points += [(clip.name, p) for p in points]
        plot = f"rd_{clip.name}.png"
        plot_clip(clip.name, points, out / plot)
        tables[clip.name] = {
            "all points": (POINT_HEADER, clip_rows(points)),
            "interpolated rates": (RATE_HEADER, rate_rows(summary)),
            "ratios": (RATIO_HEADER, ratio_rows(summary)),
        }
        for title, (header, rows) in tables[clip.name].items():
            print_table(f"{clip.name}: {title}", header, rows)
        report_clips.append({
            "name": clip.name, "width": clip.frames.width, "height": clip.frames.height,
            "frames": len(clip.frames), "fps": str(clip.fps), "plot": plot, "in_corpus_geomean": in_corpus,
            "points": [p.to_dict() for p in points], "failures": failures,
        })  # fmt: skip

        # Written after every clip, so that an interrupted run still leaves what it measured.
        write_outputs(*build_report(done=False), all_points, out, markdown)

    if not corpus_summaries:
        print("error: no corpus clip could be read; check the corpus files", file=sys.stderr)
        raise typer.Exit(1)
    report, tables = build_report(done=True)
    write_outputs(report, tables, all_points, out, markdown)
    print_table("Per clip (issue 16)", *tables["per clip"])
    print_table("PSNR-Y floor overshoot per chunk", *tables["overshoot"])
    print_table("Done when (issue 16)", *tables["done when"])
    console.print(f"wrote {_rel(out / 'codec_rd.json')}, codec_rd.csv, rd_*.png and {_rel(markdown)}")


def write_outputs(report: dict, tables: dict, all_points: list[tuple[str, Point]], out: Path, markdown: Path) -> None:
    (out / "codec_rd.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with open(out / "codec_rd.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["clip", "codec", "setting", "bits", "bpp", "psnr_y", "psnr_u", "psnr_v", "psnr_yuv", "lossless",
                  "encode_s", "decode_s", "encode_fps", "decode_fps"]  # fmt: skip
        writer.writerow(header)
        for name, p in all_points:
            d = p.to_dict()
            writer.writerow([name] + [d[h] for h in header[1:]])
    write_markdown(report, tables, markdown, out)


if __name__ == "__main__":
    typer.run(main)
