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
"""Timed training steps (after one untimed warm-up step) and validation batches."""

SAFETY = 0.95
"""Fraction of the remaining budget planned for, leaving room for checkpoints and logging."""


def plan_epochs(trainer: Trainer, budget: float, probe_steps: int = PROBE_STEPS) -> int:
    """Set ``trainer``'s number of epochs to what fits in ``budget`` seconds, and return it.

    The estimate of an epoch is the mean time of ``probe_steps`` training steps on batches drawn
    with the run's seed, times the number of training batches, plus the mean time of a
    validation batch times the number of validation batches (the training batches when there
    are none: the validation loss then runs over them). The planning time counts against the
    budget. The result lies between 1 and the configured ``epochs``; in a data-parallel run all
    processes take rank 0's plan.
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

    valid = trainer.valid_batches or trainer.train_batches
    valid_time = _mean_validation_time(trainer, valid[:probe_steps])
    epoch_time = step_time * len(trainer.train_batches) + valid_time * len(valid)
    remaining = budget - (time.monotonic() - start)
    fits = math.floor(SAFETY * remaining / max(epoch_time, 1e-9))
    epochs = int(min(trainer.config.epochs, max(1, fits)))
    if trainer.process.distributed:  # every process takes rank 0's plan
        share = epochs if trainer.process.is_main else 0
        epochs = round(distributed.all_reduce_sum([float(share)], trainer.backend.device)[0])
    trainer.state.planned_epochs = epochs
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


def _mean_validation_time(trainer: Trainer, batches: list) -> float:
    """Mean seconds of one validation batch (energy, forces and stress, no gradient step)."""
    trainer.method.eval()
    with torch.no_grad():
        params = trainer.method.effective_parameters()
    times = []
    for batch in batches:
        if batch.is_empty:
            continue
        tic = time.monotonic()
        trainer.backend.evaluate(
            batch.graph, compute_forces=True, compute_stress=batch.has_stress, parameters=params
        )
        times.append(time.monotonic() - tic)
    return sum(times) / len(times) if times else 0.0
