"""Geometry optimisation of positions and, optionally, the cell (FrechetCellFilter)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from ..errors import ConfigError, StructureError
from ..graph import has_cell_volume
from ..structure_io import drop_input_labels
from ._output import streamed_frames, streamed_text
from ._periodicity import axis_names, open_axes, warn_about_periodic_vacuum

logger = logging.getLogger(__name__)

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")


@dataclass
class RelaxResult:
    """The relaxed structure and what it looks like.

    Attributes
    ----------
    atoms : ase.Atoms
        Relaxed structure, calculator attached.
    converged : bool
        True when the largest force (and, with ``cell=True``, the largest stress component
        times the volume per atom; see :class:`ase.filters.FrechetCellFilter`) fell below
        ``fmax`` within ``steps``.
    steps : int
        Optimiser steps taken.
    energy : float
        Final energy, eV.
    max_force : float
        Largest atomic force norm, eV/Å.
    stress : (6,) array or None
        Final stress, eV/Å³, ASE's Voigt order (xx, yy, zz, yz, xz, xy), positive under tension;
        None when the cell has no volume (a molecule); for a slab or wire, the virial over the
        whole cell, vacuum included.
    initial_energy : float
        Energy of the starting structure, eV.
    wall_time_s : float
    """

    atoms: Atoms
    converged: bool
    steps: int
    energy: float
    max_force: float
    stress: np.ndarray | None
    initial_energy: float
    wall_time_s: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def energy_per_atom(self) -> float:
        """Final energy per atom, eV/atom."""
        return self.energy / len(self.atoms)

    @property
    def stress_gpa(self) -> np.ndarray | None:
        """Final stress in GPa (Voigt order, positive under tension)."""
        return None if self.stress is None else self.stress / units.GPa

    @property
    def pressure_gpa(self) -> float | None:
        """Pressure :math:`-\\mathrm{tr}(\\sigma)/3`, GPa."""
        return None if self.stress is None else -float(np.mean(self.stress[:3])) / units.GPa

    @property
    def cellpar(self) -> np.ndarray:
        """Lattice parameters a, b, c (Å) and α, β, γ (degrees)."""
        return self.atoms.cell.cellpar()

    @property
    def volume(self) -> float:
        """Cell volume, Å³ (0 without a cell)."""
        return float(abs(self.atoms.cell.volume))


def relax(
    atoms: Atoms,
    calc: Calculator,
    fmax: float = 0.01,
    cell: bool = False,
    optimizer: str = "FIRE",
    steps: int = 1000,
    *,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    pressure_GPa: float = 0.0,
    hydrostatic: bool = False,
    fix_symmetry: bool = False,
    symprec: float = 1e-5,
) -> RelaxResult:
    """Relax a copy of ``atoms``: positions, and with ``cell=True`` also the cell.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure (not modified).
    calc : ase Calculator
        Usually a :class:`~ase_sparsecalc.SparseCalc` (float64 recommended).
    fmax : float
        Convergence threshold, eV/Å, on every atomic force and, with ``cell=True``, on the
        stress expressed as a force (``FrechetCellFilter`` scales it by the volume per atom).
    cell : bool
        Also relax the cell, through :class:`ase.filters.FrechetCellFilter`. For a slab or a
        wire (periodic along some axes, a cell with vacuum along the others) only the periodic
        directions relax: the in-plane lattice of a slab with ``pbc=[True, True, False]``,
        while the vacuum vector is left as it is.
    optimizer : {"FIRE", "BFGS", "LBFGS"}
    steps : int
        Largest number of optimiser steps.
    trajectory : str or Path, optional
        Every step's structure (``.traj`` or ``.extxyz``), with energy, forces and stress.
    logfile : str or Path, optional
        The optimiser's text log.
    pressure_GPa : float
        External pressure for the cell relaxation, GPa (3-D periodic cells only).
    hydrostatic : bool
        Keep the cell shape and change the volume only (3-D periodic cells only).
    fix_symmetry : bool
        Keep the starting structure's space group (:class:`ase.constraints.FixSymmetry`: forces
        and stress are symmetrised, so numerical noise cannot lower the symmetry).
    symprec : float
        Symmetry tolerance for ``fix_symmetry``, Å.

    Returns
    -------
    RelaxResult
    """
    from ase import optimize
    from ase.filters import FrechetCellFilter

    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if not fmax > 0:
        raise ConfigError(f"fmax must be positive (eV/Å), got {fmax}")
    if not cell and (pressure_GPa != 0.0 or hydrostatic):
        asked = f"pressure_GPa={pressure_GPa:g}" if pressure_GPa != 0.0 else "hydrostatic=True"
        raise ConfigError(f"{asked} acts on the cell; relax the cell too (cell=True, --cell)")
    mask = periodic_strain_mask(atoms, pressure_GPa, hydrostatic) if cell else None
    if cell:
        warn_about_periodic_vacuum(atoms, "the cell relaxation")
    atoms = atoms.copy()
    atoms.arrays.pop("momenta", None)  # velocities of the input belong to it, not to the minimum
    drop_input_labels(atoms)  # the input's DFT labels (REF_energy, ...) belong to it too
    if fix_symmetry:
        from ase.constraints import FixSymmetry

        atoms.set_constraint([*atoms.constraints, FixSymmetry(atoms, symprec=symprec)])
    atoms.calc = calc
    initial_energy = float(atoms.get_potential_energy())
    target = (
        FrechetCellFilter(
            atoms, mask=mask, scalar_pressure=pressure_GPa * units.GPa, hydrostatic_strain=hydrostatic
        )
        if cell
        else atoms
    )
    start = time.perf_counter()
    with streamed_frames(trajectory) as frames, streamed_text(logfile) as log:
        opt = getattr(optimize, optimizer)(target, logfile=log)
        if frames is not None:
            opt.attach(lambda: frames.write(atoms), interval=1)
        converged = bool(opt.run(fmax=fmax, steps=steps))
    wall = time.perf_counter() - start
    if not converged:
        logger.warning("relaxation did not reach fmax=%g eV/Å in %d steps", fmax, steps)
    files = {k: Path(v) for k, v in (("trajectory", trajectory), ("log", logfile)) if v is not None}
    forces = atoms.get_forces()
    return RelaxResult(
        atoms=atoms,
        converged=converged,
        steps=int(opt.get_number_of_steps()),
        energy=float(atoms.get_potential_energy()),
        max_force=float(np.linalg.norm(forces, axis=1).max()),
        stress=atoms.get_stress() if has_cell_volume(atoms) else None,
        initial_energy=initial_energy,
        wall_time_s=wall,
        files=files,
    )


def periodic_strain_mask(
    atoms: Atoms, pressure_GPa: float = 0.0, hydrostatic: bool = False
) -> list[bool] | None:
    """Strain components (Voigt: xx, yy, zz, yz, xz, xy) a cell relaxation may change.

    None for a 3-D periodic cell (all of them). For a slab or a wire, the components within
    the periodic Cartesian axes: ``[True, True, False, False, False, True]`` for
    ``pbc=[True, True, False]`` (see :func:`~ase_sparsecalc.workflows._periodicity.open_axes`).

    Raises
    ------
    StructureError
        No periodic cell, periodic vectors that leave their axes, or a pressure or hydrostatic
        strain asked for a cell that holds vacuum.
    """
    open_ = open_axes(atoms, "cell relaxation")
    if open_.size == 0:
        return None
    if pressure_GPa != 0.0 or hydrostatic:
        raise StructureError(
            f"{atoms.get_chemical_formula()}: pressure and hydrostatic strain need a cell periodic "
            f"in 3 dimensions; this one is open along {axis_names(open_)}"
        )
    x, y, z = atoms.pbc.tolist()
    return [x, y, z, y and z, x and z, x and y]
