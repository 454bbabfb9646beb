"""MD, relaxation and phonon workflows, from Python and from the command line.

Reference results come from the backends' own ASE calculators (SevenNetCalculator,
MACECalculator) driven through ASE and phonopy directly, never from this package's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import read

from ase_sparsecalc import SparseCalc
from ase_sparsecalc.cli import main
from ase_sparsecalc.cli.phonons_cmd import summary_lines
from ase_sparsecalc.errors import ConfigError, DataFileError, StructureError
from ase_sparsecalc.structure_io import read_structure
from ase_sparsecalc.testing import random_sparse_delta
from ase_sparsecalc.workflows import (
    frequencies_at,
    imaginary_modes,
    phonons,
    relax,
    run_md,
    special_point_frequencies,
    summarize_phonons,
)
from ase_sparsecalc.workflows.phonons import near_gamma, thermal_grid, write_phonon_files

MACE_ENV_WARNING = "ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD:UserWarning"

SI_A = 5.43  # Å, experimental lattice constant; a starting point, not a reference value
Q_GAMMA_X_L = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.5]]  # reduced, fcc primitive cell


@pytest.fixture(scope="module")
def sevennet64() -> SparseCalc:
    pytest.importorskip("sevenn")
    return SparseCalc("sevennet-0", default_dtype="float64")


@pytest.fixture
def strained_si() -> Atoms:
    """Primitive Si with a sheared, stretched cell and rattled atoms."""
    atoms = bulk("Si", "diamond", a=SI_A)
    strain = np.array([[0.02, 0.01, 0.0], [0.0, -0.01, 0.01], [0.0, 0.0, 0.015]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.03, seed=1)
    return atoms


def _primitive_si() -> Atoms:
    return bulk("Si", "diamond", a=SI_A)


def _mace_calculator(path: str, monkeypatch):
    # MACECalculator unpickles its model with weights_only off, through this variable that mace
    # sets on import and ase_sparsecalc removes again; give it back for this test only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=path, device="cpu", default_dtype="float64")


def _sevennet_calculator():
    from ase_sparsecalc.torch_setup import prepare_torch

    prepare_torch()
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator("7net-0", device="cpu")


def _phonopy_reference(atoms: Atoms, calc, supercell: int | list[int]) -> np.ndarray:
    """Force constants from phonopy's own API with forces from an ASE calculator, one by one.

    Every supercell is 3-D periodic here, a slab's included (its vacuum exceeds the cutoff).
    """
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=atoms.cell.array,
        scaled_positions=atoms.get_scaled_positions(),
    )
    ph = Phonopy(unit, supercell_matrix=np.diag(np.broadcast_to(supercell, 3)), primitive_matrix="auto")
    ph.generate_displacements(distance=0.01)
    forces = []
    for cell in ph.supercells_with_displacements:
        sc = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)
        sc.calc = calc
        forces.append(sc.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    return ph


# ---------------------------------------------------------------------------------------- MD
@pytest.mark.parametrize("kind", ["sevennet", "mace"])
def test_nve_conserves_energy_with_delta(kind, base_for):
    """Velocity Verlet at 1 fs on 8-atom Si at 600 K, with a random delta merged in: the total
    energy must stay flat. Bound: 0.5 meV/atom (k_B T / 100 at 600 K) over 100 fs, and
    fluctuations far below the kinetic energy."""
    calc = SparseCalc(base_for(kind), default_dtype="float64")
    atoms = bulk("Si", "diamond", a=SI_A, cubic=True)
    atoms.calc = calc
    bare_energy = atoms.get_potential_energy()
    calc.set_delta(random_sparse_delta(calc.backend, density=0.02, relative_scale=0.1, seed=1))
    assert abs(atoms.get_potential_energy() - bare_energy) > 1e-3  # the delta really acts

    result = run_md(atoms, calc, "nve", temperature_K=600, timestep_fs=1.0, steps=100, seed=5, progress=False)

    n = len(atoms)
    assert result.time_fs[-1] == pytest.approx(100.0)
    assert result.temperature[0] == pytest.approx(600.0, rel=1e-9)
    np.testing.assert_allclose(result.conserved_energy, result.total_energy)
    deviation = np.abs(result.total_energy - result.total_energy[0]).max() / n
    assert abs(result.drift_per_atom) < 5e-4
    assert deviation < 5e-4
    # energy moves between kinetic and potential, and the sum varies 50x less than the kinetic part
    assert np.std(result.kinetic_energy) > 50 * np.std(result.total_energy)
    assert np.std(result.total_energy) < 0.01 * np.mean(result.kinetic_energy)
    # zero total momentum throughout
    assert np.abs(result.atoms.get_momenta().sum(axis=0)).max() < 1e-8


def test_md_velocities_are_seeded(sevennet64):
    atoms = _primitive_si()
    a = run_md(atoms, sevennet64, "nvt", temperature_K=300, steps=3, seed=11, progress=False)
    b = run_md(atoms, sevennet64, "nvt", temperature_K=300, steps=3, seed=11, progress=False)
    c = run_md(atoms, sevennet64, "nvt", temperature_K=300, steps=3, seed=12, progress=False)
    np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
    assert np.abs(a.atoms.positions - c.atoms.positions).max() > 1e-6


@pytest.mark.parametrize("thermostat", ["langevin", "bussi"])
def test_md_keeps_fixed_atoms_fixed_and_counts_their_degrees_of_freedom(mace_model_path, thermostat):
    """A Cu(111) slab with its bottom two layers fixed: no centre-of-mass constraint drags them,
    and the temperature counts 3 per free atom (momentum is not conserved with pinned atoms)."""
    from ase import units
    from ase.build import fcc111
    from ase.constraints import FixAtoms

    from ase_sparsecalc.workflows.md import degrees_of_freedom, initialise_velocities

    slab = fcc111("Cu", size=(2, 2, 4), vacuum=6.0)
    fixed = [a.index for a in slab if a.tag >= 3]  # tags count layers from the top
    slab.set_constraint(FixAtoms(indices=fixed))
    n_free = len(slab) - len(fixed)
    assert degrees_of_freedom(slab) == 3 * n_free
    start = slab.copy()
    initialise_velocities(start, 600.0, np.random.default_rng(0), degrees_of_freedom(slab))
    assert 2 * start.get_kinetic_energy() / (3 * n_free * units.kB) == pytest.approx(600.0)
    assert np.abs(start.get_velocities()[fixed]).max() == 0.0
    calc = SparseCalc(mace_model_path, default_dtype="float64")
    result = run_md(slab, calc, "nvt", temperature_K=600, thermostat=thermostat, steps=5, progress=False)
    assert np.array_equal(result.atoms.positions[fixed], slab.positions[fixed])
    assert np.abs(result.atoms.get_velocities()[fixed]).max() == 0.0
    assert result.degrees_of_freedom == 3 * n_free


def test_md_rejects_unknown_ensemble(sevennet64):
    with pytest.raises(ValueError, match="ensemble must be one of"):
        run_md(_primitive_si(), sevennet64, "nph", steps=1, progress=False)


def test_md_rejects_a_trajectory_interval_of_zero(mace_model_path, tmp_path):
    calc = SparseCalc(mace_model_path)
    with pytest.raises(ConfigError, match="trajectory_interval must be positive, got 0"):
        run_md(_primitive_si(), calc, steps=1, trajectory=tmp_path / "a.traj", trajectory_interval=0)


def test_md_takes_the_earlier_option_names_with_a_warning(tmp_path):
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    renamed = "traj= is now trajectory= and traj_interval= is now trajectory_interval="
    with pytest.warns(FutureWarning, match=renamed):
        result = run_md(copper, EMT(), steps=4, traj=tmp_path / "a.traj", traj_interval=2, progress=False)
    assert result.files["trajectory"] == tmp_path / "a.traj" and len(read(tmp_path / "a.traj", ":")) == 3
    with pytest.raises(TypeError, match="unexpected keyword argument 'trajectroy'"):
        run_md(copper, EMT(), steps=1, trajectroy=tmp_path / "b.traj")


# ------------------------------------------------------------------------------------ relax
def test_relax_lattice_matches_sevennetcalculator(strained_si):
    """float32 (SevenNetCalculator runs float32 only): same relaxed cell to 1e-3 Å."""
    pytest.importorskip("sevenn")
    ours = relax(strained_si, SparseCalc("sevennet-0", default_dtype="float32"), fmax=1e-3, cell=True,
                 optimizer="BFGS", steps=200)  # fmt: skip
    ref = relax(strained_si, _sevennet_calculator(), fmax=1e-3, cell=True, optimizer="BFGS", steps=200)
    assert ours.converged and ref.converged
    np.testing.assert_allclose(ours.cellpar[:3], ref.cellpar[:3], atol=1e-3)
    np.testing.assert_allclose(ours.cellpar[3:], ref.cellpar[3:], atol=0.05)
    assert ours.energy == pytest.approx(ref.energy, abs=1e-4)
    # the relaxation did work: the strain is gone and diamond Si is fcc again
    assert np.ptp(ours.cellpar[:3]) < 2e-3 < np.ptp(strained_si.cell.cellpar()[:3])
    np.testing.assert_allclose(ours.cellpar[3:], 60.0, atol=0.05)
    assert ours.energy < ours.initial_energy
    assert ours.max_force < 1e-3
    assert np.abs(ours.stress_gpa).max() < 0.05
    assert ours.volume == pytest.approx(ours.atoms.get_volume())


@pytest.mark.filterwarnings(MACE_ENV_WARNING)
def test_relax_matches_macecalculator_float64(mace_model_path, strained_si, monkeypatch):
    ours = relax(strained_si, SparseCalc(mace_model_path, default_dtype="float64"), fmax=1e-3, cell=True,
                 optimizer="BFGS", steps=200)  # fmt: skip
    ref = relax(strained_si, _mace_calculator(mace_model_path, monkeypatch), fmax=1e-3, cell=True,
                optimizer="BFGS", steps=200)  # fmt: skip
    assert ours.converged and ref.converged
    np.testing.assert_allclose(ours.cellpar, ref.cellpar, atol=1e-5)
    np.testing.assert_allclose(ours.atoms.positions, ref.atoms.positions, atol=1e-5)
    assert ours.energy == pytest.approx(ref.energy, abs=1e-6)


def test_relax_slab_cell_in_plane_only(sevennet64):
    """A MoS2 monolayer (pbc=[T, T, F], vacuum along z) relaxes its in-plane lattice only.

    From 3.30 Å and from 3.10 Å it reaches the same lattice constant as ASE's
    FrechetCellFilter with the in-plane mask driving SevenNetCalculator, and the vacuum
    vector does not move.
    """
    from ase.build import mx2
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    pytest.importorskip("sevenn")
    results = [
        relax(mx2("MoS2", "2H", a=a, thickness=3.19, vacuum=7.5), sevennet64, fmax=1e-3, cell=True,
              optimizer="BFGS", steps=300)
        for a in (3.30, 3.10)
    ]  # fmt: skip
    ref = mx2("MoS2", "2H", a=3.30, thickness=3.19, vacuum=7.5)
    ref.calc = _sevennet_calculator()
    assert BFGS(FrechetCellFilter(ref, mask=[1, 1, 0, 0, 0, 1]), logfile=None).run(fmax=1e-3, steps=300)
    for result in results:
        assert result.converged
        assert result.atoms.pbc.tolist() == [True, True, False]
        np.testing.assert_array_equal(result.atoms.cell[2], [0.0, 0.0, 3.19 + 2 * 7.5])
        assert result.cellpar[0] == pytest.approx(ref.cell.cellpar()[0], abs=2e-3)
        assert result.cellpar[5] == pytest.approx(120.0, abs=0.01)
        in_plane = result.stress[[0, 1, 5]] * result.volume / len(result.atoms)  # eV per atom
        assert np.abs(in_plane).max() < 1e-3
    assert 3.10 < results[0].cellpar[0] < 3.30


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"pressure_GPa": 1.0}, "pressure and hydrostatic strain need a cell periodic in 3"),
        ({"hydrostatic": True}, "pressure and hydrostatic strain need a cell periodic in 3"),
        ({"tilt": True}, "must lie along the periodic axes"),
        ({"no_vacuum_vector": True}, "a periodic cell with a non-zero volume"),
    ],
)
def test_slab_cell_relaxation_refusals(sevennet64, change, problem):
    from ase.build import mx2

    slab = mx2("MoS2", "2H", a=3.19, thickness=3.19, vacuum=7.5)
    if change.pop("tilt", False):
        slab.rotate(20, "x", rotate_cell=True)
    if change.pop("no_vacuum_vector", False):
        slab.cell[2] = 0.0
    with pytest.raises(StructureError, match=problem):
        relax(slab, sevennet64, cell=True, **change)


def test_relax_fix_symmetry_keeps_a_saddle_point(sevennet64):
    """A linear carbon chain (a wire) with nearly equal bonds: free, it dimerises (the Peierls
    distortion towards polyyne, lower in energy); with ``fix_symmetry`` the bonds stay equal."""
    pytest.importorskip("sevenn")
    chain = Atoms("C2", positions=[[5, 5, 0], [5, 5, 1.283]], cell=[10, 10, 2.56], pbc=[False, False, True])

    def bonds(result):
        z, c = result.atoms.positions[:, 2], result.atoms.cell[2, 2]
        first = (z[1] - z[0]) % c
        return first, c - first

    free = relax(chain, sevennet64, fmax=1e-4, cell=True, optimizer="BFGS", steps=500)
    kept = relax(chain, sevennet64, fmax=1e-4, cell=True, optimizer="BFGS", steps=500, fix_symmetry=True,
                 symprec=0.01)  # fmt: skip
    assert free.converged and kept.converged
    assert abs(np.subtract(*bonds(kept))) < 1e-6
    assert abs(np.subtract(*bonds(free))) > 0.01
    assert free.energy < kept.energy


def test_relax_writes_trajectory_and_log(sevennet64, strained_si, tmp_path):
    traj, log = tmp_path / "opt.traj", tmp_path / "opt.log"
    result = relax(strained_si, sevennet64, fmax=0.05, optimizer="FIRE", trajectory=traj, logfile=log)
    frames = read(traj, index=":")
    assert len(frames) == result.steps + 1
    assert frames[-1].get_potential_energy() == pytest.approx(result.energy)
    assert "FIRE" in log.read_text()
    assert not list(tmp_path.glob(".*part"))


# ---------------------------------------------------------------------------------- phonons
@pytest.mark.filterwarnings(MACE_ENV_WARNING)
def test_phonons_match_phonopy_with_macecalculator(mace_model_path, monkeypatch):
    """Empty delta, float64: our batched phonons equal phonopy driven by MACECalculator."""
    atoms = _primitive_si()
    ours = phonons(atoms, SparseCalc(mace_model_path, default_dtype="float64"), supercell=2, mesh=(4, 4, 4),
                   symmetrize=False, subtract_residual_forces=False, band_npoints=11)  # fmt: skip
    ref = _phonopy_reference(atoms, _mace_calculator(mace_model_path, monkeypatch), supercell=2)
    np.testing.assert_allclose(ours.force_constants, ref.force_constants, atol=1e-7)
    np.testing.assert_allclose(
        frequencies_at(ours, Q_GAMMA_X_L), ref.run_qpoints(Q_GAMMA_X_L).frequencies, atol=1e-5
    )


def test_phonons_match_phonopy_with_sevennetcalculator():
    """Empty delta, float32 (SevenNetCalculator's precision): same force constants and frequencies.

    The three acoustic modes at Gamma are zero by translation symmetry; in float32 what is left is
    the square root of rounding noise in the dynamical matrix (a few 0.01 THz, either sign), so
    they are checked against zero, not against each other.
    """
    pytest.importorskip("sevenn")
    atoms = _primitive_si()
    ours = phonons(atoms, SparseCalc("sevennet-0", default_dtype="float32"), supercell=2, mesh=(4, 4, 4),
                   symmetrize=False, subtract_residual_forces=False, band_npoints=11)  # fmt: skip
    ref = _phonopy_reference(atoms, _sevennet_calculator(), supercell=2)
    np.testing.assert_allclose(ours.force_constants, ref.force_constants, atol=2e-3)  # eV/Å², of ~9
    ours_freq = frequencies_at(ours, Q_GAMMA_X_L)
    ref_freq = ref.run_qpoints(Q_GAMMA_X_L).frequencies
    # row 0 is Gamma
    assert np.abs(ours_freq[0, :3]).max() < 0.05
    assert np.abs(ref_freq[0, :3]).max() < 0.05
    np.testing.assert_allclose(ours_freq[0, 3:], ref_freq[0, 3:], atol=0.01)
    np.testing.assert_allclose(ours_freq[1:], ref_freq[1:], atol=0.01)


def test_phonons_of_a_monolayer(sevennet64):
    """MoS2 (pbc=[T, T, F]): an n x n x 1 supercell, a 2-D q-mesh and ASE's 2-D band path
    Γ-M-K-Γ; the force constants equal phonopy's own with every supercell made 3-D periodic
    (the vacuum is wider than the cutoff, so the open axis changes nothing but the bookkeeping)."""
    from ase.build import mx2

    pytest.importorskip("sevenn")
    layer = mx2("MoS2", "2H", a=3.19, thickness=3.13, vacuum=7.5)
    ours = phonons(layer, sevennet64, supercell=3, mesh=(6, 6, 6), symmetrize=False,
                   subtract_residual_forces=False, band_npoints=11)  # fmt: skip
    np.testing.assert_array_equal(ours.supercell_matrix, np.diag([3, 3, 1]))
    assert list(ours.mesh.mesh_numbers) == [6, 6, 1]
    assert list(special_point_frequencies(ours)) == ["Γ", "M", "K"]
    ref = _phonopy_reference(layer, sevennet64, supercell=[3, 3, 1])
    np.testing.assert_allclose(ours.force_constants, ref.force_constants, atol=1e-8)
    at_gamma = frequencies_at(ours, [[0.0, 0.0, 0.0]])[0]
    assert np.abs(at_gamma[:3]).max() < 0.05 < at_gamma[3:].min()  # 3 acoustic, 6 optical modes
    with pytest.raises(StructureError, match="must not repeat or mix that axis"):
        phonons(layer, sevennet64, supercell=(3, 3, 3))


def test_phonons_of_a_monolayer_with_its_vacuum_along_x(sevennet64, caplog):
    """The same MoS2 layer with its axes permuted (vacuum along x): phonopy's automatic primitive
    cell would swap the open axis with a periodic one, so the cell is used as given, with a
    warning, and Γ frequencies equal those of the layer with its vacuum along z."""
    from ase.build import mx2

    pytest.importorskip("sevenn")
    layer = mx2("MoS2", "2H", a=3.19, thickness=3.13, vacuum=7.5)
    order = [2, 0, 1]  # x <- z, y <- x, z <- y
    turned = Atoms(layer.numbers, positions=layer.positions[:, order],
                   cell=layer.cell.array[order][:, order], pbc=layer.pbc[order])  # fmt: skip
    options = dict(supercell=2, mesh=(4, 4, 4), subtract_residual_forces=False, band_npoints=3)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        ours = phonons(turned, sevennet64, **options)
    assert "mixes the open axes x with periodic ones" in caplog.text
    np.testing.assert_array_equal(ours.supercell_matrix, np.diag([1, 2, 2]))
    reference = phonons(layer, sevennet64, **options)
    np.testing.assert_allclose(
        frequencies_at(ours, [[0.0, 0.0, 0.0]]), frequencies_at(reference, [[0.0, 0.0, 0.0]]), atol=1e-6
    )


def test_phonons_acoustic_sum_rule_and_delta_effect(sevennet64):
    atoms = _primitive_si()
    raw = phonons(atoms, sevennet64, supercell=2, mesh=(4, 4, 4), symmetrize=False, band_npoints=11)
    sym = phonons(atoms, sevennet64, supercell=2, mesh=(4, 4, 4), band_npoints=11)
    gamma_raw = frequencies_at(raw, [[0, 0, 0]])[0]
    gamma_sym = frequencies_at(sym, [[0, 0, 0]])[0]
    assert np.abs(gamma_raw[:3]).max() < 0.1
    assert np.abs(gamma_sym[:3]).max() < 0.05
    assert gamma_sym[3] > 10.0  # the optical mode of Si is 15.5 THz in experiment
    assert not imaginary_modes(sym)

    try:
        sevennet64.set_delta(
            random_sparse_delta(sevennet64.backend, density=0.02, relative_scale=0.1, seed=3)
        )
        changed = phonons(atoms, sevennet64, supercell=2, mesh=(4, 4, 4), band_npoints=11)
    finally:
        sevennet64.set_delta(None)
    shift = np.abs(frequencies_at(changed, Q_GAMMA_X_L) - frequencies_at(sym, Q_GAMMA_X_L))
    assert shift.max() > 0.05  # THz


def test_imaginary_modes_are_reported_with_their_qpoint(mace_model_path):
    """The small random MACE model holds diamond Si together badly: modes go imaginary."""
    ph = phonons(_primitive_si(), SparseCalc(mace_model_path, default_dtype="float64"), supercell=2,
                 mesh=(4, 4, 4), band_npoints=11)  # fmt: skip
    modes = imaginary_modes(ph)
    assert modes
    lowest = modes[0]
    assert lowest.frequency < -0.05
    assert lowest.frequency == min(m.frequency for m in modes)
    recomputed = frequencies_at(ph, [lowest.qpoint])[0]
    assert recomputed[lowest.band_index] == pytest.approx(lowest.frequency, abs=1e-6)
    assert all(m.frequency < -0.05 for m in modes)
    # the command line names the special points with imaginary modes, and says that the thermal
    # properties leave them out
    summary = summarize_phonons(ph)
    at_points = summary.imaginary_points()
    for label, freqs in at_points.items():
        everything = summary.special_points[label]
        np.testing.assert_array_equal(freqs, everything[everything < -0.05])
    lines = "\n".join(summary_lines(summary, 1.0))
    assert "phonopy leaves the imaginary modes out of F, S and Cv" in lines
    if at_points:
        assert "imaginary at the special points: " + next(iter(at_points)) in lines


def _soften_on_site(phonon, stiffness: float):
    """``phonon`` with every atom's on-site force constant lowered by ``stiffness`` (eV/Å²), as a
    broken acoustic sum rule does: the acoustic modes at Γ go to sqrt(-stiffness / mass)."""
    band = phonon.band_structure
    mesh, path, labels, connections = (
        phonon.mesh.mesh_numbers, band.qpoints, band.labels, band.path_connections
    )  # fmt: skip
    constants = phonon.force_constants.copy()
    rows = phonon.primitive.p2s_map if constants.shape[0] != constants.shape[1] else range(len(constants))
    for row, atom in zip(range(len(constants)), rows, strict=False):
        constants[row, atom] -= stiffness * np.eye(3)
    phonon.force_constants = constants  # phonopy drops its mesh and band structure here
    phonon.run_mesh(mesh)
    phonon.run_band_structure(path, path_connections=connections, labels=labels)
    return phonon


def test_small_imaginary_acoustic_modes_near_gamma_are_told_from_an_instability():
    """Force constants whose acoustic modes at Γ go imaginary by 0.1 THz (a broken acoustic sum
    rule, the flexural branch of a 2-D layer) are reported as most likely noise, with the
    structure still dynamically stable; at 1.4 THz, or away from Γ, they are an instability."""
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.61)
    phonon = phonons(copper, EMT(), supercell=3, mesh=(6, 6, 6), band_npoints=11)
    assert not imaginary_modes(phonon)
    assert near_gamma(phonon, (0.3, 0.0, 0.0)) and near_gamma(phonon, (1.1, 0.0, -1.0))
    assert not near_gamma(phonon, (0.34, 0.0, 0.0)) and not near_gamma(phonon, (0.5, 0.5, 0.5))

    noise = summarize_phonons(_soften_on_site(phonon, 3e-3))  # Cu: 0.107 THz at Γ
    assert noise.imaginary and all(mode.acoustic_near_gamma for mode in noise.imaginary)
    assert all(mode.band_index < 3 and mode.qpoint == (0.0, 0.0, 0.0) for mode in noise.imaginary)
    assert noise.imaginary[0].frequency == pytest.approx(-0.107, abs=0.005)
    assert noise.dynamically_stable and not noise.unstable_modes()
    lines = "\n".join(summary_lines(noise, 1.0))
    assert "small imaginary frequencies on the acoustic branches near Γ only" in lines
    assert "IMAGINARY" not in lines and "dynamically unstable" not in lines

    unstable = summarize_phonons(_soften_on_site(phonon, 0.5))  # 1.4 THz more at Γ
    assert not unstable.dynamically_stable
    assert unstable.imaginary[0].frequency < -1.0 and not unstable.imaginary[0].acoustic_near_gamma
    lines = "\n".join(summary_lines(unstable, 1.0))
    assert "IMAGINARY modes" in lines and "dynamically unstable structure" in lines


def test_special_points_between_the_supercells_q_points_are_marked():
    """A 2x2x2 supercell of the fcc primitive cell holds Γ, X and L but not K, U or W; a 3x3x3
    one holds only Γ of these: the summary marks the others as interpolated."""
    from phonopy import Phonopy

    from ase_sparsecalc.workflows.phonons import sampled_by_supercell, to_phonopy_atoms

    unit = to_phonopy_atoms(_primitive_si())
    even, odd = (Phonopy(unit, supercell_matrix=np.eye(3, dtype=int) * n, log_level=0) for n in (2, 3))
    points = {"Γ": [0, 0, 0], "X": [0.5, 0, 0.5], "L": [0.5, 0.5, 0.5], "K": [0.375, 0.375, 0.75],
              "W": [0.5, 0.25, 0.75]}  # fmt: skip
    assert [name for name, q in points.items() if sampled_by_supercell(even, q)] == ["Γ", "X", "L"]
    assert [name for name, q in points.items() if sampled_by_supercell(odd, q)] == ["Γ"]
    assert sampled_by_supercell(odd, [1 / 3, 0, 2 / 3])


def test_phonon_summary_marks_interpolated_points(sevennet64):
    ph = phonons(_primitive_si(), sevennet64, supercell=2, mesh=(2, 2, 2), band_npoints=3)
    summary = summarize_phonons(ph)
    assert {"Γ", "X", "L"}.isdisjoint(summary.interpolated_points)
    assert "K" in summary.interpolated_points
    lines = summary_lines(summary, 1.0)
    assert any(line.strip().startswith("K*:") for line in lines)
    assert any(line.strip().startswith("X:") for line in lines)
    assert any("not a q-point of this supercell" in line for line in lines)
    # K = (3/8, 3/8, 3/4) of fcc: sampled by supercells of 8, 16, ... primitive cells per axis
    assert any("K: a multiple of 8 primitive cells along a, b and c" in line for line in lines)


def test_phonons_primitive_choice(sevennet64, caplog):
    """A conventional cell declared primitive gets the band path of its own (simple cubic) cell,
    whose X is (0, 1/2, 0) of that cell, not seekpath's fcc X read in the wrong basis; a
    centring the cell does not have is refused before any force is computed."""
    conventional = bulk("Si", "diamond", a=SI_A, cubic=True)
    kwargs = {"supercell": 1, "mesh": (2, 2, 2), "band_npoints": 3}
    assert len(phonons(conventional, sevennet64, primitive="auto", **kwargs).primitive) == 2
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        as_given = phonons(conventional, sevennet64, primitive=None, **kwargs)
    assert len(as_given.primitive) == 8
    assert "its primitive cell 2" in caplog.text
    points = special_point_frequencies(as_given)
    assert set(points) == {"Γ", "X", "M", "R"}
    np.testing.assert_allclose(points["X"], frequencies_at(as_given, [[0.0, 0.5, 0.0]])[0], atol=1e-6)
    with pytest.raises(ConfigError, match=r"Si2: phonopy cannot reduce this cell with primitive='F'"):
        phonons(_primitive_si(), sevennet64, primitive="F", **kwargs)


def test_phonon_supercells_must_be_whole_and_may_be_left_handed(sevennet64, tmp_path, capsys):
    """A fractional supercell is not truncated; a left-handed matrix (which phonopy cannot build)
    is the same lattice as its negative, and gives the same phonons."""
    si = _primitive_si()
    with pytest.raises(ConfigError, match=r"supercell must hold whole numbers; got \(2\.7, 2, 2\)"):
        phonons(si, sevennet64, supercell=(2.7, 2, 2))
    kwargs = {"mesh": (2, 2, 2), "band_npoints": 3}
    right = phonons(si, sevennet64, supercell=[[0, 1, 0], [1, 0, 0], [0, 0, -1]], **kwargs)
    left = phonons(si, sevennet64, supercell=[[0, 1, 0], [1, 0, 0], [0, 0, 1]], **kwargs)
    q = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5]]
    np.testing.assert_allclose(frequencies_at(left, q), frequencies_at(right, q), atol=1e-6)
    path = tmp_path / "si.extxyz"
    si.write(path)
    supercell = [str(n) for n in (0, 1, 0, 1, 0, 0, 0, 0, 2)]  # identity rows 1, 2 swapped: det -2
    argv = [
        "phonons",
        str(path),
        "--supercell",
        *supercell,
        "-o",
        str(tmp_path / "ph"),
        "--mesh",
        "2",
        "2",
        "2",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "ph").is_dir()


def test_phonons_of_a_left_handed_cell_are_those_of_the_same_lattice(sevennet64):
    """Two cell vectors swapped (a negative determinant) describe the same crystal; phonopy cannot
    reduce such a cell to its primitive one, so the lattice is handed to it negated."""
    si = _primitive_si()
    swapped = si.copy()
    swapped.set_cell(si.cell.array[[1, 0, 2]], scale_atoms=False)
    assert np.linalg.det(swapped.cell.array) < 0
    kwargs = {"supercell": 2, "mesh": (2, 2, 2), "band_npoints": 3}
    right, left = phonons(si, sevennet64, **kwargs), phonons(swapped, sevennet64, **kwargs)
    q = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.5]]
    np.testing.assert_allclose(frequencies_at(left, q), frequencies_at(right, q), atol=1e-4)
    assert np.linalg.det(swapped.cell.array) < 0  # the caller's structure is left as it was


def test_a_left_handed_monolayer_keeps_its_open_axis(sevennet64):
    """MoS2 with its in-plane vectors swapped (left-handed) and a left-handed supercell matrix:
    the vector negated to make them right-handed is a periodic one, so the open axis stays open
    and the phonons are the right-handed layer's."""
    from ase.build import mx2

    layer = mx2("MoS2", "2H", a=3.19, thickness=3.13, vacuum=7.5)
    swapped = layer.copy()
    swapped.set_cell(layer.cell.array[[1, 0, 2]], scale_atoms=False)
    assert np.linalg.det(swapped.cell.array) < 0 and not swapped.pbc[2]
    kwargs = {"mesh": (4, 4, 1), "band_npoints": 3, "symmetrize": False}
    right = phonons(layer, sevennet64, supercell=2, **kwargs)
    left = phonons(swapped, sevennet64, supercell=[[0, 2, 0], [2, 0, 0], [0, 0, 1]], **kwargs)
    np.testing.assert_array_equal(np.abs(left.supercell_matrix)[2], [0, 0, 1])
    gamma = [[0.0, 0.0, 0.0]]
    np.testing.assert_allclose(frequencies_at(left, gamma), frequencies_at(right, gamma), atol=1e-4)


def test_phonon_summary_temperature_lies_on_the_grid(sevennet64):
    """Thermal properties up to 15 K: the grid ends at 15 K, and a summary asked for 300 K
    reports 15 K with the values computed there."""
    assert thermal_grid(1000.0) == (0.0, 1000.0, 10.0)
    ph = phonons(_primitive_si(), sevennet64, supercell=1, mesh=(4, 4, 4), band_npoints=3,
                 temperatures=thermal_grid(15.0))  # fmt: skip
    assert list(ph.thermal_properties.temperatures) == [0.0, 7.5, 15.0]
    summary = summarize_phonons(ph, temperature_K=300.0)
    assert summary.temperature == 15.0
    assert summary.entropy == ph.thermal_properties.entropy[-1] > 0.0


def test_phonons_name_a_structure_a_hair_away_from_more_symmetry(sevennet64, caplog):
    """A cell sheared by 2e-4 (as a relaxation without FixSymmetry leaves it) has a lower space
    group at phonopy's symprec: the warning names the near group and the cost in supercells, and a
    larger symprec gives the diamond structure's single displacement."""
    distorted = _primitive_si()
    shear = np.eye(3)
    shear[0, 1] = 2e-4
    distorted.set_cell(distorted.cell.array @ shear, scale_atoms=True)
    kwargs = {"supercell": 1, "mesh": (2, 2, 2), "band_npoints": 3, "plot": False}
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        phonons(_primitive_si(), sevennet64, **kwargs)
    assert "lies within" not in caplog.text
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        tight = phonons(distorted, sevennet64, **kwargs)
    n_tight = len(tight.supercells_with_displacements)
    assert n_tight > 1
    assert f"within 0.01 Å of Fd-3m (48): {n_tight} displaced supercells instead of 1" in caplog.text
    assert "--fix-symmetry" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        loose = phonons(distorted, sevennet64, symprec=1e-3, **kwargs)
    assert len(loose.supercells_with_displacements) == 1
    assert "lies within" not in caplog.text


def test_band_path_without_seekpath(sevennet64, monkeypatch):
    """Without seekpath the band path comes from ASE; it must still pass through Γ and X."""
    monkeypatch.setitem(sys.modules, "seekpath", None)  # makes "import seekpath" fail
    ph = phonons(_primitive_si(), sevennet64, supercell=1, mesh=(4, 4, 4), band_npoints=5)
    points = special_point_frequencies(ph)
    assert {"Γ", "X", "L"} <= set(points)
    np.testing.assert_allclose(points["Γ"][:3], 0.0, atol=0.05)
    freqs_x = frequencies_at(ph, [[0.5, 0.0, 0.5]])[0]
    np.testing.assert_allclose(np.sort(points["X"]), freqs_x, atol=1e-6)


def test_phonons_write_files(sevennet64, tmp_path):
    import yaml

    ph = phonons(
        _primitive_si(), sevennet64, supercell=2, mesh=(4, 4, 4), band_npoints=11, output_dir=tmp_path
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"phonopy.yaml", "FORCE_CONSTANTS", "band.yaml", "total_dos.dat",
                     "thermal_properties.yaml", "phonons.png", "thermal_properties.png"}  # fmt: skip
    from phonopy import load
    from phonopy.file_IO import parse_FORCE_CONSTANTS

    reloaded = load(tmp_path / "phonopy.yaml", produce_fc=False, is_compact_fc=False)
    np.testing.assert_allclose(reloaded.force_constants, ph.force_constants, atol=1e-8)
    np.testing.assert_allclose(
        parse_FORCE_CONSTANTS(tmp_path / "FORCE_CONSTANTS"), ph.force_constants, atol=1e-6
    )
    thermal = yaml.safe_load((tmp_path / "thermal_properties.yaml").read_text())
    assert thermal["thermal_properties"][-1]["temperature"] == pytest.approx(1000.0)
    assert (tmp_path / "phonons.png").read_bytes()[:4] == b"\x89PNG"
    # a run without plots into the same folder leaves no plot of the earlier run behind
    write_phonon_files(ph, tmp_path, plot=False)
    assert not (tmp_path / "phonons.png").exists() and not (tmp_path / "thermal_properties.png").exists()


MGO_BORN = "14.400\n3.0 0 0 0 3.0 0 0 0 3.0\n2.0 0 0 0 2.0 0 0 0 2.0\n-2.0 0 0 0 -2.0 0 0 0 -2.0\n"
"""A phonopy BORN file for rock-salt MgO: ε∞ = 3 and Z* = ±2 e (DFT gives about 3.0 and 1.96)."""


def test_born_charges_split_lo_from_to_at_gamma_as_the_dipole_term_says(sevennet64, tmp_path):
    """Rock-salt MgO with Born charges from a BORN file: at Γ the TO pair keeps its frequency
    and the LO mode rises to ω_LO² = ω_TO² + Z*² e² / (ε₀ ε∞ Ω μ) (the long-range field of a
    cubic diatomic crystal; Ω the primitive volume, μ the reduced mass). Arrays give the same
    as the file, and phonopy.yaml keeps the charges."""
    from ase import units

    atoms = bulk("MgO", "rocksalt", a=4.21)
    options = {"supercell": 2, "mesh": (4, 4, 4), "band_npoints": 11, "plot": False}
    plain = special_point_frequencies(phonons(atoms, sevennet64, **options))["Γ"]
    (tmp_path / "BORN").write_text(MGO_BORN)
    with_born = phonons(atoms, sevennet64, born=tmp_path / "BORN", output_dir=tmp_path / "ph", **options)
    split = special_point_frequencies(with_born)["Γ"]
    assert np.ptp(plain[3:]) < 1e-6 and plain[3] > 5.0  # a triply degenerate optical mode without
    mu = 24.305 * 15.999 / (24.305 + 15.999) * units._amu
    dipole = (2.0 * units._e) ** 2 / (units._eps0 * 3.0 * atoms.get_volume() * 1e-30 * mu)  # rad²/s²
    lo = np.sqrt((2e12 * np.pi * plain[5]) ** 2 + dipole) / (2e12 * np.pi)
    np.testing.assert_allclose(split[3:], [plain[3], plain[4], lo], rtol=1e-4)
    assert lo > 1.5 * plain[5] and np.abs(split[:3]).max() < 1e-3
    np.testing.assert_allclose(
        frequencies_at(with_born, [[0, 0, 0]], q_direction=[1, 1, 0])[0], split, atol=1e-6
    )
    np.testing.assert_allclose(
        frequencies_at(with_born, [[0, 0, 0]])[0][3:], plain[3:], rtol=1e-4
    )  # TO alone
    arrays = {"born": [2.0 * np.eye(3), -2.0 * np.eye(3)], "dielectric": 3.0 * np.eye(3)}
    np.testing.assert_allclose(
        special_point_frequencies(phonons(atoms, sevennet64, born=arrays, **options))["Γ"], split, atol=1e-8
    )

    from phonopy import load

    reloaded = load(tmp_path / "ph" / "phonopy.yaml")
    np.testing.assert_allclose(reloaded.nac_params["born"], with_born.nac_params["born"], atol=1e-12)
    np.testing.assert_allclose(reloaded.nac_params["dielectric"], 3.0 * np.eye(3))


def test_born_charges_that_do_not_fit_are_refused_by_name(sevennet64, tmp_path, caplog):
    """A BORN file with a line missing, an ε∞ below 1, a slab, a missing file: clear errors
    naming the file or structure before any force is computed. Charges that do not sum to zero
    and a unit factor of another code are warned about."""
    from ase_sparsecalc.errors import DataError

    atoms = bulk("MgO", "rocksalt", a=4.21)
    options = {"supercell": 2, "mesh": (2, 2, 2), "band_npoints": 3, "plot": False}
    short = tmp_path / "BORN_short"
    short.write_text("\n".join(MGO_BORN.splitlines()[:3]) + "\n")
    expected = r"BORN_short: not a BORN file for this primitive cell .*each of the 2 symmetry-independent"
    with pytest.raises(DataError, match=expected + r" atom\(s\) of the 2-atom primitive cell"):
        phonons(atoms, sevennet64, born=short, **options)
    with pytest.raises(
        DataFileError, match=r"no_BORN: no such file \(Born charges: a ph.x output or a BORN file\)"
    ):
        phonons(atoms, sevennet64, born=tmp_path / "no_BORN", **options)
    with pytest.raises(DataError, match=r"eigenvalue 0\.5 below 1"):
        phonons(
            atoms, sevennet64, born={"born": np.zeros((2, 3, 3)), "dielectric": 0.5 * np.eye(3)}, **options
        )
    with pytest.raises(DataError, match=r"'born' has shape \(1, 3, 3\); the primitive cell has 2 atoms"):
        phonons(atoms, sevennet64, born={"born": np.eye(3)[None], "dielectric": np.eye(3)}, **options)
    slab = Atoms("MoS2", scaled_positions=[[0, 0, 0.5], [1 / 3, 2 / 3, 0.57], [1 / 3, 2 / 3, 0.43]],
                 cell=[[3.18, 0, 0], [-1.59, 2.754, 0], [0, 0, 20]], pbc=[True, True, False])  # fmt: skip
    with pytest.raises(ConfigError, match=r"Born charges .* are for 3-D crystals"):
        phonons(slab, sevennet64, born=tmp_path / "BORN", **options)
    (tmp_path / "BORN").write_text(MGO_BORN.replace("14.400", "2.0").replace("-2.0", "-1.5"))
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        ph = phonons(atoms, sevennet64, born=tmp_path / "BORN", **options)
    assert "its unit factor 2 is for another code's force constants" in caplog.text
    assert "sum to a tensor with entries up to 0.5 e; it should be zero" in caplog.text
    assert ph.nac_params["factor"] == pytest.approx(14.40, abs=0.01)


QE_DATA = Path(__file__).parent / "data"
"""GaAs with Quantum ESPRESSO 6.7, PBE, pslibrary PAW, 40/320 Ry, shifted 6x6x6 k-points,
a = 5.7397 Å: pw.x (``qe_gaas_scf.*``), ph.x at Γ with ``epsil`` (``qe_gaas_ph.*``) and
dynmat.x with the non-analytic term along x (``qe_gaas_dynmat.*``); ph.x on an unshifted
(Γ-centred) 6x6x6 mesh (``qe_gaas_ph_gamma_centred_k.out``)."""


def _dynmat_frequencies(path: Path) -> np.ndarray:
    """Frequencies (THz) of dynmat.x's mode table."""
    table = path.read_text().split("# mode   [cm-1]    [THz]      IR")[1].splitlines()[1:]
    return np.array(
        [float(line.split()[2]) for line in table if line.split()[:1] and line.split()[0].isdigit()]
    )


def test_born_charges_from_ph_x_give_the_lo_to_splitting_dynmat_x_gives(sevennet64):
    """The dielectric tensor and effective charges of a real ph.x run, read from its output,
    give the LO-TO splitting at Γ that QE's own dynmat.x gives from the same run: ω_LO² - ω_TO²
    depends on Z*, ε∞, the cell and the masses only, not on the short-range force constants
    (the model's TO mode differs from DFT's). The cell comes from the pw.x output; with its
    atoms listed As first, the charges follow their elements."""
    from ase.io import read

    gaas = read(QE_DATA / "qe_gaas_scf.out")
    options = {"supercell": 2, "mesh": (2, 2, 2), "band_npoints": 5, "plot": False}
    dft = _dynmat_frequencies(QE_DATA / "qe_gaas_dynmat.out")
    assert dft[5] > dft[3] + 0.5  # LO above TO
    for atoms in (gaas, gaas[[1, 0]]):
        ph = phonons(atoms, sevennet64, born=QE_DATA / "qe_gaas_ph.out", **options)
        assert ph.nac_params["dielectric"][0, 0] == pytest.approx(15.213220746)
        z = dict(zip(ph.primitive.symbols, ph.nac_params["born"][:, 0, 0], strict=True))
        assert z == pytest.approx({"Ga": 2.24962, "As": -2.25287})
        ours = special_point_frequencies(ph)["Γ"]
        assert ours[5] ** 2 - ours[4] ** 2 == pytest.approx(dft[5] ** 2 - dft[4] ** 2, rel=1e-3)


def test_ph_x_outputs_that_do_not_fit_are_refused_by_name(sevennet64, tmp_path, caplog):
    """A ph.x output for other elements than the structure's, and one cut off before its
    effective charges, are refused with the file named. The same GaAs run on a k-mesh through
    Γ (PBE puts GaAs's gap at 0.17 eV there, so linear response nearly diverges: ε∞ = 825, and
    charges that miss neutrality by 1.3 e) is warned about twice."""
    from ase.io import read

    from ase_sparsecalc.errors import DataError

    gaas = read(QE_DATA / "qe_gaas_scf.out")
    options = {"supercell": 1, "mesh": (2, 2, 2), "band_npoints": 3, "plot": False}
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        phonons(gaas, sevennet64, born=QE_DATA / "qe_gaas_ph_gamma_centred_k.out", **options)
        assert "a dielectric constant of 825.1 is that of a (near-)metal" in caplog.text
        assert "sum to a tensor with entries up to 1.3 e" in caplog.text
        caplog.clear()
        phonons(gaas, sevennet64, born=QE_DATA / "qe_gaas_ph.out", **options)
        assert "ph.out" not in caplog.text  # the converged run: no warning

    mgo = bulk("MgO", "rocksalt", a=4.21)
    with pytest.raises(
        DataError,
        match=r"qe_gaas_ph.out: ph.x's atoms are Ga, As; the primitive cell of the structure has Mg, O",
    ):
        phonons(mgo, sevennet64, born=QE_DATA / "qe_gaas_ph.out", **options)
    text = (QE_DATA / "qe_gaas_ph.out").read_text()
    cut = tmp_path / "ph_cut.out"
    cut.write_text(text[: text.index("Effective charges")])
    with pytest.raises(
        DataError, match=r"ph_cut.out: a ph.x output without the dielectric tensor or the effective charges"
    ):
        phonons(mgo, sevennet64, born=cut, **options)


# -------------------------------------------------------------------------------------- CLI
@pytest.fixture
def si_files(tmp_path):
    prim = tmp_path / "si.cif"
    _primitive_si().write(prim)
    conv = tmp_path / "si8.extxyz"
    bulk("Si", "diamond", a=SI_A, cubic=True).write(conv)
    return prim, conv


def test_cli_md(si_files, tmp_path, capsys):
    _, conv = si_files
    traj, log = tmp_path / "md.traj", tmp_path / "md.log"
    args = ["--ensemble", "nvt", "--temperature", "400", "--timestep", "1", "--steps", "4", "--seed", "1"]
    args += ["--traj", str(traj), "--traj-interval", "2", "--log", str(log), "--dtype", "float32"]
    rc = main(["md", str(conv), *args, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "NVT MD with Langevin: 4 steps" in out
    assert len(read(traj, index=":")) == 3
    table = np.loadtxt(log)
    assert table.shape == (5, 8)
    np.testing.assert_allclose(table[:, 0], [0, 1, 2, 3, 4])
    assert table[0, 5] == pytest.approx(400.0, abs=0.01)
    np.testing.assert_allclose(table[:, 3], table[:, 1] + table[:, 2], atol=2e-6)


def test_cli_md_continues_from_its_trajectory(si_files, tmp_path, capsys):
    """The last frame of a trajectory carries momenta: --keep-velocities starts from them (the
    first log line's kinetic energy is that frame's); without it the command says it draws new ones."""
    _, conv = si_files
    first = tmp_path / "first.traj"
    common = ["--dtype", "float32", "--no-progress", "--traj-interval", "1"]
    assert main(["md", str(conv), "--steps", "3", "--traj", str(first), *common]) == 0
    last = read(first)
    assert last.get_kinetic_energy() > 0.0
    log = tmp_path / "next.log"
    args = ["--steps", "1", "--traj", str(tmp_path / "next.traj"), "--log", str(log), *common]
    capsys.readouterr()
    assert main(["md", str(first), "--keep-velocities", *args]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert np.loadtxt(log)[0, 2] == pytest.approx(last.get_kinetic_energy(), rel=1e-6)
    assert main(["md", str(first), *args]) == 0
    assert f"{first} carries velocities; they are replaced by new ones at 300 K" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "options", "problem"),
    [
        ("relax", ["--pressure", "10"], "pressure_GPa=10 acts on the cell; relax the cell too"),
        ("relax", ["--hydrostatic"], "hydrostatic=True acts on the cell"),
        ("md", ["--ensemble", "nvt", "--pressure", "5"], "pressure_GPa=5 needs the NPT ensemble"),
        ("md", ["--keep-velocities"], "carries no velocities"),
        ("md", ["--ensemble", "nvt", "--temperature", "0"], "NVT needs temperature_K > 0"),
        ("phonons", ["--displacement", "0.5"], r"displacement must be in \(0, 0.2\) Å"),
        ("phonons", ["--primitive", "F"], "cannot reduce this cell with primitive='F'"),
        ("phonons", ["--supercell", "2", "2"], "--supercell takes 1, 3 or 9 numbers"),
    ],
)
def test_cli_options_that_cannot_act_are_refused(si_files, tmp_path, capsys, command, options, problem):
    """Options that would be ignored, or that the workflow refuses, exit with status 2 and a
    one-line message before anything is written."""
    import re

    prim, _ = si_files
    outputs = {"md": ("--traj", "out.traj"), "relax": ("-o", "out.extxyz"), "phonons": ("-o", "out")}
    option, name = outputs[command]
    rc = main([command, str(prim), *options, option, str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and re.search(problem, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["si.cif", "si8.extxyz"]


def test_cli_relax(si_files, tmp_path, capsys):
    prim, _ = si_files
    out_file = tmp_path / "relaxed.extxyz"
    rc = main(["relax", str(prim), "--cell", "--fmax", "0.01", "--optimizer", "BFGS", "-o", str(out_file)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "converged after" in out and "a=" in out and "GPa" in out
    relaxed = read(out_file)
    assert np.abs(relaxed.get_forces()).max() < 0.01
    assert relaxed.cell.cellpar()[0] != pytest.approx(SI_A / np.sqrt(2), abs=1e-3)


def test_cli_relax_of_a_slab_from_a_poscar(mace_model_path, tmp_path, capsys, caplog):
    """ASE reads every POSCAR as 3-D periodic: relaxing the cell of a slab then strains its vacuum,
    which is reported; --pbc T T F makes z open, and the vacuum vector stays as it is."""
    from ase.build import fcc100

    slab = fcc100("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.rattle(0.02, seed=3)
    poscar = tmp_path / "POSCAR"
    slab.write(poscar, format="vasp")
    common = ["relax", str(poscar), "--base", mace_model_path, "--cell", "--steps", "3"]
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        main([*common, "-o", str(tmp_path / "periodic.extxyz")])
    assert "12.0 Å of empty space along periodic cell vector(s) c" in caplog.text and "--pbc" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        main([*common, "--pbc", "T", "T", "F", "-o", str(tmp_path / "slab.extxyz")])
    assert "empty space" not in caplog.text
    relaxed = read(tmp_path / "slab.extxyz")
    assert relaxed.pbc.tolist() == [True, True, False]
    np.testing.assert_allclose(relaxed.cell.array[2], slab.cell.array[2], atol=1e-9)
    assert np.abs(relaxed.cell.array[:2] - slab.cell.array[:2]).max() > 1e-6  # the in-plane lattice relaxed
    capsys.readouterr()


def test_cli_relax_and_phonons_of_a_monolayer(tmp_path, capsys):
    """extxyz keeps pbc=[T, T, F]: --cell relaxes the in-plane lattice, and the default
    supercell of the phonons is 3 x 3 x 1 (27 atoms for MoS2)."""
    from ase.build import mx2
    from ase.io import write

    pytest.importorskip("sevenn")
    start, relaxed_file = tmp_path / "mos2.extxyz", tmp_path / "relaxed.extxyz"
    write(start, mx2("MoS2", "2H", a=3.25, thickness=3.19, vacuum=7.5))
    assert (
        main(
            ["relax", str(start), "--cell", "--fmax", "0.005", "--optimizer", "BFGS", "-o", str(relaxed_file)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "vacuum included" in out and "pressure" not in out
    relaxed = read(relaxed_file)
    assert relaxed.pbc.tolist() == [True, True, False]
    assert relaxed.cell.cellpar()[0] < 3.24 and relaxed.cell.cellpar()[2] == pytest.approx(3.19 + 15.0)
    assert main(["phonons", str(relaxed_file), "--mesh", "6", "6", "6", "-o", str(tmp_path / "ph")]) == 0
    out = capsys.readouterr().out
    assert "supercells of 27 atoms" in out and "K:" in out
    assert (tmp_path / "ph" / "band.yaml").is_file()


def test_cli_phonons(si_files, tmp_path, capsys):
    prim, _ = si_files
    out_dir = tmp_path / "ph"
    args = ["--supercell", "1", "1", "1", "--mesh", "4", "4", "4", "-o", str(out_dir), "--no-plot"]
    rc = main(["phonons", str(prim), *args])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Γ:" in out and "X*:" in out  # the primitive cell itself holds no q but Γ
    assert "* not a q-point of this supercell" in out and "LO-TO" not in out  # one element: not polar
    assert (out_dir / "phonopy.yaml").exists() and (out_dir / "FORCE_CONSTANTS").exists()
    assert not (out_dir / "phonons.png").exists()


def test_cli_phonons_of_a_polar_crystal_with_and_without_born_charges(tmp_path, capsys):
    """``sparsecalc phonons`` of MgO: without ``--born`` a note says what LO-TO splitting needs;
    with it the Γ line carries the LO mode and the header says so. Si gets no note."""
    from ase.io import write

    write(tmp_path / "mgo.cif", bulk("MgO", "rocksalt", a=4.21))
    args = ["--supercell", "2", "--mesh", "2", "2", "2", "--no-plot", "-o", str(tmp_path / "ph")]
    assert main(["phonons", str(tmp_path / "mgo.cif"), *args]) == 0
    plain = capsys.readouterr().out
    assert "note: no LO-TO splitting at Γ" in plain and "--born FILE" in plain
    (tmp_path / "BORN").write_text(MGO_BORN)
    assert main(["phonons", str(tmp_path / "mgo.cif"), *args, "--born", str(tmp_path / "BORN")]) == 0
    split = capsys.readouterr().out
    assert "with the Born charges' dipole term" in split and "note: no LO-TO" not in split
    gamma = [line for line in (plain, split) for line in line.splitlines() if line.strip().startswith("Γ:")]
    plain_gamma, split_gamma = (np.array(line.split()[1:], dtype=float) for line in gamma)
    assert split_gamma[-1] > 1.5 * plain_gamma[-1] and split_gamma[3] == pytest.approx(plain_gamma[3])
    assert main(["phonons", str(tmp_path / "mgo.cif"), *args, "--born", str(tmp_path / "none")]) == 2
    assert "none: no such file (Born charges" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["md", "relax", "phonons"])
def test_cli_missing_structure(command, tmp_path, capsys):
    missing = tmp_path / "no_such.extxyz"
    rc = main([command, str(missing)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1
    assert str(missing) in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["md", "relax", "phonons"])
def test_cli_refuses_unknown_elements_by_file_and_frame_before_writing(command, tmp_path, capsys):
    from ase.io import write

    start = tmp_path / "po.extxyz"
    write(start, [bulk("Si", "diamond", a=SI_A), bulk("Po", "sc", a=3.35)])  # Po: not in SevenNet-0
    outputs = {
        "md": ["--traj", str(tmp_path / "md.traj"), "--log", str(tmp_path / "md.log"), "--steps", "2"],
        "relax": ["-o", str(tmp_path / "relaxed.extxyz"), "--traj", str(tmp_path / "relax.traj")],
        "phonons": ["--output-dir", str(tmp_path / "phonons")],
    }[command]
    rc = main([command, str(start), "--index", "1", *outputs])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"{start} (frame 1)" in err and "Po" in err
    assert [p.name for p in tmp_path.iterdir()] == ["po.extxyz"]  # nothing written, not even .part files


def test_cli_md_trajectory_that_is_a_folder(si_files, tmp_path, capsys):
    _, conv = si_files
    folder = tmp_path / "mdx"
    folder.mkdir()
    rc = main(["md", str(conv), "--traj", str(folder), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{folder}: is a folder" in err
    assert not list(tmp_path.glob(".*.part"))


def test_cli_relax_that_does_not_converge_exits_with_status_3(si_files, tmp_path, capsys):
    from ase_sparsecalc.cli.relax_cmd import NOT_CONVERGED

    prim, _ = si_files
    out_file = tmp_path / "relaxed.extxyz"
    rattled = read(prim)
    rattled.positions[0] += [0.05, -0.03, 0.02]
    rattled.write(prim)
    rc = main(["relax", str(prim), "--steps", "1", "--fmax", "1e-6", "-o", str(out_file)])
    assert rc == NOT_CONVERGED == 3
    assert "NOT converged (raise --steps or loosen --fmax) after 1 steps" in capsys.readouterr().out
    assert len(read(out_file)) == 2  # the last structure is written all the same


def test_read_structure_errors(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("not an xyz file\n")
    with pytest.raises(DataFileError, match=r"bad\.xyz"):
        read_structure(bad)
    good = tmp_path / "si.cif"
    _primitive_si().write(good)
    with pytest.raises(DataFileError, match="no frame 3"):
        read_structure(good, index=3)
    truncated = tmp_path / "POSCAR"
    truncated.write_text("Si2\n1.0\n")  # a POSCAR cut off after its scale factor
    with pytest.raises(DataFileError, match=r"POSCAR: ASE could not parse it .*truncated or malformed"):
        read_structure(truncated)
    assert len(read_structure(good)) == 2


def test_npt_of_a_slab_with_a_periodic_vacuum_is_warned_about(mace_model_path, caplog):
    """A slab with pbc all True under a barostat: the vacuum would be barostatted like crystal.
    The run says so; NVT of the same slab, which keeps the cell, does not."""
    from ase.build import fcc100

    slab = fcc100("Cu", size=(1, 1, 3), vacuum=6.0, periodic=True)
    calc = SparseCalc(mace_model_path)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        run_md(slab, calc, ensemble="npt", temperature_K=100, steps=2)
    assert "empty space along periodic cell vector(s) c, which the barostat treats as crystal" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        run_md(slab, calc, ensemble="nvt", temperature_K=100, steps=2)
    assert "empty space" not in caplog.text


def test_phonons_name_constraints_left_out_and_unrelaxed_structures(mace_model_path, caplog):
    """phonopy displaces every atom, so FixAtoms is named as not applied; a structure away from
    the model's minimum is named too, a perfect crystal (zero forces by symmetry) is not."""
    from ase.constraints import FixAtoms

    calc = SparseCalc(mace_model_path)
    options = dict(supercell=2, mesh=(2, 2, 2), band_npoints=3)
    perfect = bulk("Si", "diamond", a=5.43)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        phonons(perfect, calc, **options)
    assert "not at a minimum" not in caplog.text and "constraints" not in caplog.text
    fixed = perfect.copy()
    fixed.set_constraint(FixAtoms(indices=[0]))
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        phonons(fixed, calc, **options)
    assert "the constraints (FixAtoms) are not applied" in caplog.text
    caplog.clear()
    from ase.calculators.emt import EMT  # any ASE calculator; the random test model is too soft

    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    copper.positions[0] += [0.05, 0.02, 0.0]
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        phonons(copper, EMT(), supercell=1, mesh=(2, 2, 2), band_npoints=3, primitive=None)
    assert "Cu4 is not at a minimum of this model: forces up to" in caplog.text


def test_a_relaxed_structure_carries_no_velocities(mace_model_path):
    """The input's momenta belong to it, not to the minimum a relaxation finds."""
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.03, seed=1)
    atoms.set_momenta(np.full((2, 3), 0.1))
    result = relax(atoms, SparseCalc(mace_model_path), steps=3)
    assert "momenta" not in result.atoms.arrays
    assert "momenta" in atoms.arrays  # the caller's structure is left as it was


def test_md_returns_the_structure_with_its_own_constraints(mace_model_path):
    """A Langevin run fixes the centre of mass with a FixCom constraint for the run only: the
    structure returned carries the constraints it came with."""
    from ase.constraints import FixAtoms, FixCom

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    result = run_md(atoms, SparseCalc(mace_model_path), ensemble="nvt", thermostat="langevin", steps=2)
    assert result.atoms.constraints == []
    atoms.set_constraint(FixAtoms(indices=[0]))
    result = run_md(atoms, SparseCalc(mace_model_path), ensemble="nvt", thermostat="langevin", steps=2)
    assert [type(c) for c in result.atoms.constraints] == [FixAtoms]
    assert not any(isinstance(c, FixCom) for c in result.atoms.constraints)


def test_npt_continues_an_nvt_trajectory_and_refuses_held_atoms(tmp_path):
    """Frames of a Langevin run carry no FixCom (added for the run only), so NPT continues from
    them; a structure with FixAtoms gets a clear refusal, not the integrator's error."""
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    nvt = tmp_path / "nvt.traj"
    run_md(copper, EMT(), "nvt", temperature_K=300, steps=4, trajectory=nvt, trajectory_interval=2)
    last = read(tmp_path / "nvt.traj")
    assert last.constraints == []
    result = run_md(last, EMT(), "npt", temperature_K=300, steps=2, init_velocities=False)
    assert result.ensemble.startswith("npt")
    held = copper.copy()
    held.set_constraint(FixAtoms(indices=[0]))
    with pytest.raises(ConfigError, match=r"NPT .* takes no constraints, and the structure has FixAtoms"):
        run_md(held, EMT(), "npt", temperature_K=300, steps=2)


def test_nose_hoover_holds_the_target_temperature_in_a_small_cell():
    """ASE's Nosé–Hoover chain drives 3N degrees of freedom while the total momentum stays zero:
    unscaled, a 4-atom cell runs at 3N / (3N - 3) = 1.33 times the target. The workflow scales
    the chain's target, so the reported mean temperature is the target (EMT copper, seeded)."""
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    result = run_md(copper, EMT(), "nvt", thermostat="nose-hoover", temperature_K=300, timestep_fs=2,
                    steps=8000, log_interval=10, seed=1)  # fmt: skip
    settled = np.asarray(result.temperature)[len(result.temperature) // 5 :]
    assert 0.85 < settled.mean() / 300 < 1.15


def test_moved_structures_do_not_carry_the_inputs_dft_labels(tmp_path):
    """REF_energy, DFT_forces and the like describe the input geometry: relaxed structures and
    MD frames leave them out (they would be read back as labels), and keep other metadata."""
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.7, cubic=True)
    copper.rattle(0.05, seed=2)
    copper.info.update(REF_energy=-12.3, dft_stress=np.zeros(6), config_type="rattled", charge=0)
    copper.arrays["DFT_forces"] = np.ones((len(copper), 3))
    copper.arrays["tags_kept"] = np.arange(len(copper))

    relaxed = relax(copper, EMT(), fmax=0.05).atoms
    run_md(copper, EMT(), steps=2, trajectory=tmp_path / "md.extxyz", trajectory_interval=1, progress=False)
    frame = read(tmp_path / "md.extxyz", index=-1)
    for atoms in (relaxed, frame):
        assert not {"REF_energy", "dft_stress"} & set(atoms.info)
        assert "DFT_forces" not in atoms.arrays
        assert atoms.info["config_type"] == "rattled" and atoms.info["charge"] == 0
        assert "tags_kept" in atoms.arrays
    assert "REF_energy" in copper.info  # the input is not changed
