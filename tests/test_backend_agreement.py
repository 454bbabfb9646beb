"""With an empty delta, SparseCalc agrees with the backends' own calculators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, load_backend


@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning")
@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_mace_agrees_with_macecalculator_float64(mace_model_path, structure, request, monkeypatch):
    # MACECalculator unpickles its model with weights_only off, via this variable that mace sets
    # on import and ase_sparsecalc removes again; give it back for this test only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from mace.calculators import MACECalculator

    atoms = request.getfixturevalue(structure)
    ours = atoms.copy()
    ours.calc = SparseCalc(mace_model_path, default_dtype="float64")
    ref = atoms.copy()
    ref.calc = MACECalculator(model_paths=mace_model_path, device="cpu", default_dtype="float64")
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(ours.get_potential_energies(), ref.get_potential_energies(), atol=1e-6)
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=1e-5)
    if atoms.pbc.all():
        np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), atol=1e-6)


@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_sevennet_agrees_with_sevennetcalculator_float32(structure, request):
    sevenn_calc = pytest.importorskip("sevenn.calculator")
    atoms = request.getfixturevalue(structure)
    ours = atoms.copy()
    ours.calc = SparseCalc("sevennet-0", default_dtype="float32")
    ref = atoms.copy()
    ref.calc = sevenn_calc.SevenNetCalculator("7net-0", device="cpu")
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(ours.get_potential_energies(), ref.get_potential_energies(), atol=1e-4)
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=1e-4)
    if atoms.pbc.all():
        np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), atol=1e-6)


@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_sevennet_agrees_with_sevenn_pipeline_float64(structure, request):
    """SevenNetCalculator itself only runs in float32, so float64 is checked against sevenn's
    own graph construction and unbatched model call, with the model cast to float64."""
    pytest.importorskip("sevenn")
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph

    atoms = request.getfixturevalue(structure)
    ours = atoms.copy()
    ours.calc = SparseCalc("sevennet-0", default_dtype="float64")
    backend = load_backend("sevennet-0", dtype="float64")
    backend.model.set_is_batch_data(False)
    data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, backend.cutoff))
    for key in (KEY.POS, KEY.EDGE_VEC, KEY.CELL, KEY.CELL_SHIFT, KEY.CELL_VOLUME):
        data[key] = data[key].to(torch.float64)
    data[KEY.EDGE_VEC].requires_grad_(True)
    out = backend.model(data)
    assert ours.get_potential_energy() == pytest.approx(float(out[KEY.PRED_TOTAL_ENERGY].detach()), abs=1e-6)
    np.testing.assert_allclose(ours.get_forces(), out[KEY.PRED_FORCE].detach().numpy(), atol=1e-5)
    if atoms.pbc.all():
        ref_stress = -out[KEY.PRED_STRESS].detach().numpy()[[0, 1, 2, 4, 5, 3]]
        np.testing.assert_allclose(ours.get_stress(), ref_stress, atol=1e-7)


def test_the_backends_own_calculators_import_after_this_package():
    """In a fresh process: importing ase_sparsecalc is enough for sevenn's calculator to import
    (e3nn needs ``slice`` on torch's weights_only allow-list), with weights_only still on."""
    import os
    import subprocess
    import sys

    pytest.importorskip("sevenn")
    code = (
        "import os, ase_sparsecalc\n"
        "from sevenn.calculator import SevenNetCalculator\n"
        "assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
