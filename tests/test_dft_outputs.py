"""DFT codes' own output files go straight into fine-tuning (real files made with GPAW here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ase_sparsecalc.finetune import finetune_with_report, read_frames

GPAW_LOG = Path(__file__).parent / "data" / "gpaw_si_md.txt"
SI_DATA = Path(__file__).parents[1] / "examples" / "data" / "si_pbesol.extxyz"


def test_gpaw_text_output_gives_every_step_with_labels():
    frames = read_frames(str(GPAW_LOG))
    assert len(frames) == 7  # initial point plus 6 velocity-Verlet steps
    for frame in frames:
        assert frame.n_atoms == 8 and frame.atoms.pbc.all()
        assert frame.forces.shape == (8, 3) and np.abs(frame.forces).max() > 0.01
        assert frame.stress.shape == (3, 3) and np.allclose(frame.stress, frame.stress.T)
    energies = [f.energy for f in frames]
    assert len(set(np.round(energies, 8))) == len(energies)  # MD steps, not copies


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
