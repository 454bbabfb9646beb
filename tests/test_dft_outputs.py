"""DFT codes' own output files go straight into fine-tuning: GPAW and Quantum ESPRESSO output
made here, and the real VASP outputs (OUTCAR, vasprun.xml) and Quantum ESPRESSO outputs that
ASE ships with its own tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ase_sparsecalc.cli import main
from ase_sparsecalc.finetune import finetune_with_report, read_frames

GPAW_LOG = Path(__file__).parent / "data" / "gpaw_si_md.txt"
GPAW_AL_SMEARED = Path(__file__).parent / "data" / "gpaw_al_md_smeared.txt"  # 0.1 eV smearing
MGO_LOW_CUTOFF = Path(__file__).parent / "data" / "gpaw_mgo_350eV.txt"  # scripts/make_pulay_example.py
MGO_CONVERGED = Path(__file__).parent / "data" / "gpaw_mgo_700eV.txt"
MGO_MID_CUTOFF = Path(__file__).parent / "data" / "gpaw_mgo_500eV.txt"
MGO_LDA = Path(__file__).parents[1] / "examples" / "data" / "mgo_lda.extxyz"
MOS2_LOW_CUTOFF = Path(__file__).parent / "data" / "gpaw_mos2_400eV.txt"  # make_slab_pulay_example.py
MOS2_CONVERGED = Path(__file__).parent / "data" / "gpaw_mos2_800eV.txt"
SI_DATA = Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz"
# pw.x 6.7 (Debian), GaAs, PBE with pslibrary 0.2 PAW datasets, 40/320 Ry, 3x3x3 k-points
QE_GAAS_MD = Path(__file__).parent / "data" / "qe_gaas_md.out"  # 10 steps at 800 K, input beside
QE_UNCONVERGED = Path(__file__).parent / "data" / "qe_gaas_unconverged.out"  # electron_maxstep = 3
QE_INPUT_ERROR = Path(__file__).parent / "data" / "qe_input_error.out"  # pw.x without its input file


def _ase_vasp_outputs() -> list[Path]:
    """VASP outputs from ASE's test data: Ni18 (OUTCAR, spin-polarised), C2 with PSTRESS and
    NaCl from a DFPT run (vasprun.xml)."""
    import ase.test

    folder = Path(ase.test.__file__).parent / "testdata" / "vasp"
    paths = [folder / name for name in ("OUTCAR_example_1", "vasprun_pstress.xml", "vasprun_dfpt.xml")]
    if not all(p.is_file() for p in paths):
        pytest.skip("this ase installation has no VASP test data")
    return paths


def test_gpaw_text_output_gives_every_step_with_labels():
    frames = read_frames(str(GPAW_LOG))
    assert len(frames) == 7  # initial point plus 6 velocity-Verlet steps
    for frame in frames:
        assert frame.n_atoms == 8 and frame.atoms.pbc.all()
        assert frame.forces.shape == (8, 3) and np.abs(frame.forces).max() > 0.01
        assert frame.stress.shape == (3, 3) and np.allclose(frame.stress, frame.stress.T)
    energies = [f.energy for f in frames]
    assert len(set(np.round(energies, 8))) == len(energies)  # MD steps, not copies


def test_gpaw_text_output_of_a_smeared_metal_gives_the_free_energy():
    """GPAW PBE MD of 4 Al atoms, 0.1 eV Fermi-Dirac smearing: the label is the ``Free energy:``
    line (whose derivatives the forces are), not the zero-width extrapolation ASE's reader
    reports as ``energy``."""
    text = GPAW_AL_SMEARED.read_text().splitlines()
    free = [float(line.split()[-1]) for line in text if line.startswith("Free energy:")]
    extrapolated = [float(line.split()[-1]) for line in text if line.startswith("Extrapolated:")]
    frames = read_frames(str(GPAW_AL_SMEARED))
    assert len(frames) == len(free) == 5
    assert all(f.energy_label == "free_energy" for f in frames)
    assert [f.energy for f in frames] == pytest.approx(free, abs=1e-9)
    assert np.min(np.abs(np.subtract(free, extrapolated))) > 0.1  # the two really differ here


def test_finetune_reads_gpaw_output_directly(mace_model_path, tmp_path):
    result = finetune_with_report(
        mace_model_path,
        str(GPAW_LOG),
        valid=str(SI_DATA) + "@0:4",
        method="sparse",
        density=0.05,
        epochs=2,
        batch_size=4,
        dtype="float64",
        output=tmp_path / "si.safetensors",
    )
    assert result.report["data"]["frames"] == 7
    assert result.report["data"]["with_stress"] == 7
    assert "stress_mae" in result.report["after"]["train"]
    assert (tmp_path / "si.safetensors").is_file()


def test_pulay_stress_of_a_low_cutoff_is_reported_and_a_converged_one_is_not():
    """MgO computed with GPAW (PBE) at 350 eV carries about +0.58 eV/Å³ of Pulay stress in every
    frame; the data check names it against SevenNet-0, and is quiet for the same cell at 700 eV
    and for the bundled LDA data, whose real change of functional moves the pressure by about
    10 GPa against the PBE-trained model."""
    pytest.importorskip("sevenn")
    from ase.stress import voigt_6_to_full_3x3_stress

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.finetune.label_checks import warn_about_stress_offset

    calc = SparseCalc("sevennet-0", default_dtype="float32")

    def base_stresses(frames):
        results = calc.batch_evaluate([f.atoms for f in frames], ("energy", "forces", "stress"))
        return {k: {"stress": voigt_6_to_full_3x3_stress(r["stress"])} for k, r in enumerate(results)}

    low, converged = read_frames(str(MGO_LOW_CUTOFF)), read_frames(str(MGO_CONVERGED))
    assert len(low) == 3 and len(converged) == 1
    assert all(np.trace(f.stress) / 3 > 0.5 for f in low)  # eV/Å³: 80+ GPa of tension
    assert -0.15 < np.trace(converged[0].stress) / 3 < 0  # 2 % below PBE's lattice constant: compressed
    message = warn_about_stress_offset(low, base_stresses(low))
    assert message is not None and "Pulay stress" in message and "gpaw_mgo_350eV.txt" in message
    assert warn_about_stress_offset(converged, base_stresses(converged)) is None
    lda = read_frames(str(MGO_LDA))
    predicted = base_stresses(lda)
    offset = np.median([np.trace(f.stress - predicted[k]["stress"]) / 3 for k, f in enumerate(lda)])
    assert 0.03 < offset < 0.1  # eV/Å³: LDA binds tighter than the PBE-trained model
    assert warn_about_stress_offset(lda, predicted) is None


def test_a_slabs_pulay_stress_shows_against_its_forces():
    """MoS2 monolayers (GPAW, PBE, 16 Å of vacuum; four rattled cells strained in-plane by -1 to
    +2 %): at 400 eV the stress across the vacuum carries about 0.2 GPa more than the forces give
    (σ n = -Σ F h / V), and that is named, also for the frames given with the vacuum axis open;
    at 800 eV it is not, and the in-plane stresses moved by about the same amount."""
    import dataclasses

    from ase.units import GPa

    from ase_sparsecalc.finetune.label_checks import warn_if_slab_stresses_disagree_with_forces

    low, converged = read_frames(str(MOS2_LOW_CUTOFF)), read_frames(str(MOS2_CONVERGED))
    assert len(low) == len(converged) == 4
    message = warn_if_slab_stresses_disagree_with_forces(low)
    assert message is not None and "gpaw_mos2_400eV.txt" in message and "Pulay stress" in message
    gap = float(re.search(r"carry ([+-]\d+\.\d+) GPa more", message).group(1))
    assert 0.1 < abs(gap) < 0.4
    open_axis = []
    for frame in low:
        atoms = frame.atoms.copy()
        atoms.pbc = [True, True, False]
        open_axis.append(dataclasses.replace(frame, atoms=atoms))
    assert warn_if_slab_stresses_disagree_with_forces(open_axis) == message
    assert warn_if_slab_stresses_disagree_with_forces(converged) is None
    in_plane_shift = np.mean([c.stress[0, 0] - f.stress[0, 0] for c, f in zip(converged, low, strict=True)])
    assert abs(in_plane_shift / GPa + gap) < 0.1  # the same isotropic stress, gone


def test_a_pulay_stress_below_the_offset_check_shows_against_the_energies():
    """MgO (GPAW, PBE) at 500 eV: six frames strained by -1 to +4 %, whose stresses carry a Pulay
    stress under the offset check's 32 GPa; their pressure, against SevenNet-0, is about 19 GPa
    from the slope of their energies against volume, and that is named. The bundled LDA MgO and
    PBEsol Si data (converged cutoffs) agree with themselves and raise nothing."""
    pytest.importorskip("sevenn")
    from ase.stress import voigt_6_to_full_3x3_stress

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.finetune.label_checks import (
        warn_about_stress_offset,
        warn_if_stresses_disagree_with_energies,
    )

    calc = SparseCalc("sevennet-0", default_dtype="float32")

    def base(frames):
        results = calc.batch_evaluate([f.atoms for f in frames], ("energy", "forces", "stress"))
        return {
            k: {"energy": r["energy"], "stress": voigt_6_to_full_3x3_stress(r["stress"])}
            for k, r in enumerate(results)
        }

    mid = read_frames(str(MGO_MID_CUTOFF))
    assert len(mid) == 6
    predicted = base(mid)
    assert warn_about_stress_offset(mid, predicted) is None
    message = warn_if_stresses_disagree_with_energies(mid, predicted)
    assert message is not None and message.startswith("Mg4O4: the DFT stresses of the 6 frames")
    assert "gpaw_mgo_500eV.txt" in message and "Pulay stress" in message
    assert 15.0 < float(message.split(" GPa apart")[0].rsplit(" ", 1)[1]) < 23.0
    for path in (MGO_LDA, Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz"):
        frames = read_frames(str(path))
        assert warn_if_stresses_disagree_with_energies(frames, base(frames)) is None


@pytest.mark.parametrize("fmt", ["traj", "extxyz"])
def test_ase_formats_round_trip_labels(tmp_path, fmt):
    import ase.io

    images = ase.io.read(SI_DATA, "0:3")
    path = tmp_path / f"frames.{fmt}"
    ase.io.write(path, images)
    frames = read_frames(str(path))
    for frame, atoms in zip(frames, images, strict=True):
        assert frame.energy == pytest.approx(atoms.get_potential_energy(force_consistent=True))
        np.testing.assert_allclose(frame.forces, atoms.get_forces())
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False))


@pytest.mark.parametrize("fmt", ["traj", "extxyz"])
def test_fixed_atoms_keep_their_computed_forces(tmp_path, fmt):
    """A slab relaxed with its bottom layers fixed (VASP's selective dynamics, ASE's FixAtoms):
    the file keeps the forces the DFT code computed on the fixed atoms, and those are the
    labels, not the zeros that ``atoms.get_forces()`` returns under the constraint."""
    import ase.io
    from ase.build import fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    del slab.info["adsorbate_info"]  # a nested dict that extxyz cannot store
    slab.rattle(0.05, seed=1)
    slab.set_constraint(FixAtoms(indices=range(4)))
    slab.calc = EMT()
    computed = slab.get_forces(apply_constraint=False)
    assert np.abs(computed[:4]).max() > 0.1 and not slab.get_forces()[:4].any()
    path = tmp_path / f"slab.{fmt}"
    ase.io.write(path, slab)
    np.testing.assert_allclose(read_frames(str(path))[0].forces, computed, atol=1e-7)


def _ase_espresso_outputs(folder: Path) -> list[Path]:
    """Quantum ESPRESSO pw.x outputs that ASE's own tests carry as text: a spin-polarised
    Fe2H relaxation (v5.3) and a variable-cell Si2 relaxation (v7.4), written as ``*.out``."""
    try:
        from ase.test.fio import test_espresso
    except ImportError:
        pytest.skip("this ase installation has no Quantum ESPRESSO test outputs")
    texts = {"feh_relax.out": "pw_output_text", "si_vc_relax.out": "pw_output_cell"}
    paths = []
    for name, attribute in texts.items():
        text = getattr(test_espresso, attribute, None)
        if not isinstance(text, str) or "Program PWSCF" not in text:
            pytest.skip("this ase installation has no Quantum ESPRESSO test outputs")
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths


def test_espresso_outputs_give_every_step_with_labels(tmp_path):
    """pw.x relaxations read as every ionic step, in eV, eV/Å and eV/Å³ (pw.x writes Ry, Ry/bohr
    and kbar); the variable-cell run's cells change from step to step."""
    import ase.io

    feh, si = _ase_espresso_outputs(tmp_path)
    frames = read_frames([str(feh), str(si)])
    assert [f.atoms.get_chemical_formula() for f in frames] == ["HFe2"] * 2 + ["Si2"] * 3
    for frame, atoms in zip(frames, ase.io.read(feh, ":") + ase.io.read(si, ":"), strict=True):
        assert frame.energy == pytest.approx(atoms.get_potential_energy(force_consistent=True))
        np.testing.assert_allclose(frame.forces, atoms.get_forces())
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False))
        assert frame.atoms.pbc.all() and frame.n_atoms in (2, 3)
    assert frames[2].source.startswith(str(si))
    volumes = [f.atoms.get_volume() for f in frames[2:]]
    assert volumes[0] != pytest.approx(volumes[1])
    si_energies = [f.energy for f in frames[2:]]
    assert si_energies[-1] < si_energies[0]  # a relaxation goes downhill


def test_cli_shift_on_espresso_outputs(tmp_path, capsys, caplog):
    """``sparsecalc finetune --method shift`` straight from pw.x outputs of two chemistries, then
    ``eval``: the per-element references take the energy error from eV per atom to well below.
    A vc-relax ends with an SCF at the final geometry in a fresh basis, so its last two steps
    are the same structure: refused by name until ``--drop-duplicates`` keeps the first (or
    ``--keep-last-duplicate`` the last)."""
    import json

    files = [str(p) for p in _ase_espresso_outputs(tmp_path)]
    assert main(["eval", *files, "--base", "sevennet-0", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["frames"] == 5 and before["stress_frames"] == 5
    # without a delta, eval also gives the energy error left once per-element offsets are fitted
    # to these frames (two compositions, five frames): meV/atom, where the raw error is eV/atom
    assert before["energy_mae_after_fitted_shifts"] < 0.01 * before["energy_mae"]
    assert before["units"]["energy_rmse_after_fitted_shifts"] == "meV/atom"
    delta = tmp_path / "qe_shift.safetensors"
    command = ["finetune", *files, "--base", "sevennet-0", "--method", "shift", "-o", str(delta)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "si_vc_relax.out:frame 2: same structure as" in error
    assert "si_vc_relax.out:frame 1 (DFT energies 6.06 meV apart)" in error
    assert not delta.exists()
    assert main([*command, "--keep-last-duplicate"]) == 0  # the final SCF stays
    capsys.readouterr()
    assert "dropped " in caplog.text and "si_vc_relax.out:frame 1:" in caplog.text
    caplog.clear()
    assert main([*command, "--drop-duplicates"]) == 0
    capsys.readouterr()
    assert "si_vc_relax.out:frame 2:" in caplog.text
    assert main(["eval", *files, "--delta", str(delta), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["energy_mae"] < 0.01 * before["energy_mae"]
    assert after["forces_mae"] == pytest.approx(before["forces_mae"], rel=1e-6)
    assert "energy_mae_after_fitted_shifts" not in after  # a delta brings its own shifts


def test_a_pw_x_md_run_gives_every_step_in_ase_units():
    """A pw.x molecular-dynamics output: every step is a frame, with the energy of its '!' line
    (Ry -> eV), its forces (Ry/bohr -> eV/Å) and its static stress (pw.x prints it in Ry/bohr³
    and kbar with the sign of a pressure; ASE's stress is the opposite), read from the text here."""
    from ase import units

    text = QE_GAAS_MD.read_text()
    energies = [float(x) * units.Ry for x in re.findall(r"^!\s+total energy\s+=\s+(\S+) Ry", text, re.M)]
    blocks = text.split("Forces acting on atoms (cartesian axes, Ry/au):")[1:]
    forces = [
        np.array(re.findall(r"force =\s+(\S+)\s+(\S+)\s+(\S+)", block.split("Total force")[0]), dtype=float)
        for block in blocks
    ]
    stresses = [  # the Ry/bohr³ columns (the kbar ones are rounded to 0.01)
        np.array([line.split()[0:3] for line in block.splitlines()[1:4]], dtype=float)
        for block in text.split("total   stress  (Ry/bohr**3)")[1:]
    ]
    frames = read_frames(str(QE_GAAS_MD))
    assert len(frames) == len(energies) == len(forces) == len(stresses) == 10
    for frame, energy, force, stress in zip(frames, energies, forces, stresses, strict=True):
        assert frame.atoms.get_chemical_formula() == "As4Ga4" and frame.atoms.pbc.all()
        assert frame.energy == pytest.approx(energy, rel=1e-6)  # ASE's Ry is CODATA 2006's
        np.testing.assert_allclose(frame.forces, force * units.Ry / units.Bohr, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(frame.stress, -stress * units.Ry / units.Bohr**3, rtol=1e-5, atol=1e-9)
    moved = np.linalg.norm(frames[-1].atoms.positions - frames[0].atoms.positions, axis=1)
    assert moved.min() > 0.02  # every atom moves over the run


def test_pw_x_runs_that_stopped_are_named_with_the_reason(tmp_path):
    """Three ways a pw.x run ends without the frames a user expects, each named as such rather
    than as a wrong format or index: an SCF that did not converge (pw.x's own words quoted),
    pw.x stopped by an input error, and a run killed during its fourth step, whose first
    three steps the message says how to take."""
    from ase_sparsecalc.errors import DataFileError, EmptyDatasetError

    with pytest.raises(DataFileError) as unconverged:
        read_frames(str(QE_UNCONVERGED))
    assert "ASE cannot read this pw.x output" in str(unconverged.value)
    assert "it says: convergence NOT achieved after 3 iterations: stopping" in str(unconverged.value)
    assert "--format" not in str(unconverged.value)
    with pytest.raises(EmptyDatasetError, match=r"no completed step in this pw.x output \(read as format "
                       r"'espresso-out', from its content\).*it says: Error in routine read_input \(1\): "
                       r"opening input file"):  # fmt: skip
        read_frames(str(QE_INPUT_ERROR))
    text = QE_GAAS_MD.read_text()
    fourth = [m.start() for m in re.finditer(r"^!", text, re.M)][3]
    killed = tmp_path / "killed.out"
    killed.write_text(text[: fourth - 3000])  # in the middle of the fourth step's SCF
    with pytest.raises(
        DataFileError, match=r"cannot read frame 3 of this pw.x output \(frames 0 to 2 read\)"
    ):
        read_frames(str(killed))
    assert len(read_frames(f"{killed}@:3")) == 3


def test_vasp_outputs_give_free_energy_forces_and_stress():
    """OUTCAR and vasprun.xml through ASE's readers: the free energy (whose derivatives the DFT
    forces are), forces and the stress in eV/Å³ (ASE converts VASP's kBar), one frame each."""
    import ase.io

    paths = _ase_vasp_outputs()
    frames = read_frames([str(p) for p in paths])
    assert [f.atoms.get_chemical_formula() for f in frames] == ["Ni18", "C2", "ClNa"]
    for frame, path in zip(frames, paths, strict=True):
        atoms = ase.io.read(path)
        assert frame.energy == pytest.approx(atoms.get_potential_energy(force_consistent=True))
        np.testing.assert_allclose(frame.forces, atoms.get_forces())
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False))
        assert str(path.name) in frame.source
    # the PSTRESS run: vasprun.xml's e_fr_energy holds p V, which ASE removes
    assert frames[1].energy == pytest.approx(-20.24695937)


def test_cli_eval_and_shift_on_vasp_outputs(tmp_path, capsys):
    """``sparsecalc eval`` on three VASP runs of different chemistry, then ``finetune --method
    shift`` on them: per-element reference energies remove most of the energy error."""
    import json

    files = [str(p) for p in _ase_vasp_outputs()]
    assert main(["eval", *files, "--base", "sevennet-0", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["frames"] == 3 and before["stress_frames"] == 3
    assert set(before["forces_mae_by_element"]) == {"Ni", "C", "Na", "Cl"}
    assert "energy_mae_after_fitted_shifts" not in before  # three frames, three compositions: exact
    delta = tmp_path / "vasp_shift.safetensors"
    assert main(["finetune", *files, "--base", "sevennet-0", "--method", "shift", "-o", str(delta)]) == 0
    capsys.readouterr()
    assert main(["eval", *files, "--delta", str(delta), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["energy_mae"] < 0.1 * before["energy_mae"]
    assert after["forces_mae"] == pytest.approx(before["forces_mae"], rel=1e-6)  # shifts move no force


def test_virials_become_stresses(tmp_path, caplog):
    """A file with MACE-style ``REF_virial`` (eV, 3x3) and no stress: ``virial_key`` gives
    stress = -virial / volume, the stress the DFT code reported."""
    import ase.io
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    from ase_sparsecalc.errors import ConfigError, MissingLabelError

    images = ase.io.read(SI_DATA, "0:3")
    relabelled = []
    for atoms in images:
        copy = atoms.copy()
        copy.info["REF_virial"] = -atoms.get_stress(voigt=False) * atoms.get_volume()
        copy.calc = SinglePointCalculator(
            copy, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
        )
        relabelled.append(copy)
    path = tmp_path / "virials.extxyz"
    ase.io.write(path, relabelled)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        assert all(f.stress is None for f in read_frames(str(path)))
    assert "no frame has a stress, but frames have REF_virial" in caplog.text
    assert "pass --virial-key REF_virial" in caplog.text
    frames = read_frames(str(path), virial_key="REF_virial")
    for frame, atoms in zip(frames, images, strict=True):
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False), atol=1e-10)
    with pytest.raises(MissingLabelError, match=r"virials\.extxyz: no frame has a virial under 'virial'"):
        read_frames(str(path), virial_key="virial")
    with pytest.raises(MissingLabelError, match=r"no frame has a stress under 'REF_stres'"):
        read_frames(str(path), stress_key="REF_stres")
    water = molecule("H2O")  # a molecule beside the crystals: energy and forces, no virial
    water.calc = SinglePointCalculator(water, energy=-14.0, forces=np.zeros((3, 3)))
    ase.io.write(path, [*relabelled, water])
    mixed = read_frames(str(path), virial_key="REF_virial")
    assert [f.stress is None for f in mixed] == [False, False, False, True]
    with pytest.raises(ConfigError, match="a stress key or a virial key, not both"):
        read_frames(str(path), stress_key="stress", virial_key="REF_virial")


def test_eval_breaks_errors_down_by_config_type(mace_model_path, tmp_path, capsys):
    """Frames tagged with ``config_type`` (bulk Si, ethanol MD, untagged) get their own rows,
    each equal to evaluating that group alone."""
    import json

    import ase.io

    ethanol = ase.io.read(Path(__file__).parents[1] / "examples" / "data" / "ethanol_train.xyz", ":4")
    silicon = ase.io.read(SI_DATA, ":3")
    for atoms in ethanol[:3]:
        atoms.info["config_type"] = "ethanol_md"
    for atoms in silicon:
        atoms.info["config_type"] = "bulk_si"
    ethanol[3].info.pop("config_type", None)  # the file tags its frames "Training_set"
    groups = {"ethanol_md": ethanol[:3], "bulk_si": silicon, "(none)": ethanol[3:]}
    ase.io.write(tmp_path / "mixed.xyz", [*silicon, *ethanol], format="extxyz")

    def evaluate(path: Path) -> dict:
        assert main(["eval", str(path), "--base", mace_model_path, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    mixed = evaluate(tmp_path / "mixed.xyz")
    assert sorted(mixed["by_config_type"]) == sorted(groups)
    assert mixed["stress_frames"] == len(silicon)  # molecules without stress do not turn it off
    # by component (GPa), recomputed from the model's and the DFT's stresses of the Si frames
    from ase.units import GPa

    from ase_sparsecalc import SparseCalc

    calc = SparseCalc(mace_model_path)
    errors = []
    for atoms in silicon:
        model = atoms.copy()
        model.calc = calc
        errors.append(model.get_stress() - atoms.get_stress())
    expected = np.abs(np.array(errors)).mean(axis=0) / GPa
    by_component = mixed["stress_mae_by_component"]
    assert list(by_component) == ["xx", "yy", "zz", "yz", "xz", "xy"]
    np.testing.assert_allclose(list(by_component.values()), expected, rtol=1e-5)
    diagonal, shear = expected[:3].sum(), expected[3:].sum()
    assert mixed["stress_mae"] == pytest.approx((diagonal + 2 * shear) / 9, rel=1e-5)  # nine entries
    for tag, images in groups.items():
        ase.io.write(tmp_path / "alone.xyz", images, format="extxyz")
        alone = evaluate(tmp_path / "alone.xyz")
        part = mixed["by_config_type"][tag]
        assert part["frames"] == len(images) and "by_config_type" not in alone
        for key in ("energy_mae", "forces_mae", "forces_rmse", "stress_mae"):
            assert (key in part) == (key in alone)
            if key in alone:
                assert part[key] == pytest.approx(alone[key], rel=1e-6)
    assert main(["eval", str(tmp_path / "mixed.xyz"), "--base", mace_model_path]) == 0
    text = capsys.readouterr().out
    assert "config_type" in text and "bulk_si" in text and "ethanol_md" in text


def test_eval_leaves_tagged_isolated_atoms_out(mace_model_path, tmp_path, capsys):
    """Single-atom frames tagged ``config_type=IsolatedAtom`` are energy references, as in
    fine-tuning: ``eval`` leaves them out of the errors unless asked, and says so."""
    import json

    import ase.io

    data = Path(__file__).parents[1] / "examples" / "data"
    ethanol = ase.io.read(data / "ethanol_train.xyz", ":5")
    isolated = [a for a in ase.io.read(data / "ethanol_isolated_atoms.xyz", ":") if a.symbols[0] in "HCO"]
    for atoms in isolated:
        atoms.info["config_type"] = "IsolatedAtom"
    ase.io.write(tmp_path / "with_atoms.xyz", isolated[:1] + ethanol + isolated[1:], format="extxyz")
    ase.io.write(tmp_path / "molecules.xyz", ethanol, format="extxyz")
    ase.io.write(tmp_path / "atoms.xyz", isolated, format="extxyz")

    def evaluate(*extra: str) -> dict:
        assert main(["eval", *extra, "--base", mace_model_path, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    default = evaluate(str(tmp_path / "with_atoms.xyz"))
    molecules = evaluate(str(tmp_path / "molecules.xyz"))
    assert default["frames"] == len(ethanol) and default["isolated_atoms_left_out"] == len(isolated)
    for key in ("energy_mae", "forces_mae"):
        assert default[key] == pytest.approx(molecules[key], rel=1e-9)
    everything = evaluate(str(tmp_path / "with_atoms.xyz"), "--include-isolated-atoms")
    assert everything["frames"] == len(ethanol) + len(isolated)
    assert everything["isolated_atoms_left_out"] == 0
    assert everything["energy_mae"] != pytest.approx(default["energy_mae"], rel=1e-6)
    only_atoms = evaluate(str(tmp_path / "atoms.xyz"))  # nothing else to evaluate: all are kept
    assert only_atoms["frames"] == len(isolated)
    assert main(["eval", str(tmp_path / "with_atoms.xyz"), "--base", mace_model_path]) == 0
    assert f"left out {len(isolated)} isolated-atom" in capsys.readouterr().out


@pytest.mark.parametrize("index", ["2:5", "10::5", "-3:", "::-30", "-1"])
def test_frames_are_named_by_their_place_in_the_file(index):
    """Messages name frames by their position in the file, also for steps and negative indices."""
    import ase.io
    from ase.io.formats import string2index

    positions = range(len(ase.io.read(SI_DATA, ":")))[string2index(index)]
    expected = [positions] if isinstance(positions, int) else list(positions)
    frames = read_frames(f"{SI_DATA}@{index}")
    assert [int(f.source.rsplit("frame ", 1)[1]) for f in frames] == expected


def test_forces_kept_under_another_name_are_pointed_out(tmp_path, caplog):
    """Frames whose forces sit under ``REF_forces``: read where forces are optional (evaluation),
    the missing forces are named with the key to pass; a key no frame has is refused."""
    import ase.io
    from ase.build import molecule

    from ase_sparsecalc.errors import MissingLabelError

    frames = []
    for k in range(3):
        atoms = molecule("H2O")
        atoms.rattle(0.02, seed=k)
        atoms.info["REF_energy"] = -14.0 - 0.01 * k
        atoms.arrays["REF_forces"] = np.full((3, 3), 0.1 * k)
        frames.append(atoms)
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, frames)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        read = read_frames(str(path), energy_key="REF_energy", require_forces=False)
    assert all(f.forces is None for f in read)
    assert "no frame has forces under 'forces'; the frame has REF_forces" in caplog.text
    read = read_frames(str(path), energy_key="REF_energy", forces_key="REF_forces", require_forces=False)
    np.testing.assert_allclose(read[2].forces, 0.2)
    with pytest.raises(MissingLabelError, match=r"ref\.extxyz: no frame has forces under 'REF_force'.*REF_f"):
        read_frames(str(path), energy_key="REF_energy", forces_key="REF_force", require_forces=False)


def test_stresses_of_slabs_without_a_vacuum_vector_are_named_as_left_out(tmp_path, caplog):
    """A slab written with pbc T T F and no third cell vector: its stress has no volume to refer
    to, so it is not used, and the reading says so once with an example frame."""
    import ase.io
    from ase.build import fcc111
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(3):
        slab = fcc111("Al", size=(2, 2, 3), vacuum=6.0)
        slab.info.pop("adsorbate_info", None)  # not a plain value: extxyz skips it with a warning
        slab.rattle(0.02, seed=k)
        slab.calc = SinglePointCalculator(
            slab, energy=-40.0 - 0.01 * k, forces=np.zeros((12, 3)), stress=np.full(6, 0.001)
        )
        frames.append(slab)
    with_cell = tmp_path / "slab.extxyz"
    ase.io.write(with_cell, frames)
    assert all(f.stress is not None for f in read_frames(str(with_cell)))
    for slab in frames:
        slab.cell[2] = 0.0
    without = tmp_path / "slab_nocell.extxyz"
    ase.io.write(without, frames)
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        read = read_frames(str(without))
    assert all(f.stress is None for f in read)
    assert "3 frame(s) give a stress but have no cell with a volume (e.g. " in caplog.text
    assert "slab_nocell.extxyz" in caplog.text
