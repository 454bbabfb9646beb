"""Write one named section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import fcntl
import platform
import re
import time
from pathlib import Path

BENCHMARKS_MD = Path(__file__).parents[1] / "docs" / "benchmarks.md"
WRITE_LOCK = Path(__file__).parent / "results" / ".write.lock"
"""Scripts that write benchmark results take turns on this file's lock."""


def machine_description() -> str:
    """CPU model, core count, torch version and threads (and GPU name when present)."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (append if absent)."""
    from ase_sparsecalc.delta_io import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    return atomic_write_text(path, text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; floats with 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_section(
    title: str, command: str, intro: str, header: list[str], rows: list[list], note: str = ""
) -> str:
    """Body of a section: heading, command, machine and date, ``intro``, the table, ``note``."""
    return (
        f"### {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine_description()}; {time.strftime('%Y-%m-%d')}. "
        f"{intro}\n\n{markdown_table(header, rows)}\n" + (f"\n{note}\n" if note else "")
    )


def update_section_locked(name: str, body: str) -> None:
    """:func:`update_section` while holding :data:`WRITE_LOCK` (other benchmarks may be writing)."""
    WRITE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(WRITE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        update_section(name, body)
