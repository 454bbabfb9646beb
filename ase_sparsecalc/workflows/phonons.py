"""Harmonic phonons with phonopy (finite displacements), forces from one batched model call.

:func:`phonons` returns the :class:`phonopy.Phonopy` object with force constants, the band
structure along phonopy's automatic path (seekpath), the DOS on a Γ-centred mesh and the
thermal properties already computed. The helpers below read results off it:

* :func:`frequencies_at` -- frequencies (THz) at given q-points;
* :func:`special_point_frequencies` -- frequencies at the labelled points of the band path;
* :func:`imaginary_modes` -- modes below a small negative frequency, with their q-point;
* :func:`summarize_phonons` -- all of that plus thermal properties at one temperature.

Frequencies are in THz (phonopy's unit for eV, Å and amu); :data:`THZ_TO_CM1` and
:data:`THZ_TO_MEV` convert. Thermal properties are phonopy's: free energy in kJ/mol, entropy
and heat capacity in J/(K mol), per mole of primitive cells.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from ..delta_io import refuse_file_as_folder
from ..errors import ConfigError, StructureError
from ..graph import CHARGE_KEY, NEUTRAL_SINGLET, SPIN_KEY, charge_and_spin
from ._periodicity import axis_names, leaves_periodic_axes, open_axes, warn_about_periodic_vacuum

logger = logging.getLogger(__name__)

UNRELAXED_FORCE = 0.01
"""eV/Å: residual forces above this in the undisplaced supercell are warned about."""

THZ_TO_CM1 = 1e12 / (units._c * 100.0)
"""Wavenumber (cm⁻¹) of 1 THz."""
THZ_TO_MEV = units._hplanck * 1e12 / units._e * 1e3
"""Energy (meV) of a 1 THz quantum."""

NEAR_SYMMETRY_TOLERANCE = 1e-2
"""Å: a structure this close to more symmetry than phonopy finds at its ``symprec`` is warned
about (a cell relaxed without its symmetry kept: more displaced supercells, other point names)."""

IMAGINARY_THRESHOLD_THZ = -0.05
"""Frequencies below this (THz) count as imaginary; phonopy prints imaginary ones as negative."""
ACOUSTIC_NOISE_THZ = -0.3
"""THz (10 cm⁻¹): imaginary frequencies above this on an acoustic branch, closer to Γ than the
nearest q-points the supercell samples, are taken for numerical noise (see
:attr:`ImaginaryMode.acoustic_near_gamma`)."""


@dataclass(frozen=True)
class ImaginaryMode:
    """One mode with an imaginary frequency.

    Attributes
    ----------
    qpoint : (3,) tuple of float
        q in reduced coordinates of the primitive cell's reciprocal lattice.
    band_index : int
        Branch index (0 = lowest).
    frequency : float
        THz; negative: phonopy's convention for an imaginary frequency.
    source : str
        ``"mesh"`` or ``"band"`` (the band path).
    acoustic_near_gamma : bool
        On one of the three acoustic branches, above :data:`ACOUSTIC_NOISE_THZ`, and closer to Γ
        than the nearest q-points the supercell samples (:func:`near_gamma`), where frequencies
        are interpolated and tend to zero. Small errors in the force constants (residual forces,
        a broken acoustic sum rule) show there first, most of all on the flexural (ZA) branch of
        a 2-D layer, whose frequency grows as q² from zero: such a mode is most likely
        numerical noise. An elastic instability also starts there, though; a larger supercell
        or a structure relaxed to smaller forces tells the two apart.
    """

    qpoint: tuple[float, float, float]
    band_index: int
    frequency: float
    source: str
    acoustic_near_gamma: bool = False

    @property
    def frequency_cm1(self) -> float:
        """The frequency in cm⁻¹ (negative when imaginary)."""
        return self.frequency * THZ_TO_CM1


@dataclass
class PhononSummary:
    """A compact description of a phonon calculation.

    Attributes
    ----------
    n_primitive_atoms, n_supercell_atoms, n_displacements : int
    special_points : dict of str -> (n_bands,) array
        Frequencies (THz) at the labelled points of the band path, e.g. ``"Γ"``, ``"X"``.
    min_frequency, max_frequency : float
        Lowest and highest frequency over the mesh and the band path, THz.
    imaginary : list of ImaginaryMode
    temperature : float
        K, the temperature of the thermal properties below.
    free_energy : float
        Harmonic Helmholtz free energy, kJ/mol (NaN if not computed). phonopy leaves imaginary
        modes out of it, so with ``imaginary`` modes it is not the structure's free energy.
    entropy, heat_capacity : float
        J/(K mol) (NaN if not computed; imaginary modes left out, as for ``free_energy``).
    interpolated_points : list of str
        Labels of ``special_points`` that are not q-points of the supercell: their frequencies
        are interpolated from the force constants, not sampled (a 3x3x3 supercell does not hold
        the zone-boundary points of a cubic cell, q with halves; an even one does).
    threshold : float
        THz, the frequency below which a mode counts as imaginary.
    special_qpoints : dict of str -> (3,) array
        q (reduced, primitive reciprocal lattice) of each label of ``special_points``.
    nac : bool
        Born charges and a dielectric tensor were given (``phonons(born=...)``): the frequencies
        include the long-range dipole term. The frequencies at Γ in ``special_points`` are those
        of the first band-path segment through Γ: its LO modes are those for q along it.
    """

    n_primitive_atoms: int
    n_supercell_atoms: int
    n_displacements: int
    special_points: dict[str, np.ndarray]
    min_frequency: float
    max_frequency: float
    imaginary: list[ImaginaryMode]
    temperature: float
    free_energy: float
    entropy: float
    heat_capacity: float
    interpolated_points: list[str] = field(default_factory=list)
    threshold: float = IMAGINARY_THRESHOLD_THZ
    special_qpoints: dict[str, np.ndarray] = field(default_factory=dict)
    nac: bool = False

    @property
    def dynamically_stable(self) -> bool:
        """No mode below the imaginary threshold on the mesh or the band path, except small ones
        on the acoustic branches near Γ (:attr:`ImaginaryMode.acoustic_near_gamma`)."""
        return not self.unstable_modes()

    def unstable_modes(self) -> list[ImaginaryMode]:
        """The imaginary modes that are not small acoustic ones near Γ, most negative first."""
        return [mode for mode in self.imaginary if not mode.acoustic_near_gamma]

    def imaginary_points(self) -> dict[str, np.ndarray]:
        """The special points with imaginary modes: label -> their frequencies (THz, negative)."""
        found = {label: freqs[freqs < self.threshold] for label, freqs in self.special_points.items()}
        return {label: freqs for label, freqs in found.items() if freqs.size}


def phonons(
    atoms: Atoms,
    calc: Calculator,
    supercell: int | Sequence[int] | Sequence[Sequence[int]] = 3,
    displacement: float = 0.01,
    mesh: Sequence[int] = (20, 20, 20),
    primitive: str | Sequence[Sequence[float]] | None = "auto",
    output_dir: str | Path | None = None,
    *,
    batch_size: int | None = None,
    symmetrize: bool = True,
    subtract_residual_forces: bool = True,
    band_npoints: int = 101,
    temperatures: tuple[float, float, float] = (0.0, 1000.0, 10.0),
    symprec: float = 1e-5,
    plot: bool = True,
    born: str | Path | Mapping | None = None,
):
    """Phonons of ``atoms`` by finite displacements in a supercell.

    Parameters
    ----------
    atoms : ase.Atoms
        Unit cell; relax it first (positions and cell). A 2-D material or a wire
        (``pbc=[True, True, False]``, the vacuum in the cell along the open axis) gets the
        supercell, q-mesh and band path of its periodic directions only (ASE's 2-D band paths).
        A total charge or spin multiplicity in ``atoms.info`` (models with charge and spin
        inputs) is scaled to the supercells, see :func:`supercell_charge_and_spin`.
    calc : ase Calculator
        A :class:`~ase_sparsecalc.SparseCalc` (its ``batch_evaluate`` evaluates all displaced
        supercells in batched model calls) or any ASE calculator (one call per supercell).
    supercell : int, 3 ints, or (3, 3) ints
        Supercell of ``atoms``, as a multiple or a matrix. It should be larger than twice the
        range of the force constants; for Si with SevenNet-0, 3x3x3 primitive cells is enough.
        Along an open axis it is 1 (a multiple ``n`` means ``n x n x 1`` for a slab). Default
        3: 3x3x3 for a crystal, 3x3x1 for a slab.
    displacement : float
        Atomic displacement, Å.
    mesh : 3 ints
        Γ-centred q-mesh for the DOS and thermal properties (1 along an open axis).
    primitive : "auto", None, phonopy centring letter or (3, 3) matrix
        Primitive cell in terms of ``atoms``' cell. ``"auto"`` lets phonopy find it; None means
        ``atoms`` is primitive.
    output_dir : str or Path, optional
        Write ``phonopy.yaml``, ``FORCE_CONSTANTS``, ``band.yaml``, ``total_dos.dat``,
        ``thermal_properties.yaml`` and (``plot=True``) ``phonons.png`` and
        ``thermal_properties.png`` there; see :func:`write_phonon_files`.
    batch_size : int, optional
        Supercells per model call (default: as many as fit in
        :data:`~ase_sparsecalc.calculator.MAX_ATOMS_PER_CALL` atoms); lower it to bound memory.
    symmetrize : bool
        Symmetrise the force constants (translational invariance and index permutation).
    subtract_residual_forces : bool
        Evaluate the undisplaced supercell too and subtract its forces from every displaced one,
        which removes the error of a structure that is not exactly at its minimum.
    band_npoints : int
        q-points per segment of the band path.
    temperatures : (t_min, t_max, t_step)
        Temperature grid of the thermal properties, K.
    symprec : float
        Symmetry tolerance, Å.
    plot : bool
        Write the PNG plots (with ``output_dir``).
    born : path or mapping, optional
        Born effective charges and the high-frequency dielectric tensor of a polar crystal,
        from DFT: a Quantum ESPRESSO ``ph.x`` output, a phonopy ``BORN`` file or
        ``{"born": (n, 3, 3), "dielectric": (3, 3)}`` for the primitive cell (see
        :func:`~ase_sparsecalc.workflows.born.nac_parameters`). phonopy then adds the
        long-range dipole term, which splits LO from TO modes at Γ; a force field gives
        neither quantity. Crystals only (not slabs).

    Returns
    -------
    phonopy.Phonopy
        With ``force_constants``, ``band_structure``, ``mesh``, ``total_dos`` and
        ``thermal_properties`` filled.
    """
    if output_dir is not None:  # before the force calculations, not after them
        refuse_file_as_folder(Path(output_dir))
    open_ = open_axes(atoms, "phonons")
    warn_about_periodic_vacuum(atoms, "the phonon supercell")
    if atoms.constraints:
        logger.warning(
            "%s: phonopy displaces every atom; the constraints (%s) are not applied, so these are "
            "the phonons of the free structure",
            atoms.get_chemical_formula(),
            ", ".join(type(c).__name__ for c in atoms.constraints),
        )
    supercell_matrix = _supercell_matrix(supercell, open_, atoms.get_chemical_formula())
    atoms = _right_handed(atoms, open_)
    mesh = [1 if k in open_ else int(n) for k, n in enumerate(mesh)]
    if not 0 < displacement < 0.2:
        raise ConfigError(f"displacement must be in (0, 0.2) Å, got {displacement}")
    phonon = _phonopy(atoms, supercell_matrix, primitive, symprec)
    if open_.size and primitive == "auto" and leaves_periodic_axes(phonon.primitive.cell, atoms.pbc):
        # phonopy finds the primitive cell of a 3-D standard setting, which may swap a slab's
        # or wire's open axis with a periodic one (vacuum along x or y); keep the cell as given
        logger.warning(
            "%s: the primitive cell phonopy found mixes the open axes %s with periodic ones; using "
            "the cell as given (pass primitive= a matrix that keeps them apart to reduce it)",
            atoms.get_chemical_formula(),
            axis_names(open_),
        )
        phonon = _phonopy(atoms, supercell_matrix, None, symprec)
    if open_.size:
        chosen = Atoms(atoms.get_chemical_formula(), cell=phonon.primitive.cell, pbc=atoms.pbc)
        open_axes(chosen, "phonons of the primitive cell asked for")
    if born is not None:
        if open_.size:
            raise ConfigError(
                f"{atoms.get_chemical_formula()}: Born charges (born=) are for 3-D crystals; "
                "phonopy's non-analytical correction does not hold for a structure open along "
                f"{axis_names(open_)}"
            )
        from .born import nac_parameters

        phonon.nac_params = nac_parameters(born, phonon, atoms.get_chemical_formula())
    phonon.generate_displacements(distance=displacement)
    if not open_.size:
        _warn_if_nearly_symmetric(atoms, phonon, supercell_matrix, primitive, symprec, displacement)
    displaced = [to_ase_atoms(s, atoms.pbc) for s in phonon.supercells_with_displacements]
    structures = (
        [*displaced, to_ase_atoms(phonon.supercell, atoms.pbc)] if subtract_residual_forces else displaced
    )
    state = supercell_charge_and_spin(atoms, len(phonon.supercell) // len(atoms))
    for structure in structures:
        structure.info.update(state)
    logger.info("phonons: %d displaced supercells of %d atoms", len(displaced), len(phonon.supercell))
    results = evaluate_forces(calc, structures, batch_size)
    forces = np.array([r["forces"] for r in results[: len(displaced)]])
    if subtract_residual_forces:
        residual = results[-1]["forces"]
        largest = float(np.linalg.norm(residual, axis=1).max())
        logger.info("largest residual force in the perfect supercell: %.2e eV/Å", largest)
        if largest > UNRELAXED_FORCE:
            logger.warning(
                "%s is not at a minimum of this model: forces up to %.3f eV/Å without displacement "
                "(subtracted, but the harmonic force constants hold only near a minimum); relax it "
                "with the same model first (sparsecalc relax --cell, or workflows.relax)",
                atoms.get_chemical_formula(),
                largest,
            )
        forces = forces - residual[None]
    phonon.forces = forces
    phonon.supercell_energies = np.array([r["energy"] for r in results[: len(displaced)]])
    phonon.produce_force_constants()
    if symmetrize:
        phonon.symmetrize_force_constants()

    if open_.size:
        _run_ase_band_path(phonon, band_npoints, pbc=atoms.pbc)  # seekpath knows 3-D paths only
    elif primitive is None and _smaller_primitive_cell(atoms, symprec):
        # seekpath's path belongs to the standard primitive cell; phonopy would use its reduced
        # coordinates in this larger cell's basis, under the wrong names
        logger.warning(
            "%s: primitive=None, but the cell holds %d atoms and its primitive cell %d; the band path "
            "and its labels are those of the cell as given (its folded Brillouin zone)",
            atoms.get_chemical_formula(),
            len(atoms),
            _smaller_primitive_cell(atoms, symprec),
        )
        _run_ase_band_path(phonon, band_npoints)
    else:
        run_band_structure(phonon, band_npoints)
    phonon.run_mesh(mesh, is_gamma_center=True)
    phonon.run_total_dos()
    t_min, t_max, t_step = temperatures
    # the three zero-frequency acoustic modes at Γ carry no vibrational free energy
    phonon.run_thermal_properties(t_min=t_min, t_max=t_max, t_step=t_step, exclude_gamma_acoustic=True)
    if output_dir is not None:
        write_phonon_files(phonon, output_dir, plot=plot)
    return phonon


def supercell_charge_and_spin(atoms: Atoms, n_cells: int) -> dict[str, float]:
    """``atoms.info`` entries of a supercell made of ``n_cells`` copies of ``atoms``.

    Charge and unpaired electrons are extensive: the supercell's total charge is ``n_cells``
    times the cell's, and its spin multiplicity ``n_cells * (2S + 1 - 1) + 1``, every cell's
    unpaired spins aligned (the ferromagnetic supercell). Only models with charge and spin
    inputs read them. Empty for a neutral singlet (the default, nothing to carry over).
    """
    charge, spin = charge_and_spin(atoms, atoms.get_chemical_formula())
    if (charge, spin) == NEUTRAL_SINGLET:
        return {}
    return {CHARGE_KEY: charge * n_cells, SPIN_KEY: (spin - 1.0) * n_cells + 1.0}


def _first_periodic_axis(open_: Sequence[int]) -> int:
    """The axis whose vector flips a left-handed cell or supercell matrix: negating one vector
    keeps the lattice and changes the handedness; an open (vacuum) axis stays as it is."""
    return next(k for k in range(3) if k not in open_)


def _right_handed(atoms: Atoms, open_: Sequence[int] = ()) -> Atoms:
    """``atoms`` with a right-handed cell: one periodic cell vector of a left-handed cell (two
    vectors swapped, a negative determinant) is negated, the same lattice, positions unchanged,
    which phonopy can reduce to its primitive cell (it refuses a left-handed primitive matrix)."""
    if np.linalg.det(atoms.cell.array) >= 0:
        return atoms
    axis = _first_periodic_axis(open_)
    logger.info(
        "%s: the cell is left-handed; its vector %s is negated", atoms.get_chemical_formula(), "abc"[axis]
    )
    cell = atoms.cell.array.copy()
    cell[axis] *= -1
    flipped = atoms.copy()
    flipped.set_cell(cell, scale_atoms=False)
    return flipped


# ---------------------------------------------------------------------------- conversions
def to_phonopy_atoms(atoms: Atoms):
    """ASE ``Atoms`` -> ``PhonopyAtoms`` (symbols, cell, fractional positions and masses)."""
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=atoms.cell.array,
        scaled_positions=atoms.get_scaled_positions(wrap=False),
        masses=atoms.get_masses(),
    )


def to_ase_atoms(cell, pbc: Sequence[bool] = (True, True, True)) -> Atoms:
    """``PhonopyAtoms`` -> ASE ``Atoms``, periodic along ``pbc`` (a slab's stay open along z)."""
    return Atoms(
        symbols=cell.symbols,
        cell=cell.cell,
        scaled_positions=cell.scaled_positions,
        masses=cell.masses,
        pbc=pbc,
    )


def evaluate_forces(calc: Calculator, structures: list[Atoms], batch_size: int | None) -> list[dict]:
    """Energies and forces of many structures: batched with SparseCalc, one by one otherwise."""
    if hasattr(calc, "batch_evaluate"):
        return calc.batch_evaluate(structures, ("energy", "forces"), batch_size=batch_size)
    results = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        results.append({"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces()})
    return results


def _phonopy(atoms: Atoms, supercell_matrix, primitive, symprec: float):
    from phonopy import Phonopy

    with warnings.catch_warnings():
        # phonopy warns that "auto" is its new default; here it is the documented choice
        warnings.filterwarnings("ignore", message=r".*primitive_matrix defaulted to 'auto'.*")
        try:
            return Phonopy(
                to_phonopy_atoms(atoms),
                supercell_matrix=supercell_matrix,
                primitive_matrix="P" if primitive is None else primitive,  # phonopy 4 reads None as auto
                symprec=symprec,
                log_level=0,
            )
        except (RuntimeError, ValueError) as exc:  # a centring or matrix that does not fit the cell
            if isinstance(primitive, str) and primitive in ("auto", "P"):
                raise
            raise ConfigError(
                f"{atoms.get_chemical_formula()}: phonopy cannot reduce this cell with primitive="
                f"{primitive!r} ({' '.join(str(exc).split())[:200]}); the cell may be primitive "
                "already: use 'auto' to let phonopy find the primitive cell"
            ) from exc


def _warn_if_nearly_symmetric(
    atoms: Atoms, phonon, supercell_matrix, primitive, symprec: float, displacement: float
) -> None:
    """Warn when ``atoms`` lies within :data:`NEAR_SYMMETRY_TOLERANCE` Å of a space group with
    more operations than phonopy found at ``symprec``, and say how many displaced supercells that
    costs (``phonon`` has its displacements generated)."""
    if symprec >= NEAR_SYMMETRY_TOLERANCE:
        return
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    found = spglib.get_symmetry_dataset(cell, symprec=symprec)
    near = spglib.get_symmetry_dataset(cell, symprec=NEAR_SYMMETRY_TOLERANCE)
    if near is None or found is None or _point_group_order(near) <= _point_group_order(found):
        return
    symmetric = _phonopy(atoms, supercell_matrix, primitive, NEAR_SYMMETRY_TOLERANCE)
    symmetric.generate_displacements(distance=displacement)
    logger.warning(
        "%s: at symprec=%g Å phonopy finds space group %s (%d point operations), but the structure "
        "lies within %g Å of %s (%d): %d displaced supercells instead of %d, and special "
        "points named after the lower group. Relax it keeping its symmetry from a symmetric start "
        "(sparsecalc relax --fix-symmetry, or relax(fix_symmetry=True)), or pass a larger symprec "
        "(--symprec %g) if the distortion is numerical noise",
        atoms.get_chemical_formula(),
        symprec,
        found.international,
        _point_group_order(found),
        NEAR_SYMMETRY_TOLERANCE,
        near.international,
        _point_group_order(near),
        len(phonon.supercells_with_displacements),
        len(symmetric.supercells_with_displacements),
        NEAR_SYMMETRY_TOLERANCE,
    )


def _point_group_order(dataset) -> int:
    """Distinct rotations of an spglib symmetry dataset (centring translations not counted)."""
    return len(np.unique(np.asarray(dataset.rotations).reshape(-1, 9), axis=0))


def _smaller_primitive_cell(atoms: Atoms, symprec: float) -> int:
    """Atoms in the primitive cell spglib finds, where fewer than in ``atoms``; else 0."""
    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers)
    found = spglib.find_primitive(cell, symprec=symprec)
    n = 0 if found is None else len(found[2])
    return n if 0 < n < len(atoms) else 0


def thermal_grid(t_max: float, step: float = 10.0) -> tuple[float, float, float]:
    """``(0, t_max, t_step)`` for :func:`phonons`: steps of about ``step`` K that end exactly at
    ``t_max`` (phonopy's grid stops at the last whole step below ``t_max + t_step / 2``)."""
    return 0.0, float(t_max), float(t_max) / max(1, math.ceil(t_max / step - 1e-9))


def _supercell_matrix(supercell, open_: Sequence[int] = (), name: str = "the structure") -> np.ndarray:
    """(3, 3) int supercell matrix; a multiple ``n`` is ``n`` along periodic axes, 1 along open ones.

    Refused: values that are not whole numbers, shapes other than (), (3,) and (3, 3), and
    singular matrices. A matrix with a negative determinant (a left-handed supercell, which
    phonopy cannot build) gets one periodic row negated: the same lattice.
    """
    try:
        values = np.asarray(supercell, dtype=float)
    except (TypeError, ValueError):
        values = np.full(1, np.nan)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        raise ConfigError(f"supercell must hold whole numbers; got {supercell!r}")
    arr = values.astype(int)
    if arr.ndim == 0:
        arr = np.array([1 if k in open_ else int(arr) for k in range(3)])
    if arr.shape == (3,):
        arr = np.diag(arr)
    if arr.shape != (3, 3) or abs(round(np.linalg.det(arr))) < 1:
        raise ConfigError(f"supercell must be an int, 3 ints or a non-singular 3x3 matrix; got {supercell!r}")
    if np.linalg.det(arr) < 0 and len(open_) < 3:  # left-handed: flip one row, the same lattice
        logger.info("supercell %s is left-handed; one of its rows is negated", arr.tolist())
        arr = arr.copy()
        arr[_first_periodic_axis(open_)] *= -1
    for k in open_:
        if not (
            np.array_equal(arr[k], np.eye(3, dtype=int)[k])
            and np.array_equal(arr[:, k], np.eye(3, dtype=int)[k])
        ):
            raise StructureError(
                f"{name} is open along {'xyz'[k]}: the supercell must not repeat or mix that axis "
                f"(1 on the diagonal, 0 beside it); got {arr.tolist()}"
            )
    return arr


# ---------------------------------------------------------------------------- band path
def run_band_structure(phonon, npoints: int = 101) -> None:
    """Band structure along phonopy's automatic path (needs seekpath).

    Without seekpath, falls back to ASE's special-point path for the primitive cell
    (:meth:`ase.cell.Cell.bandpath`) and logs a warning.
    """
    try:
        import seekpath  # noqa: F401
    except ImportError:
        logger.warning("seekpath is not installed; using ASE's band path (pip install seekpath)")
        _run_ase_band_path(phonon, npoints)
        return
    phonon.auto_band_structure(npoints=npoints)


def _run_ase_band_path(phonon, npoints: int, pbc: Sequence[bool] = (True, True, True)) -> None:
    from ase.cell import Cell
    from ase.dft.kpoints import parse_path_string
    from phonopy.phonon.band_structure import get_band_qpoints_and_path_connections

    bandpath = Cell(phonon.primitive.cell).bandpath(npoints=0, pbc=pbc)
    groups = parse_path_string(bandpath.path)
    paths = [[bandpath.special_points[name] for name in group] for group in groups]
    labels = ["$\\Gamma$" if name == "G" else f"$\\mathrm{{{name}}}$" for g in groups for name in g]
    qpoints, connections = get_band_qpoints_and_path_connections(paths, npoints=npoints)
    phonon.run_band_structure(qpoints, path_connections=connections, labels=labels)


def band_segments(phonon) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """The band path as ``(start label, end label, distances, qpoints, frequencies)`` per segment.

    Labels are plain text (``"Γ"``, ``"X"``); frequencies are (npoints, n_bands) THz.
    """
    bs = phonon.band_structure
    names = [plain_label(lab) for lab in bs.labels]
    it = iter(names)
    start = next(it)
    out = []
    for i, (dist, qpts, freqs) in enumerate(zip(bs.distances, bs.qpoints, bs.frequencies, strict=True)):
        end = next(it)
        out.append((start, end, np.asarray(dist), np.asarray(qpts), np.asarray(freqs)))
        if i + 1 < len(bs.distances):
            start = end if bs.path_connections[i] else next(it)
    return out


def plain_label(label: str) -> str:
    """``"$\\Gamma$"`` -> ``"Γ"``, ``"$\\mathrm{X}$"`` -> ``"X"``."""
    text = label.replace("$", "").replace("\\mathrm{", "").replace("}", "")
    return {"\\Gamma": "Γ", "GAMMA": "Γ", "G": "Γ", "\\Sigma": "Σ"}.get(text, text)


# ---------------------------------------------------------------------------- reading results
def frequencies_at(
    phonon, qpoints: Sequence[Sequence[float]], q_direction: Sequence[float] | None = None
) -> np.ndarray:
    """Frequencies (THz) at q-points in reduced coordinates of the primitive reciprocal lattice.

    ``q_direction`` (reduced, like q) is the direction from which q = 0 is approached, for
    phonons with Born charges (``phonons(born=...)``): the LO modes at Γ depend on it, and
    without it Γ has the TO frequencies alone. Other q-points carry their own direction.

    Returns
    -------
    (n_q, n_bands) array, sorted ascending per q-point; imaginary ones are negative.
    """
    qpoints = np.atleast_2d(qpoints)
    if q_direction is None:
        return np.array(phonon.run_qpoints(qpoints).frequencies)
    return np.array(
        phonon.run_qpoints(qpoints, nac_q_direction=np.asarray(q_direction, dtype=float)).frequencies
    )


def _labelled_points(phonon) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``label -> (q, frequencies)`` at each labelled point of the band path (first occurrence)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for start, end, _, qpts, freqs in band_segments(phonon):
        out.setdefault(start, (qpts[0], freqs[0]))
        out.setdefault(end, (qpts[-1], freqs[-1]))
    return out


def special_point_frequencies(phonon) -> dict[str, np.ndarray]:
    """Frequencies (THz) at each labelled point of the band path (first occurrence)."""
    return {label: freqs for label, (_, freqs) in _labelled_points(phonon).items()}


def special_point_qpoints(phonon) -> dict[str, np.ndarray]:
    """q (reduced, primitive reciprocal lattice) of each labelled point of the band path (first
    occurrence), as :func:`special_point_frequencies` names them."""
    return {label: q for label, (q, _) in _labelled_points(phonon).items()}


def sampled_by_supercell(phonon, qpoint: Sequence[float]) -> bool:
    r"""Whether ``qpoint`` (reduced, primitive reciprocal lattice) is a q-point of the supercell:
    :math:`e^{2\pi i q \cdot R} = 1` for every supercell lattice vector :math:`R`, so that finite
    displacements in this supercell give its frequencies exactly, not interpolated."""
    phases = _supercell_phases(phonon, qpoint)
    return bool(np.allclose(phases, np.round(phases), atol=1e-6))


def near_gamma(phonon, qpoint: Sequence[float]) -> bool:
    r"""Whether ``qpoint`` (reduced, primitive reciprocal lattice) lies closer to Γ (or one of its
    copies) than the nearest q-points the supercell samples: :math:`|q \cdot R| < 2\pi` for each
    supercell lattice vector :math:`R` (for an N×N×1 supercell, |q_i| < 1/N in-plane). There the
    frequencies are interpolated between Γ and those points."""
    q = np.asarray(qpoint, dtype=float)
    phases = _supercell_phases(phonon, q - np.round(q))
    return bool(np.all(np.abs(phases) < 1.0 - 1e-6))


def _supercell_phases(phonon, qpoint) -> np.ndarray:
    r""":math:`q \cdot R / 2\pi` for the three supercell lattice vectors :math:`R`, shape (3,)."""
    reciprocal = np.linalg.inv(np.asarray(phonon.primitive.cell)).T  # rows b_i, a_i . b_j = δ_ij
    return np.asarray(phonon.supercell.cell) @ (np.asarray(qpoint, dtype=float) @ reciprocal)


def imaginary_modes(phonon, threshold_THz: float = IMAGINARY_THRESHOLD_THZ) -> list[ImaginaryMode]:
    """Modes with frequency below ``threshold_THz`` on the mesh and along the band path.

    Returns
    -------
    list of ImaginaryMode
        Sorted from the most negative frequency; one entry per (q-point, branch).
    """
    found: dict[tuple, ImaginaryMode] = {}
    sources = []
    if phonon.mesh is not None:
        sources.append(("mesh", phonon.mesh.qpoints, phonon.mesh.frequencies))
    if phonon.band_structure is not None:
        for _, _, _, qpts, freqs in band_segments(phonon):
            sources.append(("band", qpts, freqs))
    for source, qpts, freqs in sources:
        for iq, ib in zip(*np.nonzero(np.asarray(freqs) < threshold_THz), strict=True):
            q = tuple(round(float(x), 6) for x in qpts[iq])
            key = (q, int(ib))
            if key not in found:
                frequency = float(freqs[iq][ib])
                acoustic = int(ib) < 3  # branches sorted by frequency: the lowest three
                noise = acoustic and frequency > ACOUSTIC_NOISE_THZ and near_gamma(phonon, q)
                found[key] = ImaginaryMode(q, int(ib), frequency, source, acoustic_near_gamma=noise)
    return sorted(found.values(), key=lambda m: m.frequency)


def summarize_phonons(
    phonon, temperature_K: float = 300.0, threshold_THz: float = IMAGINARY_THRESHOLD_THZ
) -> PhononSummary:
    """Collect the numbers a report needs from a finished :func:`phonons` run.

    The thermal properties are those at ``temperature_K`` (K), interpolated between the grid's
    temperatures; outside the grid, those of its nearest end, whose temperature the summary
    then carries.
    """
    all_freqs = []
    if phonon.mesh is not None:
        all_freqs.append(np.ravel(phonon.mesh.frequencies))
    if phonon.band_structure is not None:
        all_freqs.extend(np.ravel(f) for f in phonon.band_structure.frequencies)
    freqs = np.concatenate(all_freqs) if all_freqs else np.array([np.nan])
    thermal = [np.nan, np.nan, np.nan]
    tp = phonon.thermal_properties
    if tp is not None:
        temps = np.asarray(tp.temperatures)
        temperature_K = float(np.clip(temperature_K, temps.min(), temps.max()))  # no extrapolation
        k = int(np.argmin(np.abs(temps - temperature_K)))
        if abs(temps[k] - temperature_K) < 1e-6:
            thermal = [float(tp.free_energy[k]), float(tp.entropy[k]), float(tp.heat_capacity[k])]
        else:
            thermal = [
                float(np.interp(temperature_K, temps, getattr(tp, name)))
                for name in ("free_energy", "entropy", "heat_capacity")
            ]
    labelled = special_point_qpoints(phonon) if phonon.band_structure is not None else {}
    return PhononSummary(
        n_primitive_atoms=len(phonon.primitive),
        n_supercell_atoms=len(phonon.supercell),
        n_displacements=len(phonon.supercells_with_displacements),
        special_points=special_point_frequencies(phonon) if phonon.band_structure is not None else {},
        min_frequency=float(np.nanmin(freqs)),
        max_frequency=float(np.nanmax(freqs)),
        imaginary=imaginary_modes(phonon, threshold_THz),
        temperature=temperature_K,
        free_energy=thermal[0],
        entropy=thermal[1],
        heat_capacity=thermal[2],
        interpolated_points=[label for label, q in labelled.items() if not sampled_by_supercell(phonon, q)],
        threshold=threshold_THz,
        special_qpoints=labelled,
        nac=phonon.nac_params is not None,
    )


# ---------------------------------------------------------------------------- files
def write_phonon_files(phonon, output_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write phonopy's files (and plots) into ``output_dir``, each one complete or not at all.

    Everything is written into a temporary folder inside ``output_dir`` with phonopy's own
    writers, then each file is renamed into place. Without ``plot``, plots an earlier run left
    in the folder are removed, so that every file there belongs to this run.

    Returns
    -------
    dict of str -> Path
        ``phonopy_yaml``, ``force_constants``, ``band_yaml``, ``total_dos``, ``thermal_yaml`` and,
        with ``plot``, ``bands_png`` and ``thermal_png``.
    """
    from phonopy.file_IO import write_FORCE_CONSTANTS

    from .plotting import plot_bands_and_dos, plot_thermal_properties

    out = Path(output_dir)
    refuse_file_as_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".phonons.", dir=out))
    plots = {"bands_png": "phonons.png", "thermal_png": "thermal_properties.png"}
    names = {
        "phonopy_yaml": "phonopy.yaml",
        "force_constants": "FORCE_CONSTANTS",
        "band_yaml": "band.yaml",
        "total_dos": "total_dos.dat",
        "thermal_yaml": "thermal_properties.yaml",
    }
    try:
        phonon.save(tmp / names["phonopy_yaml"], settings={"force_constants": True})
        write_FORCE_CONSTANTS(
            phonon.force_constants, filename=tmp / names["force_constants"], p2s_map=phonon.primitive.p2s_map
        )
        phonon.write_yaml_band_structure(filename=tmp / names["band_yaml"])
        phonon.write_total_dos(filename=tmp / names["total_dos"])
        phonon.write_yaml_thermal_properties(filename=tmp / names["thermal_yaml"])
        if plot:
            names.update(plots)
            plot_bands_and_dos(phonon, tmp / names["bands_png"])
            plot_thermal_properties(phonon, tmp / names["thermal_png"])
        written = {}
        for key, name in names.items():
            os.replace(tmp / name, out / name)
            written[key] = out / name
        if not plot:
            for name in plots.values():
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
