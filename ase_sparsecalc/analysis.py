"""Where a sparse delta changes a model: by layer, irrep ``l``, element, module kind or path.

Every entry of a delta is mapped back, through the base backend's
:meth:`~ase_sparsecalc.backends.base.Backend.weight_infos` and
:meth:`~ase_sparsecalc.backends.base.WeightInfo.describe`, to

* the tensor (state-dict name), its message-passing layer, module and kind (``embedding``,
  ``linear``, ``self_connection``, ``radial``, ``symmetric_contraction``, ``readout``);
* the irrep path ``l_in -> l_out`` it weighs (-1 where undefined: radial hidden layers have
  neither, symmetric-contraction weights have only ``l_out``);
* the element ``Z`` where the weight is element-specific (-1 where it is shared by all).

:func:`delta_pattern` then groups the entries and reports, per group, the number of changed
weights, the number of weights the method could have changed in that group (``total``), their
ratio (``density``), and the typical size of a change. Densities are per group because groups
differ in size by orders of magnitude: a thousand changed weights are 50 % of a small
``l = 3`` block but 0.1 % of the scalar channels. :func:`compare_deltas` measures how much the
non-zero sets of two deltas overlap, group by group.

Entries of tensors that have no weight info (for example scale/shift buffers registered as
parameters) form the group ``"other"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from ase.data import chemical_symbols

from .backends.base import WEIGHT_KINDS
from .errors import ConfigError, DeltaShapeError
from .weight_map import OTHER, TRAINABLE_KEY, Layout, TensorRecord, Trainable, base_backend, build_layout

if TYPE_CHECKING:
    from .backends.base import Backend
    from .delta import SparseDelta

__all__ = [
    "GROUPINGS",
    "TRAINABLE_KEY",
    "base_backend",
    "compare_deltas",
    "delta_entries",
    "delta_pattern",
    "delta_summary",
    "l_label",
    "pattern_tables",
]

GROUPINGS = ("all", "tensor", "layer", "module", "kind", "l", "path", "element")
"""What :func:`delta_pattern` can group by (one of these, or a sequence of them)."""

L_LETTERS = "spdfghi"
"""Spectroscopic letter of each angular momentum l = 0, 1, 2, ..."""

UNDEFINED = "n/a"
SHARED = "shared"


def l_label(l_value: int) -> str:
    """``0 -> "s"``, ``1 -> "p"``, ...; ``-1 -> "n/a"`` (no irrep, e.g. radial hidden layers)."""
    if l_value < 0:
        return UNDEFINED
    return L_LETTERS[l_value] if l_value < len(L_LETTERS) else f"l={l_value}"


# --------------------------------------------------------------------------- entries
def delta_entries(
    delta: SparseDelta,
    backend: Backend | str | None = None,
    *,
    as_frame: bool = False,
):
    """Every changed entry of ``delta`` with what it weighs.

    Parameters
    ----------
    delta : SparseDelta
    backend : Backend, str or None
        The base the delta belongs to (a loaded backend, a model name or file); None loads
        ``delta.metadata.base_model``.
    as_frame : bool
        Return a pandas DataFrame instead of a list of dicts.

    Returns
    -------
    list of dict or pandas.DataFrame
        One row per changed weight: ``tensor``, ``index`` (flat), ``layer`` (None for the
        embedding and SevenNet's readout), ``module``, ``kind``, ``l_in``, ``l_out``, ``Z``
        (-1 where undefined or shared; -2 in tensors without weight info, whose module and
        kind are ``"other"``), ``element`` (symbol or None), ``radial`` (bool), ``delta`` and
        ``base`` (weight before the change; dimensionless).
    """
    layout = build_layout(delta, backend, trainable="all")
    rows = []
    for rec in layout.records:
        if not rec.indices.size:
            continue
        desc = rec.describe(rec.indices)
        info = rec.info
        for k, idx in enumerate(rec.indices):
            z = int(desc["Z"][k])
            rows.append(
                {
                    "tensor": rec.name,
                    "index": int(idx),
                    "layer": info.layer if info is not None else None,
                    "module": info.module if info is not None else OTHER,
                    "kind": info.kind if info is not None else OTHER,
                    "l_in": int(desc["l_in"][k]),
                    "l_out": int(desc["l_out"][k]),
                    "Z": z,
                    "element": chemical_symbols[z] if z > 0 else None,
                    "radial": bool(info is not None and info.is_radial),
                    "delta": float(rec.values[k]),
                    "base": float(rec.base[k]),
                }
            )
    return _maybe_frame(rows, as_frame)


# --------------------------------------------------------------------------- grouping
def _dims(by: str | Sequence[str]) -> tuple[str, ...]:
    dims = (by,) if isinstance(by, str) else tuple(by)
    bad = [d for d in dims if d not in GROUPINGS]
    if not dims or bad:
        raise ConfigError(f"by={by!r}: group by one or more of {', '.join(GROUPINGS)}")
    return dims


def _keys(rec: TensorRecord, flat: np.ndarray, dims: tuple[str, ...]) -> tuple[list[tuple], np.ndarray]:
    """Group keys of ``flat`` entries: the distinct keys and, per entry, which one it has."""
    desc = rec.describe(flat) if any(d in ("l", "path", "element") for d in dims) else None
    columns = []
    for d in dims:
        if d == "l":
            columns.append(desc["l_out"])
        elif d == "path":
            columns.extend([desc["l_in"], desc["l_out"]])
        elif d == "element":
            columns.append(desc["Z"])
    if not columns:
        key = tuple(rec.constant_label(d) for d in dims)
        return [key], np.zeros(flat.shape, dtype=np.int64)
    matrix = np.stack(columns, axis=1)
    unique, inverse = np.unique(matrix, axis=0, return_inverse=True)
    keys = []
    for row in unique:
        values, col = [], 0
        for d in dims:
            if d == "l":
                values.append(int(row[col]))
                col += 1
            elif d == "path":
                values.append((int(row[col]), int(row[col + 1])))
                col += 2
            elif d == "element":
                values.append(int(row[col]))
                col += 1
            else:
                values.append(rec.constant_label(d))
        keys.append(tuple(values))
    return keys, inverse.reshape(-1)


def _label(dim: str, value: Any) -> str:
    if dim == "l":
        return OTHER if value == -2 else l_label(value)
    if dim == "path":
        l_in, l_out = value
        if l_out == -2:
            return OTHER
        return UNDEFINED if l_in < 0 and l_out < 0 else f"{l_label(l_in)}->{l_label(l_out)}"
    if dim == "element":
        return OTHER if value == -2 else (SHARED if value < 0 else chemical_symbols[value])
    return str(value)


def _sort_key(dim: str, value: Any, first_seen: dict) -> tuple:
    big = 10_000
    if dim == "l":
        return (value if value >= 0 else big - value,)
    if dim == "path":
        return tuple(v if v >= 0 else big - v for v in value)
    if dim == "element":
        return (value if value >= 0 else big - value,)
    if dim == "kind":
        return (WEIGHT_KINDS.index(value) if value in WEIGHT_KINDS else big, value)
    if dim == "layer":
        if value.isdigit():
            return (1, int(value))
        return ({"embedding": 0, "readout": 2}.get(value, 3), value)
    return (first_seen.get((dim, value), big), value)


@dataclass
class _Stats:
    nnz: int = 0
    total: int = 0
    sum_abs_delta: float = 0.0
    sum_abs_base: float = 0.0


def _accumulate(layout: Layout, dims: tuple[str, ...]) -> tuple[dict[tuple, _Stats], dict]:
    stats: dict[tuple, _Stats] = {}
    first_seen: dict = {}
    for rec in layout.records:
        keys, inverse = _keys(rec, np.arange(rec.numel, dtype=np.int64), dims)
        counts = np.bincount(inverse, minlength=len(keys))
        for key, count in zip(keys, counts, strict=True):
            stats.setdefault(key, _Stats()).total += int(count)
            for d, v in zip(dims, key, strict=True):
                first_seen.setdefault((d, v), rec.order)
        if rec.indices.size:
            keys, inverse = _keys(rec, rec.indices, dims)
            nnz = np.bincount(inverse, minlength=len(keys))
            sum_d = np.bincount(inverse, weights=np.abs(rec.values), minlength=len(keys))
            sum_b = np.bincount(inverse, weights=np.abs(rec.base), minlength=len(keys))
            for j, key in enumerate(keys):
                s = stats[key]
                s.nnz += int(nnz[j])
                s.sum_abs_delta += float(sum_d[j])
                s.sum_abs_base += float(sum_b[j])
    return stats, first_seen


def _sorted_keys(keys: Iterable[tuple], dims: tuple[str, ...], first_seen: dict) -> list[tuple]:
    return sorted(
        keys, key=lambda key: tuple(_sort_key(d, v, first_seen) for d, v in zip(dims, key, strict=True))
    )


def _group_fields(key: tuple, dims: tuple[str, ...]) -> dict[str, Any]:
    labels = [_label(d, v) for d, v in zip(dims, key, strict=True)]
    out: dict[str, Any] = {"group": " / ".join(labels)}
    out.update(zip(dims, labels, strict=True))
    return out


def _maybe_frame(rows: list[dict], as_frame: bool):
    if not as_frame:
        return rows
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("as_frame=True needs pandas: pip install pandas") from exc
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- public API
def pattern_tables(
    delta: SparseDelta,
    backend: Backend | str | None = None,
    by: Sequence[str | Sequence[str]] = ("layer", "l", "element", "kind"),
    *,
    trainable: Trainable = None,
) -> dict[str, list[dict[str, Any]]]:
    """Several :func:`delta_pattern` tables from one pass over the model's weights.

    Returns
    -------
    dict
        Keyed by the grouping (``"layer"``, or ``"layer,l"`` for a combined one), values as
        returned by :func:`delta_pattern`.
    """
    layout = build_layout(delta, backend, trainable)
    return {
        (g if isinstance(g, str) else ",".join(g)): _pattern_rows(layout, _dims(g), delta.nnz) for g in by
    }


def _pattern_rows(layout: Layout, dims: tuple[str, ...], delta_nnz: int) -> list[dict[str, Any]]:
    stats, first_seen = _accumulate(layout, dims)
    rows = []
    for key in _sorted_keys(stats, dims, first_seen):
        s = stats[key]
        row = _group_fields(key, dims)
        row.update(
            nnz=s.nnz,
            total=s.total,
            density=s.nnz / s.total if s.total else 0.0,
            share=s.nnz / delta_nnz if delta_nnz else 0.0,
            mean_abs_delta=s.sum_abs_delta / s.nnz if s.nnz else None,
            rel_mean_abs_delta=s.sum_abs_delta / s.sum_abs_base if s.nnz and s.sum_abs_base > 0 else None,
        )
        rows.append(row)
    return rows


def delta_pattern(
    delta: SparseDelta,
    backend: Backend | str | None = None,
    by: str | Sequence[str] = "layer",
    *,
    trainable: Trainable = None,
    as_frame: bool = False,
):
    """Where a delta concentrates: changed weights per layer, irrep ``l``, element, kind, ...

    Parameters
    ----------
    delta : SparseDelta
    backend : Backend, str or None
        The base model the delta belongs to (loaded backend, model name or file). None loads
        ``delta.metadata.base_model`` (on the CPU, float64).
    by : str or sequence of str
        ``"layer"`` (message-passing layer; the element embedding and layer-less readouts are
        their own groups), ``"l"`` (output irrep: ``s``, ``p``, ``d``, ``f``; ``n/a`` for
        radial hidden layers), ``"path"`` (``"l_in->l_out"``, e.g. ``"p->d"``;
        symmetric-contraction weights are ``"n/a->l_out"``), ``"element"`` (chemical symbol for
        element-specific weights, ``"shared"`` for the others), ``"kind"``, ``"module"``,
        ``"tensor"`` or ``"all"``. A sequence groups by all of them at once
        (``("layer", "l")`` gives one row per layer and ``l``).
    trainable : None, "auto", "all", collection of str or callable
        The weights the method could change, which set each group's ``total``. None uses the
        tensor list the delta records under ``hyperparameters["trainable_tensors"]`` if any,
        else ``"auto"``: what :mod:`ase_sparsecalc.finetune` trains (every weight of
        ``backend.weight_infos()`` except readouts, readouts too when the delta's
        hyperparameters say ``train_readouts``, every parameter for ``method == "full"``).
        ``"all"`` is every weight info; a callable receives each ``WeightInfo``. Tensors the
        delta changes are always included. See :func:`ase_sparsecalc.weight_map.trainable_names`.
    as_frame : bool
        Return a pandas DataFrame (pandas is imported only then).

    Returns
    -------
    list of dict or pandas.DataFrame
        One row per group, in a natural order (layers ascending, ``s p d f``, elements by
        ``Z``), with the grouping labels (``"group"`` joins them), and

        * ``nnz``: changed weights in the group;
        * ``total``: weights of the trainable set in the group;
        * ``density``: ``nnz / total``;
        * ``share``: ``nnz`` over the delta's non-zeros;
        * ``mean_abs_delta``: mean ``|Δ|`` over the changed weights (None when ``nnz == 0``);
        * ``rel_mean_abs_delta``: ``mean |Δ| / mean |W0|`` over the changed weights, with
          ``W0`` the base weights (a ratio of means: an entry-wise ratio would be dominated by
          the few base weights that happen to lie near zero).

        Entries of tensors without weight info form the group ``"other"``.

    Raises
    ------
    BaseModelError
        No backend given and the delta's base cannot be loaded.
    DeltaShapeError
        The delta's tensors are not parameters of the base, or their shapes differ.
    """
    layout = build_layout(delta, backend, trainable)
    return _maybe_frame(_pattern_rows(layout, _dims(by), delta.nnz), as_frame)


def compare_deltas(
    a: SparseDelta,
    b: SparseDelta,
    backend: Backend | str | None = None,
    by: str | Sequence[str] = "layer",
    *,
    as_frame: bool = False,
):
    """Overlap of the non-zero sets of two deltas on the same base, per group and overall.

    Parameters
    ----------
    a, b : SparseDelta
        Deltas for the same base architecture (tensor names and shapes must agree).
    backend : Backend, str or None
        The base model; None loads ``a.metadata.base_model``.
    by : str or sequence of str
        As in :func:`delta_pattern`.
    as_frame : bool
        Return a pandas DataFrame.

    Returns
    -------
    list of dict or pandas.DataFrame
        Per group (only groups where either delta has entries), then a final row with
        ``group == "all"``: ``n_a`` (``|A|``), ``n_b`` (``|B|``), ``n_both`` (``|A ∩ B|``),
        ``n_either`` (``|A ∪ B|``), ``jaccard`` (``|A ∩ B| / |A ∪ B|``), and
        ``sign_agreement``: the fraction of shared entries that both deltas move in the same
        direction (None without shared entries).
    """
    dims = _dims(by)
    backend = base_backend(a, backend)
    _check_same_shapes(a, b)
    la = build_layout(a, backend, trainable=list(a.tensors) + list(b.tensors))
    lb = build_layout(b, backend, trainable=list(a.tensors) + list(b.tensors))
    counts: dict[tuple, np.ndarray] = {}  # n_a, n_b, n_both, n_same_sign
    first_seen: dict = {}
    for ra, rb in zip(la.records, lb.records, strict=True):
        both, ia, ib = np.intersect1d(ra.indices, rb.indices, assume_unique=True, return_indices=True)
        same = (np.sign(ra.values[ia]) == np.sign(rb.values[ib])).astype(np.float64)
        for column, flat, weights in (
            (0, ra.indices, None),
            (1, rb.indices, None),
            (2, both, None),
            (3, both, same),
        ):
            if not flat.size:
                continue
            keys, inverse = _keys(ra, flat, dims)
            sums = np.bincount(inverse, weights=weights, minlength=len(keys))
            for key, value in zip(keys, sums, strict=True):
                counts.setdefault(key, np.zeros(4))[column] += value
                for d, v in zip(dims, key, strict=True):
                    first_seen.setdefault((d, v), ra.order)
    rows = [_overlap_row(_group_fields(k, dims), counts[k]) for k in _sorted_keys(counts, dims, first_seen)]
    if dims != ("all",) or not rows:  # the overall row, also when neither delta changes a weight
        total = sum(counts.values(), np.zeros(4))
        overall = {"group": "all", **{d: "all" for d in dims}}
        rows.append(_overlap_row(overall, total))
    return _maybe_frame(rows, as_frame)


def _overlap_row(fields: dict[str, Any], c: np.ndarray) -> dict[str, Any]:
    n_a, n_b, n_both = int(c[0]), int(c[1]), int(c[2])
    either = n_a + n_b - n_both
    return {
        **fields,
        "n_a": n_a,
        "n_b": n_b,
        "n_both": n_both,
        "n_either": either,
        "jaccard": n_both / either if either else None,
        "sign_agreement": float(c[3]) / n_both if n_both else None,
    }


def _check_same_shapes(a: SparseDelta, b: SparseDelta) -> None:
    kinds = (a.metadata.backend, b.metadata.backend)
    if all(kinds) and kinds[0] != kinds[1]:
        raise DeltaShapeError(
            f"the deltas belong to different kinds of model ({kinds[0]} and {kinds[1]}): they share no "
            "weights to compare"
        )
    for name in set(a.tensors) & set(b.tensors):
        if a.tensors[name].shape != b.tensors[name].shape:
            raise DeltaShapeError(
                f"tensor {name!r} has shape {a.tensors[name].shape} in the first delta and "
                f"{b.tensors[name].shape} in the second: they belong to different base models"
            )
    fa, fb = a.metadata.base_fingerprint, b.metadata.base_fingerprint
    if fa and fb and fa != fb:
        warnings.warn(
            f"comparing deltas made for different base weights ({a.metadata.base_model!r}, "
            f"fingerprint {fa[:12]}… and {b.metadata.base_model!r}, {fb[:12]}…); the overlap is "
            "by position only",
            stacklevel=3,
        )


def delta_summary(
    delta: SparseDelta, backend: Backend | str | None = None, *, trainable: Trainable = None
) -> dict:
    """Header facts of a delta: base, method, non-zeros, density, energy shifts (meV/atom).

    ``base_model``/``base_fingerprint`` are the base the delta was made for,
    ``analysed_base``/``analysed_fingerprint`` the one it was mapped onto (``backend``).

    ``density`` is over the analysed trainable set (see :func:`delta_pattern`);
    ``metadata_trainable_numel`` is the count the fitting method recorded, if any.
    """
    layout = build_layout(delta, backend, trainable)
    total = sum(r.numel for r in layout.records)
    meta = delta.metadata
    return {
        "base_model": meta.base_model or layout.backend.model_name,
        "backend": meta.backend or layout.backend.name,
        "base_fingerprint": meta.base_fingerprint,
        "analysed_base": layout.backend.model_name,
        "analysed_fingerprint": layout.backend.fingerprint,
        "head": meta.head,
        "method": meta.method,
        "hyperparameters": meta.hyperparameters,
        "nnz": delta.nnz,
        "total": total,
        "density": delta.nnz / total if total else 0.0,
        "metadata_trainable_numel": meta.trainable_numel,
        "tensors_changed": sum(1 for t in delta.tensors.values() if t.nnz),
        "energy_shifts_meV": {k: 1000.0 * float(v) for k, v in meta.energy_shifts.items()},
        "created": meta.created,
    }
