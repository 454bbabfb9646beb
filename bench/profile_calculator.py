"""Where the time of a ``SparseCalc`` call goes: our code versus the model (cProfile).

For SevenNet-0 (and optionally the MACE-MP-0-medium-shaped model) on Si supercells, profiles
``--calls`` calculator calls (energy + forces + stress, new positions each call) and splits
the time into the model call (``Backend._call_model``, forward and force/stress backward),
graph building (``build_graph``: neighbour list and tensors) and everything else in the
calculator (element checks, energy shifts, result conversion, ASE bookkeeping). With
``--torch-profile`` the heaviest torch operators are listed too.

Examples
--------
python bench/profile_calculator.py --sizes 64 512
python bench/profile_calculator.py --backends sevennet mace --torch-profile
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, parse_args, write_results

REPEATS = {64: 2, 512: 4, 4096: 8}


def _extra(parser) -> None:
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 512], choices=sorted(REPEATS))
    parser.add_argument("--backends", nargs="+", default=["sevennet"], choices=["sevennet", "mace"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per size (default 3)")
    parser.add_argument("--torch-profile", action="store_true", help="also list the heaviest torch ops")


def _cumtime(stats: pstats.Stats, function: str, filename_part: str) -> float:
    total = 0.0
    for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items():
        if name == function and filename_part in filename:
            total += cumtime
    return total


def profile(calc, atoms, calls: int, device: str) -> dict:
    """Split ``calls`` calculator calls into model, graph building and the rest (seconds/call)."""
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    atoms.calc = calc
    atoms.get_stress()  # warm-up

    def run():
        for _ in range(calls):
            atoms.positions = base + rng.normal(0.0, 0.01, base.shape)
            atoms.get_potential_energy()
            atoms.get_forces()
            atoms.get_stress()

    profiler = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
    profiler.runcall(run)
    stats = pstats.Stats(profiler)
    total = _cumtime(stats, "run", "profile_calculator")
    model = _cumtime(stats, "_call_model", "backends/base.py")
    graph = _cumtime(stats, "build_graph", "ase_sparsecalc/graph.py")
    return {
        "total_ms": 1e3 * total / calls,
        "model_ms": 1e3 * model / calls,
        "graph_ms": 1e3 * graph / calls,
        "other_ms": 1e3 * (total - model - graph) / calls,
        "ours_fraction": (total - model) / total,
    }


def torch_ops(calc, atoms, top: int = 12) -> str:
    """The heaviest torch operators of one call (self CPU time)."""
    from torch.profiler import profile as torch_profile

    atoms.positions += 0.001
    with torch_profile() as prof:
        atoms.get_stress()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    from ase.build import bulk

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    bases = {"sevennet": "sevennet-0"}
    if "mace" in args.backends:
        bases["mace"] = str(mace_medium_model_file())
    rows, results, op_tables = [], [], []
    for kind in args.backends:
        calc = SparseCalc(bases[kind], device=args.device, default_dtype=args.dtype)
        calc.set_delta(random_sparse_delta(calc.backend, density=0.03, seed=0))
        for n in args.sizes:
            atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(REPEATS[n])
            atoms.rattle(0.02, seed=1)
            res = {"backend": kind, "atoms": n, **profile(calc, atoms, args.calls, args.device)}
            results.append(res)
            print(res, flush=True)
            rows.append(
                [
                    kind,
                    n,
                    res["total_ms"],
                    res["model_ms"],
                    res["graph_ms"],
                    res["other_ms"],
                    100 * res["ours_fraction"],
                ]
            )
            if args.torch_profile:
                op_tables.append(
                    (f"torch operators, {kind}, {n} atoms", "```\n" + torch_ops(calc, atoms) + "\n```")
                )
    table = markdown_table(
        ["base", "atoms", "ms/call", "model ms", "graph build ms", "other ms", "not model %"], rows
    )
    write_results(
        "profile",
        args,
        {"results": results},
        [(f"cProfile of SparseCalc calls ({args.dtype}, {args.calls} calls)", table), *op_tables],
    )
    print(table)


if __name__ == "__main__":
    main()
