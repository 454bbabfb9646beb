"""Labelled mini-batches, built once and kept on the training device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backends.base import Backend, ModelOutput
from ..graph import AtomicGraph, build_graph
from .data import Frame


@dataclass
class LabelledBatch:
    """G structures and their DFT labels.

    Attributes
    ----------
    graph : AtomicGraph
    energy : (G,) eV
    n_atoms : (G,) atoms per structure
    forces : (N, 3) eV/Å (zeros where a frame has none)
    force_mask : (N,) bool, atoms whose frame has forces
    stress : (G, 3, 3) eV/Å³ (zeros where absent)
    stress_mask : (G,) bool
    frame_ids : (G,) indices into the frame list the batch was made from
    """

    graph: AtomicGraph
    energy: torch.Tensor
    n_atoms: torch.Tensor
    forces: torch.Tensor
    force_mask: torch.Tensor
    stress: torch.Tensor
    stress_mask: torch.Tensor
    frame_ids: list[int]

    @property
    def has_stress(self) -> bool:
        """True when any structure of the batch has a stress label."""
        return bool(self.stress_mask.any())


def make_batches(
    frames: Sequence[Frame], backend: Backend, batch_size: int, seed: int | None = None
) -> list[LabelledBatch]:
    """Split frames into batches (shuffled with ``seed``, in order when None) on the backend's device.

    Raises
    ------
    UnknownElementError, AtomsTooCloseError
        Naming the frame.
    """
    order = np.arange(len(frames)) if seed is None else np.random.default_rng(seed).permutation(len(frames))
    for frame in frames:
        backend.check_elements(frame.atoms.numbers, frame.source)
    return [
        _labelled_batch([int(i) for i in order[start : start + batch_size]], frames, backend)
        for start in range(0, len(frames), batch_size)
    ]


def _labelled_batch(ids: list[int], frames: Sequence[Frame], backend: Backend) -> LabelledBatch:
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
        energy=torch.tensor([f.energy for f in chosen], **as_float),
        n_atoms=torch.tensor([f.n_atoms for f in chosen], **as_float),
        forces=torch.as_tensor(forces, **as_float),
        force_mask=torch.as_tensor(force_mask, device=backend.device),
        stress=torch.as_tensor(stress, **as_float),
        stress_mask=torch.tensor([f.stress is not None for f in chosen], device=backend.device),
        frame_ids=ids,
    )


@dataclass
class LossWeights:
    """Weights and Huber transition of the loss terms (see :class:`FinetuneConfig`)."""

    energy: float = 100.0
    forces: float = 1.0
    stress: float = 100.0
    huber_delta: float | None = None


def _mean_loss(error: torch.Tensor, huber_delta: float | None) -> torch.Tensor:
    if error.numel() == 0:
        return error.new_zeros(())
    if huber_delta is None:
        return error.pow(2).mean()
    return torch.nn.functional.huber_loss(error, torch.zeros_like(error), delta=huber_delta)


def batch_loss(out: ModelOutput, batch: LabelledBatch, weights: LossWeights) -> torch.Tensor:
    """Weighted energy-per-atom, force and stress loss of one batch (a scalar tensor)."""
    loss = weights.energy * _mean_loss((out.energy - batch.energy) / batch.n_atoms, weights.huber_delta)
    if weights.forces and out.forces is not None:
        error = (out.forces - batch.forces)[batch.force_mask]
        loss = loss + weights.forces * _mean_loss(error, weights.huber_delta)
    if weights.stress and out.stress is not None and batch.has_stress:
        error = (out.stress - batch.stress)[batch.stress_mask]
        loss = loss + weights.stress * _mean_loss(error, weights.huber_delta)
    return loss


def predict(
    backend: Backend, batches: Sequence[LabelledBatch], parameters_fn=None
) -> dict[int, dict[str, np.ndarray]]:
    """Model predictions for every frame of ``batches`` (keyed by frame id), no training graph.

    ``parameters_fn`` returns replacement parameters (a method's ``W0 + Δ``); None runs the
    backend as it is.
    """
    out: dict[int, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        params = parameters_fn() if parameters_fn is not None else None
    for batch in batches:
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
    return out
