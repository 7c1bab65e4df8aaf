"""The ``yolov8<arch>-p2`` spine detector detects at stride 4 (DeepD3.V2's P2 head for tiny spines).

Built offline from the config alone (random weights, nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch

from microseg.models.yolo import YoloSpineDetector


@pytest.mark.parametrize("arch", ["n", "l"])  # l: the seed's (profiles/yolo_seed.yaml)
def test_p2_model_has_a_stride_4_head(arch: str) -> None:
    torch.manual_seed(0)
    det = YoloSpineDetector.build(arch)
    net = det.yolo.model
    assert [int(s) for s in net.stride] == [4, 8, 16, 32]
    head = net.model[-1]  # Ultralytics' Detect module
    assert head.nl == 4 and [int(s) for s in head.stride] == [4, 8, 16, 32]
    if arch != "n":
        return  # the forward pass below is the same for every width
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 64))
    preds = out[0] if isinstance(out, tuple | list) else out
    # one prediction per cell of every level: (64/4)^2 + (64/8)^2 + (64/16)^2 + (64/32)^2;
    # without the P2 level it would be 84, not 340
    assert preds.shape[-1] == sum((64 // s) ** 2 for s in (4, 8, 16, 32)) == 340
