"""Time to load a base model and apply a delta; size of a 3 % delta file next to the base file.

Cold numbers come from fresh processes (median of ``--repeats``): importing the backend, loading
the base (read, build, fingerprint), reading the delta file, merging it into the weights. Warm
numbers come from one process where the base is already cached: a new ``SparseCalc(base,
delta)`` and switching deltas with ``set_delta``.

Bases: SevenNet-0 (the checkpoint inside the sevenn wheel) and a MACE model of the MACE-MP-0
"medium" shape built locally. Deltas: random, 3 % of the path weights (readouts excluded), as
fine-tuning writes them (safetensors + JSON metadata).

Examples
--------
python bench/speed_load.py
python bench/speed_load.py --device cuda
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, median, parse_args, wall_timed, write_results

_COLD = r"""
import json, sys, time
start_wall, start_cpu = time.perf_counter(), time.process_time()
def lap():
    global start_wall, start_cpu
    w, c = time.perf_counter(), time.process_time()
    out = (w - start_wall, c - start_cpu)
    start_wall, start_cpu = w, c
    return out
import torch
torch.set_num_threads(int(sys.argv[4]))
import ase_sparsecalc
from ase_sparsecalc import SparseCalc, SparseDelta
kind, base, delta_path, _, device = sys.argv[1:6]
if kind == "sevennet":
    from ase_sparsecalc.backends.sevennet import import_sevenn as imp
else:
    from ase_sparsecalc.backends.mace import import_mace as imp
imp()
times = {"import": lap()}
calc = SparseCalc(base, device=device, default_dtype="float32")
times["load base"] = lap()
delta = SparseDelta.load(delta_path)
times["read delta"] = lap()
calc.set_delta(delta)
times["apply delta"] = lap()
print("RESULT " + json.dumps(times))
"""


def _extra(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per base (default 3)")


def cold(kind: str, base: str, delta_path: Path, threads: int, device: str, repeats: int) -> dict:
    """Median (wall, cpu) seconds of each loading stage over fresh processes."""
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-c", _COLD, kind, base, str(delta_path), str(threads), device],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        runs.append(json.loads(line.removeprefix("RESULT ")))
    return {
        stage: {
            "wall_s": median([r[stage][0] for r in runs]),
            "cpu_s": median([r[stage][1] for r in runs]),
        }
        for stage in runs[0]
    }


def bench_base(kind: str, base: str, base_file: Path, args, workdir: Path) -> tuple[dict, list, list]:
    """Sizes and loading times of one base: (results, size-table row, time-table rows)."""
    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    calc = SparseCalc(base, device=args.device, default_dtype="float32")
    deltas = [random_sparse_delta(calc.backend, density=0.03, seed=s) for s in (0, 1)]
    paths = [d.save(workdir / f"{kind}_delta_{k}.safetensors") for k, d in enumerate(deltas)]
    base_bytes = base_file.stat().st_size
    delta_bytes = paths[0].stat().st_size  # one file: safetensors with the JSON metadata inside
    n_params = sum(p.numel() for p in calc.backend.model.parameters())
    size_row = [
        kind,
        base_file.name,
        n_params,
        base_bytes / 2**20,
        deltas[0].nnz,
        deltas[0].density,
        delta_bytes / 2**10,
        delta_bytes / base_bytes,
    ]
    cold_times = cold(kind, base, paths[0], args.threads, args.device, 1 if args.quick else args.repeats)

    def new_calculator():
        return SparseCalc(base, delta=paths[0], device=args.device, default_dtype="float32")

    warm_new = median([wall_timed(new_calculator)[0] for _ in range(2 if args.quick else 5)])
    switch = [
        wall_timed(lambda d=deltas[k % 2]: calc.set_delta(d))[0] for k in range(4 if args.quick else 10)
    ]
    result = {
        "base_file": str(base_file),
        "base_bytes": base_bytes,
        "parameters": n_params,
        "delta_bytes": delta_bytes,
        "delta_nnz": deltas[0].nnz,
        "delta_density": deltas[0].density,
        "cold": cold_times,
        "warm_new_calculator_s": warm_new,
        "set_delta_switch_s": median(switch),
    }
    rows = [[kind, f"cold: {stage}", 1e3 * t["wall_s"], 1e3 * t["cpu_s"]] for stage, t in cold_times.items()]
    rows.append([kind, "warm: SparseCalc(base, delta) with the base cached", 1e3 * warm_new, "-"])
    rows.append([kind, "warm: set_delta (switch to another delta)", 1e3 * median(switch), "-"])
    return result, size_row, rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    from ase_sparsecalc.backends import foundation_models

    workdir = Path(tempfile.mkdtemp(prefix="speed_load_"))
    mace_path = mace_medium_model_file(workdir)
    bases = {
        "sevennet": ("sevennet-0", foundation_models.fetch(foundation_models.lookup("sevennet-0"))),
        "mace": (str(mace_path), mace_path),
    }
    size_rows, time_rows, results = [], [], {}
    for kind, (base, base_file) in bases.items():
        results[kind], sizes_row, rows = bench_base(kind, base, base_file, args, workdir)
        size_rows.append(sizes_row)
        time_rows.extend(rows)
        print(kind, results[kind], flush=True)
    sizes = markdown_table(
        ["base", "file", "parameters", "base MiB", "delta nnz", "density", "delta KiB", "delta/base"],
        size_rows,
    )
    times = markdown_table(["base", "stage", "wall ms", "CPU ms"], time_rows)
    write_results(
        "load",
        args,
        {"results": results},
        [("delta file (3 %) vs base checkpoint", sizes), ("loading and applying", times)],
    )
    print(sizes, times, sep="\n\n")


if __name__ == "__main__":
    main()
