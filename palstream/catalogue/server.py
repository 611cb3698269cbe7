"""``palstream serve``: a local, read-only web app over a catalogued output root (Starlette).

Pages: the library table (search, sort, filter, totals) and one page per archive (metadata, a
contact sheet of decoded frames, per-chunk fixity with "verify now", playback of a frame range
as H.264/MP4 and its download as FFV1/MKV). Nothing is written under the root but the catalogue,
and only archives the catalogue lists, resolved inside the root, are ever read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from palstream.archive import open_archive
from palstream.catalogue import formatting, index
from palstream.catalogue.media import (
    DecodedCache,
    RangeTooLargeError,
    check_range,
    ffv1_mkv,
    max_frames,
    playable_mp4,
)
from palstream.errors import ArchiveError, DamagedChunkError, PalstreamError
from palstream.storage import Location

HERE = Path(__file__).parent
CONTACT_SHEET = 12  # frames shown per archive
DEFAULT_PLAY_FRAMES = 250

# Host names the app answers to: a page elsewhere cannot reach it through DNS rebinding.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STATES = ("complete", "incomplete", "unreadable")
DOWNLOADS = {"mkv": (ffv1_mkv, "video/x-matroska"), "mp4": (playable_mp4, "video/mp4")}  # ?format= -> encoder, type
FIXITY_STATES = ("unverified", "intact", "damaged", "incomplete", "unreadable")


def _contact_frames(frame_count: int, gop: int) -> list[int]:
    """Up to CONTACT_SHEET frames spread over the archive, each a chunk's first frame when there
    are enough chunks (a key frame: one decoded chunk per thumbnail)."""
    starts = list(range(0, frame_count, gop))
    if len(starts) >= CONTACT_SHEET:
        step = len(starts) / CONTACT_SHEET
        return [starts[int(i * step)] for i in range(CONTACT_SHEET)]
    count = min(CONTACT_SHEET, frame_count)
    return sorted({int(i * frame_count / count) for i in range(count)})


class _Error(HTTPException):
    """An HTTP error with a one-line message for the error page."""


def create_app(
    root: str | Location,
    catalogue: str | None = None,
    refresh: bool = True,
    hosts: Sequence[str] = LOCAL_HOSTS,
) -> Starlette:
    """The web app for the output root ``root``.

    Parameters
    ----------
    root : str or Location
        Output root (a job's output or any folder of archives): a local path or a URL, or a
        location with its storage options.
    catalogue : str, optional
        SQLite file; default ``<root>/_palstream/catalogue.sqlite`` (a cache file for a remote root).
    refresh : bool, default True
        Bring the catalogue up to date now and on every load of the library page.
    hosts : sequence of str, default LOCAL_HOSTS
        Host names accepted in the ``Host`` header (``"*"``: any); others get 400.

    Raises
    ------
    PalstreamError
        ``root`` is not a folder of archives or cannot be read, or the catalogue cannot be written.
    """
    cat = index.Catalogue.of(root, catalogue)
    if refresh:
        index.refresh(cat)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(
        size=formatting.size,
        duration=formatting.duration,
        when=formatting.when,
        number=formatting.number,
        urlpath=quote,
    )
    cache = DecodedCache()

    def lookup(rel: str) -> dict:
        """The catalogue row of ``rel``; 403 outside the root, 404 unknown or gone."""
        try:
            location = cat.archive_location(rel)
        except index.OutsideRootError as exc:
            raise _Error(403, f"{exc}; only archives under the served root are shown") from None
        try:
            row = index.get_archive(cat, rel)
        except index.MissingArchiveError as exc:
            raise _Error(404, f"{exc}; see the library for what is there") from None
        if not cat.holds(f"{rel}/zarr.json"):
            raise _Error(404, f"archive {rel} was moved or deleted since it was catalogued; reload the library")
        row["location"] = location
        return row

    def open_row(row: dict):
        if row["state"] == "unreadable":
            raise _Error(422, f"archive {row['path']} cannot be read: {row['error']}")
        try:
            archive = open_archive(row["location"])
        except ArchiveError as exc:
            raise _Error(422, str(exc)) from None
        return archive, (row["path"], (archive.attrs.get("integrity") or {}).get("sha256"))

    def frame_range(request: Request, frame_count: int, default: int | None = None) -> tuple[int, int]:
        params = request.query_params
        try:
            start = int(params.get("start") or 0)
            stop = int(params.get("stop") or min(frame_count, start + (default or frame_count)))
        except ValueError:
            raise _Error(400, "start and stop must be whole frame numbers, e.g. ?start=0&stop=32") from None
        if not 0 <= start < stop <= frame_count:
            raise _Error(400, f"frame range {start}:{stop} is outside the archive's frames 0:{frame_count} or empty")
        return start, stop

    def filters(request: Request) -> dict:
        params = request.query_params
        min_psnr = params.get("min_psnr", "").strip()
        try:
            psnr = float(min_psnr) if min_psnr else None
        except ValueError:
            raise _Error(400, f"minimum PSNR {min_psnr!r} is not a number") from None
        if psnr is not None and not math.isfinite(psnr):
            raise _Error(400, "minimum PSNR must be a finite number")
        sort = params.get("sort", "path")
        if sort not in index.SORT_KEYS:
            raise _Error(400, f"cannot sort by {sort!r}; choose one of {', '.join(index.SORT_KEYS)}")
        return {
            "query": params.get("q", ""),
            "state": params.get("state", "") if params.get("state", "") in STATES else "",
            "fixity": params.get("fixity", "") if params.get("fixity", "") in FIXITY_STATES else "",
            "min_psnr": psnr,
            "sort": sort,
            "descending": params.get("order") == "desc",
        }

    def library(request: Request):
        if refresh:
            index.refresh(cat)
        chosen = filters(request)
        rows = index.list_archives(cat, **chosen)

        def sort_link(key: str) -> str:
            order = "desc" if chosen["sort"] == key and not chosen["descending"] else "asc"  # a click toggles
            params = {k: v for k, v in request.query_params.items() if k not in ("sort", "order")}
            return "?" + urlencode({**params, "sort": key, "order": order})

        return templates.TemplateResponse(
            request,
            "library.html",
            {
                "root": cat.location.redacted,
                "rows": rows,
                "totals": index.totals(rows),
                "f": chosen,
                "sort_link": sort_link,
                "states": STATES,
                "fixity_states": FIXITY_STATES,
                "min_psnr": request.query_params.get("min_psnr", ""),
            },
        )

    def api_archives(request: Request):
        if refresh:
            index.refresh(cat)
        rows = index.list_archives(cat, **filters(request))
        return JSONResponse({"root": cat.location.redacted, "archives": rows, "totals": index.totals(rows)})

    def archive_page(request: Request):
        row = lookup(request.path_params["rel"])
        frame_count = row["frames"] or 0
        # the default range is one the server will play: at most DEFAULT_PLAY_FRAMES, within the limit
        default = min(DEFAULT_PLAY_FRAMES, max_frames(row["width"], row["height"])) if frame_count else 0
        start, stop = frame_range(request, frame_count, default) if frame_count else (0, 0)
        plot = _rd_points(row["chunks"])
        lost = {
            c["idx"]: "damaged" if c["state"] == "damaged" else "not written"
            for c in row["chunks"]
            if c["state"] in ("damaged", "missing")
        }
        gop = row["gop"] or 1
        return templates.TemplateResponse(
            request,
            "archive.html",
            {
                "a": row,
                "contact": _contact_frames(frame_count, row["gop"]) if row["state"] != "unreadable" else [],
                "start": start,
                "stop": stop,
                "range": urlencode({"start": start, "stop": stop}),
                "plot": plot,
                "lost": lost,
                "range_lost": [i for i in sorted(lost) if start // gop <= i <= (stop - 1) // gop],
            },
        )

    def thumbnail(request: Request):
        row = lookup(request.path_params["rel"])
        archive, key = open_row(row)
        try:
            frame = int(request.query_params.get("frame", "0"))
        except ValueError:
            raise _Error(400, "frame must be a whole frame number") from None
        if not 0 <= frame < archive.frame_count:
            raise _Error(400, f"frame {frame} is outside the archive's frames 0:{archive.frame_count}")
        try:
            png = cache.thumbnail(archive, key, frame)
        except DamagedChunkError as exc:
            raise _Error(422, f"{exc}; verify the archive") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def decode_range(request: Request, encode) -> tuple[bytes, int, int, dict]:
        row = lookup(request.path_params["rel"])
        archive, key = open_row(row)
        start, stop = frame_range(request, archive.frame_count)
        try:
            check_range(archive.source, start, stop)
        except RangeTooLargeError as exc:
            raise _Error(413, str(exc)) from None
        gop = archive.attrs["gop"]

        def runs():
            for i in range(start // gop, (stop - 1) // gop + 1):
                held = archive.chunk_frames(i)
                yield cache.chunk(archive, key, i)[
                    max(start, held.start) - held.start : min(stop, held.stop) - held.start
                ]

        try:
            return encode(runs(), archive.source), start, stop, row
        except DamagedChunkError as exc:
            raise _Error(
                422, f"{exc}; this range cannot be played: choose frames outside that chunk or restore the archive"
            ) from None

    def play(request: Request):
        data, *_ = decode_range(request, playable_mp4)
        return _ranged(request, data, "video/mp4")

    def download(request: Request):
        kind = request.query_params.get("format", "mkv")
        if kind not in DOWNLOADS:
            raise _Error(400, f"format {kind!r} is not offered; choose mkv (FFV1, exact) or mp4 (H.264)")
        encode, media_type = DOWNLOADS[kind]
        data, start, stop, row = decode_range(request, encode)
        name = Path(row["path"]).name.removesuffix(".zarr")
        return Response(
            data,
            media_type=media_type,
            headers={"Content-Disposition": f'attachment; filename="{quote(name)}_{start}-{stop}.{kind}"'},
        )

    async def verify(request: Request):
        rel = request.path_params["rel"]
        lookup(rel)
        try:
            await run_in_threadpool(index.verify_archive, cat, rel)
        except PalstreamError as exc:
            raise _Error(422, str(exc)) from None
        return RedirectResponse(f"/archive/{quote(rel)}?verified=1#fixity", status_code=303)

    def job_page(request: Request):
        from palstream.batch.status import job_status

        if not cat.holds(f"{index.JOB_DIR}/plan.json"):
            raise _Error(
                404,
                f"{cat.location.redacted} holds no palstream job (no {index.JOB_DIR}/plan.json); it is a folder of archives",
            )
        try:
            job = job_status(cat.location)
        except PalstreamError as exc:
            raise _Error(422, str(exc)) from None
        known = {r["path"] for r in index.list_archives(cat)}
        return templates.TemplateResponse(
            request, "job.html", {"root": cat.location.redacted, "job": job, "catalogued": known}
        )

    async def error_page(request: Request, exc: Exception):
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error; the server log has the details"
        if status == 404 and not isinstance(exc, _Error):
            detail = f"nothing at {request.url.path}; see the library"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": detail}, status_code=status)
        context = {"status": status, "phrase": HTTPStatus(status).phrase, "detail": detail}
        return templates.TemplateResponse(request, "error.html", context, status_code=status)

    routes = [
        Route("/", library),
        Route("/api/archives", api_archives),
        Route("/job", job_page),
        Route("/archive/{rel:path}", archive_page),
        Route("/thumb/{rel:path}", thumbnail),
        Route("/play/{rel:path}", play),
        Route("/download/{rel:path}", download),
        Route("/verify/{rel:path}", verify, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))],
        exception_handlers={HTTPException: error_page, Exception: error_page},
    )


def _ranged(request: Request, data: bytes, media_type: str) -> Response:
    """``data`` whole, or the one byte range a ``Range: bytes=a-b`` header asks for (media elements seek so)."""
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=3600"}
    spec = request.headers.get("range", "")
    if spec.startswith("bytes=") and "," not in spec:
        first, _, last = spec[6:].partition("-")
        try:
            if first:
                begin, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            else:
                begin, end = max(0, len(data) - int(last)), len(data) - 1
        except ValueError:
            begin, end = 0, -1
        if not 0 <= begin <= end:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {begin}-{end}/{len(data)}"
        return Response(data[begin : end + 1], status_code=206, media_type=media_type, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def _rd_points(chunks: list[dict]) -> dict | None:
    """Chunks as points of a bpp/PSNR-Y plot (SVG coordinates), or None without finite PSNRs."""
    points = [(c["idx"], c["bpp"], c["psnr_y"]) for c in chunks if c["bpp"] is not None and c["psnr_y"] is not None]
    if not points:
        return None
    width, height, pad = 360, 200, 36
    bpps, psnrs = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = 0.0, max(bpps) * 1.1 or 1.0
    y0, y1 = math.floor(min(psnrs) - 1), math.ceil(max(psnrs) + 1)
    scale_x = (width - 2 * pad) / (x1 - x0)
    scale_y = (height - 2 * pad) / (y1 - y0)
    return {
        "width": width,
        "height": height,
        "pad": pad,
        "points": [
            {"idx": i, "bpp": b, "psnr": p, "x": pad + (b - x0) * scale_x, "y": height - pad - (p - y0) * scale_y}
            for i, b, p in points
        ],
        "x_max": x1,
        "y_min": y0,
        "y_max": y1,
    }
