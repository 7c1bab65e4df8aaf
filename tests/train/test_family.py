from __future__ import annotations

import torch

from microseg.train.family import FamilyModule, epoch_seed


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
