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
    from ..finetune.label_checks import warn_if_energy_labels_mixed, warn_if_reference_labels_unread
    from ..finetune.metrics import METRIC_UNITS, error_metrics, predict_frames

    frames = read_frames(
        args.data,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        virial_key=args.virial_key,
        file_format=args.file_format,
        require_forces=False,
    )
    warn_if_energy_labels_mixed(frames)  # as fine-tuning does: the labels mean the same everywhere
    warn_if_reference_labels_unread(frames)
    isolated = [f for f in frames if f.is_isolated_atom]
    if isolated and not args.include_isolated_atoms and len(isolated) < len(frames):
        frames = [f for f in frames if not f.is_isolated_atom]
    else:
        isolated = []
    calc = make_calculator(args)
    predictions = predict_frames(calc, frames, args.batch_size)
    metrics = error_metrics(frames, predictions)
    if not args.delta:
        metrics.update(_errors_after_fitted_shifts(frames, predictions))
    metrics["base"] = calc.backend.model_name
    metrics["delta"] = args.delta
    metrics["isolated_atoms_left_out"] = len(isolated)
    metrics["units"] = {
        **METRIC_UNITS,
        "forces_mae_by_element": "meV/Å",
        "stress_mae_by_component": "GPa",
        **{key: "meV/atom" for key in SHIFTED_KEYS if key in metrics},
    }
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    counts = f"{_frames(len(frames))}{_label_counts(metrics)}"
    print(f"{counts}, base {metrics['base']}, delta {args.delta or '(none)'}")
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
    if SHIFTED_KEYS[0] in metrics:
        mae, rmse = (metrics[key] for key in SHIFTED_KEYS)
        print(
            f"  energy MAE {mae:.3f}, RMSE {rmse:.3f} meV/atom after per-element offsets fitted "
            "to these frames (what `--method shift` would leave on them)"
        )
    by_element = metrics.get("forces_mae_by_element", {})
    if len(by_element) > 1:
        print("  forces_mae of " + ", ".join(f"{el} {mae:.3f}" for el, mae in by_element.items()) + "  meV/Å")
    by_component = metrics.get("stress_mae_by_component", {})
    if by_component:
        print("  stress_mae of " + ", ".join(f"{c} {mae:.3f}" for c, mae in by_component.items()) + "  GPa")
    if "by_config_type" in metrics:
        _print_by_config_type(metrics["by_config_type"])
    return 0


SHIFTED_KEYS = ("energy_mae_after_fitted_shifts", "energy_rmse_after_fitted_shifts")
"""Energy errors (meV/atom) after per-element shifts fitted to the frames evaluated."""


def _errors_after_fitted_shifts(frames, predictions: dict[int, dict]) -> dict[str, float]:
    """Energy MAE and RMSE (meV/atom) of the base model once per-element offsets are fitted to
    these frames by least squares: how well it gets energy differences, whatever zero of energy
    the DFT code has. Empty where the frames cannot tell (no more frames than independent
    compositions: the fit would be exact)."""
    import numpy as np

    from ..finetune.metrics import error_metrics
    from ..finetune.reference import (
        composition_matrix,
        fit_energy_shifts,
        predicted_energies,
        with_energy_shifts,
    )

    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    if len(frames) <= np.linalg.matrix_rank(composition_matrix(frames, elements)):
        return {}
    shifts = fit_energy_shifts(frames, predicted_energies(predictions, len(frames)))
    shifted = error_metrics(frames, with_energy_shifts(predictions, frames, shifts))
    return {SHIFTED_KEYS[0]: shifted["energy_mae"], SHIFTED_KEYS[1]: shifted["energy_rmse"]}


def _frames(n: int) -> str:
    return f"{n} frame" if n == 1 else f"{n} frames"


def _label_counts(metrics: dict) -> str:
    """`` (forces in 5, stress in 4)`` where some but not all frames have forces or stress
    labelled; ``(no stress labels)`` where none has (molecules)."""
    counts = []
    for name in ("forces", "stress"):
        labelled = metrics.get(f"{name}_frames", 0)
        if labelled == 0:
            counts.append(f"no {name} labels")
        elif labelled != metrics["frames"]:
            counts.append(f"{name} in {labelled}")
    return f" ({', '.join(counts)})" if counts else ""


def _print_by_config_type(parts: dict[str, dict]) -> None:
    """The errors of each ``config_type`` tag, one row each (``-``: no such labels)."""
    with_stress = any("stress_mae" in part for part in parts.values())
    header = f"  {'config_type':24s}{'frames':>8s}{'E MAE meV/atom':>16s}{'F MAE meV/Å':>14s}"
    print(header + (f"{'σ MAE GPa':>12s}" if with_stress else ""))
    for tag, part in parts.items():
        row = f"  {tag:24.24s}{part['frames']:8d}{part['energy_mae']:16.3f}"
        row += f"{part['forces_mae']:14.3f}" if "forces_mae" in part else f"{'-':>14s}"
        if with_stress:
            row += f"{part['stress_mae']:12.3f}" if "stress_mae" in part else f"{'-':>12s}"
        print(row)
