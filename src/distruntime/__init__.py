"""distruntime: start, run and stop a PyTorch distributed job correctly under every launcher.

Example:
    >>> from distruntime import DistributedRuntime
    >>> with DistributedRuntime("gloo") as info:
    ...     info.rank, info.world_size, str(info.device)
    (0, 1, 'cpu')
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distruntime.errors import (
    BackendUnavailableError,
    DeviceSelectionError,
    DistRuntimeError,
    GroupMismatchError,
    HangError,
    LaunchEnvError,
    MeshConfigError,
    MeshMismatchError,
    PeerFailureError,
    RendezvousError,
    SignalExit,
    UnevenStopCallsError,
)
from distruntime.launchers import LaunchEnv, discover

if TYPE_CHECKING:
    from distruntime.control.stop import StopReason, request_stop, should_stop, stop_reason
    from distruntime.info import DistInfo
    from distruntime.init_utils import (
        destroy_global_state,
        get_local_rank_preinit,
        get_local_world_size_preinit,
        get_rank_safe,
        get_world_size_safe,
        initialize_distributed,
    )
    from distruntime.runtime import DistributedRuntime, current, is_active, on_teardown, remove_teardown

# Names that need torch are imported on first use, so that merely installing the
# package (whose pytest plugin pytest loads in every session) costs no torch import.
_LAZY = {
    "DistInfo": "distruntime.info",
    "destroy_global_state": "distruntime.init_utils",
    "get_local_rank_preinit": "distruntime.init_utils",
    "get_local_world_size_preinit": "distruntime.init_utils",
    "get_rank_safe": "distruntime.init_utils",
    "get_world_size_safe": "distruntime.init_utils",
    "initialize_distributed": "distruntime.init_utils",
    "DistributedRuntime": "distruntime.runtime",
    "current": "distruntime.registry",
    "is_active": "distruntime.registry",
    "StopReason": "distruntime.control.stop",
    "request_stop": "distruntime.control.stop",
    "should_stop": "distruntime.control.stop",
    "stop_reason": "distruntime.control.stop",
    "on_teardown": "distruntime.runtime",
    "remove_teardown": "distruntime.runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distruntime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DeviceSelectionError",
    "DistInfo",
    "DistRuntimeError",
    "DistributedRuntime",
    "GroupMismatchError",
    "HangError",
    "LaunchEnv",
    "LaunchEnvError",
    "MeshConfigError",
    "MeshMismatchError",
    "PeerFailureError",
    "RendezvousError",
    "SignalExit",
    "StopReason",
    "UnevenStopCallsError",
    "__version__",
    "current",
    "destroy_global_state",
    "discover",
    "get_local_rank_preinit",
    "get_local_world_size_preinit",
    "get_rank_safe",
    "get_world_size_safe",
    "initialize_distributed",
    "is_active",
    "request_stop",
    "should_stop",
    "stop_reason",
    "on_teardown",
    "remove_teardown",
]
