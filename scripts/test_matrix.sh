#!/usr/bin/env bash
# The test suite on another torch than the pinned one: the declared minimum and the newest.
#
#   bash scripts/test_matrix.sh 2.4.0 [PYTEST ARGS...]
#
# Makes (once) a venv of its own outside the repo, $DISTRUNTIME_MATRIX_DIR/torch-VERSION
# (default ~/.cache/distruntime-matrix), with torch==VERSION from the registry (a CUDA
# build: ~5 GB, a few minutes; it runs on CPU) and distruntime[test] (editable), then runs
# pytest there without the real-launcher tests, which stay on the pinned torch
# (scripts/test.sh). PIP_CONFIG_FILE=/dev/null: a machine-wide pip cap on torch must not
# decide which torch is tested. Bounded like scripts/test.sh.
set -euo pipefail
VERSION=${1:?usage: test_matrix.sh TORCH_VERSION [PYTEST ARGS...]}
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR=${DISTRUNTIME_MATRIX_DIR:-$HOME/.cache/distruntime-matrix}
VENV="$DIR/torch-$VERSION"
PY="${PYTHON:-python3}"
stamp="$VENV/.distruntime-stamp"
# The checkout path too: the venv holds an editable install of this checkout.
want="$VERSION $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16) $ROOT"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "test_matrix: installing torch==$VERSION into $VENV" >&2
    start=$(date +%s)
    mkdir -p "$DIR"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    echo "torch==$VERSION" > "$VENV/constraints.txt"
    PIP_CONFIG_FILE=/dev/null timeout 1800 "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check -c "$VENV/constraints.txt" "torch==$VERSION" -e "$ROOT[test]"
    "$VENV/bin/python" -c "import distruntime, torch; assert torch.__version__.startswith('$VERSION'), torch.__version__"
    echo "$want" > "$stamp"
    echo "test_matrix: installed in $(( $(date +%s) - start ))s" >&2
fi
cd "$ROOT"
"$VENV/bin/python" -c "import platform, pytest, torch; print(f'test_matrix: torch {torch.__version__}, Python {platform.python_version()}, pytest {pytest.__version__}')"
# The venv's console scripts (torchrun) first on PATH, as scripts/bootstrap.sh does for .venv.
export PATH="$VENV/bin:$PATH"
# The fault matrix (tests/test_faults.py: real processes under torchrun, mp.spawn and Open MPI,
# each with a time bound of seconds) stays on the pinned torch with the launcher tests: it
# tests process and launcher behaviour, and the CUDA builds' slower start and exit only add
# flakiness to its bounds (docs/compat.md). tests/test_wrappers.py too: the `wrappers` extra
# (lightning, accelerate) is pinned to what was tested with the pinned torch and is not
# installed here; and the documentation tests (the site build needs the docs extra; the
# examples are checked on the pinned torch). Everything else runs here.
exec timeout --kill-after=30 2700 "$VENV/bin/python" -m pytest -m "not launchers" --ignore=tests/test_faults.py \
    --ignore=tests/test_wrappers.py --ignore=tests/test_docs_site.py --ignore=tests/test_doc_examples.py "$@"
