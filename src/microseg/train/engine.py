"""The training engine: one factory that builds a ``lightning.Trainer`` from params.

Every trainable family (``models/<family>/train.py``) is a :class:`FamilyModule` (a
``LightningModule`` that can also export its weights in the family's own model format) plus a
``LightningDataModule``; :func:`fit` trains it. Lightning provides the loop, resume,
gradient clipping, LR-schedule stepping, mixed precision, ``devices``/``accelerator`` and
``strategy`` (DDP over GPUs, nodes, or CPU processes on gloo), early stopping and progress
bars. What is ours is small and the same for every family:

* ``out_dir/last.ckpt`` -- Lightning's full checkpoint after every epoch, written atomically
  (:class:`AtomicCheckpointIO`); calling :func:`fit` again resumes from it.
* ``out_dir/best.pt`` -- the weights with the best validation metric in the *family's model
  format* (what predictors, stages and the MLflow pyfunc load; no Lightning needed).
* ``out_dir/train_state.json`` -- epochs done, best metrics and epoch, history, whether the run
  stopped early: a finished run is returned as it is, without building a trainer.
* :class:`~microseg.train.hooks.HookBase` events (MLflow logging from ``registry/``, Optuna
  pruning from ``tune/``) are called from :class:`RunCallback`, in this order per epoch:
  validation -> ``after_checkpoint(best.pt)`` when it improved -> ``last.ckpt`` ->
  ``after_epoch`` -> a hook asking to stop ends the run and ``last.ckpt`` is re-saved with the
  stop recorded. An exception from a hook (``optuna.TrialPruned``) leaves ``last.ckpt`` of
  the epoch on disk.

The family side (module and data-module bases, the seeded batch stream) is
:mod:`microseg.train.family`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from microseg.errors import ConfigError, Terminated
from microseg.train.family import FamilyModule
from microseg.train.hooks import HookBase, should_stop
from microseg.train.phases import PhaseConfig, PhaseSchedule, check_phases, parse_phases
from microseg.utils.atomic import atomic_path, write_torch
from microseg.utils.devices import auto_device, check_device, lightning_devices
from microseg.utils.progress import progress_enabled

log = logging.getLogger(__name__)
# our epoch datasets know their length and are read in the main process (num_workers=0)
warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
# FamilyModule passes whole validation samples through on purpose (see transfer_batch_to_device)
warnings.filterwarnings(
    "ignore", message=".*overridden .transfer_batch_to_device. in .LightningModule"
)

LAST = "last.ckpt"
BEST = "best.pt"
STATE = "train_state.json"
#: wall-clock times of a run (total, per epoch); ``.dvcignore`` keeps them out of DVC hashes
TIMING = "timing.json"
_TIME_SUFFIX = "_seconds"
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


#: EngineConfig fields that must be ints (a ``-S key=many`` override reaches them as text)
_WHOLE_NUMBERS = (
    "epochs",
    "steps_per_epoch",
    "val_every",
    "early_stop_patience",
    "num_nodes",
    "seed",
    "loader_workers",
)


@dataclass
class EngineConfig:
    """Knobs every trainable family shares (its train config subclasses this)."""

    epochs: int = 12
    steps_per_epoch: int = 100
    val_every: int = 1
    grad_clip_norm: float | None = 1.0
    early_stop_patience: int = 0  # 0: off
    seed: int = 42
    #: auto | cpu | cuda | cuda:N | mps  (auto: CUDA, else MPS, else CPU)
    device: str = "auto"
    #: devices per node (int or "auto"); with 2+ the strategy runs DDP
    devices: int | str = 1
    num_nodes: int = 1
    #: auto | ddp | ddp_spawn | ... (Lightning strategies)
    strategy: str = "auto"
    #: auto: bf16-mixed on a GPU that supports it, 16-mixed on other GPUs, 32-true elsewhere
    precision: str = "auto"
    #: torch's deterministic algorithms (Lightning's ``deterministic``): ``warn`` uses them and
    #: warns where an op has none (some CUDA kernels); False lets cuDNN pick the fastest
    deterministic: bool | str = "warn"
    num_threads: int | None = None
    #: 0: batches drawn in the training process; 1: in a worker process beside it (a CPU's
    #: idle second core augments while the first trains; same batches either way)
    loader_workers: int = 0
    #: Lightning's bars, drawn only where someone watches (``utils.progress``)
    progress: bool = True
    #: fine-tuning: weights to start from (a ``best.pt``/``last.ckpt`` of this family or a
    #: state dict; ``models:/name@alias`` is resolved to a file by the stage); tensors are
    #: matched by name and shape (:mod:`microseg.train.init_weights`). Unused when resuming.
    init_from: str | None = None
    #: a staged schedule (:mod:`microseg.train.phases`): epochs, lr and augmentation per
    #: phase; empty (default): one phase of ``epochs`` with the config's values
    phases: list[PhaseConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in _WHOLE_NUMBERS:  # before the range checks: "many" >= 1 is a TypeError
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f"invalid training config: {name}: expected a whole number, found {value!r}"
                )
        checks = {
            "epochs": self.epochs >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 1,
            "val_every": self.val_every >= 1,
            "early_stop_patience": self.early_stop_patience >= 0,
            "num_nodes": self.num_nodes >= 1,
            "precision": str(self.precision) in PRECISIONS,
            "devices": self.devices == "auto" or int(self.devices) >= 1,
            "loader_workers": self.loader_workers in (0, 1),
            "deterministic": self.deterministic in (True, False, "warn"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid training config: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )
        self.phases = parse_phases(self.phases, self)


class StderrProgressBar(TQDMProgressBar):
    """Lightning's bars on stderr, as every other bar here: stdout carries what a command
    prints (DVC logs, ``microseg`` result lines), not progress."""

    def _on_stderr(self, make: Callable[[], Any]) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return make()

    def init_sanity_tqdm(self) -> Any:
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Any:
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Any:
        return self._on_stderr(super().init_validation_tqdm)

    def init_predict_tqdm(self) -> Any:
        return self._on_stderr(super().init_predict_tqdm)

    def init_test_tqdm(self) -> Any:
        return self._on_stderr(super().init_test_tqdm)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> bf16-mixed on a bf16-capable GPU, 16-mixed on other GPUs, else 32-true."""
    if precision != "auto":
        return "32-true" if precision == "32" else precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but to a temporary file renamed into place: a kill
    while saving leaves the previous ``last.ckpt`` intact."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        write_torch(path, checkpoint)


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
    global_step: int = 0


@dataclass
class TrainState:
    """``train_state.json``: readable without torch, rewritten atomically every epoch."""

    epochs_completed: int = 0
    global_step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    model_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> TrainState | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            state = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError) as exc:
            msg = f"unreadable training state ({exc}); delete it to start over"
            raise ConfigError(msg, path) from exc
        state.add_timing(path.parent / TIMING)
        return state

    def timeless(self) -> dict[str, Any]:
        """The state without wall-clock times: what ``train_state.json`` and ``last.ckpt``
        hold, so the same training writes the same bytes (times: ``timing.json``, MLflow)."""
        data = asdict(self)
        data.pop("seconds")
        data["history"] = [
            {k: v for k, v in h.items() if not k.endswith(_TIME_SUFFIX)} for h in self.history
        ]
        return data

    def add_timing(self, path: Path) -> None:
        """Put the times of ``timing.json`` (when there is one) back into the history."""
        timing = read_timing(path.parent)
        self.seconds = float(timing.get("seconds", self.seconds))
        epochs = {int(e.get("epoch", -1)): e for e in timing.get("epochs", [])}
        for h in self.history:
            times = epochs.get(int(h.get("epoch", -1)), {})
            h.update({k: float(v) for k, v in times.items() if k.endswith(_TIME_SUFFIX)})

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.timeless(), indent=1, default=float))
        epochs = [
            {"epoch": h.get("epoch"), **{k: v for k, v in h.items() if k.endswith(_TIME_SUFFIX)}}
            for h in self.history
        ]
        with atomic_path(path.parent / TIMING) as tmp:
            Path(tmp).write_text(json.dumps({"seconds": self.seconds, "epochs": epochs}, indent=1))


def read_timing(out_dir: Path) -> dict[str, Any]:
    """``out_dir/timing.json`` ({} when it is missing or unreadable: times are a record of
    the run, not its state, so a lost file costs nothing)."""
    path = Path(out_dir) / TIMING
    try:
        timing = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return timing if isinstance(timing, dict) else {}


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class RunCallback(Callback):
    """Best export, ``last.ckpt``, ``train_state.json`` and our hook events, for every family."""

    def __init__(self, out_dir: Path, hooks: HookBase, state: TrainState, has_val: bool) -> None:
        self.out_dir, self.hooks, self.state, self.has_val = out_dir, hooks, state, has_val
        self._t_epoch = 0.0
        self._t_val = 0.0
        self._val_seconds = 0.0
        self._t_start = 0.0
        self._seconds_before = state.seconds

    # -- Lightning's callback state travels inside last.ckpt ----------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state": json.dumps(self.state.timeless(), default=float)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        data = json.loads(state_dict["state"])
        self.state = TrainState(**data)
        self.state.add_timing(self.out_dir / TIMING)
        self._seconds_before = self.state.seconds

    # -- events ------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        self._t_start = time.perf_counter()
        if trainer.is_global_zero:
            self.hooks.before_train(pl_module.flat_config())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        self._t_epoch = time.perf_counter()
        self._val_seconds = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_seconds = time.perf_counter() - self._t_val
        value = trainer.callback_metrics.get(pl_module.monitor)
        if value is None:
            return
        value = float(value)
        best = self.state.best.get(pl_module.monitor)
        better = (
            best is None
            or (pl_module.mode == "max" and value > best)
            or (pl_module.mode == "min" and value < best)
        )
        if better:
            self._export_best(trainer, pl_module)

    def _export_best(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        metrics = _floats(trainer.callback_metrics)
        self.state.best, self.state.best_epoch = metrics, int(trainer.current_epoch)
        if trainer.is_global_zero:
            path = self.out_dir / BEST
            pl_module.export_model(path, metrics)
            self.hooks.after_checkpoint(path, True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        epoch = int(trainer.current_epoch)
        metrics = _floats(trainer.callback_metrics)
        metrics["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        metrics["train_seconds"] = time.perf_counter() - self._t_epoch - self._val_seconds
        if self._val_seconds:
            metrics["val_seconds"] = self._val_seconds
        if not self.has_val:  # nothing to validate on: the latest weights are the best we know
            self._export_best(trainer, pl_module)
        s = self.state
        s.history.append({"epoch": float(epoch), **metrics})
        s.epochs_completed, s.global_step = epoch + 1, int(trainer.global_step)
        s.seconds = self._seconds_before + time.perf_counter() - self._t_start
        s.stopped_early = bool(trainer.should_stop) and epoch + 1 < (trainer.max_epochs or 0)
        self._save(trainer)
        if trainer.is_global_zero:
            log.info(
                "epoch %d/%s: %s",
                epoch + 1,
                trainer.max_epochs,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            )
            self.hooks.after_epoch(epoch, metrics)
        stop = _broadcast_flag(trainer, should_stop(self.hooks))
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            s.stopped_early = epoch + 1 < (trainer.max_epochs or 0)
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        # Lightning's default keeps the optimizer state (its ``weights_only`` flag means "drop
        # it"): a resumable checkpoint needs it. Loading it back is torch.load(weights_only=True)
        # (see ``fit`` below).
        trainer.save_checkpoint(self.out_dir / LAST)
        if trainer.is_global_zero:
            self.state.write(self.out_dir / STATE)

    def on_fit_end(self, trainer: L.Trainer, pl_module: FamilyModule) -> None:
        if trainer.is_global_zero:
            best_path = self.out_dir / BEST
            self.hooks.after_train(self.state.best, best_path if best_path.is_file() else None)


def _broadcast_flag(trainer: L.Trainer, flag: bool) -> bool:
    """Rank 0's hooks decide (they log and prune there); every rank must stop together."""
    return bool(trainer.strategy.broadcast(flag, src=0))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for a block (an oversubscribed CPU trains faster on 1)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_trainer(
    cfg: EngineConfig,
    out_dir: Path,
    *,
    monitor: str,
    mode: str,
    callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """A ``lightning.Trainer`` for ``cfg``: devices, precision, strategy, budgets, callbacks."""
    accelerator, devices = lightning_devices(cfg.device, cfg.devices)
    extra: list[Callback] = list(callbacks)
    if cfg.early_stop_patience:
        extra.append(
            EarlyStopping(
                monitor=monitor,
                patience=cfg.early_stop_patience,
                mode=mode,
                check_on_train_epoch_end=False,
                strict=False,
            )
        )
    bars = cfg.progress and progress_enabled()  # asked for, and someone watches stderr
    if bars:
        extra.append(StderrProgressBar(leave=False))
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, accelerator),
        deterministic=cfg.deterministic,
        max_epochs=cfg.epochs,
        limit_train_batches=cfg.steps_per_epoch,
        check_val_every_n_epoch=cfg.val_every,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.grad_clip_norm or None,
        gradient_clip_algorithm="norm",
        callbacks=extra,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=bars,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
        log_every_n_steps=max(1, cfg.steps_per_epoch),
    )


def _result(state: TrainState, out_dir: Path, **kw: Any) -> TrainResult:
    best_path = out_dir / BEST
    return TrainResult(
        best=dict(state.best),
        best_epoch=state.best_epoch,
        best_path=best_path if best_path.is_file() else None,
        last_path=out_dir / LAST,
        epochs_completed=state.epochs_completed,
        history=list(state.history),
        stopped_early=state.stopped_early,
        seconds=state.seconds,
        global_step=state.global_step,
        **kw,
    )


def fit(
    module: FamilyModule | Callable[[], FamilyModule],
    datamodule: L.LightningDataModule,
    cfg: EngineConfig,
    out_dir: str | Path,
    hooks: HookBase | None = None,
    *,
    resume: bool = True,
    has_val: bool | None = None,
    model_config: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``module`` on ``datamodule``; resume from ``out_dir/last.ckpt`` when it can.

    ``module`` may be a factory: it is then built (after ``datamodule.setup`` and seeding
    with ``cfg.seed``) only when there is something to train. A finished run (all epochs, or
    stopped early) is returned as it is unless ``cfg.epochs`` grew; ``resume=False`` starts
    over. ``model_config`` guards resume: a checkpoint of a differently built network is
    refused with the path to delete. ``has_val`` (default: the data module's ``has_val``)
    False makes every epoch's weights the best.
    """
    out_dir = Path(out_dir)
    check_phases(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / LAST
    config = dict(model_config or {})
    state = TrainState.read(out_dir / STATE) if resume and last.is_file() else None
    if not resume:
        for name in (LAST, STATE, BEST, TIMING):
            (out_dir / name).unlink(missing_ok=True)
    if state is not None:
        if state.model_config and config and state.model_config != config:
            raise ConfigError(
                f"{last} holds a model built as {state.model_config}, but the config asks for "
                f"{config}; delete {out_dir} or pass resume=False",
                last,
            )
        if state.epochs_completed >= cfg.epochs or state.stopped_early:
            log.info("%s: training already finished (%d epochs)", last, state.epochs_completed)
            return _result(state, out_dir)
    if not isinstance(module, L.LightningModule):
        datamodule.setup("fit")
        L.seed_everything(cfg.seed, verbose=False)
        module = module()
    if state is None and cfg.init_from:
        from microseg.train.init_weights import load_init_weights

        load_init_weights(module, cfg.init_from)
    if has_val is None:
        has_val = bool(getattr(datamodule, "has_val", True))
    fresh = TrainState(model_config=config)
    run = RunCallback(out_dir, hooks or HookBase(), fresh, has_val)
    staged = [PhaseSchedule(cfg.phases)] if cfg.phases else []
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = build_trainer(
        cfg,
        out_dir,
        monitor=module.monitor,
        mode=module.mode,
        callbacks=[*staged, run, *callbacks],
    )
    ckpt = str(last) if state is not None else None
    if ckpt:
        log.info("resuming from %s at epoch %d", last, state.epochs_completed)
    with torch_threads(cfg.num_threads):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        except SIGTERMException as exc:  # a SystemExit with status 0: DVC would take it as done
            done = run.state.epochs_completed
            raise Terminated(f"SIGTERM after {done} of {cfg.epochs} epochs in {out_dir}") from exc
    return _result(
        run.state,
        out_dir,
        resumed_from_epoch=state.epochs_completed if state is not None else None,
    )


def describe_device(cfg: EngineConfig) -> str:
    """One line for logs: where and how a config will train."""
    device = auto_device() if cfg.device == "auto" else cfg.device
    return f"{device} x{cfg.devices} ({cfg.strategy}, precision {cfg.precision})"
