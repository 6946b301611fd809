"""torchrun's error file: where a rank's fatal error goes so the launcher's summary names it.

The path always comes from this host: the rank's own ``TORCHELASTIC_ERROR_FILE``, or, for a
peer killed for a hang, that process's environment read from ``/proc`` (never a path read
from the store: see ``docs/security.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback

__all__ = ["ENV_VAR", "write_error_file"]

logger = logging.getLogger("distruntime")

ENV_VAR = "TORCHELASTIC_ERROR_FILE"


def write_error_file(exc: BaseException, path: str | None = None) -> None:
    """Write ``exc`` to ``path`` (default: ``TORCHELASTIC_ERROR_FILE``, set by torchrun).

    The JSON schema is torch's own (``ErrorHandler.record_exception``), which torchrun's
    summary reads; written here because torch's takes the traceback from
    ``sys.exc_info()``, the original exception rather than the one given. Never raises.

    Example:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "error.json")
        >>> write_error_file(ValueError("bad batch"), path)
        >>> json.load(open(path))["message"]["message"]
        'ValueError: bad batch'
    """
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    # Whole or not at all: torchrun reads the file as soon as the rank has exited, and a
    # rank ended mid-write (its launcher's SIGTERM) must not leave it empty -- torchrun's
    # summary then fails on the JSON and drops every rank's report (seen under torchrun).
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "w") as handle:
            json.dump(data, handle)
        os.replace(partial, path)
    except OSError as error:  # never hide the job's own exception
        logger.warning("could not write %s=%s: %s", ENV_VAR, path, error)
        with contextlib.suppress(OSError):
            os.remove(partial)
