"""SLURM hostlist expansion: a table of real-world forms, and the malformed ones."""

from __future__ import annotations

import pytest

from distruntime.errors import LaunchEnvError
from distruntime.hostlist import expand_hostlist, expand_tasks_per_node, first_host, tasks_on_node

CASES = [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("host[5-9]", ["host5", "host6", "host7", "host8", "host9"]),
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("gpu-a100-[01-03]", ["gpu-a100-01", "gpu-a100-02", "gpu-a100-03"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("n[1-2]x,m[3]", ["n1x", "n2x", "m3"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("linux[1,3-4]", ["linux1", "linux3", "linux4"]),
    ("x[9-11]", ["x9", "x10", "x11"]),
    ("alpha beta", ["alpha", "beta"]),
]


@pytest.mark.parametrize(("nodelist", "hosts"), CASES, ids=[c[0] for c in CASES])
def test_expand(nodelist: str, hosts: list[str]) -> None:
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[[1]]", "", "n[1-]"])
def test_malformed_names_variable(bad: str) -> None:
    with pytest.raises(LaunchEnvError) as info:
        expand_hostlist(bad, variable="SLURM_STEP_NODELIST")
    assert "SLURM_STEP_NODELIST" in str(info.value)
    assert info.value.variable == "SLURM_STEP_NODELIST"


@pytest.mark.parametrize(
    ("spec", "counts"), [("4", [4]), ("3,1", [3, 1]), ("2(x2)", [2, 2]), ("2(x2),1", [2, 2, 1])]
)
def test_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("bad", ["x", "2(x", "2(xa)", ""])
def test_tasks_per_node_malformed(bad: str) -> None:
    with pytest.raises(LaunchEnvError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(bad)


@pytest.mark.parametrize(("nodelist", "hosts"), CASES, ids=[c[0] for c in CASES])
def test_first_host_matches_full_expansion(nodelist: str, hosts: list[str]) -> None:
    assert first_host(nodelist) == hosts[0]


def test_first_host_does_not_expand_a_huge_list() -> None:
    assert first_host("gpu[000001-999999]") == "gpu000001"


@pytest.mark.parametrize("bad", ["n[1-2", "n[a-b]", "n[3-1]", "", "n[1-]"])
def test_first_host_malformed(bad: str) -> None:
    with pytest.raises(LaunchEnvError, match="SLURM_NODELIST"):
        first_host(bad)


@pytest.mark.parametrize("spec", ["4", "3,1", "2(x2)", "2(x2),1", "1,4(x3),2"])
def test_tasks_on_node_matches_expansion(spec: str) -> None:
    counts = expand_tasks_per_node(spec)
    assert [tasks_on_node(spec, node) for node in range(len(counts) + 1)] == [*counts, None]
