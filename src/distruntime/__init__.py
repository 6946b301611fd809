"""distruntime: start, run and stop a PyTorch distributed job correctly under every launcher.

Example:
    >>> from distruntime import DistributedRuntime
    >>> with DistributedRuntime("gloo") as info:
    ...     info.rank, info.world_size, str(info.device)
    (0, 1, 'cpu')
"""

from __future__ import annotations

from distruntime.errors import (
    BackendUnavailableError,
    DeviceSelectionError,
    DistRuntimeError,
    GroupMismatchError,
    LaunchEnvError,
    PeerFailureError,
    RendezvousError,
    SignalExit,
)
from distruntime.info import DistInfo
from distruntime.init_utils import (
    destroy_global_state,
    get_local_rank_preinit,
    get_rank_safe,
    get_world_size_safe,
    initialize_distributed,
)
from distruntime.launchers import LaunchEnv, discover
from distruntime.runtime import DistributedRuntime, current, is_active

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DeviceSelectionError",
    "DistInfo",
    "DistRuntimeError",
    "DistributedRuntime",
    "GroupMismatchError",
    "LaunchEnv",
    "LaunchEnvError",
    "PeerFailureError",
    "RendezvousError",
    "SignalExit",
    "__version__",
    "current",
    "destroy_global_state",
    "discover",
    "get_local_rank_preinit",
    "get_rank_safe",
    "get_world_size_safe",
    "initialize_distributed",
    "is_active",
]
