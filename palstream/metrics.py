"""Quality and size of an archive against its source (``palstream eval``).

Definitions (all on the 8-bit 4:2:0 planes palstream codes):

- ``psnr_y``, ``psnr_u``, ``psnr_v``: 10·log10(255² / MSE) with the MSE pooled over every sample
  of the clip (not an average of per-frame PSNRs); ``inf`` when the plane is identical.
- ``psnr_yuv``: (6·PSNR-Y + PSNR-U + PSNR-V) / 8, the weighting used in JVET/AOM test conditions.
- ``ssim_y``: mean over frames of SSIM on luma (11×11 Gaussian window, σ 1.5), pytorch-msssim.
- ``ms_ssim``: mean over frames of 5-scale MS-SSIM on luma; needs frames whose smaller side is
  above 160 pixels, otherwise omitted with the reason.
- ``bpp``: archive payload bits (the chunk payloads, without zarr metadata) per luma pixel.
- ``vmaf``: VMAF (model vmaf_v0.6.1) from FFmpeg's libvmaf filter, using the static FFmpeg in
  ``imageio-ffmpeg``; omitted with the reason when that FFmpeg or its libvmaf is unavailable.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from pytorch_msssim import ms_ssim, ssim

from palstream.archive import open_archive
from palstream.errors import InputError
from palstream.frames import Frames
from palstream.io import iter_chunks, probe
from palstream.storage import Location
from palstream.writers import write_video

MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window: (11 - 1) * 2**4 < side
SSIM_MIN_SIDE = 11


def psnr(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB for a mean squared error; ``inf`` for 0."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def psnr_yuv(psnr_y: float, psnr_u: float, psnr_v: float) -> float:
    """The 6:1:1 weighted PSNR of the three planes."""
    return (6.0 * psnr_y + psnr_u + psnr_v) / 8.0


def _luma_tensor(frames: Frames) -> torch.Tensor:
    return torch.from_numpy(frames.y.astype(np.float32)).unsqueeze(1)


class _Accumulator:
    """Sums squared errors and per-frame structural scores chunk by chunk."""

    def __init__(self, width: int, height: int):
        self.sse = {"y": 0, "u": 0, "v": 0}
        self.samples = {"y": 0, "u": 0, "v": 0}
        self.ssim: list[float] = []
        self.ms_ssim: list[float] = []
        self.use_ssim = min(width, height) >= SSIM_MIN_SIDE
        self.use_ms_ssim = min(width, height) >= MS_SSIM_MIN_SIDE

    def add(self, reference: Frames, decoded: Frames) -> None:
        for plane in "yuv":
            diff = getattr(reference, plane).astype(np.int32) - getattr(decoded, plane).astype(np.int32)
            self.sse[plane] += int(np.square(diff, dtype=np.int64).sum())
            self.samples[plane] += diff.size
        if self.use_ssim:
            ref, dec = _luma_tensor(reference), _luma_tensor(decoded)
            with torch.no_grad():
                self.ssim += ssim(ref, dec, data_range=255, size_average=False).tolist()
                if self.use_ms_ssim:
                    self.ms_ssim += ms_ssim(ref, dec, data_range=255, size_average=False).tolist()

    def report(self) -> dict:
        y, u, v = (psnr(self.sse[p] / self.samples[p]) for p in "yuv")
        return {
            "psnr_y": y,
            "psnr_u": u,
            "psnr_v": v,
            "psnr_yuv": psnr_yuv(y, u, v),
            "ssim_y": float(np.mean(self.ssim)) if self.ssim else None,
            "ms_ssim": float(np.mean(self.ms_ssim)) if self.ms_ssim else None,
        }


def vmaf_ffmpeg() -> tuple[str | None, str]:
    """Path of an FFmpeg with libvmaf, or None and the reason why there is none."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        return None, f"no static FFmpeg from imageio-ffmpeg ({exc})"
    filters = subprocess.run([exe, "-hide_banner", "-filters"], capture_output=True, text=True).stdout
    if not re.search(r"\blibvmaf\b", filters):
        return None, f"{exe} is built without libvmaf"
    return exe, ""


def _vmaf(exe: str, reference: Path, distorted: Path) -> float:
    result = subprocess.run(
        [
            exe,
            "-hide_banner",
            "-nostats",
            "-i",
            str(distorted),
            "-i",
            str(reference),
            "-lavfi",
            "[0:v][1:v]libvmaf=n_threads=2",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        text=True,
    )
    match = re.search(r"VMAF score: ([0-9.]+)", result.stderr)
    if result.returncode != 0 or not match:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "libvmaf failed")
    return float(match.group(1))


def evaluate(source_video: str | Location, archive_location: str | Location, vmaf: bool = True) -> dict:
    """Compare an archive with its source.

    Parameters
    ----------
    source_video : str or Location
        The original video (path or fsspec URL, or a location with its storage options).
    archive_location : str or Location
        The palstream archive.
    vmaf : bool, default True
        Compute VMAF when an FFmpeg with libvmaf is available.

    Returns
    -------
    dict
        ``bpp``, ``psnr_y``, ``psnr_u``, ``psnr_v``, ``psnr_yuv``, ``ssim_y``, ``ms_ssim``, ``vmaf``
        (None where omitted; the reason is under ``omitted``), plus ``frames``, ``width``,
        ``height``, ``payload_bytes`` and ``lossless`` (every sample identical).

    Raises
    ------
    InputError
        The source does not have the archive's size or frame count.
    DamagedChunkError
        A chunk of the archive is damaged (run ``palstream verify``).
    """
    source_video = Location.of(source_video)
    archive = open_archive(archive_location)
    info = archive.source
    source = probe(source_video)
    if (source.width, source.height, source.frame_count) != (info.width, info.height, info.frame_count):
        raise InputError(
            f"{source.name} is {source.width}x{source.height}, {source.frame_count} frames but the archive holds "
            f"{info.width}x{info.height}, {info.frame_count} frames; give the archive's source"
        )
    acc = _Accumulator(info.width, info.height)
    omitted = {}
    exe, why_not = vmaf_ffmpeg() if vmaf else (None, "not requested")
    with tempfile.TemporaryDirectory(prefix="palstream-eval-") as tmp:
        ref_path, dec_path = Path(tmp, "reference.y4m"), Path(tmp, "decoded.y4m")

        def compared():
            sources = iter_chunks(source_video, archive.attrs["gop"])
            for reference, decoded in zip(sources, archive.decode(), strict=True):
                acc.add(reference, decoded)
                yield decoded

        if exe:
            # Both sides as 4:2:0 y4m, so VMAF sees exactly the planes palstream coded.
            write_video(compared(), dec_path, info)
            write_video(iter_chunks(source_video, archive.attrs["gop"]), ref_path, info)
            try:
                vmaf_score = _vmaf(exe, ref_path, dec_path)
            except RuntimeError as exc:
                vmaf_score, omitted["vmaf"] = None, f"libvmaf failed: {exc}"
        else:
            for _ in compared():
                pass
            vmaf_score, omitted["vmaf"] = None, why_not
    report = acc.report()
    if not acc.use_ssim:
        omitted["ssim_y"] = f"frames smaller than {SSIM_MIN_SIDE} pixels"
    if not acc.use_ms_ssim:
        omitted["ms_ssim"] = f"MS-SSIM needs frames whose smaller side is at least {MS_SSIM_MIN_SIDE} pixels"
    payload_bytes = archive.payload_bytes()
    result = {
        "bpp": payload_bytes * 8 / (info.frame_count * info.width * info.height),
        **report,
        "vmaf": vmaf_score,
        "frames": info.frame_count,
        "width": info.width,
        "height": info.height,
        "payload_bytes": payload_bytes,
        "lossless": all(acc.sse[p] == 0 for p in "yuv"),
    }
    if omitted:
        result["omitted"] = omitted
    return result
