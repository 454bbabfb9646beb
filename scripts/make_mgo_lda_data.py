"""LDA DFT data for rock-salt MgO with GPAW: an oxide and a functional the base models never saw.

SevenNet-0 and MACE-MP were fitted to PBE(+U) data; LDA binds MgO more tightly (lattice
constant about 4.17 Å against PBE's 4.25 Å). Writes ``examples/data/mgo_lda.extxyz``: frames of
the 8-atom cubic cell, with energy (extrapolated to zero smearing), free energy, forces and stress
(Pulay-corrected, as in ``make_dft_data.py``) as calculator results and ``info["split"]``
(train/test, about 22 % test per ``config_type``, fixed seed).

Frames: ``rattle`` (8, random displacements of 0.03-0.1 Å at a0), ``strain_rattle`` (8,
isotropic strains of +-1.5 % and +-3 % with 0.05 Å displacements), ``shear_rattle`` (8, random
strain tensors up to 3 % with 0.05 Å displacements), ``eos`` (5, ideal cells strained by -4 to
+4 %). Settings: LDA with GPAW's bundled datasets, plane waves 600 eV, 2x2x2 Monkhorst-Pack
k-points (off Gamma), Fermi-Dirac 0.01 eV, no symmetry. About 15-20 minutes on one core::

    OMP_NUM_THREADS=1 /usr/bin/python3 scripts/make_mgo_lda_data.py

Finished frames are appended to ``mgo_lda.partial.extxyz`` beside the output, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

sys.path.insert(0, str(Path(__file__).parent))
from make_dft_data import assign_splits, random_strain, rattled, strained, tagged

OUT = Path(__file__).parents[1] / "examples" / "data" / "mgo_lda.extxyz"
A0 = 4.17  # Å, LDA
CUTOFF = 600.0  # eV
PULAY_STEP = 25.0  # eV
FRAME_SEED = 2026
SETTINGS = {"xc": "LDA", "pw_cutoff_eV": CUTOFF, "kpts": "2x2x2", "smearing_width_eV": 0.01}


def calculator(cutoff: float = CUTOFF):
    from gpaw import GPAW, PW, FermiDirac

    return GPAW(
        mode=PW(cutoff),
        xc="LDA",
        kpts={"size": (2, 2, 2), "gamma": False},
        occupations=FermiDirac(0.01),
        convergence={"energy": 1e-5, "density": 1e-5},
        symmetry="off",
        txt=None,
    )


def structures() -> list[Atoms]:
    """The frames to compute, tagged with their ``config_type``."""
    rng = np.random.default_rng(FRAME_SEED)
    ideal = bulk("MgO", "rocksalt", a=A0, cubic=True)
    frames = [tagged(rattled(ideal, s, rng), "rattle") for s in np.linspace(0.03, 0.1, 8)]
    for e in (-0.03, -0.015, 0.015, 0.03):
        for _ in range(2):
            frames.append(tagged(rattled(strained(ideal, e * np.eye(3)), 0.05, rng), "strain_rattle"))
    for _ in range(8):
        frames.append(tagged(rattled(strained(ideal, random_strain(rng)), 0.05, rng), "shear_rattle"))
    frames += [tagged(strained(ideal, e * np.eye(3)), "eos") for e in np.linspace(-0.04, 0.04, 5)]
    return frames


def dedecut() -> float:
    """dE/dEcut (eV per eV) of the ideal cell, central difference of the free energy."""
    energies = []
    for sign in (-1, 1):
        atoms = bulk("MgO", "rocksalt", a=A0, cubic=True)
        atoms.calc = calculator(CUTOFF + sign * PULAY_STEP)
        energies.append(atoms.get_potential_energy(force_consistent=True))
    return (energies[1] - energies[0]) / (2 * PULAY_STEP)


def compute(atoms: Atoms, slope: float) -> Atoms:
    """A copy of ``atoms`` with DFT results; the stress carries the Pulay correction."""
    work = atoms.copy()
    work.calc = calculator()
    pulay = 2 / 3 * CUTOFF * slope / work.get_volume()
    results = {
        "energy": work.get_potential_energy(),
        "free_energy": work.get_potential_energy(force_consistent=True),
        "forces": work.get_forces(),
        "stress": work.get_stress() + pulay * np.array([1, 1, 1, 0, 0, 0]),
    }
    import gpaw

    out = atoms.copy()
    out.info.update(SETTINGS, dft_code=f"GPAW {gpaw.__version__}", pulay_dedecut=slope)
    out.calc = SinglePointCalculator(out, **results)
    return out


def main() -> None:
    partial = OUT.with_suffix(".partial.extxyz")
    done = read(partial, ":") if partial.exists() else []
    slope = done[0].info["pulay_dedecut"] if done else dedecut()
    print(f"dE/dEcut = {slope:.6f}", flush=True)
    todo = structures()
    for k, atoms in enumerate(todo[len(done) :], start=len(done)):
        frame = compute(atoms, slope)
        write(partial, frame, append=True)
        done.append(frame)
        print(k, atoms.info["config_type"], frame.get_potential_energy(), flush=True)
    frames = read(partial, ":")
    assign_splits(frames)
    write(OUT.with_suffix(".tmp.extxyz"), frames)
    OUT.with_suffix(".tmp.extxyz").replace(OUT)
    partial.unlink()
    print(f"{len(frames)} frames written to {OUT}")


if __name__ == "__main__":
    main()
