"""How large the changed entries of deltas are, relative to their weights, against training length.

For every delta file: the number of optimizer steps it trained for (epochs x steps per epoch,
from its metadata) and the distribution of ``|Δ| / rms(W0)`` over its non-zero entries, where
``rms(W0)`` is the RMS of the base tensor the entry belongs to (the unit the ``sparse`` method
trains in). For a hard-threshold sparse delta the smallest value is the final threshold: no
change smaller than that can be kept. Written to the docs/benchmarks.md section
``delta-magnitudes``.

Example
-------
python bench/delta_magnitudes.py bench/results/deltas/ethanol_50_batch_1.safetensors \\
    bench/results/deltas/ethanol_1000_sparse_batch1.safetensors
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import table_section, update_section_locked
from _speed import portable


def optimizer_steps(metadata) -> int | None:
    """Epochs x steps per epoch of the run that made the delta (None without that metadata)."""
    options, data = metadata.hyperparameters, metadata.training_data
    if not {"epochs", "batch_size"} <= options.keys() or "frames" not in data:
        return None
    return int(options["epochs"]) * math.ceil(int(data["frames"]) / int(options["batch_size"]))


def relative_magnitudes(delta, backend):
    """``|Δ| / rms(W0)`` of every stored entry of ``delta``, as one float64 tensor."""
    import torch

    params = dict(backend.model.named_parameters())
    parts = []
    for name, tensor in delta.tensors.items():
        rms = params[name].detach().double().pow(2).mean().sqrt()
        parts.append(tensor.values.detach().double().abs() / rms)
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deltas", nargs="+", type=Path)
    parser.add_argument("--section", default="delta-magnitudes")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    from ase_sparsecalc import SparseDelta, load_backend

    backends, rows = {}, []
    for path in args.deltas:
        delta = SparseDelta.load(path)
        meta = delta.metadata
        if meta.base_model not in backends:
            backends[meta.base_model] = load_backend(meta.base_model, dtype="float64")
        values = relative_magnitudes(delta, backends[meta.base_model])
        quantiles = values.quantile(values.new_tensor([0.5, 0.9])) if values.numel() else [math.nan] * 2
        rows.append(
            [
                path.name,
                meta.method,
                optimizer_steps(meta) or "–",
                f"{100 * delta.density:.2f} %",
                float(values.min()) if values.numel() else "–",
                float(quantiles[0]),
                float(quantiles[1]),
                float(values.max()) if values.numel() else "–",
            ]
        )
    header = ["delta", "method", "optimizer steps", "density", "min", "median", "p90", "max"]
    command = "python " + shlex.join(portable(a) for a in sys.argv)
    intro = "Columns min to max: |Δ| / rms(W0) over the non-zero entries, W0 the base tensor of each."
    title = "Size of the changed entries against the number of steps"
    body = table_section(title, command, intro, header, rows, args.note)
    update_section_locked(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
