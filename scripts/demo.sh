#!/usr/bin/env bash
# The main job: a 4-rank DDP training run on gloo/CPU/localhost under torchrun.
# Bounded: torchrun and its workers are killed after 300 s.
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec timeout --kill-after=10 300 torchrun --nproc-per-node 4 examples/train_ddp.py "$@"
