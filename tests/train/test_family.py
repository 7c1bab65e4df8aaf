from __future__ import annotations

import torch

from microseg.train.family import EpochBatches, FamilyModule, batches_loader, epoch_seed


class _Linear(FamilyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 2)


def test_default_export_is_a_safe_state_dict(tmp_path):
    module = _Linear()
    module.export_model(tmp_path / "best.pt", {"val": torch.tensor(0.5)})
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["format"] == "microseg.lightning/1" and saved["metrics"] == {"val": 0.5}
    assert torch.equal(saved["model"]["net.weight"], module.net.weight)
    assert not list(tmp_path.glob("*.tmp*"))


def test_epoch_seed_keeps_the_old_formula_on_rank_0_and_differs_by_rank():
    assert epoch_seed(42, 3) == (42 * 1_000_003 + 3 * 7919) % 2**31
    assert epoch_seed(42, 3, rank=1) != epoch_seed(42, 3, rank=0)


class _Sampler:
    """Draws from the epoch's rng and from torch's global RNG (as MONAI transforms do),
    reseeded per epoch like the families' samplers."""

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed + 1)

    def batch(self, rng) -> torch.Tensor:
        return torch.tensor(rng.integers(0, 1000, 4)) + torch.randint(0, 1000, (4,))


def _epochs(workers: int) -> list[torch.Tensor]:
    sampler = _Sampler()
    dataset = EpochBatches(sampler.batch, steps=5, seed=3, reseed=sampler.reseed)
    loader = batches_loader(dataset, workers=workers)
    out = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        out.extend(loader)
    return out


def test_a_loader_worker_draws_the_same_batches_as_the_training_process():
    inline, worker = _epochs(0), _epochs(1)
    assert len(inline) == 10 and not torch.equal(inline[0], inline[5])  # epochs differ
    assert all(torch.equal(a, b) for a, b in zip(inline, worker, strict=True))


def test_loader_workers_beyond_one_are_refused():
    import pytest

    from microseg.errors import ConfigError
    from microseg.train.engine import EngineConfig

    with pytest.raises(ConfigError, match="loader_workers"):
        EngineConfig(loader_workers=2)


#: run as a script so that loky pickles the worker function by value (a test module is not
#: importable in a fresh loky process)
_IN_LOKY = """
import torch
from joblib import Parallel, delayed
from microseg.train.family import EpochBatches, batches_loader

def draw(rng):
    return torch.tensor(rng.integers(0, 1000, 4))

def total():
    loader = batches_loader(EpochBatches(draw, steps=3, seed=3), workers=1)
    return int(sum(int(b.sum()) for b in loader))

inside = Parallel(n_jobs=2, backend="loky")(delayed(total)() for _ in "ab")
assert inside == [total()] * 2, inside
print("ok", inside)
"""


def test_a_loader_worker_starts_inside_a_joblib_worker():
    """`microseg seeds --jobs 2` trains in loky processes, whose default multiprocessing
    context cannot start torch's loader workers; the loader names the platform's own."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _IN_LOKY], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-2000:]
