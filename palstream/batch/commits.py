"""The job's commit index: one small record per finished task, so a resume reads O(tasks), not O(chunks).

Each unit task (a run of consecutive units of one input) writes, after every one of its chunks
is committed in the archive, one object ``_palstream/commits/<source>-<first unit>.jsonl``: a first
line naming its units (all a resume parses), then a line per unit with the unit's summary
(frames, bytes, PSNR-Y, timings). It replaces a JSON object per
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
from collections.abc import Iterator, Set

from palstream.batch.store import JOB_DIR, storage_error, write_bytes
from palstream.storage import Location

FOLDER = "commits"


def record_location(output: Location, source: int, first: int) -> Location:
    """Where the task that starts at unit ``first`` of input ``source`` records its commits."""
    return output.child(JOB_DIR, FOLDER, f"{source}-{first}.jsonl")


def write_record(location: Location, summaries: list[dict]) -> None:
    """One object for the units of one task: a first line naming them, then one JSON line per unit.

    The first line (``{"source": s, "units": [...]}``) is all a resume parses: at 10^6 units,
    parsing every summary took most of its time.
    """
    head = {"source": summaries[0]["source"], "units": [s["index"] for s in summaries]}
    lines = [json.dumps(head)] + [json.dumps(s, sort_keys=True) for s in summaries]
    write_bytes(location, ("\n".join(lines) + "\n").encode())


READ_BATCH = 256  # records fetched together (concurrently on object stores), so memory stays bounded


def _records(output: Location, skip: Set[int]) -> Iterator[bytes]:
    """The bytes of every task record, but those of the inputs in ``skip``, a batch at a time."""
    folder = output.child(JOB_DIR, FOLDER)
    url = folder.url
    try:
        fs, path = folder.filesystem()
        names = [n for n in fs.ls(path, detail=False) if n.endswith(".jsonl") and _source_of(n) not in skip]
    except FileNotFoundError:
        return
    except Exception as exc:  # every backend raises its own family
        raise storage_error(url, exc, "read") from None
    for begin in range(0, len(names), READ_BATCH):
        try:
            yield from fs.cat(names[begin : begin + READ_BATCH], on_error="omit").values()
        except Exception as exc:
            raise storage_error(url, exc, "read") from None


def iter_summaries(output: Location, skip: Set[int] = frozenset()) -> Iterator[dict]:
    """The unit summaries of the index, record by record: one LIST and one GET per task record.

    Records of the inputs in ``skip`` (archives known to be finalized) are not read. Torn or
    foreign lines are skipped (the index is advisory; the archives' markers decide).
    """
    for blob in _records(output, skip):
        for line in blob.splitlines()[1:]:
            try:
                summary = json.loads(line)
                key = (summary["source"], summary["index"])
            except (ValueError, KeyError, TypeError):
                continue
            if all(_is_index(k) for k in key):
                yield summary


def committed_units(output: Location, skip: Set[int] = frozenset()) -> set[tuple[int, int]]:
    """``(source, unit)`` of every unit the index names, from each record's first line only."""
    found: set[tuple[int, int]] = set()
    for blob in _records(output, skip):
        try:
            head = json.loads(blob.split(b"\n", 1)[0])
            source, units = head["source"], head["units"]
        except (ValueError, KeyError, TypeError):
            continue
        if _is_index(source) and isinstance(units, list):
            found.update((source, u) for u in units if _is_index(u))
    return found


def read_index(output: Location) -> dict[tuple[int, int], dict]:
    """Every unit summary of the index, by ``(source, unit)``."""
    return {(s["source"], s["index"]): s for s in iter_summaries(output)}


def _source_of(name: str) -> int | None:
    """The input a record belongs to, from its name ``<source>-<first>.jsonl``."""
    head = name.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
