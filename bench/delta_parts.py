"""Which parts of a full fine-tuning delta carry its accuracy: test force MAE of its pieces.

Evaluates, on the test frames of a bundled data file (``info["split"] == "test"``), the force
MAE (meV/Å) of the base model with: the sparse delta; the full delta; the full delta restricted
to the tensors the sparse delta trains (every entry); that restriction pruned one-shot to its
largest entries (by |Δ| over each tensor's RMS) at several densities; and the full delta's
entries in tensors outside the weight tensors (kind ``other``) alone. Run on the deltas that
``bench/finetune_accuracy.py`` keeps in ``bench/results/deltas/``::

    python bench/delta_parts.py --data examples/data/mgo_lda.extxyz \\
        --full bench/results/deltas/mgo_22_full_batch1_100ep.safetensors \\
        --sparse bench/results/deltas/mgo_22_sparse_batch1_100ep.safetensors
"""

from __future__ import annotations

import argparse

from ase_sparsecalc.torch_setup import prepare_torch

prepare_torch()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.io import read  # noqa: E402

from ase_sparsecalc import SparseCalc, SparseDelta, load_backend  # noqa: E402
from ase_sparsecalc.delta import TensorDelta  # noqa: E402


def force_mae(base, delta: SparseDelta, test) -> float:
    """Force MAE (meV/Å) of ``base`` plus ``delta`` on the labelled ``test`` frames."""
    results = SparseCalc(base, delta=delta).batch_evaluate([a.copy() for a in test])
    errors = [np.abs(r["forces"] - a.get_forces()).ravel() for r, a in zip(results, test, strict=True)]
    return 1000 * float(np.mean(np.concatenate(errors)))


def pruned(full: SparseDelta, names: list[str], params: dict, fraction: float) -> SparseDelta:
    """``full`` within ``names``, keeping its largest ``fraction`` of entries by |Δ| / RMS(W0)."""
    scores = {}
    for name in names:
        weight = params[name].detach().double()
        scores[name] = (
            full.tensors[name].to_dense(torch.float64).reshape(-1).abs() / weight.pow(2).mean().sqrt()
        )
    flat = torch.cat(list(scores.values()))
    cut = flat.kthvalue(flat.numel() - int(fraction * flat.numel())).values
    tensors = {}
    for name, score in scores.items():
        keep = (score > cut).nonzero().reshape(-1)
        values = full.tensors[name].to_dense(torch.float64).reshape(-1)[keep]
        tensors[name] = TensorDelta.create(keep, values, tuple(params[name].shape), name)
    return SparseDelta(tensors, full.metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="extxyz with info['split'] train/test")
    parser.add_argument("--full", required=True, help="delta of method full")
    parser.add_argument("--sparse", required=True, help="delta of method sparse, same base")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = [a for a in read(args.data, ":") if a.info.get("split") == "test"]
    full, sparse = SparseDelta.load(args.full), SparseDelta.load(args.sparse)
    base = load_backend(full.metadata.base_model, dtype="float64")
    params = dict(base.model.named_parameters())
    covered = {i.name for i in base.weight_infos()}
    inside = [n for n in sparse.tensors if n in full.tensors]
    others = [n for n in full.tensors if n not in covered]
    rows = [
        ("sparse delta", sparse),
        ("full delta", full),
        (
            "full, only the sparse delta's tensors",
            SparseDelta({n: full.tensors[n] for n in inside}, full.metadata),
        ),
        *(
            (f"full, those tensors pruned to {f:.0%}", pruned(full, inside, params, f))
            for f in args.fractions
        ),
        (
            "full, only parameters outside the weight tensors",
            SparseDelta({n: full.tensors[n] for n in others}, full.metadata),
        ),
    ]
    print(f"{len(test)} test frames of {args.data}; base {full.metadata.base_model}")
    for label, delta in rows:
        print(f"{label:50s} {force_mae(base, delta, test):8.1f} meV/Å")


if __name__ == "__main__":
    main()
