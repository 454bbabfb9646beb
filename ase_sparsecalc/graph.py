"""Batched atomic graphs: neighbour lists (matscipy, or torch on a GPU) turned into torch tensors.

One :class:`AtomicGraph` holds G structures with N atoms and E directed edges in all. Edge
``e`` goes from ``sender = edge_index[0, e]`` to ``receiver = edge_index[1, e]`` and its vector
is ``positions[receiver] - positions[sender] + unit_shifts[e] @ cell[graph_of_sender]`` (Å),
the convention both MACE and SevenNet use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list
from matscipy.neighbours import neighbour_list

from .device_neighbours import device_is_faster, device_neighbour_pairs, plane_spacings
from .errors import AtomsTooCloseError, ConfigError, StructureError

MIN_DISTANCE = 0.1
"""Closest allowed approach of two atoms, Å; anything closer is treated as broken input."""

_BOX_PADDING = 1.0  # Å added around non-periodic structures for the neighbour-list bins

MAX_BINS = 1_000_000
"""Most neighbour-list bins of one structure. An open structure spread over a huge region (two
fragments flying apart) would otherwise allocate (extent / cutoff)³ bins; past this it is split
into fragments more than a cutoff apart along its open directions, each listed on its own
(:func:`_fragments`), and one fragment still too large goes to ASE's neighbour list, which caps
its bins (slowly: seconds for a thousand atoms spread over a million bins)."""


@dataclass
class AtomicGraph:
    """G structures as one disconnected graph.

    Attributes
    ----------
    positions : (N, 3) float, Å
    numbers : (N,) int64, atomic numbers
    batch : (N,) int64, structure index of each atom
    ptr : (G + 1,) int64, atoms of structure g are ``ptr[g]:ptr[g+1]``
    edge_index : (2, E) int64, sender and receiver of each edge
    unit_shifts : (E, 3) float, integer cell-image offsets of each edge
    cell : (G, 3, 3) float, Å (rows are lattice vectors; zero for molecules)
    pbc : (G, 3) bool
    total_charge : (G,) float, total charge in units of e (see :func:`charge_and_spin`)
    total_spin : (G,) float, spin multiplicity 2S + 1
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    batch: torch.Tensor
    ptr: torch.Tensor
    edge_index: torch.Tensor
    unit_shifts: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    total_charge: torch.Tensor
    total_spin: torch.Tensor

    @property
    def n_graphs(self) -> int:
        """Number of structures G."""
        return int(self.ptr.numel() - 1)

    @property
    def n_atoms(self) -> int:
        """Number of atoms N."""
        return int(self.numbers.numel())

    def edge_shifts(self) -> torch.Tensor:
        """Cartesian image offsets of the edges, (E, 3) Å."""
        sender_cell = self.cell[self.batch[self.edge_index[0]]]
        return torch.einsum("ei,eij->ej", self.unit_shifts, sender_cell)

    def edge_vectors(self) -> torch.Tensor:
        """Edge vectors ``r_receiver - r_sender + shift``, (E, 3) Å."""
        sender, receiver = self.edge_index
        return self.positions[receiver] - self.positions[sender] + self.edge_shifts()

    def volumes(self) -> torch.Tensor:
        """Cell volumes, (G,) Å³ (zero for a structure without a cell, e.g. a molecule)."""
        return torch.linalg.det(self.cell).abs()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AtomicGraph:
        """A copy on ``device`` with floating tensors in ``dtype``."""
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            moved[f.name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
        return AtomicGraph(**moved)


CHARGE_KEY = "charge"
"""``atoms.info`` key of a structure's total charge (e), as in MACE's calculator and fairchem."""

SPIN_KEY = "spin"
"""``atoms.info`` key of a structure's spin multiplicity 2S + 1, as in MACE's calculator and fairchem."""

CHARGE_AND_SPIN_KEYS = {"charge": (CHARGE_KEY, "total_charge"), "spin": (SPIN_KEY, "total_spin")}
"""The ``atoms.info`` keys read for each: MACE's calculator's names first, then the names of
MACE's training files (``--total_charge_key``, ``--total_spin_key`` defaults)."""

NEUTRAL_SINGLET = (0.0, 1.0)
"""Total charge and spin multiplicity of a structure whose ``atoms.info`` names neither."""


def charge_and_spin(atoms: Atoms, where: str = "structure") -> tuple[float, float]:
    """Total charge (e) and spin multiplicity (2S + 1) of a structure.

    Read from ``atoms.info["charge"]`` and ``atoms.info["spin"]`` (or, in files written for
    MACE training, ``"total_charge"`` and ``"total_spin"``); an absent key means a neutral
    singlet (0 and 1). Only models conditioned on charge and spin (MACE models with charge and
    spin embeddings, such as MACE-OMOL) use them.

    Raises
    ------
    StructureError
        A value that is not a finite number, or two keys of one quantity that disagree.
    """
    values = []
    for (quantity, keys), default in zip(CHARGE_AND_SPIN_KEYS.items(), NEUTRAL_SINGLET, strict=True):
        found = {}
        for key in keys:
            if key not in atoms.info:
                continue
            raw = atoms.info[key]
            try:
                found[key] = float(raw)
            except (TypeError, ValueError):
                found[key] = float("nan")
            if not np.isfinite(found[key]):
                raise StructureError(f"{where}: atoms.info[{key!r}] = {raw!r} is not a finite number")
        if len(set(found.values())) > 1:
            given = ", ".join(f"{k}={v:g}" for k, v in found.items())
            raise StructureError(f"{where}: atoms.info gives two values of the {quantity} ({given})")
        values.append(next(iter(found.values()), default))
    return values[0], values[1]


def has_cell_volume(atoms: Atoms) -> bool:
    """True when the cell has three linearly independent vectors (a non-zero volume).

    This is when a stress is defined, as for ASE's own calculators (EMT, LJ): a bulk crystal,
    and also a slab or wire whose cell spans the vacuum (``pbc=[True, True, False]``), whose
    in-plane stress drives a cell relaxation with a mask. A molecule without a cell has none.
    """
    return atoms.cell.volume > 1e-8


def model_positions(atoms: Atoms) -> np.ndarray:
    """The positions a model sees, (N, 3) Å in float64: wrapped into the cell along periodic
    axes, then centred on their mean.

    Neither changes energy, forces or stress (one moves an atom by a lattice vector, the other
    moves all atoms together), but both keep the coordinates near the origin, so a float32
    model keeps its precision however far a structure has drifted (ASE's MD never wraps).
    """
    positions = atoms.get_positions(wrap=bool(np.any(atoms.pbc)))
    return positions - positions.mean(axis=0)


def neighbour_pairs(
    atoms: Atoms, cutoff: float, positions: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j, S) with ``|r_j - r_i + S @ cell| < cutoff`` and their distances.

    Works for molecules (no cell), slabs and bulk; small periodic cells get every image.
    ``positions`` (N, 3) Å replaces ``atoms.positions`` (e.g. :func:`model_positions`).

    Returns
    -------
    i, j : (E,) int
    S : (E, 3) int, cell-image offsets
    d : (E,) float, distances in Å
    """
    check_structure(atoms)
    return _cell_list_pairs(atoms, cutoff, positions)


def _cell_list_pairs(
    atoms: Atoms, cutoff: float, positions: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`neighbour_pairs` of a structure :func:`check_structure` has accepted."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    positions = np.asarray(atoms.positions if positions is None else positions, dtype=np.float64)
    numbers = np.asarray(atoms.numbers, dtype=np.int32)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    origin = None
    if not pbc.all():
        cell, origin = _bounding_cell(positions, cell, pbc)
    if _n_bins(cell, cutoff) > MAX_BINS:
        fragments = _fragments(positions, np.asarray(atoms.cell.array, dtype=np.float64), pbc, cutoff)
        if len(fragments) > 1:
            return _pairs_by_fragment(atoms, cutoff, positions, fragments)
        i, j, S, d = primitive_neighbor_list(
            "ijSd",
            pbc,
            cell,
            positions - (0.0 if origin is None else origin),
            float(cutoff),
            max_nbins=MAX_BINS,
        )
        return i, j, S, d
    i, j, S, d = neighbour_list(
        "ijSd",
        positions=positions,
        cell=cell,
        pbc=pbc,
        cutoff=float(cutoff),
        numbers=numbers,
        cell_origin=origin,
    )
    return i, j, S, d


def _fragments(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> list[np.ndarray]:
    """Atom indices of groups that lie more than ``cutoff`` apart along some open direction.

    Open directions are those perpendicular to every periodic cell vector (x, y, z for a
    molecule, the slab normal for a slab): a lattice translation does not change a position's
    component along them, so two groups separated by a gap wider than the cutoff there share no
    pair in any image. Each direction splits the groups the previous ones left.
    """
    periodic = cell[pbc]
    directions = np.eye(3) if len(periodic) == 0 else np.linalg.svd(periodic)[2][len(periodic) :]
    groups = [np.arange(len(positions))]
    for direction in directions:
        split = []
        for group in groups:
            height = positions[group] @ direction
            order = np.argsort(height, kind="stable")
            breaks = np.flatnonzero(np.diff(height[order]) > cutoff) + 1
            split.extend(group[part] for part in np.split(order, breaks))
        groups = split
    return groups


def _pairs_by_fragment(
    atoms: Atoms, cutoff: float, positions: np.ndarray, fragments: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`neighbour_pairs` as the union of each fragment's own pairs (:func:`_fragments`)."""
    pieces = []
    for fragment in fragments:
        part = Atoms(numbers=atoms.numbers[fragment], cell=atoms.cell, pbc=atoms.pbc)
        i, j, S, d = _cell_list_pairs(part, cutoff, positions[fragment])
        pieces.append((fragment[i], fragment[j], S, d))
    i, j, S, d = (np.concatenate(column) for column in zip(*pieces, strict=True))
    return i, j, S.astype(int, copy=False), d


def check_structure(atoms: Atoms, where: str = "structure") -> None:
    """Refuse structures no model can evaluate: no atoms, non-finite coordinates, flat cells.

    Raises
    ------
    StructureError
        Naming ``where`` and the problem.
    """
    if len(atoms) == 0:
        raise StructureError(f"{where}: the structure has no atoms")
    if not np.all(np.isfinite(atoms.positions)):
        bad = int(np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))[0])
        raise StructureError(f"{where}: atom {bad} has a NaN or infinite position")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise StructureError(f"{where}: the cell holds NaN or infinite entries")
    periodic = np.flatnonzero(atoms.pbc)
    if periodic.size:
        vectors = cell[periodic]
        # the periodic lattice vectors must be linearly independent (a non-zero volume)
        if np.linalg.matrix_rank(vectors, tol=1e-8) < periodic.size:
            raise StructureError(
                f"{where}: periodic along {['xyz'[k] for k in periodic]} but the cell vectors "
                f"{vectors.tolist()} are zero or linearly dependent; set a cell or pbc=False"
            )


def _n_bins(cell: np.ndarray, cutoff: float) -> float:
    """Bins of about ``cutoff`` size that a cell holds (from its lattice-plane spacings)."""
    return float(np.prod(np.maximum(1.0, plane_spacings(cell) // cutoff)))


def _bounding_cell(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A cell for neighbour-list binning: periodic axes kept, open axes span the atoms."""
    lower = positions.min(axis=0) - _BOX_PADDING
    upper = positions.max(axis=0) + _BOX_PADDING
    if not pbc.any():
        return np.diag(upper - lower), lower
    box = cell.copy()
    for axis in np.flatnonzero(~pbc):
        vector = box[axis]
        if np.linalg.norm(vector) < 1e-8:
            vector = np.eye(3)[axis]
        unit = vector / np.linalg.norm(vector)
        extent = positions @ unit
        box[axis] = unit * (extent.max() - extent.min() + 2 * _BOX_PADDING)
    origin = np.zeros(3)
    for axis in np.flatnonzero(~pbc):
        unit = box[axis] / np.linalg.norm(box[axis])
        origin += unit * ((positions @ unit).min() - _BOX_PADDING)
    if abs(np.linalg.det(box)) < 1e-8:
        raise StructureError("cannot build a neighbour list: degenerate cell for periodic axes")
    return box, origin


def build_graph(
    structures: Sequence[Atoms],
    cutoff: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    names: Sequence[str] | None = None,
    neighbours: str = "auto",
) -> AtomicGraph:
    """Neighbour lists of several structures as one batched :class:`AtomicGraph`.

    Parameters
    ----------
    structures : sequence of ase.Atoms
    cutoff : float
        Cutoff radius in Å.
    device, dtype
        Where and in which floating dtype the tensors live.
    names : sequence of str, optional
        How to name each structure in error messages (defaults to ``structure {k}``).
    neighbours : {"auto", "host", "device"}
        Where the neighbour lists are computed: ``"host"``, matscipy's cell lists on the CPU;
        ``"device"``, all pairs against every image with torch on ``device``
        (:mod:`ase_sparsecalc.device_neighbours`; molecules and fully periodic cells only);
        ``"auto"``, the device for each structure that it lists faster when ``device`` is a GPU
        (:func:`~ase_sparsecalc.device_neighbours.device_is_faster`: a few thousand edges and
        up, within the device path's size limit), the host otherwise. Both give the same pairs.

    Raises
    ------
    AtomsTooCloseError
        Two atoms closer than :data:`MIN_DISTANCE`.
    StructureError
        No atoms, non-finite positions or cell, or a periodic axis without a cell vector.
    """
    if neighbours not in ("auto", "host", "device"):
        raise ConfigError(f"neighbours must be 'auto', 'host' or 'device', got {neighbours!r}")
    positions, numbers, batch, edges, shifts, cells, pbcs, ptr = [], [], [], [], [], [], [], [0]
    charges_and_spins = []
    for k, atoms in enumerate(structures):
        where = names[k] if names is not None else f"structure {k}"
        check_structure(atoms, where)
        charges_and_spins.append(charge_and_spin(atoms, where))
        local = model_positions(atoms)
        if _lists_on_device(atoms, cutoff, device, neighbours):
            on_device = torch.as_tensor(local, dtype=torch.float64, device=device)
            i, j, S, d = device_neighbour_pairs(on_device, atoms.cell.array, atoms.pbc, cutoff)
        else:
            i, j, S, d = _cell_list_pairs(atoms, cutoff, local)
        if len(d) and d.min() < MIN_DISTANCE:
            e = int(d.argmin())
            raise AtomsTooCloseError(
                f"{where}: atoms {int(i[e])} and {int(j[e])} are {float(d[e]):.3g} Å apart "
                f"(minimum {MIN_DISTANCE} Å)"
            )
        offset = ptr[-1]
        positions.append(local)
        numbers.append(atoms.numbers)
        batch.append(np.full(len(atoms), k))
        pair = torch.stack([i, j]) if isinstance(i, torch.Tensor) else np.stack([i, j])
        edges.append(pair + offset)
        shifts.append(S)
        cells.append(atoms.cell.array)  # open axes: no image shifts; the volume gives a stress
        pbcs.append(atoms.pbc)
        ptr.append(offset + len(atoms))
    as_float = {"dtype": dtype, "device": device}
    as_long = {"dtype": torch.int64, "device": device}
    return AtomicGraph(
        positions=torch.as_tensor(np.concatenate(positions), **as_float),
        numbers=torch.as_tensor(np.concatenate(numbers), **as_long),
        batch=torch.as_tensor(np.concatenate(batch), **as_long),
        ptr=torch.as_tensor(np.asarray(ptr), **as_long),
        edge_index=_joined(edges, 1, as_long),
        unit_shifts=_joined(shifts, 0, as_float),
        cell=torch.as_tensor(np.stack(cells), **as_float),
        pbc=torch.as_tensor(np.stack(pbcs), dtype=torch.bool, device=device),
        total_charge=torch.as_tensor([c for c, _ in charges_and_spins], **as_float),
        total_spin=torch.as_tensor([s for _, s in charges_and_spins], **as_float),
    )


def _lists_on_device(atoms: Atoms, cutoff: float, device: torch.device | str, neighbours: str) -> bool:
    """Whether :func:`build_graph` lists this structure's neighbours with torch on ``device``."""
    if neighbours != "auto":
        return neighbours == "device"
    on_gpu = torch.device(device).type == "cuda"
    return on_gpu and device_is_faster(len(atoms), atoms.cell.array, atoms.pbc, cutoff)


def _joined(pieces: list, axis: int, where: dict) -> torch.Tensor:
    """Host (numpy) and device (torch) pieces as one tensor: one copy when all are on the host."""
    if all(isinstance(piece, np.ndarray) for piece in pieces):
        return torch.as_tensor(np.concatenate(pieces, axis=axis), **where)
    return torch.cat([torch.as_tensor(piece, **where) for piece in pieces], dim=axis)
