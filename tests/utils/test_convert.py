import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from microseg.errors import ConfigError
from microseg.utils.convert import flatten, jsonable, merge_dotted, nest, to_builtin


def test_to_builtin_unwraps_numpy_scalars_only() -> None:
    for value, want in ((np.int64(3), 3), (np.float32(0.5), 0.5), (np.bool_(True), True)):
        got = to_builtin(value)
        assert got == want and type(got) is type(want)
    arr = np.arange(3)
    assert to_builtin(arr) is arr and to_builtin("x") == "x"
    assert yaml.safe_dump({"a": to_builtin(np.float64(1.5))}) == "a: 1.5\n"


def test_jsonable_gives_strict_json() -> None:
    data = {
        1: np.float32(0.25),
        "nan": np.float64("nan"),
        "inf": -math.inf,
        "na": pd.NA,
        "nat": pd.NaT,
        "zero_d": np.array(7),
        "nested": [(np.int16(2), None, True)],
        "set": {np.int64(4)},
    }
    got = jsonable(data)
    assert got == {
        "1": 0.25,
        "nan": None,
        "inf": None,
        "na": None,
        "nat": None,
        "zero_d": 7,
        "nested": [[2, None, True]],
        "set": [4],
    }
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_unknown_objects_kept_or_passed_to_default() -> None:
    path = Path("a/b")
    assert jsonable({"p": path}) == {"p": path}
    assert jsonable({"p": path, "d": pd.Timestamp(0)}, default=str) == {
        "p": "a/b",
        "d": "1970-01-01 00:00:00",
    }
    with pytest.raises(TypeError):
        json.dumps(jsonable(path))


def test_flatten_nest_and_merge_dotted_round_trip() -> None:
    flat = {"a.b": 1, "a.c": [1, 2], "d": "x"}
    assert flatten(nest(flat)) == flat and nest(flat) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    base = {"lr": 0.1, "augment": {"scale": 0.1}}
    merged = merge_dotted(base, {"augment.mosaic": 0.0, "lr": 0.2})
    assert merged == {"lr": 0.2, "augment": {"scale": 0.1, "mosaic": 0.0}}
    assert base == {"lr": 0.1, "augment": {"scale": 0.1}}  # a deep copy
    with pytest.raises(ConfigError, match="expected a mapping at 'lr'"):
        merge_dotted(base, {"lr.x": 1})
