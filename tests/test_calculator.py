"""SparseCalc physics contract, run against every backend with a random sparse delta applied."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from ase_sparsecalc import SparseCalc, load_backend
from ase_sparsecalc.delta import DeltaMetadata, SparseDelta
from ase_sparsecalc.errors import (
    AtomsTooCloseError,
    ConfigError,
    DeltaMismatchError,
    StressUndefinedError,
    UnknownElementError,
)
from ase_sparsecalc.testing import random_rotation, random_sparse_delta

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _calc_with_delta(base: str, device: str = "cpu") -> SparseCalc:
    """float64 calculator on ``device`` with a random non-zero sparse delta applied."""
    calc = SparseCalc(base, default_dtype="float64", device=device)
    calc.set_delta(random_sparse_delta(calc.backend, density=0.03, relative_scale=0.3, seed=7))
    return calc


@pytest.fixture
def calc(base_for, backend_kind) -> SparseCalc:
    return _calc_with_delta(base_for(backend_kind))


def _evaluate(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress(voigt=False)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_rotation_and_translation_equivariance(base_for, backend_kind, device, structure, request):
    calc = _calc_with_delta(base_for(backend_kind), device)
    atoms = request.getfixturevalue(structure)
    ref = _evaluate(calc, atoms)
    R = random_rotation(seed=11)
    moved = atoms.copy()
    moved.positions = atoms.positions @ R.T + np.array([0.3, -1.2, 2.5])
    if atoms.pbc.all():
        moved.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    out = _evaluate(calc, moved)
    scale_e = max(1.0, abs(ref["energy"]))
    assert out["energy"] == pytest.approx(ref["energy"], abs=1e-5 * scale_e)
    f_scale = max(1.0, np.abs(ref["forces"]).max())
    np.testing.assert_allclose(out["forces"], ref["forces"] @ R.T, atol=1e-5 * f_scale)
    if "stress" in ref:
        s_scale = max(1e-3, np.abs(ref["stress"]).max())
        np.testing.assert_allclose(out["stress"], R @ ref["stress"] @ R.T, atol=1e-5 * s_scale)


def test_delta_changes_predictions(calc, silicon):
    with_delta = _evaluate(calc, silicon)
    calc.set_delta(None)
    bare = _evaluate(calc, silicon)
    assert abs(with_delta["energy"] - bare["energy"]) > 1e-4
    assert np.abs(with_delta["forces"] - bare["forces"]).max() > 1e-4


@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_forces_are_minus_energy_gradient(calc, structure, request):
    atoms = request.getfixturevalue(structure).copy()
    atoms.calc = calc
    forces = atoms.get_forces()
    rng = np.random.default_rng(0)
    h = 1e-4
    for _ in range(4):
        direction = rng.standard_normal(atoms.positions.shape)
        direction /= np.linalg.norm(direction)
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions += sign * h * direction
            displaced.calc = calc
            energies.append(displaced.get_potential_energy())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        analytic = float(np.sum(forces * direction))
        assert numeric == pytest.approx(analytic, abs=1e-5 + 1e-5 * abs(analytic))


def _silicon_slab(silicon: Atoms) -> Atoms:
    """The sheared Si cell as a slab: open along z, with 6 Å of vacuum in its cell."""
    slab = silicon.copy()
    cell = slab.cell.array.copy()
    cell[2] *= 1 + 6.0 / np.linalg.norm(cell[2])
    slab.set_cell(cell, scale_atoms=False)
    slab.pbc = [True, True, False]
    return slab


def _ethanol_in_box(ethanol: Atoms) -> Atoms:
    """Ethanol in a 9 x 10 x 11 Å box that is not periodic (a cell with a volume)."""
    boxed = ethanol.copy()
    boxed.set_cell([9.0, 10.0, 11.0])
    boxed.center()
    boxed.pbc = False
    return boxed


@pytest.mark.parametrize("structure", ["silicon", "slab", "ethanol_in_box"])
def test_stress_is_finite_strain_derivative(calc, silicon, ethanol, structure):
    """Bulk, and (as for ASE's EMT) any cell with a volume: a slab with vacuum, a boxed molecule."""
    atoms = {
        "silicon": silicon,
        "slab": _silicon_slab(silicon),
        "ethanol_in_box": _ethanol_in_box(ethanol),
    }[structure].copy()
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.zeros((3, 3))
            strain[i, j] += sign * h / (1 if i == j else 2)
            strain[j, i] = strain[i, j]
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
            deformed.calc = calc
            energies.append(deformed.get_potential_energy())
        numeric = (energies[0] - energies[1]) / (2 * h * volume)
        assert numeric == pytest.approx(stress[i, j], abs=1e-6 + 1e-4 * abs(stress[i, j])), (i, j)


def test_small_cell_and_its_supercell_agree(calc):
    """A 2-atom Si cell (every neighbour within the cutoff is a periodic image, several per
    atom pair) and its 2 x 3 x 1 supercell: the same energy per atom, forces and stress."""
    from ase.build import bulk

    cell = bulk("Si", "diamond", a=5.43)
    cell.positions[1] += [0.05, -0.03, 0.02]
    cell.set_cell(
        cell.cell.array @ np.diag([1.01, 0.98, 1.0]),
        scale_atoms=True,
    )
    big = cell.repeat((2, 3, 1))
    small_out, big_out = _evaluate(calc, cell), _evaluate(calc, big)
    assert big_out["energy"] / len(big) == pytest.approx(
        small_out["energy"] / len(cell), abs=1e-9 + 1e-9 * abs(small_out["energy"])
    )
    np.testing.assert_allclose(big_out["forces"], np.tile(small_out["forces"], (6, 1)), atol=1e-8)
    np.testing.assert_allclose(big_out["stress"], small_out["stress"], atol=1e-9)
    assert np.abs(small_out["forces"]).max() > 1e-3  # the displacement gives forces to compare


def test_results_for_molecule_and_crystal(calc, ethanol, silicon):
    ethanol.calc = calc
    assert np.isfinite(ethanol.get_potential_energy())
    assert ethanol.get_forces().shape == (9, 3)
    assert ethanol.get_potential_energy() == ethanol.get_potential_energy(force_consistent=True)
    with pytest.raises(StressUndefinedError, match="non-zero volume"):
        ethanol.get_stress()
    silicon.calc = calc
    assert silicon.get_stress().shape == (6,)
    assert np.abs(silicon.get_forces().sum(axis=0)).max() < 1e-8  # Newton's third law
    # no spin output: ASE's own error, naming the model
    named = f"magmoms .*{re.escape(str(calc.backend.model_name))}.*no spin output"
    with pytest.raises(PropertyNotImplementedError, match=named):
        silicon.get_magnetic_moments()
    with pytest.raises(PropertyNotImplementedError, match="dipole property not implemented"):
        silicon.get_dipole_moment()


def test_per_atom_energies(calc, ethanol):
    """``energies`` sum to the energy, carry each element's shift and do not change when the
    molecule is rotated and moved."""
    atoms = ethanol.copy()
    atoms.calc = calc
    per_atom = atoms.get_potential_energies()
    assert per_atom.shape == (9,)
    assert per_atom.sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(seed=5).T + [1.0, -2.0, 0.5]
    moved.calc = calc
    np.testing.assert_allclose(moved.get_potential_energies(), per_atom, atol=1e-8)
    shifts = {"C": 1.5, "H": -0.25, "O": 0.75}
    calc.set_delta(None)  # the same random delta as the fixture's, drawn from the bare weights
    calc.set_delta(
        random_sparse_delta(calc.backend, density=0.03, relative_scale=0.3, seed=7, energy_shifts=shifts)
    )
    shifted = calc.get_potential_energies(atoms)
    expected = np.array([shifts[symbol] for symbol in atoms.get_chemical_symbols()])
    np.testing.assert_allclose(shifted - per_atom, expected, atol=1e-9)


def test_batch_evaluate_matches_single_calls(calc, ethanol, silicon):
    batch = calc.batch_evaluate([ethanol, silicon, ethanol], properties=["energy", "forces"])
    for atoms, res in zip([ethanol, silicon, ethanol], batch, strict=True):
        single = _evaluate(calc, atoms)
        assert res["energy"] == pytest.approx(single["energy"], abs=1e-8)
        np.testing.assert_allclose(res["forces"], single["forces"], atol=1e-8)
    assert "stress" in batch[1] and "stress" not in batch[0]


def test_set_delta_switches_without_state_leaks(base_for, backend_kind, silicon):
    calc = SparseCalc(base_for(backend_kind))
    bare = _evaluate(calc, silicon)
    delta_a = random_sparse_delta(calc.backend, density=0.02, seed=1, energy_shifts={"Si": 0.5})
    delta_b = random_sparse_delta(calc.backend, density=0.02, seed=2)
    calc.set_delta(delta_a)
    with_a = _evaluate(calc, silicon)
    calc.set_delta(delta_b)
    with_b = _evaluate(calc, silicon)
    fresh_b = _evaluate(SparseCalc(base_for(backend_kind), delta=delta_b), silicon)
    assert with_b["energy"] == pytest.approx(fresh_b["energy"], abs=1e-10)
    calc.set_delta(None)
    again = _evaluate(calc, silicon)
    assert again["energy"] == bare["energy"]
    np.testing.assert_array_equal(again["forces"], bare["forces"])
    assert with_a["energy"] != pytest.approx(bare["energy"], abs=1e-3)


def test_delta_file_names_its_base(base_for, backend_kind, silicon, tmp_path):
    calc = SparseCalc(base_for(backend_kind))
    delta = random_sparse_delta(calc.backend, density=0.02, seed=3)
    path = delta.save(tmp_path / "d.safetensors")
    from_file = SparseCalc(delta=path)
    explicit = SparseCalc(base_for(backend_kind), delta=delta)
    assert _evaluate(from_file, silicon)["energy"] == pytest.approx(
        _evaluate(explicit, silicon)["energy"], abs=1e-10
    )


def test_foreign_delta_refused(mace_model_path, other_mace_model_path):
    other = SparseCalc(other_mace_model_path)
    delta = random_sparse_delta(other.backend, density=0.01)
    with pytest.raises(DeltaMismatchError) as info:
        SparseCalc(mace_model_path, delta=delta)
    assert "other_mace.model" in str(info.value) and "small_mace.model" in str(info.value)
    with pytest.warns(UserWarning):
        SparseCalc(mace_model_path, delta=delta, strict=False)


def test_unknown_element_and_close_atoms(calc):
    if calc.backend.name == "mace":
        with pytest.raises(UnknownElementError, match="Fe"):
            calc.batch_evaluate([Atoms("Fe2", positions=[[0, 0, 0], [0, 0, 2.0]])])
    with pytest.raises(AtomsTooCloseError, match=r"0\.05"):
        calc.batch_evaluate([Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.05]])])


def test_elements_outside_the_training_data_are_warned_about_once(mace_model_path, ethanol, silicon):
    import warnings

    from ase_sparsecalc.errors import UntrainedElementWarning

    calc = SparseCalc(mace_model_path)
    delta = random_sparse_delta(calc.backend, density=0.01)
    delta.metadata.training_data = {"elements": ["H", "C", "O"]}
    calc.set_delta(delta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calc.batch_evaluate([ethanol])  # trained elements only
        calc.batch_evaluate([silicon, silicon])
        calc.batch_evaluate([silicon])
    untrained = [str(w.message) for w in caught if issubclass(w.category, UntrainedElementWarning)]
    assert len(untrained) == 1 and "element(s) Si are not in the training data" in untrained[0]
    assert "(H, C, O)" in untrained[0]
    calc.set_delta(None)  # the bare base has nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedElementWarning)
        calc.batch_evaluate([silicon])
    shifts_only = SparseDelta({}, DeltaMetadata(method="shift", energy_shifts={"H": 0.1}))
    shifts_only.metadata.training_data = {"elements": ["H", "C", "O"]}
    calc.set_delta(shifts_only)  # changes no weight: silicon is exactly the base model's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calc.batch_evaluate([silicon])
    (message,) = [str(w.message) for w in caught if issubclass(w.category, UntrainedElementWarning)]
    assert "changes no weights, so their forces are the base model's" in message
    assert "shares weights" not in message


def test_float32_runs_close_to_float64(base_for, backend_kind, silicon):
    e64 = _evaluate(SparseCalc(base_for(backend_kind), default_dtype="float64"), silicon)
    e32 = _evaluate(SparseCalc(base_for(backend_kind), default_dtype="float32"), silicon)
    assert e32["energy"] == pytest.approx(e64["energy"], abs=1e-3 * max(1, abs(e64["energy"])))
    np.testing.assert_allclose(e32["forces"], e64["forces"], atol=1e-3)


def test_float32_total_energy_of_a_large_cell_with_all_electron_e0s(mace_model_path):
    """The model's E0s (here -1029.5 eV for C, -2042 eV for O) are added and summed in float64:
    a 576-atom float32 cell lands within 1e-3 eV of float64 (1.0 eV off when the model summed
    them in float32), and the per-atom energies still sum to the energy."""
    from ase.build import molecule

    box = Atoms(cell=[10.0, 10.0, 10.0], pbc=True)
    for corner in np.ndindex(2, 2, 2):
        ethanol = molecule("CH3CH2OH")
        ethanol.translate(5.0 * np.array(corner) + 2.0)
        box += ethanol
    cell = box.repeat((2, 2, 2))
    results = {}
    for dtype in ("float32", "float64"):
        cell.calc = SparseCalc(mace_model_path, default_dtype=dtype)
        results[dtype] = (cell.get_potential_energy(), cell.get_potential_energies().sum())
    assert abs(results["float32"][0]) > 2e5
    assert results["float32"][0] == pytest.approx(results["float64"][0], abs=1e-3)
    assert results["float32"][1] == pytest.approx(results["float32"][0], abs=1e-6)


def test_failed_set_delta_keeps_the_delta_it_had(mace_model_path, other_mace_model_path, silicon):
    """A delta for another base is refused and the calculator goes on with its delta, not with
    the bare base or results cached from before."""
    calc = SparseCalc(mace_model_path)
    delta = random_sparse_delta(calc.backend, density=0.03, relative_scale=0.3, seed=5)
    calc.set_delta(delta)
    before = _evaluate(calc, silicon)
    foreign = random_sparse_delta(SparseCalc(other_mace_model_path).backend, density=0.01)
    with pytest.raises(DeltaMismatchError):
        calc.set_delta(foreign)
    assert calc.delta is delta and calc.parameters["delta"] == "(in memory)"
    moved = silicon.copy()
    moved.positions[0, 0] += 1e-6  # a fresh evaluation, not a cached one
    after = _evaluate(calc, moved)
    assert after["energy"] == pytest.approx(before["energy"], abs=1e-4)
    calc.set_delta(None)  # the delta is still properly applied: it comes off
    assert _evaluate(calc, silicon)["energy"] != pytest.approx(before["energy"], abs=1e-3)


def test_float32_results_do_not_depend_on_where_the_crystal_sits(base_for, backend_kind, silicon):
    """MD never wraps positions: a crystal 10⁴ Å from the origin, with an atom several lattice
    vectors away, gives the same float32 forces and stress (coordinates are wrapped and centred
    in float64 before the cast; before, forces moved by 9 meV/Å)."""
    calc = SparseCalc(base_for(backend_kind), default_dtype="float32")
    reference = _evaluate(calc, silicon)
    far = silicon.copy()
    far.positions += 1.0e4
    far.positions[3] += far.cell[0] * 7 - far.cell[2] * 3
    moved = _evaluate(calc, far)
    np.testing.assert_allclose(moved["forces"], reference["forces"], atol=2e-5)
    np.testing.assert_allclose(moved["stress"], reference["stress"], atol=1e-6)
    assert moved["energy"] == pytest.approx(reference["energy"], abs=1e-4)


def test_fragments_far_apart(base_for, backend_kind):
    """Two molecules 17 000 Å apart (a gas, the fragments of a collision) need no
    (extent / cutoff)³ neighbour-list bins and give twice one molecule's energy."""
    calc = SparseCalc(base_for(backend_kind))
    water = Atoms("H2O", positions=[[0.0, 0.76, -0.48], [0.0, -0.76, -0.48], [0.0, 0.0, 0.12]])
    pair = water + water
    pair.positions[3:] += 1.0e4
    single, double = calc.batch_evaluate([water, pair])
    assert double["energy"] == pytest.approx(2 * single["energy"], abs=1e-8)
    np.testing.assert_allclose(double["forces"][3:], single["forces"], atol=1e-10)


def test_options_are_checked_and_recorded(base_for, backend_kind):
    """Misspelt options are refused, not swallowed; what the calculator is made of is in
    ``todict()`` (written into ASE trajectories and databases) and cannot be changed with set()."""
    base = base_for(backend_kind)
    with pytest.raises(ConfigError, match="dtype option is default_dtype"):
        SparseCalc(base, dtype="float32")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        SparseCalc(base, device="mps")
    with pytest.raises(ConfigError, match="backend must be one of mace, sevennet"):
        SparseCalc(base, backend="nequip")
    calc = SparseCalc(base, default_dtype="float32")
    recorded = calc.todict()
    assert recorded["base"] == calc.backend.model_name and recorded["default_dtype"] == "float32"
    assert recorded["device"] == "cpu" and recorded["delta"] is None
    with pytest.raises(ConfigError, match="cannot change after construction"):
        calc.set(default_dtype="float64")
    # a torch dtype is recorded by name, so the record rebuilds the calculator
    assert SparseCalc(base, default_dtype=torch.float32).todict()["default_dtype"] == "float32"


def test_todict_names_the_delta_file_by_absolute_path(mace_model_path, tmp_path, monkeypatch):
    random_sparse_delta(load_backend(mace_model_path)).save(tmp_path / "d.safetensors")
    monkeypatch.chdir(tmp_path)
    recorded = SparseCalc(mace_model_path, "d.safetensors").todict()
    assert recorded["delta"] == str((tmp_path / "d.safetensors").resolve())
    monkeypatch.chdir(tmp_path.parent)
    assert SparseCalc(**recorded).delta is not None
    assert "strict" not in recorded
    # a delta applied with strict=False records it, so that the record rebuilds the calculator
    other = random_sparse_delta(load_backend(mace_model_path))
    other.metadata.base_fingerprint = "0" * 64
    other.save(tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match="fingerprint"):
        recorded = SparseCalc(mace_model_path, tmp_path / "other.safetensors", strict=False).todict()
    assert recorded["strict"] is False
    with pytest.warns(UserWarning, match="fingerprint"):
        assert SparseCalc(**recorded).delta is not None


def test_calculator_with_delta_survives_deepcopy_and_pickle(base_for, backend_kind, silicon):
    """Atoms carrying the calculator can be deep-copied and pickled (multiprocessing, joblib);
    the copy gives the same results and its delta comes off its own model only."""
    import copy
    import pickle

    calc = _calc_with_delta(base_for(backend_kind))
    with_delta = _evaluate(calc, silicon)
    bare = _evaluate(SparseCalc(base_for(backend_kind), default_dtype="float64"), silicon)
    for clone in (copy.deepcopy(calc), pickle.loads(pickle.dumps(calc))):
        assert _evaluate(clone, silicon)["energy"] == pytest.approx(with_delta["energy"], abs=1e-10)
        clone.set_delta(None)
        assert _evaluate(clone, silicon)["energy"] == pytest.approx(bare["energy"], abs=1e-10)
    calc.reset()
    assert _evaluate(calc, silicon)["energy"] == pytest.approx(with_delta["energy"], abs=1e-10)
