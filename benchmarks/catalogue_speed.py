"""How fast the library catalogue lists and the browser shows an archive (issue 18's targets).

Builds a library of 100 archives (the 640x360 demo clip, 16 frames in GOPs of 4, encoded once and
copied into 10 folders), then times through the web app in process (Starlette's TestClient: the
server's work without the network):

- ``rebuild``: ``palstream catalogue rebuild`` of the 100 archives (every archive read);
- ``library page``: ``GET /`` listing all 100 (it refreshes the catalogue first), target < 1 s;
- ``ls --json``: the catalogue refreshed and listed as ``palstream ls --json`` does, target < 1 s;
- ``thumbnail page``: ``GET /archive/...`` and its 12 contact-sheet thumbnails, each decoded from
  the archive with a cold cache (a different archive each run), target < 2 s; and warm;
- the library page and a cold thumbnail page in headless Chromium against uvicorn on 127.0.0.1
  (until the page's load event / until every thumbnail has loaded), where Chromium and
  Playwright are installed (``--no-browser`` skips them).

Each figure is the median of ``--runs`` runs. Usage::

    python -m benchmarks.catalogue_speed [--runs 5] [--no-browser] [--out benchmarks/results/catalogue_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from starlette.testclient import TestClient

import palstream
from palstream.catalogue import index
from palstream.catalogue.server import create_app
from palstream.codec import EncoderConfig
from palstream.pipeline import encode_file

DEMO = Path(palstream.__file__).parent / "data" / "demo.mkv"
ARCHIVES = 100
TARGETS = {
    "library page": 1.0,
    "ls --json": 1.0,
    "thumbnail page (cold)": 2.0,
    "library page (Chromium)": 1.0,
    "thumbnail page (Chromium, cold)": 2.0,
}
CHROMIUM = os.environ.get("PALSTREAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def build_library(root: Path) -> list[str]:
    """100 archives under ``root`` (10 folders of 10); their relative paths."""
    first = root / "d0" / "clip000.zarr"
    encode_file(str(DEMO), str(first), EncoderConfig(gop=4))
    paths = []
    for i in range(ARCHIVES):
        rel = f"d{i // 10}/clip{i:03d}.zarr"
        if i:
            shutil.copytree(first, root / rel)
        paths.append(rel)
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def browser_timings(root: Path, cold: list[str]) -> dict[str, list[float]]:
    """The same pages in headless Chromium against uvicorn on 127.0.0.1: until the table is shown,
    and until every thumbnail has loaded (cold: archives not shown before)."""
    import socket
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(str(root)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    all_loaded = "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url + "/")  # warm-up: templates, codec kernels
            library = [timed(lambda: page.goto(url + "/", wait_until="load")) for _ in cold]
            thumbs = []
            for rel in cold:
                start = time.perf_counter()
                page.goto(f"{url}/archive/{rel}")
                page.wait_for_function(all_loaded, timeout=60_000)
                thumbs.append(time.perf_counter() - start)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(30)
    return {"library page (Chromium)": library, "thumbnail page (Chromium, cold)": thumbs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/catalogue_speed.json")
    parser.add_argument("--no-browser", action="store_true", help="skip the timings in headless Chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="palstream-catalogue-bench-") as tmp:
        root = Path(tmp) / "library"
        paths = build_library(root)
        rebuild = [timed(lambda: index.rebuild(root)) for _ in range(args.runs)]
        client = TestClient(create_app(str(root)), base_url="http://127.0.0.1")
        client.get("/")  # first request: templates compiled

        def library() -> None:
            page = client.get("/")
            assert page.status_code == 200 and page.text.count('class="archive-row"') == ARCHIVES

        def ls_json() -> None:
            index.refresh(root)
            listing = json.dumps(index.list_archives(index.Catalogue.of(root)))
            assert listing.count('"path"') == ARCHIVES

        def thumbnail_page(rel: str) -> None:
            page = client.get(f"/archive/{rel}")
            thumbs = re.findall(r'src="(/thumb/[^"]+)"', page.text)
            assert page.status_code == 200 and len(thumbs) == 12
            for url in thumbs:
                response = client.get(url.replace("&amp;", "&"))
                assert response.status_code == 200 and response.headers["content-type"] == "image/png"

        client.get("/thumb/" + paths[-1] + "?frame=0")  # the codec's kernels loaded before timing
        results = {
            "rebuild (100 archives)": rebuild,
            "library page": [timed(library) for _ in range(args.runs)],
            "ls --json": [timed(ls_json) for _ in range(args.runs)],
            "thumbnail page (cold)": [timed(lambda rel=rel: thumbnail_page(rel)) for rel in paths[: args.runs]],
            "thumbnail page (warm)": [timed(lambda: thumbnail_page(paths[0])) for _ in range(args.runs)],
        }
        if CHROMIUM and not args.no_browser:
            results.update(browser_timings(root, paths[args.runs : 2 * args.runs]))
    rows = []
    print(f"{'measure':<34} {'median s':>9} {'max s':>7} {'target s':>9}  ok")
    for name, times in results.items():
        median, worst, target = statistics.median(times), max(times), TARGETS.get(name)
        ok = "" if target is None else ("yes" if median < target else "NO")
        print(f"{name:<34} {median:>9.3f} {worst:>7.3f} {target if target else '-':>9}  {ok}")
        rows.append({"measure": name, "median_s": median, "max_s": worst, "target_s": target, "runs_s": times})
    report = {
        "archives": ARCHIVES,
        "clip": "palstream/data/demo.mkv (640x360, 16 frames, GOP 4, 12 thumbnails per page)",
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "palstream": palstream.__version__,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
