"""Run every speed benchmark in one go and (with --docs) write the "Speed" section of docs/benchmarks.md.

Runs, in this order and with the same --device/--threads/--quick: speed_calculator.py,
speed_load.py, speed_finetune.py, speed_md.py, profile_calculator.py. Each writes
bench/results/speed_<name>.json and .md; this script joins the markdown, adds the verdict on
the speed targets (from the calculator ratios) and the machine, and replaces the section
between ``<!-- speed:start -->`` and ``<!-- speed:end -->`` of docs/benchmarks.md (on CUDA the
section ``speed-gpu``; ``--no-run --docs`` formats results measured on another machine). A
``NOTES.md`` in the results folder (the reading of the numbers, written by hand) is placed
after the section's header.

Examples
--------
python bench/speed_all.py --docs                  # CPU, about 30 min on a 2-core machine
python bench/speed_all.py --device cuda --out bench/results/gpu --docs   # on a GPU machine
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
from _speed import RESULTS, median, parse_args, portable

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
    parser.add_argument("--no-run", action="store_true", help="only (re)write the docs from existing results")
    parser.add_argument(
        "--section",
        help="docs/benchmarks.md section to write (default: speed on the CPU, speed-gpu on CUDA)",
    )


def _pair(res: dict, a: str, b: str) -> dict | None:
    """Ratio of medians, median of per-round ratios and their range, for calculators a and b."""
    times = res["ms_all"]
    if a not in times or b not in times:
        return None
    per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
    return {
        "of_medians": median(times[a]) / median(times[b]),
        "paired": median(per_round),
        "low": min(per_round),
        "high": max(per_round),
    }


def _verdict(pair: dict, bound: float) -> str:
    """met (both estimates within the bound), NOT met (neither), or within noise (one)."""
    inside = [pair["of_medians"] <= bound, pair["paired"] <= bound]
    return "met" if all(inside) else ("NOT met" if not any(inside) else "within noise")


def targets(calculator: dict) -> tuple[str, list[str]]:
    """Markdown table of the target ratios per row and a list of one-line verdicts."""
    rows = []
    verdicts: dict[str, list[str]] = {"merge": [], "own": []}
    for res in calculator["results"]:
        merge, own = _pair(res, "merged", "bare"), _pair(res, "merged", "own")
        verdicts["merge"].append(_verdict(merge, 1.02))
        if own is not None:
            verdicts["own"].append(_verdict(own, 1.0))

        def cell(pair):
            if pair is None:
                return "-"
            return f"{pair['of_medians']:.3f} / {pair['paired']:.3f} ({pair['low']:.2f}-{pair['high']:.2f})"

        rows.append(
            [
                res["backend"],
                res["dtype"],
                f"{res['system']} ({res['atoms']})",
                res["rounds"],
                cell(merge),
                verdicts["merge"][-1],
                cell(own),
                "-" if own is None else verdicts["own"][-1],
            ]
        )

    def summary(kind: str) -> str:
        counts = {v: verdicts[kind].count(v) for v in ("met", "within noise", "NOT met")}
        return ", ".join(f"{n} {v}" for v, n in counts.items() if n)

    same = [_pair(res, "merged", "bare")["of_medians"] for res in calculator["results"]]
    versus = [p["of_medians"] for res in calculator["results"] if (p := _pair(res, "merged", "own"))]
    lines = [
        f"noise floor: merged and bare run the same computation, and their ratio of medians "
        f"scatters between {min(same):.3f} and {max(same):.3f} over the rows of this run; "
        f"SparseCalc / own calculator lies between {min(versus):.3f} and {max(versus):.3f}",
        f"merged delta / bare base <= 1.02: {summary('merge')} (of {len(verdicts['merge'])} rows)",
        f"SparseCalc (merged delta) / the backend's own calculator <= 1.0: {summary('own')} "
        f"(of {len(verdicts['own'])} rows)",
    ]
    header = [
        "base",
        "dtype",
        "system",
        "rounds",
        "merged/bare",
        "<= 1.02",
        "merged/own",
        "<= 1.0",
    ]
    return markdown_table(header, rows), lines


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra, require_device="--no-run" not in sys.argv)
    flags = ["--device", args.device, "--threads", str(args.threads)]
    if args.out.resolve() != RESULTS.resolve():
        flags += ["--out", str(args.out)]
    if args.quick:
        flags.append("--quick")
    started = time.monotonic()
    wall = {}
    for name in [] if args.no_run else args.only or SCRIPTS:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        script = (BENCH / f"{name}.py").relative_to(BENCH.parent)
        subprocess.run([sys.executable, str(script), *flags], check=True, cwd=BENCH.parent)
        wall[name] = time.monotonic() - t0
    print(f"all done in {time.monotonic() - started:.0f} s: {wall}")
    if not args.docs:
        return
    calculator = json.loads((args.out / "speed_calculator.json").read_text())
    table, verdicts = targets(calculator)
    command = (
        f"python bench/speed_all.py --device {args.device} --threads {args.threads}"
        + (" --quick" if args.quick else "")
        + ("" if args.out.resolve() == RESULTS.resolve() else f" --out {portable(str(args.out))}")
        + " --docs"
    )
    on_gpu = args.device == "cuda"
    machine = calculator.get("machine") or machine_description()  # where the numbers came from
    measured = calculator.get("date") or date.today().isoformat()
    parts = [
        "## Speed on a GPU" if on_gpu else "## Speed",
        "",
        f"Measured on {measured} with `{command}` on: {machine}.",
        (
            "On the GPU every time is wall-clock time with the device synchronised before and "
            "after each call; medians over repeated, interleaved calls. Host-side work (neighbour "
            "lists, data preparation) runs on one CPU thread."
            if on_gpu
            else "On the CPU every time is the *CPU time* of the benchmark process (one torch "
            "thread), because the machine was shared with other jobs and wall-clock time there "
            "mostly measures waiting for a core; medians over repeated, interleaved calls. GPU "
            "figures are in [Speed on a GPU](#speed-on-a-gpu) below."
        ),
        "",
        f"Calculator systems run: {', '.join(calculator['systems'])}"
        + (
            " (the 4096-atom Si cell was skipped on the CPU: about a minute per float32 call and "
            "several per float64 call here; `--systems ethanol si64 si512 si4096` includes it)."
            if "si4096" not in calculator["systems"]
            else "."
        ),
        "",
        *([(args.out / "NOTES.md").read_text().strip(), ""] if (args.out / "NOTES.md").exists() else []),
        "### Targets",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "Each ratio cell: ratio of the two medians / median of the per-round ratios (lowest-highest "
        "per-round ratio). A target counts as met when both estimates satisfy it, as within noise "
        "when only one does.",
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
    for kind, heading in (("compile", "torch.compile"), ("cueq", "cuEquivariance")):
        for md in sorted(args.out.glob(f"speed_{kind}_*.md")):
            model, *tags = md.stem.removeprefix(f"speed_{kind}_").split("_")  # "medium", "float32"
            family = "SevenNet-0" if model == "sevennet" else f"{model} MACE model"
            extra = "".join(
                f", {tag.replace('si', 'Si ')} atoms" if tag.startswith("si") else f", {tag}" for tag in tags
            )
            parts += [f"### {heading} ({family}{extra})", "", md.read_text().strip(), ""]
    neighbours = args.out / "speed_neighbours.md"
    if neighbours.exists():
        parts += ["### Neighbour lists on the host and on the device", "", neighbours.read_text().strip(), ""]
    parts.append(
        "Per-script commands: `python bench/<script>.py --device cpu|cuda [--quick]` for "
        + ", ".join(f"`{s}`" for s in SCRIPTS)
        + " (and `speed_compile.py --model small|medium|sevennet`, not part of the driver because compiling "
        "takes many minutes on a CPU, `speed_cueq.py`, which needs the cuda extra and a GPU, and "
        "`speed_neighbours.py`); each writes "
        f"`{portable(str(args.out))}/speed_<name>.json` and `.md`."
    )
    section = args.section or ("speed-gpu" if on_gpu else "speed")
    update_section(section, "\n".join(parts))
    print(f"docs/benchmarks.md: section {section} written")


if __name__ == "__main__":
    main()
