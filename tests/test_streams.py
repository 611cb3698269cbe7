"""Whole-file archival (issue 17): every other stream, chapter, tag and the timing come back.

The sources are built at test time with FFmpeg (the static binary of imageio-ffmpeg), so each
test states exactly what it archives.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import pytest

from palstream.archive import ArchiveWriter, open_archive
from palstream.codec import EncoderConfig, encode_chunk
from palstream.errors import InputError
from palstream.io import probe, read_frames
from palstream.pipeline import decode_file, encode_file
from palstream.storage import Location

ffmpeg_exe = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe
# Tags every muxer writes itself (its own version, the stream's length): not the source's to keep.
MUXER_TAGS = {"ENCODER", "encoder", "DURATION", "major_brand", "minor_version", "compatible_brands", "handler_name"}


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def full_mkv(tmp_path_factory) -> Path:
    """H.264 + AAC + stereo PCM + SRT, two chapters, container and stream tags, an attached font."""
    folder = tmp_path_factory.mktemp("sources")
    (folder / "s.srt").write_text("1\n00:00:00,100 --> 00:00:00,500\nHello\n\n2\n00:00:00,600 --> 00:00:00,900\nWorld\n")
    (folder / "meta.txt").write_text(
        ";FFMETADATA1\ntitle=Test film\ndate=2026\n"
        "[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\nEND=500\ntitle=One\n"
        "[CHAPTER]\nTIMEBASE=1/1000\nSTART=500\nEND=1000\ntitle=Two\n"
    )
    (folder / "font.ttf").write_bytes(bytes(range(256)) * 8)
    path = folder / "full.mkv"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=1",
        "-f", "lavfi", "-i", "sine=frequency=220:sample_rate=44100:duration=1",
        "-i", str(folder / "s.srt"), "-i", str(folder / "meta.txt"),
        "-map", "0:v", "-map", "1:a", "-map", "2:a", "-map", "3:s", "-map_metadata", "4", "-map_chapters", "4",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a:0", "aac", "-c:a:1", "pcm_s16le", "-ac:a:1", "2",
        "-c:s", "srt", "-metadata:s:a:0", "language=eng", "-metadata:s:a:0", "title=Commentary",
        "-metadata:s:a:1", "language=fra", "-metadata:s:s:0", "language=deu", "-disposition:a:1", "default",
        "-attach", str(folder / "font.ttf"), "-metadata:s:t", "mimetype=application/x-truetype-font",
        "-metadata", "comment=kept", str(path),
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def full_archive(full_mkv, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archives") / "full.zarr"
    encode_file(str(full_mkv), str(path), EncoderConfig(gop=4))
    return path


def _contents(path: Path) -> dict:
    """Per stream (by index): type, tags, disposition, and every packet's sha256 and timestamps;
    plus the container's tags, chapters and attachments."""
    with av.open(str(path)) as container:
        streams = {
            s.index: {
                "type": s.type,
                "tags": {k: v for k, v in s.metadata.items() if k not in MUXER_TAGS},
                "disposition": int(s.disposition),
                "packets": [],
                "time_base": s.time_base,
            }
            for s in container.streams
        }
        for packet in container.demux():
            if packet.size:
                streams[packet.stream.index]["packets"].append(
                    (hashlib.sha256(bytes(packet)).hexdigest(), packet.pts, packet.dts, packet.duration)
                )
        attachments = {s.name: bytes(s.data) for s in container.streams if s.type == "attachment"}
        return {
            "streams": streams,
            "tags": {k: v for k, v in container.metadata.items() if k not in MUXER_TAGS},
            "chapters": container.chapters(),
            "attachments": attachments,
        }


def _frame_times(path: Path) -> list[Fraction]:
    """Presentation time of every decoded video frame, in seconds."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


def test_every_stream_chapter_tag_and_attachment_comes_back_bit_identical(full_mkv, full_archive, tmp_path):
    out = tmp_path / "out.mkv"
    decode_file(str(full_archive), str(out))
    source, result = _contents(full_mkv), _contents(out)
    assert [s["type"] for s in result["streams"].values()] == ["video", "audio", "audio", "subtitle", "attachment"]
    for index in (1, 2, 3):  # AAC, PCM, SRT: every packet's bytes, timestamps and duration
        back, original = result["streams"][index]["packets"], source["streams"][index]["packets"]
        assert [p[:3] for p in back] == [p[:3] for p in original], index
        # Matroska writes a last block's duration only where it differs from the default: not a packet property
        assert [p[3] for p in back[:-1]] == [p[3] for p in original[:-1]], index
        assert len(source["streams"][index]["packets"]) > 1
        assert result["streams"][index]["tags"] == source["streams"][index]["tags"]
        assert result["streams"][index]["disposition"] == source["streams"][index]["disposition"]
    assert result["streams"][1]["tags"] == {"language": "eng", "title": "Commentary"}
    assert result["tags"] == source["tags"] and result["tags"]["title"] == "Test film"
    assert result["chapters"] == source["chapters"] and len(result["chapters"]) == 2
    assert result["attachments"] == source["attachments"] == {"font.ttf": bytes(range(256)) * 8}
    assert _frame_times(out) == _frame_times(full_mkv)


def _dvd_subtitle_packet() -> bytes:
    """A DVD subpicture (SPU) of a 4x2 bitmap in colour 1: the bitmap subtitles of DVDs.

    FFmpeg cannot convert text subtitles to bitmaps, so the test writes the packet itself:
    size, control offset, one run-length coded line per field, then the control sequence
    (palette, alpha, area, field offsets, start display, end).
    """
    pixels = bytes([0x11, 0x11])  # 4 pixels of colour 1, top field line then bottom field line
    control_at = 4 + len(pixels)
    control = struct.pack(">HH", 0, control_at) + bytes(
        [0x03, 0x01, 0x23, 0x04, 0xFF, 0xF0, 0x05, 0x00, 0x00, 0x03, 0x00, 0x00, 0x01, 0x06, 0x00, 0x04, 0x00, 0x05, 0x01, 0xFF]
    )
    return struct.pack(">HH", 4 + len(pixels) + len(control), control_at) + pixels + control


def test_bitmap_subtitles_come_back_bit_identical(tmp_path):
    source = tmp_path / "bitmap.mkv"
    with av.open(str(source), "w") as container:
        video = container.add_stream("ffv1", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        subtitles = container.add_mux_stream("dvd_subtitle")
        subtitles.time_base = Fraction(1, 1000)
        subtitles.metadata["language"] = "fra"
        for t in range(3):
            frame = av.VideoFrame(64, 48, "yuv420p")
            frame.pts = t
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for start in (0, 150):
            packet = av.Packet(_dvd_subtitle_packet())
            packet.pts = packet.dts = start
            packet.duration, packet.time_base, packet.stream = 100, Fraction(1, 1000), subtitles
            container.mux(packet)
    archive, out = tmp_path / "bitmap.zarr", tmp_path / "out.mkv"
    encode_file(str(source), str(archive), EncoderConfig(lossless=True, gop=4))
    assert [(s["type"], s["codec"]) for s in open_archive(str(archive)).streams] == [("subtitle", "dvdsub")]
    decode_file(str(archive), str(out))
    original, back = _contents(source)["streams"][1], _contents(out)["streams"][1]
    assert [p[:3] for p in back["packets"]] == [p[:3] for p in original["packets"]] and len(back["packets"]) == 2
    assert back["tags"] == {"language": "fra"}
    with av.open(str(out)) as container:
        stream = container.streams.subtitles[0]
        planes = [r for p in container.demux(stream) if p.size for s in stream.codec_context.decode(p) for r in s]
    assert len(planes) == 2 and all(type(r).__name__ == "BitmapSubtitlePlane" for r in planes)


def test_info_lists_streams_and_verify_finds_a_flipped_audio_byte(full_archive, run_cli, tmp_path):
    info = run_cli("info", full_archive)
    assert info.code == 0
    assert "stream 1     audio aac, 48000 Hz" in info.stdout and ", eng," in info.stdout
    assert "stream 3     subtitle srt" in info.stdout and "font.ttf (application/x-truetype-font)" in info.stdout
    assert "chapters     2: One at 0.000 s, Two at 0.500 s" in info.stdout
    assert run_cli("verify", full_archive).code == 0
    damaged = tmp_path / "damaged.zarr"
    subprocess.run(["cp", "-r", str(full_archive), str(damaged)], check=True)
    audio_chunk = damaged / "streams" / "000001" / "data" / "c" / "0"  # the PCM track
    data = bytearray(audio_chunk.read_bytes())
    data[100] ^= 0x01
    audio_chunk.write_bytes(bytes(data))
    result = run_cli("verify", damaged)
    assert result.code == 1
    assert "1 of 4 streams damaged: stream 2 is damaged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    refused = run_cli("decode", damaged, tmp_path / "x.mkv")
    assert refused.code == 1 and "--drop-stream 2" in refused.stderr and not (tmp_path / "x.mkv").exists()
    assert run_cli("decode", damaged, tmp_path / "y.mkv", "--drop-stream", "2").code == 0


def test_info_states_a_larger_archive_as_larger(full_archive, run_cli):
    # 64x48 testsrc2 in H.264 is tiny; the palstream video plus PCM makes the archive larger or smaller:
    # whichever it is, the ratio is at least 1 and the word says which way it goes.
    archive = open_archive(str(full_archive))
    total = archive.payload_bytes() + sum(s["bytes"] for s in archive.streams)
    line = next(line for line in run_cli("info", full_archive).stdout.splitlines() if line.startswith("size"))
    word = "larger" if total > archive.source.size_bytes else "smaller"
    ratio = max(total, archive.source.size_bytes) / min(total, archive.source.size_bytes)
    assert f"{ratio:.2f}× {word} than the source file" in line


def test_mp4_output_refuses_a_stream_it_cannot_hold_by_name(full_archive, run_cli, tmp_path):
    result = run_cli("decode", full_archive, tmp_path / "out.mp4")
    assert result.code == 1
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'out.mp4'} cannot hold stream 2 (audio pcm_s16le); decode to .mkv, "
        "or leave it out with --drop-stream 2"
    )
    assert not (tmp_path / "out.mp4").exists()
    ok = run_cli("decode", full_archive, tmp_path / "out.mp4", "--drop-stream", "2", "--drop-stream", "3", "--drop-stream", "4")
    assert ok.code == 0, ok.stderr
    source = _contents(Path(open_archive(str(full_archive)).source.url))
    assert [p[0] for p in _contents(tmp_path / "out.mp4")["streams"][1]["packets"]] == [p[0] for p in source["streams"][1]["packets"]]


def test_video_only_and_y4m_leave_the_streams_out_with_a_warning(full_archive, run_cli, tmp_path):
    y4m = run_cli("decode", full_archive, tmp_path / "out.y4m")
    assert y4m.code == 0 and "4 other stream(s) and 2 chapter(s) are left out" in y4m.stderr
    only = run_cli("decode", full_archive, tmp_path / "only.mkv", "--video-only")
    assert only.code == 0 and only.stderr == ""
    assert [s["type"] for s in _contents(tmp_path / "only.mkv")["streams"].values()] == ["video"]


def test_dropped_streams_are_recorded_and_flac_keeps_pcm_samples(full_mkv, tmp_path, run_cli):
    archive = tmp_path / "flac.zarr"
    encode_file(str(full_mkv), str(archive), EncoderConfig(gop=10), audio="flac", drop_streams=(1,))
    reader = open_archive(str(archive))
    assert reader.attrs["dropped_streams"] == [
        {"source_index": 1, "type": "audio", "codec": "aac", "reason": "dropped by --drop-stream"}
    ]
    pcm = next(s for s in reader.streams if s["source_index"] == 2)
    assert pcm["codec"] == "flac" and pcm["transcoded_from"] == "pcm_s16le"
    assert "dropped      stream 1 (audio aac): dropped by --drop-stream" in run_cli("info", archive).stdout
    out = tmp_path / "flac.mkv"
    decode_file(str(archive), str(out))

    def samples(path, index):
        with av.open(str(path)) as container:
            stream = next(s for s in container.streams if s.type == "audio" and (index is None or s.index == index))
            return b"".join(bytes(frame.planes[0])[: frame.samples * 4] for frame in container.decode(stream))

    assert samples(out, None) == samples(full_mkv, 2)  # the PCM's samples, exactly


def test_flac_refuses_floating_point_audio_in_one_line(full_mkv, tmp_path):
    with pytest.raises(InputError, match=r"stream 1 of full.mkv \(aac\) decodes to fltp samples.*--audio copy$"):
        encode_file(str(full_mkv), str(tmp_path / "a.zarr"), EncoderConfig(), audio="flac")
    assert not (tmp_path / "a.zarr").exists()


def test_drop_stream_of_the_video_or_a_missing_stream_is_refused(full_mkv, tmp_path):
    for index in (0, 9):
        with pytest.raises(InputError, match=f"--drop-stream {index}: full.mkv has no such stream"):
            encode_file(str(full_mkv), str(tmp_path / "a.zarr"), EncoderConfig(), drop_streams=(index,))


def test_streams_are_written_exactly_once(full_mkv, full_archive, tmp_path):
    """What a resumed batch finalisation does: keep_streams on an archive that has them writes nothing."""
    copy = tmp_path / "copy.zarr"
    subprocess.run(["cp", "-r", str(full_archive), str(copy)], check=True)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    ArchiveWriter.open(str(copy)).keep_streams(str(full_mkv))
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before


def test_a_kill_before_the_streams_are_recorded_is_redone_whole(full_mkv, tmp_path, monkeypatch):
    """A finalisation killed after writing the stream arrays, before the root lists them: the
    resumed one writes them again and records them once; the archive verifies."""
    url = str(tmp_path / "resumed.zarr")
    config = EncoderConfig(lossless=True, gop=10)
    writer = ArchiveWriter.create(url, probe(str(full_mkv)), config)
    writer.write_chunk(0, encode_chunk(read_frames(str(full_mkv)), config))

    def killed(changes):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_root", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.keep_streams(str(full_mkv))
    assert (tmp_path / "resumed.zarr" / "streams").is_dir() and "streams" not in open_archive(url).attrs
    resumed = ArchiveWriter.open(url)
    resumed.keep_streams(str(full_mkv))
    resumed.finalize()
    archive = open_archive(url)
    assert len(archive.streams) == 4 and archive.verify() == [] and archive.verify_streams() == []


def test_vfr_timing_comes_back(data_dir, tmp_path):
    source = data_dir / "camera_48x32_vfr.mkv"
    archive = tmp_path / "vfr.zarr"
    encode_file(str(source), str(archive), EncoderConfig(gop=8))
    reader = open_archive(str(archive))
    assert not reader.source.constant_rate
    for out in (tmp_path / "vfr.mkv", tmp_path / "vfr.mp4"):
        decode_file(str(archive), str(out))
        assert _frame_times(out) == _frame_times(source), out.name
    with pytest.warns(UserWarning, match="constant frame rate"):
        decode_file(str(archive), str(tmp_path / "vfr.y4m"))


def test_mp4_with_a_start_offset_keeps_its_timing(tmp_path):
    source = tmp_path / "offset.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=48x32:rate=25:duration=0.4",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=0.4",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-output_ts_offset", "10", str(source),
    )  # fmt: skip
    assert _frame_times(source)[0] >= 10
    archive = tmp_path / "offset.zarr"
    encode_file(str(source), str(archive), EncoderConfig(gop=8))
    for out in (tmp_path / "offset.mkv", tmp_path / "offset_out.mp4"):
        decode_file(str(archive), str(out))
        assert [round(float(t), 3) for t in _frame_times(out)] == [round(float(t), 3) for t in _frame_times(source)]
        original, back = _contents(source)["streams"][1]["packets"], _contents(out)["streams"][1]["packets"]
        assert [p[0] for p in back] == [p[0] for p in original]
        tb_src, tb_out = _contents(source)["streams"][1]["time_base"], _contents(out)["streams"][1]["time_base"]
        # equal to within one tick of the output's time base (Matroska counts milliseconds; mp4 is exact)
        assert all(abs(p[1] * tb_out - q[1] * tb_src) <= tb_out for p, q in zip(back, original, strict=True))
        if out.suffix == ".mp4":
            assert back == original


@pytest.mark.slow
def test_interlaced_720x480_keeps_field_order_and_aspect(tmp_path, run_cli):
    """Recorded, shown, and restored in y4m and mp4 (field order and SAR) and in mkv (field order;
    Matroska takes the SAR from a stream field PyAV cannot set: an open item of issue 17)."""
    source = tmp_path / "interlaced.mkv"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=720x480:rate=30000/1001:duration=0.067",
        "-vf", "setsar=10/11", "-c:v", "libx264", "-flags", "+ildct+ilme", "-x264-params", "tff=1",
        "-pix_fmt", "yuv420p", str(source),
    )  # fmt: skip
    archive = tmp_path / "interlaced.zarr"
    encode_file(str(source), str(archive), EncoderConfig(gop=2))
    reader = open_archive(str(archive))
    # x264's top-field-first pictures: FFmpeg reports "bt" (bottom coded first, top displayed first)
    assert (reader.source.field_order, reader.source.sample_aspect_ratio) == ("bt", "10/11")
    assert "field order bt, pixel aspect 10/11" in run_cli("info", archive).stdout
    decode_file(str(archive), str(tmp_path / "out.y4m"))
    header = (tmp_path / "out.y4m").read_bytes().split(b"\n", 1)[0].split()
    assert b"It" in header and b"A10:11" in header
    for name in ("out.mkv", "out.mp4"):
        decode_file(str(archive), str(tmp_path / name))
        with av.open(str(tmp_path / name)) as container:
            stream = container.streams.video[0]
            frame = next(container.decode(stream))
            assert frame.interlaced_frame or stream.codec_context.field_order == 5, name  # 5: bt
            if name == "out.mp4":
                assert stream.sample_aspect_ratio == Fraction(10, 11)


def test_archives_without_streams_still_decode(data_dir, tmp_path):
    """The format-1 fixture records no streams, timing or field order: it decodes as before."""
    out = tmp_path / "v1.mkv"
    decode_file(str(data_dir / "screen_37x29_v1.zarr"), str(out))
    assert len(_frame_times(out)) == open_archive(str(data_dir / "screen_37x29_v1.zarr")).frame_count



def test_an_unknown_data_stream_is_kept_as_opaque_packets(tmp_path, run_cli):
    source = tmp_path / "data.ts"
    with av.open(str(source), "w") as container:
        video = container.add_stream("mpeg2video", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        data = container.add_data_stream()  # no codec: what FFmpeg calls an unknown data stream
        data.time_base = Fraction(1, 1000)
        for t in range(3):
            frame = av.VideoFrame(64, 48, "yuv420p")
            frame.pts = t
            container.mux(video.encode(frame))
            packet = av.Packet(b"opaque %d" % t)
            packet.pts = packet.dts = t * 100
            packet.time_base, packet.stream = Fraction(1, 1000), data
            container.mux(packet)
        container.mux(video.encode(None))
    archive = tmp_path / "data.zarr"
    encode_file(str(source), str(archive), EncoderConfig(gop=4))
    assert [(s["type"], s["codec"], s["parameters"]) for s in open_archive(str(archive)).streams] == [("data", "unknown", None)]
    refused = run_cli("decode", archive, tmp_path / "out.mkv")
    assert refused.code == 1
    assert refused.stderr == f"error: {tmp_path / 'out.mkv'} cannot hold stream 1 (data unknown); leave it out with --drop-stream 1\n"
    assert run_cli("decode", archive, tmp_path / "out.ts").code == 0  # MPEG-TS takes raw data streams
    assert _frame_times(tmp_path / "out.ts") == _frame_times(source)
    assert [p[:3] for p in _contents(tmp_path / "out.ts")["streams"][1]["packets"]] == [
        p[:3] for p in _contents(source)["streams"][1]["packets"]
    ]


def _batch_finalized(source: Path, archive: Path, config: EncoderConfig, **streams) -> dict:
    """An archive built as a batch job builds it: created by the driver, chunks by the units, the
    other streams and completion by ``finalize_archive``; returns the finalisation's outcome."""
    from palstream.batch.worker import FinalizeTask, finalize_archive

    info = probe(str(source))
    writer = ArchiveWriter.create(str(archive), info, config)
    for index, start in enumerate(range(0, info.frame_count, config.gop)):
        writer.write_chunk(index, encode_chunk(read_frames(str(source), start, config.gop), config))
    planned = {"audio": "copy", "drop_streams": (), **streams}
    fixity = Location(str(archive.parent / f"{archive.name}.fixity.json"))
    return finalize_archive(FinalizeTask(Location(str(archive)), Location(str(source)), info.size_bytes, info.sha256,
                                         planned["audio"], tuple(planned["drop_streams"]), fixity))


def test_batch_finalisation_keeps_the_streams_as_encode_does_and_writes_them_once(full_mkv, full_archive, tmp_path):
    archive = tmp_path / "batch.zarr"
    assert _batch_finalized(full_mkv, archive, EncoderConfig(gop=4))["outcome"] == "complete"
    batch, encoded = open_archive(str(archive)), open_archive(str(full_archive))
    assert batch.complete and batch.verify() == [] and batch.verify_streams() == []
    assert batch.streams == encoded.streams and len(batch.streams) == 4
    assert [batch.read_chunk(i) for i in range(batch.n_chunks)] == [encoded.read_chunk(i) for i in range(encoded.n_chunks)]
    decode_file(str(archive), str(tmp_path / "batch.mkv"))
    decode_file(str(full_archive), str(tmp_path / "encode.mkv"))
    assert _contents(tmp_path / "batch.mkv") == _contents(tmp_path / "encode.mkv")
    assert _frame_times(tmp_path / "batch.mkv") == _frame_times(full_mkv)
    # A resumed finalisation (the driver killed after the streams were recorded) writes none of them again.
    streams = {p: p.stat().st_mtime_ns for p in (archive / "streams").rglob("*") if p.is_file()}
    writer = ArchiveWriter.open(str(archive))
    writer.keep_streams(str(full_mkv))
    assert {p: p.stat().st_mtime_ns for p in (archive / "streams").rglob("*") if p.is_file()} == streams


def test_batch_finalisation_refuses_streams_it_cannot_keep_as_asked(full_mkv, tmp_path):
    outcome = _batch_finalized(full_mkv, tmp_path / "flac.zarr", EncoderConfig(gop=10), audio="flac")
    assert outcome["outcome"] == "refused" and "decodes to fltp samples" in outcome["reason"]
    assert not open_archive(str(tmp_path / "flac.zarr")).complete
    dropped = _batch_finalized(full_mkv, tmp_path / "drop.zarr", EncoderConfig(gop=10), drop_streams=(1,))
    assert dropped["outcome"] == "complete"
    assert [s["source_index"] for s in open_archive(str(tmp_path / "drop.zarr")).streams] == [2, 3, 4]


@pytest.mark.slow
def test_submit_of_a_library_gives_the_archive_encode_gives(full_mkv, full_archive, tmp_path):
    """The real batch (a local Dask cluster, worker processes): same streams, packets, chapters,
    tags, timing and chunks as ``palstream encode``; a resubmit keeping the streams otherwise is refused."""
    from palstream.batch.runner import run_job
    from palstream.batch.spec import JobSpec
    from palstream.errors import ConfigError

    job = {"inputs": [str(full_mkv)], "output": str(tmp_path / "out"), "workers": 1, "codec": {"gop": 4}}
    report = run_job(JobSpec.from_dict(job))
    assert report.complete, report.quarantined
    batch, encoded = open_archive(str(tmp_path / "out" / "full.zarr")), open_archive(str(full_archive))
    assert batch.complete and batch.verify() == [] and batch.verify_streams() == []
    for key in ("streams", "chapters", "container", "source"):
        assert batch.attrs.get(key) == encoded.attrs.get(key), key
    assert [batch.read_chunk(i) for i in range(batch.n_chunks)] == [encoded.read_chunk(i) for i in range(encoded.n_chunks)]
    decode_file(str(tmp_path / "out" / "full.zarr"), str(tmp_path / "batch.mkv"))
    decode_file(str(full_archive), str(tmp_path / "encode.mkv"))
    assert _contents(tmp_path / "batch.mkv") == _contents(tmp_path / "encode.mkv")
    assert _frame_times(tmp_path / "batch.mkv") == _frame_times(full_mkv)
    from palstream.batch.status import job_status

    assert [v["state"] for v in job_status(str(tmp_path / "out"))["videos"]] == ["complete"]
    with pytest.raises(ConfigError, match="already holds a different job"):
        run_job(JobSpec.from_dict({**job, "drop_streams": [1]}))
