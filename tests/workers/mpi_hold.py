"""An MPI rank that enters the runtime, says so, and holds it until told to leave.

    mpiexec -n 2 python mpi_hold.py --out DIR

Writes ``DIR/ready<R>`` (its rendezvous port) once inside, then waits, at most 60 s,
for ``DIR/release``. Used to make two jobs meet on one derived port.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from distruntime import DistributedRuntime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with DistributedRuntime("gloo", timeout_minutes=0.5) as info:
        (args.out / f"ready{info.rank}").write_text(str(info.master_port))
        deadline = time.monotonic() + 60
        while not (args.out / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
