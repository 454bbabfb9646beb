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
import os
import tempfile
import warnings
from pathlib import Path

from .delta import FORMAT_VERSION, DeltaMetadata, SparseDelta, TensorDelta
from .errors import DeltaError, DeltaFileError, DeltaFormatError

FORMAT_NAME = "ase_sparsecalc.delta"
METADATA_KEY = "ase_sparsecalc"
INDICES_SUFFIX = "::indices"
VALUES_SUFFIX = "::values"
DELTA_SUFFIX = ".safetensors"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    from safetensors.torch import save

    tensors = {}
    for name, tdelta in delta.tensors.items():
        tensors[name + INDICES_SUFFIX] = tdelta.indices.contiguous()
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
    if not path.is_file():
        raise DeltaFileError(f"{path}: delta file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw_meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except OSError as exc:
        raise DeltaFileError(f"{path}: cannot read delta file ({exc})") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
        raise DeltaFileError(
            f"{path}: not a valid safetensors delta file (truncated or corrupt?): {exc}"
        ) from exc
    header = _parse_header(path, raw_meta)
    shapes = header.pop("tensor_shapes")
    header.pop("format", None)
    header.pop("nnz", None)
    metadata, unknown = DeltaMetadata.from_dict(header)
    if unknown:
        warnings.warn(f"{path}: unknown metadata keys kept as extra: {unknown}", stacklevel=2)
    return SparseDelta(_tensor_deltas(path, tensors, shapes), metadata)


def _parse_header(path: Path, raw_meta: dict[str, str]) -> dict:
    if METADATA_KEY not in raw_meta:
        raise DeltaFormatError(f"{path}: safetensors file without ase_sparsecalc metadata")
    try:
        header = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise DeltaFormatError(f"{path}: delta metadata is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise DeltaFormatError(f"{path}: metadata does not describe an {FORMAT_NAME} file")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaFormatError(
            f"{path}: delta format version {version!r} is not supported by this version of "
            f"ase_sparsecalc (reads version {FORMAT_VERSION}); upgrade ase_sparsecalc"
        )
    if not isinstance(header.get("tensor_shapes"), dict):
        raise DeltaFormatError(f"{path}: metadata lacks 'tensor_shapes'")
    return header


def _tensor_deltas(path: Path, tensors: dict, shapes: dict) -> dict[str, TensorDelta]:
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
        try:
            out[name] = TensorDelta.create(indices, values, tuple(shapes[name]), name)
        except DeltaError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
    return out
