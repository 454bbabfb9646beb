"""Milliseconds per calculator call (energy + forces + stress), as ratios measured in one run.

Three calculators per base model, on the same structures, timed round-robin (one call of each
per round, in an order that rotates every round, fresh displacements every round, medians over
rounds; CPU time of the process on
the CPU, wall-clock time on CUDA: see ``_speed.timed``):

* ``merged``: ``SparseCalc`` with a random 3 % sparse delta merged into the weights;
* ``bare``: ``SparseCalc`` on the bare base model;
* ``own``: the model family's own ASE calculator (``SevenNetCalculator('7net-0')``, float32
  only; ``MACECalculator`` on the same MACE model file).

Bases: SevenNet-0 (from the sevenn wheel) and a MACE model of the MACE-MP-0 "medium" shape
(128x0e+128x1o, max_ell 3, correlation 3, 2 interactions, r_max 6 Å; random weights, built
locally because no foundation-model file can be downloaded here). Systems: ethanol (9 atoms,
no cell: energy + forces) and diamond Si supercells of 64, 512 and 4096 atoms. The time to build
the neighbour list and graph tensors is recorded per system too.

Examples
--------
python bench/speed_calculator.py                       # CPU: ethanol, Si 64, Si 512
python bench/speed_calculator.py --systems ethanol si64 si512 si4096 --device cuda
python bench/speed_calculator.py --quick               # ethanol and Si 64, few rounds
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import (
    mace_medium_model_file,
    markdown_table,
    median,
    parse_args,
    timed,
    wall_timed,
    write_results,
)

SYSTEMS = {"ethanol": None, "si64": 2, "si512": 4, "si4096": 8}
ROUNDS = {"ethanol": 25, "si64": 7, "si512": 6, "si4096": 2}
WARMUP = {"ethanol": 3, "si64": 2, "si512": 1, "si4096": 1}


def _extra(parser) -> None:
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        help="default: ethanol si64 si512 on cpu, all four on cuda; --quick: ethanol si64",
    )
    parser.add_argument("--backends", nargs="+", default=["sevennet", "mace"], choices=["sevennet", "mace"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="multiply the rounds per system")


def make_system(name: str):
    """Ethanol (rattled) or an n x n x n supercell of cubic diamond Si (8 n^3 atoms)."""
    from ase.build import bulk, molecule

    if name == "ethanol":
        atoms = molecule("CH3CH2OH")
    else:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(SYSTEMS[name])
    atoms.rattle(0.02, seed=1)
    return atoms


def own_calculator(kind: str, dtype: str, device: str, mace_path: Path, enable_cueq: bool = False):
    """The model family's own ASE calculator, or None where it does not run in ``dtype``.

    ``enable_cueq``: MACE only, ``MACECalculator(enable_cueq=True)`` (its cuEquivariance path).
    """
    if kind == "sevennet":
        if dtype != "float32":
            return None  # SevenNetCalculator runs float32 only
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator("7net-0", device=device)
    # MACECalculator loads the file with torch.load(weights_only=False): a file we wrote
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        from mace.calculators import MACECalculator

        return MACECalculator(
            model_paths=str(mace_path), device=device, default_dtype=dtype, enable_cueq=enable_cueq
        )
    finally:
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def calculators(kind: str, dtype: str, device: str, mace_path: Path) -> dict:
    """``merged``, ``bare`` and (where it exists) ``own`` calculators of one base in one dtype."""
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    base = "sevennet-0" if kind == "sevennet" else str(mace_path)
    bare = SparseCalc(base, device=device, default_dtype=dtype)
    delta = random_sparse_delta(bare.backend, density=0.03, seed=0)
    calcs = {"merged": SparseCalc(base, delta=delta, device=device, default_dtype=dtype), "bare": bare}
    own = own_calculator(kind, dtype, device, mace_path)
    if own is not None:
        calcs["own"] = own
    return calcs


def call(calc, atoms, periodic: bool) -> dict:
    """One calculator call: energy, forces and (crystals) stress."""
    atoms.calc = calc
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if periodic:
        out["stress"] = atoms.get_stress()
    return out


def bench_system(calcs: dict, system: str, device: str, rounds: int, warmup: int) -> dict:
    """Round-robin timing of the calculators on one system; medians and paired ratios."""
    base = make_system(system)
    periodic = system != "ethanol"
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in calcs}
    walls: dict[str, list[float]] = {name: [] for name in calcs}
    agreement = []
    for r in range(warmup + rounds):
        positions = base.positions + rng.normal(0.0, 0.01, base.positions.shape)
        outputs = {}
        names = list(calcs)
        shift = r % len(names)  # rotate the order every round: no calculator always goes first
        for name in names[shift:] + names[:shift]:
            calc = calcs[name]
            atoms = base.copy()
            atoms.positions = positions
            wall, cpu, outputs[name] = wall_timed(lambda c=calc, a=atoms: call(c, a, periodic), device)
            if r >= warmup:
                times[name].append(wall if device == "cuda" else cpu)
                walls[name].append(wall)
        if "own" in outputs:
            agreement.append(float(np.abs(outputs["own"]["forces"] - outputs["bare"]["forces"]).max()))
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    paired = {}
    for a, b in (("merged", "bare"), ("merged", "own"), ("bare", "own")):
        if a in times and b in times:
            paired[f"{a}/{b}"] = median([x / y for x, y in zip(times[a], times[b], strict=True)])
    return {
        "system": system,
        "atoms": len(base),
        "rounds": rounds,
        "ms": ms,
        "ms_all": {k: [1e3 * x for x in v] for k, v in times.items()},
        "wall_ms": {name: 1e3 * median(t) for name, t in walls.items()},
        "ratios": paired,
        "max_force_difference_bare_vs_own_eV_per_A": max(agreement) if agreement else None,
    }


def graph_build_ms(system: str, cutoff: float, device: str, neighbours: str = "auto", repeats: int = 5):
    """Median time (ms) to build the neighbour list and graph tensors of one system.

    ``neighbours``: where the list is computed (see :func:`ase_sparsecalc.graph.build_graph`).
    """
    from ase_sparsecalc.graph import build_graph

    atoms = make_system(system)

    def build():
        return build_graph([atoms], cutoff, device, neighbours=neighbours)

    build()  # warm-up (CUDA kernels, allocator)
    return 1e3 * median([timed(build, device)[0] for _ in range(repeats)])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    systems = args.systems or (
        ["ethanol", "si64"]
        if args.quick
        else (list(SYSTEMS) if args.device == "cuda" else ["ethanol", "si64", "si512"])
    )
    mace_path = mace_medium_model_file()
    rows, results, graph_rows = [], [], []
    for kind in args.backends:
        for dtype in args.dtypes:
            calcs = calculators(kind, dtype, args.device, mace_path)
            for system in systems:
                rounds = max(1, round(ROUNDS[system] * args.rounds_scale * (0.4 if args.quick else 1)))
                res = bench_system(calcs, system, args.device, rounds, WARMUP[system])
                res.update({"backend": kind, "dtype": dtype})
                results.append(res)
                print(f"{kind} {dtype} {system}: {res['ms']} ratios {res['ratios']}", flush=True)
                rows.append(
                    [
                        kind,
                        dtype,
                        f"{system} ({res['atoms']})",
                        res["rounds"],
                        res["ms"]["merged"],
                        res["ms"]["bare"],
                        res["ms"].get("own", "-"),
                        res["ratios"]["merged/bare"],
                        res["ratios"].get("merged/own", "-"),
                        res["ratios"].get("bare/own", "-"),
                    ]
                )
            if kind == "sevennet" and dtype == args.dtypes[0]:
                cutoff = calcs["bare"].backend.cutoff
                for system in systems:
                    graph_rows.append(
                        [
                            system,
                            make_system(system).get_global_number_of_atoms(),
                            graph_build_ms(system, cutoff, args.device, "host"),
                        ]
                        + ([graph_build_ms(system, cutoff, args.device)] if args.device == "cuda" else [])
                    )
            del calcs
            gc.collect()
    table = markdown_table(
        [
            "base",
            "dtype",
            "system (atoms)",
            "rounds",
            "merged ms",
            "bare ms",
            "own ms",
            "merged/bare",
            "merged/own",
            "bare/own",
        ],
        rows,
    )
    graph_columns = ["system", "atoms", "graph build ms (cutoff 5 Å), list on the host (matscipy)"]
    if args.device == "cuda":
        graph_columns.append("graph build ms, default (list on the GPU where the cell fits)")
    graph_table = markdown_table(graph_columns, graph_rows)
    write_results(
        "calculator",
        args,
        {"systems": systems, "results": results, "graph_build_ms": graph_rows},
        [
            ("ms per call (energy+forces+stress; ethanol: energy+forces)", table),
            ("neighbour list + graph tensors", graph_table),
        ],
    )
    print(table)


if __name__ == "__main__":
    main()
