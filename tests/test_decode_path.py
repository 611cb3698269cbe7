"""The decode path: a decoder bounded by its data, outputs that are safe to write, the CLI's conventions.

Each test fails if the behaviour it names comes back (issues 13 and 20).
"""

from __future__ import annotations

import io as stdio
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from palstream import io
from palstream.codec import BitstreamError, EncoderConfig, decode_chunk, encode_chunk
from palstream.codec.chunk import HEADER, MAGIC, VERSION
from palstream.errors import InputError, PalstreamError
from palstream.pipeline import FILL, decode_file, encode_file

CHUNK_BYTES = 37 * 29 + 2 * 19 * 15  # one raw 4:2:0 frame of the 37x29 clip


def _one_error_line(result) -> str:
    assert result.code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def _header(frames: int, width: int, height: int, body: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, frames, width, height, 4, 8, 64, 0, len(body)) + body


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def clip(data_dir):
    url = str(data_dir / "screen_37x29.mkv")
    return url, io.read_frames(url)


# --- the decoder: work and memory follow the payload, not the header's claim ---------------


def test_a_20_byte_payload_declaring_5_frames_of_16384_squared_stops_at_once():
    """Was 43 s and 3.0 GB before reporting "truncated"; now a fresh process stays small and fast."""
    code = (
        "import resource, time; from palstream.codec import decode_chunk, BitstreamError\n"
        "from palstream.codec.chunk import HEADER, MAGIC, VERSION\n"
        "payload = HEADER.pack(MAGIC, VERSION, 0, 5, 16384, 16384, 4, 8, 64, 0, 0)\n"
        "decode_chunk(HEADER.pack(MAGIC, VERSION, 0, 1, 8, 8, 4, 8, 64, 0, 64) + bytes(64))\n"  # compiled, warm
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        "try:\n    decode_chunk(payload)\nexcept BitstreamError as exc:\n    print(exc)\n"
        "print(time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "truncated" in lines[0]
    seconds, megabytes = map(float, lines[1].split())
    assert seconds < 2.0 and megabytes < 64, lines  # one CTU row of context maps, not five 400 MB frames


def test_a_header_that_disagrees_with_the_archive_is_refused_before_decoding(clip):
    _, frames = clip
    payload = encode_chunk(frames[:2], EncoderConfig(lossless=True)).payload
    assert decode_chunk(payload, expected=(2, 29, 37)).tobytes() == frames[:2].tobytes()
    for expected in [(3, 29, 37), (2, 30, 37), (2, 29, 36)]:
        with pytest.raises(BitstreamError, match="the archive"):
            decode_chunk(payload, expected=expected)
    # the check comes before any allocation: 1024 frames of 16384x16384 are refused at once
    start = time.perf_counter()
    with pytest.raises(BitstreamError, match="the archive 2 frames of 37x29"):
        decode_chunk(_header(1024, 16384, 16384, bytes(100)), expected=(2, 29, 37))
    assert time.perf_counter() - start < 0.5


def test_a_chunk_of_many_frames_decodes_exactly(clip):
    """The decoder keeps three reference slots in turn: frames 3.. reuse them."""
    _, frames = clip
    six = frames[:6]
    assert decode_chunk(encode_chunk(six, EncoderConfig(lossless=True)).payload).tobytes() == six.tobytes()


def test_a_cut_body_is_truncated_wherever_it_is_cut(clip):
    _, frames = clip
    payload = encode_chunk(frames, EncoderConfig(lossless=True)).payload
    body = len(payload) - HEADER.size
    for keep in (0, body // 4, body // 2, body - 40):
        cut = payload[: HEADER.size + keep]
        cut = cut[:16] + keep.to_bytes(4, "little") + cut[20:]
        with pytest.raises(BitstreamError, match="truncated"):
            decode_chunk(cut)


# --- decode conventions: existing outputs, frame ranges, stdout ---------------------------------


def test_decode_refuses_an_existing_output_without_overwrite(run_cli, lossless_archive, tmp_path):
    out = tmp_path / "out.y4m"
    out.write_bytes(b"keep me")
    assert "--overwrite" in _one_error_line(run_cli("decode", lossless_archive, out))
    assert out.read_bytes() == b"keep me"
    assert run_cli("decode", lossless_archive, out, "--overwrite").code == 0
    assert len(io.read_frames(str(out))) == 6


@pytest.mark.parametrize("frames", ["0:7", "5:99", "-2:", "4:2", "3:3", "6:", "1:2:3", "a:b"])
def test_out_of_range_frames_are_an_error_not_clamped(run_cli, lossless_archive, tmp_path, frames):
    out = tmp_path / "part.y4m"
    line = _one_error_line(run_cli("decode", lossless_archive, out, f"--frames={frames}"))
    assert "frame range" in line
    assert not out.exists()


def test_frame_slices_are_checked_too(lossless_archive, tmp_path):
    with pytest.raises(PalstreamError, match="outside"):
        decode_file(str(lossless_archive), str(tmp_path / "a.yuv"), slice(0, 9))
    assert decode_file(str(lossless_archive), str(tmp_path / "b.yuv"), slice(4, None)).frames_written == 2


def _binary_stdout(monkeypatch) -> stdio.BytesIO:
    """sys.stdout as a text stream over bytes the test can read back (set inside the test:
    pytest re-installs its own capture when the test starts)."""
    raw = stdio.BytesIO()
    monkeypatch.setattr(sys, "stdout", stdio.TextIOWrapper(raw, write_through=True))
    return raw


def test_dash_is_stdout_in_y4m_or_raw(run_cli, lossless_archive, clip, tmp_path, monkeypatch):
    _, frames = clip
    file = tmp_path / "same.y4m"
    decode_file(str(lossless_archive), str(file))
    raw = _binary_stdout(monkeypatch)
    result = run_cli("decode", lossless_archive, "-")
    assert result.code == 0 and "6 frames" in result.stderr
    assert raw.getvalue() == file.read_bytes()
    assert not os.path.exists("-")
    raw = _binary_stdout(monkeypatch)
    assert run_cli("decode", lossless_archive, "-", "--format", "yuv", "--frames", "2:4").code == 0
    assert raw.getvalue() == frames[2:4].tobytes()


def test_format_names_only_what_stdout_can_carry(run_cli, lossless_archive, tmp_path):
    assert "stdout" in _one_error_line(run_cli("decode", lossless_archive, "-", "--format", "mkv"))
    assert "--format applies only" in _one_error_line(
        run_cli("decode", lossless_archive, tmp_path / "a.mkv", "--format", "y4m")
    )
    assert _files(tmp_path) == []


# --- damage keeps timing --------------------------------------------------------------------


def _damage_chunk_1(lossless_archive, tmp_path):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    stored = path / "chunks" / "000001" / "c" / "0"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    return path


def test_a_damaged_chunk_becomes_named_mid_grey_frames_and_later_frames_keep_their_time(
    run_cli, lossless_archive, clip, tmp_path
):
    _, frames = clip
    path = _damage_chunk_1(lossless_archive, tmp_path)
    out = tmp_path / "out.yuv"
    line = _one_error_line(run_cli("decode", path, out))
    assert "chunk 1 is damaged" in line and "frames 2..3 are mid-grey fill" in line and "all 6 frames" in line
    data = out.read_bytes()
    assert len(data) == 6 * CHUNK_BYTES
    assert data[: 2 * CHUNK_BYTES] == frames[:2].tobytes()
    assert set(data[2 * CHUNK_BYTES : 4 * CHUNK_BYTES]) == {FILL}
    assert data[4 * CHUNK_BYTES :] == frames[4:].tobytes()  # not shifted into the gap


def test_damage_fills_only_the_requested_frames_in_every_format(lossless_archive, clip, tmp_path):
    _, frames = clip
    path = _damage_chunk_1(lossless_archive, tmp_path)
    result = decode_file(str(path), str(tmp_path / "part.nut"), "3:5")
    assert result.frames_written == 2 and result.filled == [range(3, 4)] and [e.index for e in result.damaged] == [1]
    got = io.read_frames(str(tmp_path / "part.nut"))
    assert len(got) == 2 and (got.y[0] == FILL).all() and got.tobytes()[CHUNK_BYTES:] == frames[4:5].tobytes()


# --- safe outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["a.zarr/out.y4m", "a.zarr", "a.zarr/chunks/frame_%03d.png", "a.zarr/frames/"])
def test_an_output_inside_the_archive_is_refused(run_cli, lossless_archive, tmp_path, inside):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    before = _files(path)
    assert "inside the archive" in _one_error_line(run_cli("decode", path, tmp_path / inside, "--overwrite"))
    assert _files(path) == before
    link = tmp_path / "link"
    link.symlink_to(path)  # the same archive under another name
    assert "inside the archive" in _one_error_line(run_cli("decode", link, path / "x.yuv"))


def test_a_fifo_or_device_output_is_refused_without_hanging(run_cli, lossless_archive, tmp_path):
    fifo = tmp_path / "out.y4m"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a regression writes and returns rather than hang
    try:
        for extra in ([], ["--overwrite"]):
            assert "not a regular file" in _one_error_line(run_cli("decode", lossless_archive, fifo, *extra))
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.read(reader, 16) == b""
    finally:
        os.close(reader)
    device = tmp_path / "null.yuv"
    device.symlink_to(os.devnull)
    assert "not a regular file" in _one_error_line(run_cli("decode", lossless_archive, device, "--overwrite"))


@pytest.mark.parametrize("name", ["out.y4m", "out.yuv", "out.mkv", "frames", "pngs/f_%03d.png", "new/deeper/out.y4m"])
def test_a_failed_decode_leaves_nothing(lossless_archive, tmp_path, monkeypatch, name):
    from palstream.archive import Archive

    real = Archive.decode_chunk

    def fail_on_the_last(self, index):
        if index == 2:
            raise KeyboardInterrupt  # the user stops it, or a worker dies, after some frames are written
        return real(self, index)

    monkeypatch.setattr(Archive, "decode_chunk", fail_on_the_last)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        decode_file(str(lossless_archive), str(out / name))
    assert _files(out) == []


def test_a_failed_overwrite_keeps_the_old_output(lossless_archive, tmp_path, monkeypatch):
    from palstream.archive import Archive

    out = tmp_path / "out.mkv"
    decode_file(str(lossless_archive), str(out), "0:2")
    old = out.read_bytes()
    monkeypatch.setattr(Archive, "decode_chunk", lambda self, index: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        decode_file(str(lossless_archive), str(out), overwrite=True)
    assert out.read_bytes() == old and _files(tmp_path) == ["out.mkv"]


def test_png_outputs_replace_only_frames(run_cli, lossless_archive, tmp_path):
    folder = tmp_path / "frames"
    assert run_cli("decode", lossless_archive, folder).code == 0
    assert len(list(folder.glob("frame_*.png"))) == 6
    assert "--overwrite" in _one_error_line(run_cli("decode", lossless_archive, folder, "--frames", "0:2"))
    assert run_cli("decode", lossless_archive, folder, "--frames", "0:2", "--overwrite").code == 0
    assert len(list(folder.glob("frame_*.png"))) == 2  # no stale frames 2..5 from the first run
    (folder / "notes.txt").write_text("mine")
    assert "other files" in _one_error_line(run_cli("decode", lossless_archive, folder, "--overwrite"))
    pattern = tmp_path / "seq" / "f_%03d.png"
    assert run_cli("decode", lossless_archive, pattern).code == 0
    assert "--overwrite" in _one_error_line(run_cli("decode", lossless_archive, pattern))
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == [f"f_{i:03d}.png" for i in range(6)]
    assert "exactly one %d" in _one_error_line(run_cli("decode", lossless_archive, tmp_path / "f_%d_%d.png"))


@pytest.mark.parametrize("name", ["out.y4m", "out.yuv", "out.nut", "out.mkv", "pngs", "seq/f_%02d.png"])
def test_decode_file_writes_every_format(lossless_archive, clip, tmp_path, name):
    _, frames = clip
    out = tmp_path / name
    assert decode_file(str(lossless_archive), str(out)).frames_written == 6
    if name.endswith(".yuv"):
        assert out.read_bytes() == frames.tobytes()
    elif name.endswith((".y4m", ".nut", ".mkv")):
        assert io.read_frames(str(out)).tobytes() == frames.tobytes()
    else:
        assert len(list(out.parent.glob("*.png") if "%" in name else out.glob("*.png"))) == 6
    assert not [p for p in tmp_path.rglob(".*partial*")]


def test_remote_outputs_follow_the_same_rules(lossless_archive, clip, tmp_path):
    import fsspec

    _, frames = clip
    url = "memory://decode-path/out.yuv"
    decode_file(str(lossless_archive), url)
    assert fsspec.open(url, "rb").open().read() == frames.tobytes()
    with pytest.raises(PalstreamError, match="--overwrite"):
        decode_file(str(lossless_archive), url)
    with pytest.raises(PalstreamError, match="local paths"):
        decode_file(str(lossless_archive), "memory://decode-path/out.mkv")


# --- encode leaves nothing after a failure ------------------------------------------------------


def test_a_failed_encode_leaves_no_stub_and_no_new_folder(data_dir, tmp_path, monkeypatch):
    target = tmp_path / "new" / "deeper" / "a.zarr"
    with pytest.raises(InputError):
        encode_file(str(data_dir / "truncated.mkv"), str(target), EncoderConfig(lossless=True))
    assert _files(tmp_path) == []

    def broken(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr("palstream.pipeline.encode_chunk", broken)
    with pytest.raises(RuntimeError):
        encode_file(str(data_dir / "screen_37x29.mkv"), str(target), EncoderConfig(lossless=True, gop=2))
    assert _files(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_archive_byte_for_byte(data_dir, lossless_archive, tmp_path, monkeypatch):
    path = tmp_path / "a.zarr"
    shutil.copytree(lossless_archive, path)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr("palstream.pipeline.encode_chunk", broken)
    with pytest.raises(RuntimeError):
        encode_file(str(data_dir / "screen_37x29.mkv"), str(path), EncoderConfig(lossless=True, gop=3), overwrite=True)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["a.zarr"]  # no replacement left beside it


def test_an_output_below_a_file_is_one_line(run_cli, lossless_archive, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not a folder" in _one_error_line(run_cli("decode", lossless_archive, blocker / "out.y4m"))
    assert "is not a folder" in _one_error_line(run_cli("decode", lossless_archive, blocker))  # no extension: PNGs
    folder = tmp_path / "x.y4m"
    folder.mkdir()
    assert "is a folder" in _one_error_line(run_cli("decode", lossless_archive, folder, "--overwrite"))
    assert list(folder.iterdir()) == []
    assert blocker.read_text() == "x"


def test_video_is_not_written_to_a_terminal(run_cli, lossless_archive, monkeypatch):
    class Terminal(stdio.BytesIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", stdio.TextIOWrapper(terminal, write_through=True))
    assert "terminal" in _one_error_line(run_cli("decode", lossless_archive, "-"))
    assert terminal.getvalue() == b""
