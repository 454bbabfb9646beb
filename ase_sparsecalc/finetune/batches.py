"""Labelled mini-batches, built once and kept on the training device.

In a data-parallel run (:mod:`.distributed`) each process builds only its shard of every batch;
the batch remembers the *global* counts its loss is normalised by, so that the shard losses of
all processes add up to the loss of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backends.base import Backend, ModelOutput
from ..graph import AtomicGraph, build_graph
from . import distributed
from .data import Frame


@dataclass
class LabelledBatch:
    """G structures and their DFT labels.

    Attributes
    ----------
    graph : AtomicGraph
    energy : (G,) eV, float64 (total energies; see :meth:`Backend.evaluate`)
    n_atoms : (G,) atoms per structure
    forces : (N, 3) eV/Å (zeros where a frame has none)
    force_mask : (N,) bool, atoms whose frame has forces
    stress : (G, 3, 3) eV/Å³ (zeros where absent)
    stress_mask : (G,) bool
    frame_ids : (G,) indices into the frame list the batch was made from
    counts : LossCounts, optional
        Structures, force components and stress components of the whole batch (all shards);
        None: this batch is whole, count its own.
    """

    graph: AtomicGraph
    energy: torch.Tensor
    n_atoms: torch.Tensor
    forces: torch.Tensor
    force_mask: torch.Tensor
    stress: torch.Tensor
    stress_mask: torch.Tensor
    frame_ids: list[int]
    counts: LossCounts | None = None

    @property
    def has_stress(self) -> bool:
        """True when any structure of the batch (of this shard) has a stress label."""
        return bool(self.stress_mask.any())

    @property
    def is_empty(self) -> bool:
        """True for a shard with no structures (a rank left over in a small batch)."""
        return not self.frame_ids

    def loss_counts(self) -> LossCounts:
        """The counts the loss terms are averaged over (global ones when the batch is sharded)."""
        if self.counts is not None:
            return self.counts
        return LossCounts(
            structures=len(self.frame_ids),
            force_components=3 * int(self.force_mask.sum()),
            stress_components=9 * int(self.stress_mask.sum()),
        )


@dataclass(frozen=True)
class LossCounts:
    """Denominators of the three mean-squared loss terms of one batch.

    Attributes
    ----------
    structures : int
        Structures (energy term).
    force_components : int
        3 x atoms with force labels (force term).
    stress_components : int
        9 x structures with stress labels (stress term).
    """

    structures: int
    force_components: int
    stress_components: int

    @classmethod
    def of_frames(cls, frames: Sequence[Frame]) -> LossCounts:
        """Counts of a list of frames."""
        return cls(
            structures=len(frames),
            force_components=sum(3 * f.n_atoms for f in frames if f.forces is not None),
            stress_components=sum(9 for f in frames if f.stress is not None),
        )


def make_batches(
    frames: Sequence[Frame],
    backend: Backend,
    batch_size: int,
    seed: int | None = None,
    process: distributed.ProcessInfo | None = None,
) -> list[LabelledBatch]:
    """Split frames into batches (shuffled with ``seed``, in order when None) on the backend's device.

    Parameters
    ----------
    frames : sequence of Frame
    backend : Backend
    batch_size : int
        Structures per batch (over all processes of a data-parallel run).
    seed : int, optional
    process : ProcessInfo, optional
        Rank and world size; default: the initialised process group, else a single process.
        With several processes, every batch holds only this rank's shard (every
        ``world_size``-th frame of it) and the global loss counts of the whole batch.

    Raises
    ------
    UnknownElementError, AtomsTooCloseError
        Naming the frame.
    """
    process = process or distributed.current()
    order = np.arange(len(frames)) if seed is None else np.random.default_rng(seed).permutation(len(frames))
    for frame in frames:
        backend.check_elements(frame.atoms.numbers, frame.source)
        backend.check_charge_and_spin(frame.atoms, frame.source)
    batches = []
    for start in range(0, len(frames), batch_size):
        ids = [int(i) for i in order[start : start + batch_size]]
        if not process.distributed:
            batches.append(_labelled_batch(ids, frames, backend))
            continue
        counts = LossCounts.of_frames([frames[i] for i in ids])
        batches.append(_labelled_batch(distributed.shard(ids, process), frames, backend, counts))
    return batches


def _labelled_batch(
    ids: list[int], frames: Sequence[Frame], backend: Backend, counts: LossCounts | None = None
) -> LabelledBatch:
    if not ids:
        return _empty_batch(backend, counts)
    chosen = [frames[i] for i in ids]
    graph = build_graph(
        [f.atoms for f in chosen],
        backend.cutoff,
        backend.device,
        backend.dtype,
        names=[f.source for f in chosen],
    )
    forces = np.concatenate([f.forces if f.forces is not None else np.zeros((f.n_atoms, 3)) for f in chosen])
    force_mask = np.concatenate([np.full(f.n_atoms, f.forces is not None) for f in chosen])
    stress = np.stack([f.stress if f.stress is not None else np.zeros((3, 3)) for f in chosen])
    as_float = {"dtype": backend.dtype, "device": backend.device}
    return LabelledBatch(
        graph=graph,
        energy=torch.tensor([f.energy for f in chosen], dtype=torch.float64, device=backend.device),
        n_atoms=torch.tensor([f.n_atoms for f in chosen], **as_float),
        forces=torch.as_tensor(forces, **as_float),
        force_mask=torch.as_tensor(force_mask, device=backend.device),
        stress=torch.as_tensor(stress, **as_float),
        stress_mask=torch.tensor([f.stress is not None for f in chosen], device=backend.device),
        frame_ids=ids,
        counts=counts,
    )


def _empty_batch(backend: Backend, counts: LossCounts | None) -> LabelledBatch:
    """A shard without structures (it contributes nothing but takes part in the all-reduce)."""
    f = {"dtype": backend.dtype, "device": backend.device}
    i = {"dtype": torch.int64, "device": backend.device}
    graph = AtomicGraph(
        positions=torch.zeros(0, 3, **f),
        numbers=torch.zeros(0, **i),
        batch=torch.zeros(0, **i),
        ptr=torch.zeros(1, **i),
        edge_index=torch.zeros(2, 0, **i),
        unit_shifts=torch.zeros(0, 3, **f),
        cell=torch.zeros(0, 3, 3, **f),
        pbc=torch.zeros(0, 3, dtype=torch.bool, device=backend.device),
        total_charge=torch.zeros(0, **f),
        total_spin=torch.zeros(0, **f),
    )
    return LabelledBatch(
        graph=graph,
        energy=torch.zeros(0, dtype=torch.float64, device=backend.device),
        n_atoms=torch.zeros(0, **f),
        forces=torch.zeros(0, 3, **f),
        force_mask=torch.zeros(0, dtype=torch.bool, device=backend.device),
        stress=torch.zeros(0, 3, 3, **f),
        stress_mask=torch.zeros(0, dtype=torch.bool, device=backend.device),
        frame_ids=[],
        counts=counts,
    )


@dataclass
class LossWeights:
    """Weights and Huber transition of the loss terms (see :class:`FinetuneConfig`)."""

    energy: float = 100.0
    forces: float = 1.0
    stress: float = 1000.0
    huber_delta: float | None = None


def _mean_loss(error: torch.Tensor, huber_delta: float | None, count: int) -> torch.Tensor:
    """Sum of squares (or Huber terms) of ``error`` divided by ``count`` (the global count)."""
    if error.numel() == 0 or count == 0:
        return error.new_zeros(())
    if huber_delta is None:
        return error.pow(2).sum() / count
    zero = torch.zeros_like(error)
    return torch.nn.functional.huber_loss(error, zero, reduction="sum", delta=huber_delta) / count


def batch_loss(out: ModelOutput, batch: LabelledBatch, weights: LossWeights) -> torch.Tensor:
    """Weighted energy-per-atom, force and stress loss of one batch (a scalar tensor).

    Each term is a mean over the batch's structures, force components or stress components.
    For a shard of a batch the sums run over the shard and the means divide by the counts of
    the whole batch, so the shard losses of all ranks add up to the loss of the batch.
    """
    counts = batch.loss_counts()
    energy_error = (out.energy - batch.energy) / batch.n_atoms
    loss = weights.energy * _mean_loss(energy_error, weights.huber_delta, counts.structures)
    if weights.forces and out.forces is not None:
        error = (out.forces - batch.forces)[batch.force_mask]
        loss = loss + weights.forces * _mean_loss(error, weights.huber_delta, counts.force_components)
    if weights.stress and out.stress is not None and batch.has_stress:
        error = (out.stress - batch.stress)[batch.stress_mask]
        loss = loss + weights.stress * _mean_loss(error, weights.huber_delta, counts.stress_components)
    return loss


def predict(
    backend: Backend, batches: Sequence[LabelledBatch], parameters_fn=None
) -> dict[int, dict[str, np.ndarray]]:
    """Model predictions for every frame of ``batches`` (keyed by frame id), no training graph.

    ``parameters_fn`` returns replacement parameters (a method's ``W0 + Δ``); None runs the
    backend as it is. In a data-parallel run every rank predicts its shards and the result
    holds the frames of all ranks.
    """
    out: dict[int, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        params = parameters_fn() if parameters_fn is not None else None
    for batch in batches:
        if batch.is_empty:
            continue
        result = backend.evaluate(
            batch.graph, compute_forces=True, compute_stress=batch.has_stress, parameters=params
        )
        energy = result.energy.detach().double().cpu().numpy()
        forces = result.forces.detach().double().cpu().numpy()
        ptr = batch.graph.ptr.cpu().numpy()
        for g, frame_id in enumerate(batch.frame_ids):
            entry = {"energy": energy[g], "forces": forces[ptr[g] : ptr[g + 1]]}
            if result.stress is not None and bool(batch.stress_mask[g]):
                entry["stress"] = result.stress[g].detach().double().cpu().numpy()
            out[frame_id] = entry
    return distributed.gather_dicts(out)
