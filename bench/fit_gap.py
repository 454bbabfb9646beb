"""Fit against generalisation: force errors of deltas on the frames they trained on and on held-out frames.

A delta that is worse than another on held-out frames either fits its training data less well
(too little capacity or too few steps) or fits it as well and generalises less well. For every
delta this script evaluates base + delta on the frames of the same split the accuracy benchmark
gave the fine-tune (``finetune_accuracy.load_dataset``: training and validation frames
together) and on that benchmark's test frames. Written to the docs/benchmarks.md section
``fit-gap``.

Example
-------
python bench/fit_gap.py --case ethanol,50,0 bench/results/deltas/ethanol_50_full_batch1.safetensors \\
    bench/results/deltas/ethanol_50_sparse_batch1.safetensors
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import table_section, update_section_locked
from _speed import portable
from finetune_accuracy import load_dataset, test_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        nargs="+",
        action="append",
        required=True,
        metavar="DATASET,N_TRAIN,SEED DELTA",
        help="a split of finetune_accuracy.py (dataset, training frames, seed), then deltas trained on it",
    )
    parser.add_argument("--base", default="sevennet-0")
    parser.add_argument("--section", default="fit-gap")
    parser.add_argument("--title", default="Fit against generalisation", help="section heading")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    from ase_sparsecalc import SparseDelta

    rows = []
    for split, *paths in args.case:
        dataset, n_train, seed = split.split(",")
        n_train, seed = int(n_train), int(seed)
        train, test, _ = load_dataset(dataset, n_train, seed)
        for path in map(Path, paths):
            delta = SparseDelta.load(path)
            fit = test_metrics(args.base, delta, train, "float64", "cpu")["forces_mae"]
            held_out = test_metrics(args.base, delta, test, "float64", "cpu")["forces_mae"]
            rows.append(
                [dataset, len(train), seed, path.name, delta.metadata.method, fit, held_out, held_out / fit]
            )
            print(rows[-1], flush=True)
    header = ["data", "N train", "seed", "delta", "method", "F MAE, own frames", "F MAE, test", "test / own"]
    command = "python " + shlex.join(portable(a) for a in sys.argv)
    intro = (
        f"Base: {args.base}. Force MAE in meV/Å on the frames given to the fine-tune (training and "
        "validation) and on the test frames of the same benchmark row."
    )
    body = table_section(args.title, command, intro, header, rows, args.note)
    update_section_locked(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
