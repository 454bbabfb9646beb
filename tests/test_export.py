"""Merged-model export: the file, run by the backend's own calculator, is base + delta."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, load_backend
from ase_sparsecalc.backends import stored_dtype
from ase_sparsecalc.cli import main
from ase_sparsecalc.errors import (
    BaseModelError,
    ConfigError,
    DeltaMismatchError,
    ModelNotFoundError,
    OutputFileError,
)
from ase_sparsecalc.export import export_merged_model, probe_structure
from ase_sparsecalc.testing import random_sparse_delta, save_mace_model

HEADS = ["dft_a", "dft_b"]


@pytest.fixture(scope="module")
def two_head_mace(tmp_path_factory) -> str:
    """A two-head MACE model (H, C, O, Si, Cu), float64."""
    path = tmp_path_factory.mktemp("export") / "two_heads.model"
    save_mace_model(path, atomic_energies=[-13.6, -1029.5, -2042.0, -4.0, -3.5], heads=HEADS, seed=5)
    return str(path)


def _mace_delta(model_path: str, folder, head: str = "dft_b") -> str:
    backend = load_backend(model_path, dtype="float64", head=head)
    delta = random_sparse_delta(backend, energy_shifts={"Si": 0.37, "H": -0.21}, seed=3)
    return str(delta.save(folder / "delta.safetensors"))


def _energy_forces_stress(atoms, calc) -> tuple[float, np.ndarray, np.ndarray | None]:
    atoms = atoms.copy()
    atoms.calc = calc
    stress = atoms.get_stress() if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning")
def test_mace_export_run_by_macecalculator_is_base_plus_delta(
    two_head_mace, tmp_path, silicon, ethanol, monkeypatch, capsys
):
    delta_path = _mace_delta(two_head_mace, tmp_path)
    out = tmp_path / "merged.model"
    assert main(["export", delta_path, "-o", str(out)]) == 0
    assert "Si +0.3700" in capsys.readouterr().out

    # MACECalculator unpickles its model with weights_only off, via this variable that mace sets
    # on import and ase_sparsecalc removes again; give it back for this test only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from mace.calculators import MACECalculator

    own = MACECalculator(model_paths=str(out), device="cpu", default_dtype="float64", head="dft_b")
    for atoms in (silicon, ethanol):
        e_ref, f_ref, s_ref = _energy_forces_stress(atoms, SparseCalc(delta=delta_path))
        e_own, f_own, s_own = _energy_forces_stress(atoms, own)
        assert e_own == pytest.approx(e_ref, abs=1e-8)
        np.testing.assert_allclose(f_own, f_ref, atol=1e-9)
        if s_ref is not None:
            np.testing.assert_allclose(s_own, s_ref, atol=1e-10)
    e_base, _, _ = _energy_forces_stress(ethanol, SparseCalc(two_head_mace, head="dft_b"))
    assert abs(e_own - e_base) > 0.1  # the delta and its shifts are in the file

    # the shifts went into the delta's head only; the other head keeps its reference energies
    merged = torch.load(out, weights_only=False).atomic_energies_fn.atomic_energies
    original = torch.load(two_head_mace, weights_only=False).atomic_energies_fn.atomic_energies
    torch.testing.assert_close(merged[0], original[0])
    np.testing.assert_allclose((merged[1] - original[1]).numpy(), [-0.21, 0, 0, 0.37, 0], atol=1e-12)


def test_sevennet_export_run_by_sevennetcalculator_is_base_plus_delta(tmp_path, silicon):
    sevenn_calculator = pytest.importorskip("sevenn.calculator")
    backend = load_backend("sevennet-0", dtype="float64")
    delta = random_sparse_delta(backend, energy_shifts={"Si": 0.25}, seed=4)
    delta_path = delta.save(tmp_path / "delta.safetensors")
    result = export_merged_model(delta_path, tmp_path / "merged.pth")
    assert (result.backend, result.dtype, result.changed_entries) == ("sevennet", "float32", delta.nnz)

    ours = SparseCalc(delta=delta_path, default_dtype="float32")
    e_ref, f_ref, s_ref = _energy_forces_stress(silicon, ours)
    own = sevenn_calculator.SevenNetCalculator(str(result.path), device="cpu")
    e_own, f_own, s_own = _energy_forces_stress(silicon, own)
    assert e_own == pytest.approx(e_ref, abs=1e-4)
    np.testing.assert_allclose(f_own, f_ref, atol=1e-4)
    np.testing.assert_allclose(s_own, s_ref, atol=1e-6)
    base = sevenn_calculator.SevenNetCalculator("7net-0", device="cpu")
    e_base, _, _ = _energy_forces_stress(silicon, base)
    assert abs(e_own - e_base) > 8 * 0.25 - 1.0  # 8 Si atoms shifted by 0.25 eV, plus the weights

    # each tensor keeps its stored dtype; the configured shift follows the weights' shift
    from ase_sparsecalc.backends import model_file
    from ase_sparsecalc.backends.safe_load import SEVENNET_ALLOWED, load_checkpoint

    written = load_checkpoint(result.path, SEVENNET_ALLOWED)
    original = load_checkpoint(model_file("sevennet-0"), SEVENNET_ALLOWED)
    assert {t.dtype for t in written["model_state_dict"].values()} == {
        t.dtype for t in original["model_state_dict"].values()
    }
    si = original["config"]["_type_map"][14]
    shift = written["config"]["shift"][si] - original["config"]["shift"][si]
    assert shift == pytest.approx(0.25, abs=1e-6)
    assert written["model_state_dict"]["rescale_atomic_energy.shift"][si] == pytest.approx(
        float(original["model_state_dict"]["rescale_atomic_energy.shift"][si]) + 0.25, abs=1e-6
    )


def test_sevennet_export_deploys_for_lammps(tmp_path, silicon):
    """sevenn's own LAMMPS deployment (``sevenn_get_model``, TorchScript) of the exported
    checkpoint gives base + delta."""
    pytest.importorskip("sevenn")
    from sevenn.calculator import SevenNetCalculator

    backend = load_backend("sevennet-0", dtype="float64")
    delta = random_sparse_delta(backend, energy_shifts={"Si": -0.4}, seed=6)
    delta_path = delta.save(tmp_path / "d.safetensors")
    merged = export_merged_model(delta_path, tmp_path / "merged.pth").path
    # a process of its own: e3nn's constants need weights_only off under torch >= 2.6 there
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    tool = Path(sys.executable).with_name("sevenn_get_model")
    subprocess.run([str(tool), str(merged), "-o", "deployed"], cwd=tmp_path, env=env, check=True)

    e_ref, f_ref, _ = _energy_forces_stress(silicon, SparseCalc(delta=delta_path, default_dtype="float32"))
    lammps_model = SevenNetCalculator(str(tmp_path / "deployed.pt"), file_type="torchscript", device="cpu")
    e_own, f_own, _ = _energy_forces_stress(silicon, lammps_model)
    assert e_own == pytest.approx(e_ref, abs=1e-4)
    np.testing.assert_allclose(f_own, f_ref, atol=1e-4)


def test_export_writes_the_asked_dtype_and_loads_back(two_head_mace, tmp_path, silicon):
    delta_path = _mace_delta(two_head_mace, tmp_path)
    result = export_merged_model(delta_path, tmp_path / "merged32.model", dtype="float32")
    assert result.dtype == "float32" and stored_dtype(result.path, head="dft_b") == torch.float32
    e_ref, f_ref, _ = _energy_forces_stress(silicon, SparseCalc(delta=delta_path))
    e_own, f_own, _ = _energy_forces_stress(silicon, SparseCalc(result.path, head="dft_b"))
    assert e_own == pytest.approx(e_ref, abs=1e-3)
    np.testing.assert_allclose(f_own, f_ref, atol=1e-3)


def test_export_refuses_to_overwrite_its_inputs(two_head_mace, tmp_path):
    delta_path = _mace_delta(two_head_mace, tmp_path)
    before = Path(two_head_mace).read_bytes()
    with pytest.raises(ConfigError, match="is the base model file"):
        export_merged_model(delta_path, two_head_mace)
    with pytest.raises(ConfigError, match="is the delta file"):
        export_merged_model(delta_path, delta_path)
    assert Path(two_head_mace).read_bytes() == before


def test_export_refuses_a_delta_for_another_base(mace_model_path, other_mace_model_path, tmp_path):
    delta_path = random_sparse_delta(load_backend(mace_model_path)).save(tmp_path / "d.safetensors")
    out = tmp_path / "merged.model"
    with pytest.raises(DeltaMismatchError, match="cannot export"):
        export_merged_model(delta_path, out, base=other_mace_model_path)
    assert not out.exists()


def test_a_mace_delta_given_a_sevennet_base_is_refused_for_its_backend(two_head_mace, tmp_path):
    """The delta's head is not pressed on a SevenNet base: the refusal names the real mismatch."""
    pytest.importorskip("sevenn")
    delta_path = _mace_delta(two_head_mace, tmp_path)
    with pytest.raises(DeltaMismatchError, match="made for a 'mace' model"):
        export_merged_model(delta_path, tmp_path / "merged.pth", base="sevennet-0")
    with pytest.raises(DeltaMismatchError, match="made for a 'mace' model"):
        SparseCalc("sevennet-0", delta=delta_path)


def test_an_export_that_does_not_reproduce_base_plus_delta_is_not_written(
    two_head_mace, tmp_path, monkeypatch
):
    """The check on the probe structure catches shifts folded into the wrong head."""
    from ase_sparsecalc.backends.mace import MaceBackend

    delta_path = _mace_delta(two_head_mace, tmp_path)

    def first_heads_row(backend):
        return backend.model.atomic_energies_fn.atomic_energies[0]

    monkeypatch.setattr(MaceBackend, "reference_energies", first_heads_row)
    out = tmp_path / "merged.model"
    with pytest.raises(BaseModelError, match=r"not written.*energy by"):
        export_merged_model(delta_path, out)
    assert not out.exists() and not list(tmp_path.glob(".merged.model*"))


def test_a_float32_mace_base_exports_to_float64(tmp_path, silicon):
    """Values are copied into the float64 module, not rounded through the stored float32 one."""
    import io

    from ase_sparsecalc.delta_io import atomic_write_bytes
    from ase_sparsecalc.testing import build_mace_model

    buffer = io.BytesIO()
    torch.save(build_mace_model(seed=7).float(), buffer)
    base32 = atomic_write_bytes(tmp_path / "base32.model", buffer.getvalue())
    delta = random_sparse_delta(load_backend(base32), energy_shifts={"Si": 0.3}, seed=8)
    delta_path = delta.save(tmp_path / "d.safetensors")
    result = export_merged_model(delta_path, tmp_path / "merged64.model", dtype="float64")
    assert result.dtype == "float64" and stored_dtype(result.path) == torch.float64
    assert result.max_force_difference < 1e-9
    e_ref, f_ref, _ = _energy_forces_stress(silicon, SparseCalc(delta=delta_path))
    e_own, f_own, _ = _energy_forces_stress(silicon, SparseCalc(result.path))
    assert e_own == pytest.approx(e_ref, abs=1e-8)
    np.testing.assert_allclose(f_own, f_ref, atol=1e-9)


def test_bad_export_requests_are_refused_before_any_work(mace_model_path, tmp_path):
    delta_path = random_sparse_delta(load_backend(mace_model_path)).save(tmp_path / "d.safetensors")
    with pytest.raises(ConfigError, match=r"merged\.safetensors: a merged model is a model file"):
        export_merged_model(delta_path, tmp_path / "merged.safetensors")
    with pytest.raises(OutputFileError, match="is a folder"):
        export_merged_model(delta_path, tmp_path)
    if importlib.util.find_spec("sevenn") is not None:
        sevennet_delta = random_sparse_delta(load_backend("sevennet-0")).save(tmp_path / "s.safetensors")
        with pytest.raises(ConfigError, match="applies to MACE bases only"):
            export_merged_model(sevennet_delta, tmp_path / "merged.pth", dtype="float64")


def test_a_delta_whose_base_has_moved_says_how_to_name_it(tmp_path):
    base = save_mace_model(tmp_path / "base.model", seed=9)
    delta_path = random_sparse_delta(load_backend(base)).save(tmp_path / "d.safetensors")
    base.rename(tmp_path / "moved.model")
    with pytest.raises(ModelNotFoundError, match=r"made for the base model .*base\.model.*--base"):
        export_merged_model(delta_path, tmp_path / "merged.model")


def test_large_reference_energies_warn_about_float32_totals(mace_model_path, tmp_path, caplog):
    """All-electron-size shifts (ORCA, FHI-aims data) make float32 total energies inaccurate."""
    delta = random_sparse_delta(load_backend(mace_model_path), energy_shifts={"C": -1000.0, "H": -13.0})
    delta_path = delta.save(tmp_path / "d.safetensors")
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        export_merged_model(delta_path, tmp_path / "merged.model")
    assert "float32 total energies lose accuracy" in caplog.text
    assert "MACECalculator(default_dtype='float64')" in caplog.text and "--dtype" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):  # the file's own E0s are rounded
        export_merged_model(delta_path, tmp_path / "merged32.model", dtype="float32")
    assert "export with --dtype float64" in caplog.text
    caplog.clear()
    small = random_sparse_delta(load_backend(mace_model_path), energy_shifts={"Si": 0.2})
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        export_merged_model(small.save(tmp_path / "small.safetensors"), tmp_path / "small.model")
    assert "float32" not in caplog.text


def test_the_probe_holds_every_element_the_delta_names():
    pytest.importorskip("sevenn")
    backend = load_backend("sevennet-0")
    symbols = ["H", "Li", "C", "N", "O", "F", "Na", "Mg", "Si", "Cl"]
    delta = random_sparse_delta(backend, density=1e-4, energy_shifts=dict.fromkeys(symbols, 0.1))
    probe = probe_structure(backend, delta)
    assert sorted(set(probe.get_chemical_symbols())) == sorted(symbols)
    assert len(probe) == 27  # a 3x3x3 grid: 8 sites cannot hold 10 elements
    assert probe.get_all_distances(mic=True)[np.triu_indices(len(probe), 1)].min() > 1.5


def test_cli_warnings_are_one_line(mace_model_path, other_mace_model_path, tmp_path, capsys):
    delta_path = random_sparse_delta(load_backend(mace_model_path)).save(tmp_path / "d.safetensors")
    out = tmp_path / "merged.model"
    args = ["export", str(delta_path), "--base", other_mace_model_path, "--no-strict", "-o", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING: delta was made for base model" in err and "UserWarning" not in err


def test_cli_takes_the_delta_as_other_commands_name_it(mace_model_path, tmp_path, capsys):
    delta_path = str(random_sparse_delta(load_backend(mace_model_path)).save(tmp_path / "d.safetensors"))
    out = tmp_path / "merged.model"
    assert main(["export", "--delta", delta_path, "-o", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    for args in (
        ["export", "-o", str(tmp_path / "a.model")],
        ["export", delta_path, "--delta", delta_path, "-o", str(tmp_path / "b.model")],
    ):
        assert main(args) == 2
        assert "give the delta file once" in capsys.readouterr().err
    assert not (tmp_path / "a.model").exists() and not (tmp_path / "b.model").exists()


def test_a_checkpoint_with_older_weight_names_is_written_with_the_current_ones(tmp_path, monkeypatch):
    """sevenn renames weights between versions (and maps old names when loading): the export
    writes the names the installed sevenn uses, with the checkpoint's float dtype."""
    pytest.importorskip("sevenn")
    from ase_sparsecalc.backends import safe_load

    real_load = safe_load.load_checkpoint

    def older_names(path, allowed):
        checkpoint = real_load(path, allowed)
        state = checkpoint["model_state_dict"]
        state["old_style.weight"] = state.pop("rescale_atomic_energy.scale")
        return checkpoint

    backend = load_backend("sevennet-0", dtype="float64")
    delta_path = random_sparse_delta(backend, energy_shifts={"Si": 0.1}).save(tmp_path / "d.safetensors")
    monkeypatch.setattr(safe_load, "load_checkpoint", older_names)
    result = export_merged_model(delta_path, tmp_path / "merged.pth")
    monkeypatch.undo()
    written = safe_load.load_checkpoint(result.path, safe_load.SEVENNET_ALLOWED)["model_state_dict"]
    assert "rescale_atomic_energy.scale" in written and "old_style.weight" not in written
    assert {t.dtype for t in written.values() if t.is_floating_point()} == {torch.float32}
