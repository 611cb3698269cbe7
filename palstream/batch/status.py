"""What ``palstream status`` reports: per-video progress, throughput, ratio, quality, failures.

Progress comes from the archives' commit markers (the truth); ratio, quality and timing come
from the per-unit summaries in the job's commit index (``palstream.batch.commits``).
"""

from __future__ import annotations

from palstream.batch.plan import fs_exists, load_plan
from palstream.batch.store import JOB_DIR, JobLock, read_json
from palstream.batch.tuned import ledger_summary
from palstream.errors import ArchiveError, PalstreamError
from palstream.storage import Location

# `palstream status` exit codes (documented in its --help and docs/batch.md). 1 stays the
# CLI's "could not do it" (no job, unreadable or tampered job files, bad options).
EXIT_COMPLETE = 0
EXIT_INCOMPLETE = 3  # running, stopped or not started; nothing has failed
EXIT_FAILED = 4  # not running, and at least one input or unit was refused or quarantined


def exit_code(info: dict) -> int:
    """The exit code of ``palstream status`` for a :func:`job_status` result."""
    if info["state"] == "complete":
        return EXIT_COMPLETE
    if info["state"] != "running" and (info["quarantined"] or any(v["state"] == "damaged" for v in info["videos"])):
        return EXIT_FAILED
    return EXIT_INCOMPLETE


def job_status(output: str | Location) -> dict:
    """The state of the job stored under ``output`` (a path, URL, or location with its storage options).

    Returns
    -------
    dict
        ``output``, ``plan``, ``state`` (``running``, ``complete``, ``incomplete``), ``running_by``
        (lock holder or None), ``units_done``/``units_total``, ``frames_done``/``frames_total``,
        ``frames_per_second`` (last run, or so far while running), ``videos`` (one dict per
        input: ``name`` (path under the input root), ``archive``, ``state`` (``complete``,
        ``partial``, ``pending``, ``quarantined``, ``damaged``: there and unreadable), ``units_done``,
        ``units_total``, ``frames_done``, ``ratio``, ``psnr_y``, ``error`` (why a damaged archive does
        not open, else None)), ``quarantined`` (from the last run's report), ``tuner`` (tuned
        jobs: decisions and mean reward by arm, see ``palstream.batch.tuned.ledger_summary``;
        None otherwise).
    """
    from palstream import archive

    location = Location.of(output)
    plan = load_plan(location)
    if plan is None:
        raise PalstreamError(f"{location.url} holds no palstream job (no {JOB_DIR}/plan.json); give a job's output root")
    summaries = unit_summaries(location)
    report = read_json(location.child(JOB_DIR, "report.json")) or {}
    lock = JobLock(location)
    holder = lock.holder()
    running = holder is not None and not lock.is_stale(holder)
    quarantined = report.get("quarantined", []) if report.get("plan") == plan.hash else [
        {"input": r.url, "unit": None, "reason": r.reason} for r in plan.rejected
    ]
    failed_inputs = {q["input"] for q in quarantined}
    videos = []
    for i, src in enumerate(plan.sources):
        archive_location = plan.archive_location(location, i)
        damage = None
        try:
            arc = archive.open_archive(archive_location)
            committed, complete = arc.committed(), arc.complete
        except ArchiveError as exc:
            committed, complete = set(), False
            if fs_exists(archive_location):  # an archive is there and does not open: say why, never "pending"
                damage = str(exc)
        units = src.units
        mine = [summaries[(i, j)] for j in committed if (i, j) in summaries]
        raw = sum(s["raw_bytes"] for s in mine)
        coded = sum(s["bytes"] for s in mine)
        psnrs = [s["psnr_y"] for s in mine if s.get("psnr_y") is not None]
        if complete:
            state = "complete"
        elif damage is not None:
            state = "damaged"
        elif src.url in failed_inputs and not running:
            state = "quarantined"
        elif committed:
            state = "partial"
        else:
            state = "pending"
        videos.append(
            {
                "name": src.name,
                "archive": src.archive,
                "state": state,
                "units_done": len(committed),
                "units_total": len(units),
                "frames_done": sum(units[j][1] for j in committed),
                "frames_total": src.info.frame_count,
                "ratio": raw / coded if coded else None,
                "psnr_y": min(psnrs) if psnrs else None,
                "error": damage,
            }
        )
    for rejected in plan.rejected:
        videos.append(
            {"name": rejected.name, "archive": None, "state": "quarantined", "units_done": 0,
             "units_total": 0, "frames_done": 0, "frames_total": 0, "ratio": None, "psnr_y": None, "error": None}
        )
    if running and holder is not None:
        state = "running"
        recent = [s for s in summaries.values() if s.get("finished", 0) >= holder.get("started", 0)]
        fps = _span_rate(recent)
    else:
        state = "complete" if all(v["state"] == "complete" for v in videos) else "incomplete"
        fps = report.get("frames_per_second") if report.get("plan") == plan.hash else None
    return {
        "output": location.url,
        "plan": plan.hash,
        "state": state,
        "running_by": f"pid {holder.get('pid')} on {holder.get('host')}" if running and holder is not None else None,
        "units_done": sum(v["units_done"] for v in videos),
        "units_total": sum(v["units_total"] for v in videos),
        "frames_done": sum(v["frames_done"] for v in videos),
        "frames_total": plan.total_frames(),
        "frames_per_second": fps,
        "videos": videos,
        "quarantined": quarantined,
        "tuner": ledger_summary(location) if plan.tuner is not None else None,
    }


def unit_summaries(output: Location) -> dict[tuple[int, int], dict]:
    """The per-unit summaries the workers recorded in the job's commit index, by ``(source, unit)``."""
    from palstream.batch.commits import read_index

    return read_index(output)


def _span_rate(summaries: list[dict]) -> float | None:
    """Frames per second over the wall-time span the given units were encoded in."""
    if not summaries:
        return None
    begin = min(s["finished"] - s["seconds"] for s in summaries)
    end = max(s["finished"] for s in summaries)
    return sum(s["frames"] for s in summaries) / max(end - begin, 1e-6)

