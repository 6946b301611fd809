"""The control-plane simulator (benchmarks/simulate_control_plane.py) reaches the verdict a
real job reaches: same culprit, same kinds, same location, same summary shape.

The real side is a 3-rank gloo job (tests/workers/sim_compare.py) in which rank 2 sleeps
in ``load_batch`` while ranks 0 and 1 wait in ``all_reduce``, with ``hang_timeout_s=2``.
The simulated side is the simulator's job of 3 ranks on one simulated host, with the same
rank stuck at the same file:line, against a real TCPStore behind the wire proxy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from torch.distributed import TCPStore

from distruntime.control.verdict import HangReport
from procs import free_port, rank_envs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import simulate_control_plane as sim  # noqa: E402
from wire import ProxyProcess  # noqa: E402

WORKER = REPO / "tests" / "workers" / "sim_compare.py"
WORLD, STUCK = 3, 2


def _stuck_line() -> str:
    lines = WORKER.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "the stuck line" in line)
    return f"{WORKER}:{number} in load_batch"


def _real_verdict() -> HangReport:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER)], env=env | {"STUCK_RANK": str(STUCK)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in rank_envs(WORLD, port)]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append(out)
    for out in outputs:
        for line in out.splitlines():
            if line.startswith("VERDICT "):
                return HangReport.from_json(line[len("VERDICT "):])
    raise AssertionError("no rank printed a verdict:\n" + "\n---\n".join(o[-2000:] for o in outputs))


def _simulated_verdict(stuck_at: str) -> tuple[HangReport, int]:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with ProxyProcess("127.0.0.1", server.port) as proxy:
        job = sim.Job(proxy.port, WORLD, WORLD, STUCK, threshold_s=2.0)
        job.stuck_at = stuck_at
        try:
            job.check_in()
            job.start_waiters()
            job.await_waiters()
            proxy.mark("incident")
            job.write_slots(1, time.time() - 2.5)
            report, _elapsed, verdicts = job.incident(1, 0)
        finally:
            job.close()
        requests = proxy.total("incident")
    assert all(v is not None and json.loads(v)["summary"] == report.summary for v in verdicts)
    return report, requests


def _shape(text: str) -> str:
    """A summary with its numbers and paths cut (times differ from run to run)."""
    return re.sub(r"\d+(\.\d+)?", "#", re.sub(r"\S*/", "", text))


def test_simulated_incident_reaches_the_real_verdict() -> None:
    stuck_at = _stuck_line()
    real = _real_verdict()
    simulated, requests = _simulated_verdict(stuck_at)
    assert real.is_hang and simulated.is_hang
    assert simulated.culprits == real.culprits == (STUCK,)
    assert simulated.ranks[0].rank == real.ranks[0].rank == STUCK
    # ranks that merely wait are ordered by how long they waited: compare them as a set
    assert sorted((r.rank, r.kind) for r in simulated.ranks) == sorted((r.rank, r.kind) for r in real.ranks)
    assert simulated.ranks[0].where == real.ranks[0].where == stuck_at
    assert _shape(simulated.summary) == _shape(real.summary), (simulated.summary, real.summary)
    assert requests < 4 * WORLD + 100
