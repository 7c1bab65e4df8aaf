"""Figures: valid, non-trivial, deterministic files, written atomically, with no network use."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microseg.errors import MicrosegError, ShapeMismatchError
from microseg.evaluate.calibration import reliability_table
from microseg.evaluate.inter_rater import compare_uncertainty_to_disagreement, disagreement_map
from microseg.evaluate.uncertainty import from_samples, uncertainty_maps
from microseg.report.figures import (
    confusion_figure,
    pr_curve_figure,
    reliability_diagram,
    roc_figure,
    size_histogram,
    uncertainty_panel,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Any attempt to open a connection or resolve a name is recorded and fails."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


def _check_png(path: Path, min_bytes: int = 5000) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank canvas
    return arr


def _check_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and len(data) > 5000


def _no_temp_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def volume() -> dict:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:3, :48, :64]
    gt = (y - 24) ** 2 + (x - 32) ** 2 < 120 + 20 * z
    image = rng.poisson(20 + 80 * gt).astype(np.uint16)
    logits = np.where(gt, 2.5, -2.5) + rng.normal(0, 1.5, (12, *gt.shape))
    maps = uncertainty_maps(from_samples(1 / (1 + np.exp(-logits))))
    raters = [gt ^ (rng.uniform(size=gt.shape) < 0.03) for _ in range(3)]
    return {"image": image, "gt": gt, "maps": maps, "raters": raters}


def test_uncertainty_panel_png_pdf(tmp_path: Path, volume: dict) -> None:
    png, pdf = tmp_path / "panel.png", tmp_path / "sub" / "panel.pdf"
    written = uncertainty_panel(
        volume["image"],
        volume["maps"],
        png,
        pdf,
        gt=volume["gt"],
        raters=volume["raters"],
        planes=[0, 2],
        title="test",
    )
    assert written == [png, pdf]
    arr = _check_png(png, min_bytes=20000)
    assert arr.shape[1] > arr.shape[0]  # seven columns, two rows: wide
    _check_pdf(pdf)
    _no_temp_left(tmp_path)
    # 2D planes and a precomputed disagreement map work too
    plane = {k: v[1] for k, v in volume["maps"].items()}
    dis = disagreement_map([r[1] for r in volume["raters"]])
    uncertainty_panel(volume["image"][1], plane, tmp_path / "plane.png", disagreement=dis)
    _check_png(tmp_path / "plane.png")
    with pytest.raises(ShapeMismatchError):
        uncertainty_panel(volume["image"][1], volume["maps"], tmp_path / "bad.png")
    with pytest.raises(MicrosegError, match="must end in"):
        uncertainty_panel(volume["image"][1], plane, tmp_path / "bad.jpg")


def test_figures_are_deterministic(tmp_path: Path, volume: dict) -> None:
    plane = {k: v[1] for k, v in volume["maps"].items()}
    curves = {"a": (np.array([0, 0.2, 1]), np.array([0, 0.7, 1]), 0.75)}
    for i in range(2):
        uncertainty_panel(volume["image"][1], plane, tmp_path / f"p{i}.png")
        roc_figure(curves, tmp_path / f"r{i}.png", tmp_path / f"r{i}.pdf")
    for name in ("p{}.png", "r{}.png", "r{}.pdf"):
        a, b = (tmp_path / name.format(i) for i in range(2))
        assert a.read_bytes() == b.read_bytes(), name
    assert b"CreationDate" not in (tmp_path / "r0.pdf").read_bytes()


def test_reliability_diagram(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    logit = rng.normal(-1, 2, 20000)
    y = rng.uniform(size=logit.size) < 1 / (1 + np.exp(-logit))
    table = reliability_table(1 / (1 + np.exp(-(logit + 1))), y)
    reliability_diagram(table, tmp_path / "rel.png", tmp_path / "rel.pdf")
    _check_png(tmp_path / "rel.png")
    _check_pdf(tmp_path / "rel.pdf")
    with pytest.raises(MicrosegError, match="columns"):
        reliability_diagram(table.drop(columns="frequency"), tmp_path / "x.png")


def test_roc_figure(tmp_path: Path, volume: dict) -> None:
    dis = disagreement_map(volume["raters"])
    df = compare_uncertainty_to_disagreement(volume["maps"], dis)
    roc_figure(df.attrs["roc_curves"], tmp_path / "roc.png")
    _check_png(tmp_path / "roc.png")
    with pytest.raises(MicrosegError):
        roc_figure({}, tmp_path / "empty.png")


def test_pr_curve_figure(tmp_path: Path) -> None:
    r = np.linspace(0, 1, 30)
    df = pd.concat(
        [
            pd.DataFrame({"method": "unet", "recall": r, "precision": 1 - 0.3 * r**2}),
            pd.DataFrame({"method": "dog", "recall": r, "precision": 1 - 0.7 * r}),
        ]
    )
    pr_curve_figure(df, tmp_path / "pr.png", tmp_path / "pr.pdf")
    _check_png(tmp_path / "pr.png")
    _check_pdf(tmp_path / "pr.pdf")
    pr_curve_figure(df[df.method == "dog"].drop(columns="method"), tmp_path / "one.png")
    _check_png(tmp_path / "one.png")
    with pytest.raises(MicrosegError, match="columns"):
        pr_curve_figure(df.drop(columns="recall"), tmp_path / "x.png")


def test_size_histogram_and_confusion_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    true, pred = rng.lognormal(5, 0.4, 200).round() + 1, rng.lognormal(5.3, 0.5, 150).round() + 1
    size_histogram(true, pred, tmp_path / "sizes.png", max_area=600)
    _check_png(tmp_path / "sizes.png")
    size_histogram(true, pred, tmp_path / "again.png", max_area=600)
    assert (tmp_path / "sizes.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    size_histogram([30, 30], [], tmp_path / "one_size.png")  # one area, no predictions
    _check_png(tmp_path / "one_size.png", min_bytes=2000)
    with pytest.raises(MicrosegError, match="at least one object"):
        size_histogram([], [], tmp_path / "x.png")
    confusion_figure(900, 50, 80, 9000, tmp_path / "confusion.png")
    _check_png(tmp_path / "confusion.png", min_bytes=2000)
    with pytest.raises(MicrosegError, match=">= 0"):
        confusion_figure(-1, 0, 0, 0, tmp_path / "x.png")
