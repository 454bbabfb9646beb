"""Loading torch checkpoints with ``weights_only=True`` and an explicit allow-list.

``torch.load(weights_only=True)`` refuses every Python global that is not on its allow-list.
Before loading, :func:`load_checkpoint` lists the globals a file refers to
(``torch.serialization.get_unsafe_globals_in_checkpoint``, which reads the pickle without
running it) and refuses the file if any lies outside the allow-list it was given. Only then are
those globals admitted, for this one load, through ``torch.serialization.safe_globals``.

Allow-lists name exact globals (``"torch.nn.functional.silu"``), module prefixes whose
*classes* are admitted (``"mace.modules."``: a pickle calls what it names, and a class builds an
object where a function of the same package could do anything, as ``numpy.testing`` has one
that runs a string of Python), and, in :data:`FUNCTION_PREFIXES`, the few modules whose
functions are pure tensor operations. A MACE model file is a pickled ``nn.Module``: its
allow-list admits mace's and e3nn's module classes and, because MACE stores ``torch.fx`` graph
modules,
torch's own ``reduce_graph_module``, which rebuilds such modules from the Python source saved
in the file. That source is executed on load, so MACE model files must come from a trusted
source: named foundation models are checked against SHA-256 digests (see
:mod:`.foundation_models`). SevenNet checkpoints need numpy arrays only.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BaseModelError, ModelNotFoundError, UnsafeCheckpointError
from ..file_kinds import describe_as_model_misplaced

NUMPY_ARRAYS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
)
"""What unpickling numpy arrays and scalars needs, and nothing else of numpy."""

MACE_ALLOWED = (
    "mace.modules.",
    "mace.tools.scatter.",
    "e3nn.o3.",
    "e3nn.nn.",
    "e3nn.math.",
    "e3nn.util.",
    "torch.nn.modules.",
    "torch.nn.functional.",
    "torch.nn.parameter.",
    "torch.nn.utils.",
    "torch.fx.graph_module.reduce_graph_module",
    "torch.fx._symbolic_trace.Tracer",
    "torch.fx.graph.Graph",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    *NUMPY_ARRAYS,
)

SEVENNET_ALLOWED = NUMPY_ARRAYS

# Globals whose pickled name differs from where numpy 2 keeps them.
_RENAMED = {
    "numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar": "numpy._core.multiarray.scalar",
}


FUNCTION_PREFIXES = ("torch.nn.functional.", "mace.tools.scatter.")
"""Modules whose functions (activations, scatter sums) a model may name: pure tensor operations.
Under any other prefix of an allow-list only classes are admitted."""


def _is_allowed(name: str, allowed: Iterable[str]) -> bool:
    if name in allowed:
        return True
    prefixes = [a for a in allowed if a.endswith(".") and name.startswith(a)]
    if not prefixes:
        return False
    if any(p.startswith(FUNCTION_PREFIXES) for p in prefixes):
        return True
    try:  # importing the module runs no code from the file; calling the object would
        obj = _resolve_global(name)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj[0] if isinstance(obj, tuple) else obj, type)


# numpy builds dtypes of these classes while unpickling arrays without naming them as globals.
_NUMPY_DTYPE_CLASSES = tuple(
    getattr(np.dtypes, n)
    for n in (
        "Float16DType",
        "Float32DType",
        "Float64DType",
        "Int8DType",
        "Int16DType",
        "Int32DType",
        "Int64DType",
        "BoolDType",
    )
    if hasattr(np, "dtypes") and hasattr(np.dtypes, n)
)


def _import_global(name: str) -> Any:
    module_name, _, attr = name.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_global(name: str) -> Any:
    """The object a pickled global name stands for (numpy 2 keeps some under new names)."""
    if name in _RENAMED and hasattr(np, "_core"):
        return (_import_global(_RENAMED[name]), name)
    return _import_global(name)


def load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever the file holds): the first line of its
    message that does not mention ``weights_only`` (torch 2.13: "Trying to load unsupported
    GLOBAL posix.system ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if "weights_only" not in line]
    return f"{type(exc).__name__}: {reasons[0] if reasons else 'no reason given'}"


def referenced_globals(path: str | Path) -> list[str]:
    """The Python globals a torch checkpoint refers to beyond torch's defaults (nothing is run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:
        hint = (
            "; a TorchScript (compiled) model cannot be changed by a delta: give the model file it "
            "was compiled from (mace_run_train writes NAME.model beside NAME_compiled.model)"
            if "torchscript" in str(exc).lower()
            else describe_as_model_misplaced(path)
        )
        raise BaseModelError(f"{path}: not a readable torch checkpoint ({exc}){hint}") from exc


def describe_non_model(loaded: Any) -> str:
    """What a checkpoint holds when it is not a whole model, and which file to give instead."""
    if isinstance(loaded, Mapping):
        keys = [str(k) for k in loaded]
        if "model" in loaded and {"optimizer", "lr_scheduler", "epoch"} & set(keys):
            return (
                f"a training checkpoint (keys {', '.join(keys[:6])}), not a model file; give the "
                "model file the training wrote (mace_run_train: NAME.model beside checkpoints/)"
            )
        if keys and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            kind = "MACE " if any(k.startswith(("node_embedding", "interactions.")) for k in keys) else ""
            return (
                f"a bare {kind}state dict (weights without the model they belong to); save the whole "
                "model instead (torch.save(model, path), as MACE's .model files are)"
            )
    return f"got a {type(loaded).__name__}"


def load_checkpoint(path: str | Path, allowed: Iterable[str]) -> Any:
    """``torch.load(path, weights_only=True)`` admitting only the globals in ``allowed``.

    Raises
    ------
    ModelNotFoundError
        The file does not exist.
    UnsafeCheckpointError
        The file refers to a global outside ``allowed`` (nothing from it has been executed).
    BaseModelError
        The file is not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file not found")
    allowed = tuple(allowed)
    names = referenced_globals(path)
    refused = sorted(n for n in names if not _is_allowed(n, allowed))
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refers to Python objects outside the allow-list: {', '.join(refused)}; "
            "refusing to load it"
        )
    try:
        safe = [_resolve_global(n) for n in names]
        if "numpy.dtype" in names:
            safe.extend(_NUMPY_DTYPE_CLASSES)
    except (ImportError, AttributeError) as exc:
        raise BaseModelError(f"{path}: refers to {exc}, which is not installed") from exc
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BaseModelError(f"{path}: cannot load checkpoint ({load_failure(exc)})") from exc
