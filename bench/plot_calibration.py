"""Figures for docs/calibration_guide.md: E-V curves and test-set parity, base vs calibrated vs DFT.

Reads the deltas of a ``finetune_accuracy.py`` run on ``si`` or ``cu`` and writes
``docs/images/<system>_calibration_eos.png`` and ``..._parity.png``.

Example: ``python bench/plot_calibration.py --system si``
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import ase.io
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.delta_io import atomic_write_bytes

ROOT = Path(__file__).parents[1]
STRUCTURE = {"si": ("Si", "diamond"), "cu": ("Cu", "fcc")}
LABELS = {"shift": "zero-shot (+ shifts)", "sparse": "sparse delta (3 %)", "full": "full fine-tune"}


def save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, choices=sorted(STRUCTURE))
    args = parser.parse_args()
    symbol, structure = STRUCTURE[args.system]
    results = json.loads((ROOT / "bench" / "results" / f"finetune-{args.system}.json").read_text())
    deltas = {r["method"]: ROOT / r["delta"] for r in results["rows"] if r["method"] in LABELS}
    images = ase.io.read(ROOT / "examples" / "data" / f"{args.system}_pbesol.extxyz", ":")
    eos = [a for a in images if a.info.get("config_type") == "eos"]
    test = [a for a in images if a.info.get("split") == "test"]
    natoms = len(eos[0])
    e_ref = np.array([a.get_potential_energy() for a in eos]) / natoms
    volumes = np.array([a.get_volume() for a in eos]) / natoms

    fig_eos, ax = plt.subplots(figsize=(5, 4))
    ax.plot(volumes, e_ref - e_ref.min(), "ko", label="PBEsol DFT (GPAW)")
    fig_par, axes = plt.subplots(1, len(deltas), figsize=(4 * len(deltas), 3.8), sharey=True)
    ref_forces = np.concatenate([a.get_forces().reshape(-1) for a in test])
    for k, (method, path) in enumerate(deltas.items()):
        calc = SparseCalc("sevennet-0", delta=path)
        energies = np.array([r["energy"] for r in calc.batch_evaluate(eos)]) / natoms
        # same zero as DFT at the DFT minimum volume, so curves compare shape and position
        offset = energies[np.argmin(e_ref)] - e_ref.min()
        ax.plot(volumes, energies - offset - e_ref.min(), "-", label=LABELS[method])
        forces = np.concatenate([r["forces"].reshape(-1) for r in calc.batch_evaluate(test)])
        mae = 1000 * np.abs(forces - ref_forces).mean()
        axes[k].plot(ref_forces, forces, ".", ms=2)
        lim = [ref_forces.min(), ref_forces.max()]
        axes[k].plot(lim, lim, "k-", lw=0.7)
        axes[k].set_title(f"{LABELS[method]}\nforce MAE {mae:.0f} meV/Å", fontsize=9)
        axes[k].set_xlabel("DFT force component (eV/Å)")
    axes[0].set_ylabel("model force component (eV/Å)")
    ax.set_xlabel("volume per atom (Å³)")
    ax.set_ylabel("energy per atom (eV), DFT minimum = 0")
    ax.legend(fontsize=8)
    ax.set_title(f"{symbol} {structure}: equation of state")
    save(fig_eos, ROOT / "docs" / "images" / f"{args.system}_calibration_eos.png")
    save(fig_par, ROOT / "docs" / "images" / f"{args.system}_calibration_parity.png")


if __name__ == "__main__":
    main()
