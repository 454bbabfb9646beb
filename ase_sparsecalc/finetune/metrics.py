"""Error metrics of predictions against DFT labels, in the units people quote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from ase.units import GPa

from .data import Frame

if TYPE_CHECKING:
    from ..calculator import SparseCalc

UNTAGGED = "(none)"
"""The ``by_config_type`` key of frames without a ``config_type`` tag."""


VOIGT_NAMES = ("xx", "yy", "zz", "yz", "xz", "xy")
"""The six stress components in ASE's Voigt order (:func:`ase.stress.full_3x3_to_voigt_6_stress`)."""


def error_metrics(frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """MAE and RMSE of energies, forces and stresses.

    Parameters
    ----------
    frames : sequence of Frame
    predictions : mapping frame index -> {"energy": eV, "forces": (n, 3) eV/Å, "stress": (3, 3) eV/Å³}

    Returns
    -------
    dict
        ``energy_mae``/``energy_rmse`` in meV/atom, ``forces_mae``/``forces_rmse`` in meV/Å
        (over Cartesian components), ``stress_mae``/``stress_rmse`` in GPa (over the nine
        components of the 3x3 tensor, where labelled), ``stress_mae_by_component`` in GPa (xx,
        yy, zz, yz, xz, xy), ``forces_mae_by_element`` in meV/Å, and
        the frames each average runs over (``frames``, ``forces_frames``, ``stress_frames``).
        When the frames carry more than one ``config_type`` tag (bulk, surface, MD at 300 K,
        ...), ``by_config_type`` holds the same metrics for each tag (``"(none)"`` for untagged
        frames).
    """
    e_err, f_err, s_err, f_elem = [], [], [], []
    for k, frame in enumerate(frames):
        pred = predictions[k]
        e_err.append((pred["energy"] - frame.energy) / frame.n_atoms)
        if frame.forces is not None:
            f_err.append(pred["forces"] - frame.forces)
            f_elem.append(frame.atoms.numbers)
        if frame.stress is not None and "stress" in pred:
            s_err.append((pred["stress"] - frame.stress).reshape(-1))
    out: dict = {"frames": len(frames)}
    out.update(_mae_rmse("energy", np.asarray(e_err), 1000.0))
    if f_err:
        forces = np.concatenate(f_err)
        out.update(_mae_rmse("forces", forces, 1000.0))
        out["forces_frames"] = len(f_err)
        numbers = np.concatenate(f_elem)
        from ase.data import chemical_symbols

        out["forces_mae_by_element"] = {
            chemical_symbols[z]: float(1000.0 * np.abs(forces[numbers == z]).mean())
            for z in np.unique(numbers)
        }
    if s_err:
        stresses = np.array(s_err)  # (frames, 9)
        out.update(_mae_rmse("stress", stresses.ravel(), 1.0 / GPa))
        out["stress_frames"] = len(s_err)
        voigt = full_3x3_to_voigt_6_stress(stresses.reshape(-1, 3, 3))  # (frames, 6)
        by_component = np.abs(voigt).mean(axis=0) / GPa
        out["stress_mae_by_component"] = dict(zip(VOIGT_NAMES, map(float, by_component), strict=True))
    tags = sorted({f.config_type or UNTAGGED for f in frames})
    if len(tags) > 1:
        out["by_config_type"] = {}
        for tag in tags:
            chosen = [k for k, f in enumerate(frames) if (f.config_type or UNTAGGED) == tag]
            out["by_config_type"][tag] = error_metrics(
                [frames[k] for k in chosen], {i: predictions[k] for i, k in enumerate(chosen)}
            )
    return out


def predict_frames(calc: SparseCalc, frames: Sequence[Frame], batch_size: int | None = 16) -> dict[int, dict]:
    """A calculator's predictions for labelled frames, as :func:`error_metrics` takes them.

    Per frame index: energy (eV), forces (n, 3) eV/Å and, for frames with a stress label,
    stress (3, 3) eV/Å³, from batched model calls of at most ``batch_size`` structures. Frames
    with and without stress labels go in separate batches, so one molecule or isolated atom in a
    file of crystals does not turn stress off for the rest.

    :func:`evaluate` combines the two.
    """
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


def evaluate(calc: SparseCalc, frames: Sequence[Frame], batch_size: int | None = 16) -> dict:
    """:func:`error_metrics` of ``calc`` on labelled ``frames``, as ``sparsecalc eval`` prints them.

    Example::

        frames = read_frames("test.extxyz")
        metrics = evaluate(SparseCalc(delta="si.safetensors"), frames)
        metrics["forces_mae"]  # meV/Å
    """
    return error_metrics(frames, predict_frames(calc, frames, batch_size))


def _mae_rmse(name: str, errors: np.ndarray, scale: float) -> dict[str, float]:
    if errors.size == 0:
        return {}
    return {
        f"{name}_mae": float(scale * np.abs(errors).mean()),
        f"{name}_rmse": float(scale * np.sqrt(np.mean(errors**2))),
    }


METRIC_UNITS = {
    "energy_mae": "meV/atom",
    "energy_rmse": "meV/atom",
    "forces_mae": "meV/Å",
    "forces_rmse": "meV/Å",
    "stress_mae": "GPa",
    "stress_rmse": "GPa",
}
