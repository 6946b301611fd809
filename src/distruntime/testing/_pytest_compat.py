"""The only place the plugin touches pytest beyond its public API.

Supported pytest: ``SUPPORTED_PYTEST`` (8.0 to 9.x; CI tests the oldest, 8.0.0, and the
newest release). Everything else the plugin uses is a public hook, a public class
(``pytest.TestReport``, ``pytest.StashKey``...) or ``config.getoption``. What is left,
each with why no public API does it:

==========================================  ================================================
pytest name                                 used for
==========================================  ================================================
``Session._setupstate.teardown_exact``      a rank tears down the fixtures the next test
                                            does not share when the controller's "next
                                            item" guess was wrong, and everything at the
                                            end (no hook tears down without re-running
                                            other plugins' teardown hooks on a past item)
``Function.callspec.params``                the world size of a ``world_size=[2, 4]`` item
``Metafunc.fixturenames`` (appended to)     the world size as a pseudo-argument, so
                                            ``parametrize`` makes ``[ws2]``/``[ws4]`` items
``Function.fixturenames`` (reordered)       ``dist_info`` set up before the test's other
                                            function-scoped fixtures
==========================================  ================================================

Each function checks what it relies on and raises :class:`PytestCompatError`, naming
the pytest version, the internal and the supported range, instead of misbehaving;
``tests/plugin/test_pytest_compat.py`` runs them against the installed pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from distruntime.errors import DistRuntimeError

__all__ = [
    "SUPPORTED_PYTEST", "PytestCompatError", "add_pseudo_argument", "callspec_params",
    "move_fixture_first", "teardown_exact",
]

# The pytest releases this plugin is tested with: the oldest and the newest supported.
SUPPORTED_PYTEST = (">=8.0,<10", ("8.0.0", "9.2.0"))


class PytestCompatError(DistRuntimeError):
    """The installed pytest lacks an internal the distruntime plugin relies on.

    Example:
        >>> err = PytestCompatError("Session._setupstate", "tearing fixtures down")
        >>> err.what, "Supported pytest: >=8.0,<10" in str(err)
        ('Session._setupstate', True)
    """

    def __init__(self, what: str, purpose: str) -> None:
        super().__init__(
            f"pytest {pytest.__version__} has no {what}, which the distruntime plugin uses for "
            f"{purpose}. Supported pytest: {SUPPORTED_PYTEST[0]} (tested: "
            f"{', '.join(SUPPORTED_PYTEST[1])}). Fix: install a supported pytest "
            f"(pip install 'pytest{SUPPORTED_PYTEST[0]}'), or report it to distruntime."
        )
        self.what = what


def teardown_exact(session: pytest.Session, nextitem: pytest.Item | None) -> None:
    """Tear down every fixture/node ``nextitem`` does not share (``None``: everything).

    Example::

        teardown_exact(session, None)   # a rank's session fixtures, at its end
    """
    setupstate = getattr(session, "_setupstate", None)
    if not callable(getattr(setupstate, "teardown_exact", None)):
        raise PytestCompatError("Session._setupstate.teardown_exact", "tearing fixtures down in a rank")
    setupstate.teardown_exact(nextitem)  # type: ignore[union-attr]


def callspec_params(item: pytest.Item) -> Mapping[str, Any]:
    """The parameters of a parametrized item (``{}`` when it is not parametrized).

    Example::

        callspec_params(item)["_drt_world_size"]   # 4 for test_x[ws4]
    """
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return {}
    params = getattr(callspec, "params", None)
    if not isinstance(params, Mapping):
        raise PytestCompatError("Function.callspec.params", "the world size of world_size=[...] items")
    return params


def add_pseudo_argument(metafunc: pytest.Metafunc, name: str) -> None:
    """Let ``metafunc.parametrize(name, ...)`` work for an argument the test does not take."""
    names = metafunc.fixturenames
    if not isinstance(names, list):
        raise PytestCompatError("a list Metafunc.fixturenames", "making one item per world size")
    if name not in names:
        names.append(name)


def move_fixture_first(item: pytest.Item, name: str) -> None:
    """Set ``name`` up before the item's other fixtures of the same scope."""
    names = getattr(item, "fixturenames", None)
    if not isinstance(names, list):
        raise PytestCompatError("a list Function.fixturenames", "setting dist_info up first")
    if name in names:
        names.remove(name)
    names.insert(0, name)
