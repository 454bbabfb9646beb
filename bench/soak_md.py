"""Soak test: long NVT molecular dynamics with a sparse delta, watching for NaN, drift and leaks.

Runs ``--steps`` (default 100 000) steps of Langevin NVT dynamics of crystalline silicon (the
2x2x2 conventional cell, 64 atoms, by default) with SevenNet-0 plus a sparse delta, and checks

* no NaN or inf in energy, forces or positions, at every step;
* the temperature stays near its target and the potential energy per atom stays physical;
* memory stays flat: the resident set size (RSS) is sampled every ``--sample-every`` steps and
  the start, end and maximum RSS and the slope of a straight-line fit are reported.

The delta is ``--delta FILE`` when given, else a reproducible random sparse delta (1 % of the
path weights changed by 5 % of each tensor's RMS; ``ase_sparsecalc.testing.random_sparse_delta``).
Results go to a JSON file and to the section "Soak: long NVT MD with a delta" of
``docs/benchmarks.md`` (other sections are left alone). Exit status 1 when a check fails.

Example
-------
OMP_NUM_THREADS=1 python bench/soak_md.py --steps 3000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import machine_description, markdown_table, update_section

ROOT = Path(__file__).parents[1]
SECTION = "soak"


def rss_mb() -> float:
    """Current resident set size of this process, MB (psutil, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (``resource.getrusage``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def build_calculator(args: argparse.Namespace):
    """SparseCalc with the delta file, or a seeded random sparse delta of the base."""
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    calc = SparseCalc(args.base, default_dtype=args.dtype, device=args.device)
    if args.delta:
        calc.set_delta(args.delta)
        label = str(args.delta)
    else:
        delta = random_sparse_delta(calc.backend, density=0.01, relative_scale=0.05, seed=args.seed)
        calc.set_delta(delta)
        label = f"random sparse delta (seed {args.seed}, 1 % of path weights, 5 % of RMS)"
    return calc, label


class Monitor:
    """Per-step NaN checks and every-``k``-step samples of temperature, energy and RSS."""

    def __init__(self, atoms, dyn, sample_every: int) -> None:
        self.atoms, self.dyn, self.sample_every = atoms, dyn, sample_every
        self.nonfinite_steps: list[int] = []
        self.samples: list[dict] = []
        self.start = time.perf_counter()

    def temperature(self) -> float:
        """Kinetic temperature, K, over the 3N - 3 degrees of freedom left by ``FixCom``."""
        from ase import units

        ndof = 3 * len(self.atoms) - 3
        return 2 * float(self.atoms.get_kinetic_energy()) / (ndof * units.kB)

    def every_step(self) -> None:
        results = self.atoms.calc.results
        ok = (
            np.isfinite(results.get("energy", np.nan))
            and np.all(np.isfinite(results.get("forces", np.nan)))
            and np.all(np.isfinite(self.atoms.positions))
        )
        if not ok:
            self.nonfinite_steps.append(self.dyn.nsteps)
        if self.dyn.nsteps % self.sample_every == 0:
            self.samples.append(
                {
                    "step": self.dyn.nsteps,
                    "wall_s": time.perf_counter() - self.start,
                    "temperature_K": self.temperature(),
                    "epot_per_atom_eV": float(results["energy"]) / len(self.atoms),
                    "rss_MB": rss_mb(),
                }
            )


def slope_per_1000_steps(steps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 1000 steps (0 for < 2 points)."""
    if len(steps) < 2:
        return 0.0
    return float(np.polyfit(steps, values, 1)[0] * 1000)


def run(args: argparse.Namespace) -> dict:
    """The soak run; returns the summary dict."""
    import torch
    from ase import units
    from ase.build import bulk
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    from ase_sparsecalc.workflows.md import degrees_of_freedom, initialise_velocities

    torch.set_num_threads(args.threads)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(args.supercell)
    calc, delta_label = build_calculator(args)
    atoms.calc = calc
    rng = np.random.default_rng(args.seed)
    atoms.set_constraint(FixCom())  # the centre of mass stays put (3N - 3 degrees of freedom)
    # Maxwell-Boltzmann momenta, zero total momentum, scaled to exactly the target temperature
    initialise_velocities(atoms, args.temperature, rng, degrees_of_freedom(atoms))
    dyn = Langevin(
        atoms,
        timestep=args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,
        rng=rng,
    )
    monitor = Monitor(atoms, dyn, args.sample_every)
    dyn.attach(monitor.every_step, interval=1)
    rss_before = rss_mb()
    started = time.perf_counter()
    dyn.run(args.steps)
    wall = time.perf_counter() - started
    return summarise(args, atoms, monitor, wall, rss_before, delta_label, calc)


def summarise(args, atoms, monitor: Monitor, wall: float, rss_before: float, delta_label: str, calc) -> dict:
    """The run's description, its samples, and the checks (see :func:`evaluate`)."""
    summary = {
        "command": "python bench/soak_md.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "base": args.base,
        "delta": delta_label,
        "dtype": args.dtype,
        "device": str(calc.backend.device),
        "atoms": len(atoms),
        "steps": args.steps,
        "timestep_fs": args.timestep,
        "temperature_target_K": args.temperature,
        "wall_s": wall,
        "ms_per_step": 1e3 * wall / args.steps,
        "nonfinite_steps": len(monitor.nonfinite_steps),
        "first_nonfinite_step": monitor.nonfinite_steps[0] if monitor.nonfinite_steps else None,
        "rss_before_run_MB": rss_before,
        "rss_peak_getrusage_MB": peak_rss_mb(),
        "samples": monitor.samples,
    }
    return evaluate(summary)


def evaluate(summary: dict) -> dict:
    """Temperature, energy and memory statistics and the pass/fail checks, from the samples.

    Memory counts as flat when the RSS floor (10th percentile) of the last quarter of the run
    exceeds that of the first quarter after warm-up by less than 1 MB plus 0.1 MB per 1000 steps
    (11 MB over 100 000 steps; the samples this script keeps take about 1 kB each). A floor,
    because single samples catch transient allocations (tens of MB for a 64-atom graph) or
    pages just returned to the system, which make a least-squares slope (also reported) noisy;
    leaked memory raises the floor.
    """
    samples, n_steps = summary["samples"], summary["steps"]
    steps = np.array([s["step"] for s in samples], dtype=float)
    rss = np.array([s["rss_MB"] for s in samples])
    temps = np.array([s["temperature_K"] for s in samples])
    epot = np.array([s["epot_per_atom_eV"] for s in samples])
    settled = steps >= 0.1 * n_steps  # skip thermalisation and allocator warm-up
    if settled.sum() < 4:
        settled[:] = True
    s_steps, s_rss = steps[settled], rss[settled]
    quarter = max(1, len(s_rss) // 4)
    span = (s_steps[-quarter:].mean() - s_steps[:quarter].mean()) / 1000 or 1.0
    floor_growth = float(np.percentile(s_rss[-quarter:], 10) - np.percentile(s_rss[:quarter], 10))
    growth = floor_growth / span
    mean_t = float(temps[settled].mean())
    target = summary["temperature_target_K"]
    summary.update(
        {
            "temperature_mean_K": mean_t,
            "temperature_std_K": float(temps[settled].std()),
            "epot_per_atom_eV": {
                "first": float(epot[0]),
                "last": float(epot[-1]),
                "range_after_warmup": float(np.ptp(epot[settled])),
            },
            "rss_MB": {
                "before_run": summary["rss_before_run_MB"],
                "first_sample": float(rss[0]),
                "after_warmup": float(s_rss[0]),
                "end": float(rss[-1]),
                "min_after_warmup": float(s_rss.min()),
                "max": float(rss.max()),
                "peak_getrusage": summary["rss_peak_getrusage_MB"],
                "floor_growth_MB": floor_growth,
                "growth_MB_per_1000_steps": growth,
                "slope_MB_per_1000_steps_after_warmup": slope_per_1000_steps(s_steps, s_rss),
            },
        }
    )
    checks = {
        "no_nan": summary["nonfinite_steps"] == 0,
        # the instantaneous temperature of N atoms fluctuates by T sqrt(2 / (3N - 3)); its mean
        # over thousands of steps must sit within 10 % of the target
        "temperature": abs(mean_t - target) < 0.1 * target,
        "energy": bool(np.all(np.isfinite(epot)) and np.ptp(epot[settled]) < 0.2),
        "memory_flat": floor_growth < 1.0 + 0.1 * n_steps / 1000,
    }
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    return summary


def markdown(summary: dict, note: str) -> str:
    """The benchmarks.md section."""
    rss, epot = summary["rss_MB"], summary["epot_per_atom_eV"]
    samples = summary["samples"]
    every = samples[1]["step"] - samples[0]["step"] if len(samples) > 1 else summary["steps"]
    temperature = f"{summary['temperature_mean_K']:.1f} ± {summary['temperature_std_K']:.1f} K"
    rss_line = " / ".join(f"{rss[k]:.1f}" for k in ("before_run", "after_warmup", "end", "max")) + " MB"
    growth = (
        f"{rss['floor_growth_MB']:+.3f} MB ({rss['growth_MB_per_1000_steps']:+.4f} MB per 1000 steps; "
        "RSS floor of the last vs the first quarter)"
    )
    checks = ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in summary["checks"].items())
    rows = [
        ["steps (timestep)", f"{summary['steps']} ({summary['timestep_fs']} fs)"],
        ["system", f"Si, {summary['atoms']} atoms, Langevin NVT at {summary['temperature_target_K']:.0f} K"],
        ["model", f"{summary['base']} ({summary['dtype']}, {summary['device']}) + {summary['delta']}"],
        ["wall time", f"{summary['wall_s']:.0f} s ({summary['ms_per_step']:.1f} ms/step)"],
        ["steps with NaN/inf", str(summary["nonfinite_steps"])],
        ["mean temperature after the first 10 % (3N-3 dof)", temperature],
        ["E_pot/atom first → last", f"{epot['first']:.4f} → {epot['last']:.4f} eV"],
        ["RSS before run / after warm-up / end / max", rss_line],
        ["RSS growth after warm-up", growth],
        [
            "RSS least-squares slope after warm-up",
            f"{rss['slope_MB_per_1000_steps_after_warmup']:+.4f} MB per 1000 steps",
        ],
        ["lowest RSS after warm-up (allocator returning pages)", f"{rss['min_after_warmup']:.1f} MB"],
        ["checks", checks],
    ]
    curve = samples[:: max(1, len(samples) // 10)]
    if curve[-1] is not samples[-1]:
        curve.append(samples[-1])
    curve_rows = [
        [s["step"], f"{s['rss_MB']:.2f}", f"{s['temperature_K']:.0f}", f"{s['epot_per_atom_eV']:.4f}"]
        for s in curve
    ]
    return "\n".join(
        [
            "## Soak: long NVT MD with a delta",
            "",
            "`bench/soak_md.py` runs long Langevin NVT MD with a sparse delta and checks for NaN or inf",
            "(every step), a sane temperature and potential energy, and flat memory (resident set size",
            f"sampled every {every} steps; warm-up = the first 10 % of the steps).",
            "",
            f"Command: `{summary['command']}`  ",
            f"Machine: {summary['machine']}; date: {summary.get('date', 'not recorded')}",
            "",
            markdown_table(["quantity", "value"], rows),
            "",
            "RSS curve (every tenth sample and the last):",
            "",
            markdown_table(["step", "RSS (MB)", "T (K)", "E_pot/atom (eV)"], curve_rows),
            "",
            note,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="MD steps (default: 100000)")
    parser.add_argument("--base", default="sevennet-0", help="base model (default: sevennet-0)")
    parser.add_argument("--delta", help="delta file (default: a seeded random sparse delta)")
    parser.add_argument(
        "--supercell", type=int, default=2, help="repeats of the 8-atom cubic cell (2: 64 atoms)"
    )
    parser.add_argument("--temperature", type=float, default=300.0, help="K (default: 300)")
    parser.add_argument("--timestep", type=float, default=2.0, help="fs (default: 2)")
    parser.add_argument(
        "--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default: 0.01)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--sample-every", type=int, default=50, help="steps between RSS samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak_md.json", help="JSON summary")
    parser.add_argument("--no-markdown", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--note", default="", help="text appended to the benchmarks.md section")
    parser.add_argument(
        "--from-json", type=Path, help="re-evaluate and report a finished run's JSON instead of running"
    )
    args = parser.parse_args()

    from ase_sparsecalc.delta_io import atomic_write_text

    if args.from_json:
        summary = evaluate(json.loads(args.from_json.read_text()))
    else:
        summary = run(args)
        atomic_write_text(args.out, json.dumps(summary, indent=1))
    short = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(short, indent=1))
    if not args.no_markdown:
        update_section(SECTION, markdown(summary, args.note))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
