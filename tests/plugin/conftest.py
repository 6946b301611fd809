"""Fixtures of the plugin tests: bounded inner pytest sessions in a scratch project.

The inner sessions run as subprocesses (``python -m pytest``), so they load the plugin
through its entry point exactly as a user's session does. (pytest's ``pytester`` is not
used: enabling it with ``pytest_plugins`` here, below the rootdir conftest, makes pytest
refuse a whole-suite run.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inner_pytest import InnerRunner


@pytest.fixture
def inner(tmp_path: Path) -> Iterator[InnerRunner]:
    """Runs inner pytest sessions in a fresh directory; kills what they left running."""
    project = tmp_path / "project"
    project.mkdir()
    runner = InnerRunner(project)
    yield runner
    runner.cleanup()
