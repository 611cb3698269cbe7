"""The library catalogue and ``palstream serve`` without a browser: SQLite index, ``ls --json``,
and the web app through Starlette's TestClient (paths, errors, playback, read-only root)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the catalogue server needs palstream's 'serve' extra")
from starlette.testclient import TestClient

from palstream.catalogue import index
from palstream.catalogue.server import create_app

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """An output root with two archives, one in a subfolder (GOPs of 4: 3 and 2 chunks)."""
    from palstream.codec import EncoderConfig
    from palstream.pipeline import encode_file

    root = tmp_path_factory.mktemp("library")
    encode_file(str(DATA / "batch_testsrc_64x48.mkv"), str(root / "testsrc.zarr"), EncoderConfig(gop=4))
    encode_file(str(DATA / "batch_mandel_48x32.mkv"), str(root / "fractals" / "mandel.zarr"), EncoderConfig(gop=4))
    return root


@pytest.fixture
def root(library, tmp_path) -> Path:
    """A private copy of the library, free to damage."""
    copy = tmp_path / "out"
    shutil.copytree(library, copy)
    return copy




def _client(root: Path, **kwargs) -> TestClient:
    return TestClient(create_app(str(root), **kwargs), base_url="http://127.0.0.1")


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its size, mtime and sha256."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            files[path.relative_to(folder).as_posix()] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        else:
            files[path.relative_to(folder).as_posix() + "/"] = None
    return files


def _planes(frame: av.VideoFrame) -> np.ndarray:
    """Y, Cb and Cr of a 4:2:0 frame of any size, flattened into one array."""
    return np.concatenate(
        [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width].ravel() for p in frame.planes]
    )


def _flip_payload_byte(archive: Path, chunk: int) -> None:
    payload = archive / "chunks" / f"{chunk:06d}" / "c" / "0"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(bytes(data))


def test_rebuild_indexes_every_archive_from_its_metadata(root):
    result = index.rebuild(root)
    assert result == {"archives": 2, "read": 2, "dropped": 0}
    cat = index.Catalogue.of(root)
    assert cat.path == root / "_palstream" / "catalogue.sqlite"
    rows = {r["path"]: r for r in index.list_archives(cat)}
    assert set(rows) == {"testsrc.zarr", "fractals/mandel.zarr"}
    testsrc = rows["testsrc.zarr"]
    source = DATA / "batch_testsrc_64x48.mkv"
    assert testsrc["source_name"] == "batch_testsrc_64x48.mkv"
    assert testsrc["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert testsrc["source_bytes"] == source.stat().st_size
    assert (testsrc["width"], testsrc["height"], testsrc["frames"], testsrc["fps"]) == (64, 48, 12, "10/1")
    assert testsrc["duration_s"] == pytest.approx(1.2)
    assert (testsrc["state"], testsrc["fixity"], testsrc["verified_at"]) == ("complete", "unverified", None)
    assert (testsrc["gop"], testsrc["n_chunks"], testsrc["committed"], testsrc["lossless"]) == (4, 3, 3, False)
    assert testsrc["streams"] == [
        {"type": "video", "width": 64, "height": 48, "fps": "10/1", "pix_fmt": testsrc["pix_fmt"]}
    ]
    assert testsrc["bpp"] == pytest.approx(8 * testsrc["payload_bytes"] / (12 * 64 * 48))
    assert testsrc["psnr_min"] >= 44.9  # the default quality floor is 45 dB per chunk
    detail = index.get_archive(cat, "testsrc.zarr")
    assert [c["first_frame"] for c in detail["chunks"]] == [0, 4, 8]
    assert min(c["psnr_y"] for c in detail["chunks"]) == pytest.approx(testsrc["psnr_min"])
    # the catalogue is only an index: deleted, it comes back the same
    cat.path.unlink()
    index.rebuild(root)
    again = {r["path"]: r for r in index.list_archives(cat)}
    unstamped = [{k: {f: v for f, v in r.items() if f != "indexed_at"} for k, r in t.items()} for t in (again, rows)]
    assert unstamped[0] == unstamped[1]


def test_refresh_follows_added_removed_and_verified_archives(root):
    cat = index.Catalogue.of(root)
    index.refresh(root)
    shutil.copytree(root / "testsrc.zarr", root / "more" / "copy.zarr")
    shutil.rmtree(root / "fractals")
    assert index.refresh(root) == {"archives": 2, "read": 1, "dropped": 1}
    assert [r["path"] for r in index.list_archives(cat)] == ["more/copy.zarr", "testsrc.zarr"]
    verified = index.verify_archive(root, "testsrc.zarr")
    assert verified["fixity"] == "intact" and verified["verified_at"] is not None
    assert all(c["state"] == "intact" for c in verified["chunks"])
    # a rebuild keeps a verification while the archive is unchanged...
    index.rebuild(root)
    assert index.get_archive(cat, "testsrc.zarr")["verified_at"] == verified["verified_at"]
    # ...and forgets it once the archive is written to
    os.utime(root / "testsrc.zarr" / "zarr.json")
    index.refresh(root)
    assert index.get_archive(cat, "testsrc.zarr")["fixity"] == "unverified"


def test_record_archive_indexes_one_archive_and_refuses_one_outside_the_root(root, tmp_path):
    index.record_archive(root, root / "fractals" / "mandel.zarr")
    assert [r["path"] for r in index.list_archives(index.Catalogue.of(root))] == ["fractals/mandel.zarr"]
    with pytest.raises(index.OutsideRootError, match="not under the catalogue's root"):
        index.record_archive(root, tmp_path)


def test_ls_json_lists_the_archives_with_totals(root, run_cli):
    result = run_cli("ls", root, "--json")
    assert result.code == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [a["path"] for a in listing["archives"]] == ["fractals/mandel.zarr", "testsrc.zarr"]
    assert listing["totals"]["archives"] == 2 and listing["totals"]["frames"] == 20
    assert listing["totals"]["payload_bytes"] == sum(a["payload_bytes"] for a in listing["archives"])
    searched = json.loads(run_cli("ls", root, "--json", "--search", "mandel").stdout)
    assert [a["path"] for a in searched["archives"]] == ["fractals/mandel.zarr"]
    table = run_cli("ls", root)
    assert table.code == 0 and "testsrc.zarr" in table.stdout and "2 archive(s), 20 frames" in table.stdout


def test_catalogue_rebuild_command_and_one_line_errors(root, tmp_path, run_cli):
    result = run_cli("catalogue", "rebuild", root)
    assert result.code == 0 and "catalogued 2 archive(s)" in result.stdout
    for args, message in (
        (("ls", tmp_path / "absent"), "is not a folder"),
        (("ls", "memory://no-such-root"), "is not a folder"),
        (("ls", root, "--sort", "colour"), "cannot sort by 'colour'"),
        (("serve", root / "testsrc.zarr"), "is an archive, not a folder of archives"),
    ):
        result = run_cli(*args)
        assert result.code == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_library_page_searches_filters_sorts_and_totals(root):
    client = _client(root)
    page = client.get("/")
    assert page.status_code == 200
    assert 'href="/archive/fractals/mandel.zarr"' in page.text and 'href="/archive/testsrc.zarr"' in page.text
    assert "<strong>2</strong> archives" in page.text
    found = client.get("/", params={"q": "testsrc"})
    assert 'href="/archive/testsrc.zarr"' in found.text and "mandel.zarr" not in found.text
    assert "<strong>1</strong> archive " in found.text
    assert "No archive matches." in client.get("/", params={"q": "no-such-video"}).text
    by_bpp = client.get("/api/archives", params={"sort": "bpp", "order": "desc"}).json()["archives"]
    assert [a["bpp"] for a in by_bpp] == sorted((a["bpp"] for a in by_bpp), reverse=True)
    assert client.get("/api/archives", params={"fixity": "intact"}).json()["archives"] == []
    assert len(client.get("/api/archives", params={"min_psnr": "40"}).json()["archives"]) == 2
    assert client.get("/api/archives", params={"min_psnr": "99"}).json()["archives"] == []
    bad = client.get("/api/archives", params={"sort": "1; DROP TABLE archives"})
    assert bad.status_code == 400 and "cannot sort by" in bad.json()["error"]
    assert client.get("/api/archives", params={"min_psnr": "high"}).status_code == 400


def test_archive_page_shows_metadata_contact_sheet_chunks_and_player(root):
    client = _client(root)
    page = client.get("/archive/testsrc.zarr")
    assert page.status_code == 200
    assert hashlib.sha256((DATA / "batch_testsrc_64x48.mkv").read_bytes()).hexdigest() in page.text
    thumbs = [part.split('"')[0] for part in page.text.split('src="/thumb/')[1:]]
    assert len(thumbs) == 12  # one per frame of this 12-frame clip
    png = client.get("/thumb/" + thumbs[5])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with av.open(io.BytesIO(png.content)) as container:
        image = next(container.decode(video=0))
        assert (image.width, image.height) == (64, 48)
    assert page.text.count('<tr><td class="num">') == 3  # one row per chunk
    assert 'id="player"' in page.text and 'src="/play/testsrc.zarr?start=0&amp;stop=12"' in page.text
    assert "<circle" in page.text  # the rate/quality plot has its points


def test_playback_is_h264_mp4_of_the_range_and_download_is_exact_ffv1(root):
    from palstream.archive import open_archive

    client = _client(root)
    mp4 = client.get("/play/testsrc.zarr", params={"start": 2, "stop": 11})
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) == 9
    part = client.get("/play/testsrc.zarr", params={"start": 2, "stop": 11}, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == mp4.content[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(mp4.content)}"
    mkv = client.get("/download/testsrc.zarr", params={"start": 3, "stop": 7})
    assert mkv.status_code == 200 and 'filename="testsrc_3-7.mkv"' in mkv.headers["content-disposition"]
    expected = np.concatenate([run.y for run in open_archive(str(root / "testsrc.zarr")).decode(3, 7)])
    with av.open(io.BytesIO(mkv.content)) as container:
        assert container.streams.video[0].codec_context.name == "ffv1"
        frames = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    assert len(frames) == 4
    assert np.array_equal(np.stack([f[:48] for f in frames]), expected)
    mp4 = client.get("/download/testsrc.zarr", params={"start": 3, "stop": 7, "format": "mp4"})
    assert (
        mp4.headers["content-type"] == "video/mp4"
        and 'filename="testsrc_3-7.mp4"' in mp4.headers["content-disposition"]
    )
    assert client.get("/download/testsrc.zarr", params={"format": "gif"}).status_code == 400


@pytest.mark.parametrize(
    "path",
    [
        "/archive/%2e%2e/%2e%2e/etc/passwd",
        "/thumb/..%2F..%2Fetc%2Fpasswd?frame=0",
        "/play/fractals/%2e%2e/%2e%2e/x.zarr",
        "/download//etc/passwd",
        "/archive/outside/link.zarr",
    ],
)
def test_paths_outside_the_root_are_refused_with_403(root, tmp_path, path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "testsrc.zarr", elsewhere / "link.zarr")
    (root / "outside").symlink_to(elsewhere)  # a link inside the root that leads out of it
    client = _client(root)
    assert "outside/link.zarr" not in client.get("/").text  # not catalogued either
    response = client.get(path)
    assert response.status_code == 403
    assert "only archives under the served root are shown" in response.text and "Traceback" not in response.text


def test_requests_for_another_host_name_are_refused(root):
    client = _client(root)
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding


def test_missing_archive_is_404_and_never_a_traceback(root):
    client = _client(root)
    assert client.get("/archive/absent.zarr").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert "holds no palstream job" in client.get("/job").text  # a folder of archives, not a job's output
    shutil.rmtree(root / "fractals" / "mandel.zarr")  # gone after it was catalogued
    for path in ("/archive/fractals/mandel.zarr", "/thumb/fractals/mandel.zarr?frame=0", "/play/fractals/mandel.zarr"):
        response = client.get(path)
        assert response.status_code == 404 and "moved or deleted" in response.text


def test_verify_now_names_a_flipped_byte_and_damaged_ranges_get_422(root):
    _flip_payload_byte(root / "testsrc.zarr", 1)
    client = _client(root)
    page = client.post("/verify/testsrc.zarr")
    assert page.status_code == 200  # after the redirect back to the archive page
    assert 'id="fixity-state">damaged' in page.text
    assert "1 of 3 chunk(s) damaged: chunk 1: crc32c mismatch" in page.text
    # the contact sheet and the player say which frames are lost instead of showing broken media
    assert 'src="/thumb/testsrc.zarr?frame=3"' in page.text and 'src="/thumb/testsrc.zarr?frame=4"' not in page.text
    assert (
        "chunk 1 is damaged</div>" in page.text
        and 'id="range-damaged">Chunk 1 of this range is damaged or not written' in page.text
    )
    assert "range-damaged" not in client.get("/archive/testsrc.zarr", params={"start": 8, "stop": 12}).text
    row = index.get_archive(index.Catalogue.of(root), "testsrc.zarr")
    assert [c["state"] for c in row["chunks"]] == ["intact", "damaged", "intact"] and row["verified_at"]
    assert "damaged" in client.get("/", params={"fixity": "damaged"}).text
    assert client.get("/play/testsrc.zarr", params={"start": 0, "stop": 4}).status_code == 200  # chunk 0 is intact
    for path in (
        "/play/testsrc.zarr?start=2&stop=6",
        "/download/testsrc.zarr?start=5&stop=6",
        "/thumb/testsrc.zarr?frame=4",
    ):
        response = client.get(path)
        assert response.status_code == 422 and "chunk 1 is damaged" in response.text


def test_a_chunk_without_its_commit_marker_is_shown_as_not_written(root):
    shutil.rmtree(root / "testsrc.zarr" / "commits" / "000002")
    client = _client(root)
    row = next(a for a in client.get("/api/archives").json()["archives"] if a["path"] == "testsrc.zarr")
    assert (row["committed"], row["n_chunks"]) == (2, 3)
    page = client.get("/archive/testsrc.zarr")
    assert page.status_code == 200 and page.text.count("chunk 2 is not written</div>") == 4
    assert 'id="range-damaged">Chunk 2 of this range' in page.text
    response = client.get("/play/testsrc.zarr", params={"start": 7, "stop": 9})
    assert response.status_code == 422 and "chunk 2 is damaged: not written" in response.text


def test_an_odd_sized_lossless_archive_plays_and_downloads_exactly(lossless_archive, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(lossless_archive, root / "screen.zarr")
    client = _client(root)
    row = client.get("/api/archives").json()["archives"][0]
    assert row["lossless"] and row["psnr_min"] is None and row["exact_chunks"] == 3
    assert len(client.get("/api/archives", params={"min_psnr": "60"}).json()["archives"]) == 1  # exact passes any floor
    assert "exact" in client.get("/").text
    with av.open(io.BytesIO(client.get("/thumb/screen.zarr", params={"frame": 5}).content)) as container:
        assert next(container.decode(video=0)).width == 37
    with av.open(io.BytesIO(client.get("/play/screen.zarr").content)) as container:
        frames = list(container.decode(video=0))
        assert len(frames) == 6 and (frames[0].width, frames[0].height) == (38, 30)  # H.264 4:2:0 needs even sizes
    with av.open(io.BytesIO(client.get("/download/screen.zarr").content)) as container:
        frames = [_planes(f) for f in container.decode(video=0)]
    with av.open(str(DATA / "screen_37x29.mkv")) as container:
        source = [_planes(f) for f in container.decode(video=0)]
    assert len(frames) == 6 and all(np.array_equal(a, b) for a, b in zip(frames, source, strict=True))


def test_unreadable_archive_is_listed_and_its_pages_answer_422(root):
    (root / "fractals" / "mandel.zarr" / "zarr.json").write_text("{ not json")
    client = _client(root)
    listed = client.get("/api/archives").json()["archives"]
    broken = next(a for a in listed if a["path"] == "fractals/mandel.zarr")
    assert broken["state"] == "unreadable" and "malformed" in broken["error"]
    page = client.get("/archive/fractals/mandel.zarr")
    assert page.status_code == 200 and "This archive cannot be read" in page.text
    assert client.get("/thumb/fractals/mandel.zarr?frame=0").status_code == 422
    assert client.get("/play/fractals/mandel.zarr").status_code == 422


def test_bad_and_huge_ranges_get_a_clear_status(root, monkeypatch):
    client = _client(root)
    for params in (
        {"start": 0, "stop": 10**12},
        {"start": 5, "stop": 5},
        {"start": -1, "stop": 3},
        {"start": "a", "stop": 3},
    ):
        response = client.get("/play/testsrc.zarr", params=params)
        assert response.status_code == 400, params
    assert client.get("/thumb/testsrc.zarr", params={"frame": 12}).status_code == 400
    monkeypatch.setattr("palstream.catalogue.media.MAX_PLAY_FRAMES", 8)
    assert 'src="/play/testsrc.zarr?start=0&amp;stop=8"' in client.get("/archive/testsrc.zarr").text  # playable
    huge = client.get("/play/testsrc.zarr", params={"start": 0, "stop": 12})
    assert huge.status_code == 413 and "at most 8 frames" in huge.text
    assert client.get("/download/testsrc.zarr", params={"start": 0, "stop": 12}).status_code == 413


def test_an_internal_failure_is_a_500_page_without_a_traceback(root, monkeypatch):
    client = TestClient(create_app(str(root)), base_url="http://127.0.0.1", raise_server_exceptions=False)

    def fail(*args, **kwargs):
        raise RuntimeError("boom in the middle of a request")

    monkeypatch.setattr(index, "get_archive", fail)
    response = client.get("/archive/testsrc.zarr")
    assert response.status_code == 500
    assert "internal error" in response.text and "Traceback" not in response.text and "boom" not in response.text


def test_the_server_writes_nothing_into_the_root_but_the_catalogue(root, tmp_path):
    index.refresh(root)
    before = _tree(root)
    client = _client(root)
    for path in (
        "/",
        "/?q=mandel&sort=bpp&order=desc",
        "/api/archives",
        "/archive/testsrc.zarr",
        "/thumb/testsrc.zarr?frame=3",
        "/play/testsrc.zarr",
        "/download/fractals/mandel.zarr?start=0&stop=8",
    ):
        assert client.get(path).status_code == 200, path
    assert client.post("/verify/testsrc.zarr").status_code == 200
    after = _tree(root)
    catalogue = {"_palstream/catalogue.sqlite"}
    assert {k: v for k, v in after.items() if k not in catalogue} == {
        k: v for k, v in before.items() if k not in catalogue
    }
    # with the catalogue elsewhere (a read-only root), not even the catalogue is written there
    shutil.rmtree(root / "_palstream")
    before = _tree(root)
    elsewhere = tmp_path / "cat.sqlite"
    client = _client(root, catalogue=str(elsewhere))
    assert client.get("/").status_code == 200 and client.post("/verify/testsrc.zarr").status_code == 200
    assert _tree(root) == before
    with sqlite3.connect(elsewhere) as db:
        assert db.execute("SELECT fixity FROM archives WHERE path = 'testsrc.zarr'").fetchone() == ("intact",)


def test_a_verification_elsewhere_is_recorded_in_the_enclosing_catalogue(root, tmp_path):
    from palstream.archive import open_archive

    index.refresh(root)
    archive = root / "fractals" / "mandel.zarr"
    _flip_payload_byte(archive, 0)
    assert index.record_verification(archive, open_archive(str(archive)).verify())
    row = index.get_archive(index.Catalogue.of(root), "fractals/mandel.zarr")
    assert row["fixity"] == "damaged" and row["fixity_detail"].startswith(
        "1 of 2 chunk(s) damaged: chunk 0: crc32c mismatch"
    )
    loose = tmp_path / "loose.zarr"
    shutil.copytree(root / "testsrc.zarr", loose)
    assert not index.record_verification(loose, [])  # no catalogue above it: nothing to update
    assert not index.record_verification("s3://bucket/x.zarr", [])


def test_serve_binds_to_localhost_by_default_and_refuses_a_bad_port(root, run_cli, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    assert run_cli("serve", root).code == 0
    assert calls[0]["host"] == "127.0.0.1" and calls[0]["port"] == 8765
    bad = run_cli("serve", root, "--port", "99999")
    assert bad.code == 1 and bad.stderr == "error: --port 99999 is not a TCP port; give 1..65535\n"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = run_cli("serve", root, "--port", taken.getsockname()[1])
    assert (
        busy.code == 1 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:") and busy.stderr.count("\n") == 1
    )


@pytest.mark.slow
def test_a_real_job_is_catalogued_and_its_job_page_shows_progress(tmp_path, run_cli):
    out = tmp_path / "job"
    inputs = [DATA / "batch_testsrc_64x48.mkv", DATA / "batch_mandel_48x32.mkv"]
    result = run_cli("submit", *inputs, "--out", out, "--workers", "1", "--gop", "4", "--no-progress")
    assert result.code == 0, result.stderr
    before = _tree(out)
    assert "_palstream/catalogue.sqlite" in before  # the job keeps its root's catalogue current
    client = _client(out)
    listed = client.get("/api/archives").json()["archives"]
    assert sorted(a["path"] for a in listed) == ["batch_mandel_48x32.zarr", "batch_testsrc_64x48.zarr"]
    assert all(a["state"] == "complete" for a in listed)
    job = client.get("/job")
    assert job.status_code == 200 and 'id="job-state">complete' in job.text and 'id="job-units">5 of 5' in job.text
    assert 'href="/archive/batch_testsrc_64x48.zarr"' in job.text
    after = _tree(out)
    assert set(after) == set(before)  # the server wrote no new file
    assert all(after[k] == v for k, v in before.items() if k != "_palstream/catalogue.sqlite")


def test_a_remote_root_is_catalogued_in_the_cache_and_served(library, tmp_path, monkeypatch):
    import uuid

    import fsspec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"memory://remote-{uuid.uuid4().hex[:8]}/out"
    fs.put(str(library / "testsrc.zarr"), f"{root}/testsrc.zarr", recursive=True)
    fs.put(str(library / "fractals" / "mandel.zarr"), f"{root}/fractals/mandel.zarr", recursive=True)
    assert index.refresh(root) == {"archives": 2, "read": 2, "dropped": 0}
    cat = index.Catalogue.of(root)
    assert cat.path.parent == tmp_path / "cache" / "palstream" / "catalogues"  # SQLite needs a local file
    row = index.get_archive(cat, "testsrc.zarr")
    assert row["state"] == "complete" and row["frames"] == 12 and row["archive_bytes"] > row["payload_bytes"]
    before = set(fs.find(root))
    client = _client(root)
    assert 'href="/archive/fractals/mandel.zarr"' in client.get("/").text
    assert client.get("/thumb/testsrc.zarr", params={"frame": 2}).headers["content-type"] == "image/png"
    assert client.get("/play/testsrc.zarr").headers["content-type"] == "video/mp4"
    assert client.get("/archive/..%2Fother").status_code == 403
    payload = f"{root}/testsrc.zarr/chunks/000001/c/0"
    data = bytearray(fs.cat_file(payload))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(payload, bytes(data))
    assert "chunk 1: crc32c mismatch" in client.post("/verify/testsrc.zarr").text
    assert set(fs.find(root)) == before  # nothing written under the remote root
    fs.rm(f"{root}/fractals", recursive=True)
    assert [a["path"] for a in client.get("/api/archives").json()["archives"]] == ["testsrc.zarr"]


@pytest.mark.slow  # a moto S3 server, and botocore's retries against an endpoint that does not answer
def test_ls_of_an_s3_root_with_the_storage_options_of_every_command(
    library, s3_endpoint, run_cli, tmp_path, monkeypatch
):
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, skip_instance_cache=True)
    # a prefix of its own: the bucket is shared by the session's S3 tests
    fs.put(str(library / "testsrc.zarr"), "archives/catalogue-lib/a/testsrc.zarr", recursive=True)
    result = run_cli("ls", "s3://archives/catalogue-lib", "--json", "--endpoint-url", s3_endpoint)
    assert result.code == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [(a["path"], a["state"]) for a in listing["archives"]] == [("a/testsrc.zarr", "complete")]
    unreachable = run_cli("ls", "s3://archives/catalogue-lib", "--endpoint-url", "http://127.0.0.1:9")
    assert (
        unreachable.code == 1
        and unreachable.stderr.count("\n") == 1
        and "no storage endpoint answers" in unreachable.stderr
    )


def test_the_commands_load_without_the_archive_reader():
    import subprocess
    import sys

    # palstream.cli imports every command group at start: the catalogue's must not slow that down
    code = "import sys, palstream.catalogue.cli; print(sorted({'zarr', 'numba', 'starlette'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stdout + done.stderr


def test_palstream_verify_records_its_outcome_in_the_catalogue(root, run_cli):
    index.rebuild(root)
    assert run_cli("verify", root / "testsrc.zarr").code == 0
    _flip_payload_byte(root / "fractals" / "mandel.zarr", 1)
    assert run_cli("verify", root / "fractals" / "mandel.zarr").code == 1
    fixity = {a["path"]: a["fixity"] for a in json.loads(run_cli("ls", root, "--json").stdout)["archives"]}
    assert fixity == {"testsrc.zarr": "intact", "fractals/mandel.zarr": "damaged"}
