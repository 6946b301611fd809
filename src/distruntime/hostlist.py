"""SLURM hostlist expansion without ``scontrol``.

SLURM compresses node lists (``node[001-004,007]``, ``rack[1-2]-node[1-4]``);
containers often lack ``scontrol show hostnames``, and the regexes other libraries use
cut ``rack[1-2]-node[1-4]`` to ``rack1``. This module parses the grammar properly:
top-level commas separate host patterns, each pattern is literal text and bracket
groups, and a host is one choice from every group (a cartesian product, in order).
"""

from __future__ import annotations

import itertools

from distruntime.errors import LaunchEnvError

__all__ = ["expand_hostlist", "expand_tasks_per_node", "first_host", "tasks_on_node"]


def expand_hostlist(nodelist: str, *, variable: str = "SLURM_NODELIST") -> list[str]:
    """Expand a SLURM hostlist expression into host names, in SLURM's order.

    Zero padding is kept (``n[08-10]`` gives ``n08 n09 n10``).

    Raises:
        LaunchEnvError: the expression is malformed (names ``variable``).

    Example:
        >>> expand_hostlist("rack[1-2]-node[1-2],gpu7")
        ['rack1-node1', 'rack1-node2', 'rack2-node1', 'rack2-node2', 'gpu7']
    """
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist, variable):
        hosts.extend(_expand_pattern(pattern, nodelist, variable))
    if not hosts:
        raise _malformed(nodelist, variable, "it names no host")
    return hosts


def first_host(nodelist: str, *, variable: str = "SLURM_NODELIST") -> str:
    """The first host of a hostlist, without expanding the rest.

    Discovery needs only this one (the rendezvous address); expanding a 12 500-node
    list on every rank would make start-up grow with the job.

    Example:
        >>> first_host("rack[2-9]-node[007-128],login1")
        'rack2-node007'
    """
    patterns = _split_top_level(nodelist, variable)
    if not patterns:
        raise _malformed(nodelist, variable, "it names no host")
    pieces = []
    rest = patterns[0]
    while rest:
        head, bracket, tail = rest.partition("[")
        pieces.append(head)
        if not bracket:
            break
        body, _, rest = tail.partition("]")
        # Only the first range matters: the first host takes its lower bound.
        low, dash, high = body.split(",", 1)[0].partition("-")
        if not low.isdigit() or (dash and (not high.isdigit() or int(high) < int(low))):
            raise _malformed(nodelist, variable, f"'[{body}]' does not start with N or N-M")
        pieces.append(low)
    return "".join(pieces)


def tasks_on_node(spec: str, node: int, *, variable: str = "SLURM_TASKS_PER_NODE") -> int | None:
    """How many tasks SLURM's tasks-per-node form puts on ``node`` (``None``: no such node).

    Example:
        >>> tasks_on_node("4(x3),2", 3)
        2
    """
    seen = 0
    for item in spec.split(","):
        count, repeat = _tasks_item(item, spec, variable)
        if node < seen + repeat:
            return count
        seen += repeat
    return None


def expand_tasks_per_node(spec: str, *, variable: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's tasks-per-node form (``"2(x3),1"``) into one count per node.

    Example:
        >>> expand_tasks_per_node("2(x2),1")
        [2, 2, 1]
    """
    counts: list[int] = []
    for item in spec.split(","):
        count, repeat = _tasks_item(item, spec, variable)
        counts.extend([count] * repeat)
    return counts


def _tasks_item(raw_item: str, spec: str, variable: str) -> tuple[int, int]:
    """``"2(x3)"`` -> (2, 3); ``"4"`` -> (4, 1)."""
    item = raw_item.strip()
    count, sep, rest = item.partition("(x")
    repeat = "1"
    if sep:
        if not rest.endswith(")"):
            raise _malformed(spec, variable, f"'{item}' lacks its closing ')'")
        repeat = rest[:-1]
    if not (count.isdigit() and repeat.isdigit()):
        raise _malformed(spec, variable, f"'{item}' is not N or N(xM)")
    return int(count), int(repeat)


def _split_top_level(nodelist: str, variable: str) -> list[str]:
    """Split at commas that are outside brackets; whitespace also separates."""
    patterns: list[str] = []
    depth = 0
    current: list[str] = []
    for char in nodelist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise _malformed(nodelist, variable, "brackets cannot nest")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise _malformed(nodelist, variable, "']' without '['")
        if depth == 0 and (char == "," or char.isspace()):
            patterns.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise _malformed(nodelist, variable, "'[' without ']'")
    patterns.append("".join(current))
    return [p for p in patterns if p]


def _expand_pattern(pattern: str, nodelist: str, variable: str) -> list[str]:
    """Expand one pattern such as ``rack[1-2]-node[01-04,07]``."""
    pieces: list[list[str]] = []
    rest = pattern
    while rest:
        head, bracket, tail = rest.partition("[")
        if head:
            pieces.append([head])
        if not bracket:
            break
        body, _, rest = tail.partition("]")
        pieces.append(_expand_ranges(body, nodelist, variable))
    return ["".join(choice) for choice in itertools.product(*pieces)]


def _expand_ranges(body: str, nodelist: str, variable: str) -> list[str]:
    """Expand the inside of one bracket: ``01-04,07`` -> 01 02 03 04 07."""
    values: list[str] = []
    for part in body.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise _malformed(nodelist, variable, f"'[{body}]' holds '{part}', not N or N-M")
        if not dash:
            values.append(low)
            continue
        start, stop = int(low), int(high)
        if stop < start:
            raise _malformed(nodelist, variable, f"range '{part}' runs backwards")
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(start, stop + 1))
    return values


def _malformed(value: str, variable: str, why: str) -> LaunchEnvError:
    return LaunchEnvError(
        f"{variable}={value!r} is not a valid SLURM hostlist: {why}. "
        "Expected forms like 'node[001-004,007]' or 'n1,n2'; set MASTER_ADDR to skip parsing.",
        variable=variable,
        value=value,
    )
