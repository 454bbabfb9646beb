"""The calculator's per-step path: no repeated work, no parameter gradients, bounded batches,
and the opt-in accelerated MACE paths (cuEquivariance, torch.compile) agreeing with e3nn."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from ase_sparsecalc import SparseCalc
from ase_sparsecalc import calculator as calculator_module
from ase_sparsecalc.backends import load_backend
from ase_sparsecalc.calculator import chunk_indices
from ase_sparsecalc.errors import BackendNotInstalledError, BaseModelError
from ase_sparsecalc.testing import random_sparse_delta

HAS_CUEQ = all(importlib.util.find_spec(m) is not None for m in ("cuequivariance", "cuequivariance_torch"))


def _count_model_calls(calc: SparseCalc, monkeypatch) -> list:
    """Record the graph of every backend.evaluate call the calculator makes."""
    calls = []
    original = calc.backend.evaluate

    def spy(graph, *args, **kwargs):
        calls.append(graph)
        return original(graph, *args, **kwargs)

    monkeypatch.setattr(calc.backend, "evaluate", spy)
    return calls


def test_unchanged_structure_is_not_evaluated_again(base_for, backend_kind, silicon, monkeypatch):
    calc = SparseCalc(base_for(backend_kind))
    calls = _count_model_calls(calc, monkeypatch)
    silicon.calc = calc
    forces = silicon.get_forces()
    silicon.get_forces()
    silicon.get_potential_energy()
    silicon.get_stress()
    assert len(calls) == 1  # energy, forces and stress all came from the first call
    silicon.positions[0, 0] += 0.01
    moved = silicon.get_forces()
    assert len(calls) == 2
    assert not np.allclose(moved, forces)


def test_state_check_agrees_with_ase_for_exact_and_tiny_changes(base_for, silicon):
    """The exact-equality shortcut of check_state gives ASE's answer in every case."""
    from ase.calculators.calculator import compare_atoms

    calc = SparseCalc(base_for("mace"))
    silicon.calc = calc
    silicon.get_potential_energy()
    variants = {"unchanged": silicon.copy()}
    variants["moved 1e-20 Å (under ASE's tolerance)"] = silicon.copy()
    variants["moved 1e-20 Å (under ASE's tolerance)"].positions[0, 0] += 1e-20
    variants["moved 1e-6 Å"] = silicon.copy()
    variants["moved 1e-6 Å"].positions[1, 2] += 1e-6
    variants["strained"] = silicon.copy()
    variants["strained"].set_cell(silicon.cell * 1.001, scale_atoms=False)
    variants["magnetic moments"] = silicon.copy()
    variants["magnetic moments"].set_initial_magnetic_moments([1.0] * len(silicon))
    variants["momenta only"] = silicon.copy()
    variants["momenta only"].set_momenta(np.ones((len(silicon), 3)))
    for name, atoms in variants.items():
        expected = compare_atoms(calc.atoms, atoms)
        assert sorted(calc.check_state(atoms)) == sorted(expected), name
    assert calc.check_state(variants["unchanged"]) == []
    assert calc.check_state(variants["moved 1e-6 Å"]) == ["positions"]


def test_inference_keeps_parameters_without_gradients(base_for, backend_kind, silicon):
    calc = SparseCalc(base_for(backend_kind))
    calc.set_delta(random_sparse_delta(calc.backend, density=0.05, seed=3))
    silicon.calc = calc
    silicon.get_forces()
    model = calc.backend.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_chunks_respect_structure_and_atom_bounds():
    sizes = [5, 5, 5, 20, 1, 1, 1]
    groups = chunk_indices(sizes, max_structures=2, max_atoms=12)
    assert [k for g in groups for k in g] == list(range(len(sizes)))  # order kept, nothing lost
    for group in groups:
        assert len(group) <= 2
        assert sum(sizes[k] for k in group) <= 12 or len(group) == 1  # a big one goes alone
    assert groups == [[0, 1], [2], [3], [4, 5], [6]]
    assert chunk_indices(sizes, None, None) == [list(range(len(sizes)))]
    with pytest.raises(ValueError, match="max_atoms"):
        chunk_indices(sizes, None, 0)


def test_batch_evaluate_bounds_atoms_per_call_with_unchanged_results(mace_model_path, monkeypatch):
    calc = SparseCalc(mace_model_path)
    structures = []
    for k in range(5):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=k)
        structures.append(atoms)
    one_by_one = [calc.batch_evaluate([a], ("energy", "forces", "stress"))[0] for a in structures]
    calls = _count_model_calls(calc, monkeypatch)
    bounded = calc.batch_evaluate(structures, ("energy", "forces", "stress"), max_atoms=16)
    assert [g.n_atoms for g in calls] == [16, 16, 8]
    for a, b in zip(one_by_one, bounded, strict=True):
        assert b["energy"] == pytest.approx(a["energy"], rel=1e-12)
        np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-10)
        np.testing.assert_allclose(b["stress"], a["stress"], atol=1e-10)


def test_mixed_batch_builds_one_graph_per_kind(mace_model_path, monkeypatch):
    """Molecules and crystals in one request: two graphs (not a third, wasted, mixed one)."""
    calc = SparseCalc(mace_model_path)
    crystal = bulk("Si", "diamond", a=5.43)
    crystal.rattle(0.05, seed=1)
    mol = molecule("CH3CH2OH")
    built = []
    original = calculator_module.build_graph

    def spy(structures, *args, **kwargs):
        built.append(len(structures))
        return original(structures, *args, **kwargs)

    monkeypatch.setattr(calculator_module, "build_graph", spy)
    results = calc.batch_evaluate([crystal, mol, crystal.copy()])
    assert sorted(built) == [1, 2]
    assert "stress" in results[0] and "stress" not in results[1]
    assert results[2]["energy"] == pytest.approx(results[0]["energy"], rel=1e-12)


def test_mace_molecule_in_a_stress_batch_gives_finite_gradients(mace_model_path):
    """A molecule (zero cell) batched with a crystal whose stress is differentiated."""
    from ase_sparsecalc import load_backend
    from ase_sparsecalc.graph import build_graph

    backend = load_backend(mace_model_path, dtype="float64")
    crystal = bulk("Si", "diamond", a=5.43)
    crystal.rattle(0.05, seed=1)
    graph = build_graph([molecule("CH3CH2OH"), crystal], backend.cutoff)
    name, weight = next((n, p) for n, p in backend.model.named_parameters() if "linear" in n)
    trial = {name: weight.detach().clone().requires_grad_(True)}
    out = backend.evaluate(graph, compute_stress=True, training=True, parameters=trial)
    loss = out.stress[1].pow(2).sum() + out.forces.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, trial[name])
    assert bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)


# ---------------------------------------------------------------------- accelerated paths
def test_accelerations_are_refused_for_sevennet():
    pytest.importorskip("sevenn")
    with pytest.raises(BaseModelError, match="implemented for mace bases"):
        SparseCalc("sevennet-0", default_dtype="float32", enable_cueq=True)


def test_cueq_and_compile_together_are_refused(mace_model_path):
    with pytest.raises(ValueError, match="choose one"):
        SparseCalc(mace_model_path, enable_cueq=True, compile_mode="default")


@pytest.mark.skipif(HAS_CUEQ, reason="cuequivariance is installed")
def test_cueq_without_the_cuda_extra_says_what_to_install(mace_model_path):
    with pytest.raises(BackendNotInstalledError, match=r"ase_sparsecalc\[cuda\]"):
        SparseCalc(mace_model_path, enable_cueq=True)


def _small_crystal():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=7)
    return atoms


def _assert_same_results(calc_a, calc_b, atoms, atol):
    a, b = (
        calc_a.batch_evaluate([atoms], ("energy", "forces", "stress"))[0],
        calc_b.batch_evaluate([atoms], ("energy", "forces", "stress"))[0],
    )
    assert b["energy"] == pytest.approx(a["energy"], abs=atol * len(atoms))
    np.testing.assert_allclose(b["forces"], a["forces"], atol=atol)
    np.testing.assert_allclose(b["stress"], a["stress"], atol=atol)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUEQ, reason="needs the cuda extra (cuequivariance, cuequivariance-torch)")
def test_cueq_follows_the_delta_applied_to_the_e3nn_weights(mace_model_path):
    """Same results as e3nn with a delta, after switching deltas, and for the bare base."""
    reference = SparseCalc(mace_model_path)
    with pytest.warns(UserWarning, match="without its fused kernels"):
        fast = SparseCalc(mace_model_path, enable_cueq=True)  # on the CPU: the naive fallback
    first = random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=1)
    second = random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=2)
    atoms = _small_crystal()
    for delta in (first, second, None):
        reference.set_delta(delta)
        fast.set_delta(delta)
        _assert_same_results(reference, fast, atoms, atol=1e-9)
    assert fast.backend.accelerator.name == "cueq"


def test_accelerated_copy_follows_every_delta_change(mace_model_path):
    """The inference copy is re-synchronised whenever the e3nn weights change in place."""
    import copy

    from ase_sparsecalc.backends.accelerate import Accelerator

    class CopyAccelerator(Accelerator):
        name = "copy"
        calls = 0

        def _build(self, source):
            return copy.deepcopy(source)

        def _copy_weights(self, source):
            self.module.load_state_dict(source.state_dict())

        def __call__(self, source, *args, **kwargs):
            CopyAccelerator.calls += 1
            return super().__call__(source, *args, **kwargs)

    reference = SparseCalc(mace_model_path)
    fast = SparseCalc(mace_model_path)
    backend = fast.backend
    backend.accelerator = CopyAccelerator(backend.model, backend.device, backend.dtype)
    atoms = _small_crystal()
    for seed in (1, 2):
        delta = random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=seed)
        reference.set_delta(delta)
        fast.set_delta(delta)
        _assert_same_results(reference, fast, atoms, atol=1e-12)
    fast.set_delta(None)
    reference.set_delta(None)
    _assert_same_results(reference, fast, atoms, atol=1e-12)
    assert CopyAccelerator.calls == 3
    assert not any(p.requires_grad for p in backend.accelerator.module.parameters())


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPARSECALC_TEST_COMPILE") != "1",
    reason="compiling MACE takes many minutes on a small CPU; set SPARSECALC_TEST_COMPILE=1",
)
def test_compiled_mace_matches_eager_with_a_delta(mace_model_path):
    reference = SparseCalc(mace_model_path)
    fast = SparseCalc(mace_model_path, compile_mode="default")
    delta = random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=1)
    reference.set_delta(delta)
    fast.set_delta(delta)
    _assert_same_results(reference, fast, _small_crystal(), atol=1e-9)
    assert fast.backend.accelerator.name == "compile"


def test_sevennet_rebuilt_for_compile_is_one_graph_and_follows_deltas(dynamo_graphs):
    """The SevenNet copy made for torch.compile (rebuilt without TorchScript, activations
    fx-traced, force output run after it) reaches dynamo as one graph for crystals of two sizes
    and a molecule, and matches e3nn with a delta, after switching deltas, and for the bare base.
    Dynamo traces, but no code is generated (fast)."""
    pytest.importorskip("sevenn")
    reference = SparseCalc("sevennet-0")
    fast = SparseCalc("sevennet-0", compile_mode="default")
    assert fast.backend.accelerator.name == "compile"
    crystal = _small_crystal()
    for seed in (1, 2, None):
        delta = None if seed is None else random_sparse_delta(reference.backend, 0.05, 0.5, seed=seed)
        reference.set_delta(delta)
        fast.set_delta(delta)
        _assert_same_results(reference, fast, crystal, atol=1e-9)
    _assert_same_results(reference, fast, crystal.repeat((2, 1, 1)), atol=1e-9)
    ethanol = molecule("CH3CH2OH")
    results = [calc.batch_evaluate([ethanol], ("energy", "forces"))[0] for calc in (reference, fast)]
    np.testing.assert_allclose(results[1]["forces"], results[0]["forces"], atol=1e-9)
    assert len(dynamo_graphs) == 1  # dynamic shapes: no recompilation for another size or a molecule
    assert not any(p.requires_grad for p in fast.backend.accelerator.module.parameters())


def test_sevennet_without_a_force_output_last_is_not_compiled():
    pytest.importorskip("sevenn")
    from ase_sparsecalc.backends.accelerate import _take_gradient_output

    model = load_backend("sevennet-0").model
    model.delete_module_by_key("force_output")
    with pytest.raises(BaseModelError, match="not the force output"):
        _take_gradient_output(model)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPARSECALC_TEST_COMPILE") != "1",
    reason="compiling SevenNet-0 takes minutes on a small CPU; set SPARSECALC_TEST_COMPILE=1",
)
def test_compiled_sevennet_matches_eager_with_a_delta():
    pytest.importorskip("sevenn")
    reference = SparseCalc("sevennet-0", default_dtype="float32")
    fast = SparseCalc("sevennet-0", default_dtype="float32", compile_mode="default")
    delta = random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=1)
    reference.set_delta(delta)
    fast.set_delta(delta)
    _assert_same_results(reference, fast, _small_crystal(), atol=1e-5)
    ethanol = molecule("CH3CH2OH")
    results = [calc.batch_evaluate([ethanol], ("energy", "forces"))[0] for calc in (reference, fast)]
    np.testing.assert_allclose(results[1]["forces"], results[0]["forces"], atol=1e-5)
