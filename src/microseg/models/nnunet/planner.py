"""The nnunet planner: a dataset fingerprint in, ``plans.json`` out (nnU-Net v2's planner, 2D).

Rules, in the order they are applied (``PlannerConfig`` holds every number named here):

1. **Patch side.** Patches are square (the unet family's sampler and sliding window take one
   side): the smaller side of the median training image, capped at ``max_patch``, so a typical
   image fills a patch (nnU-Net also starts from the median shape).
2. **Depth, kernels, strides** for that side (:func:`topology`): one more pooling while the
   feature map stays >= ``min_edge`` px per axis after it, at most ``max_pools``; with a
   known anisotropic pixel spacing an axis is pooled only while its spacing is < 2x the finest
   one, and its kernel is 1 until then (3 otherwise). The side is rounded *down* to a multiple
   of ``2 ** pools`` (nnU-Net pads up; rounding down keeps the patch inside a median image).
3. **Widths**: ``base_features * 2 ** level`` capped at ``max_features``.
4. **Memory** (:func:`memory_per_sample`): the activations MONAI's DynUNet keeps for backward
   (4 tensors of ``features x pixels`` per encoder block, 7 per decoder level: transposed
   conv, concatenation, block), doubled for their gradients, in fp32, plus weights, gradients
   and AdamW's two moments. An estimate, not a measurement (mixed precision needs less).
5. **Shrink** while ``min_batch_size`` patches do not fit ``memory_gb``: the next smaller side
   that is a multiple of its own depth's ``2 ** pools`` (depth is re-planned each time).
6. **Batch size**: as many patches as fit ``memory_gb``, capped so that one batch covers at
   most ``max_dataset_fraction`` of the training pixels (nnU-Net's 5 % overfitting guard), never
   below ``min_batch_size``.
7. **Normalisation** (per image, per channel): intensities ``p_lo..p_hi -> [0, 1]``, clipped,
   with the percentiles the targets cache used (``targets.json``). This is the cache's own
   normalisation, applied by the unet family's predictor from the plan's percentiles, so
   training and prediction cannot differ. nnU-Net would z-score each image (its scheme for
   every non-CT modality); here that would change nothing the network can see: DynUNet's first
   convolution is followed by instance normalisation, which removes any further per-image
   affine rescaling (up to the zero padding at borders), so the only choice left is the
   clipping, which tames hot pixels and debris. **Channels**: if every training image is
   single-channel (fluorescence, brightfield) the network takes 1 channel; if any is colour
   (H&E tissue) it takes 3, each colour channel normalised on its own and greyscale images
   repeated to R = G = B.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.models.nnunet.fingerprint import Fingerprint
from microseg.models.unet.network import UnetConfig
from microseg.utils.atomic import write_text
from microseg.utils.fields import known_fields

#: the unet training knobs a plan decides (a train section may not set them)
PLANNED = ("model", "patch_size", "batch_size")
PLANS_NAME = "plans.json"
PLANS_FORMAT = "microseg.nnunet.plans/1"
GIB = 1024**3
#: what percentile_normalise uses when the fingerprint names no cache percentiles
DEFAULT_PERCENTILES = (1.0, 99.0)
#: MONAI's DynUNet needs at least 3 levels
MIN_POOLS = 2
#: activations kept per block for backward, in units of ``features x pixels`` (see rule 4)
ENCODER_TENSORS, DECODER_TENSORS = 4, 7


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's knobs (nnU-Net's 2D defaults, except the depth cap)."""

    base_features: int = 32
    max_features: int = 512
    max_pools: int = 7
    min_edge: int = 4
    max_patch: int = 2048
    memory_gb: float = 8.0
    min_batch_size: int = 2
    max_dataset_fraction: float = 0.05  # 0: no cap
    #: residual blocks (nnU-Net's ResEnc flavour) in DynUNet
    res_block: bool = False

    def __post_init__(self) -> None:
        checks = {
            "base_features": self.base_features >= 1,
            "max_features": self.max_features >= self.base_features,
            "max_pools": self.max_pools >= MIN_POOLS,
            "min_edge": self.min_edge >= 1,
            "max_patch": self.max_patch >= 2**MIN_POOLS * self.min_edge,
            "memory_gb": self.memory_gb > 0,
            "min_batch_size": self.min_batch_size >= 1,
            "max_dataset_fraction": 0 <= self.max_dataset_fraction <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid nnunet planner config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PlannerConfig:
        return cls(**known_fields(cls, values, "nnunet planner"))


@dataclass(frozen=True)
class Topology:
    """Kernels and strides per level of a DynUNet for one square patch side."""

    kernel_size: tuple[tuple[int, int], ...]
    strides: tuple[tuple[int, int], ...]

    @property
    def pools(self) -> tuple[int, int]:
        """Poolings per axis."""
        return (
            sum(s[0] == 2 for s in self.strides),
            sum(s[1] == 2 for s in self.strides),
        )

    @property
    def multiple(self) -> int:
        """Patch sides must be multiples of this: the unet family's rule for DynUNet (the
        product of each level's largest stride; ``2 ** pools`` when every level pools both
        axes)."""
        return math.prod(max(s) for s in self.strides)

    def bottleneck(self, side: int) -> tuple[int, int]:
        return side // 2 ** self.pools[0], side // 2 ** self.pools[1]


def topology(side: int, spacing: Sequence[float | None], cfg: PlannerConfig) -> Topology:
    """Rule 2: pool while the map stays >= ``min_edge`` px (and the axis is not coarse)."""
    known = [s for s in spacing if s is not None]
    sp = [float(s) for s in spacing] if len(known) == 2 else [1.0, 1.0]
    size = [float(side), float(side)]
    kernel = [3 if sp[a] / min(sp) < 2 else 1 for a in (0, 1)]
    kernels, strides = [tuple(kernel)], [(1, 1)]
    while len(strides) - 1 < cfg.max_pools:
        finest = min(sp)
        axes = [a for a in (0, 1) if size[a] / 2 >= cfg.min_edge and sp[a] / finest < 2]
        if not axes:
            break
        for a in axes:
            size[a] /= 2
            sp[a] *= 2
        kernel = [3 if kernel[a] == 3 or sp[a] / min(sp) < 2 else 1 for a in (0, 1)]
        strides.append(tuple(2 if a in axes else 1 for a in (0, 1)))
        kernels.append(tuple(kernel))
    return Topology(tuple(kernels), tuple(strides))  # type: ignore[arg-type]


def widths(levels: int, cfg: PlannerConfig) -> tuple[int, ...]:
    """Rule 3: base width doubling per level, capped."""
    return tuple(min(cfg.max_features, cfg.base_features * 2**i) for i in range(levels))


def count_parameters(
    features: Sequence[int], topo: Topology, in_channels: int, out_channels: int = 3
) -> int:
    """Weights of MONAI's DynUNet (no residual blocks) for these widths and kernels:
    conv + instance-norm affine per block, transposed convs up, the 1x1 output conv."""
    n = 0
    prev = in_channels
    for f, k in zip(features, topo.kernel_size, strict=True):
        kk = k[0] * k[1]
        n += kk * prev * f + kk * f * f + 4 * f  # two convs (no bias) + two norms
        prev = f
    for lvl in range(len(features) - 1):
        f, up = features[lvl], features[lvl + 1]
        s = topo.strides[lvl + 1]
        k = topo.kernel_size[lvl + 1]  # MONAI's up block takes the kernel of the level below
        kk = k[0] * k[1]
        n += s[0] * s[1] * up * f  # transposed conv (no bias)
        n += kk * 2 * f * f + kk * f * f + 4 * f  # decoder block on the concatenation
    n += features[0] * out_channels + out_channels  # 1x1 output conv with bias
    return n


def memory_per_sample(side: int, features: Sequence[int], topo: Topology) -> float:
    """Rule 4: bytes of activations (and their gradients) one patch costs in training."""
    h = w = float(side)
    values = 0.0
    for lvl, (f, s) in enumerate(zip(features, topo.strides, strict=True)):
        h, w = h / s[0], w / s[1]
        last = lvl == len(features) - 1
        values += (ENCODER_TENSORS + (0 if last else DECODER_TENSORS)) * f * h * w
    return 2 * 4 * values


@dataclass(frozen=True)
class Plan:
    """Everything the planner decided (``plans.json``'s ``plan``)."""

    patch_size: int
    batch_size: int
    features: tuple[int, ...]
    kernel_size: tuple[tuple[int, int], ...]
    strides: tuple[tuple[int, int], ...]
    in_channels: int
    normalisation: dict[str, Any]
    res_block: bool = False
    bottleneck: tuple[int, int] = (0, 0)
    memory_gb: float = 0.0  # estimated training memory at this batch size
    batch_rule: str = "memory"  # what bounded the batch size
    median_shape: tuple[float, float] = (0.0, 0.0)
    spacing: tuple[float | None, float | None] = (None, None)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def levels(self) -> int:
        return len(self.features)

    def unet_config(self, dropout: float = 0.0) -> UnetConfig:
        """The unet family's network config: MONAI DynUNet with the planned topology."""
        return UnetConfig(
            arch="dynunet",
            features=self.features,
            in_channels=self.in_channels,
            dropout=dropout,
            options={
                "kernel_size": [list(k) for k in self.kernel_size],
                "strides": [list(s) for s in self.strides],
                "res_block": self.res_block,
            },
        )

    @property
    def percentiles(self) -> tuple[float, float]:
        lo, hi = self.normalisation["percentiles"]
        return float(lo), float(hi)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        values = dict(known_fields(cls, data, "nnunet plan"))
        for k in ("kernel_size", "strides"):
            values[k] = tuple(tuple(int(i) for i in x) for x in values[k])
        for k in ("features", "notes"):
            values[k] = tuple(values.get(k, ()))
        for k in ("bottleneck", "median_shape", "spacing"):
            if k in values:
                values[k] = tuple(values[k])
        return cls(**values)


def _side_candidates(start: int, spacing: Sequence[float | None], cfg: PlannerConfig):
    """Sides from ``start`` down, each a multiple of its own topology's ``2 ** pools``."""
    side = start
    while side >= 2**MIN_POOLS * cfg.min_edge:
        topo = topology(side, spacing, cfg)
        if max(topo.pools) < MIN_POOLS:
            return
        rounded = side // topo.multiple * topo.multiple
        topo = topology(rounded, spacing, cfg)
        yield rounded, topo
        side = rounded - 1


def plan_experiment(fp: Fingerprint, cfg: PlannerConfig | None = None) -> Plan:
    """The plan for a fingerprint (rules 1-7 of the module docstring)."""
    cfg = cfg or PlannerConfig()
    h, w = fp.median_shape
    spacing = fp.median_spacing
    in_channels = 1 if max(fp.channel_counts) == 1 else 3
    budget = cfg.memory_gb * GIB
    start = min(int(h), int(w), cfg.max_patch)
    if start < 2**MIN_POOLS * cfg.min_edge:
        raise ConfigError(
            f"median image {h}x{w} is too small for a {MIN_POOLS + 1}-level network with "
            f"min_edge={cfg.min_edge}"
        )
    for side, topo in _side_candidates(start, spacing, cfg):
        feats = widths(len(topo.strides), cfg)
        fixed = 4 * 4 * count_parameters(feats, topo, in_channels)
        per_sample = memory_per_sample(side, feats, topo)
        if fixed + cfg.min_batch_size * per_sample <= budget:
            break
    else:
        raise ConfigError(
            f"no patch of >= {2**MIN_POOLS * cfg.min_edge} px fits {cfg.min_batch_size} samples "
            f"into memory_gb={cfg.memory_gb}; raise it or lower base_features"
        )
    by_memory = int((budget - fixed) // per_sample)
    batch, rule = by_memory, "memory"
    if cfg.max_dataset_fraction > 0:
        by_data = round(fp.n_pixels * cfg.max_dataset_fraction / side**2)
        if by_data < batch:
            batch, rule = by_data, "dataset fraction"
    if batch < cfg.min_batch_size:
        batch, rule = cfg.min_batch_size, "minimum"
    notes = []
    if side < start:
        notes.append(f"patch side {start} px shrunk to {side} px to fit memory_gb")
    return Plan(
        patch_size=side,
        batch_size=batch,
        features=feats,
        kernel_size=topo.kernel_size,
        strides=topo.strides,
        in_channels=in_channels,
        normalisation=normalisation(fp),
        res_block=cfg.res_block,
        bottleneck=topo.bottleneck(side),
        memory_gb=round((fixed + batch * per_sample) / GIB, 3),
        batch_rule=rule,
        median_shape=(h, w),
        spacing=spacing,
        notes=tuple(notes),
    )


def normalisation(fp: Fingerprint) -> dict[str, Any]:
    """Rule 7: per-image, per-channel percentile scaling; 1 input channel iff all grey."""
    percentiles = fp.cache_percentiles or DEFAULT_PERCENTILES
    colour = max(fp.channel_counts) > 1
    per_modality: dict[str, list[str]] = {}
    for im in fp.images:
        per_modality.setdefault(im.modality, ["percentile"] * im.channels)
    return {
        "scheme": "percentile",
        "per_image": True,
        "per_channel": True,
        "clip": True,
        "percentiles": [float(p) for p in percentiles],
        "input": "colour" if colour else "grey",
        "grey_images": "repeated to R=G=B" if colour else "as is",
        "schemes": dict(sorted(per_modality.items())),
    }


# -- plans.json -------------------------------------------------------------------------------
def write_plans(path: str | Path, plan: Plan, cfg: PlannerConfig) -> Path:
    """``plans.json``: the plan and the planner config that made it (atomic, NaN-free)."""
    doc = {"format": PLANS_FORMAT, "planner": asdict(cfg), "plan": plan.to_dict()}
    write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return Path(path)


def read_plans(path: str | Path) -> tuple[Plan, PlannerConfig]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("no nnunet plans", path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != PLANS_FORMAT:
            raise DataFormatError(f"expected {PLANS_FORMAT}, found {doc.get('format')!r}", path)
        return Plan.from_dict(doc["plan"]), PlannerConfig.from_mapping(doc["planner"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(f"unreadable plans ({exc})", path) from exc


def describe(plan: Plan) -> str:
    """One line for logs."""
    mem = f"{plan.memory_gb:.2f} GiB"
    return (
        f"patch {plan.patch_size}, batch {plan.batch_size} ({plan.batch_rule}), "
        f"{plan.levels} levels {list(plan.features)}, bottleneck {list(plan.bottleneck)}, "
        f"in_channels {plan.in_channels}, ~{mem}"
    )
