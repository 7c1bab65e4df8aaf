"""Patches of (plane, y, x) windows from DeepD3 stacks, for training per-plane networks.

Each stack is normalised once by its own intensity percentiles (``(x - p_lo) / (p_hi -
p_lo)``, not clipped, so bright spines keep their contrast); inference must use the same
:func:`intensity_range` and :func:`normalize` (both from :mod:`microseg.data.transforms`). A
patch is drawn from a uniformly chosen stack: with probability ``fg_fraction`` it is centred
(with jitter) on a random spine voxel, else its plane and corner are uniform. Augmentation is a
MONAI dictionary-transform chain applied to ``image``, ``spine`` and ``dendrite`` together
(masks resampled nearest).

Everything random is derived from ``(seed, epoch, index)``, so item ``i`` of epoch ``e`` is
the same in every run, with any number of DataLoader workers and in any order; call
:meth:`PatchDataset.set_epoch` before each epoch (with ``num_workers=0`` or non-persistent
workers, so the workers see it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from microseg.data.shapes import ShapesConfig
from microseg.data.transforms import intensity_range, normalize
from microseg.errors import ShapeMismatchError
from microseg.io.d3set import D3Set, read_d3set

log = logging.getLogger(__name__)

DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.8)
KEYS = ("image", "spine", "dendrite")


def context_planes(depth: int, z: int, context: int) -> list[int]:
    """Plane indices ``z - context .. z + context``, clamped at the stack's ends."""
    return [min(max(z + dz, 0), depth - 1) for dz in range(-context, context + 1)]


@dataclass
class LabeledStack:
    """One normalised stack with its masks and the spine voxels to centre patches on."""

    image: np.ndarray  # ZYX float32, normalised
    spine: np.ndarray  # ZYX bool
    dendrite: np.ndarray  # ZYX bool
    spine_voxels: np.ndarray  # (N, 3) int32 z, y, x


def labeled_stacks(
    source: D3Set | str | Path | Sequence[D3Set | str | Path],
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> list[LabeledStack]:
    """Every stack of one or more d3sets (objects or paths), normalised, with spine voxels."""
    sources = [source] if isinstance(source, D3Set | str | Path) else list(source)
    out = []
    for src in sources:
        d3 = src if isinstance(src, D3Set) else read_d3set(src)
        for i in range(len(d3)):
            stack, dendrite, spine = d3.sample(i)
            lo, hi = intensity_range(stack, percentiles)
            out.append(
                LabeledStack(
                    image=normalize(stack, lo, hi),
                    spine=np.asarray(spine, dtype=bool),
                    dendrite=np.asarray(dendrite, dtype=bool),
                    spine_voxels=np.argwhere(spine).astype(np.int32),
                )
            )
    return out


def default_augment(shapes: ShapesConfig | None = None) -> mt.Compose:
    """DeepD3-like augmentation as MONAI dictionary transforms on ``image/spine/dendrite``.

    Flips, 90-degree rotations, a small affine (±10°, ±10 % scale, reflected borders),
    Gaussian noise, intensity scaling and gamma contrast (the last three on the image only).
    With ``shapes`` on (``prob > 0``), random occluders (:mod:`microseg.data.shapes`) are drawn
    on the image (every context plane alike) after the affine and before the noise; the spine
    and dendrite masks never change.
    """
    keys = list(KEYS)
    occlude = shapes.transform("image") if shapes is not None else None
    return mt.Compose(
        [
            mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
            mt.RandRotate90d(keys, prob=0.5, max_k=3),
            mt.RandAffined(
                keys,
                prob=0.5,
                rotate_range=np.deg2rad(10.0),
                scale_range=(0.1, 0.1),
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="reflection",
            ),
            *([occlude] if occlude is not None else []),
            mt.RandGaussianNoised("image", prob=0.5, std=0.05),
            mt.RandScaleIntensityd("image", prob=0.3, factors=0.2),
            mt.RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        ]
    )


def build_augment(augment: bool, shapes: ShapesConfig | None = None) -> mt.Compose | None:
    """The pipeline of a training config: :func:`default_augment` when ``augment``, else the
    occluders alone when ``shapes`` is on (its own knob), else none."""
    if augment:
        return default_augment(shapes)
    occlude = shapes.transform("image") if shapes is not None else None
    return mt.Compose([occlude]) if occlude is not None else None


class PatchDataset(Dataset):
    """Random ``(plane, y, x)`` windows with foreground oversampling, deterministic per seed.

    Items are dicts of float32 tensors: ``image`` ``(2 * context + 1, P, P)`` (planes
    ``z - context .. z + context``), ``spine`` and ``dendrite`` ``(1, P, P)`` in {0, 1}.

    Args:
        source: d3set(s) or paths, or prepared :class:`LabeledStack` objects.
        patch_size: side ``P`` in pixels (stacks must be at least this large in Y and X).
        samples_per_epoch: ``len(dataset)``.
        fg_fraction: share of patches centred on a spine voxel (jittered by up to P/4).
        context: planes on each side stacked as channels (0 = 2D, 1 = 2.5D with 3 planes).
        augment: ``True`` for :func:`default_augment`, ``False``/``None`` for none, or any
            MONAI ``Compose`` over :data:`KEYS`.
        seed: base seed; item ``i`` of epoch ``e`` depends on ``(seed, e, i)`` only.
    """

    def __init__(
        self,
        source: D3Set | str | Path | Sequence[D3Set | str | Path] | Sequence[LabeledStack],
        patch_size: int = 128,
        samples_per_epoch: int = 1024,
        fg_fraction: float = 0.5,
        context: int = 0,
        augment: bool | mt.Compose | None = True,
        seed: int = 0,
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    ) -> None:
        if isinstance(source, Sequence) and source and isinstance(source[0], LabeledStack):
            self.stacks = list(source)  # type: ignore[arg-type]
        else:
            self.stacks = labeled_stacks(source, percentiles)  # type: ignore[arg-type]
        if not self.stacks:
            raise ShapeMismatchError("expected at least one stack to sample patches from")
        for i, s in enumerate(self.stacks):
            if min(s.image.shape[1:]) < patch_size:
                raise ShapeMismatchError(
                    f"stack {i} has shape {s.image.shape}, smaller than patch size {patch_size}"
                )
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.patch_size = int(patch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_fraction = float(fg_fraction)
        self.context = int(context)
        self.seed = int(seed)
        self.epoch = 0
        if augment is True:
            self.augment: mt.Compose | None = default_augment()
        else:
            self.augment = augment or None
        self._with_fg = [i for i, s in enumerate(self.stacks) if len(s.spine_voxels)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def window(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(stack, plane, y0, x0) of one patch."""
        p = self.patch_size
        if self._with_fg and rng.random() < self.fg_fraction:
            k = int(self._with_fg[rng.integers(len(self._with_fg))])
            s = self.stacks[k]
            z, y, x = (int(v) for v in s.spine_voxels[rng.integers(len(s.spine_voxels))])
            jy, jx = rng.integers(-(p // 4), p // 4 + 1, size=2)
            y0, x0 = y + int(jy) - p // 2, x + int(jx) - p // 2
        else:
            k = int(rng.integers(len(self.stacks)))
            s = self.stacks[k]
            z = int(rng.integers(s.image.shape[0]))
            y0 = int(rng.integers(s.image.shape[1] - p + 1))
            x0 = int(rng.integers(s.image.shape[2] - p + 1))
        y0 = min(max(y0, 0), s.image.shape[1] - p)
        x0 = min(max(x0, 0), s.image.shape[2] - p)
        return k, z, y0, x0

    def crop(self, k: int, z: int, y0: int, x0: int) -> dict[str, np.ndarray]:
        s, p = self.stacks[k], self.patch_size
        ys, xs = slice(y0, y0 + p), slice(x0, x0 + p)
        planes = context_planes(s.image.shape[0], z, self.context)
        return {
            "image": s.image[planes, ys, xs].copy(),
            "spine": s.spine[z, ys, xs][None].astype(np.float32),
            "dendrite": s.dendrite[z, ys, xs][None].astype(np.float32),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        item = self.crop(*self.window(rng))
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            item = self.augment(item)
        out = {k: convert_to_tensor(item[k], dtype=torch.float32) for k in KEYS}
        for k in ("spine", "dendrite"):
            out[k] = (out[k] > 0.5).to(torch.float32)
        return out


def iter_planes(
    stacks: Sequence[LabeledStack], context: int = 0, stride: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Whole planes for validation: (image ``(C, Y, X)``, spine ``(Y, X)``, dendrite)."""
    for s in stacks:
        depth = s.image.shape[0]
        for z in range(0, depth, max(1, stride)):
            yield s.image[context_planes(depth, z, context)], s.spine[z], s.dendrite[z]
