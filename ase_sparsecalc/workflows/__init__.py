"""Simulation workflows with a :class:`~ase_sparsecalc.SparseCalc` (or any ASE calculator).

run_md
    NVE / NVT / NPT molecular dynamics with ASE's integrators (:mod:`.md`).
relax
    Geometry optimisation of positions and, optionally, the cell (:mod:`.relax`).
phonons
    Harmonic phonons, DOS and thermal properties through phonopy (:mod:`.phonons`).
"""

from __future__ import annotations

from .md import MDResult, run_md
from .phonons import (
    ImaginaryMode,
    PhononSummary,
    frequencies_at,
    imaginary_modes,
    phonons,
    special_point_frequencies,
    summarize_phonons,
)
from .relax import RelaxResult, relax

__all__ = [
    "ImaginaryMode",
    "MDResult",
    "PhononSummary",
    "RelaxResult",
    "frequencies_at",
    "imaginary_modes",
    "phonons",
    "relax",
    "run_md",
    "special_point_frequencies",
    "summarize_phonons",
]
