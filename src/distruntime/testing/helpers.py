"""Helpers for test bodies that run on several ranks.

torch is imported inside the functions, so importing this module is free.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

from distruntime.testing import _context

__all__ = ["assert_all_ranks"]

# Bound on waiting for peers outside a plugin test (inside one, the test's deadline).
_DEFAULT_TIMEOUT_S = 60.0


def assert_all_ranks(condition: object, message: str = "", *, timeout_s: float | None = None) -> None:
    """Assert ``condition`` on every rank at once; the failure names the ranks where it was false.

    A plain ``assert`` that fails on one rank leaves its peers waiting in the next
    collective; this one is itself a collective, so all ranks pass it or all fail it,
    each with the same message. Every rank must call it, in the same order.

    Inside an N-rank test of the pytest plugin the verdicts travel through the test's
    store (no process group needed, so it also works with ``init=False``); elsewhere
    through the default process group (``all_gather_object``); in a single process it
    is a plain assertion.

    Args:
        condition: anything with a truth value (a one-element tensor works).
        message: this rank's explanation, shown next to its rank number.
        timeout_s: how long to wait for the other ranks (default: the test's deadline,
            or 60 s outside the plugin).

    Raises:
        AssertionError: on every rank, when the condition was false on any rank or a
            rank did not arrive in time.

    Example::

        @pytest.mark.distributed(world_size=2)
        def test_same_weights(dist_info):
            w = model_weights()
            assert_all_ranks(torch.equal(w, reference), f"max diff {(w - reference).abs().max()}")
    """
    __tracebackhide__ = True
    verdict = (bool(condition), str(message))
    ctx = _context.current()
    if ctx is not None:
        verdicts = _exchange_via_store(ctx, verdict, timeout_s)
        world = ctx.world_size
    else:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            gathered: list[object] = [None] * world
            dist.all_gather_object(gathered, verdict)
            verdicts = {r: (bool(v[0]), str(v[1])) for r, v in enumerate(gathered)}  # type: ignore[index]
        else:
            world = 1
            verdicts = {0: verdict}
    failing = sorted(r for r, (ok, _) in verdicts.items() if not ok)
    if failing:
        passing = [r for r in range(world) if r not in failing]
        details = "; ".join(f"rank {r}: {verdicts[r][1]}" if verdicts[r][1] else f"rank {r}" for r in failing)
        where = f"on rank(s) {', '.join(map(str, failing))} of {world}"
        also = f" (true on rank(s) {', '.join(map(str, passing))})" if passing else ""
        raise AssertionError(f"assert_all_ranks: false {where}{also}: {details}")


def _exchange_via_store(
    ctx: _context.RankContext, verdict: tuple[bool, str], timeout_s: float | None
) -> dict[int, tuple[bool, str]]:
    import torch.distributed as dist

    index = ctx.next_assert_index()
    keys = [f"assert/{index}/{r}" for r in range(ctx.world_size)]
    if timeout_s is None:
        timeout_s = max(ctx.deadline - time.monotonic() - 1.0, 1.0)
    store = ctx.store
    store.set(keys[ctx.rank], json.dumps(verdict))
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except dist.DistError:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise AssertionError(
            f"assert_all_ranks #{index + 1}: rank(s) {', '.join(map(str, missing))} did not reach it within "
            f"{timeout_s:.1f}s (they failed earlier or took another path; every rank must call it)"
        ) from None
    out = {}
    for r, key in enumerate(keys):
        ok, text = json.loads(store.get(key))
        out[r] = (bool(ok), str(text))
    return out
