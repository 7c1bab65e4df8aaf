"""Fixtures of the sac tests: a toy nuclei targets cache and a TINY random SAM encoder saved
as a local checkpoint (no real SAM weights are ever needed or downloaded)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import prepare_targets
from microseg.io.tiff import write_stack

#: explicit dims of the tiny encoder (``options.vit``): one windowed and one global block
TINY_VIT = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": [1],
    "window_size": 4,
    "out_chans": 32,
    "use_rel_pos": True,
    "mlp_ratio": 4.0,
}


def tiny_encoder(seed: int = 0, **dims) -> torch.nn.Module:
    """segment_anything's own ImageEncoderViT, randomly initialised (position embeddings
    too, so a loaded copy is told apart from a fresh zero-initialised one)."""
    from segment_anything.modeling import ImageEncoderViT

    d = {**TINY_VIT, **dims}
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=d["img_size"],
        patch_size=d["patch_size"],
        embed_dim=d["embed_dim"],
        depth=d["depth"],
        num_heads=d["num_heads"],
        global_attn_indexes=tuple(d["global_attn_indexes"]),
        window_size=d["window_size"],
        out_chans=d["out_chans"],
        use_rel_pos=d["use_rel_pos"],
        mlp_ratio=d["mlp_ratio"],
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    for name, p in enc.named_parameters():
        if "pos" in name:
            torch.nn.init.normal_(p, std=0.02)
    return enc


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tiny encoder saved twice: as a full SAM state dict (``image_encoder.`` keys plus a
    mask-decoder entry to drop) and encoder-only."""
    root = tmp_path_factory.mktemp("sam")
    enc = tiny_encoder()
    state = enc.state_dict()
    full = {f"image_encoder.{k}": v for k, v in state.items()}
    full["mask_decoder.output_upscaling.0.weight"] = torch.ones(4, 4, 2, 2)
    torch.save(full, root / "tiny_sam_full.pth")
    torch.save(state, root / "tiny_sam_encoder.pth")
    return {
        "full": root / "tiny_sam_full.pth",
        "encoder_only": root / "tiny_sam_encoder.pth",
        "state": {k: v.clone() for k, v in state.items()},
    }


def toy_sample(seed: int, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 6):
        labels[disk(rng.uniform(8, shape[0] - 8, 2), rng.uniform(4, 7), shape=shape)] = i
    image = 20 + 160 * (labels > 0) + rng.normal(0, 8, shape)
    return labels, np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def toy_targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        labels, image = toy_sample(i)
        write_stack(root / "prepared" / "images" / f"t{i}.tif", image)
        write_stack(root / "prepared" / "labels" / f"t{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"t{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/t{i}.tif",
                "label_path": f"labels/t{i}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, root / "prepared")
    prepare_targets(root / "prepared", root / "targets", progress=False)
    return root / "targets"


@pytest.fixture()
def tiny_vit() -> dict[str, object]:
    """The tiny encoder's dims as ``options.vit``."""
    return dict(TINY_VIT)


@pytest.fixture()
def make_encoder():
    """:func:`tiny_encoder` for tests that need another random encoder."""
    return tiny_encoder
