"""Run every speed benchmark in one go and (with --docs) write the "Speed" section of docs/benchmarks.md.

Runs, in this order and with the same --device/--threads/--quick: speed_calculator.py,
speed_load.py, speed_finetune.py, speed_md.py, profile_calculator.py. Each writes
bench/results/speed_<name>.json and .md; this script joins the markdown, adds the verdict on
the speed targets (from the calculator ratios) and the machine, and replaces the section
between ``<!-- speed:start -->`` and ``<!-- speed:end -->`` of docs/benchmarks.md.

Examples
--------
python bench/speed_all.py --docs                  # CPU, about 30 min on a 2-core machine
python bench/speed_all.py --device cuda --docs    # on a GPU machine
python bench/speed_all.py --quick                 # smoke run, docs untouched
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import machine_description, markdown_table, update_section
from _speed import parse_args

BENCH = Path(__file__).parent
SCRIPTS = ["speed_calculator", "speed_load", "speed_finetune", "speed_md", "profile_calculator"]
TITLES = {
    "speed_calculator": "Calculator calls",
    "speed_load": "Loading a base and applying a delta",
    "speed_finetune": "Fine-tuning throughput and memory",
    "speed_md": "Molecular dynamics",
    "profile_calculator": "Profile of a calculator call",
}


def _extra(parser) -> None:
    parser.add_argument("--docs", action="store_true", help="write the Speed section of docs/benchmarks.md")
    parser.add_argument(
        "--only", nargs="+", choices=SCRIPTS, help="run only these (others: previous results)"
    )


def targets(calculator: dict) -> tuple[str, list[str]]:
    """Markdown table of the target ratios per row and a list of one-line verdicts."""
    rows, verdicts = [], []
    worst_merge, worst_own = 0.0, 0.0
    for res in calculator["results"]:
        r = res["ratios"]
        merge = r["merged/bare"]
        own = r.get("merged/own")
        worst_merge = max(worst_merge, merge)
        if own is not None:
            worst_own = max(worst_own, own)
        rows.append(
            [
                res["backend"],
                res["dtype"],
                f"{res['system']} ({res['atoms']})",
                merge,
                "met" if merge <= 1.02 else "NOT met",
                "-" if own is None else own,
                "-" if own is None else ("met" if own <= 1.0 else "NOT met"),
            ]
        )
    verdicts.append(
        f"merged delta / bare base <= 1.02: {'met' if worst_merge <= 1.02 else 'NOT met'} "
        f"(worst {worst_merge:.3f})"
    )
    verdicts.append(
        f"SparseCalc (merged delta) / the backend's own calculator <= 1.0: "
        f"{'met' if worst_own <= 1.0 else 'NOT met'} on every row (worst {worst_own:.3f})"
    )
    header = ["base", "dtype", "system", "merged/bare", "<= 1.02", "merged/own", "<= 1.0"]
    return markdown_table(header, rows), verdicts


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    flags = ["--device", args.device, "--threads", str(args.threads), "--out", str(args.out)]
    if args.quick:
        flags.append("--quick")
    started = time.monotonic()
    wall = {}
    for name in args.only or SCRIPTS:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *flags], check=True)
        wall[name] = time.monotonic() - t0
    print(f"all done in {time.monotonic() - started:.0f} s: {wall}")
    if not args.docs:
        return
    calculator = json.loads((args.out / "speed_calculator.json").read_text())
    table, verdicts = targets(calculator)
    command = "python bench/speed_all.py " + " ".join(sys.argv[1:])
    parts = [
        "## Speed",
        "",
        f"Measured on {date.today().isoformat()} with `{command}` on: {machine_description()}.",
        "On the CPU every time is the *CPU time* of the benchmark process (one torch thread), "
        "because the machine was shared with other jobs and wall-clock time there mostly "
        "measures waiting for a core; medians over repeated, interleaved calls. "
        + (
            "No GPU was available: GPU figures are not measured here (run the same command with "
            "`--device cuda` on a GPU machine)."
            if args.device == "cpu"
            else ""
        ),
        "",
        "### Targets",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        table,
        "",
        "Ratios below 1.0 between calculators that run the same model are differences in the "
        "code around the model (neighbour lists, data preparation, result conversion) plus "
        "measurement noise of a few per cent; merged and bare run the *same* computation (the "
        "delta is merged into the weights), so their ratio measures only that noise.",
        "",
    ]
    for name in SCRIPTS:
        md = args.out / f"speed_{name.removeprefix('speed_')}.md"
        if name == "profile_calculator":
            md = args.out / "speed_profile.md"
        if md.exists():
            parts += [f"### {TITLES[name]}", "", md.read_text().strip(), ""]
    parts.append(
        "Per-script commands: `python bench/<script>.py --device cpu|cuda [--quick]` for "
        + ", ".join(f"`{s}`" for s in SCRIPTS)
        + "; each writes `bench/results/speed_<name>.json` and `.md`."
    )
    update_section("speed", "\n".join(parts))
    print("docs/benchmarks.md: Speed section written")


if __name__ == "__main__":
    main()
