"""PNG plots of phonon results (matplotlib's object API, no global pyplot state), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically (temporary file, then rename)."""
    from ..delta_io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_bands_and_dos(phonon, path: str | Path, title: str | None = None) -> Path:
    """Band structure along the path (left) and total DOS (right), frequencies in THz."""
    from .phonons import band_segments

    fig = _figure(7.0, 4.2)
    ax_bands, ax_dos = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    ticks: list[float] = []
    labels: list[str] = []
    segments = band_segments(phonon)
    fmin = min(0.0, *(float(f.min()) for *_, f in segments))
    fmax = max(float(f.max()) for *_, f in segments)
    for start, end, dist, _, freqs in segments:
        ax_bands.plot(dist, freqs, color="C0", lw=1.2)
        if ticks and np.isclose(ticks[-1], dist[0]):
            if labels[-1] != start:
                labels[-1] = f"{labels[-1]}|{start}"
        else:
            ticks.append(float(dist[0]))
            labels.append(start)
        ticks.append(float(dist[-1]))
        labels.append(end)
    for x in ticks:
        ax_bands.axvline(x, color="0.7", lw=0.6)
    ax_bands.axhline(0.0, color="0.4", lw=0.6, ls=":")
    ax_bands.set_xticks(ticks, labels)
    ax_bands.set_xlim(ticks[0], ticks[-1])
    ax_bands.set_ylim(fmin - 0.03 * (fmax - fmin), fmax + 0.05 * (fmax - fmin))
    ax_bands.set_ylabel("Frequency (THz)")
    if title:
        ax_bands.set_title(title)

    dos = phonon.total_dos
    ax_dos.plot(dos.dos, dos.frequency_points, color="C1", lw=1.2)
    ax_dos.fill_betweenx(dos.frequency_points, 0, dos.dos, color="C1", alpha=0.25)
    ax_dos.set_xlim(left=0)
    ax_dos.set_xticks([])
    ax_dos.set_xlabel("DOS")
    return _save_png(fig, path)


def plot_thermal_properties(phonon, path: str | Path, title: str | None = None) -> Path:
    """Helmholtz free energy (kJ/mol), entropy and heat capacity (J/(K mol)) vs temperature."""
    tp = phonon.thermal_properties
    n_atoms = len(phonon.primitive)
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    ax.plot(tp.temperatures, tp.free_energy, label="F (kJ/mol)", color="C0")
    ax.plot(tp.temperatures, tp.entropy, label="S (J/K/mol)", color="C1")
    ax.plot(tp.temperatures, tp.heat_capacity, label="$C_V$ (J/K/mol)", color="C2")
    ax.axhline(3 * n_atoms * 8.314462618, color="C2", lw=0.6, ls=":", label="Dulong–Petit $3nR$")
    ax.axhline(0.0, color="0.4", lw=0.6)
    ax.set_xlabel("Temperature (K)")
    ax.set_ylabel("per mole of primitive cells")
    ax.set_xlim(tp.temperatures[0], tp.temperatures[-1])
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)
