r"""Per-element reference energies: the first, cheapest part of any calibration.

DFT codes, pseudopotentials and basis sets put the zero of energy in different places, per
element. With composition matrix :math:`N_{kZ}` (atoms of element Z in frame k), DFT energies
:math:`E_k` and base-model energies :math:`B_k`, the shifts :math:`\delta_Z` solve

.. math:: \min_\delta \sum_k \frac{(E_k - B_k - \sum_Z N_{kZ}\delta_Z)^2}{n_k}

and, among the solutions, the one closest to :math:`\delta^0` (the isolated-atom difference,
DFT minus model, when isolated-atom energies are given, else zero): the minimum-norm
least-squares solution for :math:`\delta - \delta^0`. The prior decides only the directions the
data cannot: with a single stoichiometry (all frames C2H6O), the data fix
:math:`2\delta_C + 6\delta_H + \delta_O` exactly and the prior fixes the rest. Nothing pulls a
direction the data do fix toward the prior, however far the DFT code's zero of energy lies from
the model's (all-electron codes: thousands of eV per atom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from ase.data import atomic_numbers as symbol_to_number
from ase.data import chemical_symbols

from .data import Frame
from .dataset import composition_matrix

__all__ = [
    "SINGULAR_CUTOFF",
    "composition_matrix",
    "fit_energy_shifts",
    "predicted_energies",
    "shifted_energies",
    "with_energy_shifts",
]

SINGULAR_CUTOFF = 1e-10
"""Composition directions whose singular value is below this fraction of the largest are left to
the prior: the data do not fix them (compositions that are exact combinations of each other)."""


def fit_energy_shifts(
    frames: Sequence[Frame],
    base_energies: np.ndarray,
    prior: dict[str, float] | None = None,
) -> dict[str, float]:
    """Least-squares per-element shifts (eV/atom) that bring base energies onto the DFT ones.

    Parameters
    ----------
    frames : sequence of Frame
        DFT energies ``frame.energy`` in eV.
    base_energies : (n_frames,) array
        The base model's energies of the same frames, eV.
    prior : dict, optional
        Prior shifts by element symbol (e.g. isolated-atom DFT minus model energies).

    Returns
    -------
    dict
        Shift in eV/atom per element symbol.
    """
    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    counts = composition_matrix(frames, elements)
    n_atoms = counts.sum(axis=1)
    residual = np.array([f.energy for f in frames]) - np.asarray(base_energies, dtype=np.float64)
    delta0 = np.array([(prior or {}).get(chemical_symbols[z], 0.0) for z in elements])
    weight = 1.0 / np.sqrt(n_atoms)
    a = counts * weight[:, None]
    b = (residual - counts @ delta0) * weight
    correction = np.linalg.lstsq(a, b, rcond=SINGULAR_CUTOFF)[0]  # minimum norm: the prior where undecided
    solution = correction + delta0
    return {chemical_symbols[z]: float(v) for z, v in zip(elements, solution, strict=True)}


def shifted_energies(
    frames: Sequence[Frame], base_energies: np.ndarray, shifts: dict[str, float]
) -> np.ndarray:
    """Base energies plus the per-element shifts, (n_frames,) eV."""
    table = np.zeros(119)
    for symbol, value in shifts.items():
        table[symbol_to_number[symbol]] = value
    return np.asarray(base_energies) + np.array([table[f.atoms.numbers].sum() for f in frames])


def predicted_energies(predictions: Mapping[int, Mapping], n_frames: int) -> np.ndarray:
    """The energies (eV) of predictions keyed by frame index 0 .. n_frames - 1, (n_frames,)."""
    return np.array([predictions[k]["energy"] for k in range(n_frames)])


def with_energy_shifts(
    predictions: Mapping[int, Mapping], frames: Sequence[Frame], shifts: dict[str, float]
) -> dict:
    """Predictions (frame index -> energy, forces, ...) with the per-element shifts added to
    their energies; forces and stresses unchanged."""
    energies = shifted_energies(frames, predicted_energies(predictions, len(frames)), shifts)
    return {k: {**predictions[k], "energy": energies[k]} for k in range(len(frames))}
