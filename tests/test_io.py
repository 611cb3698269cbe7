"""Input probing, the 8-bit 4:2:0 input policy, and exact writers (palstream.io, palstream.writers)."""

from __future__ import annotations

import warnings

import fsspec
import numpy as np
import pytest

from palstream import io, writers
from palstream.errors import InputError
from palstream.frames import Frames
from palstream.storage import Location


def _same(a: Frames, b: Frames) -> bool:
    return all(np.array_equal(getattr(a, p), getattr(b, p)) for p in "yuv")


def test_probe_records_size_rate_and_fixity(data_dir):
    info = io.probe(str(data_dir / "screen_37x29.mkv"))
    assert (info.width, info.height, info.frame_count) == (37, 29, 6)
    assert info.fps == "15/1" and info.pix_fmt == "yuv420p"
    assert info.size_bytes == (data_dir / "screen_37x29.mkv").stat().st_size
    import hashlib

    assert info.sha256 == hashlib.sha256((data_dir / "screen_37x29.mkv").read_bytes()).hexdigest()
    assert info.color["range"] == "tv"
    assert set(info.color) == {"matrix", "range", "primaries", "transfer", "chroma_location"}
    assert io.SourceInfo.from_dict(info.to_dict()) == info


@pytest.mark.parametrize(
    "name, frames, size",
    [("camera_64x48.mkv", 5, (48, 64)), ("camera_48x32.mp4", 4, (32, 48)), ("camera_48x32.y4m", 3, (32, 48))],
)
def test_reads_exact_frame_counts_of_several_containers(data_dir, name, frames, size):
    info = io.probe(str(data_dir / name))
    got = io.read_frames(str(data_dir / name))
    assert info.frame_count == len(got) == frames
    assert got.y.shape[1:] == size and got.u.shape[1:] == ((size[0] + 1) // 2, (size[1] + 1) // 2)


def test_odd_sizes_keep_every_sample(data_dir):
    frames = io.read_frames(str(data_dir / "screen_37x29.mkv"))
    assert frames.y.shape == (6, 29, 37) and frames.u.shape == (6, 15, 19)


def test_chunks_and_ranges_agree_with_whole_read(data_dir):
    url = str(data_dir / "screen_37x29.mkv")
    whole = io.read_frames(url)
    chunks = list(io.iter_chunks(url, 4))
    assert [len(c) for c in chunks] == [4, 2]
    assert _same(Frames.concatenate(chunks), whole)
    assert _same(io.read_frames(url, start=2, count=3), whole[2:5])


def test_reads_through_fsspec_memory_url(data_dir):
    url = "memory://palstream-test-io/camera.mkv"
    with fsspec.open(url, "wb") as out:
        out.write((data_dir / "camera_64x48.mkv").read_bytes())
    assert io.probe(url).frame_count == 5
    assert _same(io.read_frames(url), io.read_frames(str(data_dir / "camera_64x48.mkv")))


def test_444_source_is_converted_with_a_warning_naming_the_loss(data_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = io.read_frames(str(data_dir / "anim_32x24_yuv444.mkv"))
    assert frames.u.shape == (3, 12, 16)
    messages = [str(w.message) for w in caught if issubclass(w.category, io.ConversionWarning)]
    assert len(messages) == 1 and "chroma" in messages[0]


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing.mkv", "does not exist"),
        ("not_a_video.mp4", "not a video"),
        ("audio_only.mkv", "no video stream"),
        ("subtitles_only.mkv", "no video stream"),
        ("truncated.mkv", "truncated"),
        ("corrupt.mkv", "corrupt"),
        ("zero_frames.y4m", "zero frames"),
        ("size_change.ts", "changes from 64x48"),
        ("anim_32x24_10bit.mkv", "10-bit"),
        ("anim_32x24_alpha.mkv", "alpha"),
    ],
)
def test_bad_inputs_raise_one_line_input_errors(data_dir, name, words):
    with pytest.raises(InputError) as err:
        io.probe(str(data_dir / name))
    message = str(err.value)
    assert words in message and "\n" not in message


def test_refused_formats_say_how_to_convert(data_dir):
    with pytest.raises(InputError, match="ffmpeg -pix_fmt yuv420p"):
        io.probe(str(data_dir / "anim_32x24_10bit.mkv"))


@pytest.mark.parametrize("suffix", [".y4m", ".yuv", ".mkv", ".nut"])
def test_lossless_writers_are_exact(data_dir, tmp_path, suffix):
    url = str(data_dir / "screen_37x29.mkv")
    source, frames = io.probe(url), io.read_frames(url)
    out = tmp_path / f"out{suffix}"
    assert writers.write_video(iter([frames[:4], frames[4:]]), str(out), source) == 6
    if suffix == ".yuv":
        assert out.read_bytes() == frames.tobytes()
    else:
        assert _same(io.read_frames(str(out)), frames)


def test_y4m_header_carries_rate_and_range(data_dir, tmp_path):
    url = str(data_dir / "screen_37x29.mkv")
    out = tmp_path / "out.y4m"
    writers.write_video([io.read_frames(url)], str(out), io.probe(url))
    header = out.read_bytes().split(b"\n", 1)[0].decode()
    assert header.startswith("YUV4MPEG2 W37 H29 F15:1 ")
    assert "XCOLORRANGE=LIMITED" in header.split()


def test_png_frames_and_h264_for_viewing(data_dir, tmp_path):
    url = str(data_dir / "screen_37x29.mkv")
    source, frames = io.probe(url), io.read_frames(url)
    assert writers.write_video([frames], str(tmp_path / "png"), source) == 6  # no extension: a folder of PNGs
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 6
    assert io.probe(str(pngs[0])).width == 37
    writers.write_video([frames], str(tmp_path / "view.mp4"), source)
    viewed = io.read_frames(str(tmp_path / "view.mp4"))
    assert len(viewed) == 6  # H.264 needs even sizes: padded to 38x30 for viewing
    assert np.abs(viewed.y[:, :29, :37].astype(int) - frames.y).mean() < 2


@pytest.mark.parametrize("name", ["camera_48x32_gop4.mp4", "camera_48x32_vfr.mkv", "camera_64x48.mkv"])
def test_ranges_read_by_seeking_equal_the_sequential_read(data_dir, name):
    url = str(data_dir / name)
    whole = io.read_frames(url)
    n = len(whole)
    for start in range(1, n):
        for count in (1, 3):
            assert _same(io.read_frames(url, start, count), whole[start : start + count]), (start, count)


def test_seeking_is_used_for_constant_rate_and_refused_for_variable_rate(data_dir):
    # mid-GOP starts in H.264 with B-frames: seek to the keyframe before, then decode forward
    assert all(io._read_by_seeking(Location(str(data_dir / "camera_48x32_gop4.mp4")), s, s + 2) for s in range(1, 10))
    # timestamps jump after frame 4: frame numbers cannot be derived from time, so decode from the start
    assert io._read_by_seeking(Location(str(data_dir / "camera_48x32_vfr.mkv")), 6, 8) is None


def test_video_outputs_carry_the_recorded_colour_metadata(data_dir, tmp_path):
    import dataclasses

    url = str(data_dir / "screen_37x29.mkv")
    source = io.probe(url)
    tagged = dataclasses.replace(source, color={**source.color, "matrix": "bt709", "primaries": "bt709"})
    writers.write_video([io.read_frames(url)], str(tmp_path / "out.mkv"), tagged)
    color = io.probe(str(tmp_path / "out.mkv")).color
    assert (color["matrix"], color["primaries"], color["range"]) == ("bt709", "bt709", "tv")
