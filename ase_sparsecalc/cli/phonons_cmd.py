"""``sparsecalc phonons``: phonon bands, DOS and thermal properties through phonopy."""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

from ..errors import ConfigError
from . import add_model_arguments, make_calculator
from ._common import (
    add_charge_arguments,
    add_structure_arguments,
    announce,
    load_structure,
    positive_float,
    positive_int,
)

PRIMITIVE_CHOICES = ("auto", "none", "P", "F", "I", "A", "C", "R")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsecalc phonons``."""
    parser = subparsers.add_parser(
        "phonons",
        help="phonon band structure, DOS and thermal properties (phonopy)",
        description=(
            "Finite-displacement phonons with phonopy. All displaced supercells are evaluated in "
            "batched model calls. Writes phonopy.yaml, FORCE_CONSTANTS, band.yaml, total_dos.dat, "
            "thermal_properties.yaml and PNG plots into the output folder, and reports imaginary "
            "modes. Relax the structure (sparsecalc relax --cell) first."
        ),
    )
    add_structure_arguments(parser)
    add_model_arguments(parser)
    add_charge_arguments(parser)
    ph = parser.add_argument_group("phonons")
    ph.add_argument(
        "--supercell",
        type=int,
        nargs="+",
        metavar="N",
        help="N (N along each periodic axis), N N N, or the 9 entries of a 3x3 matrix row by row "
        "(default: 3: 3 3 3, or 3 3 1 for a slab open along z)",
    )
    ph.add_argument(
        "--mesh", type=positive_int, nargs=3, default=[20, 20, 20], metavar="N", help="DOS q-mesh"
    )
    ph.add_argument(
        "--displacement",
        type=positive_float,
        default=0.01,
        metavar="A",
        help="displacement, Å, below 0.2 (default: 0.01)",
    )
    ph.add_argument(
        "--primitive",
        choices=PRIMITIVE_CHOICES,
        default="auto",
        help="primitive cell (none: input is primitive)",
    )
    ph.add_argument(
        "--symprec",
        type=positive_float,
        default=1e-5,
        metavar="A",
        help="symmetry tolerance, Å (default: 1e-5, phonopy's)",
    )
    ph.add_argument(
        "--born",
        metavar="FILE",
        help="Born effective charges and dielectric tensor from DFT: a Quantum ESPRESSO ph.x "
        "output (epsil = .true.) or a phonopy BORN file (phonopy-vasp-born writes it); adds the "
        "LO-TO splitting of a polar crystal at Γ",
    )
    ph.add_argument("--batch-size", type=positive_int, metavar="N", help="supercells per model call")
    ph.add_argument("--no-symmetrize", action="store_true", help="keep the raw force constants")
    ph.add_argument(
        "--tmax", type=positive_float, default=1000.0, metavar="K", help="thermal properties up to"
    )
    ph.add_argument(
        "--threshold", type=float, default=-0.05, metavar="THZ", help="imaginary below this (default: -0.05)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output-dir", default="phonons", help="output folder (default: phonons)")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import time

    from ..workflows.phonons import phonons, summarize_phonons, thermal_grid

    supercell = _supercell(args.supercell)
    atoms = load_structure(args)
    calc = make_calculator(args)
    announce(args, atoms, calc)
    start = time.perf_counter()
    phonon = phonons(
        atoms,
        calc,
        supercell=supercell,
        displacement=args.displacement,
        mesh=args.mesh,
        primitive=None if args.primitive == "none" else args.primitive,
        output_dir=args.output_dir,
        batch_size=args.batch_size,
        symmetrize=not args.no_symmetrize,
        temperatures=thermal_grid(args.tmax),
        symprec=args.symprec,
        plot=not args.no_plot,
        born=args.born,
    )
    summary = summarize_phonons(phonon, temperature_K=min(300.0, args.tmax), threshold_THz=args.threshold)
    for line in summary_lines(summary, time.perf_counter() - start):
        print(line)
    if args.born is None and len(set(atoms.numbers)) > 1 and atoms.pbc.all():
        print(
            "  note: no LO-TO splitting at Γ. If this crystal is polar (an ionic insulator), its "
            "longitudinal optical modes there need its Born charges and dielectric tensor from "
            "DFT, which a force field does not give: --born FILE (a ph.x output or a BORN file)"
        )
    folder = Path(args.output_dir)
    print(
        f"  wrote phonopy.yaml, FORCE_CONSTANTS, band.yaml, total_dos.dat, thermal_properties.yaml"
        f"{'' if args.no_plot else ', phonons.png, thermal_properties.png'} to {folder}/"
    )
    return 0


def _supercell(numbers: list[int] | None):
    """``--supercell`` as :func:`~ase_sparsecalc.workflows.phonons` takes it: 3 (the default),
    N, [N1, N2, N3] or a 3x3 matrix from 9 numbers."""
    if numbers is None:
        return 3
    if len(numbers) == 9:  # any non-singular integer matrix, negative entries included
        return [numbers[0:3], numbers[3:6], numbers[6:9]]
    if len(numbers) not in (1, 3):
        raise ConfigError(f"--supercell takes 1, 3 or 9 numbers, got {len(numbers)}: {numbers}")
    if min(numbers) < 1:
        raise ConfigError(f"--supercell multiples must be >= 1, got {numbers}")
    return numbers[0] if len(numbers) == 1 else numbers


def summary_lines(summary, wall_s: float) -> list[str]:
    """A few lines describing a :class:`~ase_sparsecalc.workflows.PhononSummary`."""
    from ..workflows.phonons import THZ_TO_CM1, THZ_TO_MEV

    lines = [
        f"phonons: {summary.n_primitive_atoms}-atom primitive cell, {summary.n_displacements} displaced "
        f"supercells of {summary.n_supercell_atoms} atoms ({wall_s:.1f} s)",
        "  frequencies at the special points (THz):",
    ]
    if summary.nac:
        lines[-1] = (
            "  frequencies at the special points (THz; with the Born charges' dipole term; at Γ "
            "for q along the first band-path segment through it):"
        )
    for label, freqs in summary.special_points.items():
        mark = "*" if label in summary.interpolated_points else ""
        lines.append(f"    {label + mark:>4}: " + " ".join(f"{f:7.3f}" for f in freqs))
    if summary.interpolated_points:
        needs = "; ".join(
            _sampling_need(label, summary.special_qpoints[label])
            for label in summary.interpolated_points
            if label in summary.special_qpoints
        )
        lines.append(
            "    * not a q-point of this supercell: interpolated from the force constants; a "
            "supercell that holds it gives it exactly" + (f" ({needs})" if needs else "")
        )
    top = summary.max_frequency
    lines.append(
        f"  highest frequency: {top:.3f} THz = {top * THZ_TO_CM1:.1f} cm^-1 = {top * THZ_TO_MEV:.2f} meV"
    )
    noise_only = bool(summary.imaginary) and not summary.unstable_modes()
    if noise_only:
        worst = summary.imaginary[0]
        lines.append(
            f"  small imaginary frequencies on the acoustic branches near Γ only: "
            f"{len(summary.imaginary)} (q-point, branch) pairs, lowest {worst.frequency:.3f} THz "
            f"({worst.frequency_cm1:.1f} cm^-1) at q={_format_q(worst.qpoint)}, branch {worst.band_index}; "
            "closer to Γ than the supercell's nearest q-points, where the frequencies are "
            "interpolated: most likely numerical noise (the flexural ZA branch of a 2-D layer most "
            "of all), not an instability. A larger supercell or a structure relaxed to smaller "
            "forces tells them apart"
        )
    elif summary.imaginary:
        worst = summary.imaginary[0]
        lines.append(
            f"  IMAGINARY modes: {len(summary.imaginary)} (q-point, branch) pairs below the threshold; "
            f"lowest {worst.frequency:.3f} THz ({worst.frequency_cm1:.1f} cm^-1) at "
            f"q={_format_q(worst.qpoint)}, branch {worst.band_index}"
        )
        at_points = summary.imaginary_points()
        if at_points:
            described = (
                f"{label} ({len(freqs)} mode{'s' if len(freqs) > 1 else ''}, lowest {freqs.min():.3f} THz)"
                for label, freqs in at_points.items()
            )
            lines.append("  imaginary at the special points: " + ", ".join(described))
    else:
        lines.append(f"  no imaginary modes (lowest frequency {summary.min_frequency:+.4f} THz)")
    lines.append(
        f"  at {summary.temperature:.0f} K per mole of primitive cells: "
        f"F = {summary.free_energy:.3f} kJ/mol, S = {summary.entropy:.3f} J/(K mol), "
        f"Cv = {summary.heat_capacity:.3f} J/(K mol)"
    )
    if noise_only:
        lines.append("  (phonopy leaves those few modes near Γ out of F, S and Cv)")
    elif summary.imaginary:
        lines.append(
            "  (phonopy leaves the imaginary modes out of F, S and Cv: these are not the thermal "
            "properties of a dynamically unstable structure)"
        )
    return lines


def _format_q(qpoint) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in qpoint) + ")"


def _sampling_need(label: str, qpoint, largest: int = 24) -> str:
    """Which diagonal supercells of the primitive cell sample ``qpoint`` (reduced): along each
    primitive axis on which q has a fraction 1/n, a multiple of n cells, e.g.
    ``"K: a multiple of 3 primitive cells along a and b"``."""
    fractions = [Fraction(float(x)).limit_denominator(largest) for x in qpoint]
    axes = [name for name, fraction in zip("abc", fractions, strict=True) if fraction.denominator > 1]
    if not axes:
        return f"{label}: a supercell of the primitive cell"
    multiple = math.lcm(*(fraction.denominator for fraction in fractions))
    named = " and ".join([", ".join(axes[:-1]), axes[-1]] if len(axes) > 1 else axes)
    return f"{label}: a multiple of {multiple} primitive cells along {named}"
