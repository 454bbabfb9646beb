"""The command line on bad input: one line on stderr naming the file and the problem, no traceback.

Each case runs ``sparsecalc`` in-process through :func:`ase_sparsecalc.cli.main`; one runs it as
a real ``python -m ase_sparsecalc`` subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from ase_sparsecalc import load_backend
from ase_sparsecalc.cli import main
from ase_sparsecalc.testing import random_sparse_delta


def _labelled(atoms: Atoms, seed: int) -> Atoms:
    atoms = atoms.copy()
    forces = np.random.default_rng(seed).normal(scale=0.1, size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-14.0 - 0.01 * seed, forces=forces)
    return atoms


def _water(n: int, start: int = 0) -> list[Atoms]:
    frames = []
    for k in range(start, start + n):
        atoms = molecule("H2O")
        atoms.rattle(0.02, seed=k)
        frames.append(_labelled(atoms, k))
    return frames


@pytest.fixture(scope="module")
def files(mace_model_path, tmp_path_factory) -> dict[str, str]:
    """Good and bad input files, all in one folder, keyed by name with ``.`` replaced by ``_``."""
    folder = tmp_path_factory.mktemp("cli_inputs")
    write(folder / "good.extxyz", _water(4))
    iron = _labelled(bulk("Fe", "bcc", a=2.87, cubic=True), 9)
    write(folder / "iron.extxyz", [*_water(2), iron])
    water = _water(3)
    write(folder / "dup.extxyz", [*water, water[0]])
    crushed = molecule("H2O")
    crushed.positions[1] = crushed.positions[0] + [0.05, 0.0, 0.0]
    write(folder / "crushed.extxyz", [*_water(2), _labelled(crushed, 7)])
    nan = _water(2)
    nan[1].calc.results["forces"][0, 0] = np.nan
    write(folder / "nan.extxyz", nan)
    (folder / "empty.extxyz").write_bytes(b"")
    (folder / "garbage.extxyz").write_text("Lorem ipsum\ndolor sit amet\n")
    backend = load_backend(mace_model_path)
    delta = random_sparse_delta(backend, density=0.01)
    data = delta.save(folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    other = load_backend(mace_model_path)
    other.fingerprint = "f" * 64  # a delta made for another base model
    random_sparse_delta(other, density=0.01).save(folder / "foreign.safetensors")
    (folder / "blocker").write_text("a file where a folder is expected")
    write(folder / "molecule.xyz", molecule("H2O"))
    flat = bulk("Si", "diamond", a=5.43)
    flat.cell[2] = flat.cell[0] + flat.cell[1]  # three cell vectors in one plane, pbc all True
    write(folder / "flat.extxyz", flat)
    write(folder / "crushed_molecule.xyz", crushed)
    lines = (folder / "good.extxyz").read_text().splitlines(keepends=True)
    (folder / "cut.extxyz").write_text("".join(lines[:-2]))  # the last frame cut short
    named = {p.name.replace(".", "_"): str(p) for p in folder.iterdir()}
    return {"dir": str(folder), "model": mace_model_path, **named}


SHORT_MD = ["md", "{molecule_xyz}", "--base", "{model}", "--steps", "2", "--no-progress"]

CASES = {
    # name: (argv with {placeholders}, fragments the error line must contain)
    "eval_missing_file": (
        ["eval", "{dir}/absent.extxyz", "--base", "{model}"],
        ["absent.extxyz", "not found"],
    ),
    "eval_garbage_file": (
        ["eval", "{garbage_extxyz}", "--base", "{model}"],
        ["garbage.extxyz", "cannot read"],
    ),
    "eval_empty_file": (["eval", "{empty_extxyz}", "--base", "{model}"], ["empty.extxyz", "empty"]),
    "eval_nan_forces": (["eval", "{nan_extxyz}", "--base", "{model}"], ["nan.extxyz:frame 1", "NaN"]),
    "eval_unknown_element": (["eval", "{iron_extxyz}", "--base", "{model}"], ["iron.extxyz:frame 2", "Fe"]),
    "eval_atoms_too_close": (
        ["eval", "{crushed_extxyz}", "--base", "{model}"],
        ["crushed.extxyz:frame 2", "Å apart"],
    ),
    "eval_truncated_delta": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--delta", "{truncated_safetensors}"],
        ["truncated.safetensors", "truncated or corrupt"],
    ),
    "eval_foreign_delta": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--delta", "{foreign_safetensors}"],
        ["foreign.safetensors", "fingerprint"],
    ),
    "eval_bad_device": (["eval", "{good_extxyz}", "--base", "{model}", "--device", "gpu"], ["gpu", "device"]),
    "eval_model_given_as_delta": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--delta", "{model}"],
        ["small_mace.model", "zip archive", "--base"],
    ),
    "eval_delta_given_as_base": (
        ["eval", "{good_extxyz}", "--base", "{good_safetensors}"],
        ["good.safetensors", "safetensors file", "--delta"],
    ),
    "eval_structure_given_as_delta": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--delta", "{good_extxyz}"],
        ["good.extxyz", "text file", "beginning '3'"],
    ),
    "eval_misnamed_forces_key": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--forces-key", "REF_forces"],
        ["good.extxyz", "no frame has forces under 'REF_forces'"],
    ),
    "eval_unknown_compile_mode": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--compile", "fastest"],
        ["compile_mode", "fastest", "reduce-overhead"],
    ),
    "eval_compile_and_cueq": (
        ["eval", "{good_extxyz}", "--base", "{model}", "--compile", "--cueq"],
        ["choose one", "enable_cueq"],
    ),
    "eval_model_is_not_a_model": (
        ["eval", "{good_extxyz}", "--base", "{good_extxyz}"],
        ["good.extxyz", "checkpoint"],
    ),
    "finetune_unknown_element": (
        [
            "finetune",
            "{iron_extxyz}",
            "-o",
            "{dir}/out1.safetensors",
            "--base",
            "{model}",
            "--epochs",
            "1",
            "--no-progress",
        ],
        ["iron.extxyz:frame 2", "Fe", "unknown"],
    ),
    "finetune_duplicates": (
        [
            "finetune",
            "{dup_extxyz}",
            "-o",
            "{dir}/out2.safetensors",
            "--base",
            "{model}",
            "--epochs",
            "1",
            "--no-progress",
        ],
        ["dup.extxyz:frame 3", "same structure", "dup.extxyz:frame 0"],
    ),
    "finetune_atoms_too_close": (
        [
            "finetune",
            "{crushed_extxyz}",
            "-o",
            "{dir}/out3.safetensors",
            "--base",
            "{model}",
            "--epochs",
            "1",
            "--no-progress",
        ],
        ["crushed.extxyz:frame 2", "0.05 Å apart"],
    ),
    "finetune_unwritable_output": (
        [
            "finetune",
            "{good_extxyz}",
            "-o",
            "{blocker}/out.safetensors",
            "--base",
            "{model}",
            "--no-progress",
        ],
        ["blocker/out.safetensors", "blocker is a file, not a folder"],
    ),
    "finetune_bad_option": (
        [
            "finetune",
            "{good_extxyz}",
            "-o",
            "{dir}/out4.safetensors",
            "--base",
            "{model}",
            "--density",
            "1.5",
        ],
        ["density", "(0, 1]"],
    ),
    "finetune_negative_masked_decay": (
        [
            "finetune",
            "{good_extxyz}",
            "-o",
            "{dir}/out5.safetensors",
            "--base",
            "{model}",
            "--masked-decay",
            "-1",
        ],
        ["masked_decay", ">= 0"],
    ),
    "finetune_lr_rewind_without_training": (
        [
            "finetune",
            "{good_extxyz}",
            "-o",
            "{dir}/out6.safetensors",
            "--base",
            "{model}",
            "--method",
            "shift",
            "--lr-rewind",
        ],
        ["lr_rewind", "shift"],
    ),
    "finetune_best_from_out_of_range": (
        [
            "finetune",
            "{good_extxyz}",
            "-o",
            "{dir}/out7.safetensors",
            "--base",
            "{model}",
            "--best-from",
            "2",
        ],
        ["best_from", "[0, 1]"],
    ),
    "md_missing_structure": (["md", "{dir}/absent.cif", "--base", "{model}"], ["absent.cif", "no such file"]),
    "md_trajectory_in_a_single_frame_format": (
        [*SHORT_MD, "--traj", "{dir}/t.vasp"],
        ["t.vasp", "holds one frame", ".traj"],
    ),
    "md_trajectory_as_cif": (
        [*SHORT_MD, "--traj", "{dir}/t.cif"],
        ["t.cif", "one frame at a time", ".extxyz"],
    ),
    # errors and warnings about the structure a simulation command read name its file
    "relax_cell_without_volume": (
        ["relax", "{flat_extxyz}", "--base", "{model}", "-o", "{dir}/relaxed.extxyz"],
        ["flat.extxyz (Si2): periodic", "linearly dependent"],
    ),
    "phonons_cell_without_volume": (
        ["phonons", "{flat_extxyz}", "--base", "{model}", "-o", "{dir}/ph"],
        ["flat.extxyz: Si2: no phonons"],
    ),
    "md_atoms_too_close": (
        [
            "md",
            "{crushed_molecule_xyz}",
            "--index",
            "0",
            "--base",
            "{model}",
            "--steps",
            "2",
            "--no-progress",
        ],
        ["crushed_molecule.xyz (frame 0) (H2O)", "Å apart"],
    ),
    "relax_truncated_file": (
        ["relax", "{cut_extxyz}", "--base", "{model}", "-o", "{dir}/relaxed.extxyz"],
        ["cut.extxyz: frame 3 (line 16) counts 3 atoms, but the file ends after 1 atom lines"],
    ),
    "phonons_output_folder_is_a_file": (
        ["phonons", "{molecule_xyz}", "--base", "{model}", "-o", "{blocker}"],
        ["blocker: is a file", "folder"],
    ),
    "md_npt_without_cell": (
        ["md", "{molecule_xyz}", "--base", "{model}", "--ensemble", "npt", "--steps", "2", "--no-progress"],
        ["H2O", "NPT needs a cell"],
    ),
    "inspect_truncated_delta": (
        ["inspect", "{truncated_safetensors}", "--base", "{model}"],
        ["truncated.safetensors"],
    ),
}


def _argv(template: list[str], files: dict[str, str]) -> list[str]:
    return [part.format(**files) for part in template]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_error_line(case, files, capsys):
    template, fragments = CASES[case]
    command = template[0]
    status = main(_argv(template, files))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"sparsecalc {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.err + captured.out


def test_nothing_is_written_when_a_trajectory_format_is_refused(files):
    assert not [p.name for p in Path(files["dir"]).iterdir() if p.name.startswith((".t.", "t."))]


def test_nothing_is_written_when_finetune_refuses_its_input(files):
    for name in ("out1", "out2", "out3"):
        assert not Path(files["dir"], f"{name}.safetensors").exists()
    assert not list(Path(files["dir"]).glob(".*.tmp"))


def test_real_process_prints_no_traceback(files):
    """``python -m ase_sparsecalc`` as a user runs it: exit status 2, one line, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = _argv(CASES["eval_truncated_delta"][0], files)
    proc = subprocess.run(
        [sys.executable, "-m", "ase_sparsecalc", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sparsecalc eval:")]
    assert len(errors) == 1 and "truncated.safetensors" in errors[0], proc.stderr
    assert proc.stdout == ""


def test_json_on_stdout_parses_in_a_fresh_process_with_a_mace_base(files):
    """mace prints a note on import; it must not end up in front of the JSON on stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["eval", files["good_extxyz"], "--base", files["model"], "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "ase_sparsecalc", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["units"]["forces_mae"] == "meV/Å"


def test_unexpected_exception_is_one_line_unless_verbose(files, capsys, monkeypatch):
    """A bug (an exception the library did not raise on purpose) still gives one line; -v shows it."""
    from ase_sparsecalc.cli import eval_cmd

    def broken(args):
        raise KeyError("internal state")

    monkeypatch.setattr(eval_cmd, "run", broken)
    argv = ["eval", files["good_extxyz"], "--base", files["model"]]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError" in err[0] and "sparsecalc -v eval" in err[0]
    with pytest.raises(KeyError):
        main(["-v", *argv])
    with pytest.raises(KeyError):  # -v after the command, where users also put it
        main([*argv, "-v"])


class _ClosedPipe:
    """A stdout whose reader has gone (``sparsecalc ... | head -1``): every write fails."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd


def test_a_closed_output_pipe_stops_the_command_quietly(files, tmp_path, monkeypatch, capsys):
    """Output piped into ``head``: status 141 (as a shell reports SIGPIPE), nothing on stderr."""
    with open(tmp_path / "stdout", "w") as sink:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(sink.fileno()))
        status = main(["inspect", files["good_safetensors"], "--base", files["model"], "--max-rows", "0"])
    assert status == 141
    assert capsys.readouterr().err == ""


def test_eval_header_says_which_labels_the_frames_carry():
    from ase_sparsecalc.cli.eval_cmd import _label_counts

    assert _label_counts({"frames": 40, "forces_frames": 40, "stress_frames": 0}) == " (no stress labels)"
    assert _label_counts({"frames": 5, "forces_frames": 3, "stress_frames": 5}) == " (forces in 3)"
    assert _label_counts({"frames": 5, "forces_frames": 5, "stress_frames": 5}) == ""


def test_untrained_element_warning_names_the_structure_file(files, tmp_path, capsys):
    delta = random_sparse_delta(load_backend(files["model"]), density=0.01)
    delta.metadata.training_data = {"elements": ["H", "C"]}
    delta_path = delta.save(tmp_path / "hc.safetensors")
    argv = ["relax", files["molecule_xyz"], "--delta", str(delta_path), "--base", files["model"]]
    assert main([*argv, "--steps", "1", "-o", str(tmp_path / "relaxed.xyz")]) in (0, 3)
    warning = [line for line in capsys.readouterr().err.splitlines() if "not in the training data" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING: ")
    assert f"{files['molecule_xyz']} (H2O): element(s) O are not in the training data" in warning[0]


def test_finetune_refuses_to_write_its_delta_over_its_own_data(files, tmp_path, capsys):
    data = tmp_path / "train.extxyz"
    data.write_bytes(Path(files["good_extxyz"]).read_bytes())
    before = data.read_bytes()
    argv = ["finetune", f"{data}@0:3", "--method", "shift", "--base", files["model"], "--no-progress"]
    assert main([*argv, "-o", str(data)]) == 2
    assert "train.extxyz: is this run's training data" in capsys.readouterr().err
    assert data.read_bytes() == before
    assert main([*argv, "--isolated-atoms", files["molecule_xyz"], "-o", files["molecule_xyz"]]) == 2
    assert "molecule.xyz: is this run's isolated-atom energies" in capsys.readouterr().err


def test_errors_under_torchrun_name_the_rank(files, monkeypatch, capsys):
    """Every process of a data-parallel run that meets an error prints it: each line says which."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", f"{files['dir']}/absent.extxyz", "--base", files["model"]]) == 2
    assert capsys.readouterr().err.startswith("sparsecalc eval (rank 1 of 2): error: ")
