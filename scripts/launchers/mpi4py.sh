#!/usr/bin/env bash
# mpi4py (what the `distruntime[mpi]` extra installs) into its own folder, NOT the venv:
# the launcher tests put it on PYTHONPATH only for the runs that test the extra, so the
# same venv also proves the error a user without it gets.
#   scripts/launchers/mpi4py.sh [PYTHON]   prints the folder (idempotent, bounded)
# Its binary wheel carries builds for both Open MPI and MPICH ABIs; the Open MPI one is
# chosen at import (libmpi.so.40, the Debian default mpirun).
set -euo pipefail
PY=${1:-python3}
D=${DISTRUNTIME_LAUNCHER_DIR:-/tmp/distruntime-launchers}/mpi4py
VERSION=4.1.2
if [ ! -f "$D/.ok-$VERSION" ]; then
  rm -rf "$D"
  mkdir -p "$D"
  timeout --kill-after=10 600 "$PY" -m pip install --quiet --disable-pip-version-check \
    --target "$D" "mpi4py==$VERSION" >&2
  touch "$D/.ok-$VERSION"
fi
echo "$D"
