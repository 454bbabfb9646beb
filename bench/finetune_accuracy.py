"""Accuracy of delta methods side by side, on held-out DFT frames, same base, one run.

Datasets
--------
ethanol   ../shared/data/ethanol: train on N frames of train.xyz, test on test_MD.xyz
3bpa      ../shared/data/3bpa/train_300K.xyz: 100 frames held out for testing, train on N others
si, cu    examples/data/{si,cu}_pbesol.extxyz (GPAW PBEsol), the files' own train/test split
mgo       examples/data/mgo_lda.extxyz (GPAW LDA, rock-salt MgO), likewise

The shared data folder (../shared/data beside the checkout) can be moved with the environment
variable SPARSECALC_SHARED_DATA (a folder holding ethanol/ and 3bpa/).

Examples
--------
python bench/finetune_accuracy.py --dataset ethanol --train-sizes 50 200 1000 \\
    --methods shift sparse l1 gmp full elora --epochs 300 --device cuda
python bench/finetune_accuracy.py --dataset si --methods shift sparse full --epochs 100
python bench/finetune_accuracy.py --dataset ethanol --train-sizes 50 --ablation --epochs 60

Results go to bench/results/finetune_<dataset>.json and to a section of docs/benchmarks.md, with
the command and the machine. Each delta is kept as
bench/results/deltas/<dataset>_<N>_<method>[_batch<B>]_<epochs>ep[_seed<S>].safetensors (files
from before the epochs were part of the name lack ``_<epochs>ep``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
from ase.stress import voigt_6_to_full_3x3_stress

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import WRITE_LOCK, machine_description, markdown_table, update_section

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.finetune import finetune_with_report, read_frames
from ase_sparsecalc.finetune.config import DEFAULT_LR
from ase_sparsecalc.finetune.metrics import error_metrics

ROOT = Path(__file__).parents[1]
SHARED = Path(os.environ.get("SPARSECALC_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = Path(__file__).parent / "results"
TITLES = {
    "ethanol": "Ethanol (ORCA PBE/def2-SVP), test frames from test_MD",
    "3bpa": "3BPA (ωB97X/6-31G(d)), 100 frames of train_300K held out",
    "si": "Silicon (GPAW PBEsol): bundled train/test split",
    "cu": "Copper (GPAW PBEsol): bundled train/test split",
    "mgo": "MgO (GPAW LDA): bundled train/test split",
}
BUNDLED = {"si": "si_pbesol.extxyz", "cu": "cu_pbesol.extxyz", "mgo": "mgo_lda.extxyz"}
"""Crystal data sets shipped in examples/data, with their train/test split in ``info["split"]``."""

HISTORY_KEYS = ("epoch", "valid_loss", "density", "threshold", "median_change", "support_turnover")
"""Per-epoch values kept in the results file (how the support and threshold evolved)."""

ABLATION = {
    "sparse (default)": {},
    "soft threshold (STR)": {"hard_threshold": False},
    "no straight-through": {"straight_through": False},
    "leaky straight-through (0.1)": {"ste_scale": 0.1},
    "one global threshold": {"learn_thresholds": False},
    "no radial MLP": {"exclude_kinds": ["radial"]},
    "with readouts": {"train_readouts": True},
    "lr x0.2": {"lr_scale": 0.2},
    "per-tensor Adam": {"optimizer": "tensorwise_adam"},
    "factored Adam (per-path second moments)": {"optimizer": "factored_adam"},
    "Adafactor (no first moment)": {"optimizer": "adafactor"},
    "settled support": {"settle_support": True},
    "hard threshold, global (no shrinkage)": {"hard_threshold": True, "learn_thresholds": False},
    "hard threshold, learned per tensor": {"hard_threshold": True},
    "short dense warm-up, early pruning": {"prune_end_fraction": 0.3},
    "lr x2": {"lr_scale": 2.0},
    "lr x0.5": {"lr_scale": 0.5},
    "long dense phase (20 %)": {"warmup_fraction": 0.2},
    "late pruning end (80 %)": {"prune_end_fraction": 0.8},
    "batch 4": {"batch_size": 4},
    "batch 2": {"batch_size": 2},
    "batch 1": {"batch_size": 1},
    "batch 1, lr x0.5": {"batch_size": 1, "lr_scale": 0.5},
    "batch 1, lr x2": {"batch_size": 1, "lr_scale": 2.0},
    "batch 1, late pruning end (80 %)": {"batch_size": 1, "prune_end_fraction": 0.8},
    "batch 1, factored Adam": {"batch_size": 1, "optimizer": "factored_adam"},
    "batch 1, masked decay 1": {"batch_size": 1, "masked_decay": 1.0},
    "batch 1, masked decay 10": {"batch_size": 1, "masked_decay": 10.0},
    "batch 1, masked decay 0.1": {"batch_size": 1, "masked_decay": 0.1},
    "batch 1, masked decay 0.03": {"batch_size": 1, "masked_decay": 0.03},
    "batch 1, soft threshold, global": {"batch_size": 1, "hard_threshold": False, "learn_thresholds": False},
    "batch 1, weight decay 1": {"batch_size": 1, "masked_decay": 0.1, "weight_decay": 1.0},
    "batch 1, density 1 %": {"batch_size": 1, "density": 0.01},
    "batch 1, density 5 %": {"batch_size": 1, "density": 0.05},
    "batch 1, masked decay 0.1, lr x2": {"batch_size": 1, "masked_decay": 0.1, "lr_scale": 2.0},
    "batch 1, masked decay 0.1, density 5 %": {"batch_size": 1, "masked_decay": 0.1, "density": 0.05},
    "batch 1, movement selection": {"batch_size": 1, "masked_decay": 0.1, "selection": "movement"},
    "batch 1, lr rewind": {"batch_size": 1, "masked_decay": 0.1, "lr_rewind": True},
    "batch 1, lr rewind, pruning end 40 %": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "prune_end_fraction": 0.4,
    },
    "batch 1, lr rewind, no masked decay": {"batch_size": 1, "masked_decay": 0.0, "lr_rewind": True},
    "batch 1, lr rewind, stress weight 100": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "stress_weight": 100.0,
    },
    "batch 1, lr rewind, masked decay 0.03": {"batch_size": 1, "masked_decay": 0.03, "lr_rewind": True},
    "batch 1, lr rewind, density 5 %": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "density": 0.05,
    },
    "batch 1, lr rewind, settled support": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "settle_support": True,
    },
    "batch 1, lr rewind, thresholds per tensor": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "learn_thresholds": True,
    },
    "batch 1, lr rewind, dense embedding": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "dense_kinds": ["embedding"],
    },
    "batch 1, lr rewind, movement selection": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "selection": "movement",
    },
    "batch 1, lr rewind, fisher selection": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "selection": "fisher",
    },
    "batch 1, lr rewind, fisher selection, settled support": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "selection": "fisher",
        "settle_support": True,
    },
    "batch 1, lr rewind, with readouts": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "train_readouts": True,
    },
    "batch 1, lr rewind, scalars": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "train_scalars": True,
    },
    "batch 1, lr rewind, scalars at lr x0.1": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "train_scalars": True,
        "scalar_lr_factor": 0.1,
    },
    "batch 1, lr rewind, density 10 %": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "lr_rewind": True,
        "density": 0.1,
    },
    "batch 1, lr rewind, lr x2": {"batch_size": 1, "masked_decay": 0.1, "lr_rewind": True, "lr_scale": 2.0},
    "batch 1, lr rewind, lr x0.5": {"batch_size": 1, "masked_decay": 0.1, "lr_rewind": True, "lr_scale": 0.5},
    "batch 1, dense embedding": {"batch_size": 1, "masked_decay": 0.1, "dense_kinds": ["embedding"]},
    "batch 1, dense embedding and readouts": {
        "batch_size": 1,
        "masked_decay": 0.1,
        "dense_kinds": ["embedding", "readout"],
        "train_readouts": True,
    },
    "full fine-tuning": {"method": "full"},
    "full, lr x2": {"method": "full", "lr_scale": 2.0},
    "full, lr x0.5": {"method": "full", "lr_scale": 0.5},
    "full, batch 4": {"method": "full", "batch_size": 4},
    "full, batch 2": {"method": "full", "batch_size": 2},
    "full, batch 1": {"method": "full", "batch_size": 1},
    "full, batch 1, lr x0.5": {"method": "full", "batch_size": 1, "lr_scale": 0.5},
    "full, batch 1, lr x2": {"method": "full", "batch_size": 1, "lr_scale": 2.0},
    "full, batch 1, lr rewind": {"method": "full", "batch_size": 1, "lr_rewind": True},
    "full, batch 1, best from 0.8": {"method": "full", "batch_size": 1, "best_from": 0.8},
    "full, batch 1, stress weight 100": {"method": "full", "batch_size": 1, "stress_weight": 100.0},
    "gmp (magnitude pruning)": {"method": "gmp"},
    "l1 + one-shot pruning": {"method": "l1", "penalty": 1e-3},
}


def load_dataset(name: str, n_train: int | None, seed: int):
    """(train frames, test frames, isolated-atom file or None) of a named dataset."""
    rng = np.random.default_rng(seed)
    if name == "ethanol":
        _require(SHARED / "ethanol")
        pool = read_frames(str(SHARED / "ethanol" / "train.xyz"))
        test = read_frames(str(SHARED / "ethanol" / "test_MD.xyz"))
        train = [pool[i] for i in sorted(rng.permutation(len(pool))[:n_train])]
        return train, test, str(SHARED / "ethanol" / "isolated_atoms.xyz")
    if name == "3bpa":
        _require(SHARED / "3bpa")
        pool = read_frames(str(SHARED / "3bpa" / "train_300K.xyz"))
        order = rng.permutation(len(pool))
        test = [pool[i] for i in sorted(order[:100])]
        train = [pool[i] for i in sorted(order[100 : 100 + (n_train or len(pool))])]
        return train, test, str(SHARED / "3bpa" / "iso_atoms.xyz")
    images = ase.io.read(ROOT / "examples" / "data" / BUNDLED[name], ":")
    train = read_frames([a for a in images if a.info.get("split") == "train"])
    test = read_frames([a for a in images if a.info.get("split") == "test"])
    if n_train:
        train = [train[i] for i in sorted(rng.permutation(len(train))[:n_train])]
    return train, test, None


def _require(path: Path) -> None:
    if not path.is_dir():
        raise SystemExit(f"{path} not found: this benchmark reads the shared DFT data sets")


def test_metrics(base: str, delta, frames, dtype: str, device: str) -> dict:
    """Errors of base + delta on the test frames (batched evaluation)."""
    calc = SparseCalc(base, delta=delta, default_dtype=dtype, device=device)
    with_stress = all(f.stress is not None for f in frames)
    props = ["energy", "forces"] + (["stress"] if with_stress else [])
    results = calc.batch_evaluate([f.atoms for f in frames], props, batch_size=64)
    predictions = {}
    for k, r in enumerate(results):
        predictions[k] = {"energy": r["energy"], "forces": r["forces"]}
        if "stress" in r:
            predictions[k]["stress"] = voigt_6_to_full_3x3_stress(r["stress"])
    return error_metrics(frames, predictions)


def run_one(args, dataset, n_train, label, options) -> dict:
    train, test, isolated = load_dataset(dataset, n_train, args.seed)
    options = dict(options)
    default_method = label if label in ("shift", "sparse", "l1", "gmp", "full", "elora") else "sparse"
    method = options.pop("method", default_method)
    if method == "sparse" and args.threshold:
        options.setdefault("hard_threshold", args.threshold == "hard")
        if args.threshold == "soft" and label in ("sparse", "sparse (default)"):
            label = "sparse (STR)"
    if method == "sparse":
        options.setdefault("masked_decay", args.masked_decay)
    if method != "shift":
        options.setdefault("lr_rewind", args.lr_rewind)
    lr = (args.lr or DEFAULT_LR[method]) * options.pop("lr_scale", 1.0)
    start = time.monotonic()
    batch_size = options.pop("batch_size", args.batch_size)
    seed = f"_seed{args.seed}" if args.seed else ""
    batch = f"_batch{batch_size}" if batch_size != 8 else ""
    name = f"{dataset}_{len(train)}_{label.replace(' ', '_')}{batch}_{args.epochs}ep{seed}"
    delta_path = RESULTS / "deltas" / f"{name}.safetensors"
    result = finetune_with_report(
        args.base,
        train,
        method=method,
        density=options.pop("density", args.density if method in ("sparse", "l1", "gmp") else None),
        epochs=args.epochs,
        batch_size=batch_size,
        lr=lr,
        penalty=options.pop("penalty", args.penalty if method in ("sparse", "l1") else None),
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        valid_fraction=0.1,
        isolated_atoms=isolated,
        output=delta_path,
        stress_weight=options.pop("stress_weight", args.stress_weight),
        patience=args.patience,
        progress=args.progress,
        max_time=args.max_time,
        **options,
    )
    metrics = test_metrics(args.base, result.delta, test, "float64", args.device)
    row = {
        "dataset": dataset,
        "seed": args.seed,
        "n_train": len(train),
        "n_test": len(test),
        "method": label,
        "density": result.delta.density,
        "nnz": result.delta.nnz,
        "epochs": result.report["training"].get("epochs_run", 0),
        "wall_time_s": time.monotonic() - start,
        "test": metrics,
        "delta": str(delta_path.relative_to(ROOT)),
        "valid": result.report["after"]["valid"],
        "history": [{k: h[k] for k in HISTORY_KEYS if k in h} for h in result.report["history"]],
    }
    summary = {k: v for k, v in row.items() if k not in ("valid", "history")}
    print(json.dumps(summary, default=float), flush=True)
    return row


def table(rows: list[dict]) -> str:
    seeds = len({r.get("seed", 0) for r in rows}) > 1
    header = ["N train", "method", "density", "E MAE (meV/atom)", "F MAE (meV/Å)"]
    header += ["F / full", "F / zero-shot"]
    has_stress = any("stress_mae" in r["test"] for r in rows)
    if has_stress:
        header.insert(5, "σ MAE (GPa)")
    header += ["epochs", "time (s)"]
    body = []
    for r in rows:
        same = [x for x in rows if _key(x)[::2] == _key(r)[::2]]  # same N train and seed
        full = next((x["test"]["forces_mae"] for x in same if x["method"] == "full"), None)
        zero = next((x["test"]["forces_mae"] for x in same if x["method"] == "shift"), None)
        f = r["test"]["forces_mae"]
        line = [
            r["n_train"],
            r["method"],
            f"{100 * r['density']:.2f} %",
            r["test"]["energy_mae"],
            f,
            f / full if full else "–",
            f / zero if zero else "–",
        ]
        if has_stress:
            line.insert(5, r["test"].get("stress_mae", "–"))
        if seeds:
            line.insert(2, r.get("seed", 0))
        line += [r["epochs"], r["wall_time_s"]]
        body.append(line)
    if seeds:
        header.insert(2, "seed")
    return markdown_table(header, body)


def _key(row: dict) -> tuple:
    """(N train, method, seed): rows with the same key are the same experiment."""
    return row["n_train"], row["method"], row.get("seed", 0)


def merged_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``earlier`` with rows of the same experiment (:func:`_key`) replaced by ``new``, the rest appended."""
    replacements = {_key(r): r for r in new}
    rows = [replacements.pop(_key(r), r) for r in earlier]
    return rows + [r for r in new if _key(r) in replacements]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=["ethanol", "3bpa", *BUNDLED])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[0], help="0: all training frames")
    parser.add_argument("--methods", nargs="+", default=["shift", "sparse", "l1", "gmp", "full", "elora"])
    parser.add_argument("--ablation", action="store_true", help="sparse-method ablation instead of --methods")
    parser.add_argument("--variants", nargs="+", help="with --ablation: only these variants (labels)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the section's earlier rows, replacing those with the same N train, method and seed",
    )
    parser.add_argument("--base", default="sevennet-0")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="structures per step (default 8, as in the sections whose commands do not name it; "
        "the library's default is 1)",
    )
    parser.add_argument("--lr", type=float, help="default: each method's default learning rate")
    parser.add_argument("--density", type=float, default=0.03)
    parser.add_argument("--penalty", type=float, default=0.0)
    parser.add_argument(
        "--threshold",
        choices=["hard", "soft"],
        help="sparse methods: hard or soft (STR) threshold unless a variant sets it (default: the library's)",
    )
    parser.add_argument(
        "--masked-decay",
        type=float,
        default=0.0,
        help="sparse methods, unless a variant sets it (default 0, as in the sections whose commands "
        "do not name it; the library's default is 0.1)",
    )
    parser.add_argument(
        "--lr-rewind",
        action="store_true",
        help="restart the learning rate where pruning ends, unless a variant sets it (default off, as "
        "in the sections whose commands do not name it; the library's default is on for sparse)",
    )
    parser.add_argument("--stress-weight", type=float, default=1000.0)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--max-time", type=float, help="per fine-tune wall-clock limit (s)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's, one per core). Runs side by side need one each "
        "(or OMP_NUM_THREADS=1): oversubscribed OpenMP threads spin and slowed two runs on two "
        "cores about tenfold",
    )
    parser.add_argument("--section", help="docs/benchmarks.md section name (default from dataset)")
    parser.add_argument("--title", help="section heading (default from dataset)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = list(ABLATION.items()) if args.ablation else [(m, {}) for m in args.methods]
    if args.variants:
        unknown = set(args.variants) - set(ABLATION)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(ABLATION)}")
        runs = [(label, options) for label, options in runs if label in args.variants]
    rows = [
        run_one(args, args.dataset, n or None, label, options)
        for n in args.train_sizes
        for label, options in runs
    ]
    name = args.section or f"finetune-{args.dataset}{'-ablation' if args.ablation else ''}"
    out = RESULTS / f"{name}.json"
    commands, note = [f"python {shlex.join(sys.argv)}"], ""
    with open(WRITE_LOCK, "w") as lock:  # runs writing results take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.merge and out.exists():
            earlier = json.loads(out.read_text())
            rows = merged_rows(earlier["rows"], rows)
            before = earlier["commands"] if "commands" in earlier else [f"python {earlier['command']}"]
            commands, note = [*before, *commands], earlier.get("note", "")
        write_section(name, args, rows, commands, note)


def write_section(name: str, args, rows: list[dict], commands: list[str], note: str = "") -> None:
    """Write ``bench/results/<name>.json`` and the docs/benchmarks.md section ``name``."""
    out = RESULTS / f"{name}.json"
    out.write_text(
        json.dumps(
            {"commands": commands, "machine": machine_description(), "rows": rows, "note": note},
            indent=1,
            default=float,
        )
    )
    suffix = " — ablation of the sparse method" if args.ablation else ""
    title = args.title or f"{TITLES[args.dataset]}{suffix}"
    body = (
        f"### {title}\n\n"
        f"Command: {', then '.join(f'`{c}`' for c in commands)}  \nMachine: {machine_description()}; "
        f"{time.strftime('%Y-%m-%d')}. Base: {args.base}; test frames: {rows[0]['n_test']}; "
        f"target density {args.density}.\n\n{table(rows)}\n" + (f"\n{note}\n" if note else "")
    )
    update_section(name, body)
    print(body)


if __name__ == "__main__":
    main()
