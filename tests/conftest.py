"""Shared fixtures: real models (SevenNet-0 from the sevenn wheel, small MACE models built here)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from ase_sparsecalc import load_backend
from ase_sparsecalc.testing import save_mace_model

BACKENDS = ["mace", "sevennet"]

# Tolerances keyed to dtype: float64 tests are tight, float32 ones allow rounding.
TOL = {"float64": 1e-6, "float32": 1e-3}


@pytest.fixture(scope="session")
def mace_model_path(tmp_path_factory) -> str:
    """A small MACE model (H, C, O, Si, Cu; l up to 2 in features, 3 in edges) saved to disk."""
    path = tmp_path_factory.mktemp("models") / "small_mace.model"
    save_mace_model(path, atomic_energies=[-13.6, -1029.5, -2042.0, -4.0, -3.5], seed=1)
    return str(path)


@pytest.fixture(scope="session")
def other_mace_model_path(tmp_path_factory) -> str:
    """A second small MACE model with other weights (for foreign-delta tests)."""
    path = tmp_path_factory.mktemp("models") / "other_mace.model"
    save_mace_model(path, seed=2)
    return str(path)


@pytest.fixture
def dynamo_graphs(monkeypatch) -> list:
    """The graphs dynamo hands to the compiler while a test runs, collected instead of compiled.

    ``SparseCalc(..., compile_mode=...)`` then traces as usual but generates no code (fast), and
    the list's length is the number of graphs (one per recompilation)."""
    from ase_sparsecalc.backends import accelerate

    graphs = []

    def collect(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(accelerate.torch, "compile", functools.partial(torch.compile, backend=collect))
    torch._dynamo.reset()
    return graphs


@pytest.fixture(scope="session")
def base_for(mace_model_path):
    """``base_for(kind)``: the base argument that loads a model of that backend."""
    pytest.importorskip("sevenn")
    return {"mace": mace_model_path, "sevennet": "sevennet-0"}.__getitem__


@pytest.fixture(params=BACKENDS)
def backend_kind(request) -> str:
    return request.param


@pytest.fixture
def backend64(base_for, backend_kind):
    """A float64 backend of each kind (a private copy)."""
    return load_backend(base_for(backend_kind), dtype="float64")


@pytest.fixture
def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    return atoms


@pytest.fixture
def silicon() -> Atoms:
    """8-atom diamond Si, rattled and sheared so that no symmetry hides mistakes."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=4)
    cell = atoms.cell.array @ (np.eye(3) + np.array([[0.01, 0.02, 0], [0, -0.01, 0.015], [0, 0, 0.02]]))
    atoms.set_cell(cell, scale_atoms=True)
    return atoms
