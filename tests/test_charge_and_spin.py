"""Total charge and spin multiplicity (``atoms.info["charge"]``, ``["spin"]``).

Models with charge and spin embeddings (MACE-OMOL's kind) get them per structure, as MACE's own
calculator gives them; other models ignore them and say so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, load_backend
from ase_sparsecalc.errors import BaseModelError, StructureError
from ase_sparsecalc.finetune import finetune_with_report, read_frames
from ase_sparsecalc.finetune.data import Frame
from ase_sparsecalc.finetune.label_checks import (
    warn_if_charge_states_mixed,
    warn_if_spin_disagrees_with_magmom,
)
from ase_sparsecalc.graph import charge_and_spin
from ase_sparsecalc.testing import build_mace_model, random_rotation, random_sparse_delta, save_mace_model

STATES = [(0, 1), (1, 2), (-1, 2), (0, 3)]  # (charge, spin multiplicity)
ETHANOL = str(Path(__file__).parents[1] / "examples" / "data" / "ethanol_train.xyz")


@pytest.fixture(scope="module")
def charged_model_path(tmp_path_factory) -> str:
    """A small MACE model with charge and spin embeddings (H, C, O)."""
    path = tmp_path_factory.mktemp("models") / "charge_spin_mace.model"
    save_mace_model(path, atomic_numbers=(1, 6, 8), charge_and_spin=True, seed=4)
    return str(path)


def _with_state(atoms, charge, spin):
    atoms = atoms.copy()
    atoms.info.update(charge=charge, spin=spin)
    return atoms


@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning")
def test_charged_model_agrees_with_macecalculator(charged_model_path, ethanol, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # MACECalculator's own loading
    from mace.calculators import MACECalculator

    ours = SparseCalc(charged_model_path)
    reference = MACECalculator(model_paths=charged_model_path, device="cpu", default_dtype="float64")
    energies = []
    for charge, spin in STATES:
        atoms = _with_state(ethanol, charge, spin)
        atoms.calc = ours
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        ref = atoms.copy()
        ref.calc = reference
        assert energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(forces, ref.get_forces(), atol=1e-8)
        energies.append(energy)
    assert len({round(e, 6) for e in energies}) == len(STATES)  # every state is its own input


def test_batch_of_mixed_states_equals_one_by_one(charged_model_path, ethanol):
    calc = SparseCalc(charged_model_path)
    structures = [_with_state(ethanol, c, s) for c, s in STATES]
    batched = calc.batch_evaluate(structures)
    for atoms, result in zip(structures, batched, strict=True):
        single = SparseCalc(charged_model_path).batch_evaluate([atoms])[0]
        assert result["energy"] == pytest.approx(single["energy"], abs=1e-9)
        np.testing.assert_allclose(result["forces"], single["forces"], atol=1e-9)


def test_changing_charge_on_the_same_atoms_recomputes(charged_model_path, ethanol):
    atoms = _with_state(ethanol, 0, 1)
    atoms.calc = SparseCalc(charged_model_path)
    neutral = atoms.get_potential_energy()
    atoms.info.update(charge=1, spin=2)
    cation = atoms.get_potential_energy()
    fresh = _with_state(ethanol, 1, 2)
    fresh.calc = SparseCalc(charged_model_path)
    assert cation == pytest.approx(fresh.get_potential_energy(), abs=1e-9)
    assert abs(cation - neutral) > 1e-3
    atoms.info["total_charge"] = 2  # contradicts info["charge"]: the message names the structure
    with pytest.raises(StructureError, match=r"structure \(C2H6O\): .*two values of the charge"):
        atoms.get_potential_energy()


def test_charged_molecule_with_a_delta_stays_equivariant(charged_model_path, ethanol):
    calc = SparseCalc(charged_model_path)
    calc.set_delta(random_sparse_delta(calc.backend, density=0.05, relative_scale=0.5, seed=2))
    atoms = _with_state(ethanol, 1, 2)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    R = random_rotation(3)
    atoms.positions = atoms.positions @ R.T
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), forces @ R.T, atol=1e-9)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"charge": 150}, r"atoms.info\['charge'\] = 150, .* integer from -100 to 100"),
        ({"charge": 0.5}, r"atoms.info\['charge'\] = 0.5, .* integer"),
        ({"spin": -1}, r"atoms.info\['spin'\] = -1, .* integer from 0 to 100"),
        ({"charge": "plus one"}, r"atoms.info\['charge'\] = 'plus one' is not a finite number"),
        ({"spin": float("nan")}, r"atoms.info\['spin'\] = nan is not a finite number"),
    ],
)
def test_charge_or_spin_the_model_cannot_take_is_refused(charged_model_path, ethanol, info, message):
    atoms = ethanol.copy()
    atoms.info.update(info)
    with pytest.raises(StructureError, match=message):
        SparseCalc(charged_model_path).batch_evaluate([atoms], names=["cation.xyz:0"])


def test_model_conditioned_on_another_input_is_refused():
    from ase_sparsecalc.backends.mace import mace_backend_from_module

    model = build_mace_model((1, 6, 8), charge_and_spin=True)
    model.embedding_specs["elec_temp"] = {"type": "continuous", "per": "graph", "in_dim": 1, "emb_dim": 8}
    with pytest.raises(BaseModelError, match="conditioned on elec_temp"):
        mace_backend_from_module(model, "hot.model", torch.device("cpu"), torch.float64)


def test_model_without_charge_input_says_once_that_it_ignores_it(mace_model_path, ethanol, caplog):
    calc = SparseCalc(mace_model_path)
    assert not calc.backend.takes_charge_and_spin
    neutral = calc.batch_evaluate([ethanol])[0]["energy"]
    with caplog.at_level(logging.WARNING, logger="ase_sparsecalc"):
        cation = calc.batch_evaluate([_with_state(ethanol, 1, 2), _with_state(ethanol, -1, 2)])
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(said) == 1 and "charge 1 and spin multiplicity 2" in said[0]
    assert [r["energy"] for r in cation] == [neutral, neutral]


def test_mixed_charge_states_are_flagged_for_a_model_without_charge_input(ethanol):
    frames = [
        Frame(_with_state(ethanol, c, s), -1000.0, None, None, f"ions.xyz:{k}")
        for k, (c, s) in enumerate([(0, 1), (1, 2), (0, 1)])
    ]
    message = warn_if_charge_states_mixed(frames, takes_charge_and_spin=False)
    assert message is not None and "2 charge and spin states" in message and "ions.xyz:1" in message
    assert warn_if_charge_states_mixed(frames, takes_charge_and_spin=True) is None
    assert warn_if_charge_states_mixed(frames[::2], takes_charge_and_spin=False) is None


def test_spin_polarised_dft_read_as_a_singlet_is_flagged_for_a_spin_conditioned_model(tmp_path):
    """GPAW PBE of triplet O2 (spin-polarised LCAO): the file gives its local moments, and a
    frame without info['spin'] would be trained as a singlet by a model that takes the spin."""
    [frame] = read_frames(str(Path(__file__).parent / "data" / "gpaw_o2_triplet.txt"))
    assert frame.magmom == pytest.approx(1.425, abs=0.01)  # the local moments: 2.0 μB in total
    message = warn_if_spin_disagrees_with_magmom([frame], takes_charge_and_spin=True)
    assert message is not None and "gpaw_o2_triplet.txt:frame 0" in message and "1.43 μB" in message
    assert warn_if_spin_disagrees_with_magmom([frame], takes_charge_and_spin=False) is None
    frame.atoms.info["spin"] = 3
    assert warn_if_spin_disagrees_with_magmom([frame], takes_charge_and_spin=True) is None
    closed_shell = read_frames(ETHANOL + "@0")
    assert closed_shell[0].magmom is None
    assert warn_if_spin_disagrees_with_magmom(closed_shell, takes_charge_and_spin=True) is None


def test_frames_read_from_a_file_keep_their_charge_and_spin(tmp_path, ethanol):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    structures = [_with_state(ethanol, 0, 1), _with_state(ethanol, 1, 2), ethanol.copy()]
    for k, atoms in enumerate(structures):
        atoms.calc = SinglePointCalculator(atoms, energy=-4200.0 - k, forces=np.zeros((len(atoms), 3)))
    path = tmp_path / "ions.extxyz"
    write(path, structures)
    assert "charge=1 spin=2" in path.read_text()  # the comment line of the cation
    frames = read_frames(str(path))
    assert [charge_and_spin(f.atoms) for f in frames] == [(0, 1), (1, 2), (0, 1)]
    # files written for MACE training name them total_charge and total_spin
    mace_style = [a.copy() for a in structures]
    for atoms, original in zip(mace_style, structures, strict=True):
        atoms.info = {"total_" + k: v for k, v in atoms.info.items()}
        atoms.calc = SinglePointCalculator(atoms, **original.calc.results)
    write(path, mace_style)
    assert [charge_and_spin(f.atoms) for f in read_frames(str(path))] == [(0, 1), (1, 2), (0, 1)]
    structures[1].info["total_charge"] = 2
    with pytest.raises(StructureError, match=r"two values of the charge \(charge=1, total_charge=2\)"):
        charge_and_spin(structures[1])
    del structures[1].info["total_charge"]
    structures[1].info["charge"] = "plus one"
    write(path, structures)
    with pytest.raises(StructureError, match=r"ions.extxyz.*1.*atoms.info\['charge'\] = 'plus one'"):
        read_frames(str(path))


def test_finetune_learns_charge_dependent_labels(charged_model_path):
    """Frames of a neutral and a cationic state, labelled by a teacher (the same model with a
    known delta): a short fine-tune fits both."""
    teacher = SparseCalc(charged_model_path)
    teacher.set_delta(random_sparse_delta(teacher.backend, density=0.05, relative_scale=0.5, seed=7))
    dft = read_frames(ETHANOL + "@:16")
    structures = [_with_state(f.atoms, *((1, 2) if k % 2 else (0, 1))) for k, f in enumerate(dft)]
    labels = teacher.batch_evaluate(structures)
    frames = [
        Frame(a, r["energy"], r["forces"], None, f"teacher:{k}")
        for k, (a, r) in enumerate(zip(structures, labels, strict=True))
    ]
    result = finetune_with_report(
        charged_model_path, frames[:12], frames[12:], density=0.05, epochs=6, batch_size=4, lr=1e-2, seed=3
    )
    history = result.report["history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert result.report["after"]["train"]["forces_mae"] < result.report["before"]["train"]["forces_mae"]
    assert not any("charge and spin states" in w for w in result.report["data_checks"]["warnings"])


def test_cli_relax_of_a_cation(charged_model_path, ethanol, tmp_path, capsys):
    from ase.io import read, write

    from ase_sparsecalc.cli import main

    start, out = tmp_path / "ethanol.xyz", tmp_path / "cation.extxyz"
    write(start, ethanol)  # plain XYZ: no charge in the file
    args = ["relax", str(start), "--base", charged_model_path, "--steps", "3", "-o", str(out)]
    assert main([*args, "--charge", "1", "--spin", "2"]) in (0, 3)  # 3: not converged in 3 steps
    relaxed = read(out)
    assert (relaxed.info["charge"], relaxed.info["spin"]) == (1, 2)
    check = relaxed.copy()
    check.calc = SparseCalc(charged_model_path)
    assert relaxed.get_potential_energy() == pytest.approx(check.get_potential_energy(), abs=1e-8)
    neutral = _with_state(relaxed, 0, 1)
    neutral.calc = SparseCalc(charged_model_path)
    assert abs(neutral.get_potential_energy() - check.get_potential_energy()) > 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # argparse: a multiplicity is a whole number
        main([*args, "--spin", "0.5"])
    assert refused.value.code == 2 and "--spin" in capsys.readouterr().err


def test_isolated_atom_references_are_taken_in_the_ground_state_spin(charged_model_path):
    """For the per-element prior of the energy shifts, a model with a spin input sees a doublet
    H and a triplet O (Hund's rule), as isolated-atom DFT energies are computed."""
    from ase import Atoms

    from ase_sparsecalc.finetune import _isolated_atom_prior

    backend = load_backend(charged_model_path)
    prior = _isolated_atom_prior(backend, {"H": -13.6, "O": -2042.0, "C": -1029.5, "Si": -4.0})
    assert set(prior) == {"H", "O", "C"}  # Si: unknown to this model
    calc = SparseCalc(charged_model_path)
    for symbol, dft, multiplicity in (("H", -13.6, 2), ("O", -2042.0, 3)):
        atom = Atoms(symbol, info={"spin": multiplicity})
        assert prior[symbol] == pytest.approx(dft - calc.get_potential_energy(atom), abs=1e-9)
        singlet = Atoms(symbol)
        assert prior[symbol] != pytest.approx(dft - calc.get_potential_energy(singlet), abs=1e-6)


def test_compiled_model_is_one_graph_across_charge_states(charged_model_path, ethanol, dynamo_graphs):
    """Charge and spin reach the torch.compile copy as tensors: dynamo sees one graph for three
    charge states (no recompilation), and the results equal eager ones. Dynamo traces, but no
    code is generated (fast)."""
    eager = SparseCalc(charged_model_path)
    compiled = SparseCalc(charged_model_path, compile_mode="default")
    energies = []
    for charge, spin in STATES[:3]:
        atoms = _with_state(ethanol, charge, spin)
        fast, reference = compiled.batch_evaluate([atoms])[0], eager.batch_evaluate([atoms])[0]
        assert fast["energy"] == pytest.approx(reference["energy"], abs=1e-9)
        np.testing.assert_allclose(fast["forces"], reference["forces"], atol=1e-9)
        energies.append(fast["energy"])
    assert len(dynamo_graphs) == 1
    assert len({round(e, 6) for e in energies}) == 3


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPARSECALC_TEST_COMPILE") != "1",
    reason="compiling MACE takes many minutes on a small CPU; set SPARSECALC_TEST_COMPILE=1",
)
def test_compiled_charged_model_matches_eager(charged_model_path, ethanol):
    eager = SparseCalc(charged_model_path)
    compiled = SparseCalc(charged_model_path, compile_mode="default")
    structures = [_with_state(ethanol, c, s) for c, s in STATES]
    pairs = zip(compiled.batch_evaluate(structures), eager.batch_evaluate(structures), strict=True)
    for fast, reference in pairs:
        assert fast["energy"] == pytest.approx(reference["energy"], abs=1e-9)
        np.testing.assert_allclose(fast["forces"], reference["forces"], atol=1e-9)


def test_phonon_supercells_carry_the_cell_charge_and_spin_scaled():
    """Charge and unpaired electrons are extensive: 8 copies of a +1 doublet are a +8 nonet."""
    from ase.build import bulk
    from ase.calculators.calculator import all_changes
    from ase.calculators.emt import EMT

    from ase_sparsecalc.workflows.phonons import phonons, supercell_charge_and_spin

    seen = []

    class RecordingEMT(EMT):
        def calculate(self, atoms=None, properties=("energy",), system_changes=tuple(all_changes)):
            seen.append(charge_and_spin(atoms))
            super().calculate(atoms, properties, system_changes)

    cell = bulk("Cu", "fcc", a=3.61)  # one atom
    for state, expected in [((1, 2), (8.0, 9.0)), ((0, 1), (0.0, 1.0)), ((-2, 1), (-16.0, 1.0))]:
        seen.clear()
        charged = _with_state(cell, *state)
        phonons(charged, RecordingEMT(), supercell=2, mesh=(2, 2, 2), plot=False)
        assert seen and set(seen) == {expected}
    assert supercell_charge_and_spin(cell, 27) == {}  # a neutral singlet adds no keys
    assert supercell_charge_and_spin(_with_state(cell, 0, 3), 4) == {"charge": 0.0, "spin": 9.0}
