"""The job's manifests at the output root, for archivists: what came in, what went out, checksums.

``manifest.csv``
    One row per input of the plan (refused inputs included): source and archive paths relative
    to the input and output roots, state, frames, source size and SHA-256, archive size,
    payload size and SHA-256, lowest PSNR-Y of its chunks, and the reason of a failure.
``manifest-sha256.txt``
    BagIt-style payload manifest: ``<sha256>  <path>`` for every file of every complete archive,
    paths relative to the output root. It checks with ``sha256sum -c manifest-sha256.txt`` run in
    the output root. (The output root is not a BagIt bag: archives are not under ``data/``.)

Both are rewritten at the end of every run (``submit`` and ``resume``). The checksums of an
archive are computed once, on a worker, when it is finalized (``_palstream/fixity/<i>.json``).
"""

from __future__ import annotations

import csv
import io
import uuid
from typing import TYPE_CHECKING

from palstream.batch.store import JOB_DIR, read_json, write_bytes, write_json
from palstream.storage import Location

if TYPE_CHECKING:
    from palstream.io import SourceInfo

COLUMNS = (
    "source", "archive", "state", "frames", "source_bytes", "source_sha256",
    "archive_bytes", "payload_bytes", "payload_sha256", "min_psnr_y", "reason",
)


def write_manifests(client, output: Location, plan, report) -> None:
    """Write ``manifest.csv`` and ``manifest-sha256.txt`` under ``output`` for ``plan``.

    Parameters
    ----------
    client : distributed.Client
        Computes a missing fixity record on a worker (archives finalized by an older version).
    output : Location
        The output root.
    plan : palstream.batch.plan.Plan
        The job's plan.
    report : palstream.batch.runner.JobReport
        This run's report (states and failure reasons).
    """
    from palstream.batch.commits import iter_summaries
    from palstream.batch.worker import archive_fixity

    reasons: dict[str, str] = {}
    for q in report.quarantined:
        reasons.setdefault(q["input"], q["reason"])
    psnrs_by_source: dict[int, list[float]] = {}
    for summary in iter_summaries(output):  # streamed: 10^6 summaries are never held at once
        source = summary["source"]
        if summary.get("psnr_y") is not None:
            psnrs_by_source.setdefault(source, []).append(summary["psnr_y"])
    rows, checksums = [], []
    for i, src in enumerate(plan.sources):
        state = report.archives.get(src.archive, "incomplete")
        fixity = None
        if state == "complete":
            record = output.child(JOB_DIR, "fixity", f"{i}.json")
            fixity = read_json(record)
            if fixity is None:
                fixity = client.submit(archive_fixity, plan.archive_location(output, i), key=f"archive_fixity-{plan.hash[:12]}-{i}-{uuid.uuid4().hex[:8]}", pure=False).result()
                write_json(record, fixity)
            checksums += [f"{digest}  {src.archive}/{name}" for name, digest in sorted(fixity["files"].items())]
        psnrs = psnrs_by_source.get(i, [])
        rows.append(
            {
                "source": src.name,
                "archive": src.archive,
                "state": state,
                "frames": src.info.frame_count,
                "source_bytes": src.info.size_bytes,
                "source_sha256": src.info.sha256,
                "archive_bytes": fixity["bytes"] if fixity else "",
                "payload_bytes": fixity["payload_bytes"] if fixity else "",
                "payload_sha256": fixity["payload_sha256"] if fixity else "",
                "min_psnr_y": f"{min(psnrs):.2f}" if psnrs else ("exact" if fixity and plan.config.lossless else ""),
                "reason": reasons.get(src.url) or _kept_truncated(src.info),
            }
        )
    for rejected in plan.rejected:
        rows.append(
            {
                "source": rejected.name,
                "state": "quarantined",
                "reason": rejected.reason,
            }
        )
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(output.child("manifest.csv"), text.getvalue().encode())
    write_bytes(output.child("manifest-sha256.txt"), "".join(f"{line}\n" for line in checksums).encode())


def _kept_truncated(info: SourceInfo) -> str:
    return f"kept truncated (--allow-truncated): {info.truncated['reason']}" if info.truncated else ""
