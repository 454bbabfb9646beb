"""Repeated structures in training data: found across files, atom orders and rigid moves.

A run restarted from its last structure, overlapping index slices, or the same file given for
training and validation put one structure into the data twice. Copies are recognised whatever
order the file wrote the atoms in, however atoms were wrapped into the cell, and after a rigid
translation; :func:`check_duplicates` refuses them, :func:`drop_duplicate_frames` keeps one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.geometry import find_mic

from ..errors import ConfigError, DuplicateFrameError
from ..graph import charge_and_spin, has_cell_volume
from .data import Frame

logger = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("first", "last")
"""Which of a set of repeated structures :func:`drop_duplicate_frames` keeps."""


DUPLICATE_TOLERANCE = 1e-5
"""Å: two frames whose atoms all lie this close (after matching) hold the same structure."""

_DUPLICATE_GRID = 1e-3  # Å: coarse rounding that sorts atoms and finds candidate copies


@dataclass(frozen=True)
class _CanonicalStructure:
    """A frame's atoms in an order and place that do not depend on how the file wrote them.

    A structure with periodic axes is moved as a whole so that one atom of its rarest element
    sits at the origin (the atom whose choice gives the smallest sorted key), and its atoms are
    moved by lattice vectors into the cell; a structure without periodic axes is centred on its
    mean position instead. Atoms are then sorted by element and coarsely rounded position, so
    copies written in another atom order, with atoms wrapped differently, moved as a whole
    (a crystal shifted by any vector, a molecule), or with positions rounded to another number
    of digits agree. The total charge and spin are part of the structure. ``key`` is equal for
    copies (apart from atoms on a rounding boundary); :meth:`same_as` decides.
    """

    key: bytes
    positions: np.ndarray  # (N, 3) Å, in canonical order
    atoms: Atoms

    @classmethod
    def of(cls, frame: Frame) -> _CanonicalStructure:
        atoms = frame.atoms
        if _periodic(atoms):
            positions = _translation_free_positions(atoms)
        else:  # energy and forces do not change when a molecule moves as a whole
            positions = atoms.positions - atoms.positions.mean(axis=0)
        coarse = np.round(positions / _DUPLICATE_GRID).astype(np.int64)
        order = np.lexsort((coarse[:, 2], coarse[:, 1], coarse[:, 0], atoms.numbers))
        digest = hashlib.sha256()
        for part in (
            atoms.numbers[order].astype(np.int64),
            coarse[order],
            np.round(atoms.cell.array / _DUPLICATE_GRID).astype(np.int64),
            atoms.pbc.astype(np.int8),
            np.asarray(charge_and_spin(atoms, frame.source), dtype=np.float64),
        ):
            digest.update(part.tobytes())
        return cls(digest.digest(), positions[order], atoms)

    def same_as(self, other: _CanonicalStructure) -> bool:
        """Same key, cells within :data:`DUPLICATE_TOLERANCE`, and every atom within it of its
        counterpart (minimum image along periodic axes)."""
        if self.key != other.key:
            return False
        if not np.allclose(self.atoms.cell.array, other.atoms.cell.array, rtol=0, atol=DUPLICATE_TOLERANCE):
            return False
        difference = other.positions - self.positions
        if _periodic(self.atoms):  # an atom may sit just inside the opposite face of the cell
            difference, _ = find_mic(difference, self.atoms.cell, self.atoms.pbc)
        return bool(np.all(np.linalg.norm(difference, axis=1) < DUPLICATE_TOLERANCE))


_ANCHOR_BUDGET = 256 * 256
"""Anchor atoms x atoms up to which a periodic structure is placed independent of a rigid
translation (one sort of all atoms per anchor: about 30 ms for a one-element cell of 256 atoms
on one CPU core); larger ones keep their own origin, and only copies that share it are found."""

_WRAP_EPS = 1e-9  # fractional: an atom a rounding error below a cell face is wrapped to it


def _translation_free_positions(atoms: Atoms) -> np.ndarray:
    """(N, 3) Å: positions of a periodic structure with a rigid translation removed.

    Each atom of the rarest element (ties: the lowest atomic number) is tried as the origin;
    positions are taken relative to it, wrapped into the cell along periodic axes, and the
    anchor whose coarsely rounded, sorted positions give the smallest key is kept: a choice that
    does not depend on the atom order or on where the structure sat in its cell.
    """
    numbers = atoms.numbers
    species, counts = np.unique(numbers, return_counts=True)
    anchors = np.flatnonzero(numbers == species[np.argmin(counts)])
    if len(anchors) * len(atoms) > _ANCHOR_BUDGET:
        return atoms.get_positions(wrap=True)
    fractional = atoms.cell.scaled_positions(atoms.positions)
    relative = fractional[None, :, :] - fractional[anchors, None, :]  # (anchors, N, 3)
    periodic = atoms.pbc
    relative[..., periodic] = (relative[..., periodic] + _WRAP_EPS) % 1.0 - _WRAP_EPS
    cartesian = relative @ atoms.cell.array  # (anchors, N, 3)
    coarse = np.round(cartesian / _DUPLICATE_GRID).astype(np.int64)
    element = np.broadcast_to(numbers, coarse.shape[:2])
    order = np.lexsort((coarse[..., 2], coarse[..., 1], coarse[..., 0], element), axis=-1)
    ranked = np.take_along_axis(coarse, order[..., None], axis=1)
    best = min(range(len(anchors)), key=lambda k: ranked[k].tobytes())
    return cartesian[best]


def _periodic(atoms: Atoms) -> bool:
    return bool(atoms.pbc.any()) and has_cell_volume(atoms)


def _earlier_copies(frames: Sequence[Frame]) -> list[Frame | None]:
    """For each frame, the earlier frame with the same structure, or None.

    The same structure: same elements, cell and periodicity, and atoms within
    :data:`DUPLICATE_TOLERANCE` of each other in some order, after a rigid translation and
    lattice translations of single atoms (see :class:`_CanonicalStructure`).
    """
    seen: dict[bytes, list[tuple[_CanonicalStructure, Frame]]] = {}
    earlier: list[Frame | None] = []
    for frame in frames:
        canonical = _CanonicalStructure.of(frame)
        candidates = seen.setdefault(canonical.key, [])
        match = next((f for c, f in candidates if c.same_as(canonical)), None)
        earlier.append(match)
        if match is None:
            candidates.append((canonical, frame))
    return earlier


def _same_structure(frame: Frame, first: Frame) -> str:
    """``"same structure as <source> (...)"``, saying how far apart the two DFT energies are:
    a repeated frame has the same energy, a recomputation (a fresh basis) a different one."""
    if frame.source == first.source:  # overlapping slices, or a file given twice
        return "read twice (the file or index slices given overlap, e.g. training and validation)"
    gap = abs(frame.energy - first.energy) * 1000.0
    energies = "the same DFT energy" if gap < 1e-3 else f"DFT energies {gap:.3g} meV apart"
    if frame.magmom is not None and first.magmom is not None and abs(frame.magmom - first.magmom) > 0.5:
        energies += (
            f", total magnetic moments {first.magmom:.2f} and {frame.magmom:.2f} μB: two magnetic "
            "states of one structure, which a base model without a spin input cannot tell apart"
        )
    return f"same structure as {first.source} ({energies})"


def check_duplicates(frames: Sequence[Frame]) -> None:
    """Raise :class:`DuplicateFrameError` if two frames hold the same structure."""
    for frame, first in zip(frames, _earlier_copies(frames), strict=True):
        if first is not None:
            raise DuplicateFrameError(
                f"{frame.source}: {_same_structure(frame, first)}; remove one, or pass "
                "--drop-duplicates (drop_duplicates=True) to keep the first of each, or "
                '--keep-last-duplicate (drop_duplicates="last") to keep the last'
            )


def drop_duplicate_frames(*groups: Sequence[Frame], keep: str = "first") -> tuple[list[Frame], ...]:
    """The frame groups (e.g. train, valid) without repeated structures.

    A run restarted from its last structure (VASP's CONTCAR) repeats that structure as the
    first frame of the next file; a Quantum ESPRESSO ``vc-relax`` ends with an SCF at its last
    geometry in a fresh basis. This keeps one of each set of copies: the first in reading order
    (``keep="first"``) or the last (``keep="last"``: the final SCF of a ``vc-relax``, whose
    basis matches its cell). Each dropped frame is logged.
    """
    if keep not in DUPLICATE_POLICIES:
        raise ConfigError(f"keep must be one of {', '.join(DUPLICATE_POLICIES)}; got {keep!r}")
    flat = [frame for group in groups for frame in group]
    # for each frame, the copy that stays (None: it stays itself)
    copies = iter(_earlier_copies(flat) if keep == "first" else _earlier_copies(flat[::-1])[::-1])
    kept: list[list[Frame]] = []
    for group in groups:
        kept.append([])
        for frame in group:
            other = next(copies)
            if other is None:
                kept[-1].append(frame)
            else:
                logger.warning("dropped %s: %s", frame.source, _same_structure(frame, other))
    return tuple(kept)
