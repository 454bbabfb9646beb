"""``sparsecalc eval``: errors of a (calibrated) model on labelled DFT frames."""

from __future__ import annotations

import argparse
import json

from . import add_model_arguments, make_calculator
from ._common import positive_int


def add_parser(subparsers) -> None:
    """Register ``eval``."""
    p = subparsers.add_parser(
        "eval",
        help="errors of base (+ delta) on labelled frames",
        description="Energy, force and stress errors of a model on DFT frames (any ASE format; "
        "'file@slice' selects frames). Structures are evaluated in batches.",
    )
    p.add_argument("data", nargs="+", metavar="FILE", help="labelled data file(s)")
    add_model_arguments(p)
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="structures per model call (default: 16)"
    )
    p.add_argument(
        "--format",
        dest="file_format",
        help="ASE format of the data files (extxyz, vasp-out, vasp-xml, espresso-out, gpaw-out, ...); "
        "default: ASE guesses from each file's name and content",
    )
    p.add_argument("--energy-key", help="info key (or calculator result) holding energies")
    p.add_argument("--forces-key", help="arrays key (or calculator result) holding forces")
    p.add_argument("--stress-key", help="info key (or calculator result) holding stresses")
    p.add_argument("--virial-key", help="info key holding virials (eV); stress = -virial / volume")
    p.add_argument(
        "--include-isolated-atoms",
        action="store_true",
        help="also evaluate single-atom frames tagged config_type=IsolatedAtom (left out by default: "
        "they are energy references, as in fine-tuning; a file of nothing else is evaluated whole)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics."""
    from ..finetune.data import read_frames
    from ..finetune.metrics import METRIC_UNITS, error_metrics

    frames = read_frames(
        args.data,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        virial_key=args.virial_key,
        file_format=args.file_format,
        require_forces=False,
    )
    isolated = [f for f in frames if f.is_isolated_atom]
    if isolated and not args.include_isolated_atoms and len(isolated) < len(frames):
        frames = [f for f in frames if not f.is_isolated_atom]
    else:
        isolated = []
    calc = make_calculator(args)
    predictions = _predict(calc, frames, args.batch_size)
    metrics = error_metrics(frames, predictions)
    metrics["base"] = calc.backend.model_name
    metrics["delta"] = args.delta
    metrics["isolated_atoms_left_out"] = len(isolated)
    metrics["units"] = METRIC_UNITS
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{len(frames)} frames, base {metrics['base']}, delta {args.delta or '(none)'}")
    if not args.delta:
        print(
            "  (no delta: energies are on the base model's zero of energy, which another DFT code "
            "puts elsewhere per element; `sparsecalc finetune --method shift` fits that offset)"
        )
    if isolated:
        print(
            f"  left out {len(isolated)} isolated-atom reference frame(s) "
            f"({', '.join(f.source for f in isolated[:3])}{', ...' if len(isolated) > 3 else ''}); "
            "--include-isolated-atoms evaluates them"
        )
    for key, unit in METRIC_UNITS.items():
        if key in metrics:
            print(f"  {key:14s}{metrics[key]:12.3f}  {unit}")
    if "by_config_type" in metrics:
        print(f"  {'config_type':20s}{'frames':>8s}{'E MAE meV/atom':>16s}{'F MAE meV/Å':>14s}")
        for tag, part in metrics["by_config_type"].items():
            forces = f"{part['forces_mae']:14.3f}" if "forces_mae" in part else f"{'-':>14s}"
            print(f"  {tag:20.20s}{part['frames']:8d}{part['energy_mae']:16.3f}{forces}")
    return 0


def _predict(calc, frames: list, batch_size: int) -> dict[int, dict]:
    """Predictions per frame index: energy (eV), forces (n, 3) eV/Å and, for frames with a stress
    label, stress (3, 3) eV/Å³. Frames with and without stress labels go in separate batches, so
    one molecule or isolated atom in a file of crystals does not turn stress off for the rest."""
    from ase.stress import voigt_6_to_full_3x3_stress

    predictions: dict[int, dict] = {}
    with_stress = [k for k, f in enumerate(frames) if f.stress is not None]
    without_stress = [k for k, f in enumerate(frames) if f.stress is None]
    for chosen, properties in (
        (with_stress, ["energy", "forces", "stress"]),
        (without_stress, ["energy", "forces"]),
    ):
        if not chosen:
            continue
        results = calc.batch_evaluate(
            [frames[k].atoms for k in chosen],
            properties,
            batch_size=batch_size,
            names=[frames[k].source for k in chosen],
        )
        for k, res in zip(chosen, results, strict=True):
            predictions[k] = {"energy": res["energy"], "forces": res["forces"]}
            if "stress" in properties:
                predictions[k]["stress"] = voigt_6_to_full_3x3_stress(res["stress"])
    return predictions
