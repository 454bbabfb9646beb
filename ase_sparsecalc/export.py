"""A base model with a delta merged in, written as a model file of the base's own package.

A delta file is small, but only this package applies it. To run a calibrated potential with
MACE's or SevenNet's own ASE calculator, or to convert it for LAMMPS with the backend's own tool
(``mace_create_lammps_model``, ``sevenn_get_model``), export the merged model: the base's
weights plus the delta, with the delta's per-element energy shifts folded into the model's own
per-element reference energies (MACE's ``atomic_energies``, the E0s, of the delta's head;
SevenNet's species-wise ``shift``). This is peft's ``merge_and_unload`` for foundation
potentials.

The file is the backend's native format, not a delta:

* MACE: the whole model saved with ``torch.save``, as MACE saves ``.model`` files;
* SevenNet: the base checkpoint (``.pth``) with its weights and energy shifts replaced.

Before the file is put in place, it is read back and evaluated on a small probe structure,
which must give the energy, forces and stress of the base with the delta applied.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers as symbol_to_number
from ase.data import chemical_symbols

from .backends import backend_kind, delta_head, load_backend, model_file, stored_dtype
from .backends.base import Backend
from .calculator import base_of_delta_not_found
from .delta import SparseDelta
from .delta_io import atomic_write_bytes, check_writable, overwritten_input
from .errors import BaseModelError, ConfigError, DeltaError, ModelNotFoundError
from .torch_setup import dtype_name, resolve_dtype

logger = logging.getLogger(__name__)

# Largest difference allowed between the exported model and base + delta on the probe
# structure, by the file's dtype: energy per atom (eV), forces (eV/Å) and stress (eV/Å³).
LARGE_REFERENCE_ENERGY = 50.0
"""eV/atom: above this, a merged model's float32 total energies lose accuracy (a warning)."""

EXPORT_TOLERANCE = {
    torch.float64: (1e-8, 1e-7, 1e-8),
    torch.float32: (2e-4, 2e-3, 2e-5),
}


@dataclass
class ExportResult:
    """What :func:`export_merged_model` wrote.

    Attributes
    ----------
    path : Path
        The merged model file.
    backend : str
        ``"mace"`` or ``"sevennet"``.
    dtype : str
        ``"float32"`` or ``"float64"``: the dtype of the weights in the file.
    head : str or None
        The head of a multi-head MACE model whose reference energies took the shifts.
    changed_entries : int
        Weight entries the delta changed.
    energy_shifts : dict
        Per-element energy shifts (eV/atom) folded into the model's reference energies.
    max_energy_difference, max_force_difference : float
        Energy difference per atom (eV/atom) and largest force difference (eV/Å) between the
        file and base + delta on the probe structure, both evaluated in float64.
    """

    path: Path
    backend: str
    dtype: str
    head: str | None
    changed_entries: int
    energy_shifts: dict[str, float]
    max_energy_difference: float
    max_force_difference: float


def export_merged_model(
    delta: str | Path | SparseDelta,
    path: str | Path,
    *,
    base: str | Path | None = None,
    head: str | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = True,
) -> ExportResult:
    """Write ``base`` with ``delta`` merged in as a MACE model file or a SevenNet checkpoint.

    Parameters
    ----------
    delta : str, Path or SparseDelta
        The delta to merge.
    path : str or Path
        The file to write (by convention ``.model`` for MACE, ``.pth`` for SevenNet); written
        to a temporary name and renamed once checked.
    base : str or Path, optional
        Named foundation model or model file; default: the base the delta names.
    head : str, optional
        Output head of a multi-head MACE model; default: the head the delta was fitted through.
        The delta's energy shifts go into this head's reference energies. Weights shared by all
        heads change for every head.
    dtype : {"float32", "float64"}, optional
        dtype of the weights in the file; default: the base file's.
    strict : bool
        Refuse a delta made for another base model (``False``: merge it with a warning).

    Returns
    -------
    ExportResult

    Raises
    ------
    ConfigError
        ``path`` is the base model file, the delta file or a ``.safetensors`` name, or float64
        was asked of a SevenNet base.
    OutputFileError
        ``path`` cannot be written (checked before any work).
    ModelNotFoundError
        The base (given, or the one the delta names) cannot be found.
    DeltaMismatchError
        The delta was made for another base model.
    BaseModelError
        The model has no per-element reference energies to fold the delta's shifts into, or the
        exported file does not reproduce base + delta.
    """
    delta_obj = delta if isinstance(delta, SparseDelta) else SparseDelta.load(delta)
    base_from_delta = base is None and bool(delta_obj.metadata.base_model)
    base = base if base is not None else (delta_obj.metadata.base_model or None)
    try:
        base_file = model_file(base)
    except ModelNotFoundError as exc:
        if not base_from_delta:
            raise
        raise base_of_delta_not_found(delta_obj, exc) from exc
    path = Path(path)
    _check_output(path, base_file, delta_obj)
    head = head if head is not None else delta_head(delta_obj, base)
    kind = backend_kind(base)
    requested = resolve_dtype(dtype) if dtype is not None else None  # None: each tensor as stored
    if kind == "sevennet" and requested == torch.float64:
        raise ConfigError(
            "--dtype float64 (dtype='float64') applies to MACE bases only: sevenn builds every "
            "model from a checkpoint in float32, so a float64 checkpoint would run in float32"
        )
    file_dtype = requested or stored_dtype(base, head=head)

    merged = load_backend(base, dtype="float64", head=head)  # merge and fold in float64
    try:
        delta_obj.apply(merged, strict=strict)
    except DeltaError as exc:
        raise type(exc)(f"cannot export: {exc}") from exc
    if delta_obj.nnz == 0 and not delta_obj.metadata.energy_shifts:
        logger.warning("%s: the delta changes nothing; the merged model is a copy of the base", path)
    probe = probe_structure(merged, delta_obj)
    expected = _predict(merged, probe)
    if merged.name == "mace":
        _fold_shifts_into_mace_e0s(merged)
        data = _mace_model_bytes(merged, base_file, requested)
    else:
        _fold_shifts_into_sevennet_shift(merged)
        data = _sevennet_checkpoint_bytes(merged, base_file, requested)
    agreement: dict[str, float] = {}

    def check(candidate: Path) -> None:
        exported = _predict_from_file(candidate, merged.name, getattr(merged, "head", None), probe)
        agreement.update(_check_agreement(expected, exported, file_dtype, path))

    written = atomic_write_bytes(path, data, check=check)
    _warn_about_float32_energies(path, expected["energy"], len(probe), merged.name, file_dtype)
    logger.info("wrote %s (%s, %s)", written, merged.name, dtype_name(file_dtype))
    return ExportResult(
        path=written,
        backend=merged.name,
        dtype=dtype_name(file_dtype),
        head=getattr(merged, "head", None) if len(getattr(merged.model, "heads", [None])) > 1 else None,
        changed_entries=delta_obj.nnz,
        energy_shifts=dict(delta_obj.metadata.energy_shifts),
        max_energy_difference=agreement["energy"],
        max_force_difference=agreement["forces"],
    )


def _check_output(path: Path, base_file: Path, delta: SparseDelta) -> None:
    """Refuse an output that is not a model file name or is an input, and check that the
    folder can be written, before any work."""
    _refuse_overwriting_inputs(path, base_file, delta)
    if path.suffix == ".safetensors":
        raise ConfigError(
            f"{path}: a merged model is a model file, not a delta; name it .model (MACE) or .pth (SevenNet)"
        )
    check_writable(path)


def _refuse_overwriting_inputs(path: Path, base_file: Path, delta: SparseDelta) -> None:
    """Refuse an output path that is the base model file or the delta file itself."""
    what = overwritten_input(path, [("the base model file", base_file), ("the delta file", delta.source)])
    if what is not None:
        raise ConfigError(f"{path}: is {what}; write the merged model to another file")


# ---------------------------------------------------------------------- MACE
def _fold_shifts_into_mace_e0s(merged: Backend) -> None:
    """Move the backend's energy shifts into its model's E0s (``atomic_energies``) of its head."""
    shifts = merged.energy_shifts_by_number()
    if not shifts:
        return
    row = merged.reference_energies()
    if row is None:
        raise BaseModelError(
            f"{merged.model_name}: the model has no per-element reference energies "
            "(atomic_energies_fn.atomic_energies) to fold the delta's energy shifts into"
        )
    index = {int(z): k for k, z in enumerate(merged.atomic_numbers)}
    with torch.no_grad():
        for z, shift in shifts.items():
            row[index[z]] += shift
    merged.set_energy_shifts_by_number({})


def _mace_model_bytes(merged: Backend, base_file: Path, dtype: torch.dtype | None) -> bytes:
    """The base model file's module with the merged values copied in, as ``torch.save`` writes it.

    Copying into the module as stored keeps every tensor's stored dtype (unless ``dtype`` is
    given) and everything else about the module as the base file has it.
    """
    from .backends.mace import load_mace_model

    model = load_mace_model(base_file)
    if dtype is not None:  # before the values are copied in, so that they are rounded only once
        model.to(dtype=dtype)
    model.load_state_dict(merged.model.state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------- SevenNet
def _fold_shifts_into_sevennet_shift(merged: Backend) -> None:
    """Move the backend's energy shifts into its model's species-wise energy shift."""
    shifts = merged.energy_shifts_by_number()
    if not shifts:
        return
    found = _species_wise_rescale(merged.model)
    if found is None:
        raise BaseModelError(
            f"{merged.model_name}: the model's energy shift is one number for all elements, so "
            "the delta's per-element energy shifts cannot be folded into it"
        )
    rescale = found[1]
    type_index = {int(z): int(i) for z, i in merged.config["_type_map"].items()}
    with torch.no_grad():
        for z, shift in shifts.items():
            rescale.shift[type_index[z]] += shift
    merged.set_energy_shifts_by_number({})


def _species_wise_rescale(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The name and module of SevenNet's per-species energy scale and shift, if it has one."""
    from sevenn.nn.scale import SpeciesWiseRescale

    return next(((n, m) for n, m in model.named_modules() if isinstance(m, SpeciesWiseRescale)), None)


def _sevennet_checkpoint_bytes(merged: Backend, checkpoint_path: Path, dtype: torch.dtype | None) -> bytes:
    """The base checkpoint with the merged values in its ``model_state_dict`` (each tensor in its
    stored dtype unless ``dtype`` is given) and its configured ``shift`` updated to match."""
    from .backends.safe_load import SEVENNET_ALLOWED, load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path, SEVENNET_ALLOWED)
    original = checkpoint["model_state_dict"]
    state = merged.model.state_dict()
    if set(original) == set(state):
        stored = {name: value.dtype for name, value in original.items()}
    else:  # an older sevenn's names, which sevenn maps on loading: write the names it uses now
        floats = next(value.dtype for value in original.values() if value.is_floating_point())
        stored = {name: floats if value.is_floating_point() else value.dtype for name, value in state.items()}
    if dtype is not None:
        stored = {name: dtype if kind.is_floating_point else kind for name, kind in stored.items()}
    checkpoint["model_state_dict"] = {name: state[name].detach().to("cpu", stored[name]) for name in stored}
    found = _species_wise_rescale(merged.model)
    shift_name = f"{found[0]}.shift" if found else None
    config_shift = checkpoint["config"].get("shift")
    if shift_name and config_shift is not None and np.size(config_shift) == state[shift_name].numel():
        values = state[shift_name].cpu().numpy().astype(np.asarray(config_shift).dtype)
        checkpoint["config"]["shift"] = values.tolist() if isinstance(config_shift, list) else values
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------- the check
def probe_structure(backend: Backend, delta: SparseDelta) -> Atoms:
    """A small periodic structure of the delta's elements, to compare two models on.

    The elements are those the delta was trained on or shifts (else the model's first), cycled
    over the sites of a sheared, rattled simple-cubic k×k×k grid with 2.2 Å spacing (k ≥ 2,
    large enough that every element gets a site), so that every atom has neighbours and no
    symmetry zeroes the forces.
    """
    known = set(backend.atomic_numbers)
    named = [*((delta.metadata.training_data or {}).get("elements") or []), *delta.metadata.energy_shifts]
    numbers = sorted({symbol_to_number[s] for s in named if s in symbol_to_number} & known) or [min(known)]
    k = max(2, math.ceil(len(numbers) ** (1 / 3) - 1e-9))
    spacing = 2.2
    grid = np.array([(i, j, m) for i in range(k) for j in range(k) for m in range(k)], dtype=float)
    rng = np.random.default_rng(0)
    positions = grid * spacing + rng.normal(scale=0.08, size=grid.shape)
    cell = k * spacing * (np.eye(3) + np.array([[0.0, 0.03, 0.0], [0.0, 0.0, 0.02], [0.01, 0.0, 0.0]]))
    symbols = [chemical_symbols[numbers[i % len(numbers)]] for i in range(len(positions))]
    return Atoms(symbols, positions=positions, cell=cell, pbc=True)


def _predict(backend: Backend, atoms: Atoms) -> dict[str, np.ndarray]:
    """Energy (eV), forces (eV/Å) and stress (eV/Å³, 3×3) of ``atoms`` with ``backend``."""
    from .graph import build_graph

    graph = build_graph([atoms], backend.cutoff, backend.device, backend.dtype)
    out = backend.evaluate(graph, compute_forces=True, compute_stress=True)
    return {
        "energy": out.energy.detach().cpu().numpy(),
        "forces": out.forces.detach().cpu().numpy(),
        "stress": out.stress.detach().cpu().numpy(),
    }


def _predict_from_file(path: Path, kind: str, head: str | None, atoms: Atoms) -> dict[str, np.ndarray]:
    """Predictions of the model file at ``path``, read as any model file is (safe loader)."""
    backend = load_backend(path, dtype="float64", backend=kind, head=head, cache=False)
    return _predict(backend, atoms)


def _check_agreement(
    expected: dict[str, np.ndarray], exported: dict[str, np.ndarray], dtype: torch.dtype, path: Path
) -> dict[str, float]:
    """Raise BaseModelError unless the exported model reproduces base + delta; return the
    largest differences (energy per atom, forces, stress)."""
    n_atoms = len(expected["forces"])
    tolerances = dict(zip(("energy", "forces", "stress"), EXPORT_TOLERANCE[dtype], strict=True))
    differences = {key: float(np.abs(expected[key] - exported[key]).max()) for key in tolerances}
    differences["energy"] /= n_atoms
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "eV/Å³"}
    wrong = [
        f"{key} by {differences[key]:.3g} {units[key]} (allowed {tolerances[key]:g})"
        for key in tolerances
        if differences[key] > tolerances[key]
    ]
    if wrong:
        raise BaseModelError(
            f"{path}: not written: the merged model does not reproduce base + delta on a probe "
            f"structure: {'; '.join(wrong)}"
        )
    return differences


def _warn_about_float32_energies(
    path: Path, energy: np.ndarray, n_atoms: int, kind: str, dtype: torch.dtype
) -> None:
    """Warn when the merged model's reference energies are large enough (all-electron or
    pseudopotential total energies, as in Quantum ESPRESSO or ORCA data) that float32 costs
    accuracy in total energies: in the file's float32 reference energies, and in the backends'
    own calculators, which add and sum them in the dtype they run in."""
    per_atom = abs(float(energy.sum())) / n_atoms
    if per_atom <= LARGE_REFERENCE_ENERGY:
        return
    if kind == "sevennet":
        advice = (
            "sevenn runs float32 only, so where total energies matter use SparseCalc with the delta, "
            "which adds the shifts in float64"
        )
    elif dtype != torch.float64:
        advice = (
            "export with --dtype float64 (dtype='float64'), since the file's float32 reference "
            "energies are rounded, and run it with MACECalculator(default_dtype='float64')"
        )
    else:
        advice = "run it with MACECalculator(default_dtype='float64') where total energies matter"
    logger.warning(
        "%s: energies reach %.0f eV/atom, so float32 total energies lose accuracy as structures grow "
        "(forces do not); %s",
        path,
        per_atom,
        advice,
    )


__all__ = [
    "EXPORT_TOLERANCE",
    "LARGE_REFERENCE_ENERGY",
    "ExportResult",
    "export_merged_model",
    "probe_structure",
]
