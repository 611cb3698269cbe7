"""Truncated, damaged and non-regular inputs: refused the same way on every call and path, kept
only on request (issue 13 item 1, issue 20 item 4); one-line storage errors against real S3."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import av
import fsspec
import numpy as np
import pytest

from palstream import io
from palstream.archive import open_archive
from palstream.errors import InputError
from palstream.frames import Frames
from palstream.storage import Location, redact_url

Y4M_HEADER, Y4M_FRAME = 76, 6 + 48 * 32 * 3 // 2  # camera_48x32.y4m: header line, "FRAME\n" + 4:2:0 samples


def _packet_ends(path) -> list[int]:
    """Byte offset where each video packet's data ends, in file order."""
    with av.open(str(path)) as container:
        return sorted(p.pos + p.size for p in container.demux(video=0) if p.size)


@pytest.fixture(scope="module")
def faststart_mp4(tmp_path_factory):
    """H.264 in MP4 with the index (moov) before the media (mdat), 12 frames: a cut keeps the index."""
    path = tmp_path_factory.mktemp("mp4") / "camera_faststart.mp4"
    source = os.path.join(os.path.dirname(__file__), "data", "camera_48x32_gop4.mp4")
    with av.open(source) as src, av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return path


def _cuts(data_dir, faststart_mp4):
    """(name, source, cut offset) for every truncation the tests cover."""
    mkv = data_dir / "camera_64x48.mkv"
    mkv_ends = _packet_ends(mkv)
    mp4_ends = _packet_ends(faststart_mp4)
    return {
        "y4m-in-header": (data_dir / "camera_48x32.y4m", 40),
        "y4m-mid-frame": (data_dir / "camera_48x32.y4m", Y4M_HEADER + Y4M_FRAME + 1000),
        "y4m-between-frames": (data_dir / "camera_48x32.y4m", Y4M_HEADER + 2 * Y4M_FRAME + 3),  # inside "FRAME"
        "mkv-in-header": (mkv, 500),
        "mkv-mid-frame": (mkv, mkv_ends[2] - 700),
        "mkv-at-block-boundary": (mkv, mkv_ends[2]),
        "mkv-after-last-frame": (mkv, mkv_ends[-1]),  # the last frame's bytes all there; its cluster, cues, tags not
        "mp4-in-index": (faststart_mp4, 600),
        "mp4-after-index": (faststart_mp4, _mdat_start(faststart_mp4)),
        "mp4-mid-sample": (faststart_mp4, mp4_ends[5] - 20),
        "mp4-at-sample-boundary": (faststart_mp4, mp4_ends[7]),
        "mp4-moov-at-end": (data_dir / "camera_48x32.mp4", 1500),  # plain mp4: the cut takes the index
    }


def _mdat_start(path) -> int:
    data = path.read_bytes()
    offset = 0
    while data[offset + 4 : offset + 8] != b"mdat":
        offset += int.from_bytes(data[offset : offset + 4], "big")
    return offset + 8


CUTS = [
    "y4m-in-header",
    "y4m-mid-frame",
    "y4m-between-frames",
    "mkv-in-header",
    "mkv-mid-frame",
    "mkv-at-block-boundary",
    "mkv-after-last-frame",
    "mp4-in-index",
    "mp4-after-index",
    "mp4-mid-sample",
    "mp4-at-sample-boundary",
    "mp4-moov-at-end",
]


@pytest.fixture
def cut_file(data_dir, faststart_mp4, tmp_path):
    def make(case: str):
        source, offset = _cuts(data_dir, faststart_mp4)[case]
        path = tmp_path / f"cut{source.suffix}"
        path.write_bytes(source.read_bytes()[:offset])
        return path, source

    return make


@pytest.mark.parametrize("case", CUTS)
def test_each_truncation_is_refused_by_every_probe_in_one_process(cut_file, case):
    path, _ = cut_file(case)
    messages = []
    for _ in range(3):  # PyAV drops a log line equal to the previous one: a repeat must still be refused
        with pytest.raises(InputError) as err:
            io.probe(str(path))
        messages.append(str(err.value))
    assert len(set(messages)) == 1
    assert messages[0].startswith("cut.") and "\n" not in messages[0]
    assert "truncated" in messages[0] and "re-copy or re-export" in messages[0]


def test_damage_that_only_ffmpeg_logs_is_refused_every_time(data_dir, tmp_path):
    # an FFV1 slice CRC mismatch: the decoder conceals it and only logs it
    data = bytearray((data_dir / "camera_64x48.mkv").read_bytes())
    data[6356:6364] = bytes(b ^ 0x5A for b in data[6356:6364])
    path = tmp_path / "damaged.mkv"
    path.write_bytes(bytes(data))
    for _ in range(3):
        with pytest.raises(InputError, match=r"damaged.mkv is corrupt: frame data after frame 3 is damaged \(slice CRC mismatch"):
            io.probe(str(path))


@pytest.mark.parametrize("offset", [1650, 1850, 2140])
def test_h264_damage_logged_with_the_same_line_each_time_is_refused_every_time(data_dir, tmp_path, offset):
    # H.264 conceals these and logs one line, identical on every decode: with PyAV's repeat
    # de-duplication on, the second probe of the file in a process saw no error and passed
    data = bytearray((data_dir / "camera_48x32_gop4.mp4").read_bytes())
    data[offset : offset + 4] = bytes(b ^ 0xFF for b in data[offset : offset + 4])
    path = tmp_path / "damaged.mp4"
    path.write_bytes(bytes(data))
    for _ in range(3):
        with pytest.raises(InputError, match="damaged.mp4 is corrupt: "):
            io.probe(str(path))


def test_metadata_that_is_not_utf8_is_one_line(data_dir, tmp_path):
    data = bytearray((data_dir / "camera_48x32_gop4.mp4").read_bytes())
    at = data.index(b"VideoHandler")
    data[at + 1] ^= 0xAA
    path = tmp_path / "bad_text.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="bad_text.mp4 is corrupt: its metadata is not valid UTF-8"):
        io.probe(str(path))


def test_complete_files_in_the_same_formats_pass(data_dir, faststart_mp4):
    for path in (data_dir / "camera_48x32.y4m", data_dir / "camera_64x48.mkv", faststart_mp4, data_dir / "camera_48x32.mp4"):
        assert io.probe(str(path)).truncated is None


@pytest.mark.parametrize("case", CUTS)
def test_each_truncation_is_refused_by_encode_with_one_line(run_cli, cut_file, tmp_path, case):
    path, _ = cut_file(case)
    result = run_cli("encode", path, tmp_path / "out.zarr", "--lossless", "--gop", "2")
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cut.") and "truncated" in lines[0]
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    "case, kept", [("y4m-mid-frame", 1), ("mkv-mid-frame", 2), ("mp4-mid-sample", None), ("mkv-after-last-frame", 4)]
)
def test_allow_truncated_keeps_the_frames_before_the_cut_and_records_it(run_cli, cut_file, tmp_path, case, kept):
    path, source = cut_file(case)
    info = io.probe(str(path), allow_truncated=True)
    record = info.truncated
    assert record["decoded_frames"] == info.frame_count and record["reason"] and record["damaged"] is False
    assert record["file_bytes"] == path.stat().st_size
    if kept is not None:
        assert info.frame_count == kept
    # the readers yield exactly the probed frames, equal to the source's first frames
    frames = Frames.concatenate(list(io.iter_chunks(str(path), 2, frame_count=info.frame_count)))
    whole = io.read_frames(str(source))
    assert len(frames) == info.frame_count >= 1 and frames.tobytes() == whole[: info.frame_count].tobytes()

    out = tmp_path / "kept.zarr"
    result = run_cli("encode", path, out, "--lossless", "--gop", "2", "--allow-truncated")
    assert result.code == 0, result.stderr
    archive = open_archive(str(out))
    assert archive.frame_count == info.frame_count
    assert archive.source.truncated == record


def test_readers_never_yield_fewer_frames_than_asked(data_dir, tmp_path):
    # a y4m file cut exactly between two frames is a valid 2-frame file: nothing can tell it was cut,
    # but a reader asked for the 3 frames a probe of the whole file fixed must not return 2
    path = tmp_path / "short.y4m"
    path.write_bytes((data_dir / "camera_48x32.y4m").read_bytes()[: Y4M_HEADER + 2 * Y4M_FRAME])
    assert io.probe(str(path)).frame_count == 2
    with pytest.raises(InputError, match="short.y4m ends after 2 frames but was probed with 3"):
        list(io.iter_chunks(str(path), 2, frame_count=3))
    with pytest.raises(InputError, match="short.y4m ends after frame 2, inside the asked range"):
        io.read_frames(str(path), 1, 3, exact=True)
    assert len(io.read_frames(str(path), 1, 3)) == 1  # without exact, count is a maximum
    assert len(list(io.iter_chunks(str(path), 1, frame_count=1))) == 1  # and stops at the probed count


def test_a_damaged_stream_raises_in_readers_without_a_probed_count(cut_file):
    path, _ = cut_file("mkv-mid-frame")
    with pytest.raises(InputError, match="cut.mkv is corrupt"):
        list(io.iter_chunks(str(path), 2))


def test_old_source_records_read_as_complete(data_dir):
    record = io.probe(str(data_dir / "screen_37x29.mkv")).to_dict()
    del record["truncated"]  # written before the field existed
    assert io.SourceInfo.from_dict(record).truncated is None


def _finishes(call, seconds: float = 20.0):
    """Run ``call`` in a thread; return what it raised (it must not hang)."""
    outcome = {}

    def run():
        try:
            call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung on a non-regular input"
    return outcome.get("error")


def test_a_fifo_is_refused_before_it_is_opened(tmp_path, run_cli):
    fifo = tmp_path / "clip.mkv"
    os.mkfifo(fifo)
    error = _finishes(lambda: io.probe(str(fifo)))
    assert isinstance(error, InputError) and "named pipe (FIFO)" in str(error) and "copy" in str(error)
    assert isinstance(_finishes(lambda: io.read_frames(f"file://{fifo}")), InputError)
    result = run_cli("encode", fifo, tmp_path / "out.zarr")
    assert result.code == 1 and result.stderr.startswith("error: input ") and "FIFO" in result.stderr


def test_devices_and_sockets_are_refused(tmp_path):
    with pytest.raises(InputError, match="is a character device"):
        io.probe("/dev/null")
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(InputError, match="is a socket"):
            io.probe(str(path))


S3_KEYS = {"key": "test", "secret": "test", "skip_instance_cache": True}


@pytest.fixture
def s3_clip(s3_endpoint, data_dir):
    url = "s3://archives/inputs/camera.mkv"
    with fsspec.open(url, "wb", endpoint_url=s3_endpoint, **S3_KEYS) as out:
        out.write((data_dir / "camera_64x48.mkv").read_bytes())
    return url


def test_credentials_in_an_input_url_are_stored_redacted(s3_endpoint, s3_clip):
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    presigned = client.generate_presigned_url("get_object", {"Bucket": "archives", "Key": "inputs/camera.mkv"})
    assert "X-Amz-Signature=" in presigned
    info = io.probe(presigned)
    assert info.name == "camera.mkv" and info.frame_count == 5
    assert info.url == redact_url(presigned) and "X-Amz-Signature=***" in info.url
    assert "Signature=" + presigned.split("Signature=")[1] not in str(info.to_dict())


def test_credentials_in_an_s3_url_stay_out_of_errors(s3_endpoint):
    options = {"endpoint_url": s3_endpoint, "skip_instance_cache": True}
    with pytest.raises(InputError) as err:
        io.probe(Location("s3://AKIDEXAMPLE:s3cr3t@archives/inputs/camera.mkv", options))
    message = str(err.value)
    assert "s3cr3t" not in message and "AKIDEXAMPLE" not in message and "\n" not in message
    assert message.startswith("cannot read input s3://***@archives/inputs/camera.mkv")


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _one_line_input_error(call) -> str:
    with pytest.raises(InputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_s3_input_without_credentials_is_one_line(s3_endpoint, s3_clip, no_aws_credentials):
    message = _one_line_input_error(lambda: io.probe(Location(s3_clip, {"endpoint_url": s3_endpoint, "skip_instance_cache": True})))
    assert "no usable storage credentials" in message and "AWS_ACCESS_KEY_ID" in message


def test_s3_input_in_a_missing_bucket_is_one_line(s3_endpoint):
    message = _one_line_input_error(lambda: io.probe(Location("s3://no-such-bucket/x.mkv", {"endpoint_url": s3_endpoint, **S3_KEYS})))
    assert "bucket no-such-bucket does not exist" in message


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_s3_input_at_a_closed_port_is_one_line():
    endpoint = f"http://127.0.0.1:{_free_port()}"
    message = _one_line_input_error(lambda: io.probe(Location("s3://archives/x.mkv", {"endpoint_url": endpoint, **S3_KEYS})))
    assert f"no storage endpoint answers at {endpoint}" in message and "--endpoint-url" in message


def test_s3_input_with_an_invalid_endpoint_is_one_line():
    message = _one_line_input_error(lambda: io.probe(Location("s3://archives/x.mkv", {"endpoint_url": "127.0.0.1:9", **S3_KEYS})))
    assert "Invalid endpoint" in message and "http(s)://host:port" in message


@pytest.mark.slow
def test_s3_input_from_an_endpoint_that_never_answers_is_one_line():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        options = {"endpoint_url": endpoint, **S3_KEYS, "config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}
        message = _one_line_input_error(lambda: io.probe(Location("s3://archives/x.mkv", options)))
    assert "timed out" in message and "--endpoint-url" in message


@pytest.fixture
def authenticating_s3(data_dir):
    """A moto S3 server of its own (a process: its auth switch is global) that checks credentials."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, **S3_KEYS)
        fs.mkdir("locked")
        fs.pipe_file("locked/camera.mkv", (data_dir / "camera_64x48.mkv").read_bytes())
        # from now on every request needs an IAM user's keys, which "test" is not
        urllib.request.urlopen(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
            )
        )
        yield endpoint
    finally:
        server.terminate()
        server.wait(30)


def test_s3_input_with_access_denied_is_one_line(authenticating_s3):
    options = {"endpoint_url": authenticating_s3, **S3_KEYS}
    message = _one_line_input_error(lambda: io.probe(Location("s3://locked/camera.mkv", options)))
    assert "cannot read input s3://locked/camera.mkv: access denied (" in message and "AWS_ACCESS_KEY_ID" in message


def test_decoded_frames_of_a_kept_source_are_unchanged_by_threading(data_dir):
    # probe and readers decode in the calling thread (for the log capture); the samples are the same
    url = str(data_dir / "camera_48x32_gop4.mp4")
    with av.open(url) as container:
        threaded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    ours = io.read_frames(url)
    assert len(threaded) == len(ours)
    assert all(np.array_equal(t[:32], y) for t, y in zip(threaded, ours.y))


def test_probe_leaves_pyav_logging_as_it_found_it(cut_file):
    path, _ = cut_file("mkv-mid-frame")
    av.logging.set_skip_repeated(True)  # PyAV's default, which made the second probe pass
    level = av.logging.get_level()
    for _ in range(2):
        with pytest.raises(InputError, match="truncated"):
            io.probe(str(path))
    assert av.logging.get_skip_repeated() is True and av.logging.get_level() == level


def test_concurrent_probes_keep_their_verdicts_apart(data_dir, tmp_path):
    # Dask workers probe in threads: one thread's FFmpeg errors must not reach another's verdict
    from concurrent.futures import ThreadPoolExecutor

    data = bytearray((data_dir / "camera_64x48.mkv").read_bytes())
    data[6356:6364] = bytes(b ^ 0x5A for b in data[6356:6364])
    damaged = tmp_path / "damaged.mkv"
    damaged.write_bytes(bytes(data))
    good = str(data_dir / "camera_64x48.mkv")

    def verdict(path):
        try:
            return io.probe(str(path)).frame_count
        except InputError:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(verdict, [damaged, good] * 12))
    assert got == ["refused", 5] * 12


def test_encode_from_s3_with_a_missing_bucket_is_one_line(run_cli, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    result = run_cli("encode", "s3://no-such-bucket/x.mkv", tmp_path / "out.zarr", "--endpoint-url", s3_endpoint)
    assert result.code == 1
    assert result.stderr.strip().splitlines() == [
        "error: cannot read input s3://no-such-bucket/x.mkv: bucket no-such-bucket does not exist; "
        "check the URL or create the bucket"
    ]
