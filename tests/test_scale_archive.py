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
    # Three objects per chunk, plus per archive: the group documents, the root sealed through zarr and
    # reopened (its first markers checked again) and the listing and root read of the fixity record.
    assert taken["GET"] <= 3 * len(encoded) + 8 and taken.get("HEAD", 0) == 0 and taken["LIST"] <= 2, taken
    from palstream.batch.worker import archive_fixity

    assert fixity == archive_fixity(location.url, options)  # the batch's record, read back whole
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
