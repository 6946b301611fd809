"""Fixtures shared by the real-launcher test modules (one SLURM cluster, one namespace pair)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import NetnsPair, SlurmCluster, netns_pair_cm, slurm_cluster_cm


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Two-node SLURM cluster (n1, n2); fails, never skips, if it cannot start."""
    with slurm_cluster_cm() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def netns_pair() -> Iterator[NetnsPair]:
    """Namespaces drtn1/drtn2 = hosts node1/node2; fails, never skips."""
    with netns_pair_cm() as pair:
        yield pair
