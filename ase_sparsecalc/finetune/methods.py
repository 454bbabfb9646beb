r"""How a delta is parametrised while it trains.

Every method holds trainable tensors that produce, for each chosen model tensor :math:`W_0`,
a delta :math:`\Delta` of the same shape; the model runs with :math:`W_0 + \Delta` (through
``torch.func.functional_call``: the base weights are never modified). All deltas are measured
in units of their tensor's RMS value :math:`c = \mathrm{rms}(W_0)`, so one learning rate suits
tensors of any scale.

``sparse`` (default): a thresholded delta whose support is chosen while it trains,

.. math:: \Delta = c\,u\,[|u| > t] \quad\text{(hard, default with a target density)}, \qquad
          \Delta = c\,\mathrm{sign}(u)\,\max(|u| - t, 0) \quad\text{(soft: STR)},

with :math:`t = \tau e^{s}`. With a target density, the global factor :math:`\tau` is set
before every step so that exactly the scheduled fraction of entries is non-zero (dense for a
short warm-up, then a cubic decay to the target). Entries below threshold still receive the
gradient of the loss (straight-through), so the support keeps changing while training and an
entry that becomes useful re-enters. Learned log-thresholds :math:`s` per tensor (the soft
threshold's default; optional with the hard one, through the soft threshold's gradient) decide
*where* the budget goes; the schedule sets *how much*. Without a target density, an l1 penalty
on :math:`\Delta/c` and learned soft thresholds decide the sparsity.

Baselines in the same code path: ``l1`` (dense delta with an l1 pull, one-shot magnitude pruning
to the target density, survivors retrained), ``gmp`` (gradual magnitude pruning of the delta),
``full`` (every parameter, dense), ``elora`` (low-rank update of every irrep-path block, merged
into a dense delta on export).

Only per-path weights change, so the calibrated model is exactly as equivariant as the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import ClassVar

import torch

from ..backends.base import WeightInfo
from ..delta import TensorDelta


@dataclass
class MethodOptions:
    """Options shared by the delta methods.

    Attributes
    ----------
    density : float or None
        Target fraction of non-zero entries of the trainable set (sparse, l1, gmp).
    penalty : float
        Strength of the l1 pull on :math:`\\Delta/c` (mean over entries).
    warmup_fraction, prune_end_fraction : float
        Density schedule: dense until ``warmup_fraction`` of training, cubic decay to
        ``density`` at ``prune_end_fraction``, constant after.
    init_threshold : float
        Initial relative threshold of ``sparse`` without a target density.
    rank : int
        Rank of each path block's update (``elora``).
    straight_through : bool
        Let entries below threshold receive gradients (``sparse``).
    learn_thresholds : bool or None
        Learn one threshold per tensor (``sparse``); otherwise all share the global one.
        None: learned with the soft threshold, shared with the hard one.
    ste_scale : float
        Fraction of the gradient passed to entries below threshold (``sparse``).
    settle_support : bool
        Stop the straight-through gradient once the target density is reached, so the support
        settles and only the chosen entries keep training (``sparse``).
    masked_decay : float
        Decoupled decay of the entries below threshold (``sparse`` with straight-through): after
        every step they shrink by the factor ``1 - lr * masked_decay``. The loss does not depend
        on them, so nothing else pulls them back; without decay their values drift like a random
        walk, and the threshold, set by the largest values, rises with the number of steps
        (SR-STE, Zhou et al. 2021, adds the same decay for the same reason). 0 turns it off.
    dense_kinds : tuple of str
        Weight kinds (``"embedding"``, ``"readout"``, ...) that change densely, outside the
        threshold (``sparse``). Their non-zero entries count towards the target density, so the
        thresholded tensors get the rest of the budget. Useful for tensors whose useful changes
        are small against their own scale and so never cross a threshold shared with the others:
        the rows of the element embedding for the elements in the data are one. On ethanol
        (50 frames) neither the embedding nor embedding and readouts helped (benchmarks).
    hard_threshold : bool or None
        Keep the full value of entries above threshold, ``Δ = c u [|u| > t]`` (``sparse``),
        instead of shrinking them by the threshold (soft, STR). Learned thresholds then receive
        the soft threshold's gradient (straight-through). None: hard with a target density,
        soft without one (the penalty form needs the soft threshold's shrinkage).
    selection : str
        How the hard threshold ranks entries (``sparse`` with a target density and one global
        threshold): ``"magnitude"`` (|u|, default), ``"movement"`` or ``"fisher"``
        (:data:`SELECTIONS`).
    seed : int
        Seed of random initial values (``elora``'s factors).
    scalar_lr_factor : float
        Learning rate of the model scalars outside the weight tensors (kind ``"other"``, trained
        with ``train_scalars``) as a fraction of the delta's learning rate.
    """

    density: float | None = 0.03
    penalty: float = 0.0
    warmup_fraction: float = 0.05
    prune_end_fraction: float = 0.6
    init_threshold: float = 1e-3
    rank: int = 4
    straight_through: bool = True
    learn_thresholds: bool | None = None
    ste_scale: float = 1.0
    settle_support: bool = False
    hard_threshold: bool | None = None
    masked_decay: float = 0.1
    dense_kinds: tuple[str, ...] = ()
    selection: str = "magnitude"
    seed: int = 0
    scalar_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        """Resolve the automatic choices (None) of ``hard_threshold`` and ``learn_thresholds``."""
        if self.hard_threshold is None:  # hard with a density target; STR for the penalty form
            self.hard_threshold = self.density is not None
        if self.learn_thresholds is None:
            self.learn_thresholds = not self.hard_threshold
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {self.selection!r}")
        if self.selection != "magnitude" and not (
            self.hard_threshold and self.density is not None and not self.learn_thresholds
        ):
            raise ValueError(
                f"selection {self.selection!r} needs the hard threshold, a target density"
                " and one global threshold"
            )


SELECTIONS = ("magnitude", "movement", "fisher")
r"""How ``sparse`` ranks entries for its hard threshold (:class:`MethodOptions`): by size
:math:`|u|`; by movement, the accumulated first-order loss change :math:`-\sum_t g_t u_t`; or by
the second-order (Fisher, optimal-brain-damage) estimate of the loss increase if the entry were
zeroed, :math:`u^2 \langle g^2 \rangle`, with :math:`\langle g^2 \rangle` a running mean of the
squared gradient. Unlike size in units of each tensor's RMS, the Fisher score is in units of the
loss, so tensors of different sensitivity compete on one scale."""

FISHER_DECAY = 0.99
"""Per-step decay of the running mean of squared gradients behind ``selection="fisher"``
(a memory of about 100 optimizer steps)."""


def density_schedule(progress: float, target: float, start: float, end: float) -> float:
    """Cubic density schedule: 1 before ``start``, ``target`` after ``end`` (progress in [0, 1])."""
    if progress <= start:
        return 1.0
    if progress >= end or end <= start:
        return target
    remaining = 1.0 - (progress - start) / (end - start)
    return target + (1.0 - target) * remaining**3


class DeltaMethod(torch.nn.Module):
    """Base class: trainable parameters that produce a delta for each chosen tensor.

    Parameters
    ----------
    infos : list of WeightInfo
        The model tensors the method may change.
    base : dict of str to Tensor
        Their current values :math:`W_0` (kept by reference, never modified).
    options : MethodOptions
    """

    name: ClassVar[str] = ""

    def __init__(self, infos: list[WeightInfo], base: dict[str, torch.Tensor], options: MethodOptions):
        super().__init__()
        self.infos = infos
        self.names = [i.name for i in infos]
        self.options = options
        self._base = {n: base[n].detach() for n in self.names}
        ref = self._base[self.names[0]]
        self.register_buffer("scales", torch.stack([_rms(self._base[n]) for n in self.names]).to(ref))

    @property
    def trainable_numel(self) -> int:
        """Number of model weights the method may change."""
        return sum(i.numel for i in self.infos)

    def deltas(self) -> dict[str, torch.Tensor]:
        """Current delta of every chosen tensor (same shape and dtype as the tensor)."""
        raise NotImplementedError

    def effective_parameters(self) -> dict[str, torch.Tensor]:
        """``W0 + Δ`` for every chosen tensor, for ``functional_call``."""
        return {n: self._base[n] + d for n, d in self.deltas().items()}

    def penalty(self) -> torch.Tensor:
        """Regularisation added to the loss (zero by default)."""
        return torch.zeros((), dtype=self.scales.dtype, device=self.scales.device)

    def update_schedule(self, progress: float) -> None:
        """Called before every training step with the fraction of training done."""

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step with the learning rate that step used."""

    def finalize(self) -> None:
        """Called once after training, before export (e.g. to settle the final density)."""

    @torch.no_grad()
    def export(self) -> dict[str, TensorDelta]:
        """The exact non-zero entries of the current deltas."""
        out = {}
        for name, delta in self.deltas().items():
            flat = delta.detach().reshape(-1)
            idx = torch.nonzero(flat).reshape(-1)
            if idx.numel():
                out[name] = TensorDelta.create(idx.cpu(), flat[idx].cpu(), tuple(delta.shape), name)
        return out

    @torch.no_grad()
    def density(self) -> float:
        """Fraction of non-zero delta entries over the trainable set."""
        nnz = sum(int((d != 0).sum()) for d in self.deltas().values())
        return nnz / max(self.trainable_numel, 1)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        r"""How the delta looks now, for the training history (called once per epoch).

        ``median_change``: median of :math:`|\Delta| / c` over the non-zero entries (0 when
        there are none). ``support_turnover``: fraction of the non-zero entries that were zero at
        the previous call (absent on the first call); it falls towards 0 as the support settles.
        """
        deltas = list(self.deltas().values())
        supports = [d != 0 for d in deltas]
        relative = torch.cat(
            [(d.abs() / c)[m] for d, c, m in zip(deltas, self.scales, supports, strict=True)]
        )
        out = {"median_change": float(relative.median()) if relative.numel() else 0.0}
        previous = getattr(self, "_previous_support", None)
        if previous is not None:
            nnz = sum(int(m.sum()) for m in supports)
            entered = sum(int((m & ~p).sum()) for m, p in zip(supports, previous, strict=True))
            out["support_turnover"] = entered / nnz if nnz else 0.0
        self._previous_support = supports
        return out

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; ``"blocks"`` are only read by :class:`~.optim.FactoredAdam`."""
        u = getattr(self, "u", None)
        if u is not None:  # one trainable tensor per chosen model tensor, same shape
            # with scalar_lr_factor, model scalars get a group of their own after the weight
            # tensors (after_step reads the first group's rate)
            factor = self.options.scalar_lr_factor
            split = [info.kind == "other" and factor != 1.0 for info in self.infos]
            groups = []
            for scalars, rate in ((False, lr), (True, lr * factor)):
                chosen = [k for k in range(len(self.infos)) if split[k] == scalars]
                if chosen:
                    groups.append(
                        {
                            "params": [u[k] for k in chosen],
                            "lr": rate,
                            "weight_decay": weight_decay,
                            "blocks": [moment_blocks(self.infos[k]) for k in chosen],
                        }
                    )
            return groups
        return [
            {
                "params": [p for p in self.parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": weight_decay,
            }
        ]


def _rms(t: torch.Tensor) -> torch.Tensor:
    value = t.detach().double().pow(2).mean().sqrt()
    return value if value > 0 else torch.ones((), dtype=torch.float64, device=t.device)


def _zeros_like_base(base: dict[str, torch.Tensor], names: list[str]) -> torch.nn.ParameterList:
    return torch.nn.ParameterList([torch.nn.Parameter(torch.zeros_like(base[n])) for n in names])


class ThresholdedDelta(DeltaMethod):
    """``sparse``: a thresholded delta (hard by default, soft: STR) chosen while it trains."""

    name = "sparse"

    def __init__(self, infos, base, options):
        super().__init__(infos, base, options)
        self.u = _zeros_like_base(self._base, self.names)
        init = 0.0 if options.density is not None else float(torch.tensor(options.init_threshold).log())
        self.log_threshold = torch.nn.Parameter(
            torch.full((len(self.names),), init).to(self.scales), requires_grad=options.learn_thresholds
        )
        self.register_buffer("tau", torch.tensor(0.0 if options.density is not None else 1.0).to(self.scales))
        self._selecting = True  # straight-through gradients while the support is being chosen
        # kind "other" (model scalars outside the weight tensors, train_scalars) always changes densely
        self._dense = [info.kind in options.dense_kinds or info.kind == "other" for info in infos]
        self._scored = options.selection != "magnitude"
        if self._scored:  # movement scores or squared-gradient means, one per entry (checkpointed)
            for k, name in enumerate(self.names):
                self.register_buffer(f"score_{k}", torch.zeros_like(self._base[name]))
            self.register_buffer("active", torch.tensor(False))

    def _scores(self) -> list[torch.Tensor]:
        return [getattr(self, f"score_{k}") for k in range(len(self.names))]

    def _ranks(self) -> list[torch.Tensor]:
        r"""What the hard threshold compares with :math:`\tau` for a scored selection, per tensor."""
        if self.options.selection == "fisher":
            return [u.detach().square() * mean_sq for u, mean_sq in zip(self.u, self._scores(), strict=True)]
        return self._scores()

    def thresholds(self) -> torch.Tensor:
        r"""Threshold :math:`t = \tau e^{s}` of every tensor (units of its RMS), shape (n_tensors,)."""
        return self.tau * self.log_threshold.exp()

    def deltas(self):
        out = {}
        thresholds = self.thresholds()
        dense = not self._thresholding()  # dense phase of the schedule: no threshold at all
        ranks = self._ranks() if self._scored and not dense else None
        for k, (name, u) in enumerate(zip(self.names, self.u, strict=True)):
            if dense or self._dense[k]:
                out[name] = self.scales[k] * u
                continue
            t = thresholds[k]
            magnitude = u.abs()
            kept = (magnitude if ranks is None else ranks[k]) > t
            if self.options.hard_threshold:
                value = u * kept
                if self.options.learn_thresholds:  # the soft threshold's gradient for t only
                    shrink = torch.sign(u.detach()) * torch.relu(magnitude.detach() - t)
                    value = value + (shrink - shrink.detach())
            else:
                value = torch.sign(u) * torch.relu(magnitude - t)
            if self.options.straight_through and self.training and self._selecting:
                value = value + self.options.ste_scale * (~kept) * (u - u.detach())
            out[name] = self.scales[k] * value
        return out

    @torch.no_grad()
    def update_schedule(self, progress):
        opts = self.options
        if opts.density is None:
            return
        target = density_schedule(progress, opts.density, opts.warmup_fraction, opts.prune_end_fraction)
        self.tau.fill_(self._tau_for_density(target))
        if self._scored:
            self.active.fill_(target < 1.0)
        self._selecting = not opts.settle_support or progress < opts.prune_end_fraction

    def _thresholding(self) -> bool:
        """True once the schedule has left its dense phase."""
        return bool(self.active) if self._scored else bool(self.tau > 0)

    @torch.no_grad()
    def after_step(self, lr):
        if self._scored and self._selecting:
            for u, score in zip(self.u, self._scores(), strict=True):
                if u.grad is None:
                    continue
                if self.options.selection == "movement":  # S -= dL/dDelta * Delta = dL/du * u
                    score.sub_(u.grad * u)
                else:  # running mean of (dL/du)^2; the ranking ignores its common bias
                    score.mul_(FISHER_DECAY).addcmul_(u.grad, u.grad, value=1.0 - FISHER_DECAY)
        decay = self.options.masked_decay
        if decay <= 0 or not (self.options.straight_through and self._selecting and self._thresholding()):
            return
        factor = max(0.0, 1.0 - lr * decay)
        ranks = self._ranks() if self._scored else [u.abs() for u in self.u]
        for u, rank, t, dense in zip(self.u, ranks, self.thresholds(), self._dense, strict=True):
            if not dense:
                u.mul_(torch.where(rank <= t, factor, 1.0))

    @torch.no_grad()
    def diagnostics(self):
        r"""Adds ``threshold``: the median over tensors of :math:`t` (units of :math:`c`)."""
        out = super().diagnostics()
        out["threshold"] = float(self.thresholds().median())
        return out

    @torch.no_grad()
    def _tau_for_density(self, target: float) -> float:
        if target >= 1.0:
            return 0.0
        thresholded = [k for k, dense in enumerate(self._dense) if not dense]
        if not thresholded:
            return 0.0
        if self._scored:
            ranks = self._ranks()
            ranked = [ranks[k] for k in thresholded]
        else:
            ranked = [self.u[k].abs() / self.log_threshold[k].exp() for k in thresholded]
        ratios = torch.cat([r.reshape(-1) for r in ranked])
        dense_nnz = sum(int((u != 0).sum()) for u, dense in zip(self.u, self._dense, strict=True) if dense)
        keep = round(target * self.trainable_numel) - dense_nnz
        if keep >= ratios.numel():
            return float("-inf") if self._scored else 0.0
        if keep <= 0:
            return float(ratios.max()) + 1.0
        # tau = the keep-th largest ratio's lower neighbour: exactly `keep` entries lie above it
        return float(torch.kthvalue(ratios, ratios.numel() - keep).values)

    def finalize(self):
        if self.options.density is not None:
            self.update_schedule(1.0)

    def penalty(self):
        if self.options.penalty <= 0:
            return super().penalty()
        total = sum(
            torch.relu(u.abs() - t).sum()
            for u, t, dense in zip(self.u, self.thresholds(), self._dense, strict=True)
            if not dense
        )
        return self.options.penalty * total / self.trainable_numel

    def parameter_groups(self, lr, weight_decay):
        groups = super().parameter_groups(lr, weight_decay)
        if self.options.learn_thresholds:
            groups.append({"params": [self.log_threshold], "lr": lr, "weight_decay": 0.0})
        return groups


class L1PrunedDelta(DeltaMethod):
    """``l1``: dense delta with an l1 pull, one-shot magnitude pruning, survivors retrained."""

    name = "l1"
    prune_at = 0.7

    def __init__(self, infos, base, options):
        super().__init__(infos, base, options)
        self.u = _zeros_like_base(self._base, self.names)
        self.masks: list[torch.Tensor] | None = None

    def get_extra_state(self):
        return {"masks": self.masks}

    def set_extra_state(self, state):
        self.masks = state["masks"]

    def deltas(self):
        out = {}
        for k, (name, u) in enumerate(zip(self.names, self.u, strict=True)):
            value = u if self.masks is None else u * self.masks[k]
            out[name] = self.scales[k] * value
        return out

    def penalty(self):
        if self.options.penalty <= 0:
            return super().penalty()
        return self.options.penalty * sum(u.abs().sum() for u in self.u) / self.trainable_numel

    @torch.no_grad()
    def update_schedule(self, progress):
        if self.masks is None and self.options.density is not None and progress >= self.prune_at:
            self.masks = _magnitude_masks(list(self.u), self.options.density)

    def finalize(self):
        self.update_schedule(1.0)


class MagnitudePrunedDelta(DeltaMethod):
    """``gmp``: gradual magnitude pruning of the delta on the cubic density schedule."""

    name = "gmp"

    def __init__(self, infos, base, options):
        super().__init__(infos, base, options)
        self.u = _zeros_like_base(self._base, self.names)
        self.masks: list[torch.Tensor] = [torch.ones_like(u, dtype=torch.bool) for u in self.u]

    def get_extra_state(self):
        return {"masks": self.masks}

    def set_extra_state(self, state):
        self.masks = state["masks"]

    def deltas(self):
        return {
            n: self.scales[k] * u * m
            for k, (n, u, m) in enumerate(zip(self.names, self.u, self.masks, strict=True))
        }

    @torch.no_grad()
    def update_schedule(self, progress):
        opts = self.options
        target = density_schedule(
            progress, opts.density or 1.0, opts.warmup_fraction, opts.prune_end_fraction
        )
        if target < 1.0:
            masked = [u * m for u, m in zip(self.u, self.masks, strict=True)]
            self.masks = [
                m & new for m, new in zip(self.masks, _magnitude_masks(masked, target), strict=True)
            ]
            for u, m in zip(self.u, self.masks, strict=True):
                u.mul_(m)

    def finalize(self):
        self.update_schedule(1.0)


def _magnitude_masks(tensors: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    values = torch.cat([t.detach().abs().reshape(-1) for t in tensors])
    keep = max(1, round(density * values.numel()))
    cut = torch.kthvalue(values, values.numel() - keep).values if keep < values.numel() else -1.0
    return [t.detach().abs() > cut for t in tensors]


class DenseDelta(DeltaMethod):
    """``full``: every parameter of the model, dense."""

    name = "full"

    def __init__(self, infos, base, options):
        super().__init__(infos, base, options)
        self.u = _zeros_like_base(self._base, self.names)

    def deltas(self):
        return {n: self.scales[k] * u for k, (n, u) in enumerate(zip(self.names, self.u, strict=True))}


class LowRankPathDelta(DeltaMethod):
    """``elora``: a rank-r update ``A @ B`` of every irrep-path block, merged on export.

    ``A`` (rows x r) starts at zero and ``B`` (r x cols) at random, so that a row whose entries
    get no gradient keeps ``A``'s row, and the update's row, exactly zero. Element-indexed
    weights (the element embedding, MACE's per-element blocks) hold their elements along the
    rows: the rows of elements absent from the training data never change, as with the other
    methods. (With the factors the other way round, every row would take a share of ``B``.)
    """

    name = "elora"

    def __init__(self, infos, base, options):
        super().__init__(infos, base, options)
        generator = torch.Generator().manual_seed(options.seed)
        self.factors = torch.nn.ParameterList()
        self.layout: list[list[tuple[int, int, int]]] = []  # per tensor: (rows, cols, rank) per block
        for info in infos:
            blocks = []
            for rows, cols in _path_blocks(info):
                rank = min(options.rank, rows, cols) if rows > 1 else 0
                if rank:
                    b = torch.randn(rank, cols, generator=generator) / cols**0.5
                    self.factors.append(torch.nn.Parameter(torch.zeros(rows, rank).to(self.scales)))
                    self.factors.append(torch.nn.Parameter(b.to(self.scales)))
                else:
                    self.factors.append(torch.nn.Parameter(torch.zeros(rows * cols).to(self.scales)))
                blocks.append((rows, cols, rank))
            self.layout.append(blocks)

    def deltas(self):
        out, f = {}, 0
        for k, (info, blocks) in enumerate(zip(self.infos, self.layout, strict=True)):
            parts = []
            for rows, cols, rank in blocks:
                if rank:
                    block = self.factors[f] @ self.factors[f + 1]
                    f += 2
                else:
                    block = self.factors[f].reshape(rows, cols)
                    f += 1
                parts.append(block)
            if info.coordinate == "column":
                delta = torch.cat(parts, dim=1).reshape(info.shape)
            else:
                delta = torch.cat([p.reshape(-1) for p in parts]).reshape(info.shape)
            out[info.name] = self.scales[k] * delta
        return out


def _path_blocks(info: WeightInfo) -> list[tuple[int, int]]:
    """(rows, cols) of each path block as a matrix."""
    if info.coordinate == "column":
        rows = prod(info.shape[:-1])
        return [(rows, seg.stop - seg.start) for seg in info.segments]
    blocks = []
    for seg in info.segments:
        whole = seg.shape and prod(seg.shape) == seg.stop - seg.start  # not a scalar (shape ())
        shape = seg.shape if whole else (seg.stop - seg.start,)
        rows = prod(shape[:-1]) if len(shape) > 1 else 1
        blocks.append((rows, shape[-1]))
    return blocks


METHODS: dict[str, type[DeltaMethod]] = {
    cls.name: cls
    for cls in (ThresholdedDelta, L1PrunedDelta, MagnitudePrunedDelta, DenseDelta, LowRankPathDelta)
}
"""Trainable delta methods by name; ``shift`` (energy shifts only) needs no training."""


def moment_blocks(info: WeightInfo) -> list[tuple[str, int, int, int, int]]:
    """Matrix blocks of a tensor for factored second moments: one per irrep path.

    Returns ``(coordinate, start, stop, rows, cols)`` tuples (see
    :data:`~.optim.Block`) that cover every entry of the tensor exactly once; ranges no path
    claims become ``1 x n`` blocks (per-entry moments).
    """
    if info.coordinate == "column":
        rows, extent = prod(info.shape[:-1]), info.shape[-1]
        claimed = [("column", s.start, s.stop, rows, s.stop - s.start) for s in info.segments]
    else:
        rows, extent = 1, info.numel
        claimed = [
            ("flat", s.start, s.stop, r, c)
            for s, (r, c) in zip(info.segments, _path_blocks(info), strict=True)
        ]
    blocks, at = [], 0
    for block in sorted(claimed, key=lambda b: b[1]):
        if block[1] > at:
            blocks.append(_gap(info.coordinate, at, block[1], rows))
        blocks.append(block)
        at = block[2]
    if at < extent:
        blocks.append(_gap(info.coordinate, at, extent, rows))
    return blocks


def _gap(coordinate: str, start: int, stop: int, rows: int) -> tuple[str, int, int, int, int]:
    if coordinate == "column":
        return ("column", start, stop, rows, stop - start)
    return ("flat", start, stop, 1, stop - start)
