"""``python -m distruntime``: the ``distruntime`` command (see :mod:`distruntime.cli`).

Example::

    python -m distruntime env --json
    torchrun --nproc-per-node 2 -m distruntime doctor
"""

from __future__ import annotations

from distruntime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
