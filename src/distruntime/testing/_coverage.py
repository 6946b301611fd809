"""Coverage of the lines that run inside rank processes.

pytest-cov 7 no longer measures subprocesses, and rank processes are forked from the
zygote (``_zygote.py``), which is a fresh interpreter that never measured anything. So
the plugin does it itself, with coverage.py's public API only:

* the controller (the pytest process, or each pytest-xdist worker) looks for the
  running measurement (``coverage.Coverage.current()``: pytest-cov's, or
  ``coverage run``'s) and copies its ``[run]`` options for the ranks
  (:func:`rank_settings`);
* each rank process starts a ``Coverage`` of its own with those options before its
  pytest session collects, records under the static context ``rank<k>`` (and, with
  ``--cov-context=test``, ``rank<k>|<nodeid>|<phase>`` as pytest-cov labels its own
  contexts), and saves after every test into the controller's private directory
  (:func:`start_in_rank`, :func:`save_in_rank`), so a rank that is later killed keeps
  what it measured;
* when the test loop ends, after the pools have stopped and before pytest-cov combines,
  the controller merges every rank's data into the running measurement and deletes the
  files (:func:`merge_into_current`): nothing is left next to ``.coverage``.

Nothing here imports coverage unless the session already did.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

__all__ = ["CoverageSettings", "merge_into_current", "rank_settings", "save_in_rank", "start_in_rank"]

logger = logging.getLogger("distruntime.testing")

# The [run] options a rank copies from the measurement of its controller. data_file and
# parallel are the plugin's own (one private file per rank process); patch is left out
# (the ranks are forked, not exec'd, and their measurement is started here).
_COPIED = (
    "run:branch", "run:concurrency", "run:context", "run:core", "run:cover_pylib",
    "run:disable_warnings", "run:dynamic_context", "run:plugins", "run:relative_files",
    "run:include", "run:omit", "run:source", "run:source_pkgs", "run:source_dirs", "run:timid",
)
# A rank that runs none of the measured code is normal; its warnings would only fill its log.
_QUIET = ("no-data-collected", "module-not-measured", "module-not-imported", "module-not-python")
# Environment variables that make coverage start by itself at interpreter start-up
# (its .pth file): the zygote must not measure itself, the ranks start their own.
AUTOSTART_VARS = ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")

CoverageSettings = dict[str, Any]


def rank_settings(config: pytest.Config, directory: Path) -> CoverageSettings | None:
    """What the ranks need to measure like this process does; ``None`` when nothing measures.

    Example::

        settings = rank_settings(config, basedir / "coverage")   # in the controller
        # ... sent to each rank in its "init" message ...
    """
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is None:
        return None
    options: dict[str, Any] = {}
    for name in _COPIED:
        with contextlib.suppress(Exception):  # an option this coverage.py does not know
            options[name] = current.get_option(name)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "options": options,
        "directory": str(directory),
        # pytest-cov's --cov-context=test: label lines with the test and phase, in ranks too.
        "test_contexts": config.getoption("cov_context", None) == "test",
    }


class _RankContexts:
    """pytest-cov's ``--cov-context=test`` labels (``<nodeid>|setup|run|teardown``) in a rank."""

    def __init__(self, cov: Any) -> None:
        self.cov = cov

    def __repr__(self) -> str:
        return f"_RankContexts({self.cov!r})"

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.cov.switch_context(f"{item.nodeid}|setup")

    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self.cov.switch_context(f"{item.nodeid}|run")

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self.cov.switch_context(f"{item.nodeid}|teardown")


def start_in_rank(settings: CoverageSettings, rank: int, pid: int) -> tuple[Any, list[object]]:
    """Start this rank process's measurement; returns it and the pytest plugins it needs.

    Example::

        cov, plugins = start_in_rank(init["coverage"], rank=1, pid=os.getpid())
        pytest.main(args, plugins=[server, *plugins])
    """
    import coverage

    inherited = coverage.Coverage.current()
    if inherited is not None:  # started by something else before the fork: not ours to save
        inherited.stop()
    data_file = Path(settings["directory"]) / f"rank{rank}.pid{pid}"
    cov = coverage.Coverage(data_file=str(data_file), config_file=False)
    options = dict(settings["options"])
    parent_context = options.pop("run:context", None)
    for name, value in options.items():
        if value is not None:
            cov.set_option(name, value)
    cov.set_option("run:disable_warnings", [*(options.get("run:disable_warnings") or []), *_QUIET])
    cov.set_option("run:context", f"{parent_context}|rank{rank}" if parent_context else f"rank{rank}")
    cov.start()
    plugins: list[object] = [_RankContexts(cov)] if settings.get("test_contexts") else []
    return cov, plugins


def save_in_rank(cov: Any) -> None:
    """Write what this rank measured so far (after every test: a killed rank keeps it)."""
    try:
        cov.save()
    except Exception:  # coverage must never fail a test run
        logger.warning("saving this rank's coverage data failed", exc_info=True)


def merge_into_current(directory: Path) -> int:
    """Merge every rank's data file into the running measurement; delete the files.

    Called once the rank processes have stopped, before pytest-cov (or ``coverage run``
    at exit) saves and combines. Returns how many files were merged.
    """
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    files = sorted(p for p in directory.glob("rank*") if p.is_file()) if directory.is_dir() else []
    if current is None or not files:
        return 0
    from coverage import CoverageData

    live = current.get_data()
    merged = 0
    for path in files:
        try:
            data = CoverageData(basename=str(path))
            data.read()
            live.update(data)
            merged += 1
        except Exception:
            logger.warning("could not merge the rank coverage data in %s", path, exc_info=True)
        path.unlink(missing_ok=True)
    return merged
