"""Relax crystalline silicon (positions and cell) and check the result with an equation of state.

Usage::

    python examples/relax_silicon.py [--delta DELTA|none] [--out DIR]

Starts from a strained, rattled primitive cell, relaxes it with FrechetCellFilter, then fits a
Birch-Murnaghan equation of state to energies of isotropically scaled copies: its minimum must
sit at the relaxed volume. Writes ``relaxed.extxyz``, ``relax.traj``, ``relax.log`` and
``eos.png`` into DIR (default ``examples/output/relax_silicon``). From the command line::

    sparsecalc relax si.extxyz --delta DELTA --cell --fmax 0.001 --optimizer BFGS -o relaxed.extxyz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.eos import EquationOfState
from ase.units import GPa
from matplotlib.figure import Figure

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.structure_io import write_structure
from ase_sparsecalc.workflows import relax

HERE = Path(__file__).resolve().parent
DEFAULT_DELTA = HERE / "deltas" / "si_pbesol_sevennet0.safetensors"
A_EXPERIMENT = 5.431  # Å, diamond Si at room temperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delta",
        default=DEFAULT_DELTA if DEFAULT_DELTA.exists() else None,
        help="delta file; 'none' runs the bare SevenNet-0 model (as the figures in docs/workflows.md)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "output" / "relax_silicon")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if str(args.delta).lower() == "none":
        args.delta = None
    calc = SparseCalc("sevennet-0", delta=args.delta, default_dtype="float64")
    print(f"delta: {args.delta}" if args.delta else "no delta file: running the bare SevenNet-0 base model")

    start = bulk("Si", "diamond", a=5.30)
    start.set_cell(
        start.cell.array @ np.array([[1.02, 0.01, 0], [0, 0.99, 0.01], [0, 0, 1.01]]), scale_atoms=True
    )
    start.rattle(0.05, seed=0)
    result = relax(
        start,
        calc,
        fmax=1e-3,
        cell=True,
        optimizer="BFGS",
        trajectory=args.out / "relax.traj",
        logfile=args.out / "relax.log",
    )
    write_structure(args.out / "relaxed.extxyz", result.atoms)
    a_cubic = (4 * result.volume) ** (1 / 3)  # the conventional cell holds 4 primitive cells
    print(
        f"converged: {result.converged} after {result.steps} steps; max force {result.max_force:.1e} eV/Å, "
        f"max |stress| {np.abs(result.stress_gpa).max():.4f} GPa"
    )
    print("cell a, b, c (Å), alpha, beta, gamma (°):", np.round(result.cellpar, 4))
    print(f"cubic lattice constant {a_cubic:.4f} Å (experiment {A_EXPERIMENT} Å)")

    # equation of state around the relaxed cell
    volumes, energies = [], []
    for scale in np.linspace(0.97, 1.03, 7):
        atoms = result.atoms.copy()
        atoms.set_cell(result.atoms.cell * scale, scale_atoms=True)
        atoms.calc = calc
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, e0, b0 = eos.fit()
    print(
        f"EOS: V0 {v0:.3f} Å^3 (relaxed {result.volume:.3f} Å^3), B0 {b0 / GPa:.1f} GPa (experiment 98 GPa)"
    )

    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    v_fit = np.linspace(min(volumes), max(volumes), 100)
    ax.plot(v_fit, 1e3 * (eos.func(v_fit, *eos.eos_parameters) - e0) / len(result.atoms), color="C0")
    ax.plot(volumes, 1e3 * (np.array(energies) - e0) / len(result.atoms), "o", color="C1")
    ax.axvline(result.volume, color="0.5", ls=":", label="relaxed")
    ax.set_xlabel("volume per primitive cell (Å$^3$)")
    ax.set_ylabel("E - E$_0$ (meV/atom)")
    ax.set_title(f"Si: a = {a_cubic:.4f} Å, B$_0$ = {b0 / GPa:.0f} GPa")
    ax.legend(frameon=False)
    fig.savefig(args.out / "eos.png", dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
