from __future__ import annotations

import pytest
import torch

from microseg.errors import ConfigError
from microseg.utils import devices


def test_spellings_are_checked():
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps", " CPU "):
        devices.check_device(ok)
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ConfigError, match="auto, cpu, cuda"):
            devices.check_device(bad)


def test_missing_accelerators_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match="no Apple MPS"):
        devices.resolve_device("mps")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.auto_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.auto_device() == "cuda"


def test_lightning_mapping(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert devices.lightning_devices("cuda:2") == ("gpu", [2])
    assert devices.lightning_devices("cuda", 2) == ("gpu", 2)
    assert devices.lightning_devices("auto", "auto") == ("gpu", "auto")
    assert devices.lightning_devices("cpu", 2) == ("cpu", 2)
    with pytest.raises(ConfigError, match="sees 4 GPU"):
        devices.resolve_device("cuda:7")


def test_model_device_follows_the_weights():
    net = torch.nn.Linear(2, 2)
    assert devices.model_device(net, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert devices.model_device(net, "auto") == torch.device("cpu")
