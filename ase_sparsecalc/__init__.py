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

# Imported here, not on first use: importing the subpackage ``ase_sparsecalc.finetune`` binds
# the package attribute ``finetune`` to the subpackage, and only this later binding makes
# ``from ase_sparsecalc import finetune`` the function whatever was imported before.
from .finetune import finetune
from .torch_setup import prepare_torch

# e3nn 0.4.4 (under mace and sevenn) cannot be imported under torch >= 2.6 without ``slice`` on
# torch's weights_only allow-list: put it there now, so that a script importing this package can
# import mace's or sevenn's own calculators afterwards (to compare with them, say).
prepare_torch()

__all__ = [
    "DeltaMetadata",
    "SparseCalc",
    "SparseDelta",
    "TensorDelta",
    "__version__",
    "finetune",
    "load_backend",
]
