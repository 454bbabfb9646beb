"""Generate the PBEsol DFT training and benchmark data for bulk Si and Cu with GPAW.

The pre-trained potentials (SevenNet-0, MACE-MP) were fitted to PBE data.  The
files written here provide reference data computed with a *different*
functional, PBEsol, so that a fine-tuned delta has something genuine to learn.

Outputs (in ``--out``, default ``examples/data``)
-------------------------------------------------
``{system}_pbesol.extxyz``
    Extended-XYZ frames whose energy, free energy, forces and stress are stored
    as calculator results, so that ``ase.io.read(path, ":")`` returns them
    through a ``SinglePointCalculator``.  ``energy`` is GPAW's total energy
    extrapolated to zero smearing width; ``free_energy`` is the Mermin free
    energy whose derivatives are the forces and the stress.  Every frame's
    ``info`` holds ``config_type``, ``split`` (``"train"`` or ``"test"``),
    ``xc``, ``dft_code`` and the numerical settings.
``{system}_pbesol_reference.json``
    Equilibrium lattice constant and bulk modulus (Birch-Murnaghan fit of the
    ``eos`` frames) and phonon frequencies at Gamma and X, all with the same
    settings as the frames.

Frames (``config_type``)
------------------------
``eos``
    Ideal crystal, isotropic linear strains from -6 % to +6 % around the
    experimental lattice constant.
``rattle``
    Equilibrium cell, Gaussian random displacements (0.03-0.1 Angstrom).
``strain_rattle``
    Isotropic strains of +-1.5 % and +-3 % combined with random displacements.
``shear``
    Random symmetric strain tensors (all six components up to +-3 %), ideal
    positions.
``shear_rattle``
    Random strain tensors combined with random displacements.
``md_300K``, ``md_600K``, ``md_1000K``
    Thermal snapshots sampled with SevenNet-0 Langevin dynamics by
    ``scripts/make_md_geometries.py`` (run it first, with the Python
    environment in which ``sevenn`` is installed); every snapshot is rescaled
    isotropically to the DFT equilibrium lattice constant before the DFT
    calculation.
``phonon_fd``
    Finite displacements (+-0.01 Angstrom along x, y and z of each atom of the
    primitive basis) used for the phonon frequencies.

Stress
------
The stored stress includes the Pulay correction ``2/3 Ecut (dE/dEcut) / V``,
with dE/dEcut obtained from a central difference of the ideal-cell free energy
at ``Ecut +- 25 eV``.  Without it, GPAW's analytic stress would not be the
volume derivative of the fixed-cutoff energies (about 8 GPa off for Cu at
400 eV, negligible for Si).

All frames use the conventional cubic cell (8-atom diamond Si, 4-atom fcc Cu)
and identical DFT settings per system.  About 22 % of the frames of every
``config_type`` are marked ``split="test"`` with a fixed random seed.

Phonons
-------
The X point of the fcc Brillouin zone, 2 pi / a (1, 0, 0), is a reciprocal
lattice vector of the conventional cubic cell, so the force constants obtained
by displacing the primitive-basis atoms inside the conventional cell give the
exact (harmonic, finite-difference) dynamical matrix at Gamma and X.  Central
differences are used and the acoustic sum rule is imposed on the self terms.

PBEsol PAW datasets
-------------------
GPAW's bundled datasets cover LDA and PBE only.  The missing PBEsol datasets
are generated with GPAW's own generator (``gpaw-setup -f PBEsol <symbols>``,
default generation parameters, i.e. those of the bundled datasets) into
``--setup-dir`` and put in front of ``gpaw.setup_paths``.  With the same tool,
``gpaw-setup -f PBE Si`` reproduces the bundled ``Si.PBE`` dataset's lattice
constant to 1e-6 Angstrom.

Usage
-----
GPAW must be importable (here: the system Python)::

    python scripts/make_md_geometries.py          # once, in the sevenn env
    OMP_NUM_THREADS=1 python3 scripts/make_dft_data.py --system all
    OMP_NUM_THREADS=1 python3 scripts/make_dft_data.py --gpaw-log \\
        tests/data/gpaw_si_md.txt --system none

Finished frames are appended to ``{system}_pbesol.partial.extxyz`` in the
output directory, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.eos import EquationOfState
from ase.io import read, write

XC = "PBEsol"
TEST_FRACTION = 0.22
SPLIT_SEED = 7
FRAME_SEED = 2024
PHONON_DISPLACEMENT = 0.01  # Angstrom
EOS_STRAINS = np.linspace(-0.06, 0.06, 9)
#: Cutoff step (eV) of the central difference giving dE/dEcut for the Pulay stress.
PULAY_CUTOFF_STEP = 25.0
#: SCF convergence criteria (energy in eV per valence electron).
CONVERGENCE = {"energy": 1e-5, "density": 1e-5}


@dataclass(frozen=True)
class SystemSpec:
    """Crystal and DFT settings of one system.

    Attributes
    ----------
    name
        Short name used in file names (``"si"``, ``"cu"``).
    symbol
        Chemical symbol.
    structure
        Crystal structure understood by :func:`ase.build.bulk`.
    a_exp
        Experimental lattice constant (Angstrom), centre of the E-V scan.
    basis
        Indices, in the conventional cubic cell, of one atom of each
        primitive-basis site; these atoms are displaced for the phonons.
    pw_cutoff
        Plane-wave cutoff in eV.
    kpts
        Monkhorst-Pack mesh of the conventional cubic cell.
    gamma
        Whether the k-point mesh is Gamma-centred.
    width
        Fermi-Dirac smearing width in eV.
    rattle_stdevs
        Standard deviations (Angstrom) of the ``rattle`` frames.
    rattle_repeats
        Number of ``rattle`` frames per standard deviation.
    strain_rattle
        ``(isotropic strain, rattle stdev)`` of the ``strain_rattle`` frames.
    n_shear
        Number of ``shear`` frames.
    n_shear_rattle
        Number of ``shear_rattle`` frames.
    md_per_temperature
        Number of MD snapshots used per temperature (the first ones in the
        geometry file).
    """

    name: str
    symbol: str
    structure: str
    a_exp: float
    basis: tuple[int, ...]
    pw_cutoff: float
    kpts: tuple[int, int, int]
    gamma: bool
    width: float
    rattle_stdevs: tuple[float, ...]
    rattle_repeats: int
    strain_rattle: tuple[tuple[float, float], ...]
    n_shear: int
    n_shear_rattle: int
    md_per_temperature: int


SYSTEMS = {
    "si": SystemSpec(
        name="si",
        symbol="Si",
        structure="diamond",
        a_exp=5.431,
        basis=(0, 1),
        pw_cutoff=400.0,
        kpts=(3, 3, 3),
        gamma=False,
        width=0.01,
        rattle_stdevs=(0.03, 0.05, 0.07, 0.1),
        rattle_repeats=3,
        strain_rattle=(
            (-0.03, 0.03),
            (-0.03, 0.06),
            (-0.015, 0.03),
            (-0.015, 0.06),
            (0.015, 0.03),
            (0.015, 0.06),
            (0.03, 0.03),
            (0.03, 0.06),
        ),
        n_shear=6,
        n_shear_rattle=10,
        md_per_temperature=10,
    ),
    "cu": SystemSpec(
        name="cu",
        symbol="Cu",
        structure="fcc",
        a_exp=3.615,
        basis=(0,),
        pw_cutoff=400.0,
        kpts=(6, 6, 6),
        gamma=True,
        width=0.1,
        rattle_stdevs=(0.03, 0.06, 0.1),
        rattle_repeats=2,
        strain_rattle=((-0.03, 0.05), (-0.015, 0.05), (0.015, 0.05), (0.03, 0.05)),
        n_shear=3,
        n_shear_rattle=4,
        md_per_temperature=4,
    ),
}


# --------------------------------------------------------------------------
# PAW datasets and calculator
# --------------------------------------------------------------------------


def ensure_setups(symbols: list[str], setup_dir: Path) -> dict[str, dict[str, str]]:
    """Generate missing PBEsol PAW datasets and make GPAW find them.

    Parameters
    ----------
    symbols
        Chemical symbols that need a dataset.
    setup_dir
        Directory holding (or receiving) ``<symbol>.PBEsol`` files.

    Returns
    -------
    dict
        Per symbol: file name, SHA-256 checksum and generation command.
    """
    import gpaw

    setup_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for symbol in symbols:
        path = setup_dir / f"{symbol}.{XC}"
        command = ["gpaw-setup", "-f", XC, symbol]
        if not path.exists():
            subprocess.run(command, cwd=setup_dir, check=True, capture_output=True)
        info[symbol] = {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "generated_with": " ".join(command) + f" (GPAW {gpaw.__version__})",
        }
    if str(setup_dir) not in gpaw.setup_paths:
        gpaw.setup_paths.insert(0, str(setup_dir))
    return info


def dft_settings(spec: SystemSpec) -> dict[str, object]:
    """Return the DFT settings of ``spec`` as flat, extxyz-friendly values.

    Parameters
    ----------
    spec
        System specification.

    Returns
    -------
    dict
        Settings stored in every frame's ``info``.
    """
    import gpaw

    return {
        "xc": XC,
        "dft_code": f"GPAW {gpaw.__version__}",
        "mode": "PW",
        "pw_cutoff_eV": spec.pw_cutoff,
        "kpts": "x".join(str(k) for k in spec.kpts),
        "kpts_gamma_centred": spec.gamma,
        "smearing": "fermi-dirac",
        "smearing_width_eV": spec.width,
        "setups": f"{XC} PAW generated with gpaw-setup",
    }


def make_calculator(spec: SystemSpec, txt: str | Path | None = None, pw_cutoff: float | None = None):
    """Create a GPAW calculator with the settings of ``spec``.

    Parameters
    ----------
    spec
        System specification.
    txt
        GPAW text-output file; ``None`` for no output.
    pw_cutoff
        Plane-wave cutoff in eV overriding ``spec.pw_cutoff`` (only used to
        estimate the Pulay stress).

    Returns
    -------
    gpaw.GPAW
        A fresh calculator.
    """
    from gpaw import GPAW, PW, FermiDirac

    return GPAW(
        mode=PW(spec.pw_cutoff if pw_cutoff is None else pw_cutoff),
        xc=XC,
        kpts={"size": spec.kpts, "gamma": spec.gamma},
        occupations=FermiDirac(spec.width),
        convergence=CONVERGENCE,
        txt=txt,
    )


def compute(atoms: Atoms, spec: SystemSpec) -> Atoms:
    """Run one DFT single point and return a copy with stored results.

    Parameters
    ----------
    atoms
        Structure; its ``info`` is kept.
    spec
        System specification.

    Returns
    -------
    Atoms
        Copy of ``atoms`` with a ``SinglePointCalculator`` holding energy,
        free energy, forces and stress.
    """
    work = atoms.copy()
    work.calc = make_calculator(spec)
    results = {
        "energy": work.get_potential_energy(),
        "free_energy": work.get_potential_energy(force_consistent=True),
        "forces": work.get_forces(),
        "stress": work.get_stress(),
    }
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, **results)
    return out


# --------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------


def ideal_cell(spec: SystemSpec, a: float) -> Atoms:
    """Return the ideal conventional cubic cell with lattice constant ``a``.

    Parameters
    ----------
    spec
        System specification.
    a
        Lattice constant in Angstrom.

    Returns
    -------
    Atoms
        Conventional cubic cell.
    """
    return bulk(spec.symbol, spec.structure, a=a, cubic=True)


def strained(atoms: Atoms, strain: np.ndarray) -> Atoms:
    """Apply a homogeneous strain, moving the atoms with the cell.

    Parameters
    ----------
    atoms
        Structure to deform.
    strain
        Symmetric 3x3 strain tensor.

    Returns
    -------
    Atoms
        Deformed copy.
    """
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return out


def rattled(atoms: Atoms, stdev: float, rng: np.random.Generator) -> Atoms:
    """Displace every atom by a Gaussian random vector.

    Parameters
    ----------
    atoms
        Structure to perturb.
    stdev
        Standard deviation of each Cartesian component in Angstrom.
    rng
        Random-number generator.

    Returns
    -------
    Atoms
        Perturbed copy.
    """
    out = atoms.copy()
    out.positions += rng.normal(0.0, stdev, size=out.positions.shape)
    return out


def voigt(strain: np.ndarray) -> np.ndarray:
    """Return the Voigt vector (xx, yy, zz, yz, xz, xy) of a strain tensor.

    Parameters
    ----------
    strain
        Symmetric 3x3 tensor.

    Returns
    -------
    numpy.ndarray
        Six components (engineering shear strains not doubled).
    """
    return np.array([strain[0, 0], strain[1, 1], strain[2, 2], strain[1, 2], strain[0, 2], strain[0, 1]])


def random_strain(rng: np.random.Generator, amplitude: float = 0.03) -> np.ndarray:
    """Draw a symmetric strain tensor with components uniform in [-amplitude, amplitude].

    Parameters
    ----------
    rng
        Random-number generator.
    amplitude
        Largest absolute value of a component.

    Returns
    -------
    numpy.ndarray
        Symmetric 3x3 strain tensor.
    """
    upper = np.triu(rng.uniform(-amplitude, amplitude, size=(3, 3)))
    return upper + np.triu(upper, 1).T


def tagged(atoms: Atoms, config_type: str, **info: object) -> Atoms:
    """Attach ``config_type`` and extra ``info`` entries to ``atoms``.

    Parameters
    ----------
    atoms
        Structure (modified in place).
    config_type
        Frame category.
    **info
        Additional ``info`` entries.

    Returns
    -------
    Atoms
        The same object, for chaining.
    """
    atoms.info["config_type"] = config_type
    atoms.info.update(info)
    return atoms


def eos_structures(spec: SystemSpec) -> list[Atoms]:
    """Return the ideal crystals of the E-V scan.

    Parameters
    ----------
    spec
        System specification.

    Returns
    -------
    list of Atoms
        One frame per isotropic strain in ``EOS_STRAINS``.
    """
    return [
        tagged(ideal_cell(spec, spec.a_exp * (1 + eps)), "eos", isotropic_strain=float(eps))
        for eps in EOS_STRAINS
    ]


def perturbed_structures(spec: SystemSpec, a0: float, md_file: Path) -> list[Atoms]:
    """Return the rattled, strained, MD and phonon frames around ``a0``.

    Parameters
    ----------
    spec
        System specification.
    a0
        DFT equilibrium lattice constant in Angstrom.
    md_file
        Extended-XYZ file written by ``scripts/make_md_geometries.py``.

    Returns
    -------
    list of Atoms
        Frames in a fixed, reproducible order.
    """
    rng = np.random.default_rng(FRAME_SEED + sum(map(ord, spec.name)))
    ref = ideal_cell(spec, a0)
    frames: list[Atoms] = []
    for stdev in spec.rattle_stdevs:
        for _ in range(spec.rattle_repeats):
            frames.append(tagged(rattled(ref, stdev, rng), "rattle", rattle_stdev=stdev))
    for eps, stdev in spec.strain_rattle:
        base = strained(ref, eps * np.eye(3))
        frames.append(
            tagged(rattled(base, stdev, rng), "strain_rattle", isotropic_strain=eps, rattle_stdev=stdev)
        )
    for _ in range(spec.n_shear):
        strain = random_strain(rng)
        frames.append(tagged(strained(ref, strain), "shear", strain_voigt=voigt(strain)))
    for _ in range(spec.n_shear_rattle):
        strain = random_strain(rng)
        stdev = float(rng.uniform(0.03, 0.1))
        frames.append(
            tagged(
                rattled(strained(ref, strain), stdev, rng),
                "shear_rattle",
                strain_voigt=voigt(strain),
                rattle_stdev=stdev,
            )
        )
    frames += md_structures(spec, a0, md_file)
    frames += [tagged(atoms, "phonon_fd") for atoms in phonon_structures(spec, a0)]
    return frames


def md_structures(spec: SystemSpec, a0: float, md_file: Path) -> list[Atoms]:
    """Read the MD snapshots of ``spec`` and rescale them to ``a0``.

    Parameters
    ----------
    spec
        System specification.
    a0
        DFT equilibrium lattice constant in Angstrom.
    md_file
        Extended-XYZ file written by ``scripts/make_md_geometries.py``.

    Returns
    -------
    list of Atoms
        The first ``spec.md_per_temperature`` snapshots of each temperature,
        tagged ``md_<T>K``.
    """
    frames = []
    used: dict[float, int] = {}
    for snap in read(md_file, ":"):
        if snap.info["system"] != spec.name:
            continue
        used[snap.info["temperature_K"]] = used.get(snap.info["temperature_K"], 0) + 1
        if used[snap.info["temperature_K"]] > spec.md_per_temperature:
            continue
        atoms = Atoms(snap.get_chemical_symbols(), positions=snap.positions, cell=snap.cell, pbc=True)
        atoms.set_cell(snap.cell.array * a0 / snap.info["md_lattice_constant"], scale_atoms=True)
        temperature = round(snap.info["temperature_K"])
        frames.append(
            tagged(atoms, f"md_{temperature}K", temperature_K=temperature, md_model=snap.info["md_model"])
        )
    return frames


def phonon_structures(spec: SystemSpec, a0: float) -> list[Atoms]:
    """Return the finite-displacement frames of the phonon calculation.

    The order is: for each basis atom, for each Cartesian direction, the
    positive then the negative displacement.

    Parameters
    ----------
    spec
        System specification.
    a0
        DFT equilibrium lattice constant in Angstrom.

    Returns
    -------
    list of Atoms
        Displaced copies of the ideal cell with ``info`` keys
        ``displaced_atom``, ``displacement_direction`` and ``displacement``.
    """
    ref = ideal_cell(spec, a0)
    frames = []
    for index in spec.basis:
        for direction in range(3):
            for sign in (1, -1):
                atoms = ref.copy()
                atoms.positions[index, direction] += sign * PHONON_DISPLACEMENT
                atoms.info.update(
                    displaced_atom=index,
                    displacement_direction="xyz"[direction],
                    displacement=sign * PHONON_DISPLACEMENT,
                )
                frames.append(atoms)
    return frames


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------


def estimate_dedecut(spec: SystemSpec, a0: float) -> float:
    """Estimate dE/dEcut of the ideal cell by a central difference.

    Parameters
    ----------
    spec
        System specification.
    a0
        Lattice constant in Angstrom.

    Returns
    -------
    float
        Derivative of the free energy of the cell with respect to the
        plane-wave cutoff at ``spec.pw_cutoff`` (dimensionless, eV per eV).
    """
    energies = []
    for sign in (-1, 1):
        atoms = ideal_cell(spec, a0)
        atoms.calc = make_calculator(spec, pw_cutoff=spec.pw_cutoff + sign * PULAY_CUTOFF_STEP)
        energies.append(atoms.get_potential_energy(force_consistent=True))
    return (energies[1] - energies[0]) / (2 * PULAY_CUTOFF_STEP)


def pulay_corrected(atoms: Atoms, spec: SystemSpec, dedecut: float) -> Atoms:
    """Add the Pulay stress to a frame's stress.

    At a fixed cutoff, GPAW's analytic stress is the strain derivative at a
    fixed set of plane waves, whereas the energies of different cells are
    compared at a fixed cutoff.  The difference is the isotropic Pulay stress
    ``2/3 * Ecut * dE/dEcut / V``, which GPAW adds itself when given
    ``PW(ecut, dedecut=...)``; adding it afterwards gives identical results.

    Parameters
    ----------
    atoms
        Frame with a ``SinglePointCalculator``.
    spec
        System specification.
    dedecut
        Result of :func:`estimate_dedecut`.

    Returns
    -------
    Atoms
        Copy with the corrected stress and ``info["pulay_dedecut"]`` set.
    """
    results = dict(atoms.calc.results)
    pulay = 2 / 3 * spec.pw_cutoff * dedecut / atoms.get_volume()
    results["stress"] = results["stress"] + pulay * np.array([1, 1, 1, 0, 0, 0])
    out = atoms.copy()
    out.info["pulay_dedecut"] = dedecut
    out.calc = SinglePointCalculator(out, **results)
    return out


def fit_eos(frames: list[Atoms]) -> dict[str, float]:
    """Fit a Birch-Murnaghan equation of state to the ``eos`` frames.

    Parameters
    ----------
    frames
        Frames of the cubic E-V scan with stored energies.

    Returns
    -------
    dict
        Lattice constant, volume and energy per atom, bulk modulus (GPa) and
        the RMS fit residual.
    """
    volumes = np.array([atoms.get_volume() for atoms in frames])
    energies = np.array([atoms.get_potential_energy() for atoms in frames])
    natoms = len(frames[0])
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, e0, b0 = eos.fit()
    residual = energies - eos.func(volumes, *eos.eos_parameters)
    return {
        "lattice_constant_A": float(v0 ** (1 / 3)),
        "volume_per_atom_A3": float(v0 / natoms),
        "energy_per_atom_eV": float(e0 / natoms),
        "bulk_modulus_GPa": float(b0 / units.GPa),
        "bulk_modulus_pressure_derivative": float(eos.eos_parameters[2]),
        "fit_rms_residual_meV_per_atom": float(1000 * np.sqrt(np.mean(residual**2)) / natoms),
    }


def phonon_frequencies(spec: SystemSpec, displaced: list[Atoms]) -> dict[str, dict[str, object]]:
    """Compute phonon frequencies at Gamma and X from finite displacements.

    Parameters
    ----------
    spec
        System specification.
    displaced
        DFT frames in the order of :func:`phonon_structures`.

    Returns
    -------
    dict
        For ``"Gamma"`` and ``"X"``: the Cartesian q-vector in units of
        2 pi / a and the sorted frequencies in THz (imaginary modes negative).
    """
    cell = displaced[0].cell.array
    a = cell[0, 0]
    ref = ideal_cell(spec, a)
    masses = ref.get_masses()
    primitive = bulk(spec.symbol, spec.structure, a=a).cell.array
    nbasis = len(spec.basis)
    natoms = len(ref)

    # Site (primitive-basis index) of every atom of the conventional cell.
    site = np.empty(natoms, dtype=int)
    for j in range(natoms):
        for k, index in enumerate(spec.basis):
            frac = np.linalg.solve(primitive.T, ref.positions[j] - ref.positions[index])
            if np.allclose(frac, np.round(frac), atol=1e-6):
                site[j] = k
                break
        else:
            raise ValueError(f"atom {j} is on no primitive-basis site")

    # Force constants Phi[k, alpha, j, beta] = d2E / du_(basis k, alpha) du_(j, beta).
    phi = np.empty((nbasis, 3, natoms, 3))
    frames = iter(displaced)
    for k in range(nbasis):
        for alpha in range(3):
            plus, minus = next(frames), next(frames)
            phi[k, alpha] = -(plus.get_forces() - minus.get_forces()) / (2 * PHONON_DISPLACEMENT)
    for k, index in enumerate(spec.basis):
        phi[k, :, index, :] -= phi[k].sum(axis=1)  # acoustic sum rule

    to_thz = np.sqrt(units._e / units._amu) * 1e10 / (2 * np.pi) / 1e12
    result = {}
    for label, q_red in (("Gamma", np.zeros(3)), ("X", np.array([1.0, 0.0, 0.0]))):
        q = 2 * np.pi / a * q_red
        dyn = np.zeros((nbasis, 3, nbasis, 3), dtype=complex)
        for k, index in enumerate(spec.basis):
            for j in range(natoms):
                phase = np.exp(1j * q @ (ref.positions[j] - ref.positions[index]))
                mass = np.sqrt(masses[index] * masses[j])
                dyn[k, :, site[j], :] += phi[k, :, j, :] * phase / mass
        dyn = dyn.reshape(3 * nbasis, 3 * nbasis)
        eigenvalues = np.linalg.eigvalsh(0.5 * (dyn + dyn.conj().T))
        frequencies = np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * to_thz
        result[label] = {
            "q_cartesian_2pi_over_a": q_red.tolist(),
            "frequencies_THz": [round(float(f), 4) for f in np.sort(frequencies)],
        }
    return result


def assign_splits(frames: list[Atoms]) -> None:
    """Mark about ``TEST_FRACTION`` of each ``config_type`` as ``split="test"``.

    Parameters
    ----------
    frames
        Frames, modified in place (``info["split"]``).
    """
    rng = np.random.default_rng(SPLIT_SEED)
    config_types = sorted({atoms.info["config_type"] for atoms in frames})
    for config_type in config_types:
        members = [i for i, atoms in enumerate(frames) if atoms.info["config_type"] == config_type]
        n_test = round(TEST_FRACTION * len(members))
        test = set(rng.choice(members, size=n_test, replace=False).tolist())
        for i in members:
            frames[i].info["split"] = "test" if i in test else "train"


# --------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------


def run_frames(structures: list[Atoms], spec: SystemSpec, partial: Path, done: list[Atoms]) -> list[Atoms]:
    """Compute the frames that are not yet in ``done``, appending each to ``partial``.

    Parameters
    ----------
    structures
        All structures of this stage, in order.
    spec
        System specification.
    partial
        Checkpoint file receiving every finished frame.
    done
        Frames of this stage already computed (a prefix of ``structures``).

    Returns
    -------
    list of Atoms
        All frames of this stage with results.
    """
    results = list(done)
    settings = dft_settings(spec)
    for i, atoms in enumerate(structures[len(done) :], start=len(done)):
        atoms.info.update(settings)
        start = time.time()
        frame = compute(atoms, spec)
        write(partial, frame, format="extxyz", append=True)
        results.append(frame)
        print(
            f"{spec.name} {i + 1}/{len(structures)} {atoms.info['config_type']}: "
            f"E = {frame.get_potential_energy():.5f} eV, {time.time() - start:.1f} s",
            flush=True,
        )
    return results


def generate(spec: SystemSpec, out: Path, md_file: Path, setups: dict[str, dict[str, str]]) -> None:
    """Compute all frames of one system and write the data and reference files.

    Parameters
    ----------
    spec
        System specification.
    out
        Output directory.
    md_file
        Extended-XYZ file with the MD geometries.
    setups
        PAW dataset provenance returned by :func:`ensure_setups`.
    """
    import gpaw

    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{spec.name}_pbesol.partial.extxyz"
    previous = read(partial, ":") if partial.exists() else []

    eos_frames = run_frames(eos_structures(spec), spec, partial, previous[: len(EOS_STRAINS)])
    eos = fit_eos(eos_frames)
    a0 = eos["lattice_constant_A"]
    print(f"{spec.name}: a0 = {a0:.4f} A, B0 = {eos['bulk_modulus_GPa']:.1f} GPa", flush=True)

    structures = perturbed_structures(spec, a0, md_file)
    frames = eos_frames + run_frames(structures, spec, partial, previous[len(EOS_STRAINS) :])
    dedecut = estimate_dedecut(spec, a0)
    frames = [pulay_corrected(atoms, spec, dedecut) for atoms in frames]
    assign_splits(frames)
    write(out / f"{spec.name}_pbesol.extxyz", frames, format="extxyz")

    phonon_frames = [atoms for atoms in frames if atoms.info["config_type"] == "phonon_fd"]
    counts: dict[str, dict[str, int]] = {}
    for atoms in frames:
        entry = counts.setdefault(atoms.info["config_type"], {"train": 0, "test": 0})
        entry[atoms.info["split"]] += 1
    reference = {
        "system": f"{spec.symbol} {spec.structure}",
        "cell": f"conventional cubic, {len(frames[0])} atoms",
        "dft": {
            **dft_settings(spec),
            "kpts": list(spec.kpts),
            "scf_convergence": CONVERGENCE,
            "pulay_stress_correction": {
                "dE_dEcut": dedecut,
                "method": f"central difference of the ideal-cell free energy, Ecut +- {PULAY_CUTOFF_STEP} eV",
                "pulay_stress_at_a0_GPa": 2 / 3 * spec.pw_cutoff * dedecut / a0**3 / units.GPa,
            },
            "gpaw_version": gpaw.__version__,
            "paw_datasets": setups,
        },
        "equation_of_state": {
            "type": "birchmurnaghan (ase.eos)",
            "isotropic_strains_around_a_exp": [round(float(e), 4) for e in EOS_STRAINS],
            "a_exp_A": spec.a_exp,
            **eos,
        },
        "phonons": {
            "method": (
                "finite displacements (central differences) in the conventional cubic cell, "
                "exact at Gamma and X; acoustic sum rule imposed"
            ),
            "displacement_A": PHONON_DISPLACEMENT,
            **phonon_frequencies(spec, phonon_frames),
        },
        "frames": {"total": len(frames), "per_config_type": counts},
    }
    path = out / f"{spec.name}_pbesol_reference.json"
    path.write_text(json.dumps(reference, indent=2) + "\n")
    partial.unlink()
    print(f"wrote {out / f'{spec.name}_pbesol.extxyz'} and {path}", flush=True)


class _StressLogger:
    """MD observer asking the calculator for the stress, so GPAW prints it."""

    def __init__(self, atoms: Atoms) -> None:
        self.atoms = atoms

    def __call__(self) -> None:
        self.atoms.get_stress()


def write_gpaw_log(path: Path, steps: int = 6) -> None:
    """Write the GPAW text output of a short Si molecular-dynamics run.

    A rattled 8-atom Si cell at the experimental lattice constant is
    propagated with velocity Verlet (2 fs, initial temperature 600 K) using the
    Si production settings; forces and stress are printed at every step.

    Parameters
    ----------
    path
        Destination of the GPAW ``txt`` output.
    steps
        Number of MD steps.
    """
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    spec = SYSTEMS["si"]
    rng = np.random.default_rng(FRAME_SEED)
    atoms = rattled(ideal_cell(spec, spec.a_exp), 0.05, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    atoms.calc = make_calculator(spec, txt=path)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    dyn.attach(_StressLogger(atoms), interval=1)
    dyn.run(steps)


def main() -> None:
    """Parse the command line and generate the requested data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["si", "cu", "all", "none"], default="all")
    parser.add_argument("--out", type=Path, default=Path("examples/data"))
    parser.add_argument("--md-geometries", type=Path, default=Path("examples/data/md_geometries.extxyz"))
    parser.add_argument(
        "--setup-dir",
        type=Path,
        default=Path.home() / ".cache" / "ase_sparsecalc" / "gpaw-setups",
        help="directory for the generated PBEsol PAW datasets",
    )
    parser.add_argument("--gpaw-log", type=Path, help="also write the GPAW log of a short Si MD run here")
    args = parser.parse_args()

    names = {"all": ["si", "cu"], "none": []}.get(args.system, [args.system])
    setups = ensure_setups([SYSTEMS[name].symbol for name in SYSTEMS], args.setup_dir.resolve())
    for name in names:
        spec = SYSTEMS[name]
        generate(spec, args.out, args.md_geometries, {spec.symbol: setups[spec.symbol]})
    if args.gpaw_log is not None:
        write_gpaw_log(args.gpaw_log)


if __name__ == "__main__":
    main()
