"""The archive's write path at library scale (issue 19): object-store requests per chunk, counted
on a real S3 API (moto's server behind a counter), and the idempotency the cheaper path keeps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from palstream import io
from palstream.archive import ArchiveWriter, IncompleteArchiveError, open_archive
from palstream.codec import EncoderConfig, encode_chunk
from palstream.errors import ArchiveError
from palstream.storage import Location

CONFIG = EncoderConfig(lossless=True, gop=2)


@pytest.fixture(scope="module")
def chunks():
    url = str(Path(__file__).parent / "data" / "screen_37x29.mkv")
    return io.probe(url), [encode_chunk(c, CONFIG) for c in io.iter_chunks(url, CONFIG.gop)]


@pytest.fixture(scope="module")
def counting_s3():
    """moto's S3 server on 127.0.0.1 with one bucket; ``counts`` holds requests by method (LIST apart)."""
    import boto3
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):
            pass

    counts: dict[str, int] = {}
    app = DomainDispatcherApplication(create_backend_app)

    def counted(environ, start_response):
        method = environ["REQUEST_METHOD"]
        kind = "LIST" if method == "GET" and "list-type" in environ.get("QUERY_STRING", "") else method
        counts[kind] = counts.get(kind, 0) + 1
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    ).create_bucket(Bucket="scale")
    options = {"endpoint_url": endpoint, "key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}
    yield counts, options
    server.shutdown()


def _take(counts: dict) -> dict:
    taken = dict(counts)
    counts.clear()
    return taken


def test_write_chunk_is_three_puts_and_finalize_reads_each_object_once(chunks, counting_s3):
    info, encoded = chunks
    counts, options = counting_s3
    location = Location("s3://scale/once.zarr", options)
    writer = ArchiveWriter.create(location, info, CONFIG)
    _take(counts)
    for index, chunk in enumerate(encoded):
        writer.write_chunk(index, chunk)
    assert _take(counts) == {"PUT": 3 * len(encoded)}  # metadata, data, marker: nothing read
    fixity = writer.finalize()
    taken = _take(counts)
    # Three objects per chunk, plus per archive: the group documents, the root sealed (one PUT) and
    # reopened (its first markers checked again), and the listing of the fixity record.
    assert taken["GET"] <= 3 * len(encoded) + 8 and taken.get("HEAD", 0) == 0 and taken["LIST"] <= 2 and taken["PUT"] == 1, taken
    from palstream.batch.worker import archive_fixity

    assert fixity == archive_fixity(location)  # the batch's record, read back whole
    assert open_archive(location).complete and open_archive(location).verify() == []


def test_a_duplicated_task_keeps_the_marker_and_a_stale_marker_is_replaced(chunks, tmp_path):
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    writer = ArchiveWriter.create(str(path), info, CONFIG)
    writer.write_chunk(0, encoded[0])
    marker = path / "commits" / "000000" / "zarr.json"
    before = marker.stat().st_mtime_ns, marker.read_bytes()
    writer.write_chunk(0, encoded[0])  # a duplicated task: the conditional write finds the same marker
    assert (marker.stat().st_mtime_ns, marker.read_bytes()) == before
    # a marker left half written (a writer killed between create and write) is taken for stale
    (path / "commits" / "000001").mkdir()
    (path / "commits" / "000001" / "zarr.json").write_bytes(b'{"attri')
    writer.write_chunk(1, encoded[1])
    # a committed chunk rewritten with another payload ends committed with the new one
    other = encode_chunk(next(iter(io.iter_chunks(info.url, CONFIG.gop))), EncoderConfig(gop=2, target_psnr=30))
    writer.write_chunk(0, other)
    assert json.loads(marker.read_bytes())["attributes"]["bytes"] == len(other.payload)
    writer.write_chunk(2, encoded[2])
    reader = open_archive(str(path))
    assert reader.committed() == {0, 1, 2} and reader.verify() == []
    assert reader.read_chunk(0) == bytes(other.payload)


def test_finalize_names_the_chunks_not_committed(chunks, tmp_path):
    info, encoded = chunks
    writer = ArchiveWriter.create(str(tmp_path / "a.zarr"), info, CONFIG)
    writer.write_chunk(0, encoded[0])
    writer.write_chunk(2, encoded[2])
    with pytest.raises(IncompleteArchiveError, match="lacks 1 chunk") as caught:
        writer.finalize()
    assert caught.value.missing == [1]
    assert not open_archive(str(tmp_path / "a.zarr")).complete


def test_the_catalogue_reads_each_chunk_once(chunks, counting_s3):
    """``committed_chunks`` (what the catalogue's ``describe`` reads) is one GET of each chunk's
    metadata and marker; ``committed`` and ``payload_bytes`` agree with it."""
    info, encoded = chunks
    counts, options = counting_s3
    location = Location("s3://scale/catalogued.zarr", options)
    writer = ArchiveWriter.create(location, info, CONFIG)
    for index in (0, 2):
        writer.write_chunk(index, encoded[index])
    reader = open_archive(location)
    _take(counts)
    found = reader.committed_chunks()
    assert _take(counts) == {"LIST": 1, "GET": 2 * 2}
    assert set(found) == reader.committed() == {0, 2}
    assert sum(length for length, _ in found.values()) == reader.payload_bytes() == len(encoded[0].payload) + len(encoded[2].payload)
    assert found[2][1]["sha256"] == reader.chunk_attrs(2)["sha256"]


def test_an_archive_whose_creation_was_killed_after_its_root_is_restored(chunks, tmp_path):
    """zarr writes the root first: a driver killed right after it leaves no group documents, which
    finalize refuses; ``restore_groups`` (the driver calls it when it reopens an archive) writes them."""
    info, encoded = chunks
    path = tmp_path / "a.zarr"
    ArchiveWriter.create(str(path), info, CONFIG)
    groups = {folder: (path / folder / "zarr.json").read_bytes() for folder in ("chunks", "commits")}
    (path / "commits" / "zarr.json").unlink()
    writer = ArchiveWriter.open(str(path))
    for index, chunk in enumerate(encoded):
        writer.write_chunk(index, chunk)
    with pytest.raises(ArchiveError, match="commits/zarr.json is damaged"):
        writer.finalize()
    ArchiveWriter.open(str(path)).restore_groups()
    assert {folder: (path / folder / "zarr.json").read_bytes() for folder in ("chunks", "commits")} == groups  # zarr's bytes
    ArchiveWriter.open(str(path)).finalize()
    assert open_archive(str(path)).complete and open_archive(str(path)).verify() == []


def test_the_batch_finalize_returns_missing_units_at_once(chunks, tmp_path):
    """The batch's finalize sends back the units the archive lacks from finalize's own check (no
    read of the markers before it), and does not retry that as a storage error."""
    import time

    from palstream.batch.worker import FinalizeTask, finalize_archive

    info, encoded = chunks
    writer = ArchiveWriter.create(str(tmp_path / "a.zarr"), info, CONFIG)
    writer.write_chunk(1, encoded[1])
    task = FinalizeTask(Location(str(tmp_path / "a.zarr")), Location(info.url), info.size_bytes, info.sha256, "copy", (),
                        Location(str(tmp_path / "fixity.json")))
    started = time.monotonic()
    result = finalize_archive(task)
    assert result == {"outcome": "missing", "units": [0, 2]}
    assert time.monotonic() - started < 10  # storage retries back off for 60 s
    assert not (tmp_path / "fixity.json").exists() and not open_archive(str(tmp_path / "a.zarr")).complete


def test_a_job_file_written_after_its_folder_was_listed_is_read(counting_s3):
    """s3fs caches listings: a fixity record a worker writes after the driver listed ``fixity/``
    must still be read (else the manifests read the whole archive again to rebuild it)."""
    import boto3

    from palstream.batch.store import read_json, write_json

    _, options = counting_s3
    write_json(Location("s3://scale/job/fixity/0.json", options), {"n": 0})
    fs, path = Location("s3://scale/job/fixity", options).filesystem()
    assert fs.ls(path, detail=False) == ["scale/job/fixity/0.json"]  # cached now
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").put_object(Bucket="scale", Key="job/fixity/1.json", Body=b'{"n": 1}')
    assert read_json(Location("s3://scale/job/fixity/1.json", options)) == {"n": 1}


# -- format 4: one shard object and one commit marker per task (FORMAT.md §8) ------------------


def test_a_shard_is_one_get_and_two_puts_and_finalize_reads_each_shard_once(chunks, counting_s3):
    info, encoded = chunks
    counts, options = counting_s3
    location = Location("s3://scale/sharded.zarr", options)
    writer = ArchiveWriter.create(location, info, CONFIG, shard_chunks=2)
    _take(counts)
    writer.write_shard(0, encoded[:2])
    writer.write_shard(1, encoded[2:])
    # per shard: its marker looked for (absent: a stale one would go before the shard), the shard, the marker
    assert _take(counts) == {"GET": 2, "PUT": 4}
    writer.write_shard(0, encoded[:2])  # a duplicated task: the same shard, the same marker found
    assert _take(counts) == {"GET": 2, "PUT": 2}
    fixity = writer.finalize()
    taken = _take(counts)
    # two objects per shard, plus per archive what format 3 reads too (root, groups, first markers,
    # listing); the root is rewritten whole in one PUT (zarr's attrs.update wrote it once per key)
    assert taken["GET"] <= 2 * 2 + 8 and taken.get("HEAD", 0) == 0 and taken["LIST"] <= 2 and taken["PUT"] == 1, taken
    from palstream.batch.worker import archive_fixity

    assert fixity == archive_fixity(location)
    reader = open_archive(location)
    assert reader.complete and reader.verify() == []
    _take(counts)
    assert reader.committed_chunks().keys() == {0, 1, 2}
    assert _take(counts) == {"LIST": 1, "GET": 2}  # the catalogue's pass: a marker per shard
    reader = open_archive(location)
    _take(counts)
    assert [reader.read_chunk(i) for i in range(3)] == [bytes(c.payload) for c in encoded]
    # decoding a chunk is one ranged GET of its bytes in the shard (and its shard's marker once)
    assert _take(counts) == {"GET": 2 + 1 + 2}


def test_an_s3_writer_killed_before_its_marker_is_resumed_by_rewriting_the_shard(chunks, counting_s3):
    info, encoded = chunks
    _, options = counting_s3
    location = Location("s3://scale/resumed.zarr", options)
    writer = ArchiveWriter.create(location, info, CONFIG, shard_chunks=2)
    writer.write_shard(0, encoded[:2])
    writer.write_shard(1, encoded[2:])
    fs, root = location.filesystem()
    fs.rm(f"{root}/commits/000001", recursive=True)  # killed between the shard and its marker
    fs.pipe_file(f"{root}/chunks/c/1", b"half a shard")  # ... or in the middle of the shard's upload
    resumed = ArchiveWriter.open(location)
    assert resumed.committed() == {0, 1}
    with pytest.raises(IncompleteArchiveError) as caught:
        resumed.finalize()
    assert caught.value.missing == [2]
    resumed.write_shard(1, encoded[2:])
    resumed.finalize()
    reader = open_archive(location)
    assert reader.complete and reader.verify() == []
    assert [reader.read_chunk(i) for i in range(3)] == [bytes(c.payload) for c in encoded]
