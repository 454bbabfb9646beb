"""GPAW text outputs of a MoS2 monolayer at two plane-wave cutoffs: Pulay stress in a slab.

A slab's stress is over the whole cell, vacuum included, and across the vacuum it follows from
the forces alone (nothing interacts across it). At 400 eV the PBE stresses of MoS2 carry an
isotropic Pulay stress of about 0.2 GPa beyond that; at 800 eV it is gone. The test suite
reads both files and checks that fine-tuning's data checks report the first and not the
second (``tests/test_dft_outputs.py``).

Writes ``tests/data/gpaw_mos2_400eV.txt`` and ``tests/data/gpaw_mos2_800eV.txt``: four 3-atom
cells each, rattled by 0.04 Å and strained in-plane by -1, 0, +1 and +2 %, with 16 Å of vacuum.
Runs with Debian's GPAW (``apt install gpaw gpaw-data``, PBE datasets) in about seven minutes
on one core; name cutoffs to make only those files::

    OMP_NUM_THREADS=1 /usr/bin/python3 scripts/make_slab_pulay_example.py [CUTOFF ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ase.build import mx2
from gpaw import GPAW, PW, FermiDirac

OUT = Path(__file__).parents[1] / "tests" / "data"
LATTICE = 3.18  # Å, near PBE's 3.185


def frames(count: int = 4):
    """``count`` monolayers: rattled by 0.04 Å, strained in-plane by -1, 0, +1, +2 %."""
    for k in range(count):
        atoms = mx2("MoS2", kind="2H", a=LATTICE, thickness=3.19, vacuum=8.0)
        atoms.pbc = True  # a periodic cell with vacuum, as plane-wave codes take a slab
        atoms.rattle(0.04, seed=k)
        strain = 1 + 0.01 * (k - 1)
        atoms.set_cell(atoms.cell.array * [strain, strain, 1.0], scale_atoms=True)
        yield atoms


def main(cutoffs: list[int]) -> None:
    for cutoff in (400, 800):
        if cutoffs and cutoff not in cutoffs:
            continue
        calc = GPAW(
            mode=PW(cutoff),
            xc="PBE",
            kpts={"size": (6, 6, 1), "gamma": True},
            occupations=FermiDirac(0.05),
            symmetry="off",
            txt=str(OUT / f"gpaw_mos2_{cutoff}eV.txt"),
        )
        for atoms in frames():
            atoms.calc = calc
            atoms.get_forces()
            print(cutoff, atoms.get_potential_energy(), atoms.get_stress()[:3], flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
