"""Fine-tuning: short real fine-tunes on bundled DFT frames (small MACE model and SevenNet-0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, SparseDelta, load_backend
from ase_sparsecalc.analysis import delta_pattern
from ase_sparsecalc.finetune import (
    FinetuneConfig,
    finetune,
    finetune_with_report,
    read_frames,
    trainable_infos,
)
from ase_sparsecalc.finetune.batches import make_batches, predict
from ase_sparsecalc.finetune.dataset import read_isolated_atom_energies
from ase_sparsecalc.finetune.methods import METHODS, MethodOptions
from ase_sparsecalc.finetune.trainer import Trainer
from ase_sparsecalc.testing import random_rotation

DATA = Path(__file__).parents[1] / "examples" / "data"
ETHANOL = str(DATA / "ethanol_train.xyz")
FAST = {"epochs": 6, "batch_size": 4, "lr": 1e-2, "dtype": "float64", "seed": 3}


@pytest.fixture(scope="module")
def frames(mace_model_path):
    """Real ethanol geometries labelled by a "teacher": the small MACE model plus a known sparse
    delta. A delta of the same kind can fit these labels, so a short fine-tune must succeed."""
    from ase_sparsecalc.finetune.data import Frame
    from ase_sparsecalc.testing import random_sparse_delta

    teacher = SparseCalc(mace_model_path)
    teacher.set_delta(random_sparse_delta(teacher.backend, density=0.05, relative_scale=0.5, seed=11))
    dft = read_frames(ETHANOL + "@:16")
    results = teacher.batch_evaluate([f.atoms for f in dft])
    return [
        Frame(f.atoms, r["energy"], r["forces"], None, f.source) for f, r in zip(dft, results, strict=True)
    ]


@pytest.fixture(scope="module")
def dft_frames():
    """Real DFT-labelled ethanol frames (PBE/def2-SVP)."""
    return read_frames(ETHANOL + "@:16")


def _sparse_method(backend, options: MethodOptions):
    """The ``sparse`` delta method over the backend's default trainable tensors."""
    infos = trainable_infos(backend, FinetuneConfig(density=options.density))
    params = dict(backend.model.named_parameters())
    return METHODS["sparse"](infos, {i.name: params[i.name] for i in infos}, options)


def test_sparse_finetune_lowers_loss_and_hits_density(mace_model_path, frames, tmp_path):
    result = finetune_with_report(
        mace_model_path,
        frames[:12],
        frames[12:],
        density=0.05,
        output=tmp_path / "d.safetensors",
        report_dir=tmp_path / "report",
        **FAST,
    )
    history = result.report["history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert 0.0 <= history[-1]["support_turnover"] <= 1.0 and history[-1]["threshold"] > 0.0
    before, after = result.report["before"]["train"], result.report["after"]["train"]
    assert after["forces_mae"] < before["forces_mae"]
    delta = SparseDelta.load(tmp_path / "d.safetensors")
    assert delta.density == pytest.approx(0.05, rel=0.02)
    assert delta.metadata.method == "sparse" and delta.metadata.training_data["frames"] == 12
    assert set(delta.metadata.energy_shifts) == {"H", "C", "O"}
    # the tensors it could change are recorded by name, and inspect counts exactly those
    backend = load_backend(mace_model_path)
    infos = {i.name: i.numel for i in backend.weight_infos() if not i.is_readout}
    assert delta.metadata.hyperparameters["trainable_tensors"] == sorted(infos)
    assert delta.metadata.trainable_numel == sum(infos.values())
    assert sum(r["total"] for r in delta_pattern(delta, backend, by="kind")) == sum(infos.values())
    for name in ("report.json", "parity.png", "learning_curves.png", "sparsity.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["units"]["forces_mae"] == "meV/Å" and written["units"]["energy_mae"] == "meV/atom"
    # the file a user shares says how the run went, not only what was asked for
    hyper = delta.metadata.hyperparameters
    assert (hyper["epochs_run"], hyper["stop_reason"]) == (FAST["epochs"], "epochs")
    assert hyper["best_epoch"] == result.report["training"]["best_epoch"] >= 1
    # a shift-only run into the same report folder leaves no plot of the trained delta behind
    report_dir = tmp_path / "report"
    finetune_with_report(mace_model_path, frames[:12], frames[12:], method="shift", report_dir=report_dir)
    assert not (tmp_path / "report" / "learning_curves.png").exists()
    assert not (tmp_path / "report" / "sparsity.png").exists()


def test_saved_delta_reproduces_trained_model_exactly(mace_model_path, frames, caplog):
    backend = load_backend(mace_model_path, dtype="float64")
    config = FinetuneConfig(density=0.05, **FAST)
    method = _sparse_method(backend, MethodOptions(density=0.05))
    batches = make_batches(frames[:8], backend, 4, seed=0)
    with caplog.at_level("INFO", logger="ase_sparsecalc.finetune"):
        Trainer(backend, method, batches, [], config).train(progress=False)
    # without a progress bar, one log line per epoch
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == [f"epoch {k} of 6" for k in range(1, 7)]
    trained = predict(backend, batches, method.effective_parameters)
    delta = SparseDelta(method.export())
    delta.apply(backend)
    merged = predict(backend, batches)
    for k in trained:
        assert merged[k]["energy"] == trained[k]["energy"]
        np.testing.assert_array_equal(merged[k]["forces"], trained[k]["forces"])


def test_finetuned_model_stays_equivariant(mace_model_path, frames, silicon):
    delta = finetune(mace_model_path, frames[:8], frames[8:10], density=0.05, **FAST)
    calc = SparseCalc(mace_model_path, delta=delta)
    atoms = frames[10].atoms.copy()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    R = random_rotation(5)
    atoms.positions = atoms.positions @ R.T
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(atoms.get_forces(), forces @ R.T, atol=1e-8)


@pytest.mark.parametrize("method", ["l1", "gmp", "full", "elora"])
def test_baseline_methods_train_and_export(method, mace_model_path, frames):
    options = {"l1": {"density": 0.05, "penalty": 1e-3}, "gmp": {"density": 0.05}, "elora": {"rank": 2}}
    result = finetune_with_report(mace_model_path, frames[:8], frames[8:10], method=method,
                                  **options.get(method, {}), **FAST)  # fmt: skip
    delta, report = result.delta, result.report
    assert report["after"]["train"]["forces_mae"] < report["before"]["train"]["forces_mae"]
    if method in ("l1", "gmp"):
        assert delta.density == pytest.approx(0.05, rel=0.05)
    if method == "full":
        assert any(name.startswith("readouts") for name in delta.tensors)
    if method == "elora":
        assert delta.density > 0.5  # low-rank updates merge into dense path blocks
    # ethanol frames: the element-specific weights of Si and Cu get no gradient and stay as they are
    by_element = {
        r["group"]: r["nnz"] for r in delta_pattern(delta, load_backend(mace_model_path), by="element")
    }
    assert by_element.get("Si", 0) == by_element.get("Cu", 0) == 0 and by_element["C"] > 0


@pytest.mark.parametrize("method", ["full", "elora", "sparse"])
def test_methods_train_a_mace_model_with_scalar_parameters(method, frames, tmp_path):
    """mace's nonlinear interaction block has 0-dimensional parameters (alpha, beta) and a radial
    MLP of torch.nn.Linear layers: every method trains it, and the saved delta reproduces the
    trained model's predictions."""
    from ase_sparsecalc.testing import save_mace_model

    path = save_mace_model(tmp_path / "nonlinear.model", max_ell=2, seed=2,
                           interaction="RealAgnosticResidualNonLinearInteractionBlock")  # fmt: skip
    options = {"sparse": {"density": 0.05}, "elora": {"rank": 2}}.get(method, {})
    result = finetune_with_report(path, frames[:6], frames[6:8], method=method, **options, **FAST)
    report = result.report
    assert report["after"]["train"]["forces_mae"] < report["before"]["train"]["forces_mae"]
    if method == "full":
        assert {"interactions.0.alpha", "interactions.0.beta"} <= set(result.delta.tensors)
    calc = SparseCalc(path, delta=result.delta, default_dtype="float64")
    predicted = calc.batch_evaluate([f.atoms for f in frames[6:8]])
    errors = [np.abs(p["forces"] - f.forces) for p, f in zip(predicted, frames[6:8], strict=True)]
    mae_mev = 1e3 * np.concatenate(errors).mean()
    assert mae_mev == pytest.approx(report["after"]["valid"]["forces_mae"], rel=1e-6)


def test_a_penalty_run_that_stays_dense_says_so(mace_model_path, frames, caplog):
    """The penalty form (no target density) after a few steps changes most weights: the run
    reports it instead of calling the result sparse without comment."""
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(
            mace_model_path, frames[:8], frames[8:10], density=None, penalty=1e-3, **FAST
        )
    assert result.delta.density > 0.5
    warnings = [w for w in result.report["data_checks"]["warnings"] if "l1 penalty" in w]
    assert len(warnings) == 1 and "--density" in warnings[0] and "l1 penalty" in caplog.text


@pytest.mark.parametrize("optimizer", ["factored_adam", "adafactor"])
def test_factored_optimizers_fine_tune_with_less_state(optimizer, mace_model_path, frames):
    backend = load_backend(mace_model_path, dtype="float64")
    config = FinetuneConfig(density=0.05, optimizer=optimizer, **FAST)
    method = _sparse_method(backend, MethodOptions(density=0.05))
    batches = make_batches(frames[:8], backend, 4, seed=0)
    trainer = Trainer(backend, method, batches, [], config)
    trainer.train(progress=False)
    history = trainer.state.history
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert method.density() == pytest.approx(0.05, rel=0.02)
    state = sum(t.numel() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    adam_state = 2 * sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert state < (0.6 if optimizer == "factored_adam" else 0.2) * adam_state


def test_molecules_and_crystals_train_together(mace_model_path, frames):
    """One training set of molecules (no cell, no stress) and crystals (with stress), in mixed batches."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    teacher = SparseCalc(mace_model_path, default_dtype="float64")
    rng = np.random.default_rng(5)
    crystals = []
    for i in range(8):
        si = bulk("Si", "diamond", a=5.40 + 0.02 * i, cubic=True)
        si.positions += rng.normal(0.0, 0.05, si.positions.shape)
        si.calc = teacher
        labels = {"energy": si.get_potential_energy(), "forces": si.get_forces(), "stress": si.get_stress()}
        si.calc = SinglePointCalculator(si, **labels)
        crystals.append(si)
    molecules = []
    for f in frames[:8]:
        atoms = f.atoms.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        molecules.append(atoms)
    mixed = [a for pair in zip(molecules, crystals, strict=True) for a in pair]
    result = finetune_with_report(mace_model_path, mixed, **{**FAST, "epochs": 2, "valid_fraction": 0.25})
    after = result.report["after"]["train"]
    assert np.isfinite(after["forces_mae"]) and "stress_mae" in after
    assert 0.0 < result.delta.density <= 0.03 + 1e-6


def test_shift_only_baseline(mace_model_path, dft_frames):
    frames = dft_frames
    result = finetune_with_report(mace_model_path, frames[:12], frames[12:], method="shift", dtype="float64")
    assert not result.delta.tensors and result.delta.nnz == 0
    before, after = result.report["before"]["valid"], result.report["after"]["valid"]
    assert after["forces_mae"] == pytest.approx(before["forces_mae"])
    assert after["energy_mae"] < 50.0  # meV/atom: the shifts alone remove the reference offset


def test_isolated_atoms_give_physical_shifts(mace_model_path, dft_frames):
    frames = dft_frames
    delta = finetune(
        mace_model_path,
        frames[:12],
        frames[12:],
        method="shift",
        dtype="float64",
        isolated_atoms=str(DATA / "ethanol_isolated_atoms.xyz"),
    )
    iso = {
        f.atoms.get_chemical_symbols()[0]: f.energy
        for f in read_frames(str(DATA / "ethanol_isolated_atoms.xyz"), require_forces=False)
    }
    # One stoichiometry (C2H6O) fixes only 2 dC + 6 dH + dO; the rest comes from the isolated-atom
    # prior: DFT minus model energy of each isolated atom.
    from ase import Atoms

    calc = SparseCalc(mace_model_path)
    model_iso = {s: calc.batch_evaluate([Atoms(s)])[0]["energy"] for s in ("H", "C", "O")}
    prior = {s: iso[s] - model_iso[s] for s in model_iso}
    counts = {"C": 2, "H": 6, "O": 1}
    ratios = [(delta.energy_shifts[s] - prior[s]) / counts[s] for s in counts]
    assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-6)


def test_an_element_given_only_as_an_isolated_atom_gets_its_isolated_atom_shift(mace_model_path, dft_frames):
    """Ethanol frames plus an isolated Si energy: no frame fits Si's shift, so the calibrated model
    puts the isolated Si atom at its DFT energy (the DFT code's zero), and says where it came from."""
    import warnings

    from ase import Atoms

    from ase_sparsecalc.errors import UntrainedElementWarning

    isolated = read_isolated_atom_energies(str(DATA / "ethanol_isolated_atoms.xyz"))
    isolated["Si"] = -7890.12  # an all-electron-like zero, far from the model's
    result = finetune_with_report(
        mace_model_path,
        dft_frames[:12],
        dft_frames[12:],
        method="shift",
        dtype="float64",
        isolated_atoms=isolated,
    )
    assert set(result.delta.energy_shifts) == {"H", "C", "O", "Si"}  # N: unknown to this base, skipped
    assert set(result.report["data"]["isolated_atom_energies_eV"]) == {"H", "C", "O", "Si"}
    calc = SparseCalc(mace_model_path, result.delta, default_dtype="float64")
    silicon = Atoms("Si", positions=[[0.0, 0.0, 0.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        energy = calc.batch_evaluate([silicon])[0]["energy"]
    assert energy == pytest.approx(-7890.12, abs=1e-6)
    untrained = [str(w.message) for w in caught if issubclass(w.category, UntrainedElementWarning)]
    assert len(untrained) == 1 and "shifts of Si come from isolated-atom energies only" in untrained[0]


@pytest.mark.parametrize("zero", [-5.0, -300.0, -8000.0], ids=["vasp", "plane_wave_pp", "all_electron"])
def test_energy_shifts_are_exact_least_squares_wherever_the_zero_of_energy_lies(zero):
    """Doped cells (Si64 and Si63P, real Si geometries) whose energies sit ``zero`` eV per atom
    from the model's: the shifts are the least-squares ones, not pulled toward the prior."""
    from ase_sparsecalc.finetune.data import Frame
    from ase_sparsecalc.finetune.reference import fit_energy_shifts

    rng = np.random.default_rng(0)
    cell = read_frames(str(DATA / "si_pbesol.extxyz") + "@0")[0].atoms.repeat((2, 2, 1))
    truth = {"Si": zero, "P": 1.3 * zero + 2.0}
    frames, base = [], []
    for k in range(10):
        atoms = cell.copy()
        atoms.numbers[: k % 2] = 15  # every other cell holds one P atom
        model_energy = rng.normal(0, 1.0)
        frames.append(
            Frame(
                atoms, model_energy + sum(truth[s] for s in atoms.get_chemical_symbols()), None, None, f"{k}"
            )
        )
        base.append(model_energy + rng.normal(0, 0.05))  # 50 meV per cell the shifts cannot fit
    shifts = fit_energy_shifts(frames, np.array(base))
    counts = np.array([[len(f.atoms) - k % 2, k % 2] for k, f in enumerate(frames)], dtype=float)
    residual = np.array([f.energy for f in frames]) - np.array(base)
    exact = np.linalg.lstsq(counts, residual, rcond=None)[0]  # every cell has 32 atoms: no weights
    assert [shifts["Si"], shifts["P"]] == pytest.approx(exact, abs=1e-6 * abs(zero))
    assert shifts["P"] == pytest.approx(truth["P"], abs=0.1)


def _assert_same_delta(a: SparseDelta, b: SparseDelta) -> None:
    assert list(a.tensors) == list(b.tensors)
    for name, t in b.tensors.items():
        assert torch.equal(a.tensors[name].indices, t.indices)
        assert torch.equal(a.tensors[name].values, t.values)


def test_resume_gives_the_same_delta(mace_model_path, frames, tmp_path):
    options = {**FAST, "epochs": 4, "density": 0.05}
    reference = finetune(mace_model_path, frames[:8], frames[8:10], **options)

    # an interrupted run: killed right after its second epoch's checkpoint
    def kill_after_two_epochs(trainer):
        if trainer.state.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            mace_model_path,
            frames[:8],
            frames[8:10],
            checkpoint_dir=tmp_path,
            callbacks=[kill_after_two_epochs],
            **options,
        )
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = finetune_with_report(
        mace_model_path, frames[:8], frames[8:10], checkpoint_dir=tmp_path, resume=True, **options
    )
    _assert_same_delta(resumed.delta, reference)
    # the training time counts both runs: the history's clock goes on across the resume
    times = [h["wall_time"] for h in resumed.report["history"]]
    assert len(times) == 4 and times == sorted(set(times))  # strictly increasing
    assert resumed.report["training"]["training_time_s"] == times[-1]


def test_resuming_a_run_that_stopped_early_trains_no_further(mace_model_path, frames, tmp_path, monkeypatch):
    """Job scripts pass --resume every time: a run that ended by early stopping is finished, and
    resuming it gives its delta again instead of training on."""
    from ase_sparsecalc.finetune.trainer import Trainer

    monkeypatch.setattr(Trainer, "_patience_exhausted", lambda self: self.state.epoch >= 2)
    options = {**FAST, "epochs": 6, "density": 0.05}
    first = finetune_with_report(
        mace_model_path, frames[:8], frames[8:10], checkpoint_dir=tmp_path, **options
    )
    assert first.report["training"]["stop_reason"] == "early_stopping"
    assert first.report["training"]["epochs_run"] == 2
    again = finetune_with_report(
        mace_model_path, frames[:8], frames[8:10], checkpoint_dir=tmp_path, resume=True, **options
    )
    assert again.report["training"]["stop_reason"] == "early_stopping"
    assert again.report["training"]["epochs_run"] == 2
    _assert_same_delta(again.delta, first.delta)


def test_time_budget_plans_the_run_that_fits(mace_model_path, frames):
    """A time budget sets the number of epochs before training and undoes its timing steps: an
    ample budget gives exactly the configured run; a tiny one a whole one-epoch run, its density
    schedule finished; each the same delta as the run configured with those epochs. The tiny
    budget cuts a 13-epoch run of 8 steps per epoch (warm-up 2 steps) to one epoch (warm-up 1
    step), so its first step must already follow the shorter schedule."""
    options = {**FAST, "epochs": 3, "density": 0.05}

    def run(**extra):
        return finetune_with_report(mace_model_path, frames[:8], frames[8:10], **{**options, **extra})

    ample, configured = run(time_budget=1e6), run()
    tiny, one_epoch = run(time_budget=1e-3, epochs=13, batch_size=1), run(epochs=1, batch_size=1)
    assert ample.report["training"]["epochs_planned"] == 3 == ample.report["training"]["epochs_run"]
    assert "epochs_planned" not in configured.report["training"]
    assert tiny.report["training"]["epochs_planned"] == 1 == tiny.report["training"]["epochs_run"]
    assert tiny.report["training"]["stop_reason"] == "epochs"
    assert tiny.delta.density == pytest.approx(0.05, abs=0.002)
    _assert_same_delta(ample.delta, configured.delta)
    _assert_same_delta(tiny.delta, one_epoch.delta)


def test_max_time_stops_part_way_and_says_so(mace_model_path, frames, caplog):
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(
            mace_model_path, frames[:8], frames[8:10], **{**FAST, "density": 0.05, "max_time": 1e-3}
        )
    assert result.report["training"]["stop_reason"] == "max_time"
    assert result.report["training"]["epochs_run"] < FAST["epochs"]
    assert "max_time reached after 0 of 6 epochs: the schedules are unfinished" in caplog.text
    assert "no epoch was checkpointed, so nothing can be resumed" in caplog.text
    assert "pull against each other" not in caplog.text  # the cut, not the labels, is the cause
    assert result.delta.density <= 0.05 + 1e-3


def test_cli_time_budget_reports_its_plan(mace_model_path, tmp_path, capsys, caplog):
    from ase_sparsecalc.cli import main

    output = tmp_path / "budget.safetensors"
    argv = ["finetune", ETHANOL + "@:6", "--base", mace_model_path, "-o", str(output)]
    argv += ["--epochs", "4", "--batch-size", "3", "--time-budget", "0.001", "--no-progress"]
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        assert main(argv) == 0
    assert "time budget: planned 1 epochs, ran 1" in capsys.readouterr().out
    assert "time budget 0.001 s is less than one epoch" in caplog.text
    assert SparseDelta.load(output).density == pytest.approx(0.03, abs=0.002)


@pytest.mark.parametrize("name", ["time_budget", "max_time"])
def test_time_limits_must_be_positive(name):
    from ase_sparsecalc.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{name} must be a positive number of seconds"):
        FinetuneConfig(**{name: 0.0})


@pytest.mark.parametrize("first", ["", "import ase_sparsecalc.finetune.data", "import ase_sparsecalc.cli"])
def test_package_finetune_is_the_function_whatever_was_imported_first(first):
    """``from ase_sparsecalc import finetune`` gives the function, not the subpackage of that name."""
    import subprocess
    import sys

    code = f"{first}\nfrom ase_sparsecalc import finetune\nimport ase_sparsecalc\n"
    code += "assert callable(finetune) and ase_sparsecalc.finetune is finetune, finetune"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sevennet_short_finetune_on_real_dft(dft_frames):
    pytest.importorskip("sevenn")
    result = finetune_with_report(
        "sevennet-0", dft_frames[:8], dft_frames[8:10], density=0.01, epochs=3, batch_size=4, lr=5e-3, seed=0
    )
    assert result.report["backend"] == "sevennet"
    assert result.report["after"]["train"]["forces_mae"] < result.report["before"]["train"]["forces_mae"]
    assert result.delta.density == pytest.approx(0.01, rel=0.05)


def test_sevennet_scalars_change_densely_and_the_saved_delta_carries_them(dft_frames, tmp_path):
    """``train_scalars``: SevenNet's radial-basis frequencies, neighbour-count normalisations and
    per-element energy scales change (all used entries, inside the density budget), and the
    saved delta puts them into the model."""
    pytest.importorskip("sevenn")
    base = load_backend("sevennet-0", dtype="float64")
    options = {"density": 0.01, "epochs": 2, "batch_size": 4, "lr": 5e-3, "seed": 0, "dtype": "float64"}
    delta = finetune(base, dft_frames[:8], dft_frames[8:10], train_scalars=True, **options)
    assert delta.density == pytest.approx(0.01, rel=0.05)
    changed = {name: t.nnz for name, t in delta.tensors.items()}
    coeffs = "edge_embedding.basis_function.coeffs"
    assert changed[coeffs] == 8  # every frequency
    assert changed["rescale_atomic_energy.scale"] == 3  # H, C and O: the elements in the data
    assert all(changed[f"{k}_convolution.denominator"] == 1 for k in range(5))
    saved = SparseDelta.load(delta.save(tmp_path / "scalars.safetensors"))
    trained = base.copy()
    saved.apply(trained)
    before, after = dict(base.model.named_parameters()), dict(trained.model.named_parameters())
    moved = (after[coeffs] - before[coeffs]).detach()
    torch.testing.assert_close(moved, saved.tensors[coeffs].to_dense(moved.dtype))
    with pytest.raises(ValueError, match="train_scalars applies to method 'sparse' only"):
        FinetuneConfig(method="l1", train_scalars=True)


def test_scalars_can_learn_at_a_fraction_of_the_delta_rate():
    """``scalar_lr_factor``: the model scalars form an optimizer group of their own at that
    fraction of the rate; the weight tensors (first group, read by masked decay) keep it."""
    pytest.importorskip("sevenn")
    base = load_backend("sevennet-0")
    config = FinetuneConfig(density=0.01, train_scalars=True, scalar_lr_factor=0.1)
    infos = trainable_infos(base, config)
    params = dict(base.model.named_parameters())
    method = METHODS["sparse"](
        infos, {i.name: params[i.name] for i in infos}, MethodOptions(scalar_lr_factor=0.1)
    )
    weights, scalars = method.parameter_groups(1e-2, 0.0)
    assert weights["lr"] == 1e-2 and scalars["lr"] == pytest.approx(1e-3)
    kinds = {id(u): info.kind for u, info in zip(method.u, infos, strict=True)}
    assert {kinds[id(p)] for p in scalars["params"]} == {"other"}
    assert "other" not in {kinds[id(p)] for p in weights["params"]}
    assert len(weights["params"]) + len(scalars["params"]) == len(infos)
    one_group = METHODS["sparse"](infos, {i.name: params[i.name] for i in infos}, MethodOptions())
    assert len(one_group.parameter_groups(1e-2, 0.0)) == 1
    with pytest.raises(ValueError, match="scalar_lr_factor applies with train_scalars only"):
        FinetuneConfig(density=0.01, scalar_lr_factor=0.1)
    with pytest.raises(ValueError, match="scalar_lr_factor must be a positive finite number"):
        FinetuneConfig(density=0.01, train_scalars=True, scalar_lr_factor=0.0)


@pytest.mark.parametrize(
    ("hard", "learn"), [(False, None), (True, None), (True, True)], ids=["soft", "hard", "hard-learned"]
)
def test_threshold_keeps_the_scheduled_density_and_shrinks_only_when_soft(hard, learn, mace_model_path):
    backend = load_backend(mace_model_path, dtype="float64")
    options = MethodOptions(density=0.05, hard_threshold=hard, learn_thresholds=learn)
    assert options.learn_thresholds == (not hard or bool(learn))  # None: learned only when soft
    method = _sparse_method(backend, options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in method.u:
            u.copy_(torch.randn(u.shape, generator=generator, dtype=u.dtype))
    method.update_schedule(1.0)
    assert method.density() == pytest.approx(0.05, abs=1e-4)
    deltas = method.deltas()
    for k, (name, u) in enumerate(zip(method.names, method.u, strict=True)):
        kept = deltas[name] != 0
        relative = deltas[name][kept] / method.scales[k]
        if hard:
            torch.testing.assert_close(relative, u.detach()[kept])
        else:  # shrunk towards zero by the threshold, sign kept
            assert (relative.abs() < u.detach()[kept].abs()).all()
            assert (torch.sign(relative) == torch.sign(u.detach()[kept])).all()
    # learned thresholds learn from the loss (the soft threshold's gradient, also when hard)
    method.train()
    sum((d * d).sum() for d in method.deltas().values()).backward()
    learned = method.log_threshold.grad is not None and bool((method.log_threshold.grad != 0).any())
    assert learned == options.learn_thresholds


def test_masked_decay_keeps_the_threshold_from_drifting_up(mace_model_path):
    """Under pure gradient noise the entries below threshold random-walk and drag the threshold
    up with the number of steps; the decay of masked entries holds it at a fixed level, and it
    leaves the entries above threshold alone."""
    backend = load_backend(mace_model_path, dtype="float64")
    taus = {}
    for decay in (0.0, 1.0):
        options = MethodOptions(density=0.05, warmup_fraction=0.0, prune_end_fraction=0.0, masked_decay=decay)
        method = _sparse_method(backend, options)
        optimizer = torch.optim.Adam(method.u, lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(400):
            method.update_schedule(1.0)
            for u in method.u:
                u.grad = torch.randn(u.shape, generator=generator, dtype=u.dtype)
            optimizer.step()
            after_adam = [u.detach().clone() for u in method.u]
            method.after_step(1e-2)
        for u, before in zip(method.u, after_adam, strict=True):
            kept = before.abs() > method.tau
            torch.testing.assert_close(u.detach()[kept], before[kept])  # kept entries: untouched
            assert (u.detach()[~kept].abs() < before[~kept].abs()).all() or decay == 0.0
        taus[decay] = float(method.tau)
    assert taus[1.0] < 0.5 * taus[0.0]


@pytest.mark.parametrize("selection", ["movement", "fisher"])
def test_scored_selections_keep_the_entries_the_loss_depends_on_most(mace_model_path, selection):
    """With ``selection="movement"`` the support is the top of the accumulated score
    S = -sum(dL/du * u); with ``"fisher"`` the top of u^2 <g^2> (the optimal-brain-damage estimate
    of the loss increase if the entry were zeroed). Neither is the top of |u|: a large entry the
    loss barely depends on drops out. The scores are checkpointed state."""
    backend = load_backend(mace_model_path, dtype="float64")
    options = MethodOptions(
        density=0.05, selection=selection, warmup_fraction=0.0, prune_end_fraction=0.0, masked_decay=0.0
    )
    method = _sparse_method(backend, options)
    generator = torch.Generator().manual_seed(0)
    weights = []
    with torch.no_grad():
        for u in method.u:
            u.copy_(torch.randn(u.shape, generator=generator, dtype=u.dtype))
            weights.append(torch.rand(u.shape, generator=generator, dtype=u.dtype) ** 4)  # uneven
    if selection == "movement":  # the loss falls as |u| grows, by w per unit of u^2
        steps = [[-w * u.detach() for w, u in zip(weights, method.u, strict=True)]]
        expected = torch.cat(
            [(w * u.detach() ** 2).reshape(-1) for w, u in zip(weights, method.u, strict=True)]
        )
    else:  # gradients of either sign and size w: only their square counts
        steps = [weights, [-w for w in weights]]
        expected = torch.cat(
            [(w * u.detach()).square().reshape(-1) for w, u in zip(weights, method.u, strict=True)]
        )
    for grads in steps:
        for u, g in zip(method.u, grads, strict=True):
            u.grad = g
        method.after_step(1e-2)
    method.update_schedule(1.0)
    assert method.density() == pytest.approx(0.05, abs=1e-4)
    by_magnitude = torch.cat([u.detach().abs().reshape(-1) for u in method.u])
    kept = torch.cat([(d != 0).reshape(-1) for d in method.deltas().values()])
    keep = int(kept.sum())
    chosen = set(torch.nonzero(kept).reshape(-1).tolist())
    assert set(torch.topk(expected, keep).indices.tolist()) == chosen
    assert len(set(torch.topk(by_magnitude, keep).indices.tolist()) - chosen) > keep // 4
    for k, delta in enumerate(method.deltas().values()):  # kept entries: full value c * u
        on = delta != 0
        torch.testing.assert_close(delta[on], method.scales[k] * method.u[k].detach()[on])
    restored = _sparse_method(backend, options)
    restored.load_state_dict(method.state_dict())
    for a, b in zip(restored.deltas().values(), method.deltas().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=selection):
        FinetuneConfig(selection=selection, hard_threshold=False)
    with pytest.raises(ValueError, match="sparse"):
        FinetuneConfig(method="full", selection=selection)
    with pytest.raises(ValueError, match="selection"):
        FinetuneConfig(selection="largest")


@pytest.mark.parametrize("rewind", [False, True])
def test_learning_rate_schedule_and_rewinding(rewind):
    """Warm-up, then cosine decay to 1 % of the peak; with ``lr_rewind`` the decay ends where
    pruning ends and starts again from the peak for the kept entries."""
    from types import SimpleNamespace

    config = FinetuneConfig(lr_rewind=rewind, prune_end_fraction=0.6)
    trainer = SimpleNamespace(config=config, total_steps=1000)
    factors = np.array([Trainer._lr_factor(trainer, step) for step in range(1000)])
    assert factors[19] == pytest.approx(1.0) and factors[0] < 0.1
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)
    if rewind:
        assert factors[599] == pytest.approx(0.01, abs=1e-3) and factors[600] == pytest.approx(1.0)
        assert np.all(np.diff(factors[20:600]) <= 0) and np.all(np.diff(factors[600:]) <= 0)
    else:
        assert np.all(np.diff(factors[20:]) <= 0) and 0.3 < factors[600] < 0.4
    with pytest.raises(ValueError, match="lr_rewind"):
        FinetuneConfig(method="shift", lr_rewind=True)
    # on by default where a support is chosen, off for dense methods and the penalty form
    assert FinetuneConfig().lr_rewind is True
    assert FinetuneConfig(method="full").lr_rewind is False
    assert FinetuneConfig(density=None, penalty=1e-3).lr_rewind is False


def test_diagnostics_report_threshold_size_and_support_turnover(mace_model_path):
    backend = load_backend(mace_model_path, dtype="float64")
    method = _sparse_method(backend, MethodOptions(density=0.05))  # hard, one global threshold
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in method.u:
            u.copy_(torch.randn(u.shape, generator=generator, dtype=u.dtype))
    method.update_schedule(1.0)
    first = method.diagnostics()
    assert "support_turnover" not in first
    assert first["threshold"] == pytest.approx(float(method.tau))
    assert first["median_change"] > first["threshold"]  # hard: every kept entry exceeds it
    assert method.diagnostics()["support_turnover"] == 0.0
    with torch.no_grad():  # swap the largest entry of the first tensor for one below threshold
        u = method.u[0].view(-1)
        big, small = int(u.abs().argmax()), int(u.abs().argmin())
        u[small], u[big] = u[big].clone(), 0.0
    nnz = sum(int((d != 0).sum()) for d in method.deltas().values())
    assert method.diagnostics()["support_turnover"] == pytest.approx(1 / nnz)


def test_dense_kinds_change_every_used_entry_within_the_density_budget(mace_model_path):
    """Tensors of a dense kind skip the threshold; their non-zero entries come out of the
    budget, so the total density still meets the target."""
    backend = load_backend(mace_model_path, dtype="float64")
    method = _sparse_method(backend, MethodOptions(density=0.05, dense_kinds=("embedding",)))
    dense = [k for k, info in enumerate(method.infos) if info.kind == "embedding"]
    assert dense, "the small MACE model has an element embedding"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, u in enumerate(method.u):
            size = 0.01 if k in dense else 1.0
            u.copy_(size * torch.randn(u.shape, generator=generator, dtype=u.dtype))
    method.update_schedule(1.0)
    deltas = method.deltas()
    for k in dense:  # small changes that would never cross a shared threshold are all kept
        assert bool((deltas[method.names[k]] != 0).all())
        assert float(method.u[k].detach().abs().max()) < float(method.tau.detach())
    assert method.density() == pytest.approx(0.05, abs=1e-4)
    with pytest.raises(ValueError, match="unknown weight kinds"):
        FinetuneConfig(dense_kinds=("embeddings",))


def test_penalty_form_defaults_to_the_soft_threshold():
    options = MethodOptions(density=None, penalty=1e-3)
    assert options.hard_threshold is False and options.learn_thresholds is True


def test_config_records_what_the_automatic_threshold_choices_resolve_to():
    """A delta's metadata (the config) says which threshold ran, not ``None``."""
    by_density = FinetuneConfig(density=0.03)
    assert (by_density.hard_threshold, by_density.learn_thresholds) == (True, False)
    by_penalty = FinetuneConfig(density=None, penalty=1e-3)
    assert (by_penalty.hard_threshold, by_penalty.learn_thresholds) == (False, True)
    assert FinetuneConfig.from_dict(by_density.to_dict()) == by_density
    assert FinetuneConfig(method="gmp").hard_threshold is None  # not a sparse option there


def test_best_epoch_comes_from_the_second_half_and_few_validation_frames_are_flagged(
    mace_model_path, frames, caplog
):
    """An early epoch never wins on a small validation set; the user is told the set is small."""
    with caplog.at_level("INFO", logger="ase_sparsecalc.finetune"):
        result = finetune_with_report(mace_model_path, frames[:8], frames[8:10], method="full", **FAST)
    valid_errors = result.report["before"]["valid"]
    assert (  # the starting point, logged before training
        "8 training and 2 validation frames; base model with energy shifts on the validation frames: "
        f"energy MAE {valid_errors['energy_mae']:.3g} meV/atom, "
        f"force MAE {valid_errors['forces_mae']:.3g} meV/Å"
    ) in caplog.text
    history = result.report["history"]
    best = result.report["training"]["best_epoch"]
    assert best >= FAST["epochs"] // 2
    second_half = [h["valid_loss"] for h in history[FAST["epochs"] // 2 - 1 :]]
    assert history[best - 1]["valid_loss"] == min(second_half)
    if best != FAST["epochs"]:  # the restore names the epochs that competed
        window = f"epochs {FAST['epochs'] // 2}-{FAST['epochs']}"
        assert f"restoring epoch {best}, the lowest validation loss of {window}" in caplog.text
    assert any("only 2 validation frame(s)" in r.getMessage() for r in caplog.records)
    assert any("only 2 validation frame(s)" in w for w in result.report["data_checks"]["warnings"])


def test_only_later_epochs_compete_for_the_best(mace_model_path, frames):
    backend = load_backend(mace_model_path, dtype="float64")
    batches = make_batches(frames[:4], backend, 4, seed=0)
    full_config = FinetuneConfig(method="full", **FAST)
    infos = trainable_infos(backend, full_config)
    params = dict(backend.model.named_parameters())
    full = METHODS["full"](infos, {i.name: params[i.name] for i in infos}, MethodOptions())
    trainer = Trainer(backend, full, batches, [], full_config)
    assert [trainer._eligible_for_best(e) for e in range(1, 7)] == [False, False, True, True, True, True]
    # density reached at 0.6 of the epochs; one learning-rate cycle
    one_cycle = FinetuneConfig(density=0.05, lr_rewind=False, **FAST)
    sparse = _sparse_method(backend, MethodOptions(density=0.05))
    trainer = Trainer(backend, sparse, batches, [], one_cycle)
    assert [trainer._eligible_for_best(e) for e in range(1, 7)] == [False, False, False, True, True, True]
    # the default rewinds the learning rate at 0.6: only the second half of that cycle competes
    rewound = FinetuneConfig(density=0.05, **FAST)
    assert rewound.lr_rewind
    trainer = Trainer(backend, sparse, batches, [], rewound)
    assert [trainer._eligible_for_best(e) for e in range(1, 7)] == [False, False, False, False, True, True]
    # best_from overrides the rule: 1.0 keeps the last epoch
    last = FinetuneConfig(density=0.05, best_from=1.0, **FAST)
    trainer = Trainer(backend, sparse, batches, [], last)
    assert [trainer._eligible_for_best(e) for e in range(1, 7)] == [False] * 5 + [True]


def _ethanol_with_tagged_atoms(path: Path, tag: str = "IsolatedAtom") -> Path:
    """Twelve ethanol frames with the isolated atoms in the same file, tagged as MACE files do."""
    import ase.io

    isolated = ase.io.read(DATA / "ethanol_isolated_atoms.xyz", ":")
    for atoms in isolated:
        atoms.info["config_type"] = tag
    ase.io.write(path, isolated[:1] + ase.io.read(ETHANOL, ":12") + isolated[1:], format="extxyz")
    return path


@pytest.mark.parametrize("tag", ["IsolatedAtom", "isolated_atom"])
def test_tagged_isolated_atoms_in_the_training_file(mace_model_path, dft_frames, tmp_path, tag):
    """MACE's convention: single-atom frames tagged ``config_type=IsolatedAtom`` in the training
    file are the isolated-atom energies, not training structures."""
    path = _ethanol_with_tagged_atoms(tmp_path / "train.xyz", tag)
    options = {"method": "shift", "dtype": "float64"}
    tagged = finetune_with_report(mace_model_path, str(path), dft_frames[12:], **options)
    explicit = finetune_with_report(
        mace_model_path,
        dft_frames[:12],
        dft_frames[12:],
        isolated_atoms=str(DATA / "ethanol_isolated_atoms.xyz"),
        **options,
    )
    assert tagged.report["data"]["frames"] == 12
    assert tagged.report["data"]["elements"] == ["H", "C", "O"]
    assert set(tagged.report["data"]["isolated_atom_energies_eV"]) == {"H", "C", "O"}
    assert tagged.delta.energy_shifts == pytest.approx(explicit.delta.energy_shifts, abs=1e-9)
    untagged = finetune(mace_model_path, dft_frames[:12], dft_frames[12:], **options)
    assert untagged.energy_shifts != pytest.approx(tagged.delta.energy_shifts, abs=1e-3)


def test_cli_says_which_isolated_atoms_it_used(mace_model_path, tmp_path, capsys):
    from ase_sparsecalc.cli import main

    path = _ethanol_with_tagged_atoms(tmp_path / "train.xyz")
    argv = [
        "finetune",
        str(path),
        "--base",
        mace_model_path,
        "--method",
        "shift",
        "-o",
        str(tmp_path / "d.safetensors"),
    ]
    assert main(argv) == 0
    assert "isolated-atom energies used for the shifts: H, C, O" in capsys.readouterr().out


def test_bad_tagged_isolated_atoms_are_refused(mace_model_path, dft_frames, tmp_path):
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from ase_sparsecalc.errors import DataFileError, EmptyDatasetError

    path = _ethanol_with_tagged_atoms(tmp_path / "two_atoms.xyz")
    frames = ase.io.read(path, ":")
    frames[3].info["config_type"] = "IsolatedAtom"  # an ethanol molecule tagged as an isolated atom
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(
        DataFileError, match=r"two_atoms\.xyz:frame 3: tagged config_type=IsolatedAtom but holds 9"
    ):
        finetune(mace_model_path, str(path), method="shift")

    frames = ase.io.read(_ethanol_with_tagged_atoms(tmp_path / "clash.xyz"), ":")
    second_h = frames[0].copy()
    second_h.calc = SinglePointCalculator(second_h, energy=frames[0].get_potential_energy() + 0.5)
    second_h.info["config_type"] = "IsolatedAtom"
    ase.io.write(tmp_path / "clash.xyz", [*frames, second_h], format="extxyz")
    with pytest.raises(
        DataFileError, match=r"clash\.xyz:frame 16: isolated H atom at .* but .*frame 0 gives"
    ):
        finetune(mace_model_path, str(tmp_path / "clash.xyz"), method="shift")

    only = tmp_path / "only_atoms.xyz"
    ase.io.write(only, [frames[0], frames[-1], frames[-2]], format="extxyz")
    with pytest.raises(
        EmptyDatasetError, match=r"only_atoms\.xyz: only isolated-atom frames, nothing to train"
    ):
        finetune(mace_model_path, str(only), method="shift")
    with pytest.raises(
        EmptyDatasetError, match=r"only_atoms\.xyz: only isolated-atom frames, nothing to validate"
    ):
        finetune(mace_model_path, dft_frames, str(only), method="shift")


def test_all_electron_sized_energies_keep_their_precision_in_float32(mace_model_path, frames):
    """Energy shifts are added and energy errors formed in float64: with -1e6 eV/atom offsets
    (all-electron totals of heavy elements reach -1e7 eV per cell, where float32 resolves
    about 1 eV) a float32 model's energies move by exactly the offsets and its energy loss on
    labels carrying the same offsets is unchanged."""
    import dataclasses

    from ase_sparsecalc.finetune.batches import LossWeights, batch_loss

    backend = load_backend(mace_model_path, dtype="float32")
    batch = make_batches(frames[:4], backend, 4, seed=0)[0]
    plain = backend.evaluate(batch.graph)
    offset = -1.0e6
    backend.add_energy_shifts({"H": offset, "C": offset, "O": offset})
    shifted = backend.evaluate(batch.graph)
    n_atoms = batch.n_atoms.double()
    assert shifted.energy.dtype == torch.float64
    moved = (shifted.energy.double() - plain.energy.double()).detach().numpy()
    np.testing.assert_allclose(moved, offset * n_atoms.numpy(), rtol=0, atol=1e-6)
    energy_only = LossWeights(energy=1.0, forces=0.0, stress=0.0)
    offset_labels = dataclasses.replace(batch, energy=batch.energy + offset * n_atoms)
    assert batch_loss(shifted, offset_labels, energy_only).item() == pytest.approx(
        batch_loss(plain, batch, energy_only).item(), rel=1e-9
    )


def test_parity_plot_has_a_stress_panel_where_frames_have_stresses(tmp_path):
    """Crystals trained with stress weight 1000 show their stresses beside energies and forces;
    molecules keep two panels."""
    import matplotlib.image

    from ase_sparsecalc.finetune.report import plot_parity

    crystals = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:3"))
    molecules = read_frames(ETHANOL + "@:3")
    widths = {}
    for name, frames in (("crystals", crystals), ("molecules", molecules)):
        predictions = {
            k: {
                "energy": f.energy,
                "forces": f.forces,
                **({"stress": f.stress} if f.stress is not None else {}),
            }
            for k, f in enumerate(frames)
        }
        path = plot_parity(frames, predictions, predictions, tmp_path / f"{name}.png")
        widths[name] = matplotlib.image.imread(path).shape[1]
    assert widths["crystals"] > 1.3 * widths["molecules"]
