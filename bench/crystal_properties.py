"""Physical properties of calibrated crystals against the same DFT: a0, B, phonons at Γ and X.

For every delta of a ``finetune_accuracy.py`` run on ``si`` or ``cu`` (zero-shot = ``shift``,
``sparse``, ``full``, ...), this computes with the calculator

* the equilibrium lattice constant and bulk modulus from a Birch-Murnaghan fit to an E-V scan
  of the conventional cubic cell (±4 %, 9 points), and
* the harmonic phonon frequencies at Γ and X at the model's own lattice constant, with phonopy
  (primitive cell, supercell = the conventional cubic cell, in which X is commensurate, so the
  frequencies at Γ and X are exact for the model),

and compares them with the DFT reference computed by ``scripts/make_dft_data.py`` with the same
settings as the training data.

Example
-------
python bench/finetune_accuracy.py --dataset si --methods shift sparse full --epochs 100
python bench/crystal_properties.py --system si
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.eos import EquationOfState

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import machine_description, markdown_table, update_section

from ase_sparsecalc import SparseCalc

ROOT = Path(__file__).parents[1]
STRUCTURE = {"si": ("Si", "diamond"), "cu": ("Cu", "fcc")}
X_POINT = (0.5, 0.0, 0.5)  # X in the reduced coordinates of the fcc primitive reciprocal lattice


def equation_of_state(calc: SparseCalc, symbol: str, structure: str, a_guess: float) -> dict:
    """Birch-Murnaghan fit of the conventional cell over ±4 % in lattice constant."""
    volumes, energies = [], []
    for scale in np.linspace(0.96, 1.04, 9):
        atoms = bulk(symbol, structure, a=a_guess * scale, cubic=True)
        atoms.calc = calc
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, _, b0 = eos.fit()
    return {"lattice_constant_A": float(v0 ** (1 / 3)), "bulk_modulus_GPa": float(b0 / units.GPa)}


def gamma_x_frequencies(calc: SparseCalc, symbol: str, structure: str, a0: float) -> dict[str, list[float]]:
    """Phonon frequencies (THz) at Γ and X with phonopy, supercell = conventional cubic cell."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    prim = bulk(symbol, structure, a=a0)
    unit = PhonopyAtoms(
        symbols=prim.get_chemical_symbols(),
        cell=prim.cell.array,
        scaled_positions=prim.get_scaled_positions(),
    )
    phonon = Phonopy(unit, supercell_matrix=[[-1, 1, 1], [1, -1, 1], [1, 1, -1]], primitive_matrix=None)
    phonon.generate_displacements(distance=0.01, is_plusminus=True)
    from ase import Atoms

    supercells = [
        Atoms(s.symbols, cell=s.cell, scaled_positions=s.scaled_positions, pbc=True)
        for s in phonon.supercells_with_displacements
    ]
    phonon.forces = [r["forces"] for r in calc.batch_evaluate(supercells, ["energy", "forces"])]
    phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    out = {}
    for label, q in (("Gamma", (0.0, 0.0, 0.0)), ("X", X_POINT)):
        out[label] = [round(float(f), 4) for f in np.sort(phonon.get_frequencies(q))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, choices=sorted(STRUCTURE))
    parser.add_argument(
        "--results", type=Path, help="finetune_accuracy JSON (default: results/finetune-<system>.json)"
    )
    parser.add_argument("--base", default="sevennet-0")
    parser.add_argument("--section", help="results name and docs section (default: properties-<system>)")
    args = parser.parse_args()
    section = args.section or f"properties-{args.system}"

    symbol, structure = STRUCTURE[args.system]
    reference = json.loads((ROOT / "examples" / "data" / f"{args.system}_pbesol_reference.json").read_text())
    results_path = args.results or Path(__file__).parent / "results" / f"finetune-{args.system}.json"
    results = json.loads(results_path.read_text())
    eos_ref = reference["equation_of_state"]
    a_ref = eos_ref["lattice_constant_A"]
    rows, records = [], []
    ref_freqs = {k: reference["phonons"][k]["frequencies_THz"] for k in ("Gamma", "X")}
    rows.append(_row("PBEsol DFT (GPAW)", a_ref, eos_ref["bulk_modulus_GPa"], ref_freqs))
    for row in results["rows"]:
        start = time.monotonic()
        calc = SparseCalc(args.base, delta=ROOT / row["delta"], default_dtype="float64")
        eos = equation_of_state(calc, symbol, structure, a_ref)
        freqs = gamma_x_frequencies(calc, symbol, structure, eos["lattice_constant_A"])
        label = "zero-shot (+ shifts)" if row["method"] == "shift" else row["method"]
        rows.append(_row(label, eos["lattice_constant_A"], eos["bulk_modulus_GPa"], freqs))
        records.append(
            {"method": row["method"], **eos, "phonons_THz": freqs, "time_s": time.monotonic() - start}
        )
        print(json.dumps(records[-1]), flush=True)
    out = Path(__file__).parent / "results" / f"{section}.json"
    out.write_text(json.dumps({"reference": reference, "models": records}, indent=1))
    table = markdown_table(["model", "a0 (Å)", "B (GPa)", "ω_Γ optical (THz)", "ω_X (THz)"], rows)
    body = (
        f"### {symbol} ({structure}): physical properties against the same DFT\n\n"
        f"Command: `python {' '.join(sys.argv)}`  \nMachine: {machine_description()}; "
        f"{time.strftime('%Y-%m-%d')}. Deltas from the `{results_path.stem}` run above; phonons at "
        "each model's own lattice constant (DFT: at the DFT one).\n\n" + table + "\n"
    )
    update_section(section, body)
    print(body)


def _row(label: str, a0: float, bulk_modulus: float, freqs: dict[str, list[float]]) -> list[str]:
    optical = max(freqs["Gamma"])
    optical_text = f"{optical:.2f}" if optical > 0.1 else "– (one atom per cell)"
    return [label, f"{a0:.4f}", f"{bulk_modulus:.1f}", optical_text, _distinct(freqs["X"])]


def _distinct(frequencies: list[float], tol: float = 0.02) -> str:
    values = []
    for f in sorted(frequencies):
        if not values or abs(f - values[-1]) > tol:
            values.append(f)
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
