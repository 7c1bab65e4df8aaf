from pathlib import Path

import pytest

from microseg.config import load_params
from microseg.errors import ConfigError, MissingFileError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_validate() -> None:
    p = load_params(REPO / "params.yaml")
    assert set(p.datasets) >= {"spines", "dsb2018", "tracking"}
    assert p.datasets["dsb2018"].split.train == pytest.approx(0.7)


def test_override_dotted_key() -> None:
    p = load_params(REPO / "params.yaml", {"seed": 3, "mlflow.tracking_uri": "sqlite:///x.db"})
    assert p.seed == 3 and p.mlflow.tracking_uri == "sqlite:///x.db"


def test_bad_split_named(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text(
        "datasets:\n  d:\n    format: dsb2018\n    source: x\n    task: nuclei\n"
        "    split: {train: 0.9, val: 0.2, test: 0.1}\n"
    )
    with pytest.raises(ConfigError, match="sum to 1"):
        load_params(f)


def test_unknown_key_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("validate:\n  allowed_image_dtype: [uint8]\n")
    with pytest.raises(ConfigError, match="allowed_image_dtype"):
        load_params(f)
    with pytest.raises(MissingFileError):
        load_params(tmp_path / "nope.yaml")
