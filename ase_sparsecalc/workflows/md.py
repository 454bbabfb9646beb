"""Molecular dynamics (NVE, NVT, NPT) with ASE's integrators.

Integrators:

* NVE: :class:`ase.md.verlet.VelocityVerlet`.
* NVT: :class:`ase.md.langevin.Langevin` (default), :class:`ase.md.bussi.Bussi` (stochastic
  velocity rescaling, which disturbs the dynamics least) or
  :class:`ase.md.nose_hoover_chain.NoseHooverChainNVT`.
* NPT: the Martyna–Tobias–Klein integrators of :mod:`ase.md.nose_hoover_chain`,
  :class:`~ase.md.nose_hoover_chain.IsotropicMTKNPT` (volume only, default) or
  :class:`~ase.md.nose_hoover_chain.MTKNPT` (full cell).

Every ``log_interval`` steps the run records time, potential, kinetic and total energy, the
instantaneous temperature, pressure and volume (3-D cells) and, where the integrator defines
one, the conserved energy of the extended system.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.md.md import MolecularDynamics
from ase.md.velocitydistribution import Stationary

from ..calculator import has_3d_cell
from ..errors import ConfigError
from ..structure_io import drop_input_labels
from ._output import streamed_frames, streamed_text
from ._periodicity import warn_about_periodic_vacuum

logger = logging.getLogger(__name__)

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "bussi", "nose-hoover")
BAROSTATS = ("isotropic", "full")

LOG_COLUMNS = (
    ("time", "fs"),
    ("Epot", "eV"),
    ("Ekin", "eV"),
    ("Etot", "eV"),
    ("Econs", "eV"),
    ("T", "K"),
    ("P", "GPa"),
    ("V", "Å^3"),
)


@dataclass
class MDResult:
    """What an MD run recorded, one entry per logged step.

    Attributes
    ----------
    atoms : ase.Atoms
        The final structure, with momenta and the calculator attached.
    ensemble, integrator : str
        ``"nve"``/``"nvt"``/``"npt"`` and the ASE class used.
    timestep_fs : float
    steps : int
        Steps run.
    time_fs : (M,) array
        Time of each record, fs.
    potential_energy, kinetic_energy, total_energy : (M,) arrays, eV
    conserved_energy : (M,) array, eV
        The integrator's conserved quantity: the total energy for NVE, total energy minus the
        energy exchanged with the thermostat for Bussi, the extended-system energy for the
        Nosé–Hoover and MTK integrators; NaN for Langevin, which conserves nothing.
    temperature : (M,) array
        Instantaneous temperature in K, 2 E_kin / (k_B N_dof) with N_dof = ``degrees_of_freedom``
        (3N minus 3 for the fixed centre of mass, minus what constraints remove).
    pressure, volume : (M,) arrays or None
        Pressure in GPa (virial plus ideal-gas term) and volume in Å³; None without a 3-D cell.
    degrees_of_freedom : int
    wall_time_s : float
    """

    atoms: Atoms
    ensemble: str
    integrator: str
    timestep_fs: float
    steps: int
    time_fs: np.ndarray
    potential_energy: np.ndarray
    kinetic_energy: np.ndarray
    total_energy: np.ndarray
    conserved_energy: np.ndarray
    temperature: np.ndarray
    pressure: np.ndarray | None
    volume: np.ndarray | None
    degrees_of_freedom: int
    wall_time_s: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        """Number of atoms of the final structure."""
        return len(self.atoms)

    @property
    def drift_per_atom(self) -> float:
        """Systematic change of the conserved energy over the run, eV/atom: the slope of a
        straight line fitted to it, times the run's length (NaN for Langevin).

        Unlike the last record minus the first, this leaves out the integrator's bounded
        oscillation, whose phase at either end would otherwise read as drift.
        """
        time = np.asarray(self.time_fs, dtype=float)
        if len(time) < 2 or time[-1] == time[0]:
            return 0.0
        slope = np.polyfit(time, np.asarray(self.conserved_energy, dtype=float), 1)[0]
        return float(slope * (time[-1] - time[0])) / self.n_atoms

    @property
    def fluctuation_per_atom(self) -> float:
        """Standard deviation of the conserved energy over the run, eV/atom."""
        return float(np.std(self.conserved_energy)) / self.n_atoms

    def mean_temperature(self, skip: float = 0.2) -> float:
        """Mean temperature (K) after discarding the first fraction ``skip`` of the records."""
        start = int(skip * len(self.temperature))
        return float(np.mean(self.temperature[start:]))


def run_md(
    atoms: Atoms,
    calc: Calculator,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    *,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    seed: int = 0,
    init_velocities: bool = True,
    thermostat: str = "langevin",
    friction_per_fs: float = 0.01,
    tdamp_fs: float | None = None,
    pressure_GPa: float = 0.0,
    barostat: str = "isotropic",
    pdamp_fs: float | None = None,
    log_interval: int = 1,
    trajectory_interval: int = 10,
    progress: bool = True,
    **renamed: object,
) -> MDResult:
    """Run molecular dynamics on a copy of ``atoms``.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure (not modified).
    calc : ase Calculator
        Usually a :class:`~ase_sparsecalc.SparseCalc`.
    ensemble : {"nve", "nvt", "npt"}
    temperature_K : float
        Target temperature of NVT/NPT, and the temperature of the initial velocities.
    timestep_fs : float
        Time step, fs (1–2 fs for most solids; 0.5 fs with hydrogen).
    steps : int
        Number of MD steps.
    trajectory : str or Path, optional
        Trajectory file (``.traj`` or ``.extxyz``), one frame every ``trajectory_interval``
        steps, with energy, forces and stress. (``traj=`` and ``traj_interval=``, the earlier
        names, still work, with a FutureWarning.)
    logfile : str or Path, optional
        Text log, one line every ``log_interval`` steps (columns in :data:`LOG_COLUMNS`).
    seed : int
        Seed of the initial velocities and of the stochastic thermostats.
    init_velocities : bool
        Draw Maxwell–Boltzmann velocities at ``temperature_K`` (centre-of-mass motion removed,
        then scaled to exactly ``temperature_K``). False: keep the momenta ``atoms`` carries.
    thermostat : {"langevin", "bussi", "nose-hoover"}
        NVT thermostat.
    friction_per_fs : float
        Langevin friction, 1/fs (0.01 is gentle, 0.1 strong).
    tdamp_fs : float, optional
        Bussi / Nosé–Hoover / MTK thermostat time constant, fs (default 100 time steps).
    pressure_GPa : float
        NPT external pressure, GPa.
    barostat : {"isotropic", "full"}
        NPT cell degrees of freedom: volume only, or the full cell.
    pdamp_fs : float, optional
        Barostat time constant, fs (default 1000 time steps).
    log_interval, trajectory_interval : int
        Steps between log records / trajectory frames.
    progress : bool
        Show a progress bar (tqdm, on stderr).

    Returns
    -------
    MDResult

    Notes
    -----
    Output files are written as ``.NAME.part`` and renamed when the run completes.

    The reported temperature counts 3N - 3 degrees of freedom, since the total momentum stays
    zero (less what constraints remove). ASE's Nosé–Hoover chain and MTK integrators thermostat
    3N; they are given the target scaled by (degrees of freedom) / 3N, so that the reported mean
    temperature is the target in small cells too (unscaled: 1.14 times it for 8 atoms).
    """
    if renamed:
        options = _renamed_options(renamed)
        trajectory = options.get("trajectory", trajectory)
        trajectory_interval = options.get("trajectory_interval", trajectory_interval)
    _check_choice("ensemble", ensemble, ENSEMBLES)
    _check_choice("thermostat", thermostat, THERMOSTATS)
    _check_choice("barostat", barostat, BAROSTATS)
    positive = {"timestep_fs": timestep_fs, "steps": steps, "log_interval": log_interval}
    if trajectory:
        positive["trajectory_interval"] = trajectory_interval
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if ensemble != "npt" and pressure_GPa != 0.0:
        raise ConfigError(
            f"pressure_GPa={pressure_GPa:g} needs the NPT ensemble; {ensemble.upper()} keeps the cell"
        )
    if ensemble != "nve" and not temperature_K > 0:
        raise ConfigError(f"{ensemble.upper()} needs temperature_K > 0, got {temperature_K}")
    periodic = has_3d_cell(atoms)
    if ensemble == "npt" and not periodic:
        from ..errors import StructureError

        raise StructureError(
            f"{atoms.get_chemical_formula()}: NPT needs a cell periodic in 3 dimensions "
            f"(pbc={atoms.pbc.tolist()}); use nvt or nve"
        )
    if ensemble == "npt":
        warn_about_periodic_vacuum(atoms, "the barostat")
        _refuse_constraints_under_a_barostat(atoms)

    atoms = atoms.copy()
    drop_input_labels(atoms)  # the input's DFT labels (REF_energy, ...) would go into every frame
    if ensemble == "npt":  # a FixCom from an earlier run's file: the integrator keeps the momentum
        atoms.set_constraint([c for c in atoms.constraints if not isinstance(c, FixCom)])
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    ndof = degrees_of_freedom(atoms)
    constraints = list(atoms.constraints)  # the integrator may add FixCom for the run only
    if init_velocities:
        initialise_velocities(atoms, temperature_K, rng, ndof)
    dyn = _integrator(
        atoms, ensemble, temperature_K, timestep_fs, rng, thermostat, friction_per_fs,
        tdamp_fs, pressure_GPa, barostat, pdamp_fs,
    )  # fmt: skip
    recorder = _Recorder(atoms, dyn, ndof, periodic)
    atoms.get_forces()  # a structure the model cannot evaluate fails here, before any file is opened

    start = time.perf_counter()
    with (
        streamed_frames(trajectory) as frames,
        streamed_text(logfile) as log,
        _progress(steps, progress) as bar,
    ):
        if log is not None:
            log.write(_log_header(atoms, dyn, ensemble, timestep_fs, ndof))
        dyn.attach(lambda: recorder.record(log), interval=log_interval)
        if frames is not None:
            dyn.attach(lambda: _write_frame(frames, atoms, constraints), interval=trajectory_interval)
        if bar is not None:
            dyn.attach(lambda: _update_bar(bar, dyn, recorder), interval=1)
        dyn.run(steps)
    wall = time.perf_counter() - start
    atoms.set_constraint(constraints)
    logger.info("%d MD steps in %.1f s", steps, wall)

    files = {k: Path(v) for k, v in (("trajectory", trajectory), ("log", logfile)) if v is not None}
    return recorder.result(ensemble, type(dyn).__name__, timestep_fs, steps, wall, files)


_RENAMED = {"traj": "trajectory", "traj_interval": "trajectory_interval"}


def _renamed_options(options: dict[str, object]) -> dict[str, object]:
    """The earlier names of run_md's options under their present names, with a FutureWarning;
    a TypeError, as Python gives, for any other unexpected keyword."""
    unknown = sorted(set(options) - set(_RENAMED))
    if unknown:
        raise TypeError(f"run_md() got an unexpected keyword argument {unknown[0]!r}")
    warnings.warn(
        "run_md's "
        + " and ".join(f"{old}= is now {_RENAMED[old]}=" for old in options)
        + ", as in ASE's dynamics and relax()",
        FutureWarning,
        stacklevel=3,
    )
    return {_RENAMED[old]: value for old, value in options.items()}


def _write_frame(frames, atoms: Atoms, constraints: list) -> None:
    """Write ``atoms`` with the constraints it came with, not those the integrator added for the
    run (a FixCom in the file would stop a later NPT run from it)."""
    during = atoms.constraints
    atoms.set_constraint(constraints)
    try:
        frames.write(atoms)
    finally:
        atoms.set_constraint(during)


def _refuse_constraints_under_a_barostat(atoms: Atoms) -> None:
    """ASE's MTK barostats move every atom with the cell and take no constraints; say so before
    the run instead of failing in the integrator. A FixCom (left by an earlier NVT run) is dropped."""
    held = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixCom)]
    if held:
        raise ConfigError(
            f"{atoms.get_chemical_formula()}: NPT (ASE's MTK integrators) takes no constraints, and the "
            f"structure has {', '.join(held)}; remove them (atoms.set_constraint()) or run NVT"
        )


def degrees_of_freedom(atoms: Atoms) -> int:
    """3N minus what constraints remove, minus 3 for the fixed centre of mass (at least 1).

    Every integrator here keeps the total momentum at zero (Langevin and Bussi through a
    :class:`~ase.constraints.FixCom` constraint), so the centre of mass never takes up energy.
    Atoms pinned in space (:func:`pins_atoms`: a slab's fixed bottom layers) break momentum
    conservation; then only what the constraints remove is subtracted.
    """
    dof = 3 * len(atoms) - sum(c.get_removed_dof(atoms) for c in atoms.constraints)
    if not any(isinstance(c, FixCom) for c in atoms.constraints) and not pins_atoms(atoms):
        dof -= 3
    return max(dof, 1)


def pins_atoms(atoms: Atoms) -> bool:
    """Whether a constraint holds atoms in place in space (fully or along some directions):
    ASE's FixAtoms, FixCartesian, FixScaled, FixedLine and FixedPlane. The total momentum of
    such a system is not conserved, and fixing the centre of mass would drag the pinned atoms."""
    from ase import constraints

    pinning = tuple(
        getattr(constraints, name)
        for name in ("FixAtoms", "FixCartesian", "FixScaled", "FixedLine", "FixedPlane")
        if hasattr(constraints, name)
    )
    return any(isinstance(c, pinning) for c in atoms.constraints)


def initialise_velocities(atoms: Atoms, temperature_K: float, rng: np.random.Generator, ndof: int) -> None:
    """Maxwell–Boltzmann momenta, zero total momentum, scaled to exactly ``temperature_K``."""
    if temperature_K <= 0:
        atoms.set_momenta(np.zeros((len(atoms), 3)))
        return
    from ase.md import velocitydistribution as vd

    # thermalize_momenta is the ASE >= 3.29 name of MaxwellBoltzmannDistribution
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=temperature_K, rng=rng)  # pinned atoms' momenta stay zero
    if not pins_atoms(atoms):
        Stationary(atoms, preserve_temperature=False)
    current = 2.0 * atoms.get_kinetic_energy() / (ndof * units.kB)
    if current > 0:
        atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature_K / current))


def _integrator(
    atoms: Atoms,
    ensemble: str,
    temperature_K: float,
    timestep_fs: float,
    rng: np.random.Generator,
    thermostat: str,
    friction_per_fs: float,
    tdamp_fs: float | None,
    pressure_GPa: float,
    barostat: str,
    pdamp_fs: float | None,
) -> MolecularDynamics:
    dt = timestep_fs * units.fs
    tdamp = (tdamp_fs if tdamp_fs is not None else 100 * timestep_fs) * units.fs
    pdamp = (pdamp_fs if pdamp_fs is not None else 1000 * timestep_fs) * units.fs
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        # ASE's advice: fix the centre of mass with a constraint (not Langevin's fixcm=True); it
        # also makes Bussi count 3N - 3 degrees of freedom. Not with pinned atoms, which FixCom
        # would drag along with the others.
        has_fixcom = any(isinstance(c, FixCom) for c in atoms.constraints)
        if thermostat in ("langevin", "bussi") and not has_fixcom and not pins_atoms(atoms):
            atoms.constraints = [*atoms.constraints, FixCom()]
        if thermostat == "langevin":
            from ase.md.langevin import Langevin

            return Langevin(
                atoms, timestep=dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                fixcm=False, rng=rng,
            )  # fmt: skip
        if thermostat == "bussi":
            from ase.md.bussi import Bussi

            return Bussi(atoms, timestep=dt, temperature_K=temperature_K, taut=tdamp, rng=rng)
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(
            atoms, timestep=dt, temperature_K=_chain_target(atoms, temperature_K), tdamp=tdamp
        )
    from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

    cls = IsotropicMTKNPT if barostat == "isotropic" else MTKNPT
    return cls(
        atoms, timestep=dt, temperature_K=_chain_target(atoms, temperature_K),
        pressure_au=pressure_GPa * units.GPa, tdamp=tdamp, pdamp=pdamp,
    )  # fmt: skip


def _chain_target(atoms: Atoms, temperature_K: float) -> float:
    """K: the temperature to give ASE's Nosé–Hoover chains (NVT and MTK) so that the atoms' mean
    kinetic energy is (degrees of freedom) × kT/2 at ``temperature_K``.

    The chains drive 3N degrees of freedom to kT/2 each, but the total momentum stays zero and
    constraints hold some atoms: only :func:`degrees_of_freedom` of them move. Without this
    scaling an 8-atom cell runs at 3N / (3N - 3) = 1.14 times the target temperature.
    """
    return temperature_K * degrees_of_freedom(atoms) / (3 * len(atoms))


class _Recorder:
    """Collects one row of observables per call and writes it to the log."""

    def __init__(self, atoms: Atoms, dyn: MolecularDynamics, ndof: int, periodic: bool) -> None:
        self.atoms, self.dyn, self.ndof, self.periodic = atoms, dyn, ndof, periodic
        self.rows: list[tuple[float, ...]] = []

    def conserved(self, etot: float) -> float:
        dyn = self.dyn
        if hasattr(dyn, "get_conserved_energy"):
            return float(dyn.get_conserved_energy())
        if hasattr(dyn, "transferred_energy"):  # Bussi
            return etot - float(dyn.transferred_energy)
        if type(dyn).__name__ == "VelocityVerlet":
            return etot
        return float("nan")

    def record(self, log: IO[str] | None) -> None:
        atoms = self.atoms
        epot = float(atoms.get_potential_energy())
        ekin = float(atoms.get_kinetic_energy())
        temperature = 2.0 * ekin / (self.ndof * units.kB)
        if self.periodic:
            stress = atoms.get_stress(include_ideal_gas=True)
            pressure = -float(np.mean(stress[:3])) / units.GPa
            volume = float(atoms.get_volume())
        else:
            pressure = volume = float("nan")
        t_fs = self.dyn.get_time() / units.fs
        row = (t_fs, epot, ekin, epot + ekin, self.conserved(epot + ekin), temperature, pressure, volume)
        self.rows.append(row)
        if log is not None:
            log.write(
                f"{row[0]:10.2f} {row[1]:16.6f} {row[2]:12.6f} {row[3]:16.6f} {row[4]:16.6f} "
                f"{row[5]:9.2f} {row[6]:10.4f} {row[7]:12.4f}\n"
            )

    def result(
        self, ensemble: str, integrator: str, timestep_fs: float, steps: int, wall: float, files: dict
    ) -> MDResult:
        data = np.array(self.rows, dtype=float).reshape(-1, len(LOG_COLUMNS))
        return MDResult(
            atoms=self.atoms,
            ensemble=ensemble,
            integrator=integrator,
            timestep_fs=timestep_fs,
            steps=steps,
            time_fs=data[:, 0],
            potential_energy=data[:, 1],
            kinetic_energy=data[:, 2],
            total_energy=data[:, 3],
            conserved_energy=data[:, 4],
            temperature=data[:, 5],
            pressure=data[:, 6] if self.periodic else None,
            volume=data[:, 7] if self.periodic else None,
            degrees_of_freedom=self.ndof,
            wall_time_s=wall,
            files=files,
        )


def _log_header(atoms: Atoms, dyn: MolecularDynamics, ensemble: str, timestep_fs: float, ndof: int) -> str:
    names = " ".join(f"{name}[{unit}]" for name, unit in LOG_COLUMNS)
    return (
        f"# {ensemble.upper()} MD of {atoms.get_chemical_formula()} ({len(atoms)} atoms) with "
        f"{type(dyn).__name__}, time step {timestep_fs} fs, {ndof} degrees of freedom\n"
        f"# {names}\n"
    )


def _progress(steps: int, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", desc="MD", leave=False)


def _update_bar(bar, dyn: MolecularDynamics, recorder: _Recorder) -> None:
    if dyn.nsteps == 0:
        return
    bar.update(dyn.nsteps - bar.n)
    if recorder.rows and dyn.nsteps % 10 == 0:
        row = recorder.rows[-1]
        bar.set_postfix(T=f"{row[5]:.0f} K", Etot=f"{row[3]:.4f} eV", refresh=False)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
