"""DFT frames in: any file ASE reads, validated before any training starts.

Labels come from each frame's calculator (the SinglePointCalculator that ASE's readers attach:
extxyz, .traj, vasprun.xml, OUTCAR, espresso-out, GPAW text output, ...) or from named
``atoms.info`` / ``atoms.arrays`` keys. The energy label is the free energy when the file has one
(the quantity whose derivatives the DFT forces are, with electronic smearing), else the energy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from ..errors import (
    ConfigError,
    DataFileError,
    EmptyDatasetError,
    MissingLabelError,
    NonFiniteLabelError,
    StaleLabelError,
    StructureError,
)
from ..graph import CHARGE_KEY, NEUTRAL_SINGLET, SPIN_KEY, charge_and_spin, has_cell_volume
from ..structure_io import (
    count_frames,
    frame_range,
    guessed_format,
    reference_label_keys,
    xyz_layout_problem,
)

logger = logging.getLogger(__name__)


@dataclass
class Frame:
    """One labelled structure.

    Attributes
    ----------
    atoms : ase.Atoms
        Structure (no calculator attached).
    energy : float
        Total (free) energy, eV.
    forces : (n_atoms, 3) array, eV/Å, or None
    stress : (3, 3) array, eV/Å³ (ASE sign: positive under tension), or None
        A 6-vector in ASE's Voigt order (xx, yy, zz, yz, xz, xy) is turned into the matrix.
    source : str
        ``"file:index"``, used in error messages.
    config_type : str or None
        The file's ``config_type`` tag (``atoms.info``), if any; see :func:`~.dataset.take_isolated_atoms`.
    energy_label : str or None
        The key the energy was read from (``"free_energy"``, ``"energy"`` or ``--energy-key``);
        None for frames built by hand.
    magmom : float or None
        Total magnetic moment of the DFT solution (μB; the calculator's ``magmom``, else the sum
        of its ``magmoms``), when the file gives one. Not a label: it is compared with the spin
        multiplicity a spin-conditioned base model is given.
    reference_keys : tuple of str
        Keys named as reference labels (``REF_energy``, ``DFT_forces``, ...) that the frame
        carries beside the labels read by default (see :func:`reference_label_keys`).
    stress_left_out : bool
        The file gave a stress, but the cell has no volume (a slab without its vacuum vector),
        so it is not used.

    Frames built by hand get the same shape checks as those read from files
    (:class:`~ase_sparsecalc.errors.MissingLabelError` names the frame's ``source``).
    """

    atoms: Atoms
    energy: float
    forces: np.ndarray | None
    stress: np.ndarray | None
    source: str
    config_type: str | None = None
    energy_label: str | None = None
    magmom: float | None = None
    reference_keys: tuple[str, ...] = ()
    stress_left_out: bool = False

    def __post_init__(self) -> None:
        """Labels as float arrays of the documented shapes."""
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=float)
            if self.forces.shape != (len(self.atoms), 3):
                raise MissingLabelError(
                    f"{self.source}: forces have shape {self.forces.shape} for {len(self.atoms)} atoms; "
                    f"expected ({len(self.atoms)}, 3)"
                )
        if self.stress is not None:
            self.stress = _stress_matrix(np.asarray(self.stress, dtype=float), self.source)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.atoms)

    @property
    def is_isolated_atom(self) -> bool:
        """Tagged as an isolated-atom reference (``config_type=IsolatedAtom`` or ``isolated_atom``)."""
        return _is_isolated_atom_tag(self.config_type)


def _is_isolated_atom_tag(config_type: object) -> bool:
    return isinstance(config_type, str) and config_type.replace("_", "").lower() == "isolatedatom"


def split_path_index(spec: str | Path, index: str | int = ":") -> tuple[Path, str | int]:
    """Split ``"file.xyz@0:100"`` into the path and an ASE index (``index`` when no ``@``)."""
    text = str(spec)
    if "@" in text and not Path(text).exists():
        path, _, idx = text.rpartition("@")
        return Path(path), idx
    return Path(text), index


def read_frames(
    sources: str | Path | Atoms | Sequence[str | Path | Atoms],
    index: str | int = ":",
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    require_forces: bool = True,
    virial_key: str | None = None,
    file_format: str | None = None,
) -> list[Frame]:
    """Read labelled frames from files (any ASE format) or from ``Atoms`` objects.

    Parameters
    ----------
    sources : path, Atoms, or a sequence of them
        Files may carry an ASE index slice: ``"train.xyz@0:200"``.
    index : str or int
        Default index for files without ``@`` (``":"``: every frame).
    energy_key, forces_key, stress_key : str, optional
        Read labels from these ``atoms.info``/``atoms.arrays`` keys (or calculator results of
        that name) instead of the calculator's energy/forces/stress.
    require_forces : bool
        Refuse frames without forces.
    virial_key : str, optional
        Read the stress from a virial under this key instead (eV; 3x3, 9 or Voigt 6 values), as
        MACE's ``virials_key`` does: stress = -virial / volume (eV/Å³).
    file_format : str, optional
        ASE format name for every file (``"extxyz"``, ``"vasp-out"``, ``"espresso-out"``,
        ``"gpaw-out"``, ...), as ``ase.io.read``'s ``format``; None lets ASE guess from each
        file's name and content.

    Raises
    ------
    DataFileError, EmptyDatasetError, MissingLabelError, NonFiniteLabelError, StaleLabelError
        With the file and frame named.
    """
    if isinstance(sources, (str, Path, Atoms)):
        sources = [sources]
    frames: list[Frame] = []
    first: Atoms | None = None  # as read, with its arrays: where to look for labels under other names
    virials: set[str] = set()  # info keys that may hold virials (ASE leaves "virial" in info)
    for position, spec in enumerate(sources):
        for atoms, where in _read_structures(spec, index, position, file_format):
            first = atoms if first is None else first
            virials.update(key for key in atoms.info if "virial" in key.lower())
            frames.append(
                frame_from_atoms(atoms, where, energy_key, forces_key, stress_key, require_forces, virial_key)
            )
    if not frames:
        raise EmptyDatasetError(f"{', '.join(map(str, sources))}: no frames to read")
    left_out = [f for f in frames if f.stress_left_out]
    if left_out:
        logger.warning(
            "%d frame(s) give a stress but have no cell with a volume (e.g. %s: a slab or wire "
            "without its vacuum vector); their stresses are not used. Give the cell its vacuum "
            "vector to train on them",
            len(left_out),
            left_out[0].source,
        )
    if all(f.forces is None for f in frames):  # only where forces are optional
        hint = _key_hint(first, "forces")
        if forces_key:
            names = ", ".join(map(str, sources))
            hint = hint or "; check the key"
            raise MissingLabelError(f"{names}: no frame has forces under {forces_key!r}{hint}")
        if hint:
            logger.warning("%s: no frame has forces under 'forces'%s", ", ".join(map(str, sources)), hint)
    named = virial_key or stress_key
    if named and all(f.stress is None for f in frames):
        raise MissingLabelError(
            f"{', '.join(map(str, sources))}: no frame has a {'virial' if virial_key else 'stress'} "
            f"under {named!r} (or none has a cell with a volume); check the key"
        )
    if not named and all(f.stress is None for f in frames):
        virials = sorted(virials)
        if virials and any(has_cell_volume(f.atoms) for f in frames):
            logger.warning(
                "%s: no frame has a stress, but frames have %s (MACE's training files keep "
                "virials, in eV): pass --virial-key %s (virial_key= in Python) to train on them",
                ", ".join(map(str, sources)),
                ", ".join(virials),
                virials[0],
            )
    return frames


def _read_structures(
    spec: str | Path | Atoms, index: str | int, position: int = 0, file_format: str | None = None
) -> Iterable[tuple[Atoms, str]]:
    """The structures of one source with the name messages give them: ``file:frame k``, or for
    an ``Atoms`` object its ``info["source"]``, else ``structure N`` (its place in the list)."""
    if isinstance(spec, Atoms):
        yield spec, spec.info.get("source", f"structure {position}")
        return
    import ase.io

    path, idx = split_path_index(spec, index)
    if path.is_dir():
        raise DataFileError(f"{path}: is a folder, expected a trajectory file")
    if not path.is_file():
        raise DataFileError(f"{path}: file not found")
    try:
        if path.stat().st_size == 0:
            raise EmptyDatasetError(f"{path}: the file is empty (no frames)")
        _check_index(path, idx, file_format)
        images = ase.io.read(str(path), index=idx, format=file_format, do_not_split_by_at_sign=True)
    except (EmptyDatasetError, DataFileError):
        raise
    except (IndexError, StopIteration) as exc:
        if _first_unreadable_frame(path, file_format) is not None:  # a parser's own IndexError
            raise DataFileError(_unreadable(path, exc, file_format)) from exc
        count = frame_range(count_frames(path, file_format))
        raise DataFileError(f"{path}: has no frame {idx!r}{count}; check the index after '@'") from exc
    except Exception as exc:  # ASE's parsers raise anything from ValueError to KeyError
        raise DataFileError(_unreadable(path, exc, file_format)) from exc
    if isinstance(images, Atoms):
        images = [images]
    if len(images) == 0:
        total = count_frames(path, file_format)
        if total:
            raise EmptyDatasetError(f"{path}: index {idx!r} selects none of its {total} frames")
        raise EmptyDatasetError(_no_frames(path, idx, file_format))
    numbers = _frame_numbers(path, idx, len(images), file_format)
    name = f"{path}@{idx}" if _is_selection(idx) else str(path)  # database rows: k-th of the selection
    for k, atoms in zip(numbers, images, strict=True):
        yield atoms, f"{name}:frame {k}"


PROGRAM_OUTPUTS = {
    "espresso-out": "pw.x",
    "vasp-out": "VASP",
    "vasp-xml": "VASP",
    "gpaw-out": "GPAW",
    "aims-output": "FHI-aims",
    "castep-castep": "CASTEP",
    "abinit-out": "ABINIT",
    "orca-output": "ORCA",
    "gaussian-out": "Gaussian",
}
"""ASE formats that are a DFT program's own output: one frame per completed step."""


def _no_frames(path: Path, idx: str | int, file_format: str | None) -> str:
    """The message for a file ASE reads as holding no frames. A DFT program's output without
    frames is a run that stopped before its first converged step: say that, and quote its
    error where it printed one, rather than doubt the format."""
    fmt = file_format or guessed_format(path)
    if fmt not in PROGRAM_OUTPUTS:
        return f"{path}: no frames (index {idx!r}){_format_note(path, file_format)}"
    how = "" if file_format else ", from its content"
    message = (
        f"{path}: no completed step in this {PROGRAM_OUTPUTS[fmt]} output (read as format {fmt!r}{how}): "
        "the run stopped or failed before its first converged step"
    )
    reason = _error_lines(path)
    return message + (f"; it says: {reason}" if reason else "; see the end of the file")


STOP_MARKS = ("error in routine", "not achieved", "not converged", "error")
"""Phrases of a program's last lines that say why it stopped, most telling first (pw.x:
"Error in routine ..." and "convergence NOT achieved after 100 iterations: stopping")."""


def _error_lines(path: Path, tail: int = 60) -> str | None:
    """The line among the last ``tail`` lines of a text file that says why the program
    stopped (see :data:`STOP_MARKS`), with the next line where it ends in a colon (pw.x:
    "Error in routine read_input (1):" then "opening input file"), or None."""
    try:
        lines = [" ".join(line.split()) for line in path.read_text(errors="replace").splitlines()[-tail:]]
    except OSError:
        return None
    lines = [line for line in lines if line and set(line) != {"%"}]  # pw.x frames errors in %%%
    for mark in STOP_MARKS:
        for k, line in enumerate(lines):
            if mark in line.lower():  # a line ending in ":" names its cause on the next one
                return " ".join(lines[k : k + 2] if line.endswith(":") else [line])[:200]
    return None


def _unreadable(path: Path, exc: Exception, file_format: str | None) -> str:
    """The message for a file ASE fails to read: the first frame it cannot read where others
    came before it, the cause where it is a known one, and otherwise how the format was chosen."""

    where = "this file"
    frame = _first_unreadable_frame(path, file_format)
    if frame:
        where = f"frame {frame} (frames 0 to {frame - 1} read)"
    fmt = file_format or guessed_format(path)
    layout = xyz_layout_problem(path) if fmt in ("extxyz", "xyz") else None
    if layout:  # at its first line the file may be no (ext)xyz at all: say how it was read
        return f"{path}: ASE cannot read this file: {layout}" + (
            _format_note(path, file_format) if layout.startswith("line 1 ") else ""
        )
    message = f"{path}: ASE cannot read {where} ({type(exc).__name__}: {exc})"
    program = PROGRAM_OUTPUTS.get(fmt)
    if program:  # the format is sure (from the content, or given): say why the run stopped
        reason = _error_lines(path)
        subject = f"this {program} output"
        if frame:
            subject = f"frame {frame} of this {program} output (frames 0 to {frame - 1} read)"
        return (
            f"{path}: ASE cannot read {subject} ({type(exc).__name__}: {exc}; read as format {fmt!r})"
            + (f"; it says: {reason}" if reason else "")
            + (f"; the steps before it are read with {path}@:{frame}" if frame else "")
        )
    if "expecting special 3x3 matrix" in str(exc):
        return message + (
            "; ASE's extxyz reader takes stress= and virial= as 9 numbers (3x3, row by row): store "
            "other forms under another name and pass --stress-key or --virial-key"
        )
    if isinstance(exc, KeyError) and exc.args and exc.args[0] not in chemical_symbols:
        return f"{path}: ASE cannot read {where}: unknown chemical symbol {exc.args[0]!r}"
    return message + ("" if frame else _format_note(path, file_format))


def _first_unreadable_frame(path: Path, file_format: str | None) -> int | None:
    """How many frames ASE reads one by one before failing (None if it reads them all)."""
    import ase.io

    count = 0
    try:
        for _ in ase.io.iread(str(path), index=":", format=file_format, do_not_split_by_at_sign=True):
            count += 1
    except Exception:
        return count
    return None


def _is_selection(idx: str | int) -> bool:
    """Whether ``idx`` is an ASE database selection (``"natoms=4"``) rather than an index."""
    from ase.io.formats import string2index

    return isinstance(idx, str) and isinstance(string2index(idx), str)


def _format_note(path: Path, file_format: str | None) -> str:
    """How the file was read, for messages: the format given, or the one ASE guessed."""
    if file_format is not None:
        return f"; read as format {file_format!r}"
    from ase.io.formats import ioformats

    guessed = guessed_format(path)
    if guessed not in ioformats:  # None, or a file extension that names no format
        return "; ASE cannot tell its format: give it with --format (file_format= in Python)"
    return f"; read as format {guessed!r}, ASE's guess: give the right one with --format (file_format=)"


def _check_index(path: Path, idx: str | int, file_format: str | None = None) -> None:
    """Refuse index text that is neither a frame number nor a slice (``"0"``, ``"-1"``, ``"::10"``).

    ASE passes any other text on as a database selection, which only an ASE database (``.db``)
    understands; other formats then fail with an unrelated error.
    """
    if not isinstance(idx, str):
        return
    from ase.io.formats import string2index

    try:
        selected = string2index(idx)
    except (ValueError, TypeError):  # "a:b", "1:2:3:4"
        selected = idx if ":" not in idx else None
    if selected is None:
        raise DataFileError(
            f"{path}: {idx!r} after '@' is not a frame index or slice; use a number or a slice "
            "such as 0, -1, 0:100 or ::10"
        )
    if isinstance(selected, slice) and selected.step == 0:
        raise DataFileError(f"{path}: the slice {idx!r} after '@' has a step of 0; use 1 or more")
    if isinstance(selected, str) and (file_format or guessed_format(path)) != "db":
        raise DataFileError(
            f"{path}: {idx!r} after '@' is not a frame index; use a number or a slice "
            "such as 0, -1, 0:100 or ::10 (selections such as natoms=4 work on ASE databases, .db)"
        )


def _frame_numbers(path: Path, idx: str | int, n_read: int, file_format: str | None = None) -> Sequence[int]:
    """The positions in the file of the ``n_read`` frames that ``idx`` selected (for messages).

    A plain ``start:stop`` needs nothing more; a step or a negative index needs the number of
    frames in the file, which costs a second read.
    """
    from ase.io.formats import string2index

    try:
        selected = string2index(idx) if isinstance(idx, str) else idx
    except ValueError:
        return range(n_read)
    if isinstance(selected, str):  # a database selection
        return range(n_read)
    if isinstance(selected, int) and selected >= 0:
        return [selected]
    if isinstance(selected, slice) and (selected.start or 0) >= 0 and selected.step in (None, 1):
        return range(selected.start or 0, (selected.start or 0) + n_read)
    total = count_frames(path, file_format)
    try:
        chosen = range(total)[selected]
    except IndexError:  # ASE reads some frame for a negative index beyond the file's start
        raise DataFileError(
            f"{path}: has no frame {idx!r}{frame_range(total)}; check the index after '@'"
        ) from None
    return [chosen] if isinstance(chosen, int) else chosen


def frame_from_atoms(
    atoms: Atoms,
    where: str,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    require_forces: bool = True,
    virial_key: str | None = None,
) -> Frame:
    """Turn one labelled ``Atoms`` into a :class:`Frame` (labels validated; see :func:`read_frames`)."""
    if stress_key and virial_key:
        raise ConfigError("give a stress key or a virial key, not both (--stress-key, --virial-key)")
    if len(atoms) == 0:
        raise StructureError(f"{where}: the frame has no atoms")
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    _refuse_stale_results(atoms, results, where)
    if "free_energy" not in results:
        free_energy = _free_energy_from_contributions(atoms.calc)
        if free_energy is not None:
            results["free_energy"] = free_energy
    config_type = atoms.info.get("config_type")
    if _is_isolated_atom_tag(config_type):
        require_forces = False  # an isolated atom's forces vanish by symmetry; files often omit them
    energy_names = ("free_energy", "energy")
    energy_label, energy = _named_label(atoms, results, energy_key, energy_names, where, "energy")
    if energy is None:
        raise MissingLabelError(
            f"{where}: no energy (looked for {energy_key or 'free_energy/energy'})"
            + _key_hint(atoms, "energy")
        )
    forces = _label(atoms, results, forces_key, ("forces",), where, "forces", required=require_forces)
    if virial_key:
        stress = _stress_from_virial(atoms, results, virial_key, where)
    else:
        stress = _label(atoms, results, stress_key, ("stress",), where, "stress", required=False)
    energy_array = _as_float_array(energy, where, "energy")
    if energy_array.size != 1:
        raise MissingLabelError(f"{where}: energy has {energy_array.size} values; expected one number")
    energy = float(energy_array.reshape(-1)[0])
    if forces is not None:
        forces = _as_float_array(forces, where, "forces")
        if forces.size != 3 * len(atoms):
            raise MissingLabelError(
                f"{where}: forces have shape {forces.shape} for {len(atoms)} atoms; expected "
                f"({len(atoms)}, 3)"
            )
        forces = forces.reshape(len(atoms), 3)
    stress_left_out = False
    if stress is not None:
        stress = _stress_matrix(_as_float_array(stress, where, "stress"), where)
        if not has_cell_volume(atoms):
            stress, stress_left_out = None, True  # a stress without a cell volume has no meaning
    for name, value in (("energy", energy), ("forces", forces), ("stress", stress)):
        if value is not None and not np.all(np.isfinite(value)):
            raise NonFiniteLabelError(f"{where}: {name} contains NaN or inf")
    clean = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    charge, spin = charge_and_spin(atoms, where)  # a charge or spin that is not a number is named here
    if (charge, spin) != NEUTRAL_SINGLET:
        clean.info.update({CHARGE_KEY: charge, SPIN_KEY: spin})
    tag = str(config_type) if config_type is not None else None
    unread = () if (energy_key or forces_key) else reference_label_keys(atoms)
    magmom = _total_magmom(results)
    return Frame(clean, energy, forces, stress, where, tag, energy_label, magmom, unread, stress_left_out)


def _total_magmom(results: dict) -> float | None:
    """Size of the total magnetic moment (μB) among a calculator's results, if any: |M| for
    collinear moments, the length of the summed vector for non-collinear ones."""
    try:
        value = results.get("magmom")
        if value is None and results.get("magmoms") is not None:
            value = np.asarray(results["magmoms"], dtype=np.float64).sum(axis=0)  # scalar or (3,)
        if value is None:
            return None
        moment = float(np.linalg.norm(np.atleast_1d(np.asarray(value, dtype=np.float64))))
    except (TypeError, ValueError):
        return None
    return moment if np.isfinite(moment) else None


def _free_energy_from_contributions(calc) -> float | None:
    """The free energy (eV) from the energy breakdown a reader attached, if it has one.

    ASE's GPAW text reader gives as ``energy`` GPAW's value extrapolated to zero smearing and
    keeps the ``Free energy:`` line only in ``calc.energy_contributions``; with smearing the two
    differ (0.17 eV for a 4-atom Al cell at 0.1 eV Fermi-Dirac width), and the forces are
    derivatives of the free energy.
    """
    contributions = getattr(calc, "energy_contributions", None)
    if not isinstance(contributions, dict):
        return None
    value = contributions.get("free energy")
    return float(value) if isinstance(value, (int, float, np.floating)) else None


def _refuse_stale_results(atoms: Atoms, results: dict, where: str) -> None:
    """Raise :class:`StaleLabelError` when the calculator's results belong to another structure.

    ASE keeps results on the calculator, not on the atoms: atoms moved after their calculation,
    or many ``Atoms`` sharing one calculator (``a.calc = calc`` in a loop), would otherwise all
    carry the labels of the structure the calculator saw last. Files read by ``ase.io`` always
    pass (their single-point results are stored with a copy of the atoms).
    """
    if not results or getattr(atoms.calc, "atoms", None) is None:
        return
    changed = atoms.calc.check_state(atoms)
    if changed == ["positions"] and _moved_as_a_whole(atoms.calc.atoms, atoms):
        return  # translated and/or wrapped into the cell: the same structure, the same labels
    if changed:
        raise StaleLabelError(
            f"{where}: the calculator's results were computed for another structure ({', '.join(changed)} "
            "differ): the atoms were changed after the calculation, or several structures share one "
            "calculator; give each structure its own results (ase.calculators.singlepoint."
            "SinglePointCalculator, or write the frames to a file as they are computed)"
        )


def _moved_as_a_whole(before: Atoms, after: Atoms, tol: float = 1e-6) -> bool:
    """Whether ``after`` is ``before`` moved by one vector, each atom also by any lattice vector
    along the periodic axes (``atoms.translate``, ``atoms.wrap``): energy, forces and stress
    are the same. ``tol`` in Å."""
    moved = after.positions - before.positions
    relative = moved - moved[0]  # what is left once the common translation is taken out
    periodic = np.asarray(after.pbc, dtype=bool)
    if not periodic.any():
        return bool(np.abs(relative).max() <= tol)
    fractions = np.linalg.lstsq(after.cell.array.T, relative.T, rcond=None)[0].T  # (n, 3)
    lattice = np.zeros_like(fractions)
    lattice[:, periodic] = np.round(fractions[:, periodic])  # whole lattice vectors, periodic axes
    return bool(np.abs(relative - lattice @ after.cell.array).max() <= tol)


def _as_float_array(value, where: str, what: str) -> np.ndarray:
    """A label as a float64 array; a label that is not numeric is reported, not raised raw."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MissingLabelError(f"{where}: {what} label {value!r:.60} is not numeric") from exc


def _label(atoms, results, key, defaults, where, what, required=True):
    return _named_label(atoms, results, key, defaults, where, what, required)[1]


def _named_label(atoms, results, key, defaults, where, what, required=True) -> tuple[str | None, object]:
    """The first of ``key`` (or else ``defaults``) the frame has, as ``(name, value)``."""
    names = (key,) if key else defaults
    for name in names:
        if name in results and results[name] is not None:
            return name, results[name]
        if name in atoms.info:
            return name, atoms.info[name]
        if name in atoms.arrays:
            return name, atoms.arrays[name]
    if required and what != "energy":
        hint = _key_hint(atoms, what)
        if not hint and what == "forces":
            hint = "; frames without forces train on their energies with --allow-missing-forces"
        raise MissingLabelError(f"{where}: no {what} (looked for {', '.join(names)}){hint}")
    return None, None


def _key_hint(atoms: Atoms, what: str) -> str:
    """``"; this frame has ... : pass --energy-key NAME"`` when keys of a likely name exist.

    Training files often keep labels under their own names (``REF_energy``, ``DFT_forces``):
    numbers in ``atoms.info`` for the energy, (n_atoms, 3) arrays for the forces.
    """
    stem = "force" if what == "forces" else what
    if what == "energy":
        found = [k for k, v in atoms.info.items() if stem in k.lower() and np.ndim(v) == 0]
    else:
        found = [
            k
            for k, v in {**atoms.info, **atoms.arrays}.items()
            if stem in k.lower() and np.size(v) == 3 * len(atoms)
        ]
    if not found:
        return ""
    return f"; the frame has {', '.join(sorted(found))}: pass --{what}-key NAME ({what}_key= in Python)"


def _stress_from_virial(atoms: Atoms, results: dict, key: str, where: str) -> np.ndarray | None:
    """Stress (3, 3) eV/Å³ from a virial label (eV): -virial / volume, MACE's convention."""
    virial = _label(atoms, results, key, (key,), where, "virial", required=False)
    if virial is None or not has_cell_volume(atoms):  # like a missing stress: energy and forces only
        return None
    matrix = _stress_matrix(_as_float_array(virial, where, "virial"), where)
    return -matrix / atoms.cell.volume


def _stress_matrix(stress: np.ndarray, where: str) -> np.ndarray:
    if stress.shape == (3, 3):
        return stress
    if stress.size == 6:
        xx, yy, zz, yz, xz, xy = stress.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if stress.size == 9:
        return stress.reshape(3, 3)
    raise MissingLabelError(f"{where}: stress has shape {stress.shape}; expected 6 (Voigt) or 3x3")
