"""Staged schedules: a tiny unet-family run of three phases switches its learning rate and
augmentation at the right epochs, and a run resumed after phase 1 gets the same phase 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.shapes import RandShapesd
from microseg.data.targets import prepare_targets
from microseg.errors import ConfigError
from microseg.io.tiff import write_stack
from microseg.models.punet.train import PunetTrainConfig
from microseg.models.unet.train import UnetDataModule, UnetModule, UnetTrainConfig
from microseg.train.engine import fit
from microseg.train.hooks import HookBase
from microseg.train.phases import phase_at
from microseg.train.schedules import warmup_cosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = {"arch": "unet", "features": [4, 8], "num_res_units": 0}
BASE_LR, STEPS, WARMUP = 3e-3, 2, 1
PHASES = [
    {"name": "1.1", "epochs": 1, "lr": 1e-3, "augment": False},
    {"name": "1.2", "epochs": 1, "lr_scale": 0.5, "shapes": {"prob": 1.0, "max_shapes": 2}},
    {"name": "2", "epochs": 1, "lr": 2e-4, "elastic_prob": 0.0, "noise_prob": 0.0},
]
#: per epoch: the base rate and (augment, shapes on, elastic_prob, noise_prob) of its phase
EXPECTED = [
    (1e-3, (False, False, 0.2, 0.2)),
    (0.5 * BASE_LR, (True, True, 0.2, 0.2)),
    (2e-4, (True, False, 0.0, 0.0)),
]


@pytest.fixture(scope="module")
def toy_targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    rows = []
    for i, split in enumerate(["train"] * 2 + ["val"]):
        rng = np.random.default_rng(i)
        labels = np.zeros((48, 48), np.uint16)
        for j in range(1, 5):
            labels[disk(rng.uniform(8, 40, 2), rng.uniform(4, 6), shape=labels.shape)] = j
        image = np.clip(20 + 160 * (labels > 0) + rng.normal(0, 8, labels.shape), 0, 255)
        write_stack(root / "prepared" / "images" / f"t{i}.tif", image.astype(np.uint8))
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


def staged_cfg(**kw: Any) -> UnetTrainConfig:
    values = {
        "model": TINY_MODEL,
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 3,
        "steps_per_epoch": STEPS,
        "warmup_steps": WARMUP,
        "lr": BASE_LR,
        "progress": False,
        "seed": 5,
        "phases": PHASES,
        **kw,
    }
    return UnetTrainConfig.from_mapping(values)


class PhaseRecorder(Callback):
    """What each training step ran with: its rate, the scheduler's base and step, and the
    augmentation the sampler drew the batch with."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        dm = trainer.datamodule
        pipeline = dm.sampler.transforms.transforms
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "base": scheduler.base_lrs[0],
                "step": scheduler.last_epoch,
                "data": (
                    dm.cfg.augment,
                    any(isinstance(t, RandShapesd) for t in pipeline),
                    dm.cfg.elastic_prob,
                    dm.cfg.noise_prob,
                ),
                "n_transforms": len(pipeline),
            }
        )


class FailAfter(HookBase):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, epoch, metrics):
        if epoch == self.epoch:
            raise RuntimeError("interrupted by a hook")


def train(cfg: UnetTrainConfig, targets: Path, out: Path, **kw: Any):
    rec = PhaseRecorder()
    result = fit(
        lambda: UnetModule(cfg),
        UnetDataModule(targets, cfg),
        cfg,
        out,
        model_config=cfg.model.as_dict(),
        callbacks=[rec],
        **kw,
    )
    return result, rec


def test_phases_switch_lr_and_augmentation_at_their_epochs(toy_targets, tmp_path):
    cfg = staged_cfg()
    result, rec = train(cfg, toy_targets, tmp_path / "full")
    assert [s["epoch"] for s in rec.steps] == [0, 0, 1, 1, 2, 2]
    factor = warmup_cosine(3 * STEPS, WARMUP, floor=0.02)
    for s in rec.steps:
        base, data = EXPECTED[s["epoch"]]
        assert s["base"] == pytest.approx(base, rel=1e-12)
        assert s["data"] == data
        # one schedule over the whole run, scaled by the phase's base rate
        assert s["lr"] == pytest.approx(base * factor(s["step"]), rel=1e-9)
    assert [s["step"] for s in rec.steps] == list(range(6))
    assert rec.steps[0]["n_transforms"] == 1  # augment off: the crop alone
    assert [h["phase"] for h in result.history] == [0.0, 1.0, 2.0]
    assert result.epochs_completed == 3

    # the same config without phases trains at the config's rate with its augmentation
    plain = staged_cfg(phases=[])
    _, rec_plain = train(plain, toy_targets, tmp_path / "plain")
    assert {s["base"] for s in rec_plain.steps} == {BASE_LR}
    assert {s["data"] for s in rec_plain.steps} == {(True, False, 0.2, 0.2)}

    # resumed from last.ckpt of the end of phase 1: phase 2 and 3 as in the uninterrupted run
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="interrupted"):
        train(cfg, toy_targets, cut, hooks=FailAfter(0))
    resumed, rec_resumed = train(cfg, toy_targets, cut)
    assert resumed.resumed_from_epoch == 1
    assert [s["epoch"] for s in rec_resumed.steps] == [1, 1, 2, 2]
    for a, b in zip(rec_resumed.steps, rec.steps[2:], strict=True):
        assert a["base"] == b["base"] and a["data"] == b["data"] and a["step"] == b["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    assert [h["phase"] for h in resumed.history] == [0.0, 1.0, 2.0]
    assert resumed.history[-1]["train_loss"] == pytest.approx(
        result.history[-1]["train_loss"], rel=1e-5
    )
    a = torch.load(cut / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # a loader worker is started before the first epoch's hooks: it must get the phase (and
    # epoch) the run resumes at all the same
    worker = staged_cfg(loader_workers=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        train(worker, toy_targets, tmp_path / "worker", hooks=FailAfter(0))
    in_worker, _ = train(worker, toy_targets, tmp_path / "worker")
    assert [h["train_loss"] for h in in_worker.history] == pytest.approx(
        [h["train_loss"] for h in result.history], rel=1e-5
    )


def test_phase_at_follows_the_epoch_number():
    phases = staged_cfg().phases
    assert [phase_at(phases, e).name for e in range(4)] == ["1.1", "1.2", "2", "2"]


def test_bad_schedules_are_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"epochs=4, but the phases add up to 3"):
        staged_cfg(epochs=4)
    with pytest.raises(ConfigError, match="lr or lr_scale, not both"):
        staged_cfg(phases=[{"epochs": 3, "lr": 1e-3, "lr_scale": 0.5}])
    with pytest.raises(ConfigError, match=r"unknown keys \['warmup'\]"):
        staged_cfg(phases=[{"epochs": 3, "warmup": 2}])
    with pytest.raises(ConfigError, match="epochs must be a whole number"):
        staged_cfg(epochs=1, phases=[{"epochs": 0}, {"epochs": 1}])
    # a knob the family does not have (punet has no elastic deformation)
    with pytest.raises(ConfigError, match=r"sets \['elastic_prob'\].*PunetTrainConfig"):
        PunetTrainConfig.from_mapping({"epochs": 2, "phases": [{"epochs": 2, "elastic_prob": 0}]})
    # values are checked before training starts, by the family's own validation
    cfg = staged_cfg(phases=[{"epochs": 3, "shapes": {"prob": 2.0}}])
    with pytest.raises(ConfigError, match="invalid shapes config"):
        fit(lambda: None, None, cfg, "/nonexistent/never-written")  # type: ignore[arg-type]
