"""A new model family is one package and one ``params.yaml`` entry: nothing else changes.

The toy family below (a per-pixel logistic regression, trained by the shared Lightning engine)
is registered by name; the nuclei stages then train, load and score it, and a training study
tunes it, without knowing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from skimage.draw import disk

from microseg.config import CellModelConfig
from microseg.data.manifest import write_manifest
from microseg.data.targets import load_targets, match_channels, percentile_normalise
from microseg.io.tiff import write_stack
from microseg.models import MODELS, register_model
from microseg.stages import cells
from microseg.train.engine import EngineConfig, fit
from microseg.train.family import EpochBatches, FamilyModule, batches_loader
from microseg.utils.atomic import atomic_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PixelModule(FamilyModule):
    monitor, mode = "val_dice", "max"

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(3, 1, 1)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        logits = self.net(batch["image"])
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["fg"])

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        pred = self.net(batch["image"]) > 0
        fg = batch["fg"] > 0.5
        dice = 2 * (pred & fg).sum() / (pred.sum() + fg.sum()).clamp(min=1)
        self.log("val_dice", dice.float(), on_epoch=True, batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=0.2)

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        with atomic_path(path) as tmp:
            torch.save({"format": "toy/1", "model": self.net.state_dict()}, tmp)


class PixelData(torch.utils.data.Dataset):
    def __init__(self, samples) -> None:
        self.items = [
            {
                "image": torch.from_numpy(match_channels(s.image, 3)),
                "fg": torch.from_numpy(s.target[None] > 0).float(),
            }
            for s in samples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


@register_model("toy_pixels")
class ToyPixels:
    trainable = True

    def __init__(self, net: torch.nn.Conv2d) -> None:
        self.net = net

    @classmethod
    def train(cls, data, out_dir, train: Mapping[str, Any], hooks=None, *, resume=True):
        import lightning as L

        cfg = EngineConfig(progress=False, **train)
        tr, va = load_targets(data, "train"), load_targets(data, "val")

        class DM(L.LightningDataModule):
            def train_dataloader(self):
                items = PixelData(tr).items

                def draw(rng: np.random.Generator) -> dict[str, torch.Tensor]:
                    i = int(rng.integers(len(items)))
                    return {k: v[None] for k, v in items[i].items()}

                return batches_loader(EpochBatches(draw, cfg.steps_per_epoch, cfg.seed))

            def val_dataloader(self):
                return torch.utils.data.DataLoader(PixelData(va), batch_size=1)

        return fit(PixelModule(), DM(), cfg, out_dir, hooks, resume=resume)

    @classmethod
    def load(cls, path, **_: Any) -> ToyPixels:
        state = torch.load(path, weights_only=True)
        net = torch.nn.Conv2d(3, 1, 1)
        net.load_state_dict(state["model"])
        return cls(net.eval())

    def as_predictor(self):
        def predict(image: np.ndarray):
            x = match_channels(percentile_normalise(image, 1.0, 99.0), 3)
            with torch.no_grad():
                prob = torch.sigmoid(self.net(torch.from_numpy(x)[None]))[0, 0].numpy()
            labels, _ = ndimage.label(prob > 0.5)
            return labels.astype(np.uint16), prob, None

        return predict


@pytest.fixture()
def toy_dataset(params):
    MODELS.add("toy_pixels", ToyPixels)  # again: an earlier test's teardown removed it
    prepared = params.paths.prepared / "toyds"
    rows = []
    for i, split in enumerate(["train"] * 3 + ["val"] * 2 + ["test"] * 2):
        rng = np.random.default_rng(i)
        labels = np.zeros((48, 48), np.uint16)
        for k in range(1, 5):
            labels[disk(rng.uniform(8, 40, 2), rng.uniform(3, 6), shape=labels.shape)] = k
        image = np.clip(30 + 150 * (labels > 0) + rng.normal(0, 10, labels.shape), 0, 255)
        write_stack(prepared / "images" / f"s{i}.tif", image.astype(np.uint8))
        write_stack(prepared / "labels" / f"s{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"s{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/s{i}.tif",
                "label_path": f"labels/s{i}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, prepared)
    params.cells.dataset = "toyds"
    params.cells.n_overlays = 1
    params.cells.models = {
        "toy": CellModelConfig(
            family="toy_pixels", train={"epochs": 2, "steps_per_epoch": 40, "seed": 1}
        )
    }
    yield params
    MODELS.remove("toy_pixels")


def test_a_registered_family_runs_the_train_and_evaluate_stages(toy_dataset):
    params = toy_dataset
    cells.prepare_targets_stage(params)
    out = cells.train_cell_model(params, "toy")
    assert out["epochs"] == 2 and out["n_params"] == 4, out  # 3 weights + 1 bias
    assert out["best"]["val_dice"] > 0.8, out
    assert (cells.MODELS_ROOT / "toy" / "best.pt").is_file()
    metrics = cells.evaluate_cell_model(params, "toy")
    assert metrics["n_images"] == 2
    assert metrics["f1_50"] > 0.5  # bright discs on a dark background: a pixel model finds them
    assert (cells.REPORTS_ROOT / "toy" / "per_image.csv").is_file()


def test_evaluation_counts_objects_and_drops_large_ones(toy_dataset):
    """``evaluate_cells``: objects.csv per predicted object, count errors per image, the
    counting block and figures; ``cells.max_area: p<q>`` from the train split's true areas."""
    import json

    from microseg.config import CellsConfig
    from microseg.data.manifest import read_manifest
    from microseg.evaluate.counting import area_percentile
    from microseg.io.tiff import read_stack

    params = toy_dataset
    net = torch.nn.Conv2d(3, 1, 1)  # no training: bright (normalised ~1) pixels are foreground
    with torch.no_grad():
        net.weight.fill_(10.0)
        net.bias.fill_(-15.0)
    weights = cells.MODELS_ROOT / "toy" / "best.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"format": "toy/1", "model": net.state_dict()}, weights)
    metrics = cells.evaluate_cell_model(params, "toy")
    folder = cells.REPORTS_ROOT / "toy"
    per_image = pd.read_csv(folder / "per_image.csv")
    assert (per_image["count_error"] == per_image["n_pred"] - per_image["n_gt"]).all()
    objects = pd.read_csv(folder / "objects.csv")
    assert list(objects)[:6] == ["image_id", "id", "y_px", "x_px", "area_px", "score"]
    assert len(objects) == per_image["n_pred"].sum() == metrics["n_pred"]
    for sid, rows in objects.groupby("image_id"):
        labels = read_stack(folder / "labels" / f"{sid}.tif")
        assert rows["area_px"].tolist() == np.bincount(labels.ravel())[rows["id"]].tolist()
    assert objects["score"].between(0.5, 1).all()  # mean p(fg) inside objects cut at p > 0.5
    c = json.loads((params.paths.metrics / "cells" / "toy.json").read_text())["counting"]
    assert c["count_mae"] == pytest.approx(per_image["count_error"].abs().mean())
    assert c["max_area"] is None and c["n_pred_objects"] == len(objects)
    px = metrics["pixel_confusion"]
    assert px == {k: int(per_image[f"px_{k}"].sum()) for k in ("tp", "fp", "fn", "tn")}
    assert all((folder / f).is_file() for f, _ in cells.COUNT_FIGURES)

    params.cells.max_area = "p90"
    rows = read_manifest(params.paths.prepared / "toyds")
    train = [read_stack(params.paths.prepared / "toyds" / r.label_path)
             for r in rows[rows["split"] == "train"].itertuples()]  # fmt: skip
    cut = area_percentile(train, 90)
    assert cells.resolve_max_area(params) == cut
    small = cells.evaluate_cell_model(params, "toy", out_dir=Path("small"), write_metrics=False)
    kept = pd.read_csv(Path("small") / "objects.csv")
    assert kept["area_px"].max() <= cut < objects["area_px"].max()
    assert len(kept) == (objects["area_px"] <= cut).sum() == small["n_pred"]
    assert small["counting"]["max_area"] == cut
    with pytest.raises(ValueError, match="max_area"):
        CellsConfig(max_area="q95")
    with pytest.raises(ValueError, match="max_area"):
        CellsConfig(max_area=0)


def test_unknown_family_is_a_clear_error(toy_dataset):
    params = toy_dataset
    params.cells.models = {"x": CellModelConfig(family="nope")}
    with pytest.raises(Exception, match="unknown model 'nope'; registered"):
        cells.train_cell_model(params, "x")


def test_a_registered_family_is_a_training_study_target(toy_dataset, tmp_path):
    """``microseg tune --target toy``: the study trains the toy family through the registry
    (nothing in tune/ names it) and writes the best params back."""
    from microseg.stages import tuning
    from microseg.tune.training import read_best_params

    params = toy_dataset
    cells.prepare_targets_stage(params)
    params.tune = {
        "toy": {
            "n_trials": 2,
            "epochs": 1,
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "metric": "val_dice",
            "space": {"steps_per_epoch": {"low": 5, "high": 15}},
        }
    }
    out = tuning.tune_training_stage(params, "toy")
    assert out["n_complete"] == 2 and out["metric"] == "val_dice", out
    assert 0.0 <= out["best_value"] <= 1.0
    assert set(out["best"]) == {"steps_per_epoch"}
    assert read_best_params(tuning.tuned_path("toy")) == out["best"]
    for n in (0, 1):
        assert (tuning.WORK_DIR / "toy" / f"trial_{n}" / "best.pt").is_file()
    assert tuning.metrics_path(params, "toy").is_file()


def test_the_seed_spread_trains_other_seeds_and_reads_the_demo_one(toy_dataset):
    """``microseg seeds``: the demo's seed read from its evaluation, the others trained into
    models/seeds and scored the same way; the spread and the paired differences summed up."""
    from microseg.stages import seeds

    params = toy_dataset
    params.seeds = {"models": ["toy"], "seeds": [1, 5], "baseline": "otsu"}
    cells.prepare_targets_stage(params)
    cells.train_cell_model(params, "toy")
    demo = cells.evaluate_cell_model(params, "toy")
    cells.evaluate_cell_model(params, "otsu")
    result = seeds.run_seeds(params, jobs=1)
    row = result.metrics["models"]["toy"]
    assert row["seeds"] == [1, 5]
    assert not (seeds.SEEDS_MODELS / "toy" / "seed1").exists()  # the demo's run, not retrained
    assert (seeds.SEEDS_MODELS / "toy" / "seed5" / "best.pt").is_file()
    per_image = seeds.SEEDS_REPORTS / "toy" / "seed5" / "per_image.csv"
    assert per_image.is_file()
    demo_rows = pd.read_csv(cells.REPORTS_ROOT / "toy" / "per_image.csv")
    assert row["groups"]["all"]["per_seed"][0] == round(demo_rows["f1_50"].mean(), 4)
    assert demo["n_images"] == 2
    a = row["groups"]["all"]
    assert len(a["per_seed"]) == 2 and a["sd"] >= 0
    assert a["mean"] == pytest.approx(sum(a["per_seed"]) / 2, abs=1e-4)
    assert (params.paths.metrics / seeds.METRICS_NAME).is_file()
    # a second call reads what is there: nothing is trained again
    before = (seeds.SEEDS_MODELS / "toy" / "seed5" / "best.pt").stat().st_mtime_ns
    assert seeds.run_seeds(params, jobs=1).metrics["models"] == result.metrics["models"]
    assert (seeds.SEEDS_MODELS / "toy" / "seed5" / "best.pt").stat().st_mtime_ns == before
