"""Cost of SparseCalc's check that nothing changed, against ASE's comparison, in one run.

Every property request (energy, then forces, then stress of one MD step) asks the calculator
whether the atoms changed. ``SparseCalc.check_state`` compares the arrays for exact equality
first and runs ASE's tolerance comparison (``compare_atoms``) only when they differ. Times
both on unchanged atoms (the second and third request of a step), and the graph building of
a step for scale, interleaved, medians of process CPU time over many calls; one CPU thread.

Example
-------
python bench/speed_state_check.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import update_section
from _speed import RESULTS, markdown_table, median, parse_args, write_results
from speed_calculator import make_system

SYSTEMS = ["ethanol", "si64", "si512"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import tempfile

    from ase.calculators.calculator import compare_atoms

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.graph import build_graph
    from ase_sparsecalc.testing import save_mace_model

    model = save_mace_model(Path(tempfile.mkdtemp()) / "small.model", seed=1)
    calc = SparseCalc(str(model))
    repeats = 50 if args.quick else 1000
    rows, results = [], []
    for system in SYSTEMS:
        atoms = make_system(system)
        atoms.calc = calc
        atoms.get_potential_energy()
        candidates = {
            "SparseCalc.check_state": lambda a=atoms: calc.check_state(a),
            "ASE compare_atoms": lambda a=atoms: compare_atoms(calc.atoms, a),
            "build_graph": lambda a=atoms: build_graph([a], calc.cutoff),
        }
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        ms = {name: 1e3 * median(t) for name, t in times.items()}
        ratio = ms["SparseCalc.check_state"] / ms["ASE compare_atoms"]
        results.append({"system": system, "atoms": len(atoms), "ms": ms, "check_state/compare_atoms": ratio})
        rows.append([system, len(atoms), *ms.values(), ratio])
    table = markdown_table(
        ["system", "atoms", "check_state ms (unchanged)", "ASE compare_atoms ms", "build_graph ms", "ratio"],
        rows,
    )
    md = write_results("state_check", args, {"results": results}, [("state check on unchanged atoms", table)])
    if args.out == RESULTS:  # the default results folder: also the docs section
        note = (
            "`ratio`: SparseCalc's check over ASE's comparison of the same unchanged atoms, medians "
            "of one run. The forces and stress requests of an MD step that follow its energy pay "
            "the first column instead of the second; the first request of a step (positions "
            "moved) pays both. `build_graph` (neighbour list and graph tensors, host path) gives "
            "the scale of a step's other host work."
        )
        body = f"## Checking that nothing changed\n\n{Path(md).read_text().strip()}\n\n{note}\n"
        update_section("state-check", body)
    print(table)


if __name__ == "__main__":
    main()
