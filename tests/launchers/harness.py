"""Harness for the real-launcher tests: bounded subprocesses, launcher set-up, result checks.

Everything here is bounded in time: a command that overruns its limit is killed
together with its whole process tree (SIGTERM, then SIGKILL after 5 s), and the
caller gets the output it produced so far.

Set-up lives in ``scripts/launchers/`` (bash); this module drives it:

* ``install.sh``        apt packages (slurm-wlm, munge, openmpi-bin, mpich, ...)
* ``slurm.sh up|down``  a two-node SLURM cluster (n1, n2) on this host
* ``netns.sh up|down``  two network namespaces with hostnames node1 / node2
* ``ompi_fake_ssh.sh``  Open MPI's rsh agent for a second simulated node

The context managers :func:`slurm_cluster_cm` and :func:`netns_pair_cm` bring a
launcher up and always down again; the test module wraps them in
session-scoped fixtures.

MPI command lines (no daemons needed):

* Open MPI, one node: ``mpirun.openmpi --allow-run-as-root --oversubscribe
  --mca oob_tcp_if_include lo --mca btl_tcp_if_include lo -np 4 -x VAR ...``
* Open MPI, two simulated nodes: add ``--mca plm_rsh_agent ompi_fake_ssh.sh
  --host 127.0.0.1:2,127.0.0.2:2``
* MPICH, one node: ``mpiexec.hydra -iface lo -n 4``
* MPICH, two simulated nodes: add ``-launcher fork -hosts 127.0.0.1:2,127.0.0.2:2``

If a launcher cannot be installed or started, the fixtures FAIL with the reason;
they never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "launchers"
INSTALL_SH = SCRIPTS / "install.sh"
SLURM_SH = SCRIPTS / "slurm.sh"
NETNS_SH = SCRIPTS / "netns.sh"
OMPI_FAKE_SSH = SCRIPTS / "ompi_fake_ssh.sh"

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# The worker every launcher test runs; DRT_LAUNCH_PROBE overrides it (for
# trying the harness with a stand-in worker).
LAUNCH_PROBE = Path(os.environ.get("DRT_LAUNCH_PROBE", str(REPO / "examples" / "launch_probe.py")))

LAUNCHER_DIR = Path(os.environ.get("DISTRUNTIME_LAUNCHER_DIR", "/tmp/distruntime-launchers"))
SLURM_CONF = LAUNCHER_DIR / "slurm" / "slurm.conf"

INSTALL_TIMEOUT_S = 900.0
SETUP_TIMEOUT_S = 120.0



from procs import (  # noqa: E402 - the generic process control lives in tests/procs.py
    BoundedProcess,
    CommandTimeoutError,
    clean_env,
    format_output,
    kill_session_leftovers,
    run_bounded,
    tail,
)


def run_parallel_bounded(
    cmds: Sequence[Sequence[str]],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    fail_grace_s: float = 20.0,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (the "nodes" of one job), all bounded together.

    If one command fails, the others get ``fail_grace_s`` to finish (they are
    usually stuck waiting for the dead peer) and are then killed. On the
    overall timeout every tree is killed and :class:`CommandTimeoutError` is
    raised with all outputs.
    """
    procs = [BoundedProcess(c, env=env, cwd=cwd) for c in cmds]
    try:
        deadline = time.monotonic() + timeout_s
        fail_deadline: float | None = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if fail_deadline is None and any(c not in (None, 0) for c in codes):
                fail_deadline = time.monotonic() + fail_grace_s
            now = time.monotonic()
            if now >= deadline or (fail_deadline is not None and now >= fail_deadline):
                for p in procs:
                    p.kill()
                if now >= deadline:
                    outs = [p.output() for p in procs]
                    joined_out = "\n".join(
                        f"=== [{i}] {' '.join(p.cmd)}\n{o}"
                        for i, (p, (o, _)) in enumerate(zip(procs, outs, strict=True))
                    )
                    joined_err = "\n".join(f"=== [{i}]\n{e}" for i, (_, e) in enumerate(outs))
                    raise CommandTimeoutError(["parallel", *procs[0].cmd], timeout_s, joined_out, joined_err)
                break
            time.sleep(0.1)
        results = []
        for p in procs:
            kill_session_leftovers(p.popen.pid)
            results.append(p.result())
        return results
    finally:
        for p in procs:
            if p.popen.returncode is None:
                p.kill()
            p.close()


def run_parallel_checked(
    cmds: Sequence[Sequence[str]],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    what: str = "",
) -> list[subprocess.CompletedProcess[str]]:
    """:func:`run_parallel_bounded` that fails the test if any command fails or all overrun."""
    try:
        results = run_parallel_bounded(cmds, timeout_s, env=env, cwd=cwd)
    except CommandTimeoutError as exc:
        pytest.fail(f"{what or 'commands'}: {exc}", pytrace=False)
    if any(r.returncode != 0 for r in results):
        pytest.fail(f"{what or 'commands'} failed\n" + job_context(*results), pytrace=False)
    return results


def check_ok(result: subprocess.CompletedProcess[str], what: str = "") -> subprocess.CompletedProcess[str]:
    """Fail the test (with the full output) unless ``result`` exited 0."""
    if result.returncode != 0:
        pytest.fail(
            f"{what or 'command'} failed\n"
            + format_output([str(a) for a in result.args], result.stdout, result.stderr, result.returncode),
            pytrace=False,
        )
    return result


def run_checked(
    cmd: Sequence[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """:func:`run_bounded` that fails the test on a non-zero exit or a timeout."""
    try:
        result = run_bounded(cmd, timeout_s, env=env, cwd=cwd)
    except CommandTimeoutError as exc:
        pytest.fail(f"{what or 'command'}: {exc}", pytrace=False)
    return check_ok(result, what)


# --------------------------------------------------------------------------
# environment and ports
# --------------------------------------------------------------------------


def probe_args(out_dir: Path) -> list[str]:
    """The worker script and its arguments (what torchrun takes)."""
    return [str(LAUNCH_PROBE), "--out", str(out_dir)]


def probe_cmd(out_dir: Path) -> list[str]:
    """The worker command line: this venv's python + examples/launch_probe.py --out DIR."""
    return [PYTHON, *probe_args(out_dir)]


def require_probe() -> None:
    if not LAUNCH_PROBE.is_file():
        pytest.fail(f"worker {LAUNCH_PROBE} does not exist", pytrace=False)


# --------------------------------------------------------------------------
# result checks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the launcher put each rank (index = global rank)."""

    local_ranks: tuple[int, ...]
    local_world_sizes: tuple[int, ...]
    node_ranks: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.node_ranks)

    @property
    def num_nodes(self) -> int:
        return len(set(self.node_ranks))

    @classmethod
    def block(cls, nodes: int, per_node: int) -> Placement:
        """Ranks 0..per_node-1 on node 0, the next per_node on node 1, ..."""
        n = nodes * per_node
        return cls(
            local_ranks=tuple(r % per_node for r in range(n)),
            local_world_sizes=(per_node,) * n,
            node_ranks=tuple(r // per_node for r in range(n)),
        )


def read_ranks(out_dir: Path) -> dict[int, dict[str, Any]]:
    """rank -> the JSON each rank wrote as ``out_dir/rank<R>.json``."""
    ranks: dict[int, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("rank*.json")):
        data = json.loads(path.read_text())
        assert isinstance(data, dict), f"{path}: not a JSON object"
        rank = int(data["rank"])
        assert path.name == f"rank{rank}.json", f"{path.name} holds rank {rank}"
        ranks[rank] = data
    return ranks


def assert_ranks(
    out_dir: Path,
    launcher: str | set[str],
    placement: Placement,
    context: str = "",
    master_addr: str | None = None,
    master_port: int | None = None,
    check_num_nodes: bool = True,
) -> dict[int, dict[str, Any]]:
    """Check every rank file against what the launcher placed where."""
    ranks = read_ranks(out_dir)
    n = placement.world_size
    where = f"\n{context}" if context else ""
    assert set(ranks) == set(range(n)), f"rank files {sorted(ranks)}, expected 0..{n - 1}{where}"
    launchers = {launcher} if isinstance(launcher, str) else set(launcher)
    expected_sum = n * (n + 1) / 2
    for r, d in sorted(ranks.items()):
        assert d.get("launcher") in launchers, (
            f"rank {r}: launcher {d.get('launcher')!r}, expected {sorted(launchers)}\nfull record: {d}{where}"
        )
        got = {
            "world_size": d.get("world_size"),
            "local_rank": d.get("local_rank"),
            "local_world_size": d.get("local_world_size"),
            "node_rank": d.get("node_rank"),
        }
        want = {
            "world_size": n,
            "local_rank": placement.local_ranks[r],
            "local_world_size": placement.local_world_sizes[r],
            "node_rank": placement.node_ranks[r],
        }
        if check_num_nodes:
            got["num_nodes"] = d.get("num_nodes")
            want["num_nodes"] = placement.num_nodes
        assert got == want, f"rank {r}: got {got}, expected {want}\nfull record: {d}{where}"
        assert float(d.get("allreduce", "nan")) == expected_sum, (
            f"rank {r}: allreduce {d.get('allreduce')}, expected {expected_sum}{where}"
        )
        if master_addr is not None:
            assert d.get("master_addr") == master_addr, f"rank {r}: master_addr {d.get('master_addr')}{where}"
        if master_port is not None:
            assert int(d.get("master_port", -1)) == master_port, (
                f"rank {r}: master_port {d.get('master_port')}, expected {master_port}{where}"
            )
    # all ranks agree on the rendezvous and the backend
    for key in ("master_addr", "master_port", "backend", "device"):
        values = {json.dumps(d.get(key)) for d in ranks.values()}
        if key == "device":  # cuda:0 / cuda:1 differ per rank; compare the type
            values = {v.strip('"').split(":")[0] for v in values}
        assert len(values) == 1, f"ranks disagree on {key}: {values}{where}"
    return ranks


def job_context(*results: subprocess.CompletedProcess[str]) -> str:
    """Output of the launcher command(s), for assertion messages."""
    return "\n".join(
        format_output([str(a) for a in r.args], r.stdout, r.stderr, r.returncode) for r in results
    )


# --------------------------------------------------------------------------
# launcher set-up: install, SLURM, network namespaces, MPI command prefixes
# --------------------------------------------------------------------------

_installed: list[bool] = []


def ensure_installed() -> None:
    """Run scripts/launchers/install.sh once per process; fail (never skip) if it fails."""
    if _installed:
        return
    try:
        result = run_bounded(["bash", str(INSTALL_SH)], INSTALL_TIMEOUT_S)
    except CommandTimeoutError as exc:
        pytest.fail(f"installing the launchers timed out: {exc}", pytrace=False)
    check_ok(result, "scripts/launchers/install.sh")
    _installed.append(True)


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"not on PATH after install.sh: {missing}", pytrace=False)


@dataclass
class SlurmCluster:
    """A running two-node cluster (nodes n1, n2). ``env`` carries SLURM_CONF."""

    conf: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = ("n1", "n2")
    job_names: list[str] = field(default_factory=list)

    def job_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = clean_env(extra)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def new_job_name(self, tag: str) -> str:
        name = f"drt-{tag}-{uuid.uuid4().hex[:8]}"
        self.job_names.append(name)
        return name

    def cancel(self, job_name: str) -> None:
        """Cancel whatever still runs under ``job_name`` (bounded, best effort)."""
        with contextlib.suppress(CommandTimeoutError):
            run_bounded(["scancel", "--full", "--name", job_name], 15, env=self.job_env())

    def srun(
        self, args: Sequence[str], tag: str, timeout_s: float, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``srun --job-name ... ARGS`` bounded; the job is cancelled if it fails or overruns."""
        name = self.new_job_name(tag)
        cmd = ["srun", f"--job-name={name}", *args]
        ok = False
        try:
            result = run_checked(cmd, timeout_s, env=self.job_env(extra_env), cwd=REPO, what="srun")
            ok = True
            return result
        finally:
            if not ok:
                self.cancel(name)

    def sbatch(
        self,
        body: str,
        sbatch_opts: Sequence[str],
        tag: str,
        work_dir: Path,
        timeout_s: float,
        extra_env: Mapping[str, str] | None = None,
    ) -> tuple[str, str]:
        """Submit a batch script, poll squeue until it ends (bounded), require COMPLETED.

        Returns (job id, the job's output). ``sbatch --wait`` is not used: it
        polls at a growing interval of up to 10 s.
        """
        name = self.new_job_name(tag)
        script = work_dir / f"{name}.sh"
        output = work_dir / f"{name}.out"
        script.write_text("#!/bin/bash\nset -e\n" + body + "\n")
        env = self.job_env(extra_env)
        submitted = run_checked(
            ["sbatch", "--parsable", f"--job-name={name}", f"--output={output}", *sbatch_opts, str(script)],
            30,
            env=env,
            cwd=REPO,
            what="sbatch",
        )
        job_id = submitted.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout_s
        finished = False
        try:
            while time.monotonic() < deadline:
                q = run_bounded(["squeue", "-h", "-j", job_id, "-o", "%T"], 10, env=env)
                if q.returncode == 0 and not q.stdout.strip():
                    finished = True
                    break
                time.sleep(0.2)
        finally:
            if not finished:
                self.cancel(name)
        job_out = output.read_text(errors="replace") if output.exists() else "(no job output file)"
        if not finished:
            pytest.fail(
                f"sbatch job {job_id} did not finish in {timeout_s:.0f} s; cancelled\n"
                f"--- job output ---\n{tail(job_out)}",
                pytrace=False,
            )
        show = run_bounded(["scontrol", "show", "job", job_id], 10, env=env)
        state = show.stdout
        if "JobState=COMPLETED" not in state or "ExitCode=0:0" not in state:
            pytest.fail(
                f"sbatch job {job_id} did not complete cleanly\n{tail(state)}\n"
                f"--- job output ---\n{tail(job_out)}",
                pytrace=False,
            )
        return job_id, job_out


@contextlib.contextmanager
def slurm_cluster_cm() -> Iterator[SlurmCluster]:
    """install + ``slurm.sh up``; ``slurm.sh down`` on exit, also on failure."""
    ensure_installed()
    require_tools("srun", "sbatch", "squeue", "scancel", "scontrol", "slurmctld", "slurmd")
    try:
        try:
            up = run_bounded(["bash", str(SLURM_SH), "up"], SETUP_TIMEOUT_S)
        except CommandTimeoutError as exc:
            pytest.fail(f"slurm.sh up timed out: {exc}", pytrace=False)
        check_ok(up, "scripts/launchers/slurm.sh up")
        env = clean_env({"SLURM_CONF": str(SLURM_CONF)})
        yield SlurmCluster(conf=SLURM_CONF, env=env)
    finally:
        down = run_bounded(["bash", str(SLURM_SH), "down"], SETUP_TIMEOUT_S)
        if down.returncode != 0:
            print(
                format_output(["slurm.sh", "down"], down.stdout, down.stderr, down.returncode),
                file=sys.stderr,
            )


@dataclass(frozen=True)
class NetnsPair:
    """Two network namespaces; node1 = PREFIX.1, node2 = PREFIX.2."""

    hostnames: tuple[str, str] = ("node1", "node2")

    def exec_prefix(self, node: int) -> list[str]:
        """Command prefix running what follows on node ``node`` (1 or 2) as host nodeN."""
        return ["bash", str(NETNS_SH), "exec", str(node)]


@contextlib.contextmanager
def netns_pair_cm() -> Iterator[NetnsPair]:
    """install + ``netns.sh up``; ``netns.sh down`` on exit, also on failure."""
    ensure_installed()
    require_tools("ip", "unshare")
    try:
        try:
            up = run_bounded(["bash", str(NETNS_SH), "up"], SETUP_TIMEOUT_S)
        except CommandTimeoutError as exc:
            pytest.fail(f"netns.sh up timed out: {exc}", pytrace=False)
        check_ok(up, "scripts/launchers/netns.sh up")
        yield NetnsPair()
    finally:
        down = run_bounded(["bash", str(NETNS_SH), "down"], SETUP_TIMEOUT_S)
        if down.returncode != 0:
            print(
                format_output(["netns.sh", "down"], down.stdout, down.stderr, down.returncode),
                file=sys.stderr,
            )


SIMULATED_HOSTS = "127.0.0.1:2,127.0.0.2:2"


def openmpi_prefix(np: int, nodes: int = 1, forward: Sequence[str] = ()) -> list[str]:
    """``mpirun.openmpi`` command prefix for ``np`` ranks on 1 node or 2 simulated nodes.

    ``forward``: variable names passed with ``-x`` (Open MPI forwards nothing
    to remote nodes by itself). Runs as root, oversubscribes the 2 cores,
    keeps its own traffic on loopback.
    """
    cmd = [
        "mpirun.openmpi",
        "--allow-run-as-root",
        "--oversubscribe",
        "--mca",
        "oob_tcp_if_include",
        "lo",
        "--mca",
        "btl_tcp_if_include",
        "lo",
    ]
    if nodes == 2:
        cmd += ["--mca", "plm_rsh_agent", str(OMPI_FAKE_SSH), "--host", SIMULATED_HOSTS]
    elif nodes != 1:
        raise ValueError("nodes must be 1 or 2")
    cmd += ["-np", str(np)]
    for name in forward:
        cmd += ["-x", name]
    return cmd


def mpich_prefix(np: int, nodes: int = 1) -> list[str]:
    """``mpiexec.hydra`` command prefix for ``np`` ranks on 1 node or 2 simulated nodes.

    Hydra forwards the whole environment (``-genvall`` is the default).
    """
    cmd = ["mpiexec.hydra", "-iface", "lo"]
    if nodes == 2:
        cmd += ["-launcher", "fork", "-hosts", SIMULATED_HOSTS]
    elif nodes != 1:
        raise ValueError("nodes must be 1 or 2")
    return [*cmd, "-n", str(np)]


@contextlib.contextmanager
def probe_out_dir() -> Iterator[Path]:
    """A fresh output dir under /tmp, writable by every rank (and every "node"); removed after."""
    base = Path(tempfile.mkdtemp(prefix="drt-probe-", dir="/tmp"))
    os.chmod(base, 0o777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
