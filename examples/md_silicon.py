"""Molecular dynamics of crystalline silicon: Langevin NVT at 300 K, then NVE.

Usage::

    python examples/md_silicon.py [--delta DELTA|none] [--out DIR] [--steps N]

The NVT part brings the 8-atom cubic cell to 300 K; the NVE part continues from there with
velocity Verlet, whose total energy must stay flat. Writes ``nvt.traj``, ``nvt.log``,
``nve.traj``, ``nve.log`` and ``md_silicon.png`` into DIR (default ``examples/output/md_silicon``).
The same run from the command line::

    sparsecalc md si.extxyz --delta DELTA --ensemble nvt --temperature 300 --timestep 2 \\
        --friction 0.02 --seed 1 --steps 150 --traj nvt.traj --log nvt.log
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ase.build import bulk
from matplotlib.figure import Figure

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.workflows import run_md

HERE = Path(__file__).resolve().parent
DEFAULT_DELTA = HERE / "deltas" / "si_pbesol_sevennet0.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delta",
        default=DEFAULT_DELTA if DEFAULT_DELTA.exists() else None,
        help="delta file; 'none' runs the bare SevenNet-0 model (as the figures in docs/workflows.md)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "output" / "md_silicon")
    parser.add_argument("--steps", type=int, default=150, help="steps of each part (2 fs each)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if str(args.delta).lower() == "none":
        args.delta = None
    calc = SparseCalc("sevennet-0", delta=args.delta, default_dtype="float64")
    print(f"delta: {args.delta}" if args.delta else "no delta file: running the bare SevenNet-0 base model")

    si = bulk("Si", "diamond", a=5.43, cubic=True)
    nvt = run_md(
        si,
        calc,
        "nvt",
        temperature_K=300,
        timestep_fs=2.0,
        steps=args.steps,
        friction_per_fs=0.02,
        trajectory=args.out / "nvt.traj",
        logfile=args.out / "nvt.log",
        seed=1,
    )
    print(f"NVT: mean T {nvt.mean_temperature():.0f} K, mean P {nvt.pressure.mean():.2f} GPa")

    # NVE from the last NVT frame, keeping its velocities (drop the thermostat's FixCom constraint)
    start = nvt.atoms.copy()
    start.set_constraint()
    nve = run_md(
        start,
        calc,
        "nve",
        timestep_fs=2.0,
        steps=args.steps,
        init_velocities=False,
        trajectory=args.out / "nve.traj",
        logfile=args.out / "nve.log",
    )
    drift, fluct = 1e3 * nve.drift_per_atom, 1e3 * nve.fluctuation_per_atom
    print(
        f"NVE: mean T {nve.mean_temperature():.0f} K; total energy over {nve.time_fs[-1]:.0f} fs: "
        f"drift {drift:+.3f} meV/atom, fluctuation {fluct:.3f} meV/atom"
    )

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax_t, ax_e = fig.subplots(2, 1, sharex=True)
    t_nve = nve.time_fs + nvt.time_fs[-1]
    ax_t.plot(nvt.time_fs, nvt.temperature, label="NVT (Langevin)")
    ax_t.plot(t_nve, nve.temperature, label="NVE (velocity Verlet)")
    ax_t.axhline(300, color="0.5", lw=0.8, ls=":")
    ax_t.set_ylabel("T (K)")
    ax_t.legend(frameon=False, ncols=2)
    n = len(si)
    e0 = nve.total_energy[0]
    ax_e.plot(t_nve, 1e3 * (nve.potential_energy - e0) / n, label="potential")
    ax_e.plot(t_nve, 1e3 * (nve.total_energy - e0) / n, label="total", color="k")
    ax_e.set_xlabel("time (fs)")
    ax_e.set_ylabel("E - E_tot(0) (meV/atom)")
    ax_e.legend(frameon=False, ncols=2)
    fig.savefig(args.out / "md_silicon.png", dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
