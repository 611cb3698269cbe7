"""Numbers for people: sizes, durations, times (the web pages and ``palstream ls``)."""

from __future__ import annotations

import datetime


def size(n) -> str:
    """Bytes in binary units (``12.3 MiB``); ``–`` for None."""
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def duration(seconds) -> str:
    """``m:ss.d`` (``h:mm:ss.d`` from an hour); ``–`` for None."""
    if seconds is None:
        return "–"
    whole, tenths = divmod(round(seconds * 10), 10)
    hours, rest = divmod(whole, 3600)
    text = f"{rest // 60:d}:{rest % 60:02d}.{tenths}"
    return f"{hours}:{text.zfill(7)}" if hours else text


def when(timestamp) -> str:
    """A Unix time as UTC; ``never`` for None."""
    if timestamp is None:
        return "never"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals; ``–`` for None."""
    return "–" if value is None else f"{value:.{digits}f}"
