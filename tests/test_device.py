"""Backend and device choice (pure parts; CUDA paths are checked with device counts)."""

from __future__ import annotations

import logging

import pytest
import torch

from distruntime.device import BackendChoice, choose_backend, device_index, select_device
from distruntime.errors import BackendUnavailableError, DeviceSelectionError


def test_auto_on_cpu_is_gloo() -> None:
    assert choose_backend("auto", 4) == BackendChoice("gloo", "cpu")
    assert choose_backend(None, 1) == BackendChoice("gloo", "cpu")


def test_gloo_is_cpu() -> None:
    assert choose_backend("gloo", 2) == BackendChoice("gloo", "cpu")


def test_nccl_without_cuda_single_process_falls_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="distruntime"):
        choice = choose_backend("nccl", 1)
    assert choice == BackendChoice("gloo", "cpu", fell_back=True)
    assert "using 'gloo'" in caplog.text


def test_nccl_without_cuda_multi_rank_is_an_error() -> None:
    with pytest.raises(BackendUnavailableError, match=r"'nccl' needs cuda.*4 ranks"):
        choose_backend("nccl", 4)


def test_composite_backend_without_cuda() -> None:
    assert choose_backend("cpu:gloo,cuda:nccl", 1).backend == "gloo"
    with pytest.raises(BackendUnavailableError):
        choose_backend("cpu:gloo,cuda:nccl", 2)


def test_backend_not_built_in() -> None:
    with pytest.raises(BackendUnavailableError, match="'mpi' is not compiled into this torch build"):
        choose_backend("mpi", 2)


@pytest.mark.parametrize(("local_rank", "count", "index"), [(0, 1, 0), (3, 1, 0), (3, 8, 3), (0, 8, 0)])
def test_device_index(local_rank: int, count: int, index: int) -> None:
    assert device_index(local_rank, count) == index


def test_local_rank_beyond_devices_mentions_masking() -> None:
    with pytest.raises(DeviceSelectionError, match=r"local rank 4 .* sees 2 devices .*CUDA_VISIBLE_DEVICES"):
        device_index(4, 2)


def test_no_device_visible() -> None:
    with pytest.raises(DeviceSelectionError, match="no cuda device is visible"):
        device_index(0, 0)


def test_cpu_device_is_a_torch_device() -> None:
    assert select_device("cpu", 3) == torch.device("cpu")
