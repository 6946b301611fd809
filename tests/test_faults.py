"""Fault-injection suite: every scenario of tests/fault_matrix.py, with its bound.

For each: every process ended within the scenario's bound (from the fault, or from
entering the runtime for start-up faults), exit codes are non-zero where a fault
happened, the output names the cause, no process of the scenario is left, and the
rendezvous port is free again.
"""

from __future__ import annotations

import pytest

from fault_matrix import SCENARIOS, Scenario, rank_reports, run_scenario

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[f"{s.launcher}: {s.name}" for s in SCENARIOS])
def test_fault(scenario: Scenario) -> None:
    for module in scenario.needs:
        pytest.importorskip(module, reason="the `wrappers` extra (lightning, accelerate) is not installed")
    outcome = run_scenario(scenario)
    detail = outcome.describe()
    assert not outcome.timed_out, detail
    assert outcome.orphans == [], detail
    assert outcome.port_free, detail
    for rank, code in enumerate(outcome.returncodes):
        if rank in scenario.expect_success:
            assert code == 0, detail
        else:
            assert code != 0, detail
    for text in scenario.expect:
        assert text in outcome.output, f"missing {text!r}\n{detail}"
    if scenario.expect_each:
        # distruntime's own report on each rank (logged before the stop signal's handler is
        # back, so a launcher's SIGTERM right after teardown cannot take it), never SignalExit
        each = scenario.expect_each
        named = {rank for rank, said in rank_reports(outcome.output) if said.startswith(each)}
        assert len(named) >= scenario.world_size - 1, f"ranks {sorted(named)} say {each!r}\n{detail}"
        signalled = [line for line in outcome.output.splitlines()
                     if line.startswith("FAILED ") and "SignalExit" in line]
        assert not signalled, f"{signalled}\n{detail}"
    for text in scenario.absent:
        assert text not in outcome.output, f"unexpected {text!r}\n{detail}"
    assert outcome.seconds_to_exit <= scenario.bound_s, detail
