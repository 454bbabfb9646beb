"""Heatmaps of where a delta changes a model (matplotlib, Agg canvas, files written atomically).

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly, so nothing touches
pyplot's global state or the user's interactive backend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .delta_io import atomic_write_bytes

MAX_HEATMAP_ELEMENTS = 40
"""Most elements a heatmap shows; the ones with the most changed weights are kept."""


def heatmap_matrix(
    rows: Sequence[dict[str, Any]], row_dim: str, col_dim: str, value: str = "density"
) -> tuple[list[str], list[str], np.ndarray]:
    """Pivot rows grouped by ``(row_dim, col_dim)`` into a matrix.

    Parameters
    ----------
    rows : sequence of dict
        Output of :func:`~ase_sparsecalc.analysis.delta_pattern` (or ``compare_deltas``)
        with ``by=(row_dim, col_dim)``; row order sets the label order.
    value : str
        Field to show (``"density"``, ``"jaccard"``, ...).

    Returns
    -------
    row_labels, col_labels : list of str
    matrix : (n_rows, n_cols) float
        NaN where a combination does not exist (or its value is undefined).
    """
    row_labels = list(dict.fromkeys(r[row_dim] for r in rows if r.get("group") != "all"))
    col_labels = list(dict.fromkeys(r[col_dim] for r in rows if r.get("group") != "all"))
    matrix = np.full((len(row_labels), len(col_labels)), np.nan)
    for r in rows:
        if r.get("group") == "all" or r.get("total") == 0 or r.get(value) is None:
            continue
        matrix[row_labels.index(r[row_dim]), col_labels.index(r[col_dim])] = float(r[value])
    return row_labels, col_labels, matrix


def write_heatmap(
    path: str | Path,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar_label: str,
    percent: bool = True,
) -> Path:
    """Render ``matrix`` (n_rows, n_cols) as a PNG heatmap at ``path``, atomically.

    Cells are annotated with their value when the matrix is small; NaN cells stay blank.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = matrix.shape
    col_width = 0.75 if n_cols <= 10 else 0.32
    width = max(4.5, 2.2 + col_width * n_cols)
    fig = Figure(figsize=(width, 1.6 + 0.34 * max(n_rows, 3)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scale = 100.0 if percent else 1.0
    shown = np.ma.masked_invalid(matrix * scale)
    finite = matrix[np.isfinite(matrix)] * scale
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    low = min(0.0, float(finite.min())) if finite.size else 0.0  # densities start at zero
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest", vmin=low, vmax=top)
    crowded = n_cols > 6 or max((len(str(c)) for c in col_labels), default=0) * n_cols > 40
    rotation, align = (45, "right") if crowded else (0, "center")
    ax.set_xticks(range(n_cols), labels=list(col_labels), rotation=rotation, ha=align)
    ax.set_yticks(range(n_rows), labels=list(row_labels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if n_rows * n_cols <= 150 and n_cols <= 12:
        middle = (low + top) / 2
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(matrix[i, j]):
                    v = matrix[i, j] * scale
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="black" if v > middle else "white")  # fmt: skip
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def _top_rows(rows: list[dict[str, Any]], dim: str, keep: int) -> list[dict[str, Any]]:
    """Rows whose ``dim`` label is among the ``keep`` labels with the most non-zeros."""
    nnz: dict[str, int] = {}
    for r in rows:
        nnz[r[dim]] = nnz.get(r[dim], 0) + r.get("nnz", r.get("n_either", 0))
    if len(nnz) <= keep:
        return rows
    chosen = set(sorted(nnz, key=lambda k: -nnz[k])[:keep])
    return [r for r in rows if r[dim] in chosen]


def write_pattern_plots(tables: dict[str, list[dict[str, Any]]], directory: str | Path) -> list[Path]:
    """Density heatmaps from :func:`~ase_sparsecalc.analysis.pattern_tables` output.

    Parameters
    ----------
    tables : dict
        Must hold ``"layer,l"``, ``"layer,element"`` and ``"layer,kind"`` tables.
    directory : str or Path
        Created if missing.

    Returns
    -------
    list of Path
        ``layer_l_density.png``, ``layer_element_density.png`` (element-specific weights only,
        the elements with changed weights, at most :data:`MAX_HEATMAP_ELEMENTS` of them, the most
        changed; skipped if none changed) and ``layer_kind_density.png``.
    """
    directory = Path(directory)
    written = []
    specs = [
        ("layer,l", "layer", "l", "layer_l_density.png", "irrep l (output)", "layer"),
        ("layer,element", "layer", "element", "layer_element_density.png", "element", "layer"),
        ("layer,kind", "layer", "kind", "layer_kind_density.png", "module kind", "layer"),
    ]
    for key, row_dim, col_dim, filename, xlabel, ylabel in specs:
        rows = tables[key]
        if col_dim == "element":
            rows = [r for r in rows if r["element"] not in ("shared", "other")]
            changed = {r["element"] for r in rows if r.get("nnz", 0)}
            rows = _top_rows([r for r in rows if r["element"] in changed], "element", MAX_HEATMAP_ELEMENTS)
            if not rows:
                continue
        row_labels, col_labels, matrix = heatmap_matrix(rows, row_dim, col_dim)
        written.append(
            write_heatmap(
                directory / filename,
                matrix,
                row_labels,
                col_labels,
                title=f"density by {ylabel} and {xlabel}",
                xlabel=xlabel,
                ylabel=ylabel,
                colorbar_label="density (% of trainable weights)",
            )
        )
    return written


def write_overlap_plot(rows: list[dict[str, Any]], directory: str | Path) -> Path:
    """Jaccard overlap heatmap (layer × l) from ``compare_deltas(..., by=("layer", "l"))``."""
    row_labels, col_labels, matrix = heatmap_matrix(rows, "layer", "l", value="jaccard")
    return write_heatmap(
        Path(directory) / "overlap_layer_l_jaccard.png",
        matrix,
        row_labels,
        col_labels,
        title="overlap of non-zero sets (Jaccard)",
        xlabel="irrep l (output)",
        ylabel="layer",
        colorbar_label="|A ∩ B| / |A ∪ B| (%)",
    )
