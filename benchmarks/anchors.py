"""The codecs palstream is measured against, one small class each (CompressAI ``utils/bench`` style).

Every codec takes a ``Clip`` (source frames decoded once, plus their raw yuv420p file) and a
setting, and returns a ``Point``: coded bits, quality measured on the decoded 8-bit yuv420p
frames against the source, and wall-clock times. Coded bits exclude container overhead for
every codec, so sizes compare bitstreams, not file formats:

- FFV1, SVT-AV1: the packets' payloads (Matroska, IVF) plus the codec's extradata.
- x264 / x265 (and x264 ``-qp 0``, lossless): the Annex B elementary stream without SEI NAL
  units (x264/x265 write their option strings there; a decoder does not need them).
- GIF: the whole file (the GIF format has no separable container; its framing is a few
  dozen bytes per frame).
- pngquant: the PLTE, tRNS and IDAT chunk payloads of each frame's PNG (palette and
  compressed indices), without the PNG signature, IHDR and chunk framing.
- naive k-means + zstd and palstream: their payload bytes.

Times are wall-clock seconds of the whole tool invocation (process start included for the
external tools), so they are indicative; palstream's are measured in-process.

The external tools run through the static FFmpeg of the ``imageio-ffmpeg`` package (libx264,
libx265, libsvtav1, ffv1, gif, png); ``IMAGEIO_FFMPEG_EXE`` points it at another binary.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

from benchmarks import naive
from palstream.frames import Frames
from palstream.palettes import create_palette_generator

PNGQUANT = "pngquant"


class ToolError(RuntimeError):
    """An external tool is missing or failed; the message is one line."""


@cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary every external codec runs through (``imageio-ffmpeg``'s, or ``IMAGEIO_FFMPEG_EXE``)."""
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise ToolError(f"no ffmpeg binary ({exc}); pip install imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE") from None


@dataclass(frozen=True)
class Clip:
    """One source clip, decoded once.

    Parameters
    ----------
    name : str
        File stem, used in tables.
    frames : Frames
        The source frames, 8-bit yuv420p: the reference for every codec.
    fps : Fraction
        Frame rate (for the tools that want one; it does not change any size here).
    raw : Path
        ``frames`` as a raw yuv420p file, the input handed to external tools.
    """

    name: str
    frames: Frames
    fps: Fraction
    raw: Path

    @property
    def luma_pixels(self) -> int:
        """Luma samples of the whole clip: the denominator of bpp."""
        return self.frames.y.size

    def raw_input_args(self) -> list[str]:
        """ffmpeg input options that read ``raw``."""
        size = f"{self.frames.width}x{self.frames.height}"
        return ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", size, "-r", str(self.fps), "-i", str(self.raw)]


@dataclass
class Point:
    """One operating point of one codec on one clip."""

    codec: str
    setting: str
    bits: int
    luma_pixels: int
    frames: int
    psnr_y: float  # dB, math.inf when every luma sample is exact
    psnr_u: float
    psnr_v: float
    psnr_yuv: float  # dB from the 6:1:1 weighted MSE, see ``measure``
    encode_s: float
    decode_s: float
    extra: dict = field(default_factory=dict)

    @property
    def bpp(self) -> float:
        return self.bits / self.luma_pixels

    @property
    def lossless(self) -> bool:
        """Every Y, Cb and Cr sample equals the source's."""
        return math.isinf(self.psnr_yuv)

    def to_dict(self) -> dict:
        finite = lambda x: None if math.isinf(x) else round(x, 4)  # noqa: E731  (JSON has no inf)
        return {
            "codec": self.codec,
            "setting": self.setting,
            "bits": self.bits,
            "bpp": round(self.bpp, 6),
            "frames": self.frames,
            "psnr_y": finite(self.psnr_y),
            "psnr_u": finite(self.psnr_u),
            "psnr_v": finite(self.psnr_v),
            "psnr_yuv": finite(self.psnr_yuv),
            "lossless": self.lossless,
            "encode_s": round(self.encode_s, 4),
            "decode_s": round(self.decode_s, 4),
            "encode_fps": round(self.frames / self.encode_s, 3) if self.encode_s > 0 else None,
            "decode_fps": round(self.frames / self.decode_s, 3) if self.decode_s > 0 else None,
            **self.extra,
        }


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def measure(source: Frames, decoded: Frames) -> tuple[float, float, float, float]:
    """PSNR-Y, -U, -V and -YUV in dB over the whole clip.

    The MSE is pooled over all frames (not an average of per-frame PSNRs); PSNR-YUV is
    ``10·log10(255² / ((6·MSE_Y + MSE_U + MSE_V) / 8))``. Identical planes give ``inf``.
    """
    if decoded.y.shape != source.y.shape or decoded.u.shape != source.u.shape:
        raise ToolError(f"decoded frames are {decoded.y.shape}, the source is {source.y.shape}")
    mse = [float(np.mean((getattr(source, n).astype(np.int32) - getattr(decoded, n)) ** 2)) for n in "yuv"]
    yuv = (6 * mse[0] + mse[1] + mse[2]) / 8
    return _psnr(mse[0]), _psnr(mse[1]), _psnr(mse[2]), _psnr(yuv)


def read_raw(path: Path, width: int, height: int) -> Frames:
    """Frames from a raw yuv420p file."""
    data = np.fromfile(path, np.uint8)
    cw, ch = (width + 1) // 2, (height + 1) // 2
    per = width * height + 2 * cw * ch
    if data.size == 0 or data.size % per:
        raise ToolError(f"{path.name}: {data.size} bytes is not a whole number of {width}x{height} yuv420p frames")
    data = data.reshape(-1, per)
    y = data[:, : width * height].reshape(-1, height, width)
    u = data[:, width * height : width * height + cw * ch].reshape(-1, ch, cw)
    v = data[:, width * height + cw * ch :].reshape(-1, ch, cw)
    return Frames(y.copy(), u.copy(), v.copy())


def run_tool(args: list[str]) -> float:
    """Run a command; return its wall time in seconds, or raise ToolError with its last error line."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolError(f"{args[0]} is not installed; install it (Debian: apt-get install {args[0]})") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise ToolError(f"{Path(args[0]).name} exited with {proc.returncode}: {lines[-1]}")
    return time.perf_counter() - start


def ffmpeg(*args: str) -> float:
    return run_tool([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args])


def decode_with_ffmpeg(clip: Clip, coded: Path, work: Path) -> tuple[Frames, float]:
    """Decode ``coded`` to yuv420p (BT.601 limited range for RGB formats, ffmpeg's default)."""
    out = work / "decoded.yuv"
    seconds = ffmpeg("-i", str(coded), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "yuv420p", str(out))
    frames = read_raw(out, clip.frames.width, clip.frames.height)
    out.unlink()
    if len(frames) != len(clip.frames):
        raise ToolError(f"{coded.name} decodes to {len(frames)} frames, the source has {len(clip.frames)}")
    return frames, seconds


def _point(codec: str, setting: str, clip: Clip, bits: int, decoded: Frames, enc: float, dec: float, **extra) -> Point:
    return Point(codec, setting, bits, clip.luma_pixels, len(clip.frames), *measure(clip.frames, decoded), enc, dec, extra)


class Codec:
    """One codec under test: a name, its settings sweep, and how to run one setting.

    Subclasses set ``name`` and ``family`` (``"lossless"``, ``"video"`` or ``"palette"``)
    and implement ``settings`` and ``run``.
    """

    name: str = ""
    family: str = ""
    tools: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """Why this codec cannot run here (one line), or None when it can."""
        for tool in self.tools:
            if shutil.which(tool) is None:
                return f"{tool} not found on PATH; install it (Debian: apt-get install {tool})"
        return None

    def settings(self, quick: bool) -> list:
        raise NotImplementedError

    def run(self, clip: Clip, setting, work: Path) -> Point:
        raise NotImplementedError


def _ffmpeg_has_encoder(encoder: str) -> str | None:
    try:
        exe = ffmpeg_exe()
    except ToolError as exc:
        return str(exc)
    listing = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    if not re.search(rf"^\s*\S+\s+{re.escape(encoder)}\s", listing, re.M):
        return f"{exe} has no {encoder} encoder; set IMAGEIO_FFMPEG_EXE to an ffmpeg built with it"
    return None


class FFV1(Codec):
    """FFV1 version 3 lossless, the archival standard (``-c:v ffv1 -level 3``)."""

    name, family = "FFV1", "lossless"

    def missing(self):
        return _ffmpeg_has_encoder("ffv1")

    def settings(self, quick):
        return ["level 3"]

    def run(self, clip, setting, work):
        coded = work / "ffv1.mkv"
        enc = ffmpeg(*clip.raw_input_args(), "-c:v", "ffv1", "-level", "3", str(coded))
        bits = 8 * _packet_bytes(coded)
        decoded, dec = decode_with_ffmpeg(clip, coded, work)
        return _point(self.name, setting, clip, bits, decoded, enc, dec)


def _packet_bytes(path: Path) -> int:
    """Payload bytes of a file's video packets plus its codec extradata (no container framing)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        extradata = stream.codec_context.extradata or b""
        return len(extradata) + sum(packet.size for packet in container.demux(stream))


def _annexb_bytes_without_sei(path: Path, hevc: bool) -> int:
    """Bytes of an Annex B stream, less its SEI NAL units (encoder info strings)."""
    data = path.read_bytes()
    starts = [m.start() for m in re.finditer(b"\x00\x00\x01", data)]
    sei = 0
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        header = data[s + 3]
        kind = (header >> 1) & 0x3F if hevc else header & 0x1F
        if (hevc and kind in (39, 40)) or (not hevc and kind == 6):
            sei += end - s
    return len(data) - sei


class _X26x(Codec):
    """x264/x265 ``-preset medium``, CRF sweep, yuv420p 8-bit."""

    encoder = ""
    hevc = False
    crfs = (8, 12, 16, 20, 24, 28, 32, 36, 40)  # 8: camera content needs it to reach 45 dB
    quick_crfs = (16, 28, 40)

    def missing(self):
        return _ffmpeg_has_encoder(self.encoder)

    def settings(self, quick):
        return list(self.quick_crfs if quick else self.crfs)

    def run(self, clip, crf, work):
        coded = work / ("out.hevc" if self.hevc else "out.h264")
        quiet = ["-x265-params", "log-level=error"] if self.hevc else []
        enc = ffmpeg(
            *clip.raw_input_args(), "-c:v", self.encoder, "-preset", "medium", "-crf", str(crf),
            "-pix_fmt", "yuv420p", *quiet, "-f", "hevc" if self.hevc else "h264", str(coded),
        )  # fmt: skip
        bits = 8 * _annexb_bytes_without_sei(coded, self.hevc)
        decoded, dec = decode_with_ffmpeg(clip, coded, work)
        return _point(self.name, f"crf {crf}", clip, bits, decoded, enc, dec)


class X265(_X26x):
    name, family, encoder, hevc = "x265", "video", "libx265", True


class X264(_X26x):
    name, family, encoder = "x264", "video", "libx264"


class X264Lossless(Codec):
    """x264 ``-preset medium -qp 0``: lossless H.264 in the source's pixel format (yuv420p), an archivists' anchor."""

    name, family = "x264 qp0", "lossless"

    def missing(self):
        return _ffmpeg_has_encoder("libx264")

    def settings(self, quick):
        return ["qp 0"]

    def run(self, clip, setting, work):
        coded = work / "lossless.h264"
        enc = ffmpeg(*clip.raw_input_args(), "-c:v", "libx264", "-preset", "medium", "-qp", "0",
                     "-pix_fmt", "yuv420p", "-f", "h264", str(coded))  # fmt: skip
        bits = 8 * _annexb_bytes_without_sei(coded, hevc=False)
        decoded, dec = decode_with_ffmpeg(clip, coded, work)
        return _point(self.name, setting, clip, bits, decoded, enc, dec)


class SVTAV1(Codec):
    """SVT-AV1 ``-preset 8``, CRF sweep, yuv420p 8-bit, IVF packets counted."""

    name, family = "SVT-AV1", "video"

    def missing(self):
        return _ffmpeg_has_encoder("libsvtav1")

    def settings(self, quick):
        return [24, 40, 56] if quick else [16, 24, 32, 40, 48, 56]

    def run(self, clip, crf, work):
        coded = work / "out.ivf"
        enc = ffmpeg(*clip.raw_input_args(), "-c:v", "libsvtav1", "-preset", "8", "-crf", str(crf),
                     "-pix_fmt", "yuv420p", "-f", "ivf", str(coded))  # fmt: skip
        bits = 8 * _packet_bytes(coded)
        decoded, dec = decode_with_ffmpeg(clip, coded, work)
        return _point(self.name, f"crf {crf}", clip, bits, decoded, enc, dec)


class GIF(Codec):
    """FFmpeg GIF, one palette per frame (``palettegen=stats_mode=single``, ``paletteuse=new=1:dither=none``).

    GIF is 8-bit RGB with up to 256 colours: frames go yuv420p → RGB → palette → GIF and are
    measured after converting back to yuv420p. The sweep is palettegen's ``max_colors``.
    """

    name, family = "GIF", "palette"

    def missing(self):
        return _ffmpeg_has_encoder("gif")

    def settings(self, quick):
        return [256, 32] if quick else [256, 128, 64, 32, 16]

    def run(self, clip, colours, work):
        coded = work / "out.gif"
        graph = (
            f"split[a][b];[a]palettegen=stats_mode=single:max_colors={colours}:reserve_transparent=0[p];"
            "[b][p]paletteuse=new=1:dither=none"
        )
        enc = ffmpeg(*clip.raw_input_args(), "-vf", graph, str(coded))
        bits = 8 * coded.stat().st_size
        decoded, dec = decode_with_ffmpeg(clip, coded, work)
        return _point(self.name, f"{colours} colours", clip, bits, decoded, enc, dec)


def _png_palette_and_data_bytes(path: Path) -> int:
    """Payload bytes of a PNG's PLTE, tRNS and IDAT chunks."""
    data = path.read_bytes()
    pos, total = 8, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"PLTE", b"tRNS", b"IDAT"):
            total += length
        pos += 12 + length
    return total


class Pngquant(Codec):
    """pngquant on each frame (yuv420p → RGB PNG → quantised PNG → yuv420p), no dithering.

    The sweep is ``--quality 0-Q``: the fewest colours (≤ 256) that reach quality Q.
    """

    name, family, tools = "pngquant", "palette", ("pngquant",)

    def missing(self):
        return super().missing() or _ffmpeg_has_encoder("png")

    def settings(self, quick):
        return [100, 50] if quick else [100, 90, 75, 60, 40, 20]

    def run(self, clip, quality, work):
        frames_dir = work / "png"
        if not frames_dir.exists():  # RGB frames once per clip (work is per clip), for every quality
            frames_dir.mkdir()
            ffmpeg(*clip.raw_input_args(), "-pix_fmt", "rgb24", str(frames_dir / "f%05d.png"))
        sources = sorted(frames_dir.glob("f?????.png"))
        enc = run_tool(
            [PNGQUANT, "--force", "--strip", "--nofs", "--quality", f"0-{quality}",
             "--ext", ".q.png", "--", *map(str, sources)]
        )  # fmt: skip
        quantised = [p.with_suffix(".q.png") for p in sources]
        bits = 8 * sum(_png_palette_and_data_bytes(p) for p in quantised)
        decoded, dec = decode_with_ffmpeg(clip, frames_dir / "f%05d.q.png", work)
        return _point(self.name, f"quality 0-{quality}", clip, bits, decoded, enc, dec)


class NaiveKMeans(Codec):
    """Fixed 16×16 blocks, per-block k-means palettes (luma K, chroma K/2), raw indices, zstd."""

    name, family = "naive k-means+zstd", "palette"

    def __init__(self):
        self._generator = None

    def missing(self):
        return None

    def settings(self, quick):
        # K 16/8 already reaches 45-55 dB on the corpus; K 32 would double the k-means time.
        return [(4, 2), (16, 8)] if quick else [(2, 1), (4, 2), (8, 4), (16, 8)]

    def run(self, clip, setting, work):
        if self._generator is None:
            self._generator = create_palette_generator("kmeans")
        k_luma, k_chroma = setting
        start = time.perf_counter()
        payload = naive.encode(clip.frames, k_luma, k_chroma, self._generator)
        enc = time.perf_counter() - start
        start = time.perf_counter()
        decoded = naive.decode(payload)
        dec = time.perf_counter() - start
        return _point(self.name, f"K {k_luma}/{k_chroma}", clip, 8 * len(payload), decoded, enc, dec)


ANCHORS: tuple[type[Codec], ...] = (FFV1, X264Lossless, X265, X264, SVTAV1, GIF, Pngquant, NaiveKMeans)
