"""What each distruntime error means, its usual causes, and the fix: offline, by name.

One entry per exception class the package defines. ``distruntime explain NAME`` prints
an entry; the documentation's troubleshooting page is rendered from the same text, and
every :class:`~distruntime.DistRuntimeError` carries the note ``See: distruntime explain
NAME`` in its traceback.

Text conventions (shared by the terminal and the web page): plain sentences, with
``code`` in single backticks.

Example:
    >>> from distruntime.troubleshooting import explain
    >>> print(explain("LaunchEnvError").splitlines()[0])
    LaunchEnvError: the launch environment is invalid, partial or contradictory.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ENTRIES", "Entry", "explain", "lookup"]


@dataclass(frozen=True)
class Entry:
    """The troubleshooting text of one exception class.

    Attributes:
        name: the class name (``"HangError"``).
        module: the module that defines it (``"distruntime.errors"``).
        meaning: one sentence: what the error says happened.
        causes: the usual causes, most common first.
        fix: what to do, in order.
        fields: the exception's attributes worth reading, ``(name, what it holds)``.

    Example:
        >>> ENTRIES["HangError"].module
        'distruntime.errors'
    """

    name: str
    module: str
    meaning: str
    causes: tuple[str, ...]
    fix: tuple[str, ...]
    fields: tuple[tuple[str, str], ...] = ()

    def format(self) -> str:
        """The entry as the terminal shows it.

        Example:
            >>> print(ENTRIES["SignalExit"].format().splitlines()[2])
            Usual causes:
        """
        lines = [f"{self.name}: {self.meaning}", f"  (class {self.module}.{self.name})", "Usual causes:"]
        lines += [f"  * {cause}" for cause in self.causes]
        lines.append("Fix:")
        lines += [f"  {i}. {step}" for i, step in enumerate(self.fix, 1)]
        if self.fields:
            lines.append("Fields:")
            lines += [f"  {name}: {what}" for name, what in self.fields]
        return "\n".join(lines) + "\n"


_E = "distruntime.errors"

#: Every entry, by exception class name (``ENTRIES["HangError"]``).
ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry(
        "DistRuntimeError", _E,
        "the base class of every error distruntime raises on purpose.",
        ("You caught or saw the base class; the concrete class (its subclass) names the problem.",),
        ("Read the message: it names what was wrong (the variable, rank or value) and the fix.",
         "Run `distruntime explain` with the concrete class name for its entry.",
         "`except DistRuntimeError` catches anything the library raises on purpose "
         "(`SignalExit` excepted: it is a `SystemExit`)."),
    ),
    Entry(
        "LaunchEnvError", _E,
        "the launch environment is invalid, partial or contradictory.",
        ("A partial environment: `RANK` set without `WORLD_SIZE` (or the reverse), often left "
         "over in a shell that once ran a rank by hand.",
         "Two launchers disagree: `RANK` exported by a script contradicts `SLURM_PROCID` or "
         "`OMPI_COMM_WORLD_RANK`.",
         "A value that does not parse: a non-integer rank, a rank not below the world size, a "
         "`MASTER_PORT` outside 1-65535.",
         "An MPI job over several nodes without `MASTER_ADDR` and without the `mpi` extra (mpi4py)."),
        ("Run `distruntime env` in the same environment: it shows which variable decided each "
         "value and the error it would raise, without starting anything.",
         "Unset the stray variable the message names, or set the missing one.",
         "For MPI over several nodes: `pip install 'distruntime[mpi]'`, or export "
         "`MASTER_ADDR`/`MASTER_PORT`."),
        (("variable", "the environment variable at fault (empty when several are)"),
         ("value", "its value as found (`None` when it is missing)")),
    ),
    Entry(
        "BackendUnavailableError", _E,
        "the requested backend cannot run on this machine.",
        ("`nccl` asked for on a machine without CUDA, with more than one rank.",
         "A backend not compiled into this torch build (a CPU wheel has no `nccl`).",
         "A GPU backend asked for while `CUDA_VISIBLE_DEVICES` hides every device."),
        ("Ask for `auto`: `nccl` when GPUs are visible, `gloo` otherwise.",
         "Or install a torch build with the backend, and run on machines that have its devices."),
    ),
    Entry(
        "DeviceSelectionError", _E,
        "no device can be chosen for this rank.",
        ("More ranks per node than visible GPUs: local rank 4 on a node that shows 4 devices.",
         "`CUDA_VISIBLE_DEVICES` (or the scheduler's binding) gives each rank no device, or "
         "fewer than the launcher assumed."),
        ("Start at most one rank per visible device on each node "
         "(`torchrun --nproc-per-node` = the number of GPUs).",
         "Or give each rank its device through `CUDA_VISIBLE_DEVICES` and check the job's GPU request."),
    ),
    Entry(
        "RendezvousError", _E,
        "the ranks could not meet at start-up.",
        ("`port_in_use`: `MASTER_PORT` is taken by another program or a previous job still exiting.",
         "`unresolvable` or `unreachable`: `MASTER_ADDR` does not resolve, or a firewall or "
         "wrong interface keeps the ranks from reaching it.",
         "`missing_ranks`: some ranks never started, crashed early, or started much later "
         "than `timeout_minutes` allows.",
         "`duplicate_rank` or `world_size_mismatch`: two jobs share one address and port, or "
         "the ranks were launched with different sizes.",
         "`port_collision`: another job's store answers on a derived port (MPI on one node).",
         "`not_a_store` or `store_lost`: something else answers on the port, or rank 0's "
         "store went away."),
        ("Read `reason` and the message: it names the missing ranks and who joined (rank@host).",
         "Pick a free `MASTER_PORT` (or let the launcher choose one), and check that every "
         "host can reach `MASTER_ADDR`.",
         "If ranks start slowly (large containers, busy file systems), raise `timeout_minutes`.",
         "Check the logs of the missing ranks: they usually failed before reaching the runtime."),
        (("reason", "a machine-readable cause such as `port_in_use` or `missing_ranks` "
                    "(empty when unknown)"),),
    ),
    Entry(
        "MeshConfigError", _E,
        "a `mesh=` spec cannot be built.",
        ("An unknown dimension name (the dims are `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp`).",
         "Sizes whose product is not the world size, or more than one `-1`.",
         "With `mesh_strict=True`: a `tp` or `cp` group that spans nodes."),
        ("Make the sizes multiply to the world size, or use `-1` for one dim to take the rest.",
         "Put the fastest-communicating dims (`tp`, `cp`) within a node, or drop `mesh_strict`.",
         "The error is raised on every rank before any process group exists: nothing to clean up."),
    ),
    Entry(
        "MeshMismatchError", _E,
        "ranks asked for different meshes.",
        ("The mesh is computed from something that differs per rank (an environment variable, "
         "a per-host config file, the number of local GPUs).",
         "Ranks from two different versions of the training script joined one job."),
        ("Compute `mesh=` from values every rank shares (the world size, a config file on "
         "shared storage).",
         "The message lists which ranks asked for which mesh; fix the odd ones."),
        (("reason", "always `mesh_mismatch`"),),
    ),
    Entry(
        "GroupMismatchError", _E,
        "a live process group contradicts what this runtime was asked for.",
        ("A process group was created earlier (by an outer runtime, a framework, or "
         "`init_process_group` by hand) with another backend, rank or world size.",
         "An inner runtime asks for `mesh=` while the outer one has none, or another one."),
        ("Ask for `auto` or for the live group's backend and mesh, or leave them out in the "
         "inner runtime: it shares the outer one.",
         "Or destroy the existing group first (leave the outer runtime)."),
    ),
    Entry(
        "PeerFailureError", _E,
        "another rank failed, and this rank stopped because of it.",
        ("The root cause is on another rank: an exception in its code, an out-of-memory kill, "
         "a crash, or a hang.",
         "This error is the consequence, raised on every healthy rank so that none waits forever."),
        ("Find the rank named in the message (`failed_ranks`) and read its log: with "
         "`root_reported` true it logged the original exception.",
         "Under torchrun the summary names the first failure; fix that one."),
        (("failed_ranks", "the failed (or silent) ranks, with what is known of each"),
         ("root_reported", "true when the failed rank reported its own exception")),
    ),
    Entry(
        "HangError", _E,
        "the job stopped making progress: a rank waited in a collective longer than "
        "`hang_timeout_s` while a peer had not arrived.",
        ("A rank is busy elsewhere: a slow data loader, a checkpoint write, a rank-dependent "
         "branch that skips a collective.",
         "A desync: ranks called different collectives, or the same one with different shapes.",
         "A rank is stopped (SIGSTOP, a debugger), stuck in native code, or gone."),
        ("Read the table: the culprit rank comes first with the file:line where it stands and "
         "the first collective at which ranks disagree.",
         "Make every rank call the same collectives in the same order; move rank-0-only work "
         "out of the collective sequence or give it a barrier.",
         "If the work is slow but legitimate, raise `hang_timeout_s` (or "
         "`DISTRUNTIME_HANG_TIMEOUT_S`).",
         "For a job that is still running: `distruntime where HOST:PORT` prints the same table."),
        (("report", "the hang verdict behind the message (per-rank state, progress, desync)"),),
    ),
    Entry(
        "SignalExit", _E,
        "SIGTERM arrived inside an active runtime; the block unwinds so that teardown runs.",
        ("The launcher stopped the job: torchrun after another worker failed, SLURM preemption "
         "or time limit, `scancel`, a container shutdown.",),
        ("Nothing to fix when the stop was intended: the exit code is 143 (128 + SIGTERM).",
         "To stop at a step boundary and save a checkpoint instead, use `graceful_stop=True` "
         "and call `distruntime.should_stop()` once per step.",
         "Do not catch `SystemExit` in training code, or re-raise it."),
        (("signum", "the signal number (15 for SIGTERM)"),),
    ),
    Entry(
        "UnevenStopCallsError", _E,
        "ranks called `distruntime.should_stop()` a different number of times.",
        ("`should_stop()` is called conditionally (inside `if rank == 0`, or in a loop whose "
         "length differs per rank).",
         "One rank left the loop early (an exception, a `break`) while others kept calling."),
        ("Call `distruntime.should_stop()` exactly once per step on every rank, unconditionally.",
         "Make every rank run the same number of steps."),
        (("calls", "the number of calls per rank, as far as known"),),
    ),
    Entry(
        "PytestCompatError", "distruntime.testing._pytest_compat",
        "the installed pytest lacks an internal the distruntime plugin relies on.",
        ("A pytest release newer (or older) than the plugin supports.",),
        ("Install a supported pytest (the message names the range and the tested releases).",
         "Or report it to distruntime with the pytest version."),
    ),
    Entry(
        "PoolStartError", "distruntime.testing._controller",
        "the pytest plugin could not start its pool of rank processes.",
        ("The process that imports torch once and forks the ranks failed: a broken torch "
         "install, an import error in a `conftest.py`, no memory left.",
         "A rank exited during start-up (its log tail is in the message)."),
        ("Read the log tail in the message; run `python -c 'import torch'` in the same environment.",
         "Retry with `--drt-fresh` to rule out pooling; the plugin stops retrying a world "
         "size after repeated failures."),
    ),
    Entry(
        "WhereError", "distruntime.cli.where",
        "`distruntime where` could not look at the job.",
        ("No address: neither `HOST:PORT` nor `MASTER_ADDR`/`MASTER_PORT` was given.",
         "Nothing listens at the address: the job has ended, or the port is wrong.",
         "Something else answers on the port (not a rendezvous store)."),
        ("Pass the job's `MASTER_ADDR:MASTER_PORT`, e.g. `distruntime where node1:29500`.",
         "Check that the job is still running and that this host can reach rank 0's host."),
    ),
    Entry(
        "MalformedRecord", "distruntime.control.snapshot",
        "a store record is not what distruntime writes.",
        ("The store is shared and unauthenticated: another program, or another version of "
         "distruntime, wrote under the job's keys.",),
        ("Use one distruntime version for the whole job, and a store (port) of the job's own.",),
        (("key", "the store key at fault"),),
    ),
)}


def lookup(name: str) -> Entry | None:
    """The entry of an exception class name (case-insensitive; a dotted path is accepted).

    Example:
        >>> lookup("distruntime.HangError").name, lookup("hangerror").name, lookup("Nope")
        ('HangError', 'HangError', None)
    """
    short = name.strip().rsplit(".", 1)[-1].lower()
    return next((entry for key, entry in ENTRIES.items() if key.lower() == short), None)


def explain(name: str) -> str:
    """The troubleshooting text of an exception class, as ``distruntime explain NAME`` prints it.

    Raises:
        KeyError: no such exception class; the message lists the known names.

    Example:
        >>> "Fix:" in explain("RendezvousError")
        True
    """
    entry = lookup(name)
    if entry is None:
        raise KeyError(f"no troubleshooting entry for {name!r}; known: {', '.join(sorted(ENTRIES))}")
    return entry.format()
