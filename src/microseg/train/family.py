"""What a family's training code builds on: the LightningModule and DataModule bases of the
engine (:mod:`microseg.train.engine`) and the seeded random-batch stream.

Random batches: an epoch is ``steps_per_epoch`` batches drawn by the family from a generator
seeded by ``(seed, epoch, rank)`` (:class:`EpochBatches`), so a resumed run draws the batches
an uninterrupted one would, and DDP ranks draw different shards.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from microseg.errors import ConfigError, DataFormatError
from microseg.train.phases import phase_at, phase_config
from microseg.train.schedules import warmup_cosine
from microseg.utils.atomic import write_torch


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch's batches on one rank (rank 0 keeps the pre-Lightning formula)."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**31


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (dropout, MONAI's defaults)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside distributed training)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochBatches(torch.utils.data.IterableDataset):
    """``steps`` batches per epoch from ``draw(rng)``; ``set_epoch`` re-seeds the stream."""

    def __init__(
        self,
        draw: Callable[[np.random.Generator], Any],
        steps: int,
        seed: int,
        reseed: Callable[[int], None] | None = None,
    ) -> None:
        self.draw, self.steps, self.seed, self.reseed = draw, steps, seed, reseed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        rank, _ = world()
        seed = epoch_seed(self.seed, self.epoch, rank)
        if self.reseed is not None:
            self.reseed(seed)
        rng = np.random.default_rng(seed)
        for _ in range(self.steps):
            yield self.draw(rng)


def batches_loader(dataset: EpochBatches, workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader that hands the family's ready batches through unchanged.

    ``workers=1`` draws (crops, augmentation) in one worker process while the main one trains:
    on a CPU whose training runs one torch thread, the second core otherwise idles (drawing
    is 18-25 % of a U-Net/MAUNet step). The stream is the same as in-process: one worker, the
    same seed per epoch, and a fresh worker each epoch, so it sees the epoch ``set_epoch`` set.
    More workers would interleave their batches; refused by the config check.

    The worker starts with the platform's own method (fork on Linux, spawn on macOS), named
    explicitly: inside a joblib/loky process (``microseg seeds --jobs 2``) the process-wide
    default is loky's context, whose processes torch's loader cannot start.
    """
    context = multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context=context if workers else None,
    )


class FamilyModule(L.LightningModule):
    """What the engine needs of a family's LightningModule beyond Lightning's own API, and
    the plumbing every family shares (checkpoint tag, per-step schedule, validation logging).
    """

    #: the validation metric that picks ``best.pt`` (logged with ``self.log``)
    monitor: str = "val_loss"
    mode: str = "max"
    #: tag stored in ``last.ckpt``: a checkpoint of another family or version is refused
    checkpoint_format: str = ""

    def export_model(self, path: Path, metrics: Mapping[str, float]) -> None:
        """Write the best weights to ``path`` atomically. Families override this with their
        own model format (what their ``load`` reads); the default keeps the whole module's
        state dict with the metrics, loadable with ``torch.load(weights_only=True)``."""
        payload = {
            "format": "microseg.lightning/1",
            "model": self.state_dict(),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        write_torch(path, payload)

    def flat_config(self) -> dict[str, Any]:
        """The flat training config, for ``HookBase.before_train`` (logged as params)."""
        cfg = getattr(self, "cfg", None)
        return cfg.as_dict() if hasattr(cfg, "as_dict") else {}

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_format"] = self.checkpoint_format

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("train_format") != self.checkpoint_format:
            raise DataFormatError(
                f"expected a {self.checkpoint_format} checkpoint, found "
                f"{checkpoint.get('train_format')!r}; delete it to start over"
            )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        if is_dataclass(batch):  # whole validation samples stay on the host: the family's
            return batch  # predictor moves each window or tile to the network's device
        return super().transfer_batch_to_device(batch, device, idx)

    def log_val(self, metrics: Mapping[str, float]) -> None:
        """One validation image's scores; Lightning averages them over images and ranks."""
        for name, value in metrics.items():
            self.log(name, float(value), on_epoch=True, batch_size=1, sync_dist=True)


class SampledDataModule(L.LightningDataModule):
    """Training batches drawn by ``self.sampler`` (``batch(rng)``, ``reseed(seed)``) through
    :class:`EpochBatches`; validation on ``self.val_samples``, whole, one per step."""

    #: the family's train config (an ``engine.EngineConfig``: steps_per_epoch, seed)
    cfg: Any
    sampler: Any = None
    val_samples: Sequence[Any] = ()

    @property
    def has_val(self) -> bool:
        return bool(self.val_samples)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        s = self.sampler
        if s is None:
            raise ConfigError("the data module has no sampler: call setup() first")
        dataset = EpochBatches(s.batch, self.cfg.steps_per_epoch, self.cfg.seed, s.reseed)
        # Lightning creates the first epoch's iterator (a worker process, with workers=1)
        # before ``on_train_epoch_start``: the epoch and phase a run starts (or resumes) at
        # must be in place already
        trainer = getattr(self, "trainer", None)
        # the epoch Lightning's own samplers get (``current_epoch`` lags it on resume here)
        epoch = int(trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else 0
        dataset.set_epoch(epoch)
        phases = getattr(self.__dict__.get("_base_cfg", self.cfg), "phases", None)
        if phases:
            self.set_phase(phase_at(phases, epoch).overrides())
        return batches_loader(dataset, workers=int(getattr(self.cfg, "loader_workers", 0)))

    def set_phase(self, overrides: Mapping[str, Any]) -> None:
        """Start a phase of a staged schedule (:mod:`microseg.train.phases`): the train config
        with the phase's data knobs (over the config this module was built with, not the
        previous phase's) goes to the sampler's ``configure(cfg)``, which rebuilds its
        augmentation. A sampler without ``configure`` can only run phases that change no data
        knob."""
        base = self.__dict__.setdefault("_base_cfg", self.cfg)
        configure = getattr(self.sampler, "configure", None)
        if configure is None:
            if overrides:
                raise ConfigError(
                    f"{type(self).__name__} cannot change {sorted(overrides)} per phase: its "
                    "sampler has no configure(cfg)"
                )
            return
        self.cfg = phase_config(base, overrides)
        configure(self.cfg)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if not self.val_samples:
            return []
        return torch.utils.data.DataLoader(
            list(self.val_samples), batch_size=None, collate_fn=_whole, num_workers=0
        )


def _whole(sample: Any) -> Any:
    return sample


def per_step_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    floor: float,
    constant: bool = False,
) -> dict[str, Any]:
    """Lightning's optimizer config with a warm-up + cosine ``LambdaLR`` stepped per step."""
    factor = warmup_cosine(total_steps, warmup_steps, floor=floor, constant=constant)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
