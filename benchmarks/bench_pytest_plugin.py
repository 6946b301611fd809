"""Cost per N-rank test: the pytest plugin (pooled, fresh) versus torch's MultiProcessTestCase.

The same trivial tests (an ``all_reduce`` of ones, checked against the world size) run
three ways, each in its own ``python -m pytest`` session in the same benchmark run:

* **pooled**: ``@pytest.mark.distributed(world_size=[2, 4])``, rank processes reused;
* **fresh**: the same file with ``--drt-fresh`` (new rank processes for every test);
* **MultiProcessTestCase**: ``torch.testing._internal.common_distributed``, two classes
  (world size 2 and 4), the group made from a ``file://`` store as torch's own tests do.

``--tests 10`` (default) means 10 test functions per world size: 20 tests per way.
Reported per way: wall seconds of the whole session divided by the number of tests
(start-up included: pools, ``import torch``), the median time pytest recorded for one
test (JUnit XML, all phases), and the ratios. Goal: pooled at least 20x faster per test
than MultiProcessTestCase.

Every session runs in its own process group under a bound; on overrun its whole
process tree is killed. TCPStore connections do a reverse DNS lookup that stalls 5 s
where the resolver drops queries; as the other benchmarks do, a shim answers them
numerically unless ``--system-resolver`` (see ``_common.setup_resolver``).

Usage::

    python benchmarks/bench_pytest_plugin.py                 # 20 tests per way
    python benchmarks/bench_pytest_plugin.py --tests 4 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import PYTHON, add_resolver_flag, clean_env, machine, run, setup_resolver, table


def plugin_tests(n: int) -> str:
    body = ["import pytest", "import torch", "import torch.distributed as dist", ""]
    for i in range(n):
        body += [
            "@pytest.mark.distributed(world_size=[2, 4])",
            f"def test_all_reduce_{i}(dist_info):",
            "    t = torch.ones(1)",
            "    dist.all_reduce(t)",
            "    assert t.item() == dist_info.world_size",
            "",
        ]
    return "\n".join(body)


def mptc_tests(n: int) -> str:
    head = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from torch.testing._internal.common_distributed import MultiProcessTestCase


        class _AllReduce(MultiProcessTestCase):
            def setUp(self):
                super().setUp()
                self._spawn_processes()

            def _all_reduce(self):
                dist.init_process_group("gloo", init_method=f"file://{self.file_name}",
                                        rank=self.rank, world_size=self.world_size)
                t = torch.ones(1)
                dist.all_reduce(t)
                assert t.item() == self.world_size
                dist.destroy_process_group()
    """)
    classes = []
    for size in (2, 4):
        methods = "".join(
            f"\n    def test_all_reduce_{i}(self):\n        self._all_reduce()\n" for i in range(n)
        )
        classes.append(
            f"\n\nclass TestWs{size}(_AllReduce):\n    @property\n    def world_size(self):\n"
            f"        return {size}\n{methods}"
        )
    return head + "".join(classes)


@dataclass
class Way:
    name: str
    wall_s: list[float]
    per_test_s: list[float]  # pytest's own time of each test (all phases)
    tests: int

    @property
    def wall_per_test(self) -> float:
        return statistics.median(self.wall_s) / self.tests

    @property
    def median_test(self) -> float:
        return statistics.median(self.per_test_s)


def _junit_times(path: Path) -> tuple[list[float], int, int]:
    """Per-test times, and the counts of passed and not-passed tests."""
    root = ET.parse(path).getroot()
    times, bad = [], 0
    for case in root.iter("testcase"):
        times.append(float(case.get("time", "0")))
        if any(child.tag in ("failure", "error", "skipped") for child in case):
            bad += 1
    return times, len(times) - bad, bad


def run_way(
    name: str, project: Path, test_file: str, *, extra: list[str], expected: int, timeout_s: float,
    repeats: int,
) -> Way:
    walls: list[float] = []
    per_test: list[float] = []
    for attempt in range(repeats):
        junit = project / f"{name.replace(' ', '_')}-{attempt}.xml"
        cmd = [
            PYTHON,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--junitxml={junit}",
            "-o",
            "junit_family=xunit2",
            *extra,
            test_file,
        ]
        result = run(cmd, timeout_s, env=clean_env(), cwd=project)
        if result.timed_out:
            sys.exit(f"{name}: the pytest session ran past {timeout_s:.0f}s and was killed.\n{result.tail()}")
        times, passed, bad = _junit_times(junit)
        if result.returncode != 0 or passed != expected:
            sys.exit(
                f"{name}: expected {expected} passing tests, got {passed} (+{bad} not passing), "
                f"exit code {result.returncode}.\n{result.tail()}"
            )
        walls.append(result.seconds)
        per_test.extend(times)
        print(
            f"  {name}: run {attempt + 1}/{repeats}: {result.seconds:.1f}s for {expected} tests", flush=True
        )
    return Way(name, walls, per_test, expected)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tests", type=int, default=10, help="test functions per world size (2 and 4)")
    parser.add_argument("--repeats", type=int, default=1, help="sessions per way (medians are reported)")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on one pytest session, seconds")
    add_resolver_flag(parser)
    args = parser.parse_args()
    if importlib.util.find_spec("expecttest") is None:
        sys.exit(
            "torch's MultiProcessTestCase (torch.testing._internal) imports the expecttest package, "
            "which is not installed. Fix: pip install expecttest"
        )
    resolver = setup_resolver(args)
    total = 2 * args.tests
    print(
        f"{total} tests per way (world sizes 2 and 4), {args.repeats} session(s) each; resolver: {resolver}"
    )
    with tempfile.TemporaryDirectory(prefix="drt-bench-plugin-") as tmp:
        project = Path(tmp)
        (project / "test_plugin_bench.py").write_text(plugin_tests(args.tests))
        (project / "test_mptc_bench.py").write_text(mptc_tests(args.tests))
        common: dict[str, Any] = {"expected": total, "timeout_s": args.timeout, "repeats": args.repeats}
        ways = [
            run_way("pooled", project, "test_plugin_bench.py", extra=[], **common),
            run_way("fresh", project, "test_plugin_bench.py", extra=["--drt-fresh"], **common),
            run_way("MultiProcessTestCase", project, "test_mptc_bench.py", extra=["-p", "no:distruntime"],
                    **common),
        ]
    mptc = ways[-1]
    rows = [
        [
            w.name,
            f"{w.wall_per_test:.3f}",
            f"{w.median_test:.3f}",
            f"{mptc.wall_per_test / w.wall_per_test:.1f}x",
            f"{mptc.median_test / w.median_test:.1f}x",
        ]
        for w in ways
    ]
    print()
    print(
        table(
            ["way", "wall s/test", "median s/test (pytest)", "MPTC / way (wall)", "MPTC / way (median)"], rows
        )
    )
    pooled = ways[0]
    ratio = mptc.wall_per_test / pooled.wall_per_test
    print(
        f"\npooled vs MultiProcessTestCase: {ratio:.1f}x faster per test (wall, start-up included); "
        f"goal >= 20x: {'met' if ratio >= 20 else 'NOT met'}"
    )
    m = machine()
    print(f"machine: {m['cpus']} cpus, torch {m['torch']}, cuda {m['cuda']}, load {m['loadavg_1_5_15']}")


if __name__ == "__main__":
    main()
