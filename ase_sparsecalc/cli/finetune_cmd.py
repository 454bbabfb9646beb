"""``sparsecalc finetune``: fit a delta to DFT frames and write it with its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..finetune.config import ALL_METHODS, OPTIMIZERS, FinetuneConfig


def add_parser(subparsers) -> None:
    """Register ``finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a sparse delta on DFT data",
        description="Fit a sparse delta (and per-element energy shifts) of a foundation model to DFT "
        "frames in any format ASE reads (extxyz, .traj, vasprun.xml, OUTCAR, espresso-out, GPAW "
        "text output, ...). Files may carry an index slice: train.xyz@0:200.",
    )
    p.add_argument("train", nargs="+", metavar="FILE", help="training data file(s)")
    p.add_argument("-o", "--output", required=True, help="delta file to write (.safetensors)")
    p.add_argument("--base", help="named foundation model or model file (default: SevenNet-0)")
    p.add_argument(
        "--head",
        help="output head of a multi-head MACE model to fit through (default: the model's default head)",
    )
    p.add_argument(
        "--valid", nargs="+", metavar="FILE", help="validation data (default: hold out --valid-fraction)"
    )
    p.add_argument("--report-dir", help="report folder (default: <output stem>_report beside the delta)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default: <output stem>_checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint folder")
    p.add_argument(
        "--isolated-atoms",
        help="file of isolated-atom DFT energies (single-atom frames); single-atom frames tagged "
        "config_type=IsolatedAtom in the training data are used the same way",
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
        "--allow-missing-forces",
        action="store_true",
        help="train frames without forces on their energies (and stresses) instead of stopping",
    )
    duplicates = p.add_mutually_exclusive_group()
    duplicates.add_argument(
        "--drop-duplicates",
        action="store_const",
        const="first",
        help="keep the first of repeated structures (e.g. a restarted run's first frame) instead of stopping",
    )
    duplicates.add_argument(
        "--keep-last-duplicate",
        dest="drop_duplicates",
        action="store_const",
        const="last",
        help="keep the last of repeated structures instead (a QE vc-relax's final SCF in a fresh basis)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (with -v, one log line per epoch instead)"
    )
    defaults = FinetuneConfig()
    g = p.add_argument_group("method")
    g.add_argument("--method", default=defaults.method, choices=ALL_METHODS, help="default: %(default)s")
    g.add_argument(
        "--density",
        type=_density,
        default=defaults.density,
        help="target fraction of changed weights, or 'none' to use --penalty (default: %(default)s)",
    )
    g.add_argument(
        "--penalty",
        type=float,
        help="l1 strength on the relative delta, sparse and l1 only (default: 1e-3 for l1, 0 for "
        "sparse; with --density none it sets the sparse delta's sparsity)",
    )
    g.add_argument(
        "--threshold",
        choices=["hard", "soft"],
        help="sparse: kept entries keep their value (hard, one global threshold) or are shrunk by "
        "learned per-tensor thresholds (soft, STR); default: hard with a target density, soft with "
        "--density none",
    )
    g.add_argument(
        "--masked-decay",
        type=float,
        default=defaults.masked_decay,
        metavar="LAMBDA",
        help="sparse: shrink the entries below threshold by 1 - lr*LAMBDA after every step, so that "
        "their drift does not raise the threshold in long runs (default: %(default)s; 0: off)",
    )
    g.add_argument("--rank", type=int, default=defaults.rank, help="rank per path block (elora)")
    g.add_argument("--train-readouts", action="store_true", help="let the delta change readout weights")
    t = p.add_argument_group("training")
    for name in ("epochs", "batch_size", "seed"):
        t.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help="default: %(default)s",
        )
    t.add_argument("--lr", type=float, help="learning rate (default: the method's, e.g. 0.01 for sparse)")
    for name in ("weight_decay", "energy_weight", "forces_weight", "stress_weight", "valid_fraction"):
        t.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=getattr(defaults, name),
            help="default: %(default)s",
        )
    t.add_argument(
        "--optimizer",
        default=defaults.optimizer,
        choices=OPTIMIZERS,
        help="factored_adam or adafactor keep second moments per irrep path's rows and columns "
        "(less optimizer memory, a little less accuracy), tensorwise_adam one per tensor; "
        "default: %(default)s",
    )
    t.add_argument(
        "--lr-rewind",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="two cosine learning-rate cycles: the first ends where pruning ends, the second trains "
        "the kept entries from the peak rate again (default: on for sparse with a target density)",
    )
    t.add_argument("--huber", type=float, dest="huber_delta", help="Huber loss with this transition")
    t.add_argument("--patience", type=int, help="early stopping patience in epochs")
    t.add_argument(
        "--best-from",
        type=float,
        help="fraction of the epochs from which epochs compete for the best one, restored at the "
        "end (1 keeps the last epoch; default: the second half of the last learning-rate cycle)",
    )
    t.add_argument(
        "--max-time",
        type=float,
        help="wall-clock limit in seconds: stops the run part-way (--resume continues it)",
    )
    t.add_argument(
        "--time-budget",
        type=float,
        help="seconds for the training loop (reading the data and the evaluations before and "
        "after come on top): plans fewer epochs (at most --epochs) so that the loop, its "
        "learning-rate and density schedules included, finishes in about this time",
    )
    t.add_argument(
        "--dtype", default=defaults.dtype, choices=["float32", "float64"], help="(default: %(default)s)"
    )
    t.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run)


def _density(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number or 'none', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run the fine-tune and print a before/after summary."""
    from ..finetune import finetune_with_report
    from ..finetune.trainer import CHECKPOINT_NAME

    output = Path(args.output)
    stem = output.stem  # "si.safetensors" -> "si"; any other extension goes the same way
    report_dir = Path(args.report_dir or output.with_name(f"{stem}_report"))
    checkpoint_dir = Path(args.checkpoint_dir or output.with_name(f"{stem}_checkpoint"))
    args.checkpoint_file = checkpoint_dir / CHECKPOINT_NAME  # named if the run is interrupted
    config = FinetuneConfig(
        method=args.method,
        density=args.density,
        penalty=args.penalty,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        energy_weight=args.energy_weight,
        forces_weight=args.forces_weight,
        stress_weight=args.stress_weight,
        huber_delta=args.huber_delta,
        valid_fraction=args.valid_fraction,
        patience=args.patience,
        best_from=args.best_from,
        train_readouts=args.train_readouts,
        rank=args.rank,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        max_time=args.max_time,
        time_budget=args.time_budget,
        optimizer=args.optimizer,
        hard_threshold=None if args.threshold is None else args.threshold == "hard",
        masked_decay=args.masked_decay,
        lr_rewind=args.lr_rewind,
    )
    result = finetune_with_report(
        args.base,
        args.train,
        args.valid,
        config=config,
        output=output,
        report_dir=report_dir,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        progress=not args.no_progress,
        head=args.head,
        isolated_atoms=args.isolated_atoms,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        virial_key=args.virial_key,
        file_format=args.file_format,
        drop_duplicates=args.drop_duplicates or False,
        allow_missing_forces=args.allow_missing_forces,
    )
    from ..finetune.distributed import is_main_process

    if is_main_process():  # under torchrun, the other ranks stay quiet
        print(format_summary(result.report, result.paths))
    return 0


def format_summary(report: dict, paths: dict) -> str:
    """Human-readable before/after table of a fine-tuning report."""
    split = "valid" if report["after"].get("valid") else "train"
    share = f"{100 * report['density']:.2f} % of {report['trainable_weights']}"
    changed = f"{report['nnz']} weights changed ({share})"
    if report["method"] == "shift":
        changed = "per-element energy shifts only, no weights changed"
    lines = [
        f"{report['method']} delta on {report['base']}: {changed}",
        f"errors on the {split} frames        base+shift    calibrated",
    ]
    for key, label in (
        ("energy_mae", "energy MAE (meV/atom)"),
        ("forces_mae", "force MAE (meV/Å)"),
        ("stress_mae", "stress MAE (GPa)"),
    ):
        before, after = report["before"][split].get(key), report["after"][split].get(key)
        if before is not None and after is not None:
            lines.append(f"  {label:30s}{before:12.3f}{after:14.3f}")
    isolated = report.get("data", {}).get("isolated_atom_energies_eV")
    if isolated:
        lines.append(f"isolated-atom energies used for the shifts: {', '.join(isolated)}")
    training = report.get("training", {})
    if "epochs_planned" in training:
        planned, ran = training["epochs_planned"], training["epochs_run"]
        lines.append(f"time budget: planned {planned} epochs, ran {ran}")
    lines.append(
        f"wall time {report['wall_time_s']:.1f} s; " + ", ".join(f"{k}: {v}" for k, v in paths.items())
    )
    return "\n".join(lines)
