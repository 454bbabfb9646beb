"""``SparseCalc(compile_mode=...)`` against eager SparseCalc and MACECalculator: compile cost, time per call.

One process, one MACE model, a diamond Si supercell (64 atoms by default; new displacements
every round, so the number of edges changes), energy + forces + stress through the ASE
interface, float64. Three calculators, timed round-robin in an order that rotates every round:
``compiled`` (SparseCalc with ``compile_mode``), ``eager`` (SparseCalc) and ``own``
(``MACECalculator`` on the same model file, its defaults: eager), all with the same 3 % delta
except ``own``, which runs the bare file (same cost per call). Reports the first compiled call
(compilation included), medians of the following rounds, paired ratios and the largest force
difference between compiled and eager. The compiled model is built with MACE's own recipe
(``mace.tools.compile.prepare``, ``torch.compile(fullgraph=True, dynamic=True)``).

The first call is timed with an empty inductor cache (unless ``--warm-cache``), in wall-clock
time too, because inductor compiles in worker processes whose CPU time the benchmark process
does not see.

Models: ``small`` (the test-suite MACE: 8x0e+8x1o+8x2e) and ``medium`` (the MACE-MP-0-medium
shape). Compilation of ``medium`` takes a long time on a small CPU.

Examples
--------
python bench/speed_compile.py --model small
python bench/speed_compile.py --model medium --device cuda
python bench/speed_compile.py --model medium --device cuda --supercell 4   # 512 atoms
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


def _extra(parser) -> None:
    parser.add_argument("--model", default="small", choices=["small", "medium"])
    parser.add_argument("--calls", type=int, default=6, help="timed rounds after the first (default 6)")
    parser.add_argument(
        "--supercell", type=int, default=2, help="n x n x n cubic diamond cells: 8 n^3 atoms (default 2: 64)"
    )
    parser.add_argument("--no-own", action="store_true", help="leave MACECalculator out")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default: default)")
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse torch's inductor cache (default: start empty)"
    )


def main() -> None:
    if "--warm-cache" not in sys.argv:
        # a private, empty inductor cache: the first call then shows the real compile cost
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
    args = parse_args(__doc__.splitlines()[0], _extra)
    from ase.build import bulk

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta, save_mace_model

    if args.model == "medium":
        path = mace_medium_model_file()
    else:
        path = save_mace_model(Path(tempfile.mkdtemp()) / "small.model", seed=1)
    eager = SparseCalc(str(path), device=args.device)
    compiled = SparseCalc(str(path), device=args.device, compile_mode=args.mode)
    delta = random_sparse_delta(eager.backend, density=0.03, seed=0)
    eager.set_delta(delta)
    compiled.set_delta(delta)  # applied after compiling: the compiled copy must follow it
    calcs = {"compiled": compiled, "eager": eager}
    if not args.no_own:
        calcs["own"] = own_calculator("mace", "float64", args.device, path)
    base = bulk("Si", "diamond", a=5.43, cubic=True).repeat((args.supercell,) * 3)
    rng = np.random.default_rng(0)

    def clock(calc, positions):
        atoms = base.copy()
        atoms.positions = positions
        wall, cpu, out = wall_timed(lambda: call(calc, atoms, periodic=True), args.device)
        return (wall if args.device == "cuda" else cpu), wall, out

    start = base.positions + rng.normal(0.0, 0.05, base.positions.shape)
    first_compiled, first_wall, _ = clock(compiled, start)
    for name in calcs:
        if name != "compiled":
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
        diffs.append(float(np.abs(outputs["eager"]["forces"] - outputs["compiled"]["forces"]).max()))
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    ratios = {
        f"{a}/{b}": median([x / y for x, y in zip(times[a], times[b], strict=True)])
        for a, b in (("compiled", "eager"), ("compiled", "own"), ("eager", "own"))
        if b in times
    }
    result = {
        "model": args.model,
        "mode": args.mode,
        "atoms": len(base),
        "first_compiled_call_s": first_compiled,
        "first_compiled_call_wall_s": first_wall,
        "ms": ms,
        "ratios": ratios,
        "eager_ms": ms["eager"],
        "compiled_ms": ms["compiled"],
        "speedup": 1.0 / ratios["compiled/eager"],
        "max_force_difference": max(diffs),
    }
    print(result)
    table = markdown_table(
        [
            "model",
            "atoms",
            "mode",
            "first call: CPU s / wall s (compiles)",
            "eager ms",
            "compiled ms",
            "MACECalculator ms",
            "compiled / eager",
            "compiled / MACECalculator",
            "max abs ΔF (eV/Å)",
        ],
        [
            [
                args.model,
                len(base),
                args.mode,
                f"{first_compiled:.0f} / {first_wall:.0f}",
                ms["eager"],
                ms["compiled"],
                ms.get("own", "–"),
                ratios["compiled/eager"],
                ratios.get("compiled/own", "–"),
                result["max_force_difference"],
            ]
        ],
    )
    suffix = "" if args.supercell == 2 else f"_si{len(base)}"
    title = f"torch.compile, MACE, Si {len(base)}, float64"
    write_results(f"compile_{args.model}{suffix}", args, result, [(title, table)])
    print(table)


if __name__ == "__main__":
    main()
