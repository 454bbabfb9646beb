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


WORSE_RATIO = 1.25
"""A part of the errors counts as made worse when it grew by this factor and by ..."""
WORSE_BY = {"energy_mae": 0.5, "forces_mae": 5.0, "stress_mae": 0.02}
"""... at least this much (meV/atom, meV/Å, GPa): smaller changes are noise."""
MIN_PART_FRAMES = 3
"""The fewest frames of one ``config_type`` whose errors are compared: one or two are noise."""


def worsened_errors(
    before: Mapping,
    after: Mapping,
    kinds: Sequence[str] = ("energy_mae", "forces_mae", "stress_mae"),
    totals: bool = True,
) -> list[str]:
    """The parts of :func:`error_metrics` that grew from ``before`` to ``after``: each force error
    by element, each stress component, and the energy, force and stress errors of each
    ``config_type`` with :data:`MIN_PART_FRAMES` frames or more, as ``"stress xy 0.0039 ->
    0.061 GPa"``. A part counts when it grew by a factor :data:`WORSE_RATIO` and by
    :data:`WORSE_BY` at least. ``kinds`` limits the errors looked at (those a loss weighed).
    Empty when nothing grew.

    With ``totals``, the energy, force and stress errors over all frames count too.
    """
    pairs = []  # (name, key, before value, after value)
    if totals:
        kind_names = {"energy_mae": "energy MAE", "forces_mae": "force MAE", "stress_mae": "stress MAE"}
        pairs += [(kind_names[k], k, before[k], after[k]) for k in kinds if k in before and k in after]
    if "forces_mae" in kinds:
        was, now = before.get("forces_mae_by_element", {}), after.get("forces_mae_by_element", {})
        pairs += [(f"force MAE on {name}", "forces_mae", was[name], now[name]) for name in was if name in now]
    if "stress_mae" in kinds and after.get("stress_frames", 0) >= 2:
        was, now = before.get("stress_mae_by_component", {}), after.get("stress_mae_by_component", {})
        pairs += [(f"stress {name}", "stress_mae", was[name], now[name]) for name in was if name in now]
    tags_before, tags_after = before.get("by_config_type", {}), after.get("by_config_type", {})
    for tag, was_tag in tags_before.items():
        now_tag = tags_after.get(tag, {})
        if now_tag.get("frames", 0) < MIN_PART_FRAMES:
            continue
        for key, kind in (("energy_mae", "energy"), ("forces_mae", "force"), ("stress_mae", "stress")):
            if key in kinds and key in was_tag and key in now_tag:
                pairs.append((f"{kind} MAE of config_type {tag}", key, was_tag[key], now_tag[key]))
    return [
        f"{name} {was:.3g} -> {now:.3g} {METRIC_UNITS[key]}"
        for name, key, was, now in pairs
        if now > WORSE_RATIO * was and now - was > WORSE_BY[key]
    ]


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
