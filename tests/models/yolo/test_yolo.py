"""YOLO spine detector: registry, predict contract, save/load, training, resume, early stop."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microseg.errors import ConfigError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.models import MODELS, ModelFamily, get_model, register_model
from microseg.models.yolo import (
    YoloSpineDetector,
    _bgr3,
    is_resumable,
    offline_guards,
    run_state,
)
from microseg.models.yolo.runs import FIXED_DATE, _load_ckpt, network_classes
from microseg.train.hooks import EarlyStopping, HookBase


def _blob_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 64) -> Path:
    """Tiny Ultralytics dataset: dark images with 1-3 bright square blobs, boxed exactly."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 30, (size, size)).astype(np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w = int(rng.integers(6, 12))
                x, y = (int(v) for v in rng.integers(2, size - w - 2, 2))
                img[y : y + w, x : x + w] = 230
                lines.append(f"0 {(x + w / 2) / size} {(y + w / 2) / size} {w / size} {w / size}")
            Image.fromarray(img).save(root / "images" / split / f"im{i}.png")
            (root / "labels" / split / f"im{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: spine\n")
    return data


class Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.threads: list[int] = []  # torch's threads in each epoch
        self.threads_after = 0

    def before_train(self, config):
        self.events.append(("before_train", dict(config)))

    def after_epoch(self, epoch, metrics):
        self.threads.append(torch.get_num_threads())
        self.events.append(("after_epoch", epoch, dict(metrics)))

    def after_checkpoint(self, path, is_best):
        self.events.append(("after_checkpoint", Path(path), is_best))

    def after_train(self, best, best_path):
        self.events.append(("after_train", dict(best), best_path))

    def named(self, name: str) -> list[tuple]:
        return [e for e in self.events if e[0] == name]


TINY = {"imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "seed": 0, "num_threads": 1}
TWO_THREADS = {**TINY, "num_threads": 2}


# ------------------------------------------------------------------------------ registry
def test_registry_finds_yolo_and_rejects_unknown_names():
    assert get_model("yolo") is YoloSpineDetector
    for name in ("punet", "unet"):  # other families register on first lookup
        assert get_model(name).__module__ == f"microseg.models.{name}"
    assert MODELS.get("yolo") is YoloSpineDetector
    with pytest.raises(ConfigError, match="unknown model"):
        get_model("no-such-model")


def test_register_model_refuses_a_second_owner_of_a_name():
    @register_model("_test_family")
    class A:
        pass

    try:
        assert get_model("_test_family") is A
        with pytest.raises(ConfigError, match="already registered"):

            @register_model("_test_family")
            class B:
                pass
    finally:
        MODELS.remove("_test_family")


def test_detector_follows_the_model_family_protocol():
    det = YoloSpineDetector.build("n")
    assert isinstance(det, ModelFamily)
    with pytest.raises(ConfigError, match="arch"):
        YoloSpineDetector.build("q")


def test_train_splits_a_params_section_into_build_fit_and_ultralytics_arguments(
    tmp_path, monkeypatch
):
    seen = {}

    def fake_fit(self, data_yaml, out_dir, **kwargs):
        seen.update(det=self, data=data_yaml, out=out_dir, **kwargs)
        return "result"

    monkeypatch.setattr(YoloSpineDetector, "fit", fake_fit)
    section = {"arch": "n", "epochs": 3, "lr0": 0.01, "augment": {"scale": 0.1}, "box": 5.0,
               "extra": {"cls": 0.3}, "meta": {"channels": "25d"}}  # fmt: skip
    out = get_model("yolo").train("d.yaml", tmp_path, section, hooks=None, resume=False)
    assert out == "result" and seen["data"] == "d.yaml" and seen["resume"] is False
    assert seen["epochs"] == 3 and seen["lr0"] == 0.01 and seen["augment"] == {"scale": 0.1}
    assert seen["extra"] == {"cls": 0.3, "box": 5.0}  # not fit arguments: Ultralytics'
    assert seen["det"].meta == {"arch": "n", "channels": "25d"}
    assert "arch" not in seen and "meta" not in seen


def test_check_train_keys_knows_fit_ultralytics_and_augment_keys():
    YoloSpineDetector.check_train_keys(["lr0", "arch", "box", "warmup_epochs", "augment.mixup"])
    for bad in ("project", "extra", "augment.sparkle", "lr00", "meta.channels"):
        with pytest.raises(ConfigError, match="unknown yolo training knob"):
            YoloSpineDetector.check_train_keys([bad])


# ------------------------------------------------------------------------------ predict
@pytest.fixture(scope="module")
def untrained() -> YoloSpineDetector:
    torch.manual_seed(0)
    return YoloSpineDetector.build("n", channels="single")


def test_predict_returns_one_box_array_per_image(untrained):
    grey = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    out = untrained.predict([grey, rgb, grey], conf=0.0, iou=0.7, max_det=7)
    assert len(out) == 3
    for boxes in out:
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 5
        assert len(boxes) <= 7
        if len(boxes):
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 4] >= 0).all()
            assert boxes[:, [0, 2]].max() <= 96 + 1e-3 and boxes[:, [1, 3]].max() <= 64 + 1e-3
    assert untrained.predict([]) == []


def test_predict_rejects_bad_images(untrained):
    with pytest.raises(ShapeMismatchError, match="uint8"):
        untrained.predict([np.zeros((32, 32), np.uint16)])
    with pytest.raises(ShapeMismatchError, match="HxW"):
        untrained.predict([np.zeros((32, 32, 4), np.uint8)])


def test_save_load_round_trip_keeps_weights_and_meta(untrained, tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)
    path = untrained.save(tmp_path / "model.pt")
    loaded = YoloSpineDetector.load(path)
    assert loaded.meta["channels"] == "single" and loaded.meta["arch"] == "n"
    a = untrained.predict([img], conf=0.0, max_det=20)[0]
    b = loaded.predict([img], conf=0.0, max_det=20)[0]
    np.testing.assert_allclose(a, b, atol=1e-2)  # saved in fp16
    with pytest.raises(MissingFileError):
        YoloSpineDetector.load(tmp_path / "none.pt")


class _Payload:
    """Unpickling this calls os.system: what a hostile .pt would do."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_checkpoint_naming_other_code_is_refused_before_it_runs(untrained, tmp_path):
    good = untrained.save(tmp_path / "model.pt")
    assert {c.__name__ for c in network_classes(good)} >= {"DetectionModel", "Conv2d"}
    bad = tmp_path / "bad.pt"
    torch.save({"model": _Payload(), "epoch": 3, "optimizer": {}}, bad)
    with pytest.raises(DataFormatError, match=r"(os|posix)\.system"):
        YoloSpineDetector.load(bad)
    assert run_state(bad) == "unreadable"  # a resume check never runs it either
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_channels_reach_ultralytics_in_bgr_order():
    """PNGs hold planes z-1, z, z+1 as R, G, B; Ultralytics takes numpy input as BGR."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    assert _bgr3(rgb)[0, 0].tolist() == [30, 20, 10]
    assert _bgr3(np.full((4, 4), 7, np.uint8))[0, 0].tolist() == [7, 7, 7]


def test_run_state_tells_missing_unreadable_and_interrupted(tmp_path):
    assert run_state(tmp_path / "last.pt") == "missing"
    (tmp_path / "last.pt").write_bytes(b"truncated")
    assert run_state(tmp_path / "last.pt") == "unreadable"
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, tmp_path / "last.pt")
    assert run_state(tmp_path / "last.pt") == "interrupted"
    torch.save({"epoch": -1, "optimizer": None}, tmp_path / "last.pt")
    assert run_state(tmp_path / "last.pt") == "finished"


def test_offline_guards_block_font_download_and_restore():
    import ultralytics.data.utils as data_utils

    original = data_utils.check_font
    with offline_guards():
        assert data_utils.check_font("Arial.ttf") is None
    assert data_utils.check_font is original


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo_train")
    data = _blob_dataset(root / "data")
    rec = Recorder()
    det = YoloSpineDetector.build("n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = det.fit(data, root / "runs", epochs=2, patience=50, hooks=rec, **TWO_THREADS)
        rec.threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return det, result, rec, data, root


def test_training_on_the_cpu_uses_the_threads_asked_for_then_restores(trained):
    """Ultralytics sets min(8, cores - 1) threads (1 on a 2-core runner) and leaves it set."""
    rec = trained[2]
    assert rec.threads == [2, 2]
    assert rec.threads_after == 1


def test_training_writes_checkpoints_and_drives_hooks(trained):
    det, result, rec, data, root = trained
    assert result.save_dir == (root / "runs" / "train").resolve()
    assert result.last.is_file() and result.best is not None and result.best.is_file()
    assert not is_resumable(result.last)  # finished: optimizer stripped
    assert rec.events[0][0] == "before_train"
    assert rec.events[-1][0] == "after_train"
    assert [e[1] for e in rec.named("after_epoch")] == [0, 1]
    config = rec.named("before_train")[0][1]
    assert config["epochs"] == 2 and config["imgsz"] == 64 and config["pretrained"] is False
    assert config["patience"] == 50 and config["optimizer"] == "AdamW" and config["mosaic"] == 0.8
    metrics = rec.named("after_epoch")[0][2]
    for key in ("train/box_loss", "val/precision", "val/recall", "val/mAP50", "val/mAP50-95"):
        assert key in metrics
    assert any(k.startswith("lr/") for k in metrics)
    saved = rec.named("after_checkpoint")
    assert {(p.name, b) for _, p, b in saved} >= {("last.pt", False), ("best.pt", True)}
    best, best_path = rec.named("after_train")[0][1:]
    assert best_path == result.best and "fitness" in best and best["best_epoch"] in (0.0, 1.0)
    assert det.yolo.trainer.amp is False  # no autocast on CPU (Ultralytics' own rule)
    assert not list(data.parent.rglob("*.cache"))  # the dataset is left as it was
    # the detector now holds the trained weights
    out = det.predict([np.zeros((64, 64), np.uint8)], conf=0.01)
    assert len(out) == 1


def test_finished_run_is_not_trained_again(trained, tmp_path):
    _, result, _, data, root = trained
    before = result.best.stat().st_mtime_ns
    rec = Recorder()
    again = YoloSpineDetector.build("n").fit(data, root / "runs", epochs=2, hooks=rec, **TINY)
    assert again.already_finished and again.best == result.best
    assert rec.events == [] and result.best.stat().st_mtime_ns == before


class _Interrupt(Exception):
    pass


class _CrashAfterFirstSave(HookBase):
    def after_checkpoint(self, path, is_best):
        if path.name == "last.pt":
            raise _Interrupt


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    data = _blob_dataset(tmp_path / "data")
    with pytest.raises(_Interrupt):
        YoloSpineDetector.build("n").fit(
            data, tmp_path / "runs", epochs=3, patience=50, hooks=_CrashAfterFirstSave(), **TINY
        )
    last = tmp_path / "runs" / "train" / "weights" / "last.pt"
    assert is_resumable(last)
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    # not normalised while resumable: Ultralytics resumes from these paths
    assert str(tmp_path) in (last.parent.parent / "args.yaml").read_text()
    rec = Recorder()
    result = YoloSpineDetector.build("n").fit(data, tmp_path / "runs", epochs=3, hooks=rec, **TINY)
    assert result.resumed and not is_resumable(result.last)
    assert [e[1] for e in rec.named("after_epoch")] == [1, 2]  # epoch 0 was not redone
    assert rec.named("before_train")[0][1]["start_epoch"] == 1
    rows = (result.save_dir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + every epoch once
    assert "time" not in rows[0].split(",") and (result.save_dir / "timing.json").is_file()
    assert str(tmp_path) not in (result.save_dir / "args.yaml").read_text()


def test_a_hook_can_stop_training_early(tmp_path):
    data = _blob_dataset(tmp_path / "data")
    stopper = EarlyStopping("train/box_loss", patience=0, mode="min")
    stopper.best = -1.0  # nothing beats it: stop after the first epoch
    rec = Recorder()
    from microseg.train.hooks import Hooks

    YoloSpineDetector.build("n").fit(
        data, tmp_path / "runs", epochs=5, patience=50, hooks=Hooks([stopper, rec]), **TINY
    )
    assert [e[1] for e in rec.named("after_epoch")] == [0]


def test_train_rejects_unknown_and_managed_arguments(tmp_path):
    data = tmp_path / "d.yaml"
    data.write_text("path: .\n")
    det = YoloSpineDetector.build("n")
    with pytest.raises(ConfigError, match="unknown"):
        det.fit(data, tmp_path, augment={"sparkle": 1.0}, **TINY)
    with pytest.raises(ConfigError, match="set by microseg"):
        det.fit(data, tmp_path, extra={"project": "x"}, **TINY)
    with pytest.raises(MissingFileError):
        det.fit(tmp_path / "none.yaml", tmp_path, **TINY)


def test_same_seed_same_weights(trained, tmp_path):
    """A second run of the same data and arguments ends with the same tensors (issue 16):
    Ultralytics seeds torch, NumPy and random and runs deterministic algorithms (its
    ``deterministic=True``), and our loader has one worker."""
    _, result, _, data, _ = trained
    again = YoloSpineDetector.build("n").fit(
        data, tmp_path / "runs", epochs=2, patience=50, **TWO_THREADS
    )  # as `trained` (another thread count rounds differently)
    a = YoloSpineDetector.load(result.last).yolo.model.state_dict()
    b = YoloSpineDetector.load(again.last).yolo.model.state_dict()
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)


def _md5s(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder`` (but ``timing.json``: DVC ignores it), by path."""
    return {
        f.relative_to(folder).as_posix(): hashlib.md5(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != "timing.json"
    }


def test_same_training_twice_writes_the_same_bytes(tmp_path, train_twice):
    """The run folder is a DVC output: trained again elsewhere and later, with the same seed,
    every file has the same bytes (no absolute paths, dates, git record or wall-clock times),
    and the normalised checkpoints still load, predict and tell a finished run."""
    data = _blob_dataset(tmp_path / "data")
    a, b = train_twice("yolo", data, {"epochs": 2, "patience": 50, **TINY})
    assert a.save_dir != b.save_dir
    md5 = _md5s(a.save_dir.parent)
    expected = {"args.yaml", "results.csv", "weights/last.pt", "weights/best.pt"}
    assert {f"train/{f}" for f in expected} <= md5.keys()
    assert md5 == _md5s(b.save_dir.parent)

    assert str(tmp_path) not in (a.save_dir / "args.yaml").read_text()
    ckpt = _load_ckpt(a.best)
    assert ckpt["date"] == FIXED_DATE and "git" not in ckpt
    assert "time" not in ckpt["train_results"]
    assert str(tmp_path) not in repr(ckpt["train_args"]) + repr(ckpt["model"].args)
    assert ckpt["train_args"]["data"] == "../data/data.yaml"
    assert "time" not in (a.save_dir / "results.csv").read_text().splitlines()[0].split(",")
    timing = json.loads((a.save_dir / "timing.json").read_text())
    assert [e["epoch"] for e in timing["epochs"]] == [1, 2] and timing["seconds"] > 0

    assert run_state(a.last) == "finished" and not is_resumable(a.best)
    det = YoloSpineDetector.load(a.best)
    assert len(det.predict([np.zeros((64, 64), np.uint8)], conf=0.01)) == 1
    again = YoloSpineDetector.build("n").fit(data, tmp_path / "a", epochs=2, patience=50, **TINY)
    assert again.already_finished and again.best == a.best
    assert _md5s(a.save_dir.parent) == md5  # a finished run is left as it is
    assert len(again.metrics) > 0  # read back from the normalised checkpoint
