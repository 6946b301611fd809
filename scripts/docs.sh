#!/usr/bin/env bash
# The documentation site: docs/ -> docs/_build/html (open docs/_build/html/index.html).
#
#   bash scripts/docs.sh [SPHINX ARGS...]
#
# Strict: any warning fails the build (-W), after all of them are listed (--keep-going);
# nitpicky (-n): every cross-reference must resolve. A fresh environment each time (-E):
# the API pages are generated from the code, which Sphinx does not track.
source "$(dirname "$0")/bootstrap.sh"
set +e
cd "$ROOT"
start=$(date +%s.%N)
python -m sphinx -b html -W --keep-going -n -E -q -d docs/_build/doctrees docs docs/_build/html "$@"
rc=$?
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
if [ "$rc" -eq 0 ]; then
    echo "docs.sh: built docs/_build/html in ${took} s, no warnings" >&2
else
    echo "docs.sh: build FAILED (exit $rc) after ${took} s: fix the warnings above" >&2
fi
exit "$rc"
