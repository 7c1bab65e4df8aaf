"""Shared fixtures: a private MLflow store per test, a real PostgreSQL database when one answers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PG_DSN = os.environ.get("MICROSEG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``heavy`` run first: with ``make test``'s parallel workers (pytest-xdist,
    work stealing) a test of minutes then starts at once beside the rest, not at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids thread-pool overhead on a busy machine (10x here).
    Modules of small-network tests use it with ``pytestmark = usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tensors(obj: object, prefix: str = "") -> dict[str, object]:
    """Every tensor of a nested checkpoint (dicts, lists), keyed by its path."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if not isinstance(obj, dict | list | tuple):
        return {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    out: dict[str, object] = {}
    for k, v in items:
        out |= _tensors(v, f"{prefix}/{k}")
    return out


@pytest.fixture()
def same_weights():
    """``check(a, b)``: two weight files hold the same tensors, bit for bit (issue 16's
    "same machine, same inputs, same weights"); returns how many tensors were compared."""
    import torch

    def check(a: Path, b: Path) -> int:
        ta = _tensors(torch.load(a, map_location="cpu", weights_only=True))
        tb = _tensors(torch.load(b, map_location="cpu", weights_only=True))
        assert ta and ta.keys() == tb.keys()
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
        return len(ta)

    return check


@pytest.fixture()
def train_twice(tmp_path: Path):
    """``train_twice(family, data, section)``: the registered family trained twice on the same
    data and section, into ``tmp_path/a`` and ``tmp_path/b``; returns both results."""
    from microseg.models import get_model

    def run(family: str, data: object, section: dict) -> tuple:
        return tuple(get_model(family).train(data, tmp_path / k, section) for k in "ab")

    return run


@pytest.fixture()
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Repo params with every output path and the MLflow store inside ``tmp_path``."""
    from microseg.config import load_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return load_params(
        REPO / "params.yaml",
        {
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.artifact_root": str(tmp_path / "mlruns"),
            "paths.synthetic": str(tmp_path / "synthetic"),
            "paths.prepared": str(tmp_path / "prepared"),
            "paths.reports": str(tmp_path / "reports"),
            "paths.metrics": str(tmp_path / "metrics"),
        },
    )


@pytest.fixture()
def params_unet(params):
    """``params`` plus the full profile's ``cells.models.unet`` (the demo trains MAUNet only),
    for tests of two nuclei models or of the name ``unet`` in both nuclei and tracking."""
    from microseg.stages.profile import read_profile

    entry = read_profile("full", REPO / "profiles")["set"]["cells.models"]["unet"]
    params.cells.models["unet"] = type(params.cells.models["maunet"]).model_validate(entry)
    return params


def write_tiny_punet_and_stack(root: Path, shape: tuple[int, int, int]) -> tuple[object, object]:
    """A tiny random Prob-UNet (``root/punet.pt``) and a ZYX stack with one bright blob
    (``root/stack.tif``, 500 x 94 x 94 nm) for the uncertainty tests; returns the stack as
    floats and the generator, to draw more from the same stream."""
    import numpy as np
    import torch

    from microseg.io.tiff import write_stack
    from microseg.models.punet import ProbUNet, save_punet

    torch.manual_seed(0)
    net = ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2)
    save_punet(net, root / "punet.pt")
    rng = np.random.default_rng(0)
    stack = rng.normal(300, 40, shape)
    stack[1:3, 8:14, 8:14] += 2000
    write_stack(root / "stack.tif", np.clip(stack, 0, 65535).astype(np.uint16), (500, 94, 94))
    return stack, rng


@pytest.fixture(scope="session")
def tiny_punet_and_stack():
    """:func:`write_tiny_punet_and_stack`, for test modules (they cannot import conftest)."""
    return write_tiny_punet_and_stack


@pytest.fixture()
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the real server; skipped with the reason when none answers."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(PG_DSN, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers at {PG_DSN}: {exc}".strip())
    conn.autocommit = True
    name = f"microseg_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base = PG_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
