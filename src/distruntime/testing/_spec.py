"""The ``distributed`` marker: parsing, validation and world-size expansion.

Pure Python and pytest only (no torch): it runs at collection time in every session
that has the plugin installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from distruntime.testing._pytest_compat import add_pseudo_argument, callspec_params

__all__ = [
    "MARKER", "MARKER_HELP", "OUTER_TIMEOUT_KEY", "SPEC_KEY", "WS_PARAM", "DistSpec", "expand_world_sizes",
    "take_over_pytest_timeout", "spec_for_item",
]

MARKER = "distributed"
MARKER_HELP = (
    "distributed(world_size=2, *, backend='auto', timeout=None, init=True, isolation='pooled'): "
    "run the test body on world_size ranks (a list such as [2, 4] makes one test per size, "
    "ids [ws2], [ws4]). backend 'auto' is nccl when enough CUDA devices are visible, else gloo "
    "on CPU. timeout (seconds) overrides --drt-timeout. init=False: the body builds "
    "DistributedRuntime itself. isolation='fresh': new rank processes for this test."
)
# The pseudo-argument that carries the world size of an expanded item.
WS_PARAM = "_drt_world_size"

_KNOWN = frozenset({"world_size", "backend", "timeout", "init", "isolation"})
_ISOLATIONS = ("pooled", "fresh")


@dataclass(frozen=True)
class DistSpec:
    """What one collected item asks of the plugin.

    Attributes:
        world_size: number of ranks.
        backend: ``"auto"``, ``"gloo"``, ``"nccl"`` or a torch backend string.
        timeout: the marker's deadline in seconds (``None``: the option's).
        init: whether each rank enters ``DistributedRuntime`` before the body.
        isolation: ``"pooled"`` (reuse rank processes) or ``"fresh"``.

    Example:
        >>> DistSpec(world_size=2).pool_key
        2
    """

    world_size: int
    backend: str = "auto"
    timeout: float | None = None
    init: bool = True
    isolation: str = "pooled"

    @property
    def pool_key(self) -> int:
        """Rank processes are interchangeable between backends: pools are keyed by size."""
        return self.world_size


# Set on every distributed item at collection time.
SPEC_KEY = pytest.StashKey[DistSpec]()


# pytest-timeout's deadline of a distributed item, (seconds, origin), when it has one.
OUTER_TIMEOUT_KEY = pytest.StashKey[tuple[float, str]]()


def _pytest_timeout(item: pytest.Item) -> tuple[float, str] | None:
    """pytest-timeout's effective timeout of ``item`` (marker > --timeout > $PYTEST_TIMEOUT > ini)."""
    import os

    mark = item.get_closest_marker("timeout")
    config = item.config
    if mark is not None:
        raw: object = mark.args[0] if mark.args else mark.kwargs.get("timeout")
        origin = "@pytest.mark.timeout({})"
    elif config.getoption("timeout", None) is not None:
        raw, origin = config.getoption("timeout"), "--timeout={}"
    elif os.environ.get("PYTEST_TIMEOUT"):
        raw, origin = os.environ["PYTEST_TIMEOUT"], "PYTEST_TIMEOUT={}"
    else:
        raw, origin = config.getini("timeout"), "ini timeout={}"
    try:
        seconds = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    origin = origin.format(f"{seconds:g}")
    return (seconds, f"{origin} (pytest-timeout)") if seconds > 0 else None


def take_over_pytest_timeout(item: pytest.Item) -> None:
    """Enforce pytest-timeout's deadline on a distributed item with the plugin's own.

    pytest-timeout would interrupt the controller (or, in a rank, the test) without the
    other ranks' stacks and without stopping them cleanly. So its timeout is recorded
    for the controller, which applies the smaller of the two deadlines, and switched
    off for the item with a ``timeout(0)`` marker placed first.
    """
    if not item.config.pluginmanager.hasplugin("timeout"):
        return
    outer = _pytest_timeout(item)
    if outer is not None:
        item.stash[OUTER_TIMEOUT_KEY] = outer
    item.add_marker(pytest.mark.timeout(0), append=False)


def _bad(where: str, message: str) -> BaseException:
    return pytest.fail.Exception(f"@pytest.mark.{MARKER} on {where}: {message}", pytrace=False)


def _world_sizes(value: object, where: str) -> tuple[list[int], bool]:
    """The sizes a marker asks for, and whether they came as a list (-> ids)."""
    is_list = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    sizes = list(value) if isinstance(value, Sequence) and is_list else [value]
    if not sizes:
        raise _bad(where, "world_size=[] names no size. Fix: give an int or a non-empty list.")
    checked: list[int] = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise _bad(where, f"world_size must be a positive int or a list of them, got {value!r}.")
        checked.append(size)
    if len(set(checked)) != len(checked):
        raise _bad(where, f"world_size={value!r} repeats a size.")
    return checked, is_list


def parse_marker(mark: pytest.Mark, where: str) -> tuple[list[int], bool, DistSpec]:
    """Validate a marker; returns (sizes, is_list, spec with the first size).

    Example:
        >>> sizes, is_list, spec = parse_marker(pytest.mark.distributed(world_size=[2, 4]).mark, "t")
        >>> sizes, is_list, spec.backend
        ([2, 4], True, 'auto')
    """
    if len(mark.args) > 1:
        raise _bad(where, "takes at most one positional argument (world_size).")
    unknown = set(mark.kwargs) - _KNOWN
    if unknown:
        raise _bad(where, f"unknown argument(s) {sorted(unknown)}; known: {sorted(_KNOWN)}.")
    if mark.args and "world_size" in mark.kwargs:
        raise _bad(where, "world_size given twice (positionally and by name).")
    raw = mark.args[0] if mark.args else mark.kwargs.get("world_size", 2)
    sizes, is_list = _world_sizes(raw, where)
    backend = mark.kwargs.get("backend", "auto")
    if not isinstance(backend, str) or not backend:
        raise _bad(where, f"backend must be a string such as 'auto', 'gloo' or 'nccl', got {backend!r}.")
    timeout = mark.kwargs.get("timeout")
    bad_number = isinstance(timeout, bool) or not isinstance(timeout, (int, float))
    if timeout is not None and (bad_number or timeout <= 0):
        raise _bad(where, f"timeout must be a positive number of seconds, got {timeout!r}.")
    init = mark.kwargs.get("init", True)
    if not isinstance(init, bool):
        raise _bad(where, f"init must be True or False, got {init!r}.")
    isolation = mark.kwargs.get("isolation", "pooled")
    if isolation not in _ISOLATIONS:
        raise _bad(where, f"isolation must be one of {_ISOLATIONS}, got {isolation!r}.")
    spec = DistSpec(
        world_size=sizes[0],
        backend=backend,
        timeout=None if timeout is None else float(timeout),
        init=init,
        isolation=isolation,
    )
    return sizes, is_list, spec


def expand_world_sizes(metafunc: pytest.Metafunc) -> None:
    """``world_size=[2, 4]``: one item per size, ids ``[ws2]`` and ``[ws4]``."""
    mark = metafunc.definition.get_closest_marker(MARKER)
    if mark is None:
        return
    sizes, is_list, _ = parse_marker(mark, metafunc.definition.nodeid)
    if not is_list:
        return
    # A pseudo-argument: the value lives in callspec.params; the test never receives it.
    add_pseudo_argument(metafunc, WS_PARAM)
    metafunc.parametrize(WS_PARAM, sizes, ids=[f"ws{n}" for n in sizes])


def spec_for_item(item: pytest.Item) -> DistSpec | None:
    """The item's spec (world size resolved for expanded items), or ``None``."""
    if not isinstance(item, pytest.Function):
        return None
    mark = item.get_closest_marker(MARKER)
    if mark is None:
        return None
    _, _, spec = parse_marker(mark, item.nodeid)
    params = callspec_params(item)
    if WS_PARAM in params:
        size = params[WS_PARAM]
        return DistSpec(size, spec.backend, spec.timeout, spec.init, spec.isolation)
    return spec
