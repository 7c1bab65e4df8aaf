"""A training run killed for real (SIGTERM, then SIGKILL) and restarted ends where an
uninterrupted run ends: same steps, same weights, same best, nothing left half-written.

The killed runs are separate processes (``SCRIPT``: a tiny U-Net on toy nuclei, four epochs,
pausing after each epoch so the test can kill it between epochs or inside one); the reference
and the final resume run in this process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import prepare_targets
from microseg.io.tiff import write_stack
from microseg.models.unet.train import UnetTrainConfig, train_unet

CFG = {
    "model": {"arch": "unet", "features": [4, 8, 16], "num_res_units": 0, "dropout": 0.2},
    "patch_size": 32,
    "batch_size": 2,
    "epochs": 4,
    "steps_per_epoch": 3,
    "warmup_steps": 0,
    "progress": False,
    "seed": 3,
    "num_threads": 1,
}

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from microseg.models.unet.train import UnetTrainConfig, train_unet
    from microseg.train.hooks import HookBase

    class Pause(HookBase):
        def after_epoch(self, epoch, metrics):
            print("EPOCH", epoch, flush=True)
            time.sleep(1.5)

    cfg = UnetTrainConfig.from_mapping(json.loads(sys.argv[3]))
    train_unet(sys.argv[1], sys.argv[2], cfg, hooks=Pause())
    """
)


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    rows = []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        rng = np.random.default_rng(i)
        labels = np.zeros((64, 64), np.uint16)
        for k in range(1, 6):
            labels[disk(rng.uniform(8, 56, 2), rng.uniform(4, 7), shape=(64, 64))] = k
        image = np.clip(20 + 160 * (labels > 0) + rng.normal(0, 8, labels.shape), 0, 255)
        write_stack(root / "prepared/images" / f"t{i}.tif", image.astype(np.uint8))
        write_stack(root / "prepared/labels" / f"t{i}.tif", labels)
        rows.append(
            {
                "sample_id": f"t{i}",
                "split": split,
                "task": "nuclei",
                "image_path": f"images/t{i}.tif",
                "label_path": f"labels/t{i}.tif",
                "label_kind": "instance",
                "modality": "fluorescence",
            }
        )
    write_manifest(rows, root / "prepared")
    prepare_targets(root / "prepared", root / "targets", progress=False)
    return root / "targets"


def _epochs(out: Path) -> int:
    try:
        return int(json.loads((out / "train_state.json").read_text())["epochs_completed"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_and_kill(targets: Path, out: Path, at_epoch: int, sig: int) -> None:
    """Start a training process, wait until ``at_epoch`` epochs are saved, send ``sig``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(targets), str(out), json.dumps(CFG)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while _epochs(out) < at_epoch:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never reached the epoch"
        time.sleep(0.05)
    time.sleep(0.3)  # inside the pause or the next epoch, not at the checkpoint write
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # SIGTERM not honoured: what an operator does next
        proc.kill()
        proc.wait()
    # never 0: DVC would record the half-trained model as the stage's output
    assert proc.returncode != 0, proc.communicate()[1][-2000:]
    if sig == signal.SIGTERM:
        assert "Terminated: SIGTERM after" in proc.stderr.read()


@pytest.mark.heavy
def test_killed_training_resumes_to_the_uninterrupted_result(targets: Path, tmp_path: Path):
    cfg = UnetTrainConfig.from_mapping(CFG)
    full = train_unet(targets, tmp_path / "full", cfg)
    cut = tmp_path / "cut"
    _run_and_kill(targets, cut, 1, signal.SIGTERM)
    after_term = _epochs(cut)  # >= 1: _run_and_kill waited for it
    _run_and_kill(targets, cut, after_term + 1, signal.SIGKILL)
    after_kill = _epochs(cut)
    assert after_term < after_kill < 4  # the second run resumed, not restarted
    resumed = train_unet(targets, cut, cfg)
    assert resumed.resumed_from_epoch == after_kill and resumed.epochs_completed == 4

    a = torch.load(cut / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == full.global_step == 12
    assert all(torch.allclose(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    assert resumed.best["val_f1_50"] == pytest.approx(full.best["val_f1_50"], abs=1e-6)
    assert not [p for p in cut.rglob("*") if ".tmp" in p.name], "a killed run left temp files"
