"""Helpers for tests, examples and benchmarks: small real MACE models and random deltas.

Nothing here downloads anything: :func:`build_mace_model` constructs a genuine
``mace.modules.ScaleShiftMACE`` (random weights, the same architecture family as MACE-MP-0),
which is how the test suite exercises the MACE backend offline.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .backends.base import Backend
from .delta import DeltaMetadata, SparseDelta, TensorDelta
from .torch_setup import import_keeping_weights_only

_CHARGE_AND_SPIN_EMBEDDINGS = {
    "embedding_specs": {
        "total_spin": {"type": "categorical", "per": "graph", "in_dim": 1, "emb_dim": 16, "num_classes": 101},
        "total_charge": {
            "type": "categorical",
            "per": "graph",
            "in_dim": 1,
            "emb_dim": 16,
            "num_classes": 201,
            "offset": 100,
        },
    },
    "use_embedding_readout": True,
}


def build_mace_model(
    atomic_numbers: Sequence[int] = (1, 6, 8, 14, 29),
    *,
    hidden_irreps: str = "8x0e+8x1o+8x2e",
    max_ell: int = 3,
    correlation: int = 3,
    num_interactions: int = 2,
    r_max: float = 5.0,
    atomic_energies: Sequence[float] | None = None,
    charge_and_spin: bool = False,
    heads: Sequence[str] | None = None,
    interaction: str = "RealAgnosticResidualInteractionBlock",
    agnostic_product: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A small ``ScaleShiftMACE`` with random weights (float64).

    Parameters
    ----------
    atomic_numbers : sequence of int
        Elements the model knows.
    hidden_irreps : str
        Node-feature irreps; ``"8x0e+8x1o+8x2e"`` keeps s, p and d channels.
    max_ell : int
        Highest spherical harmonic of the edge attributes (3 gives f channels).
    atomic_energies : sequence of float, optional
        Isolated-atom energies E0 in eV, one per element (default: -1 eV each).
    charge_and_spin : bool
        Condition the model on each structure's total charge and spin multiplicity through
        categorical embeddings with an energy readout, as MACE-OMOL is (charges -100 to 100,
        multiplicities 0 to 100).
    heads : sequence of str, optional
        Output heads of a multi-head model (head k's isolated-atom energies are those of
        ``atomic_energies`` minus k eV); default: one head.
    interaction : str
        mace's interaction block (a key of ``mace.modules.interaction_classes``), e.g.
        ``"RealAgnosticResidualNonLinearInteractionBlock"`` (radial MLP of ``torch.nn.Linear``
        layers, scalar parameters).
    agnostic_product : bool
        mace's ``use_agnostic_product``: one set of symmetric-contraction weights for all elements.
    seed : int
        Seed of the weight initialisation.
    """
    modules = import_keeping_weights_only("mace.modules")
    from e3nn import o3

    torch.manual_seed(seed)
    energies = np.asarray(atomic_energies if atomic_energies is not None else [-1.0] * len(atomic_numbers))
    scale_shift = {"atomic_inter_scale": 1.0, "atomic_inter_shift": 0.0}
    if heads is not None:  # one row of E0s and one scale and shift per head
        energies = np.stack([energies - k for k in range(len(heads))])
        scale_shift = {k: [v] * len(heads) for k, v in scale_shift.items()} | {"heads": list(heads)}
    block = modules.interaction_classes[interaction]
    options = {"use_agnostic_product": True} if agnostic_product else {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = modules.ScaleShiftMACE(
            r_max=r_max,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=max_ell,
            interaction_cls=block,
            interaction_cls_first=block,
            num_interactions=num_interactions,
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=energies,
            avg_num_neighbors=10.0,
            atomic_numbers=list(atomic_numbers),
            correlation=correlation,
            gate=torch.nn.functional.silu,
            **scale_shift,
            **(copy.deepcopy(_CHARGE_AND_SPIN_EMBEDDINGS) if charge_and_spin else {}),  # models keep it
            **options,
        )
    finally:
        torch.set_default_dtype(previous)
    return model


def save_mace_model(path: str | Path, **kwargs) -> Path:
    """Build a model with :func:`build_mace_model` and save it the way MACE does (``torch.save``).

    The file is written atomically (temporary file, then rename).
    """
    import io

    from .delta_io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(build_mace_model(**kwargs), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def random_sparse_delta(
    backend: Backend,
    density: float = 0.02,
    relative_scale: float = 0.2,
    seed: int = 0,
    include_readouts: bool = False,
    energy_shifts: dict[str, float] | None = None,
) -> SparseDelta:
    """A random sparse delta over the backend's path weights, bound to its fingerprint.

    Each chosen entry changes by ``relative_scale`` times the tensor's RMS value (times a
    standard normal), so the delta visibly changes predictions.
    """
    rng = np.random.default_rng(seed)
    params = dict(backend.model.named_parameters())
    tensors, total = {}, 0
    for info in backend.weight_infos():
        if info.is_readout and not include_readouts:
            continue
        total += info.numel
        n = max(1, round(density * info.numel))
        idx = rng.choice(info.numel, size=n, replace=False)
        rms = float(params[info.name].detach().double().pow(2).mean().sqrt()) or 1.0
        values = rng.standard_normal(n) * relative_scale * rms
        tensors[info.name] = TensorDelta.create(
            idx, torch.tensor(values, dtype=torch.float32), info.shape, info.name
        )
    meta = DeltaMetadata(
        method="random",
        hyperparameters={"density": density, "seed": seed},
        energy_shifts=dict(energy_shifts or {}),
        trainable_numel=total,
    )
    backend.fill_metadata(meta)
    return SparseDelta(tensors, meta)


def random_rotation(seed: int = 0) -> np.ndarray:
    """A random proper rotation matrix (3, 3)."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()
