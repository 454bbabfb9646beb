"""Which axes of a structure are periodic, for workflows that treat slabs and wires too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

from ..errors import StructureError
from ..graph import has_cell_volume


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
            f"{name}: {task} needs a periodic cell with a non-zero volume (pbc={pbc.tolist()}, "
            f"cell {atoms.cell.array.round(6).tolist()}); a slab or wire must hold its vacuum in the cell"
        )
    if not pbc.all():
        cell = atoms.cell.array
        off_axis = np.abs(cell[np.ix_(pbc, ~pbc)]).max()
        if off_axis > 1e-6 * np.abs(cell).max():
            raise StructureError(
                f"{name}: for {task} the periodic cell vectors must lie along the periodic axes "
                f"{axis_names(np.flatnonzero(pbc))} (a component of {off_axis:.3g} Å along an open "
                "axis); orient the structure with its vacuum along an open Cartesian axis"
            )
    return np.flatnonzero(~pbc)


def axis_names(axes: Sequence[int]) -> str:
    """``"x, z"`` for axes ``[0, 2]``."""
    return ", ".join("xyz"[k] for k in axes)
