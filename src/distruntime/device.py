"""Backend and device choice.

The rules, in order:

* ``"auto"`` (or ``None``) takes the accelerator's backend from torch's own
  ``Backend.default_device_backend_map`` (cuda -> nccl, xpu -> xccl, cpu -> gloo).
* A backend whose device is absent (``nccl`` without CUDA) falls back to ``gloo`` for a
  single process, with a warning, and :class:`~distruntime.DistInfo` says ``gloo``; with
  several ranks it is an error, because the job would not be what the user asked for.
* The device index: one visible device -> 0 (the launcher masked one GPU per task);
  else ``local_rank`` when below the device count; else an error that mentions
  visible-device masking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distruntime.errors import BackendUnavailableError, DeviceSelectionError

__all__ = ["BackendChoice", "choose_backend", "device_index", "select_device"]

logger = logging.getLogger("distruntime")

# The variable that masks each device type, for error messages.
_VISIBLE_DEVICES_VAR = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "xpu": "ZE_AFFINITY_MASK",
    "hpu": "HABANA_VISIBLE_MODULES",
}


@dataclass(frozen=True)
class BackendChoice:
    """The effective backend and the device type its tensors live on."""

    backend: str
    device_type: str
    fell_back: bool = False


def _accelerator_type() -> str:
    """The current accelerator's device type, or ``"cpu"``."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        current = accelerator.current_accelerator()
        # From torch 2.15 this names the build's accelerator even when no device is
        # there (a CUDA build on a CPU machine says cuda): ask the device itself.
        return "cpu" if current is None or not _device_available(current.type) else current.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def _device_type_of(backend: str) -> str:
    """The device a backend string serves: the non-CPU one for ``cpu:gloo,cuda:nccl``."""
    if ":" in backend:
        types = [part.split(":", 1)[0].strip() for part in backend.split(",")]
        return next((t for t in types if t != "cpu"), "cpu")
    served = [d for d, b in dist.Backend.default_device_backend_map.items() if b == backend]
    if "cpu" in served or not served:
        # gloo serves cpu (and mps); an unknown backend (mpi, ucc, custom) gets the
        # accelerator when there is one, else cpu, and torch validates it at init.
        return "cpu" if served or _accelerator_type() == "cpu" else _accelerator_type()
    return served[0]


def choose_backend(requested: str | None, world_size: int, *, quiet: bool = False) -> BackendChoice:
    """Resolve the requested backend to the one that will really run.

    ``quiet`` skips the fallback warning (used when re-checking a live group).

    Example:
        >>> choose_backend("gloo", 4)
        BackendChoice(backend='gloo', device_type='cpu', fell_back=False)
    """
    if requested is None or requested.lower() == "auto":
        device_type = _accelerator_type()
        return BackendChoice(dist.Backend.default_device_backend_map.get(device_type, "gloo"), device_type)
    backend = requested.lower()
    device_type = _device_type_of(backend)
    if _device_available(device_type):
        if ":" not in backend and not dist.is_backend_available(backend):
            raise BackendUnavailableError(
                f"backend {requested!r} is not compiled into this torch build "
                f"({torch.__version__}). Fix: use 'gloo' or 'auto', or install a torch "
                f"build with {requested!r}."
            )
        return BackendChoice(backend, device_type)
    if world_size == 1:
        log = logger.debug if quiet else logger.warning
        log(
            "backend %r needs %s, which is not available; using 'gloo' on cpu for this "
            "single-process run (DistInfo.backend says 'gloo')", requested, device_type,
        )
        return BackendChoice("gloo", "cpu", fell_back=True)
    raise BackendUnavailableError(
        f"backend {requested!r} needs {device_type}, which is not available on this "
        f"machine, and this job has {world_size} ranks. Fix: run on {device_type} machines, "
        "or ask for 'auto' (gloo on CPU) or 'gloo'."
    )


def device_index(local_rank: int, device_count: int, device_type: str = "cuda") -> int:
    """Which device index a rank uses, given how many devices it can see.

    Example:
        >>> device_index(local_rank=3, device_count=1)  # launcher masked one GPU per task
        0
        >>> device_index(local_rank=3, device_count=8)
        3
    """
    if device_count == 1:
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    mask = _VISIBLE_DEVICES_VAR.get(device_type, f"the {device_type} visible-devices variable")
    if device_count == 0:
        raise DeviceSelectionError(
            f"no {device_type} device is visible to this process (local rank {local_rank}). "
            f"Fix: check {mask} and the job's device request."
        )
    raise DeviceSelectionError(
        f"local rank {local_rank} has no {device_type} device: this process sees "
        f"{device_count} devices ({mask} masks which ones). Fix: start at most "
        f"{device_count} ranks per node, or give each rank one device through {mask} "
        "(then every rank uses index 0)."
    )


def select_device(device_type: str, local_rank: int) -> torch.device:
    """The ``torch.device`` for this rank; ``cpu`` for CPU backends."""
    if device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device_type)
    return torch.device(device_type, device_index(local_rank, int(module.device_count()), device_type))
