"""Neighbour lists listed by torch (the GPU path) give the same pairs as matscipy's cell lists.

The torch path runs on any device, so these checks run on the CPU; ``tests/test_gpu.py`` runs
the calculator on CUDA, where it is the default for cells that fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from ase_sparsecalc.device_neighbours import (
    MAX_CANDIDATES,
    MIN_EDGES_ON_DEVICE,
    device_is_faster,
    device_neighbour_pairs,
    expected_edges,
    fits_on_device,
)
from ase_sparsecalc.errors import AtomsTooCloseError
from ase_sparsecalc.graph import build_graph, model_positions, neighbour_pairs


def _skewed_cell() -> Atoms:
    """Five atoms in a strongly sheared triclinic cell (needs images beyond the nearest ones)."""
    rng = np.random.default_rng(3)
    cell = np.array([[4.1, 0.0, 0.0], [3.3, 3.9, 0.0], [-1.7, 2.2, 4.4]])
    atoms = Atoms("SiSiCuOH", cell=cell, pbc=True)
    atoms.set_scaled_positions(rng.random((5, 3)))
    return atoms


def _far_from_home() -> Atoms:
    """A rattled crystal whose atoms drifted several cells away, as in unwrapped MD."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.1, seed=5)
    atoms.positions += atoms.cell.array.T @ np.array([3, -2, 7])
    return atoms


STRUCTURES = {
    "molecule": lambda: molecule("CH3CH2OH"),
    "molecule and an atom 10⁶ Å away": lambda: molecule("CH3CH2OH") + Atoms("H", positions=[[1e6] * 3]),
    "diamond Si, 8 atoms": lambda: bulk("Si", "diamond", a=5.43, cubic=True),
    "primitive fcc Cu, 1 atom": lambda: bulk("Cu", "fcc", a=3.61),
    "primitive diamond Si, rattled": lambda: _rattled(bulk("Si", "diamond", a=5.43)),
    "sheared triclinic cell": _skewed_cell,
    "unwrapped positions": _far_from_home,
}


def _rattled(atoms: Atoms) -> Atoms:
    atoms.rattle(0.05, seed=2)
    return atoms


def _pairs(i, j, S, d) -> dict[tuple, float]:
    i, j, S, d = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (i, j, S, d))
    return {(int(a), int(b), *map(int, s)): float(r) for a, b, s, r in zip(i, j, S, d, strict=True)}


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(STRUCTURES))
@pytest.mark.parametrize("cutoff", [3.0, 5.0, 6.0])
def test_device_pairs_equal_the_cell_list_pairs(name, cutoff, device):
    atoms = STRUCTURES[name]()
    local = model_positions(atoms)
    host = _pairs(*neighbour_pairs(atoms, cutoff, local))
    positions = torch.as_tensor(local, device=device)
    listed = _pairs(*device_neighbour_pairs(positions, atoms.cell.array, atoms.pbc, cutoff))
    assert host, "the structure has neighbours"
    assert listed.keys() == host.keys()
    for key, distance in host.items():
        assert listed[key] == pytest.approx(distance, abs=1e-10)


def test_positions_far_outside_the_cell_give_offsets_for_those_positions():
    """Positions as given (not wrapped first): the offsets refer to them, so the edge vectors
    are those of the wrapped structure."""
    atoms = _far_from_home()
    cutoff = 5.0
    wrapped = model_positions(atoms)
    host = _pairs(*neighbour_pairs(atoms, cutoff, wrapped))
    raw = torch.as_tensor(atoms.positions)
    i, j, S, d = device_neighbour_pairs(raw, atoms.cell.array, atoms.pbc, cutoff)
    cell = torch.as_tensor(atoms.cell.array)
    vectors = raw[j] - raw[i] + S.double() @ cell
    torch.testing.assert_close(vectors.norm(dim=1), d, rtol=0, atol=1e-10)
    assert len(d) == len(host)
    assert sorted(np.round(d.numpy(), 8)) == sorted(np.round(list(host.values()), 8))


def test_device_pairs_come_sorted_by_sender():
    atoms = _skewed_cell()
    i, j, _, _ = device_neighbour_pairs(
        torch.as_tensor(model_positions(atoms)), atoms.cell.array, atoms.pbc, 5.0
    )
    key = (i * len(atoms) + j).numpy()
    assert np.all(np.diff(key) >= 0)


def test_graphs_built_both_ways_give_the_same_model_outputs(mace_model_path):
    from ase_sparsecalc import load_backend

    backend = load_backend(mace_model_path, dtype="float64")
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    crystal.rattle(0.05, seed=1)
    structures = [molecule("CH3CH2OH"), crystal, _skewed_cell()]
    outputs = {}
    for where in ("host", "device"):
        graph = build_graph(structures, backend.cutoff, neighbours=where)
        outputs[where] = backend.evaluate(graph, compute_forces=True, compute_stress=True)
    host, device = outputs["host"], outputs["device"]
    torch.testing.assert_close(device.energy, host.energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(device.forces, host.forces, rtol=0, atol=1e-10)
    torch.testing.assert_close(device.stress, host.stress, rtol=0, atol=1e-10)


def test_a_batch_mixing_both_paths_keeps_every_edge(monkeypatch):
    """A slab (host only) between a molecule and a crystal listed on the device, as on a GPU."""
    from ase_sparsecalc import graph as graph_module

    slab = bulk("Cu", "fcc", a=3.61, cubic=True)
    slab.pbc = [True, True, False]
    structures = [molecule("H2O"), slab, _skewed_cell()]
    host = build_graph(structures, 4.0, neighbours="host")
    listed_on_device = []

    def as_on_a_gpu(atoms, cutoff, device, neighbours):
        fits = fits_on_device(len(atoms), atoms.cell.array, atoms.pbc, cutoff)
        listed_on_device.append(fits)
        return fits

    monkeypatch.setattr(graph_module, "_lists_on_device", as_on_a_gpu)
    mixed = build_graph(structures, 4.0)
    assert listed_on_device == [True, False, True]

    def edges(graph):
        rows = torch.cat([graph.edge_index.T, graph.unit_shifts.long()], dim=1)
        return sorted(map(tuple, rows.tolist()))

    assert edges(mixed) == edges(host)
    assert mixed.unit_shifts.dtype == host.unit_shifts.dtype


def test_which_structures_fit_on_the_device():
    silicon = bulk("Si", "diamond", a=5.43, cubic=True)
    assert fits_on_device(len(silicon), silicon.cell.array, silicon.pbc, 5.0)
    assert fits_on_device(9, np.zeros((3, 3)), [False] * 3, 5.0)
    assert not fits_on_device(len(silicon), silicon.cell.array, [True, True, False], 5.0)  # slab
    big = silicon.repeat((8, 8, 8))  # 4096 atoms x 27 images
    assert len(big) ** 2 * 27 > MAX_CANDIDATES
    assert not fits_on_device(len(big), big.cell.array, big.pbc, 5.0)


@pytest.mark.parametrize(("repeat", "cutoff"), [(1, 5.0), (2, 5.0), (2, 6.0), (4, 5.0)])
def test_expected_edges_of_a_crystal_are_close_to_the_listed_ones(repeat, cutoff):
    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat((repeat,) * 3)
    crystal.rattle(0.05, seed=2)
    listed = build_graph([crystal], cutoff, neighbours="host").edge_index.shape[1]
    estimate = expected_edges(len(crystal), crystal.cell.array, crystal.pbc, cutoff)
    assert abs(estimate - listed) < 0.15 * listed


def test_auto_lists_on_a_gpu_only_what_the_gpu_lists_faster():
    """The choice made on a GPU, decided without one: small molecules and cells on the host."""
    from ase_sparsecalc.graph import _lists_on_device

    def on_gpu(atoms, cutoff):
        return _lists_on_device(atoms, cutoff, "cuda", "auto")

    silicon = bulk("Si", "diamond", a=5.43, cubic=True)
    assert not on_gpu(molecule("CH3CH2OH"), 5.0)  # 72 pairs at most
    assert not on_gpu(silicon.repeat((2, 2, 2)), 5.0)  # 1,792 edges: the host was faster
    assert on_gpu(silicon.repeat((2, 2, 2)), 6.0)  # 2,860 edges: the device was faster
    assert on_gpu(silicon.repeat((4, 4, 4)), 5.0)
    assert not on_gpu(silicon.repeat((8, 8, 8)), 5.0)  # past the device's size limit
    large_molecule = silicon.repeat((4, 4, 4))
    large_molecule.pbc = False
    large_molecule.cell = None
    assert on_gpu(large_molecule, 5.0)
    assert device_is_faster(len(large_molecule), large_molecule.cell.array, large_molecule.pbc, 5.0)
    assert expected_edges(9, np.zeros((3, 3)), [False] * 3, 5.0) < MIN_EDGES_ON_DEVICE
    assert not _lists_on_device(silicon.repeat((4, 4, 4)), 5.0, "cpu", "auto")


def test_device_path_refuses_slabs_and_bad_options():
    slab = bulk("Cu", "fcc", a=3.61, cubic=True)
    slab.pbc = [True, True, False]
    with pytest.raises(ValueError, match="pbc all True or all False"):
        build_graph([slab], 4.0, neighbours="device")
    with pytest.raises(ValueError, match="neighbours must be"):
        build_graph([slab], 4.0, neighbours="gpu")


def test_device_path_refuses_atoms_on_top_of_each_other():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions[3] = atoms.positions[0] + [0.01, 0.0, 0.0]
    with pytest.raises(AtomsTooCloseError, match=r"atoms 0 and 3 are 0\.01 Å apart"):
        build_graph([atoms], 5.0, neighbours="device")


@pytest.mark.parametrize("distance", [40.0, 1e3, 1e6])
def test_fragments_far_apart_are_listed_without_a_huge_grid(distance, monkeypatch):
    """Ethanol with one H atom flown off, and a Cu slab with a water molecule far above it:
    the pairs equal ASE's for the same fragments close together (40 Å, where its grid is small),
    and past the bin limit each fragment is listed on its own, never through ASE's capped grid."""
    from ase.build import fcc111
    from ase.neighborlist import neighbor_list

    from ase_sparsecalc import graph

    def close_and_far(d: float) -> list[Atoms]:
        lone = molecule("CH3CH2OH") + Atoms("H", positions=[[d, d, d]])
        slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
        slab.pbc = [True, True, False]
        water = molecule("H2O")
        water.translate(slab.cell.array.sum(axis=0) / 2 + [0.0, 0.0, d])
        return [lone, slab + water]

    if distance > 100:
        monkeypatch.setattr(graph, "primitive_neighbor_list", None)  # any call would fail
    for far, near in zip(close_and_far(distance), close_and_far(40.0), strict=True):
        ours = _pairs(*neighbour_pairs(far, 5.0))
        reference = _pairs(*neighbor_list("ijSd", near, 5.0))
        assert ours.keys() == reference.keys()
        assert all(abs(ours[k] - reference[k]) < 1e-6 for k in ours)
