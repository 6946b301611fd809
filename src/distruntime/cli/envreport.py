"""``distruntime env``: what this process would get, without initialising anything.

The report is built from an environment mapping (``os.environ`` from the command line),
so it is a pure function apart from the torch/host facts it records. Discovery runs on a
mapping that remembers which variables it read, so the report can list exactly the
variables that decided the launch, whatever the launcher.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from distruntime.cli._format import render_table
from distruntime.errors import DistRuntimeError, LaunchEnvError
from distruntime.launchers import LaunchEnv, discover

__all__ = ["build_env_report", "render_env_report", "tuning_variables"]

# Fields of LaunchEnv shown with their source, in this order.
_FIELDS = (
    "rank", "world_size", "local_rank", "local_world_size", "node_rank", "num_nodes",
    "master_addr", "master_port",
)
# Variables that change how the collectives behave; shown when set.
_TUNING_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "PYTORCH_", "UCC_", "UCX_")
_TUNING_NAMES = (
    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK",
    "CUDA_LAUNCH_BLOCKING", "OMP_NUM_THREADS",
)


class _RecordingEnv(Mapping[str, str]):
    """A read-only view of an env mapping that remembers every name looked up."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.read: list[str] = []

    def __getitem__(self, name: str) -> str:
        if name not in self.read:
            self.read.append(name)
        return self._env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def tuning_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The set variables that tune torch.distributed, NCCL, gloo or device masking.

    Example:
        >>> tuning_variables({"NCCL_DEBUG": "INFO", "HOME": "/root", "TORCH_NCCL_BLOCKING_WAIT": "1"})
        {'NCCL_DEBUG': 'INFO', 'TORCH_NCCL_BLOCKING_WAIT': '1'}
    """
    return {
        name: env[name]
        for name in sorted(env)
        if name.startswith(_TUNING_PREFIXES) or name in _TUNING_NAMES
    }


def _error_record(exc: BaseException) -> dict[str, Any]:
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, LaunchEnvError):
        record["variable"] = exc.variable
        record["value"] = exc.value
    return record


def _launch_record(launch: LaunchEnv) -> dict[str, Any]:
    return {
        "launcher": launch.launcher,
        "reason": launch.reason,
        "fields": {f: {"value": getattr(launch, f), "source": launch.source(f)} for f in _FIELDS},
        "agent_store": launch.agent_store,
        "run_id": launch.run_id,
    }


def _backend_record(requested: str, launch: LaunchEnv | None) -> dict[str, Any]:
    from distruntime.device import choose_backend, select_device

    record: dict[str, Any] = {"requested": requested, "backend": None, "device_type": None,
                              "device": None, "fell_back": False, "error": None}
    world = launch.world_size if launch is not None else 1
    try:
        choice = choose_backend(requested, world, quiet=True)
        record.update(backend=choice.backend, device_type=choice.device_type, fell_back=choice.fell_back)
        if launch is not None:
            record["device"] = str(select_device(choice.device_type, launch.local_rank))
    except DistRuntimeError as exc:
        record["error"] = _error_record(exc)
    return record


def _versions() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from distruntime import __version__

    nccl: str | None = None
    if dist.is_available() and dist.is_nccl_available():
        try:
            raw = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
            nccl = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
        except (AttributeError, RuntimeError):
            nccl = "available (version unknown)"
    available = dist.is_available()
    xccl = getattr(dist, "is_xccl_available", None)
    return {
        "distruntime": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "nccl": nccl,
        # gloo has no version API: it is compiled into torch.
        "gloo": "bundled with torch" if available and dist.is_gloo_available() else None,
        "mpi": bool(available and dist.is_mpi_available()),
        "ucc": bool(available and dist.is_ucc_available()),
        "xccl": bool(available and callable(xccl) and xccl()),
    }


def _host() -> dict[str, Any]:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    count = int(accelerator.device_count()) if accelerator is not None and current is not None else 0
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "accelerator": None if current is None else current.type,
        "device_count": count,
    }


def build_env_report(env: Mapping[str, str], backend: str = "auto") -> dict[str, Any]:
    """Everything ``distruntime env`` shows, as a JSON-ready dict.

    ``ok`` is False when the launch environment (or the backend/device choice) would
    raise; ``error`` then holds the exception's type and message.

    Example:
        >>> report = build_env_report({"RANK": "1", "WORLD_SIZE": "2",
        ...                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
        >>> report["ok"], report["launch"]["launcher"], report["launch"]["fields"]["rank"]
        (True, 'env', {'value': 1, 'source': 'RANK'})
        >>> build_env_report({"RANK": "0"})["error"]["type"]
        'LaunchEnvError'
    """
    recording = _RecordingEnv(env)
    launch: LaunchEnv | None = None
    error: dict[str, Any] | None = None
    try:
        launch = discover(recording)
    except LaunchEnvError as exc:
        error = _error_record(exc)
    backend_record = _backend_record(backend, launch)
    if error is None and backend_record["error"] is not None:
        error = backend_record["error"]
    read_and_set = {n: env[n] for n in recording.read if env.get(n, "").strip()}
    return {
        "ok": error is None,
        "error": error,
        "launch": None if launch is None else _launch_record(launch),
        "backend": backend_record,
        "versions": _versions(),
        "host": _host(),
        "variables": {"launch": read_and_set, "tuning": tuning_variables(env)},
    }


def render_env_report(report: Mapping[str, Any]) -> str:
    """The human-readable form of :func:`build_env_report`'s result.

    Example:
        >>> text = render_env_report(build_env_report({}))
        >>> "launcher" in text and "no launcher variables are set" in text
        True
    """
    out: list[str] = []
    launch = report["launch"]
    error = report["error"]
    rows: list[list[object]] = []
    if launch is not None:
        rows.append(["launcher", launch["launcher"], launch["reason"]])
        for name, field in launch["fields"].items():
            rows.append([name.replace("_", " "), field["value"], field["source"]])
        if launch["agent_store"]:
            rows.append(["store", "torchrun agent's", "TORCHELASTIC_USE_AGENT_STORE"])
    else:
        rows.append(["launcher", "ERROR", "the launch environment is invalid (see below)"])
    out += ["Launch", render_table(["item", "value", "from"], rows, indent="  "), ""]

    b = report["backend"]
    device = b["device"] if b["device"] is not None else "-"
    backend_rows: list[list[object]] = [
        ["backend", b["backend"] or "ERROR", f"requested {b['requested']!r}"
         + (" (fell back: device absent)" if b["fell_back"] else "")],
        ["device", device, "local rank" if b["device"] else "n/a"],
    ]
    out += ["Backend", render_table(["item", "value", "note"], backend_rows, indent="  "), ""]

    v, h = report["versions"], report["host"]
    version_rows = [[k, "no" if val is False else "yes" if val is True else val] for k, val in v.items()]
    out += ["Versions", render_table(["component", "version"], version_rows, indent="  "), ""]
    host_rows = [[k.replace("_", " "), val] for k, val in h.items()]
    out += ["Host", render_table(["item", "value"], host_rows, indent="  "), ""]

    for title, key in (("Launch variables read (set)", "launch"), ("Tuning variables (set)", "tuning")):
        values = report["variables"][key]
        if values:
            out += [title, render_table(["variable", "value"], sorted(values.items()), indent="  "), ""]
        else:
            out += [f"{title}: none", ""]

    if error is not None:
        out += [f"ERROR {error['type']}: {error['message']}", ""]
        out.append("distruntime env: this environment would fail to start (exit status 1)")
    else:
        out.append("distruntime env: OK")
    return "\n".join(out) + "\n"
