"""Scale: real ranks on one machine, and launch discovery for 100 000 simulated ranks.

Part 1, real ranks (``--real``, default 16,32): for each N, one torchrun launch per
contender (raw torch, ``DistributedRuntime``), alternating which goes first, each
running ``--inner`` timed rounds (``workers/startup_worker.py``). Reported: start-up
(init to ready) and teardown, max over ranks, median over rounds; peak RSS (VmHWM)
per rank, median and sum over ranks; the wall time of the whole launch (imports of
N processes on this machine's cores included).

Part 2, simulated ranks (``--simulated``, default 100,1000,10000,100000): for each
world size W and launcher, build the environment of every rank (8 ranks per node) and
time ``discover(env)`` over all of them. The per-rank cost should not grow with W.
A case stops after ``--budget`` seconds (then the ranks timed are fewer than W; the
table says how many), so a cost that does grow cannot stall the run.

Usage::

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --real 16 --inner 2 --simulated 100,100000   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import (
    add_resolver_flag,
    loadavg,
    machine,
    median,
    parse_sizes,
    result_name,
    save,
    setup_resolver,
    table,
)
from bench_startup import launch, rounds

PER_NODE = 8


def _nodes(w: int) -> int:
    return -(-w // PER_NODE)


def _torchrun(r: int, w: int) -> dict[str, str]:
    return {"TORCHELASTIC_RUN_ID": "scale", "TORCHELASTIC_USE_AGENT_STORE": "True", "RANK": str(r),
            "WORLD_SIZE": str(w), "LOCAL_RANK": str(r % PER_NODE), "LOCAL_WORLD_SIZE": str(PER_NODE),
            "GROUP_RANK": str(r // PER_NODE), "GROUP_WORLD_SIZE": str(_nodes(w)),
            "MASTER_ADDR": "node00000", "MASTER_PORT": "29400"}


def _slurm(r: int, w: int, master_addr: bool = False) -> dict[str, str]:
    nodes = _nodes(w)
    node = r // PER_NODE
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_NTASKS": str(w),
           "SLURM_LOCALID": str(r % PER_NODE), "SLURM_NODEID": str(node), "SLURM_NNODES": str(nodes),
           "SLURM_STEP_NODELIST": f"node[00000-{nodes - 1:05d}]",
           "SLURM_STEP_TASKS_PER_NODE": f"{PER_NODE}(x{nodes})",
           "SLURM_GTIDS": ",".join(str(node * PER_NODE + i) for i in range(PER_NODE))}
    if master_addr:
        env["MASTER_ADDR"] = "node00000"
    return env


def _openmpi(r: int, w: int) -> dict[str, str]:
    return {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": str(w),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(r % PER_NODE), "OMPI_COMM_WORLD_LOCAL_SIZE": str(PER_NODE),
            "OMPI_MCA_ess_base_jobid": "12345", "MASTER_ADDR": "node00000"}


def _env(r: int, w: int) -> dict[str, str]:
    return {"RANK": str(r), "WORLD_SIZE": str(w), "LOCAL_RANK": str(r % PER_NODE),
            "LOCAL_WORLD_SIZE": str(PER_NODE), "MASTER_ADDR": "node00000", "MASTER_PORT": "29500"}


LAUNCHERS: dict[str, Callable[[int, int], dict[str, str]]] = {
    "torchrun": _torchrun,
    "env (RANK/WORLD_SIZE)": _env,
    "openmpi": _openmpi,
    "slurm (MASTER_ADDR set)": lambda r, w: _slurm(r, w, master_addr=True),
    "slurm (address from nodelist)": _slurm,
}


def simulated(sizes: list[int], budget_s: float) -> list[dict[str, Any]]:
    from distruntime.launchers import discover

    rows: list[dict[str, Any]] = []
    for name, make in LAUNCHERS.items():
        for w in sizes:
            envs = [make(r, w) for r in range(w)]
            # Untimed correctness check on a few ranks.
            for r in {0, w // 2, w - 1}:
                found = discover(envs[r])
                assert (found.rank, found.world_size) == (r, w), (name, r, found)
            done = 0
            started = time.perf_counter()
            deadline = started + budget_s
            for env in envs:
                discover(env)
                done += 1
                if done % 256 == 0 and time.perf_counter() > deadline:
                    break
            elapsed = time.perf_counter() - started
            rows.append({"launcher": name, "world": w, "timed_ranks": done, "seconds": elapsed,
                         "us_per_rank": elapsed / done * 1e6})
            print(f"{name} W={w}: {elapsed / done * 1e6:.1f} us/rank over {done} ranks", file=sys.stderr)
            del envs
    return rows


def real(sizes: list[int], inner: int, timeout_s: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        order = ["raw", "runtime"] if n % 2 == 0 else ["runtime", "raw"]
        for variant in order:
            t0 = time.perf_counter()
            workers = launch(n, inner, 1, variant, timeout_s)
            wall = time.perf_counter() - t0
            ups = rounds(workers, "up")[variant]
            downs = rounds(workers, "down")[variant]
            peaks = [w["peak_rss_kib"] / 1024 for w in workers]
            before = [w["rss_before_kib"] / 1024 for w in workers]
            rows.append({
                "n": n, "variant": variant, "rounds": len(ups), "launch_wall_s": wall, "load": loadavg(),
                "up_median_ms": median(ups) * 1e3, "down_median_ms": median(downs) * 1e3,
                "peak_rss_median_mib": statistics.median(peaks), "peak_rss_sum_mib": sum(peaks),
                "rss_after_imports_median_mib": statistics.median(before),
            })
            print(f"N={n} {variant}: up {median(ups) * 1e3:.1f} ms, launch {wall:.1f} s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", default="16,32", help="real world sizes under torchrun ('' to skip)")
    parser.add_argument("--inner", type=int, default=3, help="timed rounds per real launch (default: 3)")
    parser.add_argument("--simulated", default="100,1000,10000,100000", help="simulated world sizes")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per simulated case (default: 20)")
    parser.add_argument("--timeout", type=float, default=600, help="bound per torchrun launch in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/scale.json")
    add_resolver_flag(parser)
    args = parser.parse_args()
    resolver = setup_resolver(args)

    real_rows = real(parse_sizes(args.real), args.inner, args.timeout) if args.real else []
    sim_rows = simulated(parse_sizes(args.simulated), args.budget) if args.simulated else []

    if real_rows:
        print(table(["N", "contender", "rounds", "start-up (ms)", "teardown (ms)", "peak RSS/rank (MiB)",
                     "peak RSS, all ranks (MiB)", "RSS after imports (MiB)", "launch wall (s)"], [
            [r["n"], r["variant"], r["rounds"], f"{r['up_median_ms']:.1f}", f"{r['down_median_ms']:.1f}",
             f"{r['peak_rss_median_mib']:.0f}", f"{r['peak_rss_sum_mib']:.0f}",
             f"{r['rss_after_imports_median_mib']:.0f}", f"{r['launch_wall_s']:.1f}"] for r in real_rows]))
        print()
    if sim_rows:
        least = min(x["world"] for x in sim_rows)
        smallest = {r["launcher"]: r["us_per_rank"] for r in sim_rows if r["world"] == least}
        print(table(["launcher", "W", "ranks timed", "us per rank", "vs smallest W"], [
            [r["launcher"], r["world"], r["timed_ranks"], f"{r['us_per_rank']:.1f}",
             f"{r['us_per_rank'] / smallest[r['launcher']]:.2f}x"] for r in sim_rows]))
    if not args.no_save:
        path = save(result_name("scale", resolver), {
            "machine": machine(), "resolver": resolver, "inner": args.inner, "budget_s": args.budget,
            "real": real_rows, "simulated": sim_rows})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
