"""The DeepD3.V2 seed presets (profiles/yolo_seed.yaml, punet_seed.yaml) on a params copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from microseg.config import Params
from microseg.models import get_model
from microseg.models.punet.train import PunetTrainConfig
from microseg.stages.profile import apply_profile, check_profiles, read_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"

#: what each preset owns; every other path must keep demo.yaml's value
OWNED = {
    "yolo_seed": {p for p in read_profile("demo", PROFILES)["set"] if p.startswith("yolo.")},
    "punet_seed": {p for p in read_profile("demo", PROFILES)["set"] if p.startswith("punet.")},
}


@pytest.fixture()
def params_copy(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def test_seed_presets_set_the_same_paths_as_the_other_profiles():
    check_profiles(PROFILES)  # else `microseg profile` refuses every profile
    assert {"yolo_seed", "punet_seed"} <= {p.stem for p in PROFILES.glob("*.yaml")}


@pytest.mark.parametrize("name", ["yolo_seed", "punet_seed"])
def test_seed_preset_is_demo_outside_its_own_section(name):
    demo = read_profile("demo", PROFILES)["set"]
    preset = read_profile(name, PROFILES)["set"]
    for path, value in demo.items():
        if path not in OWNED[name]:
            assert preset[path] == value, path


def test_yolo_seed_gives_valid_params_with_the_seed_recipe(params_copy: Path):
    changed = apply_profile("yolo_seed", params_copy, PROFILES)
    params = Params.model_validate(yaml.safe_load(params_copy.read_text()))
    assert params.profile == "yolo_seed"
    t = params.yolo.train
    assert (t.arch, t.epochs, t.batch, t.warmup_epochs) == ("l", 60, 8, 5.0)
    assert (t.optimizer, t.lr0, t.lrf, t.patience) == ("AdamW", 1e-3, 0.01, 15)
    assert set(changed) <= OWNED["yolo_seed"] | {"profile"}
    get_model("yolo").check_train_keys([k.removeprefix("yolo.train.") for k in OWNED["yolo_seed"]])


def test_punet_seed_gives_valid_params_with_the_seed_recipe(params_copy: Path):
    changed = apply_profile("punet_seed", params_copy, PROFILES)
    params = Params.model_validate(yaml.safe_load(params_copy.read_text()))
    assert params.profile == "punet_seed"
    assert set(changed) <= OWNED["punet_seed"] | {"profile"}
    get_model("punet").check_train_keys(list(params.punet.train))
    cfg = PunetTrainConfig.from_mapping(dict(params.punet.train))
    assert cfg.filters == (32, 64, 128, 192)
    assert (cfg.latent_dim_spine, cfg.latent_dim_dendrite) == (12, 12)
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (3e-4, 60, 16)
    assert cfg.steps_per_epoch * cfg.batch_size == 256 * 128  # the seed's samples per epoch
    assert params.punet.predict.n_samples == 24


@pytest.mark.parametrize("name", ["yolo_seed", "punet_seed"])
def test_demo_restores_params_yaml_after_a_seed_preset(params_copy: Path, name: str):
    before = yaml.safe_load(params_copy.read_text())
    apply_profile(name, params_copy, PROFILES)
    assert yaml.safe_load(params_copy.read_text()) != before
    apply_profile("demo", params_copy, PROFILES)
    assert yaml.safe_load(params_copy.read_text()) == before
