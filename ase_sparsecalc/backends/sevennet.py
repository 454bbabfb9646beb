"""SevenNet backend (optional extra ``sevennet``; the sevenn package is GPL-3.0 and never vendored).

SevenNet-0 ships inside the sevenn wheel, so this backend works offline.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BackendNotInstalledError, BaseModelError
from ..torch_setup import prepare_torch
from .base import Backend, ModelOutput, WeightInfo, state_dict_fingerprint
from .safe_load import SEVENNET_ALLOWED, describe_non_model, load_checkpoint

_LAYER = re.compile(r"^(\d+)_(.*)$")
_VOIGT_TO_ASE = [0, 1, 2, 4, 5, 3]  # sevenn: xx yy zz xy yz zx -> ASE: xx yy zz yz xz xy


def import_sevenn() -> None:
    """Import sevenn after the torch set-up it needs, or say which extra to install."""
    prepare_torch()
    try:
        import sevenn  # noqa: F401
    except ImportError as exc:
        raise BackendNotInstalledError(
            "the SevenNet backend needs the sevenn package: pip install 'ase_sparsecalc[sevennet]'"
        ) from exc


@dataclass
class SevenNetBackend(Backend):
    """A SevenNet model (``AtomGraphSequential``) behind the backend interface.

    ``config`` is the checkpoint's model configuration (plain data), kept to rebuild the model
    for ``torch.compile`` (see :mod:`.accelerate`).
    """

    name = "sevennet"
    config: dict = field(default_factory=dict, repr=False)

    def _model_outputs(self, graph, compute_forces, compute_stress, training, parameters):
        import sevenn._keys as KEY

        edge_vec = graph.edge_vectors().detach().requires_grad_(True)
        data = {
            KEY.ATOMIC_NUMBERS: graph.numbers,
            KEY.NODE_FEATURE: graph.numbers,
            KEY.POS: graph.positions,
            KEY.EDGE_IDX: graph.edge_index,
            KEY.EDGE_VEC: edge_vec,
            KEY.BATCH: graph.batch,
            KEY.NUM_ATOMS: graph.ptr[1:] - graph.ptr[:-1],
            KEY.CELL_VOLUME: graph.volumes().clamp_min(torch.finfo(self.dtype).eps),
        }
        out = self._call_model(parameters, data)
        energy = out[KEY.PRED_TOTAL_ENERGY].reshape(-1)
        forces = out[KEY.PRED_FORCE] if compute_forces else None
        stress = None
        if compute_stress:
            voigt = -out[KEY.PRED_STRESS].reshape(-1, 6)[:, _VOIGT_TO_ASE]
            stress = _voigt_to_matrix(voigt)
        atom_energies = out.get(KEY.ATOMIC_ENERGY)
        return ModelOutput(energy=energy, forces=forces, stress=stress, atom_energies=atom_energies)

    def weight_infos(self) -> list[WeightInfo]:
        from e3nn import o3

        from .e3nn_paths import linear_segments, radial_mlp_infos

        infos: list[WeightInfo] = []
        for mod_name, module in self.model.named_children():
            layer, rest = _layer_of(mod_name)
            for sub_name, sub in module.named_modules():
                full = f"{mod_name}.{sub_name}" if sub_name else mod_name
                if isinstance(sub, o3.Linear) and sub.weight_numel > 0 and sub.internal_weights:
                    is_embedding = mod_name == "onehot_to_feature_x"
                    infos.append(
                        WeightInfo(
                            f"{full}.weight",
                            tuple(sub.weight.shape),
                            layer,
                            rest,
                            _kind_of(mod_name),
                            "flat",
                            linear_segments(sub, element_axis=0 if is_embedding else None),
                            self._element_order(),
                        )
                    )
                elif sub_name == "weight_nn":
                    infos.extend(radial_mlp_infos(full, sub, module.convolution, layer, rest))
        return infos

    def _element_order(self) -> tuple[int, ...]:
        """Atomic number of each one-hot index of the model."""
        type_map = self.model.type_map or {}
        by_index = sorted(type_map.items(), key=lambda item: item[1])
        return tuple(int(z) for z, _ in by_index)


def _voigt_to_matrix(voigt: torch.Tensor) -> torch.Tensor:
    """(G, 6) ASE Voigt (xx yy zz yz xz xy) -> (G, 3, 3)."""
    xx, yy, zz, yz, xz, xy = voigt.unbind(-1)
    return torch.stack(
        [torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1), torch.stack([xz, yz, zz], -1)],
        -2,
    )


def _layer_of(module_name: str) -> tuple[int | None, str]:
    match = _LAYER.match(module_name)
    return (int(match.group(1)), match.group(2)) if match else (None, module_name)


def _kind_of(module_name: str) -> str:
    if module_name == "onehot_to_feature_x":
        return "embedding"
    if module_name.startswith("reduce_"):
        return "readout"
    if "self_connection" in module_name:
        return "self_connection"
    return "linear"


@functools.cache
def _dtype_following_onehot() -> type:
    """sevenn's ``OnehotEmbedding`` with its outputs cast to the module's dtype.

    Made on first use (sevenn is optional) and reachable as this module's
    ``DtypeFollowingOnehot`` attribute, so that models holding it can be pickled and copied.
    """
    from sevenn.nn.node_embedding import OnehotEmbedding

    class DtypeFollowingOnehot(OnehotEmbedding):
        def forward(self, data):
            data = super().forward(data)
            for key in {self.key_x, self.key_additional_output} - {None}:
                data[key] = data[key].to(self.dtype_probe.dtype)
            return data

    DtypeFollowingOnehot.__module__ = __name__
    DtypeFollowingOnehot.__qualname__ = "DtypeFollowingOnehot"
    return DtypeFollowingOnehot


def __getattr__(name: str):
    """``DtypeFollowingOnehot`` on demand (pickle looks it up here)."""
    if name == "DtypeFollowingOnehot":
        return _dtype_following_onehot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_onehot_follow_dtype(model: torch.nn.Module) -> None:
    """sevenn's one-hot embedding always emits float32; make it follow the model's dtype.

    The replacement keeps the module's attributes and adds only a non-persistent zero-size
    buffer (so ``state_dict`` and the fingerprint are unchanged) that ``.to(dtype)`` casts.
    """
    from sevenn.nn.node_embedding import OnehotEmbedding

    following = _dtype_following_onehot()
    for name, module in model.named_children():
        if type(module) is OnehotEmbedding:
            module.__class__ = following
            module.register_buffer("dtype_probe", torch.zeros(0), persistent=False)
            model._modules[name] = module


def prepare_for_calculation(model: torch.nn.Module) -> None:
    """Set a freshly built SevenNet model up as this backend calls it (in place).

    Batched input, atomic numbers mapped to the model's types, one-hot embedding in the model's
    dtype.
    """
    model.set_is_batch_data(True)
    model.eval_type_map = True
    _make_onehot_follow_dtype(model)


def load_sevennet(
    path: str | Path, model_name: str, device: torch.device, dtype: torch.dtype
) -> SevenNetBackend:
    """Load a SevenNet checkpoint (``.pth`` with ``config`` and ``model_state_dict``)."""
    import_sevenn()
    from sevenn.util import model_from_checkpoint

    checkpoint = load_checkpoint(path, SEVENNET_ALLOWED)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        what = describe_non_model(checkpoint)
        if what.startswith("got a"):  # nothing recognised: say what a SevenNet checkpoint needs
            what = f"not a SevenNet checkpoint (no model_state_dict): {what}"
        raise BaseModelError(f"{path}: {what}")  # else e.g. a MACE training checkpoint, named
    try:
        model, config = model_from_checkpoint(checkpoint)
    except Exception as exc:
        raise BaseModelError(f"{path}: cannot build the SevenNet model ({exc})") from exc
    prepare_for_calculation(model)
    return SevenNetBackend(
        model=model,
        model_name=model_name,
        fingerprint=state_dict_fingerprint(model),
        cutoff=float(config["cutoff"]),
        atomic_numbers=tuple(sorted(int(z) for z in config["_type_map"])),
        device=device,
        dtype=dtype,
        config=config,
    )
