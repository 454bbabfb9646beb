"""GPAW text outputs of an 8-atom MgO cell at two plane-wave cutoffs: Pulay stress on real data.

At 350 eV, enough for rough energies, the stress of MgO (PBE) carries a spurious isotropic
Pulay stress of about +0.58 eV/Å³ (93 GPa); at 700 eV it is gone. The test suite reads both
files and checks that fine-tuning's data checks report the first and not the second
(``tests/test_dft_outputs.py``).

Writes ``tests/data/gpaw_mgo_350eV.txt`` (three rattled frames, strained by -1, 0 and +1 %),
``tests/data/gpaw_mgo_700eV.txt`` (one rattled frame, strained by -1 %) and
``tests/data/gpaw_mgo_500eV.txt`` (six rattled frames, strained by -1 to +4 %: a cutoff whose
smaller Pulay stress shows as stresses that disagree with the slope of the energies against
volume). Runs with Debian's GPAW (``apt install gpaw gpaw-data``, PBE datasets) in about six
minutes on one core; name cutoffs to make only those files::

    OMP_NUM_THREADS=1 /usr/bin/python3 scripts/make_pulay_example.py [CUTOFF ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ase.build import bulk
from gpaw import GPAW, PW

OUT = Path(__file__).parents[1] / "tests" / "data"
LATTICE = 4.21  # Å, near PBE's 4.25


def frames(count: int):
    """``count`` cells of 8 atoms: rattled by 0.06 Å, isotropically strained by -1, 0, +1 %, ..."""
    for k in range(count):
        atoms = bulk("MgO", "rocksalt", a=LATTICE, cubic=True)
        atoms.rattle(0.06, seed=k)
        atoms.set_cell(atoms.cell.array * (1 + 0.01 * (k - 1)), scale_atoms=True)
        yield atoms


def main(cutoffs: list[int]) -> None:
    for cutoff, count in ((350, 3), (700, 1), (500, 6)):
        if cutoffs and cutoff not in cutoffs:
            continue
        calc = GPAW(
            mode=PW(cutoff),
            xc="PBE",
            kpts=(2, 2, 2),
            symmetry="off",
            txt=str(OUT / f"gpaw_mgo_{cutoff}eV.txt"),
        )
        for atoms in frames(count):
            atoms.calc = calc
            atoms.get_forces()
            print(cutoff, atoms.get_potential_energy(), atoms.get_stress()[:3], flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
