"""Operations on sets of DFT frames: the training/validation split, isolated-atom references,
compositions and the summary a delta records of its training data."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers as symbol_to_number
from ase.data import chemical_symbols

from ..errors import ConfigError, DataFileError, MissingLabelError
from ..graph import NEUTRAL_SINGLET, charge_and_spin
from .data import Frame, read_frames

logger = logging.getLogger(__name__)


def frame_hash(frame: Frame, decimals: int = 6) -> str:
    """SHA-256 of a frame's structure (numbers, positions, cell, pbc rounded to 1e-6 Å, and the
    total charge and spin multiplicity where they are not a neutral singlet's)."""
    digest = hashlib.sha256()
    digest.update(frame.atoms.numbers.astype(np.int64).tobytes())
    digest.update(np.round(frame.atoms.positions, decimals).tobytes())
    digest.update(np.round(frame.atoms.cell.array, decimals).tobytes())
    digest.update(frame.atoms.pbc.astype(np.int8).tobytes())
    state = charge_and_spin(frame.atoms, frame.source)
    if state != NEUTRAL_SINGLET:
        digest.update(np.asarray(state, dtype=np.float64).tobytes())
    return digest.hexdigest()


def take_isolated_atoms(*groups: Sequence[Frame]) -> tuple[tuple[list[Frame], ...], dict[str, float]]:
    """Take the frames tagged as isolated atoms out of the frame groups (e.g. train, valid).

    Training files written for MACE carry their isolated-atom DFT energies as single-atom frames
    tagged ``config_type=IsolatedAtom`` (some data sets write ``isolated_atom``). Those frames
    are references for the per-element energy shifts, not training structures: MACE takes them
    out of the training set, and so does this.

    Returns
    -------
    groups, energies
        The groups without the tagged frames, and the isolated-atom energy (eV) by element.

    Raises
    ------
    DataFileError
        A tagged frame holds more than one atom, or two tagged frames of one element disagree
        by more than 1 meV.
    """
    energies: dict[str, Frame] = {}
    kept: list[list[Frame]] = []
    for group in groups:
        kept.append([])
        for frame in group:
            if not frame.is_isolated_atom:
                kept[-1].append(frame)
                continue
            if frame.n_atoms != 1:
                raise DataFileError(
                    f"{frame.source}: tagged config_type={frame.config_type} but holds "
                    f"{frame.n_atoms} atoms; an isolated-atom reference holds one"
                )
            _add_isolated_atom(energies, frame)
    return tuple(kept), {symbol: frame.energy for symbol, frame in energies.items()}


def _add_isolated_atom(first_by_element: dict[str, Frame], frame: Frame) -> None:
    """Record a single-atom frame by element; a second one more than 1 meV off is refused."""
    symbol = frame.atoms.get_chemical_symbols()[0]
    first = first_by_element.setdefault(symbol, frame)
    if abs(first.energy - frame.energy) > 1e-3:
        raise DataFileError(
            f"{frame.source}: isolated {symbol} atom at {frame.energy:.6f} eV, but "
            f"{first.source} gives {first.energy:.6f} eV; keep one"
        )


def dataset_summary(frames: Sequence[Frame], files: Sequence[str] = ()) -> dict:
    """A JSON-ready summary: frame and atom counts, elements, labels present, and a SHA-256 of
    every structure and label (energy, forces, stress, ``config_type``), so that a checkpoint
    of other labels is never resumed."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(frame_hash(frame).encode())
        digest.update(np.float64(frame.energy).tobytes())
        for label in (frame.forces, frame.stress):
            digest.update(b"-" if label is None else np.round(label, 8).tobytes())
        digest.update(str(frame.config_type).encode())
    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    return {
        "frames": len(frames),
        "atoms": int(sum(f.n_atoms for f in frames)),
        "elements": [chemical_symbols[z] for z in elements],
        "with_stress": int(sum(f.stress is not None for f in frames)),
        "periodic": int(sum(bool(f.atoms.pbc.any()) for f in frames)),
        "sha256": digest.hexdigest(),
        "files": [str(f) for f in files],
    }


def composition_matrix(frames: Sequence[Frame], elements: Sequence[int]) -> np.ndarray:
    """(n_frames, n_elements) counts of each element (atomic numbers ``elements``) in each frame."""
    column = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(frames), len(elements)))
    for row, frame in enumerate(frames):
        for z, n in zip(*np.unique(frame.atoms.numbers, return_counts=True), strict=True):
            counts[row, column[int(z)]] = n
    return counts


class _CompositionSpan:
    """Orthonormal basis of the span of composition vectors (rows of element counts)."""

    def __init__(self, n_elements: int) -> None:
        self.basis = np.zeros((0, n_elements))

    def residual(self, counts: np.ndarray) -> np.ndarray:
        """``counts`` (n_elements,) minus its projection on the span."""
        return counts - self.basis.T @ (self.basis @ counts)

    def contains(self, counts: np.ndarray) -> bool:
        """Whether ``counts`` is a linear combination of the compositions added so far."""
        return bool(np.linalg.norm(self.residual(counts)) <= 1e-9 * max(1.0, np.linalg.norm(counts)))

    def add(self, counts: np.ndarray) -> None:
        """Widen the span by ``counts`` (Gram-Schmidt; nothing changes if it lies in it)."""
        if not self.contains(counts):
            rest = self.residual(counts)
            self.basis = np.vstack([self.basis, rest / np.linalg.norm(rest)])


def split_frames(
    frames: Sequence[Frame], valid_fraction: float, seed: int
) -> tuple[list[Frame], list[Frame]]:
    """Random train/validation split (at least one validation frame when the fraction is > 0).

    A validation frame whose composition is not a combination of the training frames'
    compositions goes to training instead: the one frame with a dopant, or with another
    stoichiometry (the only O-rich cell among stoichiometric ones). Energy shifts are fitted on
    training frames, so such a frame would carry an arbitrary energy offset in validation (and
    an element only it holds would get no shift and no training).
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n_valid = round(valid_fraction * len(frames))
    if valid_fraction > 0 and len(frames) > 1:
        n_valid = max(1, n_valid)
    order = np.random.default_rng(seed).permutation(len(frames))
    chosen = sorted(order[:n_valid])
    elements = sorted({int(z) for frame in frames for z in frame.atoms.numbers})
    counts = composition_matrix(frames, elements)
    span = _CompositionSpan(len(elements))
    for row in np.unique(counts[order[n_valid:]], axis=0):
        span.add(row)
    moved = []
    for i in list(chosen):
        if not span.contains(counts[i]):
            chosen.remove(i)
            span.add(counts[i])
            moved.append(frames[i].source)
    if moved:
        logger.info(
            "kept %d frame(s) out of validation, as no training frame has their composition: %s",
            len(moved),
            ", ".join(moved[:5]) + (", ..." if len(moved) > 5 else ""),
        )
    valid_set = set(chosen)
    valid = [frames[i] for i in chosen]
    train = [frames[i] for i in range(len(frames)) if i not in valid_set]
    return train, valid


def check_elements_in_training(train: Sequence[Frame], valid: Sequence[Frame]) -> None:
    """Refuse validation frames with an element that no training frame holds.

    Raises
    ------
    DataFileError
        Naming the first such frame and the elements.
    """
    in_train = {int(z) for frame in train for z in frame.atoms.numbers}
    for frame in valid:
        missing = sorted(set(frame.atoms.numbers.tolist()) - in_train)
        if missing:
            symbols = ", ".join(chemical_symbols[z] for z in missing)
            raise DataFileError(
                f"{frame.source}: element(s) {symbols} appear in validation frames but in no training "
                "frame; their energy shifts and weights are fitted on training frames, so add some"
            )


def read_isolated_atom_energies(source: str | Path | dict, energy_key: str | None = None) -> dict[str, float]:
    """Isolated-atom DFT energies (eV) by element symbol.

    ``source`` is a dict (keys: symbols such as ``"Si"`` or atomic numbers) or a file of
    single-atom frames, whose energies are read as the training frames' are (``energy_key``);
    a file without that key gives its calculator's free energy or energy instead (isolated-atom
    files are often written apart from the training data, with the code's own labels).

    Raises
    ------
    DataFileError
        A frame with more than one atom, or two frames of one element more than 1 meV apart.
    ConfigError
        A dict key that is no element.
    """
    if isinstance(source, dict):
        out = {}
        for key, value in source.items():
            if isinstance(key, (int, np.integer)) or str(key).strip().isdigit():  # 14 or "14" (JSON)
                number = int(key)
            else:
                number = symbol_to_number.get(str(key).strip())
            if number is None or not 0 < number < len(chemical_symbols):
                raise ConfigError(
                    f"isolated-atom energies: {key!r} is not an element symbol (e.g. 'Si') or number"
                )
            out[chemical_symbols[number]] = float(value)
        return out
    try:
        frames = read_frames(source, energy_key=energy_key, require_forces=False)
    except MissingLabelError as exc:
        if energy_key is None:
            raise
        try:
            frames = read_frames(source, require_forces=False)
        except MissingLabelError:
            raise MissingLabelError(
                f"{exc} (the isolated-atom file has no free_energy/energy either)"
            ) from exc
    first: dict[str, Frame] = {}
    for frame in frames:
        if frame.n_atoms != 1:
            raise DataFileError(f"{frame.source}: isolated-atom file holds a {frame.n_atoms}-atom frame")
        _add_isolated_atom(first, frame)
    return {symbol: frame.energy for symbol, frame in first.items()}
