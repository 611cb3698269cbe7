"""The codec RD benchmark's issue-16 judgement (benchmarks/codec_rd.py), its still noisy scene
(benchmarks/make_still_noisy.py) and its lossless x264 anchor (benchmarks/anchors.py)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from benchmarks.anchors import Clip, X264Lossless
from benchmarks.codec_rd import done_when, geomean
from benchmarks.make_still_noisy import add_sensor_noise
from palstream.frames import Frames


def summary(x265_40, x265_45, vs_x264=0.9, vs_ffv1=0.6, exact=True, chunks=((45.0, [45.1]),), speed=None):
    """The part of a ``summarise`` result that ``done_when`` reads."""
    return {
        "ratios": {
            "40": {"x265": x265_40, "x265_at_target": x265_40},
            "45": {"x265": x265_45, "x265_at_target": x265_45},
        },
        "lossless": {"bpp": 1.0, "exact": exact, "x264 qp0": vs_x264, "FFV1": vs_ffv1},
        "overshoot": {
            f"target {t:g} dB": {"target": t, "chunk_psnr_y": q, "exact_chunks": sum(v is None for v in q)}
            for t, q in chunks
        },
        "speed": speed,
    }


def speed(encode_cpu_fps, decode_cpu_fps):
    """Wall fps a third of the CPU fps, as on the loaded machine: only the CPU fps are judged."""
    return {"encode_fps": encode_cpu_fps / 3, "decode_fps": decode_cpu_fps / 3,
            "encode_cpu_fps": encode_cpu_fps, "decode_cpu_fps": decode_cpu_fps}  # fmt: skip


def by_check(checks):
    return {c["check"]: c for c in checks}


def test_done_when_pools_the_corpus_and_judges_the_still_scene_apart():
    corpus = {
        "a": summary(1.2, 1.1, speed=speed(12.0, 150.0)),
        "b": summary(1.8, 1.5, chunks=((40.0, [40.2]), (50.0, [None]))),
    }
    still = {"noisy": summary(5.0, 1.5)}
    checks = by_check(done_when(corpus, still, one_thread=True))
    g40 = checks["geomean palstream/x265-medium at 40 dB ≤ 1.6"]
    assert g40["value"] == pytest.approx(np.sqrt(1.2 * 1.8))  # the still scene's 5.0 is not in it
    assert g40["status"] == "PASS"
    assert checks["geomean palstream/x265-medium at 45 dB ≤ 1.25"]["status"] == "FAIL"
    assert checks["no clip above 2.5× x265 at 40 or 45 dB"]["status"] == "PASS"
    assert checks["--lossless geomean ≤ 1× x264 qp0, decoded exactly"]["status"] == "PASS"
    assert checks["--lossless geomean ≤ 0.7× FFV1, decoded exactly"]["status"] == "PASS"
    assert checks["encode ≥ 10 fps, decode ≥ 100 fps at 640×360, 45 dB, one thread"]["status"] == "PASS"
    assert checks["every chunk at or above its PSNR-Y floor"]["status"] == "PASS"
    overshoot = checks["mean overshoot per chunk ≤ 0.3 dB"]
    assert overshoot["value"] == pytest.approx(0.15) and "1 chunks coded losslessly" in overshoot["numbers"]
    assert checks["still scene with sensor noise ≤ 2× x265 at 40 dB"]["status"] == "FAIL"
    assert checks["still scene with sensor noise ≤ 2× x265 at 45 dB"]["status"] == "PASS"
    still["noisy"]["ratios"]["45"]["x265_at_target"] = 2.5  # its 45 dB encode overshoots onto a costly rung
    checks = by_check(done_when(corpus, still, one_thread=True))
    assert checks["still scene with sensor noise ≤ 2× x265 at 45 dB"]["status"] == "FAIL"


def test_done_when_fails_what_it_must_and_never_passes_an_unknown():
    corpus = {
        "a": summary(None, 1.1, vs_x264=1.2, exact=False, chunks=((45.0, [44.9]),),
                     speed=speed(12.0, 50.0)),  # fmt: skip
        "b": summary(3.0, 1.0, chunks=((45.0, [46.0]),)),
    }
    checks = by_check(done_when(corpus, {}, one_thread=True))
    assert checks["geomean palstream/x265-medium at 40 dB ≤ 1.6"]["status"] == "n/a"
    assert "n/a for a" in checks["geomean palstream/x265-medium at 40 dB ≤ 1.6"]["numbers"]
    assert checks["no clip above 2.5× x265 at 40 or 45 dB"]["status"] == "n/a"  # b is above, but a is unknown
    assert "above: b @ 40 dB 3.000" in checks["no clip above 2.5× x265 at 40 or 45 dB"]["numbers"]
    assert checks["--lossless geomean ≤ 0.7× FFV1, decoded exactly"]["status"] == "FAIL"  # a is not exact
    assert checks["encode ≥ 10 fps, decode ≥ 100 fps at 640×360, 45 dB, one thread"]["status"] == "FAIL"
    assert checks["every chunk at or above its PSNR-Y floor"]["status"] == "FAIL"
    assert checks["mean overshoot per chunk ≤ 0.3 dB"]["status"] == "FAIL"  # (-0.1 + 1.0) / 2
    assert checks["still scene with sensor noise ≤ 2× x265 at 40 dB"]["status"] == "n/a"
    threaded = by_check(done_when(corpus, {}, one_thread=False))
    assert threaded["encode ≥ 10 fps, decode ≥ 100 fps at 640×360, 45 dB, one thread"]["status"] == "n/a"


def test_geomean_is_unknown_when_any_value_is():
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([2.0, None]) is None
    assert geomean([]) is None


def test_sensor_noise_is_independent_per_frame_reproducible_and_of_the_stated_size():
    grey = Frames(np.full((1, 64, 64), 128, np.uint8), np.full((1, 32, 32), 128, np.uint8),
                  np.full((1, 32, 32), 128, np.uint8))  # fmt: skip
    noisy = add_sensor_noise(grey, 8, seed=16)
    assert len(noisy) == 8
    assert np.array_equal(noisy.y, add_sensor_noise(grey, 8, seed=16).y)
    y = noisy.y.astype(float) - 128
    assert abs(y.mean()) < 0.1
    assert 2.3 < y.std() < 2.7  # sqrt(1.5² + 0.036·112) ≈ 2.5 levels at mid-grey
    assert 0.9 < (noisy.u.astype(float) - 128).std() < 1.1
    assert abs(np.corrcoef(y[0].ravel(), y[1].ravel())[0, 1]) < 0.05  # frames carry independent noise


def test_x264_qp0_anchor_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    frames = Frames(rng.integers(16, 236, (3, 32, 48), np.uint8), rng.integers(16, 241, (3, 16, 24), np.uint8),
                    rng.integers(16, 241, (3, 16, 24), np.uint8))  # fmt: skip
    raw = tmp_path / "source.yuv"
    raw.write_bytes(frames.tobytes())
    point = X264Lossless().run(Clip("noise", frames, Fraction(25), raw), "qp 0", tmp_path)
    assert point.lossless and point.bits > 0
