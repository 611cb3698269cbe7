"""Memory and time of archiving a file's other streams (issue 17): they stream, never held whole.

Builds sources of one second of 64x48 video and N minutes of stereo 16-bit PCM at 48 kHz (the
largest audio an archivist keeps as is), then runs ``palstream encode --lossless``, ``verify``
and ``decode out.mkv`` on each in a child process and reads the child's peak RSS (``wait4``).
Peak memory that does not grow with the audio is the point. Run from the repository root::

    .venv/bin/python -m benchmarks.kept_streams --minutes 10 30

Prints a table and writes ``benchmarks/results/kept_streams.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

REPO = Path(__file__).resolve().parent.parent
PALSTREAM = [sys.executable, "-c", "from palstream.cli import main; main()", "-q"]


def _measure(args: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (MiB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(args)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(args[3:])} failed with exit status {child.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss // 1024


def _audio_digest(path: Path) -> str:
    with av.open(str(path)) as container:
        digest = hashlib.sha256()
        for packet in container.demux(container.streams.audio[0]):
            digest.update(bytes(packet))
        return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 30], help="PCM durations (default 10 30)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kept_streams.json")
    args = parser.parse_args(argv)
    from imageio_ffmpeg import get_ffmpeg_exe

    rows = []
    with tempfile.TemporaryDirectory(prefix="kept-streams-") as tmp:
        for minutes in args.minutes:
            source, archive, out = Path(tmp, "source.mkv"), Path(tmp, "a.zarr"), Path(tmp, "out.mkv")
            subprocess.run(
                [get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                 "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1",
                 "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={minutes * 60}",
                 "-map", "0:v", "-map", "1:a", "-c:v", "ffv1", "-c:a", "pcm_s16le", "-ac", "2", str(source)],
                check=True,
            )  # fmt: skip
            row = {"minutes": minutes, "source_mib": round(source.stat().st_size / 2**20, 1)}
            for step, command in (
                ("encode", ["encode", str(source), str(archive), "--lossless", "--gop", "10"]),
                ("verify", ["verify", str(archive)]),
                ("decode", ["decode", str(archive), str(out)]),
            ):
                seconds, peak = _measure([*PALSTREAM, *command])
                row[f"{step}_seconds"], row[f"{step}_peak_mib"] = round(seconds, 2), peak
            row["audio_identical"] = _audio_digest(out) == _audio_digest(source)
            rows.append(row)
            for path in (source, out):
                path.unlink()
            subprocess.run(["rm", "-rf", str(archive)], check=True)
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python -m benchmarks.kept_streams", *sys.argv[1:]]), "rows": rows}, indent=2) + "\n")
    return 0 if all(row["audio_identical"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
