"""``SparseCalc(enable_cueq=True)`` against eager SparseCalc and MACECalculator, plain and cuEquivariance.

One process, one MACE model, diamond Si supercells (new displacements every round), energy +
forces + stress through the ASE interface. Four calculators, timed round-robin in an order that
rotates every round (``speed_compile.bench_size``): ``cueq`` (SparseCalc with
``enable_cueq=True``), ``eager`` (SparseCalc), both with the same 3 % delta merged, ``own``
(``MACECalculator`` on the same model file) and ``own_cueq`` (``MACECalculator(enable_cueq=True)``),
which run the bare model (same cost per call). Reports the time to build each cuEquivariance
calculator (the model conversion), the first call, medians of the following rounds, paired
ratios and the largest force difference between ``cueq`` and ``eager``.

Needs ``pip install 'ase_sparsecalc[cuda]'`` (or ``[cuda13]``); on the CPU cuEquivariance runs
without its fused kernels, which measures nothing useful: run it on a GPU.

Example
-------
python bench/speed_cueq.py --model medium --dtype float32 --device cuda --supercells 4 2 8
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, parse_args, wall_timed, write_results
from speed_calculator import own_calculator
from speed_compile import bench_size

MODELS = ("small", "medium")


def _extra(parser) -> None:
    parser.add_argument("--model", default="medium", choices=MODELS)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--calls", type=int, default=10, help="timed rounds after the first (default 10)")
    parser.add_argument(
        "--supercells",
        type=int,
        nargs="+",
        default=[4, 2],
        help="n x n x n cubic diamond cells, 8 n^3 atoms each, in this order (default 4 2: 512, 64)",
    )


def calculators(args) -> tuple[dict, dict]:
    """The four calculators, and the seconds it took to build the two cuEquivariance ones."""
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta, save_mace_model

    if args.model == "medium":
        base = mace_medium_model_file()
    else:
        base = save_mace_model(Path(tempfile.mkdtemp()) / "small.model", seed=1)
    options = {"device": args.device, "default_dtype": args.dtype}
    eager = SparseCalc(str(base), **options)
    cueq_s, _, cueq = wall_timed(lambda: SparseCalc(str(base), enable_cueq=True, **options), args.device)
    delta = random_sparse_delta(eager.backend, density=0.03, seed=0)
    eager.set_delta(delta)
    cueq.set_delta(delta)  # applied after converting: the cuEquivariance copy must follow it
    own = own_calculator("mace", args.dtype, args.device, base)
    own_cueq_s, _, own_cueq = wall_timed(
        lambda: own_calculator("mace", args.dtype, args.device, base, enable_cueq=True), args.device
    )
    calcs = {"cueq": cueq, "eager": eager, "own": own, "own_cueq": own_cueq}
    return calcs, {"SparseCalc": cueq_s, "MACECalculator": own_cueq_s}


def write(sizes: list[dict], build_s: dict, args) -> None:
    """Write the results of the sizes measured so far (after each size: a run cut short keeps them)."""
    table = markdown_table(
        [
            "atoms",
            "SparseCalc cueq ms",
            "SparseCalc eager ms",
            "MACECalculator ms",
            "MACECalculator cueq ms",
            "cueq / eager",
            "cueq / MACECalculator",
            "cueq / MACECalculator cueq",
            "first cueq call s",
            "max abs ΔF (eV/Å)",
        ],
        [
            [
                size["atoms"],
                size["ms"]["cueq"],
                size["ms"]["eager"],
                size["ms"]["own"],
                size["ms"]["own_cueq"],
                size["ratios"]["cueq/eager"],
                size["ratios"]["cueq/own"],
                size["ratios"]["cueq/own_cueq"],
                size["first_cueq_call_s"],
                size["max_force_difference"],
            ]
            for size in sizes
        ],
    )
    built = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in build_s.items())
    result = {"model": args.model, "dtype": args.dtype, "build_s": build_s, "sizes": sizes}
    title = f"cuEquivariance, {args.model} MACE model, {args.dtype} (conversion: {built})"
    write_results(f"cueq_{args.model}_{args.dtype}", args, result, [(title, table)])
    print(table, flush=True)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    calcs, build_s = calculators(args)
    print("built in", build_s, flush=True)
    sizes: list[dict] = []
    for n in args.supercells:
        sizes.append(bench_size(calcs, n, args, fast="cueq"))
        write(sizes, build_s, args)


if __name__ == "__main__":
    main()
