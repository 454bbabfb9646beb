"""Shared pieces of the speed benchmarks (bench/speed_*.py): options, models, timing, output."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import machine_description, markdown_table

RESULTS = Path(__file__).parent / "results"

MACE_MEDIUM_SHAPE = {
    "hidden_irreps": "128x0e+128x1o",
    "max_ell": 3,
    "correlation": 3,
    "num_interactions": 2,
    "r_max": 6.0,
}
"""MACE-MP-0 "medium" architecture (random weights; no foundation file can be downloaded here)."""

MACE_ELEMENTS = (1, 6, 8, 14)  # H, C, O (ethanol) and Si


def parse_args(
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    require_device: bool = True,
):
    """The options every speed benchmark takes: --device, --quick, --threads, --out.

    ``require_device=False`` accepts ``--device cuda`` on a machine without one (for scripts
    that only format results measured elsewhere).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines are noisy)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    setup_torch(args.threads, args.device if require_device else "cpu")
    return args


def setup_torch(threads: int, device: str) -> None:
    """Fix the CPU thread count and check the device."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    from ase_sparsecalc.torch_setup import prepare_torch

    prepare_torch()  # before sevenn or mace is imported by anything else


def sync(device: str) -> None:
    """Wait for queued GPU work (timings of CUDA calls must include it)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, object]:
    """Seconds one call of ``fn`` took, and what it returned.

    On the CPU this is the *CPU time* of the process (``time.process_time``): on a machine
    shared with other jobs, wall-clock time mostly measures how long the process waited for a
    core, CPU time what the call cost. With one torch thread the two agree on an idle machine.
    On CUDA it is wall-clock time with the GPU synchronised before and after.
    """
    clock = time.perf_counter if device == "cuda" else time.process_time
    sync(device)
    start = clock()
    value = fn()
    sync(device)
    return clock() - start, value


def wall_timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, float, object]:
    """Wall-clock and CPU seconds of one call of ``fn``, and what it returned."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, value


def median(values: list[float]) -> float:
    """Median (NaN for an empty list)."""
    return statistics.median(values) if values else float("nan")


def mace_medium_model_file(directory: Path | None = None) -> Path:
    """A MACE-MP-0-medium-shaped model (random weights, float64) saved as MACE saves models."""
    from ase_sparsecalc.testing import save_mace_model

    directory = directory or Path(tempfile.mkdtemp(prefix="speed_models_"))
    path = directory / "mace_mp0_medium_shape.model"
    if not path.exists():
        save_mace_model(path, atomic_numbers=MACE_ELEMENTS, seed=0, **MACE_MEDIUM_SHAPE)
    return path


def portable(arg: str) -> str:
    """A command-line argument with this checkout's absolute path made relative."""
    root = str(Path(__file__).parents[1]) + "/"
    return arg.replace(root, "")


def write_results(name: str, args: argparse.Namespace, results: dict, tables: list[tuple[str, str]]) -> Path:
    """Write ``<out>/speed_<name>.json`` and ``.md`` (command, machine, date, tables)."""
    import torch

    from ase_sparsecalc.delta_io import atomic_write_text

    header = {
        "benchmark": name,
        "command": "python " + " ".join(portable(a) for a in sys.argv),
        "machine": machine_description(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": "wall-clock (GPU synchronised)" if args.device == "cuda" else "process CPU time",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"speed_{name}.json", json.dumps({**header, **results}, indent=2) + "\n")
    lines = [f"`{header['command']}` ({header['date']}; {header['machine']}; {header['clock']})", ""]
    for title, table in tables:
        lines += [f"**{title}**", "", table, ""]
    return atomic_write_text(args.out / f"speed_{name}.md", "\n".join(lines))


__all__ = [
    "MACE_ELEMENTS",
    "MACE_MEDIUM_SHAPE",
    "RESULTS",
    "mace_medium_model_file",
    "markdown_table",
    "median",
    "parse_args",
    "portable",
    "sync",
    "timed",
    "wall_timed",
    "write_results",
]
