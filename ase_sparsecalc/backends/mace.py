"""MACE backend (mace-torch): any MACE model file and the named MACE foundation models."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import BaseModelError, StructureError
from ..graph import CHARGE_KEY, SPIN_KEY
from ..torch_setup import import_keeping_weights_only
from .base import Backend, ModelOutput, WeightInfo
from .safe_load import MACE_ALLOWED, describe_non_model, load_checkpoint

if TYPE_CHECKING:
    from ..delta import DeltaMetadata, SparseDelta
    from ..graph import AtomicGraph

_LAYER = re.compile(r"^(interactions|products|readouts)\.(\d+)\.(.*)$")

# Graph-level inputs a MACE model may be conditioned on (its ``embedding_specs``; the
# AtomicGraph field of the same name supplies each), and the atoms.info key they come from.
_CONDITIONING = {"total_charge": CHARGE_KEY, "total_spin": SPIN_KEY}


def import_mace() -> None:
    """Import e3nn and mace after the torch set-up they need."""
    import_keeping_weights_only("mace.modules")


@dataclass
class MaceBackend(Backend):
    """A MACE model (``ScaleShiftMACE``, ``MACE`` and relatives) behind the backend interface.

    Attributes
    ----------
    head : str
        The output head used (multi-head models); ``"default"`` for single-head ones.

    A model with charge and spin embeddings (``embedding_specs``, as in MACE-OMOL) gets each
    structure's ``atoms.info["charge"]`` and ``atoms.info["spin"]`` (spin multiplicity), as
    with MACE's own calculator.
    """

    name = "mace"
    head: str = "default"

    def __post_init__(self) -> None:
        heads = [str(h) for h in getattr(self.model, "heads", ["default"])]
        self._head_index = heads.index(self.head) if self.head in heads else 0
        self._embedding_specs = conditioning_specs(self.model, self.model_name)
        self._z_to_index = torch.full((119,), -1, dtype=torch.int64)
        for k, z in enumerate(self.atomic_numbers):
            self._z_to_index[z] = k
        e0 = _e0_row(self.model, self._head_index)
        self._e0 = None if e0 is None else e0.detach().to("cpu", torch.float64).clone()  # as loaded
        super().__post_init__()

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> MaceBackend:
        """Move and cast the model (and the element lookup tables) in place; returns self."""
        super().to(device, dtype)
        self._z_to_index = self._z_to_index.to(self.device)
        if self._e0 is not None:
            self._e0 = self._e0.to(self.device)
        return self

    def _model_outputs(self, graph, compute_forces, compute_stress, training, parameters):
        index = self._z_to_index[graph.numbers]
        node_attrs = torch.nn.functional.one_hot(index, len(self.atomic_numbers)).to(self.dtype)
        data = {
            "positions": graph.positions.detach().clone(),
            "node_attrs": node_attrs,
            "edge_index": graph.edge_index,
            "shifts": graph.edge_shifts(),
            "unit_shifts": graph.unit_shifts,
            "cell": _cell_with_unit_rows_for_open_axes(graph.cell).reshape(-1, 3),
            "batch": graph.batch,
            "ptr": graph.ptr,
            "head": torch.full((graph.n_graphs,), self._head_index, dtype=torch.int64, device=self.device),
        }
        for name in self._embedding_specs:
            data[name] = getattr(graph, name)
        out = self._call_model(
            parameters,
            data,
            training=training,
            compute_force=compute_forces,
            compute_stress=compute_stress,
        )
        energy, atom_energies = out["energy"], out.get("node_energy")
        if atom_energies is not None and self._adds_e0_in_float64:
            energy, atom_energies = self._with_float64_e0(atom_energies, index, graph)
        stress = out.get("stress") if compute_stress else None
        return ModelOutput(
            energy=energy,
            forces=out.get("forces") if compute_forces else None,
            stress=None if stress is None else stress.reshape(-1, 3, 3),
            atom_energies=atom_energies,
        )

    def reference_energies(self) -> torch.Tensor | None:
        """The model's isolated-atom energies E0 (eV) of this backend's head, one per element in
        the model's order and dtype: a view of the model's buffer, so writing to it changes the
        model (None for a model without them)."""
        return _e0_row(self.model, self._head_index)

    @property
    def _adds_e0_in_float64(self) -> bool:
        """Whether :meth:`_with_float64_e0` applies: a model below float64 whose per-atom
        energies sum to its energy (not so with an embedding readout, whose energy MACE adds to
        the total only)."""
        return (
            self.dtype != torch.float64
            and self._e0 is not None
            and not hasattr(self.model, "embedding_readout")
        )

    def _with_float64_e0(
        self, node_energy: torch.Tensor, index: torch.Tensor, graph: AtomicGraph
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (G,) and per-atom energies (N,), eV, float64, with the E0s added in float64.

        In float32 the model adds each atom's isolated-atom energy E0 in float32 and sums the
        atoms in float32. With E0s of hundreds of eV (all-electron references, as MACE-OFF's)
        the total then drifts by eV in cells of thousands of atoms. Here each atom's E0 as the
        model added it (its value in the model's dtype; the one-hot product is exact) is replaced
        by the float64 E0 and the atoms are summed in float64.
        """
        e0_in_model = self.reference_energies()[index]
        atoms = node_energy.to(torch.float64) - e0_in_model.to(torch.float64) + self._e0[index]
        zeros = torch.zeros(graph.n_graphs, dtype=torch.float64, device=atoms.device)
        return zeros.index_add(0, graph.batch, atoms), atoms

    def fill_metadata(self, meta: DeltaMetadata) -> DeltaMetadata:
        """As the base class, and for a multi-head model the head."""
        super().fill_metadata(meta)
        meta.head = self.head if len(getattr(self.model, "heads", ["default"])) > 1 else None
        return meta

    def check_delta_compatible(self, delta: SparseDelta, strict: bool = True) -> None:
        """As the base class, and refuse a delta fitted through another head of the model
        (its energy shifts and readout changes belong to that head)."""
        super().check_delta_compatible(delta, strict)
        head = delta.metadata.head
        if head is not None and head != self.head:
            from ..delta import refuse_or_warn

            refuse_or_warn(
                f"delta was fitted through head {head!r} of {delta.metadata.base_model!r}, but the "
                f"loaded base uses head {self.head!r} (load it with head={head!r})",
                strict,
            )

    @property
    def takes_charge_and_spin(self) -> bool:
        return bool(self._embedding_specs)

    def _check_charge_and_spin_values(self, charge: float, spin: float, where: str) -> None:
        values = {"total_charge": charge, "total_spin": spin}
        for name, spec in self._embedding_specs.items():
            if spec.get("type") != "categorical":
                continue
            value, offset, classes = values[name], int(spec.get("offset", 0)), int(spec["num_classes"])
            if value != round(value) or not 0 <= value + offset < classes:
                raise StructureError(
                    f"{where}: atoms.info[{_CONDITIONING[name]!r}] = {value:g}, but base model "
                    f"{self.model_name!r} takes {name} only as an integer from {-offset} to "
                    f"{classes - 1 - offset}"
                )

    def weight_infos(self) -> list[WeightInfo]:
        from e3nn import o3
        from mace.modules.symmetric_contraction import SymmetricContraction

        from .e3nn_paths import linear_segments, radial_mlp_infos, tensor_product_segments
        from .e3nn_paths import whole_tensor_segment as whole

        infos: list[WeightInfo] = []
        n_el = len(self.atomic_numbers)
        for mod_name, module in self.model.named_modules():
            layer, rest = _layer_of(mod_name)
            kind = _kind_of(mod_name)
            segments = None
            if isinstance(module, o3.Linear) and module.weight_numel > 0 and module.internal_weights:
                # the node embedding, and the edge-source/target embeddings of mace's nonlinear
                # interaction blocks, read the element one-hot: their input axis is the element
                one_hot = mod_name.endswith("_embedding") and module.irreps_in == o3.Irreps(f"{n_el}x0e")
                is_embedding = mod_name.startswith("node_embedding") or one_hot
                segments = linear_segments(module, element_axis=0 if is_embedding else None)
            elif isinstance(module, o3.TensorProduct) and module.internal_weights and module.weight_numel > 0:
                in2 = module.irreps_in2
                element_input = 2 if (len(in2) == 1 and in2[0].mul == n_el and in2[0].ir.l == 0) else None
                segments = tensor_product_segments(module, element_input)
            if segments is not None:
                infos.append(
                    WeightInfo(
                        f"{mod_name}.weight",
                        tuple(module.weight.shape),
                        layer,
                        rest,
                        kind,
                        "flat",
                        segments,
                        self.atomic_numbers,
                    )
                )
            elif mod_name.endswith("conv_tp_weights"):
                parent = self.model.get_submodule(mod_name.rsplit(".", 1)[0])
                infos.extend(radial_mlp_infos(mod_name, module, parent.conv_tp, layer, rest))
            elif isinstance(module, SymmetricContraction):
                for k, contraction in enumerate(module.contractions):
                    l_out = module.irreps_out[k].ir.l
                    for pname, param in contraction.named_parameters():
                        # one row per element; one shared row with use_agnostic_product
                        axis = 0 if param.shape[0] == n_el else None
                        infos.append(
                            WeightInfo(
                                f"{mod_name}.contractions.{k}.{pname}",
                                tuple(param.shape),
                                layer,
                                f"{rest}.contractions.{k}.{pname}",
                                "symmetric_contraction",
                                "flat",
                                whole(tuple(param.shape), None, l_out, element_axis=axis),
                                self.atomic_numbers,
                            )
                        )
        return infos


def _e0_row(model: torch.nn.Module, head_index: int) -> torch.Tensor | None:
    """The row of the model's E0 buffer (``atomic_energies_fn.atomic_energies``, one row per head
    or a single one) that a head uses, as a view; None for a model without E0s."""
    table = getattr(getattr(model, "atomic_energies_fn", None), "atomic_energies", None)
    if not isinstance(table, torch.Tensor):
        return None
    return table if table.dim() == 1 else table[head_index]


def _cell_with_unit_rows_for_open_axes(cell: torch.Tensor) -> torch.Tensor:
    """Cells (G, 3, 3) with every all-zero row (an open axis) replaced by that axis' unit vector.

    MACE divides the virial by the cell volume. A molecule (zero cell) in a batch that also
    holds crystals would give 0/0 there, and its NaN would reach every weight gradient even
    though its stress is never used. Zero rows only occur on non-periodic axes, whose unit
    shifts are zero, so edge vectors do not change.
    """
    zero_rows = (cell == 0).all(dim=-1, keepdim=True)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    return torch.where(zero_rows, eye.expand_as(cell), cell)


def _layer_of(module_name: str) -> tuple[int | None, str]:
    match = _LAYER.match(module_name + ".")
    if match is None:
        return None, module_name
    return int(match.group(2)), f"{match.group(1)}.{match.group(3).rstrip('.')}"


def _kind_of(module_name: str) -> str:
    if module_name.startswith("node_embedding"):
        return "embedding"
    if module_name.startswith("readouts"):
        return "readout"
    if "skip_tp" in module_name:
        return "self_connection"
    if "conv_tp_weights" in module_name:
        return "radial"
    return "linear"


def load_mace_model(path: str | Path) -> torch.nn.Module:
    """Load a MACE model file with ``weights_only=True`` and the MACE allow-list."""
    import_mace()
    model = load_checkpoint(path, MACE_ALLOWED)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "atomic_numbers"):
        what = describe_non_model(model)
        raise BaseModelError(f"{path}: {'not a MACE model file: ' if what.startswith('got a') else ''}{what}")
    kind = type(model).__name__
    if "Dipole" in kind or "Dielectric" in kind:
        raise BaseModelError(
            f"{path}: the model is an {kind} (dipoles, with per-atom charges as input), not a "
            "potential this calculator drives; use an energy model (MACE, ScaleShiftMACE)"
        )
    return model


def conditioning_specs(model: torch.nn.Module, model_name: str) -> dict[str, dict]:
    """The model's charge and spin embeddings (``embedding_specs``; empty when it has none).

    Raises
    ------
    BaseModelError
        The model is conditioned on an input other than total charge and spin.
    """
    if not hasattr(model, "joint_embedding"):
        return {}
    specs = dict(getattr(model, "embedding_specs", None) or {})
    unsupported = sorted(set(specs) - set(_CONDITIONING))
    if unsupported:
        raise BaseModelError(
            f"{model_name}: the model is conditioned on {', '.join(unsupported)}; only total_charge "
            "and total_spin (atoms.info['charge'] and ['spin']) can be supplied"
        )
    return specs


def mace_backend_from_module(
    model: torch.nn.Module,
    model_name: str,
    device: torch.device,
    dtype: torch.dtype,
    head: str | None = None,
) -> MaceBackend:
    """Wrap an in-memory MACE model (its fingerprint is taken as it is now)."""
    from .base import state_dict_fingerprint

    heads = [str(h) for h in getattr(model, "heads", ["default"])]
    if head is None:
        head = heads[0] if len(heads) == 1 else next((h for h in heads if h.lower() == "default"), None)
        if head is None:
            raise BaseModelError(f"{model_name}: multi-head model; choose a head with head=... from {heads}")
    elif head not in heads:
        raise BaseModelError(f"{model_name}: no head {head!r}; available heads: {heads}")
    return MaceBackend(
        model=model,
        model_name=model_name,
        fingerprint=state_dict_fingerprint(model),
        cutoff=float(model.r_max),
        atomic_numbers=tuple(int(z) for z in model.atomic_numbers),
        device=device,
        dtype=dtype,
        head=head,
    )
