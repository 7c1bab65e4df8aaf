"""Each family sees the same numbers when it trains and when it predicts.

Training reads images normalised by the data pipeline (the targets cache for the nuclei
families, ``labeled_stacks`` for the Prob-UNet); inference normalises raw images itself. Both
go through :mod:`microseg.data.transforms`; these tests pin that the two paths agree exactly,
the bug a second copy of the normalisation would bring back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from microseg.data.manifest import write_manifest
from microseg.data.patches import DEFAULT_PERCENTILES, labeled_stacks
from microseg.data.targets import load_targets, match_channels, prepare_targets
from microseg.data.transforms import intensity_range
from microseg.io.d3set import D3Set, meta_row
from microseg.io.tiff import write_stack
from microseg.models.maskrcnn.predict import prepare_image
from microseg.models.punet import ProbUNet
from microseg.models.punet.predict import predict_stack_punet
from microseg.models.unet.predict import prepare_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory: pytest.TempPathFactory):
    """A grey uint16 image and an RGB uint8 image, raw and through the targets cache."""
    root = tmp_path_factory.mktemp("nuclei")
    rng = np.random.default_rng(0)
    raw = {
        "grey": rng.gamma(2.0, 300.0, (40, 48)).astype(np.uint16),
        "rgb": rng.integers(0, 256, (40, 48, 3)).astype(np.uint8),
    }
    rows = []
    for sid, image in raw.items():
        labels = np.zeros(image.shape[:2], np.uint16)
        labels[10:20, 10:20] = 1
        write_stack(root / "prepared" / "images" / f"{sid}.tif", image)
        write_stack(root / "prepared" / "labels" / f"{sid}.tif", labels)
        rows.append(
            {
                "sample_id": sid,
                "split": "train",
                "task": "nuclei",
                "image_path": f"images/{sid}.tif",
                "label_path": f"labels/{sid}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, root / "prepared")
    prepare_targets(root / "prepared", root / "targets", progress=False)
    cached = {s.sample_id: s.image for s in load_targets(root / "targets")}
    return raw, cached


@pytest.mark.parametrize("sid", ["grey", "rgb"])
def test_unet_and_maskrcnn_predict_on_what_they_trained_on(nuclei, sid):
    raw, cached = nuclei
    trained = match_channels(cached[sid], 3)  # what both trainers feed the network
    np.testing.assert_array_equal(prepare_input(raw[sid], 3), trained)
    mask_rcnn = prepare_image(raw[sid], normalised=False, percentiles=(1.0, 99.0)).numpy()
    np.testing.assert_array_equal(mask_rcnn, trained)
    assert trained.min() >= 0.0 and trained.max() <= 1.0


def test_punet_predicts_with_the_intensity_range_it_trained_with():
    rng = np.random.default_rng(1)
    stack = rng.gamma(2.0, 200.0, (24, 32, 32)).astype(np.uint16)  # deeper than 16 planes
    mask = np.zeros(stack.shape, bool)
    d3 = D3Set(
        {"x0": stack}, {"x0": mask}, {"x0": mask}, pd.DataFrame([meta_row(stack.shape, 0.094, 0.5)])
    )
    trained = labeled_stacks(d3)[0].image
    lo, hi = intensity_range(stack, DEFAULT_PERCENTILES)
    torch.manual_seed(0)
    net = ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2)
    out = predict_stack_punet(net.eval(), stack, n_samples=1, batch_planes=24, device="cpu")
    assert out["intensity"] == pytest.approx((lo, hi), rel=0, abs=0)
    np.testing.assert_allclose(trained, (stack - lo) / (hi - lo), rtol=1e-5, atol=1e-6)  # unclipped
