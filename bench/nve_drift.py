"""Energy conservation in NVE MD: a fine-tuned delta against its bare base, in one run.

Runs velocity-Verlet MD from the same structure and the same initial velocities twice, once
with the bare base model and once with the base plus ``--delta``, and reports for each

* the drift of the total energy: slope of a straight-line fit, meV/atom/ps, and the change
  from the first to the last step, meV/atom;
* its fluctuation (standard deviation), meV/atom, beside the standard deviation of the
  kinetic energy (the energy that the integrator moves between kinetic and potential);
* the mean temperature, any NaN or inf, and the time per step.

A delta changes only constant weights, so the calibrated model is as smooth in the positions as
the base; what it can change is the stiffness of the surface (higher frequencies need smaller
steps). The ratios delta / base answer whether the delta costs stability at a given time step.

Systems: ``ethanol`` (first frame of examples/data/ethanol_test.xyz, 9 atoms) and ``si``
(diamond Si, cubic cell repeated ``--supercell`` times, at the DFT lattice constant of
examples/data/si_pbesol_reference.json).

Example
-------
OMP_NUM_THREADS=1 python bench/nve_drift.py --system ethanol \
    --delta examples/deltas/ethanol_sevennet0.safetensors --steps 4000 --timestep 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import machine_description, markdown_table, update_section

ROOT = Path(__file__).parents[1]
SECTION = "nve-drift"
FS_PER_PS = 1000.0


def starting_structure(system: str, supercell: int):
    """The starting ``ase.Atoms`` of a named system."""
    import ase.io
    from ase.build import bulk

    if system == "ethanol":
        return ase.io.read(ROOT / "examples" / "data" / "ethanol_test.xyz", index=0)
    reference = json.loads((ROOT / "examples" / "data" / "si_pbesol_reference.json").read_text())
    a0 = reference["equation_of_state"]["lattice_constant_A"]
    return bulk("Si", "diamond", a=a0, cubic=True).repeat(supercell)


def energy_statistics(result) -> dict:
    """Drift, fluctuation and temperature of one NVE run (energies in meV/atom, time in ps)."""
    n = result.n_atoms
    t_ps = result.time_fs / FS_PER_PS
    total = result.total_energy * 1000.0 / n
    finite = bool(np.isfinite(total).all() and np.isfinite(result.atoms.positions).all())
    slope = float(np.polyfit(t_ps, total, 1)[0]) if finite else float("nan")
    return {
        "finite": finite,
        "drift_slope_meV_atom_ps": slope,
        "drift_end_meV_atom": float(total[-1] - total[0]),
        "total_std_meV_atom": float(np.std(total)),
        "kinetic_std_meV_atom": float(np.std(result.kinetic_energy)) * 1000.0 / n,
        "mean_temperature_K": result.mean_temperature(),
        "ms_per_step": 1000.0 * result.wall_time_s / result.steps,
    }


def energy_ratios(runs: dict) -> dict:
    """Delta against base: fluctuation ratio, and the largest total-energy change over the run as a
    fraction of the kinetic-energy fluctuation (a drift is only meaningful against that scale)."""
    base, tuned = runs["base"], runs["base + delta"]
    return {
        "total_std": tuned["total_std_meV_atom"] / max(base["total_std_meV_atom"], 1e-12),
        "change_over_kinetic_std": {
            label: abs(r["drift_end_meV_atom"]) / r["kinetic_std_meV_atom"] for label, r in runs.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["ethanol", "si"], default="ethanol")
    parser.add_argument("--supercell", type=int, default=1, help="si: cubic cell repeats (8 n^3 atoms)")
    parser.add_argument("--base", default="sevennet-0")
    parser.add_argument("--delta", required=True, help="delta file of --base")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K of the initial velocities")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON summary (default: bench/results/nve-<system>.json)")
    parser.add_argument("--no-markdown", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.workflows.md import run_md

    atoms = starting_structure(args.system, args.supercell)
    runs = {}
    for label, delta in (("base", None), ("base + delta", args.delta)):
        calc = SparseCalc(args.base, delta=delta, default_dtype=args.dtype, device=args.device)
        result = run_md(
            atoms, calc, "nve", temperature_K=args.temperature, timestep_fs=args.timestep,
            steps=args.steps, seed=args.seed, progress=False,
        )  # fmt: skip
        runs[label] = energy_statistics(result)
        print(label, json.dumps(runs[label]), flush=True)

    ratios = energy_ratios(runs)
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python {' '.join(sys.argv)}"
    summary = {"command": command, "machine": machine_description(), "args": vars(args) | {"out": None},
               "n_atoms": len(atoms), "runs": runs, "ratios": ratios}  # fmt: skip
    out = args.out or ROOT / "bench" / "results" / f"nve-{args.system}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)
    if not args.no_markdown:
        write_markdown()


def write_markdown() -> None:
    """Add or replace this system's part of the "NVE energy conservation" section."""
    systems = sorted((ROOT / "bench" / "results").glob("nve-*.json"))
    parts = []
    for path in systems:
        data = json.loads(path.read_text())
        a, ratios = data["args"], energy_ratios(data["runs"])
        header = ["model", "drift (meV/atom/ps)", "E_tot change (meV/atom)", "E_tot std (meV/atom)",
                  "E_kin std (meV/atom)", "mean T (K)", "finite", "ms/step"]  # fmt: skip
        rows = [
            [label, f"{r['drift_slope_meV_atom_ps']:+.4f}", f"{r['drift_end_meV_atom']:+.4f}",
             f"{r['total_std_meV_atom']:.4f}", f"{r['kinetic_std_meV_atom']:.2f}",
             f"{r['mean_temperature_K']:.0f}", "yes" if r["finite"] else "**no**", f"{r['ms_per_step']:.1f}"]
            for label, r in data["runs"].items()
        ]  # fmt: skip
        parts.append(
            f"**{a['system']}** ({data['n_atoms']} atoms, {a['steps']} steps of {a['timestep']} fs from "
            f"{a['temperature']:.0f} K, {a['dtype']}, delta `{a['delta']}`)  \n"
            f"Command: `{data['command']}`  \nMachine: {data['machine']}\n\n"
            f"{markdown_table(header, rows)}\n\n"
            f"E_tot std, delta / base: {ratios['total_std']:.2f}. E_tot change over the run / E_kin std: "
            + ", ".join(f"{label} {100 * v:.1f} %" for label, v in ratios["change_over_kinetic_std"].items())
            + ".\n"
        )
    body = (
        "## NVE energy conservation with a delta\n\n"
        "`bench/nve_drift.py` runs velocity-Verlet MD twice from the same structure and velocities, "
        "with the bare base and with base + delta, and compares the drift and fluctuation of the "
        "total energy (straight-line slope over the run; standard deviation). The E_kin column is "
        "the energy the integrator moves between kinetic and potential, for scale.\n\n" + "\n".join(parts)
    )
    update_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
