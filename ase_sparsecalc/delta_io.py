"""Delta files: safetensors tensors plus JSON metadata. No pickle, ever.

Layout of a delta file (format version 1):

* for every changed model tensor ``NAME`` two safetensors entries,
  ``NAME::indices`` (int64, flat indices into the tensor) and ``NAME::values`` (float32 or
  float64, new minus old);
* the safetensors header metadata holds one key, ``ase_sparsecalc``, whose value is a JSON
  object with the :class:`~ase_sparsecalc.delta.DeltaMetadata` fields plus ``format``,
  ``tensor_shapes`` (NAME -> full shape) and ``nnz``.

Files are written to a temporary name in the target folder and renamed, so a reader never sees
a half-written delta.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from .delta import FORMAT_VERSION, DeltaMetadata, SparseDelta, TensorDelta, check_energy_shifts
from .errors import DeltaError, DeltaFileError, DeltaFormatError, OutputFileError
from .file_kinds import describe_as_delta_misplaced

FORMAT_NAME = "ase_sparsecalc.delta"
METADATA_KEY = "ase_sparsecalc"
INDICES_SUFFIX = "::indices"
VALUES_SUFFIX = "::values"


def atomic_write_bytes(path: str | Path, data: bytes, check: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The data are flushed to disk before the rename, and the rename is flushed after it, so
    ``path`` holds either its previous content or all of ``data``, even if the process is killed
    or the machine loses power in between. A kill can leave a ``.NAME.*.tmp`` file behind; it
    is never read. ``check(temporary_path)``, where given, runs before the rename; an error it
    raises removes the temporary file and leaves ``path`` as it was.

    Raises
    ------
    OutputFileError
        The folder cannot be created or written (the message names the file).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputFileError(f"{path}: cannot write here ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _new_file_mode(path))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputFileError(f"{path}: writing failed ({exc.strerror or exc})") from exc
        raise
    _fsync_folder(path.parent)
    return path


def _new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would give: the old file's, else 0o666 minus the umask.

    (``tempfile.mkstemp`` creates files readable by their owner only.)
    """
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Flush a rename to disk (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_folder(path: Path) -> None:
    """Raise :class:`OutputFileError` if the output ``path`` is an existing folder."""
    if path.is_dir():
        raise OutputFileError(f"{path}: is a folder; give a file name")


def refuse_file_as_folder(path: Path) -> None:
    """Raise :class:`OutputFileError` if the output folder ``path`` (or a parent) is a file."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" {part}"
                raise OutputFileError(f"{path}:{where} is a file; give a folder for the output files")
            return


def check_writable(path: str | Path) -> Path:
    """Fail early (before hours of work) if ``path`` could not be written atomically later.

    Creates a temporary file in the folder, and the folder if needed; both are removed again,
    so a run that fails later leaves no empty folders behind (writing creates them for real).

    Raises
    ------
    OutputFileError
        Naming the file and the reason.
    """
    path = Path(path)
    refuse_folder(path)
    blocking = next((part for part in path.parents if part.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputFileError(f"{path}: {blocking} is a file, not a folder")
    missing = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputFileError(f"{path}: cannot write here ({exc.strerror or exc})") from exc
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return path


def overwritten_input(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> str | None:
    """The name of the input file (``(name, path)`` pairs) that writing ``output`` would replace:
    the same file under any path or link; None if it is none of them (or does not exist yet)."""
    output = Path(output)
    if not output.is_file():
        return None
    for name, path in inputs:
        if path is not None and Path(path).is_file() and os.path.samefile(path, output):
            return name
    return None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_delta(delta: SparseDelta, path: str | Path) -> Path:
    """Write ``delta`` to ``path`` (safetensors + JSON metadata), atomically.

    Returns
    -------
    Path
        The path written.
    """
    import torch
    from safetensors.torch import save

    tensors = {}
    for name, tdelta in delta.tensors.items():
        if tdelta.values.dtype not in (torch.float32, torch.float64):
            raise DeltaFormatError(
                f"{path}: tensor {name!r} has {tdelta.values.dtype} values; cast them to float32 or "
                "float64 before saving"
            )
        tensors[name + INDICES_SUFFIX] = tdelta.indices.to(torch.int64).contiguous()
        tensors[name + VALUES_SUFFIX] = tdelta.values.contiguous()
    header = delta.metadata.to_dict()
    header["format"] = FORMAT_NAME
    header["format_version"] = FORMAT_VERSION
    header["tensor_shapes"] = {name: list(t.shape) for name, t in delta.tensors.items()}
    header["nnz"] = delta.nnz
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    return atomic_write_bytes(path, blob)


def load_delta(path: str | Path) -> SparseDelta:
    """Read a delta file written by :func:`save_delta`.

    Raises
    ------
    DeltaFileError
        The file is missing, unreadable, truncated or not a safetensors file (a pickle renamed
        to ``.safetensors`` lands here, and nothing in it is executed).
    DeltaFormatError
        The metadata is missing or malformed, or the format version is unknown.
    DeltaShapeError, DeltaValueError
        Indices out of range, mismatched lengths, NaN or inf values.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise DeltaFileError(f"{path}: is a folder, not a delta file")
    if not path.is_file():
        raise DeltaFileError(f"{path}: delta file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw_meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except OSError as exc:
        raise DeltaFileError(f"{path}: cannot read delta file ({exc})") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        kind = describe_as_delta_misplaced(path)
        problem = kind or f" (truncated or corrupt?): {exc}"
        raise DeltaFileError(f"{path}: not a valid safetensors delta file{problem}") from exc
    header = _parse_header(path, raw_meta)
    shapes = header.pop("tensor_shapes")
    header.pop("format", None)
    stored_nnz = header.pop("nnz", None)
    metadata, unknown = DeltaMetadata.from_dict(header)
    if unknown:
        warnings.warn(f"{path}: unknown metadata keys kept as extra: {unknown}", stacklevel=2)
    delta = SparseDelta(_tensor_deltas(path, tensors, shapes), metadata)
    if stored_nnz is not None and (type(stored_nnz) is not int or stored_nnz != delta.nnz):
        raise DeltaFormatError(
            f"{path}: metadata says {stored_nnz!r:.40} changed entries but the tensors hold "
            f"{delta.nnz}; the file was edited or damaged"
        )
    delta.source = str(path)
    return delta


def _parse_header(path: Path, raw_meta: dict[str, str]) -> dict:
    if METADATA_KEY not in raw_meta:
        raise DeltaFormatError(f"{path}: safetensors file without ase_sparsecalc metadata")
    try:
        header = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise DeltaFormatError(f"{path}: delta metadata is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise DeltaFormatError(f"{path}: delta metadata is nested too deeply to read") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise DeltaFormatError(f"{path}: metadata does not describe an {FORMAT_NAME} file")
    version = header.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not true, not 1.0
        raise DeltaFormatError(
            f"{path}: delta format version {version!r} is not supported by this version of "
            f"ase_sparsecalc (reads version {FORMAT_VERSION}); upgrade ase_sparsecalc"
        )
    if not isinstance(header.get("tensor_shapes"), dict):
        raise DeltaFormatError(f"{path}: metadata lacks 'tensor_shapes'")
    for name, shape in header["tensor_shapes"].items():
        _check_shape(path, name, shape)
    _check_field_types(path, header)
    return header


# metadata fields and the JSON types they must have (None allowed where listed)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "backend": (str,),
    "base_model": (str,),
    "base_fingerprint": (str,),
    "head": (str, type(None)),
    "dtype": (str,),
    "method": (str,),
    "package_version": (str,),
    "created": (str,),
    "hyperparameters": (dict,),
    "training_data": (dict,),
    "trainable_numel": (int, type(None)),
}


_NAME_LISTS = (
    ("training_data", "elements"),
    ("hyperparameters", "exclude_kinds"),
    ("hyperparameters", "dense_kinds"),
    ("hyperparameters", "trainable_tensors"),
)
"""Nested metadata fields that the calculator and ``inspect`` read as lists of strings."""


def _check_field_types(path: Path, header: dict) -> None:
    for key, types in _FIELD_TYPES.items():
        if key in header and (isinstance(header[key], bool) or not isinstance(header[key], types)):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise DeltaFormatError(
                f"{path}: metadata field {key!r} must be {allowed}, got {type(header[key]).__name__}"
            )
    if (header.get("trainable_numel") or 0) < 0:
        raise DeltaFormatError(f"{path}: metadata field 'trainable_numel' is negative")
    for section, key in _NAME_LISTS:
        value = header.get(section, {}).get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DeltaFormatError(
                f"{path}: metadata field {section}.{key} must be a list of names, got {value!r:.60}"
            )
    try:
        check_energy_shifts(header.get("energy_shifts", {}))
    except DeltaError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def _check_shape(path: Path, name: str, shape) -> None:
    """A tensor shape must be a list of non-negative ints whose product fits in int64."""
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise DeltaFormatError(
            f"{path}: tensor {name!r} has shape {shape!r}; expected a list of non-negative integers"
        )
    if math.prod(shape) >= 2**63:
        raise DeltaFormatError(f"{path}: tensor {name!r} has shape {shape}, too large to index")


def _tensor_deltas(path: Path, tensors: dict, shapes: dict) -> dict[str, TensorDelta]:
    import torch

    stray = sorted(key for key in tensors if not key.endswith((INDICES_SUFFIX, VALUES_SUFFIX)))
    if stray:
        raise DeltaFormatError(
            f"{path}: entries {stray[:5]} are neither NAME{INDICES_SUFFIX} nor NAME{VALUES_SUFFIX}"
        )
    names = {key.rsplit("::", 1)[0] for key in tensors}
    if names != set(shapes):
        raise DeltaFormatError(
            f"{path}: tensors {sorted(names ^ set(shapes))} lack either data or a shape entry"
        )
    out = {}
    for name in sorted(names):
        try:
            indices, values = tensors[name + INDICES_SUFFIX], tensors[name + VALUES_SUFFIX]
        except KeyError as exc:
            raise DeltaFormatError(f"{path}: tensor {name!r} lacks {exc.args[0]!r}") from exc
        if indices.dtype != torch.int64:
            raise DeltaFormatError(
                f"{path}: tensor {name!r} has {indices.dtype} indices; delta files store int64"
            )
        if values.dtype not in (torch.float32, torch.float64):
            raise DeltaFormatError(
                f"{path}: tensor {name!r} has {values.dtype} values; delta files store float32 or float64"
            )
        if indices.dim() != 1 or values.dim() != 1:
            raise DeltaFormatError(
                f"{path}: tensor {name!r} has indices of shape {list(indices.shape)} and values of "
                f"shape {list(values.shape)}; delta files store flat (1-D) lists"
            )
        try:
            out[name] = TensorDelta.create(indices, values, tuple(shapes[name]), name)
        except DeltaError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
    return out
