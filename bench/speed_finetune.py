"""Fine-tuning throughput (structures per second), peak memory and optimizer state: sparse vs full.

Each configuration runs in a fresh process (so peak memory is its own): the base model, one
delta method (``sparse``: the default thresholded delta over the path weights; ``full``: every
parameter), the trainer's own step (``Trainer.train_step``: model call with ``W0 + Δ``, loss,
backward, optimizer step) on real DFT frames:

* ``ethanol``: PBE ethanol frames (examples/data/ethanol_train.xyz, 9 atoms), batches of 8;
* ``si64``: the PBEsol GPAW MD frames of 8-atom Si (tests/data/gpaw_si_md.txt) repeated 2x2x2
  (64 atoms; energy x 8, forces tiled, stress unchanged: exact labels of the supercell),
  batches of 2, with stress in the loss.

Peak memory: on the CPU the peak resident set size during the steps minus the resident size
before them (sampled every 2 ms); on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
allocated before. Optimizer state: elements and bytes of all optimizer state tensors.
``--runs`` chooses the method and optimizer pairs (default: ``sparse`` with its default
optimizer (AdamW), with ``factored_adam`` and with ``adafactor``, and ``full``).

Examples
--------
python bench/speed_finetune.py
python bench/speed_finetune.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import mace_medium_model_file, markdown_table, median, parse_args, wall_timed, write_results

ROOT = Path(__file__).parents[1]
BATCH = {"ethanol": 8, "si64": 2}
STEPS = {"ethanol": 4, "si64": 3}  # timed steps on the CPU; five times as many on CUDA


def _extra(parser) -> None:
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=["sevennet", "mace"], choices=["sevennet", "mace"])
    parser.add_argument("--systems", nargs="+", default=["ethanol", "si64"], choices=list(BATCH))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["sparse", "sparse:factored_adam", "sparse:adafactor", "full"],
        help="METHOD or METHOD:OPTIMIZER (default optimizer: adamw)",
    )


def load_frames(system: str, count: int):
    """``count`` labelled frames of ``system`` (cycled if the file has fewer)."""
    from ase_sparsecalc.finetune import read_frames
    from ase_sparsecalc.finetune.data import Frame

    if system == "ethanol":
        return read_frames(f"{ROOT / 'examples' / 'data' / 'ethanol_train.xyz'}@:{count}")
    cells = read_frames(str(ROOT / "tests" / "data" / "gpaw_si_md.txt"))
    frames = []
    for k in range(count):
        f = cells[k % len(cells)]
        atoms = f.atoms.repeat((2, 2, 2))
        frames.append(Frame(atoms, 8 * f.energy, np.tile(f.forces, (8, 1)), f.stress, f"{f.source} x8"))
    return frames


class PeakRSS:
    """Highest resident set size seen while the context is open (sampled in a thread)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def worker(spec: dict) -> dict:
    """Run one configuration; return its measurements."""
    import torch

    from ase_sparsecalc import load_backend
    from ase_sparsecalc.finetune import FinetuneConfig, trainable_infos
    from ase_sparsecalc.finetune.batches import make_batches
    from ase_sparsecalc.finetune.methods import METHODS, MethodOptions
    from ase_sparsecalc.finetune.trainer import Trainer

    device, system, method_name = spec["device"], spec["system"], spec["method"]
    backend = load_backend(spec["base"], device=device, dtype=spec["dtype"])
    batch, steps = BATCH[system], spec["steps"]
    frames = load_frames(system, batch * (steps + 1))
    batches = make_batches(frames, backend, batch, seed=0)
    config = FinetuneConfig(
        method=method_name,
        density=0.03 if method_name == "sparse" else None,
        epochs=100,
        batch_size=batch,
        dtype=spec["dtype"],
        device=device,
        **({"optimizer": spec["optimizer"]} if spec["optimizer"] else {}),
    )
    infos = trainable_infos(backend, config)
    params = dict(backend.model.named_parameters())
    options = MethodOptions(density=config.density)
    method = METHODS[method_name](infos, {i.name: params[i.name] for i in infos}, options).to(device)
    trainer = Trainer(backend, method, batches, [], config)
    method.train()

    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times, walls = [], []
    with PeakRSS() as rss:
        for k in range(steps + 1):
            batch_k = batches[k % len(batches)]
            wall, cpu, _ = wall_timed(lambda b=batch_k: trainer.train_step(b), device)
            if k:  # the first step allocates optimizer state and warms up
                times.append(wall if on_gpu else cpu)
                walls.append(wall)
    peak = (torch.cuda.max_memory_allocated() - before) if on_gpu else (rss.peak - rss.start)
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return {
        **spec,
        "optimizer": config.optimizer,
        "atoms_per_structure": frames[0].n_atoms,
        "batch_size": batch,
        "step_s": median(times),
        "step_wall_s": median(walls),
        "structures_per_s": batch / median(times),
        "peak_memory_MiB": peak / 2**20,
        "peak_memory_kind": "cuda max_memory_allocated" if on_gpu else "peak RSS increase",
        "trainable_elements": trainable,
        "optimizer_state_elements": sum(t.numel() for t in state),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "model_parameters": sum(p.numel() for p in backend.model.parameters()),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    mace_path = mace_medium_model_file()
    bases = {"sevennet": "sevennet-0", "mace": str(mace_path)}
    systems = ["ethanol"] if args.quick else args.systems
    rows, results = [], []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for kind in args.backends:
        for system in systems:
            for run in args.runs:
                method, _, optimizer = run.partition(":")
                spec = {
                    "backend": kind,
                    "base": bases[kind],
                    "system": system,
                    "method": method,
                    "optimizer": optimizer,
                    "device": args.device,
                    "dtype": args.dtype,
                    "steps": 2 if args.quick else STEPS[system] * (5 if args.device == "cuda" else 1),
                }
                command = [sys.executable, __file__, "--threads", str(args.threads), "--device", args.device]
                proc = subprocess.run(
                    [*command, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
                )
                if proc.returncode != 0:
                    raise SystemExit(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                res = json.loads(line.removeprefix("RESULT "))
                results.append(res)
                print(kind, system, run, {k: res[k] for k in ("structures_per_s", "peak_memory_MiB")})
                rows.append(
                    [
                        kind,
                        f"{system} ({res['atoms_per_structure']} atoms, batch {res['batch_size']})",
                        method,
                        res["optimizer"],
                        res["structures_per_s"],
                        1e3 * res["step_s"],
                        res["peak_memory_MiB"],
                        res["trainable_elements"],
                        res["optimizer_state_elements"],
                        res["optimizer_state_bytes"] / 2**20,
                    ]
                )
    table = markdown_table(
        [
            "base",
            "data",
            "method",
            "optimizer",
            "structures/s",
            "ms/step",
            "peak memory MiB",
            "trainable elements",
            "optimizer state elements",
            "optimizer state MiB",
        ],
        rows,
    )
    write_results("finetune", args, {"results": results}, [(f"fine-tuning steps ({args.dtype})", table)])
    print(table)


if __name__ == "__main__":
    main()
