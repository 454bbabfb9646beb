"""Options of a fine-tune, validated in one place and recorded in the delta's metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import WEIGHT_KINDS
from ..errors import ConfigError
from .methods import METHODS, MethodOptions

ALL_METHODS = (*METHODS, "shift")
OPTIMIZERS = ("adamw", "factored_adam", "adafactor", "tensorwise_adam")

DEFAULT_PENALTY = {"l1": 1e-3}
"""Default l1 strength of each method (others: 0): ``l1`` is a dense delta under an l1 pull."""

DEFAULT_LR = {"sparse": 1e-2, "l1": 1e-2, "gmp": 1e-2, "full": 2e-3, "elora": 2e-3, "shift": 2e-3}
"""Default learning rate of each method (relative units), from the ethanol study in docs/benchmarks.md."""


RESUMABLE_CHANGES = ("max_time", "time_budget", "device", "extra")
"""Options a resumed run may change: wall-time limits (a budget plans a run only at its start;
the plan is in the checkpoint) and the device (a job preempted on one GPU resumes on another)."""


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tune's result.

    Attributes
    ----------
    method : str
        ``"sparse"`` (default), ``"l1"``, ``"gmp"``, ``"full"``, ``"elora"`` or ``"shift"``.
    density : float or None
        Target fraction of changed weights in the trainable set (sparse, l1, gmp). None with
        ``sparse`` means: let ``penalty`` decide.
    penalty : float or None
        l1 strength on the relative delta (mean over the trainable entries). ``sparse`` adds it
        to the loss (with ``density=None`` it alone sets the sparsity); ``l1`` pulls its dense
        delta with it before pruning. None: the method's default (:data:`DEFAULT_PENALTY`).
    epochs : int
        Passes over the training frames.
    batch_size : int
        Structures per optimizer step. The default, 1, gives the most optimizer steps per epoch,
        which the sparse delta needs more than dense fine-tuning does: at the same number of
        epochs and about the same CPU time, it narrows the gap between sparse and full
        fine-tuning's force errors (docs/benchmarks.md). Raise it for throughput on a GPU or for
        several data-parallel processes.
    lr : float or None
        Learning rate of the delta parameters, in units of each tensor's RMS weight. None: the
        method's default (:data:`DEFAULT_LR`: sparse methods move few entries far, so they take
        a larger rate than dense ones).
    weight_decay : float
        AdamW weight decay of the delta parameters (pulls them to zero).
    energy_weight, forces_weight, stress_weight : float
        Loss weights; the loss is ``w_E mean((ΔE/N)²) + w_F mean(ΔF²) + w_S mean(Δσ²)`` with
        errors in eV/atom, eV/Å and eV/Å³ (or the Huber version of each term).
    huber_delta : float or None
        Use a Huber loss with this transition (in the units of each term) instead of squares.
    valid_fraction : float
        Fraction of the training frames held out for validation when no validation set is given.
    patience : int or None
        Early stopping: epochs without validation improvement (after the density target is
        reached) before stopping. None: never stop early.
    best_from : float or None
        Fraction of the epochs from which epochs compete for the best one (the epoch restored
        at the end; patience counts from there): 1.0 keeps the last epoch. None: the second half
        of the last learning-rate cycle (with ``lr_rewind``, of the cycle after pruning), and
        for sparse methods not before the density target is reached.
    train_readouts : bool
        Let the delta touch readout weights too (``full`` trains every parameter regardless).
    train_scalars : bool
        ``sparse``, for ablations: also change the model's parameters outside its weight
        tensors, densely and within the density budget: for SevenNet the radial-basis
        frequencies, the convolutions' neighbour-count normalisations and the per-element
        energy scales and shifts (MACE models have none). Off by default: at the sparse
        learning rate these few scalars, each controlling a whole layer, moved by 40-75 % on
        MgO and the test force error rose from 17.7 to 115 meV/Å (docs/benchmarks.md).
    scalar_lr_factor : float
        With ``train_scalars``: the scalars' learning rate as a fraction of ``lr``.
    rank : int
        Rank per path block for ``elora``.
    warmup_fraction, prune_end_fraction : float
        Density schedule of sparse and gmp (fractions of training).
    seed : int
        Seeds the split, batching and initialisation; same seed, same result.
    dtype, device : str
        Where and in which precision to train.
    max_time : float or None
        Wall-clock limit in seconds; training stops cleanly (and checkpoints) when reached,
        with its schedules unfinished (``resume`` continues it).
    time_budget : float or None
        Seconds the training loop should take: a few timed steps before training (undone
        afterwards) measure an epoch, and the run is planned to the smaller of ``epochs`` and
        the whole epochs that fit, so the learning-rate and density schedules finish in the
        budget (:mod:`.budget`). The report gives ``epochs_planned``.
    refit_shifts : bool
        Re-fit the per-element energy shifts after training.
    straight_through : bool
        ``sparse``: entries below threshold still receive gradients, so the support can change.
    learn_thresholds : bool or None
        ``sparse``: learn a threshold per tensor (otherwise one global threshold); None: learned
        with the soft threshold, global with the hard one.
    ste_scale : float
        ``sparse``: fraction of the gradient that entries below threshold receive.
    settle_support : bool
        ``sparse``: no straight-through gradient after the target density is reached.
    hard_threshold : bool or None
        ``sparse``: kept entries keep their full value (hard) or are shrunk by the threshold
        (soft, STR); None: hard with a target density, soft with a penalty. ``sparse`` configs
        hold the resolved choice (and that of ``learn_thresholds``), so a delta's metadata says
        exactly what ran.
    masked_decay : float
        ``sparse``: decoupled decay (per unit learning rate) of the entries below threshold,
        which keeps their straight-through drift from raising the threshold over long runs
        (:class:`~ase_sparsecalc.finetune.methods.MethodOptions`); 0 turns it off.
    lr_rewind : bool or None
        Two cosine cycles instead of one: the learning rate decays to 1 % of its peak at
        ``prune_end_fraction``, where a sparse delta's support is chosen, then restarts from the
        peak for the rest of the run, so the kept entries train at a high rate again
        (learning-rate rewinding, Renda et al. 2020). Other methods restart at the same point
        (a warm restart), for like-for-like comparisons. None: on for ``sparse`` with a target
        density, off otherwise (configs hold the resolved choice).
    selection : str
        ``sparse``: how the hard threshold ranks entries, ``"magnitude"`` (default),
        ``"movement"`` (accumulated first-order loss change) or ``"fisher"`` (squared change
        times the running mean of the squared gradient;
        :data:`~ase_sparsecalc.finetune.methods.SELECTIONS`).
    exclude_kinds : tuple of str
        Weight kinds the delta may not touch (``"radial"``, ``"embedding"``, ...); not for
        ``full``, which trains every parameter.
    dense_kinds : tuple of str
        ``sparse``: weight kinds that change densely, outside the threshold, within the density
        budget (:class:`~ase_sparsecalc.finetune.methods.MethodOptions`).
    optimizer : str
        ``"adamw"`` (default); ``"factored_adam"``
        (second moments factored per irrep path,
        :class:`~ase_sparsecalc.finetune.optim.FactoredAdam`); ``"adafactor"`` (the same
        without a first moment); ``"tensorwise_adam"`` (one second moment per tensor,
        :class:`~ase_sparsecalc.finetune.optim.TensorwiseAdam`).
    """

    method: str = "sparse"
    density: float | None = 0.03
    penalty: float | None = None
    epochs: int = 100
    batch_size: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    energy_weight: float = 100.0
    forces_weight: float = 1.0
    stress_weight: float = 1000.0
    huber_delta: float | None = None
    valid_fraction: float = 0.1
    patience: int | None = None
    best_from: float | None = None
    train_readouts: bool = False
    train_scalars: bool = False
    scalar_lr_factor: float = 1.0
    rank: int = 4
    warmup_fraction: float = 0.05
    prune_end_fraction: float = 0.6
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_time: float | None = None
    time_budget: float | None = None
    refit_shifts: bool = True
    straight_through: bool = True
    learn_thresholds: bool | None = None
    ste_scale: float = 1.0
    settle_support: bool = False
    hard_threshold: bool | None = None
    masked_decay: float = 0.1
    selection: str = "magnitude"
    lr_rewind: bool | None = None
    exclude_kinds: tuple[str, ...] = ()
    dense_kinds: tuple[str, ...] = ()
    optimizer: str = "adamw"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every option; raises :class:`~ase_sparsecalc.errors.ConfigError` (a ValueError)."""
        if self.method not in ALL_METHODS:
            raise ConfigError(f"method must be one of {', '.join(ALL_METHODS)}; got {self.method!r}")
        self._refuse_options_of_other_methods()
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.method in ("l1", "gmp") and self.density is None:
            raise ConfigError(f"method {self.method!r} needs a target density")
        if self.penalty is None:
            self.penalty = DEFAULT_PENALTY.get(self.method, 0.0)
        if self.method == "sparse" and self.density is None and self.penalty <= 0:
            raise ConfigError("method 'sparse' needs a target density or a positive penalty")
        for name in ("epochs", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        for name in ("exclude_kinds", "dense_kinds"):
            kinds = tuple(getattr(self, name))
            unknown = sorted(set(kinds) - set(WEIGHT_KINDS))
            if unknown:
                raise ConfigError(f"{name}: unknown weight kinds {unknown}; known: {', '.join(WEIGHT_KINDS)}")
            setattr(self, name, kinds)
        if self.exclude_kinds and self.method == "full":
            raise ConfigError("exclude_kinds does not apply to method 'full', which trains every parameter")
        if self.train_scalars and self.method != "sparse":
            raise ConfigError(f"train_scalars applies to method 'sparse' only, not {self.method!r}")
        if not (math.isfinite(self.scalar_lr_factor) and self.scalar_lr_factor > 0):
            raise ConfigError(
                f"scalar_lr_factor must be a positive finite number, got {self.scalar_lr_factor}"
            )
        if self.scalar_lr_factor != 1.0 and not self.train_scalars:
            raise ConfigError("scalar_lr_factor applies with train_scalars only")
        if self.dense_kinds and self.method != "sparse":
            raise ConfigError(f"dense_kinds applies to method 'sparse' only, not {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.lr_rewind is None:
            self.lr_rewind = self.method == "sparse" and self.density is not None
        if self.lr_rewind and self.method == "shift":
            raise ConfigError("lr_rewind needs a trained method; 'shift' only fits energy shifts")
        if self.selection != "magnitude" and self.method != "sparse":
            raise ConfigError(f"selection applies to method 'sparse' only, not {self.method!r}")
        if self.method == "sparse":  # record the automatic choices as what they resolve to
            try:
                resolved = MethodOptions(
                    density=self.density,
                    hard_threshold=self.hard_threshold,
                    learn_thresholds=self.learn_thresholds,
                    selection=self.selection,
                )
            except ValueError as error:
                raise ConfigError(str(error)) from None
            self.hard_threshold = resolved.hard_threshold
            self.learn_thresholds = resolved.learn_thresholds
        for name in ("max_time", "time_budget"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if self.best_from is not None and not 0.0 <= self.best_from <= 1.0:
            raise ConfigError(f"best_from must be in [0, 1], got {self.best_from}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        weights = ("energy_weight", "forces_weight", "stress_weight")
        for name in (*weights, "weight_decay", "penalty", "masked_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction <= self.prune_end_fraction <= 1:
            raise ConfigError("need 0 <= warmup_fraction <= prune_end_fraction <= 1")
        if self.huber_delta is not None and not (math.isfinite(self.huber_delta) and self.huber_delta > 0):
            raise ConfigError(f"huber_delta must be positive (eV/atom, eV/Å, eV/Å³), got {self.huber_delta}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be at least 1 epoch, got {self.patience}")
        if self.energy_weight == self.forces_weight == self.stress_weight == 0:
            raise ConfigError("energy_weight, forces_weight and stress_weight are all 0: nothing to fit")

    def _refuse_options_of_other_methods(self) -> None:
        """Refuse options set away from their defaults that the method would ignore, and record
        ``density=None`` for the methods that have none (full, elora and shift change what they
        change), so that the record never claims a density the delta was not made to."""
        defaults = FinetuneConfig.__dataclass_fields__
        ignored = []
        has_no_density = self.method in ("full", "elora", "shift")
        if has_no_density and self.density not in (None, defaults["density"].default):
            ignored.append(f"--density {self.density} (density={self.density})")
        if self.method not in ("sparse", "l1") and self.penalty:
            ignored.append(f"--penalty {self.penalty} (penalty={self.penalty})")
        if self.method != "sparse" and self.hard_threshold is not None:
            threshold = "hard" if self.hard_threshold else "soft"
            ignored.append(f"--threshold {threshold} (hard_threshold={self.hard_threshold})")
        if self.method != "sparse" and self.masked_decay != defaults["masked_decay"].default:
            ignored.append(f"--masked-decay {self.masked_decay} (masked_decay={self.masked_decay})")
        if self.method != "elora" and self.rank != defaults["rank"].default:
            ignored.append(f"--rank {self.rank} (rank={self.rank})")
        if self.method == "shift" and self.lr is not None:
            ignored.append(f"--lr {self.lr} (lr={self.lr})")
        if self.method == "shift" and self.train_readouts:
            ignored.append("--train-readouts (train_readouts=True)")
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} does not apply to method {self.method!r}")
        if has_no_density:
            self.density = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all options."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Inverse of :meth:`to_dict` (unknown keys go to ``extra``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("extra", {}).update({k: v for k, v in data.items() if k not in known})
        return cls(**kwargs)
