"""Archive format 4 (FORMAT.md §8): K chunks to one shard object plus one commit marker per shard.

The commit protocol (a shard without its marker is not committed; a duplicate writes the same
bytes), fixity (finalize and verify check every chunk), damage reported per chunk, one ranged read
per decoded chunk, zarr-python reading the shards, and formats 3 and 4 kept apart.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from palstream import io
from palstream.archive import ArchiveWriter, IncompleteArchiveError, open_archive
from palstream.codec import EncodedChunk, EncoderConfig, encode_chunk
from palstream.errors import ArchiveError, DamagedChunkError

CONFIG = EncoderConfig(lossless=True, gop=2)
K = 2  # screen_37x29 holds 6 frames: 3 chunks in GOPs of 2, so shards [0, 1] and [2]


@pytest.fixture(scope="module")
def chunks():
    url = str(Path(__file__).parent / "data" / "screen_37x29.mkv")
    return io.probe(url), [encode_chunk(c, CONFIG) for c in io.iter_chunks(url, CONFIG.gop)]


def _write(path, info, encoded, shards=(0, 1)) -> ArchiveWriter:
    writer = ArchiveWriter.create(str(path), info, CONFIG, shard_chunks=K)
    for shard in shards:
        writer.write_shard(shard, [encoded[i] for i in writer.shard_range(shard)])
    return writer


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def archive(chunks, tmp_path):
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    _write(path, info, encoded).finalize()
    return path


def test_layout_round_trip_and_zarr_reads_the_shards(archive, chunks):
    _, encoded = chunks
    assert sorted(_files(archive)) == [
        "chunks/c/0", "chunks/c/1", "chunks/zarr.json", "commits/000000/zarr.json", "commits/000001/zarr.json",
        "commits/zarr.json", "zarr.json",
    ]
    reader = open_archive(str(archive))
    assert reader.attrs["format_version"] == 4 and reader.attrs["shard_chunks"] == K and reader.complete
    assert reader.verify() == [] and reader.committed() == {0, 1, 2}
    assert [reader.read_chunk(i) for i in range(3)] == [bytes(c.payload) for c in encoded]
    assert sum(len(f) for f in reader.decode()) == 6
    marker = json.loads((archive / "commits" / "000000" / "zarr.json").read_bytes())["attributes"]
    assert [c["bytes"] for c in marker["chunks"]] == [len(c.payload) for c in encoded[:2]]
    assert reader.chunk_attrs(1) == {k: v for k, v in marker["chunks"][1].items() if k != "bytes"}
    # zarr-python reads the shards as the array they declare (its variable-length bytes dtype
    # warns that it is not a ratified zarr v3 spec; FORMAT.md §8 defines the bytes itself).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = zarr.open_array(str(archive / "chunks"), mode="r")[:]
    assert [bytes(v) for v in values] == [bytes(c.payload) for c in encoded]


def test_shards_are_the_bytes_zarr_writes(archive, chunks, tmp_path):
    _, encoded = chunks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from zarr.core.dtype import VariableLengthBytes

        z = zarr.create_array(
            str(tmp_path / "z.zarr"), shape=(3,), chunks=(1,), shards=(K,), dtype=VariableLengthBytes(),
            compressors=[zarr.codecs.Crc32cCodec()], fill_value=b"",
        )
        z[:] = np.array([bytes(c.payload) for c in encoded], dtype=object)
    for shard in (0, 1):
        assert (archive / "chunks" / "c" / str(shard)).read_bytes() == (tmp_path / "z.zarr" / "c" / str(shard)).read_bytes()


def test_a_shard_without_its_marker_is_not_committed_and_a_rerun_rewrites_it_whole(chunks, tmp_path):
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    writer = _write(path, info, encoded)
    (path / "commits" / "000001" / "zarr.json").unlink()  # a task killed between its shard and its marker
    reader = open_archive(str(path))
    assert reader.committed() == {0, 1} and reader.uncommitted() == [2]
    with pytest.raises(DamagedChunkError, match="chunk 2 is damaged: not written"):
        reader.read_chunk(2)
    with pytest.raises(IncompleteArchiveError) as caught:
        writer.finalize()
    assert caught.value.missing == [2] and not open_archive(str(path)).complete
    resumed = ArchiveWriter.open(str(path))
    resumed.write_shard(1, [encoded[2]])
    resumed.finalize()
    assert open_archive(str(path)).verify() == []


def test_a_duplicated_task_writes_identical_bytes_and_a_stale_marker_goes_before_the_shard(chunks, tmp_path):
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    writer = _write(path, info, encoded)
    before = _files(path)
    writer.write_shard(0, encoded[:2])  # a duplicated task
    assert _files(path) == before
    # The shard rewritten with other payloads (a stale marker of another encode is there):
    # the marker is replaced, and the shard reads back as the new payloads.
    other = [encode_chunk(c, EncoderConfig(gop=2, target_psnr=30)) for c in list(io.iter_chunks(info.url, 2))[:2]]
    deleted = []
    original_delete = writer._store.delete

    def delete(key):
        deleted.append((key, (path / "chunks" / "c" / "0").read_bytes() == before["chunks/c/0"]))
        original_delete(key)

    writer._store.delete = delete
    writer.write_shard(0, other)
    assert deleted == [("commits/000000", True)]  # the stale marker went while the old shard was still there
    reader = open_archive(str(path))
    assert [reader.read_chunk(i) for i in (0, 1)] == [bytes(c.payload) for c in other]
    assert reader.verify() == []


def test_revoking_a_chunk_revokes_its_shard(archive):
    ArchiveWriter.open(str(archive)).revoke(1)
    assert open_archive(str(archive)).committed() == {2}


@pytest.mark.parametrize(
    ("damage", "damaged", "reason"),
    [
        (lambda p: _flip(p / "chunks" / "c" / "0", 40), [0], "crc32c mismatch"),
        (lambda p: _flip(p / "chunks" / "c" / "0", -10), [0, 1], "index is damaged"),
        (lambda p: (p / "chunks" / "c" / "0").write_bytes((p / "chunks" / "c" / "0").read_bytes()[:100]), [0, 1], "ends before"),
        (lambda p: (p / "chunks" / "c" / "0").unlink(), [0, 1], "shard 0 object is missing"),
        (lambda p: _flip(p / "commits" / "000000" / "zarr.json", 30), [0, 1], "commit marker of shard 0"),
        (lambda p: _edit_marker(p, lambda m: m["chunks"][1]["stats"].update(bytes=1)), [0, 1], "marker_sha256 differs"),
        (lambda p: _edit_marker(p, lambda m: m.update(shard=1)), [0, 1], "names shard 1"),
        (lambda p: _edit_marker(p, lambda m: m["chunks"][0].update(bytes=10**12)), [0, 1], "no valid sha256, bytes"),
    ],
    ids=["payload-byte", "index-byte", "truncated-shard", "missing-shard", "marker-byte", "marker-stats", "marker-shard", "marker-huge-length"],
)
def test_damage_is_reported_per_chunk_and_other_shards_still_decode(archive, damage, damaged, reason):
    damage(archive)
    reader = open_archive(str(archive))
    found = reader.verify()
    assert [e.index for e in found] == damaged, found
    assert all(reason in e.reason for e in found), found
    assert reader.read_chunk(2)  # the other shard
    skipped = []
    frames = list(reader.decode(on_damaged=skipped.append))
    # decode reads each payload by its range from the marker: a damaged index costs nothing there
    assert [e.index for e in skipped] == ([] if reason == "index is damaged" else damaged)
    assert sum(len(f) for f in frames) == 6 - 2 * len(skipped)


def test_formats_are_kept_apart(chunks, tmp_path):
    info, encoded = chunks
    sharded = _write(tmp_path / "a.zarr", info, encoded, shards=())
    with pytest.raises(ArchiveError, match="written a shard at a time"):
        sharded.write_chunk(0, encoded[0])
    with pytest.raises(ArchiveError, match="not 1"):
        sharded.write_shard(0, encoded[:1])
    with pytest.raises(ArchiveError, match="shard 2 does not exist"):
        sharded.write_shard(2, encoded[:1])
    with pytest.raises(ArchiveError, match="holds 3 frames"):
        sharded.write_shard(1, [EncodedChunk(b"x", {"frames": 3})])
    with pytest.raises(ArchiveError, match="give 1..1024"):
        ArchiveWriter.create(str(tmp_path / "b.zarr"), info, CONFIG, shard_chunks=0)
    plain = ArchiveWriter.create(str(tmp_path / "c.zarr"), info, CONFIG)
    assert plain.attrs["format_version"] == 3 and "shard_chunks" not in plain.attrs
    with pytest.raises(ArchiveError, match="one at a time"):
        plain.write_shard(0, encoded[:2])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.pop("shard_chunks"), "shard_chunks"),
        (lambda a: a.update(shard_chunks=4096), "shard_chunks 4096 is out of range"),
        (lambda a: a.update(format_version=3), "shard_chunks is set in a format-3 archive"),
    ],
)
def test_a_root_whose_shard_size_is_wrong_is_refused(archive, edit, message):
    from palstream.archive import _seal

    doc = json.loads((archive / "zarr.json").read_bytes())
    edit(doc["attributes"])
    doc["attributes"] = _seal(doc["attributes"])  # resealed: the field checks must catch it, not the digest
    (archive / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(ArchiveError, match=message):
        open_archive(str(archive))


def test_the_chunks_array_document_is_checked(archive):
    doc = json.loads((archive / "chunks" / "zarr.json").read_bytes())
    doc["codecs"][0]["configuration"]["index_location"] = "start"
    (archive / "chunks" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(ArchiveError, match="chunks/zarr.json is damaged"):
        open_archive(str(archive)).verify()


def test_an_archive_being_replaced_stays_whole_until_finalize(chunks, tmp_path):
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    _write(path, info, encoded).finalize()
    before = _files(path)
    replacement = ArchiveWriter.create(str(path), info, CONFIG, overwrite=True, shard_chunks=K)
    replacement.write_shard(0, encoded[:2])
    assert _files(path) == before
    replacement.write_shard(1, encoded[2:])
    replacement.finalize()
    assert open_archive(str(path)).verify() == [] and not list(tmp_path.glob("a.zarr.palstream-tmp-*"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_marker(archive: Path, change) -> None:
    path = archive / "commits" / "000000" / "zarr.json"
    doc = json.loads(path.read_bytes())
    change(doc["attributes"])
    path.write_text(json.dumps(doc))



def test_the_commands_and_the_catalogue_read_format_4(archive, run_cli, tmp_path):
    from palstream.catalogue import index

    result = run_cli("info", archive)
    assert result.code == 0 and "v4" in result.stdout and "3 committed" in result.stdout, result
    assert run_cli("verify", archive).code == 0
    _flip(archive / "chunks" / "c" / "0", 40)  # inside chunk 0's payload
    result = run_cli("verify", archive)
    assert result.code == 1 and "chunk 0 is damaged: crc32c mismatch" in result.stderr and "chunk 1" not in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    out = tmp_path / "rest.yuv"
    result = run_cli("decode", archive, out)
    assert result.code == 1 and "chunk 0" in result.stderr and "Traceback" not in result.stderr
    assert out.stat().st_size == 6 * (37 * 29 + 2 * 19 * 15)  # chunk 0's frames filled, the others decoded
    index.rebuild(archive.parent)
    cat = index.Catalogue.of(archive.parent)
    row = {r["path"]: r for r in index.list_archives(cat)}["a.zarr"]
    assert (row["n_chunks"], row["committed"], row["state"]) == (3, 3, "complete")
    assert [c["first_frame"] for c in index.get_archive(cat, "a.zarr")["chunks"]] == [0, 2, 4]


VECTOR = Path(__file__).parent / "conformance" / "archive-4"


def test_the_conformance_vector_reads_by_the_text_of_format_md_alone():
    """What an independent reader of FORMAT.md §8 does, with json, struct, SHA-256, CRC-32C and
    RFC 8785 only; then palstream's reader, which must agree and decode the expected frames."""
    import hashlib
    import struct

    import google_crc32c

    from palstream.archive import canonical_json

    expected = json.loads((VECTOR / "expected.json").read_text())
    root = VECTOR / expected["archive"]
    attrs = json.loads((root / "zarr.json").read_bytes())["attributes"]
    k, n = attrs["shard_chunks"], attrs["n_chunks"]
    assert (attrs["format_version"], k, n) == (4, 2, 3)
    core = {key: attrs[key] for key in ("format", "format_version", "source", "encoder", "gop", "n_chunks", "frame_count", "shard_chunks")}
    core_sha = hashlib.sha256(canonical_json(core)).hexdigest()  # no configs/chunk_configs in this archive
    payloads = []
    for s, want in enumerate(expected["shards"]):
        marker = json.loads((root / "commits" / f"{s:06d}" / "zarr.json").read_bytes())["attributes"]
        body = {key: v for key, v in marker.items() if key != "marker_sha256"}
        assert marker["marker_sha256"] == hashlib.sha256(canonical_json(body)).hexdigest()
        assert marker["core_sha256"] == core_sha and marker["shard"] == s
        blob = (root / "chunks" / "c" / str(s)).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == marker["sha256"] == want["sha256"] and len(blob) == marker["bytes"]
        offset, index = 0, b""
        for p, entry in enumerate(marker["chunks"]):
            length = entry["bytes"]
            inner = blob[offset : offset + length + 12]
            assert struct.unpack("<II", inner[:8]) == (1, length)
            assert google_crc32c.value(inner[:-4]).to_bytes(4, "little") == inner[-4:]
            assert hashlib.sha256(inner[8:-4]).hexdigest() == entry["sha256"] and entry["first_frame"] == (s * k + p) * attrs["gop"]
            payloads.append(inner[8:-4])
            index += struct.pack("<QQ", offset, length + 12)
            offset += length + 12
        index += struct.pack("<QQ", 2**64 - 1, 2**64 - 1) * (k - len(marker["chunks"]))
        assert blob[offset:] == index + google_crc32c.value(index).to_bytes(4, "little")
    assert [hashlib.sha256(p).hexdigest() for p in payloads] == [c["payload_sha256"] for c in expected["chunks"]]
    reader = open_archive(str(root))
    assert reader.verify() == [] and reader.complete
    assert [reader.read_chunk(i) for i in range(n)] == payloads
    assert [hashlib.sha256(reader.decode_chunk(i).tobytes()).hexdigest() for i in range(n)] == [c["frames_sha256"] for c in expected["chunks"]]
