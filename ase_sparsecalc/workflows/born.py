"""Born effective charges and the dielectric tensor for phonopy's non-analytical correction.

A force field gives the short-range force constants of a polar crystal but neither its Born
effective charges Z* nor its high-frequency dielectric tensor ε∞: those come from DFT linear
response (VASP ``LEPSILON``, Quantum ESPRESSO ``ph.x`` with ``epsil``). With them phonopy adds
the long-range dipole-dipole term, which splits longitudinal from transverse optical modes at Γ
(LO-TO splitting). :func:`nac_parameters` reads them from a phonopy ``BORN`` file or a
Quantum ESPRESSO ``ph.x`` output, or takes them as arrays, checks them against the primitive
cell and returns phonopy's ``nac_params``.

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


METALLIC_DIELECTRIC = 50.0
"""An ε∞ eigenvalue above this is warned about: insulators lie below about 30 (InSb 16, PbTe
33); larger values come from a DFT gap that (nearly) closed, where linear response diverges."""


def nac_parameters(born: str | Path | Mapping, phonon, name: str = "the structure") -> dict:
    """Phonopy's ``nac_params`` for ``phonon``'s primitive cell.

    Parameters
    ----------
    born : path or mapping
        A ``ph.x`` output of a run with ``epsil = .true.`` (its last dielectric tensor and
        effective charges "d Force / dE", rows Ex, Ey, Ez as printed, which is phonopy's
        layout; its atoms are matched to the primitive cell's by element), a phonopy ``BORN``
        file (first line: optionally the unit factor; second: the 9 entries of
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
        path = Path(born)
        if not path.is_file():
            raise DataFileError(f"{where}: no such file (Born charges: a ph.x output or a BORN file)")
        if _is_ph_x_output(path):
            params = _from_ph_x_output(path, phonon, where)
        else:
            params = _from_file(path, phonon, where)
    if not (np.isfinite(params["born"]).all() and np.isfinite(params["dielectric"]).all()):
        raise DataError(f"{where}: the Born charges or the dielectric tensor hold NaN or inf")
    _check_dielectric(params["dielectric"], where)
    params["factor"] = _unit_factor(params.get("factor"), where)
    largest_dielectric = float(np.linalg.eigvalsh(params["dielectric"]).max())
    if largest_dielectric > METALLIC_DIELECTRIC:
        logger.warning(
            "%s: a dielectric constant of %.4g is that of a (near-)metal: the DFT gap closed or "
            "nearly did (a k-mesh through Γ for a small-gap semiconductor in PBE does this); "
            "check the gap and the k-mesh, or the LO-TO splitting will be wrong",
            where,
            largest_dielectric,
        )
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
    return {"born": charges, "dielectric": dielectric}


def _from_file(path: Path, phonon, where: str) -> dict:
    from phonopy.file_IO import parse_BORN

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
    return {key: np.asarray(value) if key != "factor" else value for key, value in params.items()}


PH_X_DIELECTRIC = "Dielectric constant in cartesian axis"
PH_X_CHARGES = "Effective charges (d Force / dE) in cartesian axis"


def _is_ph_x_output(path: Path) -> bool:
    try:
        with path.open(errors="replace") as handle:
            return any("Program PHONON" in line for line, _ in zip(handle, range(20), strict=False))
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read it ({exc})") from exc


def _from_ph_x_output(path: Path, phonon, where: str) -> dict:
    """ε∞ and Z* from the last blocks a ``ph.x`` run printed, Z* reordered to the primitive
    cell's atoms where their elements tell the order (one atom of each element), else taken in
    ph.x's order after checking the elements match."""
    lines = path.read_text(errors="replace").splitlines()
    starts = [k for k, line in enumerate(lines) if PH_X_DIELECTRIC in line]
    charge_starts = [k for k, line in enumerate(lines) if PH_X_CHARGES in line]
    if not starts or not charge_starts:
        raise DataError(
            f"{where}: a ph.x output without the dielectric tensor or the effective charges "
            f'("{PH_X_DIELECTRIC}", "{PH_X_CHARGES}"): run ph.x at Γ with epsil = .true., '
            "to its end"
        )
    try:
        rows = [
            _numbers_in_parentheses(line) for line in lines[starts[-1] + 1 : starts[-1] + 6] if "(" in line
        ]
        dielectric = np.array(rows[:3], dtype=float).reshape(3, 3)
        symbols, charges, k = [], [], charge_starts[-1] + 1
        while k < len(lines) and lines[k].split()[:1] != ["atom"]:
            k += 1
        while k < len(lines) and lines[k].split()[:1] == ["atom"]:
            symbols.append(lines[k].split()[2])
            charges.append([_numbers_in_parentheses(line) for line in lines[k + 1 : k + 4]])
            k += 4
        if not symbols:
            raise ValueError("no atom lines after the effective-charge heading")
        charges = np.array(charges, dtype=float).reshape(len(symbols), 3, 3)
    except (ValueError, IndexError) as exc:
        raise DataError(
            f"{where}: cannot read the ph.x dielectric tensor or effective charges ({exc})"
        ) from exc
    return {
        "born": _in_primitive_order(charges, symbols, list(phonon.primitive.symbols), where),
        "dielectric": dielectric,
    }


def _numbers_in_parentheses(line: str) -> list[float]:
    """``"Ex  (  2.24962  0.00000 -0.00000 )"`` -> ``[2.24962, 0.0, -0.0]``."""
    return [float(x) for x in line[line.index("(") + 1 : line.rindex(")")].split()]


def _in_primitive_order(
    charges: np.ndarray, symbols: list[str], primitive: list[str], where: str
) -> np.ndarray:
    """Z* (one per ph.x atom) in the order of the primitive cell's atoms."""
    if symbols == primitive:
        return charges
    if sorted(symbols) == sorted(primitive) and len(set(symbols)) == len(symbols):
        return charges[[symbols.index(symbol) for symbol in primitive]]
    raise DataError(
        f"{where}: ph.x's atoms are {', '.join(symbols)}; the primitive cell of the structure has "
        f"{', '.join(primitive)}: give phonons the cell ph.x ran on, atoms in the same order"
    )


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
