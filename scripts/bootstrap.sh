# Sourced by demo.sh and test.sh: make ./.venv with torch==2.13.0 and distruntime (editable),
# with the test extras: [test] and [wrappers] (lightning, accelerate: tests/test_wrappers.py).
# Idempotent and quick when nothing changed (a stamp keyed on pyproject + constraints).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTRUNTIME_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PY" -m venv "$VENV" || { echo "bootstrap: '$PY -m venv' failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
stamp="$VENV/.distruntime-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing distruntime[test,wrappers,docs] with torch==2.13.0 (constraints.txt)" >&2
    start=$(date +%s)
    # Pinned through constraints.txt: an unpinned torch would pull gigabytes of CUDA wheels
    # (lightning and accelerate ask for torch too: the constraint keeps it at 2.13.0).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$ROOT/constraints.txt" -e "$ROOT[test,wrappers,docs]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
    "$VENV/bin/python" -c "import distruntime, torch; assert torch.__version__.startswith('2.13.0')" \
        || { echo "bootstrap: install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
    echo "bootstrap: done in $(( $(date +%s) - start ))s" >&2
fi
export PATH="$VENV/bin:$PATH"
