"""The fine-tuning report: report.json plus parity, learning-curve and sparsity plots."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..delta_io import atomic_write_bytes, atomic_write_text
from .data import Frame

REPORT_NAME = "report.json"


def write_report(report: dict, directory: str | Path) -> Path:
    """Write ``report.json`` into ``directory`` atomically; returns its path.

    The file is standard JSON: a value that is not finite (the loss of a diverged run) is
    written as ``null``, which every JSON reader accepts, rather than Python's ``NaN``.
    """
    path = Path(directory) / REPORT_NAME
    text = json.dumps(_standard_json(report), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text)


def _standard_json(value):
    """``value`` with numpy scalars and arrays as Python ones and non-finite floats as None."""
    if isinstance(value, Mapping):
        return {key: _standard_json(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_standard_json(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_parity(
    frames: Sequence[Frame],
    before: Mapping[int, Mapping[str, np.ndarray]],
    after: Mapping[int, Mapping[str, np.ndarray]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Parity plots of DFT vs model, before and after: energy per atom, force components and,
    where frames have stress labels, the six stress components (GPa)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stressed = [k for k, f in enumerate(frames) if f.stress is not None and "stress" in after.get(k, {})]
    fig, axes = plt.subplots(1, 3 if stressed else 2, figsize=(13.5 if stressed else 9, 4.2))
    ref_e = np.array([f.energy / f.n_atoms for f in frames])
    ref_f = np.concatenate([f.forces.reshape(-1) for f in frames if f.forces is not None] or [np.zeros(0)])
    ref_s = np.array([_voigt_gpa(frames[k].stress) for k in stressed]).reshape(-1)
    for label, preds, style in (("base + shifts", before, "x"), ("calibrated", after, "o")):
        e = np.array([preds[k]["energy"] / f.n_atoms for k, f in enumerate(frames)])
        forces = [preds[k]["forces"].reshape(-1) for k, f in enumerate(frames) if f.forces is not None]
        axes[0].plot(ref_e, e, style, ms=3, alpha=0.6, label=label)
        if forces:
            axes[1].plot(ref_f, np.concatenate(forces), style, ms=2, alpha=0.4, label=label)
        if stressed and all("stress" in preds.get(k, {}) for k in stressed):
            model_s = np.array([_voigt_gpa(preds[k]["stress"]) for k in stressed]).reshape(-1)
            axes[2].plot(ref_s, model_s, style, ms=3, alpha=0.6, label=label)
    names = ("energy / atom (eV)", "force component (eV/Å)", "stress component (GPa)")
    for ax, name in zip(axes, names, strict=False):
        lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lims, lims, "k-", lw=0.8)
        ax.set_xlabel(f"DFT {name}")
        ax.set_ylabel(f"model {name}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # no frame has forces
            ax.text(0.5, 0.5, "no DFT forces", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _voigt_gpa(stress: np.ndarray) -> np.ndarray:
    """(3, 3) stress in eV/Å³ -> its six components (xx yy zz yz xz xy) in GPa."""
    from ase.stress import full_3x3_to_voigt_6_stress
    from ase.units import GPa

    return full_3x3_to_voigt_6_stress(np.asarray(stress).reshape(3, 3)) / GPa


def plot_learning_curves(history: Sequence[Mapping], path: str | Path) -> Path:
    """Loss, delta density and size of the changes against epoch.

    The third panel shows ``median_change`` and, for ``sparse``, ``threshold`` (both in units of
    each tensor's RMS value); the second adds ``support_turnover`` where the history has it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    marker = "o" if len(history) < 20 else None  # a run of one or a few epochs still shows its points
    fig, (ax_loss, ax_density, ax_size) = plt.subplots(1, 3, figsize=(13.5, 3.8), layout="constrained")
    ax_loss.semilogy(epochs, [h["train_loss"] for h in history], label="train", marker=marker)
    ax_loss.semilogy(epochs, [h["valid_loss"] for h in history], label="validation", marker=marker)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_density.plot(epochs, [100 * h["density"] for h in history], label="changed weights", marker=marker)
    _plot_key(ax_density, history, "support_turnover", "new in the support", scale=100.0, marker=marker)
    ax_density.set_xlabel("epoch")
    ax_density.set_ylabel("% (of the weights; of the support)")
    ax_density.legend()
    _plot_key(ax_size, history, "median_change", "median |Δ|", marker=marker)
    _plot_key(ax_size, history, "threshold", "threshold", marker=marker)
    ax_size.set_xlabel("epoch")
    ax_size.set_ylabel("× RMS of the base tensor")
    if ax_size.lines:
        ax_size.legend()
    return _save_figure(fig, Path(path))


def _plot_key(
    ax, history: Sequence[Mapping], key: str, label: str, scale: float = 1.0, marker: str | None = None
) -> None:
    """Plot ``key`` against epoch over the epochs that recorded it (older histories lack it)."""
    points = [(h["epoch"], scale * h[key]) for h in history if key in h]
    if points:
        ax.plot(*zip(*points, strict=True), label=label, marker=marker)


def tensor_density_rows(delta, infos) -> list[dict]:
    """Per trainable tensor: name, non-zeros, size and density of ``delta`` (list of dicts)."""
    rows = []
    for info in infos:
        nnz = delta.tensors[info.name].nnz if info.name in delta.tensors else 0
        rows.append({"name": info.name, "nnz": nnz, "numel": info.numel, "density": nnz / info.numel})
    return rows


def plot_sparsity(rows: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Bar chart of the delta's density per tensor, grouped by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.18 * len(rows))))
    names = [r["name"] for r in rows]
    ax.barh(range(len(rows)), [100 * r["density"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("changed weights in tensor (%)")
    ax.set_title(title)
    return _save_figure(fig, Path(path))
