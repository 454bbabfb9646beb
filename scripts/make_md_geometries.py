"""Sample thermal geometries of bulk Si and Cu with SevenNet-0 molecular dynamics.

The geometries are the starting point of the ``md_*K`` frames of the DFT data set
written by ``scripts/make_dft_data.py``; only positions and cells are kept, the
SevenNet-0 energies and forces are discarded and every frame is later
recomputed with DFT.

Method
------
For each system and temperature a Langevin NVT trajectory (time step 1 fs,
friction 0.01 / fs, centre of mass fixed) is run in the conventional cubic cell (8-atom diamond Si,
4-atom fcc Cu) at the experimental room-temperature lattice constant.  After
``--equilibration`` steps, one snapshot is stored every ``--interval`` steps.
The DFT script later rescales every snapshot isotropically to the DFT
equilibrium lattice constant (fractional coordinates are kept), so the exact
lattice constant used here is immaterial.

Random numbers are seeded, so a rerun on the same machine and software stack
reproduces the file; on other hardware the chaotic trajectories diverge and the
snapshots are statistically, not bitwise, equivalent.

Run with the Python environment in which ``sevenn`` is installed::

    python scripts/make_md_geometries.py --out examples/data/md_geometries.extxyz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.constraints import FixCom
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

#: Experimental room-temperature lattice constants (Angstrom).
LATTICE_CONSTANTS = {"si": 5.431, "cu": 3.615}

#: Snapshots stored per temperature.
SNAPSHOTS = {"si": 10, "cu": 7}

TEMPERATURES_K = (300, 600, 1000)


def conventional_cell(system: str) -> Atoms:
    """Return the conventional cubic cell of ``system``.

    Parameters
    ----------
    system
        ``"si"`` (8-atom diamond cell) or ``"cu"`` (4-atom fcc cell).

    Returns
    -------
    Atoms
        The ideal crystal at the experimental lattice constant.
    """
    a = LATTICE_CONSTANTS[system]
    if system == "si":
        return bulk("Si", "diamond", a=a, cubic=True)
    return bulk("Cu", "fcc", a=a, cubic=True)


def make_calculator():
    """Return a SevenNet-0 calculator running on one CPU thread.

    Returns
    -------
    SevenNetCalculator
        The bundled SevenNet-0 model.
    """
    import torch

    # Recent torch versions refuse to unpickle ``slice`` objects unless they
    # are explicitly allowed; the SevenNet-0 checkpoint contains some.
    torch.serialization.add_safe_globals([slice])
    torch.set_num_threads(1)
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator("7net-0", device="cpu")


def sample(
    system: str,
    temperature_k: float,
    n_snapshots: int,
    equilibration: int,
    interval: int,
    seed: int,
    calc,
) -> list[Atoms]:
    """Run one Langevin trajectory and return evenly spaced snapshots.

    Parameters
    ----------
    system
        ``"si"`` or ``"cu"``.
    temperature_k
        Thermostat temperature in kelvin.
    n_snapshots
        Number of snapshots to keep.
    equilibration
        Number of MD steps discarded before the first snapshot.
    interval
        Number of MD steps between snapshots.
    seed
        Seed of the random-number generator (initial velocities and noise).
    calc
        ASE calculator providing the forces.

    Returns
    -------
    list of Atoms
        Snapshots without calculator, with ``info`` keys ``system``,
        ``temperature_K``, ``md_step`` and ``md_model``.
    """
    rng = np.random.default_rng(seed)
    atoms = conventional_cell(system)
    atoms.calc = calc
    atoms.set_constraint(FixCom())
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    dyn = Langevin(
        atoms,
        timestep=1.0 * units.fs,
        temperature_K=temperature_k,
        friction=0.01 / units.fs,
        fixcm=False,
        rng=rng,
    )
    dyn.run(equilibration)
    snapshots = []
    for i in range(n_snapshots):
        dyn.run(interval)
        snap = Atoms(
            atoms.get_chemical_symbols(),
            positions=atoms.get_positions(),
            cell=atoms.get_cell(),
            pbc=True,
        )
        snap.info.update(
            system=system,
            temperature_K=float(temperature_k),
            md_step=equilibration + (i + 1) * interval,
            md_model="SevenNet-0",
            md_lattice_constant=LATTICE_CONSTANTS[system],
        )
        snapshots.append(snap)
    return snapshots


def main() -> None:
    """Parse the command line and write the snapshot file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/md_geometries.extxyz"))
    parser.add_argument("--equilibration", type=int, default=400)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()

    calc = make_calculator()
    frames: list[Atoms] = []
    for s, system in enumerate(("si", "cu")):
        for t, temperature in enumerate(TEMPERATURES_K):
            frames += sample(
                system,
                temperature,
                SNAPSHOTS[system],
                args.equilibration,
                args.interval,
                args.seed + 100 * s + t,
                calc,
            )
            print(f"{system} {temperature} K: {SNAPSHOTS[system]} snapshots", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write(args.out, frames, format="extxyz")


if __name__ == "__main__":
    main()
