"""Faster inference copies of a model: cuEquivariance kernels (MACE) and ``torch.compile`` (opt-in).

A backend keeps its plain e3nn model as the one true set of weights: deltas are merged into it,
fine-tuning differentiates it, fingerprints are taken from it. An accelerator holds a second,
faster model with the same weights that the backend uses for inference only
(:meth:`Backend.evaluate` without ``parameters`` and not training). Before every call the
accelerator compares the e3nn weights with those it last copied (storage and in-place version
counter of every parameter) and copies them again when they changed, so a delta applied or
removed in any way is always seen.

* ``cueq``: MACE converted with ``mace.cli.convert_e3nn_cueq`` (mace-torch >= 0.3.10), weights
  mapped by its ``transfer_weights`` (symmetric contractions are re-packed, everything else is
  copied). Needs ``cuequivariance`` and ``cuequivariance-torch``, and on GPUs
  ``cuequivariance-ops-torch-cu12`` (or ``-cu13``) for the fused kernels:
  ``pip install 'ase_sparsecalc[cuda]'``. Without them (on the CPU, say) it runs a naive
  fallback, far slower than e3nn, with a warning; that is how it is tested on the CPU.
* ``compile``: the model rebuilt without e3nn's TorchScript code generation and wrapped in
  ``torch.compile(dynamic=True)``. MACE is prepared by its own recipe
  (``mace.tools.compile.prepare``, one graph); SevenNet is rebuilt from its checkpoint
  configuration with e3nn's ``Activation`` modules traced by ``torch.fx``, its energy compiled
  as one graph and its force output run after it (:class:`CompiledSevenNet`). The first call of
  each new shape class compiles (tens of seconds to minutes); see ``docs/performance.md`` for
  when it pays off.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..errors import BackendNotInstalledError, BaseModelError, ConfigError

if TYPE_CHECKING:
    from .base import Backend

logger = logging.getLogger(__name__)

ACCELERATIONS = ("cueq", "compile")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The modes ``torch.compile`` accepts."""


def weights_version(model: torch.nn.Module) -> tuple:
    """Identity of a model's current weights: storage and in-place version of every parameter.

    Changes whenever a parameter is modified in place (a delta applied or removed) or replaced
    (moved to another device or dtype).
    """
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


class Accelerator(ABC):
    """A faster inference copy of a backend's model, re-synchronised when its weights change.

    Parameters
    ----------
    source : torch.nn.Module
        The backend's model (read, never modified).
    device : torch.device
    dtype : torch.dtype
    """

    name = ""

    def __init__(self, source: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.module = self._build(source)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self._synced = weights_version(source)

    @abstractmethod
    def _build(self, source: torch.nn.Module) -> torch.nn.Module:
        """The accelerated model, with the weights ``source`` has now."""

    @abstractmethod
    def _copy_weights(self, source: torch.nn.Module) -> None:
        """Copy ``source``'s weights into ``self.module`` (in place)."""

    def sync(self, source: torch.nn.Module) -> None:
        """Copy the weights again if ``source`` changed since the last copy."""
        version = weights_version(source)
        if version != self._synced:
            with torch.no_grad():
                self._copy_weights(source)
            self._synced = version
            logger.debug("%s model re-synchronised with the e3nn weights", self.name)

    def __call__(self, source: torch.nn.Module, *args, **kwargs):
        """Run the accelerated model on the weights ``source`` has now."""
        self.sync(source)
        return self.module(*args, **kwargs)


class CueqAccelerator(Accelerator):
    """MACE with cuEquivariance tensor products (converted by mace-torch)."""

    name = "cueq"

    def _build(self, source):
        _require_modules(
            ("cuequivariance", "cuequivariance_torch"),
            "enable_cueq=True needs cuequivariance and cuequivariance-torch (and, for the fused "
            "GPU kernels, cuequivariance-ops-torch-cu12 or -cu13): pip install 'ase_sparsecalc[cuda]'",
        )
        if self.device.type != "cuda" or importlib.util.find_spec("cuequivariance_ops_torch") is None:
            warnings.warn(
                f"cuEquivariance on {self.device.type} without its fused kernels "
                "(cuequivariance-ops-torch, CUDA only) runs a naive fallback that is far slower than "
                "e3nn (about 30x per call measured on a CPU, minutes to convert): use it on a GPU "
                "with pip install 'ase_sparsecalc[cuda]', or leave enable_cueq off",
                UserWarning,
                stacklevel=2,
            )
        from mace.cli.convert_e3nn_cueq import run as e3nn_to_cueq
        from mace.tools.scripts_utils import extract_config_mace_model

        config = extract_config_mace_model(source)
        self._transfer_args = (
            len(config["hidden_irreps"].slices()) - 1,
            config["correlation"],
            config["num_interactions"],
            config.get("use_reduced_cg", True),
            config.get("keep_last_layer_irreps", False),
        )
        with _default_dtype(self.dtype):
            try:
                module = e3nn_to_cueq(source, device=self.device.type, return_model=True)
            except Exception as exc:  # mace raises plain exceptions for unsupported models
                raise BaseModelError(
                    f"cannot convert this MACE model to cuEquivariance ({type(exc).__name__}: {exc}); "
                    "run without --cueq (enable_cueq=False)"
                ) from exc
        return module.to(self.device, self.dtype)

    def _copy_weights(self, source):
        from mace.cli.convert_e3nn_cueq import transfer_weights

        with _default_dtype(self.dtype):
            transfer_weights(source, self.module, *self._transfer_args)


class CompiledAccelerator(Accelerator):
    """A model rebuilt for and wrapped in ``torch.compile`` (inference); one subclass per family."""

    name = "compile"
    family = ""
    fullgraph = True

    def __init__(self, source, device, dtype, mode: str | None = None) -> None:
        self.mode = mode
        super().__init__(source, device, dtype)

    @abstractmethod
    def _prepare(self, source: torch.nn.Module) -> torch.nn.Module:
        """An uncompiled copy of ``source`` without TorchScript parts (weights copied later)."""

    def _build(self, source):
        with _default_dtype(self.dtype), _e3nn_codegen_off():
            prepared = self._prepare(source)
        self.prepared = prepared.to(self.device, self.dtype)
        for p in self.prepared.parameters():
            p.requires_grad_(False)
        self._copy_weights(source)
        return torch.compile(self.prepared, mode=self.mode, fullgraph=self.fullgraph, dynamic=True)

    def _copy_weights(self, source):
        # load_state_dict copies in place, so the compiled graphs (which take the parameters
        # as inputs) stay valid; the source's extra entries (flags of zeroed symmetric
        # contraction weights) have no counterpart, but every parameter must be filled
        result = self.prepared.load_state_dict(source.state_dict(), strict=False)
        if result.missing_keys:
            raise BaseModelError(
                f"torch.compile copy of the {self.family} model lacks weights for {result.missing_keys[:5]}"
            )


class CompiledMace(CompiledAccelerator):
    """MACE prepared by ``mace.tools.compile.prepare`` (one graph, autograd inside it)."""

    family = "MACE"

    def _prepare(self, source):
        from mace.tools.compile import prepare
        from mace.tools.scripts_utils import extract_model

        return prepare(extract_model)(model=copy.deepcopy(source), map_location=self.device.type)

    def __call__(self, source, data, **kwargs):
        # as MACE's own calculator calls a compiled model: the inputs that forces and stresses
        # differentiate require grad before entering the graph, and training=True keeps the
        # autograd.grad inside it differentiable; the caller detaches the outputs
        data = dict(data)
        data["positions"] = data["positions"].detach().requires_grad_(True)
        data["node_attrs"] = data["node_attrs"].detach().requires_grad_(True)
        kwargs["training"] = True
        return super().__call__(source, data, **kwargs)


class CompiledSevenNet(CompiledAccelerator):
    """SevenNet's energy part compiled as one graph; its force/stress output run eagerly.

    The model is rebuilt from its checkpoint configuration with e3nn's ``Activation`` modules
    traced by ``torch.fx``. Its last module (forces and stresses by ``torch.autograd.grad`` on
    the edge vectors) is taken out and called after the compiled part, so the gradient runs
    through the compiled backward. Kept inside, the ``autograd.grad`` would break dynamo's
    trace inside the model's loop over its modules, and dynamo would then compile each module
    on its own (33 graphs for SevenNet-0, recompiled per layer shape). The sizes SevenNet reads
    from tensors (``int(batch.max())``) are captured as symbolic integers.
    """

    family = "SevenNet"
    fullgraph = False  # a later sevenn that breaks the graph falls back to eager parts, not errors

    def __init__(self, source, device, dtype, mode: str | None = None, config: dict | None = None) -> None:
        if not config:
            raise BaseModelError(
                "torch.compile of a SevenNet model needs the configuration of its checkpoint; "
                "load the model with load_backend/SparseCalc"
            )
        self.config = config
        super().__init__(source, device, dtype, mode)

    def _prepare(self, source):
        from e3nn.nn import Activation
        from sevenn.model_build import build_E3_equivariant_model

        from .sevennet import prepare_for_calculation

        model = build_E3_equivariant_model(copy.deepcopy(self.config))
        _trace_modules(model, (Activation,))
        prepare_for_calculation(model)
        self.gradient_output = _take_gradient_output(model).eval()
        return model

    def __call__(self, source, data, **kwargs):
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            data = super().__call__(source, data, **kwargs)
        return self.gradient_output(data)


def _take_gradient_output(model: torch.nn.Module) -> torch.nn.Module:
    """Remove and return a SevenNet model's last module, which differentiates the energy.

    The model then returns energies only and no longer sets ``requires_grad`` on its inputs
    (the backend passes edge vectors that require it).
    """
    name, module = next(reversed(model._modules.items()))
    if not hasattr(module, "get_grad_key") or module.get_grad_key() != model.key_grad:
        raise BaseModelError(
            f"cannot compile this SevenNet model: its last module {name!r} is not the force output "
            "(run it without compile_mode)"
        )
    model.delete_module_by_key(name)
    model.key_grad = None
    return module


def _trace_modules(module: torch.nn.Module, types: tuple[type, ...]) -> None:
    """Replace every submodule of one of ``types`` by its ``torch.fx`` trace (in place).

    A traced module has no Python attributes left for dynamo to guard on (e3nn's ``Irreps``
    cannot be guarded: their ``len`` is undefined).
    """
    from torch.fx import symbolic_trace

    for name, child in module.named_children():
        if isinstance(child, types):
            setattr(module, name, symbolic_trace(child))
        else:
            _trace_modules(child, types)


@contextlib.contextmanager
def _e3nn_codegen_off() -> Iterator[None]:
    """Build e3nn modules as plain ``torch.fx`` code instead of TorchScript (for dynamo)."""
    from e3nn import get_optimization_defaults, set_optimization_defaults

    previous = get_optimization_defaults()["jit_script_fx"]
    set_optimization_defaults(jit_script_fx=False)
    try:
        yield
    finally:
        set_optimization_defaults(jit_script_fx=previous)


def check_compile_mode(mode: str | None) -> None:
    """Raise :class:`ConfigError` unless ``mode`` is None or one of :data:`COMPILE_MODES`."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")


def make_accelerator(backend: Backend, kind: str, compile_mode: str | None = None) -> Accelerator:
    """An accelerator of ``kind`` (``"cueq"``: MACE; ``"compile"``: MACE or SevenNet) for a backend.

    Raises
    ------
    ConfigError
        Unknown ``kind`` or ``compile_mode``.
    BaseModelError
        ``cueq`` for a model that is not MACE (sevenn 0.10.4 has no cuEquivariance path).
    BackendNotInstalledError
        ``cueq`` without the cuequivariance packages.
    """
    if kind not in ACCELERATIONS:
        raise ConfigError(f"acceleration must be one of {ACCELERATIONS}, got {kind!r}")
    if kind == "compile":
        check_compile_mode(compile_mode)
    supported = {"cueq": ("mace",), "compile": ("mace", "sevennet")}[kind]
    if backend.name not in supported:
        option = "enable_cueq" if kind == "cueq" else "compile_mode"
        raise BaseModelError(
            f"{kind} acceleration is implemented for {' and '.join(supported)} bases; "
            f"{backend.model_name!r} is a {backend.name!r} model (run it without {option})"
        )
    if kind == "cueq":
        return CueqAccelerator(backend.model, backend.device, backend.dtype)
    if backend.name == "sevennet":
        return CompiledSevenNet(
            backend.model, backend.device, backend.dtype, compile_mode, config=backend.config
        )
    return CompiledMace(backend.model, backend.device, backend.dtype, compile_mode)


def _require_modules(names: tuple[str, ...], message: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise BackendNotInstalledError(f"{message} (missing: {', '.join(missing)})")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """mace's converters set torch's global default dtype; restore it afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
