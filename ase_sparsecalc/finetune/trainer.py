"""The training loop: AdamW on a delta method, cosine schedule, early stopping, checkpoints.

Graphs are built once (:mod:`.batches`) and stay on the device; a step is one batched model
call through ``torch.func.functional_call`` with ``W0 + Δ``, one backward pass and one
optimizer step. Checkpoints hold everything needed to continue bit-for-bit (method and
optimizer state, schedule, history, best state) and are written atomically.

In a data-parallel run (``torchrun``, see :mod:`.distributed`) each process evaluates its shard
of the batch, the gradients of the method's parameters are summed over all processes before the
optimizer step, and only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backends.base import Backend
from ..backends.safe_load import load_failure
from ..delta_io import atomic_write_bytes
from ..errors import CheckpointError, TrainingDivergedError
from . import distributed
from .batches import LabelledBatch, LossWeights, batch_loss
from .config import RESUMABLE_CHANGES, FinetuneConfig
from .methods import DeltaMethod

logger = logging.getLogger(__name__)

BEST_EPOCH_FROM = 0.5
"""Fraction of the epochs after which epochs compete for the best one (see ``_eligible_for_best``)."""

CHECKPOINT_NAME = "checkpoint.pt"

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "Trainer", "TrainingState"]


@dataclass
class TrainingState:
    """Progress of a fine-tune (saved in checkpoints).

    Attributes
    ----------
    epoch : int
        Epochs completed.
    step : int
        Optimizer steps taken.
    history : list of dict
        Per epoch: train loss, validation loss, density, learning rate, wall time (s of
        training so far, across resumed runs).
    best_loss : float
        Lowest validation loss among epochs eligible for early stopping.
    best_epoch : int
    stop_reason : str
        "" while running; "epochs", "early_stopping" or "max_time" at the end.
    planned_epochs : int or None
        Epochs chosen to fit ``FinetuneConfig.time_budget`` (:mod:`.budget`); None: the
        configured number.
    """

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1
    stop_reason: str = ""
    planned_epochs: int | None = None


class Trainer:
    """Fits a :class:`DeltaMethod` to labelled batches.

    Parameters
    ----------
    backend : Backend
        The base model (its weights are never modified; energy shifts already set).
    method : DeltaMethod
    train, valid : sequence of LabelledBatch
    config : FinetuneConfig
    checkpoint_dir : Path, optional
        Where checkpoints go (every epoch); None: no checkpoints.
    fingerprint : str
        Identifies base model and data; a checkpoint made for other inputs is refused.
    callbacks : sequence of callables
        Each is called as ``callback(trainer)`` after every completed (and checkpointed) epoch.
    process : ProcessInfo, optional
        Rank and world size of a data-parallel run (default: the initialised process group,
        else a single process). The batches must be this rank's shards
        (:func:`~.batches.make_batches` builds them so).
    """

    def __init__(
        self,
        backend: Backend,
        method: DeltaMethod,
        train: Sequence[LabelledBatch],
        valid: Sequence[LabelledBatch],
        config: FinetuneConfig,
        checkpoint_dir: Path | None = None,
        fingerprint: str = "",
        callbacks: Sequence = (),
        process: distributed.ProcessInfo | None = None,
    ) -> None:
        self.backend, self.method, self.config = backend, method, config
        self.process = process or distributed.current()
        self.train_batches, self.valid_batches = list(train), list(valid)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.fingerprint = fingerprint
        self.callbacks = list(callbacks)
        self.weights = LossWeights(
            config.energy_weight, config.forces_weight, config.stress_weight, config.huber_delta
        )
        self.state = TrainingState()
        self.optimizer = make_optimizer(
            config.optimizer, method.parameter_groups(config.lr, config.weight_decay)
        )
        self.restart_schedule()
        self._best_method_state: dict | None = None

    # ------------------------------------------------------------------ schedule
    @property
    def epochs(self) -> int:
        """Epochs of this run: the configured number, or fewer planned to fit a time budget."""
        return self.state.planned_epochs or self.config.epochs

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run; the schedules run over them."""
        return self.epochs * len(self.train_batches)

    def restart_schedule(self) -> None:
        """Start the learning-rate schedule afresh for the current number of epochs.

        The schedule's first value depends on the run's length (the warm-up spans 2 % of its
        steps): called on construction, and again after ``state.planned_epochs`` changes
        before the first step.
        """
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        """Learning rate over its peak: a linear warm-up over 2 % of the steps, then a cosine decay
        to 1 %; with ``lr_rewind`` the cosine starts again at the end of pruning."""
        start, end = 0, self.total_steps
        if self.config.lr_rewind:
            rewind = int(self.config.prune_end_fraction * self.total_steps)
            if step >= rewind:
                start = rewind
            else:
                end = rewind
        warmup = max(1, int(0.02 * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - max(start, warmup)) / max(1, end - max(start, warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _eligible_for_best(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) competes for the best epoch (early stopping, the restore).

        Only epochs of the second half of the last learning-rate cycle compete, and for
        sparse methods only those after the density target is reached. Early in a cycle the
        learning rate is high and the model moves fast: a low validation loss there on a small
        validation set is more often luck than a better model (restoring such an epoch once
        gave a model far worse than the zero-shot base on copper, from 3 validation frames).
        With ``lr_rewind`` the last cycle is the one that retrains the kept entries after
        pruning, from ``prune_end_fraction`` to the end. ``config.best_from`` overrides it.
        """
        if self.config.best_from is not None:
            return epoch / self.epochs >= self.config.best_from
        start = BEST_EPOCH_FROM
        if self.method.name in ("sparse", "gmp") and self.config.density is not None:
            start = max(start, self.config.prune_end_fraction)
        if self.method.name == "l1":
            start = max(start, self.method.prune_at)
        if self.config.lr_rewind:
            cycle_start = self.config.prune_end_fraction
            start = max(start, cycle_start + BEST_EPOCH_FROM * (1.0 - cycle_start))
        return epoch / self.epochs >= start

    # ------------------------------------------------------------------ loop
    def train(self, progress: bool = True) -> TrainingState:
        """Run (or continue) training until epochs, early stopping or ``max_time``."""
        start = time.monotonic()
        earlier = self.state.history[-1].get("wall_time", 0.0) if self.state.history else 0.0  # resumed
        bar = _progress_bar(self.epochs, self.state.epoch, progress and self.process.is_main)
        while not self.state.stop_reason and self.state.epoch < self.epochs:
            epoch = self.state.epoch
            train_loss, timed_out = self._train_epoch(epoch, start)
            if timed_out:
                # the partial epoch is not checkpointed: resuming repeats it from the last
                # complete epoch, which gives the same result as an uninterrupted run
                self.state.stop_reason = "max_time"
                if self.process.is_main:
                    resume = (
                        "--resume continues the run"
                        if self.state.epoch > 0 and self.checkpoint_dir is not None
                        else "no epoch was checkpointed, so nothing can be resumed"
                    )
                    logger.warning(
                        "max_time reached after %d of %d epochs: the schedules are unfinished (the "
                        "density target is cut to at the end); %s, and time_budget (--time-budget) "
                        "plans a run that fits instead",
                        self.state.epoch,
                        self.epochs,
                        resume,
                    )
                break
            valid_loss = self.validation_loss()
            self._record(epoch, train_loss, valid_loss, earlier + time.monotonic() - start)
            bar.update(1)
            bar.set_postfix(
                loss=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}", density=f"{self.method.density():.3g}"
            )
            if bar.disable and self.process.is_main:  # no bar: one log line per epoch (shown with -v)
                logger.info(
                    "epoch %d of %d: loss %.3g, validation loss %.3g, density %.3g, %.0f s",
                    self.state.epoch,
                    self.epochs,
                    train_loss,
                    valid_loss,
                    self.method.density(),
                    earlier + time.monotonic() - start,
                )
            if self._patience_exhausted() and self.state.epoch < self.epochs:
                self.state.stop_reason = "early_stopping"
            self.save_checkpoint()
            for callback in self.callbacks:
                callback(self)
            if self.state.stop_reason:
                break
        bar.close()
        self.state.stop_reason = self.state.stop_reason or "epochs"
        self._restore_best()
        self.method.finalize()
        self.method.eval()
        return self.state

    def _train_epoch(self, epoch: int, start: float) -> tuple[float, bool]:
        self.method.train()
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_batches), generator=generator).tolist()
        losses = []
        for k in order:
            losses.append(self.train_step(self.train_batches[k]))
            if self.config.max_time is not None and self._out_of_time(start):
                return float(np.mean(losses)), True
        return float(np.mean(losses)), False

    def train_step(self, batch: LabelledBatch) -> float:
        """One optimizer step on one batch (this rank's shard of it); returns the batch loss.

        The loss is the data loss of the batch plus the method's penalty. With several
        processes the gradients are summed over all ranks before the step (the penalty counts
        once, on rank 0), so every rank takes the step a single process would take.
        """
        self.method.update_schedule(self.state.step / max(1, self.total_steps))
        loss = self._zero_loss()
        if not batch.is_empty:
            out = self.backend.evaluate(
                batch.graph,
                compute_forces=True,
                compute_stress=batch.has_stress,
                training=True,
                parameters=self.method.effective_parameters(),
            )
            loss = batch_loss(out, batch, self.weights)
        if self.process.is_main:
            loss = loss + self.method.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        value = float(loss.detach())
        if self.process.distributed:
            value = distributed.all_reduce_gradients(self._optimized_parameters(), value)
        if not math.isfinite(value):  # every rank sees the reduced value: all stop together
            raise TrainingDivergedError(
                f"the training loss became {value} at step {self.state.step + 1} (epoch "
                f"{self.state.epoch + 1}): the run diverged. Lower the learning rate (lr="
                f"{self.config.lr:g}; --lr), or look for labels far from the rest"
            )
        self.optimizer.step()
        self.method.after_step(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        self.state.step += 1
        return value

    def _zero_loss(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.backend.dtype, device=self.backend.device)

    def _optimized_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _out_of_time(self, start: float) -> bool:
        """Wall-clock limit reached (decided together by all ranks, so none waits forever)."""
        over = time.monotonic() - start > self.config.max_time
        if self.process.distributed:
            return distributed.any_rank(over, self.backend.device)
        return over

    def validation_loss(self) -> float:
        """Mean loss over the validation batches (training batches when there are none)."""
        batches = self.valid_batches or self.train_batches
        self.method.eval()
        with torch.no_grad():
            params = self.method.effective_parameters()
        total, count = 0.0, 0
        for batch in batches:
            n = batch.loss_counts().structures
            count += n
            if batch.is_empty:
                continue
            out = self.backend.evaluate(
                batch.graph, compute_forces=True, compute_stress=batch.has_stress, parameters=params
            )
            total += float(batch_loss(out, batch, self.weights).detach()) * n
        if self.process.distributed:
            # shard losses add up to batch losses; the counts are global already
            total = distributed.all_reduce_sum([total], self.backend.device)[0]
        return total / max(count, 1)

    def _record(self, epoch: int, train_loss: float, valid_loss: float, wall: float) -> None:
        self.state.epoch = epoch + 1
        self.state.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "density": self.method.density(),
                "lr": self.scheduler.get_last_lr()[0],
                "wall_time": wall,
                **self.method.diagnostics(),
            }
        )
        if self._eligible_for_best(epoch + 1) and valid_loss < self.state.best_loss:
            self.state.best_loss, self.state.best_epoch = valid_loss, epoch + 1
            self._best_method_state = copy.deepcopy(self.method.state_dict())

    def _patience_exhausted(self) -> bool:
        patience = self.config.patience
        if patience is None or self.state.best_epoch < 0:
            return False
        return self.state.epoch - self.state.best_epoch >= patience

    def _restore_best(self) -> None:
        if self._best_method_state is not None and self.state.best_epoch != self.state.epoch:
            first = next(e for e in range(1, self.epochs + 1) if self._eligible_for_best(e))
            logger.info(
                "restoring epoch %d, the lowest validation loss of epochs %d-%d (earlier ones, at a "
                "higher learning rate or before the density target, do not compete: --best-from)",
                self.state.best_epoch,
                first,
                self.state.epoch,
            )
            self.method.load_state_dict(self._best_method_state)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write the full training state to ``checkpoint_dir/checkpoint.pt`` atomically (rank 0 only)."""
        if self.checkpoint_dir is None or not self.process.is_main:
            return None
        payload = {
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": {**self.state.__dict__},
            "best_method": self._best_method_state,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return atomic_write_bytes(self.checkpoint_dir / CHECKPOINT_NAME, buffer.getvalue())

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a checkpoint made by :meth:`save_checkpoint` for the same inputs."""
        try:
            payload = torch.load(path, map_location=self.backend.device, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: cannot read checkpoint ({load_failure(exc)}); delete it to start afresh"
            ) from exc
        if not isinstance(payload, dict) or payload.get("fingerprint") != self.fingerprint:
            differ = _differing_parts(
                payload.get("fingerprint") if isinstance(payload, dict) else None, self.fingerprint
            )
            verb = "differs" if differ in _PARTS else "differ"
            recorded = payload.get("config") if isinstance(payload, dict) else None
            options = _changed_options(recorded, self.config)
            raise CheckpointError(
                f"{path}: the checkpoint's {differ} {verb} from this run's{options}; "
                "start without --resume or use another output folder"
            )
        try:
            self.method.load_state_dict(payload["method"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.state = TrainingState(**payload["state"])
            self._best_method_state = payload["best_method"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path}: checkpoint is incomplete or from another version ({type(exc).__name__}: "
                f"{exc}); delete it to start afresh"
            ) from exc
        if self.state.stop_reason == "max_time":  # cut short: continue it
            self.state.stop_reason = ""
        # a run that stopped early (or ran its epochs) has finished: resuming it trains no further


def _changed_options(recorded: object, config: FinetuneConfig) -> str:
    """`` (lr: 0.01 then, 0.02 now)``: the options a checkpoint's run set otherwise; "" if none
    can be named."""
    if not isinstance(recorded, dict):
        return ""
    now = config.to_dict()
    kept = [k for k in sorted(now) if k not in RESUMABLE_CHANGES and k in recorded]
    changed = [k for k in kept if recorded[k] != now[k]]
    return f" ({'; '.join(f'{k}: {recorded[k]!r} then, {now[k]!r} now' for k in changed)})" if changed else ""


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer ``FinetuneConfig.optimizer`` names, over the method's parameter groups.

    ``"adamw"``: per-entry moments; ``"factored_adam"``: second moments factored over each
    irrep path's block; ``"adafactor"``: the same without a first moment; ``"tensorwise_adam"``:
    one second moment per tensor (see :mod:`.optim`).
    """
    from .optim import FactoredAdam, TensorwiseAdam

    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "factored_adam":
        return FactoredAdam(groups)
    if name == "adafactor":
        return FactoredAdam(groups, betas=(0.0, 0.999))
    return TensorwiseAdam(groups)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="fine-tuning", unit="epoch")


_PARTS = ("base model", "data set")  # the singular parts of a run fingerprint


def _differing_parts(theirs: object, ours: str) -> str:
    """Which parts of two run fingerprints (``"name=hash;..."``) differ, in words; all of them
    when the checkpoint's cannot be read that way (written by another version)."""

    def parts(text: object) -> dict[str, str]:
        if not isinstance(text, str):
            return {}
        pairs = [item.partition("=") for item in text.split(";")]
        return {name: value for name, sep, value in pairs if sep}

    mine, other = parts(ours), parts(theirs)
    if not mine or set(mine) != set(other):
        return "base model, data set or training options"
    return " and ".join(name for name in mine if mine[name] != other[name])
