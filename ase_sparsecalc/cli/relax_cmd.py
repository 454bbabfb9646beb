"""``sparsecalc relax``: relax positions (and with --cell the cell) with a base model plus delta."""

from __future__ import annotations

import argparse

from . import add_model_arguments, make_calculator
from ._common import (
    add_charge_arguments,
    add_structure_arguments,
    announce,
    load_structure,
    positive_float,
    positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsecalc relax``."""
    from ..workflows.relax import OPTIMIZERS

    parser = subparsers.add_parser(
        "relax",
        help="relax atomic positions and, with --cell, the cell",
        description=(
            "Geometry optimisation with ASE (FIRE, BFGS or LBFGS); --cell also relaxes the cell "
            "through FrechetCellFilter. Prints energy, largest force, stress, lattice parameters "
            "and volume, and writes the relaxed structure. Exit status 3: not converged within "
            "--steps (the last structure is written all the same)."
        ),
    )
    add_structure_arguments(parser)
    add_charge_arguments(parser)
    add_model_arguments(parser)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--cell", action="store_true", help="relax the cell too (of a slab: its periodic directions only)"
    )
    opt.add_argument("--fmax", type=positive_float, default=0.01, metavar="EV_PER_A", help="(default: 0.01)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="FIRE", help="(default: FIRE)")
    opt.add_argument(
        "--steps", type=positive_int, default=1000, metavar="N", help="most steps (default: 1000)"
    )
    opt.add_argument(
        "--pressure", type=float, default=0.0, metavar="GPA", help="external pressure (with --cell)"
    )
    opt.add_argument("--hydrostatic", action="store_true", help="keep the cell shape (with --cell)")
    opt.add_argument(
        "--fix-symmetry", action="store_true", help="keep the starting space group (ASE's FixSymmetry)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "-o", "--output", default="relaxed.extxyz", help="relaxed structure (default: relaxed.extxyz)"
    )
    out.add_argument("--traj", help="trajectory of the optimisation (.traj or .extxyz)")
    out.add_argument("--log", help="optimiser log")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..structure_io import output_format, write_structure
    from ..workflows.relax import relax

    atoms = load_structure(args)
    fmt = output_format(args.output)  # refuse a bad output name before the run
    calc = make_calculator(args)
    announce(args, atoms, calc)
    result = relax(
        atoms,
        calc,
        fmax=args.fmax,
        cell=args.cell,
        optimizer=args.optimizer,
        steps=args.steps,
        trajectory=args.traj,
        logfile=args.log,
        pressure_GPa=args.pressure,
        hydrostatic=args.hydrostatic,
        fix_symmetry=args.fix_symmetry,
    )
    write_structure(args.output, result.atoms, format=fmt)
    for line in summary_lines(result):
        print(line)
    print(f"  wrote relaxed structure: {args.output}")
    return 0 if result.converged else NOT_CONVERGED


NOT_CONVERGED = 3
"""Exit status of a relaxation that did not reach ``--fmax`` within ``--steps``."""


def summary_lines(result) -> list[str]:
    """A few lines describing a :class:`~ase_sparsecalc.workflows.RelaxResult`."""
    n = len(result.atoms)
    state = "converged" if result.converged else "NOT converged (raise --steps or loosen --fmax)"
    lines = [
        f"{state} after {result.steps} steps ({result.wall_time_s:.1f} s)",
        f"  energy: {result.energy:.6f} eV ({result.energy_per_atom:.6f} eV/atom), "
        f"change {1e3 * (result.energy - result.initial_energy) / n:+.3f} meV/atom",
        f"  max force: {result.max_force:.2e} eV/Å",
    ]
    if result.stress is not None:
        s = result.stress_gpa
        a, b, c, alpha, beta, gamma = result.cellpar
        bulk = bool(result.atoms.pbc.all())
        lines += [
            (
                "  stress (GPa, xx yy zz yz xz xy): "
                if bulk
                else "  stress over the cell, vacuum included (GPa): "
            )
            + " ".join(f"{x:+.4f}" for x in s)
            + (f"; pressure {result.pressure_gpa:+.4f} GPa" if bulk else ""),
            f"  cell: a={a:.5f} b={b:.5f} c={c:.5f} Å, α={alpha:.3f} β={beta:.3f} γ={gamma:.3f}°",
            f"  volume: {result.volume:.4f} Å^3 ({result.volume / n:.4f} Å^3/atom)",
        ]
    for kind, path in result.files.items():
        lines.append(f"  wrote {kind}: {path}")
    return lines
