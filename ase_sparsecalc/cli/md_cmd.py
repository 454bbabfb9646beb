"""``sparsecalc md``: molecular dynamics (NVE, NVT, NPT) with a base model plus delta."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from . import add_model_arguments, make_calculator
from ._common import (
    add_charge_arguments,
    add_structure_arguments,
    announce,
    load_structure,
    non_negative_float,
    positive_float,
    positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsecalc md``."""
    from ..workflows.md import BAROSTATS, ENSEMBLES, THERMOSTATS

    parser = subparsers.add_parser(
        "md",
        help="run molecular dynamics (NVE, NVT, NPT)",
        description=(
            "Molecular dynamics with ASE's integrators: velocity Verlet (NVE), Langevin, Bussi or "
            "Nosé-Hoover chain (NVT), MTK (NPT). Velocities start Maxwell-Boltzmann at the target "
            "temperature with zero total momentum, or as the structure carries them with "
            "--keep-velocities. Writes a trajectory and, with --log, a table of time, energies, "
            "temperature, pressure and volume."
        ),
    )
    add_structure_arguments(parser)
    add_charge_arguments(parser)
    add_model_arguments(parser)
    md = parser.add_argument_group("dynamics")
    md.add_argument("--ensemble", choices=ENSEMBLES, default="nve", help="(default: nve)")
    md.add_argument(
        "--temperature",
        type=non_negative_float,
        default=300.0,
        metavar="K",
        help="target/initial T (default: 300; 0 starts NVE from rest)",
    )
    md.add_argument(
        "--keep-velocities",
        action="store_true",
        help="start from the velocities the structure carries (the last frame of a trajectory, to "
        "continue a run) instead of drawing new ones at --temperature",
    )
    md.add_argument("--timestep", type=positive_float, default=1.0, metavar="FS", help="fs (default: 1)")
    md.add_argument("--steps", type=positive_int, default=1000, metavar="N", help="(default: 1000)")
    md.add_argument(
        "--seed", type=int, default=0, help="seed of velocities and thermostat noise (default: 0)"
    )
    md.add_argument("--thermostat", choices=THERMOSTATS, default="langevin", help="NVT thermostat")
    md.add_argument(
        "--friction", type=positive_float, default=0.01, metavar="PER_FS", help="Langevin friction, 1/fs"
    )
    md.add_argument(
        "--tdamp", type=positive_float, metavar="FS", help="thermostat time constant (default: 100 steps)"
    )
    md.add_argument(
        "--pressure", type=float, default=0.0, metavar="GPA", help="NPT pressure (default: 0; npt only)"
    )
    md.add_argument("--barostat", choices=BAROSTATS, default="isotropic", help="NPT cell freedom")
    md.add_argument(
        "--pdamp", type=positive_float, metavar="FS", help="barostat time constant (default: 1000 steps)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--traj", default="md.traj", help="trajectory file, .traj or .extxyz (default: md.traj)")
    out.add_argument("--traj-interval", type=positive_int, default=10, metavar="N", help="steps per frame")
    out.add_argument("--log", help="text log of energies, temperature and pressure")
    out.add_argument("--log-interval", type=positive_int, default=1, metavar="N", help="steps per log line")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..workflows.md import run_md

    atoms = load_structure(args)
    carries_velocities = bool(atoms.get_momenta().any())
    if args.keep_velocities and not carries_velocities:
        raise ConfigError(
            f"{args.structure} (frame {args.index}): --keep-velocities, but the structure carries no "
            "velocities; leave it out to draw them at --temperature"
        )
    calc = make_calculator(args)
    announce(args, atoms, calc)
    if carries_velocities and not args.keep_velocities:
        print(
            f"{args.structure} carries velocities; they are replaced by new ones at "
            f"{args.temperature:g} K (--keep-velocities continues them)"
        )
    result = run_md(
        atoms,
        calc,
        ensemble=args.ensemble,
        temperature_K=args.temperature,
        timestep_fs=args.timestep,
        steps=args.steps,
        trajectory=args.traj,
        logfile=args.log,
        seed=args.seed,
        init_velocities=not args.keep_velocities,
        thermostat=args.thermostat,
        friction_per_fs=args.friction,
        tdamp_fs=args.tdamp,
        pressure_GPa=args.pressure,
        barostat=args.barostat,
        pdamp_fs=args.pdamp,
        log_interval=args.log_interval,
        trajectory_interval=args.traj_interval,
        progress=not args.no_progress,
    )
    for line in summary_lines(result):
        print(line)
    return 0


def summary_lines(result) -> list[str]:
    """A few lines describing an :class:`~ase_sparsecalc.workflows.MDResult`."""
    n = result.n_atoms
    ms_per_step = 1e3 * result.wall_time_s / result.steps
    lines = [
        f"{result.ensemble.upper()} MD with {result.integrator}: {result.steps} steps of "
        f"{result.timestep_fs:g} fs ({result.steps * result.timestep_fs / 1000:g} ps) in "
        f"{result.wall_time_s:.1f} s ({ms_per_step:.0f} ms/step)",
        f"  temperature: start {result.temperature[0]:.0f} K, final {result.temperature[-1]:.0f} K, "
        f"mean {result.mean_temperature():.0f} K (last 80%)",
        f"  potential energy: {result.potential_energy[0] / n:.4f} -> {result.potential_energy[-1] / n:.4f} "
        "eV/atom",
    ]
    if result.conserved_energy.size and result.conserved_energy[0] == result.conserved_energy[0]:
        lines.append(
            f"  conserved energy: drift {1e3 * result.drift_per_atom:+.3f} meV/atom (linear fit), "
            f"fluctuation {1e3 * result.fluctuation_per_atom:.3f} meV/atom"
        )
    if result.pressure is not None:
        lines.append(
            f"  pressure: mean {result.pressure[len(result.pressure) // 5 :].mean():.3f} GPa (last 80%); "
            f"volume {result.volume[0]:.2f} -> "
            f"{result.volume[-1]:.2f} Å^3"
        )
    for kind, path in result.files.items():
        lines.append(f"  wrote {kind}: {path}")
    return lines
