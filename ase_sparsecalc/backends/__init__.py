"""Backends: one module per foundation-model family behind :class:`~.base.Backend`.

:func:`load_backend` turns what a user writes (``"sevennet-0"``, ``"mace-mp-0-medium"``, a file
path, or nothing) into a loaded backend. Loaded bases are cached per process (keyed by file,
size and modification time); every call returns an independent copy, so calculators sharing a
base never share weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import BackendNotInstalledError, BaseModelError, ConfigError, ModelNotFoundError
from ..torch_setup import resolve_device, resolve_dtype
from . import foundation_models
from .base import Backend, ModelOutput, PathSegment, WeightInfo

if TYPE_CHECKING:
    from ..delta import SparseDelta

logger = logging.getLogger(__name__)

_CACHE: dict[tuple, Backend] = {}

__all__ = [
    "Backend",
    "ModelOutput",
    "PathSegment",
    "WeightInfo",
    "backend_kind",
    "clear_cache",
    "default_base",
    "delta_head",
    "load_backend",
    "model_file",
    "sniff_backend",
    "stored_dtype",
]


def clear_cache() -> None:
    """Forget the models :func:`load_backend` keeps for later calls (their memory is freed once
    no backend made from them is left)."""
    _CACHE.clear()


def default_base() -> str:
    """The base used when none is given: SevenNet-0 when the sevennet extra is installed."""
    try:
        from .sevennet import import_sevenn

        import_sevenn()
    except BackendNotInstalledError as exc:
        raise BaseModelError(
            "no base model given and the default (SevenNet-0) needs the sevennet extra: "
            "pip install 'ase_sparsecalc[sevennet]', or pass base='mace-mp-0-medium' or a "
            "MACE model file"
        ) from exc
    return foundation_models.DEFAULT_SEVENNET


def sniff_backend(path: str | Path) -> str:
    """``"mace"`` or ``"sevennet"`` for a checkpoint file, from the globals it refers to."""
    from .safe_load import referenced_globals

    names = referenced_globals(path)
    if any(n.startswith("mace.") for n in names):
        return "mace"
    return "sevennet"


BACKEND_NAMES = ("mace", "sevennet")


def load_backend(
    base: str | Path | Backend | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float64",
    backend: str | None = None,
    head: str | None = None,
    cache: bool = True,
) -> Backend:
    """Load a base model as a backend that the caller owns.

    Parameters
    ----------
    base : str, Path, Backend or None
        A named foundation model (see :func:`foundation_models.named_models`), a model file,
        an already-loaded backend (copied), or None for :func:`default_base`.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    dtype : {"float32", "float64"}
    backend : {"mace", "sevennet"}, optional
        Force the backend of a model file (otherwise sniffed from the file).
    head : str, optional
        Output head of a multi-head MACE model.
    cache : bool
        Each model file is read once per process and kept (on the CPU, as loaded) for later
        calls, which get their own copy; :func:`clear_cache` lets the kept copies go.
        ``False``: read the file now and keep nothing (for a file that is about to change).
    """
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype)
    if backend is not None and backend not in BACKEND_NAMES:
        raise ConfigError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {backend!r}")
    if isinstance(base, Backend):
        loaded_head = getattr(base, "head", None)
        if head is not None and loaded_head is None:
            raise ConfigError(f"{base.model_name}: head={head!r} applies to multi-head MACE models only")
        if head is not None and head != loaded_head:
            raise ConfigError(
                f"{base.model_name}: head={head!r} asked for, but the loaded backend uses "
                f"{loaded_head!r}; load the model with head={head!r} instead"
            )
        return base.copy(device_, dtype_)
    return _as_loaded(base, backend, head, cache).copy(device_, dtype_)


def stored_dtype(
    base: str | Path | None = None, *, backend: str | None = None, head: str | None = None
) -> torch.dtype:
    """The dtype of the weights as the model file stores them (:func:`load_backend` casts)."""
    return _as_loaded(base, backend, head).dtype


def model_file(base: str | Path | None = None, *, backend: str | None = None) -> Path:
    """The file a base model is read from: the path given, or a named model's cached download."""
    return _resolve(default_base() if base is None else base, backend)[0]


def backend_kind(base: str | Path | Backend | None = None, backend: str | None = None) -> str:
    """``"mace"`` or ``"sevennet"``: the backend that a base (as :func:`load_backend` takes it)
    needs, found without loading or downloading the model."""
    if isinstance(base, Backend):
        return base.name
    base = default_base() if base is None else base
    if backend is not None or Path(base).is_file():
        return backend or sniff_backend(base)
    named = foundation_models.lookup(str(base))
    return named.backend if named is not None else _resolve(base, backend)[2]


def delta_head(
    delta: SparseDelta, base: str | Path | Backend | None, backend: str | None = None
) -> str | None:
    """The head a delta was fitted through, where ``base`` is a MACE model; else None (a delta
    made for another kind of model is then refused, with the reason, when it is applied)."""
    head = delta.metadata.head
    if head is None or backend_kind(base, backend) != "mace":
        return None
    return head


def _as_loaded(base: str | Path | None, backend: str | None, head: str | None, cache: bool = True) -> Backend:
    """The backend of a model file, on the CPU in the file's dtype: the cached one, or (first
    use, or ``cache=False``) one read now."""
    base = default_base() if base is None else base
    path, model_name, kind, default_head = _resolve(base, backend)
    head = head if head is not None else default_head
    if head is not None and kind != "mace":
        raise ConfigError(f"{model_name}: head={head!r} applies to multi-head MACE models only")
    if not cache:
        return _load(path, model_name, kind, head)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, kind, head)
    if key not in _CACHE:
        _CACHE[key] = _load(path, model_name, kind, head)
    return _CACHE[key]


def _resolve(base: str | Path, backend: str | None) -> tuple[Path, str, str, str | None]:
    """The model file, its name, its backend kind and its default head (None: the usual rule)."""
    path = Path(base)
    if path.is_file():
        found = sniff_backend(path)
        if backend == "sevennet" and found == "mace":  # not a safety problem: the wrong loader
            raise BaseModelError(f"{path}: backend='sevennet' asked for, but the file holds a MACE model")
        return path, str(path.resolve()), backend or found, None  # absolute: deltas record it
    named = foundation_models.lookup(str(base))
    if named is not None:
        return foundation_models.fetch(named), named.name, named.backend, named.head
    raise ModelNotFoundError(
        f"{base}: neither a model file nor a known model name "
        f"(known: {', '.join(foundation_models.named_models())})"
    )


def _load(path: Path, model_name: str, kind: str, head: str | None) -> Backend:
    cpu = torch.device("cpu")
    if kind == "mace":
        from .mace import load_mace_model, mace_backend_from_module

        model = load_mace_model(path)
        stored = next(model.parameters()).dtype
        return mace_backend_from_module(model, model_name, cpu, stored, head)
    if kind == "sevennet":
        from .sevennet import load_sevennet

        return load_sevennet(path, model_name, cpu, torch.float32)
    raise BaseModelError(f"unknown backend {kind!r}; choose 'mace' or 'sevennet'")
