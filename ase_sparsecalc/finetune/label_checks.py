"""Sanity checks of DFT labels against the base model, before any training.

A foundation model is wrong in the details but right in scale: its forces correlate with DFT
forces with a slope near one (about 1.1 for SevenNet-0 on ethanol). Labels in the wrong unit or
convention show up as a slope far from one: forces in Hartree/Bohr as about 0.02, in kcal/mol/Å
as about 23; energies per atom instead of per structure as about 1/N; stresses in the
pressure-positive convention as about -1. Nothing here refuses data (a base model can be far
off for exotic chemistry); it warns, names the likely cause, and the report keeps the slopes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ..graph import charge_and_spin
from .data import Frame
from .reference import composition_matrix

logger = logging.getLogger(__name__)

PLAUSIBLE_SLOPE = (0.25, 4.0)
"""Label / base-model slopes outside this range trigger a warning."""

MIN_SPREAD = {"forces": 1e-3, "energy": 1e-4, "stress": 1e-5}
"""Least RMS of the base model's values (eV/Å, eV/atom, eV/Å³) for a slope to mean anything."""


def label_slopes(frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """Least-squares slopes (through zero) of DFT labels against the base model's predictions.

    Energies are compared after removing what per-element shifts can explain (their projection
    on the composition matrix), per atom. Returns ``{"forces": s, "energy": s, "stress": s}``
    for the quantities with enough labelled spread.
    """
    slopes: dict[str, float] = {}
    for name in ("forces", "stress"):
        chosen = [k for k, f in enumerate(frames) if getattr(f, name) is not None and name in predictions[k]]
        if chosen:
            labels = np.concatenate([np.ravel(getattr(frames[k], name)) for k in chosen])
            model = np.concatenate([np.ravel(predictions[k][name]) for k in chosen])
            slopes.update(_slope(name, labels, model))
    if len(frames) >= 3:
        elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
        counts = composition_matrix(frames, elements)
        n_atoms = counts.sum(axis=1)
        dft = np.array([f.energy for f in frames])
        base = np.array([predictions[k]["energy"] for k in range(len(frames))])
        slopes.update(
            _slope(
                "energy",
                _beyond_composition(counts, dft) / n_atoms,
                _beyond_composition(counts, base) / n_atoms,
            )
        )
    return slopes


def _beyond_composition(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """What of ``energies`` (n_frames,) no per-element sum explains: the least-squares residual."""
    coefficients = np.linalg.lstsq(counts, energies, rcond=None)[0]
    return energies - counts @ coefficients


def _slope(name: str, labels: np.ndarray, model: np.ndarray) -> dict[str, float]:
    spread = float(np.sqrt(np.mean(model**2))) if model.size else 0.0
    if spread < MIN_SPREAD[name]:
        return {}
    return {name: float(labels @ model / (model @ model))}


def warn_about_label_scales(slopes: Mapping[str, float], source: str) -> list[str]:
    """Log a warning for every slope outside :data:`PLAUSIBLE_SLOPE`; returns the messages."""
    hints = {
        "forces": "forces in Hartree/Bohr give about 0.02, in kcal/mol/Å about 23",
        "energy": "energies per atom instead of per structure give about 1/(number of atoms), "
        "Hartree about 0.04, kcal/mol about 23",
        "stress": "the pressure-positive sign convention gives about -1, kbar about 1600, GPa about 160",
    }
    low, high = PLAUSIBLE_SLOPE
    messages = []
    for name, slope in slopes.items():
        if not low <= slope <= high:
            messages.append(
                f"{source}: the DFT {name} are {slope:.3g} times the base model's (least squares; "
                f"expected near 1); check their units and sign ({hints[name]})"
            )
    for message in messages:
        logger.warning(message)
    return messages


def warn_if_shifts_underdetermined(
    frames: Sequence[Frame], isolated: Mapping[str, float] | None
) -> str | None:
    """Warn when the training compositions cannot fix every element's shift on its own.

    With one stoichiometry (all frames C2H6O) the data fix only ``2δ_C + 6δ_H + δ_O``: a
    structure of another composition then gets an arbitrary energy offset, unless isolated-atom
    energies of the elements anchor the rest. Returns the message, or None.
    """
    from ase.data import chemical_symbols

    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    rank = int(np.linalg.matrix_rank(composition_matrix(frames, elements)))
    anchored = {chemical_symbols[z] for z in elements} <= set(isolated or {})
    if rank >= len(elements) or anchored:
        return None
    symbols = ", ".join(chemical_symbols[z] for z in elements)
    message = (
        f"the training frames hold {rank} independent composition(s) for {len(elements)} elements "
        f"({symbols}): the per-element energy shifts are fixed only in combination, so energies of "
        "other compositions (other molecules, formation energies) carry an arbitrary offset; give "
        "isolated-atom energies (--isolated-atoms, or frames tagged config_type=IsolatedAtom) to fix it"
    )
    logger.warning(message)
    return message


def warn_if_energy_labels_mixed(frames: Sequence[Frame]) -> str | None:
    """Warn when some energies are free energies and others are not.

    Without ``--energy-key`` each frame's energy is its ``free_energy`` where it has one, else
    its ``energy``. VASP's ``free_energy`` (TOTEN) holds the electronic entropy term of a smeared
    calculation and its ``energy`` the sigma -> 0 extrapolation; for metals they differ by meV
    to tens of meV per atom, so files of both kinds in one training set disagree by that much.
    Returns the message, or None.
    """
    by_label: dict[str, list[str]] = {}
    for frame in frames:
        if frame.energy_label is not None:
            by_label.setdefault(frame.energy_label, []).append(frame.source)
    if not {"free_energy", "energy"} <= set(by_label):
        return None
    free, plain = by_label["free_energy"], by_label["energy"]
    message = (
        f"{len(free)} training frame(s) have free energies (free_energy, e.g. {free[0]}) and "
        f"{len(plain)} have only an energy (energy, e.g. {plain[0]}): for smeared (metallic) "
        "calculations the two differ by the electronic entropy term; pass --energy-key to read "
        "one kind everywhere (energy_key= in Python)"
    )
    logger.warning(message)
    return message


def warn_if_charge_states_mixed(frames: Sequence[Frame], takes_charge_and_spin: bool) -> str | None:
    """Warn when training frames differ in total charge or spin and the base model ignores both.

    A model without charge and spin inputs sees a cation and the neutral molecule at the same
    geometry as one structure with two energies; a delta cannot fit both. Returns the message,
    or None.
    """
    if takes_charge_and_spin:
        return None
    by_state: dict[tuple[float, float], str] = {}
    for frame in frames:
        by_state.setdefault(charge_and_spin(frame.atoms, frame.source), frame.source)
    if len(by_state) < 2:
        return None
    examples = "; ".join(f"charge {c:g}, spin {s:g} (e.g. {source})" for (c, s), source in by_state.items())
    message = (
        f"training frames come in {len(by_state)} charge and spin states ({examples}), but the base "
        "model takes no charge or spin input: it sees each state as the same kind of structure; "
        "train on one state, or use a base model with charge and spin embeddings"
    )
    logger.warning(message)
    return message
