"""``sparsecalc export``: write base + delta as one model file of the base's own package."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsecalc export``."""
    parser = subparsers.add_parser(
        "export",
        help="write base + delta as a MACE model file or a SevenNet checkpoint",
        description=(
            "Merge a delta into its base model and write the result in the base's own format: "
            "a MACE .model file (for MACECalculator and mace_create_lammps_model) or a SevenNet "
            ".pth checkpoint (for SevenNetCalculator and sevenn_get_model). The delta's energy "
            "shifts are folded into the model's per-element reference energies. The file is "
            "checked against base + delta on a probe structure before it is put in place."
        ),
    )
    parser.add_argument("delta", metavar="DELTA", nargs="?", help="delta file (.safetensors)")
    parser.add_argument(
        "--delta", dest="delta_option", metavar="DELTA", help="the delta file, as the other commands name it"
    )
    parser.add_argument("-o", "--output", required=True, help="merged model file to write (.model or .pth)")
    parser.add_argument("--base", help="named foundation model or model file (default: the delta's base)")
    parser.add_argument(
        "--head",
        help="head of a multi-head MACE model whose reference energies take the delta's shifts "
        "(default: the head the delta was fitted through); run the merged model with that head",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        help="dtype of the weights written (default: the base file's)",
    )
    parser.add_argument("--no-strict", action="store_true", help="merge a delta made for another base")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..export import export_merged_model

    if (args.delta is None) == (args.delta_option is None):
        raise ConfigError("give the delta file once: as DELTA or as --delta DELTA")
    result = export_merged_model(
        args.delta or args.delta_option,
        args.output,
        base=args.base,
        head=args.head,
        dtype=args.dtype,
        strict=not args.no_strict,
    )
    shifts = ", ".join(f"{s} {v:+.4f}" for s, v in sorted(result.energy_shifts.items())) or "none"
    print(f"wrote {result.path}: {result.backend} model, {result.dtype}")
    if result.head is not None:
        print(f"  head with the delta's energy shifts: {result.head} (run it with head={result.head!r})")
    print(f"  changed weight entries merged: {result.changed_entries}")
    print(f"  energy shifts folded into the reference energies (eV/atom): {shifts}")
    print(
        "  checked against base + delta on a probe structure, both in float64: energies agree to "
        f"{result.max_energy_difference:.1e} eV/atom, forces to {result.max_force_difference:.1e} eV/Å"
    )
    return 0
