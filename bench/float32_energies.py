"""Float32 total energies of a MACE model with all-electron-size E0s, against float64, in one run.

A small MACE model (built here, seed 1) with isolated-atom energies E0 of -13.6 (H), -1029.5 (C)
and -2042.0 eV (O), like MACE-OFF's, evaluates periodic boxes of ethanol molecules (8 per
10 Å box, repeated) in float32 and in float64:

* ``SparseCalc`` (float32), which adds the E0s in float64 and sums the atoms in float64;
* MACE's own ``MACECalculator`` (float32, on the same model file), which adds and sums them in
  float32.

The table gives each float32 total energy minus the float64 one (SparseCalc in float64).
Forces are not affected and not shown.

Example
-------
OMP_NUM_THREADS=2 python bench/float32_energies.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import table_section, update_section_locked

SECTION = "float32-energies"


def ethanol_box(repeat: tuple[int, int, int]) -> Atoms:
    """Eight ethanol molecules in a 10 Å periodic box, repeated ``repeat`` times."""
    box = Atoms(cell=[10.0, 10.0, 10.0], pbc=True)
    for corner in np.ndindex(2, 2, 2):
        ethanol = molecule("CH3CH2OH")
        ethanol.translate(5.0 * np.array(corner) + 2.0)
        box += ethanol
    return box.repeat(repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import save_mace_model

    folder = Path(tempfile.mkdtemp())
    e0s = [-13.6, -1029.5, -2042.0, -4.0, -3.5]  # H, C, O, Si, Cu
    model = save_mace_model(folder / "e0.model", atomic_energies=e0s, seed=1)
    from mace.calculators import MACECalculator

    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # MACECalculator unpickles its model file,
    try:  # with weights_only off through this variable; for this (trusted) file only
        own = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float32")
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    rows = []
    for repeat in ((1, 1, 2), (2, 2, 2), (4, 4, 2)):
        atoms = ethanol_box(repeat)
        energies = {}
        for label, calc in (
            ("float64", SparseCalc(model, default_dtype="float64")),
            ("float32", SparseCalc(model, default_dtype="float32")),
            ("mace32", own),
        ):
            atoms.calc = calc
            energies[label] = atoms.get_potential_energy()
        reference = energies["float64"]
        row = [len(atoms), reference, energies["float32"] - reference, energies["mace32"] - reference]
        rows.append(row)
        print(row, flush=True)
    body = table_section(
        "Float32 total energies with large E0s (MACE)",
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python bench/float32_energies.py",
        "Ethanol boxes, small MACE model with E0s of -1029.5 eV (C) and -2042 eV (O); float32 "
        "total energy minus SparseCalc's float64 one.",
        ["atoms", "E float64 (eV)", "SparseCalc float32 − float64 (eV)", "MACECalculator f32 − f64 (eV)"],
        rows,
    )
    if not args.no_write:
        update_section_locked(SECTION, body)


if __name__ == "__main__":
    main()
