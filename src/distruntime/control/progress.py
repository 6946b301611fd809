"""What this rank is doing: torch's Flight Recorder counters and entries, group names, and
the main thread's stack -- read from the rank's own watchdog thread, cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distruntime.control.verdict import flight_progress, own_stack, parse_entries

__all__ = ["collective_in", "entries", "flight_recorder_available", "group_names", "progress"]

# torch's Flight Recorder dump (entries: bool) -> JSON; absent on older torch.
_flight_dump: Callable[[bool], bytes] | None = getattr(
    torch._C._distributed_c10d, "_dump_fr_trace_json", None)


def flight_recorder_available() -> bool:
    """Whether this torch records collectives in its Flight Recorder for every backend.

    With it the hang table numbers each group's collectives and names their op, shapes and
    dtypes (so a desync in shapes is seen); without it (older torch) the watchdog falls
    back to the main thread's Python frame: the op's name, no number, no shapes.

    Example:
        >>> isinstance(flight_recorder_available(), bool)
        True
    """
    return _flight_dump is not None


def progress() -> dict[str, dict[str, Any]]:
    """Per group: last enqueued and completed collective (a fraction of a millisecond)."""
    if _flight_dump is None:  # an older torch: no Flight Recorder for gloo
        return {}
    try:
        return flight_progress(_flight_dump(False))
    except (RuntimeError, ValueError):
        return {}


def entries() -> list[dict[str, Any]]:
    """The last collectives of every group, with op, shapes and dtypes (a full dump)."""
    if _flight_dump is None:
        return []
    try:
        return parse_entries(_flight_dump(True))[0]
    except (RuntimeError, ValueError):
        return []


def collective_in(stack: list[str]) -> str:
    """The c10d function the main thread is in (``"all_reduce"``), or ``""``.

    Example:
        >>> collective_in(["/w/t.py:3 in main", "/x/torch/distributed/distributed_c10d.py:9 in barrier"])
        'barrier'
    """
    for frame in reversed(stack):
        if "torch/distributed/distributed_c10d.py" in frame.replace(os.sep, "/"):
            return frame.rsplit(" in ", 1)[-1]
    return ""


def group_names() -> dict[str, str]:
    """torch's process-group names (``"0"``, ``"1"``...) -> a description for the report."""
    names: dict[str, str] = {}
    try:
        world = dist.distributed_c10d._world
        for pg, name in list(world.pg_names.items()):
            desc = getattr(pg, "group_desc", "") or ""
            if pg is world.default_pg or desc == "default_pg":
                names[str(name)] = "default"
            elif desc and desc != "undefined":
                names[str(name)] = desc.removeprefix("mesh_")
            else:
                ranks = sorted(world.pg_group_ranks.get(pg, {}))
                names[str(name)] = f"group {name} (ranks {', '.join(map(str, ranks))})"
    except (AttributeError, RuntimeError):
        pass
    return names


def main_stack() -> list[str]:
    """This process's main-thread stack, outermost first."""
    return own_stack()
