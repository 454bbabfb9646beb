"""Bad inputs: every defect raises its own error class, naming the file (and frame) and the problem.

Delta files, structures handed to the calculator or straight to a backend, DFT training data
and options. The command line's handling of the same inputs is in ``test_cli_errors.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.io import write
from ase.units import GPa
from safetensors import safe_open
from safetensors.torch import save_file

from ase_sparsecalc import SparseCalc, SparseDelta, load_backend
from ase_sparsecalc.cli import main
from ase_sparsecalc.delta_io import METADATA_KEY
from ase_sparsecalc.errors import (
    AtomsTooCloseError,
    CheckpointError,
    ConfigError,
    DataFileError,
    DeltaFileError,
    DeltaFormatError,
    DeltaMismatchError,
    DeltaShapeError,
    DeltaValueError,
    DuplicateFrameError,
    EmptyDatasetError,
    MissingLabelError,
    NonFiniteLabelError,
    NonFiniteResultError,
    OutputFileError,
    StaleLabelError,
    StressUndefinedError,
    StructureError,
    UnknownElementError,
)
from ase_sparsecalc.finetune import FinetuneConfig, finetune, finetune_with_report, read_frames
from ase_sparsecalc.finetune.data import Frame, frame_from_atoms
from ase_sparsecalc.finetune.duplicates import check_duplicates, drop_duplicate_frames
from ase_sparsecalc.graph import build_graph
from ase_sparsecalc.testing import random_sparse_delta

FAST = {"epochs": 1, "batch_size": 4, "dtype": "float64", "seed": 0, "valid_fraction": 0.0}


# ---------------------------------------------------------------------------- helpers
def labelled(atoms: Atoms, energy: float = -10.0, forces: np.ndarray | None = None) -> Atoms:
    """A copy of ``atoms`` carrying DFT-like labels the way ASE's readers attach them."""
    atoms = atoms.copy()
    if forces is None:
        forces = np.random.default_rng(len(atoms)).normal(scale=0.1, size=(len(atoms), 3))
        forces -= forces.mean(axis=0)  # forces of an energy sum to zero
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def water_frames(n: int) -> list[Atoms]:
    """``n`` distinct rattled water molecules with labels."""
    frames = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.rattle(0.02, seed=k)
        frames.append(labelled(atoms, energy=-14.0 - 0.01 * k))
    return frames


@pytest.fixture(scope="module")
def backend(mace_model_path):
    return load_backend(mace_model_path, dtype="float64")


@pytest.fixture(scope="module")
def delta_bytes(mace_model_path, tmp_path_factory) -> bytes:
    backend = load_backend(mace_model_path, dtype="float64")
    delta = random_sparse_delta(backend, density=0.01, energy_shifts={"H": 0.1})
    return delta.save(tmp_path_factory.mktemp("delta") / "good.safetensors").read_bytes()


def _edited(delta_bytes: bytes, path: Path, edit) -> Path:
    """Write ``delta_bytes`` to ``path`` after ``edit(metadata, tensors, first_name)``."""
    path.write_bytes(delta_bytes)
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    first = sorted(meta["tensor_shapes"])[0]
    edit(meta, tensors, first)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _set(key, value):
    def edit(meta, tensors, name):
        meta[key] = value

    return edit


def _values(fill):
    def edit(meta, tensors, name):
        tensors[name + "::values"][0] = fill

    return edit


def _index_past_end(meta, tensors, name):
    tensors[name + "::indices"][-1] = int(np.prod(meta["tensor_shapes"][name]))


def _float_indices(meta, tensors, name):
    tensors[name + "::indices"] = tensors[name + "::indices"].double()


def _shape_not_a_list(meta, tensors, name):
    meta["tensor_shapes"][name] = 12


def _extra_axis(meta, tensors, name):
    meta["tensor_shapes"][name] = [1, *meta["tensor_shapes"][name]]


def _indices_as_column(meta, tensors, name):
    tensors[name + "::indices"] = tensors[name + "::indices"].reshape(-1, 1)
    tensors[name + "::values"] = tensors[name + "::values"].reshape(-1, 1)


def _stray_entry(meta, tensors, name):
    tensors[name + "::scale"] = torch.ones(1)


def _unknown_tensor(meta, tensors, name):
    meta["tensor_shapes"]["no_such.weight"] = [4]
    tensors["no_such.weight::indices"] = torch.tensor([1])
    tensors["no_such.weight::values"] = torch.tensor([0.5])
    meta["nnz"] += 1


# ---------------------------------------------------------------------------- delta files
@pytest.mark.parametrize(
    ("edit", "error", "problem"),
    [
        (_set("format_version", 2), DeltaFormatError, "version 2"),
        (_values(float("nan")), DeltaValueError, "NaN or inf"),
        (_values(float("-inf")), DeltaValueError, "NaN or inf"),
        (_index_past_end, DeltaShapeError, "out of range"),
        (_float_indices, DeltaFormatError, "int64"),
        (_shape_not_a_list, DeltaFormatError, "non-negative integers"),
        (_set("energy_shifts", {"H": float("nan")}), DeltaValueError, "energy_shifts"),
        (_set("energy_shifts", {"Xy": 0.1}), DeltaFormatError, "not a chemical symbol"),
        (_set("energy_shifts", "0.1 eV"), DeltaFormatError, "energy_shifts"),
        (_set("trainable_numel", "many"), DeltaFormatError, "trainable_numel"),
        (_set("base_model", 7), DeltaFormatError, "base_model"),
        (_set("format_version", True), DeltaFormatError, "version True"),
        (_set("energy_shifts", {"Si": 10**400}), DeltaValueError, "shifts must be finite"),
        (_set("training_data", {"elements": 14}), DeltaFormatError, "training_data.elements"),
        (_set("hyperparameters", {"exclude_kinds": 5}), DeltaFormatError, "hyperparameters.exclude_kinds"),
        (_set("hyperparameters", {"trainable_tensors": [1, "x"]}), DeltaFormatError, "trainable_tensors"),
        (_indices_as_column, DeltaFormatError, "flat"),
        (_stray_entry, DeltaFormatError, "::scale"),
        (_set("nnz", 3), DeltaFormatError, "says 3 changed entries"),
        (_set("nnz", "3"), DeltaFormatError, "changed entries"),
    ],
    ids=lambda p: getattr(p, "__name__", None) if callable(p) else None,
)
def test_defective_delta_file_is_refused_on_load(delta_bytes, tmp_path, edit, error, problem):
    path = _edited(delta_bytes, tmp_path / "bad.safetensors", edit)
    with pytest.raises(error, match=problem) as info:
        SparseDelta.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "error", "problem"),
    [
        (_set("base_fingerprint", "0" * 64), DeltaMismatchError, "fingerprint"),
        (_set("backend", "sevennet"), DeltaMismatchError, "'sevennet' model"),
        (_extra_axis, DeltaShapeError, "shape"),
        (_unknown_tensor, DeltaShapeError, "no_such.weight"),
        (_set("energy_shifts", {"H": 0.1, "Pu": 0.2}), DeltaMismatchError, "element.s. Pu, unknown"),
    ],
    ids=["other_base", "other_backend", "shape_mismatch", "unknown_tensor", "foreign_shift"],
)
def test_delta_that_does_not_fit_the_base_names_its_file(
    delta_bytes, mace_model_path, tmp_path, edit, error, problem
):
    path = _edited(delta_bytes, tmp_path / "misfit.safetensors", edit)
    delta = SparseDelta.load(path)
    with pytest.raises(error, match=problem) as info:
        SparseCalc(mace_model_path, delta=path)
    assert str(path) in str(info.value)
    backend = load_backend(mace_model_path)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    with pytest.raises(error):
        delta.apply(backend)
    # a refused delta changes nothing
    assert all(torch.equal(v, before[k]) for k, v in backend.model.state_dict().items())
    assert backend.energy_shifts_by_number() == {} and not backend.applied_deltas


@pytest.mark.parametrize(
    "cut", [0, 7, 8, 40, -1], ids=["empty", "in_length", "after_length", "in_header", "last_byte"]
)
def test_truncated_delta_file(delta_bytes, tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(delta_bytes[:cut])
    with pytest.raises(DeltaFileError, match="truncated or corrupt") as info:
        SparseDelta.load(path)
    assert str(path) in str(info.value)


def test_delta_metadata_nested_too_deeply_is_refused(delta_bytes, tmp_path):
    """JSON that would exhaust Python's recursion limit while being parsed."""
    path = _edited(delta_bytes, tmp_path / "deep.safetensors", lambda meta, tensors, name: None)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()[METADATA_KEY]
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    deep = meta[:-1] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(tensors, str(path), metadata={METADATA_KEY: deep})
    with pytest.raises(DeltaFormatError, match=r"deep\.safetensors: delta metadata is nested too deeply"):
        SparseDelta.load(path)


def test_folder_and_random_bytes_as_delta(tmp_path):
    with pytest.raises(DeltaFileError, match="is a folder"):
        SparseDelta.load(tmp_path)
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DeltaFileError, match=r"noise\.safetensors"):
        SparseDelta.load(path)


def test_in_memory_delta_with_bad_shift_leaves_model_untouched(backend):
    delta = random_sparse_delta(backend, density=0.01, energy_shifts={"H": float("inf")})
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    with pytest.raises(DeltaValueError, match="finite"):
        delta.apply(backend)
    assert all(torch.equal(v, before[k]) for k, v in backend.model.state_dict().items())


def test_a_delta_that_makes_the_model_blow_up_is_named(mace_model_path, tmp_path):
    """A finite but absurd value (1e30 where the weights are of order one, as bit-rot or a broken
    fine-tune could leave) passes the file checks; the NaN it causes is reported with the delta."""
    backend = load_backend(mace_model_path, dtype="float32")
    delta = random_sparse_delta(backend, density=0.01)
    name = next(iter(delta.tensors))
    delta.tensors[name].values[0] = 1e30
    path = delta.save(tmp_path / "absurd.safetensors")
    calc = SparseCalc(mace_model_path, path, default_dtype="float32")
    atoms = bulk("Si", "diamond", a=5.43)
    with pytest.raises(
        NonFiniteResultError, match=r"structure 0 \(Si2\): the model gave a NaN.*absurd\.safetensors"
    ):
        calc.batch_evaluate([atoms], ["energy", "forces", "stress"])
    calc.set_delta(None)
    assert np.isfinite(calc.batch_evaluate([atoms])[0]["forces"]).all()


# ---------------------------------------------------------------------------- structures
def test_backend_evaluate_refuses_unknown_elements(base_for, backend_kind):
    backend = load_backend(base_for(backend_kind), dtype="float64")
    z = next(z for z in range(1, 119) if z not in backend.atomic_numbers)
    atoms = Atoms(numbers=[z, 1], positions=[[0, 0, 0], [0, 0, 1.5]])
    graph = build_graph([atoms], backend.cutoff, backend.device, backend.dtype)
    with pytest.raises(UnknownElementError, match=rf"\b{chemical_symbols[z]}\b"):
        backend.evaluate(graph)
    with pytest.raises(UnknownElementError):
        backend.evaluate(graph, training=True, compute_stress=False)


def test_calculator_names_the_structure_it_refuses(mace_model_path):
    calc = SparseCalc(mace_model_path)
    fe = Atoms("Fe2", positions=[[0, 0, 0], [0, 0, 2.0]])
    with pytest.raises(UnknownElementError, match=r"run\.xyz:frame 3: element\(s\) Fe"):
        calc.batch_evaluate([molecule("H2O"), fe], names=["run.xyz:frame 2", "run.xyz:frame 3"])
    close = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.04]])
    with pytest.raises(AtomsTooCloseError, match=r"run\.xyz:frame 9: atoms 0 and 1 are 0\.04 Å"):
        calc.batch_evaluate([close], names=["run.xyz:frame 9"])


@pytest.mark.parametrize(
    ("atoms", "problem"),
    [
        (Atoms(), "no atoms"),
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, np.nan]]), "atom 1 has a NaN or infinite position"),
        (Atoms("H2", positions=[[0, 0, 0], [np.inf, 0, 0]]), "atom 1 has a NaN or infinite position"),
        (Atoms("Si2", positions=[[0, 0, 0], [1.3, 1.3, 1.3]], pbc=True), "linearly dependent"),
        (
            Atoms(
                "Si2",
                positions=[[0, 0, 0], [1.3, 1.3, 1.3]],
                cell=[[5, 0, 0], [5, 0, 0], [0, 0, 5]],
                pbc=True,
            ),
            "linearly dependent",
        ),
    ],
    ids=["empty", "nan_position", "inf_position", "periodic_without_cell", "flat_cell"],
)
def test_structures_no_model_can_evaluate(mace_model_path, atoms, problem):
    calc = SparseCalc(mace_model_path)
    with pytest.raises(StructureError, match=problem):
        calc.batch_evaluate([atoms])
    atoms = atoms.copy()
    atoms.calc = calc
    with pytest.raises(StructureError, match=r"structure 0"):
        atoms.get_potential_energy()


def test_a_calculator_without_a_structure_says_so(mace_model_path):
    with pytest.raises(StructureError, match=r"no structure to calculate: attach the calculator"):
        SparseCalc(mace_model_path).get_potential_energy()


def test_stress_of_a_cell_without_volume_is_refused(mace_model_path):
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.pbc = [True, True, False]
    slab.cell[2] = 0.0  # periodic in-plane, no vacuum vector: no volume to divide the virial by
    with pytest.raises(StressUndefinedError, match=r"slab\.xyz:frame 0: stress needs a cell with a non-zero"):
        SparseCalc(mace_model_path).batch_evaluate([slab], ["energy", "stress"], names=["slab.xyz:frame 0"])


# ---------------------------------------------------------------------------- training data
def test_frame_without_energy_or_forces(tmp_path):
    no_forces = molecule("H2O")
    no_forces.calc = SinglePointCalculator(no_forces, energy=-14.0)
    path = tmp_path / "labels.extxyz"
    write(path, [*water_frames(2), no_forces])
    with pytest.raises(MissingLabelError, match=r"labels\.extxyz:frame 2: no forces.*--allow-missing-forces"):
        read_frames(path)
    write(path, [*water_frames(1), molecule("H2O")])
    with pytest.raises(MissingLabelError, match=r"labels\.extxyz:frame 1: no energy"):
        read_frames(path)


def test_nan_forces_name_file_and_frame(tmp_path):
    frames = water_frames(3)
    forces = frames[1].get_forces().copy()
    forces[2, 1] = np.nan
    frames[1] = labelled(frames[1], forces=forces)
    path = tmp_path / "nan.extxyz"
    write(path, frames)
    with pytest.raises(NonFiniteLabelError, match=r"nan\.extxyz:frame 1: forces contains NaN"):
        read_frames(path)
    # an index slice keeps the frame numbers of the file
    with pytest.raises(NonFiniteLabelError, match=r"nan\.extxyz:frame 1:"):
        read_frames(f"{path}@1:")


def test_malformed_labels(tmp_path):
    atoms = molecule("H2O")
    atoms.info["energy"] = "converged"
    atoms.arrays["forces"] = np.zeros((3, 3))
    with pytest.raises(MissingLabelError, match=r"w\.xyz:frame 0: energy label .* not numeric"):
        frame_from_atoms(atoms, "w.xyz:frame 0")
    atoms.info["energy"] = -14.0
    atoms.info["forces"] = [0.1, 0.2]
    with pytest.raises(MissingLabelError, match=r"forces have shape \(2,\) for 3 atoms"):
        frame_from_atoms(atoms, "w.xyz:frame 0", forces_key="forces")
    with pytest.raises(StructureError, match=r"w\.xyz:frame 4: the frame has no atoms"):
        frame_from_atoms(labelled(Atoms()), "w.xyz:frame 4")


def test_hand_built_frames_get_the_same_label_checks():
    si = bulk("Si", "diamond", a=5.43)
    voigt = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    frame = Frame(si, -10.0, np.zeros((2, 3)), voigt, "mine:0")
    assert frame.stress.shape == (3, 3)
    np.testing.assert_array_equal(frame.stress, frame.stress.T)
    assert (frame.stress[1, 2], frame.stress[0, 2], frame.stress[0, 1]) == (4.0, 5.0, 6.0)
    with pytest.raises(MissingLabelError, match=r"mine:1: forces have shape \(3, 3\) for 2 atoms"):
        Frame(si, -10.0, np.zeros((3, 3)), None, "mine:1")
    with pytest.raises(MissingLabelError, match=r"mine:2: stress has shape \(4,\)"):
        Frame(si, -10.0, np.zeros((2, 3)), np.zeros(4), "mine:2")


def test_labels_under_their_own_names_are_pointed_out(tmp_path):
    """An extxyz file with MACE-style ``REF_energy``/``REF_forces``: the error names the keys."""
    frames = []
    for k in range(2):
        water = molecule("H2O")
        water.positions[0, 0] += 0.01 * k
        water.info["REF_energy"] = -14.0 - 0.1 * k
        water.arrays["REF_forces"] = np.full((3, 3), 0.1 * k)
        frames.append(water)
    path = tmp_path / "ref.extxyz"
    write(path, frames)
    with pytest.raises(MissingLabelError, match=r"ref\.extxyz.*no energy.*has REF_energy: pass --energy-key"):
        read_frames(path)
    with pytest.raises(MissingLabelError, match=r"no forces.*has REF_forces: pass --forces-key"):
        read_frames(path, energy_key="REF_energy")
    read = read_frames(path, energy_key="REF_energy", forces_key="REF_forces")
    assert [f.energy for f in read] == [-14.0, -14.1]
    np.testing.assert_allclose(read[1].forces, 0.1)


def test_results_computed_for_another_structure_are_refused():
    """ASE keeps results on the calculator: a calculator shared by several structures, or atoms
    moved after their calculation, would hand every frame the last structure's labels."""
    from ase.calculators.emt import EMT

    shared = EMT()
    structures = []
    for k in range(3):
        cu = bulk("Cu", "fcc", a=3.55 + 0.05 * k, cubic=True)
        cu.rattle(0.05, seed=k)
        cu.calc = shared
        cu.get_forces()
        structures.append(cu)
    with pytest.raises(
        StaleLabelError, match=r"structure 0: .*computed for another structure \(cell, positions"
    ):
        read_frames(structures)
    for cu in structures:  # each with its own results: accepted, labels as computed
        cu.calc = EMT()
        cu.get_forces()
    energies = [cu.get_potential_energy() for cu in structures]
    assert [f.energy for f in read_frames(structures)] == energies
    # moved as a whole and wrapped back into the cell: the same structure, kept with its labels
    structures[2].translate([3.1, -0.7, 12.0])
    structures[2].wrap()
    assert read_frames(structures)[2].energy == energies[2]
    structures[1].positions[0] += 0.1
    with pytest.raises(StaleLabelError, match=r"structure 1: .*\(positions differ\)"):
        read_frames(structures)


def test_stress_labels_are_kept_where_the_calculator_gives_a_stress():
    """A slab whose cell spans the vacuum keeps its stress label; a molecule without a cell drops it."""
    voigt = np.full(6, 0.01)
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.cell[2] *= 2.0
    slab.pbc = [True, True, False]
    slab.calc = SinglePointCalculator(slab, energy=-40.0, forces=np.zeros((8, 3)), stress=voigt)
    assert frame_from_atoms(slab, "slab.xyz:frame 0").stress.shape == (3, 3)
    water = molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=-14.0, forces=np.zeros((3, 3)), stress=voigt)
    assert frame_from_atoms(water, "water.xyz:frame 0").stress is None


def test_empty_and_unreadable_trajectories(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_bytes(b"")
    with pytest.raises(EmptyDatasetError, match=r"empty\.extxyz: the file is empty"):
        read_frames(empty)
    data = tmp_path / "three.extxyz"
    write(data, water_frames(3))
    with pytest.raises(EmptyDatasetError, match=r"three\.extxyz: index '5:' selects none of its 3 frames"):
        read_frames(f"{data}@5:")
    with pytest.raises(DataFileError, match=r"three\.extxyz: the slice '0:3:0' after '@' has a step of 0"):
        read_frames(f"{data}@0:3:0")
    with pytest.raises(DataFileError, match=r"three\.extxyz: has no frame '7' \(it has 3: 0 to 2, or -3"):
        read_frames(f"{data}@7")
    from ase_sparsecalc.structure_io import read_structure

    for index in (3, -4):  # the structure commands' --index: refused with the file's frame count
        with pytest.raises(
            DataFileError, match=rf"three\.extxyz: has no frame {index} \(it has 3: 0 to 2, or -3"
        ):
            read_structure(data, index=index)
    assert len(read_structure(data, index=-3)) == len(water_frames(3)[0])
    # ASE reads some frame for a negative index beyond the start: refused, not silently read
    with pytest.raises(DataFileError, match=r"three\.extxyz: has no frame '-4' \(it has 3: 0 to 2, or -3"):
        read_frames(f"{data}@-4")
    for bad in ("a:b", "1:2:3:4"):
        with pytest.raises(
            DataFileError, match=rf"three\.extxyz: '{bad}' after '@' is not a frame index or slice"
        ):
            read_frames(f"{data}@{bad}")
    with pytest.raises(DataFileError, match=r"missing\.extxyz: file not found"):
        read_frames(tmp_path / "missing.extxyz")
    with pytest.raises(DataFileError, match="is a folder"):
        read_frames(tmp_path)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("this is not\na structure file\n")
    with pytest.raises(DataFileError, match=r"garbage\.extxyz: ASE cannot read this file"):
        read_frames(garbage)


def test_a_broken_frame_inside_a_file_is_located(tmp_path):
    """A frame cut short or holding an unknown symbol is named by its place in the file, and the
    message does not blame the format of a file whose first frames read fine; a stress given as 6
    numbers in extxyz (ASE's reader wants 9) gets told what to do."""
    data = tmp_path / "five.extxyz"
    write(data, water_frames(5))
    lines = data.read_text().splitlines(keepends=True)  # 5 lines per frame: count, comment, 3 atoms
    (tmp_path / "cut.extxyz").write_text("".join(lines[:17] + lines[18:]))  # frame 3 loses an atom
    cut = r"line 21 should hold the number of atoms of frame 4.*frame 3 \(from line 16\) has more or fewer"
    with pytest.raises(DataFileError, match=cut) as info:
        read_frames(tmp_path / "cut.extxyz")
    assert "--format" not in str(info.value)
    (tmp_path / "short.extxyz").write_text("".join(lines[:-1]))
    with pytest.raises(DataFileError, match=r"frame 4 \(line 21\) counts 3 atoms, but the file ends after 2"):
        read_frames(tmp_path / "short.extxyz")
    symbol = [*lines[:13], lines[13].replace("H", "Xx", 1), *lines[14:]]
    (tmp_path / "symbol.extxyz").write_text("".join(symbol))
    with pytest.raises(DataFileError, match=r"ASE cannot read frame 2 .*unknown chemical symbol 'Xx'"):
        read_frames(tmp_path / "symbol.extxyz")
    crystal = labelled(bulk("Si", "diamond", a=5.43))
    voigt = tmp_path / "voigt.extxyz"
    voigt.write_text(
        '2\nLattice="0 2.715 2.715 2.715 0 2.715 2.715 2.715 0" Properties=species:S:1:pos:R:3 '
        'energy=-10.0 stress="0.01 0.01 0.01 0 0 0" pbc="T T T"\n'
        + "".join(f"Si {x:.4f} {y:.4f} {z:.4f}\n" for x, y, z in crystal.positions)
    )
    with pytest.raises(DataFileError, match=r"voigt\.extxyz: .*stress= and virial= as 9 numbers.*stress-key"):
        read_frames(voigt)


def test_ase_databases_are_read_with_selections(tmp_path):
    """ASE's own database format: read by its name, and selections after '@' pick its rows."""
    from ase.db import connect

    path = tmp_path / "frames.db"
    with connect(path) as db:
        for atoms in [*water_frames(2), labelled(bulk("Si", "diamond", a=5.43), forces=np.zeros((2, 3)))]:
            db.write(atoms)
    assert len(read_frames(path)) == 3
    silicon = read_frames(f"{path}@natoms=2")
    assert [f.atoms.get_chemical_formula() for f in silicon] == ["Si2"]
    assert silicon[0].source == f"{path}@natoms=2:frame 0"


def test_a_file_whose_name_misleads_ase_is_read_with_the_format_given(tmp_path, capsys):
    """extxyz frames saved as ``.data`` (ASE guesses RuNNer) and ``.txt`` (no guess): the errors
    say how ASE read the file and point to --format, which then reads them."""

    frames = water_frames(3)
    for name in ("frames.data", "frames.txt"):
        write(tmp_path / name, frames, format="extxyz")
    with pytest.raises(
        EmptyDatasetError, match=r"frames\.data: no frames .*'runnerdata', ASE's guess.*--format"
    ):
        read_frames(tmp_path / "frames.data")
    with pytest.raises(
        DataFileError, match=r"frames\.txt: ASE cannot read .*cannot tell its format.*--format"
    ):
        read_frames(tmp_path / "frames.txt")
    for name in ("frames.data", "frames.txt"):
        read = read_frames(f"{tmp_path / name}@1:", file_format="extxyz")
        assert [f.energy for f in read] == [a.get_potential_energy() for a in frames[1:]]
        assert read[0].source.endswith(f"{name}:frame 1")
    assert main(["eval", str(tmp_path / "frames.txt"), "--format", "extxyz", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["energy_mae"] >= 0 and printed["units"]["energy_mae"] == "meV/atom"


def test_file_names_with_at_signs_and_indices_that_are_not_indices(tmp_path):
    from ase_sparsecalc.structure_io import read_structure

    data = tmp_path / "run@2.extxyz"  # '@' is part of the name: the file exists
    write(data, water_frames(3))
    assert len(read_frames(data)) == 3
    assert [f.source for f in read_frames(f"{data}@1:")] == [f"{data}:frame 1", f"{data}:frame 2"]
    assert len(read_structure(data)) == 3
    for bad in ("abc", "1.5"):
        with pytest.raises(DataFileError, match=rf"run@2\.extxyz: '{bad}' after '@' is not a frame index"):
            read_frames(f"{data}@{bad}")


def test_finetune_names_file_and_frame_of_unknown_element(mace_model_path, tmp_path):
    iron = labelled(bulk("Fe", "bcc", a=2.87, cubic=True))
    path = tmp_path / "with_iron.extxyz"
    water = water_frames(4)
    write(path, [*water[:3], iron, water[3]])
    with pytest.raises(UnknownElementError, match=r"with_iron\.extxyz:frame 3: element\(s\) Fe unknown"):
        finetune(mace_model_path, str(path), **FAST)


def test_finetune_names_file_and_frame_of_atoms_too_close(mace_model_path, tmp_path):
    frames = water_frames(4)
    crushed = molecule("H2O")
    crushed.positions[2] = crushed.positions[0] + [0.0, 0.0, 0.06]
    frames[2] = labelled(crushed)
    path = tmp_path / "crushed.extxyz"
    write(path, frames)
    with pytest.raises(AtomsTooCloseError, match=r"crushed\.extxyz:frame 2: atoms 0 and 2 are 0\.06 Å"):
        finetune(mace_model_path, str(path), **FAST)


@pytest.mark.parametrize("seed", [0, 30])  # 30: the split puts frame 4 in training, frame 1 in validation
def test_duplicate_frames_are_named_in_reading_order(mace_model_path, tmp_path, seed):
    """The later copy in the file is named, whichever way the random split shuffled them."""
    frames = water_frames(4)
    path = tmp_path / "dup.extxyz"
    write(path, [*frames, frames[1]])
    with pytest.raises(
        DuplicateFrameError,
        match=r"dup\.extxyz:frame 4: same structure as .*dup\.extxyz:frame 1 \(the same DFT energy\).*--drop",
    ):
        finetune(mace_model_path, str(path), **(FAST | {"seed": seed, "valid_fraction": 0.4}))


def test_two_magnetic_states_of_one_structure_are_named_as_such():
    """One cell computed ferromagnetic and non-magnetic (total moments 4.4 and 0 μB) is one
    structure to a base model without a spin input; the duplicate error says why."""
    import dataclasses

    from ase.calculators.emt import EMT

    from ase_sparsecalc.finetune.duplicates import check_duplicates

    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell.calc = EMT()
    cell.get_forces(), cell.get_stress()
    ferro = dataclasses.replace(frame_from_atoms(cell, "fe.xyz:frame 0"), magmom=4.4)
    nonmagnetic = dataclasses.replace(ferro, source="fe.xyz:frame 1", energy=ferro.energy + 0.5, magmom=0.0)
    with pytest.raises(
        DuplicateFrameError,
        match=r"fe\.xyz:frame 1: same structure as fe\.xyz:frame 0 \(DFT energies 500 meV apart, total "
        r"magnetic moments 4\.40 and 0\.00 μB: two magnetic states of one structure",
    ):
        check_duplicates([ferro, nonmagnetic])
    with pytest.raises(DuplicateFrameError, match=r"\(DFT energies 500 meV apart\); remove one"):
        check_duplicates([ferro, dataclasses.replace(nonmagnetic, magmom=4.3)])


def test_overlapping_slices_of_one_file_are_named_as_read_twice(mace_model_path, tmp_path):
    path = tmp_path / "run.extxyz"
    write(path, water_frames(6))
    with pytest.raises(DuplicateFrameError, match=r"run\.extxyz:frame 4: read twice \(the file or index"):
        finetune(mace_model_path, f"{path}@0:5", valid=f"{path}@4:6", **FAST)


def test_restarted_run_with_drop_duplicates(mace_model_path, tmp_path, caplog):
    """Two files of one run restarted from its last structure: the repeat is dropped, once."""
    frames = water_frames(6)
    first, second = tmp_path / "run1.extxyz", tmp_path / "run2.extxyz"
    write(first, frames[:3])
    write(second, [frames[2], *frames[3:]])  # starts where run 1 stopped
    with pytest.raises(
        DuplicateFrameError, match=r"run2\.extxyz:frame 0: same structure as .*run1\.extxyz:frame 2"
    ):
        finetune(mace_model_path, [str(first), str(second)], **FAST)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(
            mace_model_path, [str(first), str(second)], drop_duplicates=True, **FAST
        )
    assert result.report["data"]["frames"] == 6  # valid_fraction 0: all of them train
    assert "dropped " in caplog.text and "run2.extxyz:frame 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(
            mace_model_path, [str(first), str(second)], drop_duplicates="last", **FAST
        )
    assert result.report["data"]["frames"] == 6
    assert "dropped " in caplog.text and "run1.extxyz:frame 2" in caplog.text
    assert "run2.extxyz:frame 0:" not in caplog.text
    with pytest.raises(ConfigError, match="keep must be one of first, last"):
        finetune(mace_model_path, [str(first), str(second)], drop_duplicates="middle", **FAST)


def test_drop_duplicates_keeps_first_or_last_copy():
    """Of three copies of one structure, the first or the last in reading order stays, across
    the train and validation groups, and unrepeated frames are untouched."""
    atoms = water_frames(3)
    order = [atoms[0], atoms[1], atoms[0], atoms[2], atoms[0]]
    frames = [Frame(a.copy(), -14.0 - k, None, None, source=f"f{k}") for k, a in enumerate(order)]
    train, valid = frames[:3], frames[3:]
    first = drop_duplicate_frames(train, valid)
    last = drop_duplicate_frames(train, valid, keep="last")
    assert [[f.source for f in group] for group in first] == [["f0", "f1"], ["f3"]]
    assert [[f.source for f in group] for group in last] == [["f1"], ["f3", "f4"]]


def _assert_copy_found(named: list[tuple[Atoms, str]], copy: str) -> None:
    """Of the named structures (the first named "original"), ``copy`` and only it is refused as
    a copy of the original, and dropping duplicates keeps all the others."""
    frames = [Frame(atoms, -40.0, None, None, source=name) for atoms, name in named]
    with pytest.raises(DuplicateFrameError, match=f"{copy}: same structure as original"):
        check_duplicates(frames)
    (kept,) = drop_duplicate_frames(frames)
    assert [f.source for f in kept] == [name for _, name in named if name != copy]


def test_copies_written_differently_are_found_and_near_structures_are_not():
    """A copy of a crystal with its atoms reordered, one atom moved by a lattice vector and the
    positions perturbed below the printed precision is the same structure; a displacement of
    1e-3 Å (an MD step) is not."""
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    crystal.rattle(0.05, seed=1)
    copy = crystal[[3, 0, 7, 1, 2, 6, 5, 4]]
    copy.positions[0] += crystal.cell[0] - crystal.cell[2]
    copy.positions += np.random.default_rng(2).uniform(-5e-8, 5e-8, copy.positions.shape)
    moved = crystal.copy()
    moved.positions[4] += [1e-3, 0.0, 0.0]
    _assert_copy_found([(crystal, "original"), (copy, "copy"), (moved, "moved")], "copy")


@pytest.mark.parametrize("kind", ["si", "nacl", "slab"])
def test_crystal_shifted_as_a_whole_is_a_copy(kind):
    """A crystal moved as a whole by a vector that is not a lattice vector (another origin, as
    programs choose differently) is the same structure, in any atom order; so is a slab moved
    along its surface and along its vacuum axis. A copy with one atom displaced by 1e-3 Å is
    not."""
    from ase.build import fcc111

    if kind == "si":
        crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    elif kind == "nacl":
        crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 1, 1))
    else:
        crystal = fcc111("Cu", (2, 2, 3), vacuum=6.0)
        del crystal.info["adsorbate_info"]
    crystal.rattle(0.05, seed=3)
    order = np.random.default_rng(4).permutation(len(crystal))
    shifted = crystal[order]
    shifted.positions += [1.234, -0.567, 2.891]
    shifted.wrap()
    displaced = shifted.copy()
    displaced.positions[1] += [0.0, 1e-3, 0.0]
    _assert_copy_found([(crystal, "original"), (displaced, "displaced"), (shifted, "shifted")], "shifted")


def test_molecule_moved_as_a_whole_is_a_copy_but_another_charge_state_is_not():
    """A molecule translated as a whole (and written in another atom order) has the same energy
    and forces: a copy. A rotated molecule has rotated forces, and a cation at the same
    geometry another energy: neither is a copy."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.02, seed=5)
    moved = ethanol[::-1]
    moved.positions += [3.7, -1.2, 0.45]
    rotated = ethanol.copy()
    rotated.rotate(30, "z", center="COM")
    cation = ethanol.copy()
    cation.info.update(charge=1, spin=2)
    frames = [
        Frame(atoms, -4200.0, None, None, source=name)
        for atoms, name in ((ethanol, "neutral"), (rotated, "rotated"), (cation, "cation"), (moved, "moved"))
    ]
    with pytest.raises(DuplicateFrameError, match="moved: same structure as neutral"):
        check_duplicates(frames)
    (kept,) = drop_duplicate_frames(frames)
    assert [f.source for f in kept] == ["neutral", "rotated", "cation"]


def test_unusable_checkpoint_on_resume(mace_model_path, tmp_path):
    path = tmp_path / "train.extxyz"
    write(path, water_frames(4))
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip file")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: cannot read checkpoint"):
        finetune(mace_model_path, str(path), checkpoint_dir=checkpoints, resume=True, **FAST)
    torch.save({"fingerprint": "another run"}, checkpoints / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="base model, data set or training options differ"):
        finetune(mace_model_path, str(path), checkpoint_dir=checkpoints, resume=True, **FAST)


def test_resuming_may_change_device_and_time_limits_but_not_training_options(backend):
    from ase_sparsecalc.finetune import _run_fingerprint

    first = _run_fingerprint(backend, FinetuneConfig(device="cpu", max_time=60), "data")
    assert first == _run_fingerprint(backend, FinetuneConfig(device="auto", time_budget=3600), "data")
    assert first != _run_fingerprint(backend, FinetuneConfig(device="cpu", lr=0.02), "data")
    assert first != _run_fingerprint(backend, FinetuneConfig(device="cpu"), "other data")


def test_a_refused_resume_names_what_changed(mace_model_path, tmp_path):
    path = tmp_path / "train.extxyz"
    write(path, water_frames(4))
    options = {**FAST, "checkpoint_dir": tmp_path / "ckpt"}
    finetune(mace_model_path, str(path), **options)
    changed = r"checkpoint's training options differ from this run's \(lr: [0-9.e-]+ then, 0\.5 now\)"
    with pytest.raises(CheckpointError, match=changed):
        finetune(mace_model_path, str(path), resume=True, **{**options, "lr": 0.5})
    with pytest.raises(CheckpointError, match=r"checkpoint's data set differs from this run's"):
        finetune(mace_model_path, f"{path}@0:3", resume=True, **options)


def test_a_checkpoint_made_through_another_output_head_is_not_resumed(tmp_path):
    """Two heads of one multi-head MACE model share every weight (one state-dict fingerprint),
    but a delta trained through one is not the other's."""
    from ase_sparsecalc.finetune import _run_fingerprint
    from ase_sparsecalc.testing import save_mace_model

    path = save_mace_model(tmp_path / "heads.model", heads=["pbe", "pbesol"], seed=3)
    pbe, pbesol = (load_backend(path, head=head) for head in ("pbe", "pbesol"))
    assert pbe.fingerprint == pbesol.fingerprint
    config = FinetuneConfig()
    assert _run_fingerprint(pbe, config, "data") != _run_fingerprint(pbesol, config, "data")


def test_checkpoint_error_still_importable_from_trainer():
    from ase_sparsecalc.finetune.trainer import CheckpointError as FromTrainer

    assert FromTrainer is CheckpointError


# ---------------------------------------------------------------------------- options and outputs
@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"density": 2.0}, "density must be in"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"forces_weight": -1.0}, "forces_weight"),
        ({"method": "magic"}, "method must be one of"),
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, factored_adam"),
        ({"masked_decay": -0.5}, "masked_decay must be a finite number >= 0"),
        ({"lr": float("nan")}, "lr must be a positive finite number, got nan"),
        ({"lr": float("inf")}, "lr must be a positive finite number, got inf"),
        ({"forces_weight": float("inf")}, "forces_weight must be a finite number >= 0, got inf"),
        ({"best_from": 1.5}, "best_from must be in [0, 1]"),
        ({"method": "full", "exclude_kinds": ("radial",)}, "exclude_kinds does not apply to method 'full'"),
        ({"method": "gmp", "dense_kinds": ("embedding",)}, "dense_kinds applies to method 'sparse' only"),
        ({"method": "full", "density": 0.01}, "--density 0.01 (density=0.01) does not apply to"),
        ({"method": "full", "penalty": 0.1}, "(penalty=0.1) does not apply"),
        ({"method": "gmp", "hard_threshold": False}, "--threshold soft (hard_threshold=False) does not"),
        ({"method": "elora", "masked_decay": 0.5}, "--masked-decay 0.5 (masked_decay=0.5) does not apply"),
        ({"rank": 3}, "--rank 3 (rank=3) does not apply to method 'sparse'"),
        ({"method": "shift", "lr": 5.0}, "--lr 5.0 (lr=5.0) does not apply to method 'shift'"),
        ({"method": "shift", "train_readouts": True}, "--train-readouts (train_readouts=True) does not"),
        ({"huber_delta": 0.0}, "huber_delta must be positive"),
        ({"patience": 0}, "patience must be at least 1"),
        ({"energy_weight": 0, "forces_weight": 0, "stress_weight": 0}, "nothing to fit"),
    ],
)
def test_bad_finetune_options(options, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        FinetuneConfig(**options)
    with pytest.raises(ValueError):  # still a ValueError for callers that catch that
        FinetuneConfig(**options)


def test_a_diverging_run_stops_at_the_step_it_diverges(mace_model_path, tmp_path):
    """A learning rate far too high: the loss goes NaN within the first epoch and the run stops
    there, naming the step and the learning rate, and writes no delta."""
    from ase_sparsecalc.errors import TrainingDivergedError

    output = tmp_path / "d.safetensors"
    with pytest.raises(TrainingDivergedError, match=r"became (nan|inf) at step \d+ \(epoch 1\).*lr=1e\+06"):
        finetune(mace_model_path, water_frames(6), method="full", lr=1e6, epochs=5, valid_fraction=0.0,
                 output=output)  # fmt: skip
    assert not output.exists()


def test_runs_that_could_change_nothing_are_refused(mace_model_path):
    """Energy-only frames with their energy weight at 0, and a density below one weight."""
    energy_only = water_frames(3)
    for atoms in energy_only:
        atoms.calc.results.pop("forces")
    with pytest.raises(ConfigError, match="have energies, and every one of them has loss weight 0"):
        finetune(mace_model_path, energy_only, allow_missing_forces=True, energy_weight=0.0, **FAST)
    with pytest.raises(ConfigError, match=r"density 1e-09 of \d+ trainable weights keeps no weight"):
        finetune(mace_model_path, water_frames(3), density=1e-9, **FAST)


def test_methods_without_a_density_record_none():
    """full, elora and shift change what they change: the record does not claim the default 3 %."""
    assert [FinetuneConfig(method=m).density for m in ("full", "elora", "shift")] == [None, None, None]
    assert FinetuneConfig(method="gmp").density == 0.03


@pytest.mark.parametrize(
    ("options", "problem"),
    [({"device": "gpu"}, "not a torch device"), ({"default_dtype": "float16"}, "float32")],
)
def test_bad_calculator_options(mace_model_path, options, problem):
    with pytest.raises(ConfigError, match=problem):
        SparseCalc(mace_model_path, **options)


def test_unwritable_output_names_the_file(backend, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "delta.safetensors"
    with pytest.raises(OutputFileError, match=r"a_file/delta\.safetensors: cannot write here"):
        random_sparse_delta(backend, density=0.01).save(target)
    with pytest.raises(OSError):  # still an OSError for callers that catch that
        random_sparse_delta(backend, density=0.01).save(target)


@pytest.mark.parametrize("where", ["output", "report_dir", "checkpoint_dir"])
def test_finetune_refuses_unwritable_outputs_before_reading_data(mace_model_path, tmp_path, where):
    """From Python too: an output that could not be written stops the run before any work (the
    training file does not even exist here), naming the file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    options = {where: blocker / "out.safetensors" if where == "output" else blocker / "sub"}
    with pytest.raises(OutputFileError, match=r"a_file/[a-z./]+: .*a_file is a file, not a folder"):
        finetune(mace_model_path, str(tmp_path / "absent.extxyz"), **options, **FAST)


def test_failed_finetune_leaves_no_empty_output_folders(mace_model_path, tmp_path):
    """The output check creates the folders it tests and removes them again; writing creates them."""
    out = tmp_path / "runs" / "si"
    options = {
        "output": out / "delta.safetensors",
        "report_dir": out / "report",
        "checkpoint_dir": out / "ckpt",
    }
    with pytest.raises(DataFileError, match=r"absent\.extxyz: file not found"):
        finetune_with_report(mace_model_path, str(tmp_path / "absent.extxyz"), **options, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_elements_only_in_validation_frames(mace_model_path, tmp_path):
    """An element that only validation frames hold would get no energy shift and no training:
    a random split keeps such frames in training; a validation file with them is refused."""
    from ase_sparsecalc.errors import DataFileError
    from ase_sparsecalc.finetune.dataset import split_frames

    methane = labelled(molecule("CH4"), energy=-24.0)
    frames = [frame_from_atoms(a, f"w{k}") for k, a in enumerate(water_frames(9))]
    frames.append(frame_from_atoms(methane, "methane"))
    for seed in range(8):
        train, valid = split_frames(frames, 0.5, seed)
        assert "methane" in [f.source for f in train] and len(train) + len(valid) == len(frames)
        assert {f.source for f in train}.isdisjoint(f.source for f in valid)
    # the only H2O2 among water frames: known elements, but a composition no training frame has
    frames[-1] = frame_from_atoms(labelled(molecule("H2O2"), energy=-18.0), "peroxide")
    landed = set()
    for seed in range(8):
        train, valid = split_frames(frames, 0.5, seed)
        assert "peroxide" in [f.source for f in train] and len(valid) >= 4 and len(train) + len(valid) == 10
        landed |= {f.source for f in valid}
    assert len(landed) > 5  # water frames still go to validation at random
    write(tmp_path / "train.extxyz", water_frames(4))
    write(tmp_path / "valid.extxyz", [*water_frames(6)[4:], methane])
    with pytest.raises(DataFileError, match=r"valid\.extxyz:frame 2: element\(s\) C appear in validation"):
        finetune(mace_model_path, str(tmp_path / "train.extxyz"), str(tmp_path / "valid.extxyz"), **FAST)


def test_label_slopes_name_wrong_units_and_per_atom_energies():
    """Slopes of labels against a model that is right in scale: near one for eV labels, far
    from it for Hartree, kcal/mol, per-atom energies or the pressure-positive stress sign."""
    from ase_sparsecalc.finetune.label_checks import label_slopes, warn_about_label_scales

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:10"))
    model = {k: {"energy": f.energy, "forces": f.forces, "stress": f.stress} for k, f in enumerate(frames)}
    right = label_slopes(frames, model)
    assert set(right) == {"forces", "stress", "energy"}
    assert all(s == pytest.approx(1.0) for s in right.values())
    assert warn_about_label_scales(right, "si") == []
    wrong = [Frame(f.atoms, f.energy / len(f.atoms), f.forces / 51.422, -f.stress, f.source) for f in frames]
    slopes = label_slopes(wrong, model)
    assert slopes["forces"] == pytest.approx(1 / 51.422) and slopes["stress"] == pytest.approx(-1.0)
    assert slopes["energy"] == pytest.approx(1 / 8)  # 8 atoms per frame
    messages = warn_about_label_scales(slopes, "si.xyz")
    assert len(messages) == 3 and all(m.startswith("si.xyz: the DFT") for m in messages)
    assert any("Hartree/Bohr" in m for m in messages) and any("per atom" in m for m in messages)
    # DFT at its own equilibrium against a base model 4 GPa off in pressure (another functional):
    # the stresses still agree in scale, and no unit or sign is suspected
    offset = {k: {**p, "stress": p["stress"] - 4.0 * GPa * np.eye(3)} for k, p in model.items()}
    assert label_slopes(frames, offset)["stress"] == pytest.approx(1.0)


def test_stray_energies_and_net_forces_are_named_by_frame():
    """A frame whose energy is per atom (in a set where the slope cannot show it) or whose
    forces do not sum to zero is named; clean DFT data passes both checks."""
    from ase_sparsecalc.finetune.label_checks import warn_about_net_forces, warn_about_stray_energies

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:10"))
    rng = np.random.default_rng(0)  # a "model" off by a per-atom shift and tens of meV of noise
    model = {
        k: {"energy": f.energy + 0.3 * len(f.atoms) + 0.02 * rng.standard_normal()}
        for k, f in enumerate(frames)
    }
    assert warn_about_stray_energies(frames, model) is None
    assert warn_about_net_forces(frames) is None
    bad = list(frames)
    bad[4] = Frame(
        bad[4].atoms, bad[4].energy / len(bad[4].atoms), bad[4].forces, bad[4].stress, bad[4].source
    )
    bad[7] = Frame(
        bad[7].atoms, bad[7].energy, bad[7].forces + np.array([0.0, 0.3, 0.0]), bad[7].stress, bad[7].source
    )
    stray = warn_about_stray_energies(bad, model)
    assert stray.startswith("1 frame(s)") and "si_pbesol.extxyz:frame 4: +" in stray
    net = warn_about_net_forces(bad)
    assert net.startswith("1 frame(s)") and "si_pbesol.extxyz:frame 7: 0.3 eV/Å per atom" in net


def test_a_frame_with_stress_in_gpa_is_named():
    """One frame whose stress is in GPa among frames in eV/Å³ is named; a base model a few GPa
    off on every frame raises nothing."""
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import warn_about_stray_stresses

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:10"))
    assert all(f.stress is not None for f in frames)
    rng = np.random.default_rng(0)
    model = {k: {"stress": f.stress + 3 * GPa * rng.standard_normal((3, 3))} for k, f in enumerate(frames)}
    assert warn_about_stray_stresses(frames, model) is None
    bad = list(frames)
    bad[2] = Frame(bad[2].atoms, bad[2].energy, bad[2].forces, bad[2].stress / GPa + 10.0, bad[2].source)
    message = warn_about_stray_stresses(bad, model)
    assert message.startswith("1 frame(s) have a DFT stress component more than 0.3 eV/Å³ (48 GPa)")
    assert "si_pbesol.extxyz:frame 2: " in message and "GPa and kbar" in message


def test_a_constant_isotropic_stress_offset_is_explained_as_pulay_stress():
    """Every frame's stress off by the same pressure (Pulay stress of a low cutoff) is reported
    with its cause; a base model a few GPa off, or large but different gaps per frame, are not."""
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import warn_about_stress_offset

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:10"))
    rng = np.random.default_rng(0)
    model = {k: {"stress": f.stress + 3 * GPa * rng.standard_normal((3, 3))} for k, f in enumerate(frames)}
    assert warn_about_stress_offset(frames, model) is None
    pulay = [Frame(f.atoms, f.energy, f.forces, f.stress + 0.58 * np.eye(3), f.source) for f in frames]
    message = warn_about_stress_offset(pulay, model)
    assert re.search(r"by one isotropic stress of \+0\.5[78]\d* eV/Å³ \(\+9[2-4] GPa\)", message)
    assert "Pulay stress" in message and "--stress-weight 0" in message and "si_pbesol.extxyz" in message
    scattered = [
        Frame(f.atoms, f.energy, f.forces, f.stress + rng.normal(0.0, 0.3, (3, 3)), f.source) for f in frames
    ]
    assert warn_about_stress_offset(scattered, model) is None


def test_stresses_that_disagree_with_the_energies_slope_are_named():
    """P = -dE/dV: the copper data (GPAW PBEsol, 4-atom cells over a 37 % spread of volumes)
    agree with themselves against a conservative base (EMT), so nothing is said; 3 GPa added to
    every stress (a Pulay stress ten times too small for the offset check) is named; a second
    phase of the same composition (another cell shape, its energies 0.8 eV higher, as a model
    error of a phase energy) is fitted apart and raises nothing."""
    import dataclasses

    from ase.calculators.emt import EMT
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import (
        warn_about_stress_offset,
        warn_if_stresses_disagree_with_energies,
    )

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "cu_pbesol.extxyz"))
    base = {}
    for k, frame in enumerate(frames):
        atoms = frame.atoms.copy()
        atoms.calc = EMT()
        base[k] = {"energy": atoms.get_potential_energy(), "stress": atoms.get_stress(voigt=False)}
    assert warn_if_stresses_disagree_with_energies(frames, base) is None
    pulay = [dataclasses.replace(f, stress=f.stress - 3 * GPa * np.eye(3)) for f in frames]
    message = warn_if_stresses_disagree_with_energies(pulay, base)
    assert message.startswith("Cu4: the DFT stresses of the 44 frames (") and "cu_pbesol.extxyz" in message
    gap = float(re.search(r"(\d+\.\d) GPa apart", message).group(1))
    assert 2.5 <= gap <= 3.5
    assert "Pulay stress" in message and "--stress-weight 0" in message
    assert warn_about_stress_offset(pulay, base) is None  # 3 GPa: far below the offset check's 32

    stretched = np.diag([1.0, 1.0, 1.3])
    phase = []
    for frame in frames:
        atoms = frame.atoms.copy()
        atoms.set_cell(atoms.cell.array @ stretched, scale_atoms=True)
        phase.append(
            dataclasses.replace(frame, atoms=atoms, energy=frame.energy + 0.8, source=frame.source + "'")
        )
    both = frames + phase
    both_base = {**base, **{len(frames) + k: p for k, p in base.items()}}
    assert warn_if_stresses_disagree_with_energies(both, both_base) is None
    label_checks = sys.modules["ase_sparsecalc.finetune.label_checks"]
    with pytest.MonkeyPatch.context() as patch:  # one curve through both phases would be named
        patch.setattr(label_checks, "CELL_SHAPE_TOLERANCE", 10.0)
        assert "88 frames" in warn_if_stresses_disagree_with_energies(both, both_base)


def test_a_pulay_stress_shows_against_a_base_model_half_as_stiff_as_the_dft():
    """Labels twice as stiff as the base (EMT; as SevenNet-0 against PBE bcc Fe, 92 against 183
    GPa): the energy difference curves with volume, and the pressure difference follows it
    (consistent labels), so nothing is said; 3 GPa more in every stress is named with its size,
    although the curvature alone spreads a straight-line fit of the energies by several GPa."""
    import dataclasses

    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import warn_if_stresses_disagree_with_energies

    extra_modulus, reference_volume = 140 * GPa, 3.6**3
    frames, base = [], {}
    for k, scale in enumerate(np.linspace(0.965, 1.035, 8)):
        atoms = bulk("Cu", "fcc", a=3.6 * scale, cubic=True)
        atoms.rattle(0.01 * (k % 2), seed=k)
        atoms.calc = EMT()
        base[k] = {"energy": atoms.get_potential_energy(), "stress": atoms.get_stress(voigt=False)}
        frame = frame_from_atoms(atoms, f"eos.xyz:frame {k}")
        strain = (atoms.get_volume() - reference_volume) / reference_volume
        frames.append(
            dataclasses.replace(
                frame,
                energy=frame.energy + 0.5 * extra_modulus * reference_volume * strain**2,
                stress=frame.stress + extra_modulus * strain * np.eye(3),
            )
        )
    assert warn_if_stresses_disagree_with_energies(frames, base) is None
    pulay = [dataclasses.replace(f, stress=f.stress - 3 * GPa * np.eye(3)) for f in frames]
    message = warn_if_stresses_disagree_with_energies(pulay, base)
    assert message is not None and message.startswith("Cu4: the DFT stresses of the 8 frames (eos.xyz)")
    assert 2.8 <= float(re.search(r"(\d+\.\d) GPa apart", message).group(1)) <= 3.2


def test_a_slab_stress_across_the_vacuum_must_follow_from_its_forces():
    """A Cu(111) slab with 12 Å of vacuum, rattled: EMT's stress normal to the vacuum is what its
    forces give (σ n = -Σ F h / V), wherever the slab sits in the cell (across the boundary too)
    and whichever axis is open, so nothing is said; an isotropic 0.5 GPa added to every stress
    (a slab's Pulay stress) is named with its size. Bulk frames are left to the other checks."""
    import dataclasses

    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import warn_if_slab_stresses_disagree_with_forces

    frames = []
    for k in range(4):
        slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0, periodic=True)
        slab.rattle(0.05, seed=k)
        if k % 2:  # the slab straddles the cell's boundary
            slab.positions[:, 2] += 0.5 * slab.cell[2, 2]
            slab.wrap()
        if k == 3:  # the vacuum along x instead
            slab.set_cell(slab.cell.array[[2, 0, 1]][:, [2, 0, 1]])
            slab.positions = slab.positions[:, [2, 0, 1]]
        slab.calc = EMT()
        slab.get_forces(), slab.get_stress()
        frames.append(frame_from_atoms(slab, f"slab.xyz:frame {k}"))
    assert warn_if_slab_stresses_disagree_with_forces(frames) is None
    pulay = [dataclasses.replace(f, stress=f.stress + 0.5 * GPa * np.eye(3)) for f in frames]
    message = warn_if_slab_stresses_disagree_with_forces(pulay)
    assert message is not None and message.startswith("the DFT stresses of the 4 frames (slab.xyz)")
    assert "+0.50 GPa more there" in message and "--stress-weight 0" in message
    bulk_cu = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "cu_pbesol.extxyz"))
    off = [dataclasses.replace(f, stress=f.stress + 0.5 * GPa * np.eye(3)) for f in bulk_cu]
    assert warn_if_slab_stresses_disagree_with_forces(off) is None


def test_an_equation_of_state_the_base_model_does_not_follow_is_not_taken_for_a_unit_error():
    """Seven volumes of fcc Cu within 3 %: the energies beyond composition span a few meV, and a
    base model whose minimum lies elsewhere (EMT, labels 3 GPa off it in pressure) does not
    follow them, so their least-squares ratio means nothing and no unit warning is given; the
    same energies in Hartree, against a base that follows them, are still named."""
    import dataclasses

    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.units import GPa, Hartree

    from ase_sparsecalc.finetune.label_checks import label_slopes, warn_about_label_scales

    frames, base = [], {}
    for k, scale in enumerate(np.linspace(0.99, 1.01, 7)):
        atoms = bulk("Cu", "fcc", a=3.6 * scale, cubic=True)
        atoms.calc = EMT()
        base[k] = {"energy": atoms.get_potential_energy(), "stress": atoms.get_stress(voigt=False)}
        frame = frame_from_atoms(atoms, f"eos.xyz:frame {k}", require_forces=False)
        volume_change = atoms.get_volume() - 3.6**3
        frames.append(dataclasses.replace(frame, energy=frame.energy - 3 * GPa * volume_change))
    slopes = label_slopes(frames, base)
    assert "energy" not in slopes
    assert warn_about_label_scales(slopes, "eos.xyz") == []
    follows = {k: {"energy": f.energy} for k, f in enumerate(frames)}
    in_hartree = [dataclasses.replace(f, energy=f.energy / Hartree) for f in frames]
    assert label_slopes(in_hartree, follows)["energy"] == pytest.approx(1 / Hartree)


def test_a_consistent_shear_stress_under_uniaxial_strains_is_not_taken_for_pulay_stress():
    """An elastic-constant series strains one axis: the energy then changes with the zz stress,
    not the pressure. Labels that differ from a conservative base (EMT) by a shear stress and its
    work (consistent, P = -dE/dV and more) raise nothing; an isotropic 3 GPa on top is named."""
    import dataclasses

    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import _strain, warn_if_stresses_disagree_with_energies

    shear = np.diag([-2.0, -2.0, 4.0]) * GPa
    frames, base = [], {}
    for k, strain in enumerate(np.linspace(-0.03, 0.03, 7)):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.set_cell(atoms.cell.array @ np.diag([1.0, 1.0, 1.0 + strain]), scale_atoms=True)
        atoms.rattle(0.02, seed=k)
        atoms.calc = EMT()
        base[k] = {"energy": atoms.get_potential_energy(), "stress": atoms.get_stress(voigt=False)}
        frame = frame_from_atoms(atoms, f"elastic.xyz:frame {k}")
        frames.append(dataclasses.replace(frame, stress=base[k]["stress"] + shear))
    reference = frames[3]  # unstrained
    frames = [
        dataclasses.replace(
            f, energy=f.energy + reference.atoms.get_volume() * np.sum(shear * _strain(reference, f))
        )
        for f in frames
    ]
    assert warn_if_stresses_disagree_with_energies(frames, base) is None
    pulay = [dataclasses.replace(f, stress=f.stress - 3 * GPa * np.eye(3)) for f in frames]
    message = warn_if_stresses_disagree_with_energies(pulay, base)
    assert message is not None and message.startswith("Cu4: the DFT stresses of the 7 frames (elastic.xyz)")


def test_shear_stresses_in_vasp_voigt_order_or_of_the_wrong_sign_are_recognised():
    """Six-number stresses in VASP's order (xx yy zz xy yz zx) read as ASE's keep the diagonal (the
    slope test passes) but misplace the shear, and so do shear components of the wrong sign: named,
    against SevenNet-0's real predictions; the same DFT stresses as given raise nothing."""
    pytest.importorskip("sevenn")
    from ase_sparsecalc.finetune.label_checks import label_slopes, warn_if_shear_order_differs

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:12"))
    calc = SparseCalc("sevennet-0")
    model = {}
    for k, frame in enumerate(frames):
        atoms = frame.atoms.copy()
        atoms.calc = calc
        model[k] = {"stress": atoms.get_stress(voigt=False), "energy": atoms.get_potential_energy()}
    assert warn_if_shear_order_differs(frames, model) is None

    def vasp_order(stress):  # xx yy zz xy yz zx
        return stress[[0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]]

    mixed = [Frame(f.atoms, f.energy, f.forces, vasp_order(f.stress), f.source) for f in frames]
    message = warn_if_shear_order_differs(mixed, model)
    assert message is not None and "with the order xy yz xz (VASP's order: xy yz zx)" in message
    assert "si_pbesol.extxyz" in message
    assert label_slopes(mixed, model)["stress"] == pytest.approx(
        label_slopes(frames, model)["stress"], rel=0.3
    )
    flipped = [Frame(f.atoms, f.energy, f.forces, f.stress * (2 * np.eye(3) - 1), f.source) for f in frames]
    message = warn_if_shear_order_differs(flipped, model)
    assert message is not None and "with the opposite sign" in message
    assert warn_if_shear_order_differs(frames[:5], {k: model[k] for k in range(5)}) is None  # too few
    # without shear in the base model's stresses, there is nothing to judge
    no_shear = {k: {"stress": np.diag(np.diag(p["stress"]))} for k, p in model.items()}
    assert warn_if_shear_order_differs(mixed, no_shear) is None


def test_per_atom_energies_in_a_set_of_mixed_sizes_are_recognised():
    from ase_sparsecalc.finetune.label_checks import warn_about_stray_energies

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:8"))
    mixed = []
    for k, f in enumerate(frames):  # supercells of 8, 16 and 32 atoms: same energy per atom
        n = (1, 2, 4)[k % 3]
        big = f.atoms.repeat((n, 1, 1))
        mixed.append(Frame(big, n * f.energy, np.tile(f.forces, (n, 1)), None, f"si.xyz:frame {k}"))
    rng = np.random.default_rng(1)
    model = {
        k: {"energy": f.energy + 0.3 * len(f.atoms) + 0.02 * rng.standard_normal()}
        for k, f in enumerate(mixed)
    }
    assert warn_about_stray_energies(mixed, model) is None
    per_atom = [Frame(f.atoms, f.energy / len(f.atoms), f.forces, None, f.source) for f in mixed]
    message = warn_about_stray_energies(per_atom, model)
    assert message.startswith("the DFT energies of the 8 frames (si.xyz) look like energies per atom")


def test_runs_too_short_for_the_density_schedule_are_warned_about(mace_model_path, monkeypatch):
    # the too-few-steps warning names the cause of a worse fit; the labels are not blamed besides
    finetune_module = sys.modules["ase_sparsecalc.finetune"]
    checked_for_traded_forces = []
    monkeypatch.setattr(
        finetune_module, "_warn_if_forces_were_traded", lambda *a: checked_for_traded_forces.append(a)
    )
    frames = [frame_from_atoms(a, f"water.xyz:frame {k}") for k, a in enumerate(water_frames(4))]
    options = {"epochs": 2, "valid_fraction": 0.0, "seed": 0}
    sparse = finetune_with_report(mace_model_path, frames, method="sparse", **options)
    warnings = sparse.report["data_checks"]["warnings"]
    assert any("this run has 8 optimizer step(s)" in w for w in warnings)
    assert not checked_for_traded_forces
    full = finetune_with_report(mace_model_path, frames, method="full", **options)
    assert not any("optimizer step(s)" in w for w in full.report["data_checks"]["warnings"])
    assert len(checked_for_traded_forces) == 1


def test_finetune_warns_about_units_and_single_stoichiometry(mace_model_path, tmp_path, caplog):
    """Forces in Hartree/Bohr are flagged before training, and so are shifts that one
    stoichiometry cannot fix; the report keeps both."""
    images = []
    for k, atoms in enumerate(water_frames(6)):
        base = SparseCalc(mace_model_path)
        atoms = atoms.copy()
        atoms.calc = base
        forces, energy = atoms.get_forces() / 51.422, atoms.get_potential_energy() - 0.01 * k
        images.append(labelled(atoms, energy=energy, forces=forces))
    write(tmp_path / "hartree.extxyz", images)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(mace_model_path, str(tmp_path / "hartree.extxyz"), method="shift")
    assert "hartree.extxyz: the DFT forces are 0.0194 times" in caplog.text
    assert "1 independent composition(s) for 2 elements (H, O)" in caplog.text
    checks = result.report["data_checks"]
    assert checks["label_slopes"]["forces"] == pytest.approx(1 / 51.422, rel=1e-6)
    assert len(checks["warnings"]) == 2


def test_energies_per_atom_of_two_atom_cells_are_flagged(mace_model_path, tmp_path, caplog):
    """Primitive Si cells labelled with the base model's own forces and its energies per atom:
    the energy slope (0.5) lies inside the plausible range, the force slope (1) gives it away;
    the same frames with total energies pass. A validation file gets the same checks."""
    base = SparseCalc(mace_model_path)
    totals, per_atom = [], []
    for k in range(6):
        atoms = bulk("Si", "diamond", a=5.3 + 0.04 * k)
        atoms.rattle(0.05, seed=k)
        atoms.calc = base
        forces, energy = atoms.get_forces(), atoms.get_potential_energy()
        totals.append(labelled(atoms, energy=energy, forces=forces))
        per_atom.append(labelled(atoms, energy=energy / 2, forces=forces))
    message = "all of 2 atoms, follow the base model's with a slope of 0.5"
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, totals, method="shift", valid_fraction=0.0)
    assert "energies per atom" not in caplog.text
    # labels that are the base model's own outputs are named as such
    assert "training forces equal the base model's to" in caplog.text
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(mace_model_path, per_atom, method="shift", valid_fraction=0.0)
    assert any(message in w for w in result.report["data_checks"]["warnings"])
    write(tmp_path / "valid.extxyz", per_atom[4:])
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, totals[:4], valid=tmp_path / "valid.extxyz", method="shift")
    assert "valid.extxyz:frame" in caplog.text  # its energies stray beyond what shifts explain


def test_forces_that_vanish_by_symmetry_are_not_taken_for_the_base_models(mace_model_path, caplog):
    """An equation of state of perfect crystals: the DFT forces are zero by symmetry, as are the
    base model's, yet the labels are DFT. No warning that they are the model's own predictions;
    the same cells rattled and labelled with the model's forces do get it."""
    base = SparseCalc(mace_model_path)
    eos, echoed = [], []
    for k in range(5):
        atoms = bulk("Si", "diamond", a=5.30 + 0.05 * k, cubic=True)
        atoms.calc = base
        energy = atoms.get_potential_energy() + 0.02 * k**2
        eos.append(labelled(atoms, energy=energy, forces=np.zeros((8, 3))))
        atoms = atoms.copy()
        atoms.rattle(0.05, seed=k)
        atoms.calc = base
        echoed.append(labelled(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces()))
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, eos, method="shift", valid_fraction=0.0)
    assert "look like the base model's own predictions" not in caplog.text
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, echoed, method="shift", valid_fraction=0.0)
    assert "look like the base model's own predictions" in caplog.text


def test_reference_labels_left_unread_are_pointed_out(mace_model_path, tmp_path, caplog):
    """An extxyz written after a model ran on DFT data: the model's values under energy/forces,
    the DFT's under REF_energy/REF_forces. Read by default, the run says so; with the keys, not."""
    frames = []
    for atoms in water_frames(4):
        atoms.info["REF_energy"] = atoms.get_potential_energy() - 0.3
        atoms.arrays["REF_forces"] = atoms.get_forces() * 1.1
        frames.append(atoms)
    write(tmp_path / "evaluated.extxyz", frames)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(mace_model_path, tmp_path / "evaluated.extxyz", method="shift")
    assert "also carry REF_energy, REF_forces" in caplog.text and "--energy-key" in caplog.text
    assert "look like the base model's own predictions" not in caplog.text  # these are not its
    assert any("REF_energy" in w for w in result.report["data_checks"]["warnings"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, tmp_path / "evaluated.extxyz", method="shift",
                             energy_key="REF_energy", forces_key="REF_forces")  # fmt: skip
    assert "also carry" not in caplog.text


def test_isolated_atom_energies_count_towards_fixing_the_shifts():
    """Water and silicon fix δ_Si and 2δ_H + δ_O; an isolated H atom fixes the rest. The warning
    asks for isolated-atom energies only while some combination stays free."""
    from ase_sparsecalc.finetune.label_checks import warn_if_shifts_underdetermined

    silicon = labelled(bulk("Si", "diamond", a=5.43), forces=np.zeros((2, 3)))
    frames = [frame_from_atoms(a, f"f{k}") for k, a in enumerate([*water_frames(2), silicon])]
    assert warn_if_shifts_underdetermined(frames, {"H": -13.6}) is None
    assert warn_if_shifts_underdetermined(frames, {"H": -13.6, "O": -2042.0, "Si": -4.0}) is None
    for isolated in (None, {"Si": -4.0}):
        message = warn_if_shifts_underdetermined(frames, isolated)
        assert "2 independent composition(s) for 3 elements (H, O, Si)" in message
    assert "and the isolated-atom energies of Si:" in message


def test_a_split_that_leaves_no_validation_frames_is_warned_about(mace_model_path, caplog):
    """Water and methane: each composition is needed in training, so the random split keeps
    both there and epochs are chosen on the training loss; the user is told. Not when none
    were asked for, nor for energy shifts, which have no epochs to choose."""
    frames = [labelled(molecule("H2O"), energy=-14.0), labelled(molecule("CH4"), energy=-24.0)]
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        result = finetune_with_report(mace_model_path, frames, method="full", epochs=1, valid_fraction=0.5)
    assert "no validation frames (too few frames to hold any out, or every frame's composition" in caplog.text
    assert result.report["data"]["valid_frames"] == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        finetune_with_report(mace_model_path, frames, method="full", epochs=1, valid_fraction=0.0)
        finetune_with_report(mace_model_path, frames, method="shift", valid_fraction=0.5)
    assert "no validation frames" not in caplog.text  # asked for none; nothing to choose


def test_mixed_free_energies_and_energies_are_flagged(mace_model_path, tmp_path, caplog):
    """One file with free energies (VASP-like: free_energy and energy) and one with energies
    only: warned about, naming a frame of each; one key read everywhere: no warning."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from ase_sparsecalc.finetune.label_checks import warn_if_energy_labels_mixed

    smeared, plain = water_frames(4)[:2], water_frames(4)[2:]
    for atoms in smeared:
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0, free_energy=-14.01, forces=atoms.get_forces())
    write(tmp_path / "vasp.extxyz", smeared)
    write(tmp_path / "other.extxyz", plain)
    files = [str(tmp_path / "vasp.extxyz"), str(tmp_path / "other.extxyz")]
    frames = read_frames(files)
    assert [f.energy_label for f in frames] == ["free_energy", "free_energy", "energy", "energy"]
    assert frames[0].energy == -14.01
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        message = warn_if_energy_labels_mixed(frames)
    assert message is not None and "vasp.extxyz:frame 0" in message and "other.extxyz:frame 0" in message
    assert "--energy-key" in caplog.text
    assert warn_if_energy_labels_mixed(read_frames(files, energy_key="energy")) is None
    assert warn_if_energy_labels_mixed(read_frames(files[1:])) is None
    assert "with elements in common (H, O)" in message
    # a molecule set without smearing beside a metal's free energies: no element meets both kinds
    copper = bulk("Cu", "fcc", a=3.6)
    copper.calc = SinglePointCalculator(copper, energy=-3.70, free_energy=-3.71, forces=np.zeros((1, 3)))
    write(tmp_path / "metal.extxyz", copper)
    assert warn_if_energy_labels_mixed(read_frames([str(tmp_path / "metal.extxyz"), files[1]])) is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):  # evaluation reads labels alike
        assert main(["eval", *files, "--base", mace_model_path, "--json"]) == 0
    assert "have free energies (free_energy, e.g. " in caplog.text


def test_isolated_atom_file_reads_like_the_training_data(tmp_path):
    """The isolated-atom file honours the energy key, refuses two energies of one element, and
    a dict takes symbols or atomic numbers only."""
    from ase_sparsecalc.errors import DataFileError
    from ase_sparsecalc.finetune.dataset import read_isolated_atom_energies

    atoms = []
    for symbol, energy in (("H", -13.6), ("O", -432.0), ("H", -13.6)):
        single = Atoms(symbol, positions=[[0, 0, 0]])
        single.info["REF_energy"] = energy
        atoms.append(single)
    write(tmp_path / "e0s.xyz", atoms, format="extxyz")
    energies = read_isolated_atom_energies(tmp_path / "e0s.xyz", energy_key="REF_energy")
    assert energies == {"H": -13.6, "O": -432.0}
    atoms[2].info["REF_energy"] = -12.0
    write(tmp_path / "e0s.xyz", atoms, format="extxyz")
    with pytest.raises(DataFileError, match=r"e0s\.xyz:frame 2: isolated H atom at -12\.000000 eV"):
        read_isolated_atom_energies(tmp_path / "e0s.xyz", energy_key="REF_energy")
    plain = [Atoms(a.get_chemical_symbols(), positions=[[0, 0, 0]]) for a in atoms[:2]]
    for single, energy in zip(plain, (-13.5, -431.0), strict=True):
        single.calc = SinglePointCalculator(single, energy=energy)
    write(tmp_path / "plain.xyz", plain, format="extxyz")
    # the training data's key is tried first; a file written with the code's own labels falls back
    assert read_isolated_atom_energies(tmp_path / "plain.xyz", energy_key="REF_energy") == {
        "H": -13.5,
        "O": -431.0,
    }
    write(tmp_path / "unlabelled.xyz", [Atoms("H", positions=[[0, 0, 0]])], format="extxyz")
    with pytest.raises(
        MissingLabelError, match=r"unlabelled\.xyz:frame 0: no energy \(looked for REF_energy\)"
    ):
        read_isolated_atom_energies(tmp_path / "unlabelled.xyz", energy_key="REF_energy")
    assert read_isolated_atom_energies({1: -13.6, "O": -432.0}) == {"H": -13.6, "O": -432.0}
    assert read_isolated_atom_energies({"1": -13.6, "8": -432.0}) == {"H": -13.6, "O": -432.0}  # JSON keys
    with pytest.raises(ConfigError, match="'h' is not an element symbol"):
        read_isolated_atom_energies({"h": -13.6})


def test_dataset_hash_covers_every_label():
    """Resuming checks the data by this hash: stress labels and tags change it."""
    from ase_sparsecalc.finetune.dataset import dataset_summary

    frames = read_frames(str(Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz@:3"))
    reference = dataset_summary(frames)["sha256"]
    no_stress = [Frame(f.atoms, f.energy, f.forces, None, f.source) for f in frames]
    tagged = [Frame(f.atoms, f.energy, f.forces, f.stress, f.source, "bulk") for f in frames]
    assert len({reference, dataset_summary(no_stress)["sha256"], dataset_summary(tagged)["sha256"]}) == 3
    assert dataset_summary(list(frames))["sha256"] == reference


def test_frames_without_forces_train_on_request(mace_model_path, tmp_path):
    """Energy-only single points are refused by name unless allowed; then they train on their
    energies beside frames with forces, and the report counts the force components that exist."""
    frames = water_frames(6)
    for atoms in frames[3:]:
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    write(tmp_path / "mixed.extxyz", frames)
    with pytest.raises(MissingLabelError, match=r"mixed\.extxyz:frame 3: no forces"):
        finetune(mace_model_path, str(tmp_path / "mixed.extxyz"), **FAST)
    result = finetune_with_report(
        mace_model_path,
        str(tmp_path / "mixed.extxyz"),
        allow_missing_forces=True,
        report_dir=tmp_path / "r",
        **FAST,
    )
    assert result.report["data"]["frames"] == 6
    assert np.isfinite(result.report["after"]["train"]["forces_mae"])
    assert (tmp_path / "r" / "parity.png").is_file()


def test_finetune_options_are_checked_by_name_and_leave_the_callers_random_state(mace_model_path):
    """A misspelt option is named with the field it probably meant; a config given together with
    options (which it would ignore) is refused; a run leaves torch's global random state as it
    found it."""
    frames = water_frames(4)
    with pytest.raises(ConfigError, match=r"unknown fine-tuning option\(s\): epoch \(did you mean epochs"):
        finetune(mace_model_path, frames, epoch=3)
    with pytest.raises(ConfigError, match="give either config= or options"):
        finetune_with_report(mace_model_path, frames, config=FinetuneConfig(method="shift"), epochs=3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    finetune(mace_model_path, frames, method="shift", valid_fraction=0.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_fit_that_trades_forces_for_stresses_is_named(caplog):
    """Training that lowers the stress error but raises the force error on its own frames (as a
    Pulay stress in some frames makes it) is reported with both changes; a fit that improves
    the forces, or a shift-only run, is not."""
    from ase_sparsecalc.finetune import _warn_if_forces_were_traded

    before = {"forces_mae": 99.5, "energy_mae": 8.4, "stress_mae": 1.11}
    worse = {"forces_mae": 101.2, "energy_mae": 1.8, "stress_mae": 0.76}
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        message = _warn_if_forces_were_traded(before, worse, FinetuneConfig())
    assert message.startswith("training made the force error on its own frames worse (99.5 -> 101 meV/Å)")
    assert "energy 8.4 -> 1.8 meV/atom, stress 1.11 -> 0.76 GPa" in message
    assert "--stress-weight" in caplog.text
    better = {**worse, "forces_mae": 60.0}
    assert _warn_if_forces_were_traded(before, better, FinetuneConfig()) is None
    assert _warn_if_forces_were_traded(before, worse, FinetuneConfig(method="shift")) is None


def test_a_part_of_the_errors_that_grew_is_named_though_the_total_fell(caplog):
    """The validation errors of a MoS2 monolayer fine-tune (20 epochs, 3 %): the stress error
    fell from 0.20 to 0.08 GPa while its xy component grew tenfold. That component is named,
    with the element forces and config_types that grew; those that fell, a part weighed zero
    in the loss, a config_type with too few frames and a shift-only run are not."""
    from ase_sparsecalc.finetune import _warn_if_parts_got_worse

    def metrics(stress_mae, xy, mo_forces, bulk_energy, surface_frames=3):
        by_component = {"xx": 10 * stress_mae, "yy": 10 * stress_mae, "zz": 0.3, "yz": 0.03, "xz": 0.05}
        return {
            "frames": 9, "stress_frames": 6, "energy_mae": 3.9, "forces_mae": 130.0,
            "stress_mae": stress_mae, "stress_mae_by_component": {**by_component, "xy": xy},
            "forces_mae_by_element": {"Mo": mo_forces, "S": 80.7},
            "by_config_type": {
                "bulk": {"frames": 6, "energy_mae": bulk_energy, "forces_mae": 100.0},
                "surface": {"frames": surface_frames, "energy_mae": 1.0, "forces_mae": 100.0},
            },
        }  # fmt: skip

    before = metrics(stress_mae=0.201, xy=0.00386, mo_forces=227.7, bulk_energy=2.0)
    after = metrics(stress_mae=0.079, xy=0.0614, mo_forces=111.9, bulk_energy=2.0)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        message = _warn_if_parts_got_worse(before, after, "valid", FinetuneConfig())
    assert message.startswith("on the validation frames (9 frames, 6 with stresses) training made")
    assert message.count(" -> ") == 1 and "stress xy 0.00386 -> 0.0614 GPa" in message
    assert "stress xy" in caplog.text
    assert _warn_if_parts_got_worse(before, after, "valid", FinetuneConfig(stress_weight=0.0)) is None
    assert _warn_if_parts_got_worse(before, after, "valid", FinetuneConfig(method="shift")) is None

    after = metrics(stress_mae=0.3, xy=0.0039, mo_forces=290.0, bulk_energy=3.0)
    message = _warn_if_parts_got_worse(before, after, "train", FinetuneConfig())
    assert message.startswith("on the training frames")
    assert "force MAE on Mo 228 -> 290 meV/Å" in message
    assert "energy MAE of config_type bulk 2 -> 3 meV/atom" in message
    assert "stress MAE 0.201" not in message  # totals on the training frames have their own check
    assert "stress MAE 0.201 -> 0.3 GPa" in _warn_if_parts_got_worse(before, after, "valid", FinetuneConfig())

    before, after = (metrics(0.2, 0.004, 200.0, 1.0, surface_frames=2), metrics(0.2, 0.004, 200.0, 1.0, 2))
    after["by_config_type"]["surface"]["energy_mae"] = 9.0  # two frames: noise
    assert _warn_if_parts_got_worse(before, after, "valid", FinetuneConfig()) is None
