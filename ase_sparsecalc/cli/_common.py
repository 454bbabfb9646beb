"""Argument helpers shared by the simulation subcommands (md, relax, phonons)."""

from __future__ import annotations

import argparse

from ..structure_io import read_structure


def add_structure_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional STRUCTURE file and ``--index`` (which frame of a multi-frame file)."""
    parser.add_argument(
        "structure", metavar="STRUCTURE", help="structure file (any format ase.io.read reads)"
    )
    parser.add_argument(
        "--index", type=int, default=-1, help="frame of a multi-frame file (default: -1, the last)"
    )
    parser.add_argument(
        "--pbc",
        nargs=3,
        type=_boolean,
        metavar=("X", "Y", "Z"),
        help="periodicity along x, y, z (T or F), replacing the file's: --pbc T T F for a slab read "
        "from a POSCAR, which ASE always reads as periodic in 3-D",
    )


def _boolean(text: str) -> bool:
    """argparse type: T/F, true/false, 1/0, yes/no."""
    lowered = text.strip().lower()
    if lowered in ("t", "true", "1", "yes", "y"):
        return True
    if lowered in ("f", "false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected T or F, got {text!r}")


def add_charge_arguments(parser: argparse.ArgumentParser) -> None:
    """``--charge`` and ``--spin``: the structure's total charge and spin multiplicity."""
    group = parser.add_argument_group("charge and spin (models with charge and spin inputs, e.g. MACE-OMOL)")
    group.add_argument("--charge", type=int, help="total charge in units of e (default: the file's, else 0)")
    group.add_argument("--spin", type=int, help="spin multiplicity 2S + 1 (default: the file's, else 1)")


def load_structure(args: argparse.Namespace):
    """The structure named on the command line (raises DataFileError naming the file), with the
    charge and spin of :func:`add_charge_arguments` where given."""
    atoms = read_structure(args.structure, index=args.index)
    if getattr(args, "pbc", None) is not None:
        atoms.pbc = args.pbc
    for key in ("charge", "spin"):
        if getattr(args, key, None) is not None:
            atoms.info[key] = getattr(args, key)
    return atoms


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0."""
    value = float(text) if _is_number(text) else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe_model(calc) -> str:
    """One line naming the base model, the delta and the dtype."""
    delta = calc.delta
    what = "no delta (bare base model)" if delta is None else f"delta with {delta.nnz} changed weights"
    dtype = str(calc.backend.dtype).replace("torch.", "")
    return f"model: {calc.backend.model_name}, {what}, {dtype} on {calc.backend.device}"


def announce(args: argparse.Namespace, atoms, calc) -> None:
    """Print which structure and which model a simulation subcommand runs, after refusing a
    structure the model cannot evaluate (unknown elements, a charge or spin it cannot take)
    with an error that names the file and frame, before any output is written."""
    where = args.structure if args.index == -1 else f"{args.structure} (frame {args.index})"
    calc.backend.check_elements(atoms.numbers, where)
    calc.backend.check_charge_and_spin(atoms, where)
    print(f"{args.structure}: {atoms.get_chemical_formula()} ({len(atoms)} atoms)")
    print(describe_model(calc))
