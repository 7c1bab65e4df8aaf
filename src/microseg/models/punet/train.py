"""Training loop for the Probabilistic U-Net on DeepD3 ``.d3set`` files.

One epoch = ``steps_per_epoch`` batches of random patches (:class:`PatchDataset`), then a
deterministic validation on whole planes of the validation stacks with the prior mean
latent (or the mean probability of a few prior samples): spine and dendrite Dice, precision
and recall at probability 0.5. The checkpoint with the best validation spine Dice is
``best.pt``; ``last.pt`` is rewritten after every epoch. Both hold model, optimizer,
scheduler, GECO state, epoch, best metrics, history and RNG states, and are written
atomically. Calling :func:`train_punet` again on the same ``out_dir`` continues from
``last.pt`` where the previous call stopped (after a crash, a kill or an exception from a
hook), with the same optimizer state and RNG streams, so an interrupted and resumed run ends
with the same weights as an uninterrupted one.

Loss per step: ``w_s * Tversky(spine) + w_d * Tversky(dendrite) + beta * (KL_s + KL_d)``
with the posterior sample's logits, ``beta`` ramped linearly from 0 over
``kl_warmup_epochs`` (or GECO: minimise KL subject to the reconstruction loss staying below
``geco_goal``). Non-finite losses or gradients skip the step and are counted
(``nonfinite_steps``); more than ``max_nonfinite_steps`` in one epoch raises
:class:`TrainingDiverged` naming the epoch.

Logging reaches MLflow/Optuna only through ``hooks`` (``train.hooks.HookBase``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from microseg.data.patches import (
    DEFAULT_PERCENTILES,
    LabeledStack,
    PatchDataset,
    iter_planes,
    labeled_stacks,
)
from microseg.errors import ConfigError, MicrosegError
from microseg.io.d3set import D3Set
from microseg.models.punet import HEADS, ProbUNet, build_punet, pad_to_multiple
from microseg.train.checkpoint import load_checkpoint, save_checkpoint
from microseg.train.hooks import HookBase, Hooks
from microseg.train.losses import Geco, TverskyLoss, free_bits, linear_warmup
from microseg.utils.fields import known_fields

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microseg.punet/1"
D3Source = D3Set | str | Path | Sequence[D3Set | str | Path]


class TrainingDiverged(MicrosegError):
    """The loss or its gradient stayed NaN/inf: training stopped."""


@dataclass
class PunetTrainConfig:
    """Every knob of :func:`train_punet`. Defaults: a CPU demo that trains in minutes.

    On the synthetic spine data (6 train / 2 val stacks of 32x256x256) the defaults (320
    steps of 8 patches of 128 px, 157k parameters) reach validation spine Dice 0.61 and
    dendrite Dice 0.86 in about 3.5 minutes on 2 busy CPU cores with ``num_threads=1``.
    DeepD3.V2's full size is ``filters=(32, 64, 128, 192)``, ``latent_dim_*=12``,
    ``head_convs=4``, ``dual_decoder=True``, 50 epochs of 2048 batches of 16 on a GPU.
    """

    # model
    filters: tuple[int, ...] = (16, 32, 64)
    latent_filters: tuple[int, ...] | None = (8, 16, 32)
    latent_dim_spine: int = 6
    latent_dim_dendrite: int = 6
    head_convs: int = 3
    head_hidden: int | None = None  # channels inside a head (None: filters[0])
    dual_decoder: bool = False
    context: int = 0  # planes each side as input channels (1 -> 2.5D, in_channels=3)
    # data
    patch_size: int = 128
    batch_size: int = 8
    fg_fraction: float = 0.5
    augment: bool = True
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    num_workers: int = 0
    # schedule
    epochs: int = 8
    steps_per_epoch: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-5
    lr_warmup_steps: int = 20
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip_norm: float | None = 1.0
    # loss
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    tversky_gamma: float = 1.0
    loss_weight_spine: float = 1.0
    loss_weight_dendrite: float = 1.0
    kl_beta: float = 1.0
    kl_warmup_epochs: float = 2.0
    kl_free_bits: float = 0.5  # nats per head (DeepD3.V2), keeps the latents in use
    kl_schedule: Literal["linear", "geco"] = "linear"
    geco_goal: float = 0.5
    geco_step_size: float = 1e-2
    geco_alpha: float = 0.99
    max_nonfinite_steps: int = 10
    # validation
    val_every: int = 1
    val_batch_planes: int = 8
    val_plane_stride: int = 1
    val_samples: int = 0  # 0 = prior mean; n > 0 = mean probability of n prior samples
    # run
    seed: int = 42
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads while training (None: leave as is)
    progress: bool = True

    def __post_init__(self) -> None:
        self.filters = tuple(int(f) for f in self.filters)
        if self.latent_filters is not None:
            self.latent_filters = tuple(int(f) for f in self.latent_filters)
        self.percentiles = tuple(float(p) for p in self.percentiles)  # type: ignore[assignment]
        checks = {
            "epochs": self.epochs >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "val_every": self.val_every >= 1,
            "context": self.context >= 0,
            "fg_fraction": 0.0 <= self.fg_fraction <= 1.0,
            "kl_beta": self.kl_beta >= 0,
            "kl_schedule": self.kl_schedule in ("linear", "geco"),
            "lr_schedule": self.lr_schedule in ("cosine", "constant"),
            "filters": len(self.filters) >= 2,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid Probabilistic U-Net training config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )
        multiple = 2 ** (len(self.filters) - 1)
        if self.patch_size % multiple:
            raise ConfigError(
                f"patch_size {self.patch_size} must be a multiple of {multiple} "
                f"({len(self.filters)} U-Net levels)"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PunetTrainConfig:
        """Build from a dict (e.g. a params.yaml section); unknown keys are an error."""
        return cls(**known_fields(cls, values, "punet training"))

    def model_config(self) -> dict[str, Any]:
        """Constructor arguments of the :class:`ProbUNet` this config trains."""
        return ProbUNet(
            in_channels=2 * self.context + 1,
            filters=self.filters,
            latent_dim_spine=self.latent_dim_spine,
            latent_dim_dendrite=self.latent_dim_dendrite,
            head_convs=self.head_convs,
            head_hidden=self.head_hidden,
            dual_decoder=self.dual_decoder,
            latent_filters=self.latent_filters,
        ).config

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class TrainResult:
    """What a finished (or already finished) training run leaves behind."""

    best: dict[str, float]
    best_epoch: int | None
    best_path: Path | None
    last_path: Path
    epochs_completed: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    seconds: float = 0.0


# -- helpers --------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(cfg: PunetTrainConfig):
    total = cfg.epochs * cfg.steps_per_epoch
    warm = max(0, cfg.lr_warmup_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _iter_hooks(hook: HookBase | None):
    if hook is None:
        return
    yield hook
    if isinstance(hook, Hooks):
        for h in hook.hooks:
            yield from _iter_hooks(h)


def _should_stop(hook: HookBase | None) -> bool:
    return any(getattr(h, "should_stop", False) for h in _iter_hooks(hook))


def _counts(prob: torch.Tensor, target: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    pred = prob >= thr
    gt = target > 0.5
    tp = (pred & gt).sum()
    fp = (pred & ~gt).sum()
    fn = (~pred & gt).sum()
    return torch.stack([tp, fp, fn]).double()


def _scores(counts: torch.Tensor) -> dict[str, float]:
    tp, fp, fn = (float(c) for c in counts)
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }


@torch.no_grad()
def validate_punet(
    model: ProbUNet,
    stacks: Sequence[LabeledStack],
    *,
    context: int = 0,
    batch_planes: int = 8,
    plane_stride: int = 1,
    n_samples: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dice/precision/recall per head over whole validation planes, pooled over all voxels.

    ``n_samples=0`` uses the prior mean latent (one deterministic pass); otherwise the mean
    probability of ``n_samples`` prior draws from a generator seeded with ``seed``.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed) if n_samples else None
    counts = {h: torch.zeros(3, dtype=torch.float64) for h in HEADS}
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, model.pad_multiple)
        features = model.unet_features(xp)
        prior = model.prior(xp)
        if n_samples:
            logits = model.sample_heads(features, prior, n_samples, generator=gen)
            probs = {k: torch.sigmoid(v).mean(1) for k, v in logits.items()}
        else:
            z = {k: d.mean for k, d in prior.items()}
            probs = {k: torch.sigmoid(v[:, 0]) for k, v in model.head_logits(features, z).items()}
        targets = {
            "spine": torch.from_numpy(np.stack([b[1] for b in batch])),
            "dendrite": torch.from_numpy(np.stack([b[2] for b in batch])),
        }
        for k in HEADS:
            counts[k] += _counts(probs[k][..., :h, :w].cpu(), targets[k])
        batch.clear()

    for item in iter_planes(stacks, context=context, stride=plane_stride):
        batch.append(item)
        if len(batch) >= batch_planes:
            flush()
    if batch:
        flush()
    model.train(was_training)
    metrics = {}
    for k in HEADS:
        for name, value in _scores(counts[k]).items():
            metrics[f"val_{k}_{name}"] = value
    return metrics


# -- the loop -------------------------------------------------------------------------------
class _PunetRun:
    """Model, optimizer, schedule and bookkeeping of one run; checkpointable as a dict."""

    def __init__(self, cfg: PunetTrainConfig, model_config: dict[str, Any], device) -> None:
        self.cfg, self.model_config, self.device = cfg, model_config, device
        _seed_everything(cfg.seed)
        self.model = build_punet(model_config).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.geco = (
            Geco(cfg.geco_goal, step_size=cfg.geco_step_size, alpha=cfg.geco_alpha)
            if cfg.kl_schedule == "geco"
            else None
        )
        self.recon_loss = TverskyLoss(cfg.tversky_alpha, cfg.tversky_beta, cfg.tversky_gamma)
        self.kl_warmup_steps = round(cfg.kl_warmup_epochs * cfg.steps_per_epoch)
        self.epoch = self.global_step = 0
        self.best: dict[str, float] = {}
        self.best_epoch: int | None = None
        self.history: list[dict[str, float]] = []

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, finished: bool, stopped_early: bool = False) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "geco": self.geco.state_dict() if self.geco is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "rng": _rng_state(),
            "train_config": self.cfg.as_dict(),
            "finished": finished,
            "stopped_early": stopped_early,
        }

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.geco is not None and ckpt.get("geco"):
            self.geco.load_state_dict(ckpt["geco"])
        self.epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.best, self.best_epoch = dict(ckpt["best"] or {}), ckpt["best_epoch"]
        self.history = list(ckpt["history"])
        _set_rng_state(ckpt["rng"])

    # -- one step, one epoch --------------------------------------------------------------
    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """One optimizer step; ``None`` when the loss or gradient was not finite (skipped)."""
        cfg, model = self.cfg, self.model
        x = batch["image"].to(self.device)
        targets = {k: batch[k].to(self.device) for k in HEADS}
        out = model(x, torch.cat([targets[k] for k in HEADS], dim=1))
        recon_h = {k: self.recon_loss(out.logits[k], targets[k]) for k in HEADS}
        recon = cfg.loss_weight_spine * recon_h["spine"]
        recon = recon + cfg.loss_weight_dendrite * recon_h["dendrite"]
        kl = out.kl or {}
        kl_term = sum(free_bits(kl[k], cfg.kl_free_bits) for k in HEADS)
        if self.geco is not None:
            loss = self.geco.loss(recon, kl_term)
            beta = self.geco.beta
        else:
            beta = linear_warmup(self.global_step, self.kl_warmup_steps, cfg.kl_beta)
            loss = recon + beta * kl_term
        self.global_step += 1
        if not torch.isfinite(loss):
            log.warning("epoch %d: non-finite loss %s, step skipped", self.epoch, loss.item())
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # clip_grad_norm_ with an infinite limit only measures the norm
        limit = cfg.grad_clip_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("epoch %d: non-finite gradient, step skipped", self.epoch)
            return None
        self.optimizer.step()
        self.scheduler.step()
        return {
            "loss": loss.item(),
            "recon": recon.item(),
            "recon_spine": recon_h["spine"].item(),
            "recon_dendrite": recon_h["dendrite"].item(),
            "kl_spine": kl["spine"].mean().item(),
            "kl_dendrite": kl["dendrite"].mean().item(),
            "beta": float(beta),
        }

    def train_epoch(self, dataset: PatchDataset) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        dataset.set_epoch(self.epoch)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            drop_last=True,
        )
        sums: dict[str, float] = {}
        n_ok = n_bad = 0
        bar = tqdm(
            loader,
            desc=f"punet epoch {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not cfg.progress or None,
        )
        for batch in bar:
            values = self.step(batch)
            if values is None:
                n_bad += 1
                _check_divergence(n_bad, cfg, self.epoch)
                continue
            n_ok += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['loss']:.3f}", kl=f"{values['kl_spine']:.2f}")
        if n_ok == 0:
            _check_divergence(cfg.max_nonfinite_steps + 1, cfg, self.epoch)
        metrics = {f"train_{k}": v / n_ok for k, v in sums.items()}
        metrics["beta"] = metrics.pop("train_beta")
        metrics["train_kl"] = metrics["train_kl_spine"] + metrics["train_kl_dendrite"]
        metrics["nonfinite_steps"] = float(n_bad)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        if self.geco is not None:
            metrics["geco_lambda"] = self.geco.lam
        return metrics


def train_punet(
    train_d3set: D3Source,
    val_d3set: D3Source,
    out_dir: str | Path,
    cfg: PunetTrainConfig | None = None,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
) -> TrainResult:
    """Train a :class:`ProbUNet`; checkpoints in ``out_dir/{last,best}.pt``.

    ``train_d3set``/``val_d3set`` are d3set paths or loaded :class:`D3Set` objects (or lists
    of them). With ``resume`` (default) an unfinished ``out_dir/last.pt`` is continued; a
    finished one is returned as is unless ``cfg.epochs`` grew. ``resume=False`` starts over
    and overwrites both checkpoints.
    """
    cfg = cfg or PunetTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    model_config = cfg.model_config()

    ckpt = (
        load_checkpoint(last_path, CHECKPOINT_FORMAT, "format")
        if resume and last_path.is_file()
        else None
    )
    if ckpt is not None:
        if ckpt["model_config"] != model_config:
            raise ConfigError(
                f"it holds a model built as {ckpt['model_config']}, but the config asks for "
                f"{model_config}; delete {out_dir} or pass resume=False",
                last_path,
            )
        if ckpt["epoch"] >= cfg.epochs or ckpt.get("stopped_early"):
            log.info("%s: training finished (%d epochs); nothing to do", last_path, ckpt["epoch"])
            return _result(ckpt, best_path, last_path)

    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        run = _PunetRun(cfg, model_config, resolve_device(cfg.device))
        if ckpt is not None:
            run.load_state_dict(ckpt)
            log.info(
                "resuming Probabilistic U-Net training from %s at epoch %d", last_path, run.epoch
            )
        return _train(run, train_d3set, val_d3set, hooks, last_path, best_path, ckpt is not None)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    run: _PunetRun,
    train_d3set: D3Source,
    val_d3set: D3Source,
    hooks: HookBase | None,
    last_path: Path,
    best_path: Path,
    resumed: bool,
) -> TrainResult:
    cfg = run.cfg
    resumed_from = run.epoch if resumed else None
    t0 = time.perf_counter()
    train_stacks = labeled_stacks(_as_list(train_d3set), cfg.percentiles)
    val_stacks = labeled_stacks(_as_list(val_d3set), cfg.percentiles)
    dataset = PatchDataset(
        train_stacks,
        patch_size=cfg.patch_size,
        samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size,
        fg_fraction=cfg.fg_fraction,
        context=cfg.context,
        augment=cfg.augment,
        seed=cfg.seed,
    )
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info(
        "Probabilistic U-Net: %d train / %d val stacks loaded in %.1fs; %d parameters on %s",
        len(train_stacks),
        len(val_stacks),
        time.perf_counter() - t0,
        n_params,
        run.device,
    )
    if hooks is not None:
        hooks.before_train({**cfg.as_dict(), "n_parameters": n_params})

    stopped_early = False
    while run.epoch < cfg.epochs:
        t_epoch = time.perf_counter()
        epoch = run.epoch
        metrics = run.train_epoch(dataset)
        validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        is_best = False
        if validated:
            metrics.update(
                validate_punet(
                    run.model,
                    val_stacks,
                    context=cfg.context,
                    batch_planes=cfg.val_batch_planes,
                    plane_stride=cfg.val_plane_stride,
                    n_samples=cfg.val_samples,
                    seed=cfg.seed,
                    device=run.device,
                )
            )
            is_best = not run.best or metrics["val_spine_dice"] > run.best["val_spine_dice"]
        metrics["epoch_seconds"] = time.perf_counter() - t_epoch
        run.history.append(metrics)
        if is_best:
            run.best, run.best_epoch = dict(metrics), epoch
        run.epoch += 1
        payload = run.state_dict(finished=run.epoch >= cfg.epochs)
        save_checkpoint(last_path, payload)
        if hooks is not None:
            hooks.after_checkpoint(last_path, False)
        if is_best:
            save_checkpoint(best_path, payload)
            if hooks is not None:
                hooks.after_checkpoint(best_path, True)
        _log_epoch(epoch, cfg.epochs, metrics)
        if hooks is not None:
            hooks.after_epoch(epoch, metrics)
        if _should_stop(hooks):  # e.g. EarlyStopping, decided in after_epoch
            stopped_early = True
            if run.epoch < cfg.epochs:  # mark it finished so that a rerun does not resume
                payload["finished"], payload["stopped_early"] = True, True
                save_checkpoint(last_path, payload)
            log.info("early stop after epoch %d", epoch + 1)
            break

    result = TrainResult(
        best=run.best,
        best_epoch=run.best_epoch,
        best_path=best_path if best_path.is_file() else None,
        last_path=last_path,
        epochs_completed=len(run.history),
        history=run.history,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t0,
    )
    if hooks is not None:
        hooks.after_train(run.best, result.best_path)
    return result


def _log_epoch(epoch: int, epochs: int, m: Mapping[str, float]) -> None:
    val = (
        f"; val spine Dice {m['val_spine_dice']:.3f}, dendrite Dice {m['val_dendrite_dice']:.3f}"
        if "val_spine_dice" in m
        else ""
    )
    log.info(
        "epoch %d/%d: loss %.4f (recon %.4f, kl %.3f, beta %.3f)%s in %.1fs",
        epoch + 1,
        epochs,
        m["train_loss"],
        m["train_recon"],
        m["train_kl"],
        m["beta"],
        val,
        m["epoch_seconds"],
    )


def _as_list(source: D3Source) -> list[D3Set | str | Path]:
    return [source] if isinstance(source, D3Set | str | Path) else list(source)


def _check_divergence(n_bad: int, cfg: PunetTrainConfig, epoch: int) -> None:
    if n_bad > cfg.max_nonfinite_steps:
        msg = (
            f"training diverged in epoch {epoch}: {n_bad} steps with a non-finite loss or "
            f"gradient (limit {cfg.max_nonfinite_steps}); lower lr ({cfg.lr}) or kl_beta "
            f"({cfg.kl_beta}), or check the data for NaN"
        )
        log.error(msg)
        raise TrainingDiverged(msg)


def _result(ckpt: Mapping[str, Any], best_path: Path, last_path: Path) -> TrainResult:
    return TrainResult(
        best=dict(ckpt["best"] or {}),
        best_epoch=ckpt["best_epoch"],
        best_path=best_path if best_path.is_file() else None,
        last_path=last_path,
        epochs_completed=int(ckpt["epoch"]),
        history=list(ckpt["history"]),
        stopped_early=bool(ckpt.get("stopped_early", False)),
    )
