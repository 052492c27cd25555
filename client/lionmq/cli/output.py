"""What the commands print: tables and key-value blocks for people, JSON for scripts, and
errors as one line on stderr. Times are shown in UTC with how long ago (or until)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

CELL_WIDTH = 60
"""Longest cell of a table (a message body is cut there, with an ellipsis)."""

_encode = msgspec.json.Encoder().encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def compact(value: Any) -> str:
    """One line of JSON (a body, headers)."""
    return _encode(value).decode()


def pretty(value: Any) -> str:
    """Indented JSON, for `--json` and for a body shown alone."""
    return msgspec.json.format(_encode(value), indent=2).decode()


def count(n: int, noun: str) -> str:
    """ "1 message", "3 messages"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shown(text: str) -> str:
    """`text` as is when every character prints, else as a JSON string (quoted, escaped).
    Headers, dedup ids and the like come from whoever published the message: written raw, an
    escape sequence would drive the operator's terminal (clear it, retitle it) and a newline
    forge a line of the output."""
    return text if text.isprintable() else compact(text)


def cut(text: str, width: int = CELL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def span(ms: int) -> str:
    """A duration as people read it: 850ms, 4.2s, 30s, 3m 5s, 1m, 2h 10m, 3d 4h."""
    ms = abs(ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.1f}s"
    s = ms // 1000
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = s % size // subsize
            return f"{s // size}{unit} {rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"


def relative(at: int | None, now: int) -> str:
    """ "in 4.2s" or "3m 5s ago"; "-" for no time."""
    if at is None:
        return "-"
    return f"in {span(at - now)}" if at > now else f"{span(now - at)} ago"


def clock_time(at: int) -> str:
    """An epoch-ms time as its UTC time of day, to the millisecond: 18:16:07.514Z."""
    return datetime.fromtimestamp(at / 1000, UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def timestamp(at: int | None, now: int) -> str:
    """An epoch-ms time in UTC with its distance from now."""
    if at is None:
        return "-"
    iso = datetime.fromtimestamp(at / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{iso}Z ({relative(at, now)})"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    out: TextIO,
    width: int | None = CELL_WIDTH,
) -> None:
    """Aligned columns (numbers to the right), cells cut at `width` (None: never); "-" for
    None."""
    raw = [list(row) for row in rows]
    numeric = [bool(raw) and all(_is_count(row[i]) for row in raw) for i in range(len(headers))]
    cells = [["-" if v is None else shown(str(v)) for v in row] for row in raw]
    if width is not None:
        cells = [[cut(v, width) for v in row] for row in cells]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    for row in cells:
        out.write(line(row) + "\n")


def _is_count(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def pairs(items: Iterable[tuple[str, object]], out: TextIO) -> None:
    """A key-value block: keys padded to one width."""
    items = [(shown(k), "-" if v is None else shown(str(v))) for k, v in items]
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        out.write(f"{key.ljust(width)}  {value}\n")


def error(message: str, err: TextIO | None = None) -> None:
    (err or sys.stderr).write(f"lionmq: error: {message}\n")
