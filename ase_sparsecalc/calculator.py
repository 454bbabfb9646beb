"""The ASE calculator: a foundation model plus a sparse delta merged into its weights."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .backends import Backend, delta_head, load_backend
from .backends.accelerate import check_compile_mode
from .delta import SparseDelta
from .errors import (
    ConfigError,
    ModelNotFoundError,
    NonFiniteResultError,
    StressUndefinedError,
    StructureError,
    UntrainedElementWarning,
)
from .graph import build_graph, charge_and_spin, has_cell_volume
from .torch_setup import dtype_name

logger = logging.getLogger(__name__)

MAX_ATOMS_PER_CALL = 2048
"""Default bound on the atoms of one batched model call in :meth:`SparseCalc.batch_evaluate`."""


def base_of_delta_not_found(delta: SparseDelta, exc: ModelNotFoundError) -> ModelNotFoundError:
    """The error for a delta whose recorded base model cannot be found: it names the delta, the
    base it records and how to pass that base."""
    fingerprint = delta.metadata.base_fingerprint
    return ModelNotFoundError(
        f"delta {_describe_delta(delta)}: made for the base model {delta.metadata.base_model!r}"
        + (f" (fingerprint {fingerprint[:12]})" if fingerprint else "")
        + f", which cannot be loaded here ({exc}); pass that model's file or name as "
        "base=... (--base on the command line)"
    )


def has_3d_cell(atoms: Atoms) -> bool:
    """True when the structure is periodic in all three directions with a non-zero volume."""
    return bool(atoms.pbc.all()) and has_cell_volume(atoms)


ASE_CALCULATOR_ARGUMENTS = frozenset({"restart", "ignore_bad_restart_file", "label", "atoms", "directory"})
"""Keyword arguments that go to ASE's ``Calculator`` itself."""


class SparseCalc(Calculator):
    r"""ASE calculator for a foundation model (MACE or SevenNet) with a sparse delta applied.

    The delta is merged into the weights (:math:`W = W_0 + \Delta`), so a step costs exactly
    what the base model costs. Energies carry the delta's per-element reference shifts.

    Parameters
    ----------
    base : str, Path, Backend or None
        A named foundation model (``"sevennet-0"``, ``"mace-mp-0-medium"``, ...), a model file,
        or a loaded backend. None: the base the delta names, else SevenNet-0.
    delta : str, Path, SparseDelta or None
        The delta file (or object). None: the bare base model.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    default_dtype : {"float64", "float32"}
        Floating dtype of the model. float64 for relaxations and phonons; float32 is faster.
    strict : bool
        Refuse a delta made for another base model (``False``: apply it with a warning).
    backend : {"mace", "sevennet"}, optional
        Backend of a model file when it cannot be guessed.
    head : str, optional
        Output head of a multi-head MACE model (default: the head the delta was fitted
        through, else the model's default head).
    enable_cueq : bool
        MACE on NVIDIA GPUs only: evaluate through cuEquivariance kernels (needs the ``cuda``
        extra). Faster than e3nn for cells of thousands of atoms (0.5-0.7x the time at 4096 on
        an H100), slower at 512 and below, far slower without the fused kernels (warned). The
        delta is merged into the e3nn weights, which are then mapped to the cuEquivariance
        model; :meth:`set_delta` keeps both in step.
    compile_mode : str, optional
        Evaluate through ``torch.compile`` with this mode (``"default"``,
        ``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``). Opt-in:
        the first call per shape compiles (minutes on a CPU); see ``docs/performance.md``.

    Notes
    -----
    ``energy`` and ``free_energy`` are the same (eV); ``forces`` are eV/Å; ``stress`` is in
    eV/Å³, Voigt order (xx, yy, zz, yz, xz, xy), positive under tension, and exists for cells
    with a volume. ``energies`` are the model's per-atom energies (eV, shape (n,), each with its
    element's energy shift); they sum to ``energy`` but, like any such split, are a model's
    bookkeeping rather than an observable.

    A repeated request for the same structure (same positions, cell, numbers and pbc) is
    answered from the stored results without calling the model (ASE's ``check_state``).

    Examples
    --------
    >>> from ase.build import bulk                                  # doctest: +SKIP
    >>> si = bulk("Si", "diamond", a=5.43)                          # doctest: +SKIP
    >>> si.calc = SparseCalc(delta="si_pbesol.safetensors")         # doctest: +SKIP
    >>> si.get_potential_energy(), si.get_stress()                  # doctest: +SKIP
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]  # noqa: RUF012

    def __init__(
        self,
        base: str | Path | Backend | None = None,
        delta: str | Path | SparseDelta | None = None,
        *,
        device: str = "cpu",
        default_dtype: str = "float64",
        strict: bool = True,
        backend: str | None = None,
        head: str | None = None,
        enable_cueq: bool = False,
        compile_mode: str | None = None,
        **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - ASE_CALCULATOR_ARGUMENTS)
        if unknown:
            hint = " (the dtype option is default_dtype)" if "dtype" in unknown else ""
            raise ConfigError(
                f"SparseCalc got unknown option(s) {', '.join(unknown)}{hint}; it takes base, delta, "
                "device, default_dtype, strict, backend, head, enable_cueq, compile_mode"
            )
        super().__init__(**kwargs)
        if enable_cueq and compile_mode is not None:
            raise ConfigError(
                "choose one of --cueq (enable_cueq=True) and --compile (compile_mode=...); together "
                "they are not supported"
            )
        check_compile_mode(compile_mode)  # before the (slow) loading of the base
        delta_obj = _as_delta(delta)
        base_from_delta = base is None and delta_obj is not None and bool(delta_obj.metadata.base_model)
        if base_from_delta:
            base = delta_obj.metadata.base_model
        try:
            if head is None and delta_obj is not None:  # a delta fitted through one head of a model
                head = delta_head(delta_obj, base, backend)
            self.backend: Backend = load_backend(
                base, device=device, dtype=default_dtype, backend=backend, head=head
            )
        except ModelNotFoundError as exc:
            if not base_from_delta:
                raise
            raise base_of_delta_not_found(delta_obj, exc) from exc
        self.delta: SparseDelta | None = None
        # what ASE records with results (calc.todict(): trajectories, databases)
        self.parameters.update(
            base=self.backend.model_name,
            default_dtype=dtype_name(self.backend.dtype),
            device=str(self.backend.device),
        )
        self.set_delta(delta_obj, strict=strict)
        if enable_cueq:
            self.backend.accelerate("cueq")
        elif compile_mode is not None:
            self.backend.accelerate("compile", compile_mode)

    # ------------------------------------------------------------------ deltas
    def set_delta(self, delta: str | Path | SparseDelta | None, strict: bool = True) -> None:
        """Switch to another delta (or to the bare base with None) without reloading the base.

        A delta that cannot be applied (another base model, unknown tensors) raises and leaves the
        calculator with the delta it had. ``strict=False`` applies a delta made for another base
        model (same architecture, other weights) with a warning instead of refusing it.
        """
        new = _as_delta(delta)
        old = self.delta
        self.reset()
        if old is not None:
            old.remove(self.backend)
            self.delta = None
        try:
            if new is not None:
                new.apply(self.backend, strict=strict)
                self.delta = new
            # absolute, as ASE keeps it with results (trajectories, databases) read elsewhere
            self.parameters["delta"] = (
                str(Path(new.source).resolve()) if new and new.source else _describe_delta(new)
            )
            if new is not None and not strict:  # SparseCalc(**calc.todict()) needs it again
                self.parameters["strict"] = False
            else:
                self.parameters.pop("strict", None)
            self._warned_untrained: set[str] = set()
        except Exception:
            if old is not None:  # it was applied before: its checks pass (and warned then)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    old.apply(self.backend, strict=False)
                self.delta = old
            raise

    def set(self, **kwargs) -> dict:
        """ASE's parameter setter. The model options are fixed when the calculator is made:
        change the delta with :meth:`set_delta`, anything else with a new calculator."""
        if kwargs:
            raise ConfigError(
                f"SparseCalc options cannot change after construction ({', '.join(sorted(kwargs))}); "
                "use set_delta() for the delta, or make a new SparseCalc"
            )
        return {}

    @property
    def cutoff(self) -> float:
        """The model's cutoff radius in Å."""
        return self.backend.cutoff

    # ------------------------------------------------------------------ ASE contract
    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's changes since the last calculation, plus ``"charge_and_spin"`` when the model
        takes them and ``atoms.info["charge"]`` or ``["spin"]`` changed (ASE compares only
        positions, numbers, cell, pbc and initial magnetic moments and charges)."""
        changes = [] if self._same_as_last(atoms) else super().check_state(atoms, tol)
        if (
            not changes
            and self.backend.takes_charge_and_spin
            and charge_and_spin(atoms, _formula(atoms)) != charge_and_spin(self.atoms, _formula(self.atoms))
        ):
            changes.append("charge_and_spin")
        return changes

    def _same_as_last(self, atoms: Atoms) -> bool:
        """True when ``atoms`` is bit for bit the structure of the last calculation.

        A cheap test before ASE's comparison (``np.allclose`` on every array, about 0.1-0.3 ms
        per property request): asking for energy, forces and stress of one MD step checks the
        state three times, and all but the first find nothing changed. Anything short of
        exact equality goes to ASE's comparison, so the answer is ASE's.
        """
        last = self.atoms
        if last is None or last.arrays.keys() != atoms.arrays.keys():
            return False
        if not (np.array_equal(last.cell.array, atoms.cell.array) and np.array_equal(last.pbc, atoms.pbc)):
            return False
        compared = [key for key in last.arrays if key in all_changes]  # positions, numbers, ...
        return all(np.array_equal(last.arrays[key], atoms.arrays[key]) for key in compared)

    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True):
        """ASE's ``get_property``; asking for a property the model does not predict (``magmoms``,
        ``charges``, ``dipole``) raises ASE's PropertyNotImplementedError naming the model."""
        if name not in self.implemented_properties:
            why = (
                " (no spin output: trained on spin-polarised DFT, a delta learns the energies and "
                "forces of the magnetic states in its frames, not their moments)"
                if name in ("magmom", "magmoms")
                else ""
            )
            raise PropertyNotImplementedError(
                f"{name} property not implemented: {self.backend.model_name} predicts "
                f"{', '.join(self.implemented_properties)}{why}"
            )
        return super().get_property(name, atoms, allow_calculation)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        """Fill ``self.results``: energy, free_energy, energies, forces and (cells with a volume) stress."""
        if atoms is None and self.atoms is None:
            raise StructureError(
                "no structure to calculate: attach the calculator to one (atoms.calc = calc, then "
                "atoms.get_potential_energy()) or pass it (calc.get_potential_energy(atoms))"
            )
        super().calculate(atoms, properties, system_changes)
        self.results = self.batch_evaluate([self.atoms], properties)[0]

    def batch_evaluate(
        self,
        structures: Sequence[Atoms],
        properties: Sequence[str] = ("energy", "forces"),
        batch_size: int | None = None,
        names: Sequence[str] | None = None,
        max_atoms: int | None = MAX_ATOMS_PER_CALL,
    ) -> list[dict[str, float | np.ndarray]]:
        """Evaluate many structures in batched model calls (used by phonons and ``eval``).

        Parameters
        ----------
        structures : sequence of ase.Atoms
        properties : sequence of str
            Stress is computed for every structure whose cell has a non-zero volume (bulk, and
            slabs or wires with their vacuum); asking for it when one has none raises
            :class:`StressUndefinedError`.
        batch_size : int, optional
            Most structures per model call (default: no limit but ``max_atoms``).
        max_atoms : int, optional
            Most atoms per model call (memory bound; a larger single structure gets a call of
            its own). None: no bound.
        names : sequence of str, optional
            How error messages name each structure (e.g. ``"train.xyz:frame 7"``); default
            ``"structure k (formula)"``.

        Returns
        -------
        list of dict
            Per structure: ``energy``, ``free_energy`` (eV), ``energies`` (n,) eV per atom,
            ``forces`` (n, 3) eV/Å and, for cells with a volume, ``stress`` (6,) eV/Å³ in ASE's
            Voigt order (the virial over the whole cell volume, vacuum included).
        """
        structures = list(structures)
        if names is None:
            names = [f"structure {k} ({a.get_chemical_formula()})" for k, a in enumerate(structures)]
        names = list(names)
        if len(names) != len(structures):
            raise ConfigError(f"{len(names)} names for {len(structures)} structures")
        want_stress = "stress" in properties
        for atoms, name in zip(structures, names, strict=True):
            if want_stress and not has_cell_volume(atoms):
                raise StressUndefinedError(
                    f"{name}: stress needs a cell with a non-zero volume (three linearly "
                    f"independent cell vectors); the cell is {atoms.cell.array.round(6).tolist()}"
                )
            self.backend.check_elements(atoms.numbers, name)
            self.backend.check_charge_and_spin(atoms, name)
            self._warn_about_untrained_elements(atoms.numbers, name)
        results: list[dict] = []
        for chunk in chunk_indices([len(a) for a in structures], batch_size, max_atoms):
            results.extend(self._evaluate_chunk([structures[k] for k in chunk], [names[k] for k in chunk]))
        return results

    def _warn_about_untrained_elements(self, numbers: np.ndarray, where: str) -> None:
        """Warn, once per element, about elements absent from the delta's training data.

        Foundation models share most weights between elements, so the delta changes their
        energies and forces too (without a fitted energy shift), in ways no DFT checked.
        """
        trained = (self.delta.metadata.training_data or {}).get("elements") if self.delta else None
        if not trained:  # no delta, or one that does not record its training elements
            return
        from ase.data import chemical_symbols

        present = {chemical_symbols[z] for z in np.unique(numbers)}
        untrained = present - set(trained) - self._warned_untrained
        if untrained:
            self._warned_untrained |= untrained
            shifted = sorted(untrained & set(self.delta.metadata.energy_shifts))
            shift_note = (
                f"; the energy shifts of {', '.join(shifted)} come from isolated-atom energies only"
                if shifted
                else ""
            )
            unshifted = sorted(untrained - set(shifted))
            if unshifted:
                shift_note += f"; no energy shift for {', '.join(unshifted)}"
            effect = (
                "the delta changes their energies and forces too (the model shares weights between "
                "elements), untested against DFT"
                if self.delta.nnz
                else "the delta changes no weights, so their forces are the base model's"
            )
            warnings.warn(
                f"{where}: element(s) {', '.join(sorted(untrained))} are not in the training data of "
                f"the delta {_describe_delta(self.delta)} ({', '.join(trained)}); {effect}{shift_note}",
                UntrainedElementWarning,
                stacklevel=2,
            )

    def _check_finite(self, energy, forces, stress, names: list[str], ptr: np.ndarray) -> None:
        """Raise :class:`NonFiniteResultError` naming the first structure with NaN or inf results."""
        if (
            np.isfinite(energy).all()
            and np.isfinite(forces).all()
            and (stress is None or np.isfinite(stress).all())
        ):
            return
        for g, name in enumerate(names):
            parts = [energy[g : g + 1], forces[ptr[g] : ptr[g + 1]]] + (
                [stress[g]] if stress is not None else []
            )
            if not all(np.isfinite(p).all() for p in parts):
                raise NonFiniteResultError(
                    f"{name}: the model gave a NaN or infinite energy, force or stress (base "
                    f"{self.backend.model_name!r}, delta {_describe_delta(self.delta) or '(none)'}); a delta "
                    "with absurd values, or a structure far outside what the model has seen"
                )

    def _evaluate_chunk(self, chunk: list[Atoms], names: list[str]) -> list[dict]:
        stress_mask = [has_cell_volume(a) for a in chunk]
        compute_stress = any(stress_mask)
        if compute_stress and not all(stress_mask):
            # a batch mixing molecules and crystals: split it rather than give molecules a stress
            crystals = [k for k, m in enumerate(stress_mask) if m]
            others = [k for k, m in enumerate(stress_mask) if not m]
            by_index: dict[int, dict] = {}
            for group in (crystals, others):
                evaluated = self._evaluate_chunk([chunk[k] for k in group], [names[k] for k in group])
                by_index.update(zip(group, evaluated, strict=True))
            return [by_index[k] for k in range(len(chunk))]
        backend = self.backend
        graph = build_graph(chunk, backend.cutoff, backend.device, backend.dtype, names=names)
        out = backend.evaluate(graph, compute_forces=True, compute_stress=compute_stress)
        # one device-to-host copy per quantity, not one per structure
        energy = out.energy.detach().to("cpu", torch.float64).numpy()
        forces = out.forces.detach().to("cpu", torch.float64).numpy()
        stress = out.stress.detach().to("cpu", torch.float64).numpy() if compute_stress else None
        ptr = np.concatenate([[0], np.cumsum([len(a) for a in chunk])])
        self._check_finite(energy, forces, stress, names, ptr)
        atom_energies = None
        if out.atom_energies is not None:
            atom_energies = out.atom_energies.detach().to("cpu", torch.float64).numpy()
        results = []
        for g in range(len(chunk)):
            res: dict[str, float | np.ndarray] = {
                "energy": float(energy[g]),
                "free_energy": float(energy[g]),
                "forces": forces[ptr[g] : ptr[g + 1]].copy(),
            }
            if atom_energies is not None:
                res["energies"] = atom_energies[ptr[g] : ptr[g + 1]].copy()
            if stress is not None:
                s = stress[g]
                res["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
            results.append(res)
        return results


def chunk_indices(sizes: Sequence[int], max_structures: int | None, max_atoms: int | None) -> list[list[int]]:
    """Consecutive groups of structure indices with at most ``max_structures`` structures and
    ``max_atoms`` atoms each (a structure larger than ``max_atoms`` forms a group alone).

    Parameters
    ----------
    sizes : sequence of int
        Atoms per structure.
    max_structures, max_atoms : int or None
        Bounds per group; None: unbounded.
    """
    for name, bound in (("batch_size", max_structures), ("max_atoms", max_atoms)):
        if bound is not None and bound < 1:
            raise ConfigError(f"{name} must be a positive integer or None, got {bound}")
    groups: list[list[int]] = []
    current: list[int] = []
    atoms = 0
    for k, n in enumerate(sizes):
        full = max_structures is not None and len(current) >= max_structures
        too_big = max_atoms is not None and atoms + n > max_atoms
        if current and (full or too_big):
            groups.append(current)
            current, atoms = [], 0
        current.append(k)
        atoms += n
    if current:
        groups.append(current)
    return groups


def _as_delta(delta: str | Path | SparseDelta | None) -> SparseDelta | None:
    if delta is None or isinstance(delta, SparseDelta):
        return delta
    return SparseDelta.load(delta)


def _describe_delta(delta: SparseDelta | None) -> str | None:
    """How the calculator's parameters name a delta: its file, or a note for one made in memory."""
    if delta is None:
        return None
    return str(delta.source) if delta.source is not None else "(in memory)"


def _formula(atoms: Atoms) -> str:
    """How messages name a structure outside a batch: ``structure (H2O)``."""
    return f"structure ({atoms.get_chemical_formula()})"
