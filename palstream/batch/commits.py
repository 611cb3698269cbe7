"""The job's commit index: one small record per finished task, so a resume reads O(tasks), not O(chunks).

Each unit task (a run of consecutive units of one input) writes, after every one of its chunks
is committed in the archive, one object ``_palstream/commits/<source>-<first unit>.jsonl`` with a
line per unit: the unit's summary (frames, bytes, PSNR-Y, timings). It replaces a JSON object per
unit (one write per task instead of one per unit) and is what ``status`` and the manifests read
for ratio and quality.

The index is a cache of the archives' commit markers, never the truth: a unit is done when its
marker exists and matches its chunk. A resume runs the units the index does not name; an
archive's finalize reads its markers and names the chunks the index claimed but the archive
lacks, and those units run again (``palstream.batch.runner``). A retried task rewrites its own
record with the same name, so a unit appears in at most one record of a given batching.
"""

from __future__ import annotations

import json

from palstream.batch.store import JOB_DIR, filesystem, join, storage_error, write_bytes

FOLDER = "commits"


def record_url(output: str, source: int, first: int) -> str:
    """Where the task that starts at unit ``first`` of input ``source`` records its commits."""
    return join(output, JOB_DIR, FOLDER, f"{source}-{first}.jsonl")


def write_record(url: str, summaries: list[dict], options: dict | None = None) -> None:
    """One object for the units of one task, one JSON line per unit."""
    write_bytes(url, "".join(json.dumps(s, sort_keys=True) + "\n" for s in summaries).encode(), options)


def read_index(output: str, options: dict | None = None) -> dict[tuple[int, int], dict]:
    """Every unit the index names, by ``(source, unit)``: one LIST and one GET per task record.

    Torn or foreign lines are skipped (the index is advisory; the archives' markers decide).
    """
    url = join(output, JOB_DIR, FOLDER)
    try:
        fs, path = filesystem(url, options)
        names = [n for n in fs.ls(path, detail=False) if n.endswith(".jsonl")]
        blobs = fs.cat(names) if names else {}
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001  every backend raises its own family
        raise storage_error(url, exc, "read") from None
    found: dict[tuple[int, int], dict] = {}
    for blob in blobs.values():
        for line in blob.splitlines():
            try:
                summary = json.loads(line)
                key = (summary["source"], summary["index"])
            except (ValueError, KeyError, TypeError):
                continue
            if all(isinstance(k, int) and not isinstance(k, bool) for k in key):
                found[key] = summary
    return found
