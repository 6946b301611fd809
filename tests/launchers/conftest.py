"""Fixtures shared by the real-launcher modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import NetnsPair, netns_pair_cm


@pytest.fixture(scope="session")
def netns_pair() -> Iterator[NetnsPair]:
    """Namespaces drtn1/drtn2 = hosts node1/node2; fails, never skips."""
    with netns_pair_cm() as pair:
        yield pair
