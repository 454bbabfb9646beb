"""ase_sparsecalc: calibrate equivariant foundation potentials to your DFT with sparse deltas.

Public API
----------
SparseCalc
    ASE calculator: base foundation model + sparse delta merged into its weights.
SparseDelta, TensorDelta, DeltaMetadata
    The delta: changed entries of the model's weights, plus provenance.
load_backend
    Load a base model (MACE or SevenNet) behind the common backend interface.
finetune
    Fit a delta to DFT data (see :mod:`ase_sparsecalc.finetune`).
"""

from __future__ import annotations

from ._version import __version__
from .backends import load_backend
from .calculator import SparseCalc
from .delta import DeltaMetadata, SparseDelta, TensorDelta

__all__ = [
    "DeltaMetadata",
    "SparseCalc",
    "SparseDelta",
    "TensorDelta",
    "__version__",
    "finetune",
    "load_backend",
]


def __getattr__(name: str):
    if name == "finetune":
        from .finetune import finetune

        return finetune
    raise AttributeError(f"module 'ase_sparsecalc' has no attribute {name!r}")
