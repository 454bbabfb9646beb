"""Sparse weight deltas: which entries of which tensors change, and by how much.

A :class:`SparseDelta` holds, for every tensor it changes, the flat indices into
``tensor.view(-1)`` and the new-minus-old values at those indices (a sparse COO vector over the
flattened tensor), plus :class:`DeltaMetadata` saying which base model it belongs to.

Applying a delta merges it into the weights (``W[idx] = W0[idx] + values``), so a calibrated
model costs exactly as much per step as the base model. The original entries are remembered
so that :meth:`SparseDelta.remove` restores the base bit for bit.

File input and output live in :mod:`ase_sparsecalc.delta_io`; this module does no I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._version import __version__
from .errors import (
    DeltaError,
    DeltaFormatError,
    DeltaMismatchError,
    DeltaShapeError,
    DeltaStateError,
    DeltaValueError,
)
from .torch_setup import dtype_name

if TYPE_CHECKING:
    from .backends.base import Backend

FORMAT_VERSION = 1
"""Version of the delta format written by this package (see docs/delta_format.md)."""


@dataclass(frozen=True)
class TensorDelta:
    """The sparse change of one model tensor.

    Attributes
    ----------
    indices : (nnz,) int64
        Sorted, unique flat indices into ``tensor.view(-1)``.
    values : (nnz,) float
        New minus old value at each index, in the units of the weight (dimensionless).
    shape : tuple of int
        Shape of the full tensor the indices refer to.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    @classmethod
    def create(cls, indices: Any, values: Any, shape: tuple[int, ...], name: str = "?") -> TensorDelta:
        """Validate and normalise (sort, cast to int64, move to CPU) a tensor delta.

        Raises
        ------
        DeltaShapeError
            Lengths differ, indices repeat, or an index lies outside the tensor.
        DeltaValueError
            A value is NaN or infinite.
        """
        idx = torch.as_tensor(indices).detach().to("cpu", torch.int64).reshape(-1)
        val = torch.as_tensor(values).detach().to("cpu").reshape(-1)
        if not val.is_floating_point():
            raise DeltaValueError(f"tensor {name!r}: delta values must be floating point")
        shape = tuple(int(s) for s in shape)
        numel = int(np.prod(shape)) if shape else 1
        if idx.numel() != val.numel():
            raise DeltaShapeError(f"tensor {name!r}: {idx.numel()} indices but {val.numel()} values")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise DeltaShapeError(
                f"tensor {name!r}: index out of range [0, {numel}) for shape {shape} "
                f"(min {int(idx.min())}, max {int(idx.max())})"
            )
        if not bool(torch.isfinite(val).all()):
            bad = int((~torch.isfinite(val)).sum())
            raise DeltaValueError(f"tensor {name!r}: {bad} delta value(s) are NaN or inf")
        order = torch.argsort(idx)
        idx, val = idx[order], val[order]
        if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
            raise DeltaShapeError(f"tensor {name!r}: repeated indices")
        return cls(indices=idx, values=val, shape=shape)

    @property
    def nnz(self) -> int:
        """Number of changed entries."""
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        """Number of entries of the full tensor."""
        return int(np.prod(self.shape)) if self.shape else 1

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-size delta tensor, zero where nothing changes; shape ``self.shape``."""
        dense = torch.zeros(self.numel, dtype=dtype or self.values.dtype)
        dense[self.indices] = self.values.to(dense.dtype)
        return dense.view(self.shape)


@dataclass
class DeltaMetadata:
    """What a delta belongs to and how it was made; stored as JSON inside the delta file.

    Attributes
    ----------
    backend : str
        ``"mace"`` or ``"sevennet"``.
    base_model : str
        Human-readable name of the base model (a named foundation model or a file name).
    base_fingerprint : str
        SHA-256 of the base model's state dict (see :func:`backends.base.state_dict_fingerprint`).
    head : str or None
        The output head of a multi-head base model the delta was fitted through (its energy
        shifts belong to that head); None for single-head models.
    dtype : str
        dtype of the stored values, ``"float32"`` or ``"float64"``.
    energy_shifts : dict
        Per-element reference-energy shift in eV per atom, keyed by chemical symbol, added to
        the model's energy: ``E = E_model + sum_i shift[Z_i]``.
    method : str
        How the delta was made (``"sparse"``, ``"l1"``, ``"full"``, ``"elora"``, ``"shift"``,
        ``"manual"``, ...).
    hyperparameters : dict
        The options of that method.
    training_data : dict
        Summary of the training data: frames, elements, SHA-256 of the frames, files.
    trainable_numel : int or None
        Number of weights the method was allowed to change; :attr:`SparseDelta.density` is
        ``nnz / trainable_numel``.
    package_version, created : str
        ase_sparsecalc version and ISO-8601 creation time (UTC).
    format_version : int
        Delta format version.
    extra : dict
        Keys this version does not know (kept, with a warning on load).
    """

    backend: str = ""
    base_model: str = ""
    base_fingerprint: str = ""
    head: str | None = None
    dtype: str = "float32"
    energy_shifts: dict[str, float] = field(default_factory=dict)
    method: str = "manual"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    trainable_numel: int | None = None
    package_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``extra`` keys are merged back in at top level)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> tuple[DeltaMetadata, list[str]]:
        """Build metadata from a dict; returns it and the list of keys it did not know."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = sorted(k for k in data if k not in known)
        meta = cls(**kwargs, extra={k: data[k] for k in unknown})
        return meta, unknown


@dataclass
class _AppliedRecord:
    """What :meth:`SparseDelta.apply` overwrote, so that :meth:`SparseDelta.remove` can restore it."""

    originals: dict[str, torch.Tensor]
    previous_shifts: dict[int, float] | None


class SparseDelta:
    """A sparse change to a base model's weights plus per-element energy shifts.

    Parameters
    ----------
    tensors : mapping of str to TensorDelta
        Keyed by the model's state-dict names (``"interactions.0.linear.weight"``).
    metadata : DeltaMetadata, optional
        Provenance; filled with defaults when omitted.

    Examples
    --------
    >>> delta = SparseDelta.load("si_pbesol.safetensors")            # doctest: +SKIP
    >>> delta.apply(backend); ...; delta.remove(backend)              # doctest: +SKIP
    """

    def __init__(
        self, tensors: Mapping[str, TensorDelta] | None = None, metadata: DeltaMetadata | None = None
    ) -> None:
        self.tensors: dict[str, TensorDelta] = dict(sorted((tensors or {}).items()))
        self.metadata = metadata if metadata is not None else DeltaMetadata()
        self.source: str | None = None
        """The file the delta was read from (named in error messages), None if built in memory."""
        self._applied: weakref.WeakKeyDictionary[Any, _AppliedRecord] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        """Pickle and deep-copy with the record of the models the delta is applied to, so that a
        copied calculator's delta can be removed from the copied model."""
        state = self.__dict__.copy()
        state["_applied"] = list(self._applied.items())
        return state

    def __setstate__(self, state: dict) -> None:
        applied = state.pop("_applied")
        self.__dict__.update(state)
        self._applied = weakref.WeakKeyDictionary(applied)

    # ------------------------------------------------------------------ size
    @property
    def nnz(self) -> int:
        """Total number of changed weights."""
        return sum(t.nnz for t in self.tensors.values())

    @property
    def density(self) -> float:
        """``nnz`` over the number of weights the method could change (0 for an empty delta).

        Uses :attr:`DeltaMetadata.trainable_numel` when known, else the total size of the
        tensors the delta touches.
        """
        total = self.metadata.trainable_numel or sum(t.numel for t in self.tensors.values())
        return self.nnz / total if total else 0.0

    @property
    def energy_shifts(self) -> dict[str, float]:
        """Per-element energy shifts in eV/atom, keyed by chemical symbol."""
        return self.metadata.energy_shifts

    def __repr__(self) -> str:
        return (
            f"SparseDelta(base={self.metadata.base_model!r}, tensors={len(self.tensors)}, "
            f"nnz={self.nnz}, density={self.density:.4g}, method={self.metadata.method!r})"
        )

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, path: str | Path) -> SparseDelta:
        """Read a delta file (safetensors + JSON metadata, never pickle)."""
        from .delta_io import load_delta

        return load_delta(path)

    def save(self, path: str | Path) -> Path:
        """Write the delta to ``path`` atomically (temporary file, then rename)."""
        from .delta_io import save_delta

        return save_delta(self, path)

    # ------------------------------------------------------------------ apply / remove
    def apply(self, target: Backend | torch.nn.Module, *, strict: bool = True) -> None:
        """Merge the delta into the weights of ``target`` in place.

        Parameters
        ----------
        target : Backend or torch.nn.Module
            A backend (weights and energy shifts change, the base fingerprint is checked) or a
            bare module (weights only).
        strict : bool
            With a backend: refuse a delta whose base fingerprint differs (``False`` warns).

        Raises
        ------
        DeltaMismatchError
            The delta was made for another base model (backend targets, ``strict=True``).
        DeltaShapeError
            A tensor name is not a parameter of the model or its shape differs.
        """
        from .backends.base import Backend

        backend = target if isinstance(target, Backend) else None
        module = backend.model if backend is not None else target
        try:
            if module in self._applied:
                raise DeltaStateError("this delta is already applied to that model; remove it first")
            if backend is not None:
                backend.check_delta_compatible(self, strict=strict)
                check_energy_shifts(self.metadata.energy_shifts)
            params = self._matching_parameters(module)
        except DeltaError as exc:
            if self.source is None:
                raise
            raise type(exc)(f"{self.source}: {exc}") from exc
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tdelta in self.tensors.items():
                flat = params[name].view(-1)
                idx = tdelta.indices.to(flat.device)
                originals[name] = flat[idx].clone()
                flat[idx] = originals[name] + tdelta.values.to(flat.device, flat.dtype)
        previous = None
        if backend is not None:
            if backend.applied_deltas and self.metadata.energy_shifts:
                warnings.warn(
                    f"delta {self.source or '(in memory)'} is applied on top of another delta: their "
                    "weight changes and their energy shifts add up, and each was fitted against the "
                    "bare base model, not against the other",
                    stacklevel=2,
                )
            previous = backend.energy_shifts_by_number()
            backend.add_energy_shifts(self.metadata.energy_shifts)
            backend.applied_deltas.append(self)
        self._applied[module] = _AppliedRecord(originals, previous)

    @contextlib.contextmanager
    def applied(self, target: Backend | torch.nn.Module, strict: bool = True) -> Iterator[None]:
        """Apply the delta for a ``with`` block and remove it on leaving, also on an error.

        >>> with delta.applied(backend):                                # doctest: +SKIP
        ...     results = backend.evaluate(graph)
        """
        self.apply(target, strict=strict)
        try:
            yield
        finally:
            self.remove(target)

    def is_applied(self, target: Backend | torch.nn.Module) -> bool:
        """Whether this delta is applied to ``target`` (a backend or its model) now."""
        from .backends.base import Backend

        module = target.model if isinstance(target, Backend) else target
        return module in self._applied

    def remove(self, target: Backend | torch.nn.Module) -> None:
        """Undo :meth:`apply` exactly: the original entries are written back bit for bit.

        Deltas stacked on one backend must be removed last-in, first-out.
        """
        from .backends.base import Backend

        backend = target if isinstance(target, Backend) else None
        module = backend.model if backend is not None else target
        record = self._applied.get(module)
        if record is None:
            raise DeltaStateError("this delta is not applied to that model")
        if backend is not None:
            if not backend.applied_deltas or backend.applied_deltas[-1] is not self:
                raise DeltaStateError(
                    "deltas stacked on one model must be removed in reverse order of applying"
                )
            backend.applied_deltas.pop()
            backend.set_energy_shifts_by_number(record.previous_shifts or {})
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, original in record.originals.items():
                flat = params[name].view(-1)
                flat[self.tensors[name].indices.to(flat.device)] = original
        del self._applied[module]

    def _matching_parameters(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(module.named_parameters())
        for name, tdelta in self.tensors.items():
            if name not in params:
                raise DeltaShapeError(
                    f"delta tensor {name!r} is not a parameter of the model ({type(module).__name__})"
                )
            if tuple(params[name].shape) != tdelta.shape:
                raise DeltaShapeError(
                    f"delta tensor {name!r} has shape {tdelta.shape}, the model's has "
                    f"{tuple(params[name].shape)}"
                )
            if not params[name].is_contiguous():
                raise DeltaShapeError(f"model parameter {name!r} is not contiguous")
        return params

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        base: Backend | torch.nn.Module,
        tuned: Backend | torch.nn.Module,
        atol: float = 0.0,
        metadata: DeltaMetadata | None = None,
    ) -> SparseDelta:
        """The delta ``tuned - base`` over all parameters, keeping entries with ``|Δ| > atol``.

        With backends, the metadata's backend name, base name and fingerprint are filled in.
        """
        from .backends.base import Backend

        base_mod = base.model if isinstance(base, Backend) else base
        tuned_mod = tuned.model if isinstance(tuned, Backend) else tuned
        base_params = dict(base_mod.named_parameters())
        tensors: dict[str, TensorDelta] = {}
        for name, p_tuned in tuned_mod.named_parameters():
            if name not in base_params or base_params[name].shape != p_tuned.shape:
                raise DeltaShapeError(f"parameter {name!r} differs in name or shape between models")
            diff = (p_tuned.detach() - base_params[name].detach().to(p_tuned)).reshape(-1).cpu()
            idx = torch.nonzero(diff.abs() > atol).reshape(-1)
            if idx.numel():
                tensors[name] = TensorDelta.create(idx, diff[idx], tuple(p_tuned.shape), name)
        meta = metadata or DeltaMetadata(method="from_models", hyperparameters={"atol": atol})
        if isinstance(base, Backend):
            base.fill_metadata(meta)
        meta.dtype = dtype_name(next(iter(tuned_mod.parameters())).dtype)
        meta.trainable_numel = meta.trainable_numel or sum(p.numel() for p in base_params.values())
        return cls(tensors, meta)

    @classmethod
    def empty(cls, base: Backend | None = None) -> SparseDelta:
        """A delta that changes nothing (optionally bound to ``base``'s fingerprint)."""
        meta = DeltaMetadata(method="empty")
        if base is not None:
            base.fill_metadata(meta)
        return cls({}, meta)

    def pattern(self, backend: Backend | None = None, by: str | Sequence[str] = "layer", **options):
        """Where the delta concentrates, by layer unless ``by`` says otherwise; see
        :func:`ase_sparsecalc.analysis.delta_pattern`.

        Without ``backend`` the base the delta names is loaded (on the CPU; a named MACE model is
        downloaded on first use). ``options`` (``trainable``, ``as_frame``) are passed on.
        """
        from .analysis import delta_pattern

        return delta_pattern(self, backend=backend, by=by, **options)


def check_energy_shifts(shifts: Any) -> None:
    """Refuse per-element energy shifts that are not ``{chemical symbol: finite float}``.

    Raises
    ------
    DeltaFormatError
        Not a mapping, a key that is not a chemical symbol, or a value that is not a number.
    DeltaValueError
        A NaN or infinite shift.
    """
    from ase.data import atomic_numbers

    if not isinstance(shifts, Mapping):
        raise DeltaFormatError(
            f"energy_shifts must map chemical symbols to eV/atom, got {type(shifts).__name__}"
        )
    for symbol, value in shifts.items():
        if symbol not in atomic_numbers or symbol == "X":
            raise DeltaFormatError(f"energy_shifts: {symbol!r} is not a chemical symbol")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise DeltaFormatError(
                f"energy_shifts[{symbol!r}] must be a number (eV/atom), got {type(value).__name__}"
            )
        try:
            finite = math.isfinite(value)  # also for ints too large for a float (JSON allows them)
        except OverflowError:
            finite = False
        if not finite:
            raise DeltaValueError(f"energy_shifts[{symbol!r}] is {str(value)[:40]}; shifts must be finite")


def check_fingerprint(delta: SparseDelta, fingerprint: str, model_name: str, strict: bool) -> None:
    """Refuse (or, with ``strict=False``, warn about) a delta made for another base model."""
    meta = delta.metadata
    if not meta.base_fingerprint or meta.base_fingerprint == fingerprint:
        return
    message = (
        f"delta was made for base model {meta.base_model!r} (fingerprint "
        f"{meta.base_fingerprint[:12]}…), but the loaded base is {model_name!r} "
        f"(fingerprint {fingerprint[:12]}…)"
    )
    refuse_or_warn(message, strict, stacklevel=4)


def refuse_or_warn(message: str, strict: bool, stacklevel: int = 4) -> None:
    """Raise :class:`DeltaMismatchError` with ``message``, or with ``strict=False`` warn."""
    if strict:
        raise DeltaMismatchError(
            message + "; pass strict=False (--no-strict on the command line) to apply it anyway"
        )
    warnings.warn(message + "; applying anyway because strict=False", stacklevel=stacklevel)
