"""The zarr v3 archive container: commit protocol, resume, fixity, damage isolation, malformed metadata,
the root digest, bounded reads and atomic replacement."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from palstream import io
from palstream.archive import ArchiveWriter, _seal, canonical_json, open_archive
from palstream.codec import EncodedChunk, EncoderConfig, encode_chunk
from palstream.errors import ArchiveError, DamagedChunkError, InputError
from palstream.frames import Frames
from palstream.pipeline import decode_file, encode_file
from palstream.storage import Location

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
    assert attrs["format"] == "palstream" and attrs["format_version"] == 3 and attrs["status"] == "complete"
    assert (attrs["n_chunks"], attrs["frame_count"], attrs["gop"]) == (3, 6, 2)
    assert attrs["source"]["sha256"] == io.probe(str(data_dir / "screen_37x29.mkv")).sha256
    assert attrs["encoder"]["config"] == CONFIG.to_dict()
    assert attrs["encoder"]["config_digest"] == CONFIG.digest
    assert attrs["encoder"]["palette_generator"]["name"] == "dominant"
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
    assert writer.committed() == {0, 2} and writer.uncommitted() == [1]
    assert not open_archive(str(path)).is_committed(1)
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
    assert writer.committed() == {0, 1} and writer.uncommitted() == [2]
    reader = open_archive(str(path))
    assert [reader.is_committed(i) for i in range(3)] == [True, True, False]


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
    assert [e.index for e in result.damaged] == [1] and result.filled == [range(2, 4)]  # fill keeps timing
    whole = io.read_frames(url)
    rest = io.read_frames(str(tmp_path / "rest.y4m"))
    assert _same(rest[:2], whole[:2]) and _same(rest[4:], whole[4:])


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


def _edit_root(path, reseal=True, **changes):
    """Change root attributes; ``reseal`` recomputes the integrity record, as a careful tool would."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            meta["attributes"].pop(key)
        else:
            meta["attributes"][key] = value
    if reseal:
        meta["attributes"] = _seal(meta["attributes"])
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
    _edit_root(path, source={**meta["attributes"]["source"], key: value})
    with pytest.raises(ArchiveError, match=words):
        open_archive(str(path))


def test_unknown_attributes_are_ignored_but_covered_by_the_digest(copy_of):
    path = copy_of()
    _edit_root(path, added_later={"x": 1})
    assert open_archive(str(path)).verify() == []  # a later writer's attribute, sealed: fine
    _edit_root(path, reseal=False, added_by_hand=1)
    with pytest.raises(ArchiveError, match="root metadata altered: added_by_hand added"):
        open_archive(str(path))
    meta = json.loads((path / "zarr.json").read_text())
    _edit_root(path, source={**meta["attributes"]["source"], "added_later": 1})
    # even resealed, an edit of the core (here the source) no longer matches the commit markers
    with pytest.raises(ArchiveError, match="core does not match"):
        open_archive(str(path))


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
    target = Location("s3://archives/lib/screen.zarr", options)
    archive = encode_file(url, target, CONFIG)
    assert archive.complete and archive.verify() == []
    assert _same(_decode_all(archive), io.read_frames(url))
    with pytest.raises(ArchiveError, match="--overwrite"):
        ArchiveWriter.create(target, io.probe(url), CONFIG)
    fs = fsspec.filesystem("s3", **options)
    key = "archives/lib/screen.zarr/chunks/000001/c/0"
    data = bytearray(fs.cat_file(key))
    data[0] ^= 1
    fs.pipe_file(key, bytes(data))
    assert [e.index for e in open_archive(target).verify()] == [1]
    # replacing on object storage: copied over root last, stale objects gone, no temporary prefix left
    archive = encode_file(url, target, EncoderConfig(lossless=True, gop=3), overwrite=True)
    assert archive.n_chunks == 2 and open_archive(target).verify() == []
    fs.invalidate_cache()
    assert not fs.exists("archives/lib/screen.zarr/chunks/000002/c/0")
    assert fs.glob("archives/lib/screen.zarr.palstream-tmp-*") == []


@pytest.mark.parametrize(
    "mangle, header_lies",
    [
        pytest.param(lambda p: p[:6] + (999).to_bytes(2, "little") + p[8:], True, id="frame-count"),
        pytest.param(lambda p: p[:8] + (16000).to_bytes(2, "little") + p[10:], True, id="width"),
        pytest.param(lambda p: p[:6] + bytes.fromhex("0004 0040 0040") + p[12:], True, id="1024-frames-of-16384x16384"),
        pytest.param(lambda p: p[: len(p) // 2], False, id="truncated"),
        pytest.param(lambda p: bytes(len(p)), True, id="zeros"),
        pytest.param(lambda p: p[:20] + bytes(b ^ 0xA5 for b in p[20:]), False, id="scrambled-body"),
    ],
)
def test_malformed_payload_with_valid_checksums_is_isolated(copy_of, source, mangle, header_lies):
    """A chunk whose bytes are intact but whose bitstream lies is damage of that chunk only."""
    url, _, _ = source
    path = copy_of()
    writer = ArchiveWriter.open(str(path))
    payload = open_archive(str(path)).read_chunk(1)
    writer.write_chunk(1, EncodedChunk(mangle(payload), {}))
    archive = open_archive(str(path))
    found = archive.verify()
    if header_lies:  # checksums hold, but the header contradicts the archive: found before any decoding
        assert [e.index for e in found] == [1] and "header" in found[0].reason
    else:
        assert found == []  # fixity holds: the stored bytes are what was written
    damaged = []
    frames = list(archive.decode(on_damaged=damaged.append))
    whole = io.read_frames(url)
    if damaged:
        assert [e.index for e in damaged] == [1]
        assert _same(Frames.concatenate(frames), Frames.concatenate([whole[:2], whole[4:]]))
    else:  # a scrambled body may still parse; it must then decode to frames of the declared shape
        assert Frames.concatenate(frames).y.shape == whole.y.shape


# -- issue 20: the reader trusts nothing it reads -------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _one_line(exc: Exception) -> bool:
    return "\n" not in str(exc) and len(str(exc)) < 400


def test_chunk_shape_of_10_to_the_12_with_a_matching_marker_is_damage_not_memory_error(copy_of, tmp_path):
    path = copy_of()
    _edit_json(path / "chunks" / "000001" / "zarr.json", lambda m: m.update(shape=[10**12]) or m["chunk_grid"]["configuration"].update(chunk_shape=[10**12]))
    _edit_json(path / "commits" / "000001" / "zarr.json", lambda m: m["attributes"].update(bytes=10**12))
    archive = open_archive(str(path))
    damaged = archive.verify()
    assert [e.index for e in damaged] == [1] and "outside 1.." in damaged[0].reason
    result = decode_file(str(path), str(tmp_path / "rest.y4m"))
    assert [e.index for e in result.damaged] == [1] and result.filled == [range(2, 4)]


def test_a_compressor_added_to_chunk_metadata_is_damage_and_nothing_is_inflated(copy_of):
    path = copy_of()
    bomb = gzip.compress(bytes(200 << 20), 9)  # 200 MB of zeros in ~200 KB
    _chunk_file(path, 0).write_bytes(bomb)
    size = len(bomb)

    def add_gzip(meta):
        meta.update(shape=[size])
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [size]
        meta["codecs"] = [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 9}}]

    _edit_json(path / "chunks" / "000000" / "zarr.json", add_gzip)
    _edit_json(path / "commits" / "000000" / "zarr.json", lambda m: m["attributes"].update(bytes=size))
    tracemalloc.start()
    try:
        damaged = open_archive(str(path)).verify()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [e.index for e in damaged] == [0]
    assert peak < 20 << 20, f"verify allocated {peak} bytes"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.update(data_type="uint16"), id="dtype"),
        pytest.param(lambda m: m.update(shape=[m["shape"][0], 1]), id="2-d"),
        pytest.param(lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[1]), id="chunk-grid"),
        pytest.param(lambda m: m.update(fill_value=7), id="fill-value"),
        pytest.param(lambda m: m.update(shape=[float(m["shape"][0])]), id="float-shape"),
        pytest.param(lambda m: m.update(codecs=[{"name": "bytes"}]), id="no-crc32c"),
        pytest.param(lambda m: m.update(extra_key=1), id="unknown-key"),
        pytest.param(lambda m: m.update(attributes=[m["attributes"]]), id="nested-attributes"),
        pytest.param(lambda m: m["attributes"].update(frames="2"), id="frames-as-string"),
        pytest.param(lambda m: m["attributes"].update(stats={"psnr_y": 99.0}), id="stats-edited"),
        pytest.param(lambda m: m.update(attributez=m.pop("attributes")), id="renamed-key"),
    ],
)
def test_chunk_metadata_must_be_exactly_the_documented_array(copy_of, edit):
    path = copy_of()
    _edit_json(path / "chunks" / "000002" / "zarr.json", edit)
    archive = open_archive(str(path))
    damaged = archive.verify()
    assert [e.index for e in damaged] == [2] and _one_line(damaged[0])
    with pytest.raises(DamagedChunkError):
        archive.decode_chunk(2)


@pytest.mark.parametrize(
    "text",
    ['{"attributes": {"sha256": "x"', "[1, 2]", '{"attributes": NaN}', '{"a": 1e999}', "[" * 5000 + "]" * 5000, "\xff\xfe"],
    ids=["truncated", "list", "nan", "overflow", "deep", "not-utf8"],
)
def test_unparseable_metadata_documents_are_one_line_errors(copy_of, text):
    path = copy_of()
    (path / "commits" / "000000" / "zarr.json").write_bytes(text.encode("latin-1"))
    damaged = open_archive(str(path)).verify()
    assert [e.index for e in damaged] == [0] and _one_line(damaged[0])
    (path / "zarr.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArchiveError) as caught:
        open_archive(str(path))
    assert _one_line(caught.value)


def test_a_payload_header_declaring_huge_frames_is_refused_before_decoding(copy_of):
    path = copy_of()
    header = b"PSC1" + bytes([3, 1]) + bytes.fromhex("0500 0040 0040") + bytes([4, 8, 64, 0]) + (0).to_bytes(4, "little")
    ArchiveWriter.open(str(path)).write_chunk(1, EncodedChunk(header, {}))
    archive = open_archive(str(path))
    damaged = archive.verify()
    assert [e.index for e in damaged] == [1] and "declares 5 frames of 16384x16384" in damaged[0].reason
    with pytest.raises(DamagedChunkError, match="header"):
        archive.decode_chunk(1)


def _flip_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "old, new, field",
    [
        ('"fps": "15/1"', '"fps": "25/1"', "source.fps"),
        ('"range": "tv"', '"range": "pc"', "source.color"),
        ('"name": "screen_37x29.mkv"', '"name": "screen_37x28.mkv"', "source.name"),
        ('"url": "', '"url": "x', "source.url"),
        (None, None, "source.sha256"),
        ('"lossless": true', '"lossless": false', "encoder.config"),
        ('"status": "complete"', '"status": "incomplete"', "status"),
        ('"format_version": 3', '"format_version": 1', "format_version"),
    ],
)
def test_altered_root_metadata_is_named_and_refused_unless_forced(copy_of, old, new, field):
    path = copy_of()
    if field == "source.sha256":  # other digests in the root may start with the same character
        digest = json.loads((path / "zarr.json").read_text())["attributes"]["source"]["sha256"]
        old, new = f'"sha256": "{digest}"', f'"sha256": "{"e" if digest[0] != "e" else "f"}{digest[1:]}"'
    _flip_text(path / "zarr.json", old, new)
    with pytest.raises(ArchiveError, match=f"root metadata altered: {field} changed") as caught:
        open_archive(str(path))
    assert _one_line(caught.value)
    with pytest.warns(UserWarning, match="root metadata altered"):
        forced = open_archive(str(path), force=True)
    with pytest.raises(ArchiveError, match="root metadata altered"):
        forced.verify()
    assert len(list(forced.decode())) == 3  # forced: the chunks still decode


def test_a_damaged_integrity_record_is_named(copy_of):
    path = copy_of()
    meta = json.loads((path / "zarr.json").read_text())
    digest = meta["attributes"]["integrity"]["sha256"]
    _flip_text(path / "zarr.json", digest, ("0" if digest[0] != "0" else "1") + digest[1:])
    with pytest.raises(ArchiveError, match="digest itself is damaged"):
        open_archive(str(path))


def test_a_root_from_another_archive_does_not_match_the_chunks(copy_of, source, tmp_path):
    """Its own digest is valid, but the commit markers bind every chunk to the original root."""
    url, _, _ = source
    path = copy_of()
    other = encode_file(url, str(tmp_path / "other.zarr"), EncoderConfig(lossless=True, gop=2, max_block=32))
    shutil.copy(Path(other.location.url) / "zarr.json", path / "zarr.json")
    with pytest.raises(ArchiveError, match="root metadata altered: its core does not match"):
        open_archive(str(path))


def test_huge_chunk_count_is_refused_at_once(copy_of):
    path = copy_of()
    _edit_root(path, reseal=False, n_chunks=10**9)
    with pytest.raises(ArchiveError, match="root metadata altered: n_chunks changed"):
        open_archive(str(path))
    _edit_root(path, n_chunks=10**9)  # resealed: the layout check still refuses it
    with pytest.raises(ArchiveError, match="n_chunks 1000000000 does not match"):
        open_archive(str(path))
    meta = json.loads((path / "zarr.json").read_text())
    timing = {**meta["attributes"]["source"]["timing"], "pts_runs": [[0, 1, 10**9]]}  # format 3: one per frame
    source = {**meta["attributes"]["source"], "frame_count": 2 * 10**9 // 2, "timing": timing}
    # consistent and resealed, as an incomplete archive (a complete one fails payload_bytes first)
    _edit_root(path, n_chunks=5 * 10**8, frame_count=10**9, source=source, status="incomplete", payload_bytes=None)
    with pytest.raises(ArchiveError, match="core does not match"):  # the commit markers still disagree
        open_archive(str(path))


@pytest.mark.parametrize(
    "changes",
    [
        {"source": [{"width": 37}]},
        {"gop": "2"},
        {"gop": 2.0},
        {"gop": True},
        {"encoder": {"config": {}}},
        {"encoder": "kmeans"},
        {"status": ["complete"]},
        {"payload_bytes": -1},
        {"frame_count": 10**10},
    ],
    ids=repr,
)
def test_wrong_types_and_nesting_in_root_metadata_are_one_line_errors(copy_of, changes):
    path = copy_of()
    _edit_root(path, **changes)
    with pytest.raises(ArchiveError) as caught:
        open_archive(str(path))
    assert _one_line(caught.value)


def test_renamed_required_root_key_is_named(copy_of):
    path = copy_of()
    _flip_text(path / "zarr.json", '"gop": 2,\n    "n_chunks"', '"gpo": 2,\n    "n_chunks"')
    with pytest.raises(ArchiveError, match="gop removed; gpo added|gpo added; gop removed|gpo added"):
        open_archive(str(path))


@pytest.mark.parametrize(
    "value, text",
    [(0.0, "0"), (-0.0, "0"), (45.0, "45"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"),
     (0.000001, "0.000001"), (333333333.3333333, "333333333.3333333"), (5e-324, "5e-324"), (-1.5e-9, "-1.5e-9")],
)
def test_canonical_numbers_follow_rfc_8785(value, text):
    assert canonical_json(value) == text.encode()


def test_canonical_json_sorts_by_utf16_and_escapes_minimally():
    doc = {"b": [1, None, True, "x\n\u00e9"], "\ue000": 1, "\U0001f600": 2, "a": "q\"\\"}
    expected = '{"a":"q\\"\\\\","b":[1,null,true,"x\\n\u00e9"],"\U0001f600":2,"\ue000":1}'
    assert canonical_json(doc) == expected.encode("utf-8")
    with pytest.raises(ValueError):
        canonical_json(2**60)


def test_status_transition_and_chunk_configs_keep_the_root_sealed(source, tmp_path):
    url, info, chunks = source
    path = str(tmp_path / "job.zarr")
    writer = ArchiveWriter.create(path, info, CONFIG)
    writer.record_chunk_config(1, 2, EncoderConfig(lossless=True, gop=2, max_block=32))
    for i, frames in enumerate(chunks):
        writer.write_chunk(i, encode_chunk(frames, CONFIG))
    assert open_archive(path).verify() == []  # incomplete, sealed
    writer.finalize()
    archive = open_archive(path)
    assert archive.complete and archive.verify() == []
    marker = json.loads((tmp_path / "job.zarr" / "commits" / "000000" / "zarr.json").read_text())["attributes"]
    assert set(marker) == {"sha256", "bytes", "core_sha256", "attributes_sha256"}


def test_format_1_archives_still_read_with_an_unprotected_root_warning(data_dir, tmp_path):
    """tests/data/screen_37x29_v1.zarr was written by palstream before format 2 (commit 50509d6)."""
    path = tmp_path / "v1.zarr"
    shutil.copytree(data_dir / "screen_37x29_v1.zarr", path)
    archive = open_archive(str(path))
    assert archive.attrs["format_version"] == 1 and not archive.root_protected
    with pytest.warns(UserWarning, match="root metadata is unprotected"):
        assert archive.verify() == []
    assert _same(_decode_all(archive), io.read_frames(str(data_dir / "screen_37x29.mkv")))
    with pytest.raises(ArchiveError, match="does not extend"):
        ArchiveWriter.open(str(path))
    meta = path / "chunks" / "000001" / "zarr.json"
    _edit_json(meta, lambda m: m.update(codecs=[{"name": "bytes"}, {"name": "gzip"}]))
    with pytest.warns(UserWarning):
        assert [e.index for e in open_archive(str(path)).verify()] == [1]


# -- issue 20: atomic replacement -----------------------------------------------------------------


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and p.name.startswith(path.name))


def test_a_failed_overwrite_keeps_the_old_archive_byte_for_byte(copy_of, source):
    _, info, chunks = source
    path = copy_of()
    before = _hashes(path)
    writer = ArchiveWriter.create(str(path), info, EncoderConfig(lossless=True, gop=3), overwrite=True)
    assert writer.replacing and writer.write_location.url.startswith(str(path) + ".palstream-tmp-")
    writer.write_chunk(0, encode_chunk(Frames.concatenate(chunks)[:3], EncoderConfig(lossless=True, gop=3)))
    with pytest.raises(ArchiveError, match="lacks 1 chunk"):
        writer.finalize()
    assert _hashes(path) == before
    writer.abort()
    assert _hashes(path) == before and _siblings(path) == []


def test_an_interrupted_overwrite_keeps_the_old_archive_and_the_next_one_cleans_up(copy_of, source):
    _, info, chunks = source
    path = copy_of()
    before = _hashes(path)
    killed = ArchiveWriter.create(str(path), info, CONFIG, overwrite=True)
    killed.write_chunk(0, encode_chunk(chunks[0], CONFIG))
    del killed  # the process dies here: no finalize, no abort
    assert _hashes(path) == before and len(_siblings(path)) == 1
    assert open_archive(str(path)).verify() == []
    config = EncoderConfig(lossless=True, gop=3)
    writer = ArchiveWriter.create(str(path), info, config, overwrite=True)
    whole = Frames.concatenate(chunks)
    for i in range(2):
        writer.write_chunk(i, encode_chunk(whole[3 * i : 3 * i + 3], config))
    assert _hashes(path) == before  # still the old archive until finalize
    writer.finalize()
    archive = open_archive(str(path))
    assert archive.complete and archive.n_chunks == 2 and archive.verify() == []
    assert _siblings(path) == []  # the killed run's temporary archive is gone too


def test_overwrite_on_object_storage_swaps_root_last(source):
    _, info, chunks = source
    url = "memory://palstream-tests/replace.zarr"
    fs = fsspec.filesystem("memory")
    writer = ArchiveWriter.create(url, info, CONFIG)
    for i, frames in enumerate(chunks):
        writer.write_chunk(i, encode_chunk(frames, CONFIG))
    writer.finalize()
    before = {p: fs.cat_file(p) for p in fs.find("/palstream-tests/replace.zarr")}
    config = EncoderConfig(lossless=True, gop=3)
    replacement = ArchiveWriter.create(url, info, config, overwrite=True)
    whole = Frames.concatenate(chunks)
    replacement.write_chunk(0, encode_chunk(whole[:3], config))
    replacement.abort()
    assert {p: fs.cat_file(p) for p in fs.find("/palstream-tests/replace.zarr")} == before
    replacement = ArchiveWriter.create(url, info, config, overwrite=True)
    for i in range(2):
        replacement.write_chunk(i, encode_chunk(whole[3 * i : 3 * i + 3], config))
    replacement.finalize()
    archive = open_archive(url)
    assert archive.n_chunks == 2 and archive.verify() == [] and not fs.exists("/palstream-tests/replace.zarr/chunks/000002")
    assert fs.glob("/palstream-tests/replace.zarr.palstream-tmp-*") == []
    fs.rm("/palstream-tests/replace.zarr", recursive=True)


def test_overwrite_without_an_atomic_exchange_still_replaces_whole(copy_of, source, monkeypatch):
    """Where renameat2 is missing, two renames put the new archive in place; nothing is mixed."""
    from palstream import archive as archive_module

    def unsupported(a, b):
        raise OSError(38, "renameat2 is unavailable")

    monkeypatch.setattr(archive_module, "rename_exchange", unsupported)
    _, info, chunks = source
    path = copy_of()
    config = EncoderConfig(lossless=True, gop=3)
    writer = ArchiveWriter.create(str(path), info, config, overwrite=True)
    whole = Frames.concatenate(chunks)
    for i in range(2):
        writer.write_chunk(i, encode_chunk(whole[3 * i : 3 * i + 3], config))
    writer.finalize()
    archive = open_archive(str(path))
    assert archive.n_chunks == 2 and archive.verify() == [] and _siblings(path) == []


def test_a_folder_whose_root_document_is_not_an_object_is_not_overwritten(source, tmp_path):
    url, _, _ = source
    other = tmp_path / "odd.zarr"
    other.mkdir()
    (other / "zarr.json").write_text("[1, 2]")
    with pytest.raises(ArchiveError, match="not a palstream archive"):
        encode_file(url, str(other), CONFIG, overwrite=True)
    assert (other / "zarr.json").read_text() == "[1, 2]"


def test_a_failed_swap_keeps_both_archives_and_abort_keeps_the_new_one(copy_of, source, monkeypatch):
    from palstream import archive as archive_module

    def interrupted(replacement, location):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(archive_module, "_swap_into_place", interrupted)
    _, info, chunks = source
    path = copy_of()
    before = _hashes(path)
    writer = ArchiveWriter.create(str(path), info, CONFIG, overwrite=True)
    for i, frames in enumerate(chunks):
        writer.write_chunk(i, encode_chunk(frames, CONFIG))
    with pytest.raises(ArchiveError, match="move it into place by hand"):
        writer.finalize()
    writer.abort()
    assert _hashes(path) == before
    assert open_archive(writer.write_location).complete  # the finished replacement is kept for the user


def test_a_source_name_without_canonical_json_is_a_one_line_error(source, tmp_path):
    """A file name of invalid UTF-8 (surrogate-escaped by Python) cannot be sealed: refused, not a traceback."""
    from dataclasses import replace

    _, info, _ = source
    with pytest.raises(ArchiveError, match="rename the source file"):
        ArchiveWriter.create(str(tmp_path / "a.zarr"), replace(info, name="caf\udce9.mkv"), CONFIG)
    assert not (tmp_path / "a.zarr").exists()
