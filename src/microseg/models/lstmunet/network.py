"""The LSTM-UNet (Arbelle & Raviv, ISBI 2019): a 2D U-Net whose encoder levels carry ConvLSTMs.

Every encoder level is a :class:`ConvLSTMCell` followed by two 3x3 convolutions (norm +
activation), then a 2x max-pool to the next level; the decoder is a plain U-Net decoder
(transposed-conv upsampling, concatenated skip, two convolutions) applied to every frame
alone, ending in ``out_channels`` (3: background / interior / boundary) logits per frame, so
the U-Net family's targets and watershed post-processing serve it unchanged. The skips are
the encoder's post-LSTM features: the segmentation of frame ``t`` sees frames ``0..t``
through the cells' states, and never a later frame.

:meth:`LstmUnet.forward` takes ``(B, T, C, H, W)`` and the state the previous call returned
(None: zeros), so a sequence can be segmented in one call or frame by frame with the same
result. Each level's LSTM runs over time step by step; its convolutions run on all ``B * T``
frames at once.

Norm: ``batch`` (default, as in the paper) keeps running statistics, so whole frames are
normalised as the training patches were; ``instance`` normalises each frame by itself.

Model files (:func:`save_lstmunet`): ``{"format": "microseg.lstmunet/1", "model_config",
"post", "model"}``, read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.blocks import Convolution
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.utils.atomic import write_torch
from microseg.utils.fields import known_fields
from microseg.utils.torchfiles import read_torch

MODEL_FORMAT = "microseg.lstmunet/1"

#: one ``(h, c)`` pair per encoder level
State = list[tuple[torch.Tensor, torch.Tensor]]


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015, without peepholes): the four gates are one
    ``k x k`` convolution of ``[x_t, h_{t-1}]``; ``c_t = f * c_{t-1} + i * tanh(g)``,
    ``h_t = o * tanh(c_t)``. The forget gate's bias starts at 1 (remember by default)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"ConvLSTM kernel_size must be odd and >= 1; found {kernel_size}")
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(
            in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding="same"
        )
        with torch.no_grad():
            self.gates.bias.zero_()
            self.gates.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def zero_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        z = x.new_zeros((b, self.hidden_channels, h, w))
        return z, z

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step: ``x`` ``(B, C, H, W)`` -> the new ``(h, c)``."""
        h, c = self.zero_state(x) if state is None else state
        i, f, o, g = self.gates(torch.cat([x, h.to(x.dtype)], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def run(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A sequence ``(B, T, C, H, W)`` -> hidden states ``(B, T, hidden, H, W)``, last state."""
        hs = []
        for t in range(x.shape[1]):
            state = self(x[:, t], state)
            hs.append(state[0])
        assert state is not None
        return torch.stack(hs, dim=1), state


@dataclass(frozen=True)
class LstmUnetConfig:
    """Which LSTM-UNet to build: widths per level (inputs must be a multiple of
    ``2 ** (len(features) - 1)``), input channels (1: grey frames), ConvLSTM kernel, norm."""

    #: (8, 16, 32, 64): 0.44 M parameters; on the synthetic tracking demo (16, 32, 64, 128)
    #: took 3x the training time for the same CTC scores
    features: tuple[int, ...] = (8, 16, 32, 64)
    in_channels: int = 1
    out_channels: int = 3
    kernel_size: int = 3
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        if len(self.features) < 2 or min(self.features) < 1:
            raise ConfigError(f"lstmunet features must be >= 2 positive widths; {self.features}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"lstmunet in_channels must be 1 or 3; found {self.in_channels}")
        if self.norm not in ("batch", "instance"):
            raise ConfigError(f"lstmunet norm must be 'batch' or 'instance'; found {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lstmunet dropout must be in [0, 1); found {self.dropout}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"lstmunet kernel_size must be odd; found {self.kernel_size}")

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.features) - 1)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LstmUnetConfig:
        return cls(**known_fields(cls, values, "lstmunet model"))

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _conv(cfg: LstmUnetConfig, c_in: int, c_out: int) -> Convolution:
    norm: Any = ("batch", {}) if cfg.norm == "batch" else ("instance", {"affine": True})
    return Convolution(
        2, c_in, c_out, kernel_size=3, act="relu", norm=norm, dropout=cfg.dropout or None
    )


def _block(cfg: LstmUnetConfig, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv(cfg, c_in, c_out), _conv(cfg, c_out, c_out))


def _frames(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-image module to every frame of ``(B, T, C, H, W)``."""
    b, t = x.shape[:2]
    y = fn(x.flatten(0, 1))
    return y.view(b, t, *y.shape[1:])


class LstmUnet(nn.Module):
    """ConvLSTM encoder + per-frame decoder (see the module docstring)."""

    def __init__(self, cfg: LstmUnetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or LstmUnetConfig()
        f = cfg.features
        ins = (cfg.in_channels, *f[:-1])
        self.lstms = nn.ModuleList(
            ConvLSTMCell(c_in, c, cfg.kernel_size) for c_in, c in zip(ins, f, strict=True)
        )
        self.encoders = nn.ModuleList(_block(cfg, c, c) for c in f)
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(f[i + 1], f[i], kernel_size=2, stride=2) for i in range(len(f) - 1)
        )
        self.decoders = nn.ModuleList(_block(cfg, 2 * f[i], f[i]) for i in range(len(f) - 1))
        self.head = nn.Conv2d(f[0], cfg.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``(B, T, C, H, W)`` frames (and the state after the frames before them) ->
        ``(B, T, out_channels, H, W)`` logits and the state after the last frame."""
        if x.ndim != 5:
            raise DataFormatError(f"LstmUnet expects (B, T, C, H, W); found {tuple(x.shape)}")
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise DataFormatError(f"LstmUnet input H and W must be multiples of {m}: {x.shape}")
        skips, new_state = [], []
        for level, (lstm, enc) in enumerate(zip(self.lstms, self.encoders, strict=True)):
            if level:
                x = _frames(self.pool, x)
            h, s = lstm.run(x, None if state is None else state[level])
            new_state.append(s)
            x = _frames(enc, h)
            skips.append(x)
        y = x
        for level in reversed(range(len(self.ups))):
            up = _frames(self.ups[level], y)
            y = _frames(self.decoders[level], torch.cat([up, skips[level]], dim=2))
        return _frames(self.head, y), new_state


def build_lstmunet(cfg: LstmUnetConfig | None = None) -> LstmUnet:
    return LstmUnet(cfg)


# -- save / load ------------------------------------------------------------------------------
def save_lstmunet(
    model: LstmUnet,
    path: str | Path,
    post: PostprocessConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Weights + model config (+ post-processing) in one file, written atomically."""
    payload = {
        "format": MODEL_FORMAT,
        "model_config": model.config.as_dict(),
        "post": asdict(post or PostprocessConfig()),
        "model": model.state_dict(),
        **dict(extra or {}),
    }
    write_torch(path, payload)
    return Path(path)


def load_lstmunet(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[LstmUnet, PostprocessConfig]:
    """A network (eval mode) and its post-processing from :func:`save_lstmunet`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected an lstmunet model file (.pt), found nothing", path)
    ckpt = read_torch(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataFormatError(f"expected a {MODEL_FORMAT} file; found {found!r}", path)
    model = LstmUnet(LstmUnetConfig.from_mapping(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, PostprocessConfig.from_mapping(ckpt.get("post") or {})
