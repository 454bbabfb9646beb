"""Molecular-dynamics steps per second: 512-atom Si crystal, velocity Verlet, ``SparseCalc``.

SevenNet-0 with a random 3 % delta merged (the default base), 4x4x4 cubic diamond Si (512
atoms) with Maxwell-Boltzmann velocities at 300 K, ``ase.md.verlet.VelocityVerlet`` with a
1 fs step. One model call per step (energy, forces and stress come from the same call). The
first step (model warm-up) is not timed; the median step time gives steps per second.

Examples
--------
python bench/speed_md.py                  # float32 and float64 on the CPU
python bench/speed_md.py --device cuda --steps 50
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import markdown_table, median, parse_args, wall_timed, write_results


def _extra(parser) -> None:
    parser.add_argument("--steps", type=int, help="timed steps (default: 4 on cpu, 50 on cuda; --quick: 2)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--size", type=int, default=4, help="supercell repeats n (8 n^3 atoms; default 4)")


def run_md(dtype: str, device: str, steps: int, size: int) -> dict:
    """Time ``steps`` velocity-Verlet steps after one warm-up step."""
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    calc = SparseCalc("sevennet-0", device=device, default_dtype=dtype)
    calc.set_delta(random_sparse_delta(calc.backend, density=0.03, seed=0))
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((size, size, size))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(1)  # warm-up (first call also computes the initial forces)
    times, walls, energies = [], [], []
    for _ in range(steps):
        wall, cpu, _ = wall_timed(lambda: dyn.run(1), device)
        times.append(wall if device == "cuda" else cpu)
        walls.append(wall)
        energies.append(atoms.get_total_energy())
    step = median(times)
    return {
        "dtype": dtype,
        "atoms": len(atoms),
        "steps": steps,
        "step_s": step,
        "step_wall_s": median(walls),
        "steps_per_s": 1.0 / step,
        "ns_per_day_at_1fs": 86400.0 / step * 1e-6,
        "total_energy_drift_eV": float(energies[-1] - energies[0]),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    steps = args.steps or (2 if args.quick else (50 if args.device == "cuda" else 4))
    dtypes = ["float32"] if args.quick else args.dtypes
    results, rows = [], []
    for dtype in dtypes:
        res = run_md(dtype, args.device, steps, args.size)
        results.append(res)
        print(res, flush=True)
        rows.append(
            [
                dtype,
                res["atoms"],
                res["steps"],
                1e3 * res["step_s"],
                res["steps_per_s"],
                res["ns_per_day_at_1fs"],
            ]
        )
    table = markdown_table(["dtype", "atoms", "timed steps", "ms/step", "steps/s", "ns/day (1 fs)"], rows)
    write_results("md", args, {"results": results}, [("VelocityVerlet, SevenNet-0 + 3 % delta", table)])
    print(table)


if __name__ == "__main__":
    main()
