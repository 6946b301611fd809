"""Plain-text tables and byte sizes for the CLI's reports."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_bytes", "parse_bytes", "render_table"]

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded.

    Example:
        >>> print(render_table(["check", "result"], [["ranks", "OK"], ["all_reduce", "FAIL"]]))
        check       result
        ----------  ------
        ranks       OK
        all_reduce  FAIL
    """
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
    rule = ["-" * w for w in widths]
    lines = []
    for row in [cells[0], rule, *cells[1:]]:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append((indent + "  ".join(padded)).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return " ".join(str(value).split("\n"))


def format_bytes(n: int) -> str:
    """A byte count the way nccl-tests-style tables show it.

    Example:
        >>> [format_bytes(n) for n in (4, 1024, 3 * 1024**2, 64 * 1024**2)]
        ['4 B', '1 KiB', '3 MiB', '64 MiB']
    """
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """Parse ``"64M"``, ``"64MiB"``, ``"1k"`` or ``"4"`` into bytes (binary units).

    Raises:
        ValueError: not a size, or not positive.

    Example:
        >>> parse_bytes("64M"), parse_bytes("4"), parse_bytes("1 KiB")
        (67108864, 4, 1024)
    """
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits):]
    if not digits.isdigit() or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 4, 64K, 64M or 1GiB")
    value = int(digits) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} must be at least 1 byte")
    return value
