"""Quality metrics for ``palstream eval``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palstream import metrics
from palstream.errors import InputError


def test_psnr_definitions():
    assert metrics.psnr(0.0) == math.inf
    assert metrics.psnr(255.0**2) == pytest.approx(0.0)
    assert metrics.psnr(1.0) == pytest.approx(48.1308, abs=1e-4)
    assert metrics.psnr_yuv(40.0, 48.0, 56.0) == pytest.approx((6 * 40 + 48 + 56) / 8)


def test_lossless_archive_scores_identical(lossless_archive, data_dir):
    report = metrics.evaluate(str(data_dir / "screen_37x29.mkv"), str(lossless_archive), vmaf=False)
    assert report["lossless"] is True
    assert report["psnr_y"] == report["psnr_yuv"] == math.inf
    assert report["ssim_y"] == pytest.approx(1.0)
    assert report["ms_ssim"] is None and "161" in report["omitted"]["ms_ssim"]
    assert report["vmaf"] is None and report["omitted"]["vmaf"] == "not requested"
    payload = report["payload_bytes"]
    assert report["bpp"] == pytest.approx(payload * 8 / (6 * 37 * 29))


def test_psnr_is_pooled_over_the_clip():
    from palstream.frames import Frames

    zeros = np.zeros((2, 4, 4), np.uint8)
    chroma = np.zeros((2, 2, 2), np.uint8)
    ref = Frames(zeros, chroma, chroma)
    dec_y = zeros.copy()
    dec_y[0] = 2  # frame 0: MSE 4, frame 1: MSE 0 -> pooled MSE 2
    acc = metrics._Accumulator(4, 4)
    acc.add(ref, Frames(dec_y, chroma, chroma))
    assert acc.report()["psnr_y"] == pytest.approx(metrics.psnr(2.0))


def test_vmaf_is_measured_or_omitted_with_a_reason(lossless_archive, data_dir):
    exe, reason = metrics.vmaf_ffmpeg()
    report = metrics.evaluate(str(data_dir / "screen_37x29.mkv"), str(lossless_archive))
    if exe is None:
        assert report["vmaf"] is None and report["omitted"]["vmaf"] == reason
    else:
        assert 90 < report["vmaf"] <= 100  # identical frames; VMAF tops out near 97-100


def test_wrong_source_is_refused(lossless_archive, data_dir):
    with pytest.raises(InputError, match="archive's source"):
        metrics.evaluate(str(data_dir / "camera_64x48.mkv"), str(lossless_archive), vmaf=False)
