"""``palstream submit``, ``status`` and ``resume``: thin commands over ``palstream.batch``.

Settings precedence: command line > job file > defaults (see ``docs/batch.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from palstream.errors import PalstreamError

OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Output root (path or URL, e.g. s3://bucket/archives).")]
WorkersOpt = Annotated[
    int | None, typer.Option(help="Workers: processes for 'local' (default: one per core), GPUs for 'cuda'.")
]
ClusterOpt = Annotated[
    str | None, typer.Option(help="'local' (default), 'cuda' (needs the gpu extra) or a scheduler address tcp://HOST:PORT.")
]
ThreadsOpt = Annotated[int | None, typer.Option(help="Threads per worker (default 1).")]
RetriesOpt = Annotated[int | None, typer.Option(help="Extra attempts per failing unit before it is quarantined (default 2).")]
InFlightOpt = Annotated[int | None, typer.Option(help="Tasks in flight at once (default: one per worker thread).")]
PerTaskOpt = Annotated[
    int | None, typer.Option(help="Consecutive units of one input per Dask task (default 1; tens to hundreds for large libraries).")
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(help="Storage profile from storage/profiles.toml (or $PALSTREAM_STORAGE_PROFILES).", envvar="PALSTREAM_STORAGE_PROFILE"),
]
EndpointOpt = Annotated[
    str | None, typer.Option(help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000.", envvar="PALSTREAM_S3_ENDPOINT")
]
MetricsPortOpt = Annotated[int | None, typer.Option(help="Serve the driver's Prometheus /metrics on this port.")]
MetricsHostOpt = Annotated[str, typer.Option(help="Interface for --metrics-port (keep 127.0.0.1 unless the network is trusted).")]
TargetsOpt = Annotated[
    str | None, typer.Option(help="Keep this Prometheus file_sd JSON listing the workers' /metrics addresses.")
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Live progress bar.")]
DropOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--drop-stream",
        help="Leave out the source stream with this index (as ffprobe and 'palstream info' number them); repeatable.",
    ),
]


TABLES = ("codec", "storage", "tuner")  # job-file tables that command-line options fill in


def _overrides(**options) -> dict:
    """Only the options given on the command line (they override the job file)."""
    data = {k: v for k, v in options.items() if v is not None and k not in TABLES}
    for table in TABLES:
        given = {k: v for k, v in options.get(table, {}).items() if v is not None}
        if given:
            data[table] = given
    return data


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _is_job_file(arg: str) -> bool:
    return arg.endswith(".toml")


def _run(spec, resume: bool, metrics_port, metrics_host, progress: bool, worker_targets) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from palstream.batch.runner import run_job

    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]encode"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units  {task.fields[fps]:.1f} frames/s  {task.fields[quarantined]} quarantined"),
        TimeElapsedColumn(),
    )
    bar = Progress(*columns, console=console, disable=not progress or not console.is_terminal)
    task = bar.add_task("encode", total=None, fps=0.0, quarantined=0)

    def update(p):
        if not bar.live.is_started:  # show the bar only once work runs, after the up-front checks
            bar.reset(task)
            bar.start()
        bar.update(task, completed=p.units_done, total=p.units_total, fps=p.frames_per_second, quarantined=p.quarantined)

    try:
        report = run_job(
            spec,
            resume=resume,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            on_progress=update,
            worker_targets=worker_targets,
        )
    finally:
        bar.stop()
    done = [name for name, state in report.archives.items() if state == "complete"]
    typer.echo(
        f"{len(done)} archive(s) complete under {report.output}: {report.units_encoded} unit(s) encoded, "
        f"{report.units_skipped} already committed, {report.frames_encoded} frames in {report.seconds:.1f} s "
        f"({report.frames_per_second:.1f} frames/s)"
    )
    if report.quarantined:
        # One line per failed input (its first failure); the details are in the job log.
        failed: dict[str, dict] = {}
        for q in report.quarantined:
            failed.setdefault(q["input"], q)
        for q in failed.values():
            where = f" unit {q['unit']}" if q["unit"] is not None else ""
            typer.echo(f"error: {q['input']}{where}: {q['reason']}", err=True)
        raise PalstreamError(
            f"{len(failed)} input(s) failed and were not archived as complete; details in {report.log}, "
            f"state in `palstream status {report.output}`"
        )


def submit(
    args: Annotated[list[str], typer.Argument(help="A job file (JOB.toml), or input videos/globs/URLs.", show_default=False)],
    out: OutOpt = None,
    workers: WorkersOpt = None,
    cluster: ClusterOpt = None,
    threads_per_worker: ThreadsOpt = None,
    retries: RetriesOpt = None,
    max_in_flight: InFlightOpt = None,
    units_per_task: PerTaskOpt = None,
    target_psnr: Annotated[float | None, typer.Option(help="Quality floor in dB PSNR-Y per chunk (default 45).")] = None,
    lossless: Annotated[bool | None, typer.Option("--lossless/--lossy", help="Bit-exact 4:2:0 (default: lossy).")] = None,
    palette: Annotated[str | None, typer.Option(help="Palette generator name (default kmeans).")] = None,
    gop: Annotated[int | None, typer.Option(help="Frames per chunk, the unit of work (default 32).")] = None,
    allow_truncated: Annotated[
        bool | None,
        typer.Option(
            "--allow-truncated",
            help="Archive the frames before the break of a truncated or damaged input instead of refusing it (recorded in the plan and the archive).",
        ),
    ] = None,
    audio: Annotated[
        str | None,
        typer.Option(
            help="How each archive keeps its source's audio: copy (packets bit-exact, the default) or flac "
            "(re-encoded losslessly; refused for audio that decodes to floating point, such as AAC)."
        ),
    ] = None,
    drop_stream: DropOpt = None,
    tune: Annotated[
        bool | None, typer.Option("--tune/--no-tune", help="Let the tuner choose each batch's encoder configuration (see docs/tuner.md).")
    ] = None,
    replay_ledger: Annotated[
        str | None, typer.Option(help="Take every batch's configuration from a tuned job's _palstream/tuner/ledger.jsonl (implies --tune).")
    ] = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
    metrics_port: MetricsPortOpt = None,
    metrics_host: MetricsHostOpt = "127.0.0.1",
    worker_targets: TargetsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Encode a library: one archive per input under the output root, on a Dask cluster.

    Give a job file (see jobs/), or inputs and --out. A rerun on the same output continues it.
    """
    from palstream.batch.spec import JobSpec, load_job_file

    over = _overrides(
        output=out,
        workers=workers,
        cluster=cluster,
        threads_per_worker=threads_per_worker,
        retries=retries,
        max_in_flight=max_in_flight,
        units_per_task=units_per_task,
        allow_truncated=allow_truncated,
        audio=audio,
        drop_streams=drop_stream,
        codec={"target_psnr": target_psnr, "lossless": lossless, "palette": palette, "gop": gop},
        storage={"profile": storage_profile, "endpoint_url": endpoint_url},
        tuner={
            "enabled": True if replay_ledger else tune,
            "replay": replay_ledger if replay_ledger is None or "://" in replay_ledger else str(Path(replay_ledger).absolute()),
        },
    )
    if len(args) == 1 and _is_job_file(args[0]):
        base, where = load_job_file(args[0]), args[0]
    elif any(_is_job_file(a) for a in args):
        raise PalstreamError("give either one job file or input videos, not both; list extra inputs in the job file")
    else:
        base, where = {"inputs": list(args)}, "command line"
        if out is None:
            raise PalstreamError("--out is required without a job file: palstream submit INPUT... --out DIR_OR_URL")
    spec = JobSpec.from_dict(_merge(base, over), where=where)
    _run(spec, resume=False, metrics_port=metrics_port, metrics_host=metrics_host, progress=progress, worker_targets=worker_targets)


def _output_of(target: str, storage: dict) -> tuple[str, dict, dict]:
    """Output root, stored job settings, and the storage settings the user gave (job file and
    command line), for a job file or an output root."""
    from palstream.batch.plan import load_job_settings
    from palstream.batch.spec import StorageSpec, load_job_file
    from palstream.storage import Location

    if _is_job_file(target):
        data = load_job_file(target)
        if "output" not in data:
            raise PalstreamError(f"{target}: field 'output' is missing; see jobs/README.md")
        target = data["output"]
        storage = {**data.get("storage", {}), **storage}
    if "://" not in target:
        target = str(Path(target).absolute())
    target = target.rstrip("/")
    options = StorageSpec.from_dict(storage).options(target)
    settings = load_job_settings(Location(target, options))
    if settings is None:
        raise PalstreamError(f"{target} holds no palstream job (no _palstream/job.json); give a job file or a job's output root")
    return target, settings, storage


def status(
    target: Annotated[str, typer.Argument(help="A job file or a job's output root.")],
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show per-video progress, throughput, compression ratio, quality and failures of a job.

    Exit status: 0 every input is complete; 3 the job is running, stopped or not started, and
    nothing has failed; 4 the job is not running and an input was refused or quarantined;
    1 the job could not be read (no job there, unreadable or modified job files).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from palstream.batch.spec import StorageSpec
    from palstream.batch.status import exit_code, job_status
    from palstream.storage import Location

    storage = _overrides(storage={"profile": storage_profile, "endpoint_url": endpoint_url}).get("storage", {})
    output, settings, _ = _output_of(target, storage)
    options = StorageSpec.from_dict({**settings.get("storage", {}), **storage}).options(output)
    info = job_status(Location(output, options))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        raise typer.Exit(exit_code(info))
    from rich.markup import escape

    running = f" by {info['running_by']}" if info["running_by"] else ""
    table = Table(title=escape(f"{output}  [{info['state']}{running}]"))
    for col in ("video", "state", "units", "frames", "ratio", "min PSNR-Y"):
        table.add_column(col, justify="left" if col in ("video", "state") else "right")
    for v in info["videos"]:
        table.add_row(
            v["name"],
            v["state"],
            f"{v['units_done']}/{v['units_total']}",
            f"{v['frames_done']}/{v['frames_total']}",
            f"{v['ratio']:.2f}" if v["ratio"] else "-",
            f"{v['psnr_y']:.2f} dB" if v["psnr_y"] is not None else ("exact" if v["ratio"] else "-"),
        )
    console = Console()
    console.print(table)
    fps = info["frames_per_second"]
    console.print(
        f"units {info['units_done']}/{info['units_total']}, frames {info['frames_done']}/{info['frames_total']}, "
        f"throughput {f'{fps:.1f} frames/s' if fps else '-'}"
    )
    tuner = info.get("tuner")
    if tuner:
        mean = f"{tuner['mean_reward']:.3f}" if tuner["mean_reward"] is not None else "-"
        console.print(f"tuner: {tuner['decisions']} batch decision(s), {tuner['rewarded']} rewarded, mean reward {mean}", markup=False)
        for arm, stats in tuner["by_arm"].items():
            arm_mean = f"{stats['mean_reward']:.3f}" if stats["mean_reward"] is not None else "-"
            console.print(f"  {arm}: {stats['decisions']} decision(s), mean reward {arm_mean}", markup=False)
    for v in info["videos"]:
        if v["error"]:
            console.print(f"damaged: {v['name']}: {v['error']}", markup=False)
    for q in info["quarantined"]:
        where = f" unit {q['unit']}" if q["unit"] is not None else ""
        console.print(f"quarantined: {q['input']}{where}: {q['reason']}", markup=False)
    raise typer.Exit(exit_code(info))


def resume(
    target: Annotated[str, typer.Argument(help="A job file or a job's output root.")],
    workers: WorkersOpt = None,
    cluster: ClusterOpt = None,
    threads_per_worker: ThreadsOpt = None,
    retries: RetriesOpt = None,
    max_in_flight: InFlightOpt = None,
    units_per_task: PerTaskOpt = None,
    storage_profile: ProfileOpt = None,
    endpoint_url: EndpointOpt = None,
    metrics_port: MetricsPortOpt = None,
    metrics_host: MetricsHostOpt = "127.0.0.1",
    worker_targets: TargetsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Finish a stopped job: run only the units without a commit marker, then finalize.

    The job's files are checked first (hashes, paths inside the output root). A job that ran on
    an existing scheduler resumes there only when --cluster names it again.
    """
    from palstream.batch.spec import CLUSTER_KINDS, JobSpec, StorageSpec

    over = _overrides(
        workers=workers,
        cluster=cluster,
        threads_per_worker=threads_per_worker,
        retries=retries,
        max_in_flight=max_in_flight,
        units_per_task=units_per_task,
        storage={"profile": storage_profile, "endpoint_url": endpoint_url},
    )
    output, settings, given = _output_of(target, over.get("storage", {}))
    # job.json sits in the output root, which others may write: never connect to a scheduler, nor
    # send signed storage requests to an endpoint, that the user did not name.
    stored = settings.get("cluster", "local")
    if cluster is None and stored not in CLUSTER_KINDS:
        raise PalstreamError(
            f"{output}/_palstream/job.json names the scheduler {stored!r}; confirm it with --cluster {stored}, "
            "or run here with --cluster local"
        )
    endpoint = settings.get("storage", {}).get("endpoint_url")
    if endpoint and StorageSpec.from_dict(given).endpoint_url is None:
        raise PalstreamError(
            f"{output}/_palstream/job.json names the storage endpoint {endpoint}; confirm it with --endpoint-url {endpoint} "
            "(or the --storage-profile that sets it)"
        )
    settings = _merge(settings, {**over, "storage": given} if given else over)
    settings["output"] = output
    spec = JobSpec.from_dict(settings, where=f"{output}/_palstream/job.json")
    _run(spec, resume=True, metrics_port=metrics_port, metrics_host=metrics_host, progress=progress, worker_targets=worker_targets)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
    app.command()(submit)
    app.command()(status)
    app.command()(resume)
