"""The zarr v3 archive container: commit protocol, resume, fixity, damage isolation, malformed metadata."""

from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pytest
import zarr

from palstream import io
from palstream.archive import ArchiveWriter, open_archive
from palstream.pipeline import decode_file, encode_file
from palstream.codec import EncodedChunk, EncoderConfig, encode_chunk
from palstream.errors import ArchiveError, DamagedChunkError, InputError
from palstream.frames import Frames

CONFIG = EncoderConfig(lossless=True, gop=2)


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, p), getattr(b, p)) for p in "yuv")


def _decode_all(archive):
    return Frames.concatenate(list(archive.decode()))


def _chunk_file(archive, index: int):
    return archive / "chunks" / f"{index:06d}" / "c" / "0"


@pytest.fixture
def source(data_dir):
    url = str(data_dir / "screen_37x29.mkv")
    return url, io.probe(url), list(io.iter_chunks(url, CONFIG.gop))


@pytest.fixture
def copy_of(lossless_archive, tmp_path):
    def make():
        path = tmp_path / "copy.zarr"
        shutil.copytree(lossless_archive, path)
        return path

    return make


def test_layout_and_self_describing_attributes(lossless_archive, data_dir):
    archive = open_archive(str(lossless_archive))
    attrs = archive.attrs
    assert attrs["format"] == "palstream" and attrs["format_version"] == 1 and attrs["status"] == "complete"
    assert (attrs["n_chunks"], attrs["frame_count"], attrs["gop"]) == (3, 6, 2)
    assert attrs["source"]["sha256"] == io.probe(str(data_dir / "screen_37x29.mkv")).sha256
    assert attrs["encoder"]["config"] == CONFIG.to_dict()
    assert attrs["encoder"]["config_digest"] == CONFIG.digest
    assert attrs["encoder"]["palette_generator"]["name"] == "kmeans"
    meta = json.loads((lossless_archive / "chunks" / "000001" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"]
    assert meta["data_type"] == "uint8" and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
    chunk = archive.chunk_attrs(1)
    assert (chunk["frames"], chunk["first_frame"]) == (2, 2) and len(chunk["sha256"]) == 64
    assert attrs["payload_bytes"] == archive.payload_bytes() == sum(len(archive.read_chunk(i)) for i in range(3))


def test_lossless_round_trip_is_exact(lossless_archive, source, tmp_path):
    url, _, chunks = source
    result = decode_file(str(lossless_archive), str(tmp_path / "out.y4m"))
    assert result.frames_written == 6 and not result.damaged
    assert _same(io.read_frames(str(tmp_path / "out.y4m")), io.read_frames(url))


def test_frame_ranges_cross_chunk_boundaries(lossless_archive, source):
    url, _, _ = source
    archive = open_archive(str(lossless_archive))
    whole = io.read_frames(url)
    assert _same(Frames.concatenate(list(archive.decode(1, 5))), whole[1:5])
    with pytest.raises(ArchiveError):
        list(archive.decode(4, 9))


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(source, tmp_path, scheme):
    url, _, _ = source
    target = f"file://{tmp_path}/a.zarr" if scheme == "file" else f"memory://palstream-tests/{tmp_path.name}.zarr"
    archive = encode_file(url, target, CONFIG)
    assert archive.complete and archive.verify() == []
    assert _same(_decode_all(archive), io.read_frames(url))


def test_commit_marker_is_written_last_and_resume_finishes(source, tmp_path):
    url, info, chunks = source
    path = str(tmp_path / "job.zarr")
    writer = ArchiveWriter.create(path, info, CONFIG)
    assert writer.n_chunks == 3 and writer.committed() == set()
    writer.write_chunk(0, encode_chunk(chunks[0], CONFIG))
    writer.write_chunk(2, encode_chunk(chunks[2], CONFIG))
    with pytest.raises(ArchiveError, match="lacks 1 chunk"):
        writer.finalize()
    assert open_archive(path).attrs["status"] == "incomplete"
    # A later process resumes: only chunk 1 is left.
    resumed = ArchiveWriter.open(path)
    assert resumed.committed() == {0, 2}
    resumed.write_chunk(1, encode_chunk(chunks[1], CONFIG))
    resumed.write_chunk(1, encode_chunk(chunks[1], CONFIG))  # a duplicate task: idempotent
    resumed.finalize()
    archive = open_archive(path)
    assert archive.complete and _same(_decode_all(archive), io.read_frames(url))


def test_data_without_marker_is_not_committed(source, tmp_path):
    url, info, chunks = source
    path = tmp_path / "job.zarr"
    writer = ArchiveWriter.create(str(path), info, CONFIG)
    for i, frames in enumerate(chunks):
        writer.write_chunk(i, encode_chunk(frames, CONFIG))
    shutil.rmtree(path / "commits" / "000001")  # as if the task died between data and marker
    assert writer.committed() == {0, 2}
    errors = open_archive(str(path)).verify()
    assert [e.index for e in errors] == [1] and "not written" in errors[0].reason


def test_marker_that_disagrees_with_data_is_not_committed(source, tmp_path):
    url, info, chunks = source
    path = tmp_path / "job.zarr"
    writer = ArchiveWriter.create(str(path), info, CONFIG)
    for i, frames in enumerate(chunks):
        writer.write_chunk(i, encode_chunk(frames, CONFIG))
    marker = zarr.open_group(str(path / "commits" / "000002"), mode="r+")
    marker.attrs["sha256"] = "0" * 64
    assert writer.committed() == {0, 1}


def test_write_chunk_checks_frame_count(source, tmp_path):
    _, info, chunks = source
    writer = ArchiveWriter.create(str(tmp_path / "a.zarr"), info, CONFIG)
    with pytest.raises(ArchiveError, match="expected 2"):
        writer.write_chunk(0, EncodedChunk(b"x", {"frames": 3}))
    with pytest.raises(ArchiveError, match="does not exist"):
        writer.write_chunk(3, encode_chunk(chunks[0], CONFIG))


def test_flipped_bytes_are_found_and_other_chunks_still_decode(copy_of, source, tmp_path):
    url, _, chunks = source
    path = copy_of()
    stored = _chunk_file(path, 1)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    archive = open_archive(str(path))
    damaged = archive.verify()
    assert [e.index for e in damaged] == [1]
    with pytest.raises(DamagedChunkError):
        archive.read_chunk(1)
    result = decode_file(str(path), str(tmp_path / "rest.y4m"))
    assert result.frames_written == 4 and [e.index for e in result.damaged] == [1]
    whole = io.read_frames(url)
    rest = io.read_frames(str(tmp_path / "rest.y4m"))
    assert _same(rest[:2], whole[:2]) and _same(rest[2:], whole[4:])


def test_missing_payload_object_is_damage_not_zeros(copy_of):
    path = copy_of()
    _chunk_file(path, 0).unlink()
    damaged = open_archive(str(path)).verify()
    assert [e.index for e in damaged] == [0] and "missing" in damaged[0].reason


def test_sha_mismatch_in_metadata_is_damage(copy_of):
    path = copy_of()
    meta_path = path / "chunks" / "000002" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["sha256"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    assert [e.index for e in open_archive(str(path)).verify()] == [2]


def _edit_root(path, **changes):
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta["attributes"].pop(key)
        else:
            meta["attributes"][key] = value
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"status": None}, "missing attribute"),
        ({"format": "other"}, "not a palstream archive"),
        ({"format_version": 99}, "format version 99"),
        ({"n_chunks": 10**12}, "n_chunks"),
        ({"frame_count": -1}, "frame_count"),
        ({"gop": 0}, "gop"),
        ({"source": {"width": 3}}, "source"),
        ({"source": "a string"}, "source"),
    ],
)
def test_malformed_root_metadata_is_an_archive_error(copy_of, changes, words):
    path = copy_of()
    _edit_root(path, **changes)
    with pytest.raises(ArchiveError, match=words):
        open_archive(str(path))


@pytest.mark.parametrize(
    "key, value, words", [("width", 10**7, "width"), ("height", "12", "height"), ("fps", "1/0", "source")]
)
def test_declared_source_values_out_of_range_are_errors(copy_of, key, value, words):
    path = copy_of()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["source"][key] = value
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ArchiveError, match=words):
        open_archive(str(path))


def test_unknown_attributes_are_ignored(copy_of):
    path = copy_of()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["source"]["added_later"] = 1
    meta["attributes"]["added_later"] = {"x": 1}
    (path / "zarr.json").write_text(json.dumps(meta))
    assert open_archive(str(path)).verify() == []


def test_declared_chunk_length_mismatch_is_damage(copy_of):
    path = copy_of()
    meta_path = path / "chunks" / "000000" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [10**9]
    meta_path.write_text(json.dumps(meta))
    damaged = open_archive(str(path)).verify()
    assert [e.index for e in damaged] == [0]


def test_existing_output_and_unwritable_location_are_refused_before_work(source, tmp_path, lossless_archive):
    url, info, _ = source
    with pytest.raises(ArchiveError, match="--overwrite"):
        ArchiveWriter.create(str(lossless_archive), info, CONFIG)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ArchiveError, match="cannot write"):
        encode_file(url, str(blocker / "a.zarr"), CONFIG)
    other = tmp_path / "not_an_archive"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="not a palstream archive"):
        encode_file(url, str(other), CONFIG, overwrite=True)
    assert (other / "precious.txt").exists()


def test_overwrite_replaces_an_archive(source, copy_of):
    url, _, _ = source
    path = copy_of()
    (path / "chunks" / "000009").mkdir()  # debris of another run
    archive = encode_file(url, str(path), EncoderConfig(lossless=True, gop=3), overwrite=True)
    assert archive.n_chunks == 2 and not (path / "chunks" / "000009").exists()


def test_failed_encode_leaves_no_archive(data_dir, tmp_path):
    target = tmp_path / "bad.zarr"
    with pytest.raises(InputError):
        encode_file(str(data_dir / "truncated.mkv"), str(target), CONFIG)
    assert not target.exists()


def test_decoding_twice_gives_identical_bytes(lossless_archive, tmp_path):
    first, second = tmp_path / "1.yuv", tmp_path / "2.yuv"
    decode_file(str(lossless_archive), str(first))
    decode_file(str(lossless_archive), str(second))
    assert first.read_bytes() == second.read_bytes()


def test_s3_archive_round_trip_and_damage(s3_endpoint, source, tmp_path):
    url, _, _ = source
    options = {"endpoint_url": s3_endpoint, "key": "test", "secret": "test", "skip_instance_cache": True}
    target = "s3://archives/lib/screen.zarr"
    archive = encode_file(url, target, CONFIG, storage_options=options)
    assert archive.complete and archive.verify() == []
    assert _same(_decode_all(archive), io.read_frames(url))
    with pytest.raises(ArchiveError, match="--overwrite"):
        ArchiveWriter.create(target, io.probe(url), CONFIG, storage_options=options)
    fs = fsspec.filesystem("s3", **options)
    key = "archives/lib/screen.zarr/chunks/000001/c/0"
    data = bytearray(fs.cat_file(key))
    data[0] ^= 1
    fs.pipe_file(key, bytes(data))
    assert [e.index for e in open_archive(target, options).verify()] == [1]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda p: p[:6] + (999).to_bytes(2, "little") + p[8:], id="frame-count"),
        pytest.param(lambda p: p[:8] + (16000).to_bytes(2, "little") + p[10:], id="width"),
        pytest.param(lambda p: p[:6] + bytes.fromhex("0004 0040 0040") + p[12:], id="1024-frames-of-16384x16384"),
        pytest.param(lambda p: p[: len(p) // 2], id="truncated"),
        pytest.param(lambda p: bytes(len(p)), id="zeros"),
        pytest.param(lambda p: p[:20] + bytes(b ^ 0xA5 for b in p[20:]), id="scrambled-body"),
    ],
)
def test_malformed_payload_with_valid_checksums_is_isolated(copy_of, source, mangle):
    """A chunk whose bytes are intact but whose bitstream lies is damage of that chunk only."""
    url, _, _ = source
    path = copy_of()
    writer = ArchiveWriter.open(str(path))
    payload = open_archive(str(path)).read_chunk(1)
    writer.write_chunk(1, EncodedChunk(mangle(payload), {}))
    archive = open_archive(str(path))
    assert archive.verify() == []  # fixity holds: the stored bytes are what was written
    damaged = []
    frames = list(archive.decode(on_damaged=damaged.append))
    whole = io.read_frames(url)
    if damaged:
        assert [e.index for e in damaged] == [1]
        assert _same(Frames.concatenate(frames), Frames.concatenate([whole[:2], whole[4:]]))
    else:  # a scrambled body may still parse; it must then decode to frames of the declared shape
        assert Frames.concatenate(frames).y.shape == whole.y.shape
