"""Which axes of a structure are periodic, for workflows that treat slabs and wires too."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from ..errors import StructureError
from ..graph import has_cell_volume

logger = logging.getLogger(__name__)

VACUUM_WARNING_A = 6.0
"""A gap between atomic planes wider than this (Å) along a periodic axis is taken for vacuum:
twice the widest such gap in layered crystals (3.35 Å in graphite, about 3 Å from S to S
between MoS2 layers)."""


def open_axes(atoms: Atoms, task: str) -> np.ndarray:
    """Indices (0, 1, 2 for x, y, z) of the non-periodic axes of a crystal, slab or wire.

    Empty for a 3-D periodic cell. A slab (``pbc=[True, True, False]``) or wire must hold its
    vacuum in the cell (a non-zero volume) and have its periodic cell vectors along the periodic
    Cartesian axes, as ``ase.build`` makes slabs with the vacuum along z: then a strain, a
    supercell or a q-point along the periodic axes never touches the open ones.

    Parameters
    ----------
    atoms : ase.Atoms
    task : str
        What needs the check (``"cell relaxation"``, ``"phonons"``), for the error message.

    Raises
    ------
    StructureError
        Nothing periodic, a cell without a volume, or periodic vectors that leave their axes.
    """
    name = atoms.get_chemical_formula()
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any() or not has_cell_volume(atoms):
        raise StructureError(
            f"{name}: no {task} without a periodic cell with a non-zero volume (pbc={pbc.tolist()}, "
            f"cell {atoms.cell.array.round(6).tolist()}); a slab or wire must hold its vacuum in the cell"
        )
    if not pbc.all() and leaves_periodic_axes(atoms.cell.array, pbc):
        off_axis = off_axis_extent(atoms.cell.array, pbc)
        raise StructureError(
            f"{name}: for {task} the periodic cell vectors must lie along the periodic axes "
            f"{axis_names(np.flatnonzero(pbc))} (a component of {off_axis:.3g} Å along an open "
            "axis); orient the structure with its vacuum along an open Cartesian axis"
        )
    return np.flatnonzero(~pbc)


def off_axis_extent(cell, pbc) -> float:
    """Largest component (Å) of a periodic cell vector along an open Cartesian axis (0 when the
    periodic vectors keep to the periodic axes, as :func:`open_axes` needs)."""
    cell = np.asarray(cell, dtype=float)
    pbc = np.asarray(pbc, dtype=bool)
    return float(np.abs(cell[np.ix_(pbc, ~pbc)]).max(initial=0.0))


def leaves_periodic_axes(cell, pbc) -> bool:
    """Whether a periodic cell vector has a component along an open Cartesian axis (beyond
    rounding: 1e-6 of the largest cell entry)."""
    return off_axis_extent(cell, pbc) > 1e-6 * np.abs(np.asarray(cell, dtype=float)).max()


def axis_names(axes: Sequence[int]) -> str:
    """``"x, z"`` for axes ``[0, 2]``."""
    return ", ".join("xyz"[k] for k in axes)


def widest_gaps(atoms: Atoms) -> np.ndarray:
    """Widest empty slice (Å) between atomic planes along each cell vector, shape (3,).

    Along vector k: the largest gap between the atoms' sorted fractional coordinates (across
    the periodic boundary too) times the spacing of the lattice planes, volume / |a_i × a_j|.
    Zero for a cell without volume.
    """
    if not has_cell_volume(atoms) or len(atoms) == 0:
        return np.zeros(3)
    cell = atoms.cell.array
    widest = np.array([1.0 - heights_above_widest_gap(atoms, k).max() for k in range(3)])
    volume = abs(np.linalg.det(cell))
    spacing = np.array(
        [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    )
    return widest * spacing


def heights_above_widest_gap(atoms: Atoms, axis: int) -> np.ndarray:
    """Fractional coordinates along cell vector ``axis``, shape (n_atoms,), in [0, 1), measured
    from the atom just above the widest gap between atomic planes: a slab that crosses the
    periodic boundary is kept whole, its bottom at 0 and its top at 1 minus the gap."""
    fractions = np.mod(atoms.cell.scaled_positions(atoms.positions)[:, axis], 1.0)
    order = np.sort(fractions)
    steps = np.diff(np.append(order, order[0] + 1.0))  # the last step wraps across the boundary
    bottom = order[(int(np.argmax(steps)) + 1) % len(order)]
    return np.mod(fractions - bottom, 1.0)


def warn_about_periodic_vacuum(atoms: Atoms, task: str) -> None:
    """Warn when a periodic axis holds a vacuum gap (a slab read from a POSCAR, which ASE always
    reads with ``pbc=True``): ``task`` would strain or repeat the vacuum like the crystal."""
    gaps = widest_gaps(atoms)
    axes = [k for k in range(3) if atoms.pbc[k] and gaps[k] > VACUUM_WARNING_A]
    if axes:
        logger.warning(
            "%s: %s of empty space along periodic cell vector(s) %s, which %s treats as crystal; "
            "for a slab or wire, make that axis open (atoms.pbc, or --pbc T T F on the command line)",
            atoms.get_chemical_formula(),
            " and ".join(f"{gaps[k]:.1f} Å" for k in axes),
            ", ".join("abc"[k] for k in axes),
            task,
        )
