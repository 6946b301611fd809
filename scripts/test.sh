#!/usr/bin/env bash
# The test suite: unit tests, real multi-process tests, and every real launcher
# (SLURM, Open MPI, MPICH, multi-node torchrun in network namespaces).
# Installs what it needs: the venv (bootstrap.sh) and, as root, the launchers' apt packages.
# Every test is bounded (pytest-timeout, plus per-process deadlines that kill process trees).
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
bash scripts/launchers/install.sh
exec timeout --kill-after=30 2700 python -m pytest "$@"
