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


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"yollo": {"train": {"epochs": 3}}}, "yollo"),  # a typo'd section is not ignored
        ({"spines": {"match_dist_nm": -1000}}, "match_dist_nm"),
        (
            {"datasets": {"../../x": {"format": "ctc", "source": "x", "task": "tracking"}}},
            "../../x",
        ),
        ({"datasets": {"/abs": {"format": "ctc", "source": "x", "task": "tracking"}}}, "/abs"),
    ],
)
def test_typos_and_unsafe_values_are_refused(tmp_path, change, named) -> None:
    """Issue 18: unknown top-level keys fell back to defaults; a dataset key `../../x` wrote
    outside data/prepared; a negative matching distance was accepted."""
    import yaml

    from microseg.config import load_params as load
    from microseg.errors import ConfigError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert named in str(err.value)
