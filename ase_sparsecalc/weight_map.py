"""Which tensor, layer, irrep path and element each entry of a sparse delta belongs to.

A :class:`Layout` pairs a delta with its base backend: for every tensor of the analysed
(trainable) set it holds the :class:`~ase_sparsecalc.backends.base.WeightInfo` (None for tensors
the backend does not describe, which :mod:`ase_sparsecalc.analysis` groups as ``"other"``), the
delta's flat indices and values there, and the base weights at those indices. The grouping and
statistics live in :mod:`ase_sparsecalc.analysis`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BaseModelError, ConfigError, DeltaShapeError, ModelNotFoundError

if TYPE_CHECKING:
    from .backends.base import Backend, WeightInfo
    from .delta import SparseDelta

logger = logging.getLogger(__name__)

_SAID: set[tuple[str, str]] = set()  # (delta's base, analysed base) fingerprints already warned about

OTHER = "other"
"""Group of entries in tensors without weight info."""

TRAINABLE_KEY = "trainable_tensors"
"""Hyperparameter key under which a fitting method may record the tensors it could change."""

Trainable = str | Iterable[str] | Callable[["WeightInfo"], bool] | None
"""``None``, ``"auto"``, ``"all"``, tensor names, or a predicate on a ``WeightInfo``."""


@dataclass
class TensorRecord:
    """One tensor of the analysed set: its weight info and the delta's entries in it."""

    name: str
    info: WeightInfo | None  # None: not in weight_infos -> group "other"
    numel: int
    order: int
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Δ at indices
    base: np.ndarray = field(default_factory=lambda: np.zeros(0))  # W0 at indices

    def describe(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """``l_in``, ``l_out``, ``Z`` of flat indices (-2 everywhere for "other" tensors)."""
        if self.info is None:
            minus2 = np.full(flat.shape, -2, dtype=np.int64)
            return {"l_in": minus2, "l_out": minus2, "Z": minus2}
        return {k: np.asarray(v, dtype=np.int64) for k, v in self.info.describe(flat).items()}

    def constant_label(self, dim: str) -> str:
        """Label of a dimension that is the same for every entry of the tensor."""
        info = self.info
        if dim == "tensor":
            return self.name
        if dim == "all":
            return "all"
        if info is None:
            return OTHER
        if dim == "layer":
            return str(info.layer) if info.layer is not None else info.kind
        if dim == "module":
            return info.module
        return info.kind


@dataclass
class Layout:
    """The analysed tensors of one backend for one delta."""

    backend: Backend
    records: list[TensorRecord]


def base_backend(delta: SparseDelta, backend: Backend | str | None = None) -> Backend:
    """The base model to analyse ``delta`` against.

    Parameters
    ----------
    delta : SparseDelta
    backend : Backend, str or None
        A loaded backend (returned as is), a model name or file (loaded), or None to load the
        base the delta names (``delta.metadata.base_model``), on the CPU in float64; a name or
        file is loaded through the output head the delta was fitted through, if it names one.

    Raises
    ------
    BaseModelError
        The delta names no base, or the base it names cannot be found.
    """
    from .backends import load_backend
    from .backends.base import Backend

    if isinstance(backend, Backend):
        return backend
    base = backend if backend is not None else delta.metadata.base_model
    if not base:
        raise BaseModelError(
            "the delta names no base model (metadata.base_model is empty); pass backend=... "
            "(a loaded backend, a model name or a model file), or --base on the command line"
        )
    try:
        return load_backend(base, head=delta.metadata.head)  # a multi-head base through the delta's head
    except ModelNotFoundError as exc:
        if backend is not None:  # the caller named it
            raise ModelNotFoundError(f"cannot load the base model {base!r} ({exc})") from exc
        raise ModelNotFoundError(
            f"cannot load the base model {base!r} that the delta names ({exc}); pass "
            "backend=... or --base with the model it was made for"
        ) from exc


def trainable_names(
    delta: SparseDelta, infos: Sequence[WeightInfo], trainable: Trainable, params: Iterable[str] = ()
) -> set[str]:
    """Names of the tensors whose weights count in the group totals.

    Parameters
    ----------
    delta : SparseDelta
    infos : sequence of WeightInfo
        The base backend's weight infos.
    trainable : None, "auto", "all", collection of str or callable
        None reads the delta's record (``hyperparameters["trainable_tensors"]``, which
        :func:`ase_sparsecalc.finetune` writes), else ``"auto"`` (deltas made by other tools
        or without the record). ``"auto"`` follows what :mod:`ase_sparsecalc.finetune` trains: every
        weight info except readouts (readouts too when ``hyperparameters["train_readouts"]``)
        and the kinds in ``hyperparameters["exclude_kinds"]``; every floating parameter in
        ``params`` for ``method == "full"``. ``"all"``: every
        weight info.
    params : iterable of str
        Names of the model's floating-point parameters (for ``"full"`` deltas).

    Returns
    -------
    set of str
        Always includes the tensors the delta changes.
    """
    hyper = delta.metadata.hyperparameters
    if trainable is None:
        recorded = hyper.get(TRAINABLE_KEY)
        trainable = list(recorded) if isinstance(recorded, list | tuple) else "auto"
    if trainable == "auto":
        excluded = set(hyper.get("exclude_kinds") or ())
        chosen = {
            i.name
            for i in infos
            if (not i.is_readout or hyper.get("train_readouts")) and i.kind not in excluded
        }
        if delta.metadata.method == "full":
            chosen |= {i.name for i in infos} | set(params)
    elif trainable == "all":
        chosen = {i.name for i in infos}
    elif isinstance(trainable, str):
        raise ConfigError(
            f"trainable={trainable!r}: use 'auto', 'all', a collection of tensor names or a "
            "function of a WeightInfo"
        )
    elif callable(trainable):
        chosen = {i.name for i in infos if trainable(i)}
    else:
        chosen = set(trainable)
    return chosen | set(delta.tensors)


def base_flat_parameters(backend: Backend) -> dict[str, Any]:
    """Flat base weights; entries overwritten by deltas applied to ``backend`` are restored."""
    params = {n: p.detach().reshape(-1) for n, p in backend.model.named_parameters()}
    restored: set[str] = set()
    for applied in reversed(backend.applied_deltas):  # last applied first: earliest wins
        record = applied._applied.get(backend.model)
        if record is None:
            continue
        for name, original in record.originals.items():
            if name not in restored:
                params[name] = params[name].clone()
                restored.add(name)
            params[name][applied.tensors[name].indices.to(params[name].device)] = original
    return params


def build_layout(delta: SparseDelta, backend: Backend | str | None, trainable: Trainable) -> Layout:
    """Map ``delta`` onto its base: the analysed tensors, the delta's entries and base weights.

    Raises
    ------
    BaseModelError
        No backend given and the delta's base cannot be loaded.
    DeltaMismatchError
        The delta was made for another kind of backend.
    DeltaShapeError
        A delta tensor is not a parameter of the base, or its shape differs.
    """
    backend = base_backend(delta, backend)
    with warnings.catch_warnings():  # another base's weights are said once, below, in plain words
        warnings.simplefilter("ignore")
        backend.check_delta_compatible(delta, strict=False)
    made_for = delta.metadata.base_fingerprint
    if made_for and made_for != backend.fingerprint and (made_for, backend.fingerprint) not in _SAID:
        _SAID.add((made_for, backend.fingerprint))
        logger.warning(
            "the delta was made for %r (fingerprint %s…); analysed against %r (fingerprint %s…), "
            "whose weights give the base values and the ratios |Δ|/|W0|",
            delta.metadata.base_model,
            made_for[:12],
            backend.model_name,
            backend.fingerprint[:12],
        )
    infos = backend.weight_infos()
    by_name = {i.name: i for i in infos}
    params = base_flat_parameters(backend)
    shapes = {n: tuple(p.shape) for n, p in backend.model.named_parameters()}
    floating = [n for n, p in backend.model.named_parameters() if p.is_floating_point() and p.numel()]
    names = trainable_names(delta, infos, trainable, floating)
    unknown = sorted(n for n in names if n not in params)
    if unknown:
        raise DeltaShapeError(
            f"tensors {unknown} are not parameters of base model {backend.model_name!r}; "
            "was the delta made for another base? pass the right one with backend=... / --base"
        )
    order = {i.name: k for k, i in enumerate(infos)}
    records = []
    for name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
        info = by_name.get(name)
        record = TensorRecord(name, info, int(params[name].numel()), order.get(name, len(order)))
        tdelta = delta.tensors.get(name)
        if tdelta is not None:
            expected = info.shape if info is not None else tuple(shapes[name])
            if tuple(tdelta.shape) != tuple(expected):
                raise DeltaShapeError(
                    f"delta tensor {name!r} has shape {tdelta.shape}, base model "
                    f"{backend.model_name!r} has {expected}"
                )
            record.indices = tdelta.indices.numpy()
            record.values = tdelta.values.detach().double().numpy()
            base = params[name][tdelta.indices.to(params[name].device)]
            record.base = base.detach().cpu().double().numpy()
        records.append(record)
    return Layout(backend, records)
