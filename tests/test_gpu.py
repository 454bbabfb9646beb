"""CUDA against CPU: the same base and delta give the same physics on both devices.

(Rotation equivariance on CUDA is a case of ``tests/test_calculator.py``.)

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, SparseDelta
from ase_sparsecalc.finetune import finetune_with_report, read_frames
from ase_sparsecalc.testing import random_sparse_delta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ETHANOL = str(Path(__file__).parents[1] / "examples" / "data" / "ethanol_train.xyz")


def _results(calc: SparseCalc, atoms) -> dict[str, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = calc
    out = {"energy": np.array(atoms.get_potential_energy()), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress()
    return out


@pytest.mark.parametrize("structure", ["ethanol", "silicon"])
def test_cuda_float64_matches_cpu_with_a_delta(base_for, backend_kind, structure, request):
    atoms = request.getfixturevalue(structure)
    cpu = SparseCalc(base_for(backend_kind), device="cpu", default_dtype="float64")
    delta = random_sparse_delta(cpu.backend, density=0.03, relative_scale=0.3, seed=2)
    cpu.set_delta(delta)
    gpu = SparseCalc(base_for(backend_kind), delta=delta, device="cuda", default_dtype="float64")
    on_cpu, on_gpu = _results(cpu, atoms), _results(gpu, atoms)
    for key in on_cpu:
        np.testing.assert_allclose(on_gpu[key], on_cpu[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_cuda_float32_stays_close_to_float64(base_for, backend_kind, silicon):
    """float32 on the GPU (TF32 or not) stays within rounding of the float64 reference."""
    ref = _results(SparseCalc(base_for(backend_kind), device="cpu", default_dtype="float64"), silicon)
    fast = _results(SparseCalc(base_for(backend_kind), device="cuda", default_dtype="float32"), silicon)
    assert fast["energy"] == pytest.approx(ref["energy"], abs=1e-3 * len(silicon))
    np.testing.assert_allclose(fast["forces"], ref["forces"], atol=2e-3)
    np.testing.assert_allclose(fast["stress"], ref["stress"], atol=2e-4)


def test_cuda_batch_evaluate_matches_single_calls(base_for, backend_kind, ethanol, silicon):
    calc = SparseCalc(base_for(backend_kind), device="cuda", default_dtype="float64")
    structures = [ethanol, silicon, silicon.repeat((2, 1, 1))]
    batched = calc.batch_evaluate(structures)
    for atoms, got in zip(structures, batched, strict=True):
        single = _results(calc, atoms)
        for key in single:
            np.testing.assert_allclose(got[key], single[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_finetune_on_cuda_lowers_the_error_and_the_delta_runs_on_cpu(mace_model_path, tmp_path):
    """A delta trained on the GPU is plain data: saved, loaded on the CPU, same predictions."""
    frames = read_frames(ETHANOL + "@:12")
    result = finetune_with_report(
        mace_model_path,
        frames[:10],
        frames[10:],
        output=tmp_path / "gpu.safetensors",
        epochs=4,
        batch_size=2,
        lr=1e-2,
        dtype="float64",
        seed=3,
        density=0.05,
        device="cuda",
    )
    before, after = result.report["before"]["train"], result.report["after"]["train"]
    assert after["forces_mae"] < before["forces_mae"]
    delta = SparseDelta.load(tmp_path / "gpu.safetensors")
    assert delta.density == pytest.approx(0.05, rel=0.02)
    gpu = SparseCalc(mace_model_path, delta=delta, device="cuda", default_dtype="float64")
    cpu = SparseCalc(mace_model_path, delta=delta, device="cpu", default_dtype="float64")
    for frame in frames[10:]:
        on_gpu, on_cpu = _results(gpu, frame.atoms), _results(cpu, frame.atoms)
        np.testing.assert_allclose(on_gpu["forces"], on_cpu["forces"], rtol=1e-9, atol=1e-9)
        assert on_gpu["energy"] == pytest.approx(on_cpu["energy"], abs=1e-8)


def test_cuda_charged_mace_matches_cpu_across_charge_states(tmp_path, ethanol):
    """Total charge and spin reach the model on CUDA: per state and in one mixed batch."""
    from ase_sparsecalc.testing import save_mace_model

    model = save_mace_model(tmp_path / "q.model", atomic_numbers=(1, 6, 8), charge_and_spin=True, seed=4)
    path = str(model)
    cpu = SparseCalc(path, device="cpu", default_dtype="float64")
    gpu = SparseCalc(path, device="cuda", default_dtype="float64")
    states = []
    for charge, spin in [(0, 1), (1, 2), (-1, 2), (0, 3)]:
        atoms = ethanol.copy()
        atoms.info.update(charge=charge, spin=spin)
        states.append(atoms)
    on_cpu = [_results(cpu, atoms) for atoms in states]
    assert len({float(r["energy"]) for r in on_cpu}) == len(states)  # the states differ
    for atoms, ref, batched in zip(states, on_cpu, gpu.batch_evaluate(states), strict=True):
        single = _results(gpu, atoms)
        for got in (single, batched):
            assert float(got["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-9)
            np.testing.assert_allclose(got["forces"], ref["forces"], atol=1e-9)


@pytest.mark.skipif(
    importlib.util.find_spec("cuequivariance_torch") is None,
    reason="needs the cuda extra (cuequivariance, cuequivariance-torch)",
)
def test_cueq_on_cuda_follows_the_delta_and_stays_equivariant(mace_model_path, silicon):
    """cuEquivariance on the GPU (fused kernels where installed) gives e3nn's physics with a delta.

    One converted model in float64: equal to e3nn on CUDA for two deltas and the bare base,
    rotation equivariant with the delta applied; the float32 conversion within rounding.
    """
    from ase.stress import voigt_6_to_full_3x3_stress as full_3x3
    from scipy.spatial.transform import Rotation

    reference = SparseCalc(mace_model_path, device="cuda", default_dtype="float64")
    fast = SparseCalc(mace_model_path, device="cuda", default_dtype="float64", enable_cueq=True)
    assert fast.backend.accelerator.name == "cueq"
    deltas = [
        random_sparse_delta(reference.backend, density=0.05, relative_scale=0.5, seed=s) for s in (1, 2)
    ]
    for delta in (*deltas, None):
        reference.set_delta(delta)
        fast.set_delta(delta)
        want, got = _results(reference, silicon), _results(fast, silicon)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-8, atol=1e-8, err_msg=key)

    fast.set_delta(deltas[0])
    rotation = Rotation.random(random_state=5).as_matrix()
    rotated = silicon.copy()
    rotated.set_cell(silicon.cell.array @ rotation.T, scale_atoms=True)
    plain, turned = _results(fast, silicon), _results(fast, rotated)
    assert float(turned["energy"]) == pytest.approx(float(plain["energy"]), abs=1e-8)
    np.testing.assert_allclose(turned["forces"], plain["forces"] @ rotation.T, atol=1e-8)
    np.testing.assert_allclose(
        full_3x3(turned["stress"]), rotation @ full_3x3(plain["stress"]) @ rotation.T, atol=1e-8
    )

    single = SparseCalc(
        mace_model_path, delta=deltas[0], device="cuda", default_dtype="float32", enable_cueq=True
    )
    got = _results(single, silicon)
    np.testing.assert_allclose(got["forces"], plain["forces"], atol=2e-3)
    np.testing.assert_allclose(got["stress"], plain["stress"], atol=2e-4)
