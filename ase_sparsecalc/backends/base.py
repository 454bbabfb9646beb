"""The interface every backend implements, and the metadata of trainable path weights.

A backend wraps one loaded foundation model (a ``torch.nn.Module``) and knows how to

* evaluate energies, forces and stresses for a batched :class:`~ase_sparsecalc.graph.AtomicGraph`
  (:meth:`Backend.evaluate`), in ASE units and sign conventions;
* list the model's trainable equivariant path weights with their meaning
  (:meth:`Backend.weight_infos`): layer, module, irrep path ``l_in -> l_out`` and the element a
  weight belongs to where it is element-specific.

Per-element energy shifts (from a delta's re-referencing) are added here, after the model:
``E = E_model + sum_i shift[Z_i]``; forces and stresses do not change.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from ase.data import atomic_numbers as symbol_to_number
from ase.data import chemical_symbols

from ..errors import DeltaStateError, UnknownElementError
from ..graph import NEUTRAL_SINGLET, charge_and_spin
from ..torch_setup import dtype_name

if TYPE_CHECKING:
    from ase import Atoms

    from ..delta import DeltaMetadata, SparseDelta
    from ..graph import AtomicGraph

logger = logging.getLogger(__name__)

N_ELEMENTS_TABLE = 119  # atomic numbers 0..118


@dataclass(frozen=True)
class PathSegment:
    """A contiguous range of one weight tensor that belongs to one irrep path.

    Attributes
    ----------
    start, stop : int
        Range of the decoded coordinate (a flat index, or a column; see ``WeightInfo.coordinate``).
    l_in, l_out : int or None
        Angular momentum of the input and output irreps of the path (None where not defined,
        e.g. the hidden layers of a radial MLP).
    shape : tuple of int
        Shape of the block ``stop - start`` entries form, used to find the element axis.
    element_axis : int or None
        Axis of ``shape`` that indexes chemical elements, if the weight is element-specific.
    """

    start: int
    stop: int
    l_in: int | None
    l_out: int | None
    shape: tuple[int, ...]
    element_axis: int | None = None


WEIGHT_KINDS = ("embedding", "linear", "self_connection", "radial", "symmetric_contraction", "readout")
"""Every :attr:`WeightInfo.kind`."""


@dataclass(frozen=True)
class WeightInfo:
    """A trainable weight tensor and what its entries mean.

    Attributes
    ----------
    name : str
        State-dict name, e.g. ``"interactions.0.linear.weight"``.
    shape : tuple of int
        Tensor shape.
    layer : int or None
        Message-passing layer (0-based); None for the element embedding.
    module : str
        The owning module's path relative to the layer, e.g. ``"linear_up"``.
    kind : str
        One of ``"embedding"``, ``"linear"``, ``"self_connection"``, ``"radial"``,
        ``"symmetric_contraction"``, ``"readout"``.
    coordinate : str
        ``"flat"`` when segments index the flattened tensor, ``"column"`` when they index the
        last axis (radial MLP output layer: columns are tensor-product path weights).
    segments : tuple of PathSegment
        Path of each range, sorted by ``start``.
    elements : tuple of int
        Atomic number of each element index used by ``element_axis``.
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None
    module: str
    kind: str
    coordinate: str
    segments: tuple[PathSegment, ...]
    elements: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        """Number of entries."""
        return int(np.prod(self.shape))

    @property
    def is_readout(self) -> bool:
        """True for readout weights (not trained by default)."""
        return self.kind == "readout"

    @property
    def is_radial(self) -> bool:
        """True for radial-MLP weights."""
        return self.kind == "radial"

    def describe(self, flat_indices: np.ndarray) -> dict[str, np.ndarray]:
        """Map flat indices of this tensor to their path.

        Parameters
        ----------
        flat_indices : (n,) int
            Indices into ``tensor.view(-1)``.

        Returns
        -------
        dict
            ``l_in``, ``l_out`` and ``Z`` arrays of shape (n,), -1 where undefined.
        """
        flat = np.asarray(flat_indices, dtype=np.int64)
        coord = flat if self.coordinate == "flat" else flat % self.shape[-1]
        starts = np.array([s.start for s in self.segments], dtype=np.int64)
        seg_of = np.clip(np.searchsorted(starts, coord, side="right") - 1, 0, None)
        l_in = np.array([-1 if s.l_in is None else s.l_in for s in self.segments])[seg_of]
        l_out = np.array([-1 if s.l_out is None else s.l_out for s in self.segments])[seg_of]
        z = np.full(flat.shape, -1, dtype=np.int64)
        for k, seg in enumerate(self.segments):
            if seg.element_axis is None:
                continue
            mask = seg_of == k
            local = coord[mask] - seg.start
            element_index = np.unravel_index(local, seg.shape)[seg.element_axis]
            z[mask] = np.asarray(self.elements, dtype=np.int64)[element_index]
        return {"l_in": l_in, "l_out": l_out, "Z": z}


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict: names, dtypes, shapes and raw bytes, sorted by name.

    Computed on the base model as loaded (on the CPU, in its stored dtype) so that the same
    file gives the same fingerprint whatever device or dtype it is later run in.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class ModelOutput:
    """Predictions for a batch of G structures with N atoms in all (ASE units).

    Attributes
    ----------
    energy : (G,) tensor, eV (float64 after :meth:`Backend.evaluate` adds the energy shifts)
    forces : (N, 3) tensor, eV/Å, or None
    stress : (G, 3, 3) tensor, eV/Å³ (ASE sign: positive under tension), or None
    atom_energies : (N,) tensor, eV, or None
        The model's per-atom energies, which sum to ``energy`` per structure (MACE's node
        energies with their E0, SevenNet's atomic energies); float64 after shifts.
    """

    energy: torch.Tensor
    forces: torch.Tensor | None = None
    stress: torch.Tensor | None = None
    atom_energies: torch.Tensor | None = None


@dataclass
class Backend(ABC):
    """One loaded foundation model behind a small common interface.

    Subclasses implement :meth:`_model_outputs` and :meth:`weight_infos`; loading lives in
    each backend's module. Instances own their model: :meth:`copy` makes an independent one.

    Attributes
    ----------
    model : torch.nn.Module
        The model, on ``device`` in ``dtype``.
    model_name : str
        A named foundation model (``"sevennet-0"``) or the path it was loaded from.
    fingerprint : str
        SHA-256 of the state dict as loaded (see :func:`state_dict_fingerprint`).
    cutoff : float
        Interaction cutoff in Å.
    atomic_numbers : tuple of int
        Elements the model knows.
    """

    name: ClassVar[str] = ""

    model: torch.nn.Module
    model_name: str
    fingerprint: str
    cutoff: float
    atomic_numbers: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    applied_deltas: list[SparseDelta] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._shift_table = torch.zeros(N_ELEMENTS_TABLE, dtype=torch.float64)
        self._known = torch.zeros(N_ELEMENTS_TABLE, dtype=torch.bool)
        self._known[list(self.atomic_numbers)] = True
        self.accelerator = None  # a faster inference copy of the model (backends/accelerate.py)
        self._said_charge_ignored = False
        self.to(self.device, self.dtype)
        self.set_training(False)

    # ------------------------------------------------------------------ placement
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backend:
        """Move the model to ``device`` and/or cast its floating tensors to ``dtype``; in place."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self.model.to(device=self.device, dtype=self.dtype)
        self._device_shift_table = self._shift_table.to(self.device)  # float64: see evaluate
        self._device_known = self._known.to(self.device)
        if self.accelerator is not None and (
            self.accelerator.device != self.device or self.accelerator.dtype != self.dtype
        ):
            self.accelerate(self.accelerator.name, getattr(self.accelerator, "mode", None))
        return self

    def copy(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backend:
        """An independent copy (own weights) without applied deltas, optionally moved/cast."""
        if self.applied_deltas:
            raise DeltaStateError("copy() of a backend with applied deltas; remove them first")
        clone = copy.copy(self)
        clone.model = copy.deepcopy(self.model)
        clone.applied_deltas = []
        clone._shift_table = self._shift_table.clone()
        clone.accelerator = None
        clone.to(device, dtype)
        return clone

    def accelerate(self, kind: str | None, compile_mode: str | None = None) -> None:
        """Run inference through a faster copy of the model (``"cueq"``, ``"compile"``) or not (None).

        Fine-tuning and calls with ``parameters`` keep using the e3nn model; the copy follows
        its weights (deltas included). See :mod:`.accelerate`.
        """
        if kind is None:
            self.accelerator = None
            return
        from .accelerate import make_accelerator

        self.accelerator = make_accelerator(self, kind, compile_mode)

    def set_training(self, training: bool) -> None:
        """Train mode (graphs kept for parameter gradients) or inference mode (no param grads)."""
        self.model.train(training)
        if not training:
            for p in self.model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        graph: AtomicGraph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        training: bool = False,
        parameters: dict[str, torch.Tensor] | None = None,
    ) -> ModelOutput:
        """Energies (and forces, stresses) of a batch of structures, with energy shifts added.

        Parameters
        ----------
        graph : AtomicGraph
            Batched structures on this backend's device and dtype.
        compute_forces, compute_stress : bool
            What to differentiate. Stress needs cells with a non-zero volume.
        training : bool
            Keep the autograd graph so that a loss on forces/stresses can be differentiated
            with respect to the weights.
        parameters : dict, optional
            Replacement tensors for some parameters (by state-dict name), used through
            ``torch.func.functional_call`` during fine-tuning; the module is not modified.
        """
        self._check_graph_elements(graph)
        if self.model.training != training:
            self.model.train(training)
        out = self._model_outputs(graph, compute_forces, compute_stress, training, parameters)
        # shifts are added in float64 whatever the model's dtype: total energies of all-electron
        # codes reach -1e7 eV, where float32 resolves only about 1 eV
        shifts = self._device_shift_table[graph.numbers]
        energy = out.energy.to(torch.float64)
        out.energy = energy + torch.zeros_like(energy).index_add_(0, graph.batch, shifts)
        if out.atom_energies is not None:  # each atom carries its element's shift
            out.atom_energies = out.atom_energies.reshape(-1).to(torch.float64) + shifts
        return out

    def _call_model(self, parameters: dict[str, torch.Tensor] | None, *args, **kwargs):
        if parameters:
            return torch.func.functional_call(self.model, parameters, args, kwargs, strict=False)
        if self.accelerator is not None and not self.model.training:
            return self.accelerator(self.model, *args, **kwargs)
        return self.model(*args, **kwargs)

    @abstractmethod
    def _model_outputs(
        self,
        graph: AtomicGraph,
        compute_forces: bool,
        compute_stress: bool,
        training: bool,
        parameters: dict[str, torch.Tensor] | None,
    ) -> ModelOutput:
        """Run the wrapped model; return energies without this class's energy shifts."""

    @abstractmethod
    def weight_infos(self) -> list[WeightInfo]:
        """All trainable path weights (readouts included, flagged by ``kind == "readout"``)."""

    # ------------------------------------------------------------------ elements
    def check_elements(self, numbers: np.ndarray, where: str = "structure") -> None:
        """Raise :class:`UnknownElementError` if ``numbers`` holds an element the model lacks."""
        numbers = np.asarray(numbers)
        unknown = sorted(
            {
                int(z)
                for z in np.unique(numbers)
                if not (0 <= int(z) < N_ELEMENTS_TABLE and self._known[int(z)])
            }
        )
        if unknown:
            symbols = ", ".join(
                chemical_symbols[z] if 0 <= z < N_ELEMENTS_TABLE else f"Z={z}" for z in unknown
            )
            raise UnknownElementError(
                f"{where}: element(s) {symbols} unknown to base model {self.model_name!r} "
                f"(it knows {_element_list(self.atomic_numbers)})"
            )

    # ------------------------------------------------------------------ charge and spin
    @property
    def takes_charge_and_spin(self) -> bool:
        """Whether the model is conditioned on each structure's total charge and spin."""
        return False

    def check_charge_and_spin(self, atoms: Atoms, where: str = "structure") -> None:
        """Check a structure's ``atoms.info["charge"]`` and ``["spin"]`` against the model.

        A model conditioned on them refuses values it has no embedding for
        (:meth:`_check_charge_and_spin_values`); any other model ignores them, and says so once
        per backend when a structure is not a neutral singlet.

        Raises
        ------
        StructureError
            A value that is not a number, or one the model cannot take.
        """
        charge, spin = charge_and_spin(atoms, where)
        if self.takes_charge_and_spin:
            self._check_charge_and_spin_values(charge, spin, where)
        elif (charge, spin) != NEUTRAL_SINGLET and not self._said_charge_ignored:
            self._said_charge_ignored = True
            logger.warning(
                "%s: charge %g and spin multiplicity %g (atoms.info) are ignored: base model %r "
                "takes no charge or spin input and treats every structure alike",
                where,
                charge,
                spin,
                self.model_name,
            )

    def _check_charge_and_spin_values(self, charge: float, spin: float, where: str) -> None:
        """Raise StructureError for a charge or spin a conditioned model cannot take."""
        raise NotImplementedError(f"{type(self).__name__} takes charge and spin but does not check them")

    def _check_graph_elements(self, graph: AtomicGraph) -> None:
        """Every public evaluation path refuses unknown elements with :class:`UnknownElementError`.

        (A MACE model would otherwise fail deep inside torch's one-hot encoding, and a
        SevenNet model would index out of its type map.)
        """
        numbers = graph.numbers
        if numbers.numel() == 0:
            return
        in_table = (numbers >= 0) & (numbers < N_ELEMENTS_TABLE)
        known = self._device_known[numbers.clamp(0, N_ELEMENTS_TABLE - 1)] & in_table
        if not bool(known.all()):
            self.check_elements(numbers.detach().cpu().numpy(), "batch passed to evaluate()")

    # ------------------------------------------------------------------ energy shifts
    def energy_shifts_by_number(self) -> dict[int, float]:
        """Current non-zero energy shifts, eV/atom, keyed by atomic number."""
        return {int(z): float(v) for z, v in enumerate(self._shift_table) if v != 0.0}

    def set_energy_shifts_by_number(self, shifts: dict[int, float]) -> None:
        """Replace all energy shifts (eV/atom, keyed by atomic number)."""
        self._shift_table.zero_()
        for z, value in shifts.items():
            self._shift_table[int(z)] = float(value)
        self._device_shift_table = self._shift_table.to(self.device)  # float64: see evaluate

    def add_energy_shifts(self, shifts_by_symbol: dict[str, float]) -> None:
        """Add per-element shifts (eV/atom, keyed by chemical symbol) to the current ones."""
        from ..delta import check_energy_shifts

        check_energy_shifts(shifts_by_symbol)
        current = self.energy_shifts_by_number()
        for symbol, value in shifts_by_symbol.items():
            z = symbol_to_number[symbol]
            current[z] = current.get(z, 0.0) + float(value)
        self.set_energy_shifts_by_number(current)

    # ------------------------------------------------------------------ deltas
    def check_delta_compatible(self, delta: SparseDelta, strict: bool = True) -> None:
        """Refuse a delta made for another backend or base model (``strict=False`` warns)."""
        from ..delta import check_fingerprint
        from ..errors import DeltaMismatchError

        if delta.metadata.backend and delta.metadata.backend != self.name:
            raise DeltaMismatchError(
                f"delta was made for a {delta.metadata.backend!r} model "
                f"({delta.metadata.base_model!r}); the loaded base {self.model_name!r} is a "
                f"{self.name!r} model"
            )
        check_fingerprint(delta, self.fingerprint, self.model_name, strict)
        shifted = sorted(symbol_to_number[s] for s in delta.metadata.energy_shifts if s in symbol_to_number)
        foreign = [chemical_symbols[z] for z in shifted if not self._known[z]]
        if foreign:
            raise DeltaMismatchError(
                f"delta shifts the energy of element(s) {', '.join(foreign)}, unknown to base model "
                f"{self.model_name!r} (it knows {_element_list(self.atomic_numbers)}); it was made "
                "for another model or edited"
            )

    def fill_metadata(self, meta: DeltaMetadata) -> DeltaMetadata:
        """Write this base's backend name, model name and fingerprint into ``meta``."""
        meta.backend = self.name
        meta.base_model = self.model_name
        meta.base_fingerprint = self.fingerprint
        return meta

    def describe(self) -> str:
        """One line saying what this backend holds."""
        return (
            f"{self.name} model {self.model_name!r}: cutoff {self.cutoff:g} Å, "
            f"{len(self.atomic_numbers)} elements, {sum(p.numel() for p in self.model.parameters())}"
            f" parameters, {dtype_name(self.dtype)} on {self.device}"
        )


def _element_list(numbers: Iterable[int], shown: int = 20) -> str:
    """``"H, C, N, O"``, or for a long list ``"89 elements between H and Pu"``."""
    symbols = [chemical_symbols[int(z)] for z in sorted(numbers)]
    if len(symbols) <= shown:
        return ", ".join(symbols)
    return f"{len(symbols)} elements between {symbols[0]} and {symbols[-1]}"
