"""Codec rate–distortion and speed benchmark: palstream against today's tools (issue 2, item 11).

One command measures, per corpus clip and in the same run, palstream (several
``--target-psnr`` and ``--lossless``) beside FFV1, x265, x264, FFmpeg GIF, pngquant and the
naive k-means + zstd palette codec; prints the tables and the "Done when" checks; writes
``codec_rd.json``, ``codec_rd.csv`` and one RD plot per clip; and regenerates the
"Codec RD (issue 2)" section of ``BENCHMARKS.md``::

    .venv/bin/python -m benchmarks.codec_rd              # full run over ../shared/corpus
    .venv/bin/python -m benchmarks.codec_rd --quick --frames 8
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
from benchmarks.anchors import ANCHORS, Clip, Codec, Point, ToolError, measure
from palstream.codec import DEFAULT_TARGET_PSNR, EncoderConfig, decode_chunk, encode_chunk
from palstream.codec.config import PSNR_RANGE
from palstream.errors import PalstreamError
from palstream.frames import Frames
from palstream.io import probe, read_frames
from palstream.palettes import create_palette_generator

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Codec RD (issue 2)"
RD_TARGETS = (40.0, 45.0)  # dB PSNR-Y at which bpp is interpolated and compared
PALETTE_RATIO_MAX = 1 / 3  # palstream bits / palette-tool bits at the tool's PSNR-Y
FFV1_RATIO_AT_45_MAX = 1 / 3
X265_GEOMEAN_MAX = 4.0
SPEED_SIZE = (640, 360)  # the resolution the speed targets are stated for
ENCODE_FPS_MIN, DECODE_FPS_MIN = 10.0, 100.0

console = Console() if sys.stdout.isatty() else Console(width=160)  # logs keep table rows on one line


class Palstream(Codec):
    """palstream through the library: ``encode_chunk`` per GOP chunk, ``decode_chunk`` back."""

    name, family = "palstream", "palstream"

    def __init__(self):
        self._generator = None

    def missing(self):
        return None

    def settings(self, quick):
        # Low targets bracket 40 dB from below: the rate control overshoots its floor (by ~6 dB on screen content).
        targets = {32.0, DEFAULT_TARGET_PSNR} if quick else {30.0, 36.0, 40.0, DEFAULT_TARGET_PSNR, 50.0}
        return sorted(targets) + ["lossless"]

    def _config(self, setting):
        return EncoderConfig(lossless=True) if setting == "lossless" else EncoderConfig(target_psnr=float(setting))

    def warm_up(self, clip: Clip) -> None:
        """Encode and decode a small crop once, so JIT compilation is not timed."""
        f = clip.frames[0:2]
        crop = Frames(f.y[:, :64, :64].copy(), f.u[:, :32, :32].copy(), f.v[:, :32, :32].copy())
        for setting in ("lossless", 40.0):
            decode_chunk(encode_chunk(crop, self._config(setting), self._get_generator()).payload)

    def _get_generator(self):
        if self._generator is None:
            self._generator = create_palette_generator("kmeans")
        return self._generator

    def run(self, clip, setting, work):
        config = self._config(setting)
        generator = self._get_generator()
        chunks = [clip.frames[a : a + config.gop] for a in range(0, len(clip.frames), config.gop)]
        start = time.perf_counter()
        payloads = [encode_chunk(chunk, config, generator).payload for chunk in chunks]
        enc = time.perf_counter() - start
        start = time.perf_counter()
        decoded = Frames.concatenate([decode_chunk(p) for p in payloads])
        dec = time.perf_counter() - start
        bits = 8 * sum(len(p) for p in payloads)
        quality = measure(clip.frames, decoded)
        return Point(self.name, _label(setting), bits, clip.luma_pixels, len(clip.frames), *quality, enc, dec)


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


def summarise(clip: Clip, points: list[Point], matched: dict[str, tuple[Point, Point]]) -> dict:
    """Per-clip interpolated rates, ratios and the issue's "Done when" checks."""
    by_codec: dict[str, list[Point]] = {}
    for p in points:
        by_codec.setdefault(p.codec, []).append(p)
    families = {cls.name: cls.family for cls in ANCHORS} | {Palstream.name: Palstream.family}
    palette_tools = [c for c in by_codec if families.get(c) == "palette"]
    ours = by_codec.get(Palstream.name, [])
    ffv1 = next((p.bpp for p in by_codec.get("FFV1", []) if p.lossless), None)
    lossless = next((p for p in ours if p.setting == "lossless"), None)

    rates = {c: {f"{t:g}": bpp_at(pts, t) for t in RD_TARGETS} for c, pts in by_codec.items()}
    ratios = {}
    for t in RD_TARGETS:
        key = f"{t:g}"
        best = [rates[c][key] for c in palette_tools if rates[c][key] is not None]
        ratios[key] = {
            "x265": ratio(rates.get(Palstream.name, {}).get(key), rates.get("x265", {}).get(key)),
            "best_palette_tool": ratio(rates.get(Palstream.name, {}).get(key), min(best) if best else None),
            "ffv1": ratio(rates.get(Palstream.name, {}).get(key), ffv1),
        }

    checks = {}
    for tool, (theirs, mine) in matched.items():
        r = mine.bpp / theirs.bpp
        reached = mine.psnr_y >= theirs.psnr_y
        checks[f"≤ 1/3 of {tool} at its PSNR-Y"] = {
            "status": "PASS" if r <= PALETTE_RATIO_MAX and reached else "FAIL",
            "detail": f"{tool} {theirs.setting}: {theirs.bpp:.4f} bpp @ {theirs.psnr_y:.2f} dB; palstream "
            f"{mine.setting}: {mine.bpp:.4f} bpp @ {_db(mine.psnr_y)} → ratio {r:.3f}"
            + ("" if reached else " (target not reached)"),
            "ratio": r,
        }
    r45 = ratios["45"]["ffv1"]
    checks["≤ 1/3 of FFV1 at 45 dB"] = {
        "status": verdict(r45, FFV1_RATIO_AT_45_MAX),
        "detail": f"palstream {_num(rates.get(Palstream.name, {}).get('45'))} bpp @ 45 dB, FFV1 {_num(ffv1)} bpp "
        f"→ ratio {_num(r45, 3)}",
        "ratio": r45,
    }
    if lossless is not None:
        rl = ratio(lossless.bpp, ffv1)
        status = verdict(rl, 1.0) if lossless.lossless else "FAIL"
        checks["--lossless ≤ FFV1"] = {
            "status": status,
            "detail": f"palstream {lossless.bpp:.4f} bpp ({'exact' if lossless.lossless else 'NOT exact'}), "
            f"FFV1 {_num(ffv1)} bpp → ratio {_num(rl, 3)}",
            "ratio": rl,
        }
    if (clip.frames.width, clip.frames.height) == SPEED_SIZE:
        default = next((p for p in ours if p.setting == _label(DEFAULT_TARGET_PSNR)), None)
        if default is not None:
            enc_fps, dec_fps = default.frames / default.encode_s, default.frames / default.decode_s
            checks["speed at default quality"] = {
                "status": "PASS" if enc_fps >= ENCODE_FPS_MIN and dec_fps >= DECODE_FPS_MIN else "FAIL",
                "detail": f"encode {enc_fps:.2f} fps (≥ {ENCODE_FPS_MIN:g}), decode {dec_fps:.1f} fps "
                f"(≥ {DECODE_FPS_MIN:g}) at {default.setting}",
            }
    return {"bpp_at": rates, "ratios": ratios, "checks": checks, "ffv1_bpp": ffv1}


def corpus_checks(summaries: list[tuple[str, dict]]) -> dict:
    """Geometric mean over clips of palstream bpp / x265 bpp at each PSNR-Y target."""
    out = {}
    for t in RD_TARGETS:
        key = f"{t:g}"
        per_clip = {name: s["ratios"][key]["x265"] for name, s in summaries}
        known = [r for r in per_clip.values() if r is not None]
        complete = bool(known) and len(known) == len(per_clip)
        geomean = float(np.exp(np.mean(np.log(known)))) if known else None
        out[f"geomean palstream/x265 at {key} dB ≤ {X265_GEOMEAN_MAX:g}"] = {
            "status": verdict(geomean, X265_GEOMEAN_MAX) if complete else "n/a",
            "detail": f"geomean {_num(geomean, 3)} over {len(known)}/{len(per_clip)} clips"
            + ("" if complete else " (some clips have no interpolated ratio)"),
            "geomean": geomean,
            "per_clip": per_clip,
        }
    return out


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
RATIO_HEADER = ["ratio", "@ 40 dB", "@ 45 dB"]


def rate_rows(points: list[Point], summary: dict) -> list[list[str]]:
    rows = []
    for codec, rates in summary["bpp_at"].items():
        exact = [p.bpp for p in points if p.codec == codec and p.lossless]
        rows.append([codec, _num(rates["40"]), _num(rates["45"]), _num(min(exact)) if exact else "–"])
    return rows


def ratio_rows(summary: dict) -> list[list[str]]:
    return [
        [f"palstream / {label}", _num(summary["ratios"]["40"][ref], 3), _num(summary["ratios"]["45"][ref], 3)]
        for ref, label in (("x265", "x265"), ("best_palette_tool", "best palette tool"), ("ffv1", "FFV1"))
    ]


CHECK_HEADER = ["clip", "check", "result", "numbers"]


def check_rows(summaries: dict, corpus_result: dict) -> list[list[str]]:
    rows = [[name, k, c["status"], c["detail"]] for name, s in summaries.items() for k, c in s["checks"].items()]
    return rows + [["corpus", k, c["status"], c["detail"]] for k, c in corpus_result.items()]


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
    """Replace (or append) the "Codec RD (issue 2)" section of ``md_path``."""
    env = report["environment"]
    lines = [
        SECTION,
        "",
        "Generated by `benchmarks/codec_rd.py` (see `benchmarks/README.md` for method and definitions).",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['date']}",
        f"- Machine: {env['machine']}, {env['cpu_count']} CPU cores (shared), no GPU used; "
        f"torch threads {env['torch_threads']}, numba threads {env['numba_threads']}; "
        f"the external tools use their default threading; load average (1/5/15 min) {env['load_before']} at start, "
        f"{report['load_after']} at end (other work shares the cores, so fps are indicative).",
        f"- palstream codec: {env['palstream_codec']}, commit {env['palstream_commit']}",
        f"- Clips: {report['clips_note']}; frames per clip: {report['frames_note']}; "
        f"sweep: {'quick' if report['quick'] else 'full'}.",
        "- bpp = coded bits / (luma pixels × frames), container overhead excluded for every codec; PSNR on 8-bit "
        "yuv420p against the source, MSE pooled over the clip; PSNR-YUV from the 6:1:1 weighted MSE. "
        "bpp at 40/45 dB: log(bpp) interpolated along each codec's measured RD frontier, *n/a* outside it "
        "(never extrapolated).",
        f"- Raw data: `{_rel(out / 'codec_rd.json')}`, `{_rel(out / 'codec_rd.csv')}`; plots: "
        f"`{_rel(out)}/rd_<clip>.png`.",
        "",
        "### Done-when checks",
        "",
    ]
    lines += [markdown_table(CHECK_HEADER, check_rows(report["summaries"], report["corpus_checks"])), ""]
    for key, check in report["corpus_checks"].items():
        per_clip = ", ".join(f"{n} {_num(r, 3)}" for n, r in check["per_clip"].items())
        lines.append(f"- {key}: per clip {per_clip}")
    lines.append("")
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
    section = "\n".join(lines)

    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        # The section ends where the next level-2 heading (another benchmark's section) begins.
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt >= 0 else "")
    md_path.write_text(text.rstrip("\n") + "\n")


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
        "ffmpeg": _first_line(["ffmpeg", "-version"]),
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


def _first_line(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


# --- command ---------------------------------------------------------------------------------


def matched_runs(ours: Palstream, clip: Clip, points: list[Point], work: Path, failures: list[str]):
    """Encode palstream at the PSNR-Y each palette tool reached at its best setting (the "Done when" rule)."""
    matched = {}
    runs = {p.setting: p for p in points if p.codec == ours.name}
    for tool in (cls.name for cls in ANCHORS if cls.family == "palette"):
        theirs = [p for p in points if p.codec == tool and math.isfinite(p.psnr_y)]
        if not theirs:
            continue
        best = max(theirs, key=lambda p: p.psnr_y)
        # Targets below the codec's range over-deliver quality (a stricter test); above it, --lossless.
        # Rounded up to 0.01 dB so that reaching the target means reaching the tool's PSNR-Y.
        target = "lossless" if best.psnr_y > PSNR_RANGE[1] else math.ceil(max(best.psnr_y, PSNR_RANGE[0]) * 100) / 100
        result = runs.get(_label(target)) or run_codec(ours, clip, target, work)
        if isinstance(result, str):
            failures.append(result)
            console.print(f"[red]{result}[/red]")
            continue
        if _label(target) not in runs:
            runs[result.setting] = result
            result.extra["matched_to"] = f"{tool} {best.setting}"
            show(result)
        matched[tool] = (best, result)
    return matched


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
    frames: Annotated[int | None, typer.Option(min=1, help="Use at most N frames of each clip.")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer sweep points per codec (for a smoke run).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for JSON, CSV and PNG results.")] = REPO / "benchmarks" / "results",
    markdown: Annotated[Path, typer.Option(help="Markdown file whose 'Codec RD (issue 2)' section is regenerated.")] = (
        REPO / "BENCHMARKS.md"
    ),
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch and numba threads for palstream and the naive codec (default: all).")
    ] = None,
) -> None:
    """Measure palstream and the anchors on every clip; print and write the results."""
    if threads:
        # On an oversubscribed machine torch's spinning OpenMP workers can be 10x slower than 1 thread.
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    paths = sorted(p for p in corpus.glob("*") if fnmatch.fnmatch(p.name, clips)) if corpus.is_dir() else []
    if not paths:
        print(f"error: no clip matches {clips!r} in {corpus}; pass --corpus DIR and/or --clips GLOB", file=sys.stderr)
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    ours = Palstream()
    codecs: list[Codec] = [cls() for cls in ANCHORS] + [ours]
    skipped = {c.name: reason for c in codecs if (reason := c.missing())}
    for name, reason in skipped.items():
        console.print(f"[yellow]skipping {name}: {reason}[/yellow]")
    codecs = [c for c in codecs if c.name not in skipped]

    env = environment()
    report_clips, summaries, all_points, tables = [], [], [], {}

    def build_report(done: bool) -> dict:
        return {
            "command": " ".join([".venv/bin/python -m benchmarks.codec_rd", *map(shlex.quote, sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "environment": env,
            "load_after": _load(),
            "quick": quick,
            "frames_note": f"first {frames}" if frames else "all",
            "clips_note": f"{len(summaries)} of {len(paths)} clips" + ("" if done else " (run still going or interrupted)"),
            "skipped": skipped,
            "clips": report_clips,
            "summaries": dict(summaries),
            "corpus_checks": corpus_checks(summaries),
        }

    warmed = False
    for path in paths:
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
            matched = matched_runs(ours, clip, points, work, failures)
            points += list({id(m): m for _, m in matched.values() if all(m is not p for p in points)}.values())
        summary = summarise(clip, points, matched)
        summaries.append((clip.name, summary))
        all_points += [(clip.name, p) for p in points]
        plot = f"rd_{clip.name}.png"
        plot_clip(clip.name, points, out / plot)
        tables[clip.name] = {
            "all points": (POINT_HEADER, clip_rows(points)),
            "interpolated rates": (RATE_HEADER, rate_rows(points, summary)),
            "ratios": (RATIO_HEADER, ratio_rows(summary)),
        }
        for title, (header, rows) in tables[clip.name].items():
            print_table(f"{clip.name}: {title}", header, rows)
        report_clips.append({
            "name": clip.name, "width": clip.frames.width, "height": clip.frames.height,
            "frames": len(clip.frames), "fps": str(clip.fps), "plot": plot,
            "points": [p.to_dict() for p in points], "failures": failures,
        })  # fmt: skip

        # Written after every clip, so that an interrupted run still leaves what it measured.
        write_outputs(build_report(done=False), tables, all_points, out, markdown)

    if not summaries:
        print("error: no clip could be read; check the corpus files", file=sys.stderr)
        raise typer.Exit(1)
    report = build_report(done=True)
    write_outputs(report, tables, all_points, out, markdown)
    print_table("Done-when checks (issue 2)", CHECK_HEADER, check_rows(report["summaries"], report["corpus_checks"]))
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
