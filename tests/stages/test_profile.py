"""Training profiles: params.yaml is the demo; `microseg profile full` swaps budgets in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from microseg.config import Params
from microseg.errors import ConfigError, MissingFileError
from microseg.stages.profile import apply_profile, check_profiles, read_profile

ROOT = Path(__file__).resolve().parents[2]

PARAMS = """\
profile: demo   # which profile
seed: 42
cells:
  models:       # trained by the demo
    unet:
      family: unet
      train: {epochs: 2}
"""


def _profiles(tmp_path: Path, full_models: dict, demo_models: dict) -> Path:
    root = tmp_path / "profiles"
    root.mkdir()
    for name, models in (("full", full_models), ("demo", demo_models)):
        (root / f"{name}.yaml").write_text(
            yaml.safe_dump({"profile": name, "set": {"cells.models": models, "seed": 42}})
        )
    return root


def test_apply_profile_swaps_paths_keeps_comments_and_switches_back(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    demo = {"unet": {"family": "unet", "train": {"epochs": 2}}}
    full = {
        "unet": {"family": "unet", "train": {"epochs": 200}},
        "otsu2": {"family": "classical"},
    }
    root = _profiles(tmp_path, full, demo)
    assert apply_profile("demo", params, root) == []  # params.yaml is the demo
    changed = apply_profile("full", params, root)
    assert set(changed) == {"cells.models", "profile"}
    text = params.read_text()
    assert "# which profile" in text and "profile: full" in text
    loaded = yaml.safe_load(text)
    assert loaded["cells"]["models"] == full
    apply_profile("demo", params, root)
    assert yaml.safe_load(params.read_text()) == yaml.safe_load(PARAMS)


def test_profiles_must_set_the_same_paths(tmp_path):
    root = _profiles(tmp_path, {}, {})
    (root / "odd.yaml").write_text(yaml.safe_dump({"profile": "odd", "set": {"seed": 1}}))
    with pytest.raises(ConfigError, match="must set the same paths"):
        check_profiles(root)


def test_unknown_profile_and_bad_path_are_clear_errors(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    root = _profiles(tmp_path, {}, {})
    with pytest.raises(MissingFileError, match="no profile 'gpu'"):
        apply_profile("gpu", params, root)
    for name in ("full", "demo"):
        (root / f"{name}.yaml").write_text(
            yaml.safe_dump({"profile": name, "set": {"nope.deeper": 1}})
        )
    with pytest.raises(ConfigError, match=r"'nope\.deeper' is not in params\.yaml"):
        apply_profile("full", params, root)


def test_repo_profiles_demo_is_params_yaml_and_full_is_valid(tmp_path):
    """The committed params.yaml holds the demo profile exactly; full yields valid params."""
    root = ROOT / "profiles"
    check_profiles(root)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert apply_profile("demo", params, root) == []
    apply_profile("full", params, root)
    full = Params.model_validate(yaml.safe_load(params.read_text()))
    assert full.profile == "full"
    demo = read_profile("demo", root)["set"]["cells.models"]
    assert set(demo) <= set(full.cells.models)  # the full profile trains every demo model


@pytest.mark.parametrize("name", ["demo", "full"])
def test_repo_profiles_train_sections_are_valid_for_their_families(name):
    """Every nuclei model of a profile names a registered family whose training config
    accepts its train section (typos in a GPU-only profile fail here, not on the runner)."""
    from microseg.models import get_model

    models = read_profile(name, ROOT / "profiles")["set"]["cells.models"]
    for key, entry in models.items():
        family = get_model(entry["family"])
        train = dict(entry.get("train") or {})
        family.check_train_keys(_dotted(train))
        config = family.train_config
        module, _, cls = config.partition(":")
        import importlib

        getattr(importlib.import_module(module), cls).from_mapping(train), key


def _dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "plan", "post"):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out
