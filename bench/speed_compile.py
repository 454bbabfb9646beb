"""``SparseCalc(..., compile_mode=...)`` against the eager e3nn MACE model: compile cost and per-call time.

One process, one MACE model, 64-atom Si (new displacements every call, so the number of edges
changes), energy + forces + stress, float64. Reports the time of the first compiled call
(compilation included), the median of the following calls, the eager median, and the largest
force difference between the two. The compiled model is built with MACE's own recipe
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
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, median, parse_args, wall_timed, write_results


def _extra(parser) -> None:
    parser.add_argument("--model", default="small", choices=["small", "medium"])
    parser.add_argument("--calls", type=int, default=6, help="timed calls after the first (default 6)")
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
    base = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(0)
    structures = []
    for _ in range(args.calls + 2):
        atoms = base.copy()
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        structures.append(atoms)
    props = ("energy", "forces", "stress")

    def clock(calc, atoms):
        wall, cpu, out = wall_timed(lambda: calc.batch_evaluate([atoms], props)[0], args.device)
        return (wall if args.device == "cuda" else cpu), wall, out

    first_compiled, first_wall, _ = clock(compiled, structures[0])
    clock(eager, structures[0])
    eager_times, compiled_times, diffs = [], [], []
    for atoms in structures[1:]:
        t_e, _, out_e = clock(eager, atoms)
        t_c, _, out_c = clock(compiled, atoms)
        eager_times.append(t_e)
        compiled_times.append(t_c)
        diffs.append(float(np.abs(out_e["forces"] - out_c["forces"]).max()))
    result = {
        "model": args.model,
        "mode": args.mode,
        "first_compiled_call_s": first_compiled,
        "first_compiled_call_wall_s": first_wall,
        "eager_ms": 1e3 * median(eager_times),
        "compiled_ms": 1e3 * median(compiled_times),
        "speedup": median(eager_times) / median(compiled_times),
        "max_force_difference": max(diffs),
    }
    print(result)
    table = markdown_table(
        [
            "model",
            "mode",
            "first call: CPU s / wall s (compiles)",
            "eager ms",
            "compiled ms",
            "eager/compiled",
            "max abs ΔF (eV/Å)",
        ],
        [
            [
                args.model,
                args.mode,
                f"{first_compiled:.0f} / {first_wall:.0f}",
                result["eager_ms"],
                result["compiled_ms"],
                result["speedup"],
                result["max_force_difference"],
            ]
        ],
    )
    write_results(f"compile_{args.model}", args, result, [("torch.compile, MACE, Si 64, float64", table)])
    print(table)


if __name__ == "__main__":
    main()
