"""``distruntime explain NAME``: what an error means, its usual causes and the fix, offline.

The text is :mod:`distruntime.troubleshooting`'s, the same as the documentation's
troubleshooting page.
"""

from __future__ import annotations

import sys

__all__ = ["run_explain"]


def run_explain(name: str | None) -> int:
    """Print the entry of the exception class ``name`` (every class name without one).

    Returns 0, or 1 for an unknown name (the known names go to stderr).

    Example::

        run_explain("HangError")   # prints "HangError: the job stopped making progress ..."
        run_explain(None)          # prints every name with its one-line meaning
    """
    from distruntime.troubleshooting import ENTRIES, lookup

    if name is None:
        width = max(map(len, ENTRIES))
        for key in sorted(ENTRIES):
            sys.stdout.write(f"{key:<{width}}  {ENTRIES[key].meaning}\n")
        return 0
    entry = lookup(name)
    if entry is None:
        sys.stderr.write(f"distruntime explain: no entry for {name!r}. Known: {', '.join(sorted(ENTRIES))}\n")
        return 1
    sys.stdout.write(entry.format())
    return 0
