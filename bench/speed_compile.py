"""``SparseCalc(compile_mode=...)`` against eager SparseCalc and the backend's own calculator.

One process, one model, diamond Si supercells (64 atoms by default; new displacements every
round, so the number of edges changes), energy + forces + stress through the ASE interface.
Three calculators, timed round-robin in an order that rotates every round: ``compiled``
(SparseCalc with ``compile_mode``), ``eager`` (SparseCalc) and ``own`` (``MACECalculator`` on
the same model file, or ``SevenNetCalculator``; their defaults: eager), all with the same 3 %
delta except ``own``, which runs the bare model (same cost per call). Reports the first
compiled call of each size (compilation included), medians of the following rounds, paired
ratios and the largest force difference between compiled and eager. Several sizes
(``--supercells 2 4``) run in one process, so the second size shows the cost of a new shape
after the first compile.

Models: ``small`` (the test-suite MACE: 8x0e+8x1o+8x2e) and ``medium`` (the
MACE-MP-0-medium shape), float64 unless ``--dtype float32``; ``sevennet`` (SevenNet-0 from the
sevenn wheel, float32, the dtype ``SevenNetCalculator`` runs). MACE is compiled with MACE's own
recipe (``mace.tools.compile.prepare``, one graph); SevenNet is rebuilt without TorchScript and
its energy compiled as one graph, differentiated after (see
``ase_sparsecalc/backends/accelerate.py``). Results of a non-default dtype are written as
``speed_compile_<model>_<dtype>``.

The first call is timed with an empty inductor cache (unless ``--warm-cache``), in wall-clock
time too, because inductor compiles in worker processes whose CPU time the benchmark process
does not see.

Examples
--------
python bench/speed_compile.py --model small
python bench/speed_compile.py --model medium --device cuda --supercells 2 4   # 64 and 512 atoms
python bench/speed_compile.py --model sevennet --device cuda --supercells 2 4
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, median, parse_args, wall_timed, write_results
from speed_calculator import call, own_calculator

DTYPES = {"small": "float64", "medium": "float64", "sevennet": "float32"}
OWN_NAMES = {"small": "MACECalculator", "medium": "MACECalculator", "sevennet": "SevenNetCalculator"}


def _extra(parser) -> None:
    parser.add_argument("--model", default="small", choices=sorted(DTYPES))
    parser.add_argument("--calls", type=int, default=6, help="timed rounds after the first (default 6)")
    parser.add_argument(
        "--supercells",
        type=int,
        nargs="+",
        default=[2],
        help="n x n x n cubic diamond cells, 8 n^3 atoms each, in this order (default 2: 64)",
    )
    parser.add_argument("--no-own", action="store_true", help="leave the backend's own calculator out")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default: default)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        help="model dtype (default: float64 for MACE, float32 for SevenNet-0)",
    )
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse torch's inductor cache (default: start empty)"
    )


def calculators(args) -> dict:
    """``compiled``, ``eager`` (both with one 3 % delta) and, unless --no-own, ``own``."""
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta, save_mace_model

    dtype = args.dtype
    if args.model == "sevennet":
        base = "sevennet-0"
    elif args.model == "medium":
        base = str(mace_medium_model_file())
    else:
        base = str(save_mace_model(Path(tempfile.mkdtemp()) / "small.model", seed=1))
    eager = SparseCalc(base, device=args.device, default_dtype=dtype)
    compiled = SparseCalc(base, device=args.device, default_dtype=dtype, compile_mode=args.mode)
    delta = random_sparse_delta(eager.backend, density=0.03, seed=0)
    eager.set_delta(delta)
    compiled.set_delta(delta)  # applied after compiling: the compiled copy must follow it
    calcs = {"compiled": compiled, "eager": eager}
    if not args.no_own:
        kind = "sevennet" if args.model == "sevennet" else "mace"
        own = own_calculator(kind, dtype, args.device, Path(base))  # path unused for sevennet
        if own is not None:  # SevenNetCalculator runs float32 only
            calcs["own"] = own
    return calcs


def bench_size(calcs: dict, supercell: int, args, fast: str = "compiled") -> dict:
    """Time the calculators round-robin on one Si supercell; the first call of ``fast`` apart.

    ``calcs`` holds ``fast`` (the accelerated SparseCalc), ``eager`` and optionally ``own`` and
    ``own_<fast>`` (the backend's calculator, plain and accelerated). Ratios are medians of the
    per-round ratios; the force difference is between ``fast`` and ``eager``.
    """
    from ase.build import bulk

    base = bulk("Si", "diamond", a=5.43, cubic=True).repeat((supercell,) * 3)
    rng = np.random.default_rng(supercell)

    def clock(calc, positions):
        atoms = base.copy()
        atoms.positions = positions
        wall, cpu, out = wall_timed(lambda: call(calc, atoms, periodic=True), args.device)
        return (wall if args.device == "cuda" else cpu), wall, out

    start = base.positions + rng.normal(0.0, 0.05, base.positions.shape)
    first_fast, first_wall, _ = clock(calcs[fast], start)
    for name in calcs:
        if name != fast:
            clock(calcs[name], start)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calcs}
    diffs = []
    for r in range(args.calls):
        positions = base.positions + rng.normal(0.0, 0.05, base.positions.shape)
        names = list(calcs)
        outputs = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t, _, outputs[name] = clock(calcs[name], positions)
            times[name].append(t)
        diffs.append(float(np.abs(outputs["eager"]["forces"] - outputs[fast]["forces"]).max()))
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    pairs = ((fast, "eager"), (fast, "own"), ("eager", "own"), (fast, f"own_{fast}"), (f"own_{fast}", "own"))
    ratios = {
        f"{a}/{b}": median([x / y for x, y in zip(times[a], times[b], strict=True)])
        for a, b in pairs
        if a in times and b in times
    }
    result = {
        "atoms": len(base),
        f"first_{fast}_call_s": first_fast,
        f"first_{fast}_call_wall_s": first_wall,
        "ms": ms,
        "ms_all": {name: [1e3 * t for t in ts] for name, ts in times.items()},
        "ratios": ratios,
        "eager_ms": ms["eager"],
        f"{fast}_ms": ms[fast],
        "speedup": 1.0 / ratios[f"{fast}/eager"],
        "max_force_difference": max(diffs),
    }
    print(result, flush=True)
    return result


def write(sizes: list[dict], args) -> None:
    """Write the results of the sizes measured so far (after each size: a run cut short keeps them)."""
    own = OWN_NAMES[args.model]
    table = markdown_table(
        [
            "model",
            "atoms",
            "mode",
            "first call: CPU s / wall s (compiles)",
            "eager ms",
            "compiled ms",
            f"{own} ms",
            "compiled / eager",
            f"compiled / {own}",
            "max abs ΔF (eV/Å)",
        ],
        [
            [
                args.model,
                size["atoms"],
                args.mode,
                f"{size['first_compiled_call_s']:.0f} / {size['first_compiled_call_wall_s']:.0f}",
                size["ms"]["eager"],
                size["ms"]["compiled"],
                size["ms"].get("own", "–"),
                size["ratios"]["compiled/eager"],
                size["ratios"].get("compiled/own", "–"),
                size["max_force_difference"],
            ]
            for size in sizes
        ],
    )
    result = {"model": args.model, "mode": args.mode, "dtype": args.dtype, "sizes": sizes}
    atoms = ", ".join(str(size["atoms"]) for size in sizes)
    title = f"torch.compile, {args.model}, Si {atoms} atoms, {args.dtype} (one process, this order)"
    name = f"compile_{args.model}" + ("" if args.dtype == DTYPES[args.model] else f"_{args.dtype}")
    write_results(name, args, result, [(title, table)])
    print(table, flush=True)


def main() -> None:
    if "--warm-cache" not in sys.argv:
        # a private, empty inductor cache: the first call then shows the real compile cost
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
    args = parse_args(__doc__.splitlines()[0], _extra)
    args.dtype = args.dtype or DTYPES[args.model]
    calcs = calculators(args)
    sizes: list[dict] = []
    for n in args.supercells:
        sizes.append(bench_size(calcs, n, args))
        write(sizes, args)


if __name__ == "__main__":
    main()
