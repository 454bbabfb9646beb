"""Born effective charges and the dielectric tensor for phonopy's non-analytical correction.

A force field gives the short-range force constants of a polar crystal but neither its Born
effective charges Z* nor its high-frequency dielectric tensor ε∞: those come from DFT linear
response (VASP ``LEPSILON``, Quantum ESPRESSO ``ph.x`` with ``epsil``). With them phonopy adds
the long-range dipole-dipole term, which splits longitudinal from transverse optical modes at Γ
(LO-TO splitting). :func:`nac_parameters` reads them from a phonopy ``BORN`` file or takes them
as arrays, checks them against the primitive cell and returns phonopy's ``nac_params``.

Units: Z* in elementary charges (e), ε∞ dimensionless; Cartesian axes those of the structure
given to :func:`~ase_sparsecalc.workflows.phonons.phonons`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import DataError, DataFileError

logger = logging.getLogger(__name__)

CHARGE_NEUTRALITY_TOLERANCE = 0.1
"""e: Born charges of the primitive cell that sum to more than this (any Cartesian entry) are
warned about: they should sum to zero, and DFT breaks that only by its convergence error."""


def nac_parameters(born: str | Path | Mapping, phonon, name: str = "the structure") -> dict:
    """Phonopy's ``nac_params`` for ``phonon``'s primitive cell.

    Parameters
    ----------
    born : path or mapping
        A phonopy ``BORN`` file (first line: optionally the unit factor; second: the 9 entries of
        ε∞; then the 9 entries of Z* for each symmetry-independent atom of the primitive cell,
        in phonopy's order; ``phonopy-vasp-born`` and ``phonopy-qe-born`` write it, for the
        cell they were given, which should be this one), or a mapping with ``"born"``,
        (n_primitive_atoms, 3, 3) in e, and ``"dielectric"``, (3, 3). Z*[i, a, b] is the force
        on atom i along a per unit field along b, as in phonopy.
    phonon : phonopy.Phonopy
        Its primitive cell and symmetry check the charges.
    name : str
        Names the structure in errors.

    Returns
    -------
    dict
        ``{"born": (n, 3, 3), "dielectric": (3, 3), "factor": e²/(4πε₀) in eV Å}``, the factor
        for force constants in eV/Å² (14.40). A unit factor on a BORN file's first line was
        written for the force constants of some DFT code; these are in eV/Å², so it is replaced
        (with a warning when it differs).

    Raises
    ------
    DataFileError
        The file is missing or unreadable.
    DataError
        Wrong shapes or counts, values that are not finite, or an ε∞ that is not symmetric with
        eigenvalues of 1 or more.
    """
    n_atoms = len(phonon.primitive)
    if isinstance(born, Mapping):
        where = f"Born charges given for {name}"
        params = _from_mapping(born, n_atoms, where)
    else:
        where = str(born)
        params = _from_file(Path(born), phonon, where)
    _check_dielectric(params["dielectric"], where)
    params["factor"] = _unit_factor(params.get("factor"), where)
    largest = float(np.abs(params["born"].sum(axis=0)).max())
    if largest > CHARGE_NEUTRALITY_TOLERANCE:
        logger.warning(
            "%s: the Born charges of %s's primitive cell sum to a tensor with entries up to %.2g e; "
            "it should be zero (charge neutrality): check that they belong to this structure "
            "and its atom order",
            where,
            name,
            largest,
        )
    return params


def _from_mapping(born: Mapping, n_atoms: int, where: str) -> dict:
    missing = {"born", "dielectric"} - set(born)
    if missing:
        raise DataError(f"{where}: needs the keys 'born' and 'dielectric'; missing {sorted(missing)}")
    charges = np.asarray(born["born"], dtype=np.float64)
    dielectric = np.asarray(born["dielectric"], dtype=np.float64)
    if charges.shape != (n_atoms, 3, 3):
        raise DataError(
            f"{where}: 'born' has shape {charges.shape}; the primitive cell has {n_atoms} atoms, "
            f"so it needs ({n_atoms}, 3, 3)"
        )
    if dielectric.shape != (3, 3):
        raise DataError(f"{where}: 'dielectric' has shape {dielectric.shape}, not (3, 3)")
    if not (np.isfinite(charges).all() and np.isfinite(dielectric).all()):
        raise DataError(f"{where}: the Born charges or the dielectric tensor hold NaN or inf")
    return {"born": charges, "dielectric": dielectric}


def _from_file(path: Path, phonon, where: str) -> dict:
    from phonopy.file_IO import parse_BORN

    if not path.is_file():
        raise DataFileError(f"{where}: no such BORN file")
    independent = len(phonon.primitive_symmetry.get_independent_atoms())
    try:
        params = parse_BORN(phonon.primitive, symprec=phonon.symmetry.tolerance, filename=path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{where}: cannot read it as a BORN file ({exc})") from exc
    except (ValueError, IndexError, RuntimeError) as exc:  # phonopy's BORNFileParseError is a RuntimeError
        raise DataError(
            f"{where}: not a BORN file for this primitive cell ({' '.join(str(exc).split())}). "
            "phonopy's format: line 1 the unit factor (or nothing), line 2 the 9 entries of the "
            f"dielectric tensor, then 9 Born-charge entries per line for each of the {independent} "
            f"symmetry-independent atom(s) of the {len(phonon.primitive)}-atom primitive cell"
        ) from exc
    params = {key: np.asarray(value) if key != "factor" else value for key, value in params.items()}
    if not (np.isfinite(params["born"]).all() and np.isfinite(params["dielectric"]).all()):
        raise DataError(f"{where}: the Born charges or the dielectric tensor hold NaN or inf")
    return params


def _unit_factor(given: float | None, where: str) -> float:
    """e²/(4πε₀) in eV Å, phonopy's unit factor for force constants in eV/Å²."""
    from phonopy.physical_units import get_calculator_physical_units

    factor = float(get_calculator_physical_units().nac_factor)  # phonopy's default units: eV, Å
    if given is not None and abs(given - factor) > 1e-2 * factor:
        logger.warning(
            "%s: its unit factor %g is for another code's force constants; these are in eV/Å², "
            "so %.4g is used",
            where,
            given,
            factor,
        )
    return factor


def _check_dielectric(dielectric: np.ndarray, where: str) -> None:
    if not np.allclose(dielectric, dielectric.T, atol=1e-3 * max(1.0, np.abs(dielectric).max())):
        raise DataError(f"{where}: the dielectric tensor is not symmetric:\n{dielectric}")
    lowest = float(np.linalg.eigvalsh(dielectric).min())
    if lowest < 1.0:
        raise DataError(
            f"{where}: the dielectric tensor has an eigenvalue {lowest:.3g} below 1; ε∞ of a "
            "material is 1 or more (the vacuum's): is the file in phonopy's BORN format?"
        )
