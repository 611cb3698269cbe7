"""The command line, end to end on small real clips: round trips, bad input, damage, help texts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import typer.main

from palstream import io
from palstream.archive import open_archive
from palstream.cli import app
from palstream.errors import ArchiveError


def _one_error_line(result) -> str:
    assert result.code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def _not_complete(path) -> bool:
    if not path.exists():
        return True
    try:
        return not open_archive(str(path)).complete
    except ArchiveError:
        return True


def test_every_command_has_help(run_cli):
    command = typer.main.get_command(app)
    assert set(command.commands) >= {"encode", "decode", "verify", "info", "eval", "demo"}
    for name, sub in command.commands.items():
        assert sub.help and sub.help.strip(), f"{name} has no help text"
        for param in sub.params:
            if param.name != "help":
                assert getattr(param, "help", None), f"{name} {param.name} has no help text"
        result = run_cli(name, "--help")
        assert result.code == 0 and "Usage" in result.stdout


def test_lossless_round_trip_through_the_cli(run_cli, data_dir, tmp_path):
    archive, out = tmp_path / "a.zarr", tmp_path / "out.mkv"
    assert run_cli("encode", data_dir / "screen_37x29.mkv", archive, "--lossless", "--gop", "4").code == 0
    assert run_cli("verify", archive).code == 0
    result = run_cli("decode", archive, out)
    assert result.code == 0 and "6 frames" in result.stdout
    got, want = io.read_frames(str(out)), io.read_frames(str(data_dir / "screen_37x29.mkv"))
    assert all(np.array_equal(getattr(got, p), getattr(want, p)) for p in "yuv")
    info = json.loads(run_cli("info", archive, "--json").stdout)
    assert info["status"] == "complete" and info["n_chunks"] == 2 and len(info["chunks"]) == 2
    assert "complete" in run_cli("info", archive).stdout


def test_a_pyramid_encode_records_the_setting_and_meets_its_floor(run_cli, data_dir, tmp_path):
    """``--pyramid`` reaches the encoder (the archive's settings, ``info``) and decodes to its floor."""
    archive = tmp_path / "a.zarr"
    clip = data_dir / "batch_mandel_48x32.mkv"
    assert run_cli("encode", clip, archive, "--target-psnr", "35", "--pyramid").code == 0
    assert open_archive(str(archive)).chunk_config(0)["pyramid"] is True
    assert "pyramid" in run_cli("info", archive).stdout
    assert json.loads(run_cli("eval", clip, archive, "--json").stdout)["psnr_y"] >= 35.0


def test_lossy_encode_meets_the_psnr_floor(run_cli, data_dir, tmp_path):
    archive = tmp_path / "a.zarr"
    assert run_cli("encode", data_dir / "camera_64x48.mkv", archive, "--target-psnr", "38").code == 0
    report = json.loads(run_cli("eval", data_dir / "camera_64x48.mkv", archive, "--json").stdout)
    for key in ("bpp", "psnr_y", "psnr_u", "psnr_v", "psnr_yuv", "ssim_y", "ms_ssim", "vmaf"):
        assert key in report
    assert report["psnr_y"] >= 38.0 and 0 < report["bpp"] < 12
    assert 0 < report["ssim_y"] <= 1


def test_frames_option_decodes_a_range(run_cli, lossless_archive, data_dir, tmp_path):
    out = tmp_path / "part.y4m"
    assert run_cli("decode", lossless_archive, out, "--frames", "3:5").code == 0
    want = io.read_frames(str(data_dir / "screen_37x29.mkv"), start=3, count=2)
    assert io.read_frames(str(out)).tobytes() == want.tobytes()
    _one_error_line(run_cli("decode", lossless_archive, out, "--frames", "x"))


@pytest.mark.parametrize(
    "name",
    [
        "missing.mkv",
        "not_a_video.mp4",
        "audio_only.mkv",
        "subtitles_only.mkv",
        "truncated.mkv",
        "corrupt.mkv",
        "zero_frames.y4m",
        "anim_32x24_10bit.mkv",
        "anim_32x24_alpha.mkv",
    ],
)
def test_bad_input_one_line_error_and_no_archive(run_cli, data_dir, tmp_path, name):
    archive = tmp_path / "out.zarr"
    _one_error_line(run_cli("encode", data_dir / name, archive))
    assert _not_complete(archive)


def test_existing_output_needs_overwrite(run_cli, data_dir, lossless_archive, tmp_path):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    assert "--overwrite" in _one_error_line(run_cli("encode", data_dir / "screen_37x29.mkv", path))
    assert open_archive(str(path)).complete  # untouched
    assert run_cli("encode", data_dir / "screen_37x29.mkv", path, "--lossless", "--overwrite").code == 0


def test_unwritable_location_and_bad_settings(run_cli, data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    clip = data_dir / "screen_37x29.mkv"
    assert "cannot write" in _one_error_line(run_cli("encode", clip, blocker / "a.zarr"))
    assert "out of range" in _one_error_line(run_cli("encode", clip, tmp_path / "b.zarr", "--target-psnr", "99"))
    _one_error_line(run_cli("encode", clip, tmp_path / "b.zarr", "--target-psnr", "40", "--lossless"))
    _one_error_line(run_cli("encode", clip, tmp_path / "b.zarr", "--palette", "nope"))
    assert not (tmp_path / "b.zarr").exists()
    _one_error_line(run_cli("info", tmp_path / "nothing.zarr"))


def test_damaged_chunk_is_named_and_the_rest_decodes_in_time(run_cli, lossless_archive, tmp_path):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    stored = path / "chunks" / "000002" / "c" / "0"
    data = bytearray(stored.read_bytes())
    data[3] ^= 0x40
    stored.write_bytes(bytes(data))
    line = _one_error_line(run_cli("verify", path))
    assert "chunk 2 is damaged" in line and "chunk 0" not in line and "chunk 1 " not in line
    out = tmp_path / "rest.yuv"
    line = _one_error_line(run_cli("decode", path, out))
    assert "chunk 2" in line and "frames 4..5 are mid-grey fill" in line
    assert out.stat().st_size == 6 * (37 * 29 + 2 * 19 * 15)  # the fill keeps every later frame in its place


def test_conversion_warning_is_one_plain_line(run_cli, data_dir, tmp_path):
    result = run_cli("encode", data_dir / "anim_32x24_yuv444.mkv", tmp_path / "a.zarr", "--lossless")
    assert result.code == 0
    assert result.stderr.strip().splitlines() == [
        "warning: anim_32x24_yuv444.mkv is yuv444p: converted to 4:2:0, which reduces chroma resolution"
    ]


def test_two_fresh_processes_decode_identical_bytes(lossless_archive, tmp_path):
    outputs = []
    for n in range(2):
        out = tmp_path / f"{n}.y4m"
        subprocess.run(
            [sys.executable, "-m", "palstream.cli", "decode", str(lossless_archive), str(out)],
            check=True,
            capture_output=True,
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_console_script_errors_without_traceback(data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "palstream.cli", "encode", str(data_dir / "truncated.mkv"), str(tmp_path / "a.zarr")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: truncated.mkv") and result.stderr.count("\n") == 1


def test_demo_encodes_the_shipped_clip_and_reports(run_cli):
    result = run_cli("demo")
    assert result.code == 0, result.stderr
    assert "encoded 16 frames of 640x360" in result.stdout
    psnr_y = float(re.search(r"psnr_y\s*│\s*([0-9.]+)", result.stdout).group(1))
    assert psnr_y >= 45.0  # the default quality floor


def test_s3_archive_through_the_cli(run_cli, s3_endpoint, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("PALSTREAM_S3_ENDPOINT", s3_endpoint)
    archive = "s3://archives/cli/screen.zarr"
    assert run_cli("encode", data_dir / "screen_37x29.mkv", archive, "--lossless", "--gop", "4").code == 0
    assert run_cli("verify", archive, "--endpoint-url", s3_endpoint).code == 0
    assert json.loads(run_cli("info", archive, "--json").stdout)["status"] == "complete"
    assert run_cli("decode", archive, tmp_path / "out.yuv").code == 0
    assert (tmp_path / "out.yuv").read_bytes() == io.read_frames(str(data_dir / "screen_37x29.mkv")).tobytes()
    assert "--overwrite" in _one_error_line(run_cli("encode", data_dir / "screen_37x29.mkv", archive))


def test_verify_and_info_on_an_unfinished_archive(run_cli, data_dir, tmp_path):
    from palstream.archive import ArchiveWriter
    from palstream.codec import EncoderConfig, encode_chunk

    url = str(data_dir / "screen_37x29.mkv")
    config = EncoderConfig(lossless=True, gop=2)
    path = tmp_path / "job.zarr"
    writer = ArchiveWriter.create(str(path), io.probe(url), config)
    chunks = list(io.iter_chunks(url, config.gop))
    writer.write_chunk(0, encode_chunk(chunks[0], config))
    line = _one_error_line(run_cli("verify", path))
    assert "2 of 3 chunks damaged" in line and "chunk 1 is damaged: not written" in line and "chunk 2" in line
    assert "incomplete" in run_cli("info", path).stdout
    for index in (1, 2):
        writer.write_chunk(index, encode_chunk(chunks[index], config))
    assert "never finalized" in _one_error_line(run_cli("verify", path))
    writer.finalize()
    assert run_cli("verify", path).code == 0


@pytest.mark.parametrize(
    "args",
    [
        ("decode",),  # a missing argument
        ("decode", "a.zarr", "b.y4m", "extra"),  # an extra argument
        ("encode", "--bogus", "a.mkv", "a.zarr"),  # an unknown option
        ("encode", "a.mkv", "a.zarr", "--target-psnr", "high"),  # a value of the wrong type
        ("frobnicate",),  # an unknown command
        ("-q", "-v", "info", "a.zarr"),  # global options that exclude each other
    ],
)
def test_usage_errors_are_one_error_line_with_exit_1(run_cli, args):
    line = _one_error_line(run_cli(*args))
    assert "--help" in line and "╭" not in line  # names where help is, no usage box


def test_version_and_bare_command(run_cli):
    import palstream

    result = run_cli("--version")
    assert result.code == 0 and result.stdout.strip() == f"palstream {palstream.__version__}"
    result = run_cli()
    assert result.code == 0 and "Usage" in result.stdout and result.stdout.count("Usage") == 1


def test_quiet_silences_status_lines_but_not_results(run_cli, lossless_archive, tmp_path):
    loud = run_cli("verify", lossless_archive)
    assert loud.code == 0 and loud.stdout.startswith("ok:")
    quiet = run_cli("-q", "verify", lossless_archive)
    assert quiet.code == 0 and quiet.stdout == "" and quiet.stderr == ""
    info = run_cli("-q", "info", lossless_archive, "--json")
    assert info.code == 0 and json.loads(info.stdout)["status"] == "complete"


def test_unexpected_exception_is_one_line_and_verbose_shows_the_traceback(run_cli, lossless_archive, monkeypatch):
    import palstream.archive

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault\nsecond line")

    monkeypatch.setattr(palstream.archive, "open_archive", broken)
    line = _one_error_line(run_cli("verify", lossless_archive))
    assert "RuntimeError: simulated fault" in line and "second line" not in line and "-v" in line
    verbose = run_cli("-v", "verify", lossless_archive)
    assert verbose.code == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: unexpected RuntimeError")


def test_domain_error_with_verbose_shows_the_traceback_then_the_line(run_cli, tmp_path):
    quiet = _one_error_line(run_cli("info", tmp_path / "missing.zarr"))
    verbose = run_cli("-v", "info", tmp_path / "missing.zarr")
    assert verbose.code == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == quiet


def test_a_command_whose_extra_is_missing_names_the_extra(data_dir, tmp_path):
    """A plain install (no torch) reads archives; encoding then says which extra to install."""
    block_torch = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['palstream', *sys.argv[1:]]; "
        "from palstream.cli import main; main()"
    )
    archive = tmp_path / "a.zarr"
    result = subprocess.run(
        [sys.executable, "-c", block_torch, "encode", str(data_dir / "screen_37x29.mkv"), str(archive)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "'encode' extra" in line and "pip install 'palstream[encode]'" in line
    assert not archive.exists()


def test_altered_root_is_refused_unless_forced(run_cli, lossless_archive, tmp_path):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    root = path / "zarr.json"
    root.write_text(root.read_text().replace('"fps": "15/1"', '"fps": "25/1"'))
    out = tmp_path / "out.y4m"
    line = _one_error_line(run_cli("decode", path, out))
    assert "root metadata altered: source.fps changed" in line and "--force" in line and not out.exists()
    _one_error_line(run_cli("info", path))
    forced = run_cli("decode", path, out, "--force")
    assert forced.code == 0 and "warning: " in forced.stderr and out.exists()
    assert run_cli("info", path, "--force").code == 0
    assert _one_error_line(run_cli("verify", path))  # forcing reads it; it never makes it intact
