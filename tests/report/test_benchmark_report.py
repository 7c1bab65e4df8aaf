"""Benchmark report: self-contained, baseline marked, best bold, deterministic and atomic."""

from __future__ import annotations

import re
import socket
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import microseg.report.benchmark as bm
from microseg.errors import MicrosegError
from microseg.evaluate.coco_eval import coco_evaluate, coco_metrics
from microseg.evaluate.instances import InstanceSample, evaluate_instances
from microseg.report.benchmark import ModelResult, build_report
from microseg.report.instance_overlays import (
    GT_COLOUR,
    PRED_COLOUR,
    best_worst_overlays,
    overlay_rgb,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def blobs(rng: np.random.Generator, n: int, shape=(48, 48)) -> np.ndarray:
    out = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        y, x = rng.integers(4, shape[0] - 4, 2)
        out[y - 3 : y + 3, x - 3 : x + 3] = k
    return out


@pytest.fixture(scope="module")
def dataset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for k in range(4):
        gt = blobs(rng, 6)
        image = (gt > 0) * 150.0 + rng.normal(40, 10, gt.shape)
        out[f"img{k}"] = (image, gt)
    return out


def predict(dataset, name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(name))
    preds = {}
    for k, (image_id, (_, gt)) in enumerate(dataset.items()):
        pred = gt.copy()
        if name == "baseline" or k == 0:
            pred[np.isin(pred, [1, 2])] = 0  # misses
        if name == "unet":
            pred = np.roll(pred, int(rng.integers(0, 2)), axis=1)
        preds[image_id] = pred
    return preds


@pytest.fixture(scope="module")
def results(dataset, tmp_path_factory) -> list[ModelResult]:
    modality = {"img0": "tissue", "img1": "fluorescence", "img2": "fluorescence", "img3": "tissue"}
    overlay_dir = tmp_path_factory.mktemp("overlays")
    out = []
    for name in ("baseline", "unet"):
        preds = predict(dataset, name)
        samples = [
            InstanceSample(
                i,
                dataset[i][1],
                p,
                prob=np.clip((p > 0) * 0.7 + 0.1, 0, 1).astype(np.float64),
            )
            for i, p in preds.items()
        ]
        ev = evaluate_instances(samples)
        ev.per_image["modality"] = ev.per_image["image_id"].map(modality)
        coco = coco_metrics(coco_evaluate(samples, ["segm"]))
        overlays = best_worst_overlays(
            name,
            ev.per_image,
            lambda i, preds=preds: (*dataset[i], preds[i]),
            overlay_dir,
        )
        out.append(
            ModelResult.from_evaluation(
                name,
                ev,
                coco,
                baseline=name == "baseline",
                train_seconds=None if name == "baseline" else 3725.0,
                n_params=None if name == "baseline" else 1_940_000,
                mlflow_run_id=None if name == "baseline" else "0123456789abcdef",
                mlflow_url=None if name == "baseline" else "http://mlflow.local/#/runs/0123",
                overlays=overlays,
            )
        )
    return out


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.href: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if "src" in a:
            self.src.append(a["src"])
        if "href" in a:
            self.href.append(a["href"])


def test_report_is_self_contained_and_complete(results, tmp_path):
    index = build_report(results, tmp_path / "reports" / "benchmark", context={"split": "val"})
    folder = index.parent
    assert index == tmp_path / "reports" / "benchmark" / "index.html"
    text = index.read_text()
    refs = _Refs()
    refs.feed(text)
    assert "script" not in refs.tags and "link" not in refs.tags  # no JS, no stylesheet link
    # PR curves, two reliability diagrams, the differences to the baseline, 2 x best/worst
    assert len(refs.src) == 1 + 2 + 1 + 4
    for src in refs.src:
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative, no scheme
        path = folder / src
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert refs.href == ["runs.mlflow.html"]  # times and runs: beside, outside the DVC hash
    runs = (folder / "runs.mlflow.html").read_text()
    assert 'href="http://mlflow.local/#/runs/0123"' in runs and "1 h 02 min" in runs
    assert pd.read_csv(folder / "runs.mlflow.csv")["train_seconds"].tolist()[1] == 3725.0
    for name in (
        *("models.csv", "per_image.csv", "per_modality.csv", "hardest.csv", "index.md"),
        *("comparison.csv", "comparison.json", "errors.csv"),
    ):
        assert (folder / name).is_file(), name
    md = (folder / "index.md").read_text()
    assert "| model | F1@0.5 | F1@0.7 | F1@0.9 | AP |" in md
    assert "](overlays/unet_worst_1.png)" in md and "](figures/pr_curves.png)" in md
    models = pd.read_csv(folder / "models.csv")
    assert models["model"].tolist() == ["baseline", "unet"]
    assert models.loc[1, "f1_50"] == pytest.approx(results[1].metrics["f1_50"])
    modality = pd.read_csv(folder / "per_modality.csv")
    assert sorted(set(modality["modality"])) == ["fluorescence", "tissue"]


def _row(text: str, name: str) -> str:
    return next(r for r in re.findall(r"<tr[^>]*>.*?</tr>", text) if f"<td>{name}" in r)


def test_baseline_marked_and_best_in_bold(results, tmp_path):
    text = build_report(results, tmp_path / "r").read_text()
    base = _row(text, "baseline (baseline)")
    assert 'class="baseline"' in base
    unet = _row(text, "unet")
    f1 = {r.name: r.metrics["f1_50"] for r in results}
    best = max(f1, key=f1.get)
    assert f1["unet"] != f1["baseline"]
    cells = re.findall(r"<td>(.*?)</td>", base if best == "baseline" else unet)
    assert cells[1] == f"<strong>{f1[best]:.3f}</strong>"
    assert "1.94 M" in unet and "—" in base  # params; the baseline has none
    assert "1 h 02 min" not in text and "0123456789abcdef" not in text  # see runs.mlflow.html


def test_deterministic_bytes(results, tmp_path):
    a = build_report(results, tmp_path / "a").parent
    b = build_report(results, tmp_path / "b").parent
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 12
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_count_errors_and_model_figures_are_shown(results, tmp_path):
    from dataclasses import replace

    from microseg.report.figures import size_histogram

    sizes = tmp_path / "sizes.png"
    size_histogram([20, 30, 40], [25, 50], sizes)
    counted = [
        replace(r, metrics={**r.metrics, "count_mae": mae, "count_mre": mre}, figures=figs)
        for r, mae, mre, figs in zip(
            results, (2.5, 0.75), (0.4, 0.125), ([], [(sizes, "object areas")]), strict=True
        )
    ]
    index = build_report(counted, tmp_path / "r")
    md = index.with_name("index.md").read_text()
    assert "count err" in md and "count rel" in md
    unet = _row(index.read_text(), "unet")
    assert "<strong>0.75</strong>" in unet and "<strong>0.125</strong>" in unet  # lower: best
    copied = index.parent / "figures" / "unet_sizes.png"
    assert copied.read_bytes() == sizes.read_bytes()
    assert "figures/unet_sizes.png" in md and "object areas" in md


def test_atomic_replace_and_failure_keeps_old_report(results, tmp_path, monkeypatch):
    out = tmp_path / "benchmark"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_report(results, out)
    assert not (out / "stale.txt").exists()
    before = (out / "index.html").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bm, "reliability_diagram", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(results[::-1], out)
    assert (out / "index.html").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["benchmark"]  # no temp folder left


def test_refuses_bad_inputs(results, tmp_path):
    unmarked = [ModelResult(r.name, r.metrics) for r in results]
    with pytest.raises(MicrosegError, match="baseline"):
        build_report(unmarked, tmp_path / "x")
    assert build_report(unmarked, tmp_path / "y", require_baseline=False).is_file()
    with pytest.raises(MicrosegError, match="unique"):
        build_report([results[0], results[0]], tmp_path / "z")
    with pytest.raises(MicrosegError, match="at least one"):
        build_report([], tmp_path / "w")


def test_overlay_colours_and_best_worst_choice(dataset, tmp_path):
    image, gt = dataset["img1"]
    pred = np.roll(gt, 2, axis=1)
    rgb = overlay_rgb(image, gt, pred)
    assert rgb.shape == (*gt.shape, 3) and rgb.dtype == np.uint8
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert GT_COLOUR in colours and PRED_COLOUR in colours and (255, 255, 255) in colours
    per_image = pd.DataFrame({"image_id": ["img0", "img1", "img2"], "f1_50": [0.5, 0.9, 0.1]})
    preds = {i: gt for i in per_image["image_id"]}
    ov = best_worst_overlays("m/1", per_image, lambda i: (image, gt, preds[i]), tmp_path)
    assert [(o.kind, o.image_id, o.score) for o in ov] == [
        ("best", "img1", 0.9),
        ("worst", "img2", 0.1),
    ]
    with Image.open(ov[0].path) as im:
        assert im.size == (96, 96)  # small images are drawn at 2x
    assert ov[0].path.name == "m-1_best_1.png"
