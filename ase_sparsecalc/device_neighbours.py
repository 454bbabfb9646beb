"""Neighbour lists computed by torch on the model's device: all pairs against every cell image.

On a GPU, listing neighbours on the host (matscipy's cell lists) and copying the edges over
costs a few milliseconds per call at a few hundred atoms, as much as a compiled model's whole
step. Testing every pair of atoms against every cell image that can hold a neighbour costs
N² × images distances: a few million for a 512-atom cell, which a GPU evaluates in a handful of
kernels, and the edges never leave the device. The work grows as N², so larger structures
(past :data:`MAX_CANDIDATES`), slabs and wires keep the host's cell lists
(:func:`ase_sparsecalc.graph.neighbour_pairs`), whose cost grows as N.

For small structures the host is faster: the device path costs a nearly fixed 1.2–2.9 ms of
kernel launches, the host's cell lists a cost that grows with the number of edges (0.5–0.6 ms
for ethanol, 1.0–1.6 ms for 1,800 edges, 3–11 ms for 2,900–23,000; two H100 machines,
``bench/speed_neighbours.py``). :func:`device_is_faster` picks the device from about
:data:`MIN_EDGES_ON_DEVICE` expected edges on.

The pairs are the same as the host's: ordered pairs (i, j, S) with
``|r_j - r_i + S @ cell| < cutoff``, i ≠ j or S ≠ 0.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError

MAX_CANDIDATES = 2**23
"""Most pair-image candidates (N² × images) of one structure listed on the device: 8.4 million
(a 512-atom cell with a 5-6 Å cutoff needs 27 images: 7.1 million). The candidates' squared
distances take 8 bytes each, 67 MB at the limit."""


MIN_EDGES_ON_DEVICE = 2500
"""Expected edges from which the device lists a structure faster than the host (the crossover
measured on two H100 machines: 1,792 edges of 64 Si atoms at 5 Å were faster on the host, 1.0
against 1.7 ms and 1.6 against 2.6 ms; 2,860 at 6 Å faster on the device, 1.6 against 3.1 ms and
2.5 against 4.6 ms)."""


def plane_spacings(cell: np.ndarray) -> np.ndarray:
    """Spacings h_k of the lattice planes spanned by the other two cell vectors, (3,) Å
    (``1 / |b_k|``, b_k the reciprocal vectors: the columns of the inverse cell)."""
    return 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0)


def _image_reach(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Images to search on each side along each axis, (3,) int (see :func:`image_offsets`)."""
    if not np.any(pbc):
        return np.zeros(3, dtype=np.int64)
    return np.ceil(cutoff / plane_spacings(cell)).astype(np.int64)


def image_offsets(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Every cell image that can hold a neighbour of an atom inside the cell.

    With positions wrapped into the cell, fractional coordinate differences along a periodic
    axis k lie in (-1, 1); a neighbour closer than ``cutoff`` then lies at most
    ``ceil(cutoff / h_k)`` images away, where h_k is the spacing of the lattice planes
    (``1 / |b_k|``, b_k the reciprocal vector).

    Parameters
    ----------
    cell : (3, 3) float, Å, rows are lattice vectors
    pbc : (3,) bool; all True or all False
    cutoff : float, Å

    Returns
    -------
    (S, 3) int64, image offsets in lattice vectors; ``[0, 0, 0]`` alone for a structure
    without periodic axes.
    """
    axes = [np.arange(-n, n + 1) for n in _image_reach(cell, pbc, cutoff)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def fits_on_device(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> bool:
    """True for structures this module lists: no axis or all axes periodic, and at most
    :data:`MAX_CANDIDATES` pair-image candidates."""
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        return False
    n_images = int(np.prod(2 * _image_reach(cell, pbc, cutoff) + 1))
    return n_atoms * n_atoms * n_images <= MAX_CANDIDATES


def expected_edges(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> float:
    """About how many ordered neighbour pairs a structure has within ``cutoff`` (Å).

    A periodic cell: N² × (4/3 π r_c³) / V, the pairs of a uniform density. A structure without
    periodic axes: N (N − 1), the bound that no density can exceed (a molecule's volume is not
    defined); small molecules then stay on the host and large ones go to the device.
    """
    if not np.any(pbc):
        return float(n_atoms * (n_atoms - 1))
    volume = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
    return n_atoms * n_atoms * (4.0 / 3.0) * np.pi * cutoff**3 / volume


def device_is_faster(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> bool:
    """True for structures that fit on the device (:func:`fits_on_device`) and have at least
    :data:`MIN_EDGES_ON_DEVICE` expected edges (:func:`expected_edges`): those a GPU lists
    faster than the host."""
    return fits_on_device(n_atoms, cell, pbc, cutoff) and (
        expected_edges(n_atoms, cell, pbc, cutoff) >= MIN_EDGES_ON_DEVICE
    )


def device_neighbour_pairs(
    positions: torch.Tensor, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j, S) with ``|r_j - r_i + S @ cell| < cutoff``, on ``positions``' device.

    Parameters
    ----------
    positions : (N, 3) float64 tensor, Å, anywhere (atoms outside the cell are wrapped for the
        search; the offsets returned refer to the positions as given)
    cell : (3, 3) float, Å
    pbc : (3,) bool; all True or all False (see :func:`fits_on_device`)
    cutoff : float, Å

    Returns
    -------
    i, j : (E,) int64, sorted by i, then j
    S : (E, 3) int64, cell-image offsets
    d : (E,) float64, distances in Å
    """
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any() and not pbc.all():
        raise ConfigError(f"neighbour lists on the device need pbc all True or all False, got {pbc.tolist()}")
    device = positions.device
    cell = np.asarray(cell, dtype=np.float64)
    offsets = image_offsets(cell, pbc, cutoff)
    translations = torch.as_tensor(offsets @ cell, device=device)  # (S, 3)
    if pbc.all():
        # home cell of each atom, (N, 3) int: image offsets are found for the wrapped positions
        # w = r - n @ cell, then turned back into offsets of r (S = S_w + n_i - n_j)
        home_cell = torch.floor(positions @ torch.as_tensor(np.linalg.inv(cell), device=device))
        positions = positions - home_cell @ torch.as_tensor(cell, device=device)
    else:
        home_cell = torch.zeros_like(positions)
    difference = positions[None, :, :] - positions[:, None, :]  # (N, N, 3): r_j - r_i
    # |D + T|² = |D|² + 2 D·T + |T|², as (N, N, S) without an (N, N, S, 3) intermediate
    squared = (
        (difference * difference).sum(-1)[..., None]
        + 2.0 * difference @ translations.T
        + (translations * translations).sum(-1)
    )
    within = squared < cutoff * cutoff
    home = int(np.flatnonzero(~offsets.any(axis=1))[0])  # the [0, 0, 0] image
    atoms = torch.arange(len(positions), device=device)
    within[atoms, atoms, home] = False  # an atom is not its own neighbour
    i, j, image = within.nonzero(as_tuple=True)
    distances = squared[i, j, image].clamp_min(0.0).sqrt()
    shifts = torch.as_tensor(offsets, device=device)[image] + (home_cell[i] - home_cell[j]).long()
    return i, j, shifts, distances
