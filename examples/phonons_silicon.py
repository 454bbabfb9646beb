"""Phonons of crystalline silicon: bands, DOS and thermal properties with phonopy.

Usage::

    python examples/phonons_silicon.py [--delta DELTA|none] [--out DIR] [--supercell N]

Relaxes the primitive cell first (phonons need the structure at its minimum), then evaluates
the displaced 3x3x3 supercells in one batched call. Writes phonopy.yaml, FORCE_CONSTANTS,
band.yaml, total_dos.dat, thermal_properties.yaml, phonons.png and thermal_properties.png into
DIR (default ``examples/output/phonons_silicon``). From the command line::

    sparsecalc phonons relaxed.extxyz --delta DELTA --supercell 3 3 3 --mesh 20 20 20 -o DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ase.build import bulk

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.workflows import phonons, relax, summarize_phonons
from ase_sparsecalc.workflows.phonons import THZ_TO_CM1

HERE = Path(__file__).resolve().parent
DEFAULT_DELTA = HERE / "deltas" / "si_pbesol_sevennet0.safetensors"
# experiment (inelastic neutron scattering, 296 K), THz
EXPERIMENT = {"Γ": {"TO/LO": 15.53}, "X": {"TA": 4.49, "LA/LO": 12.32, "TO": 13.90}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delta",
        default=DEFAULT_DELTA if DEFAULT_DELTA.exists() else None,
        help="delta file; 'none' runs the bare SevenNet-0 model (as the figures in docs/workflows.md)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "output" / "phonons_silicon")
    parser.add_argument("--supercell", type=int, default=3)
    args = parser.parse_args()

    if str(args.delta).lower() == "none":
        args.delta = None
    calc = SparseCalc("sevennet-0", delta=args.delta, default_dtype="float64")
    print(f"delta: {args.delta}" if args.delta else "no delta file: running the bare SevenNet-0 base model")

    si = relax(bulk("Si", "diamond", a=5.43), calc, fmax=1e-4, cell=True, optimizer="BFGS").atoms
    print(f"relaxed cubic lattice constant: {(4 * si.get_volume()) ** (1 / 3):.4f} Å")

    phonon = phonons(si, calc, supercell=args.supercell, mesh=(20, 20, 20), output_dir=args.out)
    summary = summarize_phonons(phonon, temperature_K=300)
    for label in ("Γ", "X", "L"):
        freqs = summary.special_points[label]
        print(f"{label}: " + "  ".join(f"{f:6.2f}" for f in freqs) + " THz")
    for label, modes in EXPERIMENT.items():
        print(f"experiment at {label}: " + ", ".join(f"{k} {v:.2f} THz" for k, v in modes.items()))
    top = summary.max_frequency
    print(f"highest frequency {top:.2f} THz = {top * THZ_TO_CM1:.0f} cm^-1 (Raman line: 520 cm^-1)")
    print("imaginary modes:", summary.imaginary or "none")
    print(
        f"300 K: F = {summary.free_energy:.3f} kJ/mol, S = {summary.entropy:.2f} J/(K mol), "
        f"Cv = {summary.heat_capacity:.2f} J/(K mol) per mole of Si2"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
