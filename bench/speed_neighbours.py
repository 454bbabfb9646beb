"""Graph building with the host's cell lists against neighbour lists computed on the device.

``build_graph`` (neighbour list, image shifts and the graph tensors on the model's device) is
timed with ``neighbours="host"`` (matscipy on the CPU, edges copied over) and
``neighbours="device"`` (all pairs against every cell image with torch,
``ase_sparsecalc/device_neighbours.py``) and ``neighbours="auto"`` (what the calculator uses:
the device where it is expected to be faster), round-robin, new displacements every round, on
ethanol and diamond Si supercells, for the cutoffs of SevenNet-0 (5 Å) and MACE-MP-0 (6 Å).
Both must give the same edges; the script stops if they do not. Structures past the device
path's size limit (``fits_on_device``) are reported as such and skipped.

Examples
--------
python bench/speed_neighbours.py --device cuda
python bench/speed_neighbours.py --supercells 2 4 --rounds 20
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _speed import markdown_table, median, parse_args, timed, write_results

CUTOFFS = {"SevenNet-0": 5.0, "MACE-MP-0": 6.0}


def _extra(parser) -> None:
    parser.add_argument(
        "--supercells",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="n x n x n cubic Si cells (default 2 4 8)",
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per structure (default 30)")


def structures(supercells: list[int]) -> list[tuple[str, object]]:
    """Ethanol in vacuum and 8 n³-atom diamond Si cells, named."""
    from ase.build import bulk, molecule

    out = [("ethanol", molecule("CH3CH2OH"))]
    for n in supercells:
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((n,) * 3)
        out.append((f"Si {len(atoms)}", atoms))
    return out


def sorted_edges(graph) -> np.ndarray:
    """The graph's edges as rows (i, j, S1, S2, S3), sorted, for comparing two lists."""
    pairs = graph.edge_index.cpu().numpy().T
    shifts = np.rint(graph.unit_shifts.cpu().numpy()).astype(np.int64)
    rows = np.column_stack([pairs, shifts])
    return rows[np.lexsort(rows.T[::-1])]


def bench(atoms, cutoff: float, args) -> dict:
    """Median ms of build_graph per placement of the lists, and their ratio, on one structure."""
    import torch

    from ase_sparsecalc.device_neighbours import fits_on_device
    from ase_sparsecalc.graph import _lists_on_device, build_graph

    if not fits_on_device(len(atoms), atoms.cell.array, atoms.pbc, cutoff):
        return {"atoms": len(atoms), "fits": False}
    rng = np.random.default_rng(len(atoms))
    start = atoms.positions.copy()

    def build(where: str, moved):
        return build_graph([moved], cutoff, args.device, torch.float32, neighbours=where)

    moved = atoms.copy()
    moved.positions = start + rng.normal(0.0, 0.05, start.shape)
    graphs = {where: build(where, moved) for where in ("host", "device")}  # warm-up and check
    host_edges, device_edges = (sorted_edges(graphs[w]) for w in ("host", "device"))
    if not np.array_equal(host_edges, device_edges):
        raise SystemExit(
            f"{len(atoms)} atoms, cutoff {cutoff}: the lists differ "
            f"({len(host_edges)} host edges, {len(device_edges)} device edges)"
        )
    places = ["host", "device", "auto"]
    times: dict[str, list[float]] = {where: [] for where in places}
    for r in range(args.rounds):
        moved = atoms.copy()
        moved.positions = start + rng.normal(0.0, 0.05, start.shape)
        for where in places[r % 3 :] + places[: r % 3]:
            seconds, _ = timed(lambda where=where, moved=moved: build(where, moved), args.device)
            times[where].append(seconds)
    ratio = median([d / h for d, h in zip(times["device"], times["host"], strict=True)])
    return {
        "atoms": len(atoms),
        "fits": True,
        "edges": len(host_edges),
        "host_ms": 1e3 * median(times["host"]),
        "device_ms": 1e3 * median(times["device"]),
        "device/host": ratio,
        "auto_ms": 1e3 * median(times["auto"]),
        "auto_picks": "device" if _lists_on_device(atoms, cutoff, args.device, "auto") else "host",
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    rows, results = [], []
    for model, cutoff in CUTOFFS.items():
        for name, atoms in structures(args.supercells):
            result = {"structure": name, "model": model, "cutoff": cutoff, **bench(atoms, cutoff, args)}
            print(result, flush=True)
            results.append(result)
            if result["fits"]:
                cells = [
                    result["edges"],
                    result["host_ms"],
                    result["device_ms"],
                    result["device/host"],
                    f"{result['auto_picks']}, {result['auto_ms']:.3g}",
                ]
            else:
                cells = ["–", "–", "–", "past the device limit", "host"]
            rows.append([name, f"{model} ({cutoff:g} Å)", *cells])
    table = markdown_table(
        [
            "structure",
            "cutoff of",
            "edges",
            "host lists ms",
            "device lists ms",
            "device / host",
            "auto: picks, ms",
        ],
        rows,
    )
    title = f"build_graph on {args.device}: host cell lists against device lists (float32 graph)"
    write_results("neighbours", args, {"rows": results}, [(title, table)])
    print(table, flush=True)


if __name__ == "__main__":
    main()
