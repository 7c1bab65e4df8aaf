"""Distributed training for real: two DDP processes on the CPU (gloo), and ``device: auto``.

The script runs as its own process because Lightning's DDP launcher re-executes the command
that started it for every extra rank (as it does for a user's ``microseg train``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.draw import disk

from microseg.data.manifest import write_manifest
from microseg.data.targets import prepare_targets
from microseg.io.tiff import write_stack
from microseg.train.engine import EngineConfig, build_trainer
from microseg.utils.devices import lightning_devices, resolve_device

SCRIPT = """
import json, sys
from pathlib import Path
import torch
from microseg.models.unet.train import UnetDataModule, UnetModule, UnetTrainConfig
from microseg.train.engine import fit

targets, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = UnetTrainConfig.from_mapping({
    "model": {"arch": "unet", "features": [4, 8, 16], "num_res_units": 0},
    "patch_size": 32, "batch_size": 2, "epochs": 2, "steps_per_epoch": 3, "warmup_steps": 0,
    "seed": 5, "progress": False, "device": "cpu", "devices": 2, "strategy": "ddp",
    "num_threads": 1,
})
data = UnetDataModule(targets, cfg)
data.setup("fit")
module = UnetModule(cfg)
result = fit(module, data, cfg, out, model_config=cfg.model.as_dict())
rank = module.global_rank
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank,
    "world": module.trainer.world_size,
    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    "drawn": data.sampler.drawn,
    "global_step": module.trainer.global_step,
}))
torch.save(module.net.state_dict(), out / f"weights{rank}.pt")
"""


def _toy_targets(root: Path) -> Path:
    rows = []
    for i, split in enumerate(["train"] * 6 + ["val"] * 2):
        rng = np.random.default_rng(i)
        labels = np.zeros((64, 64), np.uint16)
        for k in range(1, 6):
            labels[disk(rng.uniform(8, 56, 2), rng.uniform(4, 7), shape=labels.shape)] = k
        image = np.clip(20 + 160 * (labels > 0) + rng.normal(0, 8, labels.shape), 0, 255)
        write_stack(root / "prepared" / "images" / f"t{i}.tif", image.astype(np.uint8))
        write_stack(root / "prepared" / "labels" / f"t{i}.tif", labels)
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


@pytest.mark.heavy
def test_ddp_two_cpu_processes_see_different_shards_and_end_identical(tmp_path):
    targets = _toy_targets(tmp_path)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(targets), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    # each rank drew its own shard of patches (its own seeded stream) ...
    assert ranks[0]["drawn"] != ranks[1]["drawn"]
    assert len(ranks[0]["drawn"]) == len(ranks[1]["drawn"]) == 3 * 2
    # ... and gradient averaging left the same weights on both
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * 3
    w0 = torch.load(out / "weights0.pt", weights_only=True)
    w1 = torch.load(out / "weights1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # rank 0 alone wrote the run's files
    assert (out / "best.pt").is_file() and (out / "last.ckpt").is_file()
    state = json.loads((out / "train_state.json").read_text())
    assert state["epochs_completed"] == 2 and state["global_step"] == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of 'auto'")
def test_device_auto_picks_the_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")
    assert lightning_devices("auto") == ("cpu", 1)
    trainer = build_trainer(EngineConfig(progress=False), Path("."), monitor="m", mode="max")
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"
    assert trainer.precision == "32-true"
    assert trainer.num_devices == 1
