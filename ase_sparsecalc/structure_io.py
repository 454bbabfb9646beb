"""Reading and writing single structures, with errors that name the file.

:func:`read_structure` wraps :func:`ase.io.read` so that a missing or unreadable file raises
:class:`~ase_sparsecalc.errors.DataFileError` with the file name, never a bare ``OSError`` or a
parser traceback. :func:`write_structure` writes through a temporary file and a rename, so a
reader never sees half a file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from ase import Atoms
from ase.io.formats import UnknownFileTypeError, filetype, ioformats

from .errors import DataFileError, StructureError

REFERENCE_PREFIXES = ("ref_", "dft_", "ref", "dft")
"""How training files name their DFT labels when other values (model predictions, say) sit under
``energy`` and ``forces``: ``REF_energy`` (MACE's convention), ``DFT_forces``, ``dft_energy``."""


def reference_label_keys(atoms: Atoms) -> tuple[str, ...]:
    """Keys of ``atoms.info`` / ``atoms.arrays`` named as reference energies, forces, stresses
    or virials (:data:`REFERENCE_PREFIXES`), sorted."""
    found = []
    for key in (*atoms.info, *atoms.arrays):
        lowered = key.lower()
        for prefix in REFERENCE_PREFIXES:
            rest = lowered.removeprefix(prefix)
            if rest != lowered and rest.startswith(("energy", "force", "stress", "virial")):
                found.append(key)
                break
    return tuple(sorted(set(found)))


LABEL_NAMES = ("energy", "free_energy", "forces", "stress", "virial")
"""Labels kept under their plain names in ``atoms.info`` / ``atoms.arrays`` (where ASE's
readers have not turned them into calculator results)."""


def drop_input_labels(atoms: Atoms) -> list[str]:
    """Remove reference labels from ``atoms.info`` and ``atoms.arrays`` in place; return their names.

    The labels are those of :func:`reference_label_keys` (``REF_energy``, ``DFT_forces``, ...)
    and :data:`LABEL_NAMES`. A structure that a relaxation or MD run moves keeps its other
    metadata (``config_type``, ``charge``, ``spin``, ...), but labels computed for the input
    geometry would be written beside the new positions, and read back as that structure's labels.
    """
    plain = [key for key in (*atoms.info, *atoms.arrays) if key.lower() in LABEL_NAMES]
    dropped = sorted({*reference_label_keys(atoms), *plain})
    for key in dropped:
        atoms.info.pop(key, None)
        atoms.arrays.pop(key, None)
    return dropped


def read_structure(path: str | Path, index: int = -1) -> Atoms:
    """Read one structure from any file :func:`ase.io.read` understands.

    Parameters
    ----------
    path : str or Path
        Structure or trajectory file (extxyz, cif, POSCAR, .traj, ...).
    index : int
        Which frame of a multi-frame file (default: the last one).

    Returns
    -------
    ase.Atoms
        The structure, with its calculator (if any) detached.

    Raises
    ------
    DataFileError
        The file does not exist, is not a structure file ASE can parse, or has no frame
        ``index``.
    """
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    if path.is_dir():
        raise DataFileError(f"{path}: is a folder, expected a structure file")
    if index < -1:  # some ASE readers return a frame for a negative index beyond the start
        _check_frame_exists(path, index)
    try:
        atoms = read(path, index=index, do_not_split_by_at_sign=True)
    except IndexError as exc:
        if index in (0, -1):  # every file has these frames: the parser ran off the end of its text
            raise DataFileError(
                f"{path}: ASE could not parse it (IndexError: {exc}); is the file truncated or malformed?"
            ) from exc
        _check_frame_exists(path, index)
        raise DataFileError(f"{path}: has no frame {index} ({exc}); choose another --index") from exc
    except StopIteration as exc:
        if index not in (0, -1):
            _check_frame_exists(path, index)
            raise DataFileError(f"{path}: has no frame {index}; choose another --index") from exc
        raise DataFileError(f"{path}: holds no structure (empty file?)") from exc
    except UnknownFileTypeError as exc:
        raise DataFileError(
            f"{path}: not a structure file that ASE can read ({exc}); "
            "use a format ase.io.read knows (extxyz, cif, POSCAR, .traj, ...)"
        ) from exc
    except Exception as exc:  # ASE's parsers raise anything from ValueError to KeyError
        layout = xyz_layout_problem(path) if guessed_format(path) in ("extxyz", "xyz") else None
        if layout:
            raise DataFileError(f"{path}: {layout}") from exc
        raise DataFileError(f"{path}: cannot be read as a structure ({type(exc).__name__}: {exc})") from exc
    if not isinstance(atoms, Atoms):
        raise DataFileError(f"{path}: index {index} gave {type(atoms).__name__}, expected one structure")
    if len(atoms) == 0:
        raise StructureError(f"{path} (frame {index}): the structure has no atoms")
    atoms.calc = None
    return atoms


def _check_frame_exists(path: Path, index: int) -> None:
    """Raise :class:`DataFileError` saying how many frames ``path`` has if ``index`` is not one
    of them; return quietly where the file cannot be counted (the caller's error then stands)."""
    total = count_frames(path)
    if total and not -total <= index < total:
        raise DataFileError(f"{path}: has no frame {index}{frame_range(total)}; choose another --index")


def count_frames(path: Path, file_format: str | None = None) -> int:
    """Number of frames in a file ASE reads (0 where it cannot)."""
    from ase.io import read

    try:
        return len(read(str(path), index=":", format=file_format, do_not_split_by_at_sign=True))
    except Exception:
        return 0


def frame_range(total: int) -> str:
    """`` (it has 3: 0 to 2, or -3 to -1)``: the frame indices of a file of ``total`` frames."""
    return f" (it has {total}: 0 to {total - 1}, or -{total} to -1)" if total else ""


def output_format(path: str | Path) -> str:
    """The ASE format name that a file name implies, checked to be writable.

    Raises
    ------
    DataFileError
        The extension is unknown to ASE or ASE cannot write that format.
    """
    path = Path(path)
    try:
        fmt = filetype(path, read=False)
        io = ioformats[fmt]
    except (UnknownFileTypeError, KeyError) as exc:
        raise DataFileError(
            f"{path}: unknown structure format; use an extension ASE writes, e.g. .extxyz, .traj, .cif"
        ) from exc
    if not io.can_write:
        raise DataFileError(f"{path}: ASE cannot write the {fmt!r} format; use .extxyz or .traj")
    return fmt


def write_structure(path: str | Path, images: Atoms | Sequence[Atoms], format: str | None = None) -> Path:
    """Write one structure (or several) atomically: into a temporary file, then rename.

    Parameters
    ----------
    path : str or Path
        Target file; its extension chooses the format unless ``format`` is given.
    images : ase.Atoms or sequence of ase.Atoms
        What to write. Calculator results attached to the atoms are written where the format
        has room for them (extxyz, traj).
    format : str, optional
        ASE format name.

    Returns
    -------
    Path
        The path written.
    """
    from ase.io import write

    path = Path(path)
    fmt = format or output_format(path)
    if not isinstance(images, Atoms) and len(images) > 1 and ioformats[fmt].single:
        raise DataFileError(f"{path}: the {fmt!r} format holds one structure, got {len(images)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        write(tmp, images, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def guessed_format(path: Path) -> str | None:
    """The format ASE guesses from the file's name and content, or None."""
    try:
        return filetype(str(path))
    except Exception:  # ASE raises its own errors for names and contents it cannot place
        return None


def xyz_layout_problem(path: Path) -> str | None:
    """Where an (ext)xyz file's frames stop following their atom counts, or None.

    Each frame is a line with the number of atoms N, a comment line and N atom lines. ASE
    reports a count line it cannot read without saying where; this finds it.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    line, frame, previous = 0, 0, None
    while line < len(lines):
        if not lines[line].strip() and not any(rest.strip() for rest in lines[line:]):
            return None  # blank lines at the end
        try:
            n_atoms = int(lines[line])
        except ValueError:
            after = (
                f"; frame {frame - 1} (from line {previous + 1}) has more or fewer atom lines than "
                "its count says"
                if previous is not None
                else ""
            )
            text = lines[line][:40]
            return f"line {line + 1} should hold the number of atoms of frame {frame}, not {text!r}{after}"
        if line + 2 + n_atoms > len(lines):
            return (
                f"frame {frame} (line {line + 1}) counts {n_atoms} atoms, but the file ends after "
                f"{max(0, len(lines) - line - 2)} atom lines"
            )
        previous, line, frame = line, line + 2 + n_atoms, frame + 1
    return None
