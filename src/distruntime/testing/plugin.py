"""pytest plugin: a single-rank ``dist_info`` fixture.

Registered through the ``pytest11`` entry point. torch is imported only when a test
asks for a fixture, so installing distruntime costs a pytest session nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distruntime.info import DistInfo


@pytest.fixture
def dist_info() -> Iterator[DistInfo]:
    """A real single-rank ``DistInfo`` (gloo, world size 1, no port), torn down after.

    Example::

        def test_all_reduce(dist_info):
            t = torch.ones(1)
            torch.distributed.all_reduce(t)
            assert t.item() == dist_info.world_size
    """
    from distruntime.runtime import DistributedRuntime

    # An explicit empty environment: a single rank whatever the shell exported.
    with DistributedRuntime("gloo", env={}) as info:
        yield info
