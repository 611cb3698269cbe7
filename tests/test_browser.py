"""``palstream serve`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

The server runs on 127.0.0.1 in a thread, over the output of a real two-clip job. Skipped
where Playwright or a Chromium executable is missing. With ``PALSTREAM_SCREENSHOTS=1`` the pages
are saved to ``docs/catalogue/`` (the job then also encodes the 640x360 demo clip, for legible images).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need Playwright (pip install playwright)"
)
pytest.importorskip("uvicorn", reason="the browser tests need palstream's 'serve' extra")

DATA = Path(__file__).parent / "data"
SHOTS = Path(__file__).parent.parent / "docs" / "catalogue"
SCREENSHOTS = os.environ.get("PALSTREAM_SCREENSHOTS") == "1"
CHROMIUM = os.environ.get("PALSTREAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TESTSRC, MANDEL, DEMO = "batch_testsrc_64x48.zarr", "batch_mandel_48x32.zarr", "demo.zarr"  # the job's archives
_ARCHIVES = (TESTSRC, MANDEL, DEMO) if SCREENSHOTS else (TESTSRC, MANDEL)
TIMEOUT_MS = 60_000  # generous: two busy cores, and the first decode may compile the codec

if CHROMIUM is None:
    pytest.skip(
        "no Chromium executable (install Debian's chromium: apt-get install -y chromium, or set PALSTREAM_CHROMIUM)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The output root of a real job (``palstream submit``) over two small clips, GOPs of 4."""
    folder = tmp_path_factory.mktemp("library")
    clips = [DATA / "batch_testsrc_64x48.mkv", DATA / "batch_mandel_48x32.mkv"]
    if SCREENSHOTS:
        clips.append(Path(__file__).parent.parent / "palstream" / "data" / "demo.mkv")
    (folder / "in").mkdir()
    for clip in clips:  # one input folder: every archive lands at the top of the output root
        shutil.copy(clip, folder / "in")
    root = folder / "out"
    command = [
        sys.executable,
        "-c",
        "from palstream.cli import main; main()",
        "submit",
        *sorted(map(str, (folder / "in").iterdir())),
    ]
    done = subprocess.run(
        [*command, "--out", str(root), "--workers", "1", "--gop", "4", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return root


class _Server:
    """``palstream serve``'s app under uvicorn on a free 127.0.0.1 port, in a thread."""

    def __init__(self, root: Path):
        import uvicorn

        from palstream.catalogue.server import create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(str(root)), host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(library):
    with _Server(library) as running:
        yield running


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def _shot(page, name: str) -> None:
    if SCREENSHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _rows(page) -> list[str]:
    return page.locator("#library tbody tr.archive-row td:first-child a").all_inner_texts()


def test_the_table_lists_the_archives_and_search_filters(page, server):
    page.goto(server.url + "/")
    assert sorted(_rows(page)) == sorted(_ARCHIVES)
    assert "archive" in page.locator("#totals").inner_text()
    _shot(page, "library")
    page.fill("#search", "mandel")
    page.press("#search", "Enter")
    page.wait_for_url("**/?q=mandel*")
    assert _rows(page) == [MANDEL]
    page.fill("#search", "no-such-video")
    page.press("#search", "Enter")
    page.wait_for_url("**/?q=no-such-video*")
    assert _rows(page) == [] and "No archive matches." in page.inner_text("#library")
    page.click("header >> text=job")
    assert page.inner_text("#job-state") == "complete" and page.locator("#videos tbody tr").count() == len(_ARCHIVES)
    _shot(page, "job")


def test_thumbnails_load_and_playback_starts(page, server):
    page.goto(server.url + "/")
    page.click(f"text={TESTSRC}")
    page.wait_for_url(f"**/archive/{TESTSRC}")
    thumbs = page.locator("img.thumb")
    assert thumbs.count() == 12
    page.wait_for_function("[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)")
    assert thumbs.first.evaluate("i => i.naturalWidth") == 64
    page.evaluate("document.getElementById('player').play()")
    page.wait_for_function("document.getElementById('player').readyState >= 2")
    first = page.evaluate("document.getElementById('player').currentTime")
    page.wait_for_function(f"document.getElementById('player').currentTime !== {first}")
    assert page.evaluate("document.getElementById('player').error") is None
    if SCREENSHOTS:
        page.goto(f"{server.url}/archive/{DEMO}")
        page.wait_for_function(
            "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
        page.evaluate("document.getElementById('player').play()")
        page.wait_for_function("document.getElementById('player').currentTime > 0.3")
        page.evaluate("document.getElementById('player').pause()")
        _shot(page, "archive")


def test_verify_now_reports_a_flipped_byte(page, library, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(library, root)
    # The job writes archive format 4 with one chunk per shard (units_per_task = 1): shard 2 is
    # chunk 2, its payload after the inner chunk's 8-byte header (storage/FORMAT.md §8).
    payload = root / TESTSRC / "chunks" / "c" / "2"
    data = bytearray(payload.read_bytes())
    data[8 + 16] ^= 0x10
    payload.write_bytes(bytes(data))
    with _Server(root) as server:
        page.goto(f"{server.url}/archive/{TESTSRC}")
        assert page.inner_text("#fixity-state") == "unverified"
        page.click("#verify")
        page.wait_for_url(f"**/archive/{TESTSRC}?verified=1*")
        assert page.inner_text("#fixity-state") == "damaged"
        assert "chunk 2: crc32c mismatch" in page.inner_text("#fixity-detail")
        assert "damaged" in page.locator("#chunks tbody tr").nth(2).inner_text()
        assert page.locator(".no-thumb").count() == 4  # frames 8..11, instead of broken images
        page.wait_for_function(
            "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert "Chunk 2 of this range is damaged" in page.inner_text("#range-damaged")
        page.locator("#fixity").scroll_into_view_if_needed()
        _shot(page, "verify-damaged")
        response = page.goto(server.url + "/archive/..%2F..%2Fetc%2Fpasswd")
        assert response.status == 403 and "only archives under the served root" in page.inner_text("#error-detail")
        _shot(page, "error-403")
