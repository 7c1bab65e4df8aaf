"""The ConvLSTM cell and the LSTM-UNet: shapes, memory, causality, model files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models.lstmunet import (
    ConvLSTMCell,
    LstmUnet,
    LstmUnetConfig,
    load_lstmunet,
    save_lstmunet,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = LstmUnetConfig(features=(4, 8, 16), norm="instance")


def eval_net(cfg: LstmUnetConfig, seed: int) -> LstmUnet:
    """A random network in eval mode (batch norm with running statistics of a few batches)."""
    torch.manual_seed(seed)
    net = LstmUnet(cfg)
    for _ in range(3):
        net(torch.randn(2, 2, cfg.in_channels, 16, 16))
    return net.eval()


def test_cell_shapes_and_forget_bias() -> None:
    cell = ConvLSTMCell(2, 5)
    x = torch.randn(3, 4, 2, 16, 12)
    hs, (h, c) = cell.run(x)
    assert hs.shape == (3, 4, 5, 16, 12)
    assert h.shape == c.shape == (3, 5, 16, 12)
    assert torch.equal(hs[:, -1], h)
    assert torch.all(cell.gates.bias[5:10] == 1.0) and torch.all(cell.gates.bias[:5] == 0.0)


def test_cell_rejects_even_kernels() -> None:
    with pytest.raises(ConfigError, match="odd"):
        ConvLSTMCell(1, 4, kernel_size=2)


def test_cell_learns_a_task_only_memory_solves() -> None:
    """The sign shown in frame 0 must be reported at frame 2, after two blank frames: any
    function of the current frame alone is at chance (the blank frames are identical)."""
    torch.manual_seed(0)
    cell, head = ConvLSTMCell(1, 4), torch.nn.Conv2d(4, 1, 1)
    opt = torch.optim.Adam([*cell.parameters(), *head.parameters()], lr=0.05)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        sign = torch.randint(0, 2, (n,)).float()
        x = torch.zeros(n, 3, 1, 6, 6)
        x[:, 0] = (2 * sign - 1)[:, None, None, None]
        return x, sign[:, None, None, None].expand(n, 1, 6, 6)

    for _ in range(150):
        x, y = batch(16)
        hs, _ = cell.run(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(hs[:, -1]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(64)
    with torch.no_grad():
        pred = head(cell.run(x)[0][:, -1]) > 0
    assert (pred == (y > 0.5)).float().mean() > 0.98
    # the blank frames alone carry nothing: the same input without frame 0 gives one answer
    with torch.no_grad():
        blank = head(cell.run(torch.zeros(2, 2, 1, 6, 6))[0][:, -1])
    assert torch.allclose(blank[0], blank[1])


def test_network_shapes_and_state() -> None:
    net = LstmUnet(TINY).eval()
    logits, state = net(torch.randn(2, 3, 1, 16, 24))
    assert logits.shape == (2, 3, 3, 16, 24)
    assert [tuple(h.shape) for h, _ in state] == [(2, 4, 16, 24), (2, 8, 8, 12), (2, 16, 4, 6)]


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_network_is_causal_and_remembers(norm: str) -> None:
    """Frame t's output changes with frame t-1 (memory) and never with frame t+1."""
    net = eval_net(LstmUnetConfig(features=(8, 16), norm=norm), 1)
    x = torch.randn(1, 3, 1, 16, 16)
    later, earlier = x.clone(), x.clone()
    later[:, 2] += 3 * torch.randn(1, 1, 16, 16)
    earlier[:, 0] += 3 * torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        base, moved_later, moved_earlier = (net(v)[0] for v in (x, later, earlier))
    assert torch.equal(base[:, :2], moved_later[:, :2])
    assert (base[:, 1] - moved_earlier[:, 1]).abs().max() > 1e-4


def test_frame_by_frame_equals_whole_sequence() -> None:
    net = eval_net(LstmUnetConfig(features=(4, 8, 16)), 2)
    x = torch.randn(2, 4, 1, 16, 16)
    with torch.no_grad():
        whole, _ = net(x)
        state, steps = None, []
        for t in range(4):
            out, state = net(x[:, t : t + 1], state)
            steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole)


def test_network_rejects_bad_inputs() -> None:
    net = LstmUnet(TINY)
    with pytest.raises(DataFormatError, match="B, T, C, H, W"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(DataFormatError, match="multiples of 4"):
        net(torch.randn(1, 1, 1, 18, 16))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"features": [8]}, "features"),
        ({"in_channels": 2}, "in_channels"),
        ({"norm": "layer"}, "norm"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"depth": 3}, "unknown"),
    ],
)
def test_config_checks(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LstmUnetConfig.from_mapping(values)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_save_load_round_trip(tmp_path: Path, norm: str) -> None:
    torch.manual_seed(3)
    net = LstmUnet(LstmUnetConfig(features=(4, 8), in_channels=3, norm=norm))
    net.train()
    net(torch.randn(2, 2, 3, 8, 8))  # moves batch-norm running statistics
    net.eval()
    post = PostprocessConfig(t_seed=0.6, min_size=5)
    path = save_lstmunet(net, tmp_path / "m.pt", post, {"epoch": 3})
    loaded, loaded_post = load_lstmunet(path)
    assert loaded_post == post and loaded.config == net.config and not loaded.training
    x = torch.randn(1, 3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], net(x)[0])


def test_load_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        load_lstmunet(tmp_path / "none.pt")
    torch.save({"format": "microseg.unet/1", "model": {}}, tmp_path / "unet.pt")
    with pytest.raises(DataFormatError, match=r"microseg\.lstmunet/1"):
        load_lstmunet(tmp_path / "unet.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataFormatError, match="readable"):
        load_lstmunet(tmp_path / "junk.pt")
