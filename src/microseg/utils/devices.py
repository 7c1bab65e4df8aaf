"""The one place a device string becomes a device: ``auto | cpu | cuda[:N] | mps``.

``auto`` picks CUDA, then Apple's MPS, then the CPU, so params can say ``device: auto``
everywhere and the CPU demo stays on the CPU of a laptop while a GPU runner uses its GPU.
Training hands the same string to Lightning through :func:`lightning_devices`.
"""

from __future__ import annotations

import re

import torch

from microseg.errors import ConfigError

_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
SPELLINGS = "auto, cpu, cuda, cuda:N or mps"


def check_device(device: str) -> str:
    """``device`` if it is a known spelling, else a ConfigError that lists them."""
    text = str(device).strip().lower()
    if not _PATTERN.match(text):
        raise ConfigError(f"device must be {SPELLINGS}; found {device!r}")
    return text


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A ``torch.device``; asking for a device this machine lacks is a clear error."""
    if isinstance(device, torch.device):
        return device
    text = check_device(device or "auto")
    if text == "auto":
        text = auto_device()
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} asked for, but torch sees no CUDA GPU here")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {text!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    if text == "mps" and not mps_available():
        raise ConfigError("device 'mps' asked for, but torch sees no Apple MPS backend here")
    return torch.device(text)


def lightning_devices(device: str, devices: int | str = 1) -> tuple[str, int | list[int] | str]:
    """Lightning's ``(accelerator, devices)`` for our ``device`` and a device count.

    ``cuda:N`` pins GPU N (one device); ``cuda`` with ``devices: 2`` takes the first two;
    ``cpu`` with ``devices: 2`` runs two processes (DDP on gloo).
    """
    text = check_device(device)
    if text == "auto":
        text = auto_device()
    resolve_device(text)  # the same clear error when the device is missing
    if text.startswith("cuda"):
        if ":" in text:
            return "gpu", [int(text.split(":")[1])]
        return "gpu", devices
    return text, devices


def model_device(model: torch.nn.Module, device: str = "auto") -> torch.device:
    """Where to run ``model``: ``device`` unless ``auto``; with ``auto`` the accelerator its
    weights already sit on (a DDP rank's GPU), else the best this machine has."""
    if check_device(device) != "auto":
        return resolve_device(device)
    try:
        where = next(model.parameters()).device
    except StopIteration:
        where = torch.device("cpu")
    return where if where.type != "cpu" else resolve_device("auto")


def ultralytics_device(device: str | int | None) -> str | int | None:
    """Ultralytics' spelling of our device: ``cuda:N`` -> ``"N"``, ``auto`` -> the best here."""
    if device is None or isinstance(device, int):
        return device
    text = check_device(device)
    if text == "auto":
        text = auto_device()
    resolve_device(text)
    if text.startswith("cuda"):
        return text.split(":")[1] if ":" in text else "0"
    return text
