"""Fit a fine-tune into a wall-clock budget by choosing its number of epochs beforehand.

Stopping a run when time is up (``max_time``) leaves its schedules unfinished: the density
target of a sparse delta is then reached in one cut at the end, the one-shot pruning that
costs accuracy. ``time_budget`` instead measures what a step costs and shortens the run itself,
so the learning-rate and density schedules finish inside the budget.

The measurement takes a few real training steps and then undoes them (model delta, optimizer,
schedule and step count restored), so a run planned to N epochs gives the same delta as a run
configured with ``epochs=N``.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch

from . import distributed
from .trainer import Trainer

logger = logging.getLogger(__name__)

PROBE_STEPS = 4
"""Timed training steps (after one untimed warm-up step)."""

SAFETY = 0.95
"""Fraction of the remaining budget planned for, leaving room for checkpoints and logging."""


def plan_epochs(trainer: Trainer, budget: float, probe_steps: int = PROBE_STEPS) -> int:
    """Set ``trainer``'s number of epochs to what fits in ``budget`` seconds, and return it.

    An epoch is estimated as the mean time of ``probe_steps`` training steps on batches drawn
    with the run's seed, times the number of training batches, plus the time of one
    validation pass (:meth:`Trainer.validation_loss`, timed once). The planning time counts
    against the budget. The result lies between 1 and the configured ``epochs``; in a
    data-parallel run all processes take rank 0's plan.
    """
    start = time.monotonic()
    saved = _snapshot(trainer)
    generator = torch.Generator().manual_seed(trainer.config.seed)
    picks = torch.randint(len(trainer.train_batches), (probe_steps + 1,), generator=generator).tolist()
    trainer.method.train()
    trainer.train_step(trainer.train_batches[picks[0]])  # first call: allocations, warm caches
    tic = time.monotonic()
    for k in picks[1:]:
        trainer.train_step(trainer.train_batches[k])
    step_time = (time.monotonic() - tic) / probe_steps
    _restore(trainer, saved)
    tic = time.monotonic()
    trainer.validation_loss()
    epoch_time = step_time * len(trainer.train_batches) + (time.monotonic() - tic)

    remaining = budget - (time.monotonic() - start)
    epochs = min(trainer.config.epochs, max(1, math.floor(SAFETY * remaining / max(epoch_time, 1e-9))))
    if SAFETY * remaining < epoch_time and trainer.process.is_main:
        logger.warning(
            "time budget %.3g s is less than one epoch (about %.3g s): running one epoch, which "
            "takes longer than the budget",
            budget,
            epoch_time,
        )
    if trainer.process.distributed:  # every process takes rank 0's plan
        share = epochs if trainer.process.is_main else 0
        epochs = round(distributed.all_reduce_sum([float(share)], trainer.backend.device)[0])
    trainer.state.planned_epochs = epochs
    trainer.restart_schedule()  # the first step's learning rate is that of the planned run
    logger.info(
        "time budget %.0f s: about %.3g s per epoch, planned %d of %d epochs",
        budget,
        epoch_time,
        epochs,
        trainer.config.epochs,
    )
    return epochs


def _snapshot(trainer: Trainer) -> tuple:
    return (
        copy.deepcopy(trainer.method.state_dict()),
        copy.deepcopy(trainer.optimizer.state_dict()),
        copy.deepcopy(trainer.scheduler.state_dict()),
        trainer.state.step,
        torch.get_rng_state(),
    )


def _restore(trainer: Trainer, saved: tuple) -> None:
    method, optimizer, scheduler, step, rng = saved
    trainer.method.load_state_dict(method)
    trainer.optimizer.load_state_dict(optimizer)
    trainer.scheduler.load_state_dict(scheduler)
    trainer.state.step = step
    torch.set_rng_state(rng)
