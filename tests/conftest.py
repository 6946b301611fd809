"""Shared guards: every test must leave no process group, runtime or env var behind."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import torch.distributed as dist

import distruntime

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("distributed") is not None:
        yield  # the plugin owns the rank's runtime and checks its own teardown
        return
    before_env = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    yield
    leaks = []
    if distruntime.is_active():
        leaks.append("a runtime is still active")
    if dist.is_initialized():
        leaks.append("a process group is still initialised")
        dist.destroy_process_group()
    after_env = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    if after_env != before_env:
        leaks.append(f"environment changed: {before_env} -> {after_env}")
    if signal.getsignal(signal.SIGTERM) != before_term or signal.getsignal(signal.SIGINT) != before_int:
        leaks.append("signal handlers changed")
    assert not leaks, "; ".join(leaks)
