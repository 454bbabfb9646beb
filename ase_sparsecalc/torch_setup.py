"""Torch set-up shared by the whole package: safe-load globals, dtype and device resolution.

e3nn 0.4.4 loads a constants file with ``torch.load(weights_only=True)`` that holds ``slice``
objects; under torch >= 2.6 that needs ``slice`` on torch's allow-list before e3nn (and hence
mace or sevenn) is imported. :func:`prepare_torch` does exactly that and nothing more: it never
turns ``weights_only`` off.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from types import ModuleType

import torch

from .errors import ConfigError

_PREPARED = False

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
}


def prepare_torch() -> None:
    """Allow-list ``slice`` for ``torch.load(weights_only=True)``; idempotent."""
    global _PREPARED
    if not _PREPARED:
        torch.serialization.add_safe_globals([slice])
        _PREPARED = True


_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def import_keeping_weights_only(module_name: str) -> ModuleType:
    """Import ``module_name`` (mace or a submodule) without letting it turn weights_only off.

    mace-torch sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` when imported, which makes every later
    ``torch.load`` in the process unpickle arbitrary objects. This import restores the variable
    to what it was before, so the process keeps torch's safe default. What mace prints on import
    (a note that cuequivariance is not installed) goes to stderr, so that the JSON a command
    prints on stdout stays parseable.
    """
    prepare_torch()
    importlib.import_module("e3nn.o3")  # loads e3nn's constants before mace can relax torch.load
    before = os.environ.get(_NO_WEIGHTS_ONLY)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return importlib.import_module(module_name)
    finally:
        if before is None:
            os.environ.pop(_NO_WEIGHTS_ONLY, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY] = before


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"float64"`` (or a torch dtype) into a torch floating dtype.

    Raises
    ------
    ConfigError
        (a ValueError) for anything other than float32 or float64.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The string name (``"float32"``/``"float64"``) of a torch floating dtype."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` into a torch device.

    ``"auto"`` picks CUDA when available. Asking for CUDA on a machine without it is an error,
    not a silent fallback.

    Raises
    ------
    ConfigError
        (a ValueError) for an unknown device string, or CUDA on a machine without it.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device {device!r} is not a torch device; use cpu, cuda, cuda:N or auto"
            ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r}: only cpu and cuda devices are supported")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but torch sees no CUDA device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return resolved
