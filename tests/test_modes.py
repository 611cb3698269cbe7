"""Mode shares (issue 15): leaf statistics from both directions of the syntax, the ``none``
generator, ``info --modes``, and the palette-modes benchmark's tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palstream.codec import EncoderConfig, ModeStats, decode_chunk, encode_chunk
from palstream.codec.decoder import HEADER
from palstream.codec.syntax import (
    PALETTE,
    STAT_AREA,
    STAT_BITS,
    STAT_LEAVES,
    STAT_PAL_C,
    STAT_PAL_ESCAPE,
    STAT_PAL_ESTIMATE,
    STAT_PAL_SOURCE,
    STAT_PAL_Y,
)
from palstream.io import read_frames

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def clips():
    return {"camera": read_frames(str(DATA / "camera_64x48.mkv"), 0, 4), "screen": read_frames(str(DATA / "screen_37x29.mkv"), 0, 3)}


@pytest.mark.parametrize("clip, config", [("camera", EncoderConfig(target_psnr=40.0)), ("screen", EncoderConfig(lossless=True)),
                                          ("screen", EncoderConfig(target_psnr=45.0))])
def test_leaf_statistics_add_up_and_change_nothing(clips, clip, config):
    frames = clips[clip]
    encoded_modes, decoded_modes = ModeStats(), ModeStats()
    encoded = encode_chunk(frames, config, modes=encoded_modes)
    assert encoded.payload == encode_chunk(frames, config).payload
    decoded = decode_chunk(encoded.payload, modes=decoded_modes)
    plain = decode_chunk(encoded.payload)
    assert all(np.array_equal(a, b) for a, b in zip((decoded.y, decoded.u, decoded.v), (plain.y, plain.u, plain.v)))

    t, h, w = frames.y.shape
    padded = t * (h + -h % 64) * (w + -w % 64)
    for modes in (encoded_modes, decoded_modes):
        assert modes.area == padded
        body_bits = 8 * (len(encoded.payload) - HEADER.size)
        assert body_bits - 64 <= modes.bits <= body_bits  # the coder's final flush and start: under 8 bytes
    # both directions count the same leaves and bits; only the encoder knows the palettes' sources
    # and the analysis' estimate of their bits
    source = slice(STAT_PAL_SOURCE, STAT_PAL_SOURCE + 2)
    rest = np.ones(len(encoded_modes.counts), bool)
    rest[source] = False
    rest[STAT_PAL_ESTIMATE] = False
    assert np.allclose(encoded_modes.counts[rest], decoded_modes.counts[rest], rtol=0, atol=1e-6)
    assert not decoded_modes.counts[source].any() and not decoded_modes.counts[STAT_PAL_ESTIMATE].any()
    # the estimate covers exactly the PALETTE leaves; the escapes' leaves are some of them
    assert np.allclose(encoded_modes.counts[STAT_PAL_ESTIMATE, :2], encoded_modes.counts[PALETTE, :2])
    assert (encoded_modes.counts[STAT_PAL_ESCAPE] <= encoded_modes.counts[PALETTE] + 1e-6).all()
    assert encoded_modes.sources and not decoded_modes.sources
    counts = encoded_modes.counts
    for block in (slice(STAT_PAL_Y, STAT_PAL_Y + 4), slice(STAT_PAL_C, STAT_PAL_C + 4), source):
        assert np.allclose(counts[block].sum(0), counts[PALETTE], rtol=0, atol=1e-6)
    assert counts[:4, STAT_LEAVES].sum() > 0 and counts[:4, STAT_BITS].min() >= 0


def test_screen_content_has_palette_leaves(clips):
    modes = ModeStats()
    encode_chunk(clips["screen"], EncoderConfig(lossless=True), modes=modes)
    shares = modes.to_dict()
    assert shares["modes"]["palette"]["leaves"] > 0
    assert abs(sum(m["area_share"] for m in shares["modes"].values()) - 1) < 1e-9
    assert modes.counts[PALETTE, STAT_AREA] == sum(v["area_px"] for v in shares["palette_luma_sizes"].values())


def test_none_generator_proposes_nothing():
    import torch

    from palstream.codec import chunk, precompile
    from palstream.palettes import create_palette_generator, palette_generator_names

    assert "none" in palette_generator_names()
    none = create_palette_generator("none", device="cpu")
    assert none.generate(torch.rand(5, 256, 2) * 255, torch.full((5,), 16)).shape == (5, 0, 2)
    clip = precompile._clip()  # a 16x16 block of > 64 levels that cluster: k-means is asked about it
    padded = (chunk._pad(clip.y, 64), chunk._pad(clip.u, 32), chunk._pad(clip.v, 32))
    config = EncoderConfig(target_psnr=40.0)
    assert chunk._palette_proposals(*padded, config, create_palette_generator("kmeans", device="cpu"))[1].sum() > 0
    assert chunk._palette_proposals(*padded, config, none)[1].sum() == 0
    modes = ModeStats()
    encode_chunk(clip, EncoderConfig(target_psnr=40.0, palette="none"), modes=modes)
    assert modes.counts[STAT_PAL_SOURCE + 1, STAT_LEAVES] == 0


def test_a_generator_with_block_features_gets_each_candidates_own():
    """The codec asks a generator for its blocks' features once per chunk, with each candidate
    block's frame, position and size, and hands each ``generate`` call the rows of its blocks."""
    import torch

    from palstream.codec import chunk, precompile
    from palstream.palettes.base import PaletteGenerator

    class BoxEcho(PaletteGenerator):
        feature_calls = 0
        checked = 0

        def block_features(self, luma, cb, cr, boxes):
            self.feature_calls += 1
            self.planes = (luma, cb, cr)
            return torch.from_numpy(boxes.astype(np.float32))  # each block's (frame, top, left, size)

        def generate(self, samples, k, features=None):
            luma, cb, cr = self.planes
            for block, (f, top, left, s) in zip(samples.numpy(), features.numpy().astype(int)):
                if block.shape[1] == 1:
                    expected = luma[f, top:top + s, left:left + s].reshape(-1, 1)
                else:
                    c = slice(top // 2, (top + s) // 2), slice(left // 2, (left + s) // 2)
                    expected = np.stack([cb[f][c].reshape(-1), cr[f][c].reshape(-1)], 1)
                assert block.shape[0] == s * s // (1 if block.shape[1] == 1 else 4)
                np.testing.assert_array_equal(block, expected)
                self.checked += 1
            return samples[:, : int(k.max())]

    clip = precompile._clip()
    frames = np.concatenate([clip.y, np.flip(clip.y, 2)])  # two frames, so the frame index is checked too
    padded = (chunk._pad(frames, 64), chunk._pad(np.concatenate([clip.u] * 2), 32), chunk._pad(np.concatenate([clip.v] * 2), 32))
    echo = BoxEcho(device="cpu")
    proposals = chunk._palette_proposals(*padded, EncoderConfig(target_psnr=40.0), echo)
    assert echo.feature_calls == 1 and echo.checked == proposals[1].astype(bool).sum() + proposals[3].astype(bool).sum() > 0


def test_the_analysis_picks_the_dominant_generators_values():
    """``dominant`` runs inside the analysis (``_most_frequent``); its ``generate`` is the reference."""
    import torch

    from palstream.codec.analysis import DOMINANT, _most_frequent
    from palstream.palettes import create_palette_generator

    rng = np.random.default_rng(4)
    blocks = rng.choice(rng.integers(0, 256, 20), size=(50, 64)) * 256 + rng.integers(0, 3, (50, 64))  # (Cb, Cr) keys
    blocks[:10] = rng.integers(0, 65536, (10, 64))  # mostly single values: few dominant ones
    reference = create_palette_generator("dominant", device="cpu").generate(
        torch.from_numpy(np.stack([blocks >> 8, blocks & 255], -1).astype(np.float32)), torch.full((50,), DOMINANT)
    )
    for block, palette in zip(blocks, reference.to(torch.int64).numpy()):
        seen = np.array(list(dict.fromkeys(block.tolist())), np.int64)  # first seen first
        counts = np.zeros(65536, np.int64)
        np.add.at(counts, block, 1)
        out, top = np.empty(DOMINANT, np.int64), np.empty(DOMINANT, np.int64)
        n = _most_frequent(counts, seen, len(seen), DOMINANT, out, top)
        expected = palette[:, 0] * 256 + palette[:, 1]
        if n:
            assert out[:n].tolist() == expected[:n].tolist() and set(expected[n:]) <= {expected[0]}
        else:  # no value seen twice: the reference repeats the most frequent, which escapes its own block
            assert len(set(expected)) == 1 and counts[expected[0]] == 1


def test_palettes_of_dominant_values_win_bits_over_exact_ones_alone():
    """The default generator against ``none`` (exact palettes only) on synthetic graphics (ffmpeg's
    testsrc: colour bars, a gradient and digits). The 37x29 screen crop is not the clip for it since
    bitstream 9: its INTRA transform codes that crop in fewer bytes than either kind of palette."""
    graphics = read_frames(str(DATA / "batch_testsrc_64x48.mkv"), 0, 3)
    sizes = {}
    for palette in ("dominant", "none"):
        modes = ModeStats()
        sizes[palette] = encode_chunk(graphics, EncoderConfig(target_psnr=40.0, palette=palette), modes=modes).stats
        generated = modes.counts[STAT_PAL_SOURCE + 1, STAT_LEAVES]
        assert (generated > 0) == (palette == "dominant")
    assert sizes["dominant"]["bytes"] < sizes["none"]["bytes"] and sizes["dominant"]["psnr_y"] >= 40.0


def test_info_modes_reports_the_shares(run_cli, data_dir, tmp_path):
    archive = tmp_path / "a.zarr"
    assert run_cli("encode", data_dir / "screen_37x29.mkv", archive, "--target-psnr", "40", "--gop", "2", "--palette", "none").code == 0
    plain = json.loads(run_cli("info", archive, "--json").stdout)
    assert "modes" not in plain and plain["encoder"]["palette_generator"]["name"] == "none"
    report = json.loads(run_cli("info", archive, "--json", "--modes").stdout)["modes"]
    assert report["chunks"] == len(plain["chunks"]) and report["damaged_chunks"] == []
    assert set(report["modes"]) == {"skip", "inter", "intra", "palette"}
    assert set(report["palette_luma_sizes"]) == set(report["palette_chroma_sizes"]) == {"1", "2-4", "5-16", "17-64"}
    assert "palette_source" not in report  # decoded: the sources are the encoder's alone
    assert report["area_px"] == sum(m["area_px"] for m in report["modes"].values())
    assert report["payload_bytes"] == sum(c["stats"]["bytes"] for c in plain["chunks"])
    text = run_cli("info", archive, "--modes").stdout
    assert "quadtree splits" in text and "palette luma 2-4" in text


def test_benchmark_tables_on_a_tiny_run(tmp_path, capsys):
    from benchmarks.palette_modes import main

    out = tmp_path / "modes.json"
    main(["--corpus", str(DATA), "--clips", "screen_37x29.mkv", "--frames", "2", "--targets", "40",
          "--palettes", "none", "dominant", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["palette"] for r in rows] == ["none", "dominant"]
    assert all(r["generator_seconds"] >= 0 and r["bpp"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "| screen_37x29.mkv | 40 | dominant (default) |" in text and "| none | +0.00 % |" in text
    main(["--report", str(out)])
    assert capsys.readouterr().out == text  # the saved results print the same tables


def test_benchmark_brackets_the_default_rung_with_fixed_rungs(tmp_path, capsys):
    from benchmarks.palette_modes import main

    out = tmp_path / "modes.json"
    main(["--corpus", str(DATA), "--clips", "screen_37x29.mkv", "--frames", "2", "--targets", "40",
          "--palettes", "none", "dominant", "--bracket", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    landed = next(r["rung"] for r in saved["rows"] if r["palette"] == "dominant")
    coded = [(r["rung"], r["palette"]) for r in saved["bracket"]]
    assert coded == [(rung, p) for rung in (landed - 1, landed, landed + 1) for p in ("none", "dominant")]
    text = capsys.readouterr().out
    assert "| dominant (default) vs none | " in text and "At fixed rungs" in text
    main(["--report", str(out)])
    assert capsys.readouterr().out == text


def test_bracket_ratio_compares_fitted_lines_at_equal_psnr():
    from benchmarks.palette_modes import bracket_ratio

    def line(scale, psnrs):  # bpp doubling every 3 dB
        return [(p, scale * 2 ** ((p - 40) / 3)) for p in psnrs]

    assert bracket_ratio(line(0.9, [39.5, 40.1, 40.6]), line(1.0, [39.8, 40.4, 41.0])) == pytest.approx(0.9)
    # one encode a rung's worth off the line moves the ratio by a third of it, not all of it
    bumped = line(1.0, [39.8, 40.4, 41.0])
    bumped[1] = (bumped[1][0], bumped[1][1] * 1.06)
    assert bracket_ratio(line(1.0, [39.8, 40.4, 41.0]), bumped) == pytest.approx(1 / 1.06 ** (1 / 3), rel=1e-3)


def test_benchmark_compares_at_equal_psnr_by_log_linear_interpolation():
    from benchmarks.palette_modes import bpp_at_psnr

    points = [(45.0, 0.4), (40.0, 0.1)]
    assert bpp_at_psnr(points, 40.0) == pytest.approx(0.1)
    assert bpp_at_psnr(points, 42.5) == pytest.approx(0.2)  # halfway in PSNR: the geometric mean
    assert bpp_at_psnr(points, 50.0) == pytest.approx(1.6)  # beyond the points: the end segment, extended
    assert bpp_at_psnr(points[:1], 42.5) is None


def test_ablation_tables_compare_at_k_means_psnr():
    """benchmarks/generator_ablation.py: each generator's bpp at k-means' PSNR-Y, against the shipped weights and k-means."""
    from benchmarks.generator_ablation import KMEANS, SHIPPED, tables

    def row(generator, target, psnr, bpp):
        return {"generator": generator, "clip": "screen_x.mkv", "target_db": target, "psnr_y": psnr, "bpp": bpp}

    rows = [row(KMEANS, 40, 40.0, 0.1), row(SHIPPED, 40, 40.0, 0.1), row("variant", 40, 42.5, 0.2),
            row(KMEANS, 45, 45.0, 0.4), row(SHIPPED, 45, 45.0, 0.44), row("variant", 45, 45.0, 0.4)]
    text = tables(rows, rows)
    # the variant at 40 dB is 2.5 dB above k-means: at k-means' 40 dB its line through (42.5, 0.2) and (45, 0.4) gives 0.1
    assert "| variant | -4.65 % | -4.65 % | -4.65 % | +0.00 % | +0.00 % | 0 of 2 (+0.00 %) |" in text  # sqrt(1/1.1) - 1
    assert "| shipped (full recipe) | +0.00 % | +0.00 % | +0.00 % | +4.88 % | +4.88 % | 1 of 2 (+10.00 %) |" in text
    assert "| screen_x.mkv | 40 | 0.1000 (40.00 dB) | 0.1000 (40.00 dB) | 0.2000 (42.50 dB) |" in text
